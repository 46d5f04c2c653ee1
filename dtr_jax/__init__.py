"""dtr_jax: Denoising Task Routing (Park et al., ICLR 2024) for diffusion transformers."""

__version__ = "0.1.0"
