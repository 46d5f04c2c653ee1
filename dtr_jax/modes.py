"""What each --mode does, as plain functions of (config, workdir)."""

from __future__ import annotations

from dtr_jax import train


def run(mode: str, config, workdir: str) -> None:
    runners = {"train": train.train_and_evaluate}
    if mode not in runners:
        raise NotImplementedError(f"--mode={mode} is not available yet")
    runners[mode](config, workdir)
