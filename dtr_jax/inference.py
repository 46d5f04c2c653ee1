"""What every mode that runs the model needs: the model, its routing tables and its objective.

`build` makes them from a model spec (`config.model_spec`, or an export's
model.json); `from_config` from a run config. `sample_fn` is the pure sampler (any
`sample.sampler` of the objective, with classifier-free guidance over a noise-level
interval) that `sample` shards and `export` jits. `restore_params` reads the EMA (or
raw) params of a workdir's latest checkpoint, without building the optimizer, or those of
`init_from` (an official-layout PyTorch file) where the workdir has none.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dtr_jax import checkpoint, diffusion, interop, models, routing, sharding
from dtr_jax.config import model_spec, signature
from dtr_jax.diffusion import GaussianDiffusion, samplers
from dtr_jax.diffusion.flow import FlowMatching
from dtr_jax.models import COMPUTE_FIELDS, DiT, UNet, create_model
from dtr_jax.models.dit import stack_blocks


@dataclasses.dataclass(frozen=True, eq=False)
class DiffusionModel:
    """A model (DiT or U-Net), its routing tables (None: no routing; a DiT's (G, T, C)
    array, a U-Net's {width: (G, T, width)}) and its objective (the ddpm diffusion process
    or the flow: `dtr_jax.diffusion`)."""

    model: DiT | UNet
    tables: np.ndarray | dict | None
    diffusion: GaussianDiffusion | FlowMatching

    def init_params(self, rng: jax.Array):
        """Fresh params, with the logical-partitioning boxes that give their shardings.
        A scanned model gets the per-block init, stacked: the same weights either way."""
        if isinstance(self.model, UNet):
            return self.model.init(rng, *self.model.dummy_inputs())["params"]
        per_block = self.model.clone(scan_blocks=False)
        params = per_block.init(rng, *per_block.dummy_inputs())["params"]
        return stack_blocks(params) if self.model.scan_blocks else params

    def from_per_block(self, params):
        """Params in the per-block layout (exports, PyTorch files) -> this model's layout."""
        return stack_blocks(params) if getattr(self.model, "scan_blocks", False) else params

    def abstract_params(self):
        """The boxed params as ShapeDtypeStructs (nothing allocated)."""
        return jax.eval_shape(self.init_params, jax.random.key(0))

    def param_layout(self, mesh):
        """(abstract unboxed params, their NamedShardings on `mesh`)."""
        boxed = self.abstract_params()
        return nn.unbox(boxed), sharding.logical_shardings(boxed, mesh)


def build(spec: dict, dtype: str = "float32", section=None, **model_kwargs) -> DiffusionModel:
    """The DiffusionModel a model spec describes. Routing kinds other than those of
    `routing.KINDS` (an export's 'custom') give no tables: the caller supplies them.
    `dtype` is the compute dtype; `section` (a config's `diffusion`) adds the objective's
    training fields; `model_kwargs` go to `models.create_model` (remat_policy,
    scan_blocks, attention, class_dropout_prob, a U-Net's dropout)."""
    m, r = dict(spec["model"]), spec["routing"]
    m.pop("family", None)  # the name says it
    model = create_model(m.pop("name"), dtype=dtype, **(m | model_kwargs))
    objective = diffusion.create(spec["diffusion"], model.learn_sigma, section)
    tables = None
    if r["kind"] in routing.KINDS:
        arguments = {f: r[f] for f in routing.TABLE_FIELDS[r["kind"]]}
        tables = model_tables(model, r["kind"], objective.num_tasks, **arguments)
    return DiffusionModel(model, tables, objective)


def model_tables(model: DiT | UNet, kind: str, num_tasks: int, **arguments):
    """The routing tables of `kind` for `model` (`routing.model_tables` for a DiT,
    `routing.width_tables` for a U-Net); `arguments`: beta, alpha, seed as the kind uses."""
    if isinstance(model, UNet):
        return routing.width_tables(kind, num_tasks, model.routed_widths(), **arguments)
    return routing.model_tables(kind, num_tasks, model.hidden_size, model.depth, **arguments)


def from_config(config) -> DiffusionModel:
    """The run's DiffusionModel, with how it computes (dtype, remat, scan, attention) and
    trains (label dropout, a U-Net's dropout); routing kind 'file' reads its tables from
    `model.routing.path`."""
    m = config.model
    kwargs = {f: m[f] for f in COMPUTE_FIELDS} | {"class_dropout_prob": m.class_dropout_prob}
    if models.family(m.name) == "unet":
        kwargs["dropout"] = models.model_architecture(m)["dropout"]
    dm = build(model_spec(config), m.dtype, config.diffusion, **kwargs)
    if m.routing.kind == routing.FILE:
        dm = dataclasses.replace(dm, tables=interop.read_tables(m.routing.path))
    return dm


