"""The digits default trained by flow matching (SiT's linear path, velocity) with DTR.

configs/digits.py's model, data, optimizer and steps; the objective is SiT's instead of
DDPM, and the samples come from the Heun ODE sampler. The routing tables are the
paper's (T = 1000 rows, DTR beta 0.8, alpha 4): at flow time t (t = 1 is data) the model
uses row round((1 - t) * 999). Trains in a few minutes on a 2-core CPU:
  python -m dtr_jax.main --config configs/digits_flow.py --workdir workdirs/digits_flow
"""

from dtr_jax.config import default_config


def get_config():
    c = default_config()
    c.num_train_steps = 2000
    c.global_batch_size = 64
    c.checkpoint_every_steps = 1000
    c.sample_every_steps = 500  # image summaries in TensorBoard

    c.model.name = "DiT-S/2"  # shrunk below: 16 tokens of 2x2 pixel patches
    c.model.depth = 4
    c.model.hidden_size = 128
    c.model.num_heads = 4
    c.model.input_size = 8
    c.model.in_channels = 1
    c.model.num_classes = 10
    c.model.learn_sigma = False  # a flow model learns no variance
    # model.routing: the default's DTR, beta 0.8, alpha 4; num_tasks: 1000 rows

    c.diffusion.objective = "flow"  # SiT's transport: linear path, velocity (its defaults)

    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 200
    c.optimizer.ema_decay = 0.995  # a 0.9999 EMA would still be mostly init after 2K steps

    c.data.name = "digits"
    c.data.flip = False  # a mirrored digit is not a digit

    c.sample.decoder = "pixels"  # the model makes 8x8 images
    c.sample.sampler = "heun"
    c.sample.num_steps = 25  # 50 model calls
    c.sample.cfg_scale = 2.0
    c.sample.num_samples = 1000
    c.sample.batch_size = 500
    c.sample.grid_per_class = 10
    return c
