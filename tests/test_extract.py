"""--mode extract and training on extracted latents: the VAE posteriors of every crop and its
mirror image, stored once; a finished extraction recognised, another refused; a kill -9
mid-shard resumed with every image exactly once; two processes (jax.distributed on CPU)
writing their own shards and forming the same global batches as one; TFDS imagenet2012
built from a manual download; exact resume of training on latents; and the whole path
photos -> crop -> VAE -> extract -> train -> sample -> decode -> evaluate (against the
photographs' reference batch, --mode reference) through the CLI.
"""

import functools
import io
import pathlib
import re
import subprocess
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import multihost
from dtr_jax import modes, step, train
from dtr_jax.config import ConfigError, load_config, validate
from dtr_jax.data import images, latents
from dtr_jax.data.pipeline import host_batches
from dtr_jax.models import vae as vae_lib
from helpers import (
    DIGITS,
    FAULTY_MAIN,
    ROOT,
    cli_command,
    cli_env,
    kill9,
    photo_folder,
    random_inception_weights,
    random_vae,
    read_scalars,
    tiny,
    wait_for,
)

ONE = jax.devices()[:1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(photo folder of 2 classes x 3 images, random VAE folder)."""
    root = tmp_path_factory.mktemp("extract_inputs")
    return photo_folder(root / "photos"), random_vae(root / "vae")


def fields(inputs, directory, **overrides):
    """A tiny DiT on the 8x8x4 latents of 16x16 crops of the photo folder, in `directory`."""
    folder, vae = inputs
    return {
        "data.name": "latents",
        "data.dir": str(directory),
        "data.folder": folder,
        "data.image_size": 16,
        "data.flip": True,
        "extract.source": "folder",
        "extract.images_per_shard": 2,
        "vae.path": vae,
        "vae.batch_size": 8,
        "model.input_size": 8,
        "model.in_channels": 4,
        "model.num_classes": 2,
        "global_batch_size": 8,
        "sample.decoder": "sd_vae",
        "sample.clip_denoised": False,
    } | overrides


def extract_cli(script=None, **overrides) -> list[str]:
    """The command line of --mode extract (no --workdir) on the tiny config."""
    cmd = cli_command("", "extract", script=script, **overrides)
    i = cmd.index("--workdir")
    return cmd[:i] + cmd[i + 2 :]


def stored(directory) -> np.ndarray:
    """Every record of every shard of `directory`, in file order."""
    from array_record.python.array_record_module import ArrayRecordReader

    manifest = latents.read_manifest(str(directory))
    dtype = latents.record_dtype(manifest["latent_shape"], manifest["dtype"])
    out = []
    for name, _ in latents.shards_of(manifest):
        reader = ArrayRecordReader(str(pathlib.Path(directory) / name))
        out += [np.frombuffer(r, dtype)[0] for r in reader.read_all()]
        reader.close()
    return np.array(out, dtype)


def expected_moments(inputs, size=16) -> tuple[np.ndarray, np.ndarray]:
    """(labels, moments (N, 2, 2, h, w, c)) computed here: the VAE posterior of each crop
    and of its mirror image, image by image on one device."""
    source = images.FolderImages(inputs[0], size)
    model, params = vae_lib.load_vae(inputs[1])
    encode = jax.jit(functools.partial(vae_lib.encode, model))
    moments = []
    for i in range(len(source)):
        x = source[i]["image"][None].astype(np.float32) / 127.5 - 1
        views = [np.stack(encode(params, v), axis=1)[0] for v in (x, x[:, :, ::-1])]
        moments.append(np.stack(views))
    return source.labels, np.stack(moments)


@pytest.fixture(scope="module")
def extracted(inputs, tmp_path_factory):
    """An extraction over 8 devices (3 shards; the last batch padded), in float16."""
    directory = tmp_path_factory.mktemp("extracted") / "latents"
    manifest = modes.run("extract", tiny(**fields(inputs, directory)), None)
    return directory, manifest


def test_every_image_and_its_mirror_are_stored_once_as_vae_posteriors(inputs, extracted):
    directory, manifest = extracted
    records = stored(directory)
    np.testing.assert_array_equal(records["index"], np.arange(6))
    labels, want = expected_moments(inputs)
    np.testing.assert_array_equal(records["label"], labels)
    assert records["moments"].dtype == np.float16 and records["moments"].shape == (6, 2, 2, 8, 8, 4)
    got = records["moments"].astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=2**-10, atol=1e-6)  # float16 rounding
    assert np.abs(got[:, 1] - got[:, 0, :, :, ::-1]).max() > 1e-2  # the mirror is encoded
    assert manifest["complete"] and manifest == latents.read_manifest(str(directory))
    assert manifest["latent_shape"] == [8, 8, 4] and manifest["num_shards"] == 3
    assert manifest["source"] | {"fingerprint": None} == {
        "name": "folder",
        "fingerprint": None,
        "image_size": 16,
        "num_images": 6,
        "num_classes": 2,
    }
    assert not latents.stale_files(str(directory), [n for n, _ in latents.shards_of(manifest)])


def test_float32_moments_equal_the_vae_posteriors(inputs, tmp_path):
    config = tiny(**fields(inputs, tmp_path / "f32", **{"extract.dtype": "float32"}))
    modes.run("extract", config, None)
    got = stored(tmp_path / "f32")["moments"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected_moments(inputs)[1], rtol=1e-5, atol=1e-6)


def test_a_finished_extraction_is_kept_and_another_is_refused(inputs, extracted):
    directory, manifest = extracted
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in directory.iterdir()}
    assert modes.run("extract", tiny(**fields(inputs, directory)), None) == manifest
    for change, message in [
        ({"data.image_size": 32}, "source.image_size: 16 there, 32 here"),
        ({"extract.dtype": "float32"}, "dtype: 'float16' there, 'float32' here"),
        ({"extract.images_per_shard": 3}, "images_per_shard: 2 there, 3 here"),
    ]:
        with pytest.raises(ConfigError, match="holds another extraction") as err:
            modes.run("extract", tiny(**fields(inputs, directory, **change)), None)
        assert message in str(err.value)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in directory.iterdir()}
    assert after == before


def test_an_extraction_killed_mid_shard_resumes_with_every_image_once(inputs, extracted):
    directory = extracted[0].parent / "killed"
    cmd = extract_cli(FAULTY_MAIN, **fields(inputs, directory))
    fault = "slow_shard:latents-00001-of-00003.array_record"  # shard 0 done, 1 half
    env = cli_env(DTR_TEST_FAULT=fault, DTR_TEST_SLOW="60")
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    wait_for(proc, "FAULT: completing")
    kill9(proc)
    names = sorted(p.name for p in directory.iterdir())
    assert names[0].startswith(".latents-00001-of-00003.array_record.tmp-")  # unfinished
    assert names[1:] == ["latents-00000-of-00003.array_record", latents.MANIFEST]
    assert not latents.read_manifest(str(directory))["complete"]
    # Training refuses it with the command that finishes this extraction, whatever the
    # training config says of the photographs.
    other = tiny(**fields(inputs, directory, **{"extract.source": "imagenet2012"}))
    with pytest.raises(ConfigError, match="unfinished extraction") as err:
        validate(other, 1)
    command = latents.read_manifest(str(directory))["command"]
    assert err.value.problems[0].endswith(command)
    assert "--config.extract.source=folder --config.data.folder=" in command
    assert "--config.data.image_size=16" in command

    cmd = extract_cli(**fields(inputs, directory))
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(1 of 3 shards there already)" in done.stderr
    records, reference = stored(directory), stored(extracted[0])
    np.testing.assert_array_equal(records["index"], np.arange(6))  # each image exactly once
    np.testing.assert_array_equal(records["label"], reference["label"])
    np.testing.assert_allclose(records["moments"], reference["moments"], rtol=2**-10, atol=1e-6)
    assert sorted(p.name for p in directory.iterdir())[0] == "latents-00000-of-00003.array_record"
    assert latents.read_manifest(str(directory))["complete"]


def test_two_processes_write_their_own_shards_and_form_one_processs_batches(inputs, extracted):
    out = extracted[0].parent / "two"
    out.mkdir()
    config_fields = fields(inputs, out / "latents", global_batch_size=8)
    logs = multihost.run("data", out, config_fields, cli_env())
    written = [re.findall(r"Wrote \S*/latents-(\d+)-of-00003", log) for log in logs]
    assert written == [["00000", "00002"], ["00001"]]  # shard i by process i % 2
    records, reference = stored(out / "latents"), stored(extracted[0])
    np.testing.assert_array_equal(records["index"], reference["index"])
    np.testing.assert_allclose(records["moments"], reference["moments"], rtol=2**-10, atol=1e-6)

    source = latents.LatentSource(str(out / "latents"))
    one = host_batches(source, seed=0, global_batch_size=8, flip=True)  # one process
    got = [np.load(out / f"process{i}.npz") for i in range(2)]
    for k in range(3):
        for name, want in one[k].items():
            for i in range(2):
                np.testing.assert_array_equal(got[i][f"global_{name}_{k}"], want)
                np.testing.assert_array_equal(got[i][f"local_{name}_{k}"], want[4 * i : 4 * i + 4])


def test_training_on_extracted_latents_resumes_exactly(inputs, extracted, tmp_path):
    config = functools.partial(
        tiny, **fields(inputs, extracted[0], **{"sample.decoder": "latents"})
    )
    straight = train.train_and_evaluate(config(num_train_steps=4), str(tmp_path / "a"), ONE)
    train.train_and_evaluate(config(num_train_steps=2), str(tmp_path / "b"), ONE)
    resumed = train.train_and_evaluate(config(num_train_steps=4), str(tmp_path / "b"), ONE)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_latent_draws_are_a_stream_of_their_own(inputs, extracted):
    """With std 0 a latent batch trains exactly as the image batch of its means (the
    timesteps, noise and label dropout are those of image batches); with std > 0 the
    draws change the step, the same way on every call."""
    config = tiny(**fields(inputs, extracted[0]))
    setup = step.create_setup(config)
    fn = jax.jit(functools.partial(step.train_step, setup))
    state = jax.jit(lambda: step.nn.unbox(step.init_state(setup, jax.random.key(0))))()
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((8, 8, 8, 4)).astype(np.float16)
    labels = np.arange(8, dtype=np.int32) % 2

    def grad_norm(batch):  # the loss of a fresh (zero-output) DiT hardly depends on x0
        return float(fn(state, batch, setup.dm.tables)[1]["grad_norm"])

    image = grad_norm({"image": jnp.asarray(mean, jnp.float32), "label": labels})
    assert grad_norm({"mean": mean, "std": np.zeros_like(mean), "label": labels}) == image
    noisy = {"mean": mean, "std": np.full_like(mean, 0.5), "label": labels}
    assert grad_norm(noisy) != image and grad_norm(noisy) == grad_norm(noisy)


def test_the_ffhq_config_extracts_a_flat_folder_it_can_train_on(inputs, tmp_path):
    folder = photo_folder(tmp_path / "faces", classes=(), per_class=4)
    overrides = fields((folder, inputs[1]), tmp_path / "latents", **{"model.num_classes": 1})
    overrides = {k: v for k, v in overrides.items() if not k.startswith(("data.name", "extract."))}
    config = load_config(str(ROOT / "configs" / "ffhq_dit_b.py"), **overrides)
    manifest = modes.run("extract", config, None)
    assert manifest["source"]["num_classes"] == 1 and manifest["source"]["num_images"] == 4
    np.testing.assert_array_equal(stored(tmp_path / "latents")["label"], 0)
    validate(config, len(ONE), "train")  # the latents fit the unconditional DiT-B/2


def _fake_imagenet_download(folder: pathlib.Path) -> str:
    """ILSVRC2012_img_train.tar (2 classes x 3 JPEGs of the sample photos) and a val tar."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    folder.mkdir()

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    def jpeg(pixels):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG")
        return buffer.getvalue()

    with tarfile.open(folder / "ILSVRC2012_img_train.tar", "w") as train_tar:
        for c, wnid in enumerate(["n01440764", "n01443537"]):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for k in range(3):
                    add(tar, f"{wnid}_{k}.JPEG", jpeg(photos[c][40 * k :, 60 * k :][:300, :360]))
            add(train_tar, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(folder / "ILSVRC2012_img_val.tar", "w") as val_tar:
        add(val_tar, "ILSVRC2012_val_00000001.JPEG", jpeg(photos[0][:200, :300]))
    return str(folder)


def test_imagenet2012_is_built_from_the_manual_download_then_extracted(inputs, tmp_path):
    overrides = {
        "extract.source": "imagenet2012",
        "data.manual_dir": _fake_imagenet_download(tmp_path / "manual"),
        "data.tfds_data_dir": str(tmp_path / "tfds"),
        "model.num_classes": 1000,
    }
    config = tiny(**fields(inputs, tmp_path / "latents", **overrides))
    manifest = modes.run("extract", config, None)
    assert manifest["source"]["num_images"] == 6 and manifest["source"]["num_classes"] == 1000
    records = stored(tmp_path / "latents")
    assert sorted(records["label"]) == [0, 0, 0, 1, 1, 1]  # the two first ImageNet classes
    assert not images.prepare_tfds("imagenet2012", str(tmp_path / "tfds"), "")  # built once


def test_imagenet2012_built_as_tfrecord_is_refused_with_the_conversion(tmp_path):
    import tensorflow_datasets as tfds

    manual, data_dir = _fake_imagenet_download(tmp_path / "manual"), str(tmp_path / "tfds")
    builder = tfds.builder("imagenet2012", data_dir=data_dir, file_format="tfrecord")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    for attempt in (
        lambda: images.prepare_tfds("imagenet2012", data_dir, manual),
        lambda: images.TfdsImages("imagenet2012", "train", data_dir, 16),
    ):
        with pytest.raises(ConfigError, match="built as tfrecord.*empty data.tfds_data_dir"):
            attempt()
    built = [p.name for p in (tmp_path / "tfds" / "imagenet2012" / "5.1.0").iterdir()]
    assert any(".tfrecord" in name for name in built)
    assert not any(".array_record" in name for name in built)  # nothing was built again


def test_photos_to_evaluated_samples_through_the_cli(inputs, tmp_path):
    """crop -> VAE -> extract -> the photographs' reference batch -> train on the shards,
    evaluated in the loop against it (VAE-decoded samples, Inception). `--mode sample` and
    `evaluate` of decoded latents: tests/test_vae.py, tests/test_evaluate.py."""
    f = fields(inputs, tmp_path / "latents", num_train_steps=3, **{"vae.batch_size": 4})

    def cli(mode, **extra):
        env = cli_env()
        if mode in modes.NO_WORKDIR:  # extract, reference
            cmd = extract_cli(**f | extra)
            cmd[cmd.index("extract")] = mode
        else:  # the FID's value, a minute of sqrtm: tests/test_evaluate.py
            cmd = cli_command(tmp_path / "run", mode, script=FAULTY_MAIN, **f | extra)
            env = cli_env(DTR_TEST_FAULT="cheap_fid")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr

    missing = subprocess.run(
        cli_command(tmp_path / "run", "train", **f), env=cli_env(), capture_output=True, text=True
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"--config {DIGITS} --mode extract" in missing.stderr  # this run's config file

    assert "images/s, ETA" in cli("extract")
    fid = {
        "eval.reference": str(tmp_path / "reference.npz"),
        "eval.inception_weights": random_inception_weights(tmp_path / "inception.npz"),
        "eval.batch_size": 6,
    }
    cli("reference", **fid)  # the FID reference batch of the photographs
    # training evaluates in the loop as --mode evaluate does: VAE-decoded samples, Inception
    cli("train", **fid | {"eval_every_steps": 3, "eval.num_samples": 6})
    assert (tmp_path / "run" / "samples.png").is_file()  # decoded by the VAE
    assert np.isfinite(read_scalars(tmp_path / "run", "loss")[3])
    in_loop = read_scalars(tmp_path / "run", "eval/fid")
    assert list(in_loop) == [3] and np.isfinite(in_loop[3]) and in_loop[3] > 0
    with np.load(tmp_path / "reference.npz") as ref:  # the 6 crops, and all their statistics
        assert ref["arr_0"].shape == (6, 16, 16, 3) and ref["sigma"].shape == (2048, 2048)
