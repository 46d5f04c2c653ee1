"""The training step: the train state, what the config fixes, and the jitted sharded step.

`create_setup(config)` gathers what the step computes with (model, routing tables,
objective, optimizers, timestep clusters); `create_state` initialises the state
straight into its shardings (or imports it from `init_from`, a PyTorch file);
`jit_train_step` is one `jax.jit` over a
(data, fsdp) mesh with the state donated. Needs jax, flax, optax and the config:
no TensorFlow, clu or grain (the loop around it, `dtr_jax.train`, adds those).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from dtr_jax import inference, interop, optimizer, sharding, weighting


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    uw_log_vars: jax.Array | None  # (K,) UW log-variances s_k; None unless weighting.kind='uw'
    uw_opt_state: Any


@dataclasses.dataclass(frozen=True, eq=False)
class TrainSetup:
    """What the step computes with, fixed by the config (no arrays on device)."""

    config: ml_collections.ConfigDict
    dm: inference.DiffusionModel  # the DiT, its routing tables, its objective
    tx: optax.GradientTransformation
    learning_rate: optax.Schedule
    uw_tx: optax.GradientTransformation
    snr: np.ndarray  # SNR per task (ddpm: per timestep)
    boundaries: np.ndarray  # task clusters: UW's, and the loss-per-cluster bins

    @property
    def uses_uw(self) -> bool:
        return self.config.weighting.kind == "uw"


def create_setup(config) -> TrainSetup:
    dm = inference.from_config(config)
    tx, lr = optimizer.create(config.optimizer)
    w, objective = config.weighting, dm.diffusion
    return TrainSetup(
        config=config,
        dm=dm,
        tx=tx,
        learning_rate=lr,
        uw_tx=weighting.uw_optimizer(w.uw_learning_rate),
        snr=objective.snr_table(),
        boundaries=objective.cluster_boundaries(w.clustering, w.num_clusters),
    )


def init_state(setup: TrainSetup, rng: jax.Array) -> TrainState:
    """A fresh state; params keep their logical-partitioning boxes (for shardings).
    The EMA starts as a copy of the params (SPEC §6)."""
    params = setup.dm.init_params(rng)
    log_vars = weighting.init_log_vars(len(setup.boundaries) - 1) if setup.uses_uw else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=setup.tx.init(params),
        uw_log_vars=log_vars,
        uw_opt_state=None if log_vars is None else setup.uw_tx.init(log_vars),
    )


def state_layout(setup: TrainSetup, mesh) -> tuple[TrainState, TrainState]:
    """(abstract unboxed state, its shardings) without allocating anything."""
    boxed = jax.eval_shape(functools.partial(init_state, setup), jax.random.key(0))
    return nn.unbox(boxed), sharding.logical_shardings(boxed, mesh)


def create_state(setup: TrainSetup, mesh, shardings) -> TrainState:
    """The state a new run starts from, initialised directly into its shardings (no host
    copy); with `init_from`, its params, EMA, and AdamW and UW state where the file has
    them, replace the fresh ones (`import_state`)."""
    init = jax.jit(lambda rng: nn.unbox(init_state(setup, rng)), out_shardings=shardings)
    with sharding.mesh_context(mesh):
        state = init(jax.random.key(setup.config.seed))
    return import_state(setup, state, shardings) if setup.config.init_from else state


def import_state(setup: TrainSetup, state: TrainState, shardings) -> TrainState:
    """`state` with what `init_from` holds: params and EMA params (a single set of weights
    is both), the AdamW moments and step count (fine-tuning continues them; the learning
    rate schedule and the run's step start at 0), the UW log-variances and their moments.
    The rest stays fresh; the log says which parts came from the file."""
    cfg, put = setup.config, sharding.from_host
    ckpt = interop.open_checkpoint(cfg.init_from)
    state = state.replace(
        params=put(setup.dm.from_per_block(ckpt.params(ema=False)), shardings.params),
        ema_params=put(setup.dm.from_per_block(ckpt.params(ema=True)), shardings.ema_params),
    )
    one = ckpt.state_dicts["ema"] is ckpt.state_dicts["model"]
    imported = ["params and EMA params (one set of weights)" if one else "params, EMA params"]
    fresh, unused = [], []
    adam, uw_adam = ckpt.adam()

    def layout(moments):  # the AdamW moments, laid out as this model's params
        mu, nu = setup.dm.from_per_block(moments.mu), setup.dm.from_per_block(moments.nu)
        return dataclasses.replace(moments, mu=mu, nu=nu)

    if adam is None:
        fresh.append("AdamW state")
    else:
        state = state.replace(
            opt_state=put(interop.with_adam(state.opt_state, layout(adam)), shardings.opt_state)
        )
        imported.append(f"AdamW moments at step {adam.count} (there: {adam.settings})")
    log_vars = ckpt.uw_log_vars()
    if not setup.uses_uw:
        unused += [] if log_vars is None else ["UW log-variances (weighting.kind is not 'uw')"]
    elif log_vars is None:
        fresh.append("UW log-variances and their AdamW state")
    else:
        state = state.replace(uw_log_vars=put(log_vars, shardings.uw_log_vars))
        imported.append("UW log-variances")
        if uw_adam is None:
            fresh.append("the UW AdamW state")
        else:
            uw_opt = interop.with_adam(state.uw_opt_state, uw_adam)
            state = state.replace(uw_opt_state=put(uw_opt, shardings.uw_opt_state))
            imported.append("their AdamW moments")
    logging.info(
        "Starting from %s, a %s. Imported: %s. Fresh: %s. Not used: %s.",
        cfg.init_from,
        ckpt.summary(alphas=(4.0, cfg.model.routing.alpha)),
        ", ".join(imported),
        ", ".join(fresh) or "nothing",
        ", ".join(unused) or "nothing",
    )
    return state


LATENT_STREAM = 1  # fold_in of a step's key: the draws of latents from stored posteriors


def model_inputs(batch: dict, num_classes: int, rng: jax.Array):
    """(x0, labels) of a global batch. x0 is `image`, or, for extracted latents, a draw
    `mean + std * noise` from the VAE posterior (float32). A model of one class
    (unconditional) sees label 0 whatever the data's labels."""
    if "image" in batch:
        x0 = batch["image"]
    else:
        mean, std = batch["mean"].astype(jnp.float32), batch["std"].astype(jnp.float32)
        x0 = mean + std * jax.random.normal(rng, mean.shape, jnp.float32)
    y = batch["label"] if num_classes > 1 else jnp.zeros_like(batch["label"])
    return x0, y


def train_step(setup: TrainSetup, state: TrainState, batch: dict, tables):
    """One optimiser step on a global batch: (new state, metrics kept on device).

    The times (timesteps), the noise, the label dropout and the latent draws of step k
    depend only on (seed, k), so a resumed run repeats an uninterrupted one exactly. The
    objective computes the loss terms; the weighting sees its task rows.
    """
    cfg, dm, objective = setup.config, setup.dm, setup.dm.diffusion
    rng = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
    t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
    latent_rng = jax.random.fold_in(rng, LATENT_STREAM)  # t, noise and dropout stay as they were
    x0, y = model_inputs(batch, dm.model.num_classes, latent_rng)
    stratified = setup.boundaries if setup.uses_uw else None
    t = objective.sample_times(t_rng, x0.shape[0], stratified)
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    w = cfg.weighting

    def loss_fn(params, log_vars):
        def model_fn(x_t, t_model, task=None):
            variables = {"params": params}
            rngs = {"dropout": drop_rng}
            routed = {} if task is None else {"task": task}
            return dm.model.apply(
                variables, x_t, t_model, y, tables, train=True, rngs=rngs, **routed
            )

        terms = objective.training_losses(model_fn, x0, t, noise)
        loss, aux = weighting.combine(
            w.kind,
            terms["mse"],
            terms["vb"],
            objective.task_rows(t),
            setup.snr,
            gamma=w.gamma,
            k=w.k,
            log_vars=log_vars,
            boundaries=setup.boundaries,
        )
        return loss, (terms, aux)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (loss, (terms, aux)), (grads, uw_grads) = grad_fn(state.params, state.uw_log_vars)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    log_vars, uw_opt_state = state.uw_log_vars, state.uw_opt_state
    if setup.uses_uw:
        uw_updates, uw_opt_state = setup.uw_tx.update(uw_grads, uw_opt_state, log_vars)
        log_vars = optax.apply_updates(log_vars, uw_updates)
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        ema_params=optimizer.ema_update(state.ema_params, params, cfg.optimizer.ema_decay),
        opt_state=opt_state,
        uw_log_vars=log_vars,
        uw_opt_state=uw_opt_state,
    )
    metrics = dict(
        loss=loss,
        mse=terms["mse"].mean(),
        vb=terms["vb"].mean(),
        grad_norm=optax.global_norm(grads),
        learning_rate=setup.learning_rate(state.step),
        cluster_loss_sum=aux["cluster_loss_sum"],
        cluster_count=aux["cluster_count"],
    )
    if setup.uses_uw:
        metrics["uw_weight"] = jnp.exp(-log_vars)
    return new_state, metrics


