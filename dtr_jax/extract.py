"""`--mode extract`: photographs -> VAE latent moments in ArrayRecord shards, once.

Reads the photographs of `extract.source` (ADM centre crop to `data.image_size`; a TFDS
source is first built from `data.manual_dir` if needed), encodes every image and its
mirror image with the VAE at `vae.path`, jitted over all devices of all hosts in global
batches of `vae.batch_size`, and stores per image the mean and std of both posteriors
(model space) with its label: the format of `dtr_jax.data.latents`, in `data.dir`.
Shard i is written by process i % process_count, to a temporary file renamed once the
shard is complete; process 0 writes the manifest, first, and marks it complete, last.
Several processes need a `data.dir` they all see.

Resumable: a rerun skips the shards that exist and writes the others from their start,
so every image is stored exactly once; a finished extraction is recognised and left as
it is; one of other photographs, VAE, image size, dtype or shard size is refused.
"""

from __future__ import annotations

import hashlib

import grain
import jax
import numpy as np
from absl import logging
from flax import traverse_util

from dtr_jax import config as config_lib
from dtr_jax import data, files, sharding
from dtr_jax.data import images as images_lib
from dtr_jax.data import latents
from dtr_jax.data.pipeline import prefetch, read_options
from dtr_jax.errors import ConfigError
from dtr_jax.models import vae as vae_lib
from dtr_jax.progress import Progress

LOG_EVERY_SECS = 30.0


def extract_mode(config, workdir: str | None = None) -> dict:
    """Extracts the latents of `extract.source` into `data.dir` (the workdir is not used);
    returns the finished extraction's manifest."""
    del workdir
    config_lib.validate(config, jax.device_count(), mode="extract")
    d, x = config.data, config.extract
    files.check_writable_dir(d.dir, "data.dir")
    source = data.SOURCES.get(x.source)
    if source.prepare and jax.process_count() == 1:  # building is a one-process job
        source.prepare(config)
    photos = source.images(config, x.split)
    vae, params = vae_lib.load_vae(config.vae.path)
    manifest = plan(config, photos, vae, params)
    if not _begin(d.dir, manifest):
        return manifest | {"complete": True}
    mesh = sharding.make_mesh(config.mesh)
    Extraction(manifest, d.dir, photos, vae, params, mesh, config).run()
    return _finish(d.dir, manifest)


def plan(config, photos, vae, params) -> dict:
    """The manifest of extracting `photos` with the VAE (`vae`, `params`) as `config` says."""
    d, x, c = config.data, config.extract, vae.config
    if d.image_size % c.down_factor:
        raise ConfigError(
            [
                f"data.image_size={d.image_size} is not a multiple of {c.down_factor}, the "
                f"down factor of the VAE at vae.path={config.vae.path!r}"
            ]
        )
    side = d.image_size // c.down_factor
    per_shard = x.images_per_shard
    return {
        "format": latents.FORMAT,
        "source": {
            "name": x.source,
            "fingerprint": photos.fingerprint,
            "image_size": d.image_size,
            "num_images": len(photos),
            "num_classes": photos.num_classes,
        },
        "vae": {
            "path": config.vae.path,
            "sha256": params_digest(params),
            "scaling_factor": c.scaling_factor,
            "shift_factor": c.shift_factor,
        },
        "latent_shape": [side, side, c.latent_channels],
        "dtype": x.dtype,
        "images_per_shard": per_shard,
        "num_shards": len(latents.shard_ranges(len(photos), per_shard)),
        "complete": False,
        "command": config_lib.extract_command(config),  # how to finish it, if interrupted
    }


def params_digest(params) -> str:
    """A content hash of a params tree (names, shapes and float32 values)."""
    h = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(params, sep="/").items()):
        leaf = np.ascontiguousarray(leaf, np.float32)
        h.update(f"{path}{leaf.shape}".encode())
        h.update(leaf.tobytes())
    return h.hexdigest()


def _begin(directory: str, manifest: dict) -> bool:
    """Checks `directory` against `manifest` and writes it there if new; False if that
    extraction is finished already. Raises ConfigError for another extraction, or for a
    directory the processes do not share. Every process decides on process 0's reading."""
    found = sharding.on_process_0(latents.read_manifest, directory)
    if found is not None:
        differ = latents.differences(manifest, found)
        if differ:
            raise ConfigError(
                [
                    f"data.dir={directory!r} holds another extraction ({'; '.join(differ)}): "
                    "choose another data.dir, or delete that folder to replace it"
                ]
            )
        if found.get("complete"):
            logging.info("%s holds this extraction, complete: nothing to do.", directory)
            return False
    elif jax.process_index() == 0:
        files.resolve(directory).mkdir(parents=True, exist_ok=True)
        latents.write_manifest(directory, manifest)
    sharding.sync_hosts("extract-manifest")
    if not sharding.all_hosts_agree(latents.read_manifest(directory) is not None):
        raise ConfigError(
            [
                f"data.dir={directory!r} is not one folder all processes see: extracting on "
                "several hosts needs a shared folder (or run it on one host)"
            ]
        )
    return True


