"""The samplers (`sample.sampler`), each for the models of one objective.

  ddpm objective  `ddpm`, `ddim`: ADM's respaced ancestral and DDIM loops (`gaussian`);
                  `dpmpp_2m`: DPM-Solver++(2M) (Lu et al. 2022) on the eps half of the
                  output, on diffusers' `DPMSolverMultistepScheduler` grid and rules
  flow objective  `euler`, `heun`: the probability-flow ODE with fixed steps; `dopri5`:
                  adaptive Dormand-Prince through diffrax (`sample.atol`, `sample.rtol`);
                  `euler_maruyama`: SiT's SDE sampler with its last step

A loop takes the objective, `denoise(x, t) -> model output` (t: what the model sees:
the original timesteps, or the flow time; routing and guidance are `denoise`'s, see
`dtr_jax.inference.sample_fn`), the shape, an rng and the sample settings `s`, and returns
(x_0, the model calls it made per image). Everything is jnp under one jit: fixed-step
loops are `lax.fori_loop`s, the adaptive one diffrax's while loop. The first draw of the
rng is the initial noise; the SDE's noise of step i is `fold_in(loop rng, i)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import dtr_jax.diffusion.flow as flow
from dtr_jax.diffusion.gaussian import GaussianDiffusion
from dtr_jax.errors import choice_problems, integer_problems
from dtr_jax.registry import Registry

LAST_STEPS = ("mean", "tweedie", "euler", "none")  # SiT's last SDE step ('none': SiT's None)
# The sample fields a sampler may read besides sampler, num_steps, cfg_scale (all recorded
# by exports; `run_settings` records those the chosen sampler reads).
FIELDS = (
    "ddim_eta",
    "clip_denoised",
    "guidance_low",
    "guidance_high",
    "sample_eps",
    "atol",
    "rtol",
    "sde_diffusion",
    "sde_diffusion_norm",
    "sde_last_step",
    "sde_last_step_size",
)


@dataclasses.dataclass(frozen=True)
class Sampler:
    objective: str  # the objective (`diffusion.objective`) whose models it samples
    loop: Callable  # (objective, denoise, shape, rng, s, x_T) -> (x_0, model calls)
    calls: Callable  # (s) -> the model calls per image, None where adaptive
    reads: tuple[str, ...] = ()  # the FIELDS that change its samples beyond those always recorded
    min_steps: int = 1


def _one_per_step(s) -> int:
    return s.num_steps


SAMPLERS: Registry[Sampler] = Registry("sample.sampler")


def names_for(objective: str) -> list[str]:
    return [n for n in SAMPLERS if SAMPLERS.get(n).objective == objective]


def run(name: str, objective, denoise, shape, rng, s, x_T=None):
    """x_0 (float32, `shape`) and the model calls per image of sampler `name`."""
    return SAMPLERS.get(name).loop(objective, denoise, shape, rng, s, x_T)


def _initial(shape, rng, x_T):
    """(x_T, the rng of the loop): the initial noise is the rng's first draw."""
    init_rng, loop_rng = jax.random.split(rng)
    x = jax.random.normal(init_rng, shape, jnp.float32) if x_T is None else x_T
    return jnp.asarray(x, jnp.float32), loop_rng


# ----------------------------------------------------------------------------- ddpm models


def _respaced(name: str):
    def loop(process: GaussianDiffusion, denoise, shape, rng, s, x_T=None):
        respaced = process.respaced(str(s.num_steps))
        x = respaced.sample(
            denoise,
            shape,
            rng,
            sampler=name,
            eta=s.ddim_eta,
            clip_denoised=s.clip_denoised,
            x_T=x_T,
        )
        return x, respaced.num_timesteps

    return loop


SAMPLERS.register("ddpm", Sampler("ddpm", _respaced("ddpm"), _one_per_step))
SAMPLERS.register("ddim", Sampler("ddpm", _respaced("ddim"), _one_per_step))


