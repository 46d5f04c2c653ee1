"""Verified Orbax checkpoints of the whole train state, with a commit protocol of our own.

Layout: WORKDIR/checkpoints/<step>/{state, meta, commit.json}. `state` is the
train-state pytree (params, EMA, optimizer and UW state, step); `meta` holds the
config and the model signature (what the params mean), which a resumed run and
every reading mode must match. Restoring takes an abstract target carrying the
shardings of the current mesh, so a checkpoint restores onto any number of devices.

Commit protocol (holds on object stores without atomic renames, e.g. gs://): a step
counts only once `commit.json` exists in its directory, and that file is written
last, after Orbax has finished every write of every host. It records a checksum,
shape and dtype of every array. A step directory without it (a crash or a full disk
mid-save) is ignored, and removed by the trainer that owns the workdir.

Verified restore: the newest committed step is restored and each array is checked
against its recorded checksum, and floating arrays for finiteness. A checkpoint that
fails (truncated, corrupted, missing an item, unreadable) is reported by path and
reason, and the next older one is tried. Nothing is ever deleted or overwritten
because it failed: the trainer moves it aside to `<step>.corrupt` (read-only modes
leave it in place), so the step can be written again. Checkpoints are deleted only
by retention (`max_to_keep`), and only once a newer one is committed.

Several processes (multi-host): Orbax's save and restore are collectives (every
process calls them for the same steps), so every decision that leads into one is
taken alike on all: which steps exist is what process 0 lists (`agreed_steps`), and a
read that fails on one host fails on all (`sharding.all_hosts_agree`). Committing and
retention are process 0's alone and enter no collective: each process finishes its
part of an asynchronous save when it gets to it (`poll`), and process 0 writes the
commit record, then deletes what retention drops by itself (no Orbax `delete`, which
is a collective).
"""

from __future__ import annotations

import datetime
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util

from dtr_jax import files, routing, sharding
from dtr_jax.errors import CheckpointError, TrainingDiverged, WorkdirError, integer_problems

COMMIT = "commit.json"
COMMIT_FORMAT = 1
CORRUPT_SUFFIX = ".corrupt"
ITEMS = ("state", "meta")


def problems(max_to_keep) -> list[str]:
    """Problems with the checkpoint section's own fields (the lock's: `lock.problems`)."""
    return integer_problems("max_to_keep", max_to_keep)


def checkpoint_dir(workdir: str) -> epath.Path:
    return files.resolve(workdir) / "checkpoints"


def committed_steps(directory: epath.Path) -> list[int]:
    """The steps of a checkpoint directory whose commit record exists, oldest first, as
    this process sees them (no collective)."""
    if not directory.is_dir():
        return []
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
    return sorted(s for s in steps if (directory / str(s) / COMMIT).exists())


# --- array checksums, computed on the devices ------------------------------------------


def _leaf_digest(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(checksum (2,) uint32, all finite) of one array, independent of its sharding.

    The checksum is (sum of the bit patterns, sum of bit pattern x (2 * position + 1)),
    both mod 2^32: any single flipped bit, and any swap of two different elements,
    changes it.
    """
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    position = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):
        position += jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride)
        stride *= x.shape[axis]
    checksum = jnp.stack(
        [bits.sum(dtype=jnp.uint32), (bits * (2 * position + 1)).sum(dtype=jnp.uint32)]
    )
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.bool_(True)
    return checksum, finite


@jax.jit
def _digests(leaves: list[jax.Array]):
    return [_leaf_digest(x) for x in leaves]


def array_records(tree) -> dict[str, dict]:
    """{'params/blocks_0/attn/qkv/kernel': {shape, dtype, checksum, finite}} of a pytree of
    jax.Arrays; the checksums are computed where the arrays live (one small fetch)."""
    flat = traverse_util.flatten_dict(_as_dict(tree), sep="/")
    values = sharding.host_gather(_digests(list(flat.values())))
    return {
        path: dict(
            shape=list(np.shape(leaf)),
            dtype=str(leaf.dtype),
            checksum=[int(v) for v in checksum],
            finite=bool(finite),
        )
        for (path, leaf), (checksum, finite) in zip(flat.items(), values, strict=True)
    }


def _as_dict(tree) -> dict:
    """A pytree as nested dicts keyed by its path entries (dataclass fields, dict keys,
    sequence indices), leaves kept; None subtrees dropped."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        keys = [_key_name(k) for k in path]
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1] if keys else "value"] = leaf
    return out


