"""Sampling: determinism, shapes, guidance, original timesteps, and --mode sample."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtr_jax import inference, sample, sharding, train
from dtr_jax.config import ConfigError
from dtr_jax.errors import CheckpointError
from dtr_jax.modes import run
from helpers import tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny digits model trained a few steps (non-zero weights), and its workdir."""
    workdir = tmp_path_factory.mktemp("sample_run")
    config = tiny(**{"num_train_steps": 8, "optimizer.learning_rate": 1e-2})
    state = train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
    return config, str(workdir), state


def _sampler(config, state, devices=None):
    dm = inference.from_config(config)
    mesh = sharding.make_mesh(config.mesh, devices or jax.devices()[:1])
    return sample.Sampler(dm, config.sample, mesh, state.ema_params)


def test_sampling_is_deterministic_with_the_right_shape(trained):
    config, _, state = trained
    sampler = _sampler(config, state)
    labels = np.arange(5) % 10
    a = sampler(state.ema_params, labels, jax.random.key(0))
    b = sampler(state.ema_params, labels, jax.random.key(0))
    c = sampler(state.ema_params, labels, jax.random.key(1))
    assert a.shape == (5, 8, 8, 1) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_sampling_over_eight_devices_matches_one(trained):
    config, _, state = trained
    labels = np.arange(10)
    one = _sampler(config, state)(state.ema_params, labels, jax.random.key(3))
    eight = _sampler(config, state, jax.devices())(state.ema_params, labels, jax.random.key(3))
    np.testing.assert_allclose(one, eight, atol=1e-4)


def test_guidance_scale_one_equals_the_conditional_model(trained):
    config, _, state = trained
    dm = inference.from_config(config)
    model, params, tables = dm.model, state.params, dm.tables  # raw: EMA is ~init here
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    t, y = jnp.array([0, 10, 500, 999]), jnp.array([1, 2, 3, 4])
    conditional = inference.model_fn(model, params, y, tables, 1.0)(x, t)
    guided = model.apply(
        {"params": params}, x, t, y, tables, cfg_scale=1.0, method=type(model).guided
    )
    unconditional = inference.model_fn(model, params, jnp.full_like(y, 10), tables, 1.0)(x, t)
    assert float(jnp.abs(conditional - unconditional).max()) > 1e-3  # labels matter
    np.testing.assert_allclose(guided, conditional, atol=1e-6)


@dataclasses.dataclass(frozen=True)
class SpyModel:
    """Stands in for the DiT: records the timesteps it is called with, predicts zeros."""

    input_size: int = 8
    in_channels: int = 1
    num_classes: int = 10

    def apply(self, variables, x, t, y, tables):
        jax.debug.callback(lambda tt: SEEN.append(int(tt[0])), t, ordered=True)
        # The row of the routing table for t must be what the model sees.
        row = jnp.asarray(tables)[0, t, 0].astype(x.dtype)
        return jnp.concatenate([jnp.zeros_like(x) * row[:, None, None, None], x * 0], -1)


SEEN = []


def test_respaced_sampler_feeds_original_timesteps():
    SEEN.clear()
    config = tiny(**{"sample.num_steps": 250, "sample.cfg_scale": 1.0})
    diffusion = inference.from_config(config).diffusion
    fn = inference.sample_fn(inference.DiffusionModel(SpyModel(), None, diffusion), config.sample)
    tables = np.ones((1, 1000, 4), np.uint8)
    jax.block_until_ready(fn({}, jnp.zeros((2,), jnp.int32), tables, jax.random.key(0)))
    expected = sorted(
        set(round(i * 999 / 249) for i in range(250)), reverse=True
    )  # 999, 995, ..., 4, 0
    assert SEEN == expected and SEEN[:3] == [999, 995, 991] and SEEN[-2:] == [4, 0]


def test_labels_chosen_or_uniform():
    config = tiny(**{"sample.labels": "3,7"})
    np.testing.assert_array_equal(sample.labels_for(config.sample, 10, 5), [3, 7, 3, 7, 3])
    drawn = sample.labels_for(tiny().sample, 10, 1000)
    assert set(drawn) == set(range(10))
    np.testing.assert_array_equal(drawn, sample.labels_for(tiny().sample, 10, 1000))


def test_sample_mode_writes_npz_and_png(trained):
    config, workdir, _ = trained
    config = config.copy_and_resolve_references()
    config.sample.num_samples, config.sample.batch_size, config.sample.labels = 12, 5, "4"
    path = run("sample", config, workdir)
    assert path.endswith("ema_step8_ddpm4_cfg2_seed0.npz")
    with np.load(path) as data:
        assert data["arr_0"].shape == (12, 8, 8, 1) and data["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(data["arr_1"], [4] * 12)
    assert os.path.isfile(path[: -len(".npz")] + ".png")


@pytest.mark.parametrize("mode", ["sample", "evaluate", "export"])
def test_every_reading_mode_validates_the_diffusion_fields(mode, tmp_path):
    config = tiny(**{"diffusion.schedule": "quadratic", "diffusion.num_timesteps": 0})
    with pytest.raises(ConfigError) as err:
        run(mode, config, str(tmp_path))
    assert "diffusion.schedule='quadratic'" in str(err.value)
    assert "diffusion.num_timesteps=0" in str(err.value)
    assert not any(tmp_path.iterdir())


def test_sample_mode_without_checkpoint_or_with_unknown_decoder(tmp_path):
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        run("sample", tiny(), str(tmp_path))
    with pytest.raises(ConfigError, match="sample.decoder"):
        run("sample", tiny(**{"sample.decoder": "taesd"}), str(tmp_path))
    assert not any(tmp_path.iterdir())
