"""Orbax checkpoints of the whole train state plus a JSON record of the run.

Layout: WORKDIR/checkpoints/<step>/{state,meta}. `state` is the train-state
pytree (params, EMA, optimizer and UW state, step); `meta` holds the config
and the model signature (what the params mean), which a resumed run and every
reading mode must match. Restoring takes an abstract target carrying the
shardings of the current mesh, so a checkpoint restores onto any number of
devices.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from dtr_jax import files
from dtr_jax.errors import ConfigError


def checkpoint_dir(workdir: str) -> epath.Path:
    return files.resolve(workdir) / "checkpoints"


class Checkpoints:
    """A thin CheckpointManager wrapper with the save/restore calls training needs."""

    def __init__(
        self,
        workdir: str,
        *,
        max_to_keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=0 if read_only else 1,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            checkpoint_dir(workdir), options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self._manager.save(step, args=args, force=force)

    def restore(self, abstract_state, step: int | None = None):
        """The state at `step` (default latest), laid out as `abstract_state` says."""
        step = self.latest_step() if step is None else step
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self._manager.restore(step, args=args).state

    def restore_params(self, target, which: str = "ema_params", step: int | None = None):
        """Only `which` ('ema_params' or 'params') of the saved state, laid out as `target`
        (ShapeDtypeStructs with shardings); the optimizer state is never read."""
        step = self.latest_step() if step is None else step
        item = {which: target}
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), item)
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        return self._manager.restore(step, args=ocp.args.Composite(state=args)).state[which]

    def meta(self, step: int | None = None) -> dict | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        return self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        ).meta

    def reached_preemption(self, step: int) -> bool:
        """True on every host once a preemption notice (SIGTERM on pods) is shared."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def check_workdir(workdir: str, signature: dict) -> None:
    """Refuses a workdir we cannot write, or one holding another model's checkpoints.

    Reads only; writes nothing, so a refused workdir is left exactly as it was.
    """
    if not files.is_remote(workdir):
        _check_local_writable(workdir)
    if checkpoint_dir(workdir).is_dir():
        _check_signature(workdir, signature)


def require_checkpoint(workdir: str, signature: dict) -> int:
    """The latest step of WORKDIR's checkpoints, which must be of this model."""
    step = None
    if checkpoint_dir(workdir).is_dir():
        step = _check_signature(workdir, signature)
    if step is None:
        raise ConfigError([f"--workdir={workdir} holds no checkpoint: train first (--mode train)"])
    return step


def _check_signature(workdir: str, signature: dict) -> int | None:
    """Latest step (None if none), after checking its model signature against ours."""
    ckpt = Checkpoints(workdir, read_only=True)
    try:
        step, meta = ckpt.latest_step(), ckpt.meta()
    finally:
        ckpt.close()
    theirs = _flat((meta or {}).get("signature", signature))
    ours = _flat(signature)
    diffs = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if diffs:
        detail = ", ".join(
            f"{k}: checkpoint {theirs.get(k)!r} vs config {ours.get(k)!r}" for k in diffs
        )
        raise ConfigError(
            [
                f"--workdir={workdir} holds checkpoints of a different model "
                f"({detail}); use a new workdir or the matching config"
            ]
        )
    return step


def _check_local_writable(workdir: str) -> None:
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError([f"--workdir={workdir} is a file, not a directory"])
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError([f"--workdir={workdir} cannot be created: {existing} is a file"])
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError([f"--workdir={workdir} is not writable ({existing} refuses writes)"])


def _flat(signature: dict) -> dict:
    """{'routing.beta': 0.8, ...}: nested signature fields by their dotted names."""
    return traverse_util.flatten_dict(signature, sep=".")


def restore_target(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings, for StandardRestore."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
