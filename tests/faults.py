"""What the fault tests share: running the CLI (with a fault injected by
tests/faulty_main.py), a clean failure's shape, and a checkpoint's commit record."""

import json
import pathlib
import subprocess

import jax

from dtr_jax import checkpoint
from helpers import FAULTY_MAIN, cli_command, cli_env

ONE = jax.devices()[:1]


def records(workdir, step):
    """The commit record's per-array checksums of `step`: equal records, equal state."""
    path = pathlib.Path(workdir) / "checkpoints" / str(step) / checkpoint.COMMIT
    return json.loads(path.read_text())["arrays"]


def run_cli(workdir, mode="train", fault=None, timeout=300, **overrides):
    script = FAULTY_MAIN if fault else None
    env = cli_env(DTR_TEST_FAULT=fault or "")
    cmd = cli_command(workdir, mode, script=script, **overrides)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_clean_failure(proc, code, *fragments):
    """One `dtr_jax:` message with the fragments, exit `code`, and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("dtr_jax: ") == 1, proc.stderr[-3000:]
    message = proc.stderr[proc.stderr.index("dtr_jax: ") :]
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def start(workdir, fault=None, **overrides):
    script = FAULTY_MAIN if fault else None
    cmd = cli_command(workdir, "train", script=script, **overrides)
    env = cli_env(DTR_TEST_FAULT=fault or "", DTR_TEST_SLOW="3")
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
