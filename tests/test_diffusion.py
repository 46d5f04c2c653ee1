"""Tests for dtr_jax.diffusion (SPEC §4), against closed forms and numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtr

from dtr_jax import diffusion as D
from dtr_jax import weighting

T = 1000
SHAPE = (2, 4, 4, 3)  # NHWC


@pytest.fixture(scope="module")
def diff():
    return D.GaussianDiffusion.create("linear", T, learn_sigma=True)


def _bcast(a, x):
    return np.asarray(a).reshape((-1,) + (1,) * (x.ndim - 1))


def _adm_space_timesteps(num_timesteps, counts):
    """ADM's algorithm, written out independently for sections given as a list."""
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx, all_steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur_idx = 0.0
        for _ in range(count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return sorted(set(all_steps))


# ----------------------------------------------------------------------------- schedules


def test_linear_betas():
    b = D.get_betas("linear", T)
    assert b.dtype == np.float64 and b.shape == (T,)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(np.diff(b), (0.02 - 1e-4) / (T - 1))
    b250 = D.get_betas("linear", 250)  # scale = 1000 / T
    assert b250[0] == pytest.approx(4e-4) and b250[-1] == pytest.approx(0.08)


def test_cosine_betas():
    b = D.get_betas("cosine", T)
    s = 0.008

    def f(u):
        return np.cos((u + s) / (1 + s) * np.pi / 2) ** 2

    u = np.arange(T) / T
    np.testing.assert_allclose(b, np.minimum(1 - f(u + 1 / T) / f(u), 0.999), rtol=1e-12)
    assert b.max() == 0.999 and np.all(b > 0)
    # Unclipped steps telescope: abar_t = f((t+1)/T) / f(0).
    abar = np.cumprod(1 - b)
    unclipped = np.flatnonzero(b == 0.999)[0]
    np.testing.assert_allclose(abar[:unclipped], f(u[:unclipped] + 1 / T) / f(0), rtol=1e-10)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="schedule"):
        D.get_betas("quadratic", T)
    with pytest.raises(ValueError, match="schedule"):
        D.GaussianDiffusion.create("sigmoid")


# ----------------------------------------------------------------------------- respacing


def test_space_timesteps_250():
    steps = D.space_timesteps(T, "250")
    assert len(steps) == 250
    assert steps[:5] == [0, 4, 8, 12, 16] and steps[-3:] == [991, 995, 999]
    assert steps == _adm_space_timesteps(T, [250])
    assert D.space_timesteps(T, 250) == steps == D.space_timesteps(T, [250])


def test_space_timesteps_sections_and_ddim():
    assert D.space_timesteps(T, "ddim50") == list(range(0, T, 20))
    assert D.space_timesteps(T, "ddim250") == list(range(0, T, 4))
    assert D.space_timesteps(T, "10,15,20") == _adm_space_timesteps(T, [10, 15, 20])
    assert D.space_timesteps(T, [10, 15, 20]) == _adm_space_timesteps(T, [10, 15, 20])
    assert D.space_timesteps(T, "1000") == list(range(T))
    with pytest.raises(ValueError):
        D.space_timesteps(T, "ddim3000")
    with pytest.raises(ValueError):
        D.space_timesteps(10, "20")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respace_keeps_alphas_cumprod(schedule):
    full = D.GaussianDiffusion.create(schedule, T)
    sp = D.GaussianDiffusion.create(schedule, T, timestep_respacing="250")
    keep = np.array(D.space_timesteps(T, "250"))
    assert sp.num_timesteps == 250 and sp.timestep_map.dtype == np.int32
    np.testing.assert_array_equal(sp.timestep_map, keep)
    np.testing.assert_allclose(sp.alphas_cumprod, full.alphas_cumprod[keep], rtol=1e-12)
    np.testing.assert_allclose(
        sp.betas[1:], 1 - full.alphas_cumprod[keep[1:]] / full.alphas_cumprod[keep[:-1]], rtol=1e-12
    )
    np.testing.assert_array_equal(full.timestep_map, np.arange(T))
    # Respacing a respaced process composes the maps.
    sp2 = sp.respace(range(0, 250, 5))
    np.testing.assert_array_equal(sp2.timestep_map, keep[::5])
    np.testing.assert_allclose(sp2.alphas_cumprod, full.alphas_cumprod[keep[::5]], rtol=1e-12)


