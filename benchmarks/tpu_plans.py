"""TPU plans of the paper configs: `--mode plan`'s figures for each config x slice x
routing x mesh, compiled for the TPU without one (needs libtpu, no TPU).

  python -m benchmarks.tpu_plans                       # every row of BENCHMARKS.md's table
  python -m benchmarks.tpu_plans --configs dit_xl --topologies v5e-8 --kinds dtr,none \\
      --set model.remat_policy=nothing_saveable --programs train
  python -m benchmarks.tpu_plans --table               # the table of the rows done so far

Each row compiles what `--mode plan` compiles (`dtr_jax.plan`: the train step with the
trip of a scanned model counted, the sampler) and is appended to `--out` (JSON lines) as
soon as it is done; what a row already has (its train step, sampler, largest batch) is
not compiled again (unless `--redo`), so an interrupted run continues and a later
`--programs sample` adds the samplers to rows planned for `train`; the table merges a
row's parts, a figure a later compile left out (nan) kept from the earlier.
`--largest` adds the largest global batch that fits (the config's own remat policy and
scan setting; dtr rows). Compiles run one at a time: DiT-XL/2 takes
minutes on a 2-core machine. Nothing here runs a step: every figure is compiled, not run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

from benchmarks import common
from dtr_jax import config as config_lib

CONFIGS = ("dit_s", "dit_b", "dit_l", "dit_xl", "ffhq_dit_b")
TOPOLOGIES = ("v4-8", "v5e-8", "v5p-8", "v6e-8", "v5e-32")
# (mesh.data, mesh.fsdp): all chips on one axis; "config": the config's own mesh
MESHES = {"data": (-1, 1), "fsdp": (1, -1)}
DEFAULT_OUT = "benchmarks/results/tpu_plans.jsonl"


def row_key(config: str, topology: str, kind: str, mesh: str, overrides: dict) -> str:
    extra = ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    return f"{config}|{topology}|{kind}|{mesh}|{extra}"


def plan_row(config_name, topology, kind, mesh_name, overrides, programs, largest, count) -> dict:
    """One row: the figures of each program (and the largest batch), as JSON types."""
    from dtr_jax import plan, sharding  # jax starts here, after the flags are read

    fields = {"model.routing.kind": kind, "plan.topology": topology}
    if mesh_name != "config":
        fields["mesh.data"], fields["mesh.fsdp"] = MESHES[mesh_name]
    config = configured(f"configs/{config_name}.py", overrides, fields)
    target = plan.target(topology)
    config_lib.validate(config, target.chips, mode="plan")
    config = plan.planned_config(config, target)
    mesh = sharding.make_mesh(config.mesh, target.devices)
    start = time.perf_counter()
    figures = []  # the sampler's FLOPs are not in the table: its scanned blocks uncounted
    if "train" in programs:
        figures.append(plan.train_step(config, mesh, target.compile_only, count))
    if "sample" in programs:
        figures.append(plan.sampler(config, mesh, target.compile_only, count=False))
    row = dict(
        key=row_key(config_name, topology, kind, mesh_name, overrides),
        config=config_name,
        topology=topology,
        kind=kind,
        mesh=f"{mesh.shape['data']}x{mesh.shape['fsdp']}",
        overrides=overrides,
        model=config.model.name,
        batch=config.global_batch_size,
        steps=config.num_train_steps,
        chips=target.chips,
        chip=target.chip.generation,
        scan_blocks=config.model.scan_blocks,
        remat_policy=config.model.remat_policy,
        programs=[dict(vars(f)) for f in figures],
    )
    if largest:
        best = plan.largest(config, mesh, target)
        row["largest"] = dict(batch=best.batch, compiles=best.compiles)
    row["seconds"] = time.perf_counter() - start
    return row


def configured(path: str, overrides: dict[str, str], fields: dict):
    """The config file's config with `--set` overrides (typed like their fields) and
    `fields`; `model.dtype='auto'` stays: the plan resolves it for the TPU (bfloat16)."""
    base = config_lib.load_config(path)
    typed = {}
    for name, text in overrides.items():
        node = base
        for part in name.split("."):
            node = node[part]
        typed[name] = common.parse_value(text, node)
    return config_lib.load_config(path, **typed | fields)


PARTS = {"train step": "train", "sampler": "sample"}  # a program's name: its `--programs` name


def row_parts(row: dict) -> set[str]:
    """What a row holds: 'train', 'sample' and 'largest'."""
    parts = {PARTS[p["program"]] for p in row["programs"]}
    return parts | ({"largest"} if "largest" in row else set())


def done_parts(path: str) -> dict[str, set[str]]:
    done: dict[str, set[str]] = {}
    if os.path.exists(path):
        for row in read_rows(path):
            done.setdefault(row["key"], set()).update(row_parts(row))
    return done


def run(args) -> None:
    overrides = common.parse_assignments(args.set)
    done = done_parts(args.out)
    programs = [p.strip() for p in args.programs.split(",") if p.strip()]
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for config in args.configs.split(","):
        for topology in args.topologies.split(","):
            for kind in args.kinds.split(","):
                for mesh in args.meshes.split(","):
                    key = row_key(config, topology, kind, mesh, overrides)
                    have = done.get(key, set())
                    todo = [p for p in programs if args.redo or p not in have]
                    largest = args.largest and kind == "dtr" and "largest" not in have
                    if not todo and not largest:
                        continue
                    row = plan_row(
                        config, topology, kind, mesh, overrides, todo, largest, not args.no_count,
                    )  # fmt: skip
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(summary(row), flush=True)


def summary(row: dict) -> str:
    parts = [row["key"]]
    for p in row["programs"]:
        parts.append(
            f"{p['program']}: fits {p['fits']}, "
            f"{_gib(plan_figures(p))} GiB, "
            f"{p['flops'] / 1e12:.3f} TFLOP, {p['bytes_accessed'] / 1e9:.2f} GB, "
            f"{p['compile_seconds']:.0f} s"
        )
    return "; ".join(parts)


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def merged_rows(path: str) -> list[dict]:
    """The rows of `path`, one per key: the parts of a key's rows together (a later
    figure of the same program replaces an earlier one), in the order keys first appear."""
    rows: dict[str, dict] = {}
    for row in read_rows(path):
        if row["key"] not in rows:
            rows[row["key"]] = row
            continue
        into = rows[row["key"]]
        earlier = {p["program"]: p for p in into["programs"]}
        for p in row["programs"]:  # a figure a later compile left out (nan) stays
            kept = earlier.get(p["program"], {})
            earlier[p["program"]] = kept | {k: v for k, v in p.items() if v == v}
        into["programs"] = list(earlier.values())
        into.update({k: row[k] for k in ("largest",) if k in row})
        into["seconds"] += row["seconds"]
    return list(rows.values())


def plan_figures(program: dict):
    from dtr_jax import plan

    return plan.Figures(**program)


def _figures(row: dict) -> dict:
    return {p["program"]: plan_figures(p) for p in row["programs"]}


def _gib(f) -> str:
    """The compiler's peak per chip; `*`: a row planned before the peak was recorded,
    the parts' sum (an upper bound)."""
    if f is None or not f.fits:
        return "-" if f is None else "**no**"
    return f"{f.memory / 2**30:.2f}" + ("" if f.peak > 0 else "*")


