"""One trainer per workdir: an owner lock with a heartbeat.

WORKDIR/trainer.lock (JSON) names the owner: host, pid, the pid's start time, a
random token and a heartbeat time that a background thread renews every
`lease / 4` seconds. A second trainer is refused with a message naming the owner.
A lock is stale, and is taken over with a warning, when its process is gone (same
host: the pid no longer runs, or runs a newer process) or its heartbeat is older
than the lease (another host). On a local disk the lock is created exclusively (a
hard link of a complete file: never seen half written), and a stale one is replaced
under an flock of `trainer.lock.takeover`, so of two trainers taking it over at once
one wins; object stores have no exclusive create, so there the lock is written and
read back after a pause: the last writer wins and every other trainer backs off.
With several processes only process 0 takes the lock, and all of them learn whether
it did.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid

import jax
from absl import logging

from dtr_jax import files, sharding
from dtr_jax.errors import WorkdirLocked

LOCK = "trainer.lock"
TAKEOVER_SUFFIX = ".takeover"  # the flock that serialises takeovers of a stale local lock
_READ_BACK_SECS = 2.0  # object stores: pause before reading a written lock back


def problems(lease_secs) -> list[str]:
    """Problems with the lock's lease (the `checkpoint` section's field)."""
    return [] if lease_secs > 0 else [f"lock_lease_secs={lease_secs!r} must be > 0"]


def _pid_start(pid: int) -> str | None:
    """The start time of process `pid` (Linux /proc; None where unknown or gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def stale_reason(
    owner: dict, lease_secs: float, now: float | None = None, written: float | None = None
) -> str | None:
    """Why the lock `owner` wrote no longer holds (None if it does). An unreadable lock
    (`owner` empty) holds for a lease after it was `written`."""
    now = time.time() if now is None else now
    if not owner:
        age = now - (now if written is None else written)
        return (
            f"it is unreadable and {age:.0f} s old (lease {lease_secs:.0f} s)"
            if (age > lease_secs)
            else None
        )
    if owner.get("host") == socket.gethostname():
        pid = int(owner.get("pid", -1))
        if not _pid_alive(pid):
            return f"its process {pid} is gone"
        start = _pid_start(pid)
        if owner.get("pid_start") and start and start != owner["pid_start"]:
            return f"pid {pid} now belongs to another process"
        return None
    age = now - float(owner.get("heartbeat", 0.0))
    if age > lease_secs:
        return f"its heartbeat is {age:.0f} s old (lease {lease_secs:.0f} s)"
    return None


def describe(owner: dict, now: float | None = None) -> str:
    if not owner:
        return "a trainer whose lock cannot be read (being written, or damaged)"
    now = time.time() if now is None else now
    age = now - float(owner.get("heartbeat", now))
    return (
        f"a trainer on host {owner.get('host')!r} (pid {owner.get('pid')}, started "
        f"{owner.get('started', '?')}, heartbeat {age:.0f} s ago)"
    )


class WorkdirLock:
    """Held by the trainer of `workdir` from `acquire()` to `release()`."""

    def __init__(self, workdir: str, lease_secs: float = 600.0):
        self.path = files.resolve(workdir) / LOCK
        self.lease_secs = float(lease_secs)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        pid = os.getpid()
        return dict(
            host=socket.gethostname(),
            pid=pid,
            pid_start=_pid_start(pid),
            token=self.token,
            started=time.strftime("%Y-%m-%d %H:%M:%S"),
            heartbeat=time.time(),
        )

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half-written: no owner to name; stale by heartbeat

    def acquire(self) -> None:
        """Takes the lock (process 0), or raises its refusal on every process."""
        sharding.on_process_0(self._acquire)
        if jax.process_index() == 0:
            self._thread = threading.Thread(target=self._beat, name="dtr_jax-lock", daemon=True)
            self._thread.start()

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = self._record()
        if files.is_remote(str(self.path)):
            return self._acquire_remote(record)
        for _ in range(3):  # a lock removed or replaced under us: judge the new one
            if self._create_exclusively(record):
                return
            owner = self._read()
            if owner is None:
                continue
            self._refuse_unless_stale(owner)
            if self._take_over(owner, record):
                return
        raise WorkdirLocked(f"{self.path.parent} was taken by another trainer just now")

    def _refuse_unless_stale(self, owner: dict) -> None:
        try:
            written = self.path.stat().mtime
        except OSError:
            written = None
        reason = stale_reason(owner, self.lease_secs, written=written)
        if reason is None:
            raise WorkdirLocked(
                f"{self.path.parent} is in use by {describe(owner)}; stop that trainer "
                f"or use another --workdir (its lock: {self.path})"
            )
        logging.warning(
            "Taking over the stale lock %s of %s: %s", self.path, describe(owner), reason
        )

    def _create_exclusively(self, record: dict) -> bool:
        """Creates the (local) lock, whole, only if absent: written aside, then hard-linked
        into place (atomic, and never seen half written). False if it exists."""
        tmp = files.tmp_sibling(str(self.path))
        tmp.write_text(json.dumps(record))
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        return True

    def _take_over(self, stale: dict, record: dict) -> bool:
        """Replaces the stale lock `stale` by ours, one trainer at a time (an flock on a
        sibling file): False if the lock changed since it was judged, or another took it."""
        with open(self.path.with_name(LOCK + TAKEOVER_SUFFIX), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                if self._read() != stale:
                    return False
                self.path.unlink(missing_ok=True)
                return self._create_exclusively(record)
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)

    def _acquire_remote(self, record: dict) -> None:
        """Object stores have no exclusive create: write, pause, read back; the last
        writer wins and every other trainer backs off."""
        owner = self._read()
        if owner is not None:
            self._refuse_unless_stale(owner)
        files.write_atomically(str(self.path), json.dumps(record).encode())
        time.sleep(_READ_BACK_SECS)  # let a concurrent writer land, then check who won
        if (self._read() or {}).get("token") != self.token:
            raise WorkdirLocked(f"{self.path.parent} was taken by another trainer just now")

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_secs / 4):
            owner = self._read() or {}
            if owner.get("token") != self.token:
                logging.error("Lost the workdir lock %s to %s", self.path, describe(owner))
                return
            owner["heartbeat"] = time.time()
            try:
                files.write_atomically(str(self.path), json.dumps(owner).encode())
            except OSError as e:  # keep training; the next beat retries
                logging.warning("Could not renew the workdir lock %s: %s", self.path, e)

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if it is still ours."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        if (self._read() or {}).get("token") == self.token:
            self.path.unlink()

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
