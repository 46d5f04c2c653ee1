"""ADM U-Net (guided-diffusion's `UNetModel`, Dhariwal & Nichol 2021) with denoising task routing.

The architecture of openai/guided-diffusion's `guided_diffusion/unet.py` with the options
its released models use (`model_channels`, `channel_mult`, `num_res_blocks`,
`attention_resolutions` as downsample rates, `num_heads` / `num_head_channels`,
`use_scale_shift_norm`, `resblock_updown`, `use_new_attention_order`, `dropout`, class
conditioning, learned sigma), two spatial dimensions, learned-convolution resampling
(`conv_resample=True`, what `create_model` builds), NHWC. Module names mirror its state
dict one to one (`input_blocks_4_0/out_layers_3` <-> `input_blocks.4.0.out_layers.3`), so
checkpoints map by name (`dtr_jax.interop`). GroupNorm(32) runs in float32 whatever the
compute dtype (guided-diffusion's `GroupNorm32`); the layers guided-diffusion wraps in
`zero_module` start at zero; the others start as PyTorch's defaults do.

Routing (README, "U-Net routing"): the mask m_t of the task multiplies the output of every
GroupNorm that feeds a zero-initialised layer: each ResBlock's `out_layers` norm (after the
scale-shift of `use_scale_shift_norm`), each AttentionBlock's `norm`, and the output head's
norm (`route_head`). The tables are a dict {width C: (G, T, C) 0/1 array}, one entry per
routed width (C = model_channels x mult); G = 1 shares one table among the sites of that
width, G = their number gives each its own (sites in forward order). Parameters and
activations carry logical axis names as in `dtr_jax.models.dit`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dtr_jax.models.attention import dot_product_attention
from dtr_jax.models.dit import timestep_embedding

Dtype = Any
GROUPS = 32  # guided-diffusion's normalization(): GroupNorm32(32, channels)
NORM_EPS = 1e-5  # torch.nn.GroupNorm's default
_zeros = nn.initializers.zeros_init()
_ones = nn.initializers.ones_init()
# PyTorch's default init of Conv and Linear weights (kaiming_uniform, a = sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)); flax's fan_in of an HWIO kernel is kh * kw * I.
_torch_weight = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _init(fn, *names):
    return nn.with_logical_partitioning(fn, names)


def _torch_bias(fan_in: int):
    """PyTorch's default bias init of a layer with `fan_in` inputs: U(-b, b), b = 1/sqrt(fan_in)."""
    bound = 1 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv(features, kernel, name, dtype, inputs, *, zero=False, strides=1, in_axis="channels"):
    """A square 2-D convolution of `inputs` channels with PyTorch's padding (kernel // 2 on
    every side) and init (zero: guided-diffusion's zero_module)."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        name=name,
        kernel_init=_init(_zeros if zero else _torch_weight, None, None, in_axis, "embed"),
        bias_init=_init(_zeros if zero else _torch_bias(inputs * kernel * kernel), "embed"),
    )


def dense(features, names, name, dtype, fan_in, *, zero=False):
    """A Dense layer of `fan_in` inputs with PyTorch's init (zero: a zero_module); `names`
    are the logical names of its kernel's axes."""
    return nn.Dense(
        features,
        dtype=dtype,
        name=name,
        kernel_init=_init(_zeros if zero else _torch_weight, *names),
        bias_init=_init(_zeros if zero else _torch_bias(fan_in), names[-1]),
    )


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32 groups, eps 1e-5) computed in float32; the output has the input's dtype."""

    num_groups: int = GROUPS
    epsilon: float = NORM_EPS
    dtype: Dtype = jnp.float32
    use_fast_variance: bool = False
    scale_init: Any = _init(_ones, "channels")
    bias_init: Any = _init(_zeros, "channels")

    def __call__(self, x):
        return super().__call__(x.astype(jnp.float32)).astype(x.dtype)


def _masked(h, mask):
    """h (B, H, W, C) times the task mask (B, C); None: no routing."""
    return h if mask is None else h * mask[:, None, None, :].astype(h.dtype)


