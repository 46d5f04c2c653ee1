"""Where a train step's time goes, by operation class, JAX against the PyTorch counterpart.

  python -m benchmarks.profile_step --config configs/digits.py --batch 64
  python -m benchmarks.profile_step --config configs/dit_s.py --batch 8 --steps 2

Profiles the real jitted train step (`dtr_jax.step`, as `train_step` times it) under
`jax.profiler.trace` and the PyTorch counterpart (`torch_counterpart.TrainRunner`, eager)
under `torch.profiler`, and prints one table: ms per step and % of the step by class,
side by side. Both sides are attributed by wall time, so each column sums to the
profiled step: every instant of the traced steps goes to the op(s) running then, split
equally where several run at once (XLA runs independent thunks on its 2 worker threads
in parallel); an instant where no op runs (XLA's thunk executor between thunks, PyTorch's
Python and dispatch between ops) is "other". The untraced step time of the same run is
printed under the table, to show what tracing adds, with the model's matmul and
attention GFLOP per step (forward + backward, as `common.train_flops` counts them) and
the rate each framework ran them at in the profile.

How an op gets its class, both frameworks:

- matmuls: dots and convolutions (XLA `dot`/`convolution` instructions, fusions holding
  one, YNNPACK `ynn_fusion`s holding one; aten mm/addmm/linear/convolution), forward and
  backward, except those of attention's core below. A fusion holding a dot is the dot's.
- attention: the core of attention, softmax(QK^T/sqrt(d)) V and its backward: XLA's
  batched dots, softmax, scale and pads/adds under the `Attention` module (the qkv and
  proj Dense are matmuls); aten scaled_dot_product_attention and what runs inside it
  (the flash kernel, its backward), bmm, softmax.
- layer norm + modulation: LayerNorm (flax `_normalize`/`_compute_stats`; aten
  native_layer_norm(+backward)) and adaLN's shift/scale (`modulate`) and gate multiply.
- GELU: ops of a source line that applies gelu (aten gelu, gelu_backward).
- routing: the mask gather and the multiply by the routing mask (`x * mask` in
  `routing.route`; the release's `x * m`, `x * (1 - m)` and `+ x * (1 - m)` in torch).
- optimizer / EMA update: optax (AdamW, global norm of the gradients) and `ema_update`;
  torch's `Optimizer.step`/`zero_grad` and the EMA's `_foreach_lerp_`.
- loss: the diffusion loss around the model (q_sample, the MSE, the VB term: posterior,
  KL, discretized likelihood; the weighting), forward and backward.
- transposes / copies: XLA `copy`/`transpose` instructions (standalone or inside a
  fusion, by their share of its elements); aten copy_/clone/contiguous outside the
  kernels above.
- other: everything else (residual adds, embedders, SiLU of the condition, the RNG of
  noise/timesteps/label dropout, unpatchify, torch's gradient accumulation) and the
  instants where no op runs.

XLA's ops are named in the trace by their HLO instruction (a thunk). A thunk that
completes asynchronously (Eigen's dots, fusions split over the thread pool) runs from
its event's start to its `end: <name>` event, on whatever threads the pool gives it:
that whole span is the thunk's. Each thunk is looked up in the
compiled step's optimized HLO (`compiled.as_text()`): opcode, fused computation, and the
source location and Python call stack its metadata carries (the backward keeps the
forward's). A fusion without a dot splits its time among the classes of its instructions
in proportion to their output elements (free ops, e.g. bitcast, broadcast, reshape,
parameter, count nothing). An aten op gets the class of its own name, else of the aten
ops around it, else of the Python frames that called it (for a backward op, those of
the forward op of the same autograd sequence number); the Python frames come from a
separate profile of one step `with_stack=True` (the Python tracer's cost would fall into
the timed profile otherwise), matched op by op.
"""

from __future__ import annotations

import argparse
import collections
import glob
import linecache
import os
import re
import tempfile
import time

import jax

from benchmarks import common, train_step
from dtr_jax import inference, models

