"""A PyTorch reference of SiT's transport (willisma/SiT, `transport/`), written for the tests
from SiT's formulas: the three paths, the training loss with its weights, the ODE drift
and score of each prediction, the SDE's diffusion coefficients, its Euler-Maruyama step
and last steps, and the time intervals. Float64 throughout; t = 1 is data, t = 0 noise.
Names follow SiT's where they help to compare (`compute_drift` returns (-f, g))."""

import math

import torch


def col(t, x):
    """t (B,) as (B, 1, ..., 1) against x."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class LinearPath:  # SiT's ICPlan
    def alpha(self, t):
        return t, torch.ones_like(t)

    def sigma(self, t):
        return 1 - t, -torch.ones_like(t)

    def d_alpha_alpha_ratio(self, t):
        return 1 / t

    def compute_drift(self, x, t):
        t = col(t, x)
        ratio = self.d_alpha_alpha_ratio(t)
        s, ds = self.sigma(t)
        return -ratio * x, ratio * s**2 - s * ds


class GVPPath(LinearPath):
    def alpha(self, t):
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def sigma(self, t):
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)

    def d_alpha_alpha_ratio(self, t):
        return math.pi / (2 * torch.tan(t * math.pi / 2))


class VPPath(LinearPath):
    lo, hi = 0.1, 20.0

    def log_mean(self, t):
        return -0.25 * (1 - t) ** 2 * (self.hi - self.lo) - 0.5 * (1 - t) * self.lo

    def d_log_mean(self, t):
        return 0.5 * (1 - t) * (self.hi - self.lo) + 0.5 * self.lo

    def alpha(self, t):
        a = torch.exp(self.log_mean(t))
        return a, a * self.d_log_mean(t)

    def sigma(self, t):
        p = 2 * self.log_mean(t)
        s = torch.sqrt(1 - torch.exp(p))
        return s, torch.exp(p) * (2 * self.d_log_mean(t)) / (-2 * s)

    def d_alpha_alpha_ratio(self, t):
        return self.d_log_mean(t)

    def compute_drift(self, x, t):
        t = col(t, x)
        beta = self.lo + (1 - t) * (self.hi - self.lo)
        return -0.5 * beta * x, beta / 2


PATHS = {"linear": LinearPath(), "gvp": GVPPath(), "vp": VPPath()}


def plan(path, t, x0, x1):
    """(x_t, u_t) of noise x0 and data x1."""
    tt = col(t, x1)
    (a, da), (s, ds) = path.alpha(tt), path.sigma(tt)
    return a * x1 + s * x0, da * x1 + ds * x0


def loss(path, prediction, weight, out, t, x0, x1):
    """SiT's `training_losses` for model output `out` at x_t (per sample)."""
    xt, ut = plan(path, t, x0, x1)
    if prediction == "velocity":
        per = (out - ut) ** 2
    else:
        _, g = path.compute_drift(xt, t)
        s = path.sigma(col(t, xt))[0]
        w = {"none": 1.0, "velocity": (g / s) ** 2, "likelihood": g / s**2}[weight]
        per = w * ((out - x0) ** 2 if prediction == "noise" else (out * s + x0) ** 2)
    return per.mean(dim=tuple(range(1, per.dim())))


def score(path, prediction, out, x, t):
    tt = col(t, x)
    if prediction == "noise":
        return out / -path.sigma(tt)[0]
    if prediction == "score":
        return out
    (a, da), (s, ds) = path.alpha(tt), path.sigma(tt)
    r = a / da
    return (r * out - x) / (s**2 - r * ds * s)


def drift(path, prediction, out, x, t):
    """The probability-flow ODE's drift of a model output (SiT `get_drift`)."""
    if prediction == "velocity":
        return out
    neg_f, g = path.compute_drift(x, t)
    return -neg_f + g * score(path, prediction, out, x, t)


def sde_diffusion(path, form, norm, x, t):
    tt = col(t, x)
    return {
        "constant": lambda: norm * torch.ones_like(tt),
        "sbdm": lambda: norm * path.compute_drift(x, t)[1],
        "sigma": lambda: norm * path.sigma(tt)[0],
        "linear": lambda: norm * (1 - tt),
        "decreasing": lambda: 0.25 * (norm * torch.cos(math.pi * tt) + 1) ** 2,
        "increasing_decreasing": lambda: norm * torch.sin(math.pi * tt) ** 2,
    }[form]()


def em_step(path, prediction, form, norm, out, x, t, dt, noise):
    """SiT's Euler-Maruyama step from x at t with a model output `out` at (x, t)."""
    w = sde_diffusion(path, form, norm, x, t)
    f = drift(path, prediction, out, x, t) + w * score(path, prediction, out, x, t)
    return x + f * dt + torch.sqrt(2 * w) * noise * math.sqrt(dt)


def last_step(path, prediction, form, norm, kind, size, out, x, t):
    if kind == "none":
        return x
    v = drift(path, prediction, out, x, t)
    sc = score(path, prediction, out, x, t)
    if kind == "mean":
        return x + (v + sde_diffusion(path, form, norm, x, t) * sc) * size
    if kind == "euler":
        return x + v * size
    a, s = path.alpha(t)[0][0], path.sigma(t)[0][0]  # SiT takes the first sample's
    return x / a + s**2 / a * sc


def check_interval(path_name, prediction, eps, sde=False, form="sigma", last_step_size=0.0):
    """SiT's `Transport.check_interval` (not reversed)."""
    t0, t1 = 0.0, 1.0
    if path_name == "vp":
        t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
    elif prediction != "velocity" or sde:
        t0 = eps if (form == "sbdm" and sde) or prediction != "velocity" else 0
        t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
    return t0, t1
