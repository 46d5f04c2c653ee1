"""`--mode reference`: the FID reference batch of a dataset's photographs, as ADM's.

ADM's evaluator compares samples with a reference batch (`VIRTUAL_imagenet256_labeled.npz`
for ImageNet); for other data (FFHQ, an image folder) this mode makes one. It reads the
photographs of `extract.source` as `--mode extract` does (the ADM centre crop to
`data.image_size`, no flips; a TFDS source is first built from `data.manual_dir` if
needed) and writes `eval.reference`, the .npz that `--mode evaluate` reads:

  arr_0      `reference.num_images` photographs chosen at random (`reference.seed`), in
             the source's order, uint8 NHWC: the real images of precision/recall
  mu, sigma  with `eval.inception_weights`: the FID statistics (float64) of the Inception
             pool features of `reference.stats_images` photographs chosen the same way
             (0: all of them, as FID on FFHQ is taken against its 70K images)
  dtr_jax_reference  what it was made from (JSON), by which a rerun recognises it

The features are computed in global batches of `eval.batch_size` over all devices (every
process reads every batch); process 0 reads and writes the images. Resumable: each batch
is kept in `<eval.reference>.parts-<digest>/` until the file is written (atomically), then
that folder is removed. A finished reference is recognised and left as it is; a file of
other settings, or not written here, is refused and never replaced.
"""

from __future__ import annotations

import concurrent.futures
import json
import os

import jax
import numpy as np
from absl import logging

from dtr_jax import config as config_lib
from dtr_jax import data, files, metrics, npz, sharding
from dtr_jax.errors import ConfigError
from dtr_jax.evaluators import InceptionFeatures

SETTINGS_KEY = "dtr_jax_reference"


def reference_mode(config, workdir: str | None = None) -> dict:
    """Writes the reference batch `eval.reference` (the workdir is not used); returns the
    settings it records."""
    del workdir
    config_lib.validate(config, jax.device_count(), mode="reference")
    e, r, x = config.eval, config.reference, config.extract
    files.check_writable_dir(str(files.resolve(e.reference).parent), "eval.reference's folder")
    source = data.SOURCES.get(x.source)
    if source.prepare and jax.process_count() == 1:  # building is a one-process job
        source.prepare(config)
    photos = source.images(config, x.split)
    settings = plan(config, photos)
    if _written_already(e.reference, settings):
        return settings
    features = None
    if e.inception_weights:  # read (and refused) before any photograph is
        mesh = sharding.make_mesh(config.mesh)
        features = InceptionFeatures(e.inception_weights, e.batch_size, mesh)
    parts = f"{e.reference}.parts-{npz.digest(settings)}"
    threads = config.data.num_threads
    chosen = Photographs(photos, choose(len(photos), r.num_images, r.seed), threads)
    images = _image_parts(chosen, e.batch_size, f"{parts}/images_{e.batch_size}")
    extra = {}
    if features is not None:
        pooled = Photographs(photos, choose(len(photos), r.stats_images, r.seed), threads)
        found = features.parts(pooled, parts, what="the reference photographs")
        pools = lambda: (found[i]["pool"] for i in range(found.num_parts))  # noqa: E731
        extra["mu"], extra["sigma"] = metrics.streamed_stats(pools)
    extra[SETTINGS_KEY] = np.array(json.dumps(settings, sort_keys=True))
    if jax.process_index() == 0:
        npz.concatenate(e.reference, [images.path(i) for i in range(images.num_parts)], extra)
        files.remove_tree(parts)
        logging.info("Wrote the reference batch %s: %s", e.reference, settings)
    sharding.sync_hosts("reference-written")
    return settings


def plan(config, photos) -> dict:
    """What the reference batch of `photos` that `config` asks for is made from."""
    e, r = config.eval, config.reference
    n = len(photos)
    if r.num_images > n:
        logging.warning(
            "reference.num_images=%d but %s holds %d photographs: arr_0 holds them all",
            r.num_images,
            photos.fingerprint,
            n,
        )
    weights = None
    if e.inception_weights:  # its name and size: a copy elsewhere is the same weights
        identity = files.identity(e.inception_weights)
        weights = {"name": os.path.basename(e.inception_weights), "size": identity["size"]}
    return {
        "source": config.extract.source,
        "fingerprint": photos.fingerprint,
        "image_size": config.data.image_size,
        "num_photographs": n,
        "seed": r.seed,
        "num_images": len(choose(n, r.num_images, r.seed)),
        "stats_images": len(choose(n, r.stats_images, r.seed)) if weights else 0,
        "inception_weights": weights,
    }


def choose(n: int, k: int, seed: int) -> np.ndarray:
    """`k` of range(n) at random (`seed`), in increasing order; all of them if k is 0 or
    at least n."""
    if k == 0 or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


class Photographs:
    """Photographs `indices` of `photos` as a sliceable uint8 (N, H, W, 3) array, each
    slice decoded by `threads` threads."""

    def __init__(self, photos, indices: np.ndarray, threads: int):
        self.photos, self.indices, self.threads = photos, indices, threads

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, rows: slice) -> np.ndarray:
        picked = [int(i) for i in self.indices[rows]]
        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            return np.stack(list(pool.map(lambda i: self.photos[i]["image"], picked)))


def _image_parts(chosen: Photographs, batch: int, directory: str) -> npz.Parts:
    """`chosen` in parts of `batch` images (arr_0) in `directory`, read by process 0."""
    starts = range(0, len(chosen), batch)
    parts = npz.Parts(len(starts), directory)

    def read(i: int) -> dict:  # only process 0 stores the parts: the others skip reading
        lo = starts[i]
        return {"arr_0": chosen[lo : lo + batch]} if jax.process_index() == 0 else {}

    parts.fill(read, [min(batch, len(chosen) - lo) for lo in starts], "reference images")
    return parts


def _written_already(path: str, settings: dict) -> bool:
    """True if `path` holds the reference batch of `settings`; False if there is no file.
    Raises ConfigError for any other file: it is never replaced."""
    if not files.resolve(path).exists():
        return False
    header = npz.headers(path, "eval.reference")
    if SETTINGS_KEY not in header:
        raise ConfigError(
            [
                f"eval.reference={path!r} exists and was not written by --mode reference: "
                "name another file to write, or delete this one to write it there"
            ]
        )
    with files.resolve(path).open("rb") as f, np.load(f) as stored:
        found = json.loads(str(stored[SETTINGS_KEY]))
    differ = [
        f"{k} {found.get(k)!r} here, {v!r} asked" for k, v in settings.items() if found.get(k) != v
    ]
    if differ:
        raise ConfigError(
            [
                f"eval.reference={path!r} holds another reference batch ({'; '.join(differ)}): "
                "name another file to write, or delete this one to write it there"
            ]
        )
    logging.info("%s holds this reference batch already: nothing to do.", path)
    return True
