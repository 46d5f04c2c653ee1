"""The model's optimizer: AdamW with linear warm-up and optional clipping, and its EMA.

(ANT-UW's log-variances have their own AdamW group: `weighting.uw_optimizer`.)
"""

from __future__ import annotations

import jax
import optax

from dtr_jax.errors import integer_problems


def learning_rate(o) -> optax.Schedule:
    """Constant `o.learning_rate` after `o.warmup_steps` of linear warm-up from 0."""
    lr = optax.constant_schedule(o.learning_rate)
    if not o.warmup_steps:
        return lr
    warmup = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
    return optax.join_schedules([warmup, lr], [o.warmup_steps])


def create(o) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW transformation, its learning-rate schedule) of an optimizer section."""
    lr = learning_rate(o)
    tx = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    if o.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
    return tx, lr


def ema_update(ema_params, params, decay: float):
    """decay * ema + (1 - decay) * params, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def problems(o) -> list[str]:
    """Problems with an optimizer section, each naming its field."""
    out = [] if o.learning_rate > 0 else [f"learning_rate={o.learning_rate!r} must be > 0"]
    if not 0.0 <= o.ema_decay < 1.0:
        out.append(f"ema_decay={o.ema_decay!r} must lie in [0, 1)")
    for name in ("weight_decay", "grad_clip"):
        if getattr(o, name) < 0:
            out.append(f"{name}={getattr(o, name)!r} must be >= 0")
    for name in ("b1", "b2"):
        if not 0.0 <= getattr(o, name) < 1.0:
            out.append(f"{name}={getattr(o, name)!r} must lie in [0, 1)")
    if not o.eps > 0:
        out.append(f"eps={o.eps!r} must be > 0")
    return out + integer_problems("warmup_steps", o.warmup_steps, allow_zero=True)
