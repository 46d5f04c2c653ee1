"""The attention kernels the models call on (B, N, heads, head_dim) arrays.

`model.attention` names one:
  'xla'     `jax.nn.dot_product_attention`'s XLA implementation (every backend);
  'cudnn'   its cuDNN flash attention (NVIDIA GPUs, 16-bit dtypes);
  'splash'  Pallas's TPU splash attention kernel (`jax.experimental.pallas.ops.tpu.
            splash_attention`): the softmax probabilities are never stored, for the
            forward nor for the backward, which recomputes them block by block.

Splash runs on a TPU (and compiles for one in `--mode plan`). Its blocks are 128 to 512
tokens, so a sequence whose length is not a multiple of 128 (a U-Net's 8x8 level) takes
XLA's attention instead. Under a mesh it runs per batch shard (`jax.shard_map` over the
mesh axes the logical 'batch' axis maps to), since the partitioner cannot split a Pallas
kernel itself. XLA's cost analysis does not see inside the kernel: `plan.kernel_flops`
counts its products for the plan.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("xla", "cudnn", "splash")
SPLASH_BLOCKS = (512, 256, 128)  # the kernel's block sizes, largest first


def dot_product_attention(q, k, v, implementation: str = "xla"):
    """softmax(q k^T / sqrt(head_dim)) v, each (B, N, heads, head_dim)."""
    if implementation == "splash":
        if splash_block(q.shape[1]):
            return splash_attention(q, k, v)
        implementation = "xla"
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def splash_block(tokens: int) -> int | None:
    """The largest splash block that divides `tokens`, or None (XLA's attention)."""
    return next((b for b in SPLASH_BLOCKS if tokens % b == 0), None)


def splash_attention(q, k, v, interpret: bool = False):
    """`dot_product_attention` through the splash kernel, one call per batch shard.
    `interpret`: Pallas's interpreter, which runs the kernel on a CPU (tests)."""
    b, n, heads, d = q.shape
    kernel = jax.vmap(_splash_kernel(n, heads, interpret))
    scale = jnp.asarray(1.0 / math.sqrt(d), q.dtype)  # the kernel does not scale

    def per_shard(q, k, v):  # (B', N, heads, d) -> the kernel's (B', heads, N, d)
        q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q * scale, k, v))
        return jnp.swapaxes(kernel(q, k, v), 1, 2)

    mesh = jax.sharding.get_abstract_mesh()
    axes = _batch_axes()
    if mesh.empty or not axes or b % math.prod(mesh.shape[a] for a in axes):
        return per_shard(q, k, v)
    spec = P(axes)
    return jax.shard_map(per_shard, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)


def _batch_axes() -> tuple[str, ...]:
    """The mesh axes the logical 'batch' axis maps to under the current rules."""
    axis = nn.logical_to_mesh_axes(("batch",))[0]
    if axis is None:
        return ()
    return (axis,) if isinstance(axis, str) else tuple(axis)


@functools.cache
def _splash_kernel(tokens: int, heads: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = splash_block(tokens)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = splash.MultiHeadMask([splash.FullMask((tokens, tokens))] * heads)
    return splash.make_splash_mha(
        mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret
    )
