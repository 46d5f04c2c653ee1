"""The config schema (every field with its default), what the params mean, and validation.

`default_config()` is the paper's recipe (SPEC §6) for DiT-B/2 + DTR; config files
in configs/ change only what their run changes. `validate` checks a config before
anything compiles: each module checks its own section, `validate` names the fields
and reports every problem at once. `model_spec` and `signature` say what a
checkpoint's params mean: a resumed run, and every mode that reads a checkpoint,
must match them.
"""

from __future__ import annotations

import difflib
import importlib.util
import shlex

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from ml_collections import config_dict

from dtr_jax import (
    checkpoint,
    data,
    decoders,
    diffusion,
    distributed,
    evaluators,
    interop,
    lock,
    models,
    optimizer,
    routing,
    sharding,
    tpu,
    weighting,
)
from dtr_jax.data import latents
from dtr_jax.errors import (
    ConfigError,
    choice_problems,
    integer_problems,
    prefixed,
    raise_problems,
)
from dtr_jax.models import DiT, create_model, model_architecture, routed_widths
from dtr_jax.models import vae as vae_lib

MODES = ("train", "sample", "evaluate", "export", "extract", "reference", "plan")
# What `--mode plan` may compile (plan.programs): the train step; the sampler (with the VAE
# decoder of sample.decoder=sd_vae); the in-loop evaluation (eval_every_steps > 0).
PLAN_PROGRAMS = ("train", "sample", "evaluate")

__all__ = [
    "MODES",
    "PLAN_PROGRAMS",
    "ConfigError",
    "default_config",
    "load_config",
    "model_spec",
    "parse_labels",
    "plan_problems",
    "signature",
    "unknown_field_problems",
    "validate",
    "with_overrides",
]


