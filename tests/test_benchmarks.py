"""The benchmarks: the analytic FLOP count against SPEC §3, the PyTorch counterpart against
dtr_jax, and every script run for a tiny step with only a bare accelerator host's packages
importable. No timing is asserted."""

import importlib
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import common, torch_counterpart
from dtr_jax import interop
from dtr_jax.config import load_config, model_spec
from dtr_jax.diffusion import GaussianDiffusion
from dtr_jax.inference import build
from dtr_jax.models import create_dit
from helpers import ROOT, tiny


@pytest.mark.parametrize(
    "name, gmacs", [("DiT-S/2", 6.06), ("DiT-B/2", 23.0), ("DiT-L/2", 80.7), ("DiT-XL/2", 118.6)]
)
def test_forward_macs_match_spec(name, gmacs):
    model = create_dit(name, input_size=32, in_channels=4, num_classes=1000)
    assert common.forward_macs(model) / 1e9 == pytest.approx(gmacs, rel=2e-3)
    assert common.train_flops(model, 256) == 6 * 256 * common.forward_macs(model)


@pytest.mark.parametrize("size", ["s", "b", "l", "xl"])
def test_paper_configs_state_their_own_model(size):
    """The hyperparameter table in configs/dit_<size>.py describes the config it documents."""
    path = ROOT / "configs" / f"dit_{size}.py"
    config = load_config(str(path))
    doc = importlib.import_module(f"configs.dit_{size}").__doc__
    row = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", doc, re.M))
    inference = build(model_spec(config))
    model, params = inference.model, inference.abstract_params()
    arch = (model.depth, model.hidden_size, model.num_heads, model.patch_size)
    assert row["depth / hidden / heads / patch"] == " / ".join(map(str, arch))
    assert f"| {config.model.name} |" in doc and f"configs/dit_{size}.py" in doc
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert row["parameters"] == f"{round(n / 1e6)}M"
    gmacs = float(row["forward cost per image"].removesuffix(" GMACs"))
    assert common.forward_macs(model) / 1e9 == pytest.approx(gmacs, abs=0.05)
    r, o = config.model.routing, config.optimizer
    assert row["routing"] == f"DTR, beta {r.beta}, alpha {r.alpha:g}" and r.kind == "dtr"
    assert row["batch / steps"] == f"{config.global_batch_size} / {config.num_train_steps // 1000}K"
    lr, wd, ema = re.fullmatch(
        r"AdamW, lr (\S+) constant, weight decay (\S+), EMA (\S+)", row["optimizer"]
    ).groups()
    assert (float(lr), float(wd), float(ema)) == (o.learning_rate, o.weight_decay, o.ema_decay)
    assert o.warmup_steps == 0  # "constant"
    d = config.diffusion
    assert row["diffusion"].startswith(f"{d.schedule} schedule, T = {d.num_timesteps},")
    sampling = f"{config.sample.num_steps} DDPM steps, guidance {config.sample.cfg_scale}"
    assert row["sampling"] == sampling


