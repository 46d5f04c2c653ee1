"""The PyTorch counterpart: a PyTorch DiT or U-Net + DTR train step and sampler of the same shapes
(timed by `train_step` / `sample --torch`, or alone by `torch_step`).

The DiT is tests/torch_reference.py's `TDiT` (the official DiT layout, the DTR
release's per-block routing buffers: `x * m` in, `+ x * (1 - m)` out), with attention
through `F.scaled_dot_product_attention` as timm's DiT uses it; a U-Net is
tests/torch_unet.py's `UNetModel` (guided-diffusion's, with the same masks after every
GroupNorm that feeds a zero_module, its tables held as buffers). The step is what a
PyTorch DiT trainer does: the hybrid loss (eps MSE + the VB term of the learned
variance, ADM), AdamW (fused on CUDA), an EMA by `torch._foreach_lerp_`, label dropout,
bf16 autocast when the config's dtype is bfloat16, eager or `torch.compile`d (model and
loss in one graph). The sampler is ancestral DDPM over the respaced steps with
classifier-free guidance in one doubled batch, as `dtr_jax.inference.sample_fn`. The
diffusion constants and routing tables are dtr_jax's (numpy), so both sides compute the
same thing.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from dtr_jax import config as config_lib
from dtr_jax import inference, routing
from dtr_jax.diffusion import GaussianDiffusion
from dtr_jax.models import family, model_architecture

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _reference(name: str = "torch_reference"):
    """tests/<name>.py, imported by path (the tests are not a package) and registered
    under its name, where torch.compile looks modules up."""
    if name in sys.modules:
        return sys.modules[name]
    path = ROOT / "tests" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


reference = _reference()
unet_reference = _reference("torch_unet")


class FusedAttention(reference.TAttention):
    """TAttention through F.scaled_dot_product_attention (flash / memory-efficient
    kernels), as timm's Attention in the DiT release; the same function."""

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class RoutedUNet(torch.nn.Module):
    """guided-diffusion's UNetModel with its {width: (G, T, width)} tables as buffers, called
    as the DiT is: model(x, t, y) (y ignored without classes)."""

    def __init__(self, unet, tables):
        super().__init__()
        self.unet, self.widths = unet, sorted(tables or {})
        for w in self.widths:
            self.register_buffer(f"table_{w}", torch.as_tensor(tables[w], dtype=torch.float32))

    def forward(self, x, t, y):
        tables = {w: getattr(self, f"table_{w}") for w in self.widths} or None
        return self.unet(x, t, y if self.unet.num_classes else None, tables=tables)


def build_unet(config, kind: str) -> torch.nn.Module:
    """The config's U-Net as guided-diffusion's UNetModel with `kind` routing."""
    m, r = config.model, config.model.routing
    model = inference.build(config_lib.model_spec(config)).model  # the architecture
    labels = None if model.num_classes == 1 else model.num_classes + int(model.null_label)
    unet = unet_reference.UNetModel(
        model.input_size, model.in_channels, model.model_channels, model.out_channels,
        model.num_res_blocks, model.attention_resolutions,
        dropout=model_architecture(m)["dropout"], channel_mult=model.channel_mult,
        num_classes=labels, num_heads=model.num_heads, num_head_channels=model.num_head_channels,
        use_scale_shift_norm=model.use_scale_shift_norm, resblock_updown=model.resblock_updown,
        use_new_attention_order=model.use_new_attention_order, route_head=model.route_head,
    )  # fmt: skip
    tables = routing.width_tables(
        kind, config.diffusion.num_timesteps, model.routed_widths(), r.beta, r.alpha, r.seed
    )
    return RoutedUNet(unet, tables).to(device())


