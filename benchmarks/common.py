"""What every benchmark shares: the analytic FLOP count, the machine header, timing in
interleaved rounds, memory figures, config overrides, the goals of issue 12, and tables.

Needs only jax, numpy and dtr_jax's step path (flax, optax, orbax, ml_collections): no
TensorFlow, clu, grain or scikit-learn (tests/test_benchmarks.py runs every script with
those imports blocked).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax

from dtr_jax import models, modes, tpu
from dtr_jax.config import load_config, unknown_field_problems
from dtr_jax.errors import raise_problems

# Goals of issue 12, checked where a table reports the ratio they are about.
DTR_OVERHEAD = {"gpu": 1.01, "tpu": 1.01, "cpu": 1.02}  # DTR step time / none step time, <=
TORCH_SPEEDUP = {"gpu": 1.3, "cpu": 1.0}  # JAX DTR images/s / PyTorch DTR images/s, >=
SAMPLE_SPEEDUP = 1.5  # JAX sampler images/s / PyTorch sampler images/s on a GPU, >=
MFU = {"DiT-XL/2": 0.55, "DiT-B/2": 0.40}  # model FLOP/s / measured matmul ceiling, >=
COMPILE_SECONDS = 60.0  # DiT-XL/2 train step, <


def forward_macs(model) -> float:
    """Multiply-adds of one forward pass per image (attention included, norms excluded);
    SPEC §3 gives 6.06G / 23.0G / 80.7G / 118.6G for DiT-S/2, B/2, L/2, XL/2."""
    if isinstance(model, models.UNet):
        return unet_forward_macs(model)
    d, p, depth = model.hidden_size, model.patch_size, model.depth
    n = (model.input_size // p) ** 2
    per_token = 12 * d * d + 2 * n * d  # qkv + proj + MLP (ratio 4), then QK^T and AV
    blocks = depth * (n * per_token + 6 * d * d)  # + adaLN per image
    embed = n * p * p * model.in_channels * d + 256 * d + d * d
    final = 2 * d * d + n * d * p * p * model.out_channels
    return float(blocks + embed + final)


def unet_forward_macs(model) -> float:
    """A U-Net's multiply-adds per image, layer by layer of its plan: convolutions (3x3,
    1x1 skips), the embedding MLPs, attention (qkv, proj_out, QK^T and AV); norms and
    elementwise work excluded."""
    side = model.input_size
    width = 4 * model.model_channels
    total = model.model_channels * width + width * width  # time_embed
    for _, layers in model.plan.blocks():
        for layer in layers:
            r = side // layer.ds  # the side of the layer's input
            cin, cout = layer.channels, layer.out_channels
            if layer.kind == "conv":
                total += r * r * 9 * cin * cout
            elif layer.kind in ("down", "up"):
                r_out = r // 2 if layer.kind == "down" else 2 * r
                total += r_out * r_out * 9 * cin * cout
            elif layer.kind == "attn":
                n = r * r
                total += 4 * n * cin * cin + 2 * n * n * cin
            else:  # a ResBlock, resampling inside when updown is set
                r_out = {"down": r // 2, "up": 2 * r}.get(layer.updown, r)
                total += r_out * r_out * 9 * (cin * cout + cout * cout)
                total += r_out * r_out * cin * cout if cin != cout else 0  # 1x1 skip
                total += width * cout * (2 if model.use_scale_shift_norm else 1)
    return float(total + side * side * 9 * model.plan.head_channels * model.out_channels)


def train_flops(model, batch: int) -> float:
    """Model FLOPs of one train step: forward + backward ~ 3 forwards, 2 FLOPs per MAC
    (rematerialisation is not counted: MFU counts the model's work, not the recompute)."""
    return 6.0 * forward_macs(model) * batch


def share_device_with_torch() -> None:
    """Lets JAX take 45% of a GPU instead of 75%, leaving the rest to PyTorch rows in the
    same process (call before JAX starts its backend; an explicit setting wins)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")


def platform_name() -> str:
    """'gpu', 'tpu' or 'cpu': the backend the benchmark runs on."""
    return jax.default_backend()


def accelerator() -> bool:
    return platform_name() != "cpu"


def default_dtype() -> str:
    """The compute dtype of `model.dtype='auto'` here: bfloat16 on accelerators (fp32
    params and optimizer state), float32 on CPU, where bfloat16 matmuls are emulated."""
    return models.compute_dtype(models.AUTO)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def header(title: str, lines: Sequence[str] = ()) -> str:
    """The machine and software a table comes from, and what it measures."""
    devices = jax.devices()
    host = platform.processor() or platform.machine()
    versions = ", ".join(f"{p} {_version(p)}" for p in ("jax", "jaxlib", "flax", "optax", "numpy"))
    torch = sys.modules.get("torch")
    if torch is not None:
        versions += f", torch {torch.__version__}"
        cuda = torch.cuda.is_available()
        lines = [f"torch device: {torch.cuda.get_device_name() if cuda else 'cpu'}", *lines]
    out = [
        f"### {title}",
        "",
        f"- device: {devices[0].device_kind} x{len(devices)} ({platform_name()}); host {host}, "
        f"{_cpu_count()} CPUs",
        f"- Python {platform.python_version()}; {versions}",
        f"- {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        *[f"- {line}" for line in lines],
    ]
    return "\n".join(out)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def time_interleaved(
    runs: dict[str, Callable[[int], float]], rounds: int, steps: int
) -> dict[str, list[float]]:
    """Seconds per step of each run, `rounds` times, the runs taking turns within a round,
    so background load falls on all of them alike. run(steps) -> seconds per step."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(run(steps))
    return times


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """(fn(), its wall time in seconds, waiting for any arrays it returns)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def step_memory_mib(compiled) -> float:
    """XLA's own account of a compiled step, in MiB: arguments (the state: params, EMA,
    optimizer moments; the batch) + outputs not aliased to donated arguments +
    temporaries (activations, gradients in flight). nan where XLA gives none."""
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return total / 2**20


def _memory_stat(name: str) -> float | None:
    """max over local devices of a `memory_stats()` entry, in GiB (None on CPU, which
    keeps no such count)."""
    values = []
    for device in jax.local_devices():
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and name in stats:
            values.append(stats[name])
    return max(values) / 2**30 if values else None


def device_peak_gib() -> float | None:
    """The most memory any local device held at once so far."""
    return _memory_stat("peak_bytes_in_use")


def device_limit_gib() -> float | None:
    """What the allocator may use of one device (XLA_PYTHON_CLIENT_MEM_FRACTION of it)."""
    return _memory_stat("bytes_limit")


def add_row_options(parser, kinds: str, meshes_example: str) -> None:
    """The options train_step and sample share: which rows to build (routing kinds,
    meshes, config variants, PyTorch rows) and the MFU ceiling."""
    parser.add_argument("--config", default="configs/digits.py")
    parser.add_argument("--kinds", default=kinds)
    parser.add_argument(
        "--meshes", default="", help=f"data x fsdp, e.g. {meshes_example}; all = every split"
    )
    parser.add_argument("--set", action="append", default=[], help="field=value override")
    parser.add_argument("--vary", action="append", default=[], help="field=v1,v2: rows per value")
    parser.add_argument(
        "--ceiling",
        type=int,
        default=None,
        help="matmul size of the MFU ceiling (0 = none; default 8192, CPU 1024)",
    )
    parser.add_argument("--torch", default="", help="add PyTorch rows: eager,compiled")
    parser.add_argument("--torch-kinds", default="dtr")


def parse_value(text: str, current):
    """A command-line value in the type of the field it overrides (bool: true/false)."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{text!r} is not true or false")
        return text.lower() == "true"
    if current is None or text == "":
        return int(text) if text.lstrip("-").isdigit() else text
    return type(current)(text)


