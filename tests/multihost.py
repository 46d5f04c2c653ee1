"""One of several processes of a multi-host run on localhost, for the tests.

  python tests/multihost.py TASK PROCESS_ID NUM_PROCESSES PORT OUT_DIR ARGS_JSON

Joins the others with `jax.distributed` (CPU, 2 devices per process), then runs TASK:

  data  extracts the tiny photo folder that ARGS_JSON's config fields name into its
        shared data.dir, then takes the first three batches of the training pipeline on
        those latents and writes, to OUT_DIR/process<ID>.npz, each global batch
        (gathered from every process) and the rows this process read itself;
  lock  takes the trainer lock of ARGS_JSON's `workdir` as a multi-host trainer does,
        and writes to OUT_DIR/process<ID>.json its pid and, while every process holds
        the lock, the pid the lock file names (or the refusal, if it was refused).

`run` starts the processes and waits for them.
"""

import json
import os
import subprocess
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
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
    from dtr_jax.errors import WorkdirLocked

    result = {"pid": os.getpid()}
    try:
        with lock.WorkdirLock(args["workdir"]):
            sharding.sync_hosts("tests.lock.held")  # every process holds it now
            with open(os.path.join(args["workdir"], lock.LOCK)) as f:
                result["owner_pid"] = json.load(f)["pid"]
            sharding.sync_hosts("tests.lock.read")
    except WorkdirLocked as e:
        result["refused"] = str(e)
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


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    task, pid, count, port, out, arguments = sys.argv[1:]
    jax.distributed.initialize(f"localhost:{port}", int(count), int(pid))
    {"data": data, "lock": lock}[task](int(pid), out, json.loads(arguments))
