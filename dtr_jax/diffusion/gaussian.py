"""The `ddpm` objective: Gaussian diffusion with ADM / DiT conventions (SPEC §4), pure JAX.

Port of OpenAI improved/guided-diffusion `gaussian_diffusion.py` + `respace.py`
as used by DiT: eps prediction, learned-range variance, hybrid loss (MSE + VB with
a stop-gradient on the mean), no timestep rescaling. Layout is NHWC: a model with
learned sigma returns 2*C channels on the last axis, eps = out[..., :C] and the
variance interpolation v = out[..., C:] in [-1, 1].

Schedule constants are float64 numpy arrays computed once; they are gathered per
sample as float32 (the dtype of x) inside jitted code. A respaced process indexes its
arrays by the respaced step i but calls the model with the ORIGINAL timestep
`timestep_map[i]` (SPEC §2).

As an objective (`dtr_jax.diffusion.OBJECTIVES`), the task of timestep t is t itself: the
model gathers row t of the routing tables, its noise level is t / (T - 1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dtr_jax import weighting
from dtr_jax.errors import choice_problems, integer_problems

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "ddim")  # the loops of `GaussianDiffusion.sample`


# ----------------------------------------------------------------------------- schedules


def get_betas(schedule: str, num_timesteps: int) -> np.ndarray:
    """ADM `get_named_beta_schedule`: float64 betas of shape (num_timesteps,)."""
    if schedule == "linear":
        scale = 1000.0 / num_timesteps  # ADM: scaled so any T matches T=1000.
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if schedule == "cosine":
        # Nichol & Dhariwal: abar(u) = cos((u + s) / (1 + s) * pi / 2)^2, s = 0.008.
        def f(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [
                min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), 0.999)
                for i in range(num_timesteps)
            ],
            dtype=np.float64,
        )
    raise ValueError(f"beta schedule={schedule!r} is unknown: allowed {SCHEDULES}")


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """ADM `space_timesteps`: which original steps a respaced process keeps (sorted).

    `section_counts` is an int, a list of per-section counts, a "10,15,20" string,
    or "ddimN" (a fixed stride giving exactly N steps, as in the DDIM paper).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot create exactly {desired} steps with an integer stride "
                f"out of num_timesteps={num_timesteps}"
            )
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, (int, np.integer)):
        section_counts = [int(section_counts)]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(j * stride) for j in range(count)]  # ADM: cur_idx += stride
        start += size
    return sorted(set(steps))


def problems(schedule: str, num_timesteps: int) -> list[str]:
    """Problems with a diffusion section, each naming its field."""
    return choice_problems("schedule", schedule, SCHEDULES) + integer_problems(
        "num_timesteps", num_timesteps
    )


# ----------------------------------------------------------------------------- helpers


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all non-batch dimensions."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (ADM)."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """Fast tanh approximation of the standard normal CDF (ADM)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> jax.Array:
    """Log-likelihood (nats) of data in [-1, 1] discretised to 256 bins (ADM)."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


def _extract(arr: np.ndarray, t: jax.Array, x: jax.Array) -> jax.Array:
    """ADM `_extract_into_tensor`: arr[t] as x.dtype, broadcastable against x."""
    v = jnp.asarray(arr, dtype=x.dtype)[t]
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _frozen(a: np.ndarray, dtype) -> np.ndarray:
    a = np.array(a, dtype=dtype)
    a.flags.writeable = False
    return a


