"""Sample quality against model calls, per sampler: the table a user picks a sampler by.

  python -m benchmarks.sampler_quality --ddpm-workdir workdirs/digits \\
      --flow-workdir workdirs/digits_flow --out benchmarks/results/sampler_quality.md

A workdir without a checkpoint is trained first (configs/digits.py, configs/digits_flow.py:
about 3 minutes each on 2 CPU cores). Then every sampler of each model's objective draws
`--num-samples` EMA samples at each budget of model calls per image (`--calls`; Heun makes
two per step, so it runs calls // 2 steps), at the configs' guidance (2), and `--mode
evaluate`'s digits evaluator scores them: `digits_accuracy` (the share the digits
classifier assigns to the class asked for; higher is better) and `digits_fd` (Fréchet
distance to the held-out real digits in its feature space; lower is better; the real
training digits score 13). The adaptive `dopri5` chooses its own steps: its rows are per
`--rtols` (atol 1e-6, SiT's), with the calls it made (mean over the batches). The samples
and results stay in each workdir (samples/, eval/), so a rerun only reads them back.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from dtr_jax import checkpoint, evaluate, inference, sample, sharding
from dtr_jax.config import load_config

CONFIGS = {"ddpm": "configs/digits.py", "flow": "configs/digits_flow.py"}
FIXED = {"ddpm": ("ddpm", "ddim", "dpmpp_2m"), "flow": ("euler", "heun", "euler_maruyama")}


def trained(objective: str, workdir: str):
    """The config of `objective`'s digits model, trained into `workdir` if it has no
    checkpoint yet."""
    config = load_config(CONFIGS[objective])
    if not checkpoint.checkpoint_dir(workdir).is_dir():
        from dtr_jax import train  # only when a model must be trained

        train.train_and_evaluate(config, workdir)
    return config


def steps_for(sampler: str, calls: int) -> int:
    return calls // 2 if sampler == "heun" else calls


def scored(config, workdir: str, **sample_fields) -> dict:
    """--mode evaluate's digits metrics of the config's samples with `sample_fields` set."""
    config = config.copy_and_resolve_references()
    for name, value in sample_fields.items():
        config.sample[name] = value
    config.sample.num_samples = config.eval.num_samples
    config.eval.metrics = "digits"
    metrics = evaluate.evaluate_mode(config, workdir)
    return {k: float(metrics[k]) for k in ("digits_accuracy", "digits_fd")}


def mean_calls(config, workdir: str) -> float:
    """The model calls per image the config's (adaptive) sampler made, averaged over the
    batches --mode evaluate draws (the same labels and rngs)."""
    s = config.sample
    mesh = sharding.make_mesh(config.mesh)
    dm, params, _ = inference.restore_params(config, workdir, mesh, use_ema=s.use_ema)
    run = jax.jit(inference.sample_fn(dm, s, count_calls=True))
    labels = sample.labels_for(s, dm.model.num_classes, config.eval.num_samples)
    calls = []
    with sharding.mesh_context(mesh):
        for i, y in enumerate(sample.batches(labels, s.batch_size)):
            rng = jax.random.fold_in(jax.random.key(s.seed), i)
            calls.append(int(run(params, jnp.asarray(y), dm.tables, rng)[1]))
    return float(np.mean(calls))


def measure(objective: str, workdir: str, budgets, rtols, num_samples: int) -> dict:
    config = trained(objective, workdir)
    config.eval.num_samples = num_samples
    rows = {}
    for name in FIXED[objective]:
        for calls in budgets:
            steps = steps_for(name, calls)
            result = scored(config, workdir, sampler=name, num_steps=steps)
            rows[f"{name}/{calls}"] = result | {"calls": 2 * steps if name == "heun" else steps}
    if objective == "flow":
        for rtol in rtols:
            fields = dict(sampler="dopri5", num_steps=10_000, rtol=rtol, atol=1e-6)
            result = scored(config, workdir, **fields)
            adaptive = config.copy_and_resolve_references()
            for name, value in fields.items():
                adaptive.sample[name] = value
            rows[f"dopri5/{rtol:g}"] = result | {"calls": mean_calls(adaptive, workdir)}
    return rows


def scores(result: dict) -> str:
    return f"{result['digits_accuracy']:.3f} / {result['digits_fd']:.1f}"


def cell(result: dict, calls: int) -> str:
    """The scores, and the calls made where they are not the column's."""
    text = scores(result)
    return text if result["calls"] == calls else f"{text} ({result['calls']:g} calls)"


def report(results: dict, budgets, rtols) -> str:
    head = ["model", "sampler"] + [f"{c} calls" for c in budgets]
    rows = []
    for objective, measured in results.items():
        for name in FIXED[objective]:
            cells = [cell(measured[f"{name}/{c}"], c) for c in budgets]
            rows.append([f"{objective} ({CONFIGS[objective]})", name, *cells])
    out = common.table(head, rows)
    if "flow" in results:
        measured = [results["flow"][f"dopri5/{r:g}"] for r in rtols]
        adaptive = [
            [f"{r:g}", f"{m['calls']:.1f}", scores(m)] for r, m in zip(rtols, measured, strict=True)
        ]
        out += "\n\ndopri5 (flow model, atol 1e-6):\n\n"
        out += common.table(["rtol", "model calls (mean)", "accuracy / FD"], adaptive)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ddpm-workdir", default="workdirs/digits")
    parser.add_argument("--flow-workdir", default="workdirs/digits_flow")
    parser.add_argument("--calls", default="10,25,50,100", help="model calls per image")
    parser.add_argument("--rtols", default="1e-1,1e-2,1e-3", help="dopri5's relative tolerances")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--out", default="", help="also write the table (and .json) here")
    args = parser.parse_args(argv)
    budgets = [int(c) for c in args.calls.split(",")]
    rtols = [float(r) for r in args.rtols.split(",")]
    results = {
        objective: measure(objective, workdir, budgets, rtols, args.num_samples)
        for objective, workdir in (("ddpm", args.ddpm_workdir), ("flow", args.flow_workdir))
    }
    lines = [
        f"{args.num_samples} EMA samples per cell, guidance 2; cells: digits accuracy / FD",
        "(Heun: two calls per step; a cell made with another number of calls says so)",
    ]
    text = common.header("Sample quality against model calls (digits)", lines) + "\n\n"
    text += report(results, budgets, rtols)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    common.run_main(main)
