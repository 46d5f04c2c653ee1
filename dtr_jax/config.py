"""The config schema (every field with its default) and its validation.

Config files in configs/ start from `default_config()` and change what their
recipe changes, so each reads like a hyperparameter table. `validate` checks a
config before anything compiles and reports every problem at once, each with
its field, its value and what is allowed.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from dtr_jax import routing
from dtr_jax.diffusion import SCHEDULES
from dtr_jax.models import DTYPES, MODEL_NAMES, model_architecture

SAMPLERS = ("ddpm", "ddim")


class ConfigError(ValueError):
    """One or more config fields are invalid; the message lists each one."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid config:\n  - " + "\n  - ".join(self.problems))


def default_config() -> ml_collections.ConfigDict:
    """All fields, with the DiT-B/2 + DTR recipe of the paper as defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_train_steps = 400_000
    c.global_batch_size = 256
    c.log_every_steps = 100
    c.checkpoint_every_steps = 10_000
    c.sample_every_steps = 0  # image summary of samples; 0 = off
    c.eval_every_steps = 0  # in-loop evaluation; 0 = off
    c.profile_steps = 0  # steps traced by the profiler once training runs; 0 = off

    c.model = ml_collections.ConfigDict()
    c.model.name = "DiT-B/2"
    # Optional overrides of the named architecture (None = from the name).
    c.model.depth = config_dict.placeholder(int)
    c.model.hidden_size = config_dict.placeholder(int)
    c.model.num_heads = config_dict.placeholder(int)
    c.model.patch_size = config_dict.placeholder(int)
    c.model.input_size = 32  # latent 32x32 = 256x256 images through the 8x VAE
    c.model.in_channels = 4
    c.model.num_classes = 1000  # 1 = unconditional
    c.model.class_dropout_prob = 0.1
    c.model.learn_sigma = True
    c.model.dtype = "float32"  # compute dtype; params are always float32
    c.model.remat = False
    c.model.routing = ml_collections.ConfigDict()
    c.model.routing.kind = "dtr"
    c.model.routing.beta = 0.8
    c.model.routing.alpha = 4.0
    c.model.routing.seed = 0  # seeds the 'random' tables

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "linear"
    c.diffusion.num_timesteps = 1000

    c.weighting = ml_collections.ConfigDict()
    c.weighting.kind = "constant"
    c.weighting.gamma = 5.0  # min_snr: 5; p2: e.g. 1.0
    c.weighting.k = 1.0  # p2
    c.weighting.num_clusters = 8  # uw clusters; also the loss-per-cluster metric bins
    c.weighting.clustering = "uniform"  # or 'snr' (ANT interval clustering)
    c.weighting.uw_learning_rate = 0.025

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-4
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.warmup_steps = 0
    c.optimizer.grad_clip = 0.0  # global-norm clipping; 0 = off
    c.optimizer.ema_decay = 0.9999

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all devices left after the other axes
    c.mesh.fsdp = 1

    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic"
    c.data.flip = True  # random horizontal flips
    c.data.prefetch = 2  # batches prefetched to the devices
    c.data.num_threads = 2  # grain read threads per host

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True

    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "ddpm"
    c.sample.num_steps = 250  # respaced steps
    c.sample.ddim_eta = 0.0
    c.sample.cfg_scale = 1.5
    c.sample.clip_denoised = False
    c.sample.use_ema = True
    c.sample.num_samples = 50_000
    c.sample.batch_size = 256  # global
    c.sample.labels = ""  # '' = uniform random; or '0,1,2'
    c.sample.seed = 0
    c.sample.grid_per_class = 8  # columns of the per-class PNG grid
    c.sample.decoder = ""  # '' = the model makes pixels; 'latents' = save raw latents; or a VAE

    c.eval = ml_collections.ConfigDict()
    c.eval.samples = ""  # .npz (arr_0 uint8 NHWC) to evaluate; '' = sample from the checkpoint
    c.eval.reference = ""  # reference .npz: images (arr_0) or statistics (mu, sigma)
    c.eval.inception_weights = ""  # pytorch-fid pt_inception-2015-12-05-6726825d.pth (or .npz)
    c.eval.num_samples = 1000  # fresh samples for --mode evaluate and in-loop evaluation
    c.eval.batch_size = 200  # images per feature-extraction batch

    c.export = ml_collections.ConfigDict()
    c.export.use_ema = True
    c.export.dir = ""  # '' = WORKDIR/export
    return c


def paper_config(model_name: str) -> ml_collections.ConfigDict:
    """The paper's ImageNet 256x256 recipe (SPEC §6) for a DiT size, e.g. "DiT-B/2".

    AdamW lr 1e-4 without weight decay, global batch 256, EMA 0.9999, 400K steps, latents
    32x32x4 (Stable Diffusion VAE, 8x down), 1000 classes, DTR beta 0.8 alpha 4, linear
    schedule with T = 1000, 250 DDPM sampling steps at guidance 1.5.
    """
    c = default_config()
    c.num_train_steps = 400_000
    c.global_batch_size = 256
    c.log_every_steps = 100
    c.checkpoint_every_steps = 10_000
    c.model.name = model_name
    c.model.input_size = 32  # 256 / 8
    c.model.in_channels = 4
    c.model.num_classes = 1000
    c.model.routing.kind = "dtr"
    c.model.routing.beta = 0.8
    c.model.routing.alpha = 4.0
    c.diffusion.schedule = "linear"
    c.optimizer.learning_rate = 1e-4
    c.optimizer.weight_decay = 0.0
    c.optimizer.ema_decay = 0.9999
    c.data.name = "synthetic"  # until the ImageNet latent source lands (ROADMAP 3)
    c.data.flip = True
    c.sample.num_steps = 250
    c.sample.cfg_scale = 1.5
    c.sample.decoder = "sd_vae"  # registered by the VAE (ROADMAP 3); 'latents' saves raw latents
    return c


def load_config(path: str, **overrides) -> ml_collections.ConfigDict:
    """get_config() of a config file, with dotted-name overrides applied
    (load_config("configs/digits.py", **{"model.depth": 2}))."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dtr_config", path)
    if spec is None or not path.endswith(".py"):
        raise ValueError(f"config file {path!r} is not a Python file with get_config()")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for name, value in overrides.items():
        *parents, leaf = name.split(".")
        node = config
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"config has no field {name!r}")
        node[leaf] = value
    return config


