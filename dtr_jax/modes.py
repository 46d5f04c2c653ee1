"""What each --mode does (a function of config and workdir), and what the command lines
(dtr_jax.main, dtr_jax.study) share: flag parsing, error reporting, process set-up."""

from __future__ import annotations

import contextlib
import importlib
import logging as std_logging
import os
import sys
import traceback

from absl import flags, logging

from dtr_jax import config as config_lib
from dtr_jax import distributed
from dtr_jax.errors import ConfigError, DtrError, LostPeer, choice_problems, raise_problems

# What each --mode runs ("module:function", of config and workdir). Imported on demand:
# training pulls in clu, grain and TensorBoard's writer, which the other modes never use.
ENTRIES = {
    "train": "dtr_jax.train:train_and_evaluate",
    "sample": "dtr_jax.sample:sample_mode",
    "evaluate": "dtr_jax.evaluate:evaluate_mode",
    "export": "dtr_jax.export:export_mode",
    "extract": "dtr_jax.extract:extract_mode",
    "reference": "dtr_jax.reference:reference_mode",
    "plan": "dtr_jax.plan:plan_mode",
}
MODES = config_lib.MODES
# the modes that write elsewhere (data.dir, eval.reference), or nothing (plan)
NO_WORKDIR = ("extract", "reference", "plan")


def run(mode: str, config, workdir: str):
    """Runs `--mode` on `config` and `workdir`; returns what the mode returns. In a
    multi-process run, a failure that says another process is gone ends as LostPeer."""
    if mode not in ENTRIES:
        raise ConfigError(choice_problems("--mode", mode, MODES))
    module, function = ENTRIES[mode].split(":")
    try:
        return getattr(importlib.import_module(module), function)(config, workdir)
    except Exception as e:
        lost = distributed.as_lost_peer(e, mode, workdir)
        if lost is None:
            raise
        raise lost from e


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (for `app.run`), with every command-line mistake reported as
    one ConfigError: unknown `--config.` fields get the closest field names."""
    try:
        rest = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
        if config is not None:
            config.keys()  # a config file that failed to load raises only when used
        return rest
    except Exception as e:  # any parse failure is the user's to fix
        fail(ConfigError(_unknown_overrides(argv) or [_flag_error(e)]))


def _flag_error(error: Exception) -> str:
    text = str(error).strip()
    if "config file" in text or "earlier failure to load" in text:
        return f"--config cannot be loaded: {text.splitlines()[-1].strip()}"
    return text


def _unknown_overrides(argv: list[str]) -> list[str]:
    """Problems of `--config.<name>` overrides that name no field of the --config file."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv[:-1]:
        path = argv[argv.index("--config") + 1]
    names = [a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if not path or not names:
        return []
    try:
        config = config_lib.load_config(path)
    except Exception:  # the config file itself is at fault: absl's message says how
        return []
    return config_lib.unknown_field_problems(config, names)


@contextlib.contextmanager
def reporting(verbose: bool = False):
    """Anticipated failures (DtrError) end as one `dtr_jax: ...` line on stderr and the
    error's exit code; `verbose` prints the traceback first. Bugs propagate."""
    try:
        yield
    except DtrError as e:
        if verbose:
            traceback.print_exc()
        fail(e)


def fail(error: DtrError):
    print(f"dtr_jax: {error}", file=sys.stderr)
    if isinstance(error, LostPeer):  # no waiting at the shutdown barrier for the lost one
        distributed.exit_now(error.exit_code)
    sys.exit(error.exit_code)


# The modes that use TensorFlow: training (clu's summary writer; tfds for photographs),
# extraction and reference batches (tfds builds datasets). The others never import it.
TENSORFLOW_MODES = ("train", "extract", "reference")


def setup_process(verbose: bool = False, mode: str = "train", config=None, launch=None) -> None:
    """Quiet library logs (`verbose` keeps their tracebacks), join the other processes of
    a multi-host job (`launch`: the launch flags, {'num_processes': ..., ...}; the
    environment fills in the rest; `config`'s `distributed` section: the timeouts), and,
    for a `mode` that uses TensorFlow, keep it off the accelerators. Call before any TF
    import."""
    # TF only writes summaries and reads data here: keep its import quiet (INFO logs, and
    # the oneDNN notice that TF_CPP_MIN_LOG_LEVEL does not silence).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    logging.get_absl_handler().addFilter(_LibraryInfoFilter(verbose))
    sys.unraisablehook = _AbandonedReadsFilter(sys.unraisablehook, verbose)
    from dtr_jax import tpu

    if mode == "plan":
        tpu.plan_without_tpus()
    else:
        tpu.cpu_without_accelerators()
    import jax

    settings = distributed.launch_settings(launch or {})
    if settings.multi_process:
        config = config_lib.default_config() if config is None else config
        raise_problems(config_lib.distributed_problems(config))
        distributed.join(settings, config.distributed)
    if mode in TENSORFLOW_MODES:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    logging.info(
        "JAX process %d/%d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


class _LibraryInfoFilter(std_logging.Filter):
    """Drops library INFO chatter (orbax logs dozens of lines per save); keeps warnings,
    except orbax's notice that a read-only mode (sample, evaluate, export) opened the
    checkpoints read-only, which is intended. Orbax's errors (and asyncio's about Orbax's
    pending reads) keep their one line but not their traceback unless `verbose`: a failed
    save or read is reported by dtr_jax itself (`checkpoint.CheckpointError`), with what it
    means for the run."""

    NOISY = ("/orbax/", "xla_bridge.py")

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record):
        from_orbax = "/orbax/" in record.pathname
        if from_orbax and record.getMessage().startswith("Given directory is read only"):
            return False
        # asyncio reports the reads Orbax left pending after a failed restore (their
        # "Task exception was never retrieved"): one line too, the failure is ours to report.
        if (from_orbax or record.name == "asyncio") and record.exc_info and not self.verbose:
            record.msg = f"{record.getMessage()} ({record.exc_info[1]!r})"
            record.args, record.exc_info, record.exc_text = (), None, None
        return record.levelno >= std_logging.WARNING or not any(
            part in record.pathname for part in self.NOISY
        )


class _AbandonedReadsFilter:
    """An unraisable-exception hook that drops what Orbax's reads leave behind after a
    failed restore (a checkpoint found damaged, then skipped; dtr_jax reports it in one
    line): the errors of its abandoned read coroutines and the `RuntimeError: Event loop is
    closed` of its reader threads, each otherwise printed with a traceback. `verbose`
    keeps them (the previous hook prints them)."""

    def __init__(self, hook, verbose: bool):
        self.hook, self.verbose = hook, verbose

    def __call__(self, unraisable):
        if self.verbose or not _left_by_orbax(unraisable):
            self.hook(unraisable)


def _left_by_orbax(unraisable) -> bool:
    error, where = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
    if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):
        return True
    return where is not None and "/orbax/" in where.co_filename
