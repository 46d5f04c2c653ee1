"""Sampling: respaced DDPM/DDIM with classifier-free guidance, sharded over the mesh.

The model always sees the ORIGINAL timestep of each respaced step, so its
routing masks are the rows of the tasks it was trained on (SPEC §2).
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from dtr_jax import checkpoint as checkpoint_lib, sharding
from dtr_jax.config import ConfigError, parse_labels
from dtr_jax.diffusion import GaussianDiffusion, space_timesteps


def respaced(diffusion: GaussianDiffusion, num_steps: int) -> GaussianDiffusion:
    return diffusion.respace(space_timesteps(diffusion.num_timesteps, str(num_steps)))


def make_model_fn(model, params, labels, tables, cfg_scale: float):
    """model_fn(x_t, t) for the samplers: conditional, or guided when cfg_scale != 1."""
    if cfg_scale == 1.0 or model.num_classes == 1:
        return lambda x, t: model.apply({"params": params}, x, t, labels, tables)
    return lambda x, t: model.apply(
        {"params": params}, x, t, labels, tables, cfg_scale=cfg_scale, method=type(model).guided
    )


def sample_fn(model, diffusion: GaussianDiffusion, sample_config):
    """fn(params, labels, tables, rng) -> images (B, H, W, C) in the model's input scale."""
    sp = respaced(diffusion, sample_config.num_steps)

    def run(params, labels, tables, rng):
        fn = make_model_fn(model, params, labels, tables, sample_config.cfg_scale)
        shape = (labels.shape[0], model.input_size, model.input_size, model.in_channels)
        if sample_config.sampler == "ddim":
            return sp.ddim_sample(
                fn,
                shape,
                rng,
                eta=sample_config.ddim_eta,
                clip_denoised=sample_config.clip_denoised,
            )
        return sp.ddpm_sample(fn, shape, rng, clip_denoised=sample_config.clip_denoised)

    return run


class Sampler:
    """The sampler jitted once over a mesh: each device samples its slice of the batch."""

    def __init__(self, task, mesh, params):
        self.mesh = mesh
        self.shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch = sharding.batch_sharding(mesh)
        rep = sharding.replicated(mesh)
        # Keep the params' layout where it is on this mesh (e.g. FSDP), else replicate.
        on_mesh = (
            lambda a: isinstance(getattr(a, "sharding", None), jax.sharding.NamedSharding)
            and a.sharding.mesh == mesh
        )
        self.params_sharding = jax.tree.map(lambda a: a.sharding if on_mesh(a) else rep, params)
        fn = sample_fn(task.model, task.diffusion, task.config.sample)
        self._fn = jax.jit(
            fn, in_shardings=(self.params_sharding, self.batch, rep, rep), out_shardings=self.batch
        )
        tables = task.tables
        self.tables = None if tables is None else jax.device_put(tables, rep)

    def __call__(self, params, labels: np.ndarray, rng) -> np.ndarray:
        """Samples for `labels` (host numpy, any length) as float images on every host."""
        n = len(labels)
        padded = np.resize(np.asarray(labels, np.int32), pad_to(n, self.shards))
        global_labels = jax.make_array_from_callback(padded.shape, self.batch, lambda i: padded[i])
        params = jax.device_put(params, self.params_sharding)  # no-op when already there
        out = self._fn(params, global_labels, self.tables, rng)
        return np.asarray(host_gather(out))[:n]


def pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def host_gather(tree):
    """Brings a (possibly multi-host, sharded) pytree to every host as numpy."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 (as the ADM evaluator expects)."""
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


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


def class_labels(num_classes: int, per_class: int) -> np.ndarray:
    """per_class labels of each of the first (at most 10) classes: one grid row per class."""
    return np.repeat(np.arange(min(num_classes, 10)), per_class)


