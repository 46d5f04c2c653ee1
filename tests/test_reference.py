"""--mode reference: the FID reference batch of an image folder (as for FFHQ), read back by
--mode evaluate; its images are crops of the folder chosen at random, its mu and sigma the
statistics of every crop's Inception features; a finished one is recognised, another file
refused and kept; an interrupted one resumes from its parts; bad fields are refused first.
"""

import json
import os

import numpy as np
import pytest

from dtr_jax import evaluators, metrics, modes, reference, sharding
from dtr_jax.config import ConfigError, validate
from dtr_jax.data import images
from helpers import photo_folder, random_inception_weights, tiny


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(a flat folder of 6 photographs, random Inception weights)."""
    root = tmp_path_factory.mktemp("reference_inputs")
    folder = photo_folder(root / "photos", classes=(), per_class=6)
    return folder, random_inception_weights(root / "inception.npz")


def config_for(inputs, path, **overrides):
    folder, weights = inputs
    fields = {
        "extract.source": "folder",
        "data.folder": folder,
        "data.image_size": 16,
        "eval.reference": str(path),
        "eval.inception_weights": weights,
        "eval.batch_size": 4,
        "reference.num_images": 4,
    }
    return tiny(**fields | overrides)


def crops(inputs) -> np.ndarray:
    source = images.FolderImages(inputs[0], 16)
    return np.stack([source[i]["image"] for i in range(len(source))])


@pytest.fixture(scope="module")
def written(inputs, tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "ffhq16.npz"
    settings = modes.run("reference", config_for(inputs, path), None)
    return path, settings


def test_the_batch_holds_random_crops_and_the_statistics_of_all(inputs, written):
    path, settings = written
    every = crops(inputs)
    with np.load(path) as f:
        arr_0, mu, sigma = f["arr_0"], f["mu"], f["sigma"]
        assert json.loads(str(f[reference.SETTINGS_KEY])) == settings
    assert arr_0.dtype == np.uint8 and arr_0.shape == (4, 16, 16, 3)
    # Each image is one of the folder's crops, each once, in the folder's order.
    rows = [int(np.flatnonzero((every == image).all(axis=(1, 2, 3)))[0]) for image in arr_0]
    assert rows == sorted(set(rows)) and len(rows) == 4
    assert settings["num_images"] == 4 and settings["stats_images"] == 6
    # mu and sigma: the statistics of all 6 crops' pool features, computed here at once.
    features = evaluators.InceptionFeatures(inputs[1], 4, sharding.make_mesh(tiny().mesh))
    expected_mu, expected_sigma = metrics.stats(features(every)[0])
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-9, atol=1e-12)
    assert not list(path.parent.glob("*.parts-*"))  # the parts are gone once it is written
    # --mode evaluate reads it: FID against mu/sigma, precision/recall against arr_0.
    ref = evaluators.load_reference(str(path))
    np.testing.assert_array_equal(np.asarray(ref["images"]), arr_0)
    np.testing.assert_array_equal(ref["stats"][1], sigma)


def test_a_written_batch_is_recognised_and_any_other_file_refused(inputs, written, tmp_path):
    path, settings = written
    before = path.read_bytes()
    assert modes.run("reference", config_for(inputs, path), None) == settings
    with pytest.raises(ConfigError, match=r"another reference batch \(num_images 4 here, 5"):
        modes.run("reference", config_for(inputs, path, **{"reference.num_images": 5}), None)
    assert path.read_bytes() == before
    theirs = tmp_path / "VIRTUAL_ffhq.npz"
    np.savez(theirs, arr_0=crops(inputs))
    kept = theirs.read_bytes()
    with pytest.raises(ConfigError, match="not written by --mode reference"):
        modes.run("reference", config_for(inputs, theirs), None)
    assert theirs.read_bytes() == kept


def test_an_interrupted_batch_resumes_from_its_parts(inputs, written, tmp_path, monkeypatch):
    """Killed after the first batch of features, the rerun computes only the second."""
    calls = []
    batch = evaluators.InceptionFeatures.batch

    def failing_second(self, images):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted")
        return batch(self, images)

    monkeypatch.setattr(evaluators.InceptionFeatures, "batch", failing_second)
    path = tmp_path / "ref.npz"
    with pytest.raises(KeyboardInterrupt):
        modes.run("reference", config_for(inputs, path), None)
    assert not path.exists() and list(tmp_path.glob("ref.npz.parts-*"))
    calls.clear()
    settings = modes.run("reference", config_for(inputs, path), None)
    assert calls == [2]  # the 6 crops in batches of 4: only the second (2 crops) again
    assert settings == written[1]
    with np.load(path) as got, np.load(written[0]) as uninterrupted:
        for key in ("arr_0", "mu", "sigma"):
            np.testing.assert_array_equal(got[key], uninterrupted[key])


def test_without_inception_weights_only_images_and_all_if_asked_for_more(inputs, tmp_path):
    path = tmp_path / "images_only.npz"
    config = config_for(inputs, path, **{"eval.inception_weights": "", "reference.num_images": 100})
    settings = modes.run("reference", config, None)
    with np.load(path) as f:
        assert set(f.files) == {"arr_0", reference.SETTINGS_KEY}
        np.testing.assert_array_equal(f["arr_0"], crops(inputs))
    assert settings["num_images"] == 6 and settings["inception_weights"] is None


def test_bad_fields_are_refused_before_anything_is_read(inputs, tmp_path):
    config = config_for(
        inputs,
        "",
        **{
            "extract.source": "digits",
            "eval.inception_weights": str(tmp_path / "missing.pth"),
            "reference.num_images": 2,
            "reference.stats_images": 1,
            "eval.batch_size": 0,
        },
    )
    with pytest.raises(ConfigError) as error:
        validate(config, 1, mode="reference")
    text = str(error.value)
    for expected in (
        "extract.source='digits' is unknown: allowed",
        "eval.reference='' names no .npz to write",
        "missing.pth'",
        "reference.num_images=2 must be an integer >= 4",
        "reference.stats_images=1 must be 0 (all) or an integer >= 2",
        "eval.batch_size=0 must be a positive integer",
    ):
        assert expected in text
    assert os.listdir(tmp_path) == []
