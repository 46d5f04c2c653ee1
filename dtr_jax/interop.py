"""PyTorch interop: the official DiT / DTR / guided-diffusion weights <-> our Flax params.

The official layout is the DiT release's state dict (facebookresearch/DiT); the DTR
release adds one routing buffer per block. Names map one to one (`dtr_jax.models.dit`
mirrors them):

  PyTorch key (layout)                       Flax param (layout)
  x_embedder.proj.weight   (O, I, p, p)      x_embedder/proj/kernel    (p, p, I, O)
  t_embedder.mlp.0.weight  (out, in)         t_embedder/mlp_0/kernel   (in, out)
  blocks.3.attn.qkv.bias                     blocks_3/attn/qkv/bias
  y_embedder.embedding_table.weight          y_embedder/embedding_table/embedding
  pos_embed                (1, N, D)         - (the fixed sin-cos table: checked, not imported)
  blocks.N.routing._unit_mapping (T, C)      - (row N of the (depth, T, C) routing tables)

An unconditional model (num_classes=1) has one class row in the DTR release (no null
label) and two in the DiT release (its null row exists whenever label dropout is on, as
it is by default); ours keeps the null row. Import takes either (a missing null row is
filled with zeros); export writes the DTR release's one row when it writes routing
buffers, and the DiT release's two when it does not (routing 'none').

A U-Net's official layout is guided-diffusion's `UNetModel` state dict (its released
`64x64_diffusion.pt`, `256x256_diffusion_uncond.pt`, ...); see "guided-diffusion's U-Net
layout" below. A state dict is read in that layout when it holds `input_blocks.0.0.weight`.

Files: `.pt` / `.pth` (torch.save; reading them needs torch, imported only there) and
`.safetensors` (read from its header into numpy memmaps: no torch, bf16 included).
A file holds either one state dict (the DiT release's `DiT-XL-2-256x256.pt`: its
weights serve as params and EMA) or a training checkpoint, a dict with `model`, `ema`,
`opt` (torch AdamW), `config` and, for UW runs, `uw` (`loss_scale`, the K
log-variances), as the DTR and DiT releases' train.py save it. fp16/bf16 tensors are
read as float32; `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes are dropped.

Reading `.pt` never runs code from the file: `torch.load(weights_only=True)` rebuilds
the tensors, and every other class the pickle names (the DTR release's OmegaConf
config, the DiT release's argparse args) is replaced by an inert stand-in that only
keeps the pickled data; torch still refuses modules such as `os` outright.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import io
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from dtr_jax import files, routing
from dtr_jax.models.dit import DiT, sincos_pos_embed
from dtr_jax.models.unet import UNet
from dtr_jax.torch_files import Inert, read_safetensors, read_torch

SUFFIXES = (".pt", ".pth", ".safetensors")
POS_EMBED = "pos_embed"
ROUTING_BUFFER = re.compile(r"^blocks\.(\d+)\.routing\._unit_mapping$")  # see routing_buffer
EXPORT_TABLES_KEY = "routing.tables"  # the (G, T, C) tables of a dtr_jax export's safetensors
_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_EMBEDDING = "y_embedder.embedding_table.weight"


# --- names and layouts ----------------------------------------------------------------


def _flax_name(key: str, ndim: int) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """(Flax path, axes that turn the PyTorch array into the Flax one, None: as is) of a
    parameter key: 'blocks.3.attn.qkv.weight' -> (blocks_3, attn, qkv, kernel), (1, 0)."""
    *parents, leaf = key.split(".")
    path = _module_path(parents)
    if leaf != "weight":
        return (*path, leaf), None
    if path and path[-1] == "embedding_table":
        return (*path, "embedding"), None
    return (*path, "kernel"), ((2, 3, 1, 0) if ndim == 4 else (1, 0))  # OIHW -> HWIO


def _module_path(parts: list[str]) -> list[str]:
    """Flax module names of the parts of a PyTorch module path: each number joins the name
    before it ('input_blocks', '4', '0' -> 'input_blocks_4_0')."""
    path: list[str] = []
    for part in parts:
        if part.isdigit() and path:
            path[-1] += f"_{part}"
        else:
            path.append(part)
    return path


def _torch_name(path: tuple[str, ...], ndim: int) -> tuple[str, tuple[int, ...] | None]:
    """The inverse of `_flax_name`: (PyTorch key, axes that turn the Flax array into it)."""
    *parents, leaf = path
    parts = [re.sub(r"_(\d+)$", r".\1", p) for p in parents]
    if leaf == "embedding":
        return ".".join([*parts, "weight"]), None
    if leaf == "kernel":
        return ".".join([*parts, "weight"]), ((3, 2, 0, 1) if ndim == 4 else (1, 0))
    return ".".join([*parts, leaf]), None


def routing_buffer(block: int) -> str:
    """The DTR release's key of block `block`'s (T, C) routing table."""
    return f"blocks.{block}.routing._unit_mapping"


def _transpose(x, axes):
    return x if axes is None else np.transpose(x, axes)


def _axes_shape(shape, axes) -> tuple[int, ...]:
    return tuple(shape) if axes is None else tuple(shape[a] for a in axes)


def params_from_torch(state_dict: Mapping[str, Any]) -> dict:
    """Flax params (float32 numpy) of an official-layout state dict (torch tensors or
    arrays): a DiT's, or guided-diffusion's U-Net's (`is_unet_state_dict`). `pos_embed`
    and the routing buffers are not parameters and are skipped; a single class row (an
    unconditional release DiT) gets a zero null row."""
    if is_unet_state_dict(state_dict):
        return _unet_params_from_torch(state_dict)
    flat = {}
    for key, value in state_dict.items():
        if key == POS_EMBED or ROUTING_BUFFER.match(key):
            continue
        w = to_numpy(value)
        path, axes = _flax_name(key, w.ndim)
        if key == _EMBEDDING and w.shape[0] == 1:
            w = np.concatenate([w, np.zeros_like(w)])
        flat[path] = np.ascontiguousarray(_transpose(w, axes))
    return traverse_util.unflatten_dict(flat)


def params_to_torch(params, model: DiT | UNet, tables=None) -> dict[str, np.ndarray]:
    """The official-layout state dict (float32 numpy) of Flax `params` of `model`: Linear
    weights transposed, conv kernels OIHW, `pos_embed`, and with (G, T, C) `tables` the
    DTR release's buffer `blocks.N.routing._unit_mapping` (float 0/1) in every block.
    A U-Net's is guided-diffusion's state dict, which has no place for routing tables
    (`tables` are not written: a U-Net export keeps them in its model.safetensors)."""
    if isinstance(model, UNet):
        return _unet_params_to_torch(params)
    if "blocks" in params:
        raise ValueError(
            "params hold the stacked blocks of model.scan_blocks: convert them with "
            "dtr_jax.models.dit.unstack_blocks first (the PyTorch layout is per block)"
        )
    grid = model.input_size // model.patch_size
    out = {POS_EMBED: sincos_pos_embed(model.hidden_size, grid).astype(np.float32)[None]}
    for path, w in traverse_util.flatten_dict(nn.unbox(jax.device_get(params))).items():
        w = np.asarray(w, np.float32)
        key, axes = _torch_name(path, w.ndim)
        if key == _EMBEDDING and model.num_classes == 1 and tables is not None:
            w = w[:1]  # the DTR release builds no null row for one class
        out[key] = np.ascontiguousarray(_transpose(w, axes))
    if tables is not None:
        tables = np.asarray(tables)
        for i in range(model.depth):
            out[routing_buffer(i)] = tables[i % len(tables)].astype(np.float32)
    return out


def torch_shapes(model: DiT | UNet, num_timesteps: int | None = None) -> dict[str, tuple[int, ...]]:
    """{PyTorch key: shape} of `model`'s official state dict, from shapes alone; with
    `num_timesteps`, the routing buffers (T, C) of every DiT block too."""
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *model.dummy_inputs()))
    if isinstance(model, UNet):
        return _unet_torch_shapes(abstract["params"])
    grid = model.input_size // model.patch_size
    shapes = {POS_EMBED: (1, grid * grid, model.hidden_size)}
    for path, leaf in traverse_util.flatten_dict(nn.unbox(abstract["params"])).items():
        key, axes = _torch_name(path, len(leaf.shape))
        shapes[key] = _axes_shape(leaf.shape, axes)
    if model.num_classes == 1:
        shapes[_EMBEDDING] = (1, model.hidden_size)
    if num_timesteps is not None:
        for i in range(model.depth):
            shapes[routing_buffer(i)] = (num_timesteps, model.hidden_size)
    return shapes


def first_mismatch(shapes: Mapping[str, tuple], expected: Mapping[str, tuple]) -> str | None:
    """What is wrong with the first key (in sorted order) whose presence or shape differs:
    `'k' is missing`, `'k' is not expected` or `'k' has shape (..), expected (..)`."""
    for key in sorted(set(shapes) | set(expected)):
        if key not in shapes:
            return f"{key!r} is missing"
        if key not in expected:
            return f"{key!r} is not expected"
        if tuple(shapes[key]) != tuple(expected[key]):
            return f"{key!r} has shape {tuple(shapes[key])}, expected {tuple(expected[key])}"
    return None


# --- guided-diffusion's U-Net layout ----------------------------------------------------
#
# `dtr_jax.models.unet` mirrors guided-diffusion's module names; what differs is the leaf:
#
#   PyTorch key (layout)                             Flax param (layout)
#   input_blocks.4.0.out_layers.3.weight (O,I,3,3)   input_blocks_4_0/out_layers_3/kernel (3,3,I,O)
#   input_blocks.4.0.out_layers.0.weight (C,)        input_blocks_4_0/out_layers_0/scale (GroupNorm)
#   middle_block.1.qkv.weight (3C, C, 1)             middle_block_1/qkv/kernel (C, 3C)
#   time_embed.0.weight (out, in)                    time_embed_0/kernel (in, out)
#   label_emb.weight (rows, 4 x model_channels)      label_emb/embedding
#
# (the attention's qkv and proj_out are 1x1 Conv1d layers there, Dense layers here).
# guided-diffusion's files carry no routing tables (its models are unrouted); a U-Net's
# state dict out is loadable by guided-diffusion's UNetModel with strict=True.

UNET_KEY = "input_blocks.0.0.weight"  # the input convolution, which every UNetModel has
UNET_LABELS = "label_emb.weight"
_CONV1D = ("qkv", "proj_out")  # the AttentionBlock's 1x1 Conv1d layers


def is_unet_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict is in guided-diffusion's U-Net layout."""
    return UNET_KEY in state_dict


