"""Entry point: python -m dtr_jax.main --config configs/X.py --workdir DIR [--mode ...].

Fields of the config file are overridden with --config.field=value.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from dtr_jax import modes
from dtr_jax.errors import DtrError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file with get_config().", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
flags.DEFINE_enum("mode", "train", modes.MODES, "What to do.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    modes.setup_process()
    try:
        modes.run(FLAGS.mode, FLAGS.config, FLAGS.workdir)
    except DtrError as e:  # anticipated: the message on stderr, no traceback
        print(f"dtr_jax: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    app.run(main)
