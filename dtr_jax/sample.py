"""Sampling: respaced DDPM/DDIM with classifier-free guidance, sharded over the mesh.

The model always sees the ORIGINAL timestep of each respaced step, so its
routing masks are the rows of the tasks it was trained on (SPEC §2).
"""

from __future__ import annotations

import jax
import numpy as np

from dtr_jax import sharding
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


def jit_sampler(task, mesh, params_sharding=None):
    """The sampler jitted over the mesh: labels and outputs split over the batch axes."""
    batch = sharding.batch_sharding(mesh)
    rep = sharding.replicated(mesh)
    fn = sample_fn(task.model, task.diffusion, task.config.sample)
    return jax.jit(fn, in_shardings=(params_sharding or rep, batch, rep, rep), out_shardings=batch)


def pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def generate(task, params, labels: np.ndarray, tables, mesh, rng, sampler=None) -> np.ndarray:
    """Samples for `labels` (host numpy, any length) as float images on the host."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    n = len(labels)
    padded = np.resize(np.asarray(labels, np.int32), pad_to(n, shards))
    sampler = sampler or jit_sampler(task, mesh, _params_sharding(params, mesh))
    out = sampler(params, padded, tables, rng)
    return np.asarray(host_gather(out))[:n]


def _params_sharding(params, mesh):
    return jax.tree.map(lambda a: getattr(a, "sharding", sharding.replicated(mesh)), params)


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


def class_grid(task, params, tables, mesh, per_class: int | None = None, seed: int | None = None):
    """A uint8 grid with one row per class (at most 10 rows) of fresh samples."""
    per_class = per_class or task.config.sample.grid_per_class
    classes = min(task.model.num_classes, 10)
    labels = np.repeat(np.arange(classes), per_class)
    seed = task.config.sample.seed if seed is None else seed
    images = generate(task, params, labels, tables, mesh, jax.random.key(seed))
    return grid(to_uint8(images), rows=classes)


def save_png(path: str, image: np.ndarray, scale: int = 1) -> None:
    """Writes a uint8 HWC image (1 or 3 channels) as PNG, upscaled by `scale`."""
    from PIL import Image

    if scale > 1:
        image = image.repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


__all__ = [
    "class_grid",
    "generate",
    "grid",
    "jit_sampler",
    "respaced",
    "sample_fn",
    "save_png",
    "to_uint8",
]
