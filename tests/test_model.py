"""Tests for dtr_jax.models (DiT with denoising task routing; SPEC §2-3).

The core check is against a small PyTorch DiT written from SPEC §2-3 (tests/torch_reference.py:
timm-style attention, adaLN-Zero blocks, the PyTorch release's module names), loaded with
the same RANDOM non-zero weights as the Flax model.
The PyTorch -> Flax name mapping is the package's own (`dtr_jax.interop.params_from_torch`).
"""

import contextlib
import io

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.ad_checkpoint import print_saved_residuals

from dtr_jax.interop import params_from_torch
from dtr_jax.models import MODEL_NAMES, REMAT_POLICIES, SIZES, create_dit
from dtr_jax.models.dit import DiT, DiTBlock, stack_blocks, unstack_blocks
from dtr_jax.routing import model_tables, routing_table
from torch_reference import TDiT, mae_pos_embed

torch.set_default_dtype(torch.float32)

T = 1000
# A small DiT: 16x16x4 input, patch 2 -> 64 tokens, hidden 64, 4 heads, 3 blocks.
CFG = dict(
    input_size=16, in_channels=4, patch_size=2, hidden_size=64, depth=3, num_heads=4, num_classes=10
)
B = 4


def small_dit(**kw):
    arch = {k: CFG[k] for k in ("depth", "hidden_size", "num_heads", "patch_size")}
    rest = {k: CFG[k] for k in ("input_size", "in_channels", "num_classes")}
    return create_dit("DiT-S/2", **{**arch, **rest, "learn_sigma": True, **kw})


def check_close(name, got, want, tol=1e-5):
    """max |got - want| <= tol * max(1, max |want|); returns the error achieved."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    err, scale = float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))
    assert err <= tol * max(1.0, scale), f"{name}: max abs err {err:.3g} (output scale {scale:.3g})"
    return err


# ============================================================ fixtures


@pytest.fixture(scope="module")
def ref():
    """(torch model, Flax params) holding the same random non-zero weights."""
    assert not jax.config.jax_enable_x64
    torch.manual_seed(0)
    tmodel = TDiT(**CFG).eval()
    with torch.no_grad():
        for name, w in tmodel.named_parameters():
            if name != "pos_embed":  # weights ~ 1/sqrt(fan_in), biases/tables ~ 0.1-0.125
                std = w[0].numel() ** -0.5 if w.ndim > 1 else 0.1
                w.copy_(torch.randn_like(w) * std)
                assert torch.all(w != 0), name
    params = params_from_torch(tmodel.state_dict())

    # The mapping covers exactly the Flax tree, with the same shapes.
    real = nn.unbox(small_dit().init(jax.random.key(0), *inputs(jax_layout=True)[:3])["params"])
    assert jax.tree.structure(params) == jax.tree.structure(real)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, real)
    return tmodel, params


def inputs(jax_layout, batch=B, seed=1):
    """x (NHWC for Flax, NCHW for torch), distinct t in [0, T), labels incl. the null one."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(
        (batch, CFG["in_channels"], CFG["input_size"], CFG["input_size"]), dtype=np.float32
    )
    t = np.array([0, 999, 500, 250, 37, 871][:batch])
    y = np.array([3, 0, CFG["num_classes"], 7, 1, 9][:batch])
    if jax_layout:
        return jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(y), x
    return torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y), x


def fwd(params, x, t, y, routing=None, model=None, **kw):
    model = model or small_dit()
    return model.apply({"params": params}, x, t, y, routing, **kw)


def nchw(out):
    return np.asarray(out).transpose(0, 3, 1, 2)


# ============================================================ 1. against the PyTorch reference


def test_pos_embed_matches_mae():
    from dtr_jax.models.dit import sincos_pos_embed

    np.testing.assert_allclose(sincos_pos_embed(64, 8), mae_pos_embed(64, 8), atol=1e-12)


