"""`--mode evaluate` and in-loop evaluation, with the evaluators a config selects.

The images are an ADM-style .npz (`eval.samples`: arr_0 uint8 NHWC, arr_1 labels)
or fresh samples from a checkpoint, written as one (`sample.sample_to_npz`, resumable);
the evaluators are `dtr_jax.evaluators`' (`eval.metrics`, by default the data's own).
Everything is checked before anything compiles. An interrupted evaluation resumes: the
evaluators keep what they have done in WORKDIR/eval/<name>.cache-<digest>/ until the
results are written.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from dtr_jax import config as config_lib
from dtr_jax import evaluators, files, npz, sample, sharding

# The lines ADM's evaluator (guided-diffusion/evaluations/evaluator.py) prints, in its order.
ADM_LINES = (
    ("inception_score", "Inception Score"),
    ("fid", "FID"),
    ("precision", "Precision"),
    ("recall", "Recall"),
)


def selected(config) -> list[type[evaluators.Evaluator]]:
    """The evaluator classes the config selects (`eval.metrics`, or the data's own)."""
    return [evaluators.EVALUATORS.get(name) for name in evaluators.select(config)]


def evaluate_images(instances, images: np.ndarray, labels, cache_dir=None) -> dict:
    out = {}
    for evaluator in instances:
        out.update(evaluator(images, labels, cache_dir))
    return out


class InLoopEvaluation:
    """Built once per run on its `mesh` (classifier, Inception weights, reference); called
    every eval_every_steps with the run's Sampler on `eval.num_samples` fresh samples,
    drawn and decoded batch by batch as `--mode sample` does."""

    def __init__(self, config, decode, mesh):
        self.config, self.decode = config, decode
        self.instances = [cls(config.eval, mesh) for cls in selected(config)]

    def __call__(self, sampler, params) -> dict:
        c, s = self.config, self.config.sample
        labels = sample.labels_for(s, c.model.num_classes, c.eval.num_samples)
        images = np.concatenate(
            [
                sample.sample_batch(sampler, self.decode, params, y, s.seed, i)
                for i, y in enumerate(sample.batches(labels, s.batch_size))
            ]
        )
        results = evaluate_images(self.instances, images, labels)
        return {f"eval/{k}": v for k, v in results.items()}


def evaluate_mode(config, workdir: str) -> dict:
    """Metrics of eval.samples (or of fresh samples from WORKDIR's latest checkpoint).

    Writes WORKDIR/eval/<name>.json, prints the metrics ADM's evaluator prints in its
    format (process 0) and returns the metrics.
    """
    config_lib.validate(config, jax.device_count(), mode="evaluate")
    files.check_writable_dir(str(_results_dir(workdir)), "the results directory")
    e = config.eval
    classes = selected(config)
    mesh = sharding.make_mesh(config.mesh)
    if e.samples:  # checked before the evaluators load their weights
        images, labels = _checked_images(classes, e, e.samples, "eval.samples")
    instances = [cls(e, mesh) for cls in classes]  # their files are read before sampling
    if e.samples:
        path = e.samples
    else:
        path = sample.sample_to_npz(config, workdir, e.num_samples)
        images, labels = _checked_images(classes, e, path, "the fresh samples")
    name = os.path.splitext(os.path.basename(path))[0]
    cache = _results_dir(workdir) / f"{name}.cache-{npz.digest(files.identity(path))}"
    results = {"num_samples": len(images)}
    results.update(evaluate_images(instances, images, labels, str(cache)))
    _write_results(workdir, name, results)
    if jax.process_index() == 0:
        files.remove_tree(str(cache))
        report = adm_report(results)
        if report:
            print(report, flush=True)
            logging.info(
                "sFID is not computed: it needs the spatial features (mixed_6/conv) of ADM's "
                "evaluator, which dtr_jax's FID Inception does not output"
            )
    return results


def adm_report(results: dict) -> str:
    """The metrics ADM's evaluator prints, in its format ('FID: 8.9031...'), for those the
    results have; '' if none."""
    return "\n".join(f"{label}: {results[k]}" for k, label in ADM_LINES if k in results)


def _checked_images(classes, e, path: str, field: str):
    """(images, labels) of the .npz `path`, which every evaluator can evaluate; `field`
    names it in errors (the field that names it, or what made it)."""
    images, labels = evaluators.load_images(path, field)
    for cls in classes:
        cls.check_images(e, images.shape, f"{field}={path!r}")
    return images, labels


def _results_dir(workdir: str):
    return files.resolve(workdir) / "eval"


def _write_results(workdir: str, name: str, results: dict) -> None:
    logging.info("Evaluation of %s: %s", name, results)
    if jax.process_index() == 0:
        out_dir = _results_dir(workdir)
        out_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(results, indent=2, sort_keys=True) + "\n"
        files.write_atomically(str(out_dir / f"{name}.json"), text.encode())
