"""DiT-S/2 + DTR on ImageNet 256x256 latents: the paper's recipe (SPEC §6).

AdamW lr 1e-4, no weight decay, global batch 256, EMA 0.9999, 400K steps,
DTR beta 0.8 alpha 4, 250 DDPM sampling steps at guidance 1.5. Until the
ImageNet latent source lands, run it end to end on random latents with
  --config.data.name=synthetic
"""

from dtr_jax.config import default_config


def get_config():
    c = default_config()
    c.num_train_steps = 400_000
    c.global_batch_size = 256
    c.log_every_steps = 100
    c.checkpoint_every_steps = 10_000
    c.model.name = "DiT-S/2"
    c.model.input_size = 32  # 256 / 8 (Stable Diffusion VAE)
    c.model.in_channels = 4
    c.model.num_classes = 1000
    c.model.routing.kind = "dtr"
    c.model.routing.beta = 0.8
    c.model.routing.alpha = 4.0
    c.optimizer.learning_rate = 1e-4
    c.optimizer.weight_decay = 0.0
    c.optimizer.ema_decay = 0.9999
    c.data.name = "synthetic"
    c.data.flip = True
    c.sample.num_steps = 250
    c.sample.cfg_scale = 1.5
    c.sample.decoder = "sd_vae"  # registered by the VAE (ROADMAP 3); 'latents' saves raw latents
    return c