CLASSES = (
    "matmuls",
    "attention",
    "layer norm + modulation",
    "GELU",
    "routing",
    "optimizer / EMA update",
    "loss",
    "transposes / copies",
    "other",
)
IDLE = "no op running"  # folded into "other" in the table, shown on its own line

LOSS_FUNCTIONS = {
    "training_losses", "vb_terms_bpd", "normal_kl", "discretized_gaussian_log_likelihood",
    "approx_standard_normal_cdf", "mean_flat", "q_sample", "q_posterior_mean_variance",
    "p_mean_variance", "_predict_xstart_from_eps", "_split", "combine", "cluster_sums",
    "cluster_index", "_extract", "hybrid_loss", "posterior", "p_mean_log_variance",
    "_discretized_gaussian_log_likelihood", "cdf", "_loss", "at",
}  # fmt: skip
OPTIMIZER_FUNCTIONS = {"ema_update", "apply_updates", "global_norm"}
FREE_OPCODES = {
    "parameter", "constant", "bitcast", "broadcast", "reshape", "tuple", "get-tuple-element",
    "iota", "bitcast-convert",
}  # fmt: skip
MOVE_OPCODES = {"copy", "transpose"}
DOT_OPCODES = {"dot", "convolution"}


# --- shared: wall-time attribution over a timeline ------------------------------------------


def innermost_segments(events):
    """[(start, end, key)] of one thread's properly nested events -> the disjoint
    segments where each is the innermost running one."""
    out, stack = [], []  # stack of (end, key)
    cursor = None
    for start, end, key in sorted(events, key=lambda e: (e[0], -e[1])):
        while stack and stack[-1][0] <= start:
            top_end, top_key = stack.pop()
            if cursor < top_end:
                out.append((cursor, top_end, top_key))
            cursor = max(cursor, top_end)
        if stack and cursor < start:
            out.append((cursor, start, stack[-1][1]))
        cursor = start
        stack.append((min(end, stack[-1][0]) if stack else end, key))
    while stack:
        top_end, top_key = stack.pop()
        if cursor < top_end:
            out.append((cursor, top_end, top_key))
        cursor = max(cursor, top_end)
    return out


def attribute(threads) -> dict:
    """{key: seconds of wall time}: threads is a list of per-thread segment lists (from
    `innermost_segments`, in seconds); each instant is split equally among the segments
    running then (on different threads)."""
    points = []
    for segments in threads:
        for start, end, key in segments:
            points += [(start, 1, key), (end, -1, key)]
    points.sort(key=lambda p: (p[0], p[1]))
    active, out, last = collections.Counter(), collections.Counter(), None
    for t, delta, key in points:
        if last is not None and t > last and active:
            n = sum(active.values())
            for k, count in active.items():
                out[k] += (t - last) * count / n
        active[key] += delta
        if not active[key]:
            del active[key]
        last = t
    return out


def source_line(path: str, line: int) -> str:
    return linecache.getline(path, line).strip() if path and line else ""


# --- JAX: the optimized HLO and the trace ---------------------------------------------------


