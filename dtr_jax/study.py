"""The routing study on the digits default: none vs random vs dtr, several seeds.

  python -m dtr_jax.study --config configs/digits.py --workdir workdirs/study
  python -m dtr_jax.study --config configs/digits_flow.py --workdir workdirs/study_flow

The config's objective (DDPM, or flow matching) trains every run; its sampler scores it.

Trains one run per (routing kind, seed) at equal steps, evaluates each with the offline
digits metrics (fresh EMA samples, with and without guidance) and writes
WORKDIR/results.json and WORKDIR/results.md (mean ± std over seeds). Finished runs are
skipped on a rerun, so an interrupted study resumes.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from dtr_jax import diffusion, evaluate, files, modes, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Base config (the digits default).")
flags.DEFINE_string("workdir", None, "Where the runs and the results go.")
flags.DEFINE_list("kinds", ["none", "random", "dtr"], "Routing kinds to compare.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (training, data order and random tables).")
flags.DEFINE_list("cfg_scales", ["1.0", "2.0"], "Guidance scales to evaluate at.")
flags.mark_flags_as_required(["config", "workdir"])

METRICS = ("digits_accuracy", "digits_fd")


def run_one(base, workdir: str, kind: str, seed: int, cfg_scales) -> dict:
    """Trains (or resumes) one run and evaluates it at each guidance scale."""
    config = base.copy_and_resolve_references()
    config.seed = seed
    config.model.routing.kind = kind
    config.model.routing.seed = seed
    run_dir = os.path.join(workdir, f"{kind}_seed{seed}")
    done = os.path.join(run_dir, "study.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    train.train_and_evaluate(config, run_dir)
    result = {}
    for scale in cfg_scales:
        config.sample.cfg_scale = scale
        metrics = evaluate.evaluate_mode(config, run_dir)
        result[f"cfg{scale:g}"] = {k: metrics[k] for k in METRICS}
    files.write_atomically(done, json.dumps(result, indent=2).encode())  # the done-marker
    return result


def table(results: dict, kinds, cfg_scales, seeds) -> str:
    """Markdown: one row per kind, mean ± std over seeds per metric and guidance scale."""
    head = ["routing"] + [f"{name} (cfg {s:g})" for s in cfg_scales for name in ("accuracy", "FD")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind in kinds:
        cells = [kind]
        for s in cfg_scales:
            for metric, fmt in (
                ("digits_accuracy", "{:.3f} ± {:.3f}"),
                ("digits_fd", "{:.1f} ± {:.1f}"),
            ):
                values = [results[f"{kind}_seed{seed}"][f"cfg{s:g}"][metric] for seed in seeds]
                cells.append(fmt.format(np.mean(values), np.std(values)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def describe(config) -> str:
    """The objective the runs train with and the sampler that scores them, in a line."""
    d, s = config.diffusion, config.sample
    if d.objective == "ddpm":
        objective = f"ddpm ({d.schedule} schedule, T = {d.num_timesteps})"
    else:
        objective = f"flow ({d.path} path, {d.prediction} prediction)"
    calls = diffusion.samplers.SAMPLERS.get(s.sampler).calls(s)
    steps = f"{s.num_steps} steps ({calls} model calls)" if calls else "adaptive steps"
    return f"objective {objective}; samples: {s.sampler}, {steps}"


def main(argv):
    del argv
    with modes.reporting():
        modes.setup_process()
        study(
            FLAGS.config,
            FLAGS.workdir,
            FLAGS.kinds,
            [int(s) for s in FLAGS.seeds],
            [float(s) for s in FLAGS.cfg_scales],
        )


def study(config, workdir: str, kinds, seeds, scales) -> str:
    """Runs (or reads back) every (kind, seed) run; writes and returns the results table."""
    results = {}
    for kind in kinds:
        for seed in seeds:
            results[f"{kind}_seed{seed}"] = run_one(config, workdir, kind, seed, scales)
            logging.info("%s seed %d: %s", kind, seed, results[f"{kind}_seed{seed}"])
    markdown = f"{describe(config)}\n\n{table(results, kinds, scales, seeds)}"
    text = json.dumps(results, indent=2, sort_keys=True)
    files.write_atomically(os.path.join(workdir, "results.json"), text.encode())
    files.write_atomically(os.path.join(workdir, "results.md"), markdown.encode())
    print(markdown)
    return markdown


if __name__ == "__main__":
    app.run(main, flags_parser=modes.parse_flags)
