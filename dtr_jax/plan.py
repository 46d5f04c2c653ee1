"""`--mode plan`: the run's programs compiled for a TPU slice, without the TPU.

    python -m dtr_jax.main --config configs/dit_xl.py --mode plan --config.plan.topology=v5e-16

jax compiles ahead of time for a TPU topology on any machine with libtpu installed
(MaxText's train_compile.py checks pod configs this way). The plan compiles, on the
config's (data, fsdp) mesh over all chips of `plan.topology` (a slice as Cloud TPU names
it: `dtr_jax.tpu`), the train step (`step.jit_train_step` on the abstract state and an
abstract batch), the sampler (`sample.jit_sampler`, the whole respaced loop), and where
the run uses them the VAE decoder and the in-loop evaluation's Inception features. For
each it reports the compiler's peak memory per chip (XLA's parts beside it: state and
batch, temporaries, outputs, whose sum overstates it where buffers are reused) against
the chip's HBM, whether it fits (a
program that does not is refused by the compiler itself, with its figures), the compile
time, and XLA's FLOPs and bytes per chip with the roofline bound they give:
max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth), from the published figures of
`dtr_jax.tpu.CHIPS`. The bound is a floor on the step time, not a measurement: it leaves
out collectives, launch overheads and any unit short of its peak.

XLA's cost analysis counts the body of a loop once (`HloCostAnalysis::HandleWhile`), and
charges a scanned block with the whole stacked arrays it slices (measured: its bytes per
block grow with the depth). The plan counts the sampler's loop over `sample.num_steps`
as steps x one step, and takes a `scan_blocks` model's FLOPs and bytes from the same
program with its blocks unrolled at depth 1 and 2 (small compiles: one block is the
difference); memory and fit are the scanned program's own. On FSDP meshes libtpu may
overlap a matmul with the all-gather of its sharded weight in a loop over the shards (a
"windowed einsum": DiT-XL/2 on v5e 1x8), another loop counted once: a program with such
loops is counted from its compile with them turned off (COUNTING_OPTIONS; the same
FLOPs, the bytes of the plain all-gather and matmul). XLA's `optimal_seconds` is
not used: it sums per-instruction estimates from libtpu's internal rates, -1 for every
instruction it cannot model (custom calls), loop bodies once: negative for a DiT step.

Nothing is read: no data, weights or workdir. On a TPU VM, `plan.topology=''` plans for
the machine's own TPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dtr_jax import config as config_lib
from dtr_jax import decoders, evaluators, models, sample, sharding, tpu
from dtr_jax import step as step_lib
from dtr_jax.errors import ConfigError, DoesNotFit, raise_problems
from dtr_jax.inference import DiffusionModel
from dtr_jax.models import inception
from dtr_jax.models import vae as vae_lib

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
    """The devices a plan compiles for, and their chip's published figures."""

    devices: list
    chip: tpu.Chip
    name: str  # the slice ('v5e-8') or 'local'
    compile_only: bool  # devices of a topology description, not attached TPUs
    hosts: int

    @property
    def chips(self) -> int:
        return len(self.devices)


@dataclasses.dataclass
class Figures:
    """One compiled program, per chip: XLA's memory account and cost, loops counted."""

    program: str
    batch: int  # global batch of one call (images)
    compile_seconds: float
    fits: bool
    arguments: float = math.nan  # bytes: the state (params, EMA, moments) and inputs
    inputs: float = math.nan  # bytes of `arguments` that are the call's batch
    outputs: float = math.nan  # bytes of outputs not aliased to donated arguments
    temporaries: float = math.nan  # activations, gradients in flight, buffers
    flops: float = math.nan  # per call
    bytes_accessed: float = math.nan  # per call
    calls: str = ""  # what one call is, where not one step or batch: '250 steps'
    problem: str = ""  # why it does not fit: the compiler's words
    peak: float = math.nan  # bytes: the compiler's peak, buffers reused over the program

    @property
    def label(self) -> str:
        return f"{self.program} ({self.calls})" if self.calls else self.program

    @property
    def total(self) -> float:
        """The parts' sum: an upper bound, as XLA reuses some buffers (a donated state's)
        for temporaries."""
        return self.arguments + self.outputs + self.temporaries

    @property
    def memory(self) -> float:
        """Bytes per chip: the compiler's peak where it reports one (libtpu does), else
        the parts' sum."""
        return self.peak if self.peak > 0 else self.total

    def bound_seconds(self, chip: tpu.Chip) -> float:
        """The roofline bound on one call: max(compute time, HBM time) at peak."""
        return max(self.flops / chip.peak_bf16_flops, self.bytes_accessed / chip.hbm_bytes_per_s)

    def bound_by(self, chip: tpu.Chip) -> str:
        compute = self.flops / chip.peak_bf16_flops
        return "compute" if compute >= self.bytes_accessed / chip.hbm_bytes_per_s else "memory"


