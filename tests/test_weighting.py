"""Tests for dtr_jax.weighting (SPEC §5)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtr_jax import weighting as W

T = 1000


@pytest.fixture(scope="module")
def abar():
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, T, dtype=np.float64))


def test_snr(abar):
    s = W.snr(abar)
    assert s.dtype == np.float64 and s.shape == (T,)
    np.testing.assert_allclose(s, abar / (1 - abar))
    assert np.all(np.diff(s) < 0)


# ----------------------------------------------------------------------------- formulas

SNRS = jnp.array([0.0, 0.5, 1.0, 5.0, 10.0, 100.0], jnp.float32)


@pytest.mark.parametrize("kind", ["constant", "uw"])
def test_unit_weights(kind):
    np.testing.assert_array_equal(W.mse_weight(kind, SNRS), np.ones(6))


def test_min_snr():
    got = W.mse_weight("min_snr", SNRS, gamma=5.0)
    np.testing.assert_allclose(got, [1, 1, 1, 1, 0.5, 0.05], rtol=1e-6)
    assert not np.any(np.isnan(got))


def test_p2():
    np.testing.assert_allclose(
        W.mse_weight("p2", SNRS, gamma=1.0, k=1.0),
        [1, 1 / 1.5, 0.5, 1 / 6, 1 / 11, 1 / 101],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        W.mse_weight("p2", SNRS, gamma=0.5, k=1.0), 1 / np.sqrt(1 + np.asarray(SNRS)), rtol=1e-6
    )


def test_p2_is_per_sample(abar):
    t = jnp.array([0, 100, 500, 999])
    mse, vb = jnp.ones(4), jnp.zeros(4)
    table = W.snr(abar)
    w = W.mse_weight("p2", jnp.asarray(table, jnp.float32)[t], gamma=1.0, k=1.0)
    assert w.shape == (4,) and len(set(np.asarray(w).tolist())) == 4
    loss, _ = W.combine("p2", mse, vb, t, table, gamma=1.0, k=1.0)
    np.testing.assert_allclose(loss, np.mean(1 / (1 + table[np.asarray(t)])), rtol=1e-5)


def test_unknown_kind():
    with pytest.raises(ValueError):
        W.mse_weight("bogus", SNRS)


# ----------------------------------------------------------------------------- combine


def _batch(seed=0, b=16):
    r = np.random.default_rng(seed)
    return (
        jnp.asarray(r.random(b), jnp.float32),
        jnp.asarray(r.random(b), jnp.float32),
        jnp.asarray(r.integers(0, T, b), jnp.int32),
    )


def test_combine_constant(abar):
    mse, vb, t = _batch()
    loss, aux = W.combine("constant", mse, vb, t, W.snr(abar))
    np.testing.assert_allclose(loss, np.mean(mse + vb), rtol=1e-6)
    assert loss.shape == () and aux == {}


def test_combine_min_snr_weights_only_mse(abar):
    mse, vb, t = _batch()
    table = W.snr(abar)
    s = table[np.asarray(t)]
    w = np.minimum(s, 5.0) / s
    loss, _ = W.combine("min_snr", mse, vb, t, table, gamma=5.0)
    np.testing.assert_allclose(loss, np.mean(w * np.asarray(mse) + np.asarray(vb)), rtol=1e-5)


def test_combine_uw(abar):
    mse, vb, t = _batch(b=32)
    b = W.uniform_intervals(T, 4)
    s = jnp.array([0.1, -0.2, 0.3, 0.0])
    loss, aux = W.combine("uw", mse, vb, t, W.snr(abar), log_vars=s, boundaries=b)
    ref, _ = uw_loss(mse + vb, W.cluster_index(t, b), s)
    np.testing.assert_allclose(loss, ref)
    sums, counts = W.cluster_sums(mse + vb, W.cluster_index(t, b), 4)
    np.testing.assert_array_equal(aux["cluster_loss_sum"], sums)
    np.testing.assert_array_equal(aux["cluster_count"], counts)
    with pytest.raises(ValueError):
        W.combine("uw", mse, vb, t, W.snr(abar), boundaries=b)
    with pytest.raises(ValueError):
        W.combine("uw", mse, vb, t, W.snr(abar), log_vars=s)


# ----------------------------------------------------------------------------- UW


def uw_loss(per_sample_loss, cluster_ids, log_vars):
    """UW from per-sample losses and their clusters (what `combine` composes)."""
    sums, counts = W.cluster_sums(per_sample_loss, cluster_ids, log_vars.shape[0])
    return W.uw_objective(sums, counts, log_vars)


def _np_uw(loss, ids, s):
    k = len(s)
    means = np.array([loss[ids == i].mean() if np.any(ids == i) else 0.0 for i in range(k)])
    return np.sum(0.5 * (np.exp(-s) * means / k + s)), means


def test_uw_loss_matches_numpy():
    r = np.random.default_rng(1)
    loss, ids, s = r.random(40), r.integers(0, 8, 40), r.normal(size=8)
    got, means = uw_loss(jnp.asarray(loss), jnp.asarray(ids), jnp.asarray(s))
    ref, ref_means = _np_uw(loss, ids, s)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_allclose(means, ref_means, rtol=1e-5)


def test_uw_loss_zero_log_vars_and_grad():
    r = np.random.default_rng(2)
    loss, ids = jnp.asarray(r.random(32), jnp.float32), jnp.asarray(np.arange(32) % 4)
    s0 = W.init_log_vars(4)
    assert s0.shape == (4,) and s0.dtype == jnp.float32 and not s0.any()
    got, means = uw_loss(loss, ids, s0)
    np.testing.assert_allclose(got, np.sum(0.5 * np.asarray(means) / 4), rtol=1e-6)
    s = jnp.array([0.5, -1.0, 0.0, 2.0])
    grad = jax.grad(lambda v: uw_loss(loss, ids, v)[0])(s)
    np.testing.assert_allclose(grad, 0.5 * (1 - np.exp(-s) * np.asarray(means) / 4), rtol=1e-5)


def test_uw_loss_empty_cluster_no_nan():
    loss, ids, s = jnp.ones(6), jnp.array([0, 0, 1, 1, 3, 3]), jnp.zeros(4)

    def f(losses, v):
        return uw_loss(losses, ids, v)[0]

    val, (gl, gs) = jax.value_and_grad(f, argnums=(0, 1))(loss, s)
    _, means = uw_loss(loss, ids, s)
    assert float(means[2]) == 0.0
    assert np.isfinite(val) and np.all(np.isfinite(gl)) and np.all(np.isfinite(gs))


def test_uw_optimizer_step():
    opt = W.uw_optimizer()
    s = W.init_log_vars(3)
    state = opt.init(s)
    upd, _ = opt.update(jnp.array([1.0, -1.0, 0.0]), state, s)
    np.testing.assert_allclose(upd, [-0.025, 0.025, 0.0], atol=1e-6)  # Adam first step = -lr*sign


# ----------------------------------------------------------------------------- sampling


def test_stratified_sampler():
    b = W.uniform_intervals(T, 8)
    sample = jax.jit(lambda r: W.sample_timesteps(r, 64, T, b))
    draws = np.asarray(jax.vmap(sample)(jax.random.split(jax.random.PRNGKey(0), 500)))
    assert draws.shape == (500, 64) and draws.dtype == np.int32
    ids = np.searchsorted(b, draws, side="right") - 1
    for row in ids:
        np.testing.assert_array_equal(np.bincount(row, minlength=8), np.full(8, 8))
    np.testing.assert_array_equal(np.asarray(W.cluster_index(jnp.asarray(draws[0]), b)), ids[0])
    counts = np.bincount(draws.ravel(), minlength=T)
    assert counts.min() > 0 and counts.max() < 3 * counts.mean()  # every t, roughly uniform


def test_stratified_sampler_unequal_clusters(abar):
    b = W.cluster_boundaries("snr", abar, 8)
    t = np.asarray(W.sample_timesteps(jax.random.PRNGKey(3), 4096, T, b))
    ids = np.searchsorted(b, t, side="right") - 1
    np.testing.assert_array_equal(np.bincount(ids, minlength=8), np.full(8, 512))
    for k in range(8):
        assert np.all((t[ids == k] >= b[k]) & (t[ids == k] < b[k + 1]))


def test_uniform_sampler():
    sample = jax.jit(lambda r: W.sample_timesteps(r, 256, T))
    t = np.asarray(jax.vmap(sample)(jax.random.split(jax.random.PRNGKey(1), 200))).ravel()
    assert t.min() == 0 and t.max() == T - 1
    hist = np.bincount(t, minlength=T)
    assert abs(hist.mean() - 51.2) < 1e-9 and hist.std() < 2 * np.sqrt(51.2)


def test_sampler_batch_not_divisible():
    with pytest.raises(ValueError, match="num_clusters=.* cannot stratify batch_size="):
        W.sample_timesteps(jax.random.PRNGKey(0), 12, T, W.uniform_intervals(T, 8))


def test_cluster_index():
    b = W.uniform_intervals(T, 8)
    t = jnp.array([0, 124, 125, 499, 500, 999])
    np.testing.assert_array_equal(W.cluster_index(t, b), [0, 0, 1, 3, 4, 7])
    assert W.cluster_index(t, b).dtype == jnp.int32


# ----------------------------------------------------------------------------- clustering


def test_uniform_intervals():
    np.testing.assert_array_equal(W.uniform_intervals(1000, 8), np.arange(9) * 125)
    np.testing.assert_array_equal(W.uniform_intervals(10, 3), [0, 3, 6, 10])
    with pytest.raises(ValueError):
        W.uniform_intervals(10, 0)


def test_interval_cost():
    lam = np.array([5.0, 3.0, 2.0, 0.0, -4.0])
    assert W.interval_cost(lam, 0, 5) == 3 + 1 + 0 + 2 + 6  # center index 2
    assert W.interval_cost(lam, 1, 3) == 1.0  # center index 2
    assert W.interval_cost(lam, 3, 4) == 0.0


def test_cost_matrix_matches_interval_cost():
    lam = np.random.default_rng(4).normal(size=30)  # not monotone: matrix must still be exact
    c = W._cost_matrix(lam)
    for s, e in itertools.combinations(range(31), 2):
        assert c[s, e] == pytest.approx(W.interval_cost(lam, s, e))
    assert np.isinf(c[5, 5]) and np.isinf(c[6, 5])


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
def test_interval_clustering_linear(abar, k):
    lam = np.log(W.snr(abar))
    b = W.interval_clustering(lam, k)
    assert b.shape == (k + 1,) and b[0] == 0 and b[-1] == T and np.all(np.diff(b) > 0)
    np.testing.assert_array_equal(W.cluster_boundaries("snr", abar, k), b)
    opt, uni = total_cost(lam, b), total_cost(lam, W.uniform_intervals(T, k))
    assert opt <= uni + 1e-9
    if k == 8:
        assert opt < uni - 1.0


def total_cost(log_snr, boundaries) -> float:
    """Sum of interval_cost over the intervals given by `boundaries`."""
    pairs = zip(boundaries[:-1], boundaries[1:], strict=True)
    return sum(W.interval_cost(log_snr, int(a), int(b)) for a, b in pairs)


def _brute_force(lam, k):
    n = len(lam)
    best = min(
        itertools.combinations(range(1, n), k - 1),
        key=lambda cuts: total_cost(lam, np.array((0, *cuts, n))),
    )
    return total_cost(lam, np.array((0, *best, n)))


@pytest.mark.parametrize("seed", range(5))
def test_interval_clustering_optimal(seed):
    lam = np.sort(np.random.default_rng(seed).normal(scale=3, size=12))[::-1]
    for k in (1, 2, 3, 4, 12):
        b = W.interval_clustering(lam, k)
        assert b.shape == (k + 1,) and np.all(np.diff(b) > 0)
        assert total_cost(lam, b) == pytest.approx(_brute_force(lam, k))


def test_cluster_boundaries_dispatch(abar):
    np.testing.assert_array_equal(W.cluster_boundaries("uniform", abar, 8), np.arange(9) * 125)
    with pytest.raises(ValueError):
        W.cluster_boundaries("kmeans", abar, 8)
    with pytest.raises(ValueError):
        W.interval_clustering(np.zeros(5), 6)


# ----------------------------------------------------------------------------- validate


def _ok(**kw):
    base = dict(
        kind="uw", gamma=5.0, k=1.0, num_clusters=8, clustering="uniform", global_batch_size=256
    )
    return W.problems(**{**base, **kw})


def test_validate_ok():
    assert _ok() == []
    assert _ok(kind="constant", global_batch_size=12) == []
    assert _ok(kind="p2", gamma=1.0, k=0.0) == []


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(kind="focal"), "kind='focal'"),
        (dict(clustering="kmeans"), "clustering='kmeans'"),
        (dict(kind="min_snr", gamma=0.0), "gamma=0.0"),
        (dict(kind="p2", gamma=-1.0), "gamma=-1.0"),
        (dict(kind="p2", k=-0.5), "k=-0.5"),
        (dict(num_clusters=0), "num_clusters=0"),
        (dict(num_clusters=1001, kind="constant"), "num_clusters=1001"),
        (dict(global_batch_size=12), "num_clusters=8"),
    ],
)
def test_validate_reports_field(kw, expected):
    problems = _ok(**kw)
    assert len(problems) == 1 and problems[0].startswith(expected)


def test_validate_reports_all():
    assert len(W.problems("p2", gamma=0.0, k=-1.0, num_clusters=0, clustering="x")) == 4


def test_validate_batch_message():
    assert _ok(global_batch_size=12) == [
        "num_clusters=8 cannot stratify global_batch_size=12: it must divide the batch "
        "(an equal share of samples per cluster)"
    ]