def default_config() -> ml_collections.ConfigDict:
    """All fields; the values are the paper's DiT-B/2 + DTR recipe on ImageNet 256x256."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_train_steps = 400_000
    c.global_batch_size = 256
    c.log_every_steps = 100
    c.checkpoint_every_steps = 10_000
    c.sample_every_steps = 0  # image summary of samples; 0 = off
    c.eval_every_steps = 0  # in-loop evaluation; 0 = off
    c.profile_steps = 0  # steps traced by the profiler once training runs; 0 = off
    # An official-layout PyTorch file (.pt/.pth/.safetensors: a DiT release state dict or a
    # DTR release checkpoint) that a workdir without checkpoints starts from: the params
    # and EMA (and AdamW/UW state) of a new training run, or the params every other mode
    # reads (README: PyTorch interop). '' = none.
    c.init_from = ""

    c.model = ml_collections.ConfigDict()
    # a DiT ('DiT-B/2', models.MODEL_NAMES) or an ADM U-Net ('ADM-64', models.UNET_NAMES)
    c.model.name = "DiT-B/2"
    # Optional overrides of the named DiT architecture (None = from the name).
    c.model.depth = config_dict.placeholder(int)
    c.model.hidden_size = config_dict.placeholder(int)
    c.model.num_heads = config_dict.placeholder(int)
    c.model.patch_size = config_dict.placeholder(int)
    # Optional overrides of the named U-Net architecture (None = from the name), with the
    # names and meaning of guided-diffusion's UNetModel arguments (README: U-Nets).
    c.model.unet = ml_collections.ConfigDict()
    c.model.unet.model_channels = config_dict.placeholder(int)
    c.model.unet.channel_mult = config_dict.placeholder(str)  # e.g. '1,2,3,4'
    c.model.unet.num_res_blocks = config_dict.placeholder(int)
    c.model.unet.attention_resolutions = config_dict.placeholder(str)  # downsample rates '2,4,8'
    c.model.unet.num_heads = config_dict.placeholder(int)
    c.model.unet.num_head_channels = config_dict.placeholder(int)  # -1: num_heads decides
    c.model.unet.use_scale_shift_norm = config_dict.placeholder(bool)
    c.model.unet.resblock_updown = config_dict.placeholder(bool)
    c.model.unet.use_new_attention_order = config_dict.placeholder(bool)
    c.model.unet.dropout = config_dict.placeholder(float)  # in training
    c.model.input_size = 32  # latent 32x32 = 256x256 images through the 8x VAE
    c.model.in_channels = 4
    c.model.num_classes = 1000  # 1 = unconditional
    # label dropout (classifier-free guidance); a U-Net has the null label row it needs
    # only when this is > 0 (guided-diffusion's models train without: they have none)
    c.model.class_dropout_prob = 0.1
    c.model.learn_sigma = True
    # compute dtype ('float32', 'bfloat16'); 'auto': bfloat16 on GPU/TPU, float32 on CPU.
    # Params and AdamW moments are float32 whatever it is.
    c.model.dtype = "auto"
    # How the model computes, not what: the model spec does not record these three.
    # remat_policy: '' keeps all activations; else one of models.REMAT_POLICIES.
    c.model.remat_policy = ""
    c.model.scan_blocks = False  # one scanned block (faster compiles); block params stacked
    c.model.attention = "xla"  # 'cudnn' (GPU, bfloat16): cuDNN flash; 'splash' (TPU): Pallas
    c.model.routing = ml_collections.ConfigDict()
    c.model.routing.kind = "dtr"
    c.model.routing.beta = 0.8  # sharing ratio: active channels per task
    c.model.routing.alpha = 4.0  # window speed (the release hard-codes 4)
    c.model.routing.seed = 0  # seeds the 'random' tables
    # kind='file': the tables' file: a .npy (G, T, C), a PyTorch checkpoint with routing
    # buffers (e.g. init_from) or an export's model.safetensors
    c.model.routing.path = ""
    c.model.routing.head = True  # U-Net: its output head's GroupNorm is routed too
    # T, the rows of the tables (tasks). None: the objective's: ddpm has one task per
    # timestep (diffusion.num_timesteps, the only value it takes); flow 1000, its noise
    # level in [0, 1] picking row round(level * (T - 1)) (README: Flow matching)
    c.model.routing.num_tasks = config_dict.placeholder(int)

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.objective = "ddpm"  # 'ddpm' (ADM's Gaussian diffusion) or 'flow' (SiT's)
    # ddpm: the beta schedule ('linear', 'cosine') and its T
    c.diffusion.schedule = "linear"
    c.diffusion.num_timesteps = 1000
    # flow: SiT's path ('linear', 'gvp', 'vp') and what the model predicts ('velocity',
    # 'noise', 'score'); these two are part of what the params mean
    c.diffusion.path = "linear"
    c.diffusion.prediction = "velocity"
    # flow, training only: SiT's loss weight of noise and score predictions ('none',
    # 'velocity', 'likelihood'); the times drawn: 'uniform' (SiT) or 'logit_normal' (SD3,
    # LightningDiT: the noise level is sigmoid(N(mean, std))); how far training times keep
    # from the path's ends (None: SiT's default, 0 for velocity on linear and gvp)
    c.diffusion.loss_weight = "none"
    c.diffusion.time_sampling = "uniform"
    c.diffusion.logit_normal_mean = 0.0
    c.diffusion.logit_normal_std = 1.0
    c.diffusion.train_eps = config_dict.placeholder(float)

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
    # 'latents' (extracted by --mode extract into data.dir), 'folder', 'imagenet2012' (photos
    # in [-1, 1]), 'digits', or 'synthetic' (random latents, for shape and memory checks)
    c.data.name = "latents"
    # The extracted latents: written by --mode extract, read by data.name='latents'. A local
    # folder (or mounted bucket) on every host; this default is a placeholder to override.
    c.data.dir = "/mnt/disks/data/imagenet256_latents"
    c.data.image_size = 256  # side of the ADM centre crop of photographs (folder, imagenet2012)
    c.data.folder = ""  # 'folder': one sub-folder per class (ImageNet train/), or flat (FFHQ)
    c.data.tfds_data_dir = ""  # 'imagenet2012': TFDS data_dir ('' = TFDS's default)
    # 'imagenet2012': the folder of ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, from
    # which --mode extract builds the TFDS dataset once if it is not built; '' = built already
    c.data.manual_dir = ""
    c.data.flip = True  # random horizontal flips
    c.data.prefetch = 2  # batches prefetched to the devices
    c.data.num_threads = 2  # grain read threads per host (image decoding in --mode extract)

    c.extract = ml_collections.ConfigDict()  # --mode extract: photographs -> latents in data.dir
    c.extract.source = "imagenet2012"  # the photographs: 'imagenet2012' or 'folder' (data.*)
    c.extract.split = "train"  # of a TFDS source
    c.extract.images_per_shard = 10_000  # images per ArrayRecord shard (the unit of resumption)
    c.extract.dtype = "float16"  # of the stored moments: 'float16' or 'float32' (README)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.lock_lease_secs = 600.0  # a trainer lock older than this (other host) is stale

    # Multi-host runs (README: Multi-host): jax.distributed's timeouts. How the processes are
    # launched is not a field (it differs per host): flags or the launcher's environment.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.heartbeat_timeout_secs = 100  # a process silent this long is lost: all stop
    c.distributed.shutdown_timeout_secs = 300  # at the end, how long each waits for the others
    c.distributed.initialization_timeout_secs = 300  # how long the processes wait for all to join

    c.sample = ml_collections.ConfigDict()
    # ddpm models: 'ddpm', 'ddim', 'dpmpp_2m' (DPM-Solver++(2M)); flow models: 'euler',
    # 'heun', 'dopri5' (adaptive), 'euler_maruyama' (SiT's SDE)
    c.sample.sampler = "ddpm"
    # steps (respaced for ddpm, ddim); one model call each, heun's two; dopri5: at most
    c.sample.num_steps = 250
    c.sample.ddim_eta = 0.0
    c.sample.cfg_scale = 1.5
    # guidance only at noise levels in [low, high] (0: data, 1: noise), as REPA and
    # LightningDiT; elsewhere the conditional model alone
    c.sample.guidance_low = 0.0
    c.sample.guidance_high = 1.0
    c.sample.clip_denoised = False  # ddpm samplers: clip the data prediction to [-1, 1]
    # flow samplers: how far from the path's ends they integrate (None: SiT's default)
    c.sample.sample_eps = config_dict.placeholder(float)
    c.sample.atol = 1e-6  # dopri5's tolerances (SiT's defaults)
    c.sample.rtol = 1e-3
    # euler_maruyama: SiT's diffusion coefficient ('sigma', 'constant', 'sbdm', 'linear',
    # 'decreasing', 'increasing_decreasing') and its scale, its last step ('mean',
    # 'tweedie', 'euler' or 'none') and the last step's size
    c.sample.sde_diffusion = "sigma"
    c.sample.sde_diffusion_norm = 1.0
    c.sample.sde_last_step = "mean"
    c.sample.sde_last_step_size = 0.04
    c.sample.use_ema = True
    c.sample.num_samples = 50_000
    c.sample.batch_size = 256  # global
    c.sample.labels = ""  # '' = uniform random; or '0,1,2'
    c.sample.seed = 0
    c.sample.grid_per_class = 8  # columns of the per-class PNG grid
    c.sample.decoder = "latents"  # 'pixels', 'latents' (saved raw) or 'sd_vae' (vae.path)

    c.vae = ml_collections.ConfigDict()  # the VAE of sample.decoder=sd_vae
    c.vae.path = ""  # local diffusers folder (or .safetensors) of sd-vae-ft-ema / sd-vae-ft-mse
    c.vae.batch_size = 64  # global images per VAE encode/decode batch

    c.eval = ml_collections.ConfigDict()
    c.eval.metrics = ""  # evaluators, e.g. 'digits,inception'; '' = the data's own (+ inception)
    c.eval.samples = ""  # .npz (arr_0 uint8 NHWC) to evaluate; '' = sample from the checkpoint
    c.eval.reference = ""  # .npz of images (arr_0) and/or mu, sigma; --mode reference makes one
    c.eval.inception_weights = ""  # pytorch-fid pt_inception-2015-12-05-6726825d.pth (or .npz)
    c.eval.num_samples = 1000  # fresh samples for --mode evaluate and in-loop evaluation
    c.eval.batch_size = 200  # images per feature-extraction batch

    c.reference = ml_collections.ConfigDict()  # --mode reference: the FID batch of the photos
    c.reference.num_images = 10_000  # photographs stored as arr_0 (ADM's batches hold 10K)
    c.reference.stats_images = 0  # photographs whose Inception features give mu, sigma; 0 = all
    c.reference.seed = 0  # which photographs (a random choice)

    c.export = ml_collections.ConfigDict()
    c.export.use_ema = True
    c.export.dir = ""  # '' = WORKDIR/export

    c.plan = ml_collections.ConfigDict()  # --mode plan: compile for a TPU slice, without it
    # A Cloud TPU slice ('v5e-8' or 'v5litepod-8', 'v4-32', 'v5p-8', 'v6e-8': v4 and v5p
    # names count TensorCores, v5e and v6e chips) or a topology ('v5e:4x8');
    # '' = the TPUs of this machine
    c.plan.topology = ""
    c.plan.programs = "train,sample,evaluate"  # what to compile (config.PLAN_PROGRAMS)
    c.plan.find_batch = False  # also the largest global batch per remat policy and scan
    c.plan.max_batch = 4096  # the largest global batch find_batch tries
    return c


def load_config(path: str, **overrides) -> ml_collections.ConfigDict:
    """get_config() of a config file, with dotted-name overrides applied
    (load_config("configs/digits.py", **{"model.depth": 2}))."""
    spec = importlib.util.spec_from_file_location("_dtr_config", path)
    if spec is None or not path.endswith(".py"):
        raise ValueError(f"config file {path!r} is not a Python file with get_config()")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return with_overrides(module.get_config(), **overrides)


def with_overrides(config, **overrides) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted-name overrides applied ({"model.depth": 2});
    names that are not fields are refused (ConfigError, with the closest names)."""
    config = config.copy_and_resolve_references()
    raise_problems(unknown_field_problems(config, overrides))
    for name, value in overrides.items():
        *parents, leaf = name.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def unknown_field_problems(config, names, prefix: str = "--config.") -> list[str]:
    """One problem per dotted name in `names` that is not a field (or section) of
    `config`, suggesting the closest fields: same section first, then anywhere. Names
    are shown as `prefix` + name (a command-line flag by default)."""
    known = sorted(flat_fields(config))
    sections = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    out = []
    for name in names:
        if name in known or name in sections:
            continue
        section, _, leaf = name.rpartition(".")
        siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == section}
        close = [siblings[m] for m in difflib.get_close_matches(leaf, siblings, n=2)]
        if not close:
            leaves = {k: k.rpartition(".")[2] for k in known}
            matches = difflib.get_close_matches(leaf, set(leaves.values()), n=2)
            close = [k for k, v in leaves.items() if v in matches][:3]
        hint = (
            f": did you mean {' or '.join(prefix + k for k in close)}?"
            if close
            else " (every field and its default is in dtr_jax/config.py: default_config)"
        )
        out.append(f"{prefix}{name} is not a config field{hint}")
    return out


