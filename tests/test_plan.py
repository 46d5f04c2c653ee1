"""`--mode plan`: the run's programs compiled for a TPU slice without a TPU (libtpu, from the
test extra, compiles for a topology description on this CPU machine).

The slices are 4-chip v5e (v5e-4): small models compile in seconds. Deviceless TPU
compilation works with JAX_PLATFORMS=cpu, which the suite sets: the local backend stays
the CPU and libtpu is loaded for the topology alone.
"""

import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common
from dtr_jax import config as config_lib
from dtr_jax import plan, sharding, tpu
from dtr_jax.errors import ConfigError, DoesNotFit
from helpers import ROOT, cli_command, cli_env, tiny

SLICE = "v5e-4"
# Compiled FLOPs of a train step / SPEC §3's 6 x forward MACs x batch: XLA also counts
# the norms, activations, softmax, loss and AdamW, which the analytic count leaves out:
# 6.5% of the test model (128 wide), 2% of DiT-S/2 and less of the larger sizes.
FLOP_TOLERANCE = 0.08


@pytest.fixture(scope="module")
def target():
    return plan.target(SLICE)


def compile_step(target, **overrides):
    config = plan.planned_config(tiny(**{"plan.topology": SLICE} | overrides), target)
    config_lib.validate(config, target.chips, mode="plan")
    mesh = sharding.make_mesh(config.mesh, target.devices)
    return config, mesh


@pytest.mark.parametrize(
    "text, chips, shape, hosts, name",
    [
        ("v4-8", 4, (2, 2, 1), 1, "v4-8"),
        ("v4-32", 16, (2, 2, 4), 4, "v4-32"),
        ("v5p-8", 4, (2, 2, 1), 1, "v5p-8"),
        ("v5litepod-16", 16, (4, 4), 2, "v5e-16"),
        ("v5e-32", 32, (4, 8), 4, "v5e-32"),
        ("v6e-8", 8, (2, 4), 1, "v6e-8"),
        ("v5e:2x2", 4, (2, 2), 1, "v5e-4"),
        ("v5p:4x4x20", 320, (4, 4, 20), 80, "v5:4x4x20"),
    ],
)
def test_slice_names_resolve_as_cloud_tpu_names_them(text, chips, shape, hosts, name):
    s = tpu.parse_slice(text)
    assert (s.chips, s.shape, s.hosts, s.name) == (chips, shape, hosts, name)


@pytest.mark.parametrize(
    "text, message",
    [
        ("v5e-12", "not a v5e slice: its names count chips"),
        ("v4-6", "TensorCores, two per chip"),
        ("v3-8", "not a TPU generation"),
        ("tpu", "neither a Cloud TPU slice name"),
        ("v5e:2x2x1", "v5e topologies have 2 axes"),
    ],
)
def test_bad_slices_say_what_is_allowed(text, message):
    with pytest.raises(ValueError, match=message):
        tpu.parse_slice(text)


