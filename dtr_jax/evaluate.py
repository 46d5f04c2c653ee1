"""`--mode evaluate` and in-loop evaluation, with the evaluators a config selects.

The images are an ADM-style .npz (`eval.samples`: arr_0 uint8 NHWC, arr_1 labels)
or fresh samples from a checkpoint; the evaluators are `dtr_jax.evaluators`'
(`eval.metrics`, by default the data's own). Everything is checked before
anything compiles.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from dtr_jax import config as config_lib
from dtr_jax import evaluators, files, sample


def selected(config) -> list[type[evaluators.Evaluator]]:
    """The evaluator classes the config selects (`eval.metrics`, or the data's own)."""
    return [evaluators.EVALUATORS.get(name) for name in evaluators.select(config)]


def evaluate_images(instances, images: np.ndarray, labels) -> dict:
    out = {}
    for evaluator in instances:
        out.update(evaluator(images, labels))
    return out


class InLoopEvaluation:
    """Built once per run (classifier, Inception weights, reference features); called
    every eval_every_steps with the run's Sampler on `eval.num_samples` fresh samples,
    made images by the run's image decoder `decode`."""

    def __init__(self, config, decode):
        self.config, self.decode = config, decode
        self.instances = [cls(config.eval) for cls in selected(config)]

    def __call__(self, sampler, params) -> dict:
        c = self.config
        labels = sample.labels_for(c.sample, c.model.num_classes, c.eval.num_samples)
        images = self.decode(sampler(params, labels, jax.random.key(c.sample.seed)))
        results = evaluate_images(self.instances, images, labels)
        return {f"eval/{k}": v for k, v in results.items()}


def evaluate_mode(config, workdir: str) -> dict:
    """Metrics of eval.samples (or of fresh samples from WORKDIR's latest checkpoint).

    Writes WORKDIR/eval/<name>.json and returns the metrics.
    """
    config_lib.validate(config, jax.device_count(), mode="evaluate")
    files.check_writable_dir(str(_results_dir(workdir)), "the results directory")
    e = config.eval
    classes = selected(config)
    if e.samples:
        images, labels = evaluators.load_images(e.samples, "eval.samples")
        name = os.path.splitext(os.path.basename(e.samples))[0]
        what = f"eval.samples={e.samples!r}"
    else:
        images, labels, step = sample.sample_images(config, workdir, e.num_samples)
        name, what = sample.run_name(config, step), "the fresh samples"
    for cls in classes:
        cls.check_images(e, images.shape, what)
    results = {"num_samples": len(images)}
    results.update(evaluate_images([cls(e) for cls in classes], images, labels))
    _write_results(workdir, name, results)
    return results


def _results_dir(workdir: str):
    return files.resolve(workdir) / "eval"


def _write_results(workdir: str, name: str, results: dict) -> None:
    logging.info("Evaluation of %s: %s", name, results)
    if jax.process_index() == 0:
        out_dir = _results_dir(workdir)
        out_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(results, indent=2, sort_keys=True) + "\n"
        files.write_atomically(str(out_dir / f"{name}.json"), text.encode())
