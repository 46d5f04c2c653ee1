"""ADM + DTR on FFHQ 64x64 pixels, unconditional: the paper's FFHQ ADM row.

  python -m dtr_jax.main --config configs/adm_ffhq64.py --workdir WORKDIR \
    --config.data.folder=FFHQ/images1024x1024

| ADM-64, unconditional (pixel space) | | source |
|---|---|---|
| channels / mult / ResBlocks / attention | 192 / 1,2,3,4 / 3 / at 32, 16, 8 px | [G] |
| heads | 64 channels each, new attention order | [G] |
| ResBlocks | AdaGN (scale-shift norm), up/downsampling ResBlocks, dropout 0.1 | [G] |
| diffusion | cosine schedule, T = 1000, learned sigma, hybrid loss (eps MSE + VB) | [G], [I] |
| input | FFHQ (70K photographs), ADM centre crop to 64x64, flips, no classes | [I] |
| optimizer | AdamW, lr 1e-4 constant, weight decay 0, EMA 0.9999 | [I], [D] |
| batch / steps | 256 / 400K | [D] |
| routing | DTR, beta 0.8, alpha 4, each GroupNorm before a zero_module, head too | [D], [R] |
| sampling | 250 DDPM steps, clipped to [-1, 1]; FID on 10K samples | [S], [D] |
| paper FID (ADM -> ADM + DTR) | 3.12 -> 2.65 | [D] |

[G] The architecture and diffusion of guided-diffusion's released 64x64 ImageNet model
    (README MODEL_FLAGS; see configs/adm_imagenet64.py), without its label embedding
    (class_cond False). No FFHQ ADM is released; the DTR paper does not give the size of
    its FFHQ ADM: this is an assumption.
[I] guided-diffusion's scripts/image_train.py and image_datasets.py (as adm_imagenet64).
[D] The DTR paper (Park et al., ICLR 2024) reports FFHQ ADM 64x64 FID 3.12 -> 2.65
    without a recipe of its own: batch and steps are its DiT recipe (SPEC §6), beta and
    alpha its defaults, FID-10K as its FFHQ DiT rows; all assumptions.
[R] "between every group normalization layer and the subsequent zero_module" (README:
    U-Net routing).
[S] guided-diffusion's sampling: 250 respaced steps, clip_denoised=True.

FID against the photographs' own reference batch, made once at 64x64 (README: An FID
reference batch of your own data):

  python -m dtr_jax.main --config configs/adm_ffhq64.py --mode reference \
    --config.data.folder=FFHQ/images1024x1024 --config.eval.reference=ffhq64_reference.npz \
    --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth
  python -m dtr_jax.main --config configs/adm_ffhq64.py --workdir WORKDIR --mode evaluate \
    --config.eval.reference=ffhq64_reference.npz \
    --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth
"""

from dtr_jax.config import default_config


def get_config():
    c = default_config()
    c.model.name = "ADM-64"  # [G]
    c.model.input_size = 64
    c.model.in_channels = 3
    c.model.num_classes = 1  # unconditional: no label embedding
    c.diffusion.schedule = "cosine"  # [G]

    c.data.name = "folder"  # photographs in [-1, 1], ADM's centre crop [I]
    c.data.folder = "/mnt/disks/data/ffhq/images1024x1024"  # a placeholder to override
    c.data.image_size = 64
    c.data.num_threads = 16  # decoding 1024x1024 PNGs runs on the host
    c.extract.source = "folder"  # what --mode reference crops

    c.sample.decoder = "pixels"
    c.sample.cfg_scale = 1.0  # nothing to guide without classes
    c.sample.clip_denoised = True  # [S]
    c.sample.num_samples = 10_000  # FID-10K [D]
    c.eval.num_samples = 10_000
    return c