def test_snr_of_the_linear_schedule(diff):
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    s = weighting.snr(diff.alphas_cumprod)
    assert s.dtype == np.float64 and s.shape == (T,)
    np.testing.assert_allclose(s, abar / (1 - abar), rtol=1e-10)


# ----------------------------------------------------------------------------- forward process


def test_q_sample_exact_and_moments(diff):
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    t = np.array([0, 100, 500, 999])
    x0 = np.broadcast_to(np.float32([0.5, -1.0, 0.8, 2.0])[:, None, None, None], (4, 64, 64, 4))
    noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
    xt = np.asarray(jax.jit(diff.q_sample)(x0, jnp.asarray(t), noise))
    want = _bcast(np.sqrt(abar[t]), x0) * x0 + _bcast(np.sqrt(1 - abar[t]), x0) * np.asarray(noise)
    np.testing.assert_allclose(xt, want, rtol=1e-5, atol=1e-6)
    n = x0[0].size
    mean, var = xt.reshape(4, -1).mean(1), xt.reshape(4, -1).var(1)
    # 5 standard errors of the sample mean / variance.
    assert np.all(np.abs(mean - np.sqrt(abar[t]) * x0[:, 0, 0, 0]) < 5 * np.sqrt((1 - abar[t]) / n))
    np.testing.assert_allclose(var, 1 - abar[t], rtol=5 * np.sqrt(2 / n))


def test_q_posterior_closed_form(diff):
    betas = np.linspace(1e-4, 0.02, T)
    abar = np.cumprod(1 - betas)
    t = np.array([1, 10, 500, 999])
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
    xt = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
    mean, var, logvar = map(np.asarray, diff.q_posterior_mean_variance(x0, xt, jnp.asarray(t)))
    ab, abp, b = abar[t], abar[t - 1], betas[t]
    want_var = b * (1 - abp) / (1 - ab)
    np.testing.assert_allclose(var.ravel(), want_var, rtol=1e-5)
    np.testing.assert_allclose(logvar.ravel(), np.log(want_var), rtol=1e-5)
    c1, c2 = b * np.sqrt(abp) / (1 - ab), (1 - abp) * np.sqrt(1 - b) / (1 - ab)
    np.testing.assert_allclose(
        mean, _bcast(c1, x0) * x0 + _bcast(c2, x0) * xt, rtol=1e-5, atol=1e-6
    )
    # Bayes: q(x_{t-1}|x_0) = N(sqrt(abp) x0, 1-abp), q(x_t|x_{t-1}) = N(sqrt(1-b) x_{t-1}, b).
    prec = 1 / (1 - abp) + (1 - b) / b
    bayes_mean = _bcast(1 / prec, x0) * (
        _bcast(np.sqrt(abp) / (1 - abp), x0) * x0 + _bcast(np.sqrt(1 - b) / b, x0) * xt
    )
    np.testing.assert_allclose(var.ravel(), 1 / prec, rtol=1e-5)
    np.testing.assert_allclose(mean, bayes_mean, rtol=1e-4, atol=1e-5)
    # t = 0: the posterior is a point mass at x0; its log variance is clipped to row 1.
    m0, v0, lv0 = diff.q_posterior_mean_variance(x0, xt, jnp.zeros(4, jnp.int32))
    np.testing.assert_allclose(m0, x0, atol=1e-6)
    assert np.all(np.asarray(v0) == 0)
    np.testing.assert_allclose(np.asarray(lv0).ravel(), np.log(want_var[0]), rtol=1e-5)


# ----------------------------------------------------------------------------- reverse / VB


def _exact_model_output(diff, x0, xt, t, v):
    """eps recovered from (x0, x_t) exactly, plus the variance channel v."""
    abar = diff.alphas_cumprod[t]
    eps = (xt - _bcast(np.sqrt(abar), x0) * x0) / _bcast(np.sqrt(1 - abar), x0)
    return np.concatenate([eps, np.full_like(eps, v)], axis=-1).astype(np.float32)