def parse_labels(text: str) -> list[int]:
    """`sample.labels` ('3' or '0,1,2'; '' = none chosen) as integers."""
    return [int(v) for v in str(text).split(",") if v.strip()]


# --- what the params mean ---------------------------------------------------------------


def model_spec(config) -> dict:
    """The model the params belong to: architecture, routing and diffusion (JSON types).

    Enough to rebuild the model and its tables (`inference.build`); exports store it.
    Tables of kind 'file' are named by a hash of their content (the file may move; other
    tables are another model); `inference.from_config` reads them.
    """
    r = config.model.routing
    if r.kind == routing.FILE:  # the file's tables, named by their content
        tables = dict(kind=routing.FILE, sha256=interop.tables_digest(interop.read_tables(r.path)))
    else:  # the kind and what its tables depend on
        as_json = dict(beta=float, alpha=float, seed=int)
        tables = {"kind": str(r.kind)} | {f: as_json[f](r[f]) for f in routing.TABLE_FIELDS[r.kind]}
    return dict(
        model=_model_fields(config.model, routed=r.kind != "none"),
        routing=tables,
        diffusion=diffusion.spec(config.diffusion, r.num_tasks),
    )


def _model_fields(m, routed: bool = True) -> dict:
    """The model section of `model_spec`: name, architecture and input/output. A U-Net's
    also names its family, its null label row and, when routed, whether its output head
    is (a DiT's records neither: specs written before U-Nets existed stay valid)."""
    arch = model_architecture(m)
    io = dict(
        input_size=int(m.input_size),
        in_channels=int(m.in_channels),
        num_classes=int(m.num_classes),
        learn_sigma=bool(m.learn_sigma),
    )
    if models.family(m.name) == "dit":
        ints = {k: int(v) for k, v in arch.items()}
        return dict(name=str(m.name), **ints, mlp_ratio=float(DiT.mlp_ratio), **io)
    unet = {k: v for k, v in arch.items() if k != "dropout"}  # dropout: training only
    unet = {k: list(v) if isinstance(v, tuple) else v for k, v in unet.items()}
    out = dict(name=str(m.name), family="unet", **unet, **io)
    out["null_label"] = bool(m.class_dropout_prob > 0 and m.num_classes > 1)
    if routed:
        out["route_head"] = bool(m.routing.head)
    return out