# ----------------------------------------------------------------------------- process


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashable by identity.
class GaussianDiffusion:
    """A (possibly respaced) Gaussian diffusion process with ADM conventions."""

    betas: np.ndarray
    learn_sigma: bool = True
    timestep_map: np.ndarray | None = None  # respaced index -> original t (int32).

    def __post_init__(self):
        betas = _frozen(self.betas, np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        T = len(betas)
        tmap = np.arange(T) if self.timestep_map is None else self.timestep_map
        tmap = _frozen(tmap, np.int32)
        if tmap.shape != (T,):
            raise ValueError(f"timestep_map of shape {tmap.shape} does not match {T} betas")
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        consts = dict(
            betas=betas,
            timestep_map=tmap,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
            log_betas=np.log(betas),
            posterior_variance=post_var,
            # ADM: the posterior variance is 0 at t=0, so its log is clipped to row 1.
            posterior_log_variance_clipped=(
                np.log(np.append(post_var[1], post_var[1:])) if T > 1 else np.log(betas)
            ),
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        )
        for name, value in consts.items():
            object.__setattr__(
                self, name, value if name == "timestep_map" else _frozen(value, np.float64)
            )

    @classmethod
    def create(
        cls,
        schedule: str = "linear",
        num_timesteps: int = 1000,
        learn_sigma: bool = True,
        timestep_respacing: int | str | Sequence[int] | None = None,
    ) -> GaussianDiffusion:
        """DiT `create_diffusion`: None or "" keeps all steps."""
        diff = cls(get_betas(schedule, num_timesteps), learn_sigma=learn_sigma)
        if timestep_respacing is None or timestep_respacing == "":
            return diff
        return diff.respaced(timestep_respacing)

    def respaced(self, section_counts: int | str | Sequence[int]) -> GaussianDiffusion:
        """This process respaced by ADM `space_timesteps` (e.g. 250 or "ddim50")."""
        return self.respace(space_timesteps(self.num_timesteps, section_counts))

    def respace(self, use_timesteps: Sequence[int]) -> GaussianDiffusion:
        """ADM `SpacedDiffusion`: keep the steps `use_timesteps` (indices of this process)."""
        use = np.array(sorted(set(int(i) for i in use_timesteps)), dtype=np.int64)
        if use.size == 0 or use[0] < 0 or use[-1] >= self.num_timesteps:
            raise ValueError(
                f"use_timesteps must be a non-empty subset of [0, {self.num_timesteps})"
            )
        ac = self.alphas_cumprod[use]
        betas = 1.0 - ac / np.append(1.0, ac[:-1])  # ADM: 1 - abar_t / abar_{prev kept}.
        return GaussianDiffusion(betas, self.learn_sigma, self.timestep_map[use])

    def __repr__(self) -> str:
        m = self.timestep_map
        return (
            f"GaussianDiffusion(num_timesteps={self.num_timesteps}, "
            f"learn_sigma={self.learn_sigma}, timestep_map=[{m[0]}..{m[-1]}])"
        )

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    # ---------------------------------------------------------------- as an objective
    # What training and the samplers ask of every objective (`dtr_jax.diffusion`), for
    # the unrespaced process that trains the model (its timesteps are the original ones).

    name = "ddpm"

    @property
    def num_tasks(self) -> int:
        """T, the rows of the routing tables: one per timestep."""
        return self.num_timesteps

    def noise_level(self, t) -> jax.Array:
        """The noise level in [0, 1] (0: data, 1: noise) of timesteps t: t / (T - 1)."""
        return jnp.asarray(t, jnp.float32) / max(self.num_tasks - 1, 1)

    def model_task(self, t) -> None:
        """The routing row the model is told for timesteps t: none, it gathers row t."""
        del t
        return None

    def task_rows(self, t) -> jax.Array:
        """The routing rows (B,) of training timesteps t: t."""
        return t

    def sample_times(self, rng, batch_size: int, boundaries=None) -> jax.Array:
        """Training timesteps (B,) int32: uniform, or stratified over the clusters of
        `boundaries` (UW)."""
        return weighting.sample_timesteps(rng, batch_size, self.num_timesteps, boundaries)

    def snr_table(self) -> np.ndarray:
        """SNR(t) per timestep (what min_snr and p2 weight by)."""
        return weighting.snr(self.alphas_cumprod)

    def cluster_boundaries(self, clustering: str, num_clusters: int) -> np.ndarray:
        """The timestep clusters of UW and of the loss-per-cluster metrics."""
        return weighting.cluster_boundaries(clustering, self.alphas_cumprod, num_clusters)

    # ---------------------------------------------------------------- forward process

    def q_sample(self, x_start, t, noise):
        """Sample x_t ~ q(x_t | x_0) with the given noise."""
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """q(x_{t-1} | x_t, x_0): (mean, variance, log_variance_clipped)."""
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t) * x_start
            + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return (
            mean,
            _extract(self.posterior_variance, t, x_t),
            _extract(self.posterior_log_variance_clipped, t, x_t),
        )

    # ---------------------------------------------------------------- reverse process

    def _split(self, model_output, x_t):
        """(eps, v) from the model output; v is None without learned sigma."""
        C = x_t.shape[-1]
        want = 2 * C if self.learn_sigma else C
        if model_output.shape[-1] != want:
            raise ValueError(f"model output has {model_output.shape[-1]} channels, expected {want}")
        return (
            (model_output[..., :C], model_output[..., C:])
            if self.learn_sigma
            else (model_output, None)
        )

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def p_mean_variance(self, model_output, x_t, t, clip_denoised: bool = False) -> dict:
        """p(x_{t-1} | x_t) from a model output: mean, variance, log_variance, pred_xstart."""
        eps, v = self._split(model_output, x_t)
        if v is None:  # ADM FIXED_SMALL.
            variance = _extract(self.posterior_variance, t, x_t) * jnp.ones_like(x_t)
            log_variance = _extract(self.posterior_log_variance_clipped, t, x_t) * jnp.ones_like(
                x_t
            )
        else:  # ADM LEARNED_RANGE: interpolate log beta~_t (min) and log beta_t (max).
            min_log = _extract(self.posterior_log_variance_clipped, t, x_t)
            max_log = _extract(self.log_betas, t, x_t)
            frac = (v + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
            variance = jnp.exp(log_variance)
        pred_xstart = self._predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return dict(
            mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart
        )

    def _model_t(self, t):
        """Original timesteps (int32) for respaced indices t: what the model sees."""
        return jnp.asarray(self.timestep_map)[t]

    # ---------------------------------------------------------------- losses

    def vb_terms_bpd(self, model_output, x_start, x_t, t) -> jax.Array:
        """ADM `_vb_terms_bpd`: decoder NLL at t == 0, KL(q || p) elsewhere; bits, (B,)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
        nll = -mean_flat(
            discretized_gaussian_log_likelihood(
                x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
            )
        )
        return jnp.where(t == 0, nll, kl) / math.log(2.0)

    def training_losses(self, model_fn: ModelFn, x_start, t, noise) -> dict:
        """Per-sample terms (B,) of the hybrid loss (ADM LossType.MSE with learned sigma,
        as DiT): `mse` (eps) and `vb` (variance; 0 without learned sigma). Their
        weighting is `dtr_jax.weighting`'s.

        `t` indexes this process; the model is called once with the original timestep.
        """
        x_t = self.q_sample(x_start, t, noise)
        eps, v = self._split(model_fn(x_t, self._model_t(t)), x_t)
        mse = mean_flat((noise - eps) ** 2)
        if v is None:
            vb = jnp.zeros_like(mse)
        else:  # Stop-gradient on the mean: the VB term only trains the variance.
            frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
            vb = self.vb_terms_bpd(frozen, x_start, x_t, t)
        return dict(mse=mse, vb=vb)

    # ---------------------------------------------------------------- samplers

    def sample(
        self,
        model_fn: ModelFn,
        shape,
        rng,
        *,
        sampler: str = "ddpm",
        eta: float = 0.0,
        clip_denoised: bool = False,
        x_T=None,
    ) -> jax.Array:
        """x_0 by the named sampler (one of SAMPLERS; `eta` is DDIM's)."""
        if sampler == "ddim":
            return self.ddim_sample(model_fn, shape, rng, eta, clip_denoised, x_T)
        if sampler == "ddpm":
            return self.ddpm_sample(model_fn, shape, rng, clip_denoised, x_T)
        raise ValueError(choice_problems("sampler", sampler, SAMPLERS)[0])

    def _sample_loop(self, step, shape, rng, x_T):
        """Run `step(x, t, rng) -> x` for t = T-1 .. 0 under lax.fori_loop."""
        init_rng, loop_rng = jax.random.split(rng)
        x = (
            jax.random.normal(init_rng, shape, jnp.float32)
            if x_T is None
            else jnp.asarray(x_T, jnp.float32)
        )
        T = self.num_timesteps

        def body(j, x):
            i = T - 1 - j
            t = jnp.full((shape[0],), i, dtype=jnp.int32)
            return step(x, t, jax.random.fold_in(loop_rng, i))

        return jax.lax.fori_loop(0, T, body, x)

    def ddpm_sample(
        self, model_fn: ModelFn, shape, rng, clip_denoised: bool = False, x_T=None
    ) -> jax.Array:
        """Ancestral sampling (ADM `p_sample_loop`); returns x_0."""

        def step(x, t, key):
            out = self.p_mean_variance(model_fn(x, self._model_t(t)), x, t, clip_denoised)
            nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
            noise = jax.random.normal(key, x.shape, x.dtype)
            return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise

        return self._sample_loop(step, shape, rng, x_T)

    def ddim_sample(
        self, model_fn: ModelFn, shape, rng, eta: float = 0.0, clip_denoised: bool = False, x_T=None
    ) -> jax.Array:
        """DDIM sampling (ADM `ddim_sample_loop`, eta = 0 is deterministic); returns x_0."""

        def step(x, t, key):
            out = self.p_mean_variance(model_fn(x, self._model_t(t)), x, t, clip_denoised)
            eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
            ab = _extract(self.alphas_cumprod, t, x)
            ab_prev = _extract(self.alphas_cumprod_prev, t, x)
            sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab)) * jnp.sqrt(1 - ab / ab_prev)
            dir_coef = jnp.sqrt(jnp.maximum(1 - ab_prev - sigma**2, 0.0))  # >= 0 in exact math.
            mean = out["pred_xstart"] * jnp.sqrt(ab_prev) + dir_coef * eps
            nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
            return mean + nonzero * sigma * jax.random.normal(key, x.shape, x.dtype)

        return self._sample_loop(step, shape, rng, x_T)