# --- what to compile for --------------------------------------------------------------------


def target(topology: str) -> Target:
    """The devices of `plan.topology`: a slice's compile-only devices, or ('') the TPUs
    of this machine. ConfigError where there are none."""
    if not topology:
        devices = jax.devices()
        chip = tpu.chip_of(devices[0].device_kind)
        if chip is None:
            raise ConfigError(
                [
                    f"plan.topology='' plans for this machine's TPUs, and it has "
                    f"{len(devices)} {devices[0].platform} devices ({devices[0].device_kind}): "
                    "name a slice, e.g. --config.plan.topology=v5e-8"
                ]
            )
        return Target(devices, chip, "local", False, jax.process_count())
    piece = tpu.parse_slice(topology)
    tpu.compile_only_environment(f"{piece.chip.generation}-{piece.chips}")
    try:
        devices = piece.devices()
    except Exception as e:  # libtpu refuses the topology (or fails to load)
        raise ConfigError([f"plan.topology={topology!r}: libtpu says {e}"]) from None
    return Target(devices, piece.chip, piece.name, True, piece.hosts)


@functools.cache
def _libtpu_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "-"


def planned_config(config, target_: Target):
    """The config as it would run on the target: `model.dtype='auto'` is bfloat16 on
    TPU; nothing is read from files (init_from, whose params have the config's shapes)."""
    config = config.copy_and_resolve_references()
    if config.model.dtype == models.AUTO:
        config.model.dtype = "bfloat16"
    config.init_from = ""
    return config


# --- compiling ------------------------------------------------------------------------------


class _OutOfMemory(Exception):
    """The compiler's refusal of a program that does not fit."""


# The FSDP all-gather before a matmul, as the plain matmul: libtpu otherwise overlaps them
# in a "windowed einsum" loop, whose body (one shard's matmul) the cost analysis counts once.
COUNTING_OPTIONS = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}


def _compile(jitted, args, mesh, compile_only: bool, options: dict | None = None):
    """(compiled, seconds to lower and compile); _OutOfMemory where it does not fit.
    `options`: libtpu's compiler options (COUNTING_OPTIONS for a program counted)."""
    start = time.perf_counter()
    with sharding.mesh_context(mesh):
        traced = jitted.trace(*args)
    lowered = traced.lower(lowering_platforms=("tpu",)) if compile_only else traced.lower()
    try:
        with _not_cached(compile_only):
            compiled = lowered.compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" in str(e):
            raise _OutOfMemory(_oom_summary(str(e))) from None
        raise
    return compiled, time.perf_counter() - start


@contextlib.contextmanager
def _not_cached(compile_only: bool):
    """jax's persistent compilation cache cannot load back an executable compiled for
    devices this process lacks (jax 0.10.2: "PjRtCompiler must be constructed with a
    Client"): a compile-only program is not written to it."""
    if not compile_only:
        yield
        return
    name = "jax_persistent_cache_min_compile_time_secs"
    before = getattr(jax.config, name)
    jax.config.update(name, math.inf)
    try:
        yield
    finally:
        jax.config.update(name, before)


def _oom_summary(message: str) -> str:
    """The compiler's account of a program that does not fit, without its HLO listing."""
    line = next((s for s in message.splitlines() if "RESOURCE_EXHAUSTED" in s), message)
    return line.split("RESOURCE_EXHAUSTED:", 1)[-1].strip()