def model_fn(
    model: DiT | UNet, params, labels, tables, cfg_scale: float, interval=samplers.FULL_INTERVAL
):
    """fn(x_t, t, task=None, level=None) for the samplers: the conditional model, guided
    when cfg_scale != 1 (one batch of conditional and null halves). With an `interval`
    [low, high] other than [0, 1], guidance applies only to samples whose noise `level`
    (B,) lies in it (bounds included); where none does, only the conditional half runs.
    `task` (B,) is the routing row, where the objective names one."""

    def conditional(x, t, task):
        return model.apply({"params": params}, x, t, labels, tables, **_task(task))

    def guided(x, t, task, scale=cfg_scale):
        apply = functools.partial(model.apply, method=type(model).guided, cfg_scale=scale)
        return apply({"params": params}, x, t, labels, tables, **_task(task))

    if cfg_scale == 1.0 or model.num_classes == 1:
        return lambda x, t, task=None, level=None: conditional(x, t, task)
    if tuple(interval) == samplers.FULL_INTERVAL:
        return lambda x, t, task=None, level=None: guided(x, t, task)
    low, high = interval

    def within(x, t, task=None, level=None):
        inside = (level >= low) & (level <= high)
        scale = jnp.where(inside, cfg_scale, 1.0).astype(x.dtype)
        scale = scale.reshape((-1,) + (1,) * (x.ndim - 1))  # per sample: 1 outside
        return jax.lax.cond(
            jnp.any(inside), lambda: guided(x, t, task, scale), lambda: conditional(x, t, task)
        )

    return within


def _task(task) -> dict:
    """The model's `task` argument, given only where the objective names rows."""
    return {} if task is None else {"task": task}


def sample_fn(dm: DiffusionModel, s, count_calls: bool = False):
    """fn(params, labels, tables, rng) -> images (B, H, W, C) in the model's input scale
    (and, with `count_calls`, the model calls per image the sampler made).

    `s` holds the sampler settings (sampler, num_steps, cfg_scale, the guidance interval
    and the `samplers.FIELDS`), e.g. a config's `sample` section. The model sees the time
    of the objective (ddpm: the original timesteps, also when respaced) and, for the
    flow, the task of its noise level, so routing masks are those of training.
    """
    m, objective = dm.model, dm.diffusion
    interval = samplers.guided_interval(s)

    def run(params, labels, tables, rng):
        fn = model_fn(m, params, labels, tables, s.cfg_scale, interval)

        def denoise(x, t):
            return fn(x, t, task=objective.model_task(t), level=objective.noise_level(t))

        shape = (labels.shape[0], m.input_size, m.input_size, m.in_channels)
        x, calls = samplers.run(s.sampler, objective, denoise, shape, rng, s)
        return (x, calls) if count_calls else x

    return run


def restore_params(config, workdir: str, mesh, use_ema: bool = True):
    """(DiffusionModel, params sharded on `mesh`, step) from WORKDIR's newest valid
    checkpoint, which must be of this config's model (`checkpoint.Checkpoints` verifies
    it and falls back to older ones). Reads only the EMA (or raw) params. A workdir
    without checkpoints reads those of `init_from` if set (`imported_params`)."""
    if config.init_from and not checkpoint.has_checkpoint(workdir):
        return imported_params(config, mesh, use_ema)
    checkpoint.require_checkpoint(workdir, signature(config))
    dm = from_config(config)
    abstract, shardings = dm.param_layout(mesh)
    target = checkpoint.restore_target(abstract, shardings)
    ckpt = checkpoint.Checkpoints(workdir, read_only=True)
    try:
        params, step = ckpt.restore_params(target, "ema_params" if use_ema else "params")
    finally:
        ckpt.close()
    return dm, params, step


def imported_params(config, mesh, use_ema: bool = True):
    """(DiffusionModel, params sharded on `mesh`, step) from `config.init_from`, an
    official-layout PyTorch file that `config.validate` found to hold this model; step is
    its optimizer's step count, 0 if it has none."""
    dm = from_config(config)
    ckpt = interop.open_checkpoint(config.init_from)
    _, shardings = dm.param_layout(mesh)
    params = sharding.from_host(dm.from_per_block(ckpt.params(ema=use_ema)), shardings)
    logging.info(
        "Read the %s params of %s: %s",
        "EMA" if use_ema else "raw",
        config.init_from,
        ckpt.summary(alphas=(4.0, config.model.routing.alpha)),
    )
    return dm, params, ckpt.step or 0
