"""FID / IS / precision-recall against closed forms and hand-checked cases."""

import numpy as np
import pytest
from scipy.stats import ortho_group

from dtr_jax import metrics


def _closed_form(mu1, a, mu2, b):
    """FID of N(mu1, Q diag(a) Q^T) vs N(mu2, Q diag(b) Q^T): the sqrt is elementwise."""
    return np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2.0 * np.sqrt(a * b))


def test_stats_match_numpy():
    f = np.random.default_rng(0).normal(size=(100, 6)).astype(np.float32)
    mu, sigma = metrics.stats(f)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (6, 6)
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False))


def test_streamed_stats_are_those_of_all_rows_at_once():
    """Chunks of unequal sizes, offset far from 0 (where one-pass sums would lose digits)."""
    f = 1e3 + np.random.default_rng(3).normal(size=(103, 5)).astype(np.float32)
    chunks = [f[:40], f[40:41], f[41:]]
    mu, sigma = metrics.streamed_stats(lambda: iter(chunks))
    expected_mu, expected_sigma = metrics.stats(f)
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-14)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-9)
    with pytest.raises(ValueError, match="at least 2 rows"):
        metrics.streamed_stats(lambda: iter([f[:1]]))


def test_fid_self_is_zero():
    f = np.random.default_rng(1).normal(size=(500, 32))
    mu, sigma = metrics.stats(f)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fid_diagonal_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    got = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    np.testing.assert_allclose(got, _closed_form(mu1, a, mu2, b), rtol=1e-10)


def test_fid_commuting_non_diagonal_closed_form():
    rng = np.random.default_rng(3)
    q = ortho_group.rvs(24, random_state=4)
    mu1, mu2 = rng.normal(size=24), rng.normal(size=24)
    a, b = rng.uniform(0.1, 3.0, 24), rng.uniform(0.1, 3.0, 24)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert np.abs(s1 - np.diag(np.diag(s1))).max() > 0.1  # genuinely non-diagonal
    got = metrics.frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(got, _closed_form(mu1, a, mu2, b), rtol=1e-8)


def test_fid_rank_deficient_is_finite():
    f = np.random.default_rng(5).normal(size=(10, 32))  # N < D: singular covariances
    g = np.random.default_rng(6).normal(size=(10, 32)) + 1.0
    (m1, s1), (m2, s2) = metrics.stats(f), metrics.stats(g)
    d = metrics.frechet_distance(m1, s1, m2, s2)
    assert np.isfinite(d) and d > 0


def test_fid_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_uniform_is_one():
    mean, std = metrics.inception_score(np.full((100, 10), 0.1))
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)
    mean, _ = metrics.inception_score(np.zeros((100, 1008)))  # uniform logits
    assert mean == pytest.approx(1.0)


def test_inception_score_one_hot_is_num_classes():
    probs = np.eye(10)[np.arange(100) % 10]  # each split: 10 samples, 10 distinct classes
    mean, std = metrics.inception_score(probs, splits=10)
    assert mean == pytest.approx(10.0) and std == pytest.approx(0.0, abs=1e-9)
    assert metrics.inception_score(np.eye(37), splits=1)[0] == pytest.approx(37.0)


def test_inception_score_logits_vs_reference():
    logits = np.random.default_rng(7).normal(size=(200, 20)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ref = []
    for part in np.split(p, 4):  # improved-GAN formula
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        ref.append(np.exp(kl.sum(1).mean()))
    for x in (logits, p):
        mean, std = metrics.inception_score(x, splits=4)
        np.testing.assert_allclose([mean, std], [np.mean(ref), np.std(ref)], rtol=1e-10)


def _brute_radii(f, k):
    d = ((f[:, None] - f[None]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, k]


def test_knn_radii_blocked_matches_brute_force():
    f = np.random.default_rng(8).normal(size=(37, 5))
    for batch in (4, 10, 100):
        np.testing.assert_allclose(
            metrics.knn_radii(f, k=3, batch=batch), _brute_radii(f, 3), rtol=1e-10, atol=1e-12
        )


def test_precision_recall_self_is_one():
    f = np.random.default_rng(9).normal(size=(60, 8))
    assert metrics.precision_recall(f, f, batch=16) == (1.0, 1.0)


def test_precision_recall_disjoint_is_zero():
    rng = np.random.default_rng(10)
    real = rng.normal(size=(50, 4))
    fake = rng.normal(size=(40, 4)) + 100.0
    assert metrics.precision_recall(real, fake, batch=16) == (0.0, 0.0)


def test_precision_recall_hand_checked():
    # 1-D, k=1. Squared radii: real [0,1,2,10] -> [1,1,1,64];
    # fake [0.5,3.5,6,40,41] -> [9,6.25,6.25,1,1].
    # Precision: 0.5 (ball of 0), 3.5 and 6 (ball of 10, radius 8) are in; 40, 41 not -> 3/5.
    # Recall: 0, 1, 2 lie in the ball of 0.5 (radius 3); 10 is in no fake ball -> 3/4.
    real = np.array([[0.0], [1.0], [2.0], [10.0]])
    fake = np.array([[0.5], [3.5], [6.0], [40.0], [41.0]])
    np.testing.assert_allclose(metrics.knn_radii(real, k=1), [1, 1, 1, 64])
    np.testing.assert_allclose(metrics.knn_radii(fake, k=1), [9, 6.25, 6.25, 1, 1])
    for batch in (1, 2, 1000):
        p, r = metrics.precision_recall(real, fake, k=1, batch=batch)
        assert (p, r) == pytest.approx((3 / 5, 3 / 4))


def test_stats_round_trip(tmp_path):
    f = np.random.default_rng(11).normal(size=(30, 7))
    mu, sigma = metrics.stats(f)
    path = tmp_path / "ref_stats.npz"
    metrics.save_stats(path, mu, sigma)
    mu2, sigma2 = metrics.load_stats(path)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        metrics.load_stats(tmp_path / "missing.npz")