def _cost(compiled, text: str | None = None) -> tuple[float, float]:
    """(FLOPs, bytes accessed) per chip: XLA's cost analysis plus the splash kernels'
    matmuls (`kernel_flops`), which it cannot see. `text`: `compiled.as_text()`, where
    the caller has it already."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    text = compiled.as_text() if text is None else text
    flops = float(analysis.get("flops", math.nan)) + kernel_flops(text)
    return flops, float(analysis.get("bytes accessed", math.nan))


# The matmuls of each splash attention kernel (model.attention='splash'), as products of
# a (N, head_dim) and a (head_dim, N) operand or the like: the forward takes q k^T and
# p v; the backward's dq kernel recomputes q k^T and takes dO v^T and dS k, its dk/dv
# kernel recomputes q k^T and takes dO v^T, P^T dO and dS^T q (jax's
# pallas/ops/tpu/splash_attention, unfused backward). The kernels' bytes are their
# operands and outputs, which the cost analysis counts like any custom call's.
SPLASH_PRODUCTS = {"splash_mha_fwd": 2, "splash_mha_dq": 3, "splash_mha_dkv": 4}
_KERNEL_CALL = re.compile(
    r"^\s*(?:ROOT )?%?(splash_mha_(?:fwd|dq|dkv))[\w.-]* = (.*?) custom-call\("
)
_SHAPE_4D = re.compile(r"\[(\d+),(\d+),(\d+),(\d+)\]")


def kernel_flops(hlo_text: str) -> float:
    """FLOPs of the splash kernel calls in an optimized HLO module: each call's products
    (SPLASH_PRODUCTS) x 2 B H N^2 D, its (B, heads, N, head_dim) block of q from the first
    4-d array of its result. Like XLA's own count, a call inside a loop counts once."""
    if "splash_mha_" not in hlo_text:
        return 0.0
    total = 0.0
    for line in hlo_text.splitlines():
        call = _KERNEL_CALL.match(line)
        if call:
            b, h, n, d = (int(x) for x in _SHAPE_4D.search(call.group(2)).groups())
            total += SPLASH_PRODUCTS[call.group(1)] * 2.0 * b * h * n * n * d
    return total


def _figures(program, batch, compiled, seconds, inputs, flops, bytes_accessed, calls=""):
    m = compiled.memory_analysis()
    return Figures(
        program=program,
        batch=batch,
        compile_seconds=seconds,
        fits=True,
        arguments=m.argument_size_in_bytes,
        inputs=inputs,
        outputs=m.output_size_in_bytes - m.alias_size_in_bytes,
        temporaries=m.temp_size_in_bytes,
        flops=flops,
        bytes_accessed=bytes_accessed,
        calls=calls,
        peak=float(getattr(m, "peak_memory_in_bytes", 0)) or math.nan,
    )


def _windowed(text: str) -> bool:
    """Whether libtpu made a matmul of a compiled program (its HLO `text`) a
    windowed-einsum loop (FSDP meshes)."""
    return "windowed_dot_general" in text


def _counted(build: Callable[..., tuple], dm: DiffusionModel, count: bool):
    """(compiled, seconds, flops, bytes) of `build(dm)`'s program; `build(dm, options)`
    compiles it with libtpu's `options`. A scanned model's cost comes from the same
    program with the blocks unrolled at depth 1 and 2 (the cost of one block is the
    difference; module docstring), or is nan without `count`. A program counted is
    compiled with COUNTING_OPTIONS where libtpu made windowed-einsum loops of its
    matmuls. Seconds: the real program's compile."""
    compiled, seconds = build(dm)
    scanned = getattr(dm.model, "scan_blocks", False)  # U-Nets have no scanned form
    text = None if scanned else compiled.as_text()
    if not scanned and not _windowed(text):
        return (compiled, seconds, *_cost(compiled, text))
    if not count:
        return compiled, seconds, math.nan, math.nan
    if not scanned:
        return (compiled, seconds, *_cost(build(dm, COUNTING_OPTIONS)[0]))
    one, two = (_cost(build(_unrolled(dm, d), COUNTING_OPTIONS)[0]) for d in (1, 2))
    depth = dm.model.depth
    flops, nbytes = (a + (depth - 1) * (b - a) for a, b in zip(one, two, strict=True))
    return compiled, seconds, flops, nbytes


