"""Flax FID InceptionV3 vs. a PyTorch reference of pytorch-fid's architecture (random weights)."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from dtr_jax.models import inception  # noqa: E402

# ----------------------------------------------------------------------------- torch reference
# pytorch-fid's fid_inception_v3(): torchvision Inception3 blocks + FIDInceptionA/C/E_1/E_2.


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for i in (2, 3, 4, 5):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for m in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = m(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)


class TorchFIDInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, 32)
        self.Mixed_5c = FIDInceptionA(256, 64)
        self.Mixed_5d = FIDInceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, 128)
        self.Mixed_6c = FIDInceptionC(768, 160)
        self.Mixed_6d = FIDInceptionC(768, 160)
        self.Mixed_6e = FIDInceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):  # NCHW in [0, 1], pytorch-fid resize_input + normalize_input
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        pool = x.mean(dim=(2, 3))
        return pool, self.fc(pool)


def _random_torch_model(seed: int = 0) -> nn.Module:
    """He-init convs, random BN affine + running stats: BN matters, activations stay O(1)."""
    torch.manual_seed(seed)
    model = TorchFIDInception().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def torch_model():
    return _random_torch_model()


@pytest.fixture(scope="module")
def feature_fn(torch_model):
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    return inception.make_feature_fn(inception.convert_state_dict(sd))


@pytest.mark.parametrize("hw", [(64, 64), (299, 299), (320, 352)])  # up, none, down
def test_matches_torch(torch_model, feature_fn, hw):
    rng = np.random.default_rng(hw[0])
    images = rng.random((2, *hw, 3), dtype=np.float32)
    with torch.no_grad():
        pool_t, logits_t = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2))
    out = feature_fn(images)
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    # Achieved on CPU: max |diff| ~7e-6 (pool, values up to ~9) and ~3e-6 (logits).
    np.testing.assert_allclose(np.asarray(out["pool"]), pool_t.numpy(), rtol=3e-5, atol=3e-5)
    np.testing.assert_allclose(np.asarray(out["logits"]), logits_t.numpy(), rtol=3e-5, atol=3e-5)


def test_uint8_input(feature_fn):
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    a = feature_fn(images)["pool"]
    b = feature_fn(images.astype(np.float32) / 255.0)["pool"]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_resize_matches_torch():
    x = np.random.default_rng(2).random((1, 17, 40, 3), dtype=np.float32)
    for size in [(299, 299), (9, 13), (17, 40)]:
        ours = np.asarray(inception.resize_bilinear(x, size))
        ref = (
            F.interpolate(
                torch.from_numpy(x).permute(0, 3, 1, 2),
                size=size,
                mode="bilinear",
                align_corners=False,
            )
            .permute(0, 2, 3, 1)
            .numpy()
        )
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


def test_fc_bias_false_drops_bias(torch_model, feature_fn):
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    no_bias = inception.make_feature_fn(inception.convert_state_dict(sd), fc_bias=False)
    x = np.random.default_rng(3).random((2, 299, 299, 3), dtype=np.float32)
    a, b = feature_fn(x), no_bias(x)
    np.testing.assert_array_equal(np.asarray(a["pool"]), np.asarray(b["pool"]))
    np.testing.assert_allclose(
        np.asarray(b["logits"]), np.asarray(a["logits"]) - sd["fc.bias"], rtol=1e-5, atol=1e-5
    )


def test_load_pth_and_npz(tmp_path, torch_model):
    sd = torch_model.state_dict()
    pth = tmp_path / inception.FID_WEIGHTS_FILE
    torch.save(sd, pth)
    v_pth = inception.load_pytorch_fid_weights(pth)
    npz = tmp_path / "fid.npz"
    inception.pth_to_npz(pth, npz)
    v_npz = inception.load_pytorch_fid_weights(npz)
    k = v_pth["params"]["Mixed_5b"]["branch1x1"]["conv"]["kernel"]
    assert k.shape == (1, 1, 192, 64)
    w = sd["Mixed_5b.branch1x1.conv.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(k), w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        v_pth["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"],
        sd["Conv2d_1a_3x3.bn.running_var"].numpy(),
    )
    np.testing.assert_array_equal(v_pth["params"]["fc"]["kernel"], sd["fc.weight"].numpy().T)
    leaves_a, tree_a = jax.tree_util.tree_flatten(v_pth)
    leaves_b, tree_b = jax.tree_util.tree_flatten(v_npz)
    assert tree_a == tree_b and all(
        np.array_equal(a, b) for a, b in zip(leaves_a, leaves_b, strict=True)
    )


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / inception.FID_WEIGHTS_FILE
    with pytest.raises(FileNotFoundError, match="FID Inception weights not found at") as e:
        inception.load_pytorch_fid_weights(path)
    assert str(path) in str(e.value)


def _state_dict() -> dict:
    return {k: np.zeros(s, np.float32) for k, s in inception.expected_torch_shapes().items()}


def test_wrong_key(tmp_path):
    sd = _state_dict()
    sd["Mixed_5b.branch1x1.conv.weights"] = sd.pop("Mixed_5b.branch1x1.conv.weight")
    path = tmp_path / "bad.npz"
    np.savez(path, **sd)
    with pytest.raises(ValueError) as e:
        inception.load_pytorch_fid_weights(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing keys: Mixed_5b.branch1x1.conv.weight" in msg
    assert "unexpected keys: Mixed_5b.branch1x1.conv.weights" in msg


def test_wrong_shape():
    sd = _state_dict()
    sd["fc.weight"] = np.zeros((1000, 2048), np.float32)
    msg = r"shape mismatch: fc.weight: \(1000, 2048\) != \(1008, 2048\)"
    with pytest.raises(ValueError, match=msg):
        inception.convert_state_dict(sd)


def test_num_batches_tracked_optional():
    sd = _state_dict()
    sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.zeros((), np.int64)
    v = inception.convert_state_dict(sd)
    assert set(v) == {"params", "batch_stats"}


def test_files_that_are_not_weights_say_so_without_pickle_advice(tmp_path):
    text = tmp_path / "weights.pth"
    text.write_text("not weights")
    noise = tmp_path / "weights.npz"
    noise.write_bytes(np.random.default_rng(0).bytes(300))
    for path, reason in ((text, "is not a PyTorch file"), (noise, "is not an .npz")):
        with pytest.raises(ValueError, match=reason) as err:
            inception.read_state_dict(path)
        assert "pickle" not in str(err.value).replace("legacy pickle", "")
        assert "weights_only=False" not in str(err.value)
