"""PyTorch interop: official-layout DiT / DTR state dicts and checkpoints in, official-layout
state dicts out (dtr_jax.interop), through the Python API and the CLI.

The PyTorch side is tests/torch_reference.py's TDiT (the releases' module names, and the
DTR release's routing buffer in every block) with random non-zero weights.
"""

import os
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import omegaconf
import optax
import pytest
import torch
from safetensors import torch as st_torch

import helpers
from dtr_jax import config as config_lib
from dtr_jax import export, inference, interop, modes, routing, sharding, torch_files
from dtr_jax import step as step_lib
from dtr_jax.config import ConfigError, with_overrides
from dtr_jax.models.dit import DiT, stack_blocks, unstack_blocks
from torch_reference import TDiT

T, DEPTH, HIDDEN, CLASSES = 1000, 2, 32, 10
ARCH = dict(
    input_size=8,
    in_channels=1,
    patch_size=2,
    hidden_size=HIDDEN,
    depth=DEPTH,
    num_heads=2,
    num_classes=CLASSES,
)


def tiny(**overrides):
    """The digits model shrunk to 2 blocks of width 32 (tests/helpers.py), 2 train steps."""
    return helpers.tiny(**({"model.depth": DEPTH, "num_train_steps": 2} | overrides))


def release_random_tables(seed=0):
    """Tables drawn as the DTR release draws 'random' ones (numpy's global RNG, one per
    block): no routing seed of ours reproduces them."""
    rng = np.random.RandomState(seed)
    tables = np.zeros((DEPTH, T, HIDDEN), np.float32)
    for table in tables:
        table[np.arange(T)[:, None], rng.rand(T, HIDDEN).argsort(1)[:, : int(HIDDEN * 0.8)]] = 1
    return tables


TABLES = {
    "none": None,  # the DiT release: no routing buffers
    "dtr": routing.model_tables("dtr", T, HIDDEN, DEPTH, 0.8, 4.0),
    "random": release_random_tables(),
}


def torch_dit(tables=None, seed=0, **arch) -> TDiT:
    """The official-layout reference with random non-zero weights everywhere."""
    torch.manual_seed(seed)
    model = TDiT(**(ARCH | arch), tables=tables).eval()
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name != "pos_embed":
                w.copy_(torch.randn_like(w) * (w[0].numel() ** -0.5 if w.ndim > 1 else 0.1))
    return model


def routing_for(kind, path):
    """Config overrides whose routing tables are those of a file holding TABLES[kind]."""
    if kind == "random":
        return {"model.routing.kind": "file", "model.routing.path": str(path)}
    return {"model.routing.kind": kind}


def inputs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 1, 8, 8), dtype=np.float32)
    t = np.array([0, 999, 500, 37])
    y = np.array([3, 0, CLASSES, 7])  # CLASSES: the null label
    return x, t, y


def torch_forward(model, x, t, y, cfg_scale=1.0, tables=None):
    """NHWC output of the PyTorch model, guided as DiT.guided guides (SPEC §3)."""
    x, t, y = (torch.from_numpy(np.asarray(a)) for a in (x, t, y))
    with torch.no_grad():
        cond = model(x, t, y, tables)
        if cfg_scale != 1.0:
            uncond = model(x, t, torch.full_like(y, CLASSES), tables)
            eps = uncond[:, :1] + cfg_scale * (cond[:, :1] - uncond[:, :1])
            cond = torch.cat([eps, cond[:, 1:]], 1)
    return cond.numpy().transpose(0, 2, 3, 1)


def jax_forward(exported, x, t, y, cfg_scale=1.0):
    x = x.transpose(0, 2, 3, 1)
    if cfg_scale == 1.0:
        return np.asarray(exported.apply(x, t, y))
    variables = {"params": exported.params}
    return np.asarray(
        exported.model.apply(
            variables, x, t, y, exported.tables, cfg_scale=cfg_scale, method=DiT.guided
        )
    )