def _key_name(key) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def layout(tree) -> dict[str, tuple[list[int], str]]:
    """{path: (shape, dtype)} of a pytree of arrays or ShapeDtypeStructs, by the paths
    `array_records` uses (nothing is computed or fetched)."""
    flat = traverse_util.flatten_dict(_as_dict(tree), sep="/")
    return {path: (list(np.shape(leaf)), str(leaf.dtype)) for path, leaf in flat.items()}


def _layout_differences(recorded: dict, expected: dict, prefix: str) -> list[str]:
    """How the arrays a checkpoint recorded (those under `prefix`) differ from the
    `expected` layout (paths relative to `prefix`): missing, unexpected, reshaped."""
    theirs = {
        path[len(prefix) :]: (r["shape"], r["dtype"])
        for path, r in recorded.items()
        if path.startswith(prefix)
    }
    out = [f"{prefix}{p} is not in the checkpoint" for p in sorted(set(expected) - set(theirs))]
    out += [
        f"{prefix}{p} is not in this config's state" for p in sorted(set(theirs) - set(expected))
    ]
    for path in sorted(set(theirs) & set(expected)):
        (shape, dtype), (want_shape, want_dtype) = theirs[path], expected[path]
        if (shape, dtype) != (want_shape, want_dtype):
            out.append(f"{prefix}{path} is {dtype}{shape} there, {want_dtype}{want_shape} here")
    return out


def _check_layout(path, recorded: dict, expected: dict, prefix: str = "") -> None:
    """Refuses (WorkdirError) a checkpoint at `path` whose recorded arrays are intact but
    not laid out as `expected`: a state of another config, never treated as damage."""
    differences = _layout_differences(recorded, expected, prefix)
    if not differences:
        return
    more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
    raise WorkdirError(
        [
            f"checkpoint {path} holds a train state laid out otherwise than this config's "
            f"({'; '.join(differences[:3])}{more}): a field that shapes the optimizer "
            "state (optimizer.grad_clip, the learning-rate schedule) or the model changed "
            "since it was written. Nothing was touched; resume with the run's config, or "
            "use a new workdir"
        ]
    )


def _verify(recorded: dict, restored: dict[str, dict], prefix: str = "") -> str | None:
    """None if every restored array matches its record (under `prefix`), else why not."""
    for path, got in restored.items():
        want = recorded.get(prefix + path)
        if want is None:
            return f"array {prefix + path} is not in its {COMMIT}"
        if (got["shape"], got["dtype"]) != (want["shape"], want["dtype"]):
            return (
                f"array {prefix + path} is {got['dtype']}{got['shape']}, "
                f"recorded {want['dtype']}{want['shape']}"
            )
        if got["checksum"] != want["checksum"]:
            return f"array {prefix + path} does not match its recorded checksum (corrupted data)"
        if not got["finite"]:
            return f"array {prefix + path} holds non-finite values"
    return None


# --- the checkpoints of a workdir -------------------------------------------------------


