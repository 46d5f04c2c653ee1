"""The training system end to end on tiny configs (8 fake CPU devices)."""

import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtr_jax import checkpoint, sharding, step, train
from dtr_jax import config as config_lib
from dtr_jax.config import ConfigError, load_config, validate
from dtr_jax.models import dit
from helpers import DIGITS, ROOT, cli_env, read_scalars, tiny


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_tiny_run_learns_and_writes_outputs(tmp_path):
    config = tiny(
        **{
            "num_train_steps": 60,
            "log_every_steps": 20,
            "model.hidden_size": 64,
            "model.num_heads": 4,
            "optimizer.learning_rate": 2e-3,
        }
    )
    train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    loss = read_scalars(tmp_path, "loss")
    assert sorted(loss) == [20, 40, 60]
    assert loss[60] < 0.5 * loss[20], loss
    for tag in (
        "grad_norm",
        "learning_rate",
        "steps_per_sec",
        "images_per_sec",
        "cluster_loss/0_t0-124",
        "cluster_loss/7_t875-999",
    ):
        assert read_scalars(tmp_path, tag), tag
    assert (tmp_path / "ema_params.msgpack").stat().st_size > 0
    for plot in ("samples.png", "routing.png", "loss_by_timestep.png"):
        assert (tmp_path / plot).stat().st_size > 0, plot
    assert checkpoint.Checkpoints(str(tmp_path), read_only=True).latest_step() == 60


