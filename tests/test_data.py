"""Data sources and the pipeline: the ADM centre crop against ADM's own code, image folders,
TFDS imagenet2012 (mocked) through the real source and pipeline, flips of extracted
latents, host blocks, and the validation of the data fields."""

import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_sample_images

from dtr_jax import train
from dtr_jax.config import ConfigError, load_config, validate
from dtr_jax.data import get_source, images, latents
from dtr_jax.data.pipeline import host_batches
from helpers import ROOT, photo_folder, read_scalars, tiny


def adm_center_crop_arr(pil_image, image_size):
    """guided-diffusion's image_datasets.center_crop_arr, as ADM and DiT use it (verbatim
    but for the comments); they call it on `pil_image.convert("RGB")`."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)

    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )

    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


PHOTOS = load_sample_images().images  # two real 427x640 photographs


@pytest.mark.parametrize("size", [256, 64, 17])
@pytest.mark.parametrize(
    "region, mode",
    [
        ((slice(None), slice(None)), "RGB"),  # 427x640 landscape
        ((slice(None), slice(100, 357)), "RGB"),  # 427x257 portrait, odd sides
        ((slice(0, 300), slice(0, 301)), "L"),  # grayscale, nearly square
        ((slice(0, 90), slice(0, 150)), "RGB"),  # smaller than the crop: upsampled
        ((slice(0, 128), slice(0, 384)), "RGBA"),  # short side 2 x 64: one box halving
    ],
)
def test_center_crop_is_adms(size, region, mode):
    for photo in PHOTOS:
        image = Image.fromarray(photo[region]).convert(mode)
        want = adm_center_crop_arr(image.convert("RGB"), size)
        got = images.center_crop(image, size)
        assert got.dtype == np.uint8 and got.shape == (size, size, 3)
        np.testing.assert_array_equal(got, want)


def test_center_crop_box_halves_then_cuts_the_centre():
    """Independent of ADM's code: a short side of exactly 2 x size is one 2x2 box average
    (PIL rounds), after which no resize is needed; the crop is the centre columns."""
    photo = PHOTOS[0][:64, :96].astype(np.float64)  # 64x96 -> 32x48 -> centre 32x32
    boxed = (photo[0::2, 0::2] + photo[1::2, 0::2] + photo[0::2, 1::2] + photo[1::2, 1::2]) / 4
    got = images.center_crop(Image.fromarray(PHOTOS[0][:64, :96]), 32)
    assert np.abs(got - boxed[:, 8:40]).max() <= 1


def test_image_folders_with_classes_flat_and_refused(tmp_path):
    folder = photo_folder(tmp_path / "classes", per_class=3)
    (tmp_path / "classes" / "china" / "notes.txt").write_text("not an image")
    (tmp_path / "classes" / "flower" / "deeper").mkdir()
    Image.fromarray(PHOTOS[1][:50, :60]).save(tmp_path / "classes" / "flower" / "deeper" / "x.png")
    source = images.FolderImages(folder, 16)
    assert source.num_classes == 2 and len(source) == 7
    assert [source[i]["label"] for i in range(7)] == [0, 0, 0, 1, 1, 1, 1]
    assert source.paths[3] == os.path.join("flower", "0.png")  # sorted, nested ones included
    want = images.center_crop(Image.open(os.path.join(folder, source.paths[1])), 16)
    np.testing.assert_array_equal(source[1]["image"], want)

    flat = images.FolderImages(photo_folder(tmp_path / "flat", classes=()), 16)
    assert flat.num_classes == 1 and len(flat) == 3 and flat[2]["label"] == 0
    assert flat.fingerprint != source.fingerprint

    Image.fromarray(PHOTOS[0][:50, :60]).save(tmp_path / "classes" / "loose.png")
    with pytest.raises(ConfigError, match="holds both images .* and sub-folders"):
        images.FolderImages(folder, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        images.FolderImages(str(tmp_path / "empty"), 16)


def test_an_unreadable_image_is_named(tmp_path):
    folder = photo_folder(tmp_path / "photos", classes=(), per_class=1)
    (tmp_path / "photos" / "broken.png").write_bytes(b"not a png")
    source = images.FolderImages(folder, 16)
    with pytest.raises(ConfigError, match="broken.png in data.folder is not a readable image"):
        source[source.paths.index("broken.png")]


def _imagenet_config(tmp_path, **overrides):
    """A tiny pixel-space DiT on 16x16 ImageNet crops."""
    (tmp_path / "tfds").mkdir(exist_ok=True)
    fields = {
        "data.name": "imagenet2012",
        "data.tfds_data_dir": str(tmp_path / "tfds"),
        "data.image_size": 16,
        "data.flip": True,
        "model.input_size": 16,
        "model.in_channels": 3,
        "model.num_classes": 1000,
        "global_batch_size": 8,
        "num_train_steps": 2,
    }
    return tiny(**fields | overrides)


def test_imagenet2012_from_tfds_through_the_source_and_pipeline(tmp_path):
    config = _imagenet_config(tmp_path)
    validate(config, 8)
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        raw = tfds.data_source("imagenet2012", split="train")
        source = get_source(config)
        assert len(source) == 12
        for i in (0, 7):
            example = source[i]
            want = images.center_crop(Image.fromarray(raw[i]["image"]), 16)
            np.testing.assert_array_equal(example["image"], want.astype(np.float32) / 127.5 - 1)
            assert example["image"].dtype == np.float32 and example["label"] == raw[i]["label"]
        batches = host_batches(source, seed=0, global_batch_size=8, flip=True)
        batch = batches[1]
        assert batch["image"].shape == (8, 16, 16, 3) and batch["label"].shape == (8,)
        assert set(batch["label"]) <= {int(raw[i]["label"]) for i in range(12)}
        state = train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:2])
    assert int(state.step) == 2 and np.isfinite(read_scalars(tmp_path / "run", "loss")[2])


def test_an_unbuilt_tfds_dataset_says_how_to_build_it(tmp_path):
    config = _imagenet_config(tmp_path)
    with pytest.raises(ConfigError, match="not built as array_record in data.tfds_data_dir=.*"):
        get_source(config)


class _Marked:
    """Element i: an image whose columns read i, i+1, ... (a flip reverses them), or
    extracted moments whose image half is +i and mirror half -i."""

    def __init__(self, kind: str, n: int = 40):
        self.kind, self.n = kind, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.kind == "image":
            image = np.broadcast_to(i + np.arange(3, dtype=np.float32)[None, :, None], (2, 3, 1))
            return {"image": image, "label": np.int32(i)}
        moments = np.stack([np.full((2, 2, 2, 1), i, np.float16), np.full((2, 2, 2, 1), -i)])
        moments[:, 1] *= 2  # std = 2 x mean
        return {"moments": moments.astype(np.float16), "label": np.int32(i)}


def test_extracted_latents_flip_to_the_mirror_images_moments_as_images_flip():
    kw = dict(seed=3, global_batch_size=8, flip=True)
    pixels, latent = host_batches(_Marked("image"), **kw), host_batches(_Marked("moments"), **kw)
    flips = []
    for k in range(6):
        a, b = pixels[k], latent[k]
        assert set(b) == {"mean", "std", "label"} and b["mean"].shape == (8, 2, 2, 1)
        np.testing.assert_array_equal(a["label"], b["label"])
        image_flipped = a["image"][:, 0, 0, 0] > a["image"][:, 0, 2, 0]
        np.testing.assert_array_equal(
            b["mean"][:, 0, 0, 0], np.where(image_flipped, -1, 1) * b["label"]
        )
        np.testing.assert_array_equal(b["std"], 2 * b["mean"])
        flips += list(image_flipped[b["label"] > 0])
    assert 0.3 < np.mean(flips) < 0.7
    unflipped = host_batches(_Marked("moments"), seed=3, global_batch_size=8, flip=False)[2]
    np.testing.assert_array_equal(unflipped["mean"][:, 0, 0, 0], unflipped["label"])


@pytest.mark.parametrize("kind", ["image", "moments"])
def test_host_blocks_are_consecutive_rows_of_the_global_batch(kind):
    whole = host_batches(_Marked(kind), seed=1, global_batch_size=8, flip=True)
    blocks = [
        host_batches(_Marked(kind), seed=1, global_batch_size=8, flip=True, block=b, num_blocks=4)
        for b in range(4)
    ]
    for k in (0, 5, 9):  # beyond the first epoch too
        for name, value in whole[k].items():
            np.testing.assert_array_equal(value, np.concatenate([b[k][name] for b in blocks]))


# --- validation ------------------------------------------------------------------------------


def _fake_extraction(directory, complete=True, shape=(4, 4, 4), classes=3):
    """A manifest (and empty shard files) of an extraction of 3 images in 2 shards."""
    manifest = {
        "format": latents.FORMAT,
        "source": {"name": "folder", "num_images": 3, "num_classes": classes},
        "latent_shape": list(shape),
        "dtype": "float16",
        "images_per_shard": 2,
        "num_shards": 2,
        "complete": complete,
    }
    os.makedirs(directory, exist_ok=True)
    latents.write_manifest(str(directory), manifest)
    for name, _ in latents.shards_of(manifest):
        (directory / name).write_bytes(b"")
    return str(directory)


def _latent_config(directory, **overrides):
    fields = {
        "data.name": "latents",
        "data.dir": str(directory),
        "model.input_size": 4,
        "model.in_channels": 4,
        "model.num_classes": 3,
    }
    return tiny(**fields | overrides)


def _problems(config, mode="train"):
    with pytest.raises(ConfigError) as err:
        validate(config, 8, mode)
    return err.value.problems


def test_missing_latents_are_refused_with_the_command_that_makes_them(tmp_path):
    for directory in (tmp_path / "none", ""):
        (problem,) = _problems(_latent_config(directory))
        assert problem.startswith(f"data.dir={str(directory)!r}")
        assert (
            "python -m dtr_jax.main --config CONFIG --mode extract "
            f"--config.data.dir={str(directory) or repr('')} --config.extract.source=imagenet2012 "
            "--config.data.manual_dir='<folder of ILSVRC2012_img_train.tar and _val.tar>' "
            "--config.vae.path='<SD VAE folder>'"
        ) in problem
    config = _latent_config(
        tmp_path,
        **{"extract.source": "folder", "data.folder": "/photos", "vae.path": "/vaes/ema"},
    )
    (problem,) = _problems(config)
    assert "no manifest.json" in problem
    assert problem.endswith(
        f"--mode extract --config.data.dir={tmp_path} --config.extract.source=folder "
        "--config.data.folder=/photos --config.vae.path=/vaes/ema"
    )
    _fake_extraction(tmp_path, complete=False)
    (problem,) = _problems(config)
    assert "an unfinished extraction (2 of 2 shards)" in problem and "--mode extract" in problem


@pytest.mark.parametrize("size", ["s", "b", "l", "xl"])
def test_the_paper_configs_read_imagenet_latents_and_say_how_to_extract_them(size):
    """configs/dit_<size>.py as the README runs it, on a machine without the latents."""
    config = load_config(str(ROOT / "configs" / f"dit_{size}.py"))
    assert config.data.name == "latents" and config.extract.source == "imagenet2012"
    (problem,) = _problems(config)
    assert problem.startswith(f"data.dir={config.data.dir!r}")
    assert "--mode extract --config.data.dir=" in problem
    assert "--config.extract.source=imagenet2012 --config.data.manual_dir=" in problem


def test_latents_that_do_not_fit_the_model_name_the_model_fields(tmp_path):
    directory = _fake_extraction(tmp_path / "x")
    validate(_latent_config(directory), 8)
    validate(_latent_config(directory, **{"model.num_classes": 1}), 8)  # unconditional
    (problem,) = _problems(_latent_config(directory, **{"model.input_size": 8}))
    assert "holds 4x4x4 inputs of 3 classes" in problem
    assert "model.input_size=4, model.in_channels=4, model.num_classes=3 (or 1)" in problem
    (problem,) = _problems(_latent_config(directory, **{"model.num_classes": 10}))
    assert "model.num_classes=3" in problem
    os.remove(os.path.join(directory, latents.shards_of(latents.read_manifest(directory))[1][0]))
    (problem,) = _problems(_latent_config(directory))
    assert "lacks 1 of the 2 shards" in problem and "latents-00001-of-00002" in problem
    (problem,) = _problems(_latent_config("gs://bucket/latents"))
    assert "data.dir='gs://bucket/latents' is remote" in problem


def test_a_manifest_of_something_else_is_refused(tmp_path):
    (tmp_path / latents.MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match="not a manifest of dtr_jax latents"):
        validate(_latent_config(tmp_path), 8)


def test_evaluation_needs_no_extracted_latents(tmp_path):
    config = _latent_config(tmp_path / "none", **{"eval.samples": str(tmp_path / "s.npz")})
    assert all("data." not in p for p in _problems(config, "evaluate"))


def test_photo_sources_check_their_folders(tmp_path):
    folder = _imagenet_config(tmp_path, **{"data.name": "folder", "data.folder": "/no/photos"})
    assert _problems(folder) == ["data.folder='/no/photos': no such folder"]
    tfds_dir = _imagenet_config(tmp_path, **{"data.tfds_data_dir": "/no/tfds"})
    (problem,) = _problems(tfds_dir)
    assert problem.startswith("data.tfds_data_dir='/no/tfds': no such folder")
    manual = _imagenet_config(tmp_path, **{"data.manual_dir": "/no/tars"})
    assert _problems(manual) == ["data.manual_dir='/no/tars': no such folder"]
    size = _imagenet_config(tmp_path, **{"data.image_size": 0})
    assert "data.image_size=0 must be a positive integer" in _problems(size)


def test_extraction_fields_are_checked(tmp_path):
    config = tiny(
        **{
            "extract.source": "digits",
            "extract.dtype": "int8",
            "extract.images_per_shard": 0,
            "data.dir": "",
            "vae.path": "",
            "vae.batch_size": 12,
        }
    )
    found = _problems(config, "extract")
    assert "extract.source='digits' is unknown: allowed ['folder', 'imagenet2012']" in found
    assert "extract.images_per_shard=0 must be a positive integer" in found
    assert "extract.dtype='int8' is unknown: allowed ['float16', 'float32']" in found
    assert "data.dir='' names no folder to write the latents to" in found
    assert any(p.startswith("vae.path='' names no VAE") for p in found)
    assert any(p.startswith("vae.batch_size=12 is not divisible by the 8") for p in found)