def test_bad_plan_fields_are_refused_before_compiling(monkeypatch):
    bad = tiny(**{"plan.topology": "v5e-12", "plan.programs": "train,fid", "plan.max_batch": 0})
    with pytest.raises(ConfigError) as e:
        plan.plan_mode(bad)
    text = str(e.value)
    assert "plan.topology='v5e-12'" in text and "plan.programs has 'fid'" in text
    assert "plan.max_batch=0" in text
    with pytest.raises(ConfigError, match="plans for this machine's TPUs, and it has 8 cpu"):
        plan.plan_mode(tiny())  # plan.topology='' on a machine without TPUs
    monkeypatch.setattr(tpu, "libtpu_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"needs libtpu.*pip install 'jax\[tpu\]=="):
        plan.plan_mode(tiny(**{"plan.topology": SLICE}))


def test_train_step_and_sampler_compile_on_an_fsdp_mesh(target):
    """(The data mesh: `test_plan_through_the_command_line`.)"""
    config, mesh = compile_step(target, **{"mesh.data": 1, "mesh.fsdp": 4})
    train, sampler = plan.programs(config, mesh, target.compile_only)
    assert train.fits and sampler.fits
    assert (train.label, sampler.label) == ("train step", "sampler (4 steps)")
    # the per-chip batch: 16 images of 8x8x1 float32 + int32 labels, over 4 chips
    assert train.inputs == 16 * (8 * 8 * 4 + 4) / 4
    assert train.arguments > train.inputs and train.temporaries > 0
    # libtpu's peak: at least the state, at most the parts' sum (buffers reused)
    assert train.arguments <= train.peak <= train.total and train.memory == train.peak
    assert train.flops > 0 and train.bytes_accessed > 0 and train.bound_seconds(target.chip) > 0
    # all 4 sampling steps: each a guided call of the model on twice the batch
    model = plan.step_lib.create_setup(config).dm.model
    per_step = 2 * common.forward_macs(model) * 2 * sampler.batch / target.chips
    assert sampler.flops > config.sample.num_steps * per_step
    assert sampler.flops < 2 * config.sample.num_steps * per_step


def test_compiled_flops_match_the_spec_count_with_every_scanned_block_counted(target):
    """The one larger model: 3 scanned blocks 128 wide on 64 tokens, where matmuls
    dominate. XLA counts a loop body once (its count alone is about half the step's):
    the plan counts every block, from the blocks unrolled at depth 1 and 2."""
    size = {"model.depth": 3, "model.hidden_size": 128, "model.num_heads": 2}
    size |= {"model.input_size": 16, "model.in_channels": 4, "global_batch_size": 32}
    config, mesh = compile_step(target, **size, **{"model.scan_blocks": True})
    step = plan.train_step(config, mesh, target.compile_only)
    model = plan.step_lib.create_setup(config).dm.model
    analytic = common.train_flops(model, config.global_batch_size) / target.chips
    assert step.fits and step.flops / analytic == pytest.approx(1.0, abs=FLOP_TOLERANCE)


class _Compiled:
    """A compiled program's stand-in: its HLO text and cost analysis."""

    def __init__(self, text: str, flops: float):
        self.text, self.flops = text, flops

    def as_text(self):
        return self.text

    def cost_analysis(self):
        return {"flops": self.flops, "bytes accessed": 1.0}


def test_a_windowed_einsum_program_is_counted_from_its_plain_form():
    """On FSDP meshes libtpu may overlap a matmul with its all-gather in a loop over the
    shards (DiT-XL/2 on v5e 1x8 does), which the cost analysis counts once: the count
    then comes from the program compiled with COUNTING_OPTIONS (memory stays the real
    program's). Too large a compile for the suite: the decision is checked here, libtpu's
    acceptance of the options in the next test."""
    dm = types.SimpleNamespace(model=types.SimpleNamespace(scan_blocks=False))
    calls = []

    def build(dm, options=None):
        calls.append(options)
        if options is None:
            return _Compiled("%w = while(...), body=%windowed_dot_general_body_ag", 1.0), 7.0
        return _Compiled("%d = dot(...)", 8.0), 9.0

    compiled, seconds, flops, _ = plan._counted(build, dm, count=True)
    assert calls == [None, plan.COUNTING_OPTIONS]
    assert (compiled.flops, seconds, flops) == (1.0, 7.0, 8.0)
    calls.clear()  # a program without such loops is counted as compiled
    plain = lambda dm, options=None: calls.append(options) or (_Compiled("dot", 3.0), 1.0)  # noqa: E731
    assert plan._counted(plain, dm, count=True)[2] == 3.0 and calls == [None]


def test_libtpu_takes_the_counting_options(target):
    """libtpu refuses an option it does not know ('No such compile option'): these are
    its own, and a program compiled with them is counted as any other."""
    mesh = jax.sharding.Mesh(np.array(target.devices).reshape(4), ("x",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    x = jax.ShapeDtypeStruct((256, 512), jnp.float32, sharding=rows)
    lowered = jax.jit(lambda x: x @ x.T).trace(x).lower(lowering_platforms=("tpu",))
    compiled = lowered.compile(compiler_options=plan.COUNTING_OPTIONS)
    assert plan._cost(compiled)[0] == pytest.approx(2 * 256 * 512 * 256 / 4, rel=0.05)
    with pytest.raises(jax.errors.JaxRuntimeError, match="No such compile option"):
        lowered.compile(compiler_options={"xla_tpu_no_such_option": False})


def test_an_oversized_batch_is_reported_as_not_fitting_with_its_numbers(target, capsys):
    """DiT-S/2 at 1024 images per chip: the compiler refuses it in seconds (a scanned
    model keeps every block's activations: XLA's rematerialisation cannot shrink it)."""
    fields = {"global_batch_size": 4096, "model.scan_blocks": True}
    fields |= {"plan.topology": SLICE, "plan.programs": "train"}
    config = config_lib.load_config(str(ROOT / "configs" / "dit_s.py"), **fields)
    with pytest.raises(DoesNotFit, match=f"train step of DiT-S/2 does not fit {SLICE}"):
        plan.plan_mode(config)
    out = capsys.readouterr().out
    assert "| train step | 4096 | - |" in out and "| > 16 | no |" in out
    # the compiler's own figures: what the step needs and what a chip has
    assert re.search(r"temporaries \(\d+\.\d+G\) exceeds available HBM \(15\.75G\)", out)


def test_largest_batch_search_is_exact_on_a_linear_memory():
    calls = []

    def memory_at(b):  # 1 GiB + 10 MiB per image, 16 GiB of HBM
        calls.append(b)
        m = 2**30 + b * 10 * 2**20
        return m if m <= 16 * 2**30 else None

    best, tries = plan.largest_fitting(memory_at, 8, 256, 4096, 16 * 2**30)
    assert best == 1536 and (best + 8) * 10 * 2**20 + 2**30 > 16 * 2**30
    assert tries == len(calls) <= 6
    # the line reaches the HBM past plan.max_batch: the limit is the third try
    best, tries = plan.largest_fitting(lambda b: b * 2**20, 8, 256, 4096, 16 * 2**30)
    assert (best, tries) == (4096, 3)


def test_the_largest_batch_is_searched_by_memory_and_counted_once(target, monkeypatch):
    """A scanned model's counting (two more compiles) is for the batch kept, not every try."""
    counted = []

    def fake_step(config, mesh, compile_only, count=True):
        b = config.global_batch_size
        counted.append(count)
        total = 2**30 + b * 50 * 2**20
        flops = 1e12 * b if count else float("nan")
        fits = total <= 15.75 * 2**30
        return plan.Figures("train step", b, 1.0, fits, total, 0, 0, 0, flops, 1e9)

    monkeypatch.setattr(plan, "train_step", fake_step)
    config, mesh = compile_step(target, **{"model.scan_blocks": True, "plan.max_batch": 4096})
    best = plan.largest(config, mesh, target)
    assert best.batch == 300 and best.figures.batch == 300 and best.figures.flops == 3e14
    assert counted.count(True) == 1 and counted[-1] and len(counted) == best.compiles + 1


def test_plan_through_the_command_line(tmp_path):
    cmd = cli_command(tmp_path, "plan", **{"plan.topology": SLICE, "sample.batch_size": 16})
    cmd.remove("--workdir")
    cmd.remove(str(tmp_path))
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert f"on {SLICE}: 4 x TPU v5 lite" in out and "compiled, not run" in out
    assert "| train step |" in out and "| sampler (4 steps) |" in out
    rows = [line for line in out.splitlines() if line.startswith("| train step")]
    assert rows[0].split(" | ")[7] == "yes"
    assert "chip-hours" in out and "https://cloud.google.com/tpu/docs/v5e" in out
    assert "TPU_ACCELERATOR_TYPE" not in done.stderr  # libtpu's host search stays quiet
    assert not list(tmp_path.iterdir())  # nothing written
    bad = subprocess.run(
        cmd + ["--config.plan.topology=v5e-3"], env=cli_env(), capture_output=True, text=True
    )
    assert bad.returncode == 2 and "plan.topology='v5e-3'" in bad.stderr
    assert np.isfinite(float(rows[0].split(" | ")[-1].replace(",", "").strip(" |")))


def test_a_machine_without_accelerators_never_starts_libtpu(tmp_path):
    """With libtpu installed (this extra) and no TPU chips, every mode runs on the CPU
    without libtpu's search for TPU hosts and its pages of warnings."""
    env = {k: v for k, v in cli_env().items() if k != "JAX_PLATFORMS"}
    cmd = cli_command(tmp_path, "sample")  # refused: no checkpoint, after jax has started
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 6 and "TPU" not in done.stderr, done.stderr[-3000:]
    code = "from dtr_jax import tpu; tpu.cpu_without_accelerators(); import jax; "
    code += "print(jax.devices())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.stdout.startswith("[CpuDevice") and "TPU" not in done.stderr, done.stderr


def test_a_unet_plans_with_its_tables_per_width(target):
    """The ADM U-Net's train step compiles for the slice, its {width: table} routing
    passed as the DiT's one table is."""
    fields = {"global_batch_size": 16, "plan.topology": SLICE, "plan.programs": "train"}
    config = config_lib.load_config(str(ROOT / "configs" / "digits_unet.py"), **fields)
    config = plan.planned_config(config, target)
    config_lib.validate(config, target.chips, mode="plan")
    step = plan.train_step(config, sharding.make_mesh(config.mesh, target.devices), True)
    assert step.fits and step.flops > 0 and step.problem == ""


def test_splash_attention_kernels_are_counted():
    """XLA's cost analysis does not see inside a Pallas kernel: the plan counts each
    splash call's products from its result's (B, heads, N, head_dim) shape."""
    text = "\n".join(
        [
            "  %splash_mha_fwd_residuals.1 = (f32[4,256,128]{2,1,0}, bf16[4,2,256,32]{3,2,1,0})"
            " custom-call(%a, %b), custom_call_target=\"tpu_custom_call\"",
            "  %splash_mha_dq_no_residuals.1 = (f32[4,256,32]{2,1,0}, bf16[4,2,256,32]{3,2,1,0})"
            " custom-call(%c), custom_call_target=\"tpu_custom_call\"",
            "  ROOT %splash_mha_dkv_no_residuals.3 = (bf16[4,2,256,32]{3,2,1,0}) custom-call(%d)",
            "  %fusion.1 = bf16[4,2,256,32]{3,2,1,0} fusion(%splash_mha_fwd_residuals.1)",
        ]
    )
    product = 2.0 * 4 * 2 * 256 * 256 * 32
    assert plan.kernel_flops(text) == (2 + 3 + 4) * product


def test_splash_attention_compiles_for_the_slice(target):
    """`model.attention='splash'`: the train step compiles with the kernel in every
    block. Its count is XLA's for the rest plus the kernels' 9 products per block, where
    XLA's attention does 6 (the kernels recompute q k^T twice and dO v^T once in the
    backward instead of storing the probabilities): the difference is those 3 products,
    less the softmax's elementwise FLOPs that XLA counts and the kernel's count leaves out."""
    depth, batch, tokens, heads, width = 2, 16, 256, 2, 64
    size = {"model.depth": depth, "model.hidden_size": width, "model.num_heads": heads}
    size |= {"model.input_size": 32, "global_batch_size": batch, "model.dtype": "bfloat16"}
    steps = {}
    for kind in ("xla", "splash"):
        config, mesh = compile_step(target, **size, **{"model.attention": kind})
        steps[kind] = plan.train_step(config, mesh, target.compile_only)
        assert steps[kind].fits
    product = 2.0 * (batch // target.chips) * heads * tokens**2 * (width // heads)
    extra = steps["splash"].flops - steps["xla"].flops
    assert extra == pytest.approx(3 * depth * product, rel=0.15)
