"""Diffusion Transformer (DiT, Peebles & Xie 2023) with denoising task routing.

Matches the released DiT (SPEC §3) with DTR routing in every block (SPEC §2).
Layout is NHWC. Module names mirror the PyTorch release one to one
(`blocks_3/attn/qkv` <-> `blocks.3.attn.qkv`), so checkpoints map by name.
Parameters and activations carry logical axis names; the mesh axes they map
to are chosen by the rules in `dtr_jax.sharding`, never here.

Routing tables are not parameters: they are passed to `__call__` as a
(G, T, C) array (G = 1 shared, or G = depth for one table per block) and
gathered once per forward by the per-sample task (the timestep unless the
objective names another row: `task`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dtr_jax.models.attention import dot_product_attention
from dtr_jax.routing import route

Dtype = Any
LAYERS = "layers"  # logical name of the stacked blocks' leading axis (scan_blocks)
_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros_init()
_normal = nn.initializers.normal(stddev=0.02)


def _init(fn, *names):
    return nn.with_logical_partitioning(fn, names)


@jax.custom_vjp
def _matmul(x, kernel):
    """x @ kernel over x's last axis, as `nn.Dense` computes it; the gradient is
    `_matmul_backward`'s."""
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_forward(x, kernel):
    return _matmul(x, kernel), (x, kernel)


def _matmul_backward(residuals, g):
    """Autodiff's gradients, the kernel's computed as (g^T x)^T rather than x^T g: the
    same sums, but XLA's CPU backend then reads g where it lies instead of copying it
    into a transposed layout first, and moves 5-6% fewer bytes in the train step
    (BENCHMARKS.md, optimisation log 13)."""
    x, kernel = residuals
    dx = lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dkernel = lax.dot_general(g2, x2, (((0,), (0,)), ((), ()))).T
    return dx, dkernel


_matmul.defvjp(_matmul_forward, _matmul_backward)


