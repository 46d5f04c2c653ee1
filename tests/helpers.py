"""Shared test helpers: tiny configs that compile and run in seconds."""

import os
import pathlib
import signal
import sys

import numpy as np

from dtr_jax.config import load_config
from dtr_jax.models import inception

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


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS of a subprocess: `devices` CPU devices, the suite's compile settings."""
    count = f"--xla_force_host_platform_device_count={devices} " if devices > 1 else ""
    return (count + os.environ.get("DTR_TEST_XLA_FLAGS", "")).strip()


def cli_env(**extra):
    """The environment of a CLI subprocess: one CPU device (fast start), quiet TF."""
    return dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu") | extra


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


FAULTY_MAIN = ROOT / "tests" / "faulty_main.py"  # the CLI with an injected fault


def wait_for(proc, pattern: str) -> str:
    """Reads the process's stderr until a line contains `pattern`; returns that line."""
    for line in proc.stderr:
        if pattern in line:
            return line
    raise AssertionError(f"{pattern!r} never appeared (exit {proc.wait()})")


def kill9(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def random_inception_weights(path):
    """A pytorch-fid-shaped state dict of random weights, saved as .npz: He-initialised
    convolutions and BatchNorm of scale about 1, so that the features depend on the images."""
    rng = np.random.default_rng(0)
    arrays = {}
    for key, shape in inception.expected_torch_shapes().items():
        if key.endswith("running_var") or key.endswith("bn.weight"):  # keeps the scale
            arrays[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif key.endswith("weight") and len(shape) == 4:
            fan_in = int(np.prod(shape[1:]))
            arrays[key] = (rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32)
        else:
            arrays[key] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    np.savez(path, **arrays)
    return str(path)