def class_grid(sampler: Sampler, params, num_classes: int, per_class: int, seed: int):
    """A uint8 grid with one row per class (at most 10 rows) of fresh samples."""
    labels = class_labels(num_classes, per_class)
    images = sampler(params, labels, jax.random.key(seed))
    return grid(to_uint8(images), rows=len(labels) // per_class)


def save_png(path: str, image: np.ndarray, scale: int = 1) -> None:
    """Writes a uint8 HWC image (1 or 3 channels) as PNG, upscaled by `scale` (local or gs://)."""
    import io

    from PIL import Image

    if scale > 1:
        image = image.repeat(scale, 0).repeat(scale, 1)
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    checkpoint_lib.write_atomically(path, buffer.getvalue())


# --- decoding: model space -> what gets saved --------------------------------


def decode_pixels(images, config) -> np.ndarray:
    """Pixel models: [-1, 1] floats -> uint8 images."""
    del config
    return to_uint8(images)


def keep_latents(images, config) -> np.ndarray:
    """Latent models without a decoder: save the raw float32 latents."""
    del config
    return np.asarray(images, np.float32)


# sample.decoder -> fn(model-space images, config) -> array to save. A VAE decoder for latent
# configs (ROADMAP item 3) registers itself here, e.g. DECODERS["sd_vae"] = decode_with_vae.
DECODERS = {"": decode_pixels, "latents": keep_latents}


def get_decoder(name: str):
    if name not in DECODERS:
        raise ConfigError(
            [
                f"sample.decoder={name!r} is not available: allowed {sorted(DECODERS)} "
                "('' for pixel models, 'latents' saves raw latents; VAE decoders register in "
                "dtr_jax.sample.DECODERS)"
            ]
        )
    return DECODERS[name]


def gives_pixels(decoder: str) -> bool:
    """Whether sample.decoder turns model outputs into uint8 images (grids, metrics)."""
    return DECODERS.get(decoder) is decode_pixels


def displayable(decoded: np.ndarray) -> bool:
    return decoded.dtype == np.uint8 and decoded.shape[-1] in (1, 3)


# --- --mode sample ------------------------------------------------------------


def labels_for(sample_config, num_classes: int, n: int) -> np.ndarray:
    """`sample.labels` cycled to n, or n labels drawn uniformly (seeded by sample.seed)."""
    chosen = parse_labels(sample_config.labels)
    if chosen:
        return np.resize(np.asarray(chosen, np.int32), n)
    rng = np.random.default_rng([sample_config.seed, 0x1ABE1])
    return rng.integers(0, num_classes, n).astype(np.int32)


def write_npz(path: str, **arrays) -> None:
    """np.savez streamed into place atomically (local or remote)."""
    with checkpoint_lib.open_atomically(path) as f:
        np.savez(f, **arrays)


def run_name(config, step: int) -> str:
    s = config.sample
    which = "ema" if s.use_ema else "raw"
    return f"{which}_step{step}_{s.sampler}{s.num_steps}_cfg{s.cfg_scale:g}_seed{s.seed}"


def sample_images(config, workdir: str, num_samples: int):
    """(decoded samples, labels, checkpoint step) from WORKDIR's latest checkpoint,
    sampled in batches of `sample.batch_size` over all devices, with progress logs."""
    from dtr_jax import train  # local: train imports this module

    decoder = get_decoder(config.sample.decoder)
    mesh = sharding.make_mesh(config.mesh)
    s = config.sample
    task, params, step = train.restore_params(config, workdir, mesh, use_ema=s.use_ema)
    labels = labels_for(s, task.model.num_classes, num_samples)
    sampler = Sampler(task, mesh, params)
    chunks, start = [], time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        for i, lo in enumerate(range(0, num_samples, s.batch_size)):
            rng = jax.random.fold_in(jax.random.key(s.seed), i)
            batch = labels[lo : lo + s.batch_size]
            chunks.append(decoder(sampler(params, batch, rng), config))
            _progress(lo + len(batch), num_samples, start)
    return np.concatenate(chunks), labels, step


def sample_mode(config, workdir: str) -> str:
    """Samples `sample.num_samples` images from WORKDIR's latest checkpoint.

    Writes WORKDIR/samples/<run>.npz (arr_0: uint8 NHWC images, or float latents;
    arr_1: labels) and a PNG grid of the first images; returns the .npz path.
    """
    from dtr_jax import config as config_lib

    config_lib.validate(config, jax.device_count(), mode="sample")
    get_decoder(config.sample.decoder)  # fail before restoring anything
    images, labels, step = sample_images(config, workdir, config.sample.num_samples)
    out_dir = checkpoint_lib.workdir_path(workdir) / "samples"
    path = str(out_dir / f"{run_name(config, step)}.npz")
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_npz(path, arr_0=images, arr_1=labels)
        if displayable(images):
            cols = min(10, len(images))
            rows = min(10, len(images) // cols)
            save_png(path[: -len(".npz")] + ".png", grid(images[: rows * cols], rows), scale=4)
        logging.info("Wrote %d samples to %s", len(images), path)
    return path


def _progress(done: int, total: int, start: float) -> None:
    elapsed = time.perf_counter() - start
    rate = done / max(elapsed, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    logging.info(
        "sampled %d/%d (%.1f images/s, ETA %dm%02ds)", done, total, rate, eta // 60, eta % 60
    )
