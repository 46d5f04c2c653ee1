"""The benchmark's analytic FLOP count against SPEC §3 (no timing here)."""

import importlib.util
import sys

import pytest

from dtr_jax.models import create_dit
from helpers import ROOT


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("train_step", ROOT / "benchmarks/train_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name, gmacs", [("DiT-S/2", 6.06), ("DiT-B/2", 23.0), ("DiT-L/2", 80.7), ("DiT-XL/2", 118.6)]
)
def test_forward_macs_match_spec(name, gmacs):
    model = create_dit(name, input_size=32, in_channels=4, num_classes=1000)
    assert _benchmark_module().forward_macs(model) / 1e9 == pytest.approx(gmacs, rel=2e-3)
