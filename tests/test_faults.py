"""Fault injection: corrupted and unfinished checkpoints, a full disk, a read-only
workdir and bad inputs, each through the CLI where a user meets it (kills and a second
trainer: tests/test_interruptions.py).

Guarantees checked (README, "Faults and guarantees"): a resumed run equals an
uninterrupted one bit for bit; a checkpoint that fails verification is reported and
the newest valid one is used; nothing already written is lost; every anticipated
failure ends in one `dtr_jax: ...` line and its own exit code, never a traceback.
"""

import errno
import io
import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest

from dtr_jax import checkpoint, files, modes, sharding, train
from dtr_jax import step as step_lib
from dtr_jax.errors import (
    CheckpointError,
    ConfigError,
    InputFileError,
    TrainingDiverged,
    WorkdirError,
    WriteError,
)
from faults import ONE, assert_clean_failure, records, run_cli
from helpers import DIGITS, cli_command, cli_env, tiny

# --- damaged checkpoints: fallback with a warning ------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with committed steps 2 and 4, and the state an uninterrupted run reaches
    at step 6 (the reference for a resumed run)."""
    root = tmp_path_factory.mktemp("saved")
    config = tiny(num_train_steps=4, checkpoint_every_steps=2)
    train.train_and_evaluate(config, str(root / "run"), devices=ONE)
    six = tiny(num_train_steps=6, checkpoint_every_steps=2)
    train.train_and_evaluate(six, str(root / "six"), devices=ONE)
    return root / "run", records(root / "six", 6)


def _data_files(step_dir):
    return sorted(
        p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"
    )


def truncate(step_dir):
    for path in _data_files(step_dir):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def flip_bits(step_dir):
    for path in _data_files(step_dir):
        data = bytearray(path.read_bytes())
        for i in range(len(data) // 2, len(data), 97):
            data[i] ^= 0x10
        path.write_bytes(bytes(data))


def delete_state(step_dir):
    shutil.rmtree(step_dir / "state")


def delete_meta(step_dir):
    shutil.rmtree(step_dir / "meta")


def uncommit(step_dir):
    (step_dir / checkpoint.COMMIT).unlink()


def stale_state(step_dir):
    """Step 2's arrays in step 4's place: every byte readable, only the checksums differ."""
    shutil.rmtree(step_dir / "state")
    shutil.copytree(step_dir.parent / "2" / "state", step_dir / "state")


DAMAGES = [truncate, flip_bits, delete_state, delete_meta, uncommit, stale_state]
REASONS = {stale_state: "does not match its recorded checksum"}


def _tree(path):
    return sorted(
        (str(p.relative_to(path)), p.read_bytes()) for p in path.rglob("*") if p.is_file()
    )


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(saved, damage, tmp_path, caplog):
    source, six = saved
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    damage(workdir / "checkpoints" / "4")
    damaged = _tree(workdir / "checkpoints" / "4")

    # A reading mode uses step 2 and leaves the workdir as it is.
    export_dir = tmp_path / "export"
    config = tiny(num_train_steps=6, checkpoint_every_steps=2, **{"export.dir": str(export_dir)})
    modes.run("export", config, str(workdir))
    assert json.loads((export_dir / "model.json").read_text())["step"] == 2
    if damage is not uncommit:
        assert "checkpoints/4 is unusable: " in caplog.text
        assert REASONS.get(damage, "") in caplog.text
    assert _tree(workdir / "checkpoints" / "4") == damaged

    # The trainer resumes from step 2, moves the damaged step aside untouched, and ends
    # exactly where an uninterrupted run ends.
    train.train_and_evaluate(config, str(workdir), devices=ONE)
    assert records(workdir, 6) == six
    if damage is uncommit:  # unfinished: removed by the owner, not a checkpoint
        assert "Removing the unfinished checkpoint" in caplog.text
        assert not (workdir / "checkpoints" / "4.corrupt").exists()
    else:
        assert _tree(workdir / "checkpoints" / "4.corrupt") == damaged


def test_a_damaged_checkpoint_is_one_warning_through_the_cli(saved, tmp_path):
    """Orbax's reads abandoned after the failed restore print no tracebacks (the
    unraisable errors of its coroutines and reader threads): dtr_jax's one warning says
    it all; --verbose shows them."""
    workdir = tmp_path / "run"
    shutil.copytree(saved[0], workdir)
    truncate(workdir / "checkpoints" / "4")
    done = run_cli(workdir, "export", num_train_steps=6, checkpoint_every_steps=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("checkpoints/4 is unusable: cannot be read") == 1
    for noise in ("Traceback", "Exception ignored", "Event loop is closed"):
        assert noise not in done.stderr, done.stderr[-3000:]


def test_a_checkpoint_of_non_finite_values_falls_back_to_the_previous(
    saved, tmp_path, monkeypatch, caplog
):
    """A NaN that reached the disk with matching checksums (saves refuse them; here the
    refusal is bypassed) fails the finiteness check at restore."""
    source, _ = saved
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    config = tiny(num_train_steps=6, **{"export.dir": str(tmp_path / "export")})
    setup = step_lib.create_setup(config)
    abstract, shardings = step_lib.state_layout(setup, sharding.make_mesh(config.mesh, ONE))
    ckpt = checkpoint.Checkpoints(str(workdir), owner=True)
    state, step = ckpt.restore(checkpoint.restore_target(abstract, shardings))
    assert step == 4
    nan = jax.tree.map(lambda x: x * np.nan, state.ema_params)
    real = checkpoint.array_records
    monkeypatch.setattr(
        checkpoint,
        "array_records",
        lambda tree: {k: r | {"finite": True} for k, r in real(tree).items()},
    )
    ckpt.save(6, state.replace(ema_params=nan), ckpt.meta(4))
    ckpt.close()
    monkeypatch.undo()

    modes.run("export", config, str(workdir))
    assert json.loads((tmp_path / "export" / "model.json").read_text())["step"] == 4
    assert "checkpoints/6 is unusable: array ema_params/" in caplog.text
    assert "holds non-finite values" in caplog.text


def test_no_valid_checkpoint_is_a_clear_error_naming_each(saved, tmp_path):
    source, _ = saved
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    flip_bits(workdir / "checkpoints" / "4")
    truncate(workdir / "checkpoints" / "2")
    with pytest.raises(CheckpointError) as err:
        modes.run("export", tiny(), str(workdir))
    assert "no valid checkpoint" in str(err.value)
    assert "checkpoints/4:" in str(err.value) and "checkpoints/2:" in str(err.value)
    proc = run_cli(workdir, mode="sample")
    assert_clean_failure(proc, CheckpointError.exit_code, "no valid checkpoint", "checkpoints/2")
    # The trainer sets both aside; the next one refuses to start over from step 0.
    config = tiny(num_train_steps=6, checkpoint_every_steps=2)
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        train.train_and_evaluate(config, str(workdir), devices=ONE)
    with pytest.raises(CheckpointError, match=r"only damaged ones set aside \(2.corrupt, 4.co"):
        train.train_and_evaluate(config, str(workdir), devices=ONE)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2.corrupt", "4.corrupt"]


def test_a_store_that_refuses_access_changes_nothing(saved, tmp_path, monkeypatch):
    source, _ = saved
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    before = _tree(workdir / "checkpoints")

    def refused(self, step, args=None):
        try:
            raise PermissionError(13, "Permission denied", "ocdbt.process_0/d/1234")
        except PermissionError as e:  # as TensorStore reports it: wrapped
            raise ValueError("Encountered error while reading array index") from e

    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "restore", refused)
    for run in (
        lambda: modes.run("export", tiny(), str(workdir)),
        lambda: train.train_and_evaluate(tiny(num_train_steps=6), str(workdir), devices=ONE),
    ):
        with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*/4 \(PermissionError"):
            run()
    assert _tree(workdir / "checkpoints") == before and before  # nothing moved or changed


# --- a full disk ---------------------------------------------------------------------------


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(saved, tmp_path):
    _, six = saved
    workdir = tmp_path / "run"
    proc = run_cli(workdir, fault="enospc:4", num_train_steps=6, checkpoint_every_steps=2)
    assert_clean_failure(
        proc,
        CheckpointError.exit_code,
        "could not write checkpoint",
        "No space left on device",
        "last committed checkpoint is step 2, intact",
    )
    assert checkpoint.Checkpoints(str(workdir), read_only=True).committed_steps() == [2]
    again = run_cli(workdir, num_train_steps=6, checkpoint_every_steps=2)  # space freed
    assert again.returncode == 0, again.stderr[-3000:]
    assert records(workdir, 6) == six


class _FullDisk(io.BytesIO):
    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_outside_checkpoints_is_a_clean_error_and_replaces_nothing(tmp_path, monkeypatch):
    target = tmp_path / "ema_params.msgpack"
    target.write_bytes(b"the previous file")
    path_type = type(files.resolve(str(target)))
    real_open = path_type.open

    def full(self, mode="r", *args, **kwargs):  # writes fail as on a full disk
        return _FullDisk() if "w" in mode else real_open(self, mode, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(path_type, "open", full)
        with pytest.raises(WriteError, match=r"ema_params.msgpack \(No space left on device\)"):
            files.write_atomically(str(target), b"new params")
    assert target.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema_params.msgpack"]  # no temp

    export_dir = tmp_path / "export"
    files.write_directory(str(export_dir), {"model.json": lambda: b"{}"})

    def no_space():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError, match="No space left on device") as err:
        files.write_directory(str(export_dir), {"model.json": lambda: b"[]", "big": no_space})
    assert err.value.exit_code == WorkdirError.exit_code
    assert (export_dir / "model.json").read_bytes() == b"{}"  # the old export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema_params.msgpack", "export"]


# --- a read-only workdir -------------------------------------------------------------------


def _without_write_override():
    """Command prefix that makes even root obey file permissions (drops CAP_DAC_OVERRIDE)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without util-linux setpriv: cannot deny root a write")
    return ["setpriv", "--inh-caps=-dac_override", "--bounding-set=-dac_override", "--"]


