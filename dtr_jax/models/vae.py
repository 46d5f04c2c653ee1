"""The Stable Diffusion VAE (diffusers' `AutoencoderKL`) in Flax linen, NHWC, and its weights.

Architecture = diffusers' `AutoencoderKL` with `DownEncoderBlock2D` / `UpDecoderBlock2D`
blocks: pre-norm ResNet blocks (GroupNorm eps 1e-6, SiLU, a 1x1 `conv_shortcut` where
the channels change), a mid block of ResNet, single-head self-attention, ResNet, a
stride-2 3x3 downsampler after zero padding of (0, 1) at the bottom and right, nearest
2x upsampling followed by a 3x3 conv, `quant_conv` / `post_quant_conv` (1x1), and the
encoder's log-variance clamped to [-30, 20]. The defaults (`VAEConfig()`) are the SD
VAE's (sd-vae-ft-ema / sd-vae-ft-mse): 3 -> 4 channels, 8x down, scaling_factor 0.18215.

Module names map one to one onto the diffusers state-dict keys: a numeric part joins
its parent with '_' and '.' becomes a tree level, so
`encoder.down_blocks.0.resnets.1.conv1.weight` <-> `encoder/down_blocks_0/resnets_1/conv1/kernel`
and `decoder.mid_block.attentions.0.to_out.0.bias` <-> `.../attentions_0/to_out_0/bias`.
Leaves: Conv2d weight OIHW <-> kernel HWIO, Linear weight (out, in) <-> kernel (in, out),
GroupNorm weight <-> scale, bias <-> bias.

Two latent scales. The VAE's own latent z is what its encoder gives and its decoder
takes (the `AutoencoderKL` methods). The *model space* is what the diffusion model
trains on: `(z - shift_factor) * scaling_factor` (for SD: `z * 0.18215`). The pure
functions work in model space:

    vae, params = load_vae("sd-vae-ft-ema")          # a local diffusers folder
    mean, std = encode(vae, params, images)          # images: float NHWC in [-1, 1]
    latents = mean + std * noise                     # a model-space latent sample
    images = decode(vae, params, latents)            # float NHWC, about [-1, 1]

Both are jit-friendly (`jax.jit(functools.partial(encode, vae))`); params are float32,
`AutoencoderKL(dtype=jnp.bfloat16)` computes in bfloat16 (GroupNorm statistics and the
attention softmax stay float32). Nothing here downloads anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dtr_jax.errors import integer_problems, raise_problems

Dtype = Any
EPS = 1e-6  # every GroupNorm of the diffusers VAE
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


# --- architecture ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """An AutoencoderKL's architecture and latent scale; the defaults are the SD VAE's."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0

    @property
    def down_factor(self) -> int:
        """Image side / latent side (8 for the SD VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, d: Mapping, source: str = "config") -> VAEConfig:
        """The config of a diffusers `AutoencoderKL` config.json (a dict). Keys it leaves out
        take diffusers' defaults, as diffusers reads it (old SD VAE files have no
        scaling_factor: 0.18215). Raises ConfigError, naming `source`, for an architecture
        this module does not implement."""
        v = {k: d.get(k, default) for k, default in _DIFFUSERS_DEFAULTS.items()}
        raise_problems([f"{source}: {p}" for p in _architecture_problems(d, v)])
        fields = {f.name: v[f.name] for f in dataclasses.fields(cls)}
        fields["block_out_channels"] = tuple(v["block_out_channels"])
        fields["shift_factor"] = float(v["shift_factor"] or 0.0)
        fields["scaling_factor"] = float(v["scaling_factor"])
        return cls(**fields)


# diffusers' AutoencoderKL.__init__ defaults, for the keys this module reads.
_DIFFUSERS_DEFAULTS = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(64,),
    layers_per_block=1,
    norm_num_groups=32,
    mid_block_add_attention=True,
    use_quant_conv=True,
    use_post_quant_conv=True,
    scaling_factor=0.18215,
    shift_factor=None,
    act_fn="silu",
    down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",),
    latents_mean=None,
    latents_std=None,
)


def _architecture_problems(d: Mapping, v: dict) -> list[str]:
    """What in a diffusers config (`d`, with defaults filled in: `v`) this module cannot build."""
    out = []
    if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        out.append(f"_class_name={d['_class_name']!r} is not an AutoencoderKL")
    names = ("in_channels", "out_channels", "latent_channels", "layers_per_block")
    for name in names + ("norm_num_groups",):
        out += integer_problems(name, v[name])
    channels = v["block_out_channels"]
    if not (isinstance(channels, (list, tuple)) and channels):
        return out + [f"block_out_channels={channels!r} must be a non-empty list of integers"]
    for c in channels:
        out += integer_problems("block_out_channels", c)
    groups = v["norm_num_groups"]
    if not out and any(c % groups for c in channels):
        out.append(f"block_out_channels={list(channels)} are not all divisible by {groups=}")
    n = len(channels)
    for name, block in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        if list(v[name]) != [block] * n:
            out.append(f"{name}={list(v[name])!r} is not supported: expected {n} x {block!r}")
    if v["act_fn"] != "silu":
        out.append(f"act_fn={v['act_fn']!r} is not supported: expected 'silu'")
    for name in ("latents_mean", "latents_std"):
        if v[name] is not None:
            out.append(f"{name} is set: per-channel latent statistics are not supported")
    return out


def _conv(features: int, kernel: int, dtype: Dtype, name: str | None = None, **kw) -> nn.Conv:
    """A conv with torch's symmetric padding of kernel // 2 unless `padding` is given."""
    pad = kernel // 2
    kw.setdefault("padding", ((pad, pad), (pad, pad)))
    return nn.Conv(features, (kernel, kernel), dtype=dtype, name=name, **kw)


