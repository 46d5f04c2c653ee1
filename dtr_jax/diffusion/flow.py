"""The `flow` objective: SiT's interpolants (Ma et al. 2024; willisma/SiT, `transport/`).

A path mixes data x1 and noise x0 ~ N(0, I) as x_t = alpha_t x1 + sigma_t x0 over t in
[0, 1], t = 0 being noise and t = 1 data (SiT's convention):

  linear  alpha = t, sigma = 1 - t (rectified flow; SiT's `ICPlan`)
  gvp     alpha = sin(pi t / 2), sigma = cos(pi t / 2) (`GVPCPlan`)
  vp      the VP-SDE's: log alpha = -(1 - t)^2 (b1 - b0) / 4 - (1 - t) b0 / 2,
          sigma = sqrt(1 - alpha^2), b0 = 0.1, b1 = 20 (`VPCPlan`)

The model is fed t itself (SiT feeds t in [0, 1] to the DiT's timestep embedder) and
predicts the `velocity` u_t = alpha'_t x1 + sigma'_t x0, the `noise` x0 or the `score`
-x0 / sigma_t; a learned-sigma output has its second half dropped, as SiT's forward does.
The loss is SiT's `training_losses`: the velocity MSE, or for noise and score the MSE
weighted by `loss_weight` (`none`; `velocity`: (g / sigma)^2; `likelihood`: g / sigma^2,
with g the diffusion term of the path's probability-flow ODE, `drift_terms`).

Task routing in continuous time: the noise level of t is 1 - t, and the model is told the
task round((1 - t) * (T - 1)), a row of the same (T, C) routing tables as the ddpm
objective (whose task is its timestep, noise level t / (T - 1)); so, as in the paper, the
window slides towards the task-specific channels as the noise grows.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from dtr_jax import weighting
from dtr_jax.errors import choice_problems

PATHS = ("linear", "gvp", "vp")
PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = ("none", "velocity", "likelihood")  # SiT's WeightType; noise and score only
TIME_SAMPLINGS = ("uniform", "logit_normal")  # logit-normal: SD3, LightningDiT
CLUSTERINGS = ("uniform",)  # UW clusters of task rows; ANT's 'snr' is the ddpm schedule's
# The SDE's diffusion coefficients (SiT's `diffusion_form`; 'sbdm' is its 'SBDM')
SDE_DIFFUSIONS = ("constant", "sbdm", "sigma", "linear", "decreasing", "increasing_decreasing")


def _like(t, x):
    """t (B,) reshaped to broadcast against x (B, ...)."""
    t = jnp.asarray(t, x.dtype)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


class Linear:
    """alpha = t, sigma = 1 - t."""

    def alpha(self, t):
        """(alpha_t, alpha'_t)."""
        return t, jnp.ones_like(t)

    def sigma(self, t):
        """(sigma_t, sigma'_t)."""
        return 1 - t, -jnp.ones_like(t)

    def alpha_ratio(self, t):
        """alpha'_t / alpha_t, written where it is stable."""
        return 1 / t

    def drift_terms(self, x, t):
        """(f, g) of the probability-flow ODE dx/dt = f + g * score (SiT `compute_drift`
        returns (-f, g))."""
        ratio = self.alpha_ratio(t)
        sigma, d_sigma = self.sigma(t)
        return ratio * x, ratio * sigma**2 - sigma * d_sigma


class GVP(Linear):
    """alpha = sin(pi t / 2), sigma = cos(pi t / 2)."""

    def alpha(self, t):
        return jnp.sin(t * math.pi / 2), math.pi / 2 * jnp.cos(t * math.pi / 2)

    def sigma(self, t):
        return jnp.cos(t * math.pi / 2), -math.pi / 2 * jnp.sin(t * math.pi / 2)

    def alpha_ratio(self, t):
        return math.pi / (2 * jnp.tan(t * math.pi / 2))


class VP(Linear):
    """The VP-SDE's path, beta(s) from sigma_min = 0.1 to sigma_max = 20 (SiT's names)."""

    sigma_min, sigma_max = 0.1, 20.0

    def _log_alpha(self, t):
        return (
            -0.25 * (1 - t) ** 2 * (self.sigma_max - self.sigma_min)
            - 0.5 * (1 - t) * self.sigma_min
        )

    def alpha_ratio(self, t):
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def alpha(self, t):
        alpha = jnp.exp(self._log_alpha(t))
        return alpha, alpha * self.alpha_ratio(t)

    def sigma(self, t):
        alpha2 = jnp.exp(2 * self._log_alpha(t))
        sigma = jnp.sqrt(1 - alpha2)
        return sigma, alpha2 * (2 * self.alpha_ratio(t)) / (-2 * sigma)

    def drift_terms(self, x, t):
        beta = self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)
        return 0.5 * beta * x, beta / 2


