"""Pixel sources: photographs centre-cropped as ADM does, from an image folder or from TFDS.

Each reads uint8 (size, size, 3) images with int32 labels by index (its `images`), what
`--mode extract` encodes with the VAE; registered in `SOURCES` with a `build` that scales
them to [-1, 1] for a pixel-space model (as the digits are):

  folder        `data.folder`: one sub-folder per class (ImageNet's train/ layout; labels
                in the sorted order of the sub-folder names, images found at any depth
                below them), or a flat folder of images, one class (FFHQ, CelebA-HQ).
  imagenet2012  TFDS `imagenet2012` in `data.tfds_data_dir`, read by `tfds.data_source`
                (ArrayRecord, no TensorFlow); `prepare_tfds` builds it once from the
                manual download in `data.manual_dir` (that needs TensorFlow), before
                `--mode extract` or the first pixel-space training run (one process).

Image files are read with PIL on local disks (or mounted buckets); `center_crop` is the
one place images are cropped. PIL is imported where images are read, so that the rest
(the source registry the config validates with) imports on hosts without pillow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from dtr_jax.data.sources import SOURCES, Source
from dtr_jax.errors import ConfigError, InputFileError, integer_problems

if TYPE_CHECKING:
    import PIL.Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def center_crop(image: PIL.Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion's `center_crop_arr`, which DiT trains with) as
    uint8 (size, size, 3): halve the image with a box filter while its short side is at
    least 2 * size, resize it bicubically so that the short side is `size`, and cut out
    the centre."""
    from PIL import Image

    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(
        tuple(round(side * scale) for side in image.size), Image.Resampling.BICUBIC
    )
    pixels = np.asarray(image)
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top : top + size, left : left + size]


