"""Entry point: python -m dtr_jax.main --config configs/X.py --workdir DIR [--mode ...].

`--mode extract` writes the latents of the data into `data.dir`, `--mode reference` the FID
reference batch of its photographs into `eval.reference`: they take no workdir.

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
flags.mark_flag_as_required("config")
flags.register_multi_flags_validator(
    ["mode", "workdir"],
    lambda f: f["mode"] in modes.NO_WORKDIR or f["workdir"] is not None,
    message=f"--workdir must be given (every --mode but {' and '.join(modes.NO_WORKDIR)})",
)


def main(argv):
    del argv
    with modes.reporting(verbose=FLAGS.verbose):
        modes.setup_process(FLAGS.verbose, FLAGS.mode)
        modes.run(FLAGS.mode, FLAGS.config, FLAGS.workdir)


def run():
    app.run(main, flags_parser=modes.parse_flags)


if __name__ == "__main__":
    run()
