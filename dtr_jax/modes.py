"""What each --mode does (a function of config and workdir), and the per-process set-up
that the command lines (dtr_jax.main, dtr_jax.study) share."""

from __future__ import annotations

import logging as std_logging
import os

from absl import logging

from dtr_jax import config as config_lib

MODES = config_lib.MODES


def run(mode: str, config, workdir: str):
    """Runs `--mode` on `config` and `workdir`; returns what the mode returns."""
    # Imported on demand: training pulls in clu, grain and TensorBoard's writer, which the
    # other modes never use.
    if mode == "train":
        from dtr_jax.train import train_and_evaluate as fn
    elif mode == "sample":
        from dtr_jax.sample import sample_mode as fn
    elif mode == "evaluate":
        from dtr_jax.evaluate import evaluate_mode as fn
    elif mode == "export":
        from dtr_jax.export import export_mode as fn
    else:
        raise ValueError(f"--mode={mode!r} is unknown: allowed {', '.join(MODES)}")
    return fn(config, workdir)


def setup_process() -> None:
    """Quiet library logs, join the other processes of a multi-host job, and keep
    TensorFlow (clu's summaries, tfds) off the accelerators. Call before any TF import."""
    # TF only writes summaries and reads data here: keep its import quiet (INFO logs, and
    # the oneDNN notice that TF_CPP_MIN_LOG_LEVEL does not silence).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
    import jax

    if _multi_process():
        jax.distributed.initialize()
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    logging.info(
        "JAX process %d/%d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def _multi_process() -> bool:
    """True where a launcher started several processes (TPU pod, SLURM, explicit)."""
    env = os.environ
    tpu_hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return bool(
        env.get("JAX_COORDINATOR_ADDRESS")
        or "," in tpu_hosts
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or env.get("DTR_MULTIHOST") == "1"
    )


class _LibraryInfoFilter(std_logging.Filter):
    """Drops library INFO chatter (orbax logs dozens of lines per save); keeps warnings,
    except orbax's notice that a read-only mode (sample, evaluate, export) opened the
    checkpoints read-only, which is intended."""

    NOISY = ("/orbax/", "xla_bridge.py")

    def filter(self, record):
        if "/orbax/" in record.pathname and record.getMessage().startswith(
            "Given directory is read only"
        ):
            return False
        return record.levelno >= std_logging.WARNING or not any(
            part in record.pathname for part in self.NOISY
        )