class Hlo:
    """The instructions of an optimized HLO module: opcode, called computations, op_name,
    elements of the output and the Python frames (innermost first: file, function, line)."""

    INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")

    def __init__(self, text: str):
        self.frames = self._frames(text)
        self.instr, self.computations = {}, collections.defaultdict(list)
        computation = None
        for line in text.splitlines():
            if line.startswith("%") or line.startswith("ENTRY"):
                computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
                continue
            m = self.INSTR.match(line)
            if not m or computation is None:
                continue
            name, shape, opcode, rest = m.groups()
            calls = re.findall(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)", rest)
            op_name = re.search(r'op_name="([^"]*)"', rest)
            frame = re.search(r"stack_frame_id=(\d+)", rest)
            self.instr[name] = dict(
                opcode=opcode,
                calls=calls,
                op_name=op_name.group(1) if op_name else "",
                stack=self.stack(int(frame.group(1))) if frame else [],
                elements=_elements(shape),
                batched="lhs_batch_dims" in rest,
            )
            self.computations[computation].append(name)

    @staticmethod
    def _frames(text: str):
        """{frame id: (file, function, line, parent id)} from the module's stack tables."""
        section, files, functions, locations, frames = None, {}, {}, {}, {}
        for line in text.splitlines():
            if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                section = line
                continue
            m = re.match(r"^(\d+) (.*)$", line)
            if not m or section is None:
                if line.startswith("%") or line.startswith("ENTRY"):
                    break
                continue
            i, body = int(m.group(1)), m.group(2)
            if section == "FileNames":
                files[i] = body.strip('"')
            elif section == "FunctionNames":
                functions[i] = body.strip('"')
            elif section == "FileLocations":
                f = dict(re.findall(r"(\w+)=(\d+)", body))
                locations[i] = (
                    files.get(int(f["file_name_id"]), ""),
                    functions.get(int(f["function_name_id"]), ""),
                    int(f.get("line", 0)),
                )
            else:
                f = dict(re.findall(r"(\w+)=(\d+)", body))
                # the printed parent is one above the parent's index (0: none)
                frames[i] = (*locations[int(f["file_location_id"])], int(f["parent_frame_id"]) - 1)
        return frames

    def stack(self, frame: int) -> list:
        out, seen = [], set()
        while frame in self.frames and frame not in seen:
            seen.add(frame)
            path, function, line, parent = self.frames[frame]
            out.append((path, function, line))
            frame = parent
        return out

    def fused(self, name: str) -> list:
        """The instructions of the computations `name` calls (recursively; not while
        bodies, whose thunks appear in the trace on their own)."""
        ins = self.instr[name]
        out, todo = [], list(ins["calls"]) if ins["opcode"] in ("fusion", "call") else []
        while todo:
            for member in self.computations.get(todo.pop(), []):
                out.append(member)
                todo += self.instr[member]["calls"]
        return out

    def shares(self, name: str) -> dict:
        """{class: share} of one thunk's time."""
        ins = self.instr.get(name)
        if ins is None:
            return {"other": 1.0}
        members = [name] + self.fused(name)
        dots = [m for m in members if self.instr[m]["opcode"] in DOT_OPCODES]
        if dots:
            return {jax_dot_class(self.instr[dots[0]]): 1.0}
        weights = collections.Counter()
        for m in members[1:] if len(members) > 1 else members:
            i = self.instr[m]
            if i["opcode"] in FREE_OPCODES:
                continue
            weights[jax_class(i)] += max(i["elements"], 1)
        if not weights:
            return {jax_class(ins): 1.0}
        total = sum(weights.values())
        return {k: v / total for k, v in weights.items()}


def _elements(shape: str) -> int:
    dims = re.findall(r"\[([\d,]*)\]", shape)
    total = 0
    for d in dims:
        n = 1
        for x in d.split(","):
            n *= int(x) if x else 1
        total += n
    return total


def _in_attention(stack) -> bool:
    return any(f in ("Attention.__call__", "heads_major_attention") for _, f, _ in stack)


def jax_dot_class(ins) -> str:
    core = ins["batched"] or "dot_product_attention" in ins["op_name"]
    return "attention" if core and _in_attention(ins["stack"]) else "matmuls"


def jax_class(ins) -> str:
    """The class of one (non-dot) HLO instruction."""
    if ins["opcode"] in MOVE_OPCODES:
        return "transposes / copies"
    if ins["opcode"] in DOT_OPCODES:
        return jax_dot_class(ins)
    primitive = ins["op_name"].split(";")[0].rsplit("/", 1)[-1]
    for path, function, line in ins["stack"]:
        text = source_line(path, line)
        name = function.rsplit(".", 1)[-1]
        if "/optax/" in path or name in OPTIMIZER_FUNCTIONS or "ema_update" in function:
            return "optimizer / EMA update"
        if "gelu" in text:
            return "GELU"
        if function in ("route", "DiT._gather_masks"):
            if function == "DiT._gather_masks" or ("mask" in text and primitive == "mul"):
                return "routing"
            return "other"  # the residual adds
        if name == "modulate" or path.endswith("/normalization.py") or "LayerNorm" in function:
            return "layer norm + modulation"
        if "gate_" in text and primitive == "mul":
            return "layer norm + modulation"
        if function in ("Attention.__call__", "heads_major_attention"):
            return "attention"
        if function in ("Dense.__call__", "_Conv.__call__"):
            return "matmuls"  # the bias add and its gradient (torch's addmm adds the bias)
        if "/diffusion/" in path or path.endswith("weighting.py"):
            return "loss" if name in LOSS_FUNCTIONS else "other"
        if path.endswith(("dit.py", "step.py")) or "/flax/" in path:
            return "other"
    return "other"


