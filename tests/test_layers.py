"""The package's import direction: every module imports only from its own layer or below.

Layers, bottom to top (README, Contributing): foundations; components (routing, models,
diffusion, weighting, metrics, data, sharding, checkpoint, ...); config; inference; the
modes that read a checkpoint; training; the command lines. Imports are read from the
source (lazy imports inside functions included), so a cycle cannot hide behind one.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

from helpers import ROOT

PACKAGE = ROOT / "dtr_jax"

LAYERS = [
    (
        "foundations",
        [
            "dtr_jax",
            "dtr_jax.errors",
            "dtr_jax.files",
            "dtr_jax.progress",
            "dtr_jax.registry",
            "dtr_jax.torch_files",
        ],
    ),
    (
        "components",
        [
            "dtr_jax.routing",
            "dtr_jax.models",
            "dtr_jax.models.attention",
            "dtr_jax.models.dit",
            "dtr_jax.models.unet",
            "dtr_jax.models.inception",
            "dtr_jax.models.vae",
            "dtr_jax.diffusion",
            "dtr_jax.diffusion.gaussian",
            "dtr_jax.diffusion.flow",
            "dtr_jax.diffusion.samplers",
            "dtr_jax.weighting",
            "dtr_jax.optimizer",
            "dtr_jax.metrics",
            "dtr_jax.digits_eval",
            "dtr_jax.evaluators",
            "dtr_jax.decoders",
            "dtr_jax.data",
            "dtr_jax.data.sources",
            "dtr_jax.data.images",
            "dtr_jax.data.latents",
            "dtr_jax.data.pipeline",
            "dtr_jax.sharding",
            "dtr_jax.npz",
            "dtr_jax.checkpoint",
            "dtr_jax.distributed",
            "dtr_jax.lock",
            "dtr_jax.plots",
            "dtr_jax.interop",
            "dtr_jax.tpu",
        ],
    ),
    ("config", ["dtr_jax.config"]),
    ("inference", ["dtr_jax.inference"]),
    (
        "modes",
        [
            "dtr_jax.sample",
            "dtr_jax.evaluate",
            "dtr_jax.export",
            "dtr_jax.extract",
            "dtr_jax.reference",
        ],
    ),
    ("training", ["dtr_jax.step", "dtr_jax.train", "dtr_jax.plan"]),
    ("entry points", ["dtr_jax.modes", "dtr_jax.main", "dtr_jax.study"]),
]
LAYER = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}

# The benchmarks (one command each) import one way too: shared pieces in `common`, the
# PyTorch counterpart below the commands that time it.
BENCHMARKS = ROOT / "benchmarks"
BENCHMARK_LAYERS = [
    ["benchmarks.common"],
    ["benchmarks.torch_counterpart"],
    ["benchmarks.matmul"],
    [
        "benchmarks.train_step",
        "benchmarks.extract",
        "benchmarks.tpu_plans",
        "benchmarks.sampler_quality",
    ],
    ["benchmarks.sample", "benchmarks.profile_step"],
    ["benchmarks.torch_step"],
]
BENCHMARK_LAYER = {m: i for i, modules in enumerate(BENCHMARK_LAYERS) for m in modules}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(package.rglob("*.py"))}


def imported(path: pathlib.Path, name: str, package_root: pathlib.Path = PACKAGE) -> set[str]:
    """The modules of `package_root` (dtr_jax) that `path` imports anywhere in its body
    (absolute or relative)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    modules = package_modules(package_root)
    return {m for m in found if m in modules and m != name}


def test_every_module_has_a_layer():
    missing = sorted(set(package_modules()) - set(LAYER))
    assert not missing, f"assign these modules a layer in {__file__}: {missing}"


@pytest.mark.parametrize("name", sorted(package_modules()))
def test_imports_point_down(name):
    path = package_modules()[name]
    upward = sorted(m for m in imported(path, name) if LAYER[m] > LAYER[name])
    assert not upward, (
        f"{name} ({LAYERS[LAYER[name]][0]}) imports from higher layers: "
        + ", ".join(f"{m} ({LAYERS[LAYER[m]][0]})" for m in upward)
    )


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles_even_within_a_layer():
    graph = {name: imported(path, name) for name, path in package_modules().items()}
    cycle = import_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_benchmarks_import_one_way():
    """No cycle among the benchmarks (lazy imports included), each importing only below it."""
    modules = package_modules(BENCHMARKS)
    assert sorted(set(modules) - set(BENCHMARK_LAYER) - {"benchmarks"}) == []
    graph = {n: imported(p, n, BENCHMARKS) - {"benchmarks"} for n, p in modules.items()}
    assert import_cycle(graph) is None, "import cycle: " + " -> ".join(import_cycle(graph))
    for name, targets in graph.items():
        upward = [m for m in targets if BENCHMARK_LAYER[m] >= BENCHMARK_LAYER.get(name, 0)]
        assert not upward, f"{name} imports {upward}, of its layer or above"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        "def f():\n    from dtr_jax import train\n"
        "from .. import config\nfrom dtr_jax.models import dit\n"
    )
    found = imported(source, "dtr_jax.data.sources")
    assert {"dtr_jax.train", "dtr_jax.config", "dtr_jax.models.dit"} <= found


def test_the_train_step_needs_no_tensorflow_clu_or_grain():
    """The benchmark and accelerator path: step, inference and config import without them."""
    code = (
        "import sys, dtr_jax.step, dtr_jax.export\n"
        "heavy = [m for m in ('tensorflow', 'clu', 'grain', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_mode_runs_a_function_that_exists():
    import importlib

    from dtr_jax import config, modes

    assert tuple(modes.ENTRIES) == config.MODES
    for entry in modes.ENTRIES.values():
        module, function = entry.split(":")
        assert callable(getattr(importlib.import_module(module), function)), entry


def test_modes_that_read_checkpoints_start_without_tensorflow(tmp_path):
    """sample / evaluate / export never import TensorFlow (seconds saved per command)."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['dtr_jax.main', '--config', 'configs/digits.py', '--workdir', "
        f"{str(tmp_path)!r}, '--mode', 'export']\n"
        "try:\n    runpy.run_module('dtr_jax.main', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 6, e.code  # no checkpoint there\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
