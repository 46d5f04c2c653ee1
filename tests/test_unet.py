"""The ADM U-Net with DTR (dtr_jax.models.unet), against guided-diffusion's UNetModel.

The PyTorch side is tests/torch_unet.py: guided-diffusion's UNetModel restated with its
module names, plus the same routing masks. Weights are random and non-zero everywhere; the
state dicts go through dtr_jax.interop's guided-diffusion layout, files and `init_from`.
"""

import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import helpers
from dtr_jax import config as config_lib
from dtr_jax import export, inference, interop, models, modes, routing, sharding, train
from dtr_jax import step as step_lib
from dtr_jax.config import ConfigError, load_config, with_overrides
from dtr_jax.models.unet import UNet
from torch_unet import UNetModel

T = 1000
DIGITS_UNET = str(helpers.ROOT / "configs" / "digits_unet.py")
TINY = {  # the digits U-Net (ADM-XS: widths 32 and 64, 8x8 and 4x4) shrunk to run in seconds
    "num_train_steps": 2,
    "global_batch_size": 8,
    "log_every_steps": 1,
    "checkpoint_every_steps": 100,
    "sample_every_steps": 0,
    "optimizer.warmup_steps": 0,
    "mesh.data": -1,
    "mesh.fsdp": 1,
    "sample.num_steps": 4,
    "sample.num_samples": 8,
    "sample.batch_size": 8,
    "sample.grid_per_class": 1,
    "eval.num_samples": 8,
}
# the options the 64x64 release does not use: legacy attention order with a head count,
# conv resampling, no scale-shift norm; unconditional
OTHER = {
    "model.unet.use_new_attention_order": False,
    "model.unet.num_head_channels": -1,
    "model.unet.num_heads": 2,
    "model.unet.resblock_updown": False,
    "model.unet.use_scale_shift_norm": False,
    "model.num_classes": 1,
}


def tiny(**overrides):
    return load_config(DIGITS_UNET, **(TINY | overrides))


def torch_twin(model: UNet, seed=0) -> UNetModel:
    """guided-diffusion's UNetModel of `model`'s options, random non-zero weights."""
    torch.manual_seed(seed)
    labels = None if model.num_classes == 1 else model.num_classes + int(model.null_label)
    twin = UNetModel(
        model.input_size,
        model.in_channels,
        model.model_channels,
        model.out_channels,
        model.num_res_blocks,
        model.attention_resolutions,
        channel_mult=model.channel_mult,
        num_classes=labels,
        num_heads=model.num_heads,
        num_head_channels=model.num_head_channels,
        use_scale_shift_norm=model.use_scale_shift_norm,
        resblock_updown=model.resblock_updown,
        use_new_attention_order=model.use_new_attention_order,
        route_head=model.route_head,
    ).eval()
    with torch.no_grad():
        for w in twin.parameters():
            w.copy_(torch.randn_like(w) * (w[0].numel() ** -0.5 if w.ndim > 1 else 0.1))
    return twin


def inputs(model: UNet, batch=4):
    """x NHWC, distinct t in [0, T), labels (with the null label where there is one)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, 8, 8, model.in_channels), dtype=np.float32)
    t = np.array([0, 999, 500, 37][:batch])
    y = np.array([3, 0, model.num_classes if model.null_label else 9, 7][:batch])
    return x, t, y


def torch_forward(twin, model, x, t, y, tables=None, task=None):
    """NHWC output of the PyTorch twin (tables: {width: (G, T, width)} numpy)."""
    args = [torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)]
    args.append(None if model.num_classes == 1 else torch.from_numpy(y))
    tables = None if tables is None else {w: torch.from_numpy(v) for w, v in tables.items()}
    task = None if task is None else torch.from_numpy(task)
    with torch.no_grad():
        return twin(*args, tables=tables, task=task).numpy().transpose(0, 2, 3, 1)


def assert_close(got, want, tol=1e-5):
    """max |got - want| <= tol * max(1, max |want|)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err, scale = np.max(np.abs(got - want)), np.max(np.abs(want))
    assert err <= tol * max(1.0, scale), f"max abs err {err:.3g} (output scale {scale:.3g})"


def tables_of(model, kind, seed=5):
    return routing.width_tables(kind, T, model.routed_widths(), 0.8, 4.0, seed)