def build_model(config, kind: str) -> torch.nn.Module:
    """The config's DiT as a TDiT with `kind` routing buffers and fused attention (or its
    U-Net, `build_unet`)."""
    m = config.model
    if not m.learn_sigma:
        raise SystemExit("the PyTorch counterpart models learned sigma only (model.learn_sigma)")
    if family(m.name) == "unet":
        return build_unet(config, kind)
    arch = model_architecture(m)
    r = m.routing
    tables = routing.model_tables(
        kind, config.diffusion.num_timesteps, arch["hidden_size"], arch["depth"],
        r.beta, r.alpha, r.seed,
    )  # fmt: skip
    model = reference.TDiT(
        m.input_size, m.in_channels, arch["patch_size"], arch["hidden_size"], arch["depth"],
        arch["num_heads"], m.num_classes, tables=tables,
    )  # fmt: skip
    for block in model.blocks:
        block.attn.__class__ = FusedAttention
    return model.to(device())


class Diffusion:
    """dtr_jax's diffusion constants as float32 tensors on the device, gathered per sample."""

    def __init__(self, process: GaussianDiffusion):
        self.num_timesteps = process.num_timesteps
        names = (
            "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
            "posterior_log_variance_clipped", "log_betas",
        )  # fmt: skip
        for name in names:
            value = torch.tensor(np.asarray(getattr(process, name)), dtype=torch.float32)
            setattr(self, name, value.to(device()))
        self.timestep_map = torch.tensor(process.timestep_map, dtype=torch.long).to(device())

    @staticmethod
    def at(values, t):
        return values[t].reshape(-1, 1, 1, 1)

    def q_sample(self, x0, t, noise):
        return (
            self.at(self.sqrt_alphas_cumprod, t) * x0
            + self.at(self.sqrt_one_minus_alphas_cumprod, t) * noise
        )

    def posterior(self, x0, x_t, t):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        mean = (
            self.at(self.posterior_mean_coef1, t) * x0 + self.at(self.posterior_mean_coef2, t) * x_t
        )
        return mean, self.at(self.posterior_log_variance_clipped, t)

    def p_mean_log_variance(self, eps, v, x_t, t):
        """ADM's learned-range p(x_{t-1} | x_t): (mean, log-variance)."""
        frac = (v + 1.0) / 2.0
        min_log = self.at(self.posterior_log_variance_clipped, t)
        log_var = frac * self.at(self.log_betas, t) + (1.0 - frac) * min_log
        x0 = (
            self.at(self.sqrt_recip_alphas_cumprod, t) * x_t
            - self.at(self.sqrt_recipm1_alphas_cumprod, t) * eps
        )
        return self.posterior(x0, x_t, t)[0], log_var

    def hybrid_loss(self, out, x0, x_t, t, noise):
        """Per-sample (mse, vb) of ADM's hybrid loss; NCHW; vb in bits, mean frozen."""
        c = x0.shape[1]
        eps, v = out[:, :c], out[:, c:]
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        mean, log_var = self.p_mean_log_variance(eps.detach(), v, x_t, t)
        true_mean, true_log_var = self.posterior(x0, x_t, t)
        kl = 0.5 * (
            -1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var)
            + (true_mean - mean) ** 2 * torch.exp(-log_var)
        )  # fmt: skip
        nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
        vb = torch.where(t == 0, nll.mean(dim=(1, 2, 3)), kl.mean(dim=(1, 2, 3)))
        return mse, vb / math.log(2.0)


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    def cdf(z):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))

    centered, inv_stdv = x - means, torch.exp(-log_scales)
    cdf_plus = cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def autocast(config):
    """bf16 autocast when the config computes in bfloat16 (on CPU too), else a no-op."""
    enabled = config.model.dtype == "bfloat16"
    return torch.autocast(device().type, dtype=torch.bfloat16, enabled=enabled)


def synchronize() -> None:
    if device().type == "cuda":
        torch.cuda.synchronize()


class Measured:
    """Footprint of what is built and run inside: peak allocated on CUDA (nan on CPU)."""

    def __enter__(self):
        if device().type == "cuda":
            synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize()
        self.seconds = time.perf_counter() - self.start
        self.mib = float("nan")
        if device().type == "cuda":
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20


def _setup_backend() -> None:
    if device().type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32, as XLA's default on GPU


