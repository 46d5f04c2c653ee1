"""Train-step speed with routing none / dtr / random, measured side by side.

  python benchmarks/train_step.py --config configs/digits.py
  python benchmarks/train_step.py --config configs/dit_b.py --batch 32 --set model.dtype=bfloat16

Runs the real jitted, sharded train step (dtr_jax.step) on a fixed synthetic batch
over all local devices. The routing kinds are timed in interleaved rounds, so any
background load falls on all of them alike, and each is reported as the median
ms/step with its ratio to `none`, next to the XLA scratch memory of the compiled step
(activations and gradients in flight; params and optimizer state are the same for all
kinds, since routing adds no parameters). Also prints the analytic forward cost (multiply-adds
per image, SPEC §3) and the model FLOP/s achieved (a train step ~ 3x the forward).
Imports jax, flax, optax, orbax-checkpoint and ml_collections through dtr_jax.step;
no TensorFlow, clu or grain (tests/test_layers.py checks the step's imports).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from typing import Any

import jax
import numpy as np

from dtr_jax import sharding
from dtr_jax import step as step_lib
from dtr_jax.config import load_config
from dtr_jax.models import DiT


def forward_macs(model) -> float:
    """Multiply-adds of one forward pass per image (attention included, norms excluded)."""
    d, p, depth = model.hidden_size, model.patch_size, model.depth
    n = (model.input_size // p) ** 2
    per_token = 12 * d * d + 2 * n * d  # qkv + proj + MLP (ratio 4), then QK^T and AV
    blocks = depth * (n * per_token + 6 * d * d)  # + adaLN per image
    embed = n * p * p * model.in_channels * d + 256 * d + d * d
    final = 2 * d * d + n * d * p * p * model.out_channels
    return float(blocks + embed + final)


@dataclasses.dataclass
class Runner:
    """One routing kind's compiled step and the state it advances."""

    step: Any  # the compiled step: (state, batch, tables) -> (state, metrics)
    state: step_lib.TrainState
    batch: dict
    tables: jax.Array | None
    model: DiT
    compile_seconds: float

    def run(self, steps: int) -> float:
        """Runs `steps` steps; returns seconds per step (waiting for the last)."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch, self.tables)
        jax.block_until_ready(metrics)
        return (time.perf_counter() - start) / steps


def make_runner(config, kind: str) -> Runner:
    config = config.copy_and_resolve_references()
    config.model.routing.kind = kind
    setup = step_lib.create_setup(config)
    mesh = sharding.make_mesh(config.mesh)
    _, shardings = step_lib.state_layout(setup, mesh)
    state = step_lib.create_state(setup, mesh, shardings)
    m, b = setup.dm.model, config.global_batch_size
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((b, m.input_size, m.input_size, m.in_channels), np.float32),
        "label": rng.integers(0, m.num_classes, b).astype(np.int32),
    }
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    tables = setup.dm.tables
    tables = None if tables is None else jax.device_put(tables, sharding.replicated(mesh))
    start = time.perf_counter()
    compiled = step_lib.jit_train_step(setup, mesh, shardings).lower(state, batch, tables).compile()
    return Runner(compiled, state, batch, tables, m, time.perf_counter() - start)


def scratch_mib(step) -> float:
    """XLA's temporary buffers for one step (activations, gradients in flight), in MiB."""
    analysis = step.memory_analysis()
    return float("nan") if analysis is None else analysis.temp_size_in_bytes / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/digits.py")
    parser.add_argument("--batch", type=int, default=None, help="global batch size")
    parser.add_argument("--kinds", default="none,dtr,random")
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], help="field=value override")
    args = parser.parse_args()
    overrides = {"mesh.data": -1, "mesh.fsdp": 1}
    for item in args.set:
        field, value = item.split("=", 1)
        overrides[field] = type(load_config(args.config)[field])(value) if value != "" else value
    if args.batch:
        overrides["global_batch_size"] = args.batch
    config = load_config(args.config, **overrides)
    kinds = args.kinds.split(",")

    runners = {kind: make_runner(config, kind) for kind in kinds}
    for runner in runners.values():
        runner.run(1)  # warm-up step
    times = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            times[kind].append(runners[kind].run(args.steps))

    model = runners[kinds[0]].model
    macs = forward_macs(model)
    b = config.global_batch_size
    host = platform.processor() or platform.machine()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({host})")
    print(
        f"jax {jax.__version__}; config {args.config}; model depth {model.depth}, hidden "
        f"{model.hidden_size}, patch {model.patch_size}, {model.input_size}x{model.input_size}"
        f"x{model.in_channels}; batch {b}; dtype {config.model.dtype}"
    )
    print(f"forward: {macs / 1e9:.3f} GMACs/image; train step ~ {6 * macs * b / 1e9:.1f} GFLOP")
    print(f"{args.rounds} rounds x {args.steps} steps, interleaved\n")
    print(
        "| routing | ms/step (median) | min | vs none | images/s | model TFLOP/s "
        "| XLA scratch MiB | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    base = statistics.median(times[kinds[0]])
    for kind in kinds:
        med = statistics.median(times[kind])
        flops = 6 * macs * b / med
        print(
            f"| {kind} | {med * 1e3:.1f} | {min(times[kind]) * 1e3:.1f} | {med / base:.3f} | "
            f"{b / med:.0f} | {flops / 1e12:.3f} | {scratch_mib(runners[kind].step):.1f} "
            f"| {runners[kind].compile_seconds:.1f} |"
        )


if __name__ == "__main__":
    main()