# --- validation ---------------------------------------------------------------


def _choice(problems, field, value, allowed):
    if value not in allowed:
        problems.append(f"{field}={value!r} is unknown: allowed {list(allowed)}")


def _positive(problems, field, value, allow_zero=False):
    ok = isinstance(value, int) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        problems.append(
            f"{field}={value!r} must be a {'non-negative' if allow_zero else 'positive'} integer"
        )


def _check_model(c, problems):
    m = c.model
    r = m.routing
    _choice(problems, "model.routing.kind", r.kind, routing.KINDS)
    if not 0.0 < r.beta <= 1.0:
        problems.append(f"model.routing.beta={r.beta!r} must lie in (0, 1]")
    if not r.alpha > 0.0:
        problems.append(f"model.routing.alpha={r.alpha!r} must be > 0")
    _choice(problems, "model.dtype", m.dtype, DTYPES)
    if not 0.0 <= m.class_dropout_prob < 1.0:
        problems.append(f"model.class_dropout_prob={m.class_dropout_prob!r} must lie in [0, 1)")
    if m.name not in MODEL_NAMES:
        problems.append(f"model.name={m.name!r} is unknown: allowed {list(MODEL_NAMES)}")
        return
    arch = model_architecture(m)
    sizes: list[str] = []
    for f in ("depth", "hidden_size", "num_heads", "patch_size"):
        _positive(sizes, f"model.{f}", arch[f])
    for f in ("input_size", "in_channels", "num_classes"):
        _positive(sizes, f"model.{f}", m[f])
    problems += sizes
    if sizes:
        return  # the checks below divide by these sizes
    if arch["hidden_size"] % arch["num_heads"]:
        problems.append(
            f"model.hidden_size={arch['hidden_size']} is not divisible by "
            f"model.num_heads={arch['num_heads']}"
        )
    if arch["hidden_size"] % 4:
        problems.append(
            f"model.hidden_size={arch['hidden_size']} must be a multiple of 4 "
            "(2-D sin-cos position embedding)"
        )
    if m.input_size % arch["patch_size"]:
        problems.append(
            f"model.input_size={m.input_size} is not divisible by "
            f"model.patch_size={arch['patch_size']}"
        )
    if 0.0 < r.beta <= 1.0 and routing.active_channels(arch["hidden_size"], r.beta) < 1:
        problems.append(
            f"model.routing.beta={r.beta!r} leaves no active channel of "
            f"hidden_size={arch['hidden_size']}"
        )