def build_model(m, **kwargs):
    """The (untrained, uninitialised) model of a `config.model` section, as the spec
    describes it; `kwargs` go to `models.create_model`."""
    fields = _model_fields(m, routed=m.routing.kind != "none")
    fields.pop("family", None)
    return create_model(fields.pop("name"), **fields, **kwargs)


def signature(config) -> dict:
    """Everything that changes what a checkpoint's state means: the model spec, the
    timestep clusters the UW log-variances belong to, and, for `model.scan_blocks`, the
    stacked layout of the block params (absent for the per-block layout)."""
    w = config.weighting
    uw = dict(num_clusters=int(w.num_clusters), clustering=str(w.clustering))
    out = dict(model_spec(config), uw=uw if w.kind == "uw" else None)
    if config.model.scan_blocks:
        out["param_layout"] = "stacked blocks (model.scan_blocks=True)"
    return out


def flat_fields(config) -> dict:
    """{'model.routing.beta': 0.8, ...}: every field by its dotted name (JSON-friendly)."""
    flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


# --- validation ---------------------------------------------------------------------------


def validate(config, num_devices: int, mode: str = "train") -> None:
    """Raises ConfigError listing every invalid field; returns None if all is well.

    Each `--mode` checks what it uses: all check the model, diffusion, sampling
    and mesh; the modes that decode samples add the decoder's own section (`vae`);
    training adds the loop, optimizer, weighting, data and checkpoint fields;
    evaluation adds the evaluators and their files.
    """
    raise_problems(choice_problems("--mode", mode, MODES))
    # A config file may add fields (a typo such as c.model.routing.bta = 0.5): refuse them.
    defaults = default_config()
    added = sorted(set(flat_fields(config)) - set(flat_fields(defaults)))
    raise_problems(unknown_field_problems(defaults, added, prefix=""))
    c = config
    m, r = c.model, c.model.routing
    platform = "tpu" if mode == "plan" else jax.default_backend()  # what it compiles for
    found = _named("model", c, models.problems(m, platform))
    channels = None if found else min(routed_widths(build_model(m)))  # the narrowest routed
    found += _named(
        "model.routing",
        c,
        routing.problems(r.kind, r.beta, r.alpha, channels) + _family_routing_problems(m),
    )
    d = c.diffusion
    found += _named("diffusion", c, diffusion.problems(d))
    found += _named("model.routing", c, diffusion.num_tasks_problems(r.num_tasks, d))
    if r.kind == routing.FILE and not found:
        depth, T = model_architecture(m)["depth"], diffusion.num_tasks(d, r.num_tasks)
        found += _named(
            "model.routing", c, interop.tables_problems("path", r.path, depth, T, channels)
        )
    if c.init_from and not found:
        found += _init_from_problems(c, mode)
    found += _named("mesh", c, sharding.problems(c.mesh.data, c.mesh.fsdp, num_devices))
    found += distributed_problems(c)
    found += _named("sample", c, _sampling_problems(c))
    if mode in ("train", "sample") or (mode == "evaluate" and not c.eval.samples):
        found += _decoder_problems(c)
    if mode == "train":
        found += _training_problems(c, num_devices) + _data_problems(c)
    if mode == "evaluate":  # the data's name selects its evaluators; nothing is read
        found += _named("data", c, data.SOURCES.problems(c.data.name))
    if mode == "extract":
        found += _extraction_problems(c, num_devices)
    if mode == "reference":
        found += _photograph_problems(c) + evaluators.reference_problems(c.reference, c.eval)
    if mode == "evaluate" or (mode == "train" and c.eval_every_steps):
        found += _eval_problems(c, sampling=mode == "train" or not c.eval.samples)
    if mode == "plan":  # the run's shapes, not its files: nothing is read
        found += plan_problems(c) + _training_problems(c, num_devices)
    raise_problems(found)