def assert_close(got, want, tol=1e-5):
    """max |got - want| <= tol * max(1, max |want|)."""
    err, scale = np.max(np.abs(got - want)), np.max(np.abs(want))
    assert err <= tol * max(1.0, scale), f"max abs err {err:.3g} (output scale {scale:.3g})"


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def numpy_state_dict(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


# ============================================================ 1. state dicts in


@pytest.mark.parametrize("kind", ["none", "dtr", "random"])
def test_state_dict_imports_with_the_same_outputs(tmp_path, kind):
    reference = torch_dit(TABLES[kind])
    path = tmp_path / "dit.pt"
    torch.save(reference.state_dict(), path)
    config = tiny(init_from=str(path), **routing_for(kind, path))
    exported = export.from_pytorch(config)  # the Python API; validates as --mode export
    if kind == "none":
        assert exported.tables is None
    else:
        full = [interop.full_tables(x, DEPTH, T, HIDDEN) for x in (exported.tables, TABLES[kind])]
        np.testing.assert_array_equal(*full)
    summary = interop.open_checkpoint(str(path)).summary()
    assert summary.startswith("state dict (weights), routing buffers: " + kind), summary
    x, t, y = inputs()
    for cfg_scale in (1.0, 3.0):
        want = torch_forward(reference, x, t, y, cfg_scale)
        assert_close(jax_forward(exported, x, t, y, cfg_scale), want)
    if kind != "none":  # the routing is not vacuous
        plain = torch_forward(reference, x, t, y, tables=torch.ones(1, T, HIDDEN))
        assert np.max(np.abs(plain - torch_forward(reference, x, t, y))) > 1e-2


def test_half_precision_ddp_prefixes_and_every_file_type(tmp_path):
    reference = torch_dit(TABLES["dtr"])
    sd = reference.state_dict()
    files = {
        "bf16.pth": {f"module.{k}": v.bfloat16() for k, v in sd.items()},
        "fp16.safetensors": {f"_orig_mod.{k}": v.half() for k, v in sd.items()},
        "bf16.safetensors": {f"module._orig_mod.{k}": v.bfloat16() for k, v in sd.items()},
    }
    for name, state in files.items():
        path = str(tmp_path / name)
        if name.endswith(".safetensors"):
            st_torch.save_file(state, path)
        else:
            torch.save(state, path)
        dtype = torch.bfloat16 if "bf16" in name else torch.float16
        want = interop.params_from_torch({k: v.to(dtype).float() for k, v in sd.items()})
        got = interop.open_checkpoint(path).params()
        assert_trees_equal(got, want)
        config_lib.validate(tiny(init_from=path), 8, mode="sample")  # pos_embed within fp16/bf16


def test_safetensors_are_read_without_torch(tmp_path):
    path = tmp_path / "bf16.safetensors"
    sd = torch_dit(TABLES["dtr"]).state_dict()
    st_torch.save_file({k: v.bfloat16() for k, v in sd.items()}, str(path))
    want = interop.params_from_torch({k: v.bfloat16().float() for k, v in sd.items()})
    np.save(tmp_path / "want.npy", want["blocks_1"]["attn"]["qkv"]["kernel"])
    code = (
        "import sys; sys.modules['torch'] = None\n"  # `import torch` now fails
        "import numpy as np; from dtr_jax import interop\n"
        f"ckpt = interop.open_checkpoint({str(path)!r})\n"
        "got = ckpt.params()['blocks_1']['attn']['qkv']['kernel']\n"
        f"np.testing.assert_array_equal(got, np.load({str(tmp_path / 'want.npy')!r}))\n"
        "assert ckpt.tables().shape == (2, 1000, 32) and not interop.torch_available()\n"
        "assert sys.modules['torch'] is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=helpers.ROOT)


# ============================================================ 2. DTR release checkpoints in


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A DTR release UW training checkpoint, as its train.py saves one: the DDP model's
    state dict, a different EMA, the AdamW state (model + UW groups) after 2 steps, the
    OmegaConf config and the DDP-wrapped UW module; plus the torch objects behind it."""
    model = torch_dit(TABLES["dtr"], seed=1)
    ema = torch_dit(TABLES["dtr"], seed=2)
    loss_scale = torch.nn.Parameter(torch.linspace(-0.5, 0.5, 8))
    c = tiny().optimizer
    opt = torch.optim.AdamW(
        [
            {"params": model.parameters()},
            {"params": [loss_scale], "lr": 0.025, "weight_decay": 0.0},
        ],
        lr=c.learning_rate,
        betas=(c.b1, c.b2),
        eps=c.eps,
        weight_decay=c.weight_decay,
    )
    torch.manual_seed(3)
    for _ in range(2):
        random_gradients(model, loss_scale)
        opt.step()
    config = omegaconf.OmegaConf.create(
        {"models": {"name": "DiT-S/2", "routing": {"sharing_ratio": 0.8, "init_method": "DTR"}}}
    )
    path = tmp_path_factory.mktemp("release") / "0000002.pt"
    checkpoint = {
        "model": {f"module.{k}": v for k, v in model.state_dict().items()},
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
        "config": config,
        "uw": {"module.loss_scale": loss_scale.detach().clone()},
    }
    torch.save(checkpoint, path)
    return str(path), model, ema, loss_scale, opt


def random_gradients(model, loss_scale):
    for name, p in model.named_parameters():
        if name != "pos_embed":  # frozen in the releases: no gradient, no AdamW state
            p.grad = torch.randn_like(p) * 0.1
    loss_scale.grad = torch.randn_like(loss_scale)


def release_config(path, **overrides):
    return tiny(**({"init_from": path, "weighting.kind": "uw"} | overrides))


def test_release_checkpoint_imports_and_adamw_continues_exactly(release):
    path, model, ema, loss_scale, opt = release
    ckpt = interop.open_checkpoint(path)
    assert (ckpt.kind, ckpt.ignored, ckpt.step) == ("training checkpoint", ("config",), 2)
    assert ckpt.summary() == (
        "training checkpoint (model, ema, opt, uw; not read: config), "
        "routing buffers: dtr (beta 0.8, alpha 4)"
    )
    config = release_config(path)
    config_lib.validate(config, 8, mode="train")
    setup = step_lib.create_setup(config)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    _, shardings = step_lib.state_layout(setup, mesh)
    state = jax.device_get(step_lib.create_state(setup, mesh, shardings))
    assert_trees_equal(state.params, interop.params_from_torch(model.state_dict()))
    assert_trees_equal(state.ema_params, interop.params_from_torch(ema.state_dict()))
    np.testing.assert_array_equal(state.uw_log_vars, loss_scale.detach().numpy())
    assert int(state.step) == 0

    # One more AdamW step with the same gradients on both sides lands on the same params.
    torch.manual_seed(4)
    random_gradients(model, loss_scale)
    grads = interop.params_from_torch(
        {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    )
    uw_grad = loss_scale.grad.numpy().copy()
    opt.step()
    updates, _ = setup.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    want = interop.params_from_torch(model.state_dict())
    for got, expected in zip(jax.tree.leaves(new_params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), new_params, state.params)
    assert min(jax.tree.leaves(moved)) > 1e-5  # the step is not vacuous
    uw_updates, _ = setup.uw_tx.update(uw_grad, state.uw_opt_state, state.uw_log_vars)
    new_uw = optax.apply_updates(state.uw_log_vars, uw_updates)
    np.testing.assert_allclose(new_uw, loss_scale.detach().numpy(), rtol=0, atol=1e-6)

    # Chained with clipping, the moments land in the chain's Adam state.
    adam, _ = ckpt.adam()
    clipped = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    chained = interop.with_adam(clipped.init(state.params), adam)
    assert int(chained[1][0].count) == 2
    assert_trees_equal(chained[1][0].mu, adam.mu)


def test_training_starts_from_the_file_and_resumes_from_its_own_checkpoint(
    release, tmp_path, monkeypatch
):
    path, *_ = release
    workdir = str(tmp_path / "run")
    state = modes.run("train", release_config(path), workdir)
    assert int(state.step) == 2
    assert int(jax.device_get(state.opt_state[0].count)) == 2 + 2  # the file's 2 steps, then ours

    def no_import(*args):
        raise AssertionError("a resumed run must not import init_from again")

    monkeypatch.setattr(step_lib, "import_state", no_import)
    resumed = modes.run("train", release_config(path, num_train_steps=3), workdir)
    assert int(resumed.step) == 3 and int(jax.device_get(resumed.opt_state[0].count)) == 5


def test_a_state_dict_fine_tunes_with_a_fresh_optimizer(tmp_path):
    """The DiT release's files hold weights only: params and EMA start from them, AdamW
    from scratch."""
    path = tmp_path / "dit.pt"
    torch.save(torch_dit(TABLES["dtr"]).state_dict(), path)
    config = release_config(str(path))
    state = modes.run("train", config, str(tmp_path / "run"))
    assert int(state.step) == 2
    assert int(jax.device_get(state.opt_state[0].count)) == 2  # fresh: our 2 steps only
    imported = interop.open_checkpoint(str(path)).params()
    lr, decay = config.optimizer.learning_rate, config.optimizer.ema_decay
    step_size = 2 * lr  # AdamW moves a param <= lr per step
    moved = 0.0
    for ema, want, params in zip(
        jax.tree.leaves(jax.device_get(state.ema_params)),
        jax.tree.leaves(imported),
        jax.tree.leaves(jax.device_get(state.params)),
        strict=True,
    ):
        assert np.abs(params - want).max() <= 1.01 * step_size + 1e-7
        # EMA of the file's weights: (1 - decay) * ((step 1's move) * decay + step 2's)
        assert np.abs(ema - want).max() <= 1.01 * (1 - decay) * (lr + 2 * lr)
        moved = max(moved, float(np.abs(params - want).max()))
    assert moved > 0.1 * step_size  # it trained


def test_a_scanned_model_imports_trains_and_exports_the_per_block_layout(release, tmp_path):
    """model.scan_blocks stacks the block params: imports (params, EMA, AdamW moments) are
    stacked to fit, exports unstacked back to the official layout, and a checkpoint of
    one layout is refused by a config of the other."""
    path, *_ = release
    per_block = modes.run("train", release_config(path), str(tmp_path / "per_block"))
    workdir = str(tmp_path / "scanned")
    scan = {"model.scan_blocks": True}
    scanned = modes.run("train", release_config(path, **scan), workdir)
    assert scanned.params["blocks"]["attn"]["qkv"]["kernel"].shape[0] == DEPTH
    unstacked = unstack_blocks(jax.device_get(scanned.opt_state[0].mu))
    for a, b in zip(
        jax.tree.leaves(unstacked), jax.tree.leaves(per_block.opt_state[0].mu), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)

    out = modes.run("export", release_config(path, **scan), workdir)
    state = st_torch.load_file(os.path.join(out, "pytorch_model.safetensors"))
    back = TDiT(**ARCH, tables=TABLES["dtr"]).eval()
    back.load_state_dict(state, strict=True)
    want = unstack_blocks(jax.device_get(scanned.ema_params))
    x, t, y = inputs()
    got = export.load(out).apply(x.transpose(0, 2, 3, 1), t, y)
    model = inference.from_config(release_config(path)).model
    expected = model.apply({"params": want}, x.transpose(0, 2, 3, 1), t, y, TABLES["dtr"])
    assert_close(np.asarray(got), np.asarray(expected), tol=1e-6)
    with pytest.raises(ConfigError, match="param_layout"):
        modes.run("train", release_config(path, num_train_steps=3), workdir)


def test_foreign_pickled_objects_become_inert_and_blocked_modules_are_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()

    class Deletes:
        def __reduce__(self):
            return shutil.rmtree, (str(victim),)

    class Runs:
        def __reduce__(self):
            return os.system, (f"rm -r {victim}",)

    sd = torch_dit(TABLES["dtr"]).state_dict()
    torch.save({"model": sd, "ema": sd, "config": Deletes()}, tmp_path / "deletes.pt")
    ckpt = interop.open_checkpoint(str(tmp_path / "deletes.pt"))
    assert ckpt.ignored == ("config",) and victim.is_dir()
    torch.save({"model": sd, "ema": sd, "config": Runs()}, tmp_path / "runs.pt")
    with pytest.raises(ValueError, match="cannot be read with torch.load.*blocked"):
        interop.open_checkpoint(str(tmp_path / "runs.pt"))
    assert victim.is_dir()


# ============================================================ 3. the CLI from an imported file


@pytest.fixture(scope="module")
def plain_file(tmp_path_factory):
    """The DiT release's kind of file: one state dict (here with DTR routing buffers)."""
    reference = torch_dit(TABLES["dtr"], seed=5)
    path = tmp_path_factory.mktemp("plain") / "DiT-digits.pt"
    torch.save(reference.state_dict(), path)
    return str(path), reference


def test_sample_evaluate_and_export_from_init_from(plain_file, tmp_path):
    path, reference = plain_file
    workdir = str(tmp_path / "work")
    config = tiny(
        **{
            "init_from": path,
            "sample.num_samples": 4,
            "sample.batch_size": 4,
            "eval.num_samples": 10,
        }
    )
    samples = np.load(modes.run("sample", config, workdir))
    assert samples["arr_0"].shape == (4, 8, 8, 1) and samples["arr_0"].dtype == np.uint8
    assert 0 <= modes.run("evaluate", config, workdir)["digits_accuracy"] <= 1
    out = modes.run("export", config, workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    for name in ("pytorch_model.pt", "pytorch_model.safetensors"):
        file = os.path.join(out, name)
        state = (
            torch.load(file, weights_only=True)
            if name.endswith(".pt")
            else st_torch.load_file(file)
        )
        back = TDiT(**ARCH, tables=TABLES["dtr"]).eval()
        back.load_state_dict(state, strict=True)
        x, t, y = inputs()
        np.testing.assert_array_equal(
            torch_forward(back, x, t, y), torch_forward(reference, x, t, y)
        )
    loaded = export.load(out)  # the JAX export of the same params
    assert_close(
        np.asarray(loaded.apply(x.transpose(0, 2, 3, 1), t, y)), torch_forward(reference, x, t, y)
    )


def test_main_without_torch_exports_a_safetensors_file_and_refuses_a_pt(plain_file, tmp_path):
    path, _ = plain_file
    original = torch.load(path, weights_only=True)
    as_safetensors = tmp_path / "DiT-digits.safetensors"
    st_torch.save_file(original, str(as_safetensors))
    out = tmp_path / "exported"
    env = helpers.cli_env(DTR_TEST_FAULT="no_torch")
    arch = ["--config.model.depth=2", "--config.model.hidden_size=32", "--config.model.num_heads=2"]

    def main(init_from):
        command = [sys.executable, str(helpers.FAULTY_MAIN), f"--config={helpers.DIGITS}"]
        command += [f"--workdir={tmp_path / 'work'}", "--mode=export", *arch]
        command += [f"--config.init_from={init_from}", f"--config.export.dir={out}"]
        return subprocess.run(command, cwd=helpers.ROOT, env=env, capture_output=True, text=True)

    refused = main(path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "is a PyTorch file: reading it needs torch" in refused.stderr
    done = main(as_safetensors)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(out)) == sorted(  # no .pt without torch
        ["model.json", "model.msgpack", "model.safetensors", "pytorch_model.safetensors"]
    )
    exported = st_torch.load_file(str(out / "pytorch_model.safetensors"))
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0)


def test_legacy_pt_files_folders_and_stacked_params(tmp_path):
    sd = torch_dit(TABLES["dtr"]).state_dict()
    legacy = tmp_path / "legacy.pt"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    assert_trees_equal(interop.open_checkpoint(str(legacy)).params(), interop.params_from_torch(sd))
    with pytest.raises(ValueError, match="is a folder: name the checkpoint file"):
        interop.open_checkpoint(str(tmp_path))
    dm = inference.from_config(tiny())
    stacked = stack_blocks(random_params(dm))
    with pytest.raises(ValueError, match="stacked blocks of model.scan_blocks.*unstack_blocks"):
        interop.params_to_torch(stacked, dm.model, dm.tables)


# ============================================================ 4. JAX params out


def random_params(dm, seed=0):
    """Params of `dm`'s model with every leaf random (the zero-initialised ones too)."""
    params = nn.unbox(jax.device_get(dm.init_params(jax.random.key(seed))))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: (rng.standard_normal(p.shape) * 0.2).astype(np.float32), params)


def test_jax_params_export_to_a_strict_pytorch_load_and_round_trip_bit_exact(tmp_path):
    config = tiny(**{"model.routing.kind": "random"})  # this package's seeded random tables
    dm = inference.from_config(config)
    params = random_params(dm)
    out = export.export(params, config, str(tmp_path / "export"), tables=dm.tables)
    x, t, y = inputs()
    want = jax_forward(export.load(out), x, t, y)
    python_api = str(tmp_path / "direct.pth")
    interop.save(interop.params_to_torch(params, dm.model, dm.tables), python_api)
    for path in (f"{out}/pytorch_model.pt", f"{out}/pytorch_model.safetensors", python_api):
        if path.endswith(".safetensors"):
            state = st_torch.load_file(path)
        else:
            state = torch.load(path, weights_only=True)
        assert all(v.dtype == torch.float32 for v in state.values())
        back = TDiT(
            **ARCH, tables=np.zeros((DEPTH, T, HIDDEN))
        ).eval()  # buffers come from the file
        back.load_state_dict(state, strict=True)
        assert_close(want, torch_forward(back, x, t, y))
        ckpt = interop.open_checkpoint(path)
        assert_trees_equal(ckpt.params(), params)  # JAX -> PyTorch -> JAX, bit for bit
        np.testing.assert_array_equal(ckpt.tables(), dm.tables)


def test_export_without_torch_writes_the_safetensors_only(tmp_path, monkeypatch):
    config = tiny(**{"model.routing.kind": "none"})
    dm = inference.from_config(config)
    params = random_params(dm)
    monkeypatch.setattr(interop, "torch_available", lambda: False)
    out = export.export(params, config, str(tmp_path / "export"), tables=dm.tables)
    assert sorted(os.listdir(out)) == sorted(
        ["model.json", "model.msgpack", "model.safetensors", "pytorch_model.safetensors"]
    )
    state = torch_files.read_safetensors(f"{out}/pytorch_model.safetensors")
    assert not any(interop.ROUTING_BUFFER.match(k) for k in state)  # a DiT release layout
    assert_trees_equal(interop.params_from_torch(state), params)


def test_unconditional_models_have_each_releases_class_rows():
    config = tiny(**{"model.num_classes": 1})
    dm = inference.from_config(config)
    params = random_params(dm)
    state = interop.params_to_torch(params, dm.model, dm.tables)
    assert state["y_embedder.embedding_table.weight"].shape == (1, HIDDEN)
    ckpt = interop.Checkpoint("memory", "state dict", {"model": state, "ema": state})
    assert ckpt.problems(dm.model, T) == []
    back = ckpt.params()
    table = back["y_embedder"]["embedding_table"]["embedding"]
    np.testing.assert_array_equal(table[1], 0)  # the null row, never used with one class
    x, t, _ = inputs()
    args = (x.transpose(0, 2, 3, 1), t, np.zeros(4, np.int32), dm.tables)
    outputs = [dm.model.apply({"params": p}, *args) for p in (back, params)]
    np.testing.assert_array_equal(*outputs)
    with_null_row = dict(state, **{"y_embedder.embedding_table.weight": np.zeros((2, HIDDEN))})
    kept = interop.Checkpoint(
        "memory", "state dict", {"model": with_null_row, "ema": with_null_row}
    )
    assert kept.problems(dm.model, T) == []
    # Without routing buffers the target is the DiT release, whose LabelEmbedder keeps a
    # null row for one class too (num_classes + (dropout_prob > 0)): both rows go out.
    plain = inference.from_config(tiny(**{"model.num_classes": 1, "model.routing.kind": "none"}))
    state = interop.params_to_torch(params, plain.model, plain.tables)
    assert state["y_embedder.embedding_table.weight"].shape == (2, HIDDEN)
    assert_trees_equal(interop.params_from_torch(state), params)


# ============================================================ 5. refusals


def drop_block(tmp_path, block):
    sd = torch_dit(TABLES["dtr"]).state_dict()
    path = tmp_path / "truncated.pt"
    torch.save({k: v for k, v in sd.items() if not k.startswith(f"blocks.{block}.")}, path)
    return path


def extra_block(tmp_path):
    """A deeper model's state dict: its last block is not expected."""
    sd = torch_dit(TABLES["dtr"]).state_dict()
    sd |= {k.replace("blocks.0.", f"blocks.{DEPTH}."): v for k, v in sd.items() if "blocks.0." in k}
    path = tmp_path / "deeper.pt"
    torch.save(sd, path)
    return path


def other_size(tmp_path):
    path = tmp_path / "wider.safetensors"
    st_torch.save_file(torch_dit(hidden_size=64).state_dict(), str(path))
    return path


def cut_short(tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    sd = torch_dit().state_dict()
    st_torch.save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    return path


def moved_pos_embed(tmp_path):
    sd = torch_dit().state_dict()
    sd["pos_embed"] = sd["pos_embed"] + 1e-3
    torch.save(sd, tmp_path / "pos.pt")
    return tmp_path / "pos.pt"


def unknown_type(tmp_path):
    path = tmp_path / "dit.bin"
    torch.save(torch_dit().state_dict(), path)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: drop_block(p, 1),
            r"does not hold this model: 'blocks\.1\.adaLN_modulation\.1\.bias' is missing",
        ),
        (
            extra_block,
            rf"does not hold this model: 'blocks\.{DEPTH}\.adaLN_modulation\.1\.bias' is not "
            "expected",
        ),
        (
            other_size,
            r"does not hold this model: 'blocks\.0\.adaLN_modulation\.1\.bias' has shape \(384,\), "
            r"expected \(192,\)",
        ),
        (
            lambda p: cut_short(p, ".safetensors"),
            r"is cut short: first incomplete tensor: '[\w.]+'",
        ),
        (lambda p: cut_short(p, ".pt"), "cannot be read with torch.load"),
        (lambda p: p / "nothing.pt", "does not exist"),
        (moved_pos_embed, r"'pos_embed' is not the fixed 2-D sin-cos embedding"),
        (unknown_type, r"has an unknown file type: expected \.pt, \.pth, \.safetensors"),
    ],
    ids=["truncated", "deeper", "other_size", "cut_safetensors", "cut_pt", "missing", "pos_embed"]
    + ["type"],
)
def test_wrong_files_are_refused_naming_the_key(tmp_path, make, message):
    path = make(tmp_path)
    config = tiny(init_from=str(path), **{"model.routing.kind": "none"})
    with pytest.raises(ConfigError, match=f"init_from='{re.escape(str(path))}' {message}"):
        config_lib.validate(config, 8, mode="sample")
    workdir = tmp_path / "work"
    with pytest.raises(ConfigError, match=message):
        modes.run("train", config, str(workdir))
    assert not workdir.exists()  # refused before anything was written or compiled


