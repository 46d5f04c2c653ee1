"""Export of trained params for inference, and the public loader.

An export is a directory: three files that together rebuild the model with no workdir
and no training config, and the same params for PyTorch code:

  model.json         what to build: architecture, routing, objective, sampling defaults
  model.safetensors  the params, flat keys joined by '.' (`blocks_0.attn.qkv.kernel`),
                     float32, plus the uint8 routing tables: a DiT's (G, T, C) as
                     `routing.tables`, a U-Net's (G, T, C) of width C as `routing.tables.C`
  model.msgpack      the same params as a `flax.serialization` tree
  pytorch_model.safetensors, pytorch_model.pt
                     the official DiT / DTR release state dict, or guided-diffusion's
                     for a U-Net (`dtr_jax.interop`): `load_state_dict(strict=True)` of a
                     model of that layout takes it; the .pt only where torch is installed

`load(path)` returns an `Exported` with `apply` (the routed forward) and `sample`;
`from_pytorch(config)` does the same for the PyTorch file `config.init_from`.
An export is written into a temporary sibling directory and swapped into place,
so a failed or interrupted write never corrupts the previous export.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util
from safetensors import numpy as st_numpy

import dtr_jax
from dtr_jax import config as config_lib
from dtr_jax import diffusion, files, inference, interop, routing, sharding, torch_files
from dtr_jax.diffusion import samplers
from dtr_jax.errors import ConfigError
from dtr_jax.models import DiT, UNet, routed_widths
from dtr_jax.models.dit import unstack_blocks

FORMAT = "dtr_jax.export"
FORMAT_VERSION = 1
JSON = "model.json"
SAFETENSORS = "model.safetensors"
MSGPACK = "model.msgpack"
TORCH_SAFETENSORS = "pytorch_model.safetensors"
TORCH_PT = "pytorch_model.pt"
TABLES_KEY = interop.EXPORT_TABLES_KEY  # the routing tables in model.safetensors
CUSTOM = "custom"  # routing kind of tables that exist only in the export (no spec rebuilds them)


# --- the spec (model.json) -------------------------------------------------------


def spec_from_config(config, step: int | None = None, use_ema: bool = True) -> dict:
    """The model.json of an export of `config`'s model (JSON types only): the model spec
    (`config.model_spec`) with the sampling defaults and where the params come from."""
    s = config.sample
    return dict(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        dtr_jax_version=dtr_jax.__version__,
        **config_lib.model_spec(config),
        sampling=dict(
            num_steps=int(s.num_steps),
            cfg_scale=float(s.cfg_scale),
            sampler=str(s.sampler),
            **{f: s[f] for f in samplers.FIELDS},
        ),
        params="ema" if use_ema else "raw",
        step=None if step is None else int(step),
    )


def _param_shapes(dm: inference.DiffusionModel) -> dict[str, tuple]:
    """{'blocks_0.attn.qkv.kernel': shape} of the model's params, from eval_shape only."""
    return {k: v.shape for k, v in _flatten(nn.unbox(dm.abstract_params())).items()}


def _flatten(tree) -> dict:
    return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep=".")


def _check_params(flat: dict, expected: dict[str, tuple], what: str, where: str) -> None:
    """Raises ValueError naming the first key whose presence or shape differs."""
    mismatch = interop.first_mismatch({k: np.shape(v) for k, v in flat.items()}, expected)
    if mismatch:
        raise ValueError(
            f"{what} do not match the architecture {where}: first mismatch: {mismatch}"
        )


def _check_tables(tables, dm: inference.DiffusionModel, spec: dict, what: str):
    """`tables` as uint8, if they are 0/1 routing tables of the spec's model: a DiT's
    (1 or depth, T, C), a U-Net's {C: (1 or sites of width C, T, C)}; else ValueError."""
    m, num_tasks = spec["model"], diffusion.spec_num_tasks(spec["diffusion"])
    if isinstance(dm.model, UNet):
        widths = routed_widths(dm.model)
        counts = {w: widths.count(w) for w in widths}
        shapes = {int(k): np.shape(v) for k, v in dict(tables).items()} if _is_dict(tables) else {}
        ok = set(shapes) == set(counts) and all(
            s[:1] in ((1,), (counts[w],)) and s[1:] == (num_tasks, w) for w, s in shapes.items()
        )
        expected = {w: f"(1 or {n}, {num_tasks}, {w})" for w, n in sorted(counts.items())}
        if not ok or not all(np.isin(v, (0, 1)).all() for v in tables.values()):
            raise ValueError(
                f"{what}: routing tables of shapes {shapes or np.shape(tables)} must hold 0/1 "
                f"and be, per routed width, {expected}"
            )
        return {int(k): np.asarray(v).astype(np.uint8) for k, v in tables.items()}
    tables = np.asarray(tables)
    ok_shape = (
        tables.ndim == 3
        and tables.shape[0] in (1, m["depth"])
        and tables.shape[1:] == (num_tasks, m["hidden_size"])
    )
    if not ok_shape or not np.isin(tables, (0, 1)).all():
        raise ValueError(
            f"{what}: routing tables of shape {tables.shape} must hold 0/1 and have shape "
            f"(1 or depth={m['depth']}, num_tasks={num_tasks}, hidden_size={m['hidden_size']})"
        )
    return tables.astype(np.uint8)


