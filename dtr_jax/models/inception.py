"""FID InceptionV3 (pytorch-fid's port of the TF "2015-12-05" graph) in Flax linen, NHWC.

Architecture = torchvision ``Inception3`` blocks with pytorch-fid's patches
(``FIDInceptionA/C/E_1/E_2``: average pools with ``count_include_pad=False``, a max
pool in the last block's pool branch) and a 1008-way ``fc``; no aux classifier.
Module names mirror the PyTorch ones, so the weight conversion is one-to-one.

Inference only. Variables are the usual linen dict
``{"params": ..., "batch_stats": ...}``: BatchNorm always uses the stored running
statistics (``batch_stats``), there is no training mode.

Weights: the pytorch-fid file ``pt_inception-2015-12-05-6726825d.pth``, released at
https://github.com/mseitzer/pytorch-fid/releases (tag ``fid_weights``). Download it
yourself: nothing here touches the network. Load it with
:func:`load_pytorch_fid_weights` (needs torch), or convert it once to ``.npz`` with
``python -m dtr_jax.models.inception SRC.pth DST.npz`` and load the ``.npz``
without torch.

Outputs (see :func:`make_feature_fn`): ``pool`` (B, 2048), the FID / precision-recall
features, and ``logits`` (B, 1008) = ``fc(pool)`` *with* its bias. Note: ADM's
TF evaluator computes the Inception Score from ``softmax(pool @ W)``, i.e. the fc
matmul *without* the bias; pass ``fc_bias=False`` to reproduce that.
"""

from __future__ import annotations

import functools
import os
import sys
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dtr_jax import torch_files

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILE
)
INPUT_SIZE = 299
NUM_CLASSES = 1008
FEATURE_DIM = 2048

Pad = tuple[tuple[int, int], tuple[int, int]]
Variables = dict[str, Any]


# ----------------------------------------------------------------------------- input


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of torch's 1-D bilinear interpolation, ``align_corners=False``.

    Mirrors torch's float32 index arithmetic (``src = scale * (i + 0.5) - 0.5`` with
    a fused multiply-add, clamped at 0), so results agree with torch to ~1 ulp.
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    dst = np.arange(out_size, dtype=f32) + f32(0.5)
    src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(f32)  # fma
    src = np.maximum(src, f32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam1 = np.clip(src - i0.astype(f32), f32(0), f32(1))
    m = np.zeros((out_size, in_size), f32)
    np.add.at(m, (np.arange(out_size), i0), f32(1) - lam1)
    np.add.at(m, (np.arange(out_size), i1), lam1)
    return m


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """NHWC bilinear resize matching ``F.interpolate(mode='bilinear', align_corners=False)``.

    No antialiasing, for up- and downsampling alike (unlike ``jax.image.resize``).
    Separable: two matmuls with fixed (out, in) weight matrices, width first as torch.
    """
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    mh, mw = _bilinear_matrix(h, size[0]), _bilinear_matrix(w, size[1])
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("pw,bhwc->bhpc", mw, x, precision=hi)
    return jnp.einsum("oh,bhpc->bopc", mh, x, precision=hi)


def preprocess(images: jax.Array, resize: bool = True, normalize: bool = True) -> jax.Array:
    """pytorch-fid input transform: uint8 -> [0, 1], resize to 299x299, then [0, 1] -> [-1, 1].

    Float images are taken to be in [0, 1] already.
    """
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    if resize:
        x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    if normalize:
        x = 2.0 * x - 1.0
    return x


# ----------------------------------------------------------------------------- blocks


def _pad(p: int | tuple[int, int]) -> Pad:
    ph, pw = (p, p) if isinstance(p, int) else p
    return ((ph, ph), (pw, pw))


def _avg_pool_same(x: jax.Array) -> jax.Array:
    """3x3 / stride 1 / pad 1 average pool not counting the padding (TF style)."""
    return nn.avg_pool(x, (3, 3), (1, 1), _pad(1), count_include_pad=False)


def _max_pool_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm(eps=1e-3, running stats) + ReLU."""

    features: int
    kernel: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = (self.kernel, self.kernel) if isinstance(self.kernel, int) else self.kernel
        x = nn.Conv(
            self.features,
            k,
            (self.stride, self.stride),
            _pad(self.padding),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


class _Block(nn.Module):
    """Base for the Inception blocks: ``self.conv(name, ...)`` builds a named BasicConv2d."""

    precision: Any = None

    def conv(
        self,
        name: str,
        features: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> BasicConv2d:
        return BasicConv2d(features, kernel, stride, padding, precision=self.precision, name=name)


class FIDInceptionA(_Block):
    pool_features: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv("branch1x1", 64, 1)(x)
        b5 = self.conv("branch5x5_1", 48, 1)(x)
        b5 = self.conv("branch5x5_2", 64, 5, padding=2)(b5)
        b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
        b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
        bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv("branch3x3", 384, 3, stride=2)(x)
        bd = self.conv("branch3x3dbl_1", 64, 1)(x)
        bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
        bd = self.conv("branch3x3dbl_3", 96, 3, stride=2)(bd)
        return jnp.concatenate([b3, bd, _max_pool_s2(x)], axis=-1)


class FIDInceptionC(_Block):
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = self.conv("branch1x1", 192, 1)(x)
        b7 = self.conv("branch7x7_1", c7, 1)(x)
        b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
        bd = self.conv("branch7x7dbl_1", c7, 1)(x)
        bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
        bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
        bp = self.conv("branch_pool", 192, 1)(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv("branch3x3_1", 192, 1)(x)
        b3 = self.conv("branch3x3_2", 320, 3, stride=2)(b3)
        b7 = self.conv("branch7x7x3_1", 192, 1)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, 3, stride=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_s2(x)], axis=-1)


class FIDInceptionE(_Block):
    """``FIDInceptionE_1`` (``max_pool=False``: avg pool without padding) or ``_2`` (max pool)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv("branch1x1", 320, 1)(x)
        b3 = self.conv("branch3x3_1", 384, 1)(x)
        b3 = jnp.concatenate(
            [
                self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3),
            ],
            -1,
        )
        bd = self.conv("branch3x3dbl_1", 448, 1)(x)
        bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
        bd = jnp.concatenate(
            [
                self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd),
            ],
            -1,
        )
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), (1, 1), _pad(1))
        else:
            pooled = _avg_pool_same(x)
        bp = self.conv("branch_pool", 192, 1)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


