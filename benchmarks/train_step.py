"""Train-step speed: routing none / dtr / random side by side, on each mesh, against the
matmul ceiling of the same run, and optionally against the PyTorch counterpart.

  python -m benchmarks.train_step --config configs/digits.py
  python -m benchmarks.train_step --config configs/dit_b.py --batch 256 --set model.dtype=bfloat16
  python -m benchmarks.train_step --config configs/dit_s.py --batch 8 --torch eager,compiled
  python -m benchmarks.train_step --config configs/dit_xl.py --batch 2 --kinds dtr \\
      --vary model.scan_blocks=false,true --compile-only

Each row is the real jitted, sharded, donated train step (`dtr_jax.step`: hybrid loss,
AdamW, EMA) on a fixed synthetic batch resident on the devices, so no input pipeline
and no host transfer is timed. All rows are compiled first, then timed in interleaved
rounds (medians), so background load falls on all of them alike. Every row starts from
the same initial state and runs the same steps (the noise and timesteps of step k depend
only on the seed and k): the loss of its last step is printed, equal across meshes.
`--vary field=a,b` adds rows for each value (e.g. remat policies, scan, attention).
Rows hold their states at once: for the largest batch, time one kind at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from benchmarks import common
from benchmarks.matmul import default_size, matmul_tflops
from dtr_jax import inference, sharding
from dtr_jax import step as step_lib
from dtr_jax.config import validate, with_overrides
from dtr_jax.models import architecture, family, model_architecture, unet_architecture


@dataclasses.dataclass
class Row:
    """One timed configuration: `run(steps)` -> seconds per step."""

    framework: str  # 'jax', 'torch eager', 'torch compiled'
    kind: str
    mesh: tuple[int, int]
    variant: dict[str, str]
    config: object  # the row's config (batch, dtype, model)
    model: object  # the DiT or U-Net (for the FLOP count)
    run: Callable[[int], float]
    compile_seconds: float
    memory_mib: float  # XLA's account of the step (JAX) or the peak allocated (torch GPU)
    last_loss: Callable[[], float]  # the loss of the last step run
    cost: dict = dataclasses.field(default_factory=dict)  # XLA's flops / bytes accessed

    @property
    def devices(self) -> int:
        return self.mesh[0] * self.mesh[1]


class JaxStep:
    """The compiled step of one row and the state it advances (`compile_only`: shapes only,
    nothing allocated, so DiT-XL/2 compiles on a laptop)."""

    def __init__(self, config, mesh_shape: tuple[int, int], compile_only: bool = False):
        data, fsdp = mesh_shape
        config.mesh.data, config.mesh.fsdp = data, fsdp
        devices = jax.devices()[: data * fsdp]
        # the step is fed a device-resident synthetic batch: the config's data is not read
        validate(with_overrides(config, **{"data.name": "synthetic"}), len(devices), mode="train")
        self.setup = step_lib.create_setup(config)
        self.mesh = sharding.make_mesh(config.mesh, devices)
        abstract, shardings = step_lib.state_layout(self.setup, self.mesh)
        batch = synthetic_batch(self.setup.dm.model, config.global_batch_size)
        batch_sharding = sharding.batch_sharding(self.mesh)
        tables = self.setup.dm.tables
        rep = sharding.replicated(self.mesh)
        if compile_only:
            self.state = abstract
            self.batch = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch_sharding), batch
            )
        else:
            self.state = step_lib.create_state(self.setup, self.mesh, shardings)
            self.batch = jax.device_put(batch, batch_sharding)
        self.tables = None if tables is None else jax.device_put(tables, rep)
        jitted = step_lib.jit_train_step(self.setup, self.mesh, shardings)
        with sharding.mesh_context(self.mesh):
            self.compiled, self.compile_seconds = common.timed(
                lambda: jitted.lower(self.state, self.batch, self.tables).compile()
            )

    def run(self, steps: int) -> float:
        """Runs `steps` steps; returns seconds per step (waiting only after the last)."""

        def loop():
            for _ in range(steps):
                self.state, self.metrics = self.compiled(self.state, self.batch, self.tables)
            return self.state, self.metrics

        return common.timed(loop)[1] / steps

    def last_loss(self) -> float:
        return float(jax.device_get(self.metrics["loss"]))

    def cost(self) -> dict:
        analysis = self.compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        return {k: analysis.get(k, float("nan")) for k in ("flops", "bytes accessed")}


def synthetic_batch(model, batch: int) -> dict:
    """Fixed random images and labels of the model's input shape (host numpy)."""
    rng = np.random.default_rng(0)
    shape = (batch, model.input_size, model.input_size, model.in_channels)
    return {
        "image": rng.standard_normal(shape, np.float32),
        "label": rng.integers(0, model.num_classes, batch).astype(np.int32),
    }