def _is_dict(tables) -> bool:
    return isinstance(tables, dict)


def _same_tables(a, b) -> bool:
    """Whether two sets of tables (arrays, {width: array} or None) are equal."""
    if a is None or b is None or _is_dict(a) != _is_dict(b):
        return a is None and b is None
    if not _is_dict(a):
        return np.array_equal(a, b)
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _flat_tables(tables) -> dict[str, np.ndarray]:
    """The safetensors entries of a model's tables: `routing.tables` (a DiT's array) or
    `routing.tables.<width>` (a U-Net's)."""
    if tables is None:
        return {}
    if _is_dict(tables):
        return {f"{TABLES_KEY}.{w}": v for w, v in sorted(tables.items())}
    return {TABLES_KEY: tables}


def _pop_tables(flat: dict):
    """Removes the tables' entries from a flat safetensors dict; returns the tables."""
    if TABLES_KEY in flat:
        return flat.pop(TABLES_KEY)
    prefix = TABLES_KEY + "."
    keys = [k for k in flat if k.startswith(prefix) and k[len(prefix) :].isdigit()]
    return {int(k[len(prefix) :]): np.asarray(flat.pop(k)) for k in keys} or None


# --- writing ---------------------------------------------------------------------------


def export(params, config, out_dir: str, tables=None, step: int | None = None) -> str:
    """Writes an export of `params` (host arrays) for `config`'s model to `out_dir`.

    `tables` default to those `config.model.routing` builds; tables that differ
    from them are kept in the export with routing kind 'custom'. Which params
    these are (EMA or raw) is recorded from `config.export.use_ema`. Only
    process 0 writes. Returns `out_dir`.
    """
    spec = spec_from_config(config, step, use_ema=config.export.use_ema)
    dm = inference.build(spec)
    params = _host(params)
    if config.model.scan_blocks:  # exports hold the per-block layout (model.json has no scan)
        params = unstack_blocks(params)
    flat = {k: np.asarray(v, np.float32) for k, v in _flatten(params).items()}
    _check_params(flat, _param_shapes(dm), "params passed to export", "of the config")
    tables = _resolve_tables(tables, dm, spec)
    stored = flat | _flat_tables(tables)
    tree = traverse_util.unflatten_dict(flat, sep=".")
    contents = {
        MSGPACK: lambda: flax.serialization.to_bytes(tree),
        SAFETENSORS: lambda: st_numpy.save(stored, metadata={"format": FORMAT}),
        JSON: lambda: (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode(),
        **_torch_contents(tree, dm.model, tables),
    }
    if jax.process_index() == 0:
        write = _write_remote if files.is_remote(out_dir) else _write_local
        write(out_dir, contents)
        logging.info("Exported %s params (step %s) to %s", spec["params"], step, out_dir)
    sharding.sync_hosts("dtr_jax.export")
    return out_dir


def _torch_contents(tree, model: DiT | UNet, tables) -> dict[str, Callable[[], bytes]]:
    """The official-layout state dict as .safetensors, and as .pt where torch is installed
    (made once, when first written)."""
    state_dict = functools.cache(lambda: interop.params_to_torch(tree, model, tables))
    contents = {TORCH_SAFETENSORS: lambda: interop.serialize(state_dict(), ".safetensors")}
    if interop.torch_available():
        contents[TORCH_PT] = lambda: interop.serialize(state_dict(), ".pt")
    elif jax.process_index() == 0:
        logging.info("torch is not installed: %s only, no %s", TORCH_SAFETENSORS, TORCH_PT)
    return contents


def _host(params):
    return sharding.to_host(nn.unbox(params))


def _resolve_tables(tables, dm: inference.DiffusionModel, spec: dict):
    """The tables to store; marks the spec 'custom' when they are not the spec's own
    (`dm.tables`, rebuilt from it)."""
    rebuilt = dm.tables
    if tables is None:
        return rebuilt
    tables = _check_tables(tables, dm, spec, "tables passed to export")
    if rebuilt is None or not _same_tables(tables, rebuilt):
        kind = spec["routing"]["kind"]
        # Tables read from a file are custom by nature; others that differ are a surprise.
        log = logging.info if kind == routing.FILE else logging.warning
        log("Routing tables not rebuilt from routing.kind=%r: exported as %r", kind, CUSTOM)
        spec["routing"]["kind"] = CUSTOM
    return tables


def _write_local(out_dir: str, contents: dict[str, Callable[[], bytes]]) -> None:
    """Writes the export as one directory; an old export is replaced only at the end."""
    out = os.path.abspath(out_dir)
    _check_replaceable(out)
    files.write_directory(out, contents)


def _check_replaceable(out: str) -> None:
    """Refuses to replace anything but an earlier export (or an empty directory)."""
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out) or (os.listdir(out) and not os.path.isfile(f"{out}/{JSON}")):
        raise ConfigError(
            [
                f"export.dir: refusing to write an export to {out}: it exists and is not a "
                f"dtr_jax export (no {JSON}); choose another export.dir"
            ]
        )


