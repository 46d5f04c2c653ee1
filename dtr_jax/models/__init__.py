"""Model registry: DiTs and ADM U-Nets by name, one entry point for both.

DiTs are the twelve sizes of the paper ("DiT-B/2"); U-Nets are guided-diffusion's
released architectures ("ADM-64", "ADM-256-uncond", ...) and two small ones for CPU
runs ("ADM-S", "ADM-XS"). A name fixes the architecture; `model.depth` etc. (DiT) or
`model.unet.*` (U-Net) override it. `problems` checks a model section (name, dtype,
sizes, how it computes); `create_model` builds either family, `create_dit` a DiT.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp

from dtr_jax.errors import choice_problems, integer_problems
from dtr_jax.models.attention import IMPLEMENTATIONS as ATTENTION
from dtr_jax.models.dit import DiT
from dtr_jax.models.unet import GROUPS, UNet

# (depth, hidden_size, num_heads) per size (SPEC §3).
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCHES = (2, 4, 8)
MODEL_NAMES = tuple(f"DiT-{s}/{p}" for s in SIZES for p in PATCHES)  # the DiTs
# U-Nets: guided-diffusion's released models, as its README's MODEL_FLAGS build them
# (--attention_resolutions 32,16,8 are pixel sizes: here the downsample rates they give at
# the model's own image size; num_heads is create_model's default where num_head_channels
# decides), and two small ones of the same design for CPU runs (no release has them).
UNETS = {
    "ADM-64": dict(  # 64x64_diffusion.pt (class-conditional ImageNet 64x64)
        model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
        attention_resolutions=(2, 4, 8), num_heads=4, num_head_channels=64,
        use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True,
        dropout=0.1,
    ),
    "ADM-128": dict(  # 128x128_diffusion.pt
        model_channels=256, channel_mult=(1, 1, 2, 3, 4), num_res_blocks=2,
        attention_resolutions=(4, 8, 16), num_heads=4, num_head_channels=-1,
        use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
        dropout=0.0,
    ),
    "ADM-256": dict(  # 256x256_diffusion.pt
        model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(8, 16, 32), num_heads=4, num_head_channels=64,
        use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
        dropout=0.0,
    ),
    "ADM-512": dict(  # 512x512_diffusion.pt
        model_channels=256, channel_mult=(0.5, 1, 1, 2, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(16, 32, 64), num_heads=4, num_head_channels=64,
        use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
        dropout=0.0,
    ),
    "ADM-S": dict(  # small, for CPU: 64 channels, 3 levels
        model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
        attention_resolutions=(2, 4), num_heads=4, num_head_channels=32,
        use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True,
        dropout=0.1,
    ),
    "ADM-XS": dict(  # tiny, for tests and the digits: 32 channels, 2 levels
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(2,), num_heads=4, num_head_channels=32,
        use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True,
        dropout=0.0,
    ),
}  # fmt: skip
UNETS["ADM-256-uncond"] = UNETS["ADM-256"]  # 256x256_diffusion_uncond.pt: no classes
UNCONDITIONAL = ("ADM-256-uncond",)  # names whose release has no label embedding
UNET_NAMES = tuple(UNETS)
NAMES = MODEL_NAMES + UNET_NAMES  # every model.name
UNET_FIELDS = tuple(UNETS["ADM-64"])  # the model.unet.* fields
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
AUTO = "auto"  # a model.dtype resolved by the backend: compute_dtype
ARCH_FIELDS = ("depth", "hidden_size", "num_heads", "patch_size")
# '' = no rematerialisation; else a policy of jax.checkpoint_policies (what the backward keeps).
REMAT_POLICIES = (
    "",
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
)

# How the model computes, not what it computes: DiT attributes that are no config "size".
COMPUTE_FIELDS = ("remat_policy", "scan_blocks", "attention")


def architecture(name: str, **overrides) -> dict:
    """depth/hidden_size/num_heads/patch_size of `name`; non-None overrides win."""
    if name not in MODEL_NAMES:
        raise ValueError(choice_problems("model.name", name, MODEL_NAMES)[0])
    size, patch = name[len("DiT-") :].split("/")
    depth, hidden, heads = SIZES[size]
    arch = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))
    arch.update({k: v for k, v in overrides.items() if v is not None})
    return arch


def family(name: str) -> str:
    """'dit' or 'unet': the family of a known model name (ValueError naming model.name)."""
    if name in MODEL_NAMES:
        return "dit"
    if name in UNETS:
        return "unet"
    raise ValueError(choice_problems("model.name", name, NAMES)[0])


def unet_architecture(name: str, **overrides) -> dict:
    """The U-Net options of `name` (UNET_FIELDS); non-None overrides win. `channel_mult`
    and `attention_resolutions` may be given as config strings ('1,2,3,4')."""
    if name not in UNETS:
        raise ValueError(choice_problems("model.name", name, UNET_NAMES)[0])
    arch = dict(UNETS[name])
    for field, value in overrides.items():
        if value is not None:
            arch[field] = _numbers(value) if field in _SEQUENCES else value
    return arch


_SEQUENCES = ("channel_mult", "attention_resolutions")


def _numbers(value) -> tuple:
    """'1,2,3' (a config string) or a sequence -> a tuple of ints (floats where not whole)."""
    items = str(value).split(",") if isinstance(value, str) else value
    numbers = [float(v) for v in items if str(v).strip()]
    return tuple(int(v) if float(v).is_integer() else v for v in numbers)


def model_architecture(model_config) -> dict:
    """The architecture a `config.model` section resolves to (name + overrides): a DiT's
    depth/hidden_size/num_heads/patch_size, or a U-Net's UNET_FIELDS."""
    m = model_config
    if family(m.name) == "unet":
        return unet_architecture(m.name, **{f: m.unet[f] for f in UNET_FIELDS})
    return architecture(m.name, **{f: getattr(m, f) for f in ARCH_FIELDS})