def test_block_matches_torch(ref):
    tmodel, params = ref
    rng = np.random.default_rng(2)
    d = CFG["hidden_size"]
    x = rng.standard_normal((B, 64, d), dtype=np.float32)
    c = rng.standard_normal((B, d), dtype=np.float32)
    m = (rng.random((B, 1, d)) < 0.7).astype(np.float32)  # a random DTR mask per sample
    block = DiTBlock(d, CFG["num_heads"])
    for name, mask in (("block_masked", m), ("block_plain", None)):
        got = block.apply(
            {"params": params["blocks_0"]},
            jnp.asarray(x),
            jnp.asarray(c),
            None if mask is None else jnp.asarray(mask),
        )
        with torch.no_grad():
            want = tmodel.blocks[0](
                torch.from_numpy(x),
                torch.from_numpy(c),
                None if mask is None else torch.from_numpy(mask),
            ).numpy()
        check_close(name, got, want)


@pytest.mark.parametrize("kind", ["dtr", "random", "none"])
def test_forward_matches_torch(ref, kind):
    tmodel, params = ref
    tables = model_tables(kind, T, CFG["hidden_size"], CFG["depth"], seed=5)
    assert (tables is None) == (kind == "none")
    if kind == "random":
        assert tables.shape == (CFG["depth"], T, CFG["hidden_size"])
    xj, tj, yj, _ = inputs(jax_layout=True)
    xt, tt, yt, _ = inputs(jax_layout=False)
    got = fwd(params, xj, tj, yj, tables)
    assert got.shape == (B, 16, 16, 8) and got.dtype == jnp.float32
    with torch.no_grad():
        want = tmodel(xt, tt, yt, None if tables is None else torch.from_numpy(tables)).numpy()
    check_close(f"forward_{kind}", nchw(got), want)
    if tables is not None:  # the release's layout: a routing buffer per block, same output
        routed = TDiT(**CFG, tables=tables).eval()
        missing, unexpected = routed.load_state_dict(tmodel.state_dict(), strict=False)
        assert not unexpected
        assert sorted(missing) == [f"blocks.{i}.routing._unit_mapping" for i in range(CFG["depth"])]
        with torch.no_grad():
            np.testing.assert_array_equal(routed(xt, tt, yt).numpy(), want)
    if kind != "none":  # the routing is not vacuous
        assert np.max(np.abs(np.asarray(got - fwd(params, xj, tj, yj)))) > 1e-2


# ============================================================ 2. DTR block = x + Block(x * m)


def test_dtr_block_is_residual_of_masked_input(ref):
    _, params = ref
    rng = np.random.default_rng(3)
    d = CFG["hidden_size"]
    x = jnp.asarray(rng.standard_normal((B, 64, d), dtype=np.float32))
    c = jnp.asarray(rng.standard_normal((B, d), dtype=np.float32))
    m = jnp.asarray((rng.random((B, 1, d)) < 0.7).astype(np.float32))
    block = lambda z, mask=None: DiTBlock(d, CFG["num_heads"]).apply(  # noqa: E731
        {"params": params["blocks_1"]}, z, c, mask
    )
    residual_branch = lambda z: block(z) - z  # Block(z) of SPEC §2  # noqa: E731
    check_close("dtr_block_identity", block(x, m), x + residual_branch(x * m))
    assert np.max(np.abs(np.asarray(block(x, m) - block(x)))) > 1e-2  # the mask matters
    # all-ones mask ('none' table row): exactly the plain DiT block
    np.testing.assert_array_equal(block(x, jnp.ones((B, 1, d))), block(x))


def test_none_table_is_plain_dit_exactly(ref):
    _, params = ref
    xj, tj, yj, _ = inputs(jax_layout=True)
    ones = routing_table("none", T, CFG["hidden_size"])[None]
    np.testing.assert_array_equal(fwd(params, xj, tj, yj, ones), fwd(params, xj, tj, yj))


# ============================================================ 3. sizes


# Exact counts at 32x32x4 latents, 1000 classes, learn_sigma (no pos_embed; the
# release also counts its frozen pos_embed, +256*D: S/2 32,963,360, XL/2 675,129,632):
#   DiT-S/2 32,865,056  DiT-B/2 130,315,808  DiT-L/2 457,840,672  DiT-XL/2 674,834,720
PARAM_COUNTS = {
    "DiT-S/2": 32_865_056,
    "DiT-B/2": 130_315_808,
    "DiT-L/2": 457_840_672,
    "DiT-XL/2": 674_834_720,
}
PAPER_COUNTS = {"DiT-S/2": 33e6, "DiT-B/2": 130e6, "DiT-L/2": 458e6, "DiT-XL/2": 675e6}