def dpmpp_2m_schedule(process: GaussianDiffusion, num_steps: int):
    """(timesteps (N,), alpha (N,), sigma (N,), coefficients (3, N)) of DPM-Solver++(2M) in
    N steps, as diffusers' `DPMSolverMultistepScheduler` takes them with its defaults
    (`timestep_spacing='linspace'`, `final_sigmas_type='zero'`, `lower_order_final`): the
    timesteps round(linspace(0, T-1, N+1)) from the top, less the last; step i goes from
    timestep i to i+1 (the last to sigma 0) as

      x <- a_i x + b_i D_i + c_i D_{i-1},  D = (x - sigma eps) / alpha, the data prediction;

    first order (c = 0) at the first and the last step, second order (midpoint) between."""
    T = process.num_timesteps
    steps = np.round(np.linspace(0, T - 1, num_steps + 1))[::-1][:-1].astype(np.int64)
    abar = process.alphas_cumprod[steps]
    alpha = np.append(np.sqrt(abar), 1.0)
    sigma = np.append(np.sqrt(1.0 - abar), 0.0)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at the end
        h = lam[1:] - lam[:-1]
        phi = -alpha[1:] * np.expm1(-h)  # alpha_next (1 - e^-h)
        a = sigma[1:] / sigma[:-1]
    b, c = phi.copy(), np.zeros(num_steps)
    second = np.arange(num_steps)
    second = second[(second > 0) & (second < num_steps - 1)]
    r = h[second - 1] / h[second]
    b[second] = phi[second] * (1 + 0.5 / r)
    c[second] = -phi[second] * 0.5 / r
    return steps.astype(np.int32), alpha[:-1], sigma[:-1], np.stack([a, b, c])


def dpmpp_2m(process: GaussianDiffusion, denoise, shape, rng, s, x_T=None):
    steps, alpha, sigma, coefs = dpmpp_2m_schedule(process, s.num_steps)
    x, _ = _initial(shape, rng, x_T)
    tables = [jnp.asarray(v, jnp.float32) for v in (alpha, sigma, *coefs)]

    def body(i, carry):
        x, previous = carry
        alpha_i, sigma_i, a, b, c = (v[i] for v in tables)
        t = jnp.full((shape[0],), jnp.asarray(steps)[i], jnp.int32)
        eps = process._split(denoise(x, t), x)[0]
        data = (x - sigma_i * eps) / alpha_i
        if s.clip_denoised:
            data = jnp.clip(data, -1.0, 1.0)
        return a * x + b * data + c * previous, data

    x, _ = jax.lax.fori_loop(0, len(steps), body, (x, jnp.zeros_like(x)))
    return x, len(steps)


SAMPLERS.register("dpmpp_2m", Sampler("ddpm", dpmpp_2m, _one_per_step))


# ----------------------------------------------------------------------------- flow models


def _ode_drift(objective: flow.FlowMatching, denoise):
    """The ODE's drift at x and a scalar time t (the model sees t for every sample)."""

    def drift(x, t):
        t = jnp.full((x.shape[0],), t, jnp.float32)
        return objective.velocity(x, t, objective.prediction_of(denoise(x, t), x))

    return drift


def _ode_interval(objective: flow.FlowMatching, s) -> tuple[float, float]:
    eps = objective.eps(s.sample_eps)[1]
    return flow.interval(objective.path, objective.prediction, eps)


def _fixed_step(heun: bool):
    def loop(objective: flow.FlowMatching, denoise, shape, rng, s, x_T=None):
        x, _ = _initial(shape, rng, x_T)
        t0, t1 = _ode_interval(objective, s)
        ts = jnp.asarray(np.linspace(t0, t1, s.num_steps + 1), jnp.float32)
        drift = _ode_drift(objective, denoise)

        def body(i, x):
            t, t_next = ts[i], ts[i + 1]
            dt = t_next - t
            d = drift(x, t)
            if not heun:
                return x + dt * d
            return x + 0.5 * dt * (d + drift(x + dt * d, t_next))

        x = jax.lax.fori_loop(0, s.num_steps, body, x)
        return x, s.num_steps * (2 if heun else 1)

    return loop


SAMPLERS.register(
    "euler", Sampler("flow", _fixed_step(heun=False), _one_per_step, reads=("sample_eps",))
)
SAMPLERS.register(
    "heun",
    Sampler("flow", _fixed_step(heun=True), lambda s: 2 * s.num_steps, reads=("sample_eps",)),
)