def _unet_params_from_torch(state_dict: Mapping[str, Any]) -> dict:
    flat = {}
    for key, value in state_dict.items():
        w = to_numpy(value)
        *parents, leaf = key.split(".")
        path = tuple(_module_path(parents))
        if leaf == "bias":
            flat[(*path, "bias")] = w
        elif w.ndim == 1:  # a GroupNorm's weight
            flat[(*path, "scale")] = w
        elif path[-1] == "label_emb":
            flat[(*path, "embedding")] = w
        elif w.ndim == 4:  # OIHW -> HWIO
            flat[(*path, "kernel")] = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
        else:  # Linear (O, I) or 1x1 Conv1d (O, I, 1) -> (I, O)
            flat[(*path, "kernel")] = np.ascontiguousarray(w.reshape(w.shape[:2]).T)
    return traverse_util.unflatten_dict(flat)


def _unet_to_torch(path: tuple[str, ...], w: np.ndarray) -> tuple[str, np.ndarray]:
    """(PyTorch key, array in its layout) of the Flax param at `path`."""
    *parents, leaf = path
    module = ".".join(re.sub(r"_(\d+)", r".\1", p) for p in parents)
    if leaf == "kernel":
        if w.ndim == 4:
            w = np.transpose(w, (3, 2, 0, 1))
        else:
            w = w.T[..., None] if parents[-1] in _CONV1D else w.T
    return f"{module}.{'bias' if leaf == 'bias' else 'weight'}", w


