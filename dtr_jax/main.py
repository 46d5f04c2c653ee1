"""Entry point: python -m dtr_jax.main --config configs/X.py --workdir DIR [--mode ...].

Fields of the config file are overridden with --config.field=value.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from dtr_jax import modes

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file with get_config().", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
flags.DEFINE_enum("mode", "train", modes.MODES, "What to do.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    modes.setup_process()
    from dtr_jax.config import ConfigError

    try:
        modes.run(FLAGS.mode, FLAGS.config, FLAGS.workdir)
    except ConfigError as e:
        sys.exit(f"dtr_jax: {e}")  # exit status 1, the problems on stderr, no traceback


if __name__ == "__main__":
    app.run(main)
