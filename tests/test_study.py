"""The routing study: one run per (kind, seed), evaluated, tabulated, resumable."""

import json

import numpy as np

from dtr_jax import study
from dtr_jax.checkpoint import Checkpoints
from dtr_jax.config import load_config
from helpers import ROOT, tiny


def test_study_runs_evaluates_tabulates_and_skips_finished_runs(tmp_path):
    config = tiny(**{"num_train_steps": 2, "sample.num_samples": 20, "sample.batch_size": 20})
    results = {
        f"{kind}_seed0": study.run_one(config, str(tmp_path), kind, 0, [1.0, 2.0])
        for kind in ("none", "dtr")
    }
    for result in results.values():
        assert set(result) == {"cfg1", "cfg2"}
        assert 0.0 <= result["cfg1"]["digits_accuracy"] <= 1.0
        assert np.isfinite(result["cfg2"]["digits_fd"])
    for kind in ("none", "dtr"):  # each run trained with its own routing kind
        _, meta = Checkpoints(str(tmp_path / f"{kind}_seed0"), read_only=True).newest_meta()
        assert meta["signature"]["routing"]["kind"] == kind
        written = json.loads((tmp_path / f"{kind}_seed0" / "study.json").read_text())
        assert written == results[f"{kind}_seed0"]

    lines = study.table(results, ["none", "dtr"], [1.0, 2.0], [0]).splitlines()
    assert lines[0] == "| routing | accuracy (cfg 1) | FD (cfg 1) | accuracy (cfg 2) | FD (cfg 2) |"
    acc = results["dtr_seed0"]["cfg2"]["digits_accuracy"]
    assert lines[3].startswith("| dtr |") and f"{acc:.3f} ± 0.000" in lines[3]

    # a finished run is read back, not retrained
    marker = {"cfg1": {"digits_accuracy": -1.0, "digits_fd": -1.0}}
    (tmp_path / "none_seed0" / "study.json").write_text(json.dumps(marker))
    assert study.run_one(config, str(tmp_path), "none", 0, [1.0]) == marker


def test_the_study_names_its_objective_and_sampler():
    flow = load_config(str(ROOT / "configs" / "digits_flow.py"), **{"sample.num_steps": 4})
    assert study.describe(flow) == (
        "objective flow (linear path, velocity prediction); samples: heun, 4 steps (8 model calls)"
    )
    assert study.describe(tiny()).startswith("objective ddpm (linear schedule, T = 1000)")
