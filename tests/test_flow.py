"""The flow objective and the samplers of every objective.

SiT's transport against a PyTorch reference written from SiT's formulas
(tests/torch_transport.py); the ODE and SDE samplers against the exact flow of Gaussian
data (closed form); DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler; the
routing rows a flow model sees over a sampling run; the guidance interval; the new config
fields.
"""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_transport as ref
from dtr_jax import inference, routing
from dtr_jax.config import ConfigError, default_config, validate
from dtr_jax.diffusion import GaussianDiffusion, flow, samplers
from dtr_jax.models import create_dit
from helpers import ROOT, tiny

PATHS, PREDICTIONS = flow.PATHS, flow.PREDICTIONS
SHAPE = (4, 3, 3, 2)
DIGITS_FLOW = str(ROOT / "configs" / "digits_flow.py")


def settings(**fields):
    """A sample section: the defaults with `fields` set."""
    s = default_config().sample.copy_and_resolve_references()
    for name, value in fields.items():
        s[name] = value
    return s


def fixed_inputs(seed=0):
    rng = np.random.default_rng(seed)
    x0, x1, out = rng.standard_normal((3, *SHAPE)).astype(np.float32)
    t = np.array([0.07, 0.31, 0.62, 0.93], np.float32)
    return x0, x1, out, t


def t64(*arrays):
    return [torch.from_numpy(np.asarray(a, np.float64)) for a in arrays]


def close(got, want, tol=1e-5):
    """max |got - want| <= tol * max(1, max |want|)."""
    want = np.asarray(want)
    err = np.max(np.abs(np.asarray(got, np.float64) - want))
    assert err <= tol * max(1.0, np.max(np.abs(want))), err


# ----------------------------------------------------------------------------- SiT's transport


def test_loss_and_model_inputs_are_sits():
    x0, x1, out, t = fixed_inputs()
    for path in PATHS:
        for prediction in PREDICTIONS:
            weights = ["none"] if prediction == "velocity" else list(flow.LOSS_WEIGHTS)
            for weight in weights:
                objective = flow.FlowMatching(path, prediction, loss_weight=weight)
                seen = {}

                def model(x_t, tt, task, seen=seen):
                    seen.update(x_t=x_t, t=tt, task=task)
                    return jnp.asarray(out)

                got = objective.training_losses(model, x1, jnp.asarray(t), x0)
                rp = ref.PATHS[path]
                rt, rx0, rx1, rout = t64(t, x0, x1, out)
                want = ref.loss(rp, prediction, weight, rout, rt, rx0, rx1)
                close(got["mse"], want.numpy())
                assert np.all(np.asarray(got["vb"]) == 0)
                close(seen["x_t"], ref.plan(rp, rt, rx0, rx1)[0].numpy())
                np.testing.assert_array_equal(seen["t"], t)  # SiT feeds t in [0, 1] as it is
                np.testing.assert_array_equal(seen["task"], np.round((1 - t) * 999))


def test_drift_score_and_sde_terms_are_sits():
    x0, x, out, t = fixed_inputs(1)
    for path in PATHS:
        rp = ref.PATHS[path]
        rt, rx, rout = t64(t, x, out)
        for prediction in PREDICTIONS:
            objective = flow.FlowMatching(path, prediction)
            close(objective.velocity(x, t, out), ref.drift(rp, prediction, rout, rx, rt).numpy())
            close(objective.score(x, t, out), ref.score(rp, prediction, rout, rx, rt).numpy())
        for form in flow.SDE_DIFFUSIONS:
            got = objective.sde_diffusion(x, t, form, 0.7)
            close(jnp.broadcast_to(got, x.shape), ref.sde_diffusion(rp, form, 0.7, rx, rt))


