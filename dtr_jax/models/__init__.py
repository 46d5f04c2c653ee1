"""Model registry: the twelve DiT sizes of the paper, by name ("DiT-B/2")."""

from __future__ import annotations

import jax.numpy as jnp

from dtr_jax.models.dit import DiT

# (depth, hidden_size, num_heads) per size (SPEC §3).
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCHES = (2, 4, 8)
MODEL_NAMES = tuple(f"DiT-{s}/{p}" for s in SIZES for p in PATCHES)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def architecture(name: str, **overrides) -> dict:
    """depth/hidden_size/num_heads/patch_size of `name`; non-None overrides win."""
    if name not in MODEL_NAMES:
        raise ValueError(f"model.name={name!r} is unknown: allowed {list(MODEL_NAMES)}")
    size, patch = name[len("DiT-") :].split("/")
    depth, hidden, heads = SIZES[size]
    arch = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))
    arch.update({k: v for k, v in overrides.items() if v is not None})
    return arch


def model_architecture(model_config) -> dict:
    """The architecture a `config.model` section resolves to (name + overrides)."""
    m = model_config
    return architecture(
        m.name,
        depth=m.depth,
        hidden_size=m.hidden_size,
        num_heads=m.num_heads,
        patch_size=m.patch_size,
    )


def create_dit(
    name: str,
    *,
    dtype: str = "float32",
    depth=None,
    hidden_size=None,
    num_heads=None,
    patch_size=None,
    **kwargs,
) -> DiT:
    """A DiT of the named size; depth/hidden_size/num_heads/patch_size override it.

    Remaining keyword arguments go to `DiT` (input_size, in_channels,
    num_classes, class_dropout_prob, learn_sigma, mlp_ratio, remat).
    """
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is unknown: allowed {list(DTYPES)}")
    arch = architecture(
        name, depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size
    )
    return DiT(dtype=DTYPES[dtype], **arch, **kwargs)


def from_config(config):
    """(DiT, routing tables or None) for a full run config (model + diffusion)."""
    from dtr_jax import routing  # local: keep the registry import-light

    m = config.model
    model = create_dit(
        m.name,
        dtype=m.dtype,
        **model_architecture(m),
        input_size=m.input_size,
        in_channels=m.in_channels,
        num_classes=m.num_classes,
        class_dropout_prob=m.class_dropout_prob,
        learn_sigma=m.learn_sigma,
        remat=m.remat,
    )
    r = m.routing
    tables = routing.model_tables(
        r.kind,
        config.diffusion.num_timesteps,
        model.hidden_size,
        model.depth,
        r.beta,
        r.alpha,
        r.seed,
    )
    return model, tables


__all__ = [
    "DiT",
    "SIZES",
    "MODEL_NAMES",
    "architecture",
    "create_dit",
    "from_config",
    "model_architecture",
]
