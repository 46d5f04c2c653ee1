"""Sampling over the mesh, and `--mode sample`.

`Sampler` jits `inference.sample_fn` once over a mesh: each device samples its
slice of the batch. `--mode sample` draws `sample.num_samples` images from a
workdir's latest checkpoint, decodes them (`dtr_jax.decoders`) and writes an
ADM-style .npz and a PNG grid.
"""

from __future__ import annotations

import io
import time

import jax
import numpy as np
from absl import logging

from dtr_jax import config as config_lib
from dtr_jax import decoders, files, inference, sharding
from dtr_jax.config import parse_labels


class Sampler:
    """The sampler of `dm` with settings `s` (a `sample` section), jitted once over `mesh`."""

    def __init__(self, dm: inference.DiffusionModel, s, mesh, params):
        self.mesh = mesh
        self.batch = sharding.batch_sharding(mesh)
        rep = sharding.replicated(mesh)

        def on_mesh(a):
            sh = getattr(a, "sharding", None)
            return isinstance(sh, jax.sharding.NamedSharding) and sh.mesh == mesh

        # Keep the params' layout where it is on this mesh (e.g. FSDP), else replicate.
        self.params_sharding = jax.tree.map(lambda a: a.sharding if on_mesh(a) else rep, params)
        self._fn = jax.jit(
            inference.sample_fn(dm, s),
            in_shardings=(self.params_sharding, self.batch, rep, rep),
            out_shardings=self.batch,
        )
        self.tables = None if dm.tables is None else jax.device_put(dm.tables, rep)

    def __call__(self, params, labels: np.ndarray, rng) -> np.ndarray:
        """Samples for `labels` (host numpy, any length) as float images on every host."""
        params = jax.device_put(params, self.params_sharding)  # no-op when already there
        out = self._fn(params, self.global_labels(labels), self.tables, rng)
        return np.asarray(sharding.host_gather(out))[: len(labels)]

    def global_labels(self, labels: np.ndarray) -> jax.Array:
        """`labels` (host numpy) as one global array split over the batch shards."""
        return sharding.put_batch(np.asarray(labels, np.int32), self.mesh)

    def lower(self, params, global_labels: jax.Array, rng):
        """The jitted sampler lowered for these arguments (the benchmark compiles it ahead
        of time for its compile time and XLA's memory analysis); call the compiled
        executable with (params, global_labels, self.tables, rng)."""
        return self._fn.lower(params, global_labels, self.tables, rng)


# --- images --------------------------------------------------------------------------


def grid(images: np.ndarray, rows: int, pad: int = 1) -> np.ndarray:
    """(rows*cols, H, W, C) uint8 -> one (rows*(H+pad)+pad, ..., C) image, white gaps."""
    n, h, w, c = images.shape
    cols = n // rows
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(rows * cols):
        r, q = divmod(i, cols)
        out[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + q * (w + pad) : pad + q * (w + pad) + w,
        ] = images[i]
    return out


def class_grid(sampler: Sampler, decode, params, num_classes: int, per_class: int, seed: int):
    """A uint8 grid of fresh samples through the image decoder `decode`, one row per
    class (the first 10 classes at most)."""
    labels = np.repeat(np.arange(min(num_classes, 10)), per_class)
    images = decode(sampler(params, labels, jax.random.key(seed)))
    return grid(images, rows=len(labels) // per_class)


def save_png(path: str, image: np.ndarray, scale: int = 1) -> None:
    """Writes a uint8 HWC image (1 or 3 channels) as PNG, upscaled by `scale` (local or gs://)."""
    from PIL import Image  # only where PNGs are written

    if scale > 1:
        image = image.repeat(scale, 0).repeat(scale, 1)
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    files.write_atomically(path, buffer.getvalue())


def write_npz(path: str, **arrays) -> None:
    """np.savez streamed into place atomically (local or remote)."""
    with files.open_atomically(path) as f:
        np.savez(f, **arrays)


# --- --mode sample ------------------------------------------------------------------


def labels_for(s, num_classes: int, n: int) -> np.ndarray:
    """`s.labels` cycled to n, or n labels drawn uniformly (seeded by `s.seed`)."""
    chosen = parse_labels(s.labels)
    if chosen:
        return np.resize(np.asarray(chosen, np.int32), n)
    rng = np.random.default_rng([s.seed, 0x1ABE1])
    return rng.integers(0, num_classes, n).astype(np.int32)


def run_name(config, step: int) -> str:
    s = config.sample
    which = "ema" if s.use_ema else "raw"
    return f"{which}_step{step}_{s.sampler}{s.num_steps}_cfg{s.cfg_scale:g}_seed{s.seed}"


def sample_images(config, workdir: str, num_samples: int):
    """(decoded samples, labels, checkpoint step) from WORKDIR's latest checkpoint,
    sampled in batches of `sample.batch_size` over all devices, with progress logs."""
    s = config.sample
    mesh = sharding.make_mesh(config.mesh)
    decode = decoders.create(config, mesh)
    dm, params, step = inference.restore_params(config, workdir, mesh, use_ema=s.use_ema)
    labels = labels_for(s, dm.model.num_classes, num_samples)
    sampler = Sampler(dm, s, mesh, params)
    chunks, start = [], time.perf_counter()
    with sharding.mesh_context(mesh):
        for i, lo in enumerate(range(0, num_samples, s.batch_size)):
            rng = jax.random.fold_in(jax.random.key(s.seed), i)
            batch = labels[lo : lo + s.batch_size]
            chunks.append(decode(sampler(params, batch, rng)))
            _progress(lo + len(batch), num_samples, start)
    return np.concatenate(chunks), labels, step


def sample_mode(config, workdir: str) -> str:
    """Samples `sample.num_samples` images from WORKDIR's latest checkpoint.

    Writes WORKDIR/samples/<run>.npz (arr_0: uint8 NHWC images, or float latents;
    arr_1: labels) and a PNG grid of the first images; returns the .npz path.
    """
    config_lib.validate(config, jax.device_count(), mode="sample")
    out_dir = files.resolve(workdir) / "samples"
    files.check_writable_dir(str(out_dir), "the samples directory")
    images, labels, step = sample_images(config, workdir, config.sample.num_samples)
    path = str(out_dir / f"{run_name(config, step)}.npz")
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_npz(path, arr_0=images, arr_1=labels)
        if decoders.gives_images(config.sample.decoder):
            cols = min(10, len(images))
            rows = min(10, len(images) // cols)
            scale = max(1, 32 // images.shape[1])  # small images (digits) drawn 4x
            save_png(path[: -len(".npz")] + ".png", grid(images[: rows * cols], rows), scale)
        logging.info("Wrote %d samples to %s", len(images), path)
    return path


def _progress(done: int, total: int, start: float) -> None:
    elapsed = time.perf_counter() - start
    rate = done / max(elapsed, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    logging.info(
        "sampled %d/%d (%.1f images/s, ETA %dm%02ds)", done, total, rate, eta // 60, eta % 60
    )
