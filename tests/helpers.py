"""Shared test helpers: tiny configs that compile and run in seconds."""

import os
import pathlib
import sys

from dtr_jax.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits.py")


TINY = {
    "num_train_steps": 4,
    "global_batch_size": 16,
    "log_every_steps": 1,
    "checkpoint_every_steps": 100,
    "sample_every_steps": 0,
    "model.depth": 1,
    "model.hidden_size": 32,
    "model.num_heads": 2,
    "optimizer.warmup_steps": 0,
    "mesh.data": -1,
    "mesh.fsdp": 1,
    "sample.num_steps": 4,
    "sample.grid_per_class": 1,
}


def tiny(**overrides):
    """The digits default shrunk to compile and run in seconds."""
    return load_config(DIGITS, **(TINY | overrides))


def cli_command(workdir, mode="train", script=None, **overrides):
    """`python -m dtr_jax.main` (or `script`) on the tiny config, as an argv list."""
    entry = ["-m", "dtr_jax.main"] if script is None else [str(script)]
    fields = [f"--config.{k}={v}" for k, v in (TINY | overrides).items()]
    return [
        sys.executable,
        *entry,
        "--config",
        DIGITS,
        "--workdir",
        str(workdir),
        "--mode",
        mode,
        *fields,
    ]


def cli_env(**extra):
    """The environment of a CLI subprocess: one CPU device (fast start), quiet TF."""
    return dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", **extra)


def read_scalars(workdir, tag):
    """{step: value} of one scalar from the run's TensorBoard event files."""
    import tensorflow as tf

    values = {}
    for path in sorted(pathlib.Path(workdir).glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                if v.tag == tag:
                    values[event.step] = float(tf.make_ndarray(v.tensor))
    return values


def photo_folder(root, classes=("china", "flower"), per_class=3):
    """A tiny image folder of real photographs: crops of scikit-learn's two sample photos
    (427x640) of several sizes, landscape and portrait, as PNG, JPEG and grayscale, one
    sub-folder per class (`classes=()`: a flat folder). Returns its path."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    root = pathlib.Path(root)
    for c, name in enumerate(classes or [""]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            top, left, h, w = 30 * k, 50 * (k + c), (300, 180, 420)[k % 3], (350, 260, 200)[k % 3]
            image = Image.fromarray(photos[(c + k) % 2][top : top + h, left : left + w])
            if k % 3 == 1:
                image.save(root / name / f"{k}.jpg", quality=90)
            elif k % 3 == 2:
                image.convert("L").save(root / name / f"{k}.png")
            else:
                image.save(root / name / f"{k}.png")
    return str(root)


def random_vae(folder):
    """A small diffusers AutoencoderKL (2x down, 4 latent channels) with random weights,
    saved as a VAE folder for vae.path. Returns its path."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=32,
    )
    model.save_pretrained(str(folder))
    return str(folder)