def _norm(groups: int, dtype: Dtype, name: str) -> nn.GroupNorm:
    # Two-pass variance, as torch computes it (E[x^2] - E[x]^2 loses digits at large means).
    return nn.GroupNorm(groups, epsilon=EPS, dtype=dtype, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without a time embedding: x + conv(act(norm(conv(act(norm(x))))))."""

    out_channels: int
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(_norm(self.groups, self.dtype, "norm1")(x))
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
        h = nn.silu(_norm(self.groups, self.dtype, "norm2")(h))
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x + h


class Attention(nn.Module):
    """diffusers' VAE attention: GroupNorm, one head over all channels, residual."""

    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = _norm(self.groups, self.dtype, "group_norm")(x).reshape(b, h * w, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(y) for n in ("to_q", "to_k", "to_v"))
        scores = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * c**-0.5
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        y = nn.Dense(c, dtype=self.dtype, name="to_out_0")(jnp.einsum("bqk,bkc->bqc", weights, v))
        return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """diffusers UNetMidBlock2D of the VAE: ResNet, attention (optional), ResNet."""

    groups: int
    attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
        if self.attention:
            x = Attention(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
    """diffusers Downsample2D(padding=0): zero-pad bottom and right by 1, 3x3 conv, stride 2."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = ((0, 1), (0, 1))
        return _conv(self.channels, 3, self.dtype, "conv", strides=(2, 2), padding=pad)(x)


class Upsample(nn.Module):
    """diffusers Upsample2D: nearest-neighbour 2x, then a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, self.dtype, "conv")(x)


class DownBlock(nn.Module):
    """diffusers DownEncoderBlock2D: `num_layers` ResNet blocks, then a downsampler."""

    out_channels: int
    num_layers: int
    groups: int
    downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.downsample:
            x = Downsample(self.out_channels, self.dtype, name="downsamplers_0")(x)
        return x


class UpBlock(nn.Module):
    """diffusers UpDecoderBlock2D: `num_layers` ResNet blocks, then an upsampler."""

    out_channels: int
    num_layers: int
    groups: int
    upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.upsample:
            x = Upsample(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Images -> 2 * latent_channels moments (mean, log-variance), before quant_conv."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, dt = self.config, self.dtype
        chans, groups = c.block_out_channels, c.norm_num_groups
        x = _conv(chans[0], 3, dt, "conv_in")(x)
        for i, out in enumerate(chans):
            last = i == len(chans) - 1
            x = DownBlock(out, c.layers_per_block, groups, not last, dt, name=f"down_blocks_{i}")(x)
        x = MidBlock(groups, c.mid_block_add_attention, dt, name="mid_block")(x)
        x = nn.silu(_norm(groups, dt, "conv_norm_out")(x))
        return _conv(2 * c.latent_channels, 3, dt, "conv_out")(x)


class Decoder(nn.Module):
    """Latents (after post_quant_conv) -> images."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        c, dt = self.config, self.dtype
        chans, groups = c.block_out_channels[::-1], c.norm_num_groups
        x = _conv(chans[0], 3, dt, "conv_in")(z)
        x = MidBlock(groups, c.mid_block_add_attention, dt, name="mid_block")(x)
        for i, out in enumerate(chans):
            last = i == len(chans) - 1
            layers = c.layers_per_block + 1
            x = UpBlock(out, layers, groups, not last, dt, name=f"up_blocks_{i}")(x)
        x = nn.silu(_norm(groups, dt, "conv_norm_out")(x))
        return _conv(c.out_channels, 3, dt, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL in NHWC. Its methods work on the VAE's own latent z;
    the module functions `encode` / `decode` work in model space."""

    config: VAEConfig = VAEConfig()
    dtype: Dtype = jnp.float32  # compute dtype; params are float32

    def setup(self):
        c = self.config
        self.encoder = Encoder(c, self.dtype)
        self.decoder = Decoder(c, self.dtype)
        if c.use_quant_conv:
            self.quant_conv = _conv(2 * c.latent_channels, 1, self.dtype)
        if c.use_post_quant_conv:
            self.post_quant_conv = _conv(c.latent_channels, 1, self.dtype)

    def encode_moments(self, images):
        """Images (float NHWC in [-1, 1]) -> float32 (mean, logvar) of z, logvar clamped."""
        h = self.encoder(images)
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode_latents(self, z):
        """z (NHWC) -> float32 images, about [-1, 1] (not clipped, as in diffusers)."""
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images):
        """The reconstruction from the posterior mean (touches every parameter: init)."""
        return self.decode_latents(self.encode_moments(images)[0])


def abstract_params(vae: AutoencoderKL) -> dict:
    """The params tree of `vae` as jax.ShapeDtypeStructs (nothing is allocated)."""
    side = vae.config.down_factor
    x = jax.ShapeDtypeStruct((1, side, side, vae.config.in_channels), jnp.float32)
    return jax.eval_shape(vae.init, jax.random.key(0), x)["params"]


def encode(vae: AutoencoderKL, params, images) -> tuple[jax.Array, jax.Array]:
    """(mean, std) of the latent posterior of `images` (float NHWC in [-1, 1]), in model
    space: `mean + std * noise` (noise ~ N(0, 1)) is a latent the diffusion model trains on.
    Both float32, (N, H / down_factor, W / down_factor, latent_channels)."""
    c = vae.config
    mean, logvar = vae.apply({"params": params}, images, method=AutoencoderKL.encode_moments)
    return (mean - c.shift_factor) * c.scaling_factor, jnp.exp(0.5 * logvar) * c.scaling_factor


def decode(vae: AutoencoderKL, params, latents) -> jax.Array:
    """Model-space latents (N, h, w, latent_channels) -> float32 images (N, h * down_factor,
    w * down_factor, out_channels), about [-1, 1] (not clipped)."""
    c = vae.config
    z = latents / c.scaling_factor + c.shift_factor
    return vae.apply({"params": params}, z, method=AutoencoderKL.decode_latents)
