"""Shared test setup: 8 fake CPU devices, set before jax is imported, XLA's cheaper CPU
compilation, and one XLA compilation cache for the whole run.

The suite compiles the same tiny models many times over, in-process and in the command
lines it starts (which inherit this environment): with the cache, each is compiled
once per run (a CLI training run takes about half the time). The cache lives in a fresh
directory of the run's controlling process, which the xdist workers inherit, and is
removed at the end. Cached executables are the ones XLA would compile: results do not
change.
"""

import os
import shutil
import tempfile

# XLA's CPU backend without its expensive LLVM optimisations: the suite's models are tiny,
# so compiling dominates and runs take a third less time (what each test compares is
# compiled alike). Command lines the tests start get the same (`helpers.xla_flags`).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("DTR_TEST_XLA_FLAGS", FAST_COMPILE)
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 " + os.environ["DTR_TEST_XLA_FLAGS"],
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dtr_jax-tests-xla-")
    os.environ["DTR_TEST_OWNS_XLA_CACHE"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("DTR_TEST_OWNS_XLA_CACHE") == str(os.getpid()):  # the controller
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# Seconds each file took in a full run on the 2-core CI machine kind, loaded (only the
# order they give matters). The two workers take whole files (`--dist loadfile`), each
# the next in line when it is free: the longest files go first, so the run does not end
# with one worker on a long file while the other waits. Files not named here go last.
FILE_SECONDS = {
    "test_unet.py": 368,
    "test_faults.py": 297,
    "test_train.py": 292,
    "test_extract.py": 223,
    "test_multihost.py": 213,
    "test_plan.py": 165,
    "test_interruptions.py": 154,
    "test_benchmarks.py": 136,
    "test_interop.py": 116,
    "test_evaluate.py": 91,
    "test_model.py": 67,
    "test_study.py": 40,
    "test_vae.py": 36,
    "test_flow.py": 29,
    "test_sample.py": 28,
    "test_flow_runs.py": 28,
    "test_attention.py": 20,
}


def pytest_collection_modifyitems(session, config, items):
    """The longest files first (a stable sort: a file's tests keep their order)."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))
