"""A deterministic, resumable, host-sharded input pipeline on grain.

Global batch k is the k-th window of `global_batch_size` elements of an
endlessly repeated, per-epoch reshuffled stream (seeded by `seed`), with
per-element random flips seeded by the element's position. It depends only on
(seed, k): a resumed run sees exactly the batches an uninterrupted one would,
and so does a run on a different number of hosts. Host p reads only elements
p, p + P, p + 2P, ... of each window.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import grain
import jax
import numpy as np


def _flip(example: dict, rng: np.random.Generator) -> dict:
    if rng.random() < 0.5:
        example = dict(example, image=example["image"][:, ::-1])
    return example


def _stack(examples) -> dict:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def host_batches(
    source,
    *,
    seed: int,
    global_batch_size: int,
    flip: bool,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """This host's batches as a random-access dataset: item k is its part of batch k."""
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    if flip:
        ds = ds.random_map(_flip, seed=seed + 1)
    ds = ds[process_index::process_count]
    return ds.batch(global_batch_size // process_count, drop_remainder=True, batch_fn=_stack)


def device_batches(source, config, sharding, start_step: int = 0) -> Iterator[dict]:
    """Global jax.Arrays of the batches from `start_step` on, prefetched to the devices."""
    ds = host_batches(
        source,
        seed=config.seed,
        global_batch_size=config.global_batch_size,
        flip=config.data.flip,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    read = grain.ReadOptions(num_threads=config.data.num_threads, prefetch_buffer_size=4)
    host_iter = iter(ds[start_step:].to_iter_dataset(read))

    def to_device(batch):
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

    return prefetch(map(to_device, host_iter), config.data.prefetch)


def prefetch(iterator: Iterator, size: int) -> Iterator:
    """Keeps `size` items in flight (device transfers overlap the train step)."""
    queue = collections.deque()
    for item in iterator:
        queue.append(item)
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
