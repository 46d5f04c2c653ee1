"""DiT-B/2 + DTR on FFHQ 256x256 latents, unconditional: the paper's FFHQ rows (SPEC §7).

| FFHQ DiT-B/2 | |
|---|---|
| depth / hidden / heads / patch | 12 / 768 / 12 / 2 |
| optimizer | AdamW, lr 1e-4 constant, weight decay 0, EMA 0.9999 |
| batch / steps | 256 / 400K |
| input | FFHQ (70K): ADM crop to 256, flips, SD VAE latents x0.18215 (32x32x4), unconditional |
| diffusion | linear schedule, T = 1000, learned sigma, hybrid loss |
| routing | DTR, beta 0.8, alpha 4 |
| sampling | 250 DDPM steps, no guidance; FID on 10K samples |
| paper FID-10K (DiT -> DiT + DTR) | 12.93 -> 8.82 |
| with Min-SNR / ANT-UW / P2 weighting | 9.73 -> 8.93 / 9.30 -> 8.81 / 10.08 -> 8.83 |

The photographs are an image folder (`data.folder`), flat or, as FFHQ is published
(images1024x1024/00000/ ... 69000/), in sub-folders, whose labels an unconditional model
ignores. Extract their latents once, then train (README: Training on ImageNet; the same
steps):

  python -m dtr_jax.main --config configs/ffhq_dit_b.py --mode extract \
    --config.data.folder=FFHQ/images1024x1024 --config.vae.path=vaes/sd-vae-ft-ema \
    --config.data.dir=LATENTS
  python -m dtr_jax.main --config configs/ffhq_dit_b.py --workdir WORKDIR --config.data.dir=LATENTS

FID-10K against the photographs' own reference batch, made once (README: An FID reference
batch of your own data):

  python -m dtr_jax.main --config configs/ffhq_dit_b.py --mode reference \
    --config.data.folder=FFHQ/images1024x1024 --config.eval.reference=ffhq256_reference.npz \
    --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth
  python -m dtr_jax.main --config configs/ffhq_dit_b.py --workdir WORKDIR --mode evaluate \
    --config.sample.decoder=sd_vae --config.vae.path=vaes/sd-vae-ft-ema \
    --config.eval.num_samples=10000 --config.eval.reference=ffhq256_reference.npz \
    --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth

Weighting variants: `--config.weighting.kind=min_snr`, `uw` or `p2` (`--config.weighting.gamma=1`).
"""

from dtr_jax.config import default_config


def get_config():
    c = default_config()
    c.model.name = "DiT-B/2"
    c.model.num_classes = 1  # unconditional
    c.extract.source = "folder"
    c.data.folder = "/mnt/disks/data/ffhq/images1024x1024"  # a placeholder to override
    c.data.dir = "/mnt/disks/data/ffhq256_latents"  # a placeholder to override
    c.sample.cfg_scale = 1.0  # nothing to guide without classes
    c.sample.num_samples = 10_000  # FID-10K
    return c