def abstract_params(name, **kw):
    model = create_dit(name, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, **kw)
    zi = jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 4)), zi, zi)
    )
    return model, nn.unbox(shapes["params"])


def count(params):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_param_counts(name):
    n = count(abstract_params(name)[1])
    assert n == PARAM_COUNTS[name]
    assert abs(n - PAPER_COUNTS[name]) < 0.5e6, (name, n)


def test_all_model_names_build():
    documented = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    assert SIZES == documented
    assert sorted(MODEL_NAMES) == sorted(f"DiT-{s}/{p}" for s in documented for p in (2, 4, 8))
    for name in MODEL_NAMES:
        size, patch = name[4:].split("/")
        depth, hidden, heads = documented[size]
        p = int(patch)
        model, params = abstract_params(name)
        assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == (
            depth,
            hidden,
            heads,
            p,
        )
        assert sorted(k for k in params if k.startswith("blocks_")) == sorted(
            f"blocks_{i}" for i in range(depth)
        )
        assert params["x_embedder"]["proj"]["kernel"].shape == (p, p, 4, hidden)
        assert params["blocks_0"]["attn"]["qkv"]["kernel"].shape == (hidden, 3 * hidden)
        assert params["blocks_0"]["mlp"]["fc1"]["kernel"].shape == (hidden, 4 * hidden)
        assert params["final_layer"]["linear"]["kernel"].shape == (hidden, p * p * 8)
        assert params["y_embedder"]["embedding_table"]["embedding"].shape == (1001, hidden)


# ============================================================ 4. real init


def test_zero_init_outputs_zeros_and_tables_are_not_params():
    model = small_dit()
    xj, tj, yj, _ = inputs(jax_layout=True)
    table = model_tables("random", T, CFG["hidden_size"], CFG["depth"])
    with_r = model.init(jax.random.key(0), xj, tj, yj, table)
    without = model.init(jax.random.key(0), xj, tj, yj)
    out = model.apply(with_r, xj, tj, yj, table)
    assert out.shape == (B, 16, 16, 8)
    np.testing.assert_array_equal(out, np.zeros(out.shape, np.float32))
    assert set(with_r) == {"params"}  # no extra collection holds the tables
    p_r, p_0 = nn.unbox(with_r["params"]), nn.unbox(without["params"])
    assert jax.tree.structure(p_r) == jax.tree.structure(p_0)
    assert jax.tree.map(jnp.shape, p_r) == jax.tree.map(jnp.shape, p_0)
    assert not any(T in leaf.shape for leaf in jax.tree.leaves(p_r))
    # the zero-initialised layers are the adaLN ones and the final linear, nothing else
    for path, leaf in jax.tree_util.tree_leaves_with_path(p_r):
        key = jax.tree_util.keystr(path)
        zero_init = (
            "adaLN_modulation_1" in key
            or "final_layer']['linear" in key
            or key.endswith("['bias']")
        )
        assert bool(jnp.all(leaf == 0)) == zero_init, key


# ============================================================ 5. per-sample gather


def test_mask_gathered_by_per_sample_timestep(ref):
    _, params = ref
    xj, _, yj, _ = inputs(jax_layout=True, batch=2)
    t = jnp.array([0, 999])
    table = model_tables("dtr", T, CFG["hidden_size"], CFG["depth"])
    assert not np.array_equal(table[0, 0], table[0, 999])
    batched = fwd(params, xj, t, yj, table)
    for i in range(2):
        single = fwd(params, xj[i : i + 1], t[i : i + 1], yj[i : i + 1], table)
        check_close(f"per_sample_{i}", batched[i : i + 1], single)
        # a table whose every row is row t_i gives the same output; row t_j does not
        for j in range(2):
            pinned = np.repeat(table[:, int(t[j])][:, None], T, axis=1)
            out = fwd(params, xj[i : i + 1], t[i : i + 1], yj[i : i + 1], pinned)
            diff = float(np.max(np.abs(np.asarray(out - single))))
            assert (diff == 0.0) if i == j else (diff > 1e-2), (i, j, diff)


