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
