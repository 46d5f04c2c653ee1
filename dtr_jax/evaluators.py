"""Sample-quality evaluators, registered by name (`eval.metrics`), and ADM-style .npz input.

An evaluator is a class built once from the `eval` config section and the run's mesh,
then called on uint8 NHWC images (and their labels) to give a dict of metrics:

  digits     `digits_accuracy`, `digits_fd`: the offline digits classifier
  inception  `fid`, `inception_score`, `precision`, `recall` with the FID InceptionV3

Its classmethods check what it needs before anything is built: `problems` (config
fields and files) and `check_images` (the images to evaluate). A new metric is one
more registered class. `select` says which evaluators a run uses (the only place).
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from dtr_jax import digits_eval, files, metrics, npz, sharding
from dtr_jax.data.sources import SOURCES
from dtr_jax.errors import ConfigError, InputFileError, integer_problems
from dtr_jax.models import inception
from dtr_jax.registry import Registry

EVALUATORS: Registry = Registry("eval.metrics")
EVAL_FILES = ("samples", "reference", "inception_weights")


def select(config) -> list[str]:
    """The evaluators of a run: `eval.metrics` (comma-separated) if set, else those of
    the data source (`data.name`), plus 'inception' when its weights or reference are given."""
    e = config.eval
    chosen = [n.strip() for n in str(e.metrics).split(",") if n.strip()]
    if chosen:
        return chosen
    name = config.data.name
    own = SOURCES.get(name).metrics if name in SOURCES else ()
    return list(own) + (["inception"] if e.inception_weights or e.reference else [])


def problems(e, chosen: list[str]) -> list[str]:
    """Problems with an `eval` section (named by field) for the evaluators `chosen`."""
    out = [f"{f}={e[f]!r}: no such file" for f in EVAL_FILES if e[f] and not os.path.isfile(e[f])]
    if not chosen:
        out.append(
            "metrics='' selects nothing: the data has no offline evaluator; set "
            "eval.inception_weights and eval.reference for FID/IS/precision/recall"
        )
    for name in chosen:
        found = EVALUATORS.problems(name)
        out += found or EVALUATORS.get(name).problems(e)
    if not (isinstance(e.num_samples, int) and e.num_samples >= 2):
        out.append(f"num_samples={e.num_samples!r} must be an integer >= 2")
    if not (isinstance(e.batch_size, int) and e.batch_size >= 1):
        out.append(f"batch_size={e.batch_size!r} must be a positive integer")
    return out


def reference_problems(r, e) -> list[str]:
    """Problems with a `reference` section and the `eval` fields of writing a reference
    batch (`--mode reference`), named by field."""
    out = [] if e.reference else ["eval.reference='' names no .npz to write"]
    if e.inception_weights and not os.path.isfile(e.inception_weights):
        out.append(f"eval.inception_weights={e.inception_weights!r}: no such file")
    if not (isinstance(r.num_images, int) and r.num_images >= 4):
        out.append(
            f"reference.num_images={r.num_images!r} must be an integer >= 4 (precision and "
            "recall take each image's 3rd nearest neighbour)"
        )
    if not (isinstance(r.stats_images, int) and (r.stats_images == 0 or r.stats_images >= 2)):
        out.append(f"reference.stats_images={r.stats_images!r} must be 0 (all) or an integer >= 2")
    out += integer_problems("reference.seed", r.seed, allow_zero=True)
    return out + integer_problems("eval.batch_size", e.batch_size)


# --- ADM-style .npz files ---------------------------------------------------------------


def _require_file(path: str, field: str) -> None:
    if not path or not os.path.isfile(path):
        raise ConfigError([f"{field}={path!r}: no such file"])


def _headers(path: str, field: str) -> dict[str, tuple[tuple, np.dtype]]:
    _require_file(path, field)
    return npz.headers(path, field)


def _check_images_header(path: str, field: str, shape, dtype) -> None:
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
        raise InputFileError(
            [
                f"{field}={path!r} holds {dtype} of shape {shape}: expected "
                "uint8 images (N, H, W, 1 or 3)"
            ]
        )


def load_images(path: str, field: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 NHWC images, labels or None) from an .npz; `field` names it in errors. The
    images are memory-mapped where the file allows (`npz.read_array`): 50K x 256x256x3
    samples are read from disk batch by batch as they are evaluated."""
    header = _headers(path, field)
    if "arr_0" not in header:
        raise InputFileError([f"{field}={path!r} has no arr_0 (uint8 NHWC images)"])
    _check_images_header(path, field, *header["arr_0"])
    labels = npz.read_array(path, "arr_1") if "arr_1" in header else None
    return npz.read_array(path, "arr_0"), labels


