"""DiT-S/2 + DTR on ImageNet 256x256 latents: the paper's recipe (SPEC §6) at this size.

  python -m dtr_jax.main --config configs/dit_s.py --workdir WORKDIR

| DiT-S/2 | |
|---|---|
| depth / hidden / heads / patch | 12 / 384 / 6 / 2 |
| parameters | 33M |
| forward cost per image | 6.06 GMACs |
| optimizer | AdamW, lr 1e-4 constant, weight decay 0, EMA 0.9999 |
| batch / steps | 256 / 400K |
| input | ImageNet train: ADM crop to 256, flips, SD VAE latents x0.18215 (32x32x4), 1000 classes |
| diffusion | linear schedule, T = 1000, learned sigma, hybrid loss |
| routing | DTR, beta 0.8, alpha 4 |
| sampling | 250 DDPM steps, guidance 1.5 |
| paper FID-50K (DiT -> DiT + DTR) | 44.28 -> 37.43 |

Every row but the size is `default_config()`'s. The run reads the latents `--mode
extract` writes once (README: Training on ImageNet); `--config.data.name=synthetic`
trains on random latents of the right shape, to check shapes, sharding and memory.
"""

from dtr_jax.config import default_config


def get_config():
    c = default_config()
    c.model.name = "DiT-S/2"
    return c