# ============================================================ 6. classifier-free guidance


def test_guided(ref):
    _, params = ref
    model = small_dit()
    xj, tj, yj, _ = inputs(jax_layout=True)
    yj = jnp.array([3, 0, 5, 7])
    table = model_tables("dtr", T, CFG["hidden_size"], CFG["depth"])

    def guided(s):
        return model.apply({"params": params}, xj, tj, yj, table, cfg_scale=s, method=DiT.guided)

    cond = fwd(params, xj, tj, yj, table)
    uncond = fwd(params, xj, tj, jnp.full_like(yj, CFG["num_classes"]), table)
    assert np.max(np.abs(np.asarray(cond - uncond))) > 1e-2  # labels matter
    check_close("guided_s1", guided(1.0), cond)
    c, s = CFG["in_channels"], 4.0
    want = jnp.concatenate(
        [uncond[..., :c] + s * (cond[..., :c] - uncond[..., :c]), cond[..., c:]], axis=-1
    )
    check_close("guided_s4", guided(s), want)


# ============================================================ 7. bfloat16 compute


def test_bf16_compute(ref):
    _, params = ref
    xj, tj, yj, _ = inputs(jax_layout=True)
    model = small_dit(dtype="bfloat16")
    init = nn.unbox(model.init(jax.random.key(0), xj, tj, yj)["params"])
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(init))
    table = model_tables("dtr", T, CFG["hidden_size"], CFG["depth"])
    out = fwd(params, xj, tj, yj, table, model=model)
    assert out.dtype == jnp.float32
    check_close("bf16_vs_fp32", out, fwd(params, xj, tj, yj, table), tol=5e-2)


# ============================================================ 8. label dropout