def jit_train_step(setup: TrainSetup, mesh, shardings):
    """The sharded step: state donated, batch split over (data, fsdp), tables replicated."""
    batch = sharding.batch_sharding(mesh)
    rep = sharding.replicated(mesh)
    return jax.jit(
        functools.partial(train_step, setup),
        in_shardings=(shardings, batch, rep),  # every array of the batch split alike
        out_shardings=(shardings, rep),
        donate_argnums=(0,),
    )


def summarize(metrics: list[dict], boundaries) -> dict:
    """Host-side means over a log interval, with per-cluster losses split out."""
    m = jax.device_get(metrics)
    out = {k: float(np.mean([x[k] for x in m])) for k in ("loss", "mse", "vb", "grad_norm")}
    out["learning_rate"] = float(m[-1]["learning_rate"])
    sums = np.sum([x["cluster_loss_sum"] for x in m], 0)
    counts = np.sum([x["cluster_count"] for x in m], 0)
    for k, name in enumerate(cluster_names(boundaries)):
        if counts[k]:
            out[name] = float(sums[k] / counts[k])
    if "uw_weight" in m[-1]:
        for k, v in enumerate(m[-1]["uw_weight"]):
            out[f"uw_weight/{k}"] = float(v)
    return out


def cluster_names(boundaries) -> list[str]:
    """The metric name of each timestep cluster: 'cluster_loss/<k>_t<first>-<last>'."""
    pairs = zip(boundaries[:-1], boundaries[1:], strict=True)
    return [f"cluster_loss/{k}_t{lo}-{hi - 1}" for k, (lo, hi) in enumerate(pairs)]