def distributed_problems(c) -> list[str]:
    """The `distributed` section's timeouts (checked before the processes join, too)."""
    t = c.distributed
    found = distributed.problems(
        t.heartbeat_timeout_secs, t.shutdown_timeout_secs, t.initialization_timeout_secs
    )
    return _named("distributed", c, found)


def _named(section: str, c, problems: list[str]) -> list[str]:
    """`problems` of config section `section` ('model.routing'), every field of that
    section they mention named by its full path."""
    node = c
    for part in section.split("."):
        node = node[part]
    return prefixed(section + ".", problems, fields=node.keys())


def _family_routing_problems(m) -> list[str]:
    """Routing fields that only one family has: 'file' tables (a DiT's, as the DTR release
    stores them) and the U-Net's routed head."""
    r = m.routing
    if m.name not in models.NAMES:
        return []
    if models.family(m.name) == "unet" and r.kind == routing.FILE:
        return [
            f"kind={routing.FILE!r} reads a DiT's tables (the DTR release's routing buffers); "
            f"a U-Net's tables are built: use one of {list(routing.KINDS)}"
        ]
    if models.family(m.name) == "dit" and not r.head:
        return ["head=False is for U-Nets (a DiT's final layer is not routed): set it True"]
    return []


def _init_from_problems(c, mode: str) -> list[str]:
    """`init_from` must hold this config's model, from tensor shapes and the routing
    buffers alone (nothing compiles): every key and shape, the fixed pos_embed, the
    routing tables the config builds; for training, an AdamW and UW state that fit."""
    name = f"init_from={c.init_from!r}"
    try:
        ckpt = interop.open_checkpoint(c.init_from)
    except (OSError, ValueError) as e:
        return [f"{name} {e}"]
    model = build_model(c.model)
    T = diffusion.num_tasks(c.diffusion, c.model.routing.num_tasks)
    found = [f"{name} {p}" for p in ckpt.problems(model, T, optimizer=mode == "train")]
    if found:
        return found
    if models.family(c.model.name) == "unet":  # guided-diffusion's files carry no tables
        return []
    found = _named("model.routing", c, _routing_match_problems(c, ckpt.tables()))
    uw, w = ckpt.uw_log_vars(), c.weighting
    if mode == "train" and w.kind == "uw" and uw is not None and len(uw) != w.num_clusters:
        found.append(
            f"weighting.num_clusters={w.num_clusters} but {name} holds {len(uw)} UW "
            f"log-variances: use --config.weighting.num_clusters={len(uw)}"
        )
    return found