@pytest.mark.parametrize(
    "file_tables, kind, fix",
    [
        ("dtr0.5", "dtr", "--config.model.routing.kind=dtr --config.model.routing.beta=0.5"),
        ("none", "dtr", "--config.model.routing.kind=none"),
        ("dtr", "none", "--config.model.routing.kind=dtr --config.model.routing.beta=0.8"),
        ("random", "dtr", "--config.model.routing.kind=file --config.model.routing.path={path}"),
    ],
)
def test_other_routing_is_refused_with_the_overrides_that_fit(tmp_path, file_tables, kind, fix):
    tables = (
        routing.model_tables("dtr", T, HIDDEN, DEPTH, 0.5)
        if file_tables == "dtr0.5"
        else TABLES[file_tables]
    )
    path = tmp_path / "dit.pt"
    torch.save(torch_dit(tables).state_dict(), path)
    config = tiny(init_from=str(path), **{"model.routing.kind": kind})
    with pytest.raises(ConfigError) as refused:
        config_lib.validate(config, 8, mode="train")
    message = str(refused.value)
    assert f"model.routing.kind='{kind}' builds other routing tables" in message
    assert fix.format(path=path) in message, message
    overrides = dict(re.findall(r"--config\.(\S+)=(\S+)", message))
    overrides = {k: float(v) if k.endswith("beta") else v for k, v in overrides.items()}
    config_lib.validate(with_overrides(config, **overrides), 8, mode="train")  # now it fits


