"""Export of trained params for inference, and the public loader.

An export is a directory of three files that together rebuild the model with no
workdir and no training config:

  model.json         what to build: architecture, routing, diffusion, sampling defaults
  model.safetensors  the params, flat keys joined by '.' (`blocks_0.attn.qkv.kernel`),
                     float32, plus the (G, T, C) uint8 routing tables as `routing.tables`
  model.msgpack      the same params as a `flax.serialization` tree

`load(path)` returns an `Exported` with `apply` (the routed forward) and `sample`.
An export is written into a temporary sibling directory and swapped into place,
so a failed or interrupted write never corrupts the previous export.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import types
import uuid
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from absl import logging
from etils import epath
from flax import traverse_util
from safetensors import numpy as st_numpy

import dtr_jax
from dtr_jax import checkpoint, routing, sample, sharding
from dtr_jax import config as config_lib
from dtr_jax.diffusion import GaussianDiffusion
from dtr_jax.models import DiT, create_dit, model_architecture

FORMAT = "dtr_jax.export"
FORMAT_VERSION = 1
JSON = "model.json"
SAFETENSORS = "model.safetensors"
MSGPACK = "model.msgpack"
TABLES_KEY = "routing.tables"
CUSTOM = "custom"  # routing kind of tables that exist only in the export (no spec rebuilds them)


# --- the spec (model.json) -------------------------------------------------------


def spec_from_config(config, step: int | None = None, use_ema: bool = True) -> dict:
    """The model.json of an export of `config`'s model (JSON types only)."""
    m, r, s = config.model, config.model.routing, config.sample
    arch = model_architecture(m)
    model = {k: int(v) for k, v in arch.items()}
    model.update(
        name=str(m.name),
        mlp_ratio=float(DiT.mlp_ratio),
        input_size=int(m.input_size),
        in_channels=int(m.in_channels),
        num_classes=int(m.num_classes),
        class_dropout_prob=float(m.class_dropout_prob),
        learn_sigma=bool(m.learn_sigma),
    )
    return dict(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        dtr_jax_version=dtr_jax.__version__,
        model=model,
        routing=dict(kind=str(r.kind), beta=float(r.beta), alpha=float(r.alpha), seed=int(r.seed)),
        diffusion=dict(
            schedule=str(config.diffusion.schedule),
            num_timesteps=int(config.diffusion.num_timesteps),
        ),
        sampling=dict(
            num_steps=int(s.num_steps),
            cfg_scale=float(s.cfg_scale),
            sampler=str(s.sampler),
            ddim_eta=float(s.ddim_eta),
            clip_denoised=bool(s.clip_denoised),
        ),
        params="ema" if use_ema else "raw",
        step=None if step is None else int(step),
    )


def _model(spec: dict, dtype: str = "float32") -> DiT:
    m = dict(spec["model"])
    return create_dit(m.pop("name"), dtype=dtype, **m)


def _diffusion(spec: dict) -> GaussianDiffusion:
    d = spec["diffusion"]
    return GaussianDiffusion.create(
        d["schedule"], d["num_timesteps"], learn_sigma=spec["model"]["learn_sigma"]
    )


def _spec_tables(spec: dict) -> np.ndarray | None:
    """The tables the routing spec rebuilds (None for 'none' and 'custom')."""
    r, m = spec["routing"], spec["model"]
    if r["kind"] in ("none", CUSTOM):
        return None
    return routing.model_tables(
        r["kind"],
        spec["diffusion"]["num_timesteps"],
        m["hidden_size"],
        m["depth"],
        r["beta"],
        r["alpha"],
        r["seed"],
    )


def _param_shapes(model: DiT) -> dict[str, tuple]:
    """{'blocks_0.attn.qkv.kernel': shape} of the model's params, from eval_shape only."""
    x = jax.ShapeDtypeStruct(
        (1, model.input_size, model.input_size, model.in_channels), jnp.float32
    )
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), x, t, t)["params"]
    return {k: v.shape for k, v in _flatten(nn.unbox(boxed)).items()}


def _flatten(tree) -> dict:
    return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep=".")


def _check_params(flat: dict, expected: dict[str, tuple], what: str, where: str) -> None:
    """Raises ValueError naming the first key whose presence or shape differs."""
    for key in sorted(set(flat) | set(expected)):
        if key not in flat:
            problem = "is missing"
        elif key not in expected:
            problem = "is not a parameter of this architecture"
        elif tuple(np.shape(flat[key])) != tuple(expected[key]):
            problem = f"has shape {tuple(np.shape(flat[key]))}, expected {tuple(expected[key])}"
        else:
            continue
        raise ValueError(
            f"{what} do not match the architecture {where}: first mismatch: {key!r} {problem}"
        )


