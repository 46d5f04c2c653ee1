"""Entry point: python -m dtr_jax.main --config configs/X.py --workdir DIR [--mode ...].

Fields of the config file are overridden with --config.field=value.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# TensorFlow (imported by clu and tfds) only writes summaries and reads data here: keep its
# import quiet (INFO logs, and the oneDNN notice that TF_CPP_MIN_LOG_LEVEL does not silence).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

MODES = ("train", "sample", "evaluate", "export")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file with get_config().", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.mark_flags_as_required(["config", "workdir"])


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


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
    import jax

    if _multi_process():
        jax.distributed.initialize()
    import tensorflow as tf  # imported by clu/tfds; keep it off the accelerators

    tf.config.set_visible_devices([], "GPU")
    logging.info(
        "JAX process %d/%d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    from dtr_jax import modes
    from dtr_jax.config import ConfigError

    try:
        modes.run(FLAGS.mode, FLAGS.config, FLAGS.workdir)
    except ConfigError as e:
        sys.exit(f"dtr_jax: {e}")  # exit status 1, the problems on stderr, no traceback


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


if __name__ == "__main__":
    app.run(main)