class TrainRunner:
    """A PyTorch train step of the config's model, batch and dtype; `run(steps)` times it."""

    def __init__(self, config, kind: str, compiled: bool):
        _setup_backend()
        torch.manual_seed(0)
        m, o, b = config.model, config.optimizer, config.global_batch_size
        self.config, self.num_classes, self.drop = config, m.num_classes, m.class_dropout_prob
        self.ema_decay = o.ema_decay
        self.diffusion = Diffusion(
            GaussianDiffusion.create(config.diffusion.schedule, config.diffusion.num_timesteps)
        )
        rng = np.random.default_rng(0)
        shape = (b, m.in_channels, m.input_size, m.input_size)
        self.x0 = torch.as_tensor(rng.standard_normal(shape, np.float32)).to(device())
        self.labels = torch.as_tensor(rng.integers(0, m.num_classes, b)).to(device())
        with Measured() as measured:
            self.model = build_model(config, kind).train()
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.params = params
            self.ema = [p.detach().clone() for p in params]
            self.opt = torch.optim.AdamW(
                params, lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                weight_decay=o.weight_decay, fused=device().type == "cuda",
            )  # fmt: skip
            self.loss_fn = torch.compile(self._loss) if compiled else self._loss
            self._step()  # the first step compiles
        self.compile_seconds, self.memory_mib = measured.seconds, measured.mib

    def _loss(self, x0, y, t, noise):
        x_t = self.diffusion.q_sample(x0, t, noise)
        with autocast(self.config):
            out = self.model(x_t, t, y)
        mse, vb = self.diffusion.hybrid_loss(out.float(), x0, x_t, t, noise)
        return (mse + vb).mean()

    def _step(self):
        b = self.x0.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (b,), device=device())
        noise = torch.randn_like(self.x0)
        drop = torch.rand(b, device=device()) < self.drop
        y = torch.where(drop, torch.full_like(self.labels, self.num_classes), self.labels)
        loss = self.loss_fn(self.x0, y, t, noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)
        self.loss = loss.detach()

    def last_loss(self) -> float:
        return float(self.loss)

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self._step()
        synchronize()
        return (time.perf_counter() - start) / steps


class SampleRunner:
    """The PyTorch sampler: `run(calls)` times calls of one batch through all steps."""

    def __init__(self, config, kind: str, compiled: bool, batch: int):
        _setup_backend()
        torch.manual_seed(0)
        m, s = config.model, config.sample
        self.config, self.cfg_scale, self.channels = config, s.cfg_scale, m.in_channels
        self.guided = s.cfg_scale != 1.0 and m.num_classes > 1
        process = GaussianDiffusion.create(
            config.diffusion.schedule, config.diffusion.num_timesteps
        )
        self.diffusion = Diffusion(process.respaced(str(s.num_steps)))
        self.shape = (batch, m.in_channels, m.input_size, m.input_size)
        labels = torch.arange(batch) % m.num_classes
        self.labels = labels.to(device())
        if self.guided:
            self.labels = torch.cat([self.labels, torch.full_like(self.labels, m.num_classes)])
        with Measured() as measured:
            self.model = build_model(config, kind).eval()
            self.forward = torch.compile(self.model) if compiled else self.model
            self.sample()  # the first call compiles
        self.compile_seconds, self.memory_mib = measured.seconds, measured.mib

    @torch.inference_mode()
    def sample(self):
        x, c = torch.randn(self.shape, device=device()), self.channels
        for i in reversed(range(self.diffusion.num_timesteps)):
            t = torch.full((self.shape[0],), i, device=device(), dtype=torch.long)
            t_model = self.diffusion.timestep_map[t]
            with autocast(self.config):
                if self.guided:
                    out = self.forward(
                        torch.cat([x, x]), torch.cat([t_model, t_model]), self.labels
                    )
                else:
                    out = self.forward(x, t_model, self.labels)
            out = out.float()
            if self.guided:
                cond, uncond = out.chunk(2)
                eps = uncond[:, :c] + self.cfg_scale * (cond[:, :c] - uncond[:, :c])
                out = torch.cat([eps, cond[:, c:]], dim=1)
            mean, log_var = self.diffusion.p_mean_log_variance(out[:, :c], out[:, c:], x, t)
            x = mean + (i > 0) * torch.exp(0.5 * log_var) * torch.randn_like(x)
        return x

    def run(self, calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            self.sample()
        synchronize()
        return (time.perf_counter() - start) / calls