def table(path: str) -> str:
    """BENCHMARKS.md's "TPU plans" tables from the rows in `path`: the configs as shipped
    (dtr, the config's mesh), the DTR / none ratios, then the other routings and meshes."""
    rows = merged_rows(path)
    main = [r for r in rows if r["kind"] == "dtr" and r["key"].split("|")[3] == "config"]
    rest = [
        r
        for r in rows
        if r not in main and r["kind"] != "none" or r["key"].split("|")[3] != "config"
    ]
    return "\n\n".join([main_table(main), ratio_table(rows), check_table(rest)])


def main_table(rows: list[dict]) -> str:
    from dtr_jax import tpu

    columns = [
        "config", "slice", "mesh", "train GiB / chip (HBM)", "fits", "largest batch",
        "TFLOP / chip / step", "GB / chip / step", "bound ms (by)", "bound images/s",
        "chip-hours, 400K steps", "compile s", "sampler GiB / chip",
    ]  # fmt: skip
    out = []
    for r in rows:
        chip = tpu.parse_slice(r["topology"]).chip
        train, smp = _figures(r).get("train step"), _figures(r).get("sampler")
        if train is None or not train.fits:
            none = [r["config"], r["topology"], r["mesh"], f"> {chip.hbm_gib:g}", "**no**"]
            out.append([*none, *"-------", _gib(smp)])
            continue
        t = train.bound_seconds(chip)
        hours = r["steps"] * t * r["chips"] / 3600
        out.append([
            r["config"], r["topology"], r["mesh"], f"{_gib(train)} ({chip.hbm_gib:g})",
            "yes", r.get("largest", {}).get("batch", "-"), common.fmt(train.flops / 1e12, 2),
            common.fmt(train.bytes_accessed / 1e9, 1),
            f"{common.fmt(t * 1e3, 1)} ({train.bound_by(chip)})", common.fmt(r["batch"] / t, 0),
            f"{hours:,.0f}", common.fmt(train.compile_seconds, 0), _gib(smp),
        ])  # fmt: skip
    return common.table(columns, out)


