"""Decoders, registered by name (`sample.decoder`): model space -> what samples are saved as.

A decoder is built from the run's config and maps a batch of model outputs
(pixels in [-1, 1], or latents) to a numpy array. Those that give uint8 images
(`gives_images`) feed PNG grids and the image metrics. A latent model's VAE
registers itself here as one more entry.
"""

from __future__ import annotations

import numpy as np

from dtr_jax.registry import Registry

DECODERS: Registry = Registry("sample.decoder")


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 (as the ADM evaluator expects)."""
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@DECODERS.register("pixels")
class Pixels:
    """Pixel models: [-1, 1] floats -> uint8 images."""

    gives_images = True

    def __init__(self, config=None):
        del config

    def __call__(self, images) -> np.ndarray:
        return to_uint8(images)


@DECODERS.register("latents")
class Latents:
    """Latent models without a decoder: the raw float32 latents."""

    gives_images = False

    def __init__(self, config=None):
        del config

    def __call__(self, images) -> np.ndarray:
        return np.asarray(images, np.float32)


def create(config):
    """The decoder `config.sample.decoder` names, built for this run."""
    return DECODERS.get(config.sample.decoder)(config)


def gives_images(name: str) -> bool:
    """Whether the decoder `name` makes uint8 images (False for unknown names)."""
    return name in DECODERS and DECODERS.get(name).gives_images