def _unet_params_to_torch(params) -> dict[str, np.ndarray]:
    out = {}
    for path, w in traverse_util.flatten_dict(nn.unbox(jax.device_get(params))).items():
        key, w = _unet_to_torch(path, np.asarray(w, np.float32))
        out[key] = np.ascontiguousarray(w)
    return out


def _unet_torch_shapes(abstract_params) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path, leaf in traverse_util.flatten_dict(nn.unbox(abstract_params)).items():
        key, w = _unet_to_torch(path, np.broadcast_to(np.float32(0), leaf.shape))
        shapes[key] = tuple(w.shape)
    return shapes


def _unet_label_hint(mismatch: str, model: UNet) -> str:
    """Why a U-Net's label rows may differ by one: the null label of label dropout."""
    if not mismatch.startswith(repr(UNET_LABELS)) or model.num_classes == 1:
        return ""
    if model.null_label:
        return (
            " (the config's model has a null label row for classifier-free guidance, "
            "model.class_dropout_prob > 0; guided-diffusion's models have none: set "
            "model.class_dropout_prob=0)"
        )
    return " (a last, null label row: set model.class_dropout_prob > 0, e.g. 0.1)"


# --- reading files --------------------------------------------------------------------


def to_numpy(value, dtype=np.float32) -> np.ndarray:
    """A torch tensor or array (fp16 and bf16 included) as a numpy array of `dtype`."""
    if hasattr(value, "detach"):  # a torch tensor; float() also reads bfloat16
        value = value.detach().cpu()
        value = (value.float() if value.is_floating_point() else value).numpy()
    return np.array(value, dtype=dtype)


