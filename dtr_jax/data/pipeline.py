"""A deterministic, resumable, host-sharded input pipeline on grain.

Global batch k is the k-th window of `global_batch_size` elements of an
endlessly repeated, per-epoch reshuffled stream (seeded by `seed`), with
per-element random flips seeded by the element's position. It depends only on
(seed, k): a resumed run sees exactly the batches an uninterrupted one would,
and so does a run on a different number of hosts, row for row. Each host reads
only the rows of each global batch its devices hold, one contiguous block of
global_batch_size / process_count rows.

Extracted latents (examples with `moments`) are flipped by taking the moments of
the mirror image, and reach the step as the `mean` and `std` of the posterior.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import grain
import jax
import numpy as np

from dtr_jax.sharding import process_block


def _flip(example: dict, rng: np.random.Generator) -> dict:
    if rng.random() < 0.5:
        if "moments" in example:  # [image, mirror image] x [mean, std]: take the mirror's
            example = dict(example, moments=example["moments"][::-1])
        else:
            example = dict(example, image=example["image"][:, ::-1])
    return example


def _stack(examples) -> dict:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _step_inputs(batch: dict) -> dict:
    """What the train step reads: images as they are; extracted latents as the mean and
    std of the (possibly mirrored) image's posterior."""
    if "moments" not in batch:
        return batch
    moments = batch["moments"]
    return {"mean": moments[:, 0, 0], "std": moments[:, 0, 1], "label": batch["label"]}


def host_batches(
    source,
    *,
    seed: int,
    global_batch_size: int,
    flip: bool,
    block: int = 0,
    num_blocks: int = 1,
) -> grain.MapDataset:
    """A host's batches as a random-access dataset: item k is block `block` of global
    batch k cut into `num_blocks` equal blocks of consecutive rows."""
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    if flip:
        ds = ds.random_map(_flip, seed=seed + 1)
    ds = ds.batch(global_batch_size // num_blocks, drop_remainder=True, batch_fn=_stack)
    return ds[block::num_blocks].map(_step_inputs)


def device_batches(source, config, sharding, start_step: int = 0) -> Iterator[dict]:
    """Global jax.Arrays of the batches from `start_step` on, prefetched to the devices."""
    ds = host_batches(
        source,
        seed=config.seed,
        global_batch_size=config.global_batch_size,
        flip=config.data.flip,
        block=process_block(sharding, config.global_batch_size),
        num_blocks=jax.process_count(),
    )
    host_iter = iter(ds[start_step:].to_iter_dataset(read_options(config.data.num_threads)))

    def to_device(batch):
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

    return prefetch(map(to_device, host_iter), config.data.prefetch)


def read_options(num_threads: int) -> grain.ReadOptions:
    """`num_threads` threads reading items (here: whole batches) ahead of the consumer.
    Each thread reads one item at a time, so the buffer holds as many items as there are
    threads (grain's default of 4 would cap the parallelism at 4 whatever the threads)."""
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(num_threads, 1))


def prefetch(iterator: Iterator, size: int) -> Iterator:
    """Keeps `size` items in flight (device transfers overlap the train step)."""
    queue = collections.deque()
    for item in iterator:
        queue.append(item)
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