# ----------------------------------------------------------------------------- network


class InceptionV3(nn.Module):
    """pytorch-fid's FID InceptionV3. Input NHWC, uint8 or float in [0, 1].

    Returns ``{"pool": (B, 2048), "logits": (B, 1008)}``. With ``resize_input`` /
    ``normalize_input`` off, the input must already be 299x299 in [-1, 1] (see
    :func:`preprocess`). ``precision`` is used by every conv and the fc; the default
    HIGHEST keeps fp32 accuracy on GPU/TPU (whose default is TF32/bf16 passes).
    ``fc_bias=False`` drops the fc bias as ADM's evaluator does for the IS softmax.
    """

    resize_input: bool = True
    normalize_input: bool = True
    fc_bias: bool = True
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        x = preprocess(x, self.resize_input, self.normalize_input)
        p = self.precision
        x = BasicConv2d(32, 3, stride=2, precision=p, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, precision=p, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, precision=p, name="Conv2d_2b_3x3")(x)
        x = _max_pool_s2(x)
        x = BasicConv2d(80, 1, precision=p, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, precision=p, name="Conv2d_4a_3x3")(x)
        x = _max_pool_s2(x)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = FIDInceptionA(precision=p, pool_features=pool_features, name=name)(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        for name, c7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x = FIDInceptionC(precision=p, channels_7x7=c7, name=name)(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = FIDInceptionE(precision=p, max_pool=False, name="Mixed_7b")(x)
        x = FIDInceptionE(precision=p, max_pool=True, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        fc = nn.Dense(NUM_CLASSES, precision=p, name="fc")
        logits = fc(pool)
        if not self.fc_bias:  # ADM's IS: softmax(pool @ W), no bias
            logits = jnp.dot(pool, fc.variables["params"]["kernel"], precision=p)
        return {"pool": pool, "logits": logits}


def init_variables(seed: int = 0) -> Variables:
    """Randomly initialised variables (for shapes / tests; not meaningful features)."""
    x = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return InceptionV3().init(jax.random.PRNGKey(seed), x)


@functools.partial(jax.jit, static_argnames=("fc_bias", "precision"))
def _apply(variables: Variables, x: jax.Array, fc_bias: bool, precision: Any):
    net = InceptionV3(
        resize_input=False, normalize_input=False, fc_bias=fc_bias, precision=precision
    )
    return net.apply(variables, x)


# Its own jit: the network compiles once per batch shape, not once per input resolution.
_preprocess = jax.jit(preprocess)


def make_feature_fn(
    variables: Variables, fc_bias: bool = True, precision: Any = jax.lax.Precision.HIGHEST
) -> Callable[[Any], dict[str, jax.Array]]:
    """Jitted ``fn(images) -> {"pool": (B, 2048), "logits": (B, 1008)}``.

    ``images``: NHWC, uint8 (0..255) or float in [0, 1], any spatial size; host arrays,
    or device arrays split over a mesh (the batch dimension stays split, with
    ``variables`` replicated there). ``variables`` are jit arguments, not constants: every
    fn made here shares the compilations of the same batch shape and placement.
    """

    def fn(images: Any) -> dict[str, jax.Array]:
        return _apply(variables, _preprocess(jnp.asarray(images)), fc_bias, precision)

    return fn


# ----------------------------------------------------------------------------- weights


# (torch module, torch leaf) -> (Flax collection, Flax leaf).
_TORCH_TO_FLAX = {
    ("conv", "weight"): ("params", "kernel"),
    ("bn", "weight"): ("params", "scale"),
    ("bn", "bias"): ("params", "bias"),
    ("bn", "running_mean"): ("batch_stats", "mean"),
    ("bn", "running_var"): ("batch_stats", "var"),
    ("fc", "weight"): ("params", "kernel"),
    ("fc", "bias"): ("params", "bias"),
}
# (Flax collection, Flax leaf) -> torch leaf (the module name is the same on both sides).
_FLAX_TO_TORCH_LEAF = {flax_leaf: torch[1] for torch, flax_leaf in _TORCH_TO_FLAX.items()}


def _flax_path(torch_key: str) -> tuple[str, tuple[str, ...]]:
    """Map a pytorch-fid key to ``(collection, path)`` in the Flax variables."""
    *mods, leaf = torch_key.split(".")
    last = mods[-1] if mods else ""
    if (last, leaf) not in _TORCH_TO_FLAX:
        raise KeyError(torch_key)
    col, name = _TORCH_TO_FLAX[(last, leaf)]
    return col, (*mods, name)


def _to_flax(torch_key: str, value: np.ndarray) -> np.ndarray:
    if torch_key.endswith("conv.weight"):
        return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    if torch_key == "fc.weight":
        return value.T
    return value


def _from_flax_shape(torch_key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if torch_key.endswith("conv.weight"):
        h, w, i, o = shape
        return (o, i, h, w)
    if torch_key == "fc.weight":
        return tuple(reversed(shape))
    return tuple(shape)


def expected_torch_shapes() -> dict[str, tuple[int, ...]]:
    """The pytorch-fid state-dict keys (without ``num_batches_tracked``) and their shapes."""
    shapes = jax.eval_shape(init_variables)
    out = {}
    for col, tree in shapes.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = [k.key for k in path]
            key = ".".join([*names[:-1], _FLAX_TO_TORCH_LEAF[(col, names[-1])]])
            out[key] = _from_flax_shape(key, leaf.shape)
    return out


def _first(keys: Sequence[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _check(state_dict: Mapping[str, Any], source: str) -> None:
    expected = expected_torch_shapes()
    given = {k for k in state_dict if not k.endswith("num_batches_tracked")}
    missing = expected.keys() - given
    unexpected = given - expected.keys()
    wrong = [
        f"{k}: {tuple(np.shape(state_dict[k]))} != {expected[k]}"
        for k in sorted(given & expected.keys())
        if tuple(np.shape(state_dict[k])) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(list(missing))}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(list(unexpected))}")
    if wrong:
        problems.append(f"shape mismatch: {_first(wrong, 3)}")
    if problems:
        raise ValueError(
            f"{source} is not a pytorch-fid FID InceptionV3 state dict "
            f"({FID_WEIGHTS_FILE}): " + "; ".join(problems)
        )


def convert_state_dict(state_dict: Mapping[str, Any], source: str = "state dict") -> Variables:
    """pytorch-fid state dict (name -> array) -> ``{"params", "batch_stats"}`` Flax variables.

    Conv OIHW -> HWIO, fc (out, in) -> (in, out), BN weight/bias -> scale/bias,
    running_mean/var -> batch_stats mean/var; ``num_batches_tracked`` is ignored.
    Raises ``ValueError`` naming the first offending keys on any mismatch.
    """
    _check(state_dict, source)
    variables: Variables = {"params": {}, "batch_stats": {}}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        col, path = _flax_path(key)
        node = variables[col]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(_to_flax(key, np.asarray(value, np.float32)))
    return variables


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a pytorch-fid ``.pth`` (needs torch) or an ``.npz`` with the same keys."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"FID Inception weights not found at {path}: pass the pytorch-fid file "
            f"{FID_WEIGHTS_FILE} (download it from {FID_WEIGHTS_URL}) or an .npz "
            "converted from it with `python -m dtr_jax.models.inception SRC.pth DST.npz`."
        )
    if path.endswith(".npz"):
        if not zipfile.is_zipfile(path):
            raise ValueError("is not an .npz (not a zip archive)")
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"is not an .npz of arrays ({e})") from None
    sd = torch_files.read_torch(path)
    if not isinstance(sd, dict):
        raise ValueError(f"holds a {type(sd).__name__}, not a state dict")
    return {k: v.detach().cpu().numpy() for k, v in sd.items()}


def load_pytorch_fid_weights(path: str | os.PathLike) -> Variables:
    """Load ``pt_inception-2015-12-05-6726825d.pth`` (or its ``.npz``) as Flax variables."""
    return convert_state_dict(read_state_dict(path), source=f"'{os.fspath(path)}'")


def pth_to_npz(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Convert the pytorch-fid ``.pth`` once to an ``.npz`` (same keys) usable without torch."""
    sd = read_state_dict(src)
    _check(sd, f"'{os.fspath(src)}'")
    np.savez(dst, **{k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")})


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m dtr_jax.models.inception SRC.pth DST.npz")
    pth_to_npz(sys.argv[1], sys.argv[2])