# The model calls of diffrax's Dopri5 with dt0=None: one at t0 (first same as last), then
# 6 per step tried, accepted or not (counted in tests/test_flow.py).
DOPRI5_FIXED_CALLS, DOPRI5_CALLS_PER_STEP = 1, 6


def dopri5(objective: flow.FlowMatching, denoise, shape, rng, s, x_T=None):
    """The ODE by diffrax's Dormand-Prince 5(4) with a PID step-size controller (relative
    and absolute tolerances `s.rtol`, `s.atol`, at most `s.num_steps` steps), as SiT's
    default sampler (torchdiffeq's dopri5, atol 1e-6, rtol 1e-3) does. The error norm is
    diffrax's RMS over the whole batch, so one step size serves the batch."""
    import diffrax  # only where the adaptive sampler is used

    x, _ = _initial(shape, rng, x_T)
    t0, t1 = _ode_interval(objective, s)
    drift = _ode_drift(objective, denoise)
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: drift(y, t)),
        diffrax.Dopri5(),
        t0,
        t1,
        dt0=None,
        y0=x,
        stepsize_controller=diffrax.PIDController(rtol=s.rtol, atol=s.atol),
        max_steps=s.num_steps,
        saveat=diffrax.SaveAt(t1=True),
    )
    calls = DOPRI5_FIXED_CALLS + DOPRI5_CALLS_PER_STEP * solution.stats["num_steps"]
    return solution.ys[0], calls


SAMPLERS.register(
    "dopri5", Sampler("flow", dopri5, lambda s: None, reads=("sample_eps", "atol", "rtol"))
)


def sde_interval(objective: flow.FlowMatching, s) -> tuple[float, float]:
    """[t0, t1] of the Euler-Maruyama steps: t1 = 1 - sde_last_step_size (SiT)."""
    size = 0.0 if s.sde_last_step == "none" else s.sde_last_step_size
    eps = objective.eps(s.sample_eps)[1]
    return flow.interval(
        objective.path,
        objective.prediction,
        eps,
        sde=True,
        diffusion_form=s.sde_diffusion,
        last_step_size=size,
    )


def _sde_terms(objective: flow.FlowMatching, denoise, x, t, s):
    """(ODE drift v, score, diffusion w) at x, t (B,) from one model call."""
    prediction = objective.prediction_of(denoise(x, t), x)
    w = objective.sde_diffusion(x, t, s.sde_diffusion, s.sde_diffusion_norm)
    return objective.velocity(x, t, prediction), objective.score(x, t, prediction), w


def euler_maruyama_step(objective, denoise, x, t, dt, noise, s):
    """One step of dx = (v + w score) dt + sqrt(2 w) dW (SiT `__Euler_Maruyama_step`)."""
    v, score, w = _sde_terms(objective, denoise, x, t, s)
    return x + (v + w * score) * dt + jnp.sqrt(2 * w) * noise * jnp.sqrt(dt)


def last_step(objective: flow.FlowMatching, denoise, x, t, s):
    """SiT's last SDE step at t = t1 (`__get_last_step`): `mean`, the drift step without
    noise; `tweedie`, Tweedie's denoiser x / alpha + sigma^2 / alpha * score; `euler`, an
    ODE step; of size sde_last_step_size; `none` returns x."""
    if s.sde_last_step == "none":
        return x
    v, score, w = _sde_terms(objective, denoise, x, t, s)
    size = s.sde_last_step_size
    if s.sde_last_step == "mean":
        return x + (v + w * score) * size
    if s.sde_last_step == "euler":
        return x + v * size
    tx = flow._like(t, x)
    alpha, sigma = objective.interpolant.alpha(tx)[0], objective.interpolant.sigma(tx)[0]
    return x / alpha + sigma**2 / alpha * score