def test_uw_log_variances_of_another_count_are_refused(release):
    path, *_ = release
    config = release_config(path, **{"weighting.num_clusters": 4})
    with pytest.raises(ConfigError, match="weighting.num_clusters=4 but init_from=.* holds 8 UW"):
        config_lib.validate(config, 8, mode="train")


# ============================================================ 6. routing tables from a file


def test_routing_file_tables_are_named_by_their_content(tmp_path):
    npy = tmp_path / "tables.npy"
    np.save(npy, TABLES["random"].astype(np.uint8))
    config = tiny(**{"model.routing.kind": "file", "model.routing.path": str(npy)})
    digest = interop.tables_digest(TABLES["random"])
    assert config_lib.model_spec(config)["routing"] == {"kind": "file", "sha256": digest}
    workdir = str(tmp_path / "run")
    modes.run("train", config, workdir)
    out = modes.run("export", config, workdir)
    assert export.load(out).spec["routing"]["kind"] == "custom"
    # The same tables in another file (the export's) are the same model: sampling reads it.
    moved = with_overrides(
        config,
        **{
            "model.routing.path": f"{out}/model.safetensors",
            "sample.num_samples": 2,
            "sample.batch_size": 2,
        },
    )
    assert np.load(modes.run("sample", moved, workdir))["arr_0"].shape == (2, 8, 8, 1)
    # Other tables are another model: resuming and reading are refused.
    np.save(npy, np.roll(TABLES["random"], 1, axis=-1).astype(np.uint8))
    for mode in ("train", "sample"):
        with pytest.raises(ConfigError, match="routing.sha256: checkpoint"):
            modes.run(mode, with_overrides(config, num_train_steps=3), workdir)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"model.routing.path='' must name the tables' file"),
        ("missing", r"model.routing.path='.*missing.npy' does not exist"),
        (
            np.ones((1, T, 16), np.uint8),
            r"expected \(1 or depth=2, num_timesteps=1000, hidden_size=32\)",
        ),
        (np.full((1, T, HIDDEN), 2, np.uint8), r"they must be \(G, T, C\) of 0/1"),
    ],
    ids=["empty", "missing", "shape", "values"],
)
def test_bad_routing_files_are_refused(tmp_path, content, message):
    path = "" if content is None else str(tmp_path / "missing.npy")
    if isinstance(content, np.ndarray):
        path = str(tmp_path / "tables.npy")
        np.save(path, content)
    config = tiny(**{"model.routing.kind": "file", "model.routing.path": path})
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(config, 8, mode="sample")


# ============================================================ 7. routing tables recognised


@pytest.mark.parametrize(
    "channels, beta", [(32, 0.8), (384, 0.3), (768, 0.5), (1024, 0.65), (1152, 0.8)]
)
def test_dtr_tables_are_recognised_with_their_beta_and_alpha(channels, beta):
    dtr = routing.model_tables("dtr", T, channels, 1, beta, 4.0)
    assert interop.classify_tables(dtr) == {"kind": "dtr", "beta": beta, "alpha": 4.0}
    slow = routing.model_tables("dtr", T, channels, 1, beta, 2.0)
    assert interop.classify_tables(slow, alphas=(4.0, 2.0))["alpha"] == 2.0
    assert interop.classify_tables(slow) == {"kind": "random"}  # not the release's alpha
    assert interop.classify_tables(routing.model_tables("random", T, channels, 3, beta)) == {
        "kind": "random"
    }
    assert (
        interop.classify_tables(None)
        == interop.classify_tables(np.ones((1, T, channels)))
        == {"kind": "none"}
    )
