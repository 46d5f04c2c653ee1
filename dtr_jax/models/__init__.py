"""Model registry: the twelve DiT sizes of the paper, by name ("DiT-B/2").

`problems` checks a model section (name, dtype, sizes, how it computes);
`create_dit` builds one.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp

from dtr_jax.errors import choice_problems, integer_problems
from dtr_jax.models.dit import DiT

# (depth, hidden_size, num_heads) per size (SPEC §3).
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCHES = (2, 4, 8)
MODEL_NAMES = tuple(f"DiT-{s}/{p}" for s in SIZES for p in PATCHES)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
AUTO = "auto"  # a model.dtype resolved by the backend: compute_dtype
ARCH_FIELDS = ("depth", "hidden_size", "num_heads", "patch_size")
# '' = no rematerialisation; else a policy of jax.checkpoint_policies (what the backward keeps).
REMAT_POLICIES = (
    "",
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
)
ATTENTION = ("xla", "cudnn")  # jax.nn.dot_product_attention implementations
# How the model computes, not what it computes: DiT attributes that are no config "size".
COMPUTE_FIELDS = ("remat_policy", "scan_blocks", "attention")


def architecture(name: str, **overrides) -> dict:
    """depth/hidden_size/num_heads/patch_size of `name`; non-None overrides win."""
    if name not in MODEL_NAMES:
        raise ValueError(choice_problems("model.name", name, MODEL_NAMES)[0])
    size, patch = name[len("DiT-") :].split("/")
    depth, hidden, heads = SIZES[size]
    arch = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))
    arch.update({k: v for k, v in overrides.items() if v is not None})
    return arch


def model_architecture(model_config) -> dict:
    """The architecture a `config.model` section resolves to (name + overrides)."""
    m = model_config
    return architecture(m.name, **{f: getattr(m, f) for f in ARCH_FIELDS})


def problems(m) -> list[str]:
    """Problems with a model section (name, dtype, sizes, remat, scan, attention), each
    naming its field."""
    out = choice_problems("dtype", m.dtype, (AUTO, *DTYPES)) + _compute_problems(m)
    if not 0.0 <= m.class_dropout_prob <= 1.0:
        out.append(f"class_dropout_prob={m.class_dropout_prob!r} must lie in [0, 1]")
    if m.name not in MODEL_NAMES:
        return out + choice_problems("name", m.name, MODEL_NAMES)
    arch = model_architecture(m)
    sizes = [p for f in ARCH_FIELDS for p in integer_problems(f, arch[f])]
    sizes += [
        p
        for f in ("input_size", "in_channels", "num_classes")
        for p in integer_problems(f, getattr(m, f))
    ]
    if sizes:
        return out + sizes  # the checks below divide by these sizes
    d, heads, patch = arch["hidden_size"], arch["num_heads"], arch["patch_size"]
    if d % heads:
        out.append(f"hidden_size={d} is not divisible by num_heads={heads}")
    if d % 4:
        out.append(f"hidden_size={d} must be a multiple of 4 (2-D sin-cos position embedding)")
    if m.input_size % patch:
        out.append(f"input_size={m.input_size} is not divisible by patch_size={patch}")
    return out


def _compute_problems(m) -> list[str]:
    """Problems with how a model section computes: remat policy, scan, attention kernel.
    cuDNN attention needs a GPU backend and a 16-bit compute dtype (cuDNN's flash
    attention has no float32 kernel)."""
    out = choice_problems("remat_policy", m.remat_policy, REMAT_POLICIES)
    if not isinstance(m.scan_blocks, bool):
        out.append(f"scan_blocks={m.scan_blocks!r} must be True or False")
    out += choice_problems("attention", m.attention, ATTENTION)
    if m.attention == "cudnn":
        if jax.default_backend() != "gpu":
            out.append(
                f"attention='cudnn' needs a GPU backend, and this process runs on "
                f"{jax.default_backend()!r}: use 'xla'"
            )
        if compute_dtype(m.dtype) != "bfloat16":
            out.append(f"attention='cudnn' needs dtype='bfloat16', not {m.dtype!r}")
    return out


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

    Remaining keyword arguments go to `DiT` (input_size, in_channels, num_classes,
    class_dropout_prob, learn_sigma, mlp_ratio, remat_policy, scan_blocks, attention).
    Invalid arguments raise ValueError naming each `model.<field>`.
    """
    arch = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size)
    fields = {
        f: kwargs.get(f, getattr(DiT, f))
        for f in ("input_size", "in_channels", "num_classes", "class_dropout_prob") + COMPUTE_FIELDS
    }
    found = problems(types.SimpleNamespace(name=name, dtype=dtype, **arch, **fields))
    if found:
        raise ValueError("; ".join(f"model.{p}" for p in found))
    return DiT(dtype=DTYPES[compute_dtype(dtype)], **architecture(name, **arch), **kwargs)


def compute_dtype(dtype: str) -> str:
    """The DTYPES name a `model.dtype` computes in: 'auto' is bfloat16 on accelerators
    (GPU, TPU: their fast matmul type) and float32 on CPU (bfloat16 matmuls are emulated
    there, and slower); params and optimizer state are float32 either way."""
    if dtype != AUTO:
        return dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


__all__ = [
    "ATTENTION",
    "AUTO",
    "COMPUTE_FIELDS",
    "DTYPES",
    "MODEL_NAMES",
    "REMAT_POLICIES",
    "SIZES",
    "DiT",
    "architecture",
    "compute_dtype",
    "create_dit",
    "model_architecture",
    "problems",
]