def jax_row(config, kind: str, mesh: tuple[int, int], variant: dict, compile_only: bool) -> Row:
    config = config.copy_and_resolve_references()
    config.model.routing.kind = kind
    step = JaxStep(config, mesh, compile_only)
    if not compile_only:
        step.run(1)  # warm-up
    return row_of(
        "jax",
        step,
        kind=kind,
        config=config,
        model=step.setup.dm.model,
        mesh=mesh,
        variant=variant,
        memory_mib=common.step_memory_mib(step.compiled),
        last_loss=step.last_loss,
        cost=step.cost(),
    )


def row_of(
    framework: str,
    runner,
    *,
    kind: str,
    config,
    model,
    memory_mib: float,
    last_loss: Callable[[], float],
    mesh: tuple[int, int] = (1, 1),
    variant: dict | None = None,
    cost: dict | None = None,
) -> Row:
    """The row of a runner (its `run` and `compile_seconds`); `model` is the DiT or U-Net,
    for the FLOP count."""
    return Row(
        framework=framework,
        kind=kind,
        mesh=mesh,
        variant=variant or {},
        config=config,
        model=model,
        run=runner.run,
        compile_seconds=runner.compile_seconds,
        memory_mib=memory_mib,
        last_loss=last_loss,
        cost=cost or {},
    )


def torch_rows(config, kinds: list[str], modes: list[str]) -> list[Row]:
    """PyTorch train steps of the same model, batch and dtype, one per mode and kind."""
    from benchmarks import torch_counterpart  # only when asked: torch is optional

    model = inference.from_config(config).model  # for the FLOP count
    rows = []
    for mode in modes:
        for kind in kinds:
            runner = torch_counterpart.TrainRunner(config, kind, compiled=mode == "compiled")
            rows.append(
                row_of(
                    f"torch {mode}",
                    runner,
                    kind=kind,
                    config=config,
                    model=model,
                    memory_mib=runner.memory_mib,
                    last_loss=runner.last_loss,
                )
            )
    return rows


def named_size(config) -> str | None:
    """The model's name if its architecture is exactly that size (no overrides)."""
    name = config.model.name
    named = unet_architecture(name) if family(name) == "unet" else architecture(name)
    return name if model_architecture(config.model) == named else None


def report(rows: list[Row], times: dict[int, list[float]], ceiling: float | None) -> str:
    """The table of timed rows and the goals their ratios bear on."""
    columns = [
        "framework",
        "variant",
        "mesh (data x fsdp)",
        "routing",
        "batch",
        "dtype",
        "ms/step (median)",
        "min",
        "vs none",
        "images/s",
        "images/s/device",
        "model TFLOP/s",
        "MFU",
        "memory MiB",
        "compile s",
        "last loss",
    ]
    med = {i: common.median(times[i]) for i in times}
    out, goals = [], []
    for i, row in enumerate(rows):
        base = _baseline(rows, row)
        b = row.config.global_batch_size
        flops = common.train_flops(row.model, b) / med[i]
        mfu = None if not ceiling else flops / (ceiling * 1e12 * row.devices)
        out.append(
            (
                row.framework,
                variant_text(row.variant),
                f"{row.mesh[0]}x{row.mesh[1]}",
                row.kind,
                b,
                row.config.model.dtype,
                common.fmt(med[i] * 1e3),
                common.fmt(min(times[i]) * 1e3),
                "-" if base is None else common.fmt(med[i] / med[base], 3),
                common.fmt(b / med[i]),
                common.fmt(b / med[i] / row.devices),
                common.fmt(flops / 1e12, 3),
                "-" if mfu is None else f"{100 * mfu:.1f}%",
                common.fmt(row.memory_mib),
                common.fmt(row.compile_seconds),
                common.fmt(row.last_loss(), 5),
            )
        )
        goals += _goals(rows, med, i, base, mfu)
    return common.table(columns, out) + ("\n\n" + "\n".join(goals) if goals else "")


def _baseline(rows: list[Row], row: Row) -> int | None:
    """The index of the `none` row of the same framework, mesh and variant."""
    for j, other in enumerate(rows):
        same = (other.framework, other.mesh, other.variant) == (
            row.framework,
            row.mesh,
            row.variant,
        )
        if same and other.kind == "none":
            return j
    return None


def variant_text(variant: dict) -> str:
    return ", ".join(f"{k.removeprefix('model.')}={v}" for k, v in variant.items()) or "-"


