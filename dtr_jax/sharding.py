"""Device mesh and shardings: config axes -> `jax.sharding.Mesh` -> NamedShardings.

The mesh has two axes, `data` and `fsdp`. The batch is split over both; a
parameter is split over `fsdp` along the dimension whose logical name the rules
map to it (`embed`), so FSDP needs no change to the model. Shardings of the
whole train state (params, optimizer moments, EMA) come from the logical names
the model attaches to its parameters.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dtr_jax.errors import DtrError, FromOtherProcess, prefixed, raise_problems

AXES = ("data", "fsdp")
BATCH = ("data", "fsdp")

# Logical axis name -> mesh axis (None = replicated). Names the model uses but
# the rules leave out would be replicated too; listing them documents the model.
RULES = (
    ("batch", BATCH),
    ("embed", "fsdp"),
    ("length", None),
    ("act_embed", None),
    ("mlp", None),
    ("qkv", None),
    ("heads", None),
    ("adaln", None),
    ("patch", None),
    ("freq", None),
    ("cond", None),
    ("classes", None),
    ("channels", None),
    ("layers", None),  # the stacked blocks' depth axis (model.scan_blocks)
)


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int] | None:
    """(data, fsdp) with one -1 resolved to 'the rest', or None if it does not fit."""
    if data == -1 and fsdp == -1:
        return None
    if data == -1:
        data = num_devices // fsdp if fsdp > 0 else 0
    if fsdp == -1:
        fsdp = num_devices // data if data > 0 else 0
    if data <= 0 or fsdp <= 0 or data * fsdp != num_devices:
        return None
    return data, fsdp


def problems(data: int, fsdp: int, num_devices: int) -> list[str]:
    """Problems with a mesh section on `num_devices`, each naming its field."""
    if mesh_shape(data, fsdp, num_devices) is not None:
        return []
    return [
        f"data={data} x fsdp={fsdp} does not fit {num_devices} devices: the product must "
        "equal the device count (at most one of them may be -1, meaning 'the rest')"
    ]


def batch_problems(
    field: str, batch_size: int, data: int, fsdp: int, num_devices: int
) -> list[str]:
    """Problems with splitting the global batch `field` over the mesh's batch shards."""
    shape = mesh_shape(data, fsdp, num_devices)
    if shape is None or not isinstance(batch_size, int) or batch_size % (shape[0] * shape[1]) == 0:
        return []
    return [
        f"{field}={batch_size} is not divisible by the {shape[0] * shape[1]} batch shards "
        f"(mesh.data x mesh.fsdp on {num_devices} devices)"
    ]


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
    """Runs model code on `mesh`: the mesh set, and the logical-axis RULES in force."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all devices of all hosts), -1 resolved."""
    devices = jax.devices() if devices is None else devices
    found = problems(mesh_config.data, mesh_config.fsdp, len(devices))
    raise_problems(prefixed("mesh.", found, fields=AXES))
    shape = mesh_shape(mesh_config.data, mesh_config.fsdp, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def batch_shards(mesh: Mesh) -> int:
    """Devices the batch is split over (data x fsdp)."""
    return int(np.prod([mesh.shape[a] for a in BATCH]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH))


def put_batch(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array (the same on every host) as one global array split over the batch
    shards, its rows repeated cyclically up to a multiple of the shards: slice what the
    computation gives back to len(x)."""
    shards = batch_shards(mesh)
    padded = np.resize(x, (-(-len(x) // shards) * shards, *np.shape(x)[1:]))
    return jax.make_array_from_callback(padded.shape, batch_sharding(mesh), lambda i: padded[i])


def process_block(batch: NamedSharding, batch_size: int) -> int:
    """Which of process_count equal blocks of consecutive rows of a global batch of
    `batch_size` this process's devices hold under `batch`; the data pipeline reads that
    block alone. Raises ValueError where the mesh gives a process anything else."""
    index_map = batch.addressable_devices_indices_map((batch_size,))
    rows = sorted({r for index in index_map.values() for r in range(batch_size)[index[0]]})
    size = batch_size // jax.process_count()
    block = rows[0] // size
    if rows != list(range(block * size, (block + 1) * size)):
        raise ValueError(
            f"process {jax.process_index()} holds rows {rows} of a global batch of {batch_size}: "
            "the mesh must give each process one block of consecutive rows"
        )
    return block


def host_rows(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a global batch array (split over the batch shards), in the
    order `jax.make_array_from_process_local_data` took them from it."""
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, P(BATCH)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops the mesh axes of any dimension they do not divide evenly."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axes if names and dim % size == 0 else None)
    return P(*out)


def logical_shardings(boxed_tree, mesh: Mesh, rules=RULES):
    """NamedShardings for a (possibly abstract) tree whose leaves may carry flax
    logical-partitioning boxes; unboxed leaves are replicated."""
    specs = nn.get_partition_spec(boxed_tree)
    unboxed = nn.unbox(boxed_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)

    def to_sharding(spec, leaf):
        return NamedSharding(mesh, _fit(spec, np.shape(leaf), mesh))

    return jax.tree.map(to_sharding, mesh_specs, unboxed, is_leaf=lambda x: isinstance(x, P))


def from_host(tree, shardings):
    """Host values (numpy, the same on every host) as global arrays laid out as
    `shardings`: each host places only its own shards, with no cross-host transfer or
    check. Leaves that already are jax Arrays are kept as they are."""

    def place(x, s):
        if isinstance(x, jax.Array):
            return x
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(place, tree, shardings)


def host_gather(tree):
    """Brings a (possibly multi-host, sharded) pytree to every host as numpy."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def to_host(tree):
    """Every leaf as numpy, on every host: jax Arrays gathered whole however they are
    sharded (a collective with several processes), host arrays as they are."""
    leaves, treedef = jax.tree.flatten(tree)
    on_devices = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    for i, value in zip(on_devices, host_gather([leaves[i] for i in on_devices]), strict=True):
        leaves[i] = value
    return jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])


def all_hosts_agree(ok: bool) -> bool:
    """True only if `ok` holds on every process (a collective with several processes)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def from_process_0(x: np.ndarray) -> np.ndarray:
    """Process 0's value of a host array, on every process (what all must agree on, e.g.
    which work is already done, as process 0 reads it from a shared store)."""
    if jax.process_count() == 1:
        return x
    return np.asarray(multihost_utils.broadcast_one_to_all(x))


def max_over_hosts(n: int) -> int:
    """The largest of every process's `n` (a collective with several processes)."""
    if jax.process_count() == 1:
        return n
    return int(np.max(multihost_utils.process_allgather(np.asarray(n))))


def exchange(data: bytes) -> list[bytes]:
    """Every process's `data`, in process order, on every process (a collective)."""
    if jax.process_count() == 1:
        return [data]
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray(len(data), np.int64)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(data)] = np.frombuffer(data, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [row[:n].tobytes() for row, n in zip(rows, sizes, strict=True)]


def on_process_0(fn: Callable, *args):
    """fn(*args) run by process 0 alone, its result (JSON types) returned on every
    process; what it raises is raised on every process (as FromOtherProcess, with its
    message and exit code, on the others). For the decisions process 0 takes for all: what
    a shared store holds, the lock. `fn` must not enter a collective."""
    if jax.process_count() == 1:
        return fn(*args)
    result, error = _run(fn, *args) if jax.process_index() == 0 else (None, None)
    mine = _report(result, error) if jax.process_index() == 0 else b""
    report = json.loads(exchange(mine)[0])
    if error is not None:
        raise error
    _raise_reported(report, 0)
    return report["result"]


def on_every_host(fn: Callable, *args):
    """fn(*args) run by every process (checks each host must pass: a place it writes, a
    file it reads), returning this process's result; if it raises on any process, every
    process raises (the lowest such process's error; FromOtherProcess on the others).
    `fn` must not enter a collective."""
    if jax.process_count() == 1:
        return fn(*args)
    result, error = _run(fn, *args)
    reports = [json.loads(r) for r in exchange(_report(None, error))]
    if error is not None:
        raise error
    for process, report in enumerate(reports):
        _raise_reported(report, process)
    return result


def _run(fn: Callable, *args):
    """(fn(*args), None), or (None, the exception it raised)."""
    try:
        return fn(*args), None
    except Exception as e:  # handed to the caller, which raises it after telling the others
        return None, e


def _report(result, error: Exception | None) -> bytes:
    """An outcome as the other processes learn it: the result, or the error's message and
    exit code (a bug, not a DtrError, is exit code 1: its process prints the traceback)."""
    if error is None:
        return json.dumps({"result": result}).encode()
    if isinstance(error, DtrError):
        return json.dumps({"error": str(error), "exit_code": error.exit_code}).encode()
    bug = f"a bug ({type(error).__name__}: {error}); its log has the traceback"
    return json.dumps({"error": bug, "exit_code": 1}).encode()


def _raise_reported(report: dict, process: int) -> None:
    if "error" in report:
        raise FromOtherProcess(f"(process {process}) {report['error']}", report["exit_code"])


def sync_hosts(name: str) -> None:
    """Waits until every process reaches this point (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