def load_reference(path: str) -> dict:
    """A reference .npz: images (`images`, memory-mapped from arr_0) and/or FID statistics
    of the pool features (`stats`, from mu and sigma; ADM's reference batches have both,
    and spatial ones, mu_s and sigma_s, which nothing here uses)."""
    field = "eval.reference"
    header = _headers(path, field)
    ref = {}
    if "mu" in header and "sigma" in header:
        d = inception.FEATURE_DIM
        shapes = (header["mu"][0], header["sigma"][0])
        if shapes != ((d,), (d, d)):
            raise InputFileError(
                [
                    f"{field}={path!r} has mu {shapes[0]} and sigma {shapes[1]}: the FID "
                    f"statistics of the Inception pool features are ({d},) and ({d}, {d})"
                ]
            )
        ref["stats"] = metrics.load_stats(path)
    if "arr_0" in header:
        ref["images"] = load_images(path, field)[0]
    if not ref:
        raise InputFileError([f"{field}={path!r} has neither arr_0 (images) nor mu and sigma"])
    return ref


# --- the evaluators ----------------------------------------------------------------------


class Evaluator:
    """Base: no requirements beyond the images being uint8 NHWC. Built once per run on the
    run's `mesh`, from the `eval` section."""

    @classmethod
    def problems(cls, e) -> list[str]:
        """Problems with the `eval` fields this evaluator needs."""
        del e
        return []

    @classmethod
    def check_images(cls, e, shape: tuple, what: str) -> None:
        """Raises ConfigError if images of `shape` (N, H, W, C) cannot be evaluated."""
        del e, shape, what

    def __init__(self, e, mesh):
        del e, mesh

    def __call__(self, images: np.ndarray, labels: np.ndarray | None, cache_dir=None) -> dict:
        """{metric: value} of `images` (array-like, e.g. memory-mapped) and their labels.
        `cache_dir` (None: none) is where a long computation may keep what it has done
        for these images, to resume after an interruption; it names the images, the
        evaluator adds its own settings."""
        raise NotImplementedError


@EVALUATORS.register("digits")
class DigitsMetrics(Evaluator):
    """Classifier accuracy (with labels) and Fréchet distance of 8x8x1 digit samples."""

    @classmethod
    def check_images(cls, e, shape, what):
        if tuple(shape[1:]) != (8, 8, 1):
            raise ConfigError(
                [f"{what} has images of shape {tuple(shape[1:])}: digits are (8, 8, 1)"]
            )

    def __init__(self, e, mesh):
        del e, mesh
        self._classifier = digits_eval.train_evaluator()

    def __call__(self, images, labels, cache_dir=None):
        del cache_dir  # seconds of work
        return {f"digits_{k}": float(v) for k, v in self._classifier(images, labels).items()}


