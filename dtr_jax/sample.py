"""Sampling over the mesh, and `--mode sample`.

`Sampler` jits `inference.sample_fn` once over a mesh: each device samples its
slice of the batch. `--mode sample` draws `sample.num_samples` images from a
workdir's latest checkpoint, decodes them (`dtr_jax.decoders`) and writes an
ADM-style .npz and a PNG grid, batch by batch so that an interrupted run resumes.
"""

from __future__ import annotations

import io

import jax
import numpy as np
from absl import logging

from dtr_jax import config as config_lib
from dtr_jax import decoders, files, inference, models, npz, sharding
from dtr_jax.config import parse_labels
from dtr_jax.diffusion import samplers


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
        self._fn = jit_sampler(dm, s, mesh, self.params_sharding)
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


def jit_sampler(dm: inference.DiffusionModel, s, mesh, params_sharding):
    """`inference.sample_fn(dm, s)` jitted over `mesh`: fn(params, labels, tables, rng),
    params laid out as `params_sharding`, labels and samples split over the batch shards,
    tables and rng replicated (`dtr_jax.plan` compiles it for a TPU slice)."""
    batch, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    return jax.jit(
        inference.sample_fn(dm, s),
        in_shardings=(params_sharding, batch, rep, rep),
        out_shardings=batch,
    )


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


# --- --mode sample ------------------------------------------------------------------


def labels_for(s, num_classes: int, n: int) -> np.ndarray:
    """`s.labels` cycled to n, or n labels drawn uniformly (seeded by `s.seed`)."""
    chosen = parse_labels(s.labels)
    if chosen:
        return np.resize(np.asarray(chosen, np.int32), n)
    rng = np.random.default_rng([s.seed, 0x1ABE1])
    return rng.integers(0, num_classes, n).astype(np.int32)


def run_settings(config, step: int, num_samples: int) -> dict:
    """Everything (JSON types) that determines the samples of a run besides the workdir:
    the params read (EMA or raw, at checkpoint `step`, or of `init_from`), the sampler
    and what it reads (`samplers.settings`), the labels and the batches (batch i is drawn
    with rng fold_in(seed, i)), the decoder."""
    s = config.sample
    return dict(
        params="ema" if s.use_ema else "raw",
        step=int(step),
        init_from=str(config.init_from),
        dtype=models.compute_dtype(config.model.dtype),
        sampler=str(s.sampler),
        num_steps=int(s.num_steps),
        ddim_eta=float(s.ddim_eta),
        cfg_scale=float(s.cfg_scale),
        clip_denoised=bool(s.clip_denoised),
        seed=int(s.seed),
        labels=str(s.labels),
        num_samples=int(num_samples),
        batch_size=int(s.batch_size),
        decoder=str(s.decoder),
        **decoders.DECODERS.get(s.decoder).settings(config),
        **samplers.settings(s),
    )


def run_name(config, step: int, num_samples: int) -> str:
    """The name of a run's files: its main settings, then a digest of all of them
    (`run_settings`), so that runs of other settings never share files."""
    s = config.sample
    which = "ema" if s.use_ema else "raw"
    digest = npz.digest(run_settings(config, step, num_samples))
    return (
        f"{which}_step{step}_{s.sampler}{s.num_steps}_cfg{s.cfg_scale:g}_seed{s.seed}"
        f"_n{num_samples}_{digest}"
    )


def batches(labels: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The labels of each batch of a run, in order."""
    return [labels[lo : lo + batch_size] for lo in range(0, len(labels), batch_size)]


def sample_batch(sampler: Sampler, decode, params, labels: np.ndarray, seed: int, i: int):
    """Batch i of a run: samples for `labels` drawn with rng fold_in(key(seed), i), decoded."""
    return decode(sampler(params, labels, jax.random.fold_in(jax.random.key(seed), i)))


def sample_to_npz(config, workdir: str, num_samples: int) -> str:
    """`num_samples` samples from WORKDIR's newest checkpoint, in batches of
    `sample.batch_size` over all devices, as WORKDIR/samples/<run>.npz (arr_0: uint8 NHWC
    images, or float latents; arr_1: labels) and a PNG grid of the first images; returns
    the .npz path. <run> is `run_name`.

    Resumable: each batch is written to WORKDIR/samples/<run>/part-00000.npz, ... as it
    finishes, and a rerun samples only the batches not written (the same images as an
    uninterrupted run). Once the .npz is written the parts are removed; a run whose .npz
    exists is not redone.
    """
    s = config.sample
    out_dir = files.resolve(workdir) / "samples"
    files.check_writable_dir(str(out_dir), "the samples directory")
    mesh = sharding.make_mesh(config.mesh)
    decode = decoders.create(config, mesh)
    dm, params, step = inference.restore_params(config, workdir, mesh, use_ema=s.use_ema)
    name = run_name(config, step, num_samples)
    path = str(out_dir / f"{name}.npz")
    label_batches = batches(labels_for(s, dm.model.num_classes, num_samples), s.batch_size)
    parts = npz.Parts(len(label_batches), str(out_dir / name))
    if sharding.from_process_0(np.asarray(files.resolve(path).exists())):
        logging.info("%s is already written: nothing to sample", path)
    else:
        sampler = Sampler(dm, s, mesh, params)

        def batch(i: int) -> dict:
            y = label_batches[i]
            return {"arr_0": sample_batch(sampler, decode, params, y, s.seed, i), "arr_1": y}

        with sharding.mesh_context(mesh):
            parts.fill(batch, [len(y) for y in label_batches], "sampled")
        if jax.process_index() == 0:
            npz.concatenate(path, [parts.path(i) for i in range(parts.num_parts)])
            if decode.gives_images:
                _save_grid(path, npz.read_array(path, "arr_0")[:100])
            logging.info("Wrote %d samples to %s", num_samples, path)
    parts.remove()
    sharding.sync_hosts("samples written")
    return path


def _save_grid(npz_path: str, images: np.ndarray) -> None:
    """A PNG grid of up to 10x10 `images` next to the .npz; small images drawn larger."""
    cols = min(10, len(images))
    rows = min(10, len(images) // cols)
    scale = max(1, 32 // images.shape[1])  # small images (digits) drawn 4x
    save_png(npz_path[: -len(".npz")] + ".png", grid(images[: rows * cols], rows), scale)


def sample_mode(config, workdir: str) -> str:
    """Samples `sample.num_samples` images from WORKDIR's latest checkpoint
    (`sample_to_npz`); returns the .npz path."""
    config_lib.validate(config, jax.device_count(), mode="sample")
    return sample_to_npz(config, workdir, config.sample.num_samples)
