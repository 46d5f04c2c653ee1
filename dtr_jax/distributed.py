"""The processes of a multi-host run: how they are launched and joined, and how a
process stops when it loses another.

**Launch.** Every host runs the same command. A run has several processes when a
launcher says so (`Launch`):

- a Cloud TPU pod slice (`TPU_WORKER_HOSTNAMES` lists several workers), SLURM (`srun`,
  `SLURM_NTASKS` > 1) or Open MPI (`mpirun`, `OMPI_COMM_WORLD_SIZE` > 1): jax reads the
  rest from the launcher's environment;
- any other cluster: `JAX_COORDINATOR_ADDRESS` (host:port of process 0),
  `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, or the flags `--coordinator_address`,
  `--num_processes` and `--process_id` (a flag wins over its variable);
- `DTR_MULTIHOST=1`: jax's own cluster detection finds the rest (e.g. Kubernetes).

A partial or inconsistent setting is refused (ConfigError) before any process joins.

**A lost peer.** When a process of the run dies (a host lost, a kill, an out-of-memory
kill), the others cannot go on: their next collective fails, or the coordination
service notices the missing heartbeats (`distributed.heartbeat_timeout_secs`). A
process that sees the failure as a Python exception stops with `LostPeer` (exit 8),
which says what was lost and how the run resumes. The coordination service may instead
abort the process from C++ (when process 0, the coordinator, is gone, or a collective
hangs until the heartbeat timeout): so a multi-process run's command supervises its
work in a child process (`supervise`), which reports such an abort the same way.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import signal
import subprocess
import sys

from dtr_jax.errors import ConfigError, LostPeer

# The launch settings: flag name -> environment variable.
SETTINGS = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
SUPERVISED = "DTR_JAX_SUPERVISED"  # set in the child of a supervised run


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was launched: the explicit settings (None where not given) and the
    launcher jax detects by itself (None if none)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    launcher: str | None = None

    @property
    def multi_process(self) -> bool:
        return self.launcher is not None or (self.num_processes or 1) > 1


def detected_launcher(environ) -> str | None:
    """The launcher of several processes that jax detects in `environ`, if any."""
    if "," in environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "Cloud TPU"
    if _as_int(environ.get("SLURM_NTASKS")) > 1:
        return "SLURM"
    if _as_int(environ.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return "Open MPI"
    if environ.get("DTR_MULTIHOST") == "1":
        return "DTR_MULTIHOST=1"
    return None


# Where launchers state the number of processes and this one's index (Cloud TPU: neither).
_PLACES = (("SLURM_NTASKS", "SLURM_PROCID"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"))


def place(launch: Launch, environ=None) -> tuple[int, int] | None:
    """(number of processes, this one's index) as launched, if the settings or the
    launcher's environment say; None if only jax.distributed would know."""
    environ = os.environ if environ is None else environ
    if launch.num_processes is not None and launch.process_id is not None:
        return launch.num_processes, launch.process_id
    for count, index in _PLACES:
        if _as_int(environ.get(count)) > 1 and environ.get(index, "").isdigit():
            return _as_int(environ[count]), int(environ[index])
    return None


def the_other(num_processes: int, process_id: int) -> int | None:
    """The lost process when a run has two: the one that is not this one."""
    return 1 - process_id if num_processes == 2 else None


def _as_int(text) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return 0


def launch_settings(flags: dict, environ=None) -> Launch:
    """The Launch of `flags` ({'num_processes': '2', ...}; None or '' = not given) and the
    environment; raises ConfigError naming what is missing or inconsistent."""
    environ = os.environ if environ is None else environ
    given, names, problems = {}, {}, []
    for flag, variable in SETTINGS.items():
        value = flags.get(flag)
        names[flag] = f"--{flag}" if value not in (None, "") else variable
        given[flag] = value if value not in (None, "") else environ.get(variable) or None
    for flag in ("num_processes", "process_id"):
        if given[flag] is not None:
            try:
                given[flag] = int(given[flag])
            except ValueError:
                problems.append(f"{names[flag]}={given[flag]!r} must be an integer")
                given[flag] = None
    launcher = detected_launcher(environ)
    missing = [f for f in SETTINGS if given[f] is None]
    if len(missing) < len(SETTINGS) and missing and launcher is None and not problems:
        have = ", ".join(f"{names[f]}={given[f]}" for f in SETTINGS if f not in missing)
        need = " and ".join(f"--{f} (or {SETTINGS[f]})" for f in missing)
        problems.append(
            f"{have} is set but not {need}: a multi-process run needs all three (or a "
            "launcher jax detects: Cloud TPU, SLURM, Open MPI; DTR_MULTIHOST=1 for others)"
        )
    n, i, address = given["num_processes"], given["process_id"], given["coordinator_address"]
    if n is not None and n < 1:
        problems.append(f"{names['num_processes']}={n} must be >= 1")
    elif n is not None and i is not None and not 0 <= i < n:
        problems.append(f"{names['process_id']}={i} must lie in [0, {names['num_processes']}={n})")
    if address is not None and not re.fullmatch(r"\S+:\d+", address):
        problems.append(f"{names['coordinator_address']}={address!r} must be host:port")
    if problems:
        raise ConfigError(problems)
    return Launch(address, n, i, launcher)


def problems(heartbeat_timeout_secs, shutdown_timeout_secs, initialization_timeout_secs):
    """Problems with the `distributed` section's timeouts."""
    fields = dict(
        heartbeat_timeout_secs=heartbeat_timeout_secs,
        shutdown_timeout_secs=shutdown_timeout_secs,
        initialization_timeout_secs=initialization_timeout_secs,
    )
    return [
        f"{name}={value!r} must be a positive integer (seconds)"
        for name, value in fields.items()
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0
    ]


def join(launch: Launch, timeouts) -> None:
    """Joins the other processes of a multi-process launch (nothing otherwise), with the
    `distributed` section's timeouts: a process silent for heartbeat_timeout_secs is lost,
    and the others stop. Orbax then synchronises through the coordination service, whose
    barriers time out, instead of device collectives, which wait for ever."""
    if not launch.multi_process:
        return
    import jax
    import orbax.checkpoint  # noqa: F401  (defines the flag set below)
    from absl import flags

    jax.distributed.initialize(
        coordinator_address=launch.coordinator_address,
        num_processes=launch.num_processes,
        process_id=launch.process_id,
        initialization_timeout=timeouts.initialization_timeout_secs,
        heartbeat_timeout_seconds=timeouts.heartbeat_timeout_secs,
        shutdown_timeout_seconds=timeouts.shutdown_timeout_secs,
    )
    flags.FLAGS["experimental_orbax_use_distributed_barrier"].value = True


# --- a lost peer ---------------------------------------------------------------------

# What jax, XLA and their collectives say when a process of the run is gone: (pattern,
# what it means; a group (\d+) in the pattern names the lost process).
_LOST = (
    (r"Task (\d+) heartbeat timeout", "it stopped sending heartbeats"),
    (r"stopped sending heartbeats\):\s*(\d+)", "it stopped sending heartbeats"),
    (
        r"Gloo [\w -]+ failed: .*?(?:by peer|Broken pipe|Timed out|Read error|Write error)",
        "a collective lost its connection to it",
    ),
    (
        r"NCCL.*?(?:remote process exited|Connection closed|unhandled system error)",
        "a collective lost its connection to it",
    ),
    (
        r"[Cc]oordination service.*?(?:Socket closed|failed to connect|Connection refused)",
        "the coordination service is unreachable",
    ),
    (r"Barrier (?:failed|timed out)", "a barrier failed"),
    (r"JAX distributed service detected fatal errors", "the coordination service stopped it"),
)
_NOT_JOINED = r"RegisterTask"  # initialize gave up waiting for every process


def lost_peer(text: str) -> tuple[int | None, str] | None:
    """(the lost process, or None where `text` does not say; what happened) if `text`
    (an error, a log) says a process of the run is gone; None if it does not."""
    if re.search(_NOT_JOINED, text):
        return None, "not every process joined within distributed.initialization_timeout_secs"
    for pattern, what in _LOST:
        found = re.search(pattern, text, re.DOTALL)
        if found is not None:
            process = int(found.group(1)) if found.groups() else None
            if process is None and "coordination service is unreachable" in what:
                process = 0  # the service runs in process 0
            return process, what
    return None


def _chain_text(error: BaseException) -> str:
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


def as_lost_peer(error: BaseException, mode: str, workdir: str | None) -> LostPeer | None:
    """`error` as LostPeer if this is one of several processes and it says a peer is gone."""
    import jax

    if jax.process_count() == 1 or isinstance(error, LostPeer):
        return None
    found = lost_peer(_chain_text(error))
    if found is None:
        return None
    process, what = found
    if process is None:
        process = the_other(jax.process_count(), jax.process_index())
    return LostPeer(message(process, what, mode, workdir))


def message(process: int | None, what: str, mode: str, workdir: str | None) -> str:
    """What a process says when it stops for want of `process` (None: unknown)."""
    who = "another process of this run" if process is None else f"process {process}"
    return (
        f"lost contact with {who} ({what}); this process stopped too. Restart every host "
        f"with the same command: {resume_hint(mode, workdir)}"
    )


def resume_hint(mode: str, workdir: str | None) -> str:
    """How a rerun of `--mode mode` continues: training from its newest committed step."""
    if mode != "train" or not workdir:
        return f"--mode {mode} resumes from what it has already written"
    from dtr_jax import checkpoint  # in the supervisor only once its child has stopped

    steps = checkpoint.committed_steps(checkpoint.checkpoint_dir(workdir))
    if not steps:
        return "the run starts again from step 0 (no checkpoint was committed yet)"
    return f"the run resumes from step {steps[-1]}, its newest committed checkpoint"


def exit_now(code: int) -> None:
    """Ends this process at once with `code`, output flushed: the exit of a process that
    lost a peer, which must not wait at jax.distributed's shutdown barrier for it."""
    import logging

    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --- the supervisor ------------------------------------------------------------------

# Where a process's crash report starts (XLA's fatal log, its stack, Python's dump).
_CRASH = re.compile(
    rb"^(F\d{4} |\*\*\* Check failure stack trace|Fatal Python error:|terminate called)"
)


def supervise_if_multi_process(argv: list[str]) -> None:
    """Entry point of `python -m dtr_jax.main`: in a multi-process launch, runs the command
    in a child process, reports its end (`supervise`) and exits; returns otherwise (one
    process, or already the child, or launch settings the command itself will refuse)."""
    if os.environ.get(SUPERVISED):
        return
    try:
        launch = launch_settings({f: _flag(argv, f) for f in SETTINGS})
    except ConfigError:
        return  # the command reports it, with every other invalid setting
    if launch.multi_process:
        sys.exit(supervise(argv))


def _flag(argv: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in argv (the last one), or None."""
    value = None
    for k, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and k + 1 < len(argv):
            value = argv[k + 1]
    return value


def supervise(argv: list[str], command: list[str] | None = None) -> int:
    """Runs `python -m dtr_jax.main argv[1:]` (or `command`) as a child process and returns
    the exit code to end with: the child's own, or, for a child aborted by the
    coordination service because a peer is gone, LostPeer's (8) after saying so. The
    child's stderr is passed through, but for a lost peer's crash report (C++ and Python
    stacks: shown only with --verbose). SIGTERM and SIGHUP are passed on to the child; the
    child is killed if this process is."""
    env = dict(os.environ, **{SUPERVISED: "1"})
    child = subprocess.Popen(
        command or [sys.executable, "-m", "dtr_jax.main", *argv[1:]],
        env=env,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent,
    )
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    tail, held = collections.deque(maxlen=400), []
    for line in child.stderr:
        tail.append(line)
        if held or _CRASH.match(line):
            held.append(line)
        else:
            sys.stderr.buffer.write(line)
            sys.stderr.flush()
    code = child.wait()
    if code >= 0:
        _write(held)
        return code
    found = lost_peer(b"".join(tail).decode(errors="replace"))
    if found is None or "--verbose" in argv:
        _write(held)
    if found is None:
        name = signal.Signals(-code).name
        print(
            f"dtr_jax: the command's process ended by {name} (its report is above)", file=sys.stderr
        )
        return 128 - code
    mode, workdir = _flag(argv, "mode") or "train", _flag(argv, "workdir")
    process, what = found
    if process is None:
        process = _the_other_as_launched(argv)
    print(f"dtr_jax: {message(process, what, mode, workdir)}", file=sys.stderr)
    return LostPeer.exit_code


def _the_other_as_launched(argv: list[str]) -> int | None:
    try:
        launched = place(launch_settings({f: _flag(argv, f) for f in SETTINGS}))
    except ConfigError:
        return None
    return None if launched is None else the_other(*launched)


def _die_with_parent() -> None:
    """In the child: be killed when the supervisor dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the child outlives a killed supervisor
        pass


def _write(lines: list[bytes]) -> None:
    for line in lines:
        sys.stderr.buffer.write(line)
    sys.stderr.flush()