def euler_maruyama(objective: flow.FlowMatching, denoise, shape, rng, s, x_T=None):
    """SiT's SDE sampler: num_steps - 1 Euler-Maruyama steps over linspace(t0, t1,
    num_steps), then the last step (a model call unless 'none'): num_steps calls in all,
    as SiT's `--num-sampling-steps`."""
    x, loop_rng = _initial(shape, rng, x_T)
    t0, t1 = sde_interval(objective, s)
    ts = jnp.asarray(np.linspace(t0, t1, s.num_steps), jnp.float32)
    dt = ts[1] - ts[0]

    def body(i, x):
        t = jnp.full((shape[0],), ts[i])
        noise = jax.random.normal(jax.random.fold_in(loop_rng, i), shape, jnp.float32)
        return euler_maruyama_step(objective, denoise, x, t, dt, noise, s)

    x = jax.lax.fori_loop(0, s.num_steps - 1, body, x)
    x = last_step(objective, denoise, x, jnp.full((shape[0],), ts[-1]), s)
    return x, s.num_steps - (s.sde_last_step == "none")


SAMPLERS.register(
    "euler_maruyama",
    Sampler(
        "flow",
        euler_maruyama,
        lambda s: s.num_steps - (s.sde_last_step == "none"),
        reads=(
            "sample_eps",
            "sde_diffusion",
            "sde_diffusion_norm",
            "sde_last_step",
            "sde_last_step_size",
        ),
        min_steps=2,
    ),
)


# ----------------------------------------------------------------------------- settings


def guided_interval(s) -> tuple[float, float]:
    """The noise levels [low, high] at which guidance applies."""
    return float(s.guidance_low), float(s.guidance_high)


FULL_INTERVAL = (0.0, 1.0)


def settings(s) -> dict:
    """What the chosen sampler reads beyond sampler, num_steps, ddim_eta, cfg_scale and
    clip_denoised (JSON types), for a run's digest; the guidance interval only when it is
    not all of [0, 1], so that runs of earlier versions keep their names."""
    out = {f: getattr(s, f) for f in SAMPLERS.get(s.sampler).reads}
    if guided_interval(s) != FULL_INTERVAL:
        out |= dict(guidance_low=float(s.guidance_low), guidance_high=float(s.guidance_high))
    return out


def problems(s, objective: str, num_timesteps: int) -> list[str]:
    """Problems with the sample section `s` for a model of `objective` (ddpm's with
    `num_timesteps` steps), each naming its field."""
    out = SAMPLERS.problems(s.sampler) + integer_problems("num_steps", s.num_steps)
    if not out:
        entry, n = SAMPLERS.get(s.sampler), s.num_steps
        if entry.objective != objective:
            out.append(
                f"sampler={s.sampler!r} samples models of the {entry.objective!r} objective; "
                f"for diffusion.objective={objective!r} use one of {names_for(objective)}"
            )
        elif objective == "ddpm" and n > num_timesteps:
            out.append(f"num_steps={n} exceeds the {num_timesteps} diffusion timesteps")
        elif n < entry.min_steps:
            out.append(f"num_steps={n} must be >= {entry.min_steps} for sampler {s.sampler!r}")
        if s.clip_denoised and entry.objective == "flow":
            out.append(
                "clip_denoised=True clips the data prediction of the ddpm samplers; the flow "
                "samplers have none: set it False"
            )
    if not s.ddim_eta >= 0.0:
        out.append(f"ddim_eta={s.ddim_eta!r} must be >= 0")
    if not 0.0 <= s.guidance_low <= s.guidance_high <= 1.0:
        out.append(
            f"guidance_low={s.guidance_low!r} and guidance_high={s.guidance_high!r} must "
            "satisfy 0 <= low <= high <= 1 (noise levels: 0 is data, 1 is noise)"
        )
    for name in ("atol", "rtol"):
        if not getattr(s, name) > 0:
            out.append(f"{name}={getattr(s, name)!r} must be > 0")
    out += flow.eps_problems("sample_eps", s.sample_eps)
    out += choice_problems("sde_diffusion", s.sde_diffusion, flow.SDE_DIFFUSIONS)
    if not s.sde_diffusion_norm >= 0:
        out.append(f"sde_diffusion_norm={s.sde_diffusion_norm!r} must be >= 0")
    out += choice_problems("sde_last_step", s.sde_last_step, LAST_STEPS)
    if not 0.0 < s.sde_last_step_size < 1.0:
        out.append(f"sde_last_step_size={s.sde_last_step_size!r} must lie in (0, 1)")
    return out