def to_unit_range(images):
    """uint8 pixels (numpy or jax) -> float32 in [-1, 1], the scale the models and the VAE
    take (the inverse of `decoders.to_uint8`)."""
    return images.astype(np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class ModelScale:
    """A pixel source as the training pipeline reads it: images in [-1, 1]."""

    images: object

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        example = self.images[index]
        return dict(example, image=to_unit_range(example["image"]))


# --- image folders ---------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def class_folders(folder: str) -> list[str]:
    """The class sub-folders of `folder`, sorted (none: a flat folder of one class)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def list_folder(folder: str) -> tuple[list[str], np.ndarray, int]:
    """(image paths relative to `folder`, their int32 labels, number of classes), sorted by
    class, then path. Raises ConfigError for a folder without images, or one that mixes
    images with class sub-folders (which of them would be the data?)."""
    classes = class_folders(folder)
    loose = sorted(n for n in os.listdir(folder) if _is_image(n))
    if classes and loose:
        raise ConfigError(
            [
                f"data.folder={folder!r} holds both images ({loose[0]}, ...) and sub-folders "
                f"({classes[0]}, ...): use one sub-folder per class, or a flat folder of images"
            ]
        )
    if not classes:
        paths, labels = loose, [0] * len(loose)
    else:
        paths, labels = [], []
        for label, name in enumerate(classes):
            found = sorted(_images_below(folder, name))
            paths += found
            labels += [label] * len(found)
    if not paths:
        raise ConfigError(
            [f"data.folder={folder!r} holds no images (extensions {list(IMAGE_EXTENSIONS)})"]
        )
    return paths, np.asarray(labels, np.int32), max(len(classes), 1)


def _images_below(folder: str, sub: str) -> list[str]:
    """Image paths (relative to `folder`) at any depth below `folder`/`sub`."""
    out = []
    for root, dirs, names in os.walk(os.path.join(folder, sub)):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(root, folder)
        out += [os.path.join(rel, n) for n in names if _is_image(n)]
    return out


class FolderImages:
    """The images of an image folder (see `list_folder`), centre-cropped to `size`."""

    def __init__(self, folder: str, size: int):
        self.folder, self.size = folder, size
        self.paths, self.labels, self.num_classes = list_folder(folder)
        listing = "".join(f"{y}\t{p}\n" for y, p in zip(self.labels, self.paths, strict=True))
        # What an extraction of it must match to resume: the images and their order.
        self.fingerprint = "folder:sha256:" + hashlib.sha256(listing.encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        path = os.path.join(self.folder, self.paths[index])
        try:
            with Image.open(path) as image:
                pixels = center_crop(image, self.size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise InputFileError([f"{path} in data.folder is not a readable image ({e})"]) from e
        return {"image": pixels, "label": self.labels[index]}


def _folder(config, split: str) -> FolderImages:
    del split  # a folder is one split
    return FolderImages(config.data.folder, config.data.image_size)


def _folder_problems(d) -> list[str]:
    out = integer_problems("image_size", d.image_size)
    if not d.folder:
        return out + ["folder='' names no image folder (sub-folders per class, or flat)"]
    if not os.path.isdir(d.folder):
        return out + [f"folder={d.folder!r}: no such folder"]
    return out


def _folder_holds(d) -> tuple[tuple[int, int, int], int]:
    return (d.image_size, d.image_size, 3), max(len(class_folders(d.folder)), 1)


# --- TFDS ------------------------------------------------------------------------------------


class TfdsImages:
    """A TFDS image classification dataset (features `image`, `label`) read as
    `tfds.data_source` reads it: ArrayRecord, random access, no TensorFlow. Nothing is
    downloaded."""

    def __init__(self, name: str, split: str, data_dir: str, size: int):
        import tensorflow_datasets as tfds

        self.size = size
        builder = tfds.builder(name, data_dir=data_dir or None)
        if builder.is_prepared() and not _has_array_record(builder):
            raise ConfigError([_not_array_record(name, data_dir, builder)])
        try:
            self.data = builder.as_data_source(split)
        except (NotImplementedError, AssertionError, KeyError, ValueError, OSError) as e:
            where = f"data.tfds_data_dir={data_dir!r}" if data_dir else "TFDS's default data_dir"
            raise ConfigError(
                [
                    f"the TFDS dataset {name!r} (split {split!r}) is not built as array_record "
                    f"in {where} ({type(e).__name__}: {str(e).splitlines()[0]}): set "
                    "data.manual_dir to the folder of the manual download and --mode extract, "
                    "or a pixel-space training run on one process, builds it (README: "
                    "Training on ImageNet)"
                ]
            ) from None
        self.num_classes = builder.info.features["label"].num_classes
        self.fingerprint = f"tfds:{name}/{builder.version}:{split}:{len(self.data)}"

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        example = self.data[index]
        pixels = center_crop(Image.fromarray(np.asarray(example["image"])), self.size)
        return {"image": pixels, "label": np.int32(example["label"])}


def prepare_tfds(name: str, data_dir: str, manual_dir: str) -> bool:
    """Builds the TFDS dataset `name` as ArrayRecord into `data_dir` ('' = TFDS's default)
    from the manual download in `manual_dir`, unless it is built already; True if it built
    it. Needs TensorFlow; a few hours for ImageNet, on one process."""
    import tensorflow_datasets as tfds

    built = tfds.builder(name, data_dir=data_dir or None)
    if built.is_prepared():  # in whichever format: never built twice
        if not _has_array_record(built):
            raise ConfigError([_not_array_record(name, data_dir, built)])
        return False
    builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
    except Exception as e:  # TFDS and TensorFlow raise many kinds for missing or bad files
        first = (str(e).splitlines() or [""])[0]
        raise ConfigError(
            [f"data.manual_dir={manual_dir!r}: cannot build {name} ({type(e).__name__}: {first})"]
        ) from e
    return True


def _has_array_record(builder) -> bool:
    """Whether a prepared TFDS dataset has ArrayRecord shards (what grain reads)."""
    formats = [builder.info.file_format, *builder.info.alternative_file_formats]
    return any(getattr(f, "value", f) == "array_record" for f in formats)


def _not_array_record(name: str, data_dir: str, builder) -> str:
    where = f"data.tfds_data_dir={data_dir!r}" if data_dir else "TFDS's default data_dir"
    return (
        f"{where} holds {name} built as {getattr(builder.info.file_format, 'value', '?')}, "
        "but it is read as array_record (random access, no TensorFlow): build it anew from "
        "data.manual_dir into an empty data.tfds_data_dir (--mode extract does), or convert "
        f"it in place with `tfds convert_format --dataset_dir={builder.data_dir_root}/{name} "
        "--out_file_format=array_record` (needs apache-beam)"
    )


def _tfds_problems(d) -> list[str]:
    out = integer_problems("image_size", d.image_size)
    if d.manual_dir and not os.path.isdir(d.manual_dir):
        out.append(f"manual_dir={d.manual_dir!r}: no such folder")
    elif d.tfds_data_dir and not d.manual_dir and not os.path.isdir(d.tfds_data_dir):
        out.append(
            f"tfds_data_dir={d.tfds_data_dir!r}: no such folder (set data.manual_dir to "
            "build the dataset there from the manual download)"
        )
    return out


def tfds_source(
    name: str, num_classes: int, download: str = "<folder of the manual download>"
) -> Source:
    """The Source of the TFDS dataset `name`, read from `data.tfds_data_dir`; `download`
    describes its manual download (the placeholder of `data.manual_dir`)."""

    def images(config, split: str) -> TfdsImages:
        d = config.data
        return TfdsImages(name, split, d.tfds_data_dir, d.image_size)

    def holds(d):
        return (d.image_size, d.image_size, 3), num_classes

    def prepare(config) -> None:
        if config.data.manual_dir:
            prepare_tfds(name, config.data.tfds_data_dir, config.data.manual_dir)

    def build(config, split: str) -> ModelScale:
        """The photographs in [-1, 1] for a pixel-space model; a single process builds
        the dataset from `data.manual_dir` first if it is not built (as --mode extract)."""
        import jax  # where a model trains on them

        if jax.process_count() == 1:
            prepare(config)
        return ModelScale(images(config, split))

    return Source(
        build=build,
        images=images,
        prepare=prepare,
        problems=_tfds_problems,
        holds=holds,
        reads={"tfds_data_dir": "", "manual_dir": download},
    )


def _scaled(images: Callable) -> Callable:
    return lambda config, split: ModelScale(images(config, split))


SOURCES.register(
    "folder",
    Source(
        build=_scaled(_folder),
        images=_folder,
        problems=_folder_problems,
        holds=_folder_holds,
        reads={"folder": "<image folder>"},
    ),
)
SOURCES.register(
    "imagenet2012",
    tfds_source("imagenet2012", 1000, "<folder of ILSVRC2012_img_train.tar and _val.tar>"),
)
