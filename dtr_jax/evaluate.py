"""Sample quality: FID, IS and precision/recall with the Flax FID InceptionV3, and the
offline digits metrics (classifier accuracy and Fréchet distance) that need no download.

Inputs are ADM-evaluator-style .npz files (arr_0: uint8 NHWC images, arr_1: labels) or
fresh samples from a checkpoint. Every file is checked before anything compiles.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from dtr_jax import checkpoint, config as config_lib, metrics, sample
from dtr_jax.config import ConfigError


def _require_file(path: str, field: str) -> None:
    if not path or not os.path.isfile(path):
        raise ConfigError([f"{field}={path!r}: no such file"])


def load_images(path: str, field: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 NHWC images, labels or None) from an .npz; `field` names it in errors."""
    _require_file(path, field)
    with np.load(path) as data:
        if "arr_0" not in data:
            raise ConfigError([f"{field}={path!r} has no arr_0 (uint8 NHWC images)"])
        images, labels = data["arr_0"], data["arr_1"] if "arr_1" in data else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ConfigError(
            [
                f"{field}={path!r} holds {images.dtype} of shape {images.shape}: expected "
                "uint8 images (N, H, W, 1 or 3)"
            ]
        )
    return images, labels


def load_reference(path: str) -> dict:
    """A reference .npz: images (arr_0) and/or statistics (mu, sigma)."""
    field = "eval.reference"
    _require_file(path, field)
    with np.load(path) as data:
        keys = set(data.files)
    ref = {}
    if "mu" in keys and "sigma" in keys:
        ref["stats"] = metrics.load_stats(path)
    if "arr_0" in keys:
        ref["images"] = load_images(path, field)[0]
    if not ref:
        raise ConfigError([f"{field}={path!r} has neither arr_0 (images) nor mu and sigma"])
    return ref


def check_shapes(samples: np.ndarray, reference: dict, samples_name: str) -> None:
    if "images" in reference and samples.shape[1:] != reference["images"].shape[1:]:
        raise ConfigError(
            [
                f"{samples_name} has images of shape {samples.shape[1:]} but eval.reference "
                f"has {reference['images'].shape[1:]}: they must match"
            ]
        )


class InceptionMetrics:
    """FID, IS and improved precision/recall in the FID InceptionV3's feature space."""

    def __init__(self, weights_path: str, batch_size: int = 200):
        from dtr_jax.models import inception

        if not weights_path:
            raise ConfigError(
                [
                    "eval.inception_weights is empty: FID/IS/precision/recall need the "
                    f"pytorch-fid weights file {inception.FID_WEIGHTS_FILE} (or its .npz)"
                ]
            )
        try:
            variables = inception.load_pytorch_fid_weights(weights_path)
        except FileNotFoundError as e:
            raise ConfigError([f"eval.inception_weights: {e}"]) from None
        # ADM's evaluator takes IS from softmax(pool @ W) without the fc bias: do the same.
        self._features = inception.make_feature_fn(variables, fc_bias=False)
        self.batch_size = batch_size

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

    def reference(self, reference: dict) -> dict:
        """Adds the reference statistics (and features, for precision/recall)."""
        if "images" in reference:
            feats, _ = self.features(reference["images"])
            reference = dict(reference, features=feats, stats=metrics.stats(feats))
        return reference

    def __call__(self, samples: np.ndarray, reference: dict | None) -> dict:
        feats, logits = self.features(samples)
        out = {}
        out["inception_score"], _ = metrics.inception_score(logits, splits=min(10, len(logits)))
        if reference is not None:
            out["fid"] = metrics.frechet_distance(*metrics.stats(feats), *reference["stats"])
            if "features" in reference:
                out["precision"], out["recall"] = metrics.precision_recall(
                    reference["features"], feats
                )
        return {k: float(v) for k, v in out.items()}


def digits_metrics(evaluator, images: np.ndarray, labels) -> dict:
    """Classifier accuracy (with labels) and Fréchet distance of 8x8x1 digit samples."""
    return {f"digits_{k}": float(v) for k, v in evaluator(images, labels).items()}


