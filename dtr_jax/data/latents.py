"""Latents extracted once with the VAE (`--mode extract`), stored as ArrayRecord shards and
read back at random access (`data.name='latents'`, `data.dir`).

`data.dir` holds `manifest.json` (what was extracted, written first; `complete` is set
last) and the shards `latents-00000-of-00129.array_record`, ...: shard i holds images
i * images_per_shard, ... in order, one record each. A shard exists under its name only
once it is complete (written as a temporary sibling, then renamed).

A record is one numpy structured scalar (`record_dtype`, little-endian):

  index    int64    the image's position in the source
  label    int32
  moments  (2, 2, h, w, c) of the manifest's dtype: [image, its mirror image] x [mean, std]
           of the VAE posterior in model space (already x scaling_factor)

`LatentSource` yields `{"moments", "label"}`; the pipeline's flip takes the mirror image's
moments, and the train step draws `mean + std * noise` with its own per-step RNG.
ArrayRecord reads local files only (a mounted bucket counts as local).
"""

from __future__ import annotations

import json
import os

import numpy as np
from etils import epath

from dtr_jax import files
from dtr_jax.data.sources import SOURCES, Source
from dtr_jax.errors import InputFileError, choice_problems, integer_problems

MANIFEST = "manifest.json"
FORMAT = "dtr_jax.latents/1"
DTYPES = ("float16", "float32")
WRITER_OPTIONS = "group_size:1"  # one record per chunk: fast random access
# Manifest entries that may differ between two runs of the same extraction.
INCIDENTAL = ("complete", "vae.path", "command")


def record_dtype(latent_shape, dtype: str) -> np.dtype:
    """The layout of one record: index, label, moments [image | mirror][mean | std]."""
    return np.dtype(
        [
            ("index", "<i8"),
            ("label", "<i4"),
            ("moments", f"<f{np.dtype(dtype).itemsize}", (2, 2, *latent_shape)),
        ]
    )


def shard_name(i: int, num_shards: int) -> str:
    return f"latents-{i:05d}-of-{num_shards:05d}.array_record"


def shard_ranges(num_images: int, per_shard: int) -> list[range]:
    """The image indices of each shard: consecutive runs of `per_shard` (the last shorter)."""
    return [range(lo, min(lo + per_shard, num_images)) for lo in range(0, num_images, per_shard)]


def shards_of(manifest: dict) -> list[tuple[str, range]]:
    """(file name, image indices) of every shard of an extraction."""
    ranges = shard_ranges(manifest["source"]["num_images"], manifest["images_per_shard"])
    return [(shard_name(i, len(ranges)), r) for i, r in enumerate(ranges)]


# --- the manifest --------------------------------------------------------------------------


def read_manifest(directory: str) -> dict | None:
    """The manifest of `directory` (None if it has none). Raises InputFileError for one
    that is unreadable or not of this format."""
    path = epath.Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputFileError([f"{path} is not a readable JSON file ({e})"]) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputFileError([f"{path} is not a manifest of dtr_jax latents ({FORMAT})"])
    return manifest


