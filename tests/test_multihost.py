"""Multi-host runs through the command line: two real processes on localhost, joined by
jax.distributed (one CPU device each) as a launcher starts them, every one under a
timeout so that a hang fails instead of stalling the suite."""

import shutil
import signal
import sys
import time

import numpy as np
import pytest

from dtr_jax import checkpoint, distributed
from dtr_jax.errors import ConfigError, LostPeer
from helpers import cli_command, cli_env, xla_flags
from multihost import Job

# 60 steps of the tiny config, a checkpoint every 10 of which 2 are kept; a peer that
# stops answering is lost after 10 s.
RUN = {
    "num_train_steps": 60,
    "checkpoint_every_steps": 10,
    "checkpoint.max_to_keep": 2,
    "log_every_steps": 10,
    "distributed.heartbeat_timeout_secs": 10,
}


def job(workdir, out_dir, launcher="env", mode="train", env=None, **overrides) -> Job:
    cmd = cli_command(workdir, mode, **(RUN | overrides))
    return Job(cmd, out_dir, env or cli_env(), launcher)


def assert_finished(run: Job) -> None:
    assert run.wait() == [0, 0], [run.log(i)[-3000:] for i in range(2)]
    for i in range(2):
        assert "Traceback" not in run.log(i), run.log(i)[-3000:]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted two-process run, launched through JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID."""
    root = tmp_path_factory.mktemp("straight")
    run = job(root / "run", root / "logs")
    assert_finished(run)
    return root / "run", run


def test_two_processes_train_to_the_end_deleting_past_max_to_keep(straight):
    workdir, run = straight
    assert checkpoint.committed_steps(checkpoint.checkpoint_dir(str(workdir))) == [50, 60]
    assert "Deleted checkpoint" in run.log(0) and "Deleted checkpoint" not in run.log(1)
    assert (workdir / "ema_params.msgpack").stat().st_size > 0
    assert "JAX process 1/2" in run.log(1)


def test_a_killed_process_stops_its_peer_with_the_message(tmp_path):
    """SIGKILL to process 0 (the coordinator) mid-run, launched through SLURM's
    environment: process 1 stops at once with the message. (A restart resumes as after a
    preemption: `test_sigterm_to_every_process_saves_one_checkpoint_and_resumes_exactly`.)"""
    workdir = tmp_path / "run"
    run = job(workdir, tmp_path / "killed", launcher="slurm")
    run.wait_for(0, f"Committed checkpoint {checkpoint.checkpoint_dir(str(workdir))}/10")
    killed_at = time.monotonic()
    run.procs[0].send_signal(signal.SIGKILL)  # the supervisor: its child goes with it
    codes = run.wait(timeout=60)
    assert codes == [-signal.SIGKILL, LostPeer.exit_code], run.log(1)[-3000:]
    assert time.monotonic() - killed_at < 60
    survivor = run.log(1)
    assert "Traceback" not in survivor and survivor.count("dtr_jax: ") == 1, survivor[-3000:]
    message = survivor[survivor.index("dtr_jax: ") :]
    assert "lost contact with process 0" in message
    assert "Restart every host with the same command: the run resumes from step" in message


def test_sigterm_to_every_process_saves_one_checkpoint_and_resumes_exactly(straight, tmp_path):
    """A pod preemption: SIGTERM to every process; they stop at one step, save it, exit 0;
    the rerun finishes as the straight run."""
    workdir = tmp_path / "run"
    run = job(workdir, tmp_path / "preempted")
    run.wait_for(0, f"Committed checkpoint {checkpoint.checkpoint_dir(str(workdir))}/10")
    for proc in run.procs:  # the supervisors, which pass it on
        proc.send_signal(signal.SIGTERM)
    assert_finished(run)
    stops = [int(run.log(i).split("Stopped at step ")[1].split()[0]) for i in range(2)]
    steps = checkpoint.committed_steps(checkpoint.checkpoint_dir(str(workdir)))
    assert stops[0] == stops[1] == steps[-1] and 10 < steps[-1] < 60, (stops, steps)
    resumed = job(workdir, tmp_path / "resumed")
    assert_finished(resumed)
    assert f"at step {steps[-1]}" in resumed.log(0)  # "Resuming from ... at step N"
    ours = (workdir / "ema_params.msgpack").read_bytes()
    assert ours == (straight[0] / "ema_params.msgpack").read_bytes()


def test_sample_and_evaluate_on_two_processes_equal_one_process_of_two_devices(straight, tmp_path):
    """Fresh samples and their digits metrics (`--mode evaluate`) from two processes of
    one device each: the same .npz and metrics as one process with two devices."""
    workdirs = {n: tmp_path / n for n in ("two_processes", "two_devices")}
    for w in workdirs.values():
        shutil.copytree(straight[0] / "checkpoints", w / "checkpoints")
    fields = {"eval.num_samples": 24, "sample.batch_size": 8, "sample.num_steps": 4}
    run = job(workdirs["two_processes"], tmp_path / "logs", mode="evaluate", **fields)
    assert_finished(run)
    one = Job(
        cli_command(workdirs["two_devices"], "evaluate", **(RUN | fields)),
        tmp_path / "one",
        cli_env(XLA_FLAGS=xla_flags(2)),
        launcher=None,
        num_processes=1,
    )
    assert one.wait() == [0], one.log(0)[-3000:]
    found = {n: sorted((w / "samples").glob("*.npz")) for n, w in workdirs.items()}
    assert [p.name for p in found["two_processes"]] == [p.name for p in found["two_devices"]]
    (a,), (b,) = found.values()
    with np.load(a) as x, np.load(b) as y:
        assert x["arr_0"].shape[0] == 24
        np.testing.assert_array_equal(x["arr_0"], y["arr_0"])
        np.testing.assert_array_equal(x["arr_1"], y["arr_1"])
    results = {n: sorted((w / "eval").glob("*.json")) for n, w in workdirs.items()}
    (a,), (b,) = results.values()
    assert a.name == b.name and a.read_text() == b.read_text()


def test_a_partial_launch_setting_is_refused_before_joining(tmp_path):
    env = cli_env(JAX_COORDINATOR_ADDRESS="localhost:12345", JAX_NUM_PROCESSES="2")
    run = Job(cli_command(tmp_path / "run", **RUN), tmp_path, env, None, num_processes=1)
    assert run.wait(timeout=120) == [2]
    log = run.log(0)
    assert "Traceback" not in log and log.count("dtr_jax: ") == 1, log[-3000:]
    assert "JAX_COORDINATOR_ADDRESS=localhost:12345, JAX_NUM_PROCESSES=2 is set but not" in log
    assert "--process_id (or JAX_PROCESS_ID)" in log
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, environ, message",
    [
        ({"num_processes": "2", "process_id": "2"}, {"JAX_COORDINATOR_ADDRESS": "h:1"}, "[0, "),
        ({"num_processes": "two"}, {}, "--num_processes='two' must be an integer"),
        ({"num_processes": "2", "process_id": "0"}, {"JAX_COORDINATOR_ADDRESS": "h"}, "host:port"),
        ({"process_id": "1"}, {}, "--process_id=1 is set but not --coordinator_address"),
    ],
)
def test_launch_settings_are_checked(flags, environ, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        distributed.launch_settings(flags, environ)


def test_launchers_and_flags_make_a_multi_process_launch():
    env = dict(JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES="4", JAX_PROCESS_ID="3")
    launch = distributed.launch_settings({"process_id": "2"}, env)  # the flag wins
    assert (launch.coordinator_address, launch.num_processes, launch.process_id) == ("h:1", 4, 2)
    assert launch.multi_process
    assert not distributed.launch_settings({}, {}).multi_process
    assert not distributed.launch_settings({}, {"SLURM_NTASKS": "1"}).multi_process
    slurm = distributed.launch_settings({}, {"SLURM_NTASKS": "8", "JAX_COORDINATOR_ADDRESS": "h:1"})
    assert slurm.multi_process and slurm.launcher == "SLURM"  # jax reads the rest from SLURM
    assert distributed.launch_settings({}, {"TPU_WORKER_HOSTNAMES": "a,b"}).launcher == "Cloud TPU"


def test_where_a_process_stands_as_launched():
    """The supervisor names the lost peer of a two-process run from the launch alone."""
    slurm = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
    assert distributed.place(distributed.launch_settings({}, slurm), slurm) == (2, 1)
    flags = {"coordinator_address": "h:1", "num_processes": "4", "process_id": "3"}
    assert distributed.place(distributed.launch_settings(flags, {}), {}) == (4, 3)
    tpu = {"TPU_WORKER_HOSTNAMES": "a,b"}
    assert distributed.place(distributed.launch_settings({}, tpu), tpu) is None
    assert distributed.the_other(2, 1) == 0 and distributed.the_other(4, 3) is None


ABORT = """
import os, sys
sys.stderr.write("I1207 training step 12\\n")
sys.stderr.write("F1207 client.h:80] Terminating process because the JAX distributed service "
                 "detected fatal errors. UNAVAILABLE: Task 1 heartbeat timeout.\\n")
