"""Sampling speed: 250-step DDPM (or any `sample.sampler` of the config's objective) with
classifier-free guidance, images/s, routing kinds and samplers side by side, optionally
against the PyTorch DDPM sampler of the same model.

  python -m benchmarks.sample --config configs/digits.py --batch 64
  python -m benchmarks.sample --config configs/digits.py --samplers ddpm,ddim,dpmpp_2m \\
      --num-steps 25
  python -m benchmarks.sample --config configs/digits_flow.py --samplers euler,heun \\
      --num-steps 25
  python -m benchmarks.sample --config configs/dit_xl.py --batch 64 --set model.dtype=bfloat16 \\
      --torch compiled

Each row is `dtr_jax.sample.Sampler`, the sampler `--mode sample` runs: the sampler's
loop under one jit over the mesh, guidance in one doubled batch, the images gathered to
the host at the end. Params are a fresh init: the compute of a fixed-step sampler does
not depend on the values (the adaptive `dopri5`'s does: it is not benchmarked here; the
quality table of benchmarks/sampler_quality.py counts its calls). A call is one batch
through every step; calls are timed in interleaved rounds (medians). `ms/step` is per
step (Heun's has two model calls); `model calls` is per image; `model TFLOP/s` counts
the forward passes (2 FLOPs per MAC; guidance doubles the batch); `compile s` is the
first call's time less a timed call's.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import numpy as np

from benchmarks import common
from benchmarks.matmul import default_size, matmul_tflops
from benchmarks.train_step import Row, row_of, variant_text
from dtr_jax import inference, sharding
from dtr_jax import sample as sample_lib
from dtr_jax.config import validate
from dtr_jax.diffusion import samplers


class JaxSampler:
    """One row's compiled sampler, params and labels; `run(calls)` -> seconds per call."""

    def __init__(self, config, mesh_shape: tuple[int, int], batch: int):
        data, fsdp = mesh_shape
        config.mesh.data, config.mesh.fsdp = data, fsdp
        devices = jax.devices()[: data * fsdp]
        validate(config, len(devices), mode="sample")
        self.dm = inference.from_config(config)
        mesh = sharding.make_mesh(config.mesh, devices)
        _, shardings = self.dm.param_layout(mesh)
        init = jax.jit(lambda rng: nn.unbox(self.dm.init_params(rng)), out_shardings=shardings)
        with sharding.mesh_context(mesh):
            self.params = init(jax.random.key(0))
            sampler = sample_lib.Sampler(self.dm, config.sample, mesh, self.params)
            labels = np.arange(batch, dtype=np.int32) % self.dm.model.num_classes
            self.labels, self.tables = sampler.global_labels(labels), sampler.tables
            self.compiled, self.compile_seconds = common.timed(
                lambda: sampler.lower(self.params, self.labels, jax.random.key(0)).compile()
            )
        self.memory_mib = common.step_memory_mib(self.compiled)
        self.calls = 0

    def run(self, calls: int) -> float:
        """Samples `calls` batches (fresh noise each), waiting after the last; s per call."""

        def loop():
            out = []
            for _ in range(calls):
                self.calls += 1
                rng = jax.random.key(self.calls)
                out.append(self.compiled(self.params, self.labels, self.tables, rng))
            return out

        return common.timed(loop)[1] / calls


def no_loss() -> float:
    return float("nan")


def model_calls(config) -> int:
    """Model calls per image of the config's sampler."""
    return samplers.SAMPLERS.get(config.sample.sampler).calls(config.sample)


def forward_passes(config, batch: int) -> int:
    """Images through the model per call: model calls x batch, x2 with guidance."""
    guided = config.sample.cfg_scale != 1.0 and config.model.num_classes > 1
    return model_calls(config) * batch * (2 if guided else 1)


def jax_row(config, kind: str, mesh, variant: dict, batch: int) -> Row:
    config = config.copy_and_resolve_references()
    config.model.routing.kind = kind
    s = JaxSampler(config, mesh, batch)
    s.run(1)  # warm-up
    return row_of(
        "jax",
        s,
        kind=kind,
        config=config,
        model=s.dm.model,
        mesh=mesh,
        variant=variant,
        memory_mib=s.memory_mib,
        last_loss=no_loss,
    )


def torch_rows(config, kinds: list[str], modes: list[str], batch: int) -> list[Row]:
    """PyTorch samplers of the same model, steps and guidance, one per mode and kind."""
    from benchmarks import torch_counterpart  # only when asked: torch is optional

    model = inference.from_config(config).model
    rows = []
    for mode in modes:
        for kind in kinds:
            r = torch_counterpart.SampleRunner(
                config, kind, compiled=mode == "compiled", batch=batch
            )
            rows.append(
                row_of(
                    f"torch {mode}",
                    r,
                    kind=kind,
                    config=config,
                    model=model,
                    memory_mib=r.memory_mib,
                    last_loss=no_loss,
                )  # fmt: skip
            )
    return rows