def config_with(path: str, overrides: dict[str, str]):
    """The config file's config with `field=value` overrides typed like their fields;
    ConfigError for an unknown field or a value of the wrong type."""
    base = load_config(path)
    raise_problems(unknown_field_problems(base, list(overrides)))
    typed, found = {}, []
    for field, text in overrides.items():
        node = base
        for part in field.split("."):
            node = node[part]
        try:
            typed[field] = parse_value(text, node)
        except ValueError as e:
            found.append(f"--set {field}={text}: {e} (the field holds {node!r})")
    raise_problems(found)
    config = load_config(path, **typed)
    config.model.dtype = models.compute_dtype(config.model.dtype)  # rows name what ran
    return config


def run_main(main: Callable[[], None]) -> None:
    """Runs a benchmark's `main` as dtr_jax.main runs a mode: an anticipated failure (a
    config field that does not exist or does not fit) is one `dtr_jax: ...` line and its
    exit code, not a traceback."""
    tpu.cpu_without_accelerators()
    with modes.reporting():
        main()


def parse_assignments(items: Sequence[str]) -> dict[str, str]:
    """['model.depth=2', ...] -> {'model.depth': '2', ...}."""
    out = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set/--vary expects field=value, got {item!r}")
        out[field] = value
    return out


def variants(vary: Sequence[str]) -> list[dict[str, str]]:
    """The cross product of `--vary field=v1,v2` options: [{field: value, ...}, ...]."""
    out = [{}]
    for field, values in parse_assignments(vary).items():
        out = [v | {field: value} for v in out for value in values.split(",")]
    return out


def parse_meshes(text: str, num_devices: int) -> list[tuple[int, int]]:
    """'8x1,4x2' -> [(8, 1), (4, 2)] (data x fsdp); '' = all devices on the data axis;
    'all' = every data x fsdp split of all devices (8: 8x1, 4x2, 2x4, 1x8)."""
    if not text:
        return [(num_devices, 1)]
    if text == "all":
        return [(num_devices // f, f) for f in range(1, num_devices + 1) if num_devices % f == 0]
    meshes = []
    for item in text.split(","):
        data, _, fsdp = item.partition("x")
        shape = (int(data), int(fsdp or 1))
        if shape[0] * shape[1] > num_devices:
            raise SystemExit(
                f"mesh {item} needs {shape[0] * shape[1]} devices; {num_devices} found"
            )
        meshes.append(shape)
    return meshes


def table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or nan
        return "-"
    return f"{value:.{digits}f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"