def _wants_inception(config) -> bool:
    return bool(config.eval.inception_weights or config.eval.reference)


class InLoopEvaluator:
    """Built once per run; called every eval_every_steps with the run's Sampler."""

    def __init__(self, config):
        self.config = config
        self.digits = None
        self.inception = self.reference = None
        if config.data.name == "digits":
            from dtr_jax.digits_eval import train_evaluator

            self.digits = train_evaluator()
        if _wants_inception(config):
            self.inception = InceptionMetrics(config.eval.inception_weights, config.eval.batch_size)
            self.reference = self.inception.reference(load_reference(config.eval.reference))

    def __call__(self, sampler, params) -> dict:
        c = self.config
        labels = sample.labels_for(c.sample, c.model.num_classes, c.eval.num_samples)
        images = sample.to_uint8(sampler(params, labels, jax.random.key(c.sample.seed)))
        out = {}
        if self.digits is not None:
            out.update(digits_metrics(self.digits, images, labels))
        if self.inception is not None:
            out.update(self.inception(images, self.reference))
        return {f"eval/{k}": v for k, v in out.items()}


def validate_eval(config) -> list[str]:
    """Problems with the eval.* files and what the data allows (for training and evaluate)."""
    problems = []
    e = config.eval
    for field in ("samples", "reference", "inception_weights"):
        path = e[field]
        if path and not os.path.isfile(path):
            problems.append(f"eval.{field}={path!r}: no such file")
    if bool(e.inception_weights) != bool(e.reference):
        problems.append(
            "eval.inception_weights and eval.reference go together: FID needs both the "
            "pytorch-fid weights file and a reference .npz"
        )
    if config.data.name != "digits" and not _wants_inception(config):
        problems.append(
            f"data.name={config.data.name!r} has no offline evaluator: set "
            "eval.inception_weights and eval.reference for FID/IS/precision/recall"
        )
    if e.num_samples < 2 or e.batch_size < 1:
        problems.append("eval.num_samples must be >= 2 and eval.batch_size >= 1")
    return problems


def evaluate_mode(config, workdir: str) -> dict:
    """Metrics of eval.samples (or of fresh samples from WORKDIR's latest checkpoint).

    Writes WORKDIR/eval/<name>.json and returns the metrics.
    """
    config_lib.validate(config, jax.device_count(), mode="evaluate")
    problems = validate_eval(config)
    if problems:
        raise ConfigError(problems)
    e = config.eval
    reference = load_reference(e.reference) if e.reference else None
    if e.samples:
        images, labels = load_images(e.samples, "eval.samples")
        name = os.path.splitext(os.path.basename(e.samples))[0]
        samples_name = f"eval.samples={e.samples!r}"
    else:
        if not sample.gives_pixels(config.sample.decoder):
            raise ConfigError(
                [f"sample.decoder={config.sample.decoder!r} does not give images to evaluate"]
            )
        images, labels, step = sample.sample_images(config, workdir, e.num_samples)
        name = sample.run_name(config, step)
        samples_name = "the fresh samples"
    if reference is not None:
        check_shapes(images, reference, samples_name)
    results = {"num_samples": len(images)}
    if config.data.name == "digits":
        if images.shape[1:] != (8, 8, 1):
            raise ConfigError(
                [f"{samples_name} has images of shape {images.shape[1:]}: digits are (8, 8, 1)"]
            )
        from dtr_jax.digits_eval import train_evaluator

        results.update(digits_metrics(train_evaluator(), images, labels))
    if reference is not None:
        inception = InceptionMetrics(e.inception_weights, e.batch_size)
        results.update(inception(images, inception.reference(reference)))
    _write_results(workdir, name, results)
    return results


def _write_results(workdir: str, name: str, results: dict) -> None:
    logging.info("Evaluation of %s: %s", name, results)
    if jax.process_index() == 0:
        out_dir = checkpoint.workdir_path(workdir) / "eval"
        out_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(results, indent=2, sort_keys=True) + "\n"
        checkpoint.write_atomically(str(out_dir / f"{name}.json"), text.encode())
