"""--mode export and the public loader, on tiny trained models (8 fake CPU devices)."""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors import numpy as st_numpy

import helpers
from dtr_jax import export, inference, routing, sharding, train
from dtr_jax.config import with_overrides
from dtr_jax.errors import CheckpointError, WriteError

FILES = (
    "model.json",
    "model.msgpack",
    "model.safetensors",
    "pytorch_model.pt",
    "pytorch_model.safetensors",
)


def tiny(**overrides):
    return helpers.tiny(**({"num_train_steps": 3} | overrides))


def trained(tmp_path_factory, name, **overrides):
    config = tiny(**overrides)
    workdir = str(tmp_path_factory.mktemp(name))
    train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    return config, workdir


@pytest.fixture(scope="module")
def dtr_run(tmp_path_factory):
    return trained(tmp_path_factory, "dtr")


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    return trained(tmp_path_factory, "random", **{"model.routing.kind": "random"})


@pytest.fixture(scope="module")
def dtr_export(dtr_run):
    config, workdir = dtr_run
    return export.export_mode(config, workdir)


def inputs(n=6):
    r = np.random.RandomState(0)
    x = r.randn(n, 8, 8, 1).astype(np.float32)
    t = np.array([0, 1, 250, 500, 998, 999][:n], np.int32)
    y = np.array([0, 3, 9, 10, 5, 7][:n], np.int32)  # 10 = the null label
    return x, t, y


def reference(config, workdir, use_ema=True):
    """The original model's output with the params restored from the checkpoint."""
    mesh = sharding.make_mesh(config.mesh)
    dm, params, _ = inference.restore_params(config, workdir, mesh, use_ema=use_ema)
    return np.asarray(dm.model.apply({"params": params}, *inputs(), dm.tables))


def assert_close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def edit_json(path, fn):
    spec = json.loads((path / "model.json").read_text())
    fn(spec)
    (path / "model.json").write_text(json.dumps(spec))


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_export_mode_writes_the_three_files(dtr_run, dtr_export):
    config, workdir = dtr_run
    out = pathlib.Path(dtr_export)
    assert out == pathlib.Path(workdir) / "export"
    assert sorted(os.listdir(out)) == sorted(FILES)
    text = (out / "model.json").read_text()
    spec = json.loads(text)
    assert text == json.dumps(spec, indent=2, sort_keys=True) + "\n"
    assert spec == export.spec_from_config(config, step=3, use_ema=True)
    assert (spec["model"] | spec["routing"]).items() >= {
        "name": "DiT-S/2",
        "depth": 1,
        "hidden_size": 32,
        "num_heads": 2,
        "patch_size": 2,
        "mlp_ratio": 4.0,
        "kind": "dtr",
    }.items()
    assert spec["params"] == "ema" and spec["step"] == 3 and spec["format_version"] == 1
    tensors = st_numpy.load_file(str(out / "model.safetensors"))
    assert tensors["blocks_0.attn.qkv.kernel"].shape == (32, 96)
    assert tensors["blocks_0.attn.qkv.kernel"].dtype == np.float32
    assert tensors["routing.tables"].dtype == np.uint8
    np.testing.assert_array_equal(
        tensors["routing.tables"], routing.model_tables("dtr", 1000, 32, 1, 0.8, 4.0)
    )


def test_load_matches_restored_ema_and_raw_params(dtr_run, dtr_export, tmp_path):
    config, workdir = dtr_run
    loaded = export.load(dtr_export)
    ema = np.asarray(loaded.apply(*inputs()))
    assert_close(ema, reference(config, workdir, use_ema=True))
    raw_config = with_overrides(
        config, **{"export.use_ema": False, "export.dir": str(tmp_path / "raw")}
    )
    assert export.export_mode(raw_config, workdir) == str(tmp_path / "raw")
    raw_export = export.load(str(tmp_path / "raw" / "model.json"))
    assert raw_export.spec["params"] == "raw"
    raw = np.asarray(raw_export.apply(*inputs()))
    assert_close(raw, reference(config, workdir, use_ema=False))
    assert np.abs(raw - ema).max() > 1e-4


def test_random_routing_tables_rebuilt_equal_stored(random_run):
    config, workdir = random_run
    out = export.export_mode(config, workdir)
    stored = st_numpy.load_file(os.path.join(out, "model.safetensors"))["routing.tables"]
    assert stored.shape == (1, 1000, 32)  # depth 1: one table per block
    loaded = export.load(out)
    np.testing.assert_array_equal(loaded.tables, stored)
    np.testing.assert_array_equal(routing.model_tables("random", 1000, 32, 1, 0.8, 4.0, 0), stored)
    assert_close(loaded.apply(*inputs()), reference(config, workdir))


