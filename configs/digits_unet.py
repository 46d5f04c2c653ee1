"""The digits default on an ADM U-Net: class-conditional pixel-space U-Net + DTR on sklearn digits.

The U-Net counterpart of configs/digits.py (same data, steps, batch, optimizer, EMA,
sampling): guided-diffusion's UNetModel design shrunk to 8x8 digits (two levels, 8x8 and
4x4, attention at 4x4) and routed as the README's "U-Net routing" says. Nothing is
downloaded; a few minutes on a 2-core CPU. Run:
  python -m dtr_jax.main --config configs/digits_unet.py --workdir workdirs/digits_unet
  python -m dtr_jax.study --config configs/digits_unet.py --workdir workdirs/study_unet
"""

from dtr_jax.config import default_config


def get_config():
    c = default_config()
    c.num_train_steps = 2000
    c.global_batch_size = 64
    c.checkpoint_every_steps = 1000
    c.sample_every_steps = 500  # image summaries in TensorBoard

    c.model.name = "ADM-XS"  # widths 32 and 64 at 8x8 and 4x4, 1 ResBlock each, attention at 4x4
    c.model.input_size = 8
    c.model.in_channels = 1
    c.model.num_classes = 10
    c.model.class_dropout_prob = 0.1  # a null label for guidance, as configs/digits.py
    # model.routing: the default's DTR, beta 0.8, alpha 4, every routed GroupNorm

    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 200
    c.optimizer.ema_decay = 0.995  # a 0.9999 EMA would still be mostly init after 2K steps

    c.data.name = "digits"
    c.data.flip = False  # a mirrored digit is not a digit

    c.sample.decoder = "pixels"  # the model makes 8x8 images
    c.sample.num_steps = 100
    c.sample.cfg_scale = 2.0
    c.sample.clip_denoised = True  # pixels live in [-1, 1]
    c.sample.num_samples = 1000
    c.sample.batch_size = 500
    c.sample.grid_per_class = 10
    return c