@pytest.fixture(scope="module", params=["conditional", "other options"])
def pair(request, tmp_path_factory):
    """(config, Flax U-Net, its params, the PyTorch twin, the twin's state dict file)."""
    config = tiny(**(OTHER if request.param == "other options" else {}))
    model = inference.from_config(config).model
    twin = torch_twin(model)
    path = tmp_path_factory.mktemp("unet") / "unet.pt"
    torch.save(twin.state_dict(), path)
    return config, model, interop.params_from_torch(twin.state_dict()), twin, str(path)


# ============================================================ 1. guided-diffusion's model


def test_params_map_one_to_one_onto_the_state_dict(pair):
    config, model, params, twin, _ = pair
    init = nn.unbox(inference.from_config(config).abstract_params())
    assert jax.tree.structure(params) == jax.tree.structure(init)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, init)
    shapes = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    assert interop.torch_shapes(model) == shapes
    kernel = params["input_blocks_1_0"]["out_layers_3"]["kernel"]  # HWIO <- OIHW
    weight = twin.state_dict()["input_blocks.1.0.out_layers.3.weight"].numpy()
    np.testing.assert_array_equal(kernel, weight.transpose(2, 3, 1, 0))


@pytest.mark.parametrize("kind", ["none", "dtr", "random"])
def test_outputs_equal_guided_diffusions(pair, kind):
    config, model, params, twin, _ = pair
    x, t, y = inputs(model)
    tables = tables_of(model, kind)
    got = model.apply({"params": params}, x, t, y, tables)
    assert got.shape == (4, 8, 8, 2) and got.dtype == jnp.float32
    assert_close(got, torch_forward(twin, model, x, t, y, tables))
    if kind != "none":  # the routing is not vacuous
        assert np.max(np.abs(np.asarray(got - model.apply({"params": params}, x, t, y)))) > 1e-2


def test_task_picks_the_rows_and_the_head_switch(pair):
    """`task` (not t) indexes the tables; route_head=False leaves the head unrouted."""
    config, model, params, twin, _ = pair
    x, t, y = inputs(model)
    task = np.array([999, 0, 250, 37])
    tables = tables_of(model, "random")
    got = model.apply({"params": params}, x, t, y, tables, task=task)
    assert_close(got, torch_forward(twin, model, x, t, y, tables, task=task))
    assert np.max(np.abs(np.asarray(got - model.apply({"params": params}, x, t, y, tables)))) > 1e-3
    unrouted = model.clone(route_head=False)
    twin.route_head = False
    try:
        tables = tables_of(unrouted, "random")
        got = unrouted.apply({"params": params}, x, t, y, tables)
        assert_close(got, torch_forward(twin, model, x, t, y, tables))
    finally:
        twin.route_head = True


# ============================================================ 2. the routing rule


