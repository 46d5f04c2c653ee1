"""Interruptions: kill -9 at any moment (inside saves too) and a second trainer on the
same workdir, through the CLI. A resumed run equals an uninterrupted one bit for bit; a
workdir has one trainer; a dead trainer's lock is taken over (README, "Faults and
guarantees"). The other faults: tests/test_faults.py.
"""

import json
import os
import random
import re
import socket
import subprocess

import multihost
from dtr_jax import checkpoint, lock, train
from dtr_jax.errors import WorkdirLocked
from faults import ONE, assert_clean_failure, records, run_cli, start
from helpers import cli_env, kill9, tiny, wait_for

# --- kill -9 at random moments, inside saves, then resume ------------------------------

KILLED = {"num_train_steps": 40, "checkpoint_every_steps": 3}


def test_kill_9_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path):
    train.train_and_evaluate(tiny(**KILLED), str(tmp_path / "straight"), devices=ONE)
    workdir = tmp_path / "killed"
    rng = random.Random(0)
    proc = start(workdir, **KILLED)  # at a random moment of training (and of its async saves)
    for _ in range(rng.randrange(2, 13)):
        wait_for(proc, ", loss=")
    kill9(proc)
    proc = start(workdir, fault="slow_meta", **KILLED)  # inside Orbax's async write
    wait_for(proc, "FAULT: saving")
    kill9(proc)
    ckpt = checkpoint.Checkpoints(str(workdir), read_only=True)
    assert ckpt.unfinished(), "the kill did not land inside a save"
    proc = start(workdir, fault="slow_commit", **KILLED)  # written, not yet committed
    line = wait_for(proc, "FAULT: committing")
    uncommitted = int(re.search(r"FAULT: committing (\d+)", line).group(1))
    kill9(proc)
    assert uncommitted not in checkpoint.Checkpoints(str(workdir), read_only=True).committed_steps()

    final = run_cli(workdir, **KILLED)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "Taking over the stale lock" in final.stderr  # the kill -9 left its lock
    assert re.search(r"its process \d+ is gone", final.stderr)
    assert "Removing the unfinished checkpoint" in final.stderr
    assert records(workdir, 40) == records(tmp_path / "straight", 40)
    ema = [(d / "ema_params.msgpack").read_bytes() for d in (workdir, tmp_path / "straight")]
    assert ema[0] == ema[1]
    assert not (workdir / lock.LOCK).exists()


# --- one trainer per workdir ---------------------------------------------------------------


def test_a_second_trainer_is_refused(tmp_path):
    """(The lock a kill -9 leaves is taken over: the test above.)"""
    workdir = tmp_path / "run"
    first = start(workdir, num_train_steps=100000, checkpoint_every_steps=100000)
    wait_for(first, ", loss=")
    second = run_cli(workdir, num_train_steps=3)
    assert_clean_failure(
        second,
        WorkdirLocked.exit_code,
        "is in use by a trainer on host",
        socket.gethostname(),
        f"pid {first.pid}",
    )
    kill9(first)


def test_a_multi_host_trainer_takes_the_lock_once(tmp_path):
    """Two processes of one jax.distributed job: process 0 takes the lock for both; a
    lock that a live trainer holds refuses both."""
    workdir = tmp_path / "run"

    def both(out):
        out.mkdir()
        multihost.run("lock", out, {"workdir": str(workdir)}, cli_env())
        return [json.loads((out / f"process{i}.json").read_text()) for i in range(2)]

    held = both(tmp_path / "held")
    assert [r.get("owner_pid") for r in held] == [held[0]["pid"]] * 2  # one lock, process 0's
    assert not (workdir / lock.LOCK).exists()  # released by its owner
    with lock.WorkdirLock(str(workdir)):  # a live trainer (this process) owns it
        refused = both(tmp_path / "refused")
    for r in refused:  # process 0's refusal, naming the owner, on both
        assert f"pid {os.getpid()}" in r["refused"] and r["exit_code"] == WorkdirLocked.exit_code
    assert refused[1]["refused"].startswith("(process 0) ")


def test_of_trainers_taking_over_a_stale_lock_at_once_one_wins(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = json.dumps(dict(host=socket.gethostname(), pid=dead.pid, heartbeat=0.0))
    for trial in range(8):
        workdir = tmp_path / str(trial)
        workdir.mkdir()
        (workdir / lock.LOCK).write_text(stale)
        start_r, start_w = os.pipe()
        children = []
        for _ in range(4):
            pid = os.fork()
            if pid == 0:  # a trainer: waits for the start, then tries to take the lock
                os.close(start_w)
                os.read(start_r, 1)
                try:
                    lock.WorkdirLock(str(workdir))._acquire()
                    os._exit(0)
                except WorkdirLocked:
                    os._exit(1)
                except BaseException:
                    os._exit(2)
            children.append(pid)
        os.close(start_r)
        os.close(start_w)  # all start at once
        codes = sorted(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children)
        assert codes == [0, 1, 1, 1], f"trial {trial}: exit codes {codes}"
        assert json.loads((workdir / lock.LOCK).read_text())["pid"] in children


def test_stale_lock_rules():
    now = 1_000_000.0
    here = dict(host=socket.gethostname(), pid=os.getpid(), heartbeat=now)
    assert lock.stale_reason(here, 600, now) is None  # a live process of this host
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert "is gone" in lock.stale_reason(here | {"pid": dead.pid}, 600, now)
    elsewhere = dict(host="another-host", pid=1, heartbeat=now - 60)
    assert lock.stale_reason(elsewhere, 600, now) is None  # heartbeat within the lease
    assert "heartbeat is 660 s old" in lock.stale_reason(elsewhere, 600, now + 600)
    # An unreadable lock (a damaged file) holds for a lease after it was written.
    assert lock.stale_reason({}, 600, now, written=now - 60) is None
    assert "unreadable and 660 s old" in lock.stale_reason({}, 600, now, written=now - 660)