def test_read_only_workdir(saved, tmp_path):
    source, _ = saved
    workdir, outside = tmp_path / "run", tmp_path / "out"
    shutil.copytree(source, workdir)
    outside.mkdir()
    for path in [workdir, *workdir.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    prefix = _without_write_override()

    def cli(mode, **overrides):
        cmd = prefix + cli_command(workdir, mode, **overrides)
        return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)

    try:
        before = _tree(workdir)
        assert_clean_failure(
            cli("train", num_train_steps=6), WorkdirError.exit_code, "not writable"
        )
        assert_clean_failure(
            cli("sample", **{"sample.num_samples": 4}), WorkdirError.exit_code, "not writable"
        )
        exported = cli("export", **{"export.dir": str(outside / "export")})
        assert exported.returncode == 0, exported.stderr[-3000:]  # reading needs no writes
        assert (outside / "export" / "model.safetensors").exists()
        assert _tree(workdir) == before
    finally:
        for path in [workdir, *workdir.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


# --- bad input, through the CLI ----------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "notes.txt").write_text("not an npz")
    np.savez(root / "floats.npz", arr_0=np.zeros((4, 8, 8, 1), np.float32))
    np.savez(root / "images.npz", arr_0=np.zeros((4, 8, 8, 1), np.uint8))
    (root / "weights.pth").write_bytes(b"garbage")
    (root / "not_an_export").mkdir()
    (root / "not_an_export" / "keep.txt").write_text("precious")
    return root


def _bad_inputs(root, trained):
    """(mode, workdir, overrides, exit code, fragments) of each refused invocation."""
    empty = root / "empty"
    ev = {"eval.metrics": "digits"}
    return [
        (
            "train",
            empty,
            {"nonexistent_field": 1},
            ConfigError,
            ["--config.nonexistent_field is not a config field"],
        ),
        (
            "train",
            empty,
            {"model.routing.betta": 0.5},
            ConfigError,
            ["--config.model.routing.beta?"],
        ),
        (
            "train",
            trained,
            {"model.hidden_size": 64},
            WorkdirError,
            ["different model", "hidden_size"],
        ),
        (
            "evaluate",
            empty,
            ev | {"eval.samples": root / "notes.txt"},
            InputFileError,
            ["is not an .npz file"],
        ),
        (
            "evaluate",
            empty,
            ev | {"eval.samples": root / "floats.npz"},
            InputFileError,
            ["expected uint8 images"],
        ),
        (
            "evaluate",
            empty,
            ev | {"eval.samples": root / "missing.npz"},
            ConfigError,
            ["no such file"],
        ),
        (
            "evaluate",
            empty,
            {
                "eval.metrics": "inception",
                "eval.samples": root / "images.npz",
                "eval.reference": root / "images.npz",
                "eval.inception_weights": root / "weights.pth",
            },
            InputFileError,
            ["eval.inception_weights="],
        ),
        ("sample", empty, {}, CheckpointError, ["no committed checkpoint", "train first"]),
        (
            "export",
            trained,
            {"export.dir": root / "not_an_export"},
            ConfigError,
            ["refusing to write an export"],
        ),
        (
            "train",
            root / "nan",
            {"optimizer.learning_rate": 1e30, "num_train_steps": 8},
            TrainingDiverged,
            ["loss is nan"],
        ),
    ]


def test_bad_inputs_are_refused_cleanly_through_the_cli(saved, inputs):
    trained, _ = saved
    for mode, workdir, overrides, error, fragments in _bad_inputs(inputs, trained):
        proc = run_cli(workdir, mode=mode, **overrides)
        assert_clean_failure(proc, error.exit_code, *fragments)
    assert (inputs / "not_an_export" / "keep.txt").read_text() == "precious"


def test_verbose_shows_the_traceback(tmp_path):
    cmd = cli_command(tmp_path, "sample") + ["--verbose"]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == CheckpointError.exit_code
    assert "Traceback" in proc.stderr and "dtr_jax: " in proc.stderr


def test_config_file_mistakes(tmp_path):
    cmd = cli_command(tmp_path)
    cmd[cmd.index(DIGITS)] = str(tmp_path / "nope.py")
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert_clean_failure(proc, ConfigError.exit_code, "--config cannot be loaded", "nope.py")
    typo = tmp_path / "typo.py"  # a field the file adds by mistake, instead of setting one
    typo.write_text(
        "from dtr_jax.config import default_config\n\n\n"
        "def get_config():\n    c = default_config()\n    c.model.routing.bta = 0.5\n    return c\n"
    )
    cmd[cmd.index(str(tmp_path / "nope.py"))] = str(typo)
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert_clean_failure(
        proc,
        ConfigError.exit_code,
        "model.routing.bta is not a config field: did you mean model.routing.beta?",
    )


def test_library_tracebacks_are_one_line_unless_verbose():
    import logging
    import sys

    try:
        raise RuntimeError("a read Orbax left pending")
    except RuntimeError:
        info = sys.exc_info()
    for verbose in (False, True):
        record = logging.LogRecord(
            "asyncio",
            logging.ERROR,
            "/x/asyncio/base_events.py",
            1,
            "Task exception was never retrieved",
            (),
            info,
        )
        assert modes._LibraryInfoFilter(verbose).filter(record)  # kept: an error
        assert (record.exc_info is None) != verbose
        assert ("a read Orbax left pending" in record.getMessage()) != verbose