def write_manifest(directory: str, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    files.write_atomically(str(epath.Path(directory) / MANIFEST), text.encode())


def differences(ours: dict, theirs: dict) -> list[str]:
    """'key: theirs -> ours' for each entry (dotted) where two manifests describe different
    extractions (the VAE's path and the completion flag aside)."""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    a, b = flat(ours), flat(theirs)
    keys = sorted((set(a) | set(b)) - set(INCIDENTAL))
    return [f"{k}: {b.get(k)!r} there, {a.get(k)!r} here" for k in keys if a.get(k) != b.get(k)]


def done_shards(directory: str, manifest: dict) -> list[str]:
    """The shard files of `manifest` that exist in `directory` (each one is complete)."""
    d = epath.Path(directory)
    return [name for name, _ in shards_of(manifest) if (d / name).exists()]


def stale_files(directory: str, names) -> list[epath.Path]:
    """Temporary siblings of the shards `names` left by interrupted extractions."""
    d = epath.Path(directory)
    return [p for name in names for p in d.glob(f".{name}{files.TMP_INFIX}*")]


# --- validation ------------------------------------------------------------------------------


def extraction_problem(directory: str) -> str | None:
    """Why `directory` holds no finished extraction, starting with `dir=...` (None if it
    does). The caller adds how to make or finish it."""
    if not directory:
        return "dir='' names no extracted latents"
    if files.is_remote(directory):
        return None  # refused by `problems`: extraction cannot help
    if not os.path.isdir(directory):
        return f"dir={directory!r}: no such folder, so no extracted latents"
    manifest = read_manifest(directory)
    if manifest is None:
        return f"dir={directory!r} holds no extracted latents (no {MANIFEST})"
    if not manifest.get("complete"):
        done, total = len(done_shards(directory, manifest)), manifest["num_shards"]
        return f"dir={directory!r} holds an unfinished extraction ({done} of {total} shards)"
    return None


def _remote(directory: str) -> list[str]:
    if not files.is_remote(directory):
        return []
    return [
        f"dir={directory!r} is remote, but ArrayRecord reads and writes local files only: use "
        "a local disk of every host, or mount the bucket (e.g. with gcsfuse)"
    ]


def extract_problems(x) -> list[str]:
    """Problems with an `extract` section: the photographs to encode, the shards."""
    out = photograph_problems(x.source) + integer_problems("images_per_shard", x.images_per_shard)
    return out + choice_problems("dtype", x.dtype, DTYPES)


def photograph_problems(source: str) -> list[str]:
    """Problems with `source` (extract.source) as the name of a source of photographs."""
    photos = [name for name in SOURCES if SOURCES.get(name).images]
    return [] if source in photos else [f"source={source!r} is unknown: allowed {photos}"]


def output_problems(directory: str) -> list[str]:
    """Problems with `directory` (data.dir) as where an extraction is written."""
    if not directory:
        return ["dir='' names no folder to write the latents to"]
    return _remote(directory)


def problems(d) -> list[str]:
    """Problems with a data section reading extracted latents (`d.dir`)."""
    if files.is_remote(d.dir):
        return _remote(d.dir)
    problem = extraction_problem(d.dir)
    if problem:
        return [problem]
    manifest = read_manifest(d.dir)
    missing = sorted({name for name, _ in shards_of(manifest)} - set(done_shards(d.dir, manifest)))
    if missing:
        return [
            f"dir={d.dir!r} lacks {len(missing)} of the {manifest['num_shards']} shards of its "
            f"{MANIFEST} (first: {missing[0]}): every host needs the whole folder"
        ]
    return []


def holds(d) -> tuple[tuple[int, int, int], int]:
    """(latent shape, classes) of the extraction in `d.dir`."""
    manifest = read_manifest(d.dir)
    return tuple(manifest["latent_shape"]), manifest["source"]["num_classes"]


# --- writing and reading ---------------------------------------------------------------------


class ShardWriter:
    """Writes the records of one shard to a temporary sibling, renamed to the shard's name
    once all `count` of them are written: a shard that exists is complete."""

    def __init__(self, directory: str, name: str, count: int):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = epath.Path(directory) / name
        self.tmp = files.tmp_sibling(str(self.path))
        self.left = count
        self._writer = ArrayRecordWriter(str(self.tmp), WRITER_OPTIONS)

    def write(self, record: np.ndarray) -> bool:
        """Appends one record (a scalar of `record_dtype`); True once the shard is complete."""
        self._writer.write(record.tobytes())
        self.left -= 1
        if self.left == 0:
            self._writer.close()
            self.tmp.replace(self.path)
        return self.left == 0


class LatentSource:
    """The extraction in `directory`, read at random access: item i is image i's
    `{"moments": (2, 2, h, w, c), "label": int32}`."""

    def __init__(self, directory: str):
        from grain.sources import ArrayRecordDataSource

        self.manifest = read_manifest(directory)
        m = self.manifest
        self.dtype = record_dtype(m["latent_shape"], m["dtype"])
        # `path[0:n]` gives each shard's length up front: no file is opened until read.
        paths = [f"{os.path.join(directory, name)}[0:{len(r)}]" for name, r in shards_of(m)]
        self._records = ArrayRecordDataSource(paths)
        self.directory = directory

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        record = np.frombuffer(self._records[index], self.dtype)[0]
        if record["index"] != index:
            raise InputFileError(
                [f"data.dir={self.directory!r}: record {index} holds image {record['index']}"]
            )
        return {"moments": record["moments"], "label": np.int32(record["label"])}


SOURCES.register(
    "latents",
    Source(
        build=lambda config, split: LatentSource(config.data.dir),
        problems=problems,
        holds=holds,
        unmade=lambda d: extraction_problem(d.dir),
    ),
)