CONTROL_FLOW = {"while", "call", "conditional"}  # their bodies' thunks are in the trace


def thunk_intervals(data, hlo: Hlo) -> list:
    """[(start, end, name)] in seconds of every thunk run in a trace. A thunk's event
    marks its start; where it completes asynchronously (Eigen's dot, a fusion split over
    the thread pool) its work goes on after the event, until its `end: <name>` event
    (linked by the flow id: the thunk's `_p`, the end's `_c`)."""
    starts, ends = [], {}
    for plane in data.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith(("tf_XLAEigen", "tf_XLAPjRtCpuClient")):
                continue
            for e in line.events:
                if e.name in hlo.instr and hlo.instr[e.name]["opcode"] not in CONTROL_FLOW:
                    stats = dict(e.stats)
                    starts.append((e.start_ns, e.start_ns + e.duration_ns, e.name, stats.get("_p")))
                elif e.name.startswith("end: "):
                    flow = dict(e.stats).get("_c")
                    if flow is not None:
                        ends[flow] = e.start_ns + e.duration_ns
    return [
        (start * 1e-9, max(end, ends.get(flow, end)) * 1e-9, name)
        for start, end, name, flow in starts
    ]


def profile_jax(config, steps: int, trace_dir: str) -> dict:
    """{'classes': {class: s/step}, 'idle': s/step, 'traced': s/step, 'untraced': s/step}."""
    step = train_step.JaxStep(config, (1, 1))
    step.run(2)
    untraced = common.median([step.run(steps) for _ in range(3)])
    hlo = Hlo(step.compiled.as_text())
    with jax.profiler.trace(trace_dir):
        start = time.perf_counter()
        step.run(steps)
        traced = (time.perf_counter() - start) / steps
    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(max(paths, key=os.path.getmtime))
    by_name = attribute([thunk_intervals(data, hlo)])
    classes, ops = collections.Counter(), collections.Counter()
    for name, seconds in by_name.items():
        for cls, share in hlo.shares(name).items():
            classes[cls] += seconds * share / steps
            ops[(name, cls)] += seconds * share / steps
    busy = sum(classes.values())
    idle = max(traced - busy, 0.0)
    classes["other"] += idle
    return dict(classes=classes, idle=idle, traced=traced, untraced=untraced, ops=ops)


# --- PyTorch: torch.profiler ----------------------------------------------------------------

TORCH_NAMES = [
    (("scaled_dot_product", "_flash_attention", "bmm", "softmax"), "attention"),
    (("layer_norm",), "layer norm + modulation"),
    (("gelu",), "GELU"),
    (("aten::mm", "aten::addmm", "aten::linear", "convolution", "aten::matmul"), "matmuls"),
    (("Optimizer.", "ema", "_foreach_"), "optimizer / EMA update"),
]
TORCH_COPIES = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy")
FRAME = re.compile(r"^(.*)\((\d+)\): (.*)$")


def _torch_name_class(name: str) -> str | None:
    for keys, cls in TORCH_NAMES:
        if any(k in name for k in keys):
            return cls
    return None


def _context(event):
    """(Python frames (path, function) innermost first, the nearest nn.Module's class)
    around an event."""
    frames, module, e = [], None, event.cpu_parent
    while e is not None:
        m = FRAME.match(e.name) if e.is_python_function else None
        if m:
            frames.append((m.group(1), m.group(3)))
        elif module is None and e.name.startswith("nn.Module: "):
            module = e.name.removeprefix("nn.Module: ").rsplit("_", 1)[0]
        e = e.cpu_parent
    return frames, module


