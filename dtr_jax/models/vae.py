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
attention softmax stay float32).

Weights (`load_vae`): a local diffusers folder (config.json +
diffusion_pytorch_model.safetensors, or .bin where torch is installed), or a single
.safetensors / .bin state dict read with the SD VAE's architecture. fp16 / bf16 weights
are cast to float32; old attention names (query, key, value, proj_attn) and 1x1-conv
attention weights are accepted. Nothing here downloads anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dtr_jax import torch_files
from dtr_jax.errors import ConfigError, integer_problems, raise_problems

Dtype = Any
CONFIG_FILE = "config.json"
# Weight files of a diffusers folder, in order of preference (.bin needs torch).
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
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
    sizes = (
        "in_channels",
        "out_channels",
        "latent_channels",
        "layers_per_block",
        "norm_num_groups",
    )
    for name in sizes:
        out += integer_problems(name, v[name])
    channels = v["block_out_channels"]
    if not (isinstance(channels, (list, tuple)) and channels):
        return out + [f"block_out_channels={channels!r} must be a non-empty list of integers"]
    for c in channels:
        out += integer_problems("block_out_channels", c)
    groups = v["norm_num_groups"]
    if not out and any(c % groups for c in channels):
        out.append(
            f"block_out_channels={list(channels)} are not all divisible by norm_num_groups={groups}"
        )
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


def encode_views(vae: AutoencoderKL, params, images) -> jax.Array:
    """What `--mode extract` stores per image: float32 (N, 2, 2, h, w, c), the [mean, std]
    (`encode`) of each image and of its mirror image (flipped left-right)."""
    views = (images, images[:, :, ::-1])
    return jnp.stack([jnp.stack(encode(vae, params, v), axis=1) for v in views], axis=1)


def decode(vae: AutoencoderKL, params, latents) -> jax.Array:
    """Model-space latents (N, h, w, latent_channels) -> float32 images (N, h * down_factor,
    w * down_factor, out_channels), about [-1, 1] (not clipped)."""
    c = vae.config
    z = latents / c.scaling_factor + c.shift_factor
    return vae.apply({"params": params}, z, method=AutoencoderKL.decode_latents)


# --- weights -------------------------------------------------------------------------------


def load_vae(path: str, config: VAEConfig | None = None, dtype: Dtype = jnp.float32):
    """(AutoencoderKL, float32 params as numpy) from local diffusers weights; nothing is
    downloaded.

    `path` is a diffusers folder (config.json and diffusion_pytorch_model.safetensors, or
    .bin, which needs torch) or one .safetensors / .bin file of a diffusers state dict,
    read with the SD VAE's architecture (`VAEConfig()`). A given `config` replaces
    either. Raises ConfigError naming the file, and the first tensor at fault, when a
    file is missing, unreadable or truncated, or a tensor is missing, unexpected or
    mis-shaped.
    """
    path = os.fspath(path)
    raise_problems([f"{path!r}: {p}" for p in _path_problems(path)])
    if os.path.isdir(path):
        config = config or read_config(os.path.join(path, CONFIG_FILE))
        path = _weights_in(path)
    vae = AutoencoderKL(config or VAEConfig(), dtype)
    source = repr(path)
    return vae, convert_state_dict(read_state_dict(path), abstract_params(vae), source=source)


def problems(path: str, batch_size) -> list[str]:
    """Problems with a `vae` config section (`path`, `batch_size`), each naming its field.

    Checks that the files exist; their contents are checked when they are loaded.
    """
    out = integer_problems("batch_size", batch_size)
    if not path:
        return out + [
            "path='' names no VAE: set it to a local diffusers AutoencoderKL folder (config.json "
            "+ diffusion_pytorch_model.safetensors), e.g. your download of stabilityai/"
            "sd-vae-ft-ema or sd-vae-ft-mse, or to its .safetensors file"
        ]
    return out + [f"path={path!r}: {p}" for p in _path_problems(path)]


def _path_problems(path: str) -> list[str]:
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
            return [
                f"the folder has no {CONFIG_FILE} (a diffusers AutoencoderKL folder has one; "
                "for a Stable Diffusion pipeline folder, name its vae/ subfolder)"
            ]
        if _weights_in(path) is None:
            return [f"the folder has none of {list(WEIGHT_FILES)}"]
        return []
    if not os.path.isfile(path):
        return ["no such file or folder"]
    if not path.endswith((".safetensors", ".bin")):
        return ["must be a diffusers folder, or a .safetensors or .bin file"]
    return []


