"""What each --mode does: a function of (config, workdir)."""

from __future__ import annotations


def run(mode: str, config, workdir: str):
    # Imported lazily: each mode pulls in only what it needs.
    if mode == "train":
        from dtr_jax.train import train_and_evaluate as fn
    elif mode == "sample":
        from dtr_jax.sample import sample_mode as fn
    elif mode == "evaluate":
        from dtr_jax.evaluate import evaluate_mode as fn
    elif mode == "export":
        from dtr_jax.export import export_mode as fn
    else:
        raise ValueError(f"--mode={mode!r} is unknown: allowed train, sample, evaluate, export")
    return fn(config, workdir)
