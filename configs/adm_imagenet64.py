"""ADM (guided-diffusion's 64x64 model) + DTR on ImageNet 64x64: the paper's ImageNet ADM row.

  python -m dtr_jax.main --config configs/adm_imagenet64.py --workdir WORKDIR \
    --config.data.tfds_data_dir=TFDS_DIR

| ADM-64 (pixel space) | | source |
|---|---|---|
| channels / mult / ResBlocks / attention | 192 / 1,2,3,4 / 3 / at 32, 16, 8 px | [G] |
| heads | 64 channels each, new attention order | [G] |
| ResBlocks | AdaGN (scale-shift norm), up/downsampling ResBlocks, dropout 0.1 | [G] |
| parameters | 296M (295,904,454 counted here) | [G] |
| diffusion | cosine schedule, T = 1000, learned sigma, hybrid loss (eps MSE + VB) | [G], [I] |
| input | ImageNet train, ADM centre crop to 64x64, flips, 1000 classes | [I] |
| optimizer | AdamW, lr 1e-4 constant, weight decay 0, EMA 0.9999 | [I], [D] |
| batch / steps | 256 / 400K | [D] |
| labels | no label dropout, no guidance (guided-diffusion's models have no null label) | [G] |
| routing | DTR, beta 0.8, alpha 4, each GroupNorm before a zero_module, head too | [D], [R] |
| sampling | 250 DDPM steps, clipped to [-1, 1] | [G], [S] |
| paper FID (ADM -> ADM + DTR) | 6.34 -> 4.91 | [D] |

[G] guided-diffusion's README, the MODEL_FLAGS of its released 64x64_diffusion.pt
    (--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1
    --image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192
    --num_head_channels 64 --num_res_blocks 3 --resblock_updown True
    --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True); the model
    is `model.name = 'ADM-64'` (dtr_jax.models.UNETS) and imports that file (init_from).
[I] guided-diffusion's scripts/image_train.py: lr 1e-4, weight decay 0, EMA rate 0.9999,
    uniform timesteps, random flips, no random crop (image_datasets.py, center_crop_arr);
    with learned sigma and neither use_kl nor rescale_learned_sigmas its loss is MSE + VB.
[D] The DTR paper (Park et al., ICLR 2024) reports ADM 64x64 on ImageNet (FID 6.34 ->
    4.91) but states no separate recipe for it, and its public release has no U-Net code:
    batch size and steps are its DiT recipe (SPEC §6: batch 256, 400K, AdamW lr 1e-4,
    EMA 0.9999), an assumption; so are beta 0.8 and alpha 4 (its defaults). How many
    samples its ADM FIDs are over is not stated either (FID-50K, ADM's usual, here).
[R] The authors place the router "between every group normalization layer and the
    subsequent zero_module" (README: U-Net routing).
[S] guided-diffusion samples pixels with 250 respaced steps (README SAMPLE_FLAGS) and
    clip_denoised=True (scripts/image_sample.py).

The photographs come from TFDS `imagenet2012` (built once from the ImageNet tars, see
README: Training on ImageNet; `--config.data.manual_dir=TARS` builds it on the first run)
or from an image folder (`--config.data.name=folder --config.data.folder=train/`).
FID-50K against ADM's ImageNet 64x64 reference batch (VIRTUAL_imagenet64_labeled.npz,
from the evaluations README of openai/guided-diffusion):

  python -m dtr_jax.main --config configs/adm_imagenet64.py --workdir WORKDIR --mode evaluate \
    --config.eval.num_samples=50000 --config.eval.reference=VIRTUAL_imagenet64_labeled.npz \
    --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth

Sample from (or fine-tune) guided-diffusion's own release with routing 'none':

  python -m dtr_jax.main --config configs/adm_imagenet64.py --workdir WORKDIR --mode sample \
    --config.init_from=64x64_diffusion.pt --config.model.routing.kind=none
"""

from dtr_jax.config import default_config


def get_config():
    c = default_config()
    c.model.name = "ADM-64"  # [G]
    c.model.input_size = 64
    c.model.in_channels = 3
    c.model.num_classes = 1000  # --class_cond True [G]
    c.model.class_dropout_prob = 0.0  # no null label: the released model has none [G]
    c.diffusion.schedule = "cosine"  # --noise_schedule cosine [G]

    c.data.name = "imagenet2012"  # photographs in [-1, 1], ADM's centre crop [I]
    c.data.image_size = 64
    c.data.num_threads = 16  # JPEG decoding and cropping run on the host

    c.sample.decoder = "pixels"
    c.sample.cfg_scale = 1.0  # no classifier-free guidance [G]
    c.sample.clip_denoised = True  # [S]
    return c