def _routing_match_problems(c, theirs) -> list[str]:
    """The routing tables of `init_from` (`theirs`) must be those the config builds; if
    not, the problem gives the overrides that make them so."""
    r, arch = c.model.routing, model_architecture(c.model)
    T = diffusion.num_tasks(c.diffusion, r.num_tasks)
    depth, channels = arch["depth"], arch["hidden_size"]
    if r.kind == routing.FILE:
        ours = interop.read_tables(r.path)
    else:
        ours = routing.model_tables(r.kind, T, channels, depth, r.beta, r.alpha, r.seed)
    if np.array_equal(
        interop.full_tables(theirs, depth, T, channels),
        interop.full_tables(ours, depth, T, channels),
    ):
        return []
    found = interop.classify_tables(theirs, alphas=(4.0, r.alpha))
    flag = "--config.model.routing."
    if found["kind"] == "dtr":
        fix = f"{flag}kind=dtr {flag}beta={found['beta']:g}"
        fix += f" {flag}alpha={found['alpha']:g}" if found["alpha"] != r.alpha else ""
    elif found["kind"] == "none":
        fix = f"{flag}kind=none"
    else:
        fix = f"{flag}kind=file {flag}path={c.init_from}"
    return [
        f"kind={r.kind!r} builds other routing tables than the routing buffers of "
        f"init_from={c.init_from!r}, which are {interop.describe_tables(found)}: use {fix}"
    ]