class Checkpoints:
    """The committed checkpoints of WORKDIR: save (async), commit, verified restore.

    `owner=True` is the trainer holding the workdir lock: it may remove unfinished
    steps and move failed checkpoints aside. Read-only users only read.
    """

    def __init__(
        self,
        workdir: str,
        *,
        max_to_keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
        owner: bool = False,
    ):
        self.directory = checkpoint_dir(workdir)
        self.max_to_keep, self.owner = max_to_keep, owner and not read_only
        self._pending: tuple[int, dict] | None = None  # saved, not yet committed
        self._abandoned = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # retention is ours: only committed steps count
            save_interval_steps=0 if read_only else 1,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=async_save,
        )
        if self.owner:
            self.remove_unfinished()
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    # --- what is there

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def committed_steps(self) -> list[int]:
        """Steps whose commit record exists, oldest first, as this process sees them."""
        return committed_steps(self.directory)

    def agreed_steps(self) -> list[int]:
        """`committed_steps` as process 0 sees them, on every process (a collective): the
        list to take a decision on that leads into Orbax's collectives."""
        return sharding.on_process_0(self.committed_steps)

    def latest_step(self) -> int | None:
        steps = self.committed_steps()
        return steps[-1] if steps else None

    def last_good(self) -> str:
        """What a failure leaves to resume from, as a sentence for its message: a save in
        flight (of a state verified finite) is committed first, if it can be."""
        try:
            self._commit_previous()
        except CheckpointError as e:  # the failure being reported matters more
            logging.error("%s", e)
        step = self.latest_step()
        if step is None:
            return "There is no committed checkpoint yet"
        return f"The last committed checkpoint is step {step}, intact"

    def unfinished(self) -> list[epath.Path]:
        """Step directories without a commit record, and Orbax's temporary directories."""
        if not self.directory.is_dir():
            return []
        committed = set(self.committed_steps())
        return sorted(
            p
            for p in self.directory.iterdir()
            if (p.name.isdigit() and int(p.name) not in committed)
            or ".orbax-checkpoint-tmp" in p.name
        )

    def remove_unfinished(self) -> None:
        """Removes what interrupted saves left (owner only: no save of ours is running)."""
        if jax.process_index() == 0:
            for path in self.unfinished():
                logging.warning("Removing the unfinished checkpoint %s (no %s)", path, COMMIT)
                path.rmtree() if path.is_dir() else path.unlink()
        sharding.sync_hosts("dtr_jax.checkpoint.remove_unfinished")

    def meta(self, step: int) -> dict:
        return self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        ).meta

    def newest_meta(self) -> tuple[int, dict] | None:
        """(step, meta) of the newest committed step whose meta every process can read."""
        for step in reversed(self.agreed_steps()):
            try:
                meta, problem = self.meta(step), None
            except Exception as e:  # an unreadable checkpoint: the restore reports it
                meta, problem = None, e
            if sharding.all_hosts_agree(problem is None):
                return step, meta
            logging.warning("Cannot read the meta of %s: %s", self.step_dir(step), problem)
        return None

    # --- saving

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> None:
        """Starts saving `state` at `step` (asynchronously); `poll`/`wait` commit it.

        Refuses a state with non-finite arrays: a diverged run never overwrites the
        last good checkpoint.
        """
        self._commit_previous()
        records = array_records(state)
        bad = [path for path, r in records.items() if not r["finite"]]
        if bad:
            raise TrainingDiverged(
                f"refusing to save step {step}: {bad[0]} (and {len(bad) - 1} more arrays) "
                f"hold non-finite values; {self.last_good()}"
            )
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            started = self._manager.save(step, args=args, force=force)
        except OSError as e:
            raise self._write_error(step, e) from e
        if started:
            self._pending = (step, records)

    def poll(self) -> None:
        """Commits a finished asynchronous save (cheap; call once per step). Each host
        decides on its own: process 0, which writes the record, finishes a save only once
        every host has written its part."""
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self._commit_previous()

    def wait(self) -> None:
        """Waits for the save in flight and commits it."""
        self._commit_previous()

    def _commit_previous(self) -> None:
        if self._pending is None:
            return
        step, records = self._pending
        self._pending = None
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
            if jax.process_index() == 0:
                record = dict(
                    format=COMMIT_FORMAT,
                    step=step,
                    time=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    arrays=records,
                )
                text = json.dumps(record, indent=1, sort_keys=True).encode()
                files.write_atomically(str(self.step_dir(step) / COMMIT), text)
        except Exception as e:  # the save failed: the step stays uncommitted
            raise self._write_error(step, e) from e
        logging.info("Committed checkpoint %s", self.step_dir(step))
        self._apply_retention()

    def _write_error(self, step: int, error: Exception) -> CheckpointError:
        return CheckpointError(
            f"could not write checkpoint {self.step_dir(step)} ({type(error).__name__}: "
            f"{error}); it stays uncommitted and is ignored. {self.last_good()}"
        )

    def _apply_retention(self) -> None:
        """Process 0 deletes the committed steps beyond the newest `max_to_keep`, each
        uncommitted first (its record removed), so that a deletion cut short leaves an
        unfinished step, never a damaged committed one. No collective: the other processes
        may be anywhere in the loop (Orbax's `delete` would wait for all of them)."""
        if not self.max_to_keep or jax.process_index() != 0:
            return
        for step in self.committed_steps()[: -self.max_to_keep]:
            (self.step_dir(step) / COMMIT).unlink()
            self.step_dir(step).rmtree()
            logging.info(
                "Deleted checkpoint %s (max_to_keep=%d)", self.step_dir(step), self.max_to_keep
            )

    # --- verified restoring

    def restore(self, abstract_state):
        """(state, step): the newest committed state that restores and verifies, laid
        out as `abstract_state` (ShapeDtypeStructs with shardings) says."""

        def load(step):
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            return self._manager.restore(step, args=args).state

        return self._first_valid(load, layout(abstract_state), prefix="")

    def restore_params(self, target, which: str = "ema_params"):
        """(params, step): only `which` ('ema_params' or 'params') of the newest valid
        checkpoint, laid out as `target`; the optimizer state is never read."""

        def load(step):
            item = {which: target}
            restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), item)
            args = ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True
            )
            return self._manager.restore(step, args=ocp.args.Composite(state=args)).state[which]

        return self._first_valid(load, layout(target), prefix=f"{which}/")

    def _first_valid(self, load, expected: dict, prefix: str):
        """The newest committed checkpoint that loads and verifies. One whose recorded
        arrays are laid out otherwise than `expected` is intact but of another state (a
        config that builds other optimizer state, say): a WorkdirError, touching nothing."""
        found = []
        for step in reversed(self.agreed_steps()):
            path = self.step_dir(step)
            tree, refused = None, None
            try:
                recorded = json.loads((path / COMMIT).read_text())["arrays"]
                problem = None
            except Exception as e:  # an unreadable record: the checkpoint is unusable
                recorded, problem = None, f"its {COMMIT} cannot be read ({_short(e)})"
            if recorded is not None:
                _check_layout(path, recorded, expected, prefix)
                try:
                    self.meta(step)
                    tree = load(step)
                except Exception as e:  # unusable, unless the store could not be read now
                    refused = e if _not_its_bytes(e) else None
                    problem = f"cannot be read ({_short(e)})"
            # Every host must take the same decisions (the checksums are collective).
            if not sharding.all_hosts_agree(refused is None):
                raise self._read_error(path, refused or RuntimeError("refused on another host"))
            if not sharding.all_hosts_agree(problem is None):
                problem = problem or "cannot be read on another host"
            if problem is None:
                problem = _verify(recorded, array_records(tree), prefix)
            if problem is None:
                if found:
                    logging.warning("Using checkpoint %s instead", path)
                return tree, step
            logging.warning("Checkpoint %s is unusable: %s", path, problem)
            found.append(f"{path}: {problem}")
            if self.owner:
                self._set_aside(step)
        unfinished = len(self.unfinished())
        detail = "".join(f"\n  - {f}" for f in found) or " none is committed"
        raise CheckpointError(
            f"no valid checkpoint in {self.directory}:{detail}"
            + (f"\n  ({unfinished} unfinished step directories ignored)" if unfinished else "")
        )

    def _read_error(self, path: epath.Path, error: Exception) -> CheckpointError:
        return CheckpointError(
            f"cannot read checkpoint {path} ({_short(error)}): the store refused access or "
            "failed, which says nothing of the checkpoint, so nothing was changed; fix the "
            "access and run again"
        )

    def set_aside(self) -> list[str]:
        """The names of the checkpoints moved aside as damaged (`<step>.corrupt[-k]`), as
        process 0 sees them, on every process (a collective)."""

        def names():
            if not self.directory.is_dir():
                return []
            return sorted(p.name for p in self.directory.iterdir() if CORRUPT_SUFFIX in p.name)

        return sharding.on_process_0(names)

    def _set_aside(self, step: int) -> None:
        """Renames a failed checkpoint to <step>.corrupt[-k], keeping its bytes for inspection."""
        if jax.process_index() == 0:
            target, k = self.directory / f"{step}{CORRUPT_SUFFIX}", 1
            while target.exists():
                target, k = self.directory / f"{step}{CORRUPT_SUFFIX}-{k}", k + 1
            self.step_dir(step).rename(target)
            logging.warning("Moved %s aside to %s", self.step_dir(step), target)
        sharding.sync_hosts(f"dtr_jax.checkpoint.aside.{step}")
        self._manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True on every host once a preemption notice (SIGTERM on pods) is shared."""
        return self._manager.reached_preemption(step)

    def abandon(self) -> None:
        """Gives up a save in flight without waiting for it (its writes wait for a process
        of the run that is gone), and makes `close` a no-op: the step stays uncommitted."""
        self._pending, self._abandoned = None, True

    def close(self) -> None:
        """Commits a save still in flight if it can (logging, not raising, if it cannot:
        `close` runs while another error may be on its way out), then closes."""
        if self._abandoned:
            return
        try:
            self._commit_previous()
        except CheckpointError as e:
            logging.error("%s", e)
        self._manager.close()


# Failures of the storage, not of a checkpoint's bytes: no reason to set it aside.
_ACCESS_ERRORS = (PermissionError, TimeoutError, ConnectionError, MemoryError)
_ACCESS_STATUSES = (
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",  # out of memory, or a quota
)


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and the errors it was raised from, outermost first."""
    out = []
    while error is not None and error not in out:
        out.append(error)
        error = error.__cause__ or error.__context__
    return out


