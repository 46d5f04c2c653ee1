"""Training: the train state, the jitted sharded step and the loop around it.

One `jax.jit` with NamedShardings over a (data, fsdp) mesh runs the whole
step; the state is donated. The loop never waits for the devices between log
points: metrics stay on device until `log_every_steps` fetches them together.
The step (make_task, state_layout, jit_train_step) needs only jax, flax, optax
and ml_collections; the loop adds clu, grain and orbax.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from dtr_jax import checkpoint, config as config_lib, sample, sharding, weighting
from dtr_jax.diffusion import GaussianDiffusion
from dtr_jax.models import from_config


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    uw_log_vars: jax.Array | None  # (K,) UW log-variances s_k; None unless weighting.kind='uw'
    uw_opt_state: Any


@dataclasses.dataclass(frozen=True)
class Task:
    """Everything the step needs that follows from the config (no arrays on device)."""

    config: ml_collections.ConfigDict
    model: nn.Module
    tables: np.ndarray | None  # (G, T, C) routing tables, or None
    diffusion: GaussianDiffusion
    tx: optax.GradientTransformation
    uw_tx: optax.GradientTransformation
    learning_rate: optax.Schedule
    snr: np.ndarray
    boundaries: np.ndarray  # timestep clusters: UW's, and the loss-per-cluster bins

    @property
    def uses_uw(self) -> bool:
        return self.config.weighting.kind == "uw"


def make_task(config) -> Task:
    model, tables = from_config(config)
    diffusion = GaussianDiffusion.create(
        config.diffusion.schedule,
        config.diffusion.num_timesteps,
        learn_sigma=config.model.learn_sigma,
    )
    o = config.optimizer
    lr = optax.constant_schedule(o.learning_rate)
    if o.warmup_steps:  # linear from 0, then constant
        warmup = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
        lr = optax.join_schedules([warmup, lr], [o.warmup_steps])
    tx = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    if o.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
    w = config.weighting
    return Task(
        config=config,
        model=model,
        tables=tables,
        diffusion=diffusion,
        tx=tx,
        uw_tx=weighting.uw_optimizer(w.uw_learning_rate),
        learning_rate=lr,
        snr=weighting.snr(diffusion.alphas_cumprod),
        boundaries=weighting.cluster_boundaries(
            w.clustering, diffusion.alphas_cumprod, w.num_clusters
        ),
    )


def init_state(task: Task, rng: jax.Array) -> TrainState:
    """A fresh state; params keep their logical-partitioning boxes (for shardings)."""
    m = task.model
    x = jnp.zeros((1, m.input_size, m.input_size, m.in_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    params = m.init(rng, x, t, t, task.tables)["params"]
    log_vars = weighting.init_log_vars(len(task.boundaries) - 1) if task.uses_uw else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=task.tx.init(params),
        uw_log_vars=log_vars,
        uw_opt_state=None if log_vars is None else task.uw_tx.init(log_vars),
    )


def state_layout(task: Task, mesh) -> tuple[TrainState, TrainState]:
    """(abstract unboxed state, its shardings) without allocating anything."""
    boxed = jax.eval_shape(functools.partial(init_state, task), jax.random.key(0))
    return nn.unbox(boxed), sharding.logical_shardings(boxed, mesh)


def create_state(task: Task, mesh, shardings) -> TrainState:
    """Initialises the state directly into its shardings (no host copy)."""
    init = jax.jit(lambda rng: nn.unbox(init_state(task, rng)), out_shardings=shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        return init(jax.random.key(task.config.seed))


def restore_params(config, workdir: str, mesh, use_ema: bool = True):
    """(task, params, step) from WORKDIR's latest checkpoint, params sharded on `mesh`.

    Reads only the EMA (or raw) params, never the optimizer state.
    """
    step = checkpoint.require_checkpoint(workdir, config_lib.model_signature(config))
    task = make_task(config)
    abstract, shardings = state_layout(task, mesh)
    target = checkpoint.restore_target(abstract.params, shardings.params)
    ckpt = checkpoint.Checkpoints(workdir, read_only=True)
    try:
        params = ckpt.restore_params(target, "ema_params" if use_ema else "params", step)
    finally:
        ckpt.close()
    return task, params, step


def train_step(task: Task, state: TrainState, batch: dict, tables) -> tuple[TrainState, dict]:
    """One optimiser step on a global batch; returns the new state and device metrics."""
    cfg = task.config
    rng = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
    t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
    x0, y = batch["image"], batch["label"]
    t = weighting.sample_timesteps(
        t_rng, x0.shape[0], task.diffusion.num_timesteps, task.boundaries if task.uses_uw else None
    )
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    w = cfg.weighting

    def loss_fn(params, log_vars):
        def model_fn(x_t, t_model):
            return task.model.apply(
                {"params": params}, x_t, t_model, y, tables, train=True, rngs={"dropout": drop_rng}
            )

        terms = task.diffusion.training_losses(model_fn, x0, t, noise)
        loss, _ = weighting.combine(
            w.kind,
            terms["mse"],
            terms["vb"],
            t,
            task.snr,
            gamma=w.gamma,
            k=w.k,
            log_vars=log_vars,
            boundaries=task.boundaries,
        )
        return loss, terms

    (loss, terms), (grads, uw_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        state.params, state.uw_log_vars
    )
    updates, opt_state = task.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    log_vars, uw_opt_state = state.uw_log_vars, state.uw_opt_state
    if task.uses_uw:
        uw_updates, uw_opt_state = task.uw_tx.update(uw_grads, uw_opt_state, log_vars)
        log_vars = optax.apply_updates(log_vars, uw_updates)
    decay = cfg.optimizer.ema_decay
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        ema_params=ema,
        opt_state=opt_state,
        uw_log_vars=log_vars,
        uw_opt_state=uw_opt_state,
    )
    return new_state, _step_metrics(task, state, loss, terms, t, grads, new_state)


def _step_metrics(task, state, loss, terms, t, grads, new_state) -> dict:
    per_sample = terms["mse"] + terms["vb"]
    onehot = jax.nn.one_hot(weighting.cluster_index(t, task.boundaries), len(task.boundaries) - 1)
    metrics = dict(
        loss=loss,
        mse=terms["mse"].mean(),
        vb=terms["vb"].mean(),
        grad_norm=optax.global_norm(grads),
        learning_rate=task.learning_rate(state.step),
        cluster_loss_sum=onehot.T @ per_sample,
        cluster_count=onehot.sum(0),
    )
    if task.uses_uw:
        metrics["uw_weight"] = jnp.exp(-new_state.uw_log_vars)
    return metrics


def jit_train_step(task: Task, mesh, shardings):
    """The sharded step: state donated, batch split over (data, fsdp), tables replicated."""
    batch = sharding.batch_sharding(mesh)
    rep = sharding.replicated(mesh)
    return jax.jit(
        functools.partial(train_step, task),
        in_shardings=(shardings, {"image": batch, "label": batch}, rep),
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
    for k, (lo, hi) in enumerate(zip(boundaries[:-1], boundaries[1:])):
        if counts[k]:
            out[f"cluster_loss/{k}_t{lo}-{hi - 1}"] = float(sums[k] / counts[k])
    if "uw_weight" in m[-1]:
        for k, v in enumerate(m[-1]["uw_weight"]):
            out[f"uw_weight/{k}"] = float(v)
    return out


class _Preemption:
    """Turns SIGTERM into a flag the loop checks (a save, then a clean exit).

    Single process only: with several, JAX's preemption service catches the
    signal and `reached_preemption` makes every host stop at the same step.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> TrainState:
    """Trains (resuming from WORKDIR if it holds a checkpoint); returns the final state.

    A run that reaches num_train_steps also writes WORKDIR/ema_params.msgpack
    and WORKDIR/samples.png (one row of EMA samples per class). `devices`
    (default: all) lets a caller train on a subset.
    """
    devices = jax.devices() if devices is None else devices
    config_lib.validate(config, len(devices), mode="train")
    checkpoint.check_workdir(workdir, config_lib.model_signature(config))
    task = make_task(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    abstract, shardings = state_layout(task, mesh)
    ckpt = checkpoint.Checkpoints(
        workdir, max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save
    )
    if ckpt.latest_step() is not None:
        logging.info("Resuming from %s at step %d", workdir, ckpt.latest_step())
        state = ckpt.restore(checkpoint.restore_target(abstract, shardings))
    else:
        state = create_state(task, mesh, shardings)
    start = int(jax.device_get(state.step))
    from clu import metric_writers  # the loop's I/O; the step itself needs only jax/optax

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start == 0:
        writer.write_hparams(_flat(config))
    try:
        state = _loop(task, mesh, shardings, state, start, ckpt, writer, workdir)
    finally:
        ckpt.wait()
        ckpt.close()
        writer.flush()
    if int(jax.device_get(state.step)) == config.num_train_steps:
        _final_outputs(task, state, mesh, workdir)
    return state


def _final_outputs(task: Task, state: TrainState, mesh, workdir: str) -> None:
    """The trained EMA params (msgpack) and a PNG grid of samples, one row per class."""
    out = checkpoint.workdir_path(workdir)
    params_path = str(out / "ema_params.msgpack")
    save_params(sample.host_gather(state.ema_params), params_path)
    logging.info("Wrote %s", params_path)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        image = _sample_grid(task, sample.Sampler(task, mesh, state.ema_params), state.ema_params)
    if image is not None and jax.process_index() == 0:
        png = str(out / "samples.png")
        sample.save_png(png, image, scale=max(1, 128 // task.model.input_size))
        logging.info("Wrote %s", png)


def _sample_grid(task: Task, sampler, params):
    """A uint8 grid (a row per class) if the config's decoder gives pixels, else None."""
    s = task.config.sample
    if not sample.gives_pixels(s.decoder):
        logging.info("No sample grid: sample.decoder=%r does not give pixels.", s.decoder)
        return None
    return sample.class_grid(sampler, params, task.model.num_classes, s.grid_per_class, s.seed)


def _loop(task, mesh, shardings, state, start, ckpt, writer, workdir):
    cfg = task.config
    step_fn = jit_train_step(task, mesh, shardings)
    tables = None if task.tables is None else jax.device_put(task.tables, sharding.replicated(mesh))
    from clu import periodic_actions

    from dtr_jax import evaluate
    from dtr_jax.data import device_batches, get_source

    batches = device_batches(get_source(cfg), cfg, sharding.batch_sharding(mesh), start)
    meta = dict(config=cfg.to_dict(), signature=config_lib.model_signature(cfg))
    hooks = [
        periodic_actions.ReportProgress(
            num_train_steps=cfg.num_train_steps, writer=writer, every_steps=cfg.log_every_steps
        )
    ]
    if cfg.profile_steps and jax.process_index() == 0:
        hooks.append(
            periodic_actions.Profile(
                logdir=workdir,
                num_profile_steps=cfg.profile_steps,
                first_profile=start + 10,
                every_secs=None,
            )
        )
    preemption = _Preemption()
    sampler = None  # built on first use, then reused: one compilation
    evaluator = evaluate.InLoopEvaluator(cfg) if cfg.eval_every_steps else None
    pending, tick, tick_step = [], time.perf_counter(), start
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
            for step in range(start + 1, cfg.num_train_steps + 1):
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, metrics = step_fn(state, next(batches), tables)
                pending.append(metrics)
                for hook in hooks:
                    hook(step)
                last = step == cfg.num_train_steps

                def due(every: int) -> bool:
                    return bool(every) and (step % every == 0 or last)

                if due(cfg.log_every_steps):
                    summary = summarize(pending, task.boundaries)
                    _check_finite(summary, step, ckpt)
                    now = time.perf_counter()
                    summary["steps_per_sec"] = (step - tick_step) / (now - tick)
                    summary["images_per_sec"] = summary["steps_per_sec"] * cfg.global_batch_size
                    writer.write_scalars(step, summary)
                    pending, tick, tick_step = [], now, step
                if due(cfg.sample_every_steps) or due(cfg.eval_every_steps):
                    sampler = sampler or sample.Sampler(task, mesh, state.ema_params)
                if due(cfg.sample_every_steps):
                    grid = _sample_grid(task, sampler, state.ema_params)
                    if grid is not None:
                        writer.write_images(step, {"samples": grid[None]})
                if due(cfg.eval_every_steps):
                    writer.write_scalars(step, evaluator(sampler, state.ema_params))
                stop = preemption.requested or (
                    jax.process_count() > 1 and ckpt.reached_preemption(step)
                )
                if step % cfg.checkpoint_every_steps == 0 or last or stop:
                    if pending:  # never write a checkpoint from a diverged run
                        _check_finite(summarize(pending, task.boundaries), step, ckpt)
                    ckpt.save(step, state, meta, force=stop)
                if stop:
                    logging.warning("Stopped at step %d after SIGTERM; checkpoint saved.", step)
                    break
    finally:
        preemption.restore()
    return state


def _check_finite(summary: dict, step: int, ckpt) -> None:
    if not np.isfinite(summary["loss"]):
        raise FloatingPointError(
            f"loss is {summary['loss']} at step {step}: stopping without saving; the last good "
            f"checkpoint is step {ckpt.latest_step()}"
        )


def _flat(config) -> dict:
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            if isinstance(v, (dict, ml_collections.ConfigDict)):
                walk(f"{prefix}{k}.", v)
            else:
                flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk("", config)
    return flat


def save_params(params, path: str) -> None:
    """Writes params as msgpack (process 0), atomically: a crash never leaves half a file."""
    if jax.process_index() == 0:
        checkpoint.write_atomically(path, flax.serialization.to_bytes(jax.device_get(params)))
