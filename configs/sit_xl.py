"""SiT-XL/2 + DTR on ImageNet 256x256 latents: SiT's recipe (Ma et al., "SiT: Exploring Flow and
Diffusion-based Generative Models with Scalable Interpolant Transformers", 2024; the
release willisma/SiT, train.py and sample_ddp.py) with DTR routing.

  python -m dtr_jax.main --config configs/sit_xl.py --workdir WORKDIR

| SiT-XL/2 | |
|---|---|
| architecture | DiT-XL/2's: depth / hidden / heads / patch 28 / 1152 / 16 / 2 |
| parameters, forward cost | 675M, 118.6 GMACs per image |
| output | learned-sigma layout (2 x 4 channels), the second half unused, as SiT's models |
| objective | flow: linear path, velocity prediction, no loss weight, t uniform on [0, 1] |
| optimizer | AdamW, lr 1e-4 constant, weight decay 0, EMA 0.9999 (train.py) |
| batch / steps | 256 / 400K (the paper's model-size tables; train.py's 1400 epochs are about 7M) |
| input | as DiT's: ImageNet train, ADM crop to 256, flips, SD VAE latents x0.18215 (32x32x4) |
| routing | DTR, beta 0.8, alpha 4, T = 1000 rows: row round((1 - t) * 999) at flow time t |
| sampling | SiT's SDE: Euler-Maruyama, 250 steps, last step mean; guidance 1.5 |
| SiT paper FID-50K at 400K steps, no guidance (no routing) | 17.2 (DiT-XL/2: 19.5) |

The objective is train.py's `create_transport("Linear", "velocity", None)`; the SDE is
sample_ddp.py's (diffusion sigma_t, last step 0.04 long), the sampler of the paper's
FID-50K of 2.06 for SiT-XL/2 (7M steps, guidance 1.5). configs/sit_b.py with the size
changed; every other row but the objective and the sampler is `default_config()`'s. A
SiT release checkpoint (SiT-XL-2-256x256.pt: SiT without routing) samples with
`--config.init_from=SiT-XL-2-256x256.pt --config.model.routing.kind=none`.
"""

import pathlib

from dtr_jax.config import load_config


def get_config():
    c = load_config(str(pathlib.Path(__file__).with_name("sit_b.py")))
    c.model.name = "DiT-XL/2"  # SiT's architecture is DiT's
    return c