def _torch_frame_class(event) -> str | None:
    """The class of a (forward) aten op from the first frame of the model or the step
    around it. A block's own multiplies are told apart by their operands: `x * m` and
    `x * (1 - m)` (routing) have the (B, 1, C) mask second, `gate * branch` (adaLN's
    gate) has it first; its adds are residual adds (other)."""
    frames, module = _context(event)
    op, shapes = event.name.removeprefix("aten::"), [list(s) for s in event.input_shapes or []]
    for path, function in frames:
        if path.startswith("torch/") or "/torch/" in path or path.startswith("<"):
            continue  # PyTorch's own Python (nn.Module plumbing, autograd, tensor methods)
        if function == "t_modulate":
            return "layer norm + modulation"
        if function in LOSS_FUNCTIONS:
            return "loss"
        if function == "forward" and module == "TBlock":
            if op == "rsub":
                return "routing"
            if op == "mul" and len(shapes) == 2 and len(shapes[0]) == len(shapes[1]) == 3:
                if shapes[1][1] == 1 and shapes[0][1] > 1:
                    return "routing"
                if shapes[0][1] == 1 and shapes[1][1] > 1:
                    return "layer norm + modulation"
            return "other"
        if function == "forward" and module == "TDiT" and op == "index":
            return "routing"  # table[t]
        if function == "forward" and module == "FusedAttention":
            return "attention"
        return "other"
    return None


def torch_classes(events) -> list:
    """(name, class) of each aten op of one profiled step in time order, from a profile
    with Python frames and input shapes."""
    ops = sorted((e for e in events if not e.is_python_function), key=lambda e: e.time_range.start)
    forward = {}
    for e in ops:
        if e.sequence_nr >= 0 and "Backward" not in e.name and "evaluate_function" not in e.name:
            forward.setdefault(e.sequence_nr, e)
    out = []
    for e in ops:
        chain, p = [e], e.cpu_parent
        while p is not None:
            if not p.is_python_function:
                chain.append(p)
            p = p.cpu_parent
        names = [x.name for x in chain]
        backward = next((x for x in chain if "evaluate_function" in x.name), None)
        fwd = forward.get(backward.sequence_nr) if backward is not None else None
        cls = None
        for n in names + ([fwd.name] if fwd is not None else []):
            cls = cls or _torch_name_class(n)
        if cls is None and "AccumulateGrad" in " ".join(names):
            cls = "other"  # gradients summed into .grad
        if cls is None and e.name in TORCH_COPIES:
            cls = "transposes / copies"
        if cls is None:
            cls = _torch_frame_class(fwd if fwd is not None else e)
        out.append((e.name, cls or "other"))
    return out