def zero_layer_inputs(model, params, x, t, y, tables):
    """{module path: the input it received} of every zero-initialised layer (ResBlock
    out_layers_3, the head's out_2) and every attention qkv, in one forward pass."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        name = context.module.name
        if context.method_name == "__call__" and name in ("out_layers_3", "out_2", "qkv"):
            seen["/".join(context.module.path)] = np.asarray(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply({"params": params}, x, t, y, tables)
    return seen


def test_a_masked_channel_cannot_reach_the_zero_initialised_layer(pair):
    """The input of every layer after a routed GroupNorm is exactly 0 in each sample's
    masked channels (SiLU(0) = 0, dropout keeps 0) and non-zero in its active ones."""
    config, model, params, twin, _ = pair
    x, t, y = inputs(model)
    tables = tables_of(model, "random")
    seen = zero_layer_inputs(model, params, x, t, y, tables)
    widths = model.routed_widths()
    assert len(seen) == len(widths)  # one routed GroupNorm per site
    taken = {}
    for (path, h), width in zip(seen.items(), widths, strict=True):
        k = taken[width] = taken.get(width, -1) + 1
        mask = tables[width][k][t]  # (B, width)
        h = h.reshape(len(t), -1, width)
        masked = np.broadcast_to(mask[:, None, :] == 0, h.shape)
        assert np.all(h[masked] == 0), path
        assert np.count_nonzero(h[~masked]) > 0.9 * (~masked).sum(), path
    plain = zero_layer_inputs(model, params, x, t, y, None)
    assert all(np.count_nonzero(h) > 0.9 * h.size for h in plain.values())


def test_none_and_all_ones_tables_are_the_plain_unet_bit_for_bit(pair):
    config, model, params, twin, _ = pair
    x, t, y = inputs(model)
    assert tables_of(model, "none") is None
    ones = routing.width_tables("dtr", T, model.routed_widths(), beta=1.0)
    assert all(np.all(v == 1) for v in ones.values())
    plain = model.apply({"params": params}, x, t, y)
    np.testing.assert_array_equal(model.apply({"params": params}, x, t, y, ones), plain)


def test_tables_are_one_per_width_shared_by_dtr_and_drawn_per_site_by_random():
    model = inference.from_config(tiny()).model
    widths = model.routed_widths()
    # in: ResBlock 32, ResBlock 32 (down), ResBlock 64 + attention; middle: 64, attention,
    # 64; out: 2 x (ResBlock 64 + attention), ResBlock 64 (up), 2 x ResBlock 32; head 32
    assert widths == [32, 32, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 32, 32, 32]
    dtr, rand = tables_of(model, "dtr"), tables_of(model, "random")
    assert {w: v.shape for w, v in dtr.items()} == {32: (1, T, 32), 64: (1, T, 64)}
    assert {w: v.shape for w, v in rand.items()} == {32: (5, T, 32), 64: (10, T, 64)}
    np.testing.assert_array_equal(dtr[64][0], routing.routing_table("dtr", T, 64))
    assert len({v.tobytes() for v in rand[64]}) == 10  # a table of its own per site
    assert all(np.all(v.sum(-1) == int(0.8 * w)) for w, v in rand.items())
    with pytest.raises(ValueError, match=r"expected \{32: '\(1 or 5, T, 32\)'"):
        model.apply({"params": {}}, *model.dummy_inputs(), {32: dtr[32]})  # refused first


def test_fresh_init_zeroes_guided_diffusions_zero_modules_only():
    config = tiny()
    setup = step_lib.create_setup(config)  # the state training starts from (compiled once)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    _, shardings = step_lib.state_layout(setup, mesh)
    params = jax.device_get(step_lib.create_state(setup, mesh, shardings).params)
    model = setup.dm.model
    x, t, y = inputs(model)
    out = model.apply({"params": params}, x, t, y, tables_of(model, "dtr"))
    np.testing.assert_array_equal(out, np.zeros(out.shape, np.float32))
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        key = jax.tree_util.keystr(path)
        zero_module = any(f"'{n}'" in key for n in ("out_layers_3", "proj_out", "out_2"))
        norm_bias = "'bias'" in key and any(n in key for n in ("layers_0", "'norm'", "out_0"))
        assert bool(jnp.all(leaf == 0)) == (zero_module or norm_bias), key
    # the logical axis names shard the output channels over fsdp (sharding.RULES: 'embed')
    spec = nn.get_partition_spec(setup.dm.abstract_params())
    assert tuple(spec["input_blocks_1_0"]["in_layers_2"]["kernel"]) == (
        None,
        None,
        "channels",
        "embed",
    )


def test_remat_keeps_the_gradients_and_bfloat16_stays_close(pair):
    """How the model computes (remat_policy, dtype) does not change what it computes."""
    config, model, params, twin, _ = pair
    if model.num_classes == 1:
        pytest.skip("one model suffices")
    x, t, y = inputs(model, batch=2)
    tables = tables_of(model, "dtr")

    def grads(m):
        def loss(p):
            return jnp.mean(m.apply({"params": p}, x, t, y, tables) ** 2)

        return jax.jit(jax.grad(loss))(params)

    want = grads(model)
    got = grads(model.clone(remat_policy="nothing_saveable"))
    jax.tree.map(lambda a, b: assert_close(a, b, tol=1e-6), got, want)
    half = model.clone(dtype=jnp.bfloat16).apply({"params": params}, x, t, y, tables)
    assert half.dtype == jnp.float32
    assert_close(half, model.apply({"params": params}, x, t, y, tables), tol=5e-2)


# ============================================================ 3. the registry


# guided-diffusion's UNetModel of each release's MODEL_FLAGS, built on the meta device
RELEASES = {
    "ADM-64": dict(image_size=64, model_channels=192, num_res_blocks=3, num_classes=1000,
                   attention_resolutions=(2, 4, 8), channel_mult=(1, 2, 3, 4),
                   num_head_channels=64, use_new_attention_order=True),
    "ADM-256-uncond": dict(image_size=256, model_channels=256, num_res_blocks=2,
                           num_classes=None, attention_resolutions=(8, 16, 32),
                           channel_mult=(1, 1, 2, 2, 4, 4), num_head_channels=64),
    "ADM-128": dict(image_size=128, model_channels=256, num_res_blocks=2, num_classes=1000,
                    attention_resolutions=(4, 8, 16), channel_mult=(1, 1, 2, 3, 4), num_heads=4),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_named_unets_have_the_released_state_dicts(name):
    flags = RELEASES[name]
    with torch.device("meta"):
        release = UNetModel(
            in_channels=3, out_channels=6, use_scale_shift_norm=True, resblock_updown=True, **flags
        )
    classes = flags["num_classes"] or 1
    model = models.create_model(name, input_size=flags["image_size"], num_classes=classes)
    assert isinstance(model, UNet)
    want = {k: tuple(v.shape) for k, v in release.state_dict().items()}
    assert interop.torch_shapes(model) == want
    if name == "ADM-64":  # the ADM paper's 296M
        assert sum(int(np.prod(s)) for s in want.values()) == 295_904_454


def test_the_registry_builds_both_families_by_name():
    assert models.family("DiT-B/2") == "dit" and models.family("ADM-64") == "unet"
    assert set(models.MODEL_NAMES) <= set(models.NAMES) and "ADM-256-uncond" in models.NAMES
    assert isinstance(models.create_model("DiT-S/2", input_size=8, in_channels=1), models.DiT)
    small = models.create_model("ADM-S", input_size=32, num_classes=10, class_dropout_prob=0.1)
    assert small.null_label and small.channel_mult == (1, 2, 2)
    spec = config_lib.model_spec(tiny())["model"]
    assert spec["family"] == "unet" and spec["channel_mult"] == [1, 2]
    assert spec["null_label"] and spec["route_head"]
    assert (
        "route_head" not in config_lib.model_spec(tiny(**{"model.routing.kind": "none"}))["model"]
    )
    assert "family" not in config_lib.model_spec(helpers.tiny())["model"]  # DiT specs as before


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"model.unet.attention_resolutions": "32,16,8"},
            r"model.unet.attention_resolutions=\(32, 16, 8\) has \[32, 16, 8\]: they are "
            r"downsample rates",
        ),
        ({"model.unet.model_channels": 40}, r"widths \[40, 80\]: each must be a positive multiple"),
        ({"model.unet.channel_mult": "1,x"}, r"model.unet.channel_mult='1,x' must be comma-sep"),
        ({"model.depth": 4}, r"model.depth=4 is not a field of a U-Net"),
        ({"model.unet.num_head_channels": 24}, r"num_head_channels=24 does not divide"),
        ({"model.input_size": 7}, r"model.input_size=7 is not divisible by 2"),
        ({"model.scan_blocks": True}, r"model.scan_blocks=True is for DiTs"),
        ({"model.routing.kind": "file"}, r"model.routing.kind='file' reads a DiT's tables"),
        (
            {"model.class_dropout_prob": 0.0},
            r"sample.cfg_scale=2.0 needs a null label.*use 1 \(no guidance\)",
        ),
        ({"model.name": "ADM-256-uncond"}, r"model.name='ADM-256-uncond' is unconditional"),
    ],
)
def test_unet_config_problems_name_their_fields(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(tiny(**overrides), 8, mode="sample")


def test_dit_configs_refuse_unet_fields():
    for overrides, message in (
        ({"model.unet.num_res_blocks": 2}, r"model.unet.num_res_blocks=2 is not a field of a DiT"),
        ({"model.routing.head": False}, r"model.routing.head=False is for U-Nets"),
    ):
        with pytest.raises(ConfigError, match=message):
            config_lib.validate(helpers.tiny(**overrides), 8, mode="sample")


# ============================================================ 4. guided-diffusion's files


def test_a_state_dict_imports_samples_and_exports_to_a_strict_load(pair, tmp_path):
    """init_from -> the same outputs as guided-diffusion's model, routed; --mode sample
    and --mode export from it -> a state dict UNetModel loads with strict=True, equal to the
    file's (the conditional model; the other one is imported and compared only)."""
    config, model, params, twin, path = pair
    config = with_overrides(config, init_from=path, **{"model.routing.kind": "random"})
    imported = export.from_pytorch(config)
    assert "guided-diffusion U-Net" in interop.open_checkpoint(path).summary()
    x, t, y = inputs(model)
    want = torch_forward(twin, model, x, t, y, imported.tables)
    assert_close(imported.apply(x, t, y), want)
    if model.num_classes == 1:
        return
    workdir = str(tmp_path / "work")
    samples = np.load(modes.run("sample", config, workdir))["arr_0"]
    assert samples.shape == (8, 8, 8, 1) and samples.dtype == np.uint8
    out = modes.run("export", config, workdir)
    for name in ("pytorch_model.pt", "pytorch_model.safetensors"):
        state = interop.open_checkpoint(os.path.join(out, name)).state_dicts["ema"]
        back = torch_twin(model, seed=7)  # other weights, all replaced by the file's
        back.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in state.items()})
        np.testing.assert_array_equal(torch_forward(back, model, x, t, y, imported.tables), want)
    loaded = export.load(out)  # the JAX export: the tables per width beside the params
    assert {w: v.shape for w, v in loaded.tables.items()} == {
        w: v.shape for w, v in imported.tables.items()
    }
    assert_close(loaded.apply(x, t, y), want)