def test_torch_counterpart_computes_dtr_jax_losses_and_sampler_steps():
    """The PyTorch step's hybrid loss and sampler step are dtr_jax's, given the same model
    output (NHWC here, NCHW there)."""
    rng = np.random.default_rng(0)
    b, h, c = 6, 4, 3
    x0 = rng.uniform(-1, 1, (b, h, h, c)).astype(np.float32)
    x0[0, 0, 0] = [-1.0, 1.0, 0.5]  # the decoder NLL's edge bins
    noise = rng.standard_normal((b, h, h, c)).astype(np.float32)
    out = rng.uniform(-1, 1, (b, h, h, 2 * c)).astype(np.float32)
    t = np.array([0, 1, 10, 500, 998, 999])

    def nchw(a):
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

    process = GaussianDiffusion.create("linear", 1000)
    want = process.training_losses(lambda x_t, t_model: jnp.asarray(out), x0, t, noise)
    diffusion = torch_counterpart.Diffusion(process)
    tt = torch.from_numpy(t)
    x_t = diffusion.q_sample(nchw(x0), tt, nchw(noise))
    np.testing.assert_allclose(x_t.numpy().transpose(0, 2, 3, 1), process.q_sample(x0, t, noise))
    mse, vb = diffusion.hybrid_loss(nchw(out), nchw(x0), x_t, tt, nchw(noise))
    np.testing.assert_allclose(mse.numpy(), want["mse"], rtol=1e-5)
    np.testing.assert_allclose(vb.numpy(), want["vb"], rtol=1e-4, atol=1e-6)

    respaced = process.respaced("10")
    tr = np.arange(b) % 10
    step = torch_counterpart.Diffusion(respaced)
    mean, log_var = step.p_mean_log_variance(
        nchw(out[..., :c]), nchw(out[..., c:]), nchw(noise), torch.from_numpy(tr)
    )
    p = respaced.p_mean_variance(jnp.asarray(out), noise, tr)
    np.testing.assert_allclose(mean.numpy().transpose(0, 2, 3, 1), p["mean"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(log_var.numpy().transpose(0, 2, 3, 1), p["log_variance"], rtol=1e-5)
    assert step.timestep_map.tolist() == respaced.timestep_map.tolist()


def test_torch_counterpart_is_the_reference_dit_with_fused_attention():
    config = tiny(**{"model.depth": 2})
    torch.manual_seed(0)
    fused = torch_counterpart.build_model(config, "dtr").eval()
    plain = torch_counterpart.reference.TDiT(8, 1, 2, 32, 2, 2, 10, tables=None).eval()
    plain.load_state_dict({k: v for k, v in fused.state_dict().items() if "routing" not in k})
    assert type(fused.blocks[0].attn) is torch_counterpart.FusedAttention
    tables = torch.stack([b.routing._unit_mapping for b in fused.blocks])
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        np.testing.assert_allclose(
            fused(x, t, y).numpy(), plain(x, t, y, tables).numpy(), rtol=1e-5, atol=1e-6
        )


def _torch_macs(model, x, t, y):
    """Multiply-adds of one forward of a torch U-Net per image, counted by hooks on its
    convolutions, linear layers and attention products."""
    attention = (
        torch_counterpart.unet_reference.QKVAttention,
        torch_counterpart.unet_reference.QKVAttentionLegacy,
    )
    macs = []

    def count(module, inputs, output):
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)):
            per_output = module.in_channels * int(np.prod(module.kernel_size))
            macs.append(output[0].numel() * per_output)
        elif isinstance(module, torch.nn.Linear):
            macs.append(output[0].numel() * module.in_features)
        elif isinstance(module, attention):
            _, width, length = inputs[0].shape
            macs.append(2 * length * length * width // 3)  # QK^T and AV

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model(x, t, y)
    for hook in hooks:
        hook.remove()
    return sum(macs)


@pytest.mark.parametrize("options", ["resblock_updown", "conv resampling"])
def test_unet_forward_macs_count_every_layer_and_the_counterpart_is_the_unet(options):
    """common.forward_macs of a U-Net = the multiply-adds hooks count in the PyTorch
    counterpart, which computes what the JAX U-Net computes (same weights, same tables)."""
    overrides = {"model.unet.resblock_updown": options == "resblock_updown"}
    overrides["model.routing.kind"] = "random"
    config = load_config(str(ROOT / "configs" / "digits_unet.py"), **overrides)
    dm = build(model_spec(config))
    torch.manual_seed(0)
    counterpart = torch_counterpart.build_model(config, "random").eval()
    x, t, y = torch.randn(1, 1, 8, 8), torch.tensor([500]), torch.tensor([3])
    assert common.forward_macs(dm.model) == _torch_macs(counterpart, x, t, y)
    state = counterpart.state_dict()
    params = interop.params_from_torch(
        {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    )
    tables = {w: state[f"table_{w}"].numpy().astype(np.uint8) for w in dm.tables}
    for w, table in tables.items():  # the same seeded tables on both sides
        np.testing.assert_array_equal(table, dm.tables[w])
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        want = counterpart(x, t, y).numpy().transpose(0, 2, 3, 1)
    got = dm.model.apply(
        {"params": params}, x.numpy().transpose(0, 2, 3, 1), t.numpy(), y.numpy(), tables
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# Imports a bare accelerator host lacks: any of them in a benchmark's import path fails it.
# ml_collections is allowed: BENCHMARKS.md carries its pure-Python wheel to such hosts.
# `None` in sys.modules makes `import x` fail and `importlib.util.find_spec(x)` answer None,
# as for a package that is not installed (torch probes optional packages that way).
BLOCKER = """
import runpy, sys
sys.modules.update(dict.fromkeys({blocked}))
for argv in {runs}:
    sys.argv = argv
    runpy.run_module(argv[0], run_name="__main__")
    print("=== end of", argv[0], flush=True)
"""
# Everything but jax, flax, optax, numpy and what they bring (orbax, msgpack, scipy, ...).
BARE_HOST_LACKS = ["tensorflow", "clu", "grain", "tensorflow_datasets", "sklearn", "PIL"]
BARE_HOST_LACKS += ["safetensors", "matplotlib", "array_record", "diffusers"]
TINY = ["--config", "configs/digits.py"] + [
    a for f in ("depth=1", "hidden_size=32", "num_heads=2") for a in ("--set", f"model.{f}")
]


def run_blocked(runs, blocked) -> list[str]:
    """Runs the benchmark command lines `runs` in one subprocess with `blocked` imports
    failing; returns each command's output."""
    code = BLOCKER.format(blocked=blocked, runs=runs)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = re.split(r"=== end of \S+\n", done.stdout)
    assert len(outputs) == len(runs) + 1 and not outputs[-1].strip(), done.stdout
    return outputs[:-1]


def table_rows(output: str, first_column: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in output.splitlines()
        if line.startswith(f"| {first_column} ")
    ]


def test_jax_benchmarks_run_without_tensorflow_clu_grain_sklearn_or_torch():
    """matmul, train_step (on two meshes: data and fsdp) and sample, one tiny step each."""
    runs = [
        ["benchmarks.matmul", "--size", "64", "--rounds", "1"],
        ["benchmarks.train_step", *TINY, "--set", "optimizer.warmup_steps=0", "--batch", "8"]
        + ["--kinds", "none,dtr"]
        + ["--meshes", "2x1,1x2", "--steps", "2", "--rounds", "1", "--ceiling", "64"],
        ["benchmarks.sample", *TINY, "--batch", "4", "--num-steps", "2", "--kinds", "dtr"]
        + ["--rounds", "1", "--ceiling", "0"],
        # a paper config as run_all.sh runs it (its ImageNet latents are not needed)
        ["benchmarks.train_step", "--config", "configs/dit_xl.py", "--batch", "2", "--kinds"]
        + ["dtr", "--set", "model.depth=1", "--set", "model.dtype=bfloat16", "--compile-only"]
        + ["--meshes", "1x1"],
        ["benchmarks.extract", "--image-size", "16", "--batch", "2", "--rounds", "1"],
    ]
    matmul, train, sampling, xl, extract = run_blocked(runs, BARE_HOST_LACKS + ["torch"])
    assert [r[1:5] for r in table_rows(xl, "-")] == [["1x1", "dtr", "2", "bfloat16"]]
    (row,) = table_rows(extract, "2")
    assert row[1] == "float32" and float(row[4]) > 0  # images/s of the full-size encoder
    assert re.search(r"\| jax \| 64\^3 \| float32 \| [\d.]+ \| [\d.]+ \|", matmul)
    rows = table_rows(train, "jax")
    assert [(r[2], r[3]) for r in rows] == [("2x1", "none"), ("2x1", "dtr")] + [
        ("1x2", "none"),
        ("1x2", "dtr"),
    ]
    # the same steps on every mesh: the same last loss (to float reduction order)
    loss = {(r[2], r[3]): float(r[15]) for r in rows}
    for kind in ("none", "dtr"):
        assert loss["1x2", kind] == pytest.approx(loss["2x1", kind], rel=1e-4)
    assert all(r[12].endswith("%") for r in rows)  # MFU against the in-run ceiling
    assert "DTR / none step time, jax - mesh 2x1" in train
    rows = table_rows(sampling, "jax")
    assert len(rows) == 1 and rows[0][5] == "2" and float(rows[0][10]) > 0  # steps, images/s


def test_torch_counterpart_runs_without_tensorflow_clu_grain_or_sklearn():
    runs = [
        ["benchmarks.torch_step", *TINY, "--batch", "4", "--kinds", "dtr", "--modes", "eager"]
        + ["--steps", "1", "--rounds", "1"],
        ["benchmarks.sample", *TINY, "--batch", "2", "--num-steps", "2", "--kinds", "dtr"]
        + ["--rounds", "1", "--ceiling", "0", "--torch", "eager"],
        ["benchmarks.matmul", "--size", "64", "--rounds", "1", "--torch"],
    ]
    train, sampling, matmul = run_blocked(runs, BARE_HOST_LACKS)
    frameworks = [row[:3] for row in table_rows(matmul, "jax") + table_rows(matmul, "torch")]
    assert frameworks == [["jax", "64^3", "float32"], ["torch", "64^3", "float32"]]
    for out, images_per_s in ((train, 9), (sampling, 10)):
        rows = table_rows(out, "torch eager")
        assert len(rows) == 1 and float(rows[0][images_per_s]) > 0
        assert "torch device: cpu" in out


def test_profile_attribution_splits_wall_time():
    """Nested events give their time to the innermost; parallel ones share it equally."""
    from benchmarks import profile_step

    one = profile_step.innermost_segments([(0, 10, "outer"), (2, 4, "a"), (6, 7, "b")])
    assert one == [(0, 2, "outer"), (2, 4, "a"), (4, 6, "outer"), (6, 7, "b"), (7, 10, "outer")]
    two = profile_step.innermost_segments([(3, 5, "c")])
    seconds = profile_step.attribute([one, two])
    # c runs 3..5: it shares 3..4 with a and 4..5 with outer
    assert seconds == {"outer": 6.5, "a": 1.5, "b": 1.0, "c": 1.0}
    assert sum(seconds.values()) == 10.0


def test_profile_step_classes_sum_to_the_profiled_step():
    """Both frameworks profiled for a tiny step: every class column sums to the profiled
    step time, and the model's own classes get time on both sides."""
    from benchmarks import profile_step

    (out,) = run_blocked(
        [["benchmarks.profile_step", *TINY, "--batch", "4", "--steps", "1"]],
        BARE_HOST_LACKS,
    )
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()]
    rows = {r[0]: r[1:] for r in cells if r[0] in profile_step.CLASSES}
    assert list(rows) == list(profile_step.CLASSES)
    (sums,) = [r[1:] for r in cells if r[0] == "**profiled step (sum)**"]
    for column in (0, 2):
        assert sum(float(r[column]) for r in rows.values()) == pytest.approx(
            float(sums[column]), abs=0.05
        )
    for cls in ("matmuls", "attention", "layer norm + modulation", "GELU", "routing"):
        assert float(rows[cls][0]) > 0 and float(rows[cls][2]) > 0, cls
    assert re.search(r"- jax: profiled [\d.]+ ms/step .* untraced [\d.]+ ms/step", out)


def test_tpu_plan_rows_resume_and_merge_by_part(tmp_path):
    """A row planned for its train step gains its sampler from a later run, not twice."""
    from benchmarks import tpu_plans

    def figures(program, flops):
        return dict(program=program, batch=256, compile_seconds=1.0, fits=True, flops=flops)

    key = tpu_plans.row_key("dit_b", "v5e-8", "dtr", "config", {})
    rows = [
        dict(key=key, programs=[figures("train step", 1.0)], seconds=1.0),
        dict(key="other", programs=[figures("train step", 5.0)], seconds=1.0),
        dict(key=key, programs=[figures("sampler", 2.0)], largest=dict(batch=512), seconds=2.0),
        dict(key=key, programs=[figures("train step", 3.0)], seconds=4.0),
        dict(key=key, programs=[figures("train step", float("nan")) | {"peak": 9}], seconds=1),
    ]
    path = tmp_path / "plans.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert tpu_plans.done_parts(str(path)) == {
        key: {"train", "sample", "largest"},
        "other": {"train"},
    }
    first, other = tpu_plans.merged_rows(str(path))
    assert other["key"] == "other" and first["key"] == key and first["seconds"] == 8.0
    by_program = {p["program"]: p["flops"] for p in first["programs"]}
    assert by_program == {"train step": 3.0, "sampler": 2.0} and first["largest"]["batch"] == 512
    assert first["programs"][0]["peak"] == 9  # a memory-only compile's peak joins the counts