def _unrolled(dm: DiffusionModel, depth: int) -> DiffusionModel:
    """`dm` with `depth` unrolled blocks (and the tables of those blocks)."""
    tables = dm.tables
    if tables is not None and tables.shape[0] > 1:  # one table per block ('random')
        tables = tables[:depth]
    model = dm.model.clone(depth=depth, scan_blocks=False)
    return dataclasses.replace(dm, model=model, tables=tables)


def _abstract(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (a tree, or one)."""
    if not isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
        )
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), tree)


def abstract_batch(config, model, batch_size: int, mesh) -> dict:
    """The global batch the train step reads, as ShapeDtypeStructs split over the batch
    shards: extracted latents as the posterior mean and std in `extract.dtype`
    (`data.pipeline`), other sources as float32 images; int32 labels."""
    shape = (batch_size, model.input_size, model.input_size, model.in_channels)
    if config.data.name == "latents":
        dtype = jnp.dtype(config.extract.dtype)
        batch = {
            "mean": jax.ShapeDtypeStruct(shape, dtype),
            "std": jax.ShapeDtypeStruct(shape, dtype),
        }
    else:
        batch = {"image": jax.ShapeDtypeStruct(shape, jnp.float32)}
    batch["label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return _abstract(batch, sharding.batch_sharding(mesh))


def _nbytes(tree) -> float:
    return float(sum(np.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def _tables(dm, mesh):
    """The routing tables as replicated ShapeDtypeStructs: a DiT's array, a U-Net's dict
    of them by width, or None."""
    return None if dm.tables is None else _abstract(dm.tables, sharding.replicated(mesh))


def train_step(config, mesh, compile_only: bool, count: bool = True) -> Figures:
    """The train step of `config` (its global batch) on `mesh`; `count=False` leaves a
    scanned model's FLOPs and bytes uncounted (nan), for a check of memory alone."""
    setup = step_lib.create_setup(config)
    batch = abstract_batch(config, setup.dm.model, config.global_batch_size, mesh)

    def build(dm: DiffusionModel, options: dict | None = None):
        s = dataclasses.replace(setup, dm=dm)
        abstract, shardings = step_lib.state_layout(s, mesh)
        jitted = step_lib.jit_train_step(s, mesh, shardings)
        args = (abstract, batch, _tables(dm, mesh))
        return _compile(jitted, args, mesh, compile_only, options)

    try:
        compiled, seconds, flops, nbytes = _counted(build, setup.dm, count)
    except _OutOfMemory as e:
        return Figures("train step", config.global_batch_size, math.nan, False, problem=str(e))
    inputs = _nbytes(batch) / sharding.batch_shards(mesh)
    return _figures(
        "train step", config.global_batch_size, compiled, seconds, inputs, flops, nbytes
    )


def sampler(config, mesh, compile_only: bool, count: bool = True) -> Figures:
    """The sampler of `config.sample` on a batch of `sample.batch_size` (padded to the
    batch shards, as `sharding.put_batch` pads it), the params laid out as in training;
    FLOPs and bytes of all `sample.num_steps` steps."""
    s = config.sample
    dm = step_lib.create_setup(config).dm
    shards = sharding.batch_shards(mesh)
    rows = -(-s.batch_size // shards) * shards
    labels = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=sharding.batch_sharding(mesh))
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))

    def build(d: DiffusionModel, options: dict | None = None):
        params, shardings = d.param_layout(mesh)
        jitted = sample.jit_sampler(d, s, mesh, shardings)
        args = (_abstract(params, shardings), labels, _tables(d, mesh), rng)
        return _compile(jitted, args, mesh, compile_only, options)

    name, calls = "sampler", f"{s.num_steps} steps"
    try:
        compiled, seconds, flops, nbytes = _counted(build, dm, count)
    except _OutOfMemory as e:
        return Figures(name, rows, math.nan, False, calls=calls, problem=str(e))
    # The loop over steps is counted once: its body is one step, the rest is negligible.
    steps = int(s.num_steps)
    inputs = _nbytes(labels) / shards
    return _figures(name, rows, compiled, seconds, inputs, flops * steps, nbytes * steps, calls)