@pytest.mark.parametrize("options", ["conditional", "other options"])
def test_trained_params_export_back_bit_exact(tmp_path, options):
    """Params of every value -> export -> guided-diffusion's UNetModel loads them strictly
    and computes the same; JAX -> PyTorch -> JAX is bit-exact."""
    config = tiny(**(OTHER if options == "other options" else {}))
    dm = inference.from_config(config)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda p: (rng.standard_normal(p.shape) * 0.2).astype(np.float32),
        nn.unbox(jax.device_get(dm.init_params(jax.random.key(0)))),
    )
    out = export.export(params, config, str(tmp_path / "export"), tables=dm.tables)
    state = torch.load(f"{out}/pytorch_model.pt", weights_only=True)
    twin = torch_twin(dm.model, seed=3)
    twin.load_state_dict(state, strict=True)
    x, t, y = inputs(dm.model)
    assert_close(export.load(out).apply(x, t, y), torch_forward(twin, dm.model, x, t, y, dm.tables))
    back = interop.open_checkpoint(f"{out}/pytorch_model.pt").params()
    jax.tree.map(np.testing.assert_array_equal, back, params)


def _dropped(sd, prefix):
    return {k: v for k, v in sd.items() if not k.startswith(prefix)}


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda sd: _dropped(sd, "output_blocks.1."),
            r"'output_blocks\.1\.0\.emb_layers\.1\.bias' is missing",
        ),
        (
            lambda sd: sd | {"input_blocks.9.0.op.weight": torch.zeros(1)},
            r"'input_blocks\.9\.0\.op\.weight' is not expected",
        ),
        (
            lambda sd: sd | {"label_emb.weight": sd["label_emb.weight"][:10]},
            r"'label_emb\.weight' has shape \(10, 128\), expected \(11, 128\) \(the config's model "
            r"has a null label row.*set model.class_dropout_prob=0\)",
        ),
        (
            lambda sd: {k.replace("input_blocks", "blocks"): v for k, v in sd.items()},
            r"'blocks\.0\.0\.bias' is not expected",
        ),
    ],
    ids=["missing", "unexpected", "null_label", "not_a_unet"],
)
def test_wrong_files_are_refused_naming_the_first_bad_key(tmp_path, change, message):
    model = inference.from_config(tiny()).model
    path = tmp_path / "bad.pt"
    torch.save(change(torch_twin(model).state_dict()), path)
    config = tiny(init_from=str(path))
    with pytest.raises(ConfigError, match=f"init_from='{re.escape(str(path))}' does not hold "
                       f"this model: {message}"):  # fmt: skip
        config_lib.validate(config, 8, mode="sample")