def test_p_mean_variance_learned_range(diff):
    t = np.array([3, 700])
    rng = np.random.default_rng(1)
    x0, xt = rng.normal(size=(2, *SHAPE)).astype(np.float32)
    pv = diff.betas[t] * (1 - diff.alphas_cumprod[t - 1]) / (1 - diff.alphas_cumprod[t])
    for v, want_logvar in [
        (-1.0, np.log(pv)),
        (1.0, np.log(diff.betas[t])),
        (0.0, 0.5 * np.log(pv) + 0.5 * np.log(diff.betas[t])),
    ]:
        out = diff.p_mean_variance(_exact_model_output(diff, x0, xt, t, v), xt, jnp.asarray(t))
        np.testing.assert_allclose(
            np.asarray(out["log_variance"])[:, 0, 0, 0], want_logvar, rtol=1e-5
        )
        np.testing.assert_allclose(out["pred_xstart"], x0, atol=1e-4)
    clipped = diff.p_mean_variance(
        _exact_model_output(diff, 3 * x0, xt, t, 0.0), xt, jnp.asarray(t), clip_denoised=True
    )
    assert float(jnp.abs(clipped["pred_xstart"]).max()) <= 1.0


def test_vb_zero_at_true_posterior(diff):
    t = np.array([1, 50, 500, 999])
    rng = np.random.default_rng(2)
    x0, xt = rng.normal(size=(2, 4, 4, 4, 3)).astype(np.float32)
    out = _exact_model_output(diff, x0, xt, t, v=-1.0)  # variance = posterior variance
    vb = np.asarray(diff.vb_terms_bpd(out, x0, xt, jnp.asarray(t)))
    np.testing.assert_allclose(vb, 0.0, atol=1e-4)


def test_vb_known_kl(diff):
    t = np.array([1, 50, 500, 999])
    rng = np.random.default_rng(3)
    x0, xt = rng.normal(size=(2, 4, 4, 4, 3))
    delta = 0.3 * rng.normal(size=x0.shape)
    out = _exact_model_output(diff, x0, xt, t, v=1.0)  # variance = beta_t
    out[..., :3] += delta
    b, ab, abp = diff.betas[t], diff.alphas_cumprod[t], diff.alphas_cumprod[t - 1]
    c1 = b * np.sqrt(abp) / (1 - ab)
    # Model mean shifts by c1 * dx0, where dx0 = -sqrt(1/abar - 1) * delta.
    dmean = _bcast(c1 * np.sqrt(1 / ab - 1), x0) * delta
    s1, s2 = b * (1 - abp) / (1 - ab), b  # true (posterior) and model variances
    kl = 0.5 * (_bcast(np.log(s2 / s1) + s1 / s2 - 1, x0) + dmean**2 / _bcast(s2, x0))
    want = kl.reshape(4, -1).mean(1) / math.log(2)
    got = np.asarray(
        jax.jit(diff.vb_terms_bpd)(
            out, x0.astype(np.float32), xt.astype(np.float32), jnp.asarray(t)
        )
    )
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


def test_decoder_nll_at_t0(diff):
    rng = np.random.default_rng(4)
    x0 = rng.integers(0, 256, size=SHAPE) / 127.5 - 1.0  # discretised data incl. +-1
    x0[0, 0, 0] = [-1.0, 1.0, 0.0]
    x0 = x0.astype(np.float32)
    xt = rng.normal(size=SHAPE).astype(np.float32)
    t = np.zeros(2, np.int64)
    v = 0.3
    out = _exact_model_output(diff, x0, xt, t, v)
    out[..., :3] += 0.01 * rng.normal(size=SHAPE).astype(np.float32)  # mean != x0
    got = np.asarray(diff.vb_terms_bpd(out, x0, xt, jnp.asarray(t)))
    # Direct computation: mean at t=0 is pred_xstart (coef2 = 0); log var interpolated.
    pv1 = diff.posterior_variance[1]
    logvar = (v + 1) / 2 * np.log(diff.betas[0]) + (1 - v) / 2 * np.log(pv1)
    eps = out[..., :3].astype(np.float64)
    mean = np.sqrt(1 / diff.alphas_cumprod[0]) * xt - np.sqrt(1 / diff.alphas_cumprod[0] - 1) * eps
    sd = np.exp(0.5 * logvar)

    def cdf_approx(z):
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))

    def nll(cdf):
        hi, lo = cdf((x0 - mean + 1 / 255) / sd), cdf((x0 - mean - 1 / 255) / sd)
        p = np.where(x0 < -0.999, hi, np.where(x0 > 0.999, 1 - lo, hi - lo))
        return -np.log(np.maximum(p, 1e-12)).reshape(2, -1).mean(1) / np.log(2)

    np.testing.assert_allclose(got, nll(cdf_approx), rtol=2e-3)
    np.testing.assert_allclose(got, nll(ndtr), rtol=2e-2)  # exact Gaussian CDF


