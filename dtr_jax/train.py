"""Training: the loop around the jitted step of `dtr_jax.step`.

Each iteration runs the step on the next global batch (under a transfer guard:
the hot path never moves data between host and device implicitly), then the
periodic actions: log, sample grid, evaluation, checkpoint, progress, profile.
Ours are due every N steps of their config field and at the last step (`due`);
clu's progress report and profiler keep their own schedules.
Metrics stay on device until the log action fetches an interval of them at once.
A run resumes from WORKDIR's latest checkpoint exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable

import flax
import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from dtr_jax import (
    checkpoint,
    decoders,
    distributed,
    evaluate,
    files,
    lock,
    plots,
    routing,
    sample,
    sharding,
)
from dtr_jax import config as config_lib
from dtr_jax import step as step_lib
from dtr_jax.data import get_source
from dtr_jax.data.pipeline import device_batches
from dtr_jax.errors import CheckpointError, TrainingDiverged
from dtr_jax.step import TrainSetup, TrainState


def due(step: int, every: int, last: int) -> bool:
    """Whether an action of period `every` (0 = never) runs at `step`: every `every`
    steps, and at the last step."""
    return bool(every) and (step % every == 0 or step == last)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> TrainState:
    """Trains (resuming from WORKDIR if it holds a checkpoint); returns the final state.

    A run that reaches num_train_steps also writes WORKDIR/ema_params.msgpack,
    WORKDIR/samples.png (a row of EMA samples per class) and
    WORKDIR/loss_by_timestep.png. `devices` (default: all) lets a caller train
    on a subset.
    """
    devices = jax.devices() if devices is None else devices
    config_lib.validate(config, len(devices), mode="train")
    setup = step_lib.create_setup(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    abstract, shardings = step_lib.state_layout(setup, mesh)
    checkpoint.check_workdir(workdir, config_lib.signature(config), abstract)
    c = config.checkpoint
    with lock.WorkdirLock(workdir, c.lock_lease_secs):
        ckpt = checkpoint.Checkpoints(
            workdir, max_to_keep=c.max_to_keep, async_save=c.async_save, owner=True
        )
        writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
        try:
            state = _train(Run(setup, mesh, abstract, shardings, ckpt, writer, workdir))
            ckpt.wait()  # the last save is committed before the run reports success
            return state
        except Exception as e:
            if distributed.as_lost_peer(e, "train", workdir):  # modes.run reports it
                ckpt.abandon()  # a save in flight would wait for the lost process
            raise
        finally:
            ckpt.close()
            writer.flush()


@dataclasses.dataclass(frozen=True)
class Run:
    """What one training run holds fixed: what the step computes with, the mesh and the
    state's layout on it, and where the run writes."""

    setup: TrainSetup
    mesh: jax.sharding.Mesh
    abstract: TrainState  # shapes and dtypes of the state
    shardings: TrainState  # and where each array lives
    ckpt: checkpoint.Checkpoints
    writer: metric_writers.MetricWriter
    workdir: str


