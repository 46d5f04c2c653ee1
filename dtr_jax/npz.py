"""ADM-style .npz files at the scale of FID-50K, and long jobs that resume from their parts.

50K samples of 256x256x3 are 9.8 GB: nothing here holds such an array in memory.

  headers       {key: (shape, dtype)} from the array headers alone
  read_array    an array memory-mapped from the file (uncompressed, as np.savez writes
                it), read from disk only as it is sliced
  concatenate   one .npz from the arrays of several, one source array in memory at a time
  Parts         a job computed in numbered parts, each written atomically as it finishes
                (part-00000.npz, ...): a rerun skips the parts already written
"""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import logging

from dtr_jax import files, sharding
from dtr_jax.errors import InputFileError
from dtr_jax.progress import Progress

# A zip member's local file header (signature ... file name length, extra field length).
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")


def digest(settings: dict) -> str:
    """8 hex digits naming `settings` (JSON types): the same settings, the same name."""
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


# --- reading ----------------------------------------------------------------------------------


def _read_header(f) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream `f`, which is left at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def headers(path: str, field: str) -> dict[str, tuple[tuple, np.dtype]]:
    """{key: (shape, dtype)} of the .npz at `path`, from the array headers alone (nothing
    loaded); `field` names the file in the InputFileError raised if it is not an .npz."""
    try:
        out = {}
        with files.resolve(path).open("rb") as f, zipfile.ZipFile(f) as z:
            for info in z.infolist():
                if info.filename.endswith(".npy"):
                    with z.open(info) as member:
                        shape, _, dtype = _read_header(member)
                    out[info.filename[: -len(".npy")]] = (shape, dtype)
        return out
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise InputFileError([f"{field}={path!r} is not an .npz file ({e})"]) from None


def _data_offset(f, info: zipfile.ZipInfo) -> int:
    """Where the bytes of the stored zip member `info` start in the open zip file `f`."""
    f.seek(info.header_offset)
    fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if fields[0] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local header for {info.filename}")
    name_length, extra_length = fields[-2:]
    return info.header_offset + _LOCAL_HEADER.size + name_length + extra_length


def read_array(path: str, key: str) -> np.ndarray:
    """Array `key` of the .npz at `path`. Memory-mapped read-only (read from disk only as it
    is sliced) where the file is local and the array stored uncompressed in C order, as
    np.savez and `concatenate` write it; otherwise (np.savez_compressed, remote files)
    loaded whole."""
    if not files.is_remote(path):
        with open(path, "rb") as f, zipfile.ZipFile(f) as z:
            info = z.getinfo(f"{key}.npy")
            if info.compress_type == zipfile.ZIP_STORED:
                f.seek(_data_offset(f, info))
                shape, fortran_order, dtype = _read_header(f)
                if not fortran_order and not dtype.hasobject and np.prod(shape) > 0:
                    return np.memmap(path, dtype, "r", f.tell(), shape)
        logging.info("%s: %s is compressed, loading it whole", path, key)
    with files.resolve(path).open("rb") as f, np.load(f) as data:
        return data[key]


# --- writing ----------------------------------------------------------------------------------


def concatenate(path: str, sources: Sequence[str], extra: dict | None = None) -> None:
    """Writes the .npz `path` whose arrays are those of the .npz files `sources` joined along
    axis 0, key by key, holding one source array in memory at a time, then the arrays of
    `extra` as they are. Uncompressed (as np.savez), so `read_array` maps it; written
    atomically."""
    parts = [headers(source, "a part") for source in sources]
    with files.open_atomically(path) as out, zipfile.ZipFile(out, "w", allowZip64=True) as z:
        for key, (shape, dtype) in parts[0].items():
            rows = sum(part[key][0][0] for part in parts)
            with z.open(f"{key}.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
                np.lib.format.write_array_header_1_0(member, header | {"shape": (rows, *shape[1:])})
                for source in sources:
                    with files.resolve(source).open("rb") as f, np.load(f) as data:
                        member.write(np.ascontiguousarray(data[key], dtype).tobytes())
        for key, array in (extra or {}).items():
            with z.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)


# --- resumable jobs ---------------------------------------------------------------------------


class Parts:
    """The results of a long job in `num_parts` numbered parts (dicts of arrays), each
    computed once by `fill`.

    With a `directory`, part i is written there as part-0000i.npz (atomically, by process
    0) as soon as it is computed, and `fill` skips the parts already written: an interrupted
    job resumes where it stopped. The directory's name must say everything that determines
    the parts (e.g. with `digest`), so that other settings never mix. Without one, the parts
    stay in memory. Every process computes every part (the computations are collectives).
    """

    def __init__(self, num_parts: int, directory: str | None = None):
        self.num_parts = num_parts
        self.directory = None if directory is None else files.resolve(directory)
        self._memory: dict[int, dict[str, np.ndarray]] = {}

    def path(self, i: int) -> str:
        return str(self.directory / f"part-{i:05d}.npz")

    def done(self) -> np.ndarray:
        """(num_parts,) bool: which parts are computed, as process 0 sees them."""
        if self.directory is None:
            found = [i in self._memory for i in range(self.num_parts)]
        else:
            found = [files.resolve(self.path(i)).exists() for i in range(self.num_parts)]
        return sharding.from_process_0(np.asarray(found))

    def fill(self, compute: Callable[[int], dict], rows: Sequence[int], what: str) -> None:
        """Computes part i as compute(i) for every part not done yet, logging progress in
        rows (`rows[i]` per part: done/total, rows/s and ETA, `what` saying what is done)."""
        done = self.done()
        if self.directory is not None and done.any():
            logging.info("%s: %d of %d parts already done", self.directory, done.sum(), len(done))
        finished = sum(r for r, d in zip(rows, done, strict=True) if d)
        progress = Progress(what, sum(rows), done=finished)
        for i in np.flatnonzero(~done):
            self._store(i, compute(int(i)))
            progress.add(rows[i])
        if self.directory is not None:  # every part written is readable on every host
            sharding.sync_hosts(f"parts {self.directory}")

    def _store(self, i: int, arrays: dict[str, np.ndarray]) -> None:
        if self.directory is None:
            self._memory[i] = arrays
        elif jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            with files.open_atomically(self.path(i)) as f:
                np.savez(f, **arrays)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if self.directory is None:
            return self._memory[i]
        with files.resolve(self.path(i)).open("rb") as f, np.load(f) as data:
            return {k: data[k] for k in data.files}

    def concatenated(self, *keys: str, dtype=None) -> list[np.ndarray]:
        """Arrays `keys` of every part, each joined along axis 0 (as `dtype`; default: as
        stored), reading each part once."""
        found = {key: [] for key in keys}
        for i in range(self.num_parts):
            part = self[i]
            for key in keys:
                found[key].append(part[key])
        return [np.concatenate(found[key], dtype=dtype) for key in keys]

    def remove(self) -> None:
        """Deletes the parts' directory (process 0), once what they made is safely written."""
        if self.directory is not None and jax.process_index() == 0:
            files.remove_tree(str(self.directory))
