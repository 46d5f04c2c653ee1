"""Latent extraction speed: the SD VAE encoder as `--mode extract` runs it (each image and
its mirror image, mean and std of both posteriors), images/s, and what that makes of
ImageNet-1k.

  python -m benchmarks.extract                         # 256x256, batch 8 (CPU: 2)
  python -m benchmarks.extract --batch 64 --dtype bfloat16

The encoder is the full-size SD VAE (sd-vae-ft-ema's architecture) with random weights:
the compute does not depend on their values, and nothing is downloaded. Reading and
cropping the JPEGs is not timed (`data.num_threads` threads do it alongside); the
extraction logs its own images/s, reading included. Batches are split over all devices.
"""

from __future__ import annotations

import argparse
import types

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from dtr_jax import sharding
from dtr_jax.models import vae as vae_lib

IMAGENET_TRAIN_IMAGES = 1_281_167


def encoder_run(image_size: int, batch: int, dtype: str):
    """(run(calls) -> seconds per batch, compile seconds, devices) of the jitted encoder."""
    vae = vae_lib.AutoencoderKL(vae_lib.VAEConfig(), dtype=jnp.dtype(dtype))
    devices = jax.devices()  # as many as split the batch evenly
    devices = devices[: max(n for n in range(1, len(devices) + 1) if batch % n == 0)]
    mesh = sharding.make_mesh(types.SimpleNamespace(data=-1, fsdp=1), devices)
    rep, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    side = vae.config.down_factor
    init = jax.jit(lambda key: vae.init(key, jnp.zeros((1, side, side, 3)))["params"])
    params = jax.device_put(init(jax.random.key(0)), rep)
    images = np.random.default_rng(0).uniform(-1, 1, (batch, image_size, image_size, 3))
    images = jax.device_put(images.astype(np.float32), split)

    def encode(p, x):  # what extract.encoder computes, after the uint8 -> [-1, 1] scaling
        return vae_lib.encode_views(vae, p, x).astype(jnp.float16)

    encode = jax.jit(encode, in_shardings=(rep, split), out_shardings=split)
    _, compile_seconds = common.timed(lambda: encode(params, images))

    def run(calls: int) -> float:
        return common.timed(lambda: [encode(params, images) for _ in range(calls)])[1] / calls

    return run, compile_seconds, len(devices)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=None, help="default 8 (CPU: 2)")
    parser.add_argument("--dtype", default="", help="default bfloat16 (CPU: float32)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2, help="batches per round")
    args = parser.parse_args(argv)
    batch = args.batch or (8 if common.accelerator() else 2)
    dtype = args.dtype or common.default_dtype()
    run, compile_seconds, devices = encoder_run(args.image_size, batch, dtype)
    seconds = common.median(common.time_interleaved({"vae": run}, args.rounds, args.calls)["vae"])
    per_s = batch / seconds
    hours = IMAGENET_TRAIN_IMAGES / per_s / 3600
    lines = [
        f"SD VAE encoder (random weights), {args.image_size}x{args.image_size}, image + mirror",
        f"median of {args.rounds} rounds x {args.calls} batches",
    ]
    print(common.header("Latent extraction", lines))
    print()
    columns = ["batch", "dtype", "devices", "s/batch", "images/s", "images/s/device"]
    columns += ["ImageNet-1k hours", "compile s"]
    row = (batch, dtype, devices, common.fmt(seconds, 3), common.fmt(per_s, 2))
    row += (common.fmt(per_s / devices, 2), common.fmt(hours, 1), common.fmt(compile_seconds, 1))
    print(common.table(columns, [row]))


if __name__ == "__main__":
    common.run_main(main)