PATH_CLASSES = {"linear": Linear, "gvp": GVP, "vp": VP}


def default_eps(path: str, prediction: str) -> tuple[float, float]:
    """SiT's (train_eps, sample_eps) (`create_transport`): how far the times keep from
    the path's singular ends."""
    if path == "vp":
        return 1e-5, 1e-3
    if prediction != "velocity":
        return 1e-3, 1e-3
    return 0.0, 0.0  # velocity on linear and gvp is stable everywhere


def interval(
    path: str,
    prediction: str,
    eps: float,
    *,
    sde: bool = False,
    diffusion_form: str = "sigma",
    last_step_size: float = 0.0,
) -> tuple[float, float]:
    """SiT's `check_interval`: the times [t0, t1] a loss or a sampler uses."""
    t0, t1 = 0.0, 1.0
    end = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
    if path == "vp":
        t1 = end
    elif prediction != "velocity" or sde:
        t0 = eps if (diffusion_form == "sbdm" and sde) or prediction != "velocity" else 0.0
        t1 = end
    return t0, t1


@dataclasses.dataclass(frozen=True, eq=False)
class FlowMatching:
    """SiT's transport as an objective: its loss, the times training draws, and what the
    samplers (`dtr_jax.diffusion.samplers`) integrate."""

    path: str = "linear"
    prediction: str = "velocity"
    num_tasks: int = 1000  # T, the rows of the routing tables
    learn_sigma: bool = False  # the model's output has twice the channels; the second dropped
    loss_weight: str = "none"
    time_sampling: str = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    train_eps: float | None = None  # None: SiT's default (`default_eps`)

    name = "flow"

    def __post_init__(self):
        found = problems(
            self.path,
            self.prediction,
            self.loss_weight,
            self.time_sampling,
            self.logit_normal_std,
            self.train_eps,
        )
        if found:
            raise ValueError("; ".join(found))

    @property
    def interpolant(self) -> Linear:
        """The path's alpha_t, sigma_t and ODE terms."""
        return PATH_CLASSES[self.path]()

    def eps(self, sample_eps: float | None = None) -> tuple[float, float]:
        """(train_eps, sample_eps), SiT's defaults where None."""
        train, sample = default_eps(self.path, self.prediction)
        return (
            train if self.train_eps is None else self.train_eps,
            sample if sample_eps is None else sample_eps,
        )

    # ---------------------------------------------------------------- the path

    def plan(self, t, x0, x1):
        """(x_t, u_t): the point of the path at t between noise x0 and data x1, and its
        velocity."""
        t = _like(t, x1)
        (alpha, d_alpha), (sigma, d_sigma) = self.interpolant.alpha(t), self.interpolant.sigma(t)
        return alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0

    def prediction_of(self, model_output, x):
        """The prediction in a model output: its first C channels with learned sigma."""
        c = x.shape[-1]
        want = 2 * c if self.learn_sigma else c
        if model_output.shape[-1] != want:
            raise ValueError(f"model output has {model_output.shape[-1]} channels, expected {want}")
        return model_output[..., :c]

    def score(self, x, t, prediction):
        """The score grad log p_t(x) of a prediction (SiT `get_score`)."""
        t = _like(t, x)
        if self.prediction == "noise":
            return prediction / -self.interpolant.sigma(t)[0]
        if self.prediction == "score":
            return prediction
        (alpha, d_alpha), (sigma, d_sigma) = self.interpolant.alpha(t), self.interpolant.sigma(t)
        ratio = alpha / d_alpha
        return (ratio * prediction - x) / (sigma**2 - ratio * d_sigma * sigma)

    def velocity(self, x, t, prediction):
        """The probability-flow ODE's drift dx/dt of a prediction (SiT `get_drift`)."""
        if self.prediction == "velocity":
            return prediction
        f, g = self.interpolant.drift_terms(x, _like(t, x))
        return f + g * self.score(x, t, prediction)

    def sde_diffusion(self, x, t, form: str, norm: float):
        """The SDE's diffusion coefficient w(t) (SiT `compute_diffusion`; the SDE is
        dx = (v + w * score) dt + sqrt(2 w) dW)."""
        t = _like(t, x)
        if form == "constant":
            return jnp.full_like(t, norm)
        if form == "sbdm":
            return norm * self.interpolant.drift_terms(x, t)[1]
        if form == "sigma":
            return norm * self.interpolant.sigma(t)[0]
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * jnp.cos(math.pi * t) + 1) ** 2
        if form == "increasing_decreasing":
            return norm * jnp.sin(math.pi * t) ** 2
        raise ValueError(choice_problems("sde_diffusion", form, SDE_DIFFUSIONS)[0])

    # ---------------------------------------------------------------- routing

    def noise_level(self, t) -> jax.Array:
        """The noise level in [0, 1] (0: data, 1: noise) of times t: 1 - t."""
        return 1.0 - jnp.asarray(t, jnp.float32)

    def model_task(self, t) -> jax.Array:
        """The routing row (B,) int32 of times t: round((1 - t) * (T - 1))."""
        rows = jnp.round(self.noise_level(t) * (self.num_tasks - 1)).astype(jnp.int32)
        return jnp.clip(rows, 0, self.num_tasks - 1)

    def task_rows(self, t) -> jax.Array:
        """The routing rows (B,) of training times t: `model_task`'s."""
        return self.model_task(t)

    # ---------------------------------------------------------------- training

    def train_interval(self) -> tuple[float, float]:
        return interval(self.path, self.prediction, self.eps()[0])

    def sample_times(self, rng, batch_size: int, boundaries=None) -> jax.Array:
        """Training times t (B,) float32 in SiT's [t0, t1]: uniform (SiT), or with a
        logit-normal noise level 1 - t (SD3, LightningDiT); with UW's `boundaries` (task
        rows), stratified: an equal share per cluster, the noise level uniform over the
        levels whose row lies in the cluster (`weighting.sample_timesteps`' layout)."""
        t0, t1 = self.train_interval()
        if boundaries is not None:
            level = self._stratified_levels(rng, batch_size, boundaries)
            return jnp.clip(1.0 - level, t0, t1)
        if self.time_sampling == "uniform":
            u = jax.random.uniform(rng, (batch_size,), jnp.float32)
        else:
            n = jax.random.normal(rng, (batch_size,), jnp.float32)
            u = 1.0 - jax.nn.sigmoid(self.logit_normal_mean + self.logit_normal_std * n)
        return t0 + (t1 - t0) * u

    def _stratified_levels(self, rng, batch_size: int, boundaries) -> jax.Array:
        b = np.asarray(boundaries, np.float64)
        num_clusters = len(b) - 1
        if batch_size % num_clusters:
            raise ValueError(f"{num_clusters} clusters cannot stratify a batch of {batch_size}")
        edges = np.clip((b - 0.5) / max(self.num_tasks - 1, 1), 0.0, 1.0)
        reps = batch_size // num_clusters
        lo = jnp.asarray(np.tile(edges[:-1], reps), jnp.float32)
        hi = jnp.asarray(np.tile(edges[1:], reps), jnp.float32)
        return lo + (hi - lo) * jax.random.uniform(rng, (batch_size,), jnp.float32)

    def training_losses(self, model_fn, x1, t, noise) -> dict:
        """Per-sample terms (B,): `mse`, SiT's loss for data x1, times t and noise x0, and
        `vb` = 0 (no variance is learned). `model_fn(x_t, t, task)`."""
        x_t, u_t = self.plan(t, noise, x1)
        out = self.prediction_of(model_fn(x_t, t, self.model_task(t)), x_t)
        if self.prediction == "velocity":
            mse = _mean_flat((out - u_t) ** 2)
        else:
            tx = _like(t, x_t)
            g = self.interpolant.drift_terms(x_t, tx)[1]
            sigma = self.interpolant.sigma(tx)[0]
            weight = {"none": 1.0, "velocity": (g / sigma) ** 2, "likelihood": g / sigma**2}
            target = out - noise if self.prediction == "noise" else out * sigma + noise
            mse = _mean_flat(weight[self.loss_weight] * target**2)
        return dict(mse=mse, vb=jnp.zeros_like(mse))

    def snr_table(self) -> np.ndarray:
        """alpha^2 / sigma^2 at the time of each task row (inf at the data end)."""
        t = jnp.asarray(1.0 - np.linspace(0.0, 1.0, self.num_tasks), jnp.float32)
        alpha = np.asarray(self.interpolant.alpha(t)[0], np.float64)
        sigma = np.asarray(self.interpolant.sigma(t)[0], np.float64)
        with np.errstate(divide="ignore"):
            return alpha**2 / sigma**2

    def cluster_boundaries(self, clustering: str, num_clusters: int) -> np.ndarray:
        """UW's clusters of task rows: `uniform` intervals."""
        if clustering != "uniform":
            raise ValueError(choice_problems("clustering", clustering, CLUSTERINGS)[0])
        return weighting.uniform_intervals(self.num_tasks, num_clusters)