def _train(run: Run) -> TrainState:
    setup, mesh, ckpt, writer, cfg = run.setup, run.mesh, run.ckpt, run.writer, run.setup.config
    state = _restore_or_create(run)
    start = int(jax.device_get(state.step))
    if start >= cfg.num_train_steps:
        logging.warning(
            "The checkpoint is at step %d, num_train_steps=%d: nothing to train; writing the "
            "final outputs of step %d",
            start,
            cfg.num_train_steps,
            start,
        )
    step_fn = step_lib.jit_train_step(setup, mesh, run.shardings)
    rep = sharding.replicated(mesh)
    tables = None if setup.dm.tables is None else jax.device_put(setup.dm.tables, rep)
    batches = device_batches(get_source(cfg), cfg, sharding.batch_sharding(mesh), start)
    sampler = _SamplerCache(setup, mesh)
    decode = decoders.create(cfg, mesh)  # loads a VAE once, before the first step
    log = MetricsLog(writer, setup, start, last_good=ckpt.last_good)
    saver = Checkpointing(ckpt, cfg, log)
    actions = [log, *_sampling_actions(setup, sampler, decode, writer), saver]
    actions += _clu_hooks(cfg, writer, run.workdir, start)
    with sharding.mesh_context(mesh), Preemption(ckpt) as preempted:
        for step in range(start + 1, cfg.num_train_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = next(batches)
                with jax.transfer_guard("disallow"):
                    state, metrics = step_fn(state, batch, tables)
            log.record(metrics)
            for action in actions:
                action(step, state)
            if preempted(step):
                saver.save(step, state, force=True)
                logging.warning("Stopped at step %d after SIGTERM; checkpoint saved.", step)
                return state
        _final_outputs(setup, state, sampler, decode, log, run.workdir)
    return state


def _restore_or_create(run: Run) -> TrainState:
    """The newest valid checkpoint's state, or (a new run) the initial one, after writing
    the run's hyperparameters and the plot of its routing tables."""
    setup, workdir = run.setup, run.workdir
    if run.ckpt.agreed_steps():
        state, step = run.ckpt.restore(checkpoint.restore_target(run.abstract, run.shardings))
        logging.info("Resuming from %s at step %d", workdir, step)
        return state
    if aside := run.ckpt.set_aside():  # a run whose every checkpoint failed: never restart
        raise CheckpointError(
            f"{workdir} holds no valid checkpoint, only damaged ones set aside "
            f"({', '.join(aside)}): a new run there would start from step 0. "
            "Inspect them, then delete them to start over, or use another --workdir"
        )
    run.writer.write_hparams(config_lib.flat_fields(setup.config))
    if setup.dm.tables is not None and jax.process_index() == 0:
        r = setup.config.model.routing
        title = f"routing {r.kind}, beta {r.beta:g}, alpha {r.alpha:g}"
        if r.kind == routing.FILE:
            title = f"routing tables of {files.resolve(r.path).name}"
        plots.routing_tables(setup.dm.tables, str(files.resolve(workdir) / "routing.png"), title)
    return step_lib.create_state(setup, run.mesh, run.shardings)


# --- periodic actions: each is called as action(step, state) after every step ----------


class MetricsLog:
    """Keeps step metrics on device; when due, fetches the interval's at once and writes
    their means with steps/s and images/s. A non-finite loss stops the run."""

    def __init__(self, writer, setup: TrainSetup, start: int, last_good: Callable):
        cfg = setup.config
        self.writer, self.boundaries, self.last_good = writer, setup.boundaries, last_good
        self.every, self.last, self.batch = (
            cfg.log_every_steps,
            cfg.num_train_steps,
            cfg.global_batch_size,
        )
        self.pending: list[dict] = []
        self.tick = (start, time.perf_counter())
        self.cluster_loss: list[float | None] = []  # of the latest interval, for the plot

    def record(self, metrics: dict) -> None:
        self.pending.append(metrics)

    def __call__(self, step: int, state: TrainState) -> None:
        if not due(step, self.every, self.last):
            return
        summary = self.check_finite(step)
        now = time.perf_counter()
        summary["steps_per_sec"] = (step - self.tick[0]) / (now - self.tick[1])
        summary["images_per_sec"] = summary["steps_per_sec"] * self.batch
        self.writer.write_scalars(step, summary)
        self.cluster_loss = [summary.get(n) for n in step_lib.cluster_names(self.boundaries)]
        self.pending, self.tick = [], (step, now)

    def check_finite(self, step: int) -> dict:
        """The summary of the pending metrics; raises TrainingDiverged if the loss is
        not finite (the run stops without saving: the last good checkpoint stays)."""
        summary = step_lib.summarize(self.pending, self.boundaries) if self.pending else {}
        if not np.isfinite(summary.get("loss", 0.0)):
            raise TrainingDiverged(
                f"loss is {summary['loss']} at step {step}: stopping without saving. "
                f"{self.last_good()}"
            )
        return summary


class Checkpointing:
    """Saves the state every checkpoint_every_steps and at the last step (async), never
    from a diverged run, and at most once per step."""

    def __init__(self, ckpt, cfg, log: MetricsLog):
        self.ckpt, self.log = ckpt, log
        self.every, self.last = cfg.checkpoint_every_steps, cfg.num_train_steps
        self.meta = dict(config=cfg.to_dict(), signature=config_lib.signature(cfg))
        self.saved = None

    def __call__(self, step: int, state: TrainState) -> None:
        self.ckpt.poll()  # commits a finished save as soon as possible
        if due(step, self.every, self.last):
            self.save(step, state)

    def save(self, step: int, state: TrainState, force: bool = False) -> None:
        if step != self.saved:
            self.log.check_finite(step)
            self.ckpt.save(step, state, self.meta, force=force)
            self.saved = step


class Every:
    """Runs fn(step, state) when `due`."""

    def __init__(self, every: int, last: int, fn: Callable[[int, TrainState], None]):
        self.every, self.last, self.fn = every, last, fn

    def __call__(self, step: int, state: TrainState) -> None:
        if due(step, self.every, self.last):
            self.fn(step, state)


class _SamplerCache:
    """The run's Sampler, built (and compiled) once, on first use."""

    def __init__(self, setup: TrainSetup, mesh):
        self.setup, self.mesh, self._sampler = setup, mesh, None

    def __call__(self, params) -> sample.Sampler:
        if self._sampler is None:
            s = self.setup.config.sample
            self._sampler = sample.Sampler(self.setup.dm, s, self.mesh, params)
        return self._sampler


def _sampling_actions(setup: TrainSetup, sampler: _SamplerCache, decode, writer) -> list[Every]:
    cfg = setup.config
    actions = []
    if cfg.sample_every_steps and decode.gives_images:

        def write_grid(step, state):
            grid = _class_grid(setup, sampler, decode, state)
            writer.write_images(step, {"samples": grid[None]})

        actions.append(Every(cfg.sample_every_steps, cfg.num_train_steps, write_grid))
    if cfg.eval_every_steps:
        evaluation = evaluate.InLoopEvaluation(cfg, decode, sampler.mesh)

        def write_metrics(step, state):
            params = state.ema_params
            writer.write_scalars(step, evaluation(sampler(params), params))

        actions.append(Every(cfg.eval_every_steps, cfg.num_train_steps, write_metrics))
    return actions


def _clu_hooks(cfg, writer, workdir: str, start: int) -> list[Callable]:
    """clu's progress report (and profiler, with profile_steps) as actions."""
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
    return [_StepHook(hook) for hook in hooks]


class _StepHook:
    """A clu periodic action (called with the step alone) as an action."""

    def __init__(self, hook: periodic_actions.PeriodicAction):
        self.hook = hook

    def __call__(self, step: int, state: TrainState) -> None:
        self.hook(step)


class Preemption:
    """SIGTERM (TPU preemption, SLURM time limit) as a stop request the loop polls.

    Single process: a signal handler sets a flag. With several processes JAX's
    preemption service catches the signal, and `reached_preemption` makes every
    host stop at the same step.
    """

    def __init__(self, ckpt):
        self.ckpt, self.requested, self._previous = ckpt, False, None

    def __enter__(self):
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def __call__(self, step: int) -> bool:
        return self.requested or (jax.process_count() > 1 and self.ckpt.reached_preemption(step))


# --- the end of a run -----------------------------------------------------------------------


def _class_grid(setup: TrainSetup, sampler: _SamplerCache, decode, state) -> np.ndarray:
    s, params = setup.config.sample, state.ema_params
    num_classes = setup.dm.model.num_classes
    return sample.class_grid(sampler(params), decode, params, num_classes, s.grid_per_class, s.seed)


def _final_outputs(setup: TrainSetup, state, sampler, decode, log: MetricsLog, workdir):
    """The trained EMA params (msgpack), a PNG grid of samples with a row per class (if the
    decoder gives images) and the plot of the loss per timestep interval."""
    out = files.resolve(workdir)
    params_path = str(out / "ema_params.msgpack")
    save_params(sharding.host_gather(state.ema_params), params_path)
    logging.info("Wrote %s", params_path)
    image = _class_grid(setup, sampler, decode, state) if decode.gives_images else None
    if jax.process_index() > 0:
        return
    if image is not None:
        scale = max(1, 128 // (setup.dm.model.input_size * decode.upscale))
        sample.save_png(str(out / "samples.png"), image, scale=scale)
    if log.cluster_loss:
        title = f"step {int(jax.device_get(state.step))}, mean over the last log interval"
        plots.loss_by_timestep(
            setup.boundaries, log.cluster_loss, str(out / "loss_by_timestep.png"), title
        )
    logging.info("Wrote the samples and plots of %s", out)


def save_params(params, path: str) -> None:
    """Writes params as msgpack (process 0), atomically: a crash never leaves half a file."""
    if jax.process_index() == 0:
        files.write_atomically(path, flax.serialization.to_bytes(jax.device_get(params)))
