"""DiT-S/2 (33M params) + DTR on ImageNet 256x256 latents: the paper's recipe.

The recipe (SPEC §6) lives in dtr_jax.config.paper_config. Until the ImageNet latent
source lands, it runs end to end on random latents of the right shape
(data.name=synthetic): shapes, sharding and memory can be checked on any hardware.
"""

from dtr_jax.config import paper_config


def get_config():
    return paper_config("DiT-S/2")