def problems(m, platform: str | None = None) -> list[str]:
    """Problems with a model section (name, dtype, sizes, how it computes), each
    naming its field. `platform`: what the model compiles for ('cpu', 'gpu', 'tpu'), to
    check the attention kernel against; None (the builders) leaves that to the config."""
    out = choice_problems("dtype", m.dtype, (AUTO, *DTYPES)) + _compute_problems(m, platform)
    if not 0.0 <= m.class_dropout_prob <= 1.0:
        out.append(f"class_dropout_prob={m.class_dropout_prob!r} must lie in [0, 1]")
    if m.name in UNETS:
        return out + _unet_problems(m)
    if m.name not in MODEL_NAMES:
        return out + choice_problems("name", m.name, NAMES)
    out += _other_family_problems(m, "unet")
    arch = model_architecture(m)
    sizes = [p for f in ARCH_FIELDS for p in integer_problems(f, arch[f])]
    sizes += [
        p
        for f in ("input_size", "in_channels", "num_classes")
        for p in integer_problems(f, getattr(m, f))
    ]
    if sizes:
        return out + sizes  # the checks below divide by these sizes
    d, heads, patch = arch["hidden_size"], arch["num_heads"], arch["patch_size"]
    if d % heads:
        out.append(f"hidden_size={d} is not divisible by num_heads={heads}")
    if d % 4:
        out.append(f"hidden_size={d} must be a multiple of 4 (2-D sin-cos position embedding)")
    if m.input_size % patch:
        out.append(f"input_size={m.input_size} is not divisible by patch_size={patch}")
    return out


def _other_family_problems(m, other: str) -> list[str]:
    """The fields of the other family must be unset (None): a DiT has no model.unet.*, a
    U-Net no model.depth/hidden_size/num_heads/patch_size."""
    if other == "unet":
        section = getattr(m, "unet", None) or {}
        values = {f"unet.{f}": section.get(f) for f in UNET_FIELDS}
        kind, fields = "a DiT", "model.depth/hidden_size/num_heads/patch_size"
    else:
        values = {f: getattr(m, f, None) for f in ARCH_FIELDS}
        kind, fields = "a U-Net", "model.unet.*"
    return [
        f"{name}={value!r} is not a field of {kind} (model.name={m.name!r}): its "
        f"architecture is set by {fields}"
        for name, value in values.items()
        if value is not None
    ]


def _unet_problems(m) -> list[str]:
    """Problems with the model section of a U-Net (model.name 'ADM-...')."""
    out = _other_family_problems(m, "dit")
    if m.scan_blocks:
        out.append("scan_blocks=True is for DiTs: a U-Net's blocks are not alike")
    try:
        arch = unet_architecture(m.name, **{f: m.unet[f] for f in UNET_FIELDS})
    except ValueError:
        return out + [
            f"unet.{f}={m.unet[f]!r} must be comma-separated numbers (e.g. '1,2,3,4')"
            for f in _SEQUENCES
            if m.unet[f] is not None and not _parses(m.unet[f])
        ]
    out += arch_problems(arch, m.input_size, m.in_channels, m.num_classes)
    if m.name in UNCONDITIONAL and m.num_classes != 1:
        out.append(
            f"num_classes={m.num_classes!r}: model.name={m.name!r} is unconditional (no "
            "label embedding): set model.num_classes=1, or use the class-conditional name"
        )
    return out