def _is_tensor(value) -> bool:
    return isinstance(value, np.ndarray) or hasattr(value, "detach")


def _strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Keys without the prefixes that DDP (`module.`) or torch.compile add to all of them."""
    d = dict(state_dict)
    while True:
        prefix = next((p for p in _PREFIXES if d and all(k.startswith(p) for k in d)), None)
        if prefix is None:
            return d
        d = {k[len(prefix) :]: v for k, v in d.items()}


# --- a checkpoint file ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdamMoments:
    """One torch AdamW parameter group as optax sees it: count (step), mu, nu trees."""

    count: int
    mu: Any
    nu: Any
    settings: dict  # the group's lr, betas, eps, weight_decay


@dataclasses.dataclass(frozen=True, eq=False)
class Checkpoint:
    """An official-layout PyTorch file, opened lazily: tensors are read when converted.

    `state_dicts` maps 'model' and 'ema' to their state dicts (one state dict in the
    file: both are it); `opt` is a torch AdamW state dict, `uw` the UW module's.
    """

    path: str
    kind: str  # 'state dict' or 'training checkpoint'
    state_dicts: dict[str, dict[str, Any]]
    opt: Mapping | None = None
    uw: dict[str, Any] | None = None
    keys: tuple[str, ...] = ()  # a training checkpoint's entries, read or not (config, args)

    READ = ("model", "ema", "opt", "uw")  # the entries of a training checkpoint that are read

    @property
    def ignored(self) -> tuple[str, ...]:
        """The entries of a training checkpoint that are not read (its config or args)."""
        return tuple(k for k in self.keys if k not in self.READ)

    # --- what the file holds

    def params(self, ema: bool = True) -> dict:
        """Flax params (float32 numpy) of the EMA (or raw) weights."""
        return params_from_torch(self.state_dicts["ema" if ema else "model"])

    def tables(self) -> np.ndarray | None:
        """The routing buffers as (depth, T, C) uint8 tables (None: the file has none)."""
        sd = self.state_dicts["ema"]
        found = sorted((int(m[1]), k) for k in sd if (m := ROUTING_BUFFER.match(k)))
        if not found:
            return None
        tables = np.stack([to_numpy(sd[k], np.float32) for _, k in found])
        bad = [k for (_, k), t in zip(found, tables, strict=True) if not np.isin(t, (0, 1)).all()]
        if bad:
            raise ValueError(f"{bad[0]!r} holds values other than 0 and 1")
        return tables.astype(np.uint8)

    def uw_log_vars(self) -> np.ndarray | None:
        """The K UW log-variances (`uw.loss_scale`), None without them."""
        return None if self.uw is None else to_numpy(self.uw["loss_scale"])

    @property
    def step(self) -> int | None:
        """The optimizer's step count (None without an optimizer state)."""
        if self.opt is None or not self.opt["state"]:
            return None
        return int(to_numpy(next(iter(self.opt["state"].values()))["step"]))

    def adam(self) -> tuple[AdamMoments | None, AdamMoments | None]:
        """(the model's AdamW moments, the UW group's) as Flax trees; None where absent."""
        if self.opt is None:
            return None, None
        entries, uw_entry = self._opt_entries()
        groups = self.opt["param_groups"]
        model = self._moments(entries, groups[0], params_from_torch)
        uw = None
        if uw_entry is not None:
            uw = self._moments({"loss_scale": uw_entry}, groups[1], lambda d: d["loss_scale"])
        return model, uw

    @staticmethod
    def _moments(entries: dict, group: Mapping, convert) -> AdamMoments:
        """`entries` (checked by `_opt_entries`: one step count) converted by `convert`."""
        settings = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay") if k in group}
        return AdamMoments(
            count=int(to_numpy(next(iter(entries.values()))["step"])),
            mu=convert({k: to_numpy(e["exp_avg"]) for k, e in entries.items()}),
            nu=convert({k: to_numpy(e["exp_avg_sq"]) for k, e in entries.items()}),
            settings=settings,
        )

    def _opt_entries(self) -> tuple[dict[str, Mapping], Mapping | None]:
        """({param key: torch AdamW state}, the UW param's state or None), checked.

        Parameter ids follow model.parameters(), i.e. the order of the model's state dict
        without its buffers (`pos_embed` is a parameter without gradient, so no state)."""
        opt = self.opt
        if not isinstance(opt, Mapping) or {"state", "param_groups"} - set(opt):
            raise ValueError("'opt' is not a torch optimizer state dict")
        groups, state = opt["param_groups"], opt["state"]
        names = [k for k in self.state_dicts["model"] if not ROUTING_BUFFER.match(k)]
        ids = list(groups[0]["params"]) if groups else []
        if len(ids) != len(names):
            raise ValueError(
                f"'opt' param group 0 has {len(ids)} parameters, the model {len(names)}"
            )
        if any(g.get("amsgrad") for g in groups):
            raise ValueError("'opt' uses amsgrad, which the AdamW here does not")
        entries = {}
        for name, i in zip(names, ids, strict=True):
            if name == POS_EMBED:
                continue
            if i not in state or {"step", "exp_avg", "exp_avg_sq"} - set(state[i]):
                raise ValueError(f"'opt' has no AdamW state for {name!r}")
            shape = tuple(state[i]["exp_avg"].shape)
            if shape != tuple(self.state_dicts["model"][name].shape):
                raise ValueError(f"'opt' moments of {name!r} have shape {shape}")
            entries[name] = state[i]
        steps = {int(to_numpy(e["step"])) for e in entries.values()}
        if len(steps) > 1:
            raise ValueError(f"'opt' parameters are at different steps {sorted(steps)}")
        uw_entry = None
        if self.uw is not None and len(groups) > 1 and len(groups[1]["params"]) == 1:
            uw_entry = state.get(groups[1]["params"][0])
            shape = None if uw_entry is None else tuple(uw_entry["exp_avg"].shape)
            if shape not in (None, tuple(self.uw["loss_scale"].shape)):
                raise ValueError(f"'opt' moments of the UW 'loss_scale' have shape {shape}")
        return entries, uw_entry

    # --- checks

    def problems(self, model: DiT | UNet, num_timesteps: int, optimizer: bool = False) -> list[str]:
        """What keeps this file from being `model`'s weights: the first missing,
        unexpected or mis-shaped key of each state dict, a `pos_embed` that is not the
        fixed one, routing buffers that are not 0/1 tables of T = `num_timesteps` rows;
        with `optimizer`, an `opt` whose AdamW state does not fit the model."""
        found = []
        unet = isinstance(model, UNet)
        for role, sd in self.state_dicts.items():
            if role == "ema" and sd is self.state_dicts["model"]:
                break
            where = "" if self.kind == "state dict" else f"'{role}' "
            mismatch = first_mismatch(_shapes(sd, model), _expected(sd, model, num_timesteps))
            if mismatch:
                hint = _unet_label_hint(mismatch, model) if unet else ""
                found.append(f"does not hold this model: {where}{mismatch}{hint}")
            elif not unet:
                found += [f"{where}{p}" for p in _pos_embed_problems(sd[POS_EMBED], model)]
        if found:
            return found
        try:
            self.tables()
            if optimizer and self.opt is not None:
                self._opt_entries()
        except ValueError as e:
            return [str(e)]
        return []

    def summary(self, alphas=(4.0,)) -> str:
        """What the file holds and its routing, for logs."""
        held = [k for k in self.keys if k in self.READ] or ["weights"]
        ignored = f"; not read: {', '.join(self.ignored)}" if self.ignored else ""
        if is_unet_state_dict(self.state_dicts["ema"]):
            return (
                f"{self.kind} of a guided-diffusion U-Net ({', '.join(held)}{ignored}), "
                "without routing tables (the config's routing applies)"
            )
        routed = describe_tables(classify_tables(self.tables(), alphas))
        return f"{self.kind} ({', '.join(held)}{ignored}), routing buffers: {routed}"