def test_eight_devices_fsdp_match_one_device(tmp_path):
    one = train.train_and_evaluate(tiny(), str(tmp_path / "one"), devices=jax.devices()[:1])
    eight = train.train_and_evaluate(
        tiny(**{"mesh.data": 4, "mesh.fsdp": 2}), str(tmp_path / "eight")
    )
    kernel = eight.params["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    loss_one, loss_eight = (read_scalars(tmp_path / d, "loss") for d in ("one", "eight"))
    assert sorted(loss_one) == sorted(loss_eight) == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [loss_eight[s] for s in range(1, 5)], [loss_one[s] for s in range(1, 5)], rtol=2e-5
    )
    for a, b in zip(leaves(eight.params), leaves(one.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_scanned_blocks_train_as_the_per_block_model(tmp_path):
    """scan_blocks (+ remat) on an fsdp mesh: the same init, losses and trained params as
    the per-block model, with per-block random tables scanned along."""
    common = {"model.depth": 2, "model.routing.kind": "random", "mesh.data": 2, "mesh.fsdp": 2}
    devices = jax.devices()[:4]
    plain = train.train_and_evaluate(tiny(**common), str(tmp_path / "plain"), devices=devices)
    scanned_config = tiny(
        **common, **{"model.scan_blocks": True, "model.remat_policy": "nothing_saveable"}
    )
    scanned = train.train_and_evaluate(scanned_config, str(tmp_path / "scan"), devices=devices)
    kernel = scanned.params["blocks"]["mlp"]["fc1"]["kernel"]
    assert kernel.shape == (2, 32, 128)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    losses = [read_scalars(tmp_path / d, "loss") for d in ("plain", "scan")]
    assert sorted(losses[0]) == sorted(losses[1]) == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [losses[1][s] for s in range(1, 5)], [losses[0][s] for s in range(1, 5)], rtol=1e-5
    )
    unstacked = dit.unstack_blocks(jax.device_get(scanned.params))
    for a, b in zip(leaves(unstacked), leaves(plain.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_resume_is_exact(tmp_path):
    mesh = {"mesh.data": 4, "mesh.fsdp": 2}
    straight = train.train_and_evaluate(tiny(num_train_steps=6, **mesh), str(tmp_path / "a"))
    train.train_and_evaluate(tiny(num_train_steps=3, **mesh), str(tmp_path / "b"))
    resumed = train.train_and_evaluate(tiny(num_train_steps=6, **mesh), str(tmp_path / "b"))
    assert int(resumed.step) == 6
    for field in ("params", "ema_params", "opt_state"):
        for a, b in zip(
            leaves(getattr(straight, field)), leaves(getattr(resumed, field)), strict=True
        ):
            np.testing.assert_array_equal(a, b)


def test_uw_state_resumes_and_restores_onto_fewer_devices(tmp_path):
    uw = {"weighting.kind": "uw", "weighting.clustering": "snr", "mesh.data": 4, "mesh.fsdp": 2}
    saved = train.train_and_evaluate(tiny(**uw), str(tmp_path))
    assert read_scalars(tmp_path, "uw_weight/0")
    assert saved.uw_log_vars.shape == (8,) and np.any(np.asarray(saved.uw_log_vars) != 0)
    config = tiny(**(uw | {"mesh.data": 2, "mesh.fsdp": 1}))
    setup = step.create_setup(config)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:2])
    abstract, shardings = step.state_layout(setup, mesh)
    ckpt = checkpoint.Checkpoints(str(tmp_path), read_only=True)
    restored, _ = ckpt.restore(checkpoint.restore_target(abstract, shardings))
    assert len(restored.params["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.device_set) == 2
    for a, b in zip(leaves(saved), leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)


def _snapshot(path):
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


def test_workdir_of_another_model_is_refused_untouched(tmp_path):
    one = jax.devices()[:1]
    train.train_and_evaluate(tiny(num_train_steps=1), str(tmp_path), devices=one)
    before = _snapshot(tmp_path)
    changes = (
        {"model.hidden_size": 64},
        {"model.routing.kind": "random"},
        {"model.routing.beta": 0.5},
        {"model.patch_size": 4},
        {"model.learn_sigma": False},
        {"model.num_classes": 1},
        {"diffusion.schedule": "cosine"},
        {"diffusion.num_timesteps": 500},
        {"weighting.kind": "uw"},
        {"model.scan_blocks": True},
    )
    named = {"weighting.kind": "uw.num_clusters", "model.scan_blocks": "param_layout"}
    for override in changes:
        field = next(iter(override))
        field = named.get(field, field.rpartition(".")[2])
        with pytest.raises(ConfigError, match=f"different model.*{field}"):
            train.train_and_evaluate(
                tiny(num_train_steps=2, **override), str(tmp_path), devices=one
            )
    # The same model, with other optimizer state: refused too, and the checkpoint kept.
    with pytest.raises(ConfigError, match=r"laid out otherwise.*opt_state.*grad_clip"):
        train.train_and_evaluate(
            tiny(num_train_steps=2, **{"optimizer.grad_clip": 1.0}), str(tmp_path), devices=one
        )
    assert _snapshot(tmp_path) == before


def test_fields_the_tables_ignore_are_not_part_of_the_model():
    ignored = {
        "dtr": {"model.routing.seed": 7},
        "none": {"model.routing.beta": 0.5, "model.routing.alpha": 1.0, "model.routing.seed": 7},
        "random": {"model.routing.alpha": 1.0},
    }
    for kind, fields in ignored.items():
        base = tiny(**{"model.routing.kind": kind})
        assert config_lib.signature(tiny(**{"model.routing.kind": kind}, **fields)) == (
            config_lib.signature(base)
        ), kind
    assert config_lib.signature(tiny(**{"model.routing.seed": 7, "model.routing.kind": "random"}))[
        "routing"
    ] == {"kind": "random", "beta": 0.8, "seed": 7}
    # Checkpoints of earlier versions recorded beta, alpha and seed for every kind.
    ours = config_lib.signature(tiny())
    earlier = ours | {"routing": {"kind": "dtr", "beta": 0.8, "alpha": 4.0, "seed": 0}}
    assert checkpoint._current_routing(earlier) == ours


def test_workdir_that_cannot_be_created_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="workdir"):
        train.train_and_evaluate(tiny(), str(blocker / "run"))
    assert blocker.read_text() == "x"


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"model.routing.beta": 1.5}, "model.routing.beta"),
        ({"model.routing.alpha": 0.0}, "model.routing.alpha"),
        ({"model.routing.kind": "learned"}, "model.routing.kind"),
        ({"model.num_heads": 3}, "model.num_heads"),
        ({"model.input_size": 9}, "model.patch_size"),
        ({"model.name": "DiT-Q/2"}, "model.name"),
        ({"global_batch_size": 12, "mesh.data": 8}, "global_batch_size"),
        ({"mesh.data": 3}, "mesh.data"),
        ({"weighting.kind": "uw", "weighting.num_clusters": 6}, "weighting.num_clusters"),
        ({"weighting.kind": "focal"}, "weighting.kind"),
        ({"data.name": "imagenet2077"}, "data.name"),
        ({"diffusion.schedule": "quadratic"}, "diffusion.schedule"),
        ({"model.dtype": "float8"}, "model.dtype"),
        ({"model.remat_policy": "sometimes"}, "model.remat_policy"),
        # this suite runs on CPU: cuDNN's and splash's kernels are refused, naming it
        (
            {"model.attention": "cudnn", "model.dtype": "bfloat16"},
            "model.attention='cudnn' needs a GPU backend, and this process runs on 'cpu'",
        ),
        ({"model.attention": "splash"}, "model.attention='splash' is Pallas's TPU kernel"),
        ({"sample.labels": "3,12"}, "sample.labels"),
    ],
)
def test_invalid_config_names_its_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(tiny(**overrides), num_devices=8)


def test_validation_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        validate(tiny(**{"model.routing.beta": 0.0, "model.num_heads": 3, "mesh.data": 3}), 8)
    assert len(err.value.problems) == 3