def _sampling_problems(c) -> list[str]:
    s = c.sample
    found = diffusion.samplers.problems(s, c.diffusion.objective, c.diffusion.num_timesteps)
    found += decoders.DECODERS.problems(s.decoder)
    if s.cfg_scale < 1.0:
        found.append(f"cfg_scale={s.cfg_scale!r} must be >= 1 (1 = no guidance)")
    m = c.model
    unet = m.name in models.UNET_NAMES and m.num_classes > 1
    if unet and s.cfg_scale != 1.0 and not m.class_dropout_prob > 0:
        found.append(
            f"cfg_scale={s.cfg_scale!r} needs a null label, which a U-Net trained without "
            "label dropout (model.class_dropout_prob=0, as guided-diffusion's) has not: "
            "use 1 (no guidance)"
        )
    for name in ("num_samples", "batch_size", "grid_per_class"):
        found += integer_problems(name, s[name])
    try:
        labels = parse_labels(s.labels)
    except ValueError:
        return found + [f"labels={s.labels!r} must be '' or comma-separated integers"]
    bad = [y for y in labels if not 0 <= y < c.model.num_classes]
    if bad:
        found.append(
            f"labels has {bad}: labels must lie in [0, model.num_classes={c.model.num_classes})"
        )
    return found


def _decoder_problems(c) -> list[str]:
    """The config section the decoder reads (`vae` for sd_vae), in the modes that decode."""
    if c.sample.decoder not in decoders.DECODERS:
        return []  # reported with the sample section
    cls = decoders.DECODERS.get(c.sample.decoder)
    return _named(cls.section, c, cls.problems(c[cls.section])) if cls.section else []


def _training_problems(c, num_devices: int) -> list[str]:
    found = []
    for name in (
        "num_train_steps",
        "global_batch_size",
        "log_every_steps",
        "checkpoint_every_steps",
    ):
        found += integer_problems(name, c[name])
    for name in ("sample_every_steps", "eval_every_steps", "profile_steps"):
        found += integer_problems(name, c[name], allow_zero=True)
    found += sharding.batch_problems(
        "global_batch_size", c.global_batch_size, c.mesh.data, c.mesh.fsdp, num_devices
    )
    found += _named("optimizer", c, optimizer.problems(c.optimizer))
    found += _weighting_problems(c)
    k = c.checkpoint
    found += _named(
        "checkpoint",
        c,
        checkpoint.problems(k.max_to_keep) + lock.problems(k.lock_lease_secs),
    )
    return found


def _weighting_problems(c) -> list[str]:
    """The weighting section; with the flow objective, only the weightings it defines."""
    w, d = c.weighting, c.diffusion
    if diffusion.problems(d) or diffusion.num_tasks_problems(c.model.routing.num_tasks, d):
        return []  # reported with the diffusion and routing sections
    found = weighting.problems(
        w.kind,
        gamma=w.gamma,
        k=w.k,
        num_clusters=w.num_clusters,
        clustering=w.clustering,
        global_batch_size=c.global_batch_size,
        num_timesteps=diffusion.num_tasks(d, c.model.routing.num_tasks),
    )
    if d.objective == "flow":
        found += diffusion.flow.weighting_problems(w.kind, w.clustering, d.time_sampling)
    return _named("weighting", c, found)


