"""The SD VAE in Flax (dtr_jax.models.vae) against diffusers' own AutoencoderKL, its weight
loading and refusals, and the sd_vae decoder end to end.

The reference is diffusers' PyTorch `AutoencoderKL`, built offline at small configs of
the same architecture with every weight random (norm scales and biases included) and
saved with `save_pretrained`, exactly as a downloaded VAE folder is laid out.
"""

import dataclasses
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL as TorchAutoencoderKL  # noqa: E402
from flax import traverse_util  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from dtr_jax import decoders, modes, train  # noqa: E402
from dtr_jax.config import ConfigError, validate  # noqa: E402
from dtr_jax.models import vae as vae_lib  # noqa: E402
from dtr_jax.models.vae import VAEConfig  # noqa: E402
from helpers import tiny  # noqa: E402

SMALL = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
# Everything optional switched: no quant convs, no mid attention, a shift, 3 levels.
VARIANT = VAEConfig(
    in_channels=1,
    out_channels=2,
    latent_channels=8,
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    norm_num_groups=4,
    mid_block_add_attention=False,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.5,
    shift_factor=0.25,
)
# The sd-vae-ft-ema / sd-vae-ft-mse config.json as published (diffusers 0.4.2: no
# scaling_factor, no quant-conv switches).
SD_CONFIG_JSON = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
WEIGHTS = "diffusion_pytorch_model.safetensors"
TOL = 1e-4


def diffusers_kwargs(c: VAEConfig) -> dict:
    kw = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}
    n = len(c.block_out_channels)
    kw.update(shift_factor=c.shift_factor or None, sample_size=32)
    return kw | dict(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n
    )