def _check_tables(tables: np.ndarray, spec: dict, what: str) -> np.ndarray:
    m, num_tasks = spec["model"], spec["diffusion"]["num_timesteps"]
    tables = np.asarray(tables)
    ok_shape = (
        tables.ndim == 3
        and tables.shape[0] in (1, m["depth"])
        and tables.shape[1:] == (num_tasks, m["hidden_size"])
    )
    if not ok_shape or not np.isin(tables, (0, 1)).all():
        raise ValueError(
            f"{what}: routing tables of shape {tables.shape} must hold 0/1 and have shape "
            f"(1 or depth={m['depth']}, num_timesteps={num_tasks}, hidden_size={m['hidden_size']})"
        )
    return tables.astype(np.uint8)


# --- writing ---------------------------------------------------------------------------


def export(params, config, out_dir: str, tables=None, step: int | None = None) -> str:
    """Writes an export of `params` (host arrays) for `config`'s model to `out_dir`.

    `tables` default to those `config.model.routing` builds; tables that differ
    from them are kept in the export with routing kind 'custom'. Which params
    these are (EMA or raw) is recorded from `config.export.use_ema`. Only
    process 0 writes. Returns `out_dir`.
    """
    spec = spec_from_config(config, step, use_ema=config.export.use_ema)
    flat = {k: np.asarray(v, np.float32) for k, v in _flatten(_host(params)).items()}
    _check_params(flat, _param_shapes(_model(spec)), "params passed to export", "of the config")
    tables = _resolve_tables(tables, spec)
    if tables is not None:
        flat[TABLES_KEY] = tables
    tree = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k != TABLES_KEY}, sep=".")
    files = {
        MSGPACK: lambda: flax.serialization.to_bytes(tree),
        SAFETENSORS: lambda: st_numpy.save(flat, metadata={"format": FORMAT}),
        JSON: lambda: (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode(),
    }
    if jax.process_index() == 0:
        write = _write_remote if checkpoint.is_remote(out_dir) else _write_local
        write(out_dir, files)
        logging.info("Exported %s params (step %s) to %s", spec["params"], step, out_dir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dtr_jax.export")
    return out_dir


def _host(params):
    return jax.device_get(nn.unbox(params))


def _resolve_tables(tables, spec: dict) -> np.ndarray | None:
    """The tables to store; marks the spec 'custom' when they are not the spec's own."""
    rebuilt = _spec_tables(spec)
    if tables is None:
        return rebuilt
    tables = _check_tables(tables, spec, "tables passed to export")
    if rebuilt is None or not np.array_equal(tables, rebuilt):
        logging.warning(
            "Routing tables differ from routing.kind=%r: exported as kind %r (stored only)",
            spec["routing"]["kind"],
            CUSTOM,
        )
        spec["routing"]["kind"] = CUSTOM
    return tables


def _write_local(out_dir: str, files: dict[str, Callable[[], bytes]]) -> None:
    """Writes into a temporary sibling, then swaps it in; the old export goes last."""
    out = os.path.abspath(out_dir)
    _check_replaceable(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = _sibling(out, "tmp")
    os.mkdir(tmp)  # unlike mkdtemp's 0700, honours the umask
    try:
        for filename, make in files.items():
            with open(os.path.join(tmp, filename), "wb") as f:
                f.write(make())
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(out: str) -> None:
    """Refuses to replace anything but an earlier export (or an empty directory)."""
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out) or (os.listdir(out) and not os.path.isfile(f"{out}/{JSON}")):
        raise ValueError(
            f"refusing to write an export to {out}: it exists and is not a dtr_jax export "
            f"(no {JSON}); choose another export.dir"
        )


def _sibling(out: str, what: str) -> str:
    """A fresh hidden name next to `out` (.NAME.what-PID-RANDOM)."""
    parent, name = os.path.split(out)
    return os.path.join(parent, f".{name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _swap_in(tmp: str, out: str) -> None:
    if not os.path.exists(out):
        os.rename(tmp, out)
        return
    old = _sibling(out, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_remote(out_dir: str, files: dict[str, Callable[[], bytes]]) -> None:
    """Remote stores (gs://) have no directory rename: each file is replaced atomically."""
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    for filename, make in files.items():
        checkpoint.write_atomically(str(epath.Path(out_dir) / filename), make())


def export_mode(config, workdir: str) -> str:
    """--mode export: WORKDIR's latest EMA (or raw) params -> export.dir (or WORKDIR/export)."""
    from dtr_jax import train  # local: train pulls in the data pipeline

    config_lib.validate(config, jax.device_count(), mode="export")
    mesh = sharding.make_mesh(config.mesh)
    task, params, step = train.restore_params(
        config, workdir, mesh, use_ema=bool(config.export.use_ema)
    )
    out_dir = config.export.dir or str(checkpoint.workdir_path(workdir) / "export")
    return export(sample.host_gather(params), config, out_dir, tables=task.tables, step=step)


# --- loading ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Exported:
    """A loaded export: the DiT, its params (on device), routing tables, diffusion and spec."""

    model: DiT
    params: Any
    tables: np.ndarray | None
    diffusion: GaussianDiffusion
    spec: dict
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def apply(self, x, t, y):
        """Model output (B, H, W, out_channels) for NHWC x, timesteps t (B,) and labels y (B,)."""
        if "apply" not in self._cache:
            self._cache["apply"] = jax.jit(
                lambda p, x, t, y, r: self.model.apply({"params": p}, x, t, y, r)
            )
        return self._cache["apply"](
            self.params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y), self._device_tables()
        )

    def sample(self, labels, rng, *, num_steps=None, cfg_scale=None, sampler=None) -> np.ndarray:
        """Images (N, H, W, C) for labels (N,), in the model's input scale; defaults from
        the spec's sampling section. `rng` is a seed (int) or a jax PRNG key."""
        s = self.spec["sampling"]
        cfg = types.SimpleNamespace(
            num_steps=int(s["num_steps"] if num_steps is None else num_steps),
            cfg_scale=float(s["cfg_scale"] if cfg_scale is None else cfg_scale),
            sampler=sampler or s["sampler"],
            ddim_eta=s["ddim_eta"],
            clip_denoised=s["clip_denoised"],
        )
        self._check_sampling(cfg)
        key = (cfg.num_steps, cfg.cfg_scale, cfg.sampler)
        if key not in self._cache:
            self._cache[key] = jax.jit(sample.sample_fn(self.model, self.diffusion, cfg))
        rng = jax.random.key(rng) if isinstance(rng, (int, np.integer)) else rng
        labels = jnp.asarray(labels, jnp.int32)
        return np.asarray(self._cache[key](self.params, labels, self._device_tables(), rng))

    def _check_sampling(self, cfg) -> None:
        if cfg.sampler not in config_lib.SAMPLERS:
            raise ValueError(f"sampler={cfg.sampler!r} is unknown: allowed {config_lib.SAMPLERS}")
        if not 1 <= cfg.num_steps <= self.diffusion.num_timesteps:
            raise ValueError(
                f"num_steps={cfg.num_steps} must lie in [1, {self.diffusion.num_timesteps}]"
            )

    def _device_tables(self):
        if self.tables is None:
            return None
        if "tables" not in self._cache:
            self._cache["tables"] = jnp.asarray(self.tables)
        return self._cache["tables"]


def load(path: str, dtype: str = "float32") -> Exported:
    """Rebuilds an export's DiT, routing tables and diffusion from the export alone.

    `path` is the export directory or one of its files; naming model.msgpack (or
    model.safetensors) loads the params from that file, otherwise model.safetensors
    is preferred. `dtype` is the compute dtype; params stay float32.
    """
    json_path, params_path = _locate(path)
    spec = _read_spec(json_path)
    model = _model(spec, dtype)
    flat, tables = _read_params(params_path, json_path)
    _check_params(flat, _param_shapes(model), f"params in {params_path}", f"in {json_path}")
    tables = _final_tables(spec, tables, json_path, params_path)
    params = jax.device_put(traverse_util.unflatten_dict(flat, sep="."))
    return Exported(model, params, tables, _diffusion(spec), spec)


def _locate(path: str) -> tuple[epath.Path, epath.Path]:
    """(model.json, params file) of the export at `path`."""
    p = checkpoint.workdir_path(path)
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
        flat = _read_safetensors(params_path)
    except (OSError, ValueError, TypeError, safetensors.SafetensorError) as e:
        raise ValueError(f"{params_path} cannot be read: {e}") from e
    tables = flat.pop(TABLES_KEY, None)
    return flat, tables


def _read_safetensors(path: epath.Path) -> dict:
    if checkpoint.is_remote(str(path)):
        return st_numpy.load(path.read_bytes())
    return st_numpy.load_file(str(path))


def _stored_tables(path: epath.Path) -> np.ndarray | None:
    """Only the routing tables of a model.safetensors (None if absent)."""
    if not path.is_file():
        return None
    if checkpoint.is_remote(str(path)):
        return _read_safetensors(path).get(TABLES_KEY)
    with safetensors.safe_open(str(path), framework="numpy") as f:
        return f.get_tensor(TABLES_KEY) if TABLES_KEY in f.keys() else None


def _final_tables(spec, stored, json_path, params_path) -> np.ndarray | None:
    """Stored tables if present (they must agree with the routing spec), else rebuilt."""
    kind = spec["routing"]["kind"]
    if kind not in routing.KINDS + (CUSTOM,):
        raise ValueError(f"{json_path}: routing kind={kind!r} is unknown")
    rebuilt = _spec_tables(spec)
    if stored is None:
        if kind == CUSTOM:
            raise ValueError(
                f"{json_path} has routing kind {CUSTOM!r} but no {TABLES_KEY!r} is stored "
                f"next to it in {SAFETENSORS}"
            )
        return rebuilt
    stored = _check_tables(stored, spec, str(params_path))
    if kind != CUSTOM and (rebuilt is None or not np.array_equal(stored, rebuilt)):
        raise ValueError(
            f"the routing tables stored in {json_path.parent / SAFETENSORS} do not match "
            f"those of the routing spec in {json_path} ({spec['routing']})"
        )
    return stored


__all__ = ["Exported", "export", "export_mode", "load", "spec_from_config"]