def test_normal_kl_and_cdf():
    m1, lv1, m2, lv2 = 0.3, np.log(0.5), -0.2, np.log(2.0)
    want = np.log(np.sqrt(2.0) / np.sqrt(0.5)) + (0.5 + 0.5**2) / (2 * 2.0) - 0.5
    assert float(D.normal_kl(m1, lv1, m2, lv2)) == pytest.approx(want, rel=1e-5)
    z = np.linspace(-4, 4, 41)
    np.testing.assert_allclose(D.approx_standard_normal_cdf(z), ndtr(z), atol=2e-4)


# ----------------------------------------------------------------------------- training loss


def _param_model(params):
    return lambda x, t: jnp.concatenate([params["eps"], params["v"]], axis=-1)


def test_training_losses_stop_gradient(diff):
    rng = np.random.default_rng(5)
    x0, noise, eps = rng.normal(size=(3, *SHAPE)).astype(np.float32)
    params = dict(eps=jnp.asarray(eps), v=jnp.full(SHAPE, 0.2, jnp.float32))
    t = jnp.array([0, 600])

    def part(*names):
        def total(p):
            terms = diff.training_losses(_param_model(p), x0, t, noise)
            return sum(terms[name].sum() for name in names)

        return total

    g_vb = jax.grad(part("vb"))(params)
    g_mse = jax.grad(part("mse"))(params)
    g_loss = jax.jit(jax.grad(part("mse", "vb")))(params)
    assert np.all(np.asarray(g_vb["eps"]) == 0)  # the VB term never trains the mean
    assert np.all(np.asarray(g_mse["v"]) == 0)
    assert np.abs(np.asarray(g_vb["v"])).min(axis=(1, 2, 3)).max() > 0
    np.testing.assert_allclose(g_loss["eps"], g_mse["eps"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_loss["v"], g_vb["v"], rtol=1e-5, atol=1e-6)
    # mse closed form; vb depends on v.
    out = diff.training_losses(_param_model(params), x0, t, noise)
    np.testing.assert_allclose(out["mse"], ((noise - eps) ** 2).reshape(2, -1).mean(1), rtol=1e-5)
    other = diff.training_losses(_param_model(dict(params, v=-params["v"])), x0, t, noise)
    assert np.all(np.asarray(other["vb"]) != np.asarray(out["vb"]))
    assert set(out) == {"mse", "vb"} and out["mse"].shape == out["vb"].shape == (2,)


def test_training_losses_no_learned_sigma_and_timestep_map():
    sp = D.GaussianDiffusion.create(num_timesteps=T, learn_sigma=False, timestep_respacing="250")
    seen = []

    def model(x, t):
        seen.append(t)
        return jnp.zeros_like(x)

    x0 = jnp.ones(SHAPE)
    noise = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
    out = sp.training_losses(model, x0, jnp.array([1, 249]), noise)
    assert len(seen) == 1 and seen[0].dtype == jnp.int32
    np.testing.assert_array_equal(seen[0], [4, 999])  # original timesteps
    np.testing.assert_array_equal(out["vb"], 0.0)
    np.testing.assert_allclose(out["mse"], jnp.mean(noise**2, axis=(1, 2, 3)), rtol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        sp.training_losses(lambda x, t: jnp.concatenate([x, x], -1), x0, jnp.array([1, 2]), noise)


# ----------------------------------------------------------------------------- samplers


def _exact_x0_model(diff_full, x0):
    """A model whose data is the single point x0; it sees ORIGINAL timesteps."""
    sab = jnp.asarray(np.sqrt(diff_full.alphas_cumprod), jnp.float32)
    s1m = jnp.asarray(np.sqrt(1 - diff_full.alphas_cumprod), jnp.float32)

    def model(x, t):
        eps = (x - sab[t][:, None, None, None] * x0) / s1m[t][:, None, None, None]
        return jnp.concatenate([eps, jnp.zeros_like(eps)], axis=-1)

    return model


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_respaced_sampler_calls_original_timesteps(sampler):
    sp = D.GaussianDiffusion.create(num_timesteps=T, timestep_respacing="250")
    seen = []

    def model(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == jnp.int32
        jax.debug.callback(lambda tt: seen.append(np.asarray(tt).copy()), t, ordered=True)
        return jnp.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)

    fn = sp.ddpm_sample if sampler == "ddpm" else sp.ddim_sample
    x = jax.jit(lambda r: fn(model, SHAPE, r))(jax.random.PRNGKey(0))
    jax.effects_barrier()
    assert x.shape == SHAPE and x.dtype == jnp.float32
    seen = np.stack(seen)
    assert seen.shape == (250, 2) and np.all(seen[:, 0] == seen[:, 1])
    want = np.array(D.space_timesteps(T, "250"))[::-1]
    np.testing.assert_array_equal(seen[:, 0], want)
    assert list(seen[:3, 0]) == [999, 995, 991] and list(seen[-2:, 0]) == [4, 0]


def test_ddpm_deterministic_and_finite(diff):
    # eps = 0, v = -1: the variance is the posterior variance.
    def model(x, t):
        return jnp.concatenate([jnp.zeros_like(x), -jnp.ones_like(x)], axis=-1)

    sample = jax.jit(lambda r: diff.ddpm_sample(model, SHAPE, r))
    a, b = sample(jax.random.PRNGKey(0)), sample(jax.random.PRNGKey(0))
    c = sample(jax.random.PRNGKey(1))
    assert a.shape == SHAPE and a.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(a)))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    fixed = D.GaussianDiffusion.create(learn_sigma=False, timestep_respacing="ddim25")
    y = jax.jit(
        lambda r: fixed.ddpm_sample(lambda x, t: jnp.zeros_like(x), SHAPE, r, clip_denoised=True)
    )(jax.random.PRNGKey(0))
    assert bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize("respacing", ["ddim50", "250"])
