"""One of several processes of a multi-host run on localhost, for the tests.

  python tests/multihost.py TASK PROCESS_ID NUM_PROCESSES PORT OUT_DIR ARGS_JSON

Joins the others with `jax.distributed` (CPU, 2 devices per process), then runs TASK:

  data  extracts the tiny photo folder that ARGS_JSON's config fields name into its
        shared data.dir, then takes the first three batches of the training pipeline on
        those latents and writes, to OUT_DIR/process<ID>.npz, each global batch
        (gathered from every process) and the rows this process read itself;
  lock  takes the trainer lock of ARGS_JSON's `workdir` as a multi-host trainer does,
        and writes to OUT_DIR/process<ID>.json its pid and, while every process holds
        the lock, the pid the lock file names (or the refusal and its exit code, if it was refused).

`run` starts the processes and waits for them. `Job` runs the command line itself
(`python -m dtr_jax.main`) on several processes, as a launcher would.
"""

import json
import os
import subprocess
import sys

if __name__ == "__main__":
    flags = os.environ.get("DTR_TEST_XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=2 {flags}"
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

BATCHES = 3


def data(process_id: int, out_dir: str, fields: dict) -> None:
    from absl import logging
    from jax.experimental import multihost_utils

    from dtr_jax import modes, sharding
    from dtr_jax.data import get_source
    from dtr_jax.data.pipeline import device_batches
    from helpers import tiny

    logging.set_verbosity(logging.INFO)  # which shards it writes, to stderr
    config = tiny(**fields)
    modes.run("extract", config, None)
    mesh = sharding.make_mesh(config.mesh)
    batches = device_batches(get_source(config), config, sharding.batch_sharding(mesh))
    out = {}
    for k in range(BATCHES):
        for name, array in next(batches).items():
            out[f"global_{name}_{k}"] = multihost_utils.process_allgather(array, tiled=True)
            out[f"local_{name}_{k}"] = sharding.host_rows(array, mesh)
    np.savez(os.path.join(out_dir, f"process{process_id}.npz"), **out)


def lock(process_id: int, out_dir: str, args: dict) -> None:
    from dtr_jax import lock, sharding
    from dtr_jax.errors import DtrError

    result = {"pid": os.getpid()}
    try:
        with lock.WorkdirLock(args["workdir"]):
            sharding.sync_hosts("tests.lock.held")  # every process holds it now
            with open(os.path.join(args["workdir"], lock.LOCK)) as f:
                result["owner_pid"] = json.load(f)["pid"]
            sharding.sync_hosts("tests.lock.read")
    except DtrError as e:
        result["refused"], result["exit_code"] = str(e), e.exit_code
    with open(os.path.join(out_dir, f"process{process_id}.json"), "w") as f:
        json.dump(result, f)


def run(task: str, out_dir, args: dict, env: dict, num_processes: int = 2) -> list[str]:
    """Runs `task` in `num_processes` processes of one jax.distributed job; returns their
    logs (stderr) once all have ended, each with exit status 0."""
    import portpicker

    port = portpicker.pick_unused_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), task, str(i), str(num_processes)]
            + [str(port), str(out_dir), json.dumps(args)],
            env=env,
            cwd=root,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(num_processes)
    ]
    logs = [p.communicate(timeout=300)[1] for p in procs]
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]
    return logs


def launch_env(launcher: str | None, process: int, num_processes: int, port: int) -> dict:
    """The environment a launcher gives process `process` of a job on localhost: `env`
    (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or `slurm` (what srun
    sets, by hand: jax's SLURM detection reads it); None: nothing."""
    if launcher is None:
        return {}
    if launcher == "env":
        return dict(
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES=str(num_processes),
            JAX_PROCESS_ID=str(process),
        )
    return dict(
        SLURM_JOB_ID=str(port),
        SLURM_STEP_NODELIST="localhost",
        SLURM_NTASKS=str(num_processes),
        SLURM_PROCID=str(process),
        SLURM_LOCALID=str(process),
        SLURM_STEP_NUM_NODES="1",
    )


class Job:
    """`cmd` (an argv list) started on `num_processes` processes of one job on localhost
    by `launcher` (see `launch_env`), its stderr in OUT_DIR/process<i>.log."""

    def __init__(self, cmd, out_dir, env: dict, launcher="env", num_processes: int = 2):
        import pathlib

        import portpicker

        port = portpicker.pick_unused_port()
        pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.logs = [pathlib.Path(out_dir) / f"process{i}.log" for i in range(num_processes)]
        self.procs = []
        for i, log in enumerate(self.logs):
            with open(log, "w") as f:
                proc_env = dict(env, **launch_env(launcher, i, num_processes, port))
                self.procs.append(subprocess.Popen(cmd, env=proc_env, stderr=f))

    def log(self, i: int) -> str:
        return self.logs[i].read_text()

    def wait_for(self, i: int, text: str, timeout: float = 240) -> None:
        """Waits until process i's log holds `text` (fails if it ends or times out first)."""
        import time

        deadline = time.monotonic() + timeout
        while text not in self.log(i):
            assert self.procs[i].poll() is None, f"ended before {text!r}:\n{self.log(i)[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} in {timeout} s"
            time.sleep(0.1)

    def wait(self, timeout: float = 240) -> list[int]:
        """The exit codes once every process has ended; kills all and fails on a hang."""
        try:
            return [p.wait(timeout=timeout) for p in self.procs]
        except subprocess.TimeoutExpired as e:
            for p in self.procs:
                p.kill()
            logs = "\n".join(self.log(i)[-2000:] for i in range(len(self.procs)))
            raise AssertionError(f"hung:\n{logs}") from e


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    task, pid, count, port, out, arguments = sys.argv[1:]
    jax.distributed.initialize(f"localhost:{port}", int(count), int(pid))
    {"data": data, "lock": lock}[task](int(pid), out, json.loads(arguments))
