"""The attention kernels of `model.attention` (dtr_jax/models/attention.py).

Splash attention is a Pallas TPU kernel; Pallas's interpreter runs the same kernel on
this CPU, so its maths is checked here against XLA's attention, per batch shard under a
mesh as the models call it. (Its compiled form for a TPU: tests/test_plan.py.)
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtr_jax import sharding
from dtr_jax.models import attention


def qkv(tokens: int, batch: int = 4, heads: int = 2, head_dim: int = 16):
    rng = np.random.default_rng(0)
    shape = (batch, tokens, heads, head_dim)
    return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))


def value_and_grads(fn, q, k, v):
    loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))  # noqa: E731
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("mesh", [False, True])
def test_splash_computes_xlas_attention_and_its_gradients(mesh):
    """Outputs and the gradients of q, k and v within 1e-5 (float32), alone and under a
    2x2 (data, fsdp) mesh, where it runs once per batch shard."""
    q, k, v = qkv(tokens=128)
    splash = lambda q, k, v: attention.splash_attention(q, k, v, interpret=True)  # noqa: E731
    want = value_and_grads(jax.nn.dot_product_attention, q, k, v)
    if not mesh:
        got = value_and_grads(splash, q, k, v)
    else:
        mesh = sharding.make_mesh(types.SimpleNamespace(data=2, fsdp=2), jax.devices()[:4])
        with sharding.mesh_context(mesh):
            placed = [jax.device_put(a, sharding.batch_sharding(mesh)) for a in (q, k, v)]
            got = jax.jit(lambda *a: value_and_grads(splash, *a))(*placed)
            # one kernel per batch shard: the traced program maps it over the batch axes
            text = jax.jit(splash).trace(*placed).jaxpr.pretty_print()
        assert "shard_map" in text
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_splash_leaves_sequences_off_its_blocks_to_xla():
    """64 tokens (a U-Net's 8x8 level) fit no splash block: XLA's attention, exactly."""
    assert attention.splash_block(64) is None and attention.splash_block(384) == 128
    q, k, v = qkv(tokens=64)
    got = attention.dot_product_attention(q, k, v, "splash")
    np.testing.assert_array_equal(got, jax.nn.dot_product_attention(q, k, v))