def test_ddim_recovers_single_point(respacing):
    full = D.GaussianDiffusion.create(num_timesteps=T)
    sp = D.GaussianDiffusion.create(num_timesteps=T, timestep_respacing=respacing)
    x0 = jax.random.uniform(jax.random.PRNGKey(7), SHAPE, minval=-1, maxval=1)
    model = _exact_x0_model(full, x0)
    got = jax.jit(lambda r: sp.ddim_sample(model, SHAPE, r, eta=0.0))(jax.random.PRNGKey(3))
    np.testing.assert_allclose(got, x0, atol=1e-5)
    # Ancestral sampling ends at the posterior mean at t=0, which is pred_xstart = x0.
    got = jax.jit(lambda r: sp.ddpm_sample(model, SHAPE, r))(jax.random.PRNGKey(3))
    np.testing.assert_allclose(got, x0, atol=1e-5)


def test_ddim_eta_and_x_T():
    sp = D.GaussianDiffusion.create(num_timesteps=T, timestep_respacing="ddim20")

    def model(x, t):
        return jnp.concatenate([0.1 * x, jnp.zeros_like(x)], axis=-1)

    x_T = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
    run = jax.jit(lambda r, eta: sp.ddim_sample(model, SHAPE, r, eta=eta, x_T=x_T))
    k0, k1 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
    np.testing.assert_array_equal(run(k0, 0.0), run(k1, 0.0))  # deterministic with given x_T
    assert not np.allclose(run(k0, 1.0), run(k1, 1.0))
    assert bool(jnp.all(jnp.isfinite(run(k0, 1.0))))
