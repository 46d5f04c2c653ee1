"""Random-access data sources, registered by name (`data.name`).

A source is a sequence of examples the train step reads, already in the model's input
scale: `{"image": float32 HWC, "label": int32}` (pixels in [-1, 1], or scaled latents),
or, for latents extracted with their VAE posterior (`dtr_jax.data.latents`),
`{"moments": (2, 2, H, W, C), "label": int32}`: the mean and std of the image and of its
mirror image, from which the step draws a latent. grain reads them by index.

A new dataset is one `SOURCES.register(name, Source(...))`: how to build it, the shape
and classes it holds (checked against the model before anything compiles), the
problems of the data fields it reads, the evaluators it offers by default
(`eval.metrics=''`) and, for photographs, the uint8 images `--mode extract` encodes.
Pixel sources live in `images.py`, the extracted latents in `latents.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from dtr_jax.registry import Registry

DIGITS_TEST_FRACTION = 1 / 6  # ~300 of 1797 images, stratified by class
DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Source:
    """A registered dataset.

    build: fn(config, split) -> a sequence of examples.
    image_shape / num_classes: what the data holds (None: whatever the model says), or
      `holds`: fn(data section) -> (image_shape, num_classes), for data that says itself.
    metrics: names of the evaluators (`dtr_jax.evaluators`) used when eval.metrics=''.
    problems: fn(data section) -> problems with the data fields the source reads.
    images: fn(config, split) -> uint8 (H, W, 3) images and labels, for photographs
      (what `--mode extract` encodes); None for other data.
    prepare: fn(config) that makes `images` readable (builds the dataset), or None.
    reads: the data fields naming where the photographs are, each with the placeholder an
      `--mode extract` command suggests while none of them is set.
    unmade: fn(data section) -> why the data is not made yet (`--mode extract` makes
      it), or None; for data that extraction writes.
    """

    build: Callable
    image_shape: tuple[int, int, int] | None = None
    num_classes: int | None = None
    metrics: tuple[str, ...] = ()
    holds: Callable | None = None
    problems: Callable | None = None
    images: Callable | None = None
    prepare: Callable | None = None
    reads: dict[str, str] = dataclasses.field(default_factory=dict)
    unmade: Callable | None = None

    def shape_and_classes(self, d) -> tuple[tuple[int, int, int] | None, int | None]:
        """(image shape, classes) of the data the `data` section `d` names."""
        return self.holds(d) if self.holds else (self.image_shape, self.num_classes)


SOURCES: Registry[Source] = Registry("data.name")


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


def _synthetic(config, split: str) -> SyntheticSource:
    del split
    m = config.model
    return SyntheticSource((m.input_size, m.input_size, m.in_channels), m.num_classes)


SOURCES.register(
    "digits",
    Source(lambda config, split: digits_split(split), (8, 8, 1), 10, metrics=("digits",)),
)
SOURCES.register("synthetic", Source(_synthetic))


def get_source(config, split: str = "train"):
    """The source named by `config.data.name`, shaped by `config.model`."""
    return SOURCES.get(config.data.name).build(config, split)


def problems(d, image_shape, num_classes: int) -> list[str]:
    """Problems with a data section `d` for a model of `image_shape` (H, W, C) and
    `num_classes`. Each names its field; a source that does not fit the model names the
    model fields."""
    out = SOURCES.problems(d.name)
    if not out:
        src = SOURCES.get(d.name)
        out = src.problems(d) if src.problems else []
        if not out:
            out = _fit_problems(d.name, src.shape_and_classes(d), image_shape, num_classes)
    if d.prefetch < 0 or d.num_threads < 0:
        out.append(f"prefetch={d.prefetch} and data.num_threads={d.num_threads} must be >= 0")
    return out


def _fit_problems(name: str, holds, image_shape, num_classes: int) -> list[str]:
    shape, classes = holds
    shape_ok = shape in (None, tuple(image_shape))
    classes_ok = classes is None or num_classes in (1, classes)
    if shape_ok and classes_ok:
        return []
    h, w, c = shape or image_shape
    return [
        f"name={name!r} holds {h}x{w}x{c} inputs of {classes} classes: set "
        f"model.input_size={h}, model.in_channels={c}, model.num_classes="
        f"{classes} (or 1) (got {tuple(image_shape)}, {num_classes} classes)"
    ]