def _upsample(x):
    """Nearest-neighbour x2 (F.interpolate(scale_factor=2, mode='nearest'))."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool(x):
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResBlock(nn.Module):
    """guided-diffusion's ResBlock: in_layers (norm, SiLU, conv), emb_layers (SiLU, linear),
    out_layers (norm, SiLU, dropout, zero conv), a skip connection; `updown` 'up' or
    'down' resamples in the middle of in_layers (resblock_updown). With a mask, the
    out_layers norm's output (after the scale-shift) is multiplied by it."""

    channels: int
    out_channels: int
    emb_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    updown: str = ""
    dtype: Dtype = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, emb, mask=None):
        c, out = self.channels, self.out_channels
        h = nn.silu(GroupNorm32(name="in_layers_0")(x))
        if self.updown:
            resample = _upsample if self.updown == "up" else _avg_pool
            h, x = resample(h), resample(x)
        h = conv(out, 3, "in_layers_2", self.dtype, c)(h)
        emb_width = 2 * out if self.use_scale_shift_norm else out
        emb_out = dense(
            emb_width, ("cond", "embed"), "emb_layers_1", self.dtype, self.emb_channels
        )(nn.silu(emb))[:, None, None, :].astype(h.dtype)
        norm = GroupNorm32(name="out_layers_0")
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = norm(h) * (1 + scale) + shift
        else:
            h = norm(h + emb_out)
        h = nn.silu(_masked(h, mask))
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        h = conv(out, 3, "out_layers_3", self.dtype, out, zero=True)(h)
        if out != c:
            x = conv(out, 1, "skip_connection", self.dtype, c)(x)
        return x + h


class AttentionBlock(nn.Module):
    """Self-attention over the H x W positions: norm, qkv (a 1x1 Conv1d there, a Dense
    here), attention, zero-initialised proj_out, residual. `new_order` splits q, k, v
    before the heads (QKVAttention), else the heads first (QKVAttentionLegacy). With a
    mask, the norm's output is multiplied by it."""

    channels: int
    num_heads: int
    new_order: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "xla"  # attention.IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x, mask=None):
        b, height, width, c = x.shape
        heads, ch = self.num_heads, c // self.num_heads
        h = _masked(GroupNorm32(name="norm")(x), mask).reshape(b, height * width, c)
        qkv = dense(3 * c, ("embed", "qkv"), "qkv", self.dtype, c)(h)
        # channel order of qkv: (3, heads, ch) in the new order, (heads, 3, ch) in the legacy
        split = (3, heads, ch) if self.new_order else (heads, 3, ch)
        qkv = qkv.reshape(b, height * width, *split)
        q, k, v = jnp.moveaxis(qkv, 2 if self.new_order else 3, 0)  # each (B, HW, heads, ch)
        a = dot_product_attention(q, k, v, self.attention)
        a = a.reshape(b, height * width, c)
        h = dense(c, ("heads", "embed"), "proj_out", self.dtype, c, zero=True)(a)
        return x + h.reshape(x.shape)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer of a U-Net block: `kind` 'conv' (the input convolution), 'res', 'attn',
    'down' or 'up' (conv resampling); input and output channels; the downsample rate `ds`
    of its input; `updown` of a resampling ResBlock."""

    kind: str
    channels: int
    out_channels: int
    ds: int
    updown: str = ""


@dataclasses.dataclass(frozen=True)
class Plan:
    """The blocks of a U-Net, as guided-diffusion's `UNetModel.__init__` lays them out."""

    input_blocks: tuple[tuple[Layer, ...], ...]
    middle_block: tuple[Layer, ...]
    output_blocks: tuple[tuple[Layer, ...], ...]
    head_channels: int  # of the output head's norm and zero conv

    def blocks(self):
        """(name prefix, layers) of every block in forward order."""
        for i, layers in enumerate(self.input_blocks):
            yield f"input_blocks_{i}", layers
        yield "middle_block", self.middle_block
        for i, layers in enumerate(self.output_blocks):
            yield f"output_blocks_{i}", layers

    def routed_widths(self, route_head: bool = True) -> list[int]:
        """The width of every routed site (ResBlock, AttentionBlock, head) in forward order."""
        sites = [
            layer.out_channels
            for _, layers in self.blocks()
            for layer in layers
            if layer.kind in ("res", "attn")
        ]
        return sites + ([self.head_channels] if route_head else [])


def make_plan(
    in_channels: int,
    model_channels: int,
    channel_mult,
    num_res_blocks: int,
    attention_resolutions,
    resblock_updown: bool,
) -> Plan:
    """The layer plan of guided-diffusion's UNetModel of these options."""
    ch = int(channel_mult[0] * model_channels)
    inputs, skips, ds = [(Layer("conv", in_channels, ch, 1),)], [ch], 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            out = int(mult * model_channels)
            layers = [Layer("res", ch, out, ds)]
            ch = out
            if ds in attention_resolutions:
                layers.append(Layer("attn", ch, ch, ds))
            inputs.append(tuple(layers))
            skips.append(ch)
        if level != len(channel_mult) - 1:
            kind, updown = ("res", "down") if resblock_updown else ("down", "")
            inputs.append((Layer(kind, ch, ch, ds, updown),))
            skips.append(ch)
            ds *= 2
    middle = (Layer("res", ch, ch, ds), Layer("attn", ch, ch, ds), Layer("res", ch, ch, ds))
    outputs = []
    for level, mult in list(enumerate(channel_mult))[::-1]:
        for i in range(num_res_blocks + 1):
            out = int(model_channels * mult)
            layers = [Layer("res", ch + skips.pop(), out, ds)]
            ch = out
            if ds in attention_resolutions:
                layers.append(Layer("attn", ch, ch, ds))
            if level and i == num_res_blocks:
                kind, updown = ("res", "up") if resblock_updown else ("up", "")
                layers.append(Layer(kind, ch, ch, ds, updown))
                ds //= 2
            outputs.append(tuple(layers))
    return Plan(tuple(inputs), middle, tuple(outputs), ch)


