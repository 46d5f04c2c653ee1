"""Entry point: python -m dtr_jax.main --config configs/X.py --workdir DIR [--mode ...].

Fields of the config file are overridden with --config.field=value. Anticipated
failures (dtr_jax.errors) print one `dtr_jax: ...` message and exit with their own
code; `--verbose` adds the traceback.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from dtr_jax import modes

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file with get_config().", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
flags.DEFINE_enum("mode", "train", modes.MODES, "What to do.")
flags.DEFINE_bool("verbose", False, "Print tracebacks of anticipated errors too.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    with modes.reporting(verbose=FLAGS.verbose):
        modes.setup_process(FLAGS.verbose)
        modes.run(FLAGS.mode, FLAGS.config, FLAGS.workdir)


def run():
    app.run(main, flags_parser=modes.parse_flags)


if __name__ == "__main__":
    run()
