"""Input data: named sources (`sources`; photographs in `images`, extracted latents in
`latents`) and the sharded grain pipeline (`pipeline`).

The package exports the sources and their validation; the pipeline (grain) is
imported, as `dtr_jax.data.pipeline`, by what reads a dataset in order: the training
loop and the latent extraction.
"""

from dtr_jax.data import images, latents  # noqa: F401  (they register their sources)
from dtr_jax.data.sources import SOURCES, ArraySource, Source, get_source, problems

__all__ = ["SOURCES", "ArraySource", "Source", "get_source", "problems"]