sys.stderr.write("*** Check failure stack trace: ***\\n    @ 0x7f  xla::SetError()\\n")
sys.stderr.flush()
os.abort()
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_the_supervisor_reports_an_abort_for_a_lost_peer(tmp_path, capfd, verbose):
    """The coordination service aborts a process (C++ log, then SIGABRT): the supervisor
    names the lost process and the step the run resumes from; the crash report is shown
    only with --verbose; a crash without a lost peer keeps its report and signal."""
    committed = checkpoint.checkpoint_dir(str(tmp_path)) / "30"
    committed.mkdir(parents=True)
    (committed / checkpoint.COMMIT).write_text("{}")
    argv = ["main", f"--workdir={tmp_path}", "--mode", "train"] + ["--verbose"] * verbose
    code = distributed.supervise(argv, [sys.executable, "-c", ABORT])
    err = capfd.readouterr().err
    assert code == LostPeer.exit_code
    assert "I1207 training step 12" in err
    assert ("Check failure stack trace" in err) == verbose
    assert err.strip().endswith(
        "dtr_jax: lost contact with process 1 (it stopped sending heartbeats); this process "
        "stopped too. Restart every host with the same command: the run resumes from step "
        "30, its newest committed checkpoint"
    )
    crash = (
        "import os, sys; sys.stderr.write('Fatal Python error: Segmentation fault\\n'); os.abort()"
    )
    assert distributed.supervise(argv, [sys.executable, "-c", crash]) == 128 + signal.SIGABRT
    err = capfd.readouterr().err
    assert "Fatal Python error" in err and "ended by SIGABRT" in err


def test_the_supervisor_names_the_peer_the_abort_does_not(tmp_path, capfd, monkeypatch):
    """An abort that names no process, in a two-process SLURM launch: the other one is lost."""
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    unnamed = ABORT.replace(" UNAVAILABLE: Task 1 heartbeat timeout.", "")
    argv = ["main", f"--workdir={tmp_path}"]
    assert distributed.supervise(argv, [sys.executable, "-c", unnamed]) == LostPeer.exit_code
    assert "dtr_jax: lost contact with process 0 (the coordination service stopped it)" in (
        capfd.readouterr().err
    )