class Dense(nn.Dense):
    """`nn.Dense` (same params, initialisers, dtype promotion and forward), with the
    kernel's gradient taken as `_matmul_backward` takes it."""

    @nn.compact
    def __call__(self, inputs):
        kernel = self.param(
            "kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = _matmul(inputs, kernel)
        return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def _dense(features, names, name, dtype, kernel_init=_xavier, bias_init=_zeros, own_grad=True):
    """`Dense` in float32, the CPU's dtype; else, or with `own_grad=False`, flax's
    `nn.Dense` (the same params and forward, autodiff's gradient: what a remat policy
    sees, `DiTBlock.own_grads`). In bfloat16 Dense's gradient cost a TPU plan of B/2 6.8%
    more bytes (BENCHMARKS.md, log 13), as log 9's attention did."""
    own = own_grad and jnp.dtype(dtype) == jnp.float32
    return (Dense if own else nn.Dense)(
        features,
        dtype=dtype,
        name=name,
        kernel_init=_init(kernel_init, *names),
        bias_init=_init(bias_init, names[-1]),
    )


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding [cos, sin] of (possibly fractional) timesteps."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed(dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (MAE recipe), (grid_size**2, dim)."""
    grid_w, grid_h = np.meshgrid(
        np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64)
    )
    return np.concatenate([_sincos_1d(dim // 2, grid_w), _sincos_1d(dim // 2, grid_h)], axis=1)


class TimestepEmbedder(nn.Module):
    hidden_size: int
    freq_dim: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t):
        h = timestep_embedding(t, self.freq_dim).astype(self.dtype)
        h = _dense(self.hidden_size, ("freq", "embed"), "mlp_0", self.dtype, _normal)(h)
        h = _dense(self.hidden_size, ("cond", "embed"), "mlp_2", self.dtype, _normal)(nn.silu(h))
        return h


class LabelEmbedder(nn.Module):
    """Class table with a last 'null' row for classifier-free guidance."""

    num_classes: int
    hidden_size: int
    dropout_prob: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, y, train: bool):
        if train and self.dropout_prob > 0 and self.num_classes > 1:  # SPEC §3: none if 1 class
            drop = jax.random.uniform(self.make_rng("dropout"), y.shape) < self.dropout_prob
            y = jnp.where(drop, self.num_classes, y)
        table = nn.Embed(
            self.num_classes + 1,
            self.hidden_size,
            dtype=self.dtype,
            embedding_init=_init(_normal, "classes", "embed"),
            name="embedding_table",
        )
        return table(y)


def heads_major_attention(q, k, v, own_grad: bool = True):
    """softmax(q k^T / sqrt(head_dim)) v over float32 (B, heads, N, head_dim) arrays: what
    `jax.nn.dot_product_attention`'s 'xla' implementation computes, with the heads ahead
    of the tokens, so both products are plain batched matmuls of row-major operands and
    XLA moves no activation between them (BENCHMARKS.md, optimisation log 9; bfloat16
    keeps that function's call). Its gradient is `_attention_backward`'s (log 10), or
    autodiff's with `own_grad=False`."""
    return _attention_f32(q, k, v) if own_grad else _attention(q, k, v)[0]


def _attention(q, k, v):
    """(output, softmax probabilities) of `heads_major_attention`."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) * (1.0 / np.sqrt(q.shape[-1]))
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v), probs


@jax.custom_vjp
def _attention_f32(q, k, v):
    return _attention(q, k, v)[0]


def _attention_forward(q, k, v):
    out, probs = _attention(q, k, v)
    return out, (q, k, v, probs)


def _attention_backward(residuals, g):
    """The gradient autodiff gives (dS = P * (dP - sum(dP * P)), scaled), with the two
    products that contract over the query axis (dV = P^T dO, dK = dS^T Q) taken from
    materialised transposes of P and dS: XLA's CPU backend would run them as batched
    transposed-operand matmuls through Eigen, several times slower than the plain
    matmuls it hands to YNNPACK (BENCHMARKS.md, optimisation log 10). The barrier keeps
    XLA from folding the transposes back into the products."""
    q, k, v, probs = residuals
    scale = jnp.array(1.0 / np.sqrt(q.shape[-1]), dtype=q.dtype)
    probs_t = lax.optimization_barrier(jnp.swapaxes(probs, -1, -2))
    dv = jnp.einsum("bhkq,bhqd->bhkd", probs_t, g)
    dp = jnp.einsum("bhqd,bhkd->bhqk", g, v)
    ds = probs * (dp - jnp.sum(dp * probs, axis=-1, keepdims=True)) * scale
    dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k)
    ds_t = lax.optimization_barrier(jnp.swapaxes(ds, -1, -2))
    dk = jnp.einsum("bhkq,bhqd->bhkd", ds_t, q)
    return dq, dk, dv


_attention_f32.defvjp(_attention_forward, _attention_backward)


class Attention(nn.Module):
    num_heads: int
    dtype: Dtype = jnp.float32
    implementation: str = "xla"  # attention.IMPLEMENTATIONS: xla, cudnn (GPU), splash (TPU)
    own_grads: bool = True  # DiTBlock.own_grads

    @nn.compact
    def __call__(self, x):
        b, n, d = x.shape
        h = self.num_heads
        g = self.own_grads
        qkv = _dense(3 * d, ("embed", "qkv"), "qkv", self.dtype, own_grad=g)(x)
        # PyTorch reshapes qkv to (B, N, 3, heads, head_dim).
        qkv = qkv.reshape(b, n, 3, h, d // h)
        if self.implementation != "xla" or qkv.dtype != jnp.float32:
            # cuDNN's and splash's kernels, and XLA's in bfloat16 (TPU, GPU), take
            # (B, N, heads, head_dim)
            q, k, v = jnp.moveaxis(qkv, 2, 0)
            out = dot_product_attention(q, k, v, self.implementation)
        else:  # float32 (the CPU): BENCHMARKS.md, optimisation log 9
            # One transpose to (3, B, heads, N, head_dim); split (its gradient is one
            # concatenation, where indexing's is a padded copy per part, summed).
            q, k, v = (a[0] for a in jnp.split(qkv.transpose(2, 0, 3, 1, 4), 3))
            out = heads_major_attention(q, k, v, own_grad=g).transpose(0, 2, 1, 3)
        return _dense(d, ("heads", "embed"), "proj", self.dtype, own_grad=g)(out.reshape(b, n, d))


class Mlp(nn.Module):
    hidden: int
    dtype: Dtype = jnp.float32
    own_grads: bool = True  # DiTBlock.own_grads

    @nn.compact
    def __call__(self, x):
        g = self.own_grads
        h = _dense(self.hidden, ("embed", "mlp"), "fc1", self.dtype, own_grad=g)(x)
        h = nn.gelu(h, approximate=True)
        return _dense(x.shape[-1], ("mlp", "embed"), "fc2", self.dtype, own_grad=g)(h)


def _layer_norm(dtype):
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype)


class DiTBlock(nn.Module):
    """adaLN-Zero block; with a mask m it computes x + Block(x * m) (SPEC §2)."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    attention: str = "xla"
    # The gradients of `Dense` and of float32 attention (log 10, 13); False: autodiff's.
    # A remat policy sees the matmuls autodiff differentiates, not those inside a custom
    # VJP, whose outputs it would never save ('dots_...' would recompute every Dense).
    own_grads: bool = True

    @nn.compact
    def __call__(self, x, c, mask=None):
        d = self.hidden_size
        g = self.own_grads
        mod = _dense(
            6 * d, ("embed", "adaln"), "adaLN_modulation_1", self.dtype, _zeros, own_grad=g
        )(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        attn = Attention(self.num_heads, self.dtype, self.attention, g, name="attn")
        mlp = Mlp(int(d * self.mlp_ratio), self.dtype, g, name="mlp")

        def attn_branch(h):
            return gate_msa[:, None] * attn(
                modulate(_layer_norm(self.dtype)(h), shift_msa, scale_msa)
            )

        def mlp_branch(h):
            return gate_mlp[:, None] * mlp(
                modulate(_layer_norm(self.dtype)(h), shift_mlp, scale_mlp)
            )

        return route((attn_branch, mlp_branch), x, mask)


class FinalLayer(nn.Module):
    patch_size: int
    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        d = x.shape[-1]
        mod = _dense(2 * d, ("embed", "adaln"), "adaLN_modulation_1", self.dtype, _zeros)(
            nn.silu(c)
        )
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = modulate(_layer_norm(self.dtype)(x), shift, scale)
        out = self.patch_size**2 * self.out_channels
        return _dense(out, ("embed", "patch"), "linear", self.dtype, _zeros)(x)


class PatchEmbed(nn.Module):
    patch_size: int
    hidden_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        # PyTorch inits the conv as xavier over its (out, in*p*p) flattened view.
        kinit = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1)
        conv = nn.Conv(
            self.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=_init(kinit, None, None, "channels", "embed"),
            bias_init=_init(_zeros, "embed"),
            name="proj",
        )
        h = conv(x)
        return h.reshape(h.shape[0], -1, h.shape[-1])


class DiT(nn.Module):
    """DiT over NHWC inputs; __call__(x, t, y, routing, train, task) -> (B, H, W,
    out_channels) fp32.

    Attributes:
      input_size: spatial size H = W of the input (pixels or latents).
      in_channels: input channels; the output has twice as many with learn_sigma.
      num_classes: number of labels (1 = unconditional); row num_classes is null.
      class_dropout_prob: label dropout in training (classifier-free guidance).
      dtype: compute dtype (e.g. bfloat16); parameters stay float32.
      remat_policy: '' (keep every activation for the backward pass) or the name of a
        `jax.checkpoint_policies` policy each block is rematerialised with
        ('nothing_saveable' recomputes all of it; 'dots_with_no_batch_dims_saveable'
        keeps the matmul outputs).
      scan_blocks: run the blocks as one `nn.scan` (one compiled block instead of
        `depth`): params live under `blocks` stacked along a leading depth axis
        instead of `blocks_<i>` (`stack_blocks` / `unstack_blocks` convert).
      attention: the kernel (`attention.IMPLEMENTATIONS`): 'xla', 'cudnn', 'splash'.
    """

    input_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    dtype: Dtype = jnp.float32
    remat_policy: str = ""
    scan_blocks: bool = False
    attention: str = "xla"

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def dummy_inputs(self, batch_size: int = 1):
        """(x, t, y) zeros of the input shapes, for init and shape inference."""
        x = jnp.zeros((batch_size, self.input_size, self.input_size, self.in_channels), jnp.float32)
        t = jnp.zeros((batch_size,), jnp.int32)
        return x, t, t

    @nn.compact
    def __call__(self, x, t, y, routing=None, train: bool = False, task=None):
        """Args: x (B,H,W,C); t (B,) the time the timestep embedder sees (int timesteps
        in [0, T) for DDPM, a float for flow models); y (B,) int labels; routing: None or
        a (G, T, hidden_size) 0/1 table (G = 1 or depth); task: (B,) int rows of the
        table, t where None (the objective says which: `dtr_jax.diffusion`)."""
        grid = self.input_size // self.patch_size
        x = PatchEmbed(self.patch_size, self.hidden_size, self.dtype, name="x_embedder")(x)
        pos = sincos_pos_embed(self.hidden_size, grid)
        x = x + jnp.asarray(pos, self.dtype)[None]
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        c = TimestepEmbedder(self.hidden_size, dtype=self.dtype, name="t_embedder")(t)
        c = c + LabelEmbedder(
            self.num_classes,
            self.hidden_size,
            self.class_dropout_prob,
            self.dtype,
            name="y_embedder",
        )(y, train)
        rows = t if task is None else task
        masks = None if routing is None else self._gather_masks(routing, rows)
        x = self._blocks(x, c, masks)
        x = FinalLayer(self.patch_size, self.out_channels, self.dtype, name="final_layer")(x, c)
        return self._unpatchify(x).astype(jnp.float32)

    def _blocks(self, x, c, masks):
        """The DiT blocks over the token stream x, unrolled or scanned."""
        block_cls = DiTBlock
        if self.remat_policy:
            policy = getattr(jax.checkpoint_policies, self.remat_policy)
            # prevent_cse guards the recompute against CSE; a scan body needs no guard.
            block_cls = nn.remat(DiTBlock, policy=policy, prevent_cse=not self.scan_blocks)
        args = (self.hidden_size, self.num_heads, self.mlp_ratio, self.dtype, self.attention)
        args += (not self.remat_policy,)  # own_grads: autodiff's under a remat policy
        if not self.scan_blocks:
            for i in range(self.depth):
                mask = None if masks is None else masks[i % masks.shape[0]]
                x = block_cls(*args, name=f"blocks_{i}")(x, c, mask)
                x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
            return x
        # One table per block ('random') is scanned over with the params; a shared one
        # ('dtr') and no routing are the same for every block.
        per_block = masks is not None and masks.shape[0] > 1
        masks = masks if masks is None or per_block else masks[0]

        def body(block, x, c, mask):
            x = block(x, c, mask)
            return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), None

        scan = nn.scan(
            body,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, 0 if per_block else nn.broadcast),
            length=self.depth,
            metadata_params={nn.PARTITION_NAME: LAYERS},
        )
        x, _ = scan(block_cls(*args, name="blocks"), x, c, masks)
        return x

    def _gather_masks(self, routing, task):
        """(G, T, C) table -> (G, B, 1, C) masks (rows `task`) in the compute dtype."""
        if (
            routing.ndim != 3
            or routing.shape[0] not in (1, self.depth)
            or routing.shape[2] != self.hidden_size
        ):
            raise ValueError(
                f"routing table has shape {routing.shape}: expected "
                f"(1 or depth={self.depth}, T, hidden_size={self.hidden_size})"
            )
        return jnp.asarray(routing)[:, task][:, :, None, :].astype(self.dtype)

    def _unpatchify(self, x):
        """(B, N, p*p*c) -> (B, H, W, c), patch channels ordered (p, q, c) as in PyTorch."""
        p, c = self.patch_size, self.out_channels
        g = self.input_size // p
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return x.transpose(0, 1, 3, 2, 4, 5).reshape(x.shape[0], g * p, g * p, c)

    def guided(self, x, t, y, routing=None, *, cfg_scale, task=None):
        """Classifier-free guidance in one batch of conditional + null-label halves.

        eps = eps_u + s * (eps_c - eps_u) on all input channels (DTR release);
        the variance channels are taken from the conditional half as they are.
        `cfg_scale` may be an array broadcasting against the output (a scale per sample).
        """
        null = jnp.full_like(y, self.num_classes)
        both = None if task is None else jnp.concatenate([task, task])
        out = self(
            jnp.concatenate([x, x]),
            jnp.concatenate([t, t]),
            jnp.concatenate([y, null]),
            routing,
            task=both,
        )
        cond, uncond = jnp.split(out, 2, axis=0)
        c = self.in_channels
        eps = uncond[..., :c] + cfg_scale * (cond[..., :c] - uncond[..., :c])
        return jnp.concatenate([eps, cond[..., c:]], axis=-1)