class InceptionFeatures:
    """The FID InceptionV3 of the pytorch-fid weights file `weights` (`field` names it in
    errors), replicated over `mesh`, applied to uint8 images in global batches of
    `batch_size` split over the mesh. ADM's evaluator takes IS from softmax(pool @ W)
    without the fc bias: so do the logits here."""

    def __init__(self, weights: str, batch_size: int, mesh, field="eval.inception_weights"):
        try:
            variables = inception.load_pytorch_fid_weights(weights)
        except FileNotFoundError as err:
            raise ConfigError([f"{field}: {err}"]) from None
        except Exception as err:  # unreadable, or not the FID Inception weights
            raise InputFileError([f"{field}={weights!r}: {type(err).__name__}: {err}"]) from None
        self.mesh, self.batch_size = mesh, batch_size
        variables = jax.device_put(variables, sharding.replicated(mesh))
        self._features = inception.make_feature_fn(variables, fc_bias=False)
        # What else determines the features: names their cache.
        self.settings = dict(weights=files.identity(weights), batch=batch_size)

    def parts(self, images, cache_dir=None, what="samples") -> npz.Parts:
        """The features of uint8 `images` (sliceable, e.g. memory-mapped), one part
        {pool (n, 2048), logits (n, 1008)} float32 per batch, read batch by batch; with
        `cache_dir`, kept there batch by batch (resumable). `what` names the images in the
        progress logs."""
        n, size = len(images), self.batch_size
        starts = range(0, n, size)
        directory = None
        if cache_dir is not None:
            directory = f"{cache_dir}/inception_{npz.digest(self.settings)}"
        parts = npz.Parts(len(starts), directory)

        def batch(i: int) -> dict[str, np.ndarray]:
            return self.batch(images[starts[i] : starts[i] + size])

        parts.fill(batch, [min(size, n - lo) for lo in starts], f"Inception features of {what}")
        return parts

    def __call__(self, images, cache_dir=None, what="samples") -> tuple[np.ndarray, np.ndarray]:
        """(pool (N, 2048), logits (N, 1008)), float64, of uint8 images (see `parts`)."""
        pool, logits = self.parts(images, cache_dir, what).concatenated(
            "pool", "logits", dtype=np.float64
        )
        return pool, logits

    def batch(self, images) -> dict[str, np.ndarray]:
        """{pool, logits} of one batch of uint8 images (gray become RGB), on every host."""
        images = np.asarray(images)
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        out = sharding.host_gather(self._features(sharding.put_batch(images, self.mesh)))
        return {k: np.asarray(v[: len(images)]) for k, v in out.items()}


@EVALUATORS.register("inception")
class InceptionMetrics(Evaluator):
    """FID, IS and improved precision/recall (k = 3) in the FID InceptionV3's feature
    space, as ADM's evaluator computes them (`InceptionFeatures`, in batches of
    `eval.batch_size`), those of the reference images once, at the first call. FID is
    taken against the reference's stored mu and sigma where it has them, else against
    its images' statistics."""

    IS_SPLIT = 5000  # ADM's Inception Score: the mean over chunks of 5000 samples

    @classmethod
    def problems(cls, e):
        if e.inception_weights and e.reference:
            return []
        return [
            "inception_weights and eval.reference go together: FID needs both the "
            f"pytorch-fid weights file {inception.FID_WEIGHTS_FILE} (or its .npz) and a "
            "reference .npz"
        ]

    @classmethod
    def check_images(cls, e, shape, what):
        header = _headers(e.reference, "eval.reference")
        if "arr_0" in header and tuple(shape[1:]) != tuple(header["arr_0"][0][1:]):
            raise ConfigError(
                [
                    f"{what} has images of shape {tuple(shape[1:])} but eval.reference "
                    f"has {tuple(header['arr_0'][0][1:])}: they must match"
                ]
            )

    def __init__(self, e, mesh):
        self.features = InceptionFeatures(e.inception_weights, e.batch_size, mesh)
        self.reference = load_reference(e.reference)

    @functools.cached_property
    def _reference_features(self) -> np.ndarray | None:
        images = self.reference.get("images")
        return None if images is None else self.features(images, what="eval.reference")[0]

    @functools.cached_property
    def _reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
        if "stats" in self.reference:
            return self.reference["stats"]
        return metrics.stats(self._reference_features)

    def __call__(self, images, labels, cache_dir=None):
        del labels
        feats, logits = self.features(images, cache_dir)
        out = {}
        splits = -(-len(logits) // self.IS_SPLIT)
        out["inception_score"], _ = metrics.inception_score(logits, splits=splits)
        out["fid"] = metrics.frechet_distance(*metrics.stats(feats), *self._reference_stats)
        if self._reference_features is not None:
            out["precision"], out["recall"] = metrics.precision_recall(
                self._reference_features, feats
            )
        return {k: float(v) for k, v in out.items()}
