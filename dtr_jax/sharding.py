"""Device mesh and shardings: config axes -> `jax.sharding.Mesh` -> NamedShardings.

The mesh has two axes, `data` and `fsdp`. The batch is split over both; a
parameter is split over `fsdp` along the dimension whose logical name the rules
map to it (`embed`), so FSDP needs no change to the model. Shardings of the
whole train state (params, optimizer moments, EMA) come from the logical names
the model attaches to its parameters.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dtr_jax.config import mesh_shape

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
)


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A (data, fsdp) mesh over all devices (all hosts), -1 resolved."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    if shape is None:
        raise ValueError(
            f"mesh.data={mesh_config.data} x mesh.fsdp={mesh_config.fsdp} does not "
            f"fit {len(devices)} devices"
        )
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops the mesh axes of any dimension they do not divide evenly."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
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