def _goals(rows, med, i, base, mfu) -> list[str]:
    """Lines on the goals of issue 12 that row i bears on."""
    row, where, out = rows[i], common.platform_name(), []
    what = f"{row.framework} {variant_text(row.variant)} mesh {row.mesh[0]}x{row.mesh[1]}"
    if row.framework == "jax" and row.kind == "dtr" and base is not None:
        ratio, limit = (
            med[i] / med[base],
            common.DTR_OVERHEAD.get(where, common.DTR_OVERHEAD["gpu"]),
        )
        out.append(
            f"- DTR / none step time, {what}: {ratio:.3f} (goal <= {limit}: "
            f"{common.verdict(ratio <= limit)})"
        )
    size = named_size(row.config)
    bf16 = row.config.model.dtype == "bfloat16"  # the MFU goals are for bf16 compute
    if (
        row.framework == "jax"
        and row.kind == "dtr"
        and bf16
        and mfu is not None
        and size in common.MFU
    ):
        goal = common.MFU[size]
        out.append(
            f"- {size} MFU, {what}: {100 * mfu:.1f}% (goal >= {100 * goal:.0f}%: "
            f"{common.verdict(mfu >= goal)})"
        )
    if row.framework == "jax" and row.kind == "dtr" and size == "DiT-XL/2":
        ok = row.compile_seconds < common.COMPILE_SECONDS
        out.append(
            f"- DiT-XL/2 compile time, {what}: {row.compile_seconds:.1f} s "
            f"(goal < {common.COMPILE_SECONDS:.0f} s: {common.verdict(ok)})"
        )
    if row.framework.startswith("torch") and row.kind == "dtr" and where in common.TORCH_SPEEDUP:
        jax_dtr = [j for j, r in enumerate(rows) if r.framework == "jax" and r.kind == "dtr"]
        for j in jax_dtr:
            per_device = rows[j].config.global_batch_size / med[j] / rows[j].devices
            speedup = per_device / (row.config.global_batch_size / med[i])
            goal = common.TORCH_SPEEDUP[where]
            out.append(
                f"- JAX ({variant_text(rows[j].variant)}, mesh {rows[j].mesh[0]}x"
                f"{rows[j].mesh[1]}, per device) / {row.framework} images/s, DTR: "
                f"{speedup:.2f}x (goal >= {goal}: {common.verdict(speedup >= goal)})"
            )
    return out


def compile_report(rows: list[Row]) -> str:
    """Compile time, XLA's memory account of the step and its cost analysis, per row;
    with a device memory limit (GPU/TPU), whether XLA's account fits under it. Under
    scan_blocks XLA counts the loop body once: its GFLOP and bytes are not comparable."""
    limit = common.device_limit_gib()
    columns = ["variant", "mesh", "routing", "batch", "dtype", "compile s", "memory MiB"]
    columns += ["XLA GFLOP", "XLA GB accessed"] + (["fits"] if limit else [])
    out = []
    for r in rows:
        out.append([
            variant_text(r.variant), f"{r.mesh[0]}x{r.mesh[1]}", r.kind,
            r.config.global_batch_size, r.config.model.dtype, common.fmt(r.compile_seconds),
            common.fmt(r.memory_mib), common.fmt(r.cost.get("flops", float("nan")) / 1e9),
            common.fmt(r.cost.get("bytes accessed", float("nan")) / 1e9, 2),
        ])  # fmt: skip
        if limit:
            out[-1].append("yes" if r.memory_mib / 1024 <= limit else "no")
    return common.table(columns, out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_row_options(parser, kinds="none,dtr,random", meshes_example="8x1,4x2,1x8")
    parser.add_argument("--batch", type=int, default=None, help="global batch size")
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="compile each row; report compile time, memory and XLA's cost",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.torch:
        common.share_device_with_torch()
    overrides = common.parse_assignments(args.set)
    if args.batch:
        overrides["global_batch_size"] = str(args.batch)
    kinds = args.kinds.split(",")
    rows = []
    for mesh in common.parse_meshes(args.meshes, jax.device_count()):
        for variant in common.variants(args.vary):
            config = common.config_with(args.config, overrides | variant)
            rows += [jax_row(config, kind, mesh, variant, args.compile_only) for kind in kinds]
    config = common.config_with(args.config, overrides)
    lines = [f"config {args.config}; {variant_text(common.parse_assignments(args.set))}"]
    lines.append(f"forward {common.forward_macs(rows[0].model) / 1e9:.4g} GMACs/image")
    if args.compile_only:
        limit = common.device_limit_gib()
        if limit:
            lines.append(f"device memory limit (allocator): {limit:.2f} GiB")
        print(common.header("Train step: compile time and memory", lines) + "\n")
        print(compile_report(rows))
        return
    if args.torch:
        rows += torch_rows(config, args.torch_kinds.split(","), args.torch.split(","))
    size = default_size() if args.ceiling is None else args.ceiling
    ceiling = matmul_tflops(size, config.model.dtype) if size else None
    times = common.time_interleaved(
        {i: row.run for i, row in enumerate(rows)}, args.rounds, args.steps
    )
    if ceiling:
        lines.append(f"MFU ceiling: {size}^3 {config.model.dtype} matmul, {ceiling:.2f} TFLOP/s")
    lines.append(
        f"{args.rounds} rounds x {args.steps} steps, interleaved; memory: "
        "XLA's step footprint (JAX), peak allocated (torch, GPU)"
    )
    peak = common.device_peak_gib()
    if peak is not None:
        lines.append(f"device peak over the whole run (all rows together): {peak:.2f} GiB")
    print(common.header("Train step", lines) + "\n")
    print(report(rows, times, ceiling))


if __name__ == "__main__":
    common.run_main(main)