def test_euler_maruyama_and_last_steps_are_sits():
    noise, x, out, _ = fixed_inputs(2)
    t = np.full(SHAPE[0], 0.4, np.float32)
    rt, rx, rout, rnoise = t64(t, x, out, noise)
    for path, prediction, form in [
        ("linear", "velocity", "sigma"),
        ("gvp", "noise", "sbdm"),
        ("vp", "score", "decreasing"),
    ]:
        objective, rp = flow.FlowMatching(path, prediction), ref.PATHS[path]
        common = dict(sde_diffusion=form, sde_diffusion_norm=0.8, sde_last_step_size=0.04)
        s = settings(**common)
        got = samplers.euler_maruyama_step(
            objective, lambda *_: jnp.asarray(out), x, t, np.float32(0.05), noise, s
        )
        want = ref.em_step(rp, prediction, form, 0.8, rout, rx, rt, 0.05, rnoise)
        close(got, want.numpy())
        for kind in samplers.LAST_STEPS:
            s = settings(**common, sde_last_step=kind)
            got = samplers.last_step(objective, lambda *_: jnp.asarray(out), x, t, s)
            want = ref.last_step(rp, prediction, form, 0.8, kind, 0.04, rout, rx, rt)
            close(got, want.numpy())


def test_intervals_and_default_eps_are_sits():
    for path in PATHS:
        for prediction in PREDICTIONS:
            train_eps, sample_eps = flow.default_eps(path, prediction)
            # SiT's create_transport: 1e-5 / 1e-3 on vp, 1e-3 off velocity, else 0
            if path == "vp":
                assert (train_eps, sample_eps) == (1e-5, 1e-3)
            else:
                assert train_eps == sample_eps == (0.0 if prediction == "velocity" else 1e-3)
            for sde, form, size in [
                (False, "sigma", 0.0),
                (True, "sigma", 0.04),
                (True, "sbdm", 0),
            ]:
                for eps in (0.0, 1e-3):
                    kw = dict(sde=sde, last_step_size=size)
                    got = flow.interval(path, prediction, eps, diffusion_form=form, **kw)
                    assert got == ref.check_interval(path, prediction, eps, form=form, **kw)


def test_training_times():
    key = jax.random.key(0)
    t = flow.FlowMatching("linear", "noise").sample_times(key, 4096)
    assert 1e-3 <= float(t.min()) and float(t.max()) <= 1 - 1e-3  # SiT's train_eps
    assert abs(float(t.mean()) - 0.5) < 0.02
    lognorm = flow.FlowMatching(
        time_sampling="logit_normal", logit_normal_mean=0.5, logit_normal_std=0.8
    )
    level = 1.0 - np.asarray(lognorm.sample_times(key, 4096), np.float64)
    logit = np.log(level / (1 - level))  # the noise level is logit-normal
    assert abs(logit.mean() - 0.5) < 0.05 and abs(logit.std() - 0.8) < 0.05
    objective = flow.FlowMatching()
    bounds = objective.cluster_boundaries("uniform", 8)
    rows = np.asarray(objective.task_rows(objective.sample_times(key, 4096, bounds)))
    clusters = np.searchsorted(bounds, rows, side="right") - 1
    np.testing.assert_array_equal(clusters, np.tile(np.arange(8), 512))  # one per cluster, in turn


# ----------------------------------------------------------------------------- exact Gaussian flow

MU, SD = 1.5, 0.4  # data N(MU, SD^2) in every dimension


def gaussian_model(objective):
    """The exact prediction of every kind for Gaussian data (E[x1 | x_t], E[x0 | x_t])."""

    def denoise(x, t):
        tt = flow._like(t, x)
        (a, da), (s, ds) = objective.interpolant.alpha(tt), objective.interpolant.sigma(tt)
        var = a**2 * SD**2 + s**2
        x1 = MU + a * SD**2 * (x - a * MU) / var
        x0 = s * (x - a * MU) / var
        return {"velocity": da * x1 + ds * x0, "noise": x0, "score": -x0 / s}[objective.prediction]

    return denoise


