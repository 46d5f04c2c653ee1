"""--mode evaluate and in-loop evaluation: digits metrics, Inception metrics, clear refusals."""

import json

import jax
import numpy as np
import pytest

from dtr_jax import decoders, evaluators, metrics, sharding, train
from dtr_jax.config import ConfigError
from dtr_jax.data.sources import digits_split
from dtr_jax.errors import InputFileError
from dtr_jax.models import inception
from dtr_jax.modes import run
from helpers import random_inception_weights, read_scalars, tiny


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


def test_inception_metrics_end_to_end(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    samples = _npz(tmp_path / "s.npz", images)
    reference = _npz(tmp_path / "r.npz", images)
    weights = random_inception_weights(tmp_path / "fid_inception.npz")
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


# --- at scale: sharded features, resumable evaluation, ADM references and output --------------


def _inception_setup(tmp_path, reference_arrays=None):
    """16 sample images (16x16x3), random weights, and an Inception-only config whose
    reference holds 8 other images (or `reference_arrays`); batches of 8 (1 per device)."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    if reference_arrays is None:
        reference_arrays = {"arr_0": rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)}
    np.savez(tmp_path / "ref.npz", **reference_arrays)
    config = _eval_config(
        samples=_npz(tmp_path / "samples.npz", images),
        reference=str(tmp_path / "ref.npz"),
        inception_weights=random_inception_weights(tmp_path / "fid_inception.npz"),
        batch_size=8,
    )
    config.data.name = "synthetic"  # no digits metrics: Inception only
    return config, images


def test_inception_features_over_eight_devices_match_one(tmp_path):
    config, images = _inception_setup(tmp_path)
    images = images[:8]
    meshes = [sharding.make_mesh(config.mesh, jax.devices()[:1]), sharding.make_mesh(config.mesh)]
    one, eight = (evaluators.InceptionMetrics(config.eval, mesh) for mesh in meshes)
    pool = eight.features._features(sharding.put_batch(images, meshes[1]))["pool"]
    assert pool.sharding.shard_shape(pool.shape) == (1, inception.FEATURE_DIM)  # 1 per device
    for a, b in zip(one.features(images), eight.features(images), strict=True):
        assert a.shape == (8, a.shape[1]) and a.std(axis=0).max() > 1e-2  # image-dependent
        # float32 round-off of another batch layout: 1e-6 of the features' scale
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(a).max())


class Interrupted(Exception):
    pass


FEATURE_BATCH = evaluators.InceptionFeatures.batch


def _count_feature_batches(monkeypatch, fail_at=None):
    calls = []

    def counted(self, images):
        if len(calls) == fail_at:
            raise Interrupted
        calls.append(len(images))
        return FEATURE_BATCH(self, images)

    monkeypatch.setattr(evaluators.InceptionFeatures, "batch", counted)
    return calls


def _record_fid(monkeypatch):
    """Replaces the Fréchet distance (a 2048x2048 sqrtm: half a minute on 2 cores) by a
    cheap function of the same statistics, recording its arguments."""
    calls = []

    def distance(mu1, sigma1, mu2, sigma2):
        calls.append((mu1, sigma1, mu2, sigma2))
        return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2))

    monkeypatch.setattr(metrics, "frechet_distance", distance)
    return calls


def test_interrupted_evaluation_resumes_and_prints_the_adm_lines(tmp_path, monkeypatch, capsys):
    config, _ = _inception_setup(tmp_path)
    _record_fid(monkeypatch)
    calls = _count_feature_batches(monkeypatch)
    results = run("evaluate", config, str(tmp_path / "a"))
    assert calls == [8, 8, 8]  # the samples', then the reference's
    assert capsys.readouterr().out.splitlines() == [
        f"Inception Score: {results['inception_score']}",
        f"FID: {results['fid']}",
        f"Precision: {results['precision']}",
        f"Recall: {results['recall']}",
    ]

    _count_feature_batches(monkeypatch, fail_at=1)
    with pytest.raises(Interrupted):
        run("evaluate", config, str(tmp_path / "b"))
    (cache,) = (tmp_path / "b" / "eval").iterdir()
    assert cache.name.startswith("samples.cache-")
    assert [p.name for p in cache.glob("inception_*/*")] == ["part-00000.npz"]
    calls = _count_feature_batches(monkeypatch)
    assert run("evaluate", config, str(tmp_path / "b")) == results
    assert calls == [8, 8]  # the second batch of the samples, then the reference
    assert [p.name for p in (tmp_path / "b" / "eval").iterdir()] == ["samples.json"]


def test_reference_statistics_give_the_fid_and_its_images_precision_recall(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    d = inception.FEATURE_DIM
    mu, sigma = np.full(d, 0.1), np.eye(d) * 0.2
    adm_like = dict(arr_0=images, mu=mu, sigma=sigma, mu_s=np.zeros(7), sigma_s=np.eye(7))
    config, _ = _inception_setup(tmp_path, adm_like)
    np.savez(tmp_path / "samples.npz", arr_0=images)  # the reference's own images
    fid = _record_fid(monkeypatch)
    results = run("evaluate", config, str(tmp_path))
    assert results["precision"] == 1.0 and results["recall"] == 1.0  # from its images
    ((mu_samples, _, mu_reference, sigma_reference),) = fid
    np.testing.assert_array_equal(mu_reference, mu)  # the stored statistics,
    np.testing.assert_array_equal(sigma_reference, sigma)
    assert np.abs(mu_samples - mu).max() > 1.0  # not those of the images


def test_reference_statistics_of_the_wrong_shape_are_refused(tmp_path):
    config, _ = _inception_setup(tmp_path, {"mu": np.zeros(3), "sigma": np.eye(3)})
    with pytest.raises(InputFileError, match=r"eval\.reference=.* has mu \(3,\) and sigma"):
        run("evaluate", config, str(tmp_path))


def test_samples_are_read_memory_mapped_where_the_file_allows(tmp_path):
    images = np.random.default_rng(4).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(6, dtype=np.int32)
    np.savez(tmp_path / "plain.npz", arr_0=images, arr_1=labels)
    np.savez_compressed(tmp_path / "packed.npz", arr_0=images, arr_1=labels)
    plain = evaluators.load_images(str(tmp_path / "plain.npz"), "eval.samples")
    packed = evaluators.load_images(str(tmp_path / "packed.npz"), "eval.samples")
    assert isinstance(plain[0], np.memmap) and not isinstance(packed[0], np.memmap)
    for a, b in zip(plain, packed, strict=True):
        np.testing.assert_array_equal(a, b)