def _mean_flat(x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def problems(
    path: str,
    prediction: str,
    loss_weight: str,
    time_sampling: str,
    logit_normal_std: float,
    train_eps: float | None,
) -> list[str]:
    """Problems with the flow fields of a diffusion section, each naming its field."""
    out = choice_problems("path", path, PATHS) + choice_problems(
        "prediction", prediction, PREDICTIONS
    )
    out += choice_problems("loss_weight", loss_weight, LOSS_WEIGHTS)
    out += choice_problems("time_sampling", time_sampling, TIME_SAMPLINGS)
    if loss_weight != "none" and prediction == "velocity":
        out.append(
            f"loss_weight={loss_weight!r} weights the noise and score losses (SiT): with "
            "prediction='velocity' use 'none'"
        )
    if not logit_normal_std > 0:
        out.append(f"logit_normal_std={logit_normal_std!r} must be > 0")
    out += eps_problems("train_eps", train_eps)
    return out


WEIGHTINGS = ("constant", "uw")  # the weighting kinds (`dtr_jax.weighting`) defined here


def weighting_problems(kind: str, clustering: str, time_sampling: str) -> list[str]:
    """Problems of a weighting section (`kind`, `clustering`) with the flow objective:
    min_snr and p2 weight ddpm's eps MSE by its schedule's SNR, which SiT's losses are
    not; ANT's 'snr' clustering splits ddpm's timesteps by SNR; UW stratifies the times
    uniformly per cluster, so it draws no logit-normal times."""
    out = []
    if kind not in WEIGHTINGS:
        out.append(
            f"kind={kind!r} weights the ddpm objective's eps loss by its SNR; with "
            f"diffusion.objective='flow' use one of {list(WEIGHTINGS)} (diffusion.loss_weight "
            "holds SiT's weightings of the noise and score losses)"
        )
    if clustering not in CLUSTERINGS:
        out.append(
            f"clustering={clustering!r} splits the ddpm timesteps by SNR; with "
            f"diffusion.objective='flow' use one of {list(CLUSTERINGS)} (of the task rows)"
        )
    if kind == "uw" and time_sampling != "uniform":
        out.append(
            f"kind='uw' draws the times uniformly within each cluster: it takes "
            f"diffusion.time_sampling='uniform', not {time_sampling!r}"
        )
    return out


def eps_problems(name: str, value) -> list[str]:
    """A time margin: None (SiT's default) or in [0, 0.5)."""
    if value is None or (isinstance(value, (int, float)) and 0.0 <= value < 0.5):
        return []
    return [f"{name}={value!r} must be None (SiT's default) or lie in [0, 0.5)"]