def profile_torch(config, kind: str, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile  # only when asked: torch is optional

    from benchmarks import torch_counterpart

    runner = torch_counterpart.TrainRunner(config, kind, compiled=False)
    runner.run(2)
    untraced = common.median([runner.run(steps) for _ in range(3)])
    with profile(activities=[ProfilerActivity.CPU], with_stack=True, record_shapes=True) as prof:
        runner.run(1)
    classes_of_step = torch_classes(prof.events())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        runner.run(steps)
        traced = (time.perf_counter() - start) / steps
    ops = sorted(prof.events(), key=lambda e: e.time_range.start)
    per_step = len(classes_of_step)
    if len(ops) != per_step * steps:
        raise SystemExit(f"torch: {len(ops)} ops in {steps} steps, {per_step} in one")
    keyed = []
    for i, e in enumerate(ops):
        name, cls = classes_of_step[i % per_step]
        if name != e.name:
            raise SystemExit(f"torch: op {i} is {e.name}, {name} in the step with stacks")
        keyed.append((e.time_range.start * 1e-6, e.time_range.end * 1e-6, i))
    by_op = attribute([innermost_segments(keyed)])
    classes, by_name = collections.Counter(), collections.Counter()
    for i, seconds in by_op.items():
        name, cls = classes_of_step[i % per_step]
        classes[cls] += seconds / steps
        by_name[(name, cls)] += seconds / steps
    busy = sum(classes.values())
    idle = max(traced - busy, 0.0)
    classes["other"] += idle
    return dict(classes=classes, idle=idle, traced=traced, untraced=untraced, ops=by_name)


# --- the table ------------------------------------------------------------------------------


def matmul_gflop(config) -> dict:
    """Model GFLOP per train step (forward + backward = 3 forwards, 2 FLOPs per MAC, as
    `common.train_flops`) of the matmuls and of attention's two products, for a DiT;
    {} for a U-Net."""
    model = inference.from_config(config).model
    if not isinstance(model, models.DiT):
        return {}
    n = (model.input_size // model.patch_size) ** 2
    attention = model.depth * n * 2 * n * model.hidden_size  # QK^T and AV, MACs per image
    per_step = 6.0 * config.global_batch_size / 1e9
    total = common.forward_macs(model)
    return {"matmuls": (total - attention) * per_step, "attention": attention * per_step}


def report(results: dict, gflop: dict | None = None) -> str:
    names = list(results)
    columns = ["operation class"]
    for n in names:
        columns += [f"{n} ms/step", f"{n} %"]
    rows = []
    for cls in CLASSES:
        row = [cls]
        for n in names:
            r = results[n]
            row += [
                common.fmt(1e3 * r["classes"][cls], 2),
                common.fmt(100 * r["classes"][cls] / r["traced"]),
            ]
        rows.append(row)
    total = ["**profiled step (sum)**"]
    for n in names:
        r = results[n]
        total += [common.fmt(1e3 * sum(r["classes"][c] for c in CLASSES), 2), "100.0"]
    rows.append(total)
    lines = [common.table(columns, rows), ""]
    for n in names:
        r = results[n]
        lines.append(
            f"- {n}: profiled {1e3 * r['traced']:.2f} ms/step (of which no op running "
            f"{1e3 * r['idle']:.2f} ms, in other); untraced {1e3 * r['untraced']:.2f} ms/step"
            + "".join(
                f"; {cls} {work:.3g} GFLOP at {work / r['classes'][cls]:.1f} GFLOP/s"
                for cls, work in (gflop or {}).items()
                if r["classes"][cls] > 0
            )
        )
    return "\n".join(lines)


def top_ops(results: dict, count: int) -> str:
    """The `count` ops (XLA thunks, aten op names) with the most time per step, each
    framework, with their class."""
    out = []
    for n, r in results.items():
        rows = [
            (name, cls, common.fmt(1e3 * seconds, 3))
            for (name, cls), seconds in r["ops"].most_common(count)
        ]
        out += [f"{n}:", "", common.table(["op", "class", "ms/step"], rows), ""]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/digits.py")
    parser.add_argument("--batch", type=int, default=None, help="global batch size")
    parser.add_argument("--kind", default="dtr", help="routing kind of both steps")
    parser.add_argument("--steps", type=int, default=5, help="steps profiled (and timed)")
    parser.add_argument("--torch", default="eager", help="'eager', or '' for JAX alone")
    parser.add_argument("--set", action="append", default=[], help="field=value override")
    parser.add_argument("--jax", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--top", type=int, default=0, help="also list the N longest ops")
    args = parser.parse_args(argv)
    overrides = common.parse_assignments(args.set)
    if args.batch:
        overrides["global_batch_size"] = str(args.batch)
    config = common.config_with(args.config, overrides)
    config.model.routing.kind = args.kind
    results = {}
    if args.jax:
        with tempfile.TemporaryDirectory() as trace_dir:
            results["jax"] = profile_jax(
                config.copy_and_resolve_references(), args.steps, trace_dir
            )
    if args.torch:
        results[f"torch {args.torch}"] = profile_torch(config, args.kind, args.steps)
    lines = [
        f"config {args.config}, batch {config.global_batch_size}, routing {args.kind}, "
        f"{config.model.dtype}; {args.steps} steps profiled after 2 warm-up steps",
        "wall time by operation class (benchmarks/profile_step.py's docstring says how)",
    ]
    print(common.header("Train step profile", lines) + "\n")
    print(report(results, matmul_gflop(config)))
    if args.top:
        print("\n" + top_ops(results, args.top))


if __name__ == "__main__":
    common.run_main(main)