def exact_flow(objective, z, t0, t1):
    """Where the ODE takes z from t0 to t1: x_t = a_t MU + sqrt(a_t^2 SD^2 + s_t^2) w."""

    def moments(t):
        path, t = objective.interpolant, jnp.float32(t)
        a, s = path.alpha(t)[0], path.sigma(t)[0]
        return a * MU, jnp.sqrt(a**2 * SD**2 + s**2)

    (m0, s0), (m1, s1) = moments(t0), moments(t1)
    return m1 + s1 * (z - m0) / s0


def solve(name, objective, z, **fields):
    s = settings(sampler=name, **fields)
    model, key = gaussian_model(objective), jax.random.key(0)
    run = jax.jit(lambda: samplers.run(name, objective, model, z.shape, key, s, x_T=z))
    x, calls = run()
    t0, t1 = samplers._ode_interval(objective, s)
    return x, int(calls), float(jnp.max(jnp.abs(x - exact_flow(objective, z, t0, t1))))


@pytest.mark.parametrize(
    "path, prediction, name, order",
    [
        ("linear", "velocity", "euler", 1),
        ("linear", "velocity", "heun", 2),
        ("gvp", "noise", "euler", 1),
        ("gvp", "velocity", "heun", 2),
    ],
)
def test_ode_samplers_converge_at_their_order(path, prediction, name, order):
    objective = flow.FlowMatching(path, prediction)
    z = jax.random.normal(jax.random.key(0), (512, 2, 2, 1))
    errors = []
    for steps in (16, 32, 64):
        x, calls, error = solve(name, objective, z, num_steps=steps)
        nominal = samplers.SAMPLERS.get(name).calls(settings(num_steps=steps))
        assert calls == steps * order == nominal
        errors.append(error)
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    assert np.all(np.abs(ratios - 2**order) < 0.4 * order), (errors, ratios)
    # the samples have the data's distribution (to the sampling error of 2048 draws)
    assert abs(float(x.mean()) - MU) < 0.03 and abs(float(x.std()) - SD) < 0.03


def test_dopri5_meets_its_tolerance_and_counts_its_calls():
    """SiT's default ODE (linear, velocity): the error at t = 1 is within 10x the tolerance
    (the controller bounds each step's error estimate; the global error sums them), and
    the model calls it reports are those the model saw."""
    objective = flow.FlowMatching("linear", "velocity")
    z = jax.random.normal(jax.random.key(1), (64, 2, 2, 1))
    exact = exact_flow(objective, z, 0.0, 1.0)
    scale, counted = float(jnp.max(jnp.abs(exact))), []

    def counting(x, t):
        jax.debug.callback(lambda: counted.append(1))
        return gaussian_model(objective)(x, t)

    @jax.jit
    def error_and_calls(rtol):  # one compilation for every tolerance
        fields = settings(num_steps=500, atol=1e-7).to_dict() | {"rtol": rtol}
        s = types.SimpleNamespace(**fields)
        x, calls = samplers.run("dopri5", objective, counting, z.shape, jax.random.key(0), s, z)
        return jnp.max(jnp.abs(x - exact)), calls

    calls = []
    for rtol in (1e-3, 1e-4, 1e-5):
        counted.clear()
        error, n = error_and_calls(rtol)
        jax.effects_barrier()
        assert error <= 10 * (1e-7 + rtol * scale), (rtol, error)
        assert int(n) == len(counted)
        calls.append(int(n))
    assert calls == sorted(calls) and calls[-1] > calls[0]  # tighter: more steps


def test_euler_maruyama_samples_the_gaussian():
    objective = flow.FlowMatching("linear", "velocity")
    s = settings(sampler="euler_maruyama", num_steps=100)
    x, calls = jax.jit(
        lambda key: samplers.run(
            "euler_maruyama", objective, gaussian_model(objective), (2048, 2, 2, 1), key, s
        )
    )(jax.random.key(2))
    assert int(calls) == 100  # 99 Euler-Maruyama steps and the last step, as SiT's
    assert abs(float(x.mean()) - MU) < 0.02 and abs(float(x.std()) - SD) < 0.02


