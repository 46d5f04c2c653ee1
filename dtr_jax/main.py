"""Entry point: python -m dtr_jax.main --config configs/X.py --workdir DIR [--mode ...].

`--mode extract` writes the latents of the data into `data.dir`, `--mode reference` the FID
reference batch of its photographs into `eval.reference`: they take no workdir.

Fields of the config file are overridden with --config.field=value. Anticipated
failures (dtr_jax.errors) print one `dtr_jax: ...` message and exit with their own
code; `--verbose` adds the traceback. Every host of a multi-host run runs the same
command (`dtr_jax.distributed`: the launchers, and `--coordinator_address`,
`--num_processes`, `--process_id` where no launcher sets them); the command then
supervises its work in a child process, which it reports on if a peer is lost.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # before the heavy imports: a supervisor needs none of them
    from dtr_jax import distributed

    distributed.supervise_if_multi_process(sys.argv)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dtr_jax import distributed, modes  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file with get_config().", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
flags.DEFINE_enum("mode", "train", modes.MODES, "What to do.")
flags.DEFINE_bool("verbose", False, "Print tracebacks of anticipated errors too.")
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS)."
)
flags.DEFINE_string("num_processes", None, "Processes of the run (default: $JAX_NUM_PROCESSES).")
flags.DEFINE_string("process_id", None, "This process's index (default: $JAX_PROCESS_ID).")
flags.mark_flag_as_required("config")
flags.register_multi_flags_validator(
    ["mode", "workdir"],
    lambda f: f["mode"] in modes.NO_WORKDIR or f["workdir"] is not None,
    message=f"--workdir must be given (every --mode but {' and '.join(modes.NO_WORKDIR)})",
)


def main(argv):
    del argv
    with modes.reporting(verbose=FLAGS.verbose):
        launch = {name: FLAGS[name].value for name in distributed.SETTINGS}
        modes.setup_process(FLAGS.verbose, FLAGS.mode, FLAGS.config, launch)
        modes.run(FLAGS.mode, FLAGS.config, FLAGS.workdir)


def run():
    app.run(main, flags_parser=modes.parse_flags)


if __name__ == "__main__":
    run()