def _check_training(c, num_devices, problems):
    from dtr_jax import weighting  # local: weighting imports jax/optax

    for f in ("num_train_steps", "global_batch_size", "log_every_steps", "checkpoint_every_steps"):
        _positive(problems, f, c[f])
    for f in ("sample_every_steps", "eval_every_steps", "profile_steps"):
        _positive(problems, f, c[f], allow_zero=True)
    _choice(problems, "diffusion.schedule", c.diffusion.schedule, SCHEDULES)
    _positive(problems, "diffusion.num_timesteps", c.diffusion.num_timesteps)
    o = c.optimizer
    if not o.learning_rate > 0:
        problems.append(f"optimizer.learning_rate={o.learning_rate!r} must be > 0")
    if not 0.0 <= o.ema_decay < 1.0:
        problems.append(f"optimizer.ema_decay={o.ema_decay!r} must lie in [0, 1)")
    if o.weight_decay < 0 or o.grad_clip < 0:
        problems.append("optimizer.weight_decay and optimizer.grad_clip must be >= 0")
    _positive(problems, "optimizer.warmup_steps", o.warmup_steps, allow_zero=True)
    _positive(problems, "checkpoint.max_to_keep", c.checkpoint.max_to_keep)
    w = c.weighting
    problems += weighting.validate(
        w.kind,
        gamma=w.gamma,
        k=w.k,
        num_clusters=w.num_clusters,
        clustering=w.clustering,
        global_batch_size=c.global_batch_size,
        num_timesteps=c.diffusion.num_timesteps,
    )
    shards = data_shards(c.mesh, num_devices)
    if shards and isinstance(c.global_batch_size, int) and c.global_batch_size % shards:
        problems.append(
            f"global_batch_size={c.global_batch_size} is not divisible by the "
            f"{shards} data shards (mesh.data x mesh.fsdp on {num_devices} devices)"
        )


def mesh_shape(mesh, num_devices: int) -> tuple[int, int] | None:
    """(data, fsdp) with -1 resolved, or None if the config does not fit."""
    data, fsdp = mesh.data, mesh.fsdp
    if fsdp == -1 and data == -1:
        return None
    if data == -1:
        data = num_devices // fsdp if fsdp > 0 else 0
    if fsdp == -1:
        fsdp = num_devices // data if data > 0 else 0
    if data <= 0 or fsdp <= 0 or data * fsdp != num_devices:
        return None
    return data, fsdp


def data_shards(mesh, num_devices: int) -> int | None:
    shape = mesh_shape(mesh, num_devices)
    return None if shape is None else shape[0] * shape[1]


def _check_mesh(mesh, num_devices, problems):
    if mesh_shape(mesh, num_devices) is None:
        problems.append(
            f"mesh.data={mesh.data} x mesh.fsdp={mesh.fsdp} does not fit "
            f"{num_devices} devices: the product must equal the device count "
            "(at most one of them may be -1, meaning 'the rest')"
        )


def _check_sampling(c, problems):
    s = c.sample
    _choice(problems, "sample.sampler", s.sampler, SAMPLERS)
    _positive(problems, "sample.num_steps", s.num_steps)
    if isinstance(s.num_steps, int) and s.num_steps > c.diffusion.num_timesteps:
        problems.append(
            f"sample.num_steps={s.num_steps} exceeds "
            f"diffusion.num_timesteps={c.diffusion.num_timesteps}"
        )
    if s.cfg_scale < 1.0:
        problems.append(f"sample.cfg_scale={s.cfg_scale!r} must be >= 1 (1 = no guidance)")
    _positive(problems, "sample.num_samples", s.num_samples)
    _positive(problems, "sample.batch_size", s.batch_size)
    try:
        labels = parse_labels(s.labels)
    except ValueError:
        problems.append(f"sample.labels={s.labels!r} must be '' or comma-separated integers")
    else:
        bad = [y for y in labels if not 0 <= y < c.model.num_classes]
        if bad:
            problems.append(
                f"sample.labels has {bad}: labels must lie in "
                f"[0, model.num_classes={c.model.num_classes})"
            )


def parse_labels(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def validate(config, num_devices: int, mode: str = "train") -> None:
    """Raises ConfigError listing every invalid field; returns None if all is well.

    `mode` is the --mode: training checks more (optimizer, data, weighting, ...).
    """
    from dtr_jax.data import validate_data  # local: avoid an import cycle
    from dtr_jax.evaluate import validate_eval

    problems: list[str] = []
    _check_model(config, problems)
    _check_sampling(config, problems)
    _check_mesh(config.mesh, num_devices, problems)
    if mode == "train":
        _check_training(config, num_devices, problems)
        problems += validate_data(config)
        if config.eval_every_steps:
            problems += validate_eval(config)
    if problems:
        raise ConfigError(problems)


def model_signature(config) -> dict:
    """What a checkpoint's parameters depend on; a resumed run must match it."""
    m = config.model
    arch = model_architecture(m)
    return dict(
        name=m.name,
        **arch,
        input_size=m.input_size,
        in_channels=m.in_channels,
        num_classes=m.num_classes,
        learn_sigma=m.learn_sigma,
        routing=dict(m.routing),
        num_timesteps=config.diffusion.num_timesteps,
        uw_clusters=config.weighting.num_clusters if config.weighting.kind == "uw" else 0,
    )