def _parses(value) -> bool:
    try:
        _numbers(value)
    except ValueError:
        return False
    return True


def arch_problems(arch: dict, input_size, in_channels, num_classes) -> list[str]:
    """Problems with U-Net options (`unet.<field>` named) and the input they take."""
    sizes = dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    out = [p for f, v in sizes.items() for p in integer_problems(f, v)]
    for f in ("model_channels", "num_res_blocks", "num_heads"):
        out += integer_problems(f"unet.{f}", arch[f])
    mults, rates = arch["channel_mult"], arch["attention_resolutions"]
    if not mults or any(not mult > 0 for mult in mults):
        out.append(f"unet.channel_mult={mults!r} must hold positive numbers, one per level")
    if not 0.0 <= arch["dropout"] < 1.0:
        out.append(f"unet.dropout={arch['dropout']!r} must lie in [0, 1)")
    heads = arch["num_head_channels"]
    if not (heads == -1 or (isinstance(heads, int) and heads > 0)):
        out.append(f"unet.num_head_channels={heads!r} must be -1 (use num_heads) or positive")
    if out:
        return out  # the checks below compute with these
    mc = arch["model_channels"]
    widths = [int(mult * mc) for mult in mults]
    bad = [w for w in widths if w % GROUPS or w == 0]
    if bad:
        out.append(
            f"unet.model_channels={mc} x unet.channel_mult={mults} gives widths {widths}: "
            f"each must be a positive multiple of {GROUPS} (GroupNorm of {GROUPS} groups)"
        )
    levels = [2**i for i in range(len(mults))]
    wrong = [r for r in rates if r not in levels]
    if wrong:
        out.append(
            f"unet.attention_resolutions={rates} has {wrong}: they are downsample rates "
            f"(guided-diffusion's UNetModel), here among {levels}, one per level of "
            f"unet.channel_mult (the flag --attention_resolutions 32,16,8 means 64 // 32, "
            f"64 // 16, 64 // 8 = 2,4,8 at 64x64)"
        )
    attended = sorted({widths[levels.index(r)] for r in rates if r in levels} | {widths[-1]})
    per = "num_head_channels" if heads != -1 else "num_heads"
    divisor = heads if heads != -1 else arch["num_heads"]
    if not bad and any(w % divisor for w in attended):
        out.append(f"unet.{per}={divisor} does not divide the attention widths {attended}")
    if input_size % 2 ** (len(mults) - 1):
        out.append(
            f"input_size={input_size} is not divisible by {2 ** (len(mults) - 1)} (the "
            f"{len(mults) - 1} downsamplings of unet.channel_mult={mults})"
        )
    return out


def _compute_problems(m, platform: str | None) -> list[str]:
    """Problems with how a model section computes for `platform` (None: any): remat
    policy, scan, attention kernel. cuDNN attention needs a GPU and a 16-bit compute
    dtype (cuDNN's flash attention has no float32 kernel); splash attention, a TPU."""
    out = choice_problems("remat_policy", m.remat_policy, REMAT_POLICIES)
    if not isinstance(m.scan_blocks, bool):
        out.append(f"scan_blocks={m.scan_blocks!r} must be True or False")
    out += choice_problems("attention", m.attention, ATTENTION)
    if m.attention == "splash" and platform not in (None, "tpu"):
        out.append(
            f"attention='splash' is Pallas's TPU kernel, and this process runs on "
            f"{platform!r}: use 'xla' (--mode plan compiles it for a TPU slice)"
        )
    if m.attention == "cudnn":
        if platform not in (None, "gpu"):
            out.append(
                f"attention='cudnn' needs a GPU backend, and this process runs on "
                f"{platform!r}: use 'xla'"
            )
        if compute_dtype(m.dtype) != "bfloat16":
            out.append(f"attention='cudnn' needs dtype='bfloat16', not {m.dtype!r}")
    return out