def _shapes(sd: Mapping[str, Any], model: DiT | UNet) -> dict[str, tuple]:
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    if (
        isinstance(model, DiT)
        and model.num_classes == 1
        and shapes.get(_EMBEDDING) == (2, model.hidden_size)
    ):
        shapes[_EMBEDDING] = (1, model.hidden_size)  # a kept null row is fine too
    return shapes


def _expected(sd: Mapping[str, Any], model: DiT | UNet, num_timesteps: int) -> dict[str, tuple]:
    """The shapes `sd` must have; routing buffers only if it has any (a DiT has none)."""
    routed = any(ROUTING_BUFFER.match(k) for k in sd)
    return torch_shapes(model, num_timesteps if routed else None)


def _pos_embed_problems(value, model: DiT) -> list[str]:
    """`pos_embed` must be the fixed sin-cos table, to the precision of its dtype."""
    theirs = to_numpy(value, np.float64)[0]
    ours = sincos_pos_embed(model.hidden_size, model.input_size // model.patch_size)
    err = float(np.max(np.abs(theirs - ours)))
    if err > 2 * _eps(value):
        return [f"'pos_embed' is not the fixed 2-D sin-cos embedding (max difference {err:.3g})"]
    return []


def _eps(value) -> float:
    """The machine epsilon of a torch tensor's or array's float dtype."""
    if hasattr(value, "detach"):
        import torch  # present: `value` is a torch tensor

        return torch.finfo(value.dtype).eps
    return float(jnp.finfo(value.dtype).eps)


def open_checkpoint(path: str) -> Checkpoint:
    """The official-layout PyTorch file at `path` (.pt/.pth/.safetensors), opened lazily.

    Raises FileNotFoundError or ValueError (the message says why) for a file that is
    missing, of another type, unreadable, or neither a state dict nor a checkpoint dict.
    """
    if files.is_remote(path):
        raise ValueError("must be a local file (copy it to this machine first)")
    if os.path.isdir(path):
        raise ValueError(f"is a folder: name the checkpoint file in it ({', '.join(SUFFIXES)})")
    if not os.path.isfile(path):
        raise FileNotFoundError("does not exist")
    if not path.endswith(SUFFIXES):
        raise ValueError(f"has an unknown file type: expected {', '.join(SUFFIXES)}")
    if path.endswith(".safetensors"):
        return Checkpoint(path, "state dict", _both(_strip_prefixes(read_safetensors(path))))
    return _from_pickle(path, read_torch(path))


def _both(sd: dict) -> dict[str, dict]:
    return {"model": sd, "ema": sd}


def _from_pickle(path: str, obj) -> Checkpoint:
    if isinstance(obj, Mapping) and obj and all(_is_tensor(v) for v in obj.values()):
        return Checkpoint(path, "state dict", _both(_strip_prefixes(obj)))
    found = {r: obj[r] for r in ("model", "ema") if isinstance(obj, Mapping) and r in obj}
    if not found or not all(isinstance(sd, Mapping) for sd in found.values()):
        raise ValueError("holds neither a state dict nor a checkpoint dict with 'model'/'ema'")
    model = _strip_prefixes(found.get("model", found.get("ema")))
    sds = {"model": model, "ema": _strip_prefixes(found["ema"]) if "ema" in found else model}
    uw = _strip_prefixes(obj["uw"]) if isinstance(obj.get("uw"), Mapping) else None
    if uw is not None and "loss_scale" not in uw:
        raise ValueError(f"its 'uw' has no 'loss_scale' (keys {sorted(uw)})")
    keys = tuple(map(str, obj))
    return Checkpoint(path, "training checkpoint", sds, obj.get("opt"), uw, keys)


# --- routing tables in files ----------------------------------------------------------


def classify_tables(tables, alphas=(4.0,)) -> dict:
    """Which routing (G, T, C) 0/1 tables are: {'kind': 'none'} (all ones, or None),
    {'kind': 'dtr', 'beta': b, 'alpha': a} (the DTR window of one of `alphas`, same in
    every block; b is the shortest decimal giving the window width), else
    {'kind': 'random'}: not reproducible from a config (a seed)."""
    if tables is None or np.all(tables == 1):
        return {"kind": "none"}
    tables = np.asarray(tables)
    _, num_tasks, channels = tables.shape
    widths = np.unique(tables.sum(-1))
    if len(widths) == 1 and (tables == tables[:1]).all():
        beta = _beta_for(int(widths[0]), channels)
        for alpha in dict.fromkeys(float(a) for a in alphas):
            table = routing.routing_table("dtr", num_tasks, channels, beta, alpha)
            if np.array_equal(table, tables[0]):
                return {"kind": "dtr", "beta": beta, "alpha": alpha}
    return {"kind": "random"}


def _beta_for(width: int, channels: int) -> float:
    """The shortest decimal beta with floor(beta * channels) = width."""
    for digits in range(1, 8):
        low = round(width / channels, digits)
        for beta in (low, round(low + 10**-digits, digits)):
            if routing.active_channels(channels, beta) == width:
                return beta
    return (width + 0.5) / channels


def describe_tables(found: dict) -> str:
    if found["kind"] == "dtr":
        return f"dtr (beta {found['beta']:g}, alpha {found['alpha']:g})"
    if found["kind"] == "none":
        return "none (all channels, a plain DiT)"
    return "random (not reproducible from a seed)"


def full_tables(tables, depth: int, num_tasks: int, channels: int) -> np.ndarray:
    """(G, T, C) tables (or None: no routing) as (depth, T, C), for comparisons."""
    if tables is None:
        return np.ones((depth, num_tasks, channels), np.uint8)
    tables = np.asarray(tables, np.uint8)
    return np.broadcast_to(tables, (depth, *tables.shape[1:])) if len(tables) == 1 else tables


def read_tables(path: str) -> np.ndarray:
    """(G, T, C) uint8 routing tables from `path`: a .npy array, a dtr_jax export's
    model.safetensors (`routing.tables`), or an official-layout PyTorch file with
    routing buffers. Cached per file version (path, size, modification time)."""
    if not path.endswith((".npy", *SUFFIXES)):
        raise ValueError(f"has an unknown file type: expected .npy, {', '.join(SUFFIXES)}")
    st = os.stat(path)
    return _read_tables(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_tables(path: str, size: int, mtime_ns: int) -> np.ndarray:
    del size, mtime_ns  # the cache key
    if path.endswith(".npy"):
        tables = np.load(path, allow_pickle=False)
    elif path.endswith(".safetensors") and EXPORT_TABLES_KEY in read_safetensors(path):
        tables = np.asarray(read_safetensors(path)[EXPORT_TABLES_KEY])
    else:
        tables = open_checkpoint(path).tables()
        if tables is None:
            raise ValueError("holds no routing tables (no blocks.N.routing._unit_mapping)")
    if tables.ndim != 3 or not np.isin(tables, (0, 1)).all():
        raise ValueError(f"holds tables of shape {tables.shape}: they must be (G, T, C) of 0/1")
    tables = tables.astype(np.uint8)
    tables.flags.writeable = False
    return tables


def tables_problems(
    name: str, path: str, depth: int, num_timesteps: int, channels: int
) -> list[str]:
    """Problems with a routing-tables file `path` (the config field `name`) for a model
    of `depth` blocks of `channels`, with `num_timesteps` tasks."""
    if not path:
        return [f"{name}='' must name the tables' file (.npy, .pt, .pth or .safetensors)"]
    try:
        tables = read_tables(path)
    except FileNotFoundError:
        return [f"{name}={path!r} does not exist"]
    except (OSError, ValueError) as e:
        return [f"{name}={path!r} {e}"]
    if tables.shape[0] not in (1, depth) or tables.shape[1:] != (num_timesteps, channels):
        return [
            f"{name}={path!r} holds tables of shape {tables.shape}: expected "
            f"(1 or depth={depth}, num_timesteps={num_timesteps}, hidden_size={channels})"
        ]
    return []


def tables_digest(tables) -> str:
    """A content hash of (G, T, C) tables: what the config signature records for them."""
    tables = np.ascontiguousarray(tables, np.uint8)
    return hashlib.sha256(repr(tables.shape).encode() + tables.tobytes()).hexdigest()


# --- optimizer state ------------------------------------------------------------------


def with_adam(opt_state, moments: AdamMoments):
    """`opt_state` (an optax state with one ScaleByAdamState, e.g. adamw chained with
    clipping) holding `moments`' count, mu and nu; the other parts are kept as they are."""
    swapped = []

    def swap(s):
        if not isinstance(s, optax.ScaleByAdamState):
            return s
        swapped.append(s)
        count = np.asarray(moments.count, s.count.dtype)
        return optax.ScaleByAdamState(count=count, mu=moments.mu, nu=moments.nu)

    out = jax.tree.map(swap, opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
    if len(swapped) != 1:
        raise ValueError(f"the optimizer state has {len(swapped)} Adam states, expected 1")
    return out


# --- writing --------------------------------------------------------------------------


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def serialize(state_dict: Mapping[str, np.ndarray], suffix: str) -> bytes:
    """A state dict as the bytes of a .safetensors file (no torch needed) or of a
    torch.save .pt/.pth file (needs torch)."""
    if suffix == ".safetensors":
        from safetensors import numpy as st_numpy  # only where a file is written

        return st_numpy.save(dict(state_dict), metadata={"format": "pt"})
    import torch  # only .pt / .pth files need torch

    buffer = io.BytesIO()
    tensors = collections.OrderedDict(
        (k, torch.from_numpy(np.array(v))) for k, v in state_dict.items()
    )
    torch.save(tensors, buffer)
    return buffer.getvalue()


def save(state_dict: Mapping[str, np.ndarray], path: str) -> None:
    """Writes a state dict to a .safetensors, .pt or .pth file, atomically."""
    suffix = os.path.splitext(path)[1]
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown file type, expected {', '.join(SUFFIXES)}")
    files.write_atomically(path, serialize(state_dict, suffix))


__all__ = [
    "AdamMoments",
    "Checkpoint",
    "Inert",
    "classify_tables",
    "describe_tables",
    "first_mismatch",
    "full_tables",
    "is_unet_state_dict",
    "open_checkpoint",
    "params_from_torch",
    "params_to_torch",
    "read_tables",
    "read_torch",
    "save",
    "serialize",
    "tables_digest",
    "tables_problems",
    "torch_available",
    "torch_shapes",
    "with_adam",
]
