"""DiT-L/2 + DTR on ImageNet 256x256 latents: the paper's recipe (SPEC §6) at this size.

  python -m dtr_jax.main --config configs/dit_l.py --workdir WORKDIR

| DiT-L/2 | |
|---|---|
| depth / hidden / heads / patch | 24 / 1024 / 16 / 2 |
| parameters | 458M |
| forward cost per image | 80.7 GMACs |
| optimizer | AdamW, lr 1e-4 constant, weight decay 0, EMA 0.9999 |
| batch / steps | 256 / 400K |
| input | ImageNet train: ADM crop to 256, flips, SD VAE latents x0.18215 (32x32x4), 1000 classes |
| diffusion | linear schedule, T = 1000, learned sigma, hybrid loss |
| routing | DTR, beta 0.8, alpha 4 |
| sampling | 250 DDPM steps, guidance 1.5 |
| how it computes | scanned blocks, remat `dots_with_no_batch_dims_saveable`, FSDP on all devices |
| paper FID-50K (DiT -> DiT + DTR) | 12.59 -> 8.90 |

Every row but the size and how it computes is `default_config()`'s. How it computes
changes no result: it makes the paper's batch of 256 fit a v5e-8 (16 GiB a chip), the
smallest common slice, as compiled by `--mode plan` (BENCHMARKS.md, optimisation log
7); `--config.model.scan_blocks=False` reads checkpoints of the per-block layout.
The run reads the latents `--mode extract` writes once (README: Training on ImageNet);
`--config.data.name=synthetic` trains on random latents of the right shape, to check
shapes, sharding and memory.
"""

from dtr_jax.config import default_config


def get_config():
    c = default_config()
    c.model.name = "DiT-L/2"
    c.model.scan_blocks = True  # one compiled block for all: a faster compile
    c.model.remat_policy = "dots_with_no_batch_dims_saveable"  # keep matmul outputs only
    c.mesh.data, c.mesh.fsdp = 1, -1  # params, EMA and moments split over every device
    return c