def create_dit(
    name: str,
    *,
    dtype: str = "float32",
    depth=None,
    hidden_size=None,
    num_heads=None,
    patch_size=None,
    **kwargs,
) -> DiT:
    """A DiT of the named size; depth/hidden_size/num_heads/patch_size override it.

    Remaining keyword arguments go to `DiT` (input_size, in_channels, num_classes,
    class_dropout_prob, learn_sigma, mlp_ratio, remat_policy, scan_blocks, attention).
    Invalid arguments raise ValueError naming each `model.<field>`.
    """
    arch = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size)
    fields = {
        f: kwargs.get(f, getattr(DiT, f))
        for f in ("input_size", "in_channels", "num_classes", "class_dropout_prob") + COMPUTE_FIELDS
    }
    found = problems(types.SimpleNamespace(name=name, dtype=dtype, **arch, **fields))
    if found:
        raise ValueError("; ".join(f"model.{p}" for p in found))
    return DiT(dtype=DTYPES[compute_dtype(dtype)], **architecture(name, **arch), **kwargs)


def create_unet(
    name: str,
    *,
    dtype: str = "float32",
    input_size: int = 64,
    in_channels: int = 3,
    num_classes: int = 1000,
    class_dropout_prob: float = 0.0,
    null_label: bool | None = None,
    scan_blocks: bool = False,
    **kwargs,
) -> UNet:
    """A U-Net of the named architecture; UNET_FIELDS in `kwargs` override it (the
    sequences as tuples or config strings). `null_label` defaults to what label dropout
    needs (class_dropout_prob > 0 with several classes). Remaining keyword arguments go to
    `UNet` (learn_sigma, route_head, remat_policy, attention). Invalid arguments raise
    ValueError naming each `model.<field>`."""
    overrides = {f: kwargs.pop(f) for f in UNET_FIELDS if f in kwargs}
    unet = {f: overrides.get(f) for f in UNET_FIELDS}
    fields = dict(
        name=name, dtype=dtype, input_size=input_size, in_channels=in_channels,
        num_classes=num_classes, class_dropout_prob=class_dropout_prob, scan_blocks=scan_blocks,
        unet={f: _config_value(v) for f, v in unet.items()},
        remat_policy=kwargs.get("remat_policy", UNet.remat_policy),
        attention=kwargs.get("attention", UNet.attention),
    )  # fmt: skip
    found = problems(types.SimpleNamespace(**fields))
    if null_label is None:
        null_label = class_dropout_prob > 0 and num_classes > 1
    if class_dropout_prob > 0 and num_classes > 1 and not null_label:
        found.append(f"class_dropout_prob={class_dropout_prob} needs a null label row")
    if found:
        raise ValueError("; ".join(f"model.{p}" for p in found))
    arch = unet_architecture(name, **overrides)
    return UNet(
        dtype=DTYPES[compute_dtype(dtype)],
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        class_dropout_prob=class_dropout_prob,
        null_label=null_label,
        **arch,
        **kwargs,
    )


def _config_value(value):
    """A sequence as the config string a model.unet field holds."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def create_model(name: str, **kwargs) -> DiT | UNet:
    """The model `name` names, DiT or U-Net, with `create_dit` / `create_unet`'s arguments."""
    builder = create_unet if family(name) == "unet" else create_dit
    return builder(name, **kwargs)


def routed_widths(model: DiT | UNet) -> list[int]:
    """The width of every routed site of `model` in forward order (a DiT: its blocks)."""
    if isinstance(model, UNet):
        return model.routed_widths()
    return [model.hidden_size] * model.depth


def compute_dtype(dtype: str) -> str:
    """The DTYPES name a `model.dtype` computes in: 'auto' is bfloat16 on accelerators
    (GPU, TPU: their fast matmul type) and float32 on CPU (bfloat16 matmuls are emulated
    there, and slower); params and optimizer state are float32 either way."""
    if dtype != AUTO:
        return dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


__all__ = [
    "ATTENTION",
    "AUTO",
    "COMPUTE_FIELDS",
    "DTYPES",
    "MODEL_NAMES",
    "NAMES",
    "REMAT_POLICIES",
    "SIZES",
    "UNETS",
    "UNET_FIELDS",
    "UNET_NAMES",
    "DiT",
    "UNet",
    "architecture",
    "compute_dtype",
    "create_dit",
    "create_model",
    "create_unet",
    "family",
    "model_architecture",
    "problems",
    "routed_widths",
    "unet_architecture",
]