# Two of the four (B/2 and L/2 differ only in size: tests/test_benchmarks.py builds each
# paper config's model, tests/test_data.py validates each as the README runs it).
@pytest.mark.parametrize(
    "name, extra",
    [
        ("dit_s", {}),
        (
            "dit_xl",
            {
                "model.dtype": "bfloat16",
                "model.remat_policy": "nothing_saveable",
                "model.scan_blocks": True,
            },
        ),
    ],
)
def test_paper_configs_run_two_synthetic_steps(name, extra, tmp_path):
    config = load_config(
        str(ROOT / "configs" / f"{name}.py"),
        **extra,
        **{
            "num_train_steps": 2,
            "global_batch_size": 2,
            "log_every_steps": 1,
            "model.depth": 1,
            "data.name": "synthetic",
            "mesh.data": 1,
            "mesh.fsdp": 2,
            "sample.num_steps": 2,
            "sample.grid_per_class": 1,
        },
    )
    state = train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:2])
    assert int(state.step) == 2
    assert np.isfinite(read_scalars(tmp_path, "loss")[2])
    kernel = state.params["x_embedder"]["proj"]["kernel"]
    assert kernel.shape[-1] == {"dit_s": 384, "dit_b": 768, "dit_l": 1024, "dit_xl": 1152}[name]
    assert kernel.dtype == jnp.float32  # params stay float32 under bf16 compute
    assert not (tmp_path / "samples.png").exists()  # sample.decoder=latents: no images


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    one = jax.devices()[:1]
    train.train_and_evaluate(tiny(num_train_steps=2), str(tmp_path), devices=one)
    blow_up = tiny(
        **{"num_train_steps": 8, "checkpoint_every_steps": 1, "optimizer.learning_rate": 1e30}
    )
    with pytest.raises(FloatingPointError, match="stopping without saving") as err:
        train.train_and_evaluate(blow_up, str(tmp_path), devices=one)
    ckpt = checkpoint.Checkpoints(str(tmp_path), read_only=True)
    assert f"The last committed checkpoint is step {ckpt.latest_step()}, intact" in str(err.value)
    losses = read_scalars(tmp_path, "loss")
    last_finite = max(step for step, loss in losses.items() if np.isfinite(loss))
    assert ckpt.latest_step() <= last_finite < 8
    setup = step.create_setup(blow_up)
    mesh = sharding.make_mesh(blow_up.mesh, one)
    abstract, shardings = step.state_layout(setup, mesh)
    restored, _ = ckpt.restore(checkpoint.restore_target(abstract, shardings))
    assert all(np.isfinite(leaf).all() for leaf in leaves(restored.params))


def test_sigterm_saves_and_resume_finishes(tmp_path):
    env = cli_env()
    cmd = [
        sys.executable,
        "-m",
        "dtr_jax.main",
        "--config",
        DIGITS,
        "--workdir",
        str(tmp_path),
        "--config.model.depth=1",
        "--config.model.hidden_size=32",
        "--config.model.num_heads=2",
        "--config.global_batch_size=16",
        "--config.log_every_steps=5",
        "--config.checkpoint_every_steps=100000",
        "--config.sample_every_steps=0",
        "--config.sample.num_steps=4",
        "--config.sample.grid_per_class=1",
    ]
    proc = subprocess.Popen(
        cmd + ["--config.num_train_steps=100000"], env=env, stderr=subprocess.PIPE, text=True
    )
    for line in proc.stderr:  # wait until training is clearly under way
        if "] loss=" in line or "] cluster_loss" in line:
            break
    proc.send_signal(signal.SIGTERM)
    proc.stderr.read()
    assert proc.wait(timeout=120) == 0
    steps = checkpoint.Checkpoints(str(tmp_path), read_only=True).committed_steps()
    assert len(steps) == 1 and 5 <= steps[0] < 100000
    finish = steps[0] + 3
    subprocess.run(
        cmd + [f"--config.num_train_steps={finish}"],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert checkpoint.Checkpoints(str(tmp_path), read_only=True).latest_step() == finish
    assert (tmp_path / "samples.png").exists()


def test_a_host_transfer_in_the_hot_loop_fails_loudly(tmp_path, monkeypatch):
    """The step runs under jax.transfer_guard('disallow'): a batch left on the host (an
    implicit transfer on every step) is an error, not a silent slowdown."""

    def host_batches(source, config, sharding, start):
        del sharding, start
        b = config.global_batch_size
        while True:
            yield {
                "image": np.zeros((b, 8, 8, 1), np.float32),
                "label": np.zeros((b,), np.int32),
            }

    monkeypatch.setattr(train, "device_batches", host_batches)
    with pytest.raises(Exception, match="[Dd]isallowed host-to-device transfer"):
        train.train_and_evaluate(tiny(), str(tmp_path), devices=jax.devices()[:1])
