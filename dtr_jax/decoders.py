"""Decoders, registered by name (`sample.decoder`): model space -> what samples are saved as.

A decoder is built once per run from the run's config (and mesh) and maps a batch of
model outputs (pixels in [-1, 1], or latents) to a numpy array. Those that give uint8
images (`gives_images`) feed PNG grids and the image metrics. A decoder that reads a
config section of its own (`section`, e.g. `vae`) checks it in `problems`, which
`config.validate` calls before anything is built.

  pixels   [-1, 1] pixels -> uint8 images
  latents  raw float32 latents (no images)
  sd_vae   model-space latents -> uint8 images through the Stable Diffusion VAE (`vae.path`)
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from dtr_jax import sharding
from dtr_jax.errors import ConfigError
from dtr_jax.models import vae as vae_lib
from dtr_jax.registry import Registry

DECODERS: Registry = Registry("sample.decoder")


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 (as the ADM evaluator expects)."""
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class Decoder:
    """Base: reads no config section; called on a batch of model outputs (host numpy)."""

    gives_images = True
    upscale = 1  # side of an output image / side of the model's input
    section: str | None = None  # the config section the decoder reads, checked by `problems`

    @classmethod
    def problems(cls, section) -> list[str]:
        """Problems with the fields of `section`, each naming its field."""
        del section
        return []

    @classmethod
    def settings(cls, config) -> dict:
        """The config fields (JSON types) that change what it makes of the same model
        outputs: part of what names a sample run (`sample.run_name`)."""
        del config
        return {}

    def __init__(self, config=None, mesh=None):
        del config, mesh


@DECODERS.register("pixels")
class Pixels(Decoder):
    """Pixel models: [-1, 1] floats -> uint8 images."""

    def __call__(self, images) -> np.ndarray:
        return to_uint8(images)


@DECODERS.register("latents")
class Latents(Decoder):
    """Latent models without a decoder: the raw float32 latents."""

    gives_images = False

    def __call__(self, images) -> np.ndarray:
        return np.asarray(images, np.float32)


@DECODERS.register("sd_vae")
class VAEDecoder(Decoder):
    """Latent models: model-space latents -> uint8 images through the VAE at `vae.path`
    (loaded once), in batches of `vae.batch_size` split over the mesh, jitted once."""

    section = "vae"

    @classmethod
    def problems(cls, section) -> list[str]:
        return vae_lib.problems(section.path, section.batch_size)

    @classmethod
    def settings(cls, config) -> dict:
        return {"vae.path": str(config.vae.path)}  # not its batch size: the same images

    def __init__(self, config, mesh=None):
        path = config.vae.path
        self.vae, params = vae_lib.load_vae(path)
        latent_channels = self.vae.config.latent_channels
        if config.model.in_channels != latent_channels:
            raise ConfigError(
                [
                    f"model.in_channels={config.model.in_channels} does not match the "
                    f"{latent_channels} latent channels of the VAE at vae.path={path!r}"
                ]
            )
        self.upscale = self.vae.config.down_factor
        self.mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
        self.batch_size = config.vae.batch_size
        self.params = jax.device_put(params, sharding.replicated(self.mesh))
        self._decode = jit_decode(self.vae, self.mesh)

    def __call__(self, latents) -> np.ndarray:
        latents = np.asarray(latents, np.float32)
        starts = range(0, len(latents), self.batch_size)
        return np.concatenate([self._batch(latents[lo : lo + self.batch_size]) for lo in starts])

    def _batch(self, latents: np.ndarray) -> np.ndarray:
        images = self._decode(self.params, sharding.put_batch(latents, self.mesh))
        return to_uint8(sharding.host_gather(images)[: len(latents)])


def jit_decode(vae: vae_lib.AutoencoderKL, mesh):
    """`vae_lib.decode` jitted over `mesh`: fn(params, latents), params replicated,
    latents and images split over the batch shards."""
    rep, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    return jax.jit(
        functools.partial(vae_lib.decode, vae), in_shardings=(rep, batch), out_shardings=batch
    )


def create(config, mesh=None):
    """The decoder `config.sample.decoder` names, built for this run (on `mesh`, default:
    all devices as `config.mesh` says)."""
    return DECODERS.get(config.sample.decoder)(config, mesh)


def gives_images(name: str) -> bool:
    """Whether the decoder `name` makes uint8 images (False for unknown names)."""
    return name in DECODERS and DECODERS.get(name).gives_images