def _write_remote(out_dir: str, contents: dict[str, Callable[[], bytes]]) -> None:
    """Remote stores (gs://) have no directory rename: each file is replaced atomically."""
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    for filename, make in contents.items():
        files.write_atomically(str(epath.Path(out_dir) / filename), make())


def export_mode(config, workdir: str) -> str:
    """--mode export: WORKDIR's latest EMA (or raw) params (or those of `init_from`, if
    WORKDIR has no checkpoint) -> export.dir (or WORKDIR/export)."""
    config_lib.validate(config, jax.device_count(), mode="export")
    out_dir = config.export.dir or str(files.resolve(workdir) / "export")
    if not files.is_remote(out_dir):  # refused before anything is read or compiled
        out = os.path.abspath(out_dir)
        files.check_writable_dir(os.path.dirname(out), "the export directory's parent")
        _check_replaceable(out)
    mesh = sharding.make_mesh(config.mesh)
    use_ema = bool(config.export.use_ema)
    dm, params, step = inference.restore_params(config, workdir, mesh, use_ema=use_ema)
    return export(sharding.host_gather(params), config, out_dir, tables=dm.tables, step=step)


# --- loading ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Exported:
    """A loaded export: the model (DiT or U-Net) with its routing tables and objective,
    its params (on device) and its spec (model.json)."""

    dm: inference.DiffusionModel
    params: Any
    spec: dict
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def model(self) -> DiT | UNet:
        return self.dm.model

    @property
    def tables(self) -> np.ndarray | dict | None:
        return self.dm.tables

    @property
    def diffusion(self):
        """The objective (`dtr_jax.diffusion`): a GaussianDiffusion or a FlowMatching."""
        return self.dm.diffusion

    def apply(self, x, t, y):
        """Model output (B, H, W, out_channels) for NHWC x, times t (B,) (the objective's:
        timesteps, or the flow time, whose routing row it gives the model) and labels y."""
        if "apply" not in self._cache:
            task = self.diffusion.model_task
            self._cache["apply"] = jax.jit(
                lambda p, x, t, y, r: self.model.apply(
                    {"params": p}, x, t, y, r, **inference._task(task(t))
                )
            )
        return self._cache["apply"](
            self.params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), self._device_tables()
        )

    def sample(self, labels, rng, *, num_steps=None, cfg_scale=None, sampler=None) -> np.ndarray:
        """Images (N, H, W, C) for labels (N,), in the model's input scale; defaults from
        the spec's sampling section (settings an older export lacks: `default_config`'s).
        `rng` is a seed (int) or a jax PRNG key."""
        s, defaults = self.spec["sampling"], config_lib.default_config().sample
        settings = types.SimpleNamespace(
            num_steps=int(s["num_steps"] if num_steps is None else num_steps),
            cfg_scale=float(s["cfg_scale"] if cfg_scale is None else cfg_scale),
            sampler=sampler or s["sampler"],
            **{f: s.get(f, defaults[f]) for f in samplers.FIELDS},
        )
        objective = diffusion.objective_of(self.spec["diffusion"])
        found = samplers.problems(settings, objective, self.diffusion.num_tasks)
        if found:
            raise ValueError("; ".join(found))
        key = (settings.num_steps, settings.cfg_scale, settings.sampler)
        if key not in self._cache:
            self._cache[key] = jax.jit(inference.sample_fn(self.dm, settings))
        rng = jax.random.key(rng) if isinstance(rng, (int, np.integer)) else rng
        labels = jnp.asarray(labels, jnp.int32)
        return np.asarray(self._cache[key](self.params, labels, self._device_tables(), rng))

    def _device_tables(self):
        if self.tables is None:
            return None
        if "tables" not in self._cache:
            self._cache["tables"] = jax.tree.map(jnp.asarray, self.tables)
        return self._cache["tables"]


