"""Flow models end to end: SiT release checkpoints in (the DiT layout, SiT's time and
output), sampled through the CLI as SiT samples them; a flow training run resumed to the
bit.

The PyTorch side is tests/torch_reference.py's TSiT (SiT's forward on the DiT layout) with
random non-zero weights, sampled with SiT's Euler ODE written out here.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from dtr_jax import export, train
from dtr_jax.config import load_config
from helpers import ROOT, TINY, cli_env, read_scalars
from torch_reference import TSiT

DIGITS_FLOW = str(ROOT / "configs" / "digits_flow.py")
ARCH = dict(
    input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10
)
SIT = {"model.depth": 2, "model.learn_sigma": True, "model.routing.kind": "none"}


def flow_config(**overrides):
    return load_config(DIGITS_FLOW, **(TINY | overrides))


@pytest.fixture(scope="module")
def sit(tmp_path_factory):
    """A SiT of the release's layout (learned sigma, no routing) with random weights, saved
    as SiT-XL-2-256x256.pt is: one state dict."""
    torch.manual_seed(0)
    model = TSiT(**ARCH).eval()
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name != "pos_embed":
                w.copy_(torch.randn_like(w) * (w[0].numel() ** -0.5 if w.ndim > 1 else 0.1))
    path = tmp_path_factory.mktemp("sit") / "SiT-digits.pt"
    torch.save(model.state_dict(), path)
    return model, str(path)


def test_sit_checkpoint_imports_and_samples_as_sit(sit):
    model, path = sit
    exported = export.from_pytorch(flow_config(init_from=path, **SIT))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 1, 8, 8), dtype=np.float32)
    t = np.array([0.0, 0.25, 0.6, 1.0], np.float32)  # SiT's time: 1 is data
    y = np.array([3, 0, 10, 7])  # 10: the null label
    with torch.no_grad():
        want = model(*(torch.from_numpy(a) for a in (x, t, y))).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(exported.apply(x.transpose(0, 2, 3, 1), t, y))
    assert got.shape == (4, 8, 8, 2)  # the learned-sigma layout; the flow drops the second half
    np.testing.assert_allclose(got[..., :1], want, atol=1e-5)

    # Guided Euler ODE, 4 steps from the same noise: SiT's sampler written out in torch
    labels, steps, scale = np.array([1, 4, 9]), 4, 3.0
    samples = exported.sample(labels, 5, num_steps=steps, cfg_scale=scale, sampler="euler")
    noise_key = jax.random.split(jax.random.key(5))[0]  # the sampler's first draw
    z = np.asarray(jax.random.normal(noise_key, (3, 8, 8, 1)))
    xt = torch.from_numpy(z.transpose(0, 3, 1, 2).copy())
    ts = torch.linspace(0, 1, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            tt = torch.full((3,), float(ts[i]))
            v = model.guided(xt, tt, torch.from_numpy(labels), scale, torch.full((3,), 10))
            xt = xt + (ts[i + 1] - ts[i]) * v
    np.testing.assert_allclose(samples, xt.numpy().transpose(0, 2, 3, 1), atol=1e-4)


def test_a_flow_model_exports_and_loads_with_its_objective(sit, tmp_path):
    _, path = sit
    config = flow_config(init_from=path, **SIT)
    imported = export.from_pytorch(config)
    out = export.export(jax.device_get(imported.params), config, str(tmp_path / "export"))
    loaded = export.load(out)
    assert loaded.spec["diffusion"] == dict(
        objective="flow", path="linear", prediction="velocity", num_tasks=1000
    )
    assert loaded.spec["sampling"]["sampler"] == "heun"
    labels = np.array([2, 7])
    np.testing.assert_array_equal(loaded.sample(labels, 3), imported.sample(labels, 3))


def test_sit_checkpoint_samples_through_the_cli(sit, tmp_path):
    _, path = sit
    fields = TINY | SIT | {"init_from": path, "sample.num_samples": 6, "sample.batch_size": 6}
    fields |= {"sample.sampler": "euler_maruyama", "sample.num_steps": 5}
    argv = [sys.executable, "-m", "dtr_jax.main", "--config", DIGITS_FLOW, "--mode", "sample"]
    argv += ["--workdir", str(tmp_path)] + [f"--config.{k}={v}" for k, v in fields.items()]
    subprocess.run(argv, check=True, cwd=ROOT, env=cli_env(), capture_output=True)
    (written,) = (tmp_path / "samples").glob("ema_step0_euler_maruyama5_cfg2_seed0_n6_*.npz")
    with np.load(written) as data:
        assert data["arr_0"].shape == (6, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    assert os.path.isfile(str(written)[: -len(".npz")] + ".png")


def leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(jax.device_get(tree))]


def test_flow_training_with_uw_resumes_exactly(tmp_path):
    """DTR + UW on the flow objective (stratified times), on a 2 x 2 mesh: a run stopped at
    step 3 and resumed ends where an uninterrupted one does, to the bit."""
    fields = {"weighting.kind": "uw", "mesh.data": 2, "mesh.fsdp": 2}

    def run(steps, workdir):
        config = flow_config(num_train_steps=steps, **fields)
        return train.train_and_evaluate(config, workdir, devices=jax.devices()[:4])

    straight = run(6, str(tmp_path / "a"))
    run(3, str(tmp_path / "b"))
    resumed = run(6, str(tmp_path / "b"))
    assert int(resumed.step) == 6
    for field in ("params", "ema_params", "opt_state", "uw_log_vars", "uw_opt_state"):
        a, b = leaves(getattr(straight, field)), leaves(getattr(resumed, field))
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    assert np.any(leaves(resumed.uw_log_vars)[0] != 0)
    assert read_scalars(tmp_path / "b", "cluster_loss/7_t875-999")  # task rows 875..999
