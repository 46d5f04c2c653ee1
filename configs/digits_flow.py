"""The digits default trained by flow matching (SiT's linear path, velocity) with DTR.

configs/digits.py's model, data, optimizer and steps; the objective is SiT's instead of
DDPM, and the samples come from the Heun ODE sampler. The routing tables are the
paper's (T = 1000 rows, DTR beta 0.8, alpha 4): at flow time t (t = 1 is data) the model
uses row round((1 - t) * 999). Trains in a few minutes on a 2-core CPU:
  python -m dtr_jax.main --config configs/digits_flow.py --workdir workdirs/digits_flow
"""

import pathlib

from dtr_jax.config import load_config


def get_config():
    c = load_config(str(pathlib.Path(__file__).with_name("digits.py")))
    c.model.learn_sigma = False  # a flow model learns no variance
    # model.routing: digits.py's DTR, beta 0.8, alpha 4; num_tasks: 1000 rows

    c.diffusion.objective = "flow"  # SiT's transport: linear path, velocity (its defaults)

    c.sample.sampler = "heun"
    c.sample.num_steps = 25  # 50 model calls
    c.sample.clip_denoised = False  # the flow samplers make no data prediction to clip
    return c
