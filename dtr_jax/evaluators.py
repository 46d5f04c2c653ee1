"""Sample-quality evaluators, registered by name (`eval.metrics`), and ADM-style .npz input.

An evaluator is a class built once from the `eval` config section, then called on
uint8 NHWC images (and their labels) to give a dict of metrics:

  digits     `digits_accuracy`, `digits_fd`: the offline digits classifier
  inception  `fid`, `inception_score`, `precision`, `recall` with the FID InceptionV3

Its classmethods check what it needs before anything is built: `problems` (config
fields and files) and `check_images` (the images to evaluate). A new metric is one
more registered class. `select` says which evaluators a run uses (the only place).
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from dtr_jax import digits_eval, metrics
from dtr_jax.data.sources import SOURCES
from dtr_jax.errors import ConfigError, InputFileError
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


# --- ADM-style .npz files ---------------------------------------------------------------


def _require_file(path: str, field: str) -> None:
    if not path or not os.path.isfile(path):
        raise ConfigError([f"{field}={path!r}: no such file"])


def npz_keys_and_shapes(path: str, field: str) -> dict[str, tuple[tuple, np.dtype]]:
    """{key: (shape, dtype)} of an .npz, from the array headers alone (nothing loaded)."""
    _require_file(path, field)
    try:
        out = {}
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.filename.endswith(".npy"):
                    with z.open(info) as f:
                        version = np.lib.format.read_magic(f)
                        read = (
                            np.lib.format.read_array_header_1_0
                            if version == (1, 0)
                            else np.lib.format.read_array_header_2_0
                        )
                        shape, _, dtype = read(f)
                    out[info.filename[: -len(".npy")]] = (shape, dtype)
        return out
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise InputFileError([f"{field}={path!r} is not an .npz file ({e})"]) from None


def _check_images_header(path: str, field: str, shape, dtype) -> None:
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
        raise InputFileError(
            [
                f"{field}={path!r} holds {dtype} of shape {shape}: expected "
                "uint8 images (N, H, W, 1 or 3)"
            ]
        )


def load_images(path: str, field: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 NHWC images, labels or None) from an .npz; `field` names it in errors."""
    header = npz_keys_and_shapes(path, field)
    if "arr_0" not in header:
        raise InputFileError([f"{field}={path!r} has no arr_0 (uint8 NHWC images)"])
    _check_images_header(path, field, *header["arr_0"])
    with np.load(path) as data:
        return data["arr_0"], data["arr_1"] if "arr_1" in data else None


def load_reference(path: str) -> dict:
    """A reference .npz: images (`images`, from arr_0) and/or statistics (`stats`, mu/sigma)."""
    field = "eval.reference"
    header = npz_keys_and_shapes(path, field)
    ref = {}
    if "mu" in header and "sigma" in header:
        ref["stats"] = metrics.load_stats(path)
    if "arr_0" in header:
        ref["images"] = load_images(path, field)[0]
    if not ref:
        raise InputFileError([f"{field}={path!r} has neither arr_0 (images) nor mu and sigma"])
    return ref


# --- the evaluators ----------------------------------------------------------------------


class Evaluator:
    """Base: no requirements beyond the images being uint8 NHWC."""

    @classmethod
    def problems(cls, e) -> list[str]:
        """Problems with the `eval` fields this evaluator needs."""
        del e
        return []

    @classmethod
    def check_images(cls, e, shape: tuple, what: str) -> None:
        """Raises ConfigError if images of `shape` (N, H, W, C) cannot be evaluated."""
        del e, shape, what

    def __call__(self, images: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
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

    def __init__(self, e):
        del e
        self._classifier = digits_eval.train_evaluator()

    def __call__(self, images, labels):
        return {f"digits_{k}": float(v) for k, v in self._classifier(images, labels).items()}


@EVALUATORS.register("inception")
class InceptionMetrics(Evaluator):
    """FID, IS and improved precision/recall in the FID InceptionV3's feature space."""

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
        header = npz_keys_and_shapes(e.reference, "eval.reference")
        if "arr_0" in header and tuple(shape[1:]) != tuple(header["arr_0"][0][1:]):
            raise ConfigError(
                [
                    f"{what} has images of shape {tuple(shape[1:])} but eval.reference "
                    f"has {tuple(header['arr_0'][0][1:])}: they must match"
                ]
            )

    def __init__(self, e):
        try:
            variables = inception.load_pytorch_fid_weights(e.inception_weights)
        except FileNotFoundError as err:
            raise ConfigError([f"eval.inception_weights: {err}"]) from None
        except Exception as err:  # unreadable, or not the FID Inception weights
            field = f"eval.inception_weights={e.inception_weights!r}"
            raise InputFileError([f"{field}: {type(err).__name__}: {err}"]) from None
        # ADM's evaluator takes IS from softmax(pool @ W) without the fc bias: do the same.
        self._features = inception.make_feature_fn(variables, fc_bias=False)
        self.batch_size = e.batch_size
        self.reference = load_reference(e.reference)
        if "images" in self.reference:
            feats, _ = self.features(self.reference["images"])
            self.reference.update(features=feats, stats=metrics.stats(feats))

    def features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pool (N, 2048), logits (N, 1008)) of uint8 images; gray images become RGB."""
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        pools, logits = [], []
        for i in range(0, len(images), self.batch_size):
            out = self._features(images[i : i + self.batch_size])
            pools.append(np.asarray(out["pool"], np.float64))
            logits.append(np.asarray(out["logits"], np.float64))
        return np.concatenate(pools), np.concatenate(logits)

    def __call__(self, images, labels):
        del labels
        feats, logits = self.features(images)
        out = {}
        out["inception_score"], _ = metrics.inception_score(logits, splits=min(10, len(logits)))
        out["fid"] = metrics.frechet_distance(*metrics.stats(feats), *self.reference["stats"])
        if "features" in self.reference:
            out["precision"], out["recall"] = metrics.precision_recall(
                self.reference["features"], feats
            )
        return {k: float(v) for k, v in out.items()}