def _weights_in(folder: str) -> str | None:
    """The first of WEIGHT_FILES in `folder` (None if none is)."""
    paths = (os.path.join(folder, name) for name in WEIGHT_FILES)
    return next((p for p in paths if os.path.isfile(p)), None)


def read_config(path: str) -> VAEConfig:
    """The VAEConfig of a diffusers config.json."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError([f"{path!r} is not a readable JSON file ({e})"]) from None
    if not isinstance(d, dict):
        raise ConfigError([f"{path!r} does not hold a JSON object"])
    return VAEConfig.from_diffusers(d, source=repr(path))


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """name -> float32 array of a .safetensors file, or of a PyTorch .bin (needs torch)."""
    if path.endswith(".bin"):
        return _read_bin(path)
    try:
        return {k: np.asarray(v, np.float32) for k, v in torch_files.read_safetensors(path).items()}
    except (OSError, ValueError) as e:
        raise ConfigError([f"{path!r} {e}"]) from None


def _read_bin(path: str) -> dict[str, np.ndarray]:
    try:
        state = torch_files.read_torch(path)
        return {k: v.detach().float().numpy() for k, v in state.items()}
    except (ValueError, AttributeError) as e:  # not readable, or not a state dict
        raise ConfigError([f"{path!r} is not a readable PyTorch state dict: {e}"]) from None


# Old diffusers attention names (still in some SD VAE files) -> the current ones.
_OLD_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def torch_name(path: tuple[str, ...]) -> str:
    """The diffusers state-dict key of a Flax param path: ('encoder', 'down_blocks_0',
    'resnets_1', 'conv1', 'kernel') -> 'encoder.down_blocks.0.resnets.1.conv1.weight'."""
    *modules, leaf = path
    parts = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join(parts + ["bias" if leaf == "bias" else "weight"])


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel" and len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel":  # (in, out) -> (out, in)
        return shape[::-1]
    return shape


def _to_flax(leaf: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """A torch weight as the Flax leaf of `shape` (None if its shape does not fit);
    1x1-conv attention weights are taken as Linear ones."""
    if leaf == "kernel" and len(shape) == 2 and w.ndim == 4 and w.shape[2:] == (1, 1):
        w = w[:, :, 0, 0]
    if tuple(w.shape) != _torch_shape(leaf, shape):
        return None
    if leaf == "kernel":
        return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
    return w


def convert_state_dict(state_dict: Mapping, abstract: Mapping, source: str = "state dict") -> dict:
    """A diffusers AutoencoderKL state dict (name -> array) -> the params tree `abstract`
    describes (`abstract_params(vae)`), float32. Old attention names (query, key, value,
    proj_attn) and 1x1-conv attention weights are accepted. Raises ConfigError naming
    `source` and the first missing, mis-shaped and unexpected tensor."""
    sd = dict(state_dict)
    for key in list(sd):
        m = _OLD_ATTENTION.match(key)
        new = m and f"{m[1]}.{_NEW_NAMES[m[2]]}.{m[3]}"
        if new and new not in sd:
            sd[new] = sd.pop(key)
    params, missing, wrong = {}, [], []
    for path, spec in traverse_util.flatten_dict(abstract).items():
        key, expected = torch_name(path), _torch_shape(path[-1], spec.shape)
        if key not in sd:
            missing.append(f"{key!r} (expected shape {expected})")
            continue
        w = np.asarray(sd.pop(key), np.float32)
        params[path] = _to_flax(path[-1], w, spec.shape)
        if params[path] is None:
            wrong.append(f"{key!r} has shape {tuple(w.shape)}, expected {expected}")
    found = _first(f"{source}: missing tensor", missing)
    found += _first(f"{source}: tensor", wrong)
    found += _first(f"{source}: unexpected tensor", [repr(k) for k in sd])
    raise_problems(found)
    return traverse_util.unflatten_dict(params)


def _first(what: str, items: list[str]) -> list[str]:
    """[] or one problem about the first of `items` (and how many more there are)."""
    if not items:
        return []
    more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
    return [f"{what} {items[0]}{more}"]