def report(rows: list[Row], times: dict, ceiling: float | None, batch: int) -> str:
    """The table of timed sampler rows (`batch` images per call) and the sampling goal."""
    columns = [
        "framework", "variant", "mesh (data x fsdp)", "routing", "images/call", "steps",
        "guidance", "dtype", "s/call (median)", "ms/step", "images/s", "images/s/device",
        "model TFLOP/s", "MFU", "memory MiB", "compile s", "sampler", "model calls",
    ]  # fmt: skip
    out, goals = [], []
    for i, row in enumerate(rows):
        s, med = row.config.sample, common.median(times[i])
        b = batch
        flops = 2.0 * common.forward_macs(row.model) * forward_passes(row.config, b) / med
        mfu = None if not ceiling else flops / (ceiling * 1e12 * row.devices)
        out.append((
            row.framework, variant_text(row.variant), f"{row.mesh[0]}x{row.mesh[1]}", row.kind,
            b, s.num_steps, s.cfg_scale, row.config.model.dtype, common.fmt(med, 3),
            common.fmt(med / s.num_steps * 1e3, 2), common.fmt(b / med, 2),
            common.fmt(b / med / row.devices, 2), common.fmt(flops / 1e12, 3),
            "-" if mfu is None else f"{100 * mfu:.1f}%", common.fmt(row.memory_mib),
            common.fmt(row.compile_seconds), s.sampler, model_calls(row.config),
        ))  # fmt: skip
        if row.framework.startswith("torch") and row.kind == "dtr" and common.accelerator():
            for j, other in enumerate(rows):
                if other.framework == "jax" and other.kind == "dtr":
                    mine = b / common.median(times[j]) / other.devices
                    ratio = mine / (b / med)
                    goals.append(
                        f"- JAX ({variant_text(other.variant)}, mesh {other.mesh[0]}x"
                        f"{other.mesh[1]}, per device) / {row.framework} sampler images/s: "
                        f"{ratio:.2f}x (goal >= {common.SAMPLE_SPEEDUP}: "
                        f"{common.verdict(ratio >= common.SAMPLE_SPEEDUP)})"
                    )
    return common.table(columns, out) + ("\n\n" + "\n".join(goals) if goals else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_row_options(parser, kinds="none,dtr", meshes_example="8x1,4x2")
    parser.add_argument("--batch", type=int, default=8, help="images per call (global)")
    parser.add_argument("--num-steps", type=int, default=250)
    parser.add_argument(
        "--samplers",
        default="ddpm",
        help="rows per sample.sampler of the config's objective (e.g. ddpm,ddim,dpmpp_2m or "
        "euler,heun,euler_maruyama); PyTorch rows are the ddpm sampler's",
    )
    parser.add_argument("--cfg-scale", type=float, default=None, help="default: the config's")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.torch:
        common.share_device_with_torch()
    overrides = common.parse_assignments(args.set)
    overrides |= {"sample.num_steps": str(args.num_steps)}
    if args.cfg_scale is not None:
        overrides["sample.cfg_scale"] = str(args.cfg_scale)
    names = args.samplers.split(",")
    if "dopri5" in names:
        parser.error("dopri5 is adaptive: its cost depends on trained params, not a fresh init")
    rows = []
    for mesh in common.parse_meshes(args.meshes, jax.device_count()):
        for variant in common.variants(args.vary):
            for name in names:
                config = common.config_with(
                    args.config, overrides | variant | {"sample.sampler": name}
                )
                kinds = args.kinds.split(",")
                rows += [jax_row(config, k, mesh, variant, args.batch) for k in kinds]
    config = common.config_with(args.config, overrides)
    if args.torch:
        if config.diffusion.objective != "ddpm":
            parser.error("the PyTorch rows are the ddpm sampler's: use a ddpm config")
        ddpm = common.config_with(args.config, overrides | {"sample.sampler": "ddpm"})
        rows += torch_rows(ddpm, args.torch_kinds.split(","), args.torch.split(","), args.batch)
    size = default_size() if args.ceiling is None else args.ceiling
    ceiling = matmul_tflops(size, config.model.dtype) if size else None
    times = common.time_interleaved({i: r.run for i, r in enumerate(rows)}, args.rounds, 1)
    lines = [f"config {args.config}; {variant_text(common.parse_assignments(args.set))}"]
    if ceiling:
        lines.append(f"MFU ceiling: {size}^3 {config.model.dtype} matmul, {ceiling:.2f} TFLOP/s")
    lines.append(f"{args.rounds} rounds of 1 call, interleaved")
    peak = common.device_peak_gib()
    if peak is not None:
        lines.append(f"device peak over the whole run (all rows together): {peak:.2f} GiB")
    print(common.header("Sampling", lines) + "\n")
    print(report(rows, times, ceiling, args.batch))


if __name__ == "__main__":
    common.run_main(main)