def _finish(directory: str, manifest: dict) -> dict:
    """Marks the extraction complete once every shard exists; returns its manifest."""
    sharding.sync_hosts("extract-done")
    missing = manifest["num_shards"] - len(latents.done_shards(directory, manifest))
    if missing:  # a shard was not written: a bug, or a folder changed under the run
        raise RuntimeError(f"{missing} shards of {directory} are missing after extraction")
    manifest = manifest | {"complete": True}
    if jax.process_index() == 0:
        latents.write_manifest(directory, manifest)
        logging.info("Extraction complete: %s", directory)
    sharding.sync_hosts("extract-complete")
    return manifest


class _Rows:
    """Photographs by position in a list of image indices, where -1 is a blank that pads
    the batches (label -1, never stored)."""

    def __init__(self, photos, indices: np.ndarray, side: int):
        self.photos, self.indices = photos, indices
        self.blank = np.zeros((side, side, 3), np.uint8)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        i = int(self.indices[j])
        if i < 0:
            return {"image": self.blank, "label": np.int32(-1), "index": np.int64(-1)}
        example = self.photos[i]
        return {"image": example["image"], "label": example["label"], "index": np.int64(i)}


def encoder(vae, mesh, dtype: str):
    """The jitted encoder: uint8 images (global batch) -> moments (B, 2, 2, h, w, c) of the
    image and its mirror image, [mean, std] each, in model space, as `dtype`."""

    def encode(params, pixels):
        return vae_lib.encode_views(vae, params, images_lib.to_unit_range(pixels)).astype(dtype)

    batch, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    return jax.jit(encode, in_shardings=(rep, batch), out_shardings=batch)


class Extraction:
    """This process's part of an extraction: its shards not yet written, in global batches
    it takes part in with every other process, written shard by shard."""

    def __init__(self, manifest, directory, photos, vae, params, mesh, config):
        self.manifest, self.directory, self.mesh = manifest, directory, mesh
        n, p = jax.process_count(), jax.process_index()
        shards = latents.shards_of(manifest)
        done = set(latents.done_shards(directory, manifest))
        self.shards = shards
        self.pending = [i for i, (name, _) in enumerate(shards) if i % n == p and name not in done]
        for path in latents.stale_files(directory, [shards[i][0] for i in self.pending]):
            path.unlink()  # an interrupted run's unfinished shard: written again from its start
        self.batch = config.vae.batch_size // n
        indices = np.concatenate([np.asarray(shards[i][1]) for i in self.pending] or [[]])
        steps = sharding.max_over_hosts(-(-len(indices) // self.batch))
        padded = np.full(steps * self.batch, -1, np.int64)
        padded[: len(indices)] = indices
        side = config.data.image_size
        self.rows = grain.MapDataset.source(_Rows(photos, padded, side)).batch(self.batch)
        self.read = read_options(config.data.num_threads)
        self.params = jax.device_put(params, sharding.replicated(mesh))
        self.encode = encoder(vae, mesh, manifest["dtype"])
        self.record = latents.record_dtype(manifest["latent_shape"], manifest["dtype"])
        self.todo, self.writers = len(indices), {}
        logging.info(
            "Extracting %d images into %d shards of %s on this process (%d of %d shards "
            "there already), %d global batches of %d",
            self.todo,
            len(self.pending),
            directory,
            len(done),
            len(shards),
            steps,
            config.vae.batch_size,
        )

    def run(self) -> None:
        sharded = sharding.batch_sharding(self.mesh)

        def dispatch(batch):  # the device works on batch k + 1 while batch k is written
            pixels = jax.make_array_from_process_local_data(sharded, batch["image"])
            return batch, self.encode(self.params, pixels)

        progress = Progress("extracted on this process", self.todo, every_secs=LOG_EVERY_SECS)
        for batch, moments in prefetch(map(dispatch, self.rows.to_iter_dataset(self.read)), 1):
            progress.add(self._write(batch, sharding.host_rows(moments, self.mesh)))

    def _write(self, batch: dict, moments: np.ndarray) -> int:
        """Stores the batch's images (blanks aside) in their shards; returns how many."""
        per_shard, stored = self.manifest["images_per_shard"], 0
        for row in np.flatnonzero(batch["index"] >= 0):
            record = np.zeros((), self.record)
            record["index"], record["label"] = batch["index"][row], batch["label"][row]
            record["moments"] = moments[row]
            shard = int(record["index"]) // per_shard
            if shard not in self.writers:
                name, indices = self.shards[shard]
                self.writers[shard] = latents.ShardWriter(self.directory, name, len(indices))
            if self.writers[shard].write(record):
                logging.info("Wrote %s", self.writers.pop(shard).path)
            stored += 1
        return stored