# ============================================================ 5. training


def test_fine_tunes_resumes_exactly_and_samples_through_the_cli(tmp_path):
    """A guided-diffusion state dict fine-tunes (params and EMA from the file); a run
    stopped after one step resumes to the same state as an uninterrupted one; the CLI
    samples the result."""
    config = tiny(init_from=str(tmp_path / "release.pt"))
    twin = torch_twin(inference.from_config(config).model)
    torch.save(twin.state_dict(), config.init_from)
    params = interop.params_from_torch(twin.state_dict())
    one = jax.devices()[:1]  # one device: the sharded step is tested with the DiT
    straight = train.train_and_evaluate(config, str(tmp_path / "a"), devices=one)
    moved = jax.tree.map(
        lambda a, b: float(np.max(np.abs(a - b))), jax.device_get(straight.params), params
    )
    assert 0 < max(jax.tree.leaves(moved)) <= 2.1 * config.optimizer.learning_rate
    train.train_and_evaluate(with_overrides(config, num_train_steps=1), str(tmp_path / "b"), one)
    resumed = train.train_and_evaluate(config, str(tmp_path / "b"), devices=one)
    for field in ("params", "ema_params", "opt_state"):
        for a, b in zip(
            jax.tree.leaves(jax.device_get(getattr(straight, field))),
            jax.tree.leaves(jax.device_get(getattr(resumed, field))),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    assert (tmp_path / "a" / "routing.png").stat().st_size > 0
    command = [sys.executable, "-m", "dtr_jax.main", "--config", DIGITS_UNET]
    command += ["--workdir", str(tmp_path / "a"), "--mode", "sample"]
    command += [f"--config.{k}={v}" for k, v in (TINY | {"init_from": config.init_from}).items()]
    done = subprocess.run(
        command, cwd=helpers.ROOT, env=helpers.cli_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (npz,) = (tmp_path / "a" / "samples").glob("*.npz")
    assert np.load(npz)["arr_0"].shape == (8, 8, 8, 1)


def test_the_64x64_configs_train_on_a_real_image_folder(tmp_path):
    """configs/adm_ffhq64.py (its ADM-64 shrunk to two levels) takes photographs of any
    size through the ADM centre crop at 64x64, in [-1, 1]; adm_imagenet64.py is valid."""
    shrink = {
        "model.unet.model_channels": 32,
        "model.unet.channel_mult": "1,2",
        "model.unet.num_res_blocks": 1,
        "model.unet.attention_resolutions": "2",
        "model.unet.num_head_channels": 32,
        "global_batch_size": 2,
        "num_train_steps": 1,
        "log_every_steps": 1,
        "sample.num_steps": 2,
        "sample.grid_per_class": 1,
        "mesh.data": -1,
        "data.num_threads": 2,
    }
    folder = helpers.photo_folder(tmp_path / "photos", classes=(), per_class=3)
    config = load_config(str(helpers.ROOT / "configs" / "adm_ffhq64.py"), **shrink)
    config = with_overrides(config, **{"data.folder": folder})
    state = train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert int(state.step) == 1
    assert np.isfinite(helpers.read_scalars(tmp_path / "run", "loss")[1])
    imagenet = load_config(str(helpers.ROOT / "configs" / "adm_imagenet64.py"))
    config_lib.validate(with_overrides(imagenet, **{"data.name": "synthetic"}), 8)
    assert models.routed_widths(inference.from_config(imagenet).model)[0] == 192


@pytest.mark.parametrize(
    "objective, sampler",
    [("ddpm", "dpmpp_2m"), ("flow", "heun"), ("flow", "euler_maruyama")],
)
def test_the_new_samplers_run_a_unet_with_a_guidance_interval(objective, sampler):
    """The samplers of both objectives drive a U-Net (rows by its objective's tasks), with
    guidance limited to an interval."""
    fields = {"diffusion.objective": objective, "sample.sampler": sampler}
    fields |= {"sample.num_steps": 3, "sample.cfg_scale": 2.0, "sample.guidance_low": 0.2}
    fields |= {"sample.guidance_high": 0.6, "model.class_dropout_prob": 0.1}
    if objective == "flow":
        fields |= {"model.learn_sigma": False, "sample.clip_denoised": False}
    config = tiny(**fields)
    config_lib.validate(config, 1, mode="sample")
    dm = inference.from_config(config)
    params = dm.model.init(jax.random.PRNGKey(0), *dm.model.dummy_inputs(2))["params"]
    run = jax.jit(inference.sample_fn(dm, config.sample, count_calls=True))
    images, calls = run(params, jnp.array([1, 2]), dm.tables, jax.random.PRNGKey(1))
    assert images.shape == (2, 8, 8, 1) and bool(jnp.isfinite(images).all())
    assert int(calls) == (6 if sampler == "heun" else 3)
