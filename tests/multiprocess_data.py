"""One of several processes of a multi-host run on localhost, for tests/test_extract.py.

  python tests/multiprocess_data.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR FIELDS_JSON

Joins the others with `jax.distributed` (CPU, 2 devices per process), extracts the tiny
photo folder that FIELDS_JSON's config names into its shared data.dir, then takes the
first three batches of the training pipeline on those latents and writes, to
OUT_DIR/process<ID>.npz, each global batch (gathered from every process) and the rows
this process read itself.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

BATCHES = 3


def main(process_id: int, num_processes: int, port: int, out_dir: str, fields: dict) -> None:
    jax.distributed.initialize(f"localhost:{port}", num_processes, process_id)
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


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    pid, count, port, out, fields = sys.argv[1:]
    main(int(pid), int(count), int(port), out, json.loads(fields))