# --- the two layouts of the blocks' params --------------------------------------------------


def _block_names(params) -> list[str]:
    names = [k for k in params if k.startswith("blocks_") and k[len("blocks_") :].isdigit()]
    return sorted(names, key=lambda k: int(k[len("blocks_") :]))


def _is_boxed(leaf) -> bool:
    return isinstance(leaf, nn.Partitioned)


def stack_blocks(params) -> dict:
    """Per-block params (`blocks_0` .. `blocks_<depth-1>`) -> the `scan_blocks` layout:
    one `blocks` subtree whose leaves carry a leading depth axis. Works on plain arrays
    and on logically partitioned (boxed) params, whose leading axis gets the name LAYERS."""
    names = _block_names(params)
    if not names or names != [f"blocks_{i}" for i in range(len(names))]:
        raise ValueError(f"expected params blocks_0 .. blocks_<depth-1>, found {names}")

    def stack(*leaves):
        if _is_boxed(leaves[0]):
            value = jnp.stack([leaf.value for leaf in leaves])
            return leaves[0].replace(value=value, names=(LAYERS, *leaves[0].names))
        host = all(isinstance(leaf, np.ndarray) for leaf in leaves)
        return np.stack(leaves) if host else jnp.stack(leaves)  # host arrays stay on the host

    out = {k: v for k, v in params.items() if k not in names}
    out["blocks"] = jax.tree.map(stack, *(params[k] for k in names), is_leaf=_is_boxed)
    return out


def unstack_blocks(params) -> dict:
    """The `scan_blocks` layout -> per-block params `blocks_<i>` (stack_blocks' inverse)."""
    if "blocks" not in params:
        raise ValueError("expected params with a stacked 'blocks' subtree")
    stacked = params["blocks"]
    depth = jax.tree.leaves(nn.unbox(stacked))[0].shape[0]

    def take(i):
        def leaf(x):
            if _is_boxed(x):
                return x.replace(value=x.value[i], names=x.names[1:])
            return x[i]

        return jax.tree.map(leaf, stacked, is_leaf=_is_boxed)

    out = {k: v for k, v in params.items() if k != "blocks"}
    out.update({f"blocks_{i}": take(i) for i in range(depth)})
    return out
