"""PyTorch alone: the counterpart's train step or sampler (`torch_counterpart`), timed and
tabled as `train_step` and `sample` table theirs (`--torch` there puts both side by side).

  python -m benchmarks.torch_step --config configs/dit_s.py --batch 8
  python -m benchmarks.torch_step --config configs/dit_b.py --batch 256 --set model.dtype=bfloat16
  python -m benchmarks.torch_step --config configs/dit_b.py --sample --batch 64
  python -m benchmarks.torch_step --config configs/digits_unet.py
"""

from __future__ import annotations

import argparse

from benchmarks import common, sample, train_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/digits.py")
    parser.add_argument("--batch", type=int, default=None, help="train batch / images per call")
    parser.add_argument("--kinds", default="none,dtr")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--sample", action="store_true", help="time the sampler, not the step")
    parser.add_argument("--num-steps", type=int, default=250, help="sampling steps")
    parser.add_argument("--steps", type=int, default=10, help="train steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], help="field=value override")
    args = parser.parse_args(argv)
    overrides = common.parse_assignments(args.set)
    kinds, modes = args.kinds.split(","), args.modes.split(",")
    if args.sample:
        overrides["sample.num_steps"] = str(args.num_steps)
        config = common.config_with(args.config, overrides)
        batch = args.batch or 8
        rows = sample.torch_rows(config, kinds, modes, batch)
        times = common.time_interleaved({i: r.run for i, r in enumerate(rows)}, args.rounds, 1)
        print(common.header("PyTorch sampler", [f"config {args.config}"]) + "\n")
        print(sample.report(rows, times, None, batch))
        return
    if args.batch:
        overrides["global_batch_size"] = str(args.batch)
    config = common.config_with(args.config, overrides)
    rows = train_step.torch_rows(config, kinds, modes)
    times = common.time_interleaved({i: r.run for i, r in enumerate(rows)}, args.rounds, args.steps)
    print(common.header("PyTorch train step", [f"config {args.config}"]) + "\n")
    print(train_step.report(rows, times, None))


if __name__ == "__main__":
    common.run_main(main)