def test_label_dropout(ref):
    _, params = ref
    model = small_dit(class_dropout_prob=1.0)
    xj, tj, _, _ = inputs(jax_layout=True)
    yj = jnp.array([3, 0, 5, 7])
    null = jnp.full_like(yj, CFG["num_classes"])
    dropped = fwd(params, xj, tj, yj, model=model, train=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(dropped, fwd(params, xj, tj, null, model=model))
    kept = fwd(params, xj, tj, yj, model=model)  # train=False: no dropout
    assert np.max(np.abs(np.asarray(kept - dropped))) > 1e-2
    with pytest.raises(flax.errors.InvalidRngError):
        fwd(params, xj, tj, yj, model=model, train=True)


# ============================================================ 9. how the blocks run: scan, remat


@pytest.mark.parametrize("kind", ["none", "dtr", "random"])
def test_scanned_blocks_compute_the_same_model(ref, kind):
    """scan_blocks runs the same blocks: stacked params give the per-block outputs (to
    float rounding: XLA fuses a scanned body differently), and 'random' routing scans its
    per-block tables along with the params. The layouts convert both ways exactly."""
    _, params = ref
    xj, tj, yj, _ = inputs(jax_layout=True)
    tables = model_tables(kind, T, CFG["hidden_size"], CFG["depth"], seed=5)
    stacked = stack_blocks(params)
    assert "blocks_0" not in stacked
    assert stacked["blocks"]["attn"]["qkv"]["kernel"].shape == (3, 64, 192)
    got = fwd(stacked, xj, tj, yj, tables, model=small_dit(scan_blocks=True))
    check_close(f"scan_{kind}", got, fwd(params, xj, tj, yj, tables), tol=1e-6)
    back = unstack_blocks(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_stacked_layout_is_the_scanned_models_own():
    """stack_blocks of a per-block init has the scanned model's tree, shapes and logical
    axis names (a leading 'layers' axis), so shardings follow from either."""
    xj, tj, yj, _ = inputs(jax_layout=True)
    per_block = small_dit().init(jax.random.key(0), xj, tj, yj)["params"]
    scanned = small_dit(scan_blocks=True).init(jax.random.key(0), xj, tj, yj)["params"]
    stacked = stack_blocks(per_block)
    assert jax.tree.map(jnp.shape, nn.unbox(stacked)) == jax.tree.map(jnp.shape, nn.unbox(scanned))
    assert nn.get_partition_spec(stacked) == nn.get_partition_spec(scanned)
    spec = nn.get_partition_spec(stacked)["blocks"]["mlp"]["fc1"]["kernel"]
    assert tuple(spec) == ("layers", "embed", "mlp")
    with pytest.raises(ValueError, match="blocks_0"):
        stack_blocks({k: v for k, v in per_block.items() if k != "blocks_1"})


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_keep_the_gradients(ref, policy, scan):
    _, params = ref
    xj, tj, yj, _ = inputs(jax_layout=True)
    tables = model_tables("random", T, CFG["hidden_size"], CFG["depth"], seed=5)
    params = stack_blocks(params) if scan else params

    def grads(model):
        def loss(p):
            return jnp.mean(fwd(p, xj, tj, yj, tables, model=model) ** 2)

        return jax.grad(loss)(params)

    want = grads(small_dit(scan_blocks=scan))
    got = grads(small_dit(scan_blocks=scan, remat_policy=policy))
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = want
        for key in path:
            w = w[key.key]
        check_close(f"remat_{policy}_{scan}{jax.tree_util.keystr(path)}", g, w, tol=1e-6)


def test_a_dots_remat_policy_saves_the_blocks_matmul_outputs(ref):
    """The policy decides what is kept for the backward pass only where it sees the
    matmuls: in blocks under remat (autodiff's gradients there, not Dense's own VJP,
    which would hide every Dense output from it and have them all recomputed)."""
    _, params = ref
    xj, tj, yj, _ = inputs(jax_layout=True)
    model = small_dit(remat_policy="dots_with_no_batch_dims_saveable")
    printed = io.StringIO()  # jax's public account of the residuals is printed
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(lambda p: jnp.mean(fwd(p, xj, tj, yj, model=model) ** 2), params)
    dots = {line.split()[0] for line in printed.getvalue().splitlines() if "of dot_general" in line}
    tokens, d = (CFG["input_size"] // CFG["patch_size"]) ** 2, CFG["hidden_size"]
    batch = xj.shape[0]
    per_block = {f"f32[{batch},{tokens},{n}]" for n in (3 * d, d, 4 * d)}  # qkv, proj, fc1
    assert per_block <= dots, dots


def test_own_gradients_are_float32s_only(ref):
    """Dense's and attention's custom VJPs (BENCHMARKS.md, log 9-13) are CPU forms:
    float32 takes them, bfloat16 (TPU, GPU) autodiff's, where they cost the TPU plans
    bytes."""
    _, params = ref
    xj, tj, yj, _ = inputs(jax_layout=True)
    for dtype, own in (("float32", True), ("bfloat16", False)):
        model = small_dit(dtype=dtype)
        jaxpr = jax.make_jaxpr(lambda p, m=model: fwd(p, xj, tj, yj, model=m))(params)
        assert ("custom_vjp_call" in str(jaxpr)) == own, dtype


# ============================================================ 10. errors


def test_invalid_routing_shape_raises(ref):
    _, params = ref
    xj, tj, yj, _ = inputs(jax_layout=True)
    d = CFG["hidden_size"]
    for bad in (
        np.ones((2, T, d), np.uint8),
        np.ones((1, T, d + 1), np.uint8),
        np.ones((T, d), np.uint8),
    ):
        with pytest.raises(ValueError, match=r"expected \(1 or depth=3, T, hidden_size=64\)"):
            fwd(params, xj, tj, yj, bad)


@pytest.mark.parametrize("name", ["DiT-XXL/2", "DiT-S/16", "dit-s/2"])
def test_unknown_model_name_raises(name):
    with pytest.raises(ValueError, match="model.name"):
        create_dit(name)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"remat_policy": "sometimes"}, "model.remat_policy='sometimes' is unknown"),
        ({"attention": "flash"}, "model.attention='flash' is unknown"),
        ({"scan_blocks": 1}, "model.scan_blocks=1 must be True or False"),
        ({"attention": "cudnn"}, "model.attention='cudnn' needs dtype='bfloat16'"),
    ],
)
def test_how_the_model_computes_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_dit("DiT-S/2", **kwargs)