def from_pytorch(config, use_ema: bool = True) -> Exported:
    """The official-layout PyTorch file `config.init_from` as an `Exported` (apply,
    sample), for `config`'s model; checked as `--mode export` checks it."""
    if not config.init_from:
        raise config_lib.ConfigError(["init_from='' must name the PyTorch file to load"])
    config_lib.validate(config, jax.device_count(), mode="export")
    mesh = sharding.make_mesh(config.mesh)
    dm, params, step = inference.imported_params(config, mesh, use_ema)
    return Exported(dm, params, spec_from_config(config, step, use_ema))


def load(path: str, dtype: str = "float32") -> Exported:
    """Rebuilds an export's model, routing tables and diffusion from the export alone.

    `path` is the export directory or one of its files; naming model.msgpack (or
    model.safetensors) loads the params from that file, otherwise model.safetensors
    is preferred. `dtype` is the compute dtype; params stay float32.
    """
    json_path, params_path = _locate(path)
    spec = _read_spec(json_path)
    dm = inference.build(spec, dtype)
    flat, tables = _read_params(params_path, json_path)
    _check_params(flat, _param_shapes(dm), f"params in {params_path}", f"in {json_path}")
    tables = _final_tables(spec, dm, tables, json_path, params_path)
    params = jax.device_put(traverse_util.unflatten_dict(flat, sep="."))
    return Exported(dataclasses.replace(dm, tables=tables), params, spec)


def _locate(path: str) -> tuple[epath.Path, epath.Path]:
    """(model.json, params file) of the export at `path`."""
    p = files.resolve(path)
    root, chosen = p, None
    if p.is_file():
        root = p.parent
        if p.name.endswith((".safetensors", ".msgpack")):
            chosen = p
    candidates = [chosen] if chosen else [root / SAFETENSORS, root / MSGPACK]
    params = next((c for c in candidates if c.is_file()), None)
    if params is None or not (root / JSON).is_file():
        raise FileNotFoundError(
            f"no dtr_jax export at {path}: expected {JSON} and {SAFETENSORS} or {MSGPACK}"
        )
    return root / JSON, params


def _read_spec(json_path: epath.Path) -> dict:
    try:
        spec = json.loads(json_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path} is not valid JSON: {e}") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ValueError(f"{json_path} is not a dtr_jax export (format is not {FORMAT!r})")
    version = spec.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{json_path} has export format_version={version!r}, which this dtr_jax "
            f"{dtr_jax.__version__} cannot read (it reads version {FORMAT_VERSION})"
        )
    missing = [k for k in ("model", "routing", "diffusion", "sampling") if k not in spec]
    if missing:
        raise ValueError(f"{json_path} lacks the field(s) {missing}")
    return spec


def _read_params(params_path: epath.Path, json_path: epath.Path):
    """(flat float32 params, stored tables or None) of a safetensors or msgpack file."""
    try:
        if params_path.name.endswith(".msgpack"):
            state = flax.serialization.msgpack_restore(params_path.read_bytes())
            flat = {k: np.asarray(v) for k, v in _flatten(state).items()}
            return flat, _stored_tables(json_path.parent / SAFETENSORS)
        flat = {k: np.asarray(v) for k, v in torch_files.read_safetensors(str(params_path)).items()}
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{params_path} cannot be read: {e}") from e
    return flat, _pop_tables(flat)


def _stored_tables(path: epath.Path):
    """Only the routing tables of a model.safetensors (None if absent)."""
    if not path.is_file():
        return None
    tables = _pop_tables(dict(torch_files.read_safetensors(str(path))))
    return jax.tree.map(np.asarray, tables)


def _final_tables(spec, dm, stored, json_path, params_path):
    """Stored tables if present (they must agree with the routing spec, whose tables
    are `dm.tables`, rebuilt from it), else the rebuilt ones."""
    rebuilt = dm.tables
    kind = spec["routing"]["kind"]
    if kind not in routing.KINDS + (CUSTOM,):
        raise ValueError(f"{json_path}: routing kind={kind!r} is unknown")
    if stored is None:
        if kind == CUSTOM:
            raise ValueError(
                f"{json_path} has routing kind {CUSTOM!r} but no {TABLES_KEY!r} is stored "
                f"next to it in {SAFETENSORS}"
            )
        return rebuilt
    stored = _check_tables(stored, dm, spec, str(params_path))
    if kind != CUSTOM and (rebuilt is None or not _same_tables(stored, rebuilt)):
        raise ValueError(
            f"the routing tables stored in {json_path.parent / SAFETENSORS} do not match "
            f"those of the routing spec in {json_path} ({spec['routing']})"
        )
    return stored


__all__ = ["Exported", "export", "export_mode", "from_pytorch", "load", "spec_from_config"]