def test_msgpack_only_and_safetensors_only_exports_agree(dtr_export, tmp_path):
    msgpack_only = copy(dtr_export, tmp_path / "msgpack")
    (msgpack_only / "model.safetensors").unlink()
    safetensors_only = copy(dtr_export, tmp_path / "safetensors")
    (safetensors_only / "model.msgpack").unlink()
    a = export.load(str(msgpack_only))
    b = export.load(str(safetensors_only / "model.safetensors"))
    c = export.load(os.path.join(dtr_export, "model.msgpack"))  # the named file is used
    np.testing.assert_array_equal(a.tables, b.tables)
    out = np.asarray(b.apply(*inputs()))
    np.testing.assert_array_equal(np.asarray(a.apply(*inputs())), out)
    np.testing.assert_array_equal(np.asarray(c.apply(*inputs())), out)


def test_sample_is_deterministic_per_seed(dtr_export):
    loaded = export.load(dtr_export)
    labels = np.array([0, 1, 2])
    first = loaded.sample(labels, 0)
    assert first.shape == (3, 8, 8, 1) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, loaded.sample(labels, jax.random.key(0)))
    assert not np.array_equal(first, loaded.sample(labels, 1))
    ddim = loaded.sample(labels, 0, num_steps=2, cfg_scale=1.0, sampler="ddim")
    assert ddim.shape == (3, 8, 8, 1) and not np.array_equal(first, ddim)
    with pytest.raises(ValueError, match="sampler='euler'"):
        loaded.sample(labels, 0, sampler="euler")


def test_reexport_replaces_cleanly_and_a_failed_write_keeps_the_old(dtr_run, tmp_path, monkeypatch):
    config, workdir = dtr_run
    out = tmp_path / "exp"
    ema_config = with_overrides(config, **{"export.dir": str(out)})
    raw_config = with_overrides(ema_config, **{"export.use_ema": False})
    export.export_mode(ema_config, workdir)
    ema = np.asarray(export.load(str(out)).apply(*inputs()))
    export.export_mode(raw_config, workdir)
    assert sorted(os.listdir(tmp_path)) == ["exp"] and sorted(os.listdir(out)) == sorted(FILES)
    replaced = export.load(str(out))
    assert replaced.spec["params"] == "raw"
    raw = np.asarray(replaced.apply(*inputs()))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(st_numpy, "save", boom)
    with pytest.raises(WriteError, match=r"exp \(disk full\)"):  # a clean error, exit 4
        export.export_mode(ema_config, workdir)
    assert sorted(os.listdir(tmp_path)) == ["exp"] and sorted(os.listdir(out)) == sorted(FILES)
    kept = export.load(str(out))
    assert kept.spec["params"] == "raw"
    np.testing.assert_array_equal(np.asarray(kept.apply(*inputs())), raw)
    assert not np.array_equal(raw, ema)


def test_export_refuses_to_replace_a_directory_that_is_not_an_export(dtr_run, tmp_path):
    config, workdir = dtr_run
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a dtr_jax export"):
        export.export_mode(with_overrides(config, **{"export.dir": str(tmp_path)}), workdir)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_custom_tables_are_kept_in_the_export(dtr_run, tmp_path):
    config, workdir = dtr_run
    mesh = sharding.make_mesh(config.mesh)
    dm, params, _ = inference.restore_params(config, workdir, mesh)
    tables = np.roll(dm.tables, 3, axis=-1)
    export.export(jax.device_get(params), config, str(tmp_path / "c"), tables=tables)
    loaded = export.load(str(tmp_path / "c"))
    assert loaded.spec["routing"]["kind"] == "custom"
    np.testing.assert_array_equal(loaded.tables, tables)
    expected = dm.model.apply({"params": params}, *inputs(), tables)
    assert_close(loaded.apply(*inputs()), expected)


def test_missing_export_names_the_path(tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match=f"no dtr_jax export at {missing}: expected"):
        export.load(str(missing))


@pytest.mark.parametrize(
    "name, edit, drop_safetensors, message",
    [
        (
            "future",
            lambda s: s.update(format_version=99),
            False,
            r"future/model.json has export format_version=99",
        ),
        (
            "deeper",
            lambda s: s["model"].update(depth=2),
            False,
            r"deeper/model.safetensors do not match .* 'blocks_1\.",
        ),
        (
            "classes",
            lambda s: s["model"].update(num_classes=11),
            True,
            r"classes/model.msgpack .*'y_embedder.embedding_table",
        ),
        (
            "other",
            lambda s: s["routing"].update(alpha=1.0),
            False,
            r"tables stored in .*other/model.safetensors do not",
        ),
    ],
)
def test_inconsistent_exports_are_refused(
    dtr_export, tmp_path, name, edit, drop_safetensors, message
):
    broken = copy(dtr_export, tmp_path / name)
    if drop_safetensors:  # then the msgpack params are what is checked
        (broken / "model.safetensors").unlink()
    edit_json(broken, edit)
    with pytest.raises(ValueError, match=message):
        export.load(str(broken))


def test_export_mode_without_checkpoint_raises(tmp_path):
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        export.export_mode(tiny(), str(tmp_path))
    assert os.listdir(tmp_path) == []