def random_torch_vae(c: VAEConfig, seed: int = 0) -> TorchAutoencoderKL:
    """diffusers' AutoencoderKL at `c`, every weight random: kernels ~ N(0, 1/fan_in),
    biases ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2)."""
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(**diffusers_kwargs(c)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
            else:
                p.copy_(
                    torch.randn_like(p) * 0.1
                    + (1.0 if "norm" in name and "weight" in name else 0.0)
                )
    return model


def flax_path(key: str) -> tuple[str, ...]:
    """The test's own statement of the name rule: a numeric part joins its parent with '_',
    '.' becomes a tree level; weight -> kernel (conv, linear) or scale (GroupNorm)."""
    path = []
    for part in key.split(".")[:-1]:
        if part.isdigit():
            path[-1] += f"_{part}"
        else:
            path.append(part)
    leaf = key.rsplit(".", 1)[1]
    if leaf == "weight":
        leaf = "scale" if "norm" in path[-1] else "kernel"
    return (*path, leaf)


def flax_shape(key: str, shape) -> tuple[int, ...]:
    shape = tuple(shape)
    if len(shape) == 4:  # OIHW -> HWIO
        return (shape[2], shape[3], shape[1], shape[0])
    if len(shape) == 2:
        return shape[::-1]
    return shape


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(torch model, diffusers folder) of the small config."""
    folder = tmp_path_factory.mktemp("small_vae")
    model = random_torch_vae(SMALL)
    model.save_pretrained(str(folder))
    return model, str(folder)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def max_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


# --- numerics against diffusers ---------------------------------------------------------------


@pytest.mark.parametrize("config", [SMALL, VARIANT], ids=["small", "variant"])
def test_moments_and_decoder_match_diffusers(config, tmp_path):
    model = random_torch_vae(config, seed=1)
    model.save_pretrained(str(tmp_path))
    vae, params = vae_lib.load_vae(str(tmp_path))
    assert vae.config == config
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 32, 32, config.in_channels)).astype(np.float32)
    side = 32 // config.down_factor
    latents = rng.normal(size=(2, side, side, config.latent_channels)).astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(nchw(images)).latent_dist
        z = latents / config.scaling_factor + config.shift_factor
        want_images = nhwc(model.decode(nchw(z)).sample)
    mean, std = jax.jit(lambda p, x: vae_lib.encode(vae, p, x))(params, images)
    _, logvar = vae.apply({"params": params}, images, method=vae_lib.AutoencoderKL.encode_moments)
    got_images = jax.jit(lambda p, x: vae_lib.decode(vae, p, x))(params, latents)
    s, shift = config.scaling_factor, config.shift_factor
    assert max_err(mean, (nhwc(posterior.mean) - shift) * s) <= TOL
    assert max_err(std, nhwc(posterior.std) * s) <= TOL
    assert max_err(logvar, nhwc(posterior.logvar)) <= TOL
    assert max_err(got_images, want_images) <= TOL
    assert np.abs(want_images).max() > 0.5 and np.std(nhwc(posterior.logvar)) > 0.05  # not trivial


def test_logvar_is_clamped_as_diffusers_does(small):
    model, folder = small
    vae, params = vae_lib.load_vae(folder)
    flat = traverse_util.flatten_dict(params)
    flat[("quant_conv", "bias")] = np.array([0, 0, 0, 0, 100, -100, 0, 0], np.float32)
    params = traverse_util.unflatten_dict(flat)
    _, logvar = vae.apply(
        {"params": params}, jnp.zeros((1, 8, 8, 3)), method=vae_lib.AutoencoderKL.encode_moments
    )
    assert float(logvar[..., 0].max()) == 20.0 and float(logvar[..., 1].min()) == -30.0


def test_bfloat16_compute_stays_close_with_float32_params(small):
    _, folder = small
    vae, params = vae_lib.load_vae(folder)
    vae16, params16 = vae_lib.load_vae(folder, dtype=jnp.bfloat16)
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(params16))
    latents = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
    exact = vae_lib.decode(vae, params, latents)
    approx = vae_lib.decode(vae16, params16, latents)
    assert approx.dtype == jnp.float32
    assert 0 < max_err(approx, exact) <= 0.05 * float(jnp.abs(exact).max())


# --- names, configs and files -------------------------------------------------------------


def test_full_size_params_match_the_diffusers_state_dict_one_for_one():
    with torch.device("meta"):  # shapes only, nothing allocated
        model = TorchAutoencoderKL(**diffusers_kwargs(VAEConfig()))
    want = {flax_path(k): flax_shape(k, v.shape) for k, v in model.state_dict().items()}
    abstract = vae_lib.abstract_params(vae_lib.AutoencoderKL())
    got = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract).items()}
    assert sorted(got) == sorted(want)
    assert got == want
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(abstract))
    assert VAEConfig.from_diffusers(dict(model.config)) == VAEConfig()
    assert sum(np.prod(s) for s in got.values()) == sum(p.numel() for p in model.parameters())


def test_the_published_sd_config_reads_as_the_default():
    assert VAEConfig.from_diffusers(SD_CONFIG_JSON) == VAEConfig()
    assert VAEConfig().down_factor == 8 and VAEConfig().scaling_factor == 0.18215


@pytest.mark.parametrize(
    "change, field",
    [
        ({"act_fn": "gelu"}, "act_fn='gelu'"),
        ({"down_block_types": ["AttnDownEncoderBlock2D"] * 4}, "down_block_types="),
        ({"norm_num_groups": 24}, "not all divisible"),
        ({"_class_name": "VQModel"}, "_class_name='VQModel'"),
        ({"latents_mean": [0.0] * 4}, "latents_mean"),
    ],
)
def test_an_unsupported_config_json_is_refused_naming_file_and_field(change, field, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SD_CONFIG_JSON | change))
    with pytest.raises(ConfigError) as err:
        vae_lib.read_config(str(path))
    assert str(path) in str(err.value) and field in str(err.value)


def test_a_single_safetensors_file_loads_with_a_config_or_as_the_sd_vae(small):
    _, folder = small
    _, want = vae_lib.load_vae(folder)
    file = os.path.join(folder, WEIGHTS)
    _, got = vae_lib.load_vae(file, SMALL)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    with pytest.raises(ConfigError) as err:  # no config: the SD VAE's shapes are expected
        vae_lib.load_vae(file)
    assert file in str(err.value) and "expected (512,)" in str(err.value)


def state_dict(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("rename, as_conv", [(True, False), (False, True), (True, True)])
def test_old_attention_names_and_conv_weights_load_to_the_same_params(
    small, rename, as_conv, tmp_path
):
    model, folder = small
    _, want = vae_lib.load_vae(folder)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for key, value in state_dict(model).items():
        m = re.match(r"(.*attentions\.0)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", key)
        if m and as_conv and m[3] == "weight":
            value = value[:, :, None, None]
        if m and rename:
            key = f"{m[1]}.{old[m[2]]}.{m[3]}"
        sd[key] = value
    assert any("attentions" in k and ".query." in k for k in sd) == rename
    save_file(sd, str(tmp_path / "old.safetensors"))
    _, got = vae_lib.load_vae(str(tmp_path / "old.safetensors"), SMALL)
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_half_precision_weights_load_as_float32(small, dtype, suffix, tmp_path):
    model, _ = small
    sd = {k: v.to(dtype) for k, v in state_dict(model).items()}
    path = str(tmp_path / f"half{suffix}")
    if suffix == ".safetensors":
        save_file(sd, path)
    else:
        torch.save(sd, path)
    _, params = vae_lib.load_vae(path, SMALL)
    kernel = params["decoder"]["conv_in"]["kernel"]
    want = sd["decoder.conv_in.weight"].float().numpy().transpose(2, 3, 1, 0)
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, want)


def _drop(sd):
    del sd["encoder.mid_block.attentions.0.to_k.bias"]
    return "missing tensor 'encoder.mid_block.attentions.0.to_k.bias' (expected shape (64,))"


def _reshape(sd):
    sd["decoder.conv_out.weight"] = torch.zeros(3, 32, 1, 1)
    return "tensor 'decoder.conv_out.weight' has shape (3, 32, 1, 1), expected (3, 32, 3, 3)"


def _add(sd):
    sd["decoder.extra.weight"] = torch.zeros(2)
    return "unexpected tensor 'decoder.extra.weight'"


@pytest.mark.parametrize("corrupt", [_drop, _reshape, _add], ids=["missing", "shape", "extra"])
def test_a_bad_state_dict_is_refused_naming_file_and_tensor(small, corrupt, tmp_path):
    model, _ = small
    sd = state_dict(model)
    message = corrupt(sd)
    path = str(tmp_path / "bad.safetensors")
    save_file(sd, path)
    with pytest.raises(ConfigError) as err:
        vae_lib.load_vae(path, SMALL)
    assert f"{path!r}: {message}" in str(err.value)
    assert len(err.value.problems) == 1


def test_a_truncated_file_is_refused_naming_the_first_incomplete_tensor(small, tmp_path):
    _, folder = small
    data = open(os.path.join(folder, WEIGHTS), "rb").read()
    header_end = 8 + int.from_bytes(data[:8], "little")
    header = json.loads(data[8:header_end])
    header.pop("__metadata__", None)
    cut = header_end + min(v["data_offsets"][1] for v in header.values())  # 1st tensor whole
    path = tmp_path / WEIGHTS
    path.write_bytes(data[:cut])
    (tmp_path / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    with pytest.raises(ConfigError) as err:
        vae_lib.load_vae(str(tmp_path))
    ends = sorted((v["data_offsets"][1], k) for k, v in header.items())
    assert str(path) in str(err.value)
    assert f"first incomplete tensor: {ends[1][1]!r}" in str(err.value)


def test_missing_paths_and_incomplete_folders_are_refused(small, tmp_path):
    _, folder = small
    cases = {str(tmp_path / "nowhere"): "no such file or folder", str(tmp_path): "no config.json"}
    other = tmp_path / "no_weights"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(SD_CONFIG_JSON))
    cases[str(other)] = "none of ['diffusion_pytorch_model.safetensors'"
    (tmp_path / "weights.pt").write_bytes(b"")
    cases[str(tmp_path / "weights.pt")] = "must be a diffusers folder, or a .safetensors or .bin"
    for path, message in cases.items():
        with pytest.raises(ConfigError) as err:
            vae_lib.load_vae(path)
        assert repr(path) in str(err.value) and message in str(err.value), str(err.value)
        assert [f"path={path!r}: " in p for p in vae_lib.problems(path, 8)] == [True]
    assert vae_lib.problems(folder, 8) == []


# --- the sd_vae decoder -------------------------------------------------------------------------


def latent_config(folder: str, **overrides):
    """A tiny class-conditional DiT on 4x4x4 synthetic latents, decoded by the VAE at `folder`."""
    return tiny(
        **{
            "data.name": "synthetic",
            "data.flip": True,
            "model.input_size": 4,
            "model.in_channels": 4,
            "model.num_classes": 3,
            "sample.decoder": "sd_vae",
            "sample.clip_denoised": False,
            "vae.path": folder,
            "vae.batch_size": 3,
        }
        | overrides
    )


def test_the_decoder_batches_over_the_mesh_as_diffusers_decodes(small):
    model, folder = small
    decode = decoders.create(latent_config(folder))  # 8 devices; batches 3, 3, 1 padded to 8
    latents = np.random.default_rng(0).normal(size=(7, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        want = nhwc(model.decode(nchw(latents / SMALL.scaling_factor)).sample)
    images = decode(latents)
    assert images.dtype == np.uint8 and images.shape == (7, 8, 8, 3)
    diff = np.abs(images.astype(int) - decoders.to_uint8(want).astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99  # rounding at .5 only
    assert decode.gives_images and decode.upscale == 2


def test_sd_vae_trains_samples_and_writes_images(small, tmp_path):
    _, folder = small
    config = latent_config(
        folder, **{"num_train_steps": 2, "sample.num_samples": 5, "sample.batch_size": 4}
    )
    train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    assert (tmp_path / "samples.png").is_file()  # the end-of-run grid, decoded
    path = modes.run("sample", config, str(tmp_path))
    with np.load(path) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 3)
    assert len(labels) == 5 and images.std() > 0
    assert os.path.isfile(path[: -len(".npz")] + ".png")


def test_a_vae_whose_latents_do_not_fit_the_model_is_refused(small):
    _, folder = small
    with pytest.raises(ConfigError, match=r"model.in_channels=3 does not match the 4 latent"):
        decoders.create(latent_config(folder, **{"model.in_channels": 3}))


@pytest.mark.parametrize("mode", ["train", "sample", "evaluate"])
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vae.path": ""}, "vae.path='' names no VAE"),
        ({"vae.path": "/no/such/vae"}, "vae.path='/no/such/vae': no such file or folder"),
        ({"vae.batch_size": 0}, "vae.batch_size=0 must be a positive integer"),
    ],
)
def test_validation_refuses_sd_vae_without_a_usable_vae_section(
    small, mode, overrides, message, tmp_path
):
    config = latent_config(small[1], **overrides)
    with pytest.raises(ConfigError) as err:
        modes.run(mode, config, str(tmp_path))
    assert message in str(err.value)
    assert not any(tmp_path.iterdir())


def test_modes_that_decode_nothing_need_no_vae(tmp_path):
    config = latent_config("", **{"eval.samples": str(tmp_path / "x.npz")})
    validate(config, 8, mode="export")
    with pytest.raises(ConfigError) as err:
        validate(config, 8, mode="evaluate")  # evaluates a file: only the file is checked
    assert "vae.path" not in str(err.value) and "eval.samples" in str(err.value)