def ratio_table(rows: list[dict]) -> str:
    """DTR / none in compiled FLOPs and bytes of the train step, where both were counted."""
    by_key = {
        (r["config"], r["topology"], r["kind"]): r
        for r in rows
        if r["key"].split("|")[3] == "config"
    }
    out = []
    for (config, topology, kind), r in by_key.items():
        none = by_key.get((config, topology, "none"))
        if kind != "dtr" or none is None:
            continue
        d, n = _figures(r).get("train step"), _figures(none).get("train step")
        if d is None or n is None or not (d.fits and n.fits) or d.flops != d.flops:
            continue
        rand = by_key.get((config, topology, "random"))
        rand = None if rand is None else _figures(rand).get("train step")
        rand_bytes = "-" if rand is None else common.fmt(rand.bytes_accessed / n.bytes_accessed, 4)
        out.append([
            config, topology, r["mesh"], common.fmt(d.flops / n.flops, 4),
            common.fmt(d.bytes_accessed / n.bytes_accessed, 4), rand_bytes,
            f"{_gib(d)} / {_gib(n)}",
        ])  # fmt: skip
    columns = [
        "config",
        "slice",
        "mesh",
        "DTR / none FLOPs",
        "DTR / none bytes",
        "random / none bytes",
        "GiB / chip dtr / none",
    ]
    return common.table(columns, out)


def check_table(rows: list[dict]) -> str:
    columns = [
        "config",
        "slice",
        "routing",
        "mesh",
        "train GiB / chip",
        "sampler GiB / chip",
        "train compile s",
    ]
    out = []
    for r in rows:
        train, smp = _figures(r).get("train step"), _figures(r).get("sampler")
        seconds = "-" if train is None or not train.fits else common.fmt(train.compile_seconds, 0)
        out.append(
            [r["config"], r["topology"], r["kind"], r["mesh"], _gib(train), _gib(smp), seconds]
        )
    return common.table(columns, out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
    parser.add_argument("--kinds", default="dtr")
    parser.add_argument("--meshes", default="config", help="config, data, fsdp")
    parser.add_argument("--programs", default="train,sample", help="train, sample or both")
    parser.add_argument("--set", action="append", default=[], help="field=value override")
    parser.add_argument("--largest", action="store_true", help="find the largest batch too")
    parser.add_argument(
        "--no-count",
        action="store_true",
        help="leave a scanned model's FLOPs and bytes uncounted (two compiles fewer): rows "
        "that check memory and fit",
    )
    parser.add_argument(
        "--redo",
        action="store_true",
        help="compile the programs again where a row has them: with --no-count, a row "
        "planned before the compiler's peak memory was recorded gains it, its counted "
        "FLOPs and bytes kept",
    )
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--table", action="store_true", help="print the table of --out")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(table(args.out))
    else:
        run(args)


if __name__ == "__main__":
    common.run_main(main)
