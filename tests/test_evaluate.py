"""--mode evaluate and in-loop evaluation: digits metrics, Inception metrics, clear refusals."""

import json

import jax
import numpy as np
import pytest

from dtr_jax import decoders, train
from dtr_jax.config import ConfigError
from dtr_jax.data.sources import digits_split
from dtr_jax.models import inception
from dtr_jax.modes import run
from helpers import read_scalars, tiny


def _npz(path, images, labels=None):
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    np.savez(path, **arrays)
    return str(path)


def _eval_config(**eval_fields):
    return tiny(**{f"eval.{k}": v for k, v in eval_fields.items()})


def test_digits_metrics_of_real_test_digits(tmp_path):
    test = digits_split("test")
    samples = _npz(tmp_path / "real.npz", decoders.to_uint8(test.images), test.labels)
    results = run("evaluate", _eval_config(samples=samples), str(tmp_path))
    assert results["num_samples"] == len(test.labels)
    assert results["digits_accuracy"] > 0.95  # the classifier's own test accuracy
    assert results["digits_fd"] < 1.0  # the same images as the reference statistics
    written = json.loads((tmp_path / "eval" / "real.json").read_text())
    assert written == pytest.approx(results)


def test_mismatched_shapes_are_refused(tmp_path):
    samples = _npz(tmp_path / "s.npz", np.zeros((4, 8, 8, 1), np.uint8))
    reference = _npz(tmp_path / "r.npz", np.zeros((4, 16, 16, 3), np.uint8))
    weights = tmp_path / "w.npz"
    weights.write_bytes(b"")  # never read: the shapes are refused first
    config = _eval_config(samples=samples, reference=reference, inception_weights=str(weights))
    with pytest.raises(ConfigError, match=r"\(8, 8, 1\).*eval\.reference.*\(16, 16, 3\)"):
        run("evaluate", config, str(tmp_path))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"samples": "/nonexistent/s.npz"}, r"eval\.samples='/nonexistent/s\.npz': no such file"),
        (
            {"inception_weights": "/nonexistent/pt_inception.pth", "reference": "R"},
            r"eval\.inception_weights='/nonexistent/pt_inception\.pth': no such file",
        ),
        ({"inception_weights": "W"}, "go together"),
    ],
)
def test_missing_files_are_refused_before_anything_runs(tmp_path, fields, message):
    if "reference" in fields:
        fields = dict(fields, reference=_npz(tmp_path / "r.npz", np.zeros((2, 8, 8, 1), np.uint8)))
    with pytest.raises(ConfigError, match=message):
        run("evaluate", _eval_config(**fields), str(tmp_path))


def test_wrong_npz_contents_are_refused(tmp_path):
    floats = _npz(tmp_path / "f.npz", np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(ConfigError, match="expected uint8 images"):
        run("evaluate", _eval_config(samples=floats), str(tmp_path))
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(ConfigError, match="no arr_0"):
        run("evaluate", _eval_config(samples=str(tmp_path / "x.npz")), str(tmp_path))


def _random_inception_weights(path):
    """A pytorch-fid-shaped state dict of random weights, saved as .npz."""
    rng = np.random.default_rng(0)
    arrays = {}
    for key, shape in inception.expected_torch_shapes().items():
        if key.endswith("running_var"):
            arrays[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif key.endswith("weight") and len(shape) == 4:
            fan_in = int(np.prod(shape[1:]))
            arrays[key] = (rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32)
        else:
            arrays[key] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    np.savez(path, **arrays)
    return str(path)


def test_inception_metrics_end_to_end(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    samples = _npz(tmp_path / "s.npz", images)
    reference = _npz(tmp_path / "r.npz", images)
    weights = _random_inception_weights(tmp_path / "fid_inception.npz")
    config = _eval_config(samples=samples, reference=reference, inception_weights=weights)
    config.data.name = "synthetic"  # no digits metrics: Inception only
    results = run("evaluate", config, str(tmp_path))
    assert abs(results["fid"]) < 1e-3  # a set against itself
    assert results["precision"] == 1.0 and results["recall"] == 1.0
    assert np.isfinite(results["inception_score"]) and results["inception_score"] >= 1.0


def test_in_loop_evaluation_writes_metrics(tmp_path):
    config = tiny(**{"num_train_steps": 2, "eval_every_steps": 2, "eval.num_samples": 10})
    train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    accuracy = read_scalars(tmp_path, "eval/digits_accuracy")
    assert list(accuracy) == [2] and 0.0 <= accuracy[2] <= 1.0
    assert np.isfinite(read_scalars(tmp_path, "eval/digits_fd")[2])


def test_in_loop_evaluation_needs_an_evaluator():
    config = tiny(**{"eval_every_steps": 2, "data.name": "synthetic"})
    with pytest.raises(ConfigError, match="no offline evaluator"):
        train.train_and_evaluate(config, "/tmp/never-created-by-this-test")