def _not_its_bytes(error: Exception) -> bool:
    """Whether reading failed for want of access to the store (permissions, a network
    or service error, memory), which says nothing of the checkpoint itself."""
    return any(
        isinstance(e, _ACCESS_ERRORS) or any(code in str(e) for code in _ACCESS_STATUSES)
        for e in _chain(error)
    )


def _short(error: Exception, limit: int = 300) -> str:
    """The innermost error's type and message, on one line (TensorStore and Orbax wrap
    the reason, e.g. OUT_OF_RANGE for a truncated file, in generic errors)."""
    inner = _chain(error)[-1]
    text = f"{type(inner).__name__}: " + " ".join(str(inner).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- what a workdir holds -------------------------------------------------------------------


def check_workdir(workdir: str, signature: dict, state=None) -> None:
    """Refuses a workdir we cannot write, or one holding another model's checkpoints, or
    (given the abstract train `state` a run would restore) one whose newest checkpoint
    holds a state of another layout.

    Reads only; writes nothing, so a refused workdir is left exactly as it was. With
    several processes, every host must be able to write there (each writes its part of
    the checkpoints), and all of them refuse alike.
    """
    sharding.on_every_host(files.check_writable_dir, workdir, "--workdir")
    if not _has_checkpoint_dir(workdir):
        return
    step = _check_signature(workdir, signature)
    if step is not None and state is not None:
        sharding.on_process_0(
            _check_recorded_layout, str(checkpoint_dir(workdir) / str(step)), state
        )


def _check_recorded_layout(step_dir: str, state) -> None:
    """The arrays a committed step's record names must be laid out as `state` (damaged
    records pass: the verified restore reports them and falls back)."""
    record = epath.Path(step_dir) / COMMIT
    try:
        recorded = json.loads(record.read_text())["arrays"]
    except Exception:  # damaged: the verified restore reports it and falls back
        return
    _check_layout(record.parent, recorded, layout(state))


def _has_checkpoint_dir(workdir: str) -> bool:
    """Whether WORKDIR/checkpoints exists, as process 0 sees it (on every process)."""
    return sharding.on_process_0(lambda: checkpoint_dir(workdir).is_dir())


def has_checkpoint(workdir: str) -> bool:
    """Whether WORKDIR holds a committed checkpoint (the same answer on every process)."""
    return _has_checkpoint_dir(workdir) and bool(
        sharding.on_process_0(committed_steps, checkpoint_dir(workdir))
    )


def require_checkpoint(workdir: str, signature: dict) -> int:
    """The newest committed step of WORKDIR, whose model must be this one."""
    step = _check_signature(workdir, signature) if _has_checkpoint_dir(workdir) else None
    if step is None:
        raise CheckpointError(
            f"--workdir={workdir} holds no committed checkpoint: train first (--mode train)"
        )
    return step


def _check_signature(workdir: str, signature: dict) -> int | None:
    """Newest committed step (None if none), after checking its model signature."""
    ckpt = Checkpoints(workdir, read_only=True)
    try:
        newest = ckpt.newest_meta()
        steps = ckpt.agreed_steps()
    finally:
        ckpt.close()
    latest = steps[-1] if steps else None
    if newest is None:
        return latest
    if "signature" not in newest[1]:
        raise WorkdirError(
            [
                f"--workdir={workdir}: checkpoint {newest[0]} has no model signature in its "
                "meta (not written by dtr_jax?); use a new workdir"
            ]
        )
    theirs = _flat(_current_routing(newest[1]["signature"]))
    ours = _flat(signature)
    diffs = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if diffs:
        detail = ", ".join(
            f"{k}: checkpoint {theirs.get(k)!r} vs config {ours.get(k)!r}" for k in diffs
        )
        raise WorkdirError(
            [
                f"--workdir={workdir} holds checkpoints of a different model "
                f"({detail}); use a new workdir or the matching config"
            ]
        )
    return latest


def _current_routing(signature: dict) -> dict:
    """A signature whose routing entry holds only what the kind's tables depend on
    (`routing.TABLE_FIELDS`): checkpoints written before it was so (with beta, alpha and
    seed for every kind) still match the model they hold."""
    r = signature.get("routing", {})
    if r.get("kind") not in routing.TABLE_FIELDS:
        return signature
    used = {k: v for k, v in r.items() if k == "kind" or k in routing.TABLE_FIELDS[r["kind"]]}
    return signature | {"routing": used}


def _flat(signature: dict) -> dict:
    """{'routing.beta': 0.8, ...}: nested signature fields by their dotted names."""
    return traverse_util.flatten_dict(signature, sep=".")


def restore_target(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings, for StandardRestore."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