def _data_problems(c) -> list[str]:
    d, m = c.data, c.model
    src = data.SOURCES.get(d.name) if d.name in data.SOURCES else None
    unmade = src.unmade(d) if src is not None and src.unmade else None
    if unmade:
        how = "--mode extract makes them (and finishes an unfinished extraction)"
        return [f"data.{unmade}: {how}:\n      {extract_command(c)}"]
    shape = (m.input_size, m.input_size, m.in_channels)
    return _named("data", c, data.problems(d, shape, m.num_classes))


def _extraction_problems(c, num_devices: int) -> list[str]:
    """--mode extract: the photographs (extract.source and its data fields), where the
    latents go (data.dir), the VAE and its batch."""
    x, d, v = c.extract, c.data, c.vae
    found = _named("extract", c, latents.extract_problems(x)) or _photograph_problems(c)
    found += _named("data", c, latents.output_problems(d.dir))
    found += _named("vae", c, vae_lib.problems(v.path, v.batch_size))
    return found + sharding.batch_problems(
        "vae.batch_size", v.batch_size, c.mesh.data, c.mesh.fsdp, num_devices
    )


def _photograph_problems(c) -> list[str]:
    """The photographs of `extract.source`: a source of photographs, and its data fields."""
    x, d = c.extract, c.data
    found = _named("extract", c, latents.photograph_problems(x.source))
    if not found:
        src = data.SOURCES.get(x.source)
        found += _named("data", c, src.problems(d) if src.problems else [])
    return found


def extract_command(c) -> str:
    """The command line of `--mode extract` that writes the latents `c` reads (data.dir):
    that of the unfinished extraction there, if any; else the fields it reads, with a
    <placeholder> where none is set. Outside dtr_jax.main the config file is CONFIG."""
    d, x = c.data, c.extract
    started = latents.read_manifest(d.dir) if d.dir else None
    if started and started.get("command"):
        return started["command"]
    fields = {"data.dir": d.dir, "extract.source": x.source}
    reads = data.SOURCES.get(x.source).reads if x.source in data.SOURCES else {}
    given = {f"data.{k}": d[k] for k in reads if d[k]}
    fields |= given or {f"data.{k}": v for k, v in reads.items() if v}
    if d.image_size != default_config().data.image_size:
        fields["data.image_size"] = d.image_size
    fields["vae.path"] = c.vae.path or "<SD VAE folder>"
    flags = " ".join(f"--config.{k}={shlex.quote(str(v))}" for k, v in fields.items())
    return f"python -m dtr_jax.main --config {_config_file()} --mode extract {flags}"


def _config_file() -> str:
    """The --config file of this command line (CONFIG where there is none)."""
    from absl import flags
    from ml_collections import config_flags

    if flags.FLAGS.is_parsed() and "config" in flags.FLAGS:
        return config_flags.get_config_filename(flags.FLAGS["config"])
    return "CONFIG"


def plan_problems(c) -> list[str]:
    """The `plan` section: a slice libtpu can compile for, programs, batch limit."""
    p = c.plan
    found = tpu.problems(p.topology)
    found += [f"programs has {n!r}: allowed {list(PLAN_PROGRAMS)}" for n in _names(p.programs)
              if n not in PLAN_PROGRAMS]  # fmt: skip
    if not _names(p.programs):
        found.append(f"programs={p.programs!r} names nothing to compile: {list(PLAN_PROGRAMS)}")
    if not isinstance(p.find_batch, bool):
        found.append(f"find_batch={p.find_batch!r} must be True or False")
    found += integer_problems("max_batch", p.max_batch)
    return _named("plan", c, found)


def _names(text) -> list[str]:
    return [n.strip() for n in str(text).split(",") if n.strip()]


def _eval_problems(c, sampling: bool) -> list[str]:
    """The evaluators and their files; `sampling`: fresh samples will be evaluated."""
    found = _named("eval", c, evaluators.problems(c.eval, evaluators.select(c)))
    decoder = c.sample.decoder
    if sampling and decoder in decoders.DECODERS and not decoders.gives_images(decoder):
        found.append(f"sample.decoder={decoder!r} does not give images to evaluate")
    return found