# ----------------------------------------------------------------------------- DPM-Solver++


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpmpp_2m_matches_diffusers(schedule):
    """The same model outputs (the exact eps of Gaussian data, learned-sigma layout) through
    our sampler and diffusers' scheduler (given our float64 alphas_cumprod: its own
    float32 cumprod of float32 betas is another schedule by 1e-5 at the noisy end)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import DPMSolverMultistepScheduler

    process = GaussianDiffusion.create(schedule, 1000, learn_sigma=True)
    abar = process.alphas_cumprod.astype(np.float32)
    x_T = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)

    def eps_of(x, a):
        return (1 - a) ** 0.5 * (x - a**0.5 * 0.5) / (a * 0.09 + 1 - a)

    for steps in (2, 10, 25):
        seen = []

        def model(x, t, seen=seen):
            jax.debug.callback(lambda tt: seen.append(int(tt[0])), t, ordered=True)
            eps = eps_of(x, jnp.asarray(abar)[t][:, None, None, None])
            return jnp.concatenate([eps, jnp.full_like(x, 0.3)], -1)  # v half: ignored

        s = settings(sampler="dpmpp_2m", num_steps=steps)
        x, calls = jax.jit(
            lambda s=s, model=model: samplers.run(
                "dpmpp_2m", process, model, SHAPE, jax.random.key(0), s, x_T
            )
        )()
        jax.effects_barrier()
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2
        )
        scheduler.alphas_cumprod = torch.tensor(process.alphas_cumprod)
        scheduler.set_timesteps(steps)
        xt = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
        for t in scheduler.timesteps:
            xt = scheduler.step(eps_of(xt, torch.from_numpy(abar)[t]), t, xt).prev_sample
        assert seen == [int(t) for t in scheduler.timesteps] and int(calls) == steps
        np.testing.assert_allclose(x, xt.numpy().transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- routing, guidance


class SpyDiT:
    """Stands in for the DiT: records (t, task) of every call, predicts zeros."""

    input_size, in_channels, num_classes = 4, 1, 10

    def __init__(self):
        self.seen = []

    def apply(self, variables, x, t, y, tables, task=None):
        record = lambda tt, kk: self.seen.append((float(tt[0]), int(kk[0])))  # noqa: E731
        jax.debug.callback(record, t, task, ordered=True)
        return jnp.zeros_like(x) * jnp.asarray(tables)[0, task, 0][:, None, None, None]


@pytest.mark.parametrize("name, steps", [("euler", 8), ("heun", 3), ("euler_maruyama", 5)])
def test_routing_rows_over_a_sampling_run_follow_the_noise_level(name, steps):
    spy = SpyDiT()
    dm = inference.DiffusionModel(spy, None, flow.FlowMatching(num_tasks=1000))
    s = settings(sampler=name, num_steps=steps, cfg_scale=1.0)
    run = inference.sample_fn(dm, s)
    jax.block_until_ready(
        run({}, jnp.zeros(2, jnp.int32), np.ones((1, 1000, 4)), jax.random.key(0))
    )
    jax.effects_barrier()
    ts = np.array([t for t, _ in spy.seen])
    tasks = [task for _, task in spy.seen]
    assert tasks == [int(np.round((1 - t) * 999)) for t in ts.astype(np.float32)]
    if name == "euler":  # t = 0, 1/8, ..., 7/8: rows 999, 874, 749, ..., 125 (999 * 7/8 = 874.1)
        assert tasks == [999, 874, 749, 624, 500, 375, 250, 125]
    assert tasks[0] == 999 and tasks == sorted(tasks, reverse=True)


@pytest.fixture(scope="module")
def random_dit():
    """A tiny DiT + DTR with random (non-zero) weights, its tables, some inputs."""
    model = create_dit("DiT-S/2", depth=1, hidden_size=32, num_heads=2, input_size=4,
                       in_channels=1, num_classes=10, learn_sigma=False)  # fmt: skip
    params = jax.jit(model.init)(jax.random.key(0), *model.dummy_inputs())["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: 0.3 * rng.standard_normal(p.shape, np.float32), params)
    tables = routing.model_tables("dtr", 1000, 32, 1)
    x = jax.random.normal(jax.random.key(2), (3, 4, 4, 1))
    return model, params, tables, x, jnp.array([1, 5, 7])


def test_task_argument_picks_the_routing_row(random_dit):
    model, params, tables, x, y = random_dit
    variables = {"params": params}
    apply = jax.jit(lambda t, task=None: model.apply(variables, x, t, y, tables, task=task))
    t = jnp.array([10, 500, 990])
    plain = apply(t)
    np.testing.assert_array_equal(plain, apply(t, t))
    other = apply(t, jnp.array([990, 500, 10]))
    np.testing.assert_array_equal(other[1], plain[1])
    assert float(jnp.abs(other[0] - plain[0]).max()) > 1e-3  # another row, another output


def test_guidance_interval_bounds_are_inclusive(random_dit):
    model, params, tables, x, y = random_dit
    t, task = jnp.full(3, 0.6), jnp.full(3, 400)
    conditional = jax.jit(inference.model_fn(model, params, y, tables, 1.0))(x, t, task)
    guided = jax.jit(inference.model_fn(model, params, y, tables, 3.0))(x, t, task)
    assert float(jnp.abs(guided - conditional).max()) > 1e-2
    within = jax.jit(inference.model_fn(model, params, y, tables, 3.0, (0.25, 0.5)))
    for level, inside in [(0.25, True), (0.5, True), (0.375, True), (0.2499, False),
                          (0.5001, False), (0.0, False), (1.0, False)]:  # fmt: skip
        got = within(x, t, task, jnp.full(3, level))
        close(got, guided if inside else conditional, tol=1e-6)
    mixed = within(x, t, task, jnp.array([0.3, 0.9, 0.5]))  # per sample: u + 1 (c - u) = c
    close(mixed, jnp.stack([guided[0], conditional[1], guided[2]]), tol=1e-6)
    # the levels each objective gives: ddpm's t / (T - 1), the flow's 1 - t
    ddpm = GaussianDiffusion.create("linear", 1000)
    np.testing.assert_allclose(ddpm.noise_level(jnp.array([0, 250, 999])), [0, 250 / 999, 1])
    np.testing.assert_allclose(flow.FlowMatching().noise_level(jnp.array([0.0, 0.75])), [1, 0.25])


# ----------------------------------------------------------------------------- config


def flow_config(**overrides):
    from dtr_jax.config import load_config
    from helpers import TINY

    return load_config(DIGITS_FLOW, **(TINY | overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"diffusion.objective": "score"}, "diffusion.objective='score' is unknown"),
        ({"diffusion.path": "cosine"}, "diffusion.path='cosine' is unknown"),
        ({"diffusion.prediction": "x0"}, "diffusion.prediction='x0' is unknown"),
        ({"diffusion.loss_weight": "snr"}, "diffusion.loss_weight='snr' is unknown"),
        ({"diffusion.loss_weight": "likelihood"}, "with diffusion.prediction='velocity' use"),
        ({"diffusion.time_sampling": "beta"}, "diffusion.time_sampling='beta' is unknown"),
        ({"diffusion.logit_normal_std": 0.0}, "diffusion.logit_normal_std=0.0 must be > 0"),
        ({"diffusion.train_eps": 0.5}, r"diffusion.train_eps=0.5 must be None .* \[0, 0.5\)"),
        ({"model.routing.num_tasks": 0}, "model.routing.num_tasks=0 must be a positive"),
        ({"weighting.kind": "min_snr"}, "weighting.kind='min_snr' weights the ddpm"),
        ({"weighting.kind": "p2"}, "weighting.kind='p2' weights the ddpm"),
        ({"weighting.clustering": "snr"}, "weighting.clustering='snr' splits the ddpm"),
        (
            {"weighting.kind": "uw", "diffusion.time_sampling": "logit_normal"},
            "weighting.kind='uw' draws the times uniformly",
        ),
        ({"sample.sampler": "ddim"}, "sample.sampler='ddim' samples models of the 'ddpm'"),
        ({"sample.sampler": "rk4"}, "sample.sampler='rk4' is unknown"),
        ({"sample.clip_denoised": True}, "sample.clip_denoised=True clips"),
        ({"sample.guidance_low": 0.6, "sample.guidance_high": 0.4}, "sample.guidance_low=0.6"),
        ({"sample.guidance_high": 1.5}, "0 <= low <= high <= 1"),
        ({"sample.atol": 0.0}, "sample.atol=0.0 must be > 0"),
        ({"sample.rtol": -1.0}, "sample.rtol=-1.0 must be > 0"),
        ({"sample.sample_eps": -0.1}, "sample.sample_eps=-0.1 must be None"),
        ({"sample.sde_diffusion": "SBDM"}, "sample.sde_diffusion='SBDM' is unknown"),
        ({"sample.sde_diffusion_norm": -1.0}, "sample.sde_diffusion_norm=-1.0 must be >= 0"),
        ({"sample.sde_last_step": "Mean"}, "sample.sde_last_step='Mean' is unknown"),
        ({"sample.sde_last_step_size": 0.0}, r"sample.sde_last_step_size=0.0 must lie in \(0"),
        (
            {"sample.sampler": "euler_maruyama", "sample.num_steps": 1},
            "sample.num_steps=1 must be >= 2 for sampler 'euler_maruyama'",
        ),
    ],
)
def test_flow_fields_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(flow_config(**overrides), num_devices=8)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sample.sampler": "heun"}, "sample.sampler='heun' samples models of the 'flow'"),
        ({"model.routing.num_tasks": 999}, "model.routing.num_tasks=999 differs from"),
        ({"sample.num_steps": 1001, "sample.sampler": "dpmpp_2m"}, "exceeds the 1000"),
    ],
)
def test_ddpm_refuses_what_it_has_not(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(tiny(**overrides), num_devices=8)
    validate(tiny(**{"model.routing.num_tasks": 1000, "sample.sampler": "dpmpp_2m"}), 8)
    validate(flow_config(**{"model.routing.num_tasks": 250, "sample.sampler": "dopri5"}), 8)


def test_run_names_record_what_each_sampler_reads():
    from dtr_jax import sample

    def name(config, **fields):
        config = config.copy_and_resolve_references()
        for field, value in fields.items():
            config.sample[field] = value
        return sample.run_name(config, 8, 12)

    dopri5 = flow_config(**{"sample.sampler": "dopri5"})
    sde = flow_config(**{"sample.sampler": "euler_maruyama"})
    for config, changes in [
        (dopri5, dict(atol=1e-5, rtol=1e-2, sample_eps=0.01, guidance_high=0.7)),
        (sde, dict(sde_diffusion="sbdm", sde_diffusion_norm=2.0, sde_last_step="tweedie")),
        (sde, dict(sde_last_step_size=0.1, guidance_low=0.1)),
    ]:
        names = {name(config)} | {name(config, **{k: v}) for k, v in changes.items()}
        assert len(names) == len(changes) + 1
    # what a sampler does not read leaves its runs' names (and earlier versions') alone
    ddpm = tiny()
    assert name(ddpm, atol=1e-3, sde_last_step="none", sample_eps=0.1) == name(ddpm)
    assert name(dopri5, sde_diffusion="linear") == name(dopri5)
