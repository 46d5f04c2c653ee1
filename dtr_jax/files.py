"""Paths, atomic writes and writability checks, local or on object stores (gs://, s3://
via etils.epath)."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid

from etils import epath

from dtr_jax.errors import WorkdirError, WriteError


def is_remote(path: str) -> bool:
    """gs://, s3:// and the like: handled by etils.epath, Orbax and TensorFlow."""
    return "://" in str(path)


def resolve(path: str) -> epath.Path:
    """An epath.Path: absolute for local paths, as given for remote ones."""
    return epath.Path(path if is_remote(path) else os.path.abspath(path))


def identity(path: str) -> dict:
    """What tells a file from another at a glance (absolute path, size, modification time):
    names what is computed from it and kept, such as a cache."""
    full = resolve(path)
    stat = full.stat()
    return {"path": str(full), "size": int(stat.length), "mtime": int(stat.mtime)}


TMP_INFIX = ".tmp-"  # temporary siblings are named .<name>.tmp-<pid>


def tmp_sibling(path: str) -> epath.Path:
    """The temporary sibling this process writes before it replaces `path` by a rename."""
    path = epath.Path(path)
    return path.parent / f".{path.name}{TMP_INFIX}{os.getpid()}"


@contextlib.contextmanager
def open_atomically(path: str):
    """A binary file that replaces `path` only once it is completely written and closed
    (a temporary sibling, then a rename): `path` is never left half written. A failed
    write (a full disk, ...) raises WriteError naming `path`; what was there stays."""
    tmp = tmp_sibling(path)
    try:
        with _reported_as_write_error(path):
            with tmp.open("wb") as f:
                yield f
            tmp.replace(epath.Path(path))
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


@contextlib.contextmanager
def _reported_as_write_error(path: str):
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise WriteError([f"{path} ({reason}): anything it replaces is left as it was"]) from e


def write_directory(path: str, contents: dict) -> None:
    """Writes the files `contents` ({name: fn() -> bytes}) as the directory `path` (local),
    replacing one that exists only once all are written: into a temporary sibling, then
    swapped in by renames. A failed write raises WriteError; the old directory stays."""
    out = os.path.abspath(path)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = _sibling(out, "tmp")
    try:
        with _reported_as_write_error(out):
            os.mkdir(tmp)  # unlike mkdtemp's 0700, honours the umask
            for filename, make in contents.items():
                with open(os.path.join(tmp, filename), "wb") as f:
                    f.write(make())
            _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sibling(path: str, what: str) -> str:
    """A fresh hidden name next to `path` (.NAME.what-PID-RANDOM)."""
    parent, name = os.path.split(path)
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


def write_atomically(path: str, data: bytes) -> None:
    with open_atomically(path) as f:
        f.write(data)


def remove_tree(path: str) -> None:
    """Deletes the directory `path` and all it holds, if it exists (local or remote)."""
    full = resolve(path)
    if full.exists():
        full.rmtree()


def check_writable_dir(path: str, what: str) -> None:
    """Raises WorkdirError unless `path` is (or can be created as) a directory we can write
    in: checked by creating and removing a file in it, or in its nearest existing ancestor,
    which also catches read-only mounts. `what` names it for the user ('--workdir',
    'export.dir'). Remote paths are not probed."""
    if is_remote(path):
        return
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise WorkdirError([f"{what} {path} is a file, not a directory"])
    existing = full
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise WorkdirError([f"{what} {path} cannot be created: {existing} is a file"])
    probe = os.path.join(existing, f".dtr_jax-write-probe-{os.getpid()}")
    try:
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise WorkdirError([f"{what} {path} is not writable ({existing}: {e.strerror})"]) from None
