"""In-memory random-access data sources, by name.

A source is a sequence of examples `{"image": float32 HWC, "label": int32}`
already in the model's input scale (pixels in [-1, 1], or scaled latents), so
the train step never cares which it holds. grain reads them by index.
"""

from __future__ import annotations

import dataclasses

import numpy as np

DIGITS_TEST_FRACTION = 1 / 6  # ~300 of 1797 images, stratified by class
DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """Images (N, H, W, C) float32 and labels (N,) int32 held in memory."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": self.labels[index]}


def digits_split(split: str) -> ArraySource:
    """scikit-learn's 1797 real 8x8 digits (values 0..16) scaled to [-1, 1].

    The split is fixed: per class, a seeded permutation puts 1/6 of the images
    in 'test' and the rest in 'train'.
    """
    from sklearn.datasets import load_digits  # ships the data: no download

    if split not in ("train", "test"):
        raise ValueError(f"digits split={split!r}: allowed 'train' or 'test'")
    digits = load_digits()
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test = np.zeros(len(digits.target), bool)
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == label))
        test[idx[: round(len(idx) * DIGITS_TEST_FRACTION)]] = True
    keep = test if split == "test" else ~test
    images = digits.images[keep].astype(np.float32)[..., None] / 8.0 - 1.0
    return ArraySource(images, digits.target[keep].astype(np.int32))


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    """Deterministic random latents of a given shape, for shape/sharding/memory runs."""

    shape: tuple[int, int, int]
    num_classes: int
    size: int = 1_281_167  # as many as ImageNet-1k train images

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([index, 0xD7])
        image = rng.standard_normal(self.shape, dtype=np.float32)
        return {"image": image, "label": np.int32(rng.integers(self.num_classes))}


SOURCES = ("digits", "synthetic")


def get_source(config, split: str = "train"):
    """The source named by `config.data.name`, shaped by `config.model`."""
    name = config.data.name
    if name == "digits":
        return digits_split(split)
    if name == "synthetic":
        m = config.model
        return SyntheticSource((m.input_size, m.input_size, m.in_channels), m.num_classes)
    raise ValueError(f"data.name={name!r} is unknown: allowed {list(SOURCES)}")
