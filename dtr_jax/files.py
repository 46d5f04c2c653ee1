"""Paths and atomic writes, local or on object stores (gs://, s3:// via etils.epath)."""

from __future__ import annotations

import contextlib
import os

from etils import epath


def is_remote(path: str) -> bool:
    """gs://, s3:// and the like: handled by etils.epath, Orbax and TensorFlow."""
    return "://" in str(path)


def resolve(path: str) -> epath.Path:
    """An epath.Path: absolute for local paths, as given for remote ones."""
    return epath.Path(path if is_remote(path) else os.path.abspath(path))


@contextlib.contextmanager
def open_atomically(path: str):
    """A binary file that replaces `path` only once it is completely written and closed
    (a temporary sibling, then a rename): `path` is never left half written."""
    path = epath.Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with tmp.open("wb") as f:
            yield f
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomically(path: str, data: bytes) -> None:
    with open_atomically(path) as f:
        f.write(data)