class UNet(nn.Module):
    """guided-diffusion's UNetModel over NHWC inputs, with task routing;
    __call__(x, t, y, routing, train, task) -> (B, H, W, out_channels) float32.

    Attributes (guided-diffusion's names):
      input_size: H = W of the input (the model takes any multiple of
        2 ** (len(channel_mult) - 1); the attribute sizes samples and dummy inputs).
      in_channels: input channels; the output has twice as many with learn_sigma.
      model_channels, channel_mult, num_res_blocks: widths C = model_channels x mult
        per level, ResBlocks per level.
      attention_resolutions: the downsample rates (1, 2, 4, ...) with attention.
      num_heads / num_head_channels: heads per attention (num_head_channels = -1), or
        channels per head (num_head_channels > 0, guided-diffusion's 64 and 256 models).
      use_scale_shift_norm: adaptive GroupNorm (AdaGN) in the ResBlocks' out_layers.
      resblock_updown: resample with ResBlocks instead of plain (conv) resampling.
      use_new_attention_order: split q, k, v before the heads (QKVAttention).
      dropout: before each ResBlock's last convolution, in training.
      num_classes: labels (1 = unconditional: no label embedding, as class_cond=False).
      null_label: the label embedding has a last, null row (classifier-free guidance;
        what training with class_dropout_prob > 0 needs). guided-diffusion has none.
      class_dropout_prob: label dropout in training (needs null_label).
      route_head: the output head's norm is routed too (when tables are given).
      dtype: compute dtype; params and GroupNorms are float32.
      remat_policy: '' or a `jax.checkpoint_policies` policy every ResBlock and
        AttentionBlock is rematerialised with (guided-diffusion's use_checkpoint).
      attention: the kernel (`attention.IMPLEMENTATIONS`): 'xla', 'cudnn', 'splash'.
    """

    input_size: int = 64
    in_channels: int = 3
    model_channels: int = 192
    channel_mult: tuple = (1, 2, 3, 4)
    num_res_blocks: int = 3
    attention_resolutions: tuple = (2, 4, 8)
    num_heads: int = 4
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = True
    dropout: float = 0.0
    num_classes: int = 1000
    null_label: bool = False
    class_dropout_prob: float = 0.0
    learn_sigma: bool = True
    route_head: bool = True
    dtype: Dtype = jnp.float32
    remat_policy: str = ""
    attention: str = "xla"

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def plan(self) -> Plan:
        return make_plan(
            self.in_channels,
            self.model_channels,
            self.channel_mult,
            self.num_res_blocks,
            self.attention_resolutions,
            self.resblock_updown,
        )

    def routed_widths(self) -> list[int]:
        """The width of every routed site in forward order (what the tables must cover)."""
        return self.plan.routed_widths(self.route_head)

    def heads(self, channels: int) -> int:
        if self.num_head_channels == -1:
            return self.num_heads
        return channels // self.num_head_channels

    def dummy_inputs(self, batch_size: int = 1):
        """(x, t, y) zeros of the input shapes, for init and shape inference."""
        x = jnp.zeros((batch_size, self.input_size, self.input_size, self.in_channels), jnp.float32)
        t = jnp.zeros((batch_size,), jnp.int32)
        return x, t, t

    @nn.compact
    def __call__(self, x, t, y, routing=None, train: bool = False, task=None):
        """Args: x (B, H, W, C); t (B,) the timesteps the embedding sees; y (B,) int labels
        (ignored with one class); routing: None or {width: (G, T, width) 0/1 table};
        task (B,) int: the table rows (default t)."""
        task = t if task is None else task
        masks = None if routing is None else self._gather_masks(routing, task)
        emb = self._embedding(t, y, train)
        plan, taken = self.plan, {}

        def mask_for(width):
            if masks is None:
                return None
            k = taken[width] = taken.get(width, -1) + 1
            return masks[width][k % masks[width].shape[0]]

        h, skips = x.astype(self.dtype), []
        for name, layers in plan.blocks():
            if name.startswith("output"):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            for j, layer in enumerate(layers):
                h = self._layer(layer, f"{name}_{j}", h, emb, mask_for, train)
            h = nn.with_logical_constraint(h, ("batch", None, None, "act_embed"))
            if name.startswith("input"):
                skips.append(h)
        head_mask = mask_for(plan.head_channels) if self.route_head else None
        h = nn.silu(_masked(GroupNorm32(name="out_0")(h), head_mask))
        h = conv(self.out_channels, 3, "out_2", self.dtype, plan.head_channels, zero=True)(h)
        return h.astype(jnp.float32)

    def _embedding(self, t, y, train: bool):
        """time_embed(timestep_embedding(t)) + label_emb(y) (with label dropout in training)."""
        mc, width = self.model_channels, 4 * self.model_channels
        emb = timestep_embedding(t, mc).astype(self.dtype)
        emb = dense(width, ("freq", "embed"), "time_embed_0", self.dtype, mc)(emb)
        emb = dense(width, ("cond", "embed"), "time_embed_2", self.dtype, width)(nn.silu(emb))
        if self.num_classes == 1:
            return emb
        if train and self.class_dropout_prob > 0:
            drop = jax.random.uniform(self.make_rng("dropout"), y.shape) < self.class_dropout_prob
            y = jnp.where(drop, self.num_classes, y)
        rows = self.num_classes + int(self.null_label)
        table = nn.Embed(
            rows,
            width,
            dtype=self.dtype,
            embedding_init=_init(
                nn.initializers.normal(1.0), "classes", "embed"
            ),  # torch's N(0, 1)
            name="label_emb",
        )
        return emb + table(y)

    def _layer(self, layer: Layer, name: str, h, emb, mask_for, train: bool):
        if layer.kind == "conv":
            return conv(layer.out_channels, 3, name, self.dtype, layer.channels, in_axis=None)(h)
        if layer.kind in ("down", "up"):
            return _Resample(layer.kind, layer.out_channels, self.dtype, name=name)(h)
        remat = self._remat
        if layer.kind == "res":
            block = remat(ResBlock)(
                layer.channels,
                layer.out_channels,
                4 * self.model_channels,
                self.dropout,
                self.use_scale_shift_norm,
                layer.updown,
                self.dtype,
                deterministic=not train,
                name=name,
            )
            return block(h, emb, mask_for(layer.out_channels))
        heads = self.heads(layer.channels)
        block = remat(AttentionBlock)(
            layer.channels,
            heads,
            self.use_new_attention_order,
            self.dtype,
            self.attention,
            name=name,
        )
        return block(h, mask_for(layer.channels))

    def _remat(self, cls):
        if not self.remat_policy:
            return cls
        return nn.remat(cls, policy=getattr(jax.checkpoint_policies, self.remat_policy))

    def _gather_masks(self, routing, task) -> dict:
        """{width: (G, T, width) table} -> {width: (G, B, width) masks} in the compute dtype."""
        widths = self.routed_widths()
        counts = {w: widths.count(w) for w in widths}
        found = {int(k): tuple(v.shape) for k, v in dict(routing).items()}
        ok = set(found) == set(counts) and all(
            len(s) == 3 and s[0] in (1, counts[w]) and s[2] == w for w, s in found.items()
        )
        if not ok:
            expected = {w: f"(1 or {n}, T, {w})" for w, n in sorted(counts.items())}
            raise ValueError(f"routing tables have shapes {found}: expected {expected}")
        return {int(w): jnp.asarray(v)[:, task].astype(self.dtype) for w, v in routing.items()}

    def guided(self, x, t, y, routing=None, *, cfg_scale, task=None):
        """Classifier-free guidance in one batch of conditional + null-label halves, as
        `DiT.guided`: eps = eps_u + s * (eps_c - eps_u); variance channels from the
        conditional half. Needs the null label (a model trained with label dropout)."""
        if not self.null_label:
            raise ValueError(
                "classifier-free guidance needs a null label: this U-Net has none "
                "(trained without label dropout, as guided-diffusion's models)"
            )
        null = jnp.full_like(y, self.num_classes)
        task = t if task is None else task
        out = self(
            jnp.concatenate([x, x]),
            jnp.concatenate([t, t]),
            jnp.concatenate([y, null]),
            routing,
            task=jnp.concatenate([task, task]),
        )
        cond, uncond = jnp.split(out, 2, axis=0)
        c = self.in_channels
        eps = uncond[..., :c] + cfg_scale * (cond[..., :c] - uncond[..., :c])
        return jnp.concatenate([eps, cond[..., c:]], axis=-1)


class _Resample(nn.Module):
    """guided-diffusion's Downsample (conv stride 2, `op`) / Upsample (nearest x2, `conv`)."""

    direction: str
    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.direction == "down":
            return conv(self.channels, 3, "op", self.dtype, self.channels, strides=2)(x)
        return conv(self.channels, 3, "conv", self.dtype, self.channels)(_upsample(x))