def _plain(name: str, fn, args: tuple, batch: int, mesh, compile_only: bool) -> Figures:
    """A program without loops: `fn` (jitted) on `args`, args[1] its batch."""
    try:
        compiled, seconds = _compile(fn, args, mesh, compile_only)
    except _OutOfMemory as e:
        return Figures(name, batch, math.nan, False, problem=str(e))
    flops, nbytes = _cost(compiled)
    inputs = _nbytes(args[1]) / sharding.batch_shards(mesh)
    return _figures(name, batch, compiled, seconds, inputs, flops, nbytes)


def _rows(n: int, mesh) -> int:
    shards = sharding.batch_shards(mesh)
    return -(-n // shards) * shards


def vae_decoder(config, mesh, compile_only: bool) -> Figures:
    """`sample.decoder=sd_vae`: the SD VAE's decoder (the architecture of `vae.path`'s
    config.json where there is one) on `vae.batch_size` latents."""
    vae_config = vae_lib.VAEConfig()
    folder_config = f"{config.vae.path}/{vae_lib.CONFIG_FILE}"
    if config.vae.path and os.path.isfile(folder_config):
        vae_config = vae_lib.read_config(folder_config)
    vae = vae_lib.AutoencoderKL(vae_config)
    rows, m = _rows(config.vae.batch_size, mesh), config.model
    latents = jax.ShapeDtypeStruct(
        (rows, m.input_size, m.input_size, m.in_channels),
        jnp.float32,
        sharding=sharding.batch_sharding(mesh),
    )
    params = _abstract(vae_lib.abstract_params(vae), sharding.replicated(mesh))
    fn = decoders.jit_decode(vae, mesh)
    return _plain("VAE decoder", fn, (params, latents), rows, mesh, compile_only)


def inception_features(config, mesh, compile_only: bool, side: int) -> Figures:
    """The in-loop evaluation's FID Inception features of `eval.batch_size` uint8 images
    `side` pixels square (the decoded samples)."""
    rows = _rows(config.eval.batch_size, mesh)
    images = jax.ShapeDtypeStruct(
        (rows, side, side, 3), jnp.uint8, sharding=sharding.batch_sharding(mesh)
    )
    variables = _abstract(jax.eval_shape(inception.init_variables), sharding.replicated(mesh))
    rep, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    fn = jax.jit(
        lambda v, x: inception.make_feature_fn(v, fc_bias=False)(x),
        in_shardings=(rep, batch),
        out_shardings=batch,
    )
    return _plain("Inception features", fn, (variables, images), rows, mesh, compile_only)


def programs(config, mesh, compile_only: bool, count: bool = True) -> list[Figures]:
    """Every program `plan.programs` names that the run uses (`count`: `train_step`)."""
    chosen = _chosen(config.plan.programs)
    out = []
    if "train" in chosen:
        out.append(train_step(config, mesh, compile_only, count))
    if "sample" in chosen:
        out.append(sampler(config, mesh, compile_only, count))
    decoded = config.sample.decoder == "sd_vae"
    if decoded and ("sample" in chosen or "evaluate" in chosen):
        out.append(vae_decoder(config, mesh, compile_only))
    if "evaluate" in chosen and config.eval_every_steps and _uses_inception(config):
        side = config.model.input_size * (8 if decoded else 1)
        out.append(inception_features(config, mesh, compile_only, side))
    return out


def _uses_inception(config) -> bool:
    return "inception" in evaluators.select(config)


def _chosen(text: str) -> list[str]:
    return [p.strip() for p in str(text).split(",") if p.strip()]


# --- the largest batch ------------------------------------------------------------------------


@dataclasses.dataclass
class Largest:
    """The largest global batch of a train-step variant that fits."""

    scan_blocks: bool
    remat_policy: str
    batch: int  # 0: not even one batch shard fits
    figures: Figures | None  # the step at that batch
    compiles: int


def largest_fitting(
    memory_at: Callable[[int], float | None], shards: int, start: int, limit: int, capacity: float
) -> tuple[int, int]:
    """(the largest multiple of `shards` up to `limit` for which `memory_at` (bytes per
    chip, None: does not fit) fits, the number of tries). Memory grows about linearly with
    the batch: two fitting tries give the line to `capacity` (the HBM), the next try is
    where it crosses, then bisection between the largest that fits and the smallest
    that does not."""
    tried: dict[int, float | None] = {}
    lo, hi = 0, limit + shards  # lo fits (0: none known), hi does not
    b = min(max(shards, start // shards * shards), limit)
    while True:
        tried[b] = memory_at(b)
        if tried[b] is None:
            hi = b
        else:
            lo = b
        if hi - lo <= shards:
            return lo, len(tried)
        b = _next_try(tried, lo, hi, shards, capacity)


def _next_try(tried: dict, lo: int, hi: int, shards: int, capacity: float) -> int:
    """The next batch to try, strictly between lo (fits) and hi (does not): where the
    line through the two largest fitting tries reaches `capacity` (at least lo + one
    shard), else twice lo while no try has failed, else the middle; a guess at or past
    hi becomes the largest batch below it (`plan.max_batch` itself while none failed)."""
    fit = sorted((b, m) for b, m in tried.items() if m is not None)
    guess = None
    if len(fit) >= 2:
        (b1, m1), (b2, m2) = fit[-2:]
        if m2 > m1:
            guess = max(
                int((b2 + (capacity - m2) * (b2 - b1) / (m2 - m1)) // shards * shards), lo + shards
            )
    elif fit:
        guess = 2 * lo
    if guess is not None and guess >= hi:
        guess = hi - shards
    if guess is None or not lo < guess < hi:
        guess = max((lo + hi) // 2 // shards * shards, lo + shards)
    return guess


def largest(config, mesh, target_: Target) -> Largest:
    """The largest global batch of `config`'s train step that fits (a multiple of the
    batch shards, up to `plan.max_batch`), searched from `global_batch_size`."""
    shards = sharding.batch_shards(mesh)
    seen: dict[int, Figures] = {}

    def at(b: int, count: bool) -> Figures:
        c = config_lib.with_overrides(config, global_batch_size=b)
        return train_step(c, mesh, target_.compile_only, count)

    def memory_at(b: int) -> float | None:
        seen[b] = at(b, count=False)  # memory alone: a scanned model's counting waits
        return seen[b].memory if seen[b].fits else None

    limit = config.plan.max_batch // shards * shards
    capacity = target_.chip.hbm_gib * GIB
    best, tries = largest_fitting(memory_at, shards, config.global_batch_size, limit, capacity)
    figures = seen.get(best)
    if figures is not None and figures.flops != figures.flops:  # scanned: count the one kept
        figures = at(best, count=True)
    m = config.model
    return Largest(m.scan_blocks, m.remat_policy, best, figures, tries)


def find_batch(config, mesh, target_: Target) -> list[Largest]:
    """`largest` for each `scan_blocks` setting and remat policy."""
    return [
        largest(
            config_lib.with_overrides(
                config, **{"model.scan_blocks": scan, "model.remat_policy": policy}
            ),
            mesh,
            target_,
        )
        for scan in (False, True)
        for policy in models.REMAT_POLICIES
    ]


# --- the report ---------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return "-" if x != x else f"{x / GIB:.2f}"


def _num(x: float, digits: int = 1) -> str:
    return "-" if x != x else f"{x:,.{digits}f}"


def header(config, target_: Target, mesh) -> str:
    c, g = config, target_.chip
    data, fsdp = mesh.shape["data"], mesh.shape["fsdp"]
    return "\n".join(
        [
            f"TPU plan of {c.model.name} ({c.model.dtype}, routing {c.model.routing.kind}) on "
            f"{target_.name}: {target_.chips} x {g.device_kind}, {target_.hosts} host(s); "
            f"mesh data {data} x fsdp {fsdp}",
            f"compiled, not run (jax {jax.__version__}, libtpu {_libtpu_version()}); per chip "
            f"{g.peak_bf16_flops / 1e12:g} TFLOP/s bf16, {g.hbm_gib:g} GiB HBM at "
            f"{g.hbm_bytes_per_s / 1e9:g} GB/s ({g.source})",
            "bound = max(FLOPs / peak, bytes / HBM bandwidth) per chip: a floor on the time, "
            "not a measurement (collectives and overheads are not in it)",
        ]
    )


COLUMNS = [
    "program",
    "global batch",
    "per chip: state+inputs GiB",
    "of which batch GiB",
    "temporaries GiB",
    "outputs GiB",
    "peak GiB / HBM",
    "fits",
    "compile s",
    "TFLOP / chip",
    "GB accessed / chip",
    "bound ms (by)",
    "bound images/s",
]


def table_rows(figures: list[Figures], chip: tpu.Chip) -> list[list[str]]:
    rows = []
    for f in figures:
        if not f.fits:
            rows.append([f.label, f.batch, *"----", f"> {chip.hbm_gib:g}", "no", *"-----"])
            continue
        t = f.bound_seconds(chip)
        rows.append(
            [
                f.label,
                f.batch,
                _gib(f.arguments),
                _gib(f.inputs),
                _gib(f.temporaries),
                _gib(f.outputs),
                f"{_gib(f.memory)} / {chip.hbm_gib:g}",
                "yes",
                _num(f.compile_seconds),
                _num(f.flops / 1e12, 2),
                _num(f.bytes_accessed / 1e9, 1),
                f"{_num(t * 1e3, 1)} ({f.bound_by(chip)})",
                _num(f.batch / t, 0),
            ]
        )
    return rows


def markdown(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


def chip_hours(config, figures: Figures, target_: Target) -> float:
    """Chip-hours of `num_train_steps` train steps at the bound."""
    return config.num_train_steps * figures.bound_seconds(target_.chip) * target_.chips / 3600


def report(config, target_: Target, mesh, figures: list[Figures], largest=None) -> str:
    out = [header(config, target_, mesh), "", markdown(COLUMNS, table_rows(figures, target_.chip))]
    for f in figures:
        if not f.fits:
            out.append(f"- {f.label} does not fit: {f.problem}")
    train = next((f for f in figures if f.program == "train step" and f.fits), None)
    if train is not None:
        hours = chip_hours(config, train, target_)
        out.append(
            f"- {config.num_train_steps:,} train steps at the bound: {_num(hours, 0)} chip-hours "
            f"({target_.chips} chips x {_num(hours / target_.chips, 1)} h)"
        )
    if not config.eval_every_steps and "evaluate" in _chosen(config.plan.programs):
        out.append("- in-loop evaluation: off (eval_every_steps=0), nothing to compile")
    if largest:
        out += ["", largest_report(largest, target_, config)]
    return "\n".join(out)


def largest_report(largest: list[Largest], target_: Target, config) -> str:
    columns = ["scan_blocks", "remat_policy", "largest global batch", "peak GiB / chip"]
    columns += ["bound images/s", "compiles"]
    rows = []
    for r in largest:
        f = r.figures
        images = "-" if f is None else _num(f.batch / f.bound_seconds(target_.chip), 0)
        total = "-" if f is None else _gib(f.memory)
        rows.append(
            [r.scan_blocks, repr(r.remat_policy), r.batch or "none", total, images, r.compiles]
        )
    title = (
        f"Largest global batch of the train step that fits (a multiple of the "
        f"{target_.chips} batch shards, up to plan.max_batch={config.plan.max_batch}):"
    )
    return title + "\n\n" + markdown(columns, rows)


# --- the mode -------------------------------------------------------------------------------------


def plan_mode(config, workdir: str | None = None) -> list[Figures]:
    """`--mode plan`: compiles the programs for `plan.topology`, prints the plan, and
    raises DoesNotFit if the train step (or any program planned) does not fit."""
    del workdir  # a plan reads and writes nothing
    raise_problems(config_lib.plan_problems(config))  # a slice name, libtpu: first
    target_ = target(config.plan.topology)
    config_lib.validate(config, target_.chips, mode="plan")
    config = planned_config(config, target_)
    mesh = sharding.make_mesh(config.mesh, target_.devices)
    figures = programs(config, mesh, target_.compile_only)
    largest = find_batch(config, mesh, target_) if config.plan.find_batch else None
    print(report(config, target_, mesh, figures, largest), flush=True)
    misfits = [f for f in figures if not f.fits]
    if misfits:
        raise DoesNotFit(
            f"{', '.join(f.program for f in misfits)} of {config.model.name} does not fit "
            f"{target_.name} ({misfits[0].problem}): try model.remat_policy, model.scan_blocks, "
            "mesh.fsdp or a smaller batch (--config.plan.find_batch=True finds the largest)"
        )
    return figures
