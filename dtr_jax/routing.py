"""Task-routing tables (SPEC §1).

A routing table is a (T, C) array of 0/1: row t is the channel mask of the
denoising task at timestep t. Tables are plain numpy constants computed once,
held outside the model parameters and gathered per sample inside the jitted
model (see `dtr_jax.models.dit`; a U-Net takes one group of tables per routed width,
`width_tables`, see `dtr_jax.models.unet`). `route` applies a gathered mask to the residual
branches of any block, so every routed architecture routes the same way.
"""

from __future__ import annotations

import numpy as np

KINDS = ("none", "dtr", "random")  # tables computed from (beta, alpha, seed)
# The arguments each kind's tables depend on: together with the kind, what a model spec
# records (a `none` run resumed with another beta is the same model; a `dtr` one is not).
TABLE_FIELDS = {"none": (), "dtr": ("beta", "alpha"), "random": ("beta", "seed")}
FILE = "file"  # tables read from a file (config `model.routing.path`, see dtr_jax.interop)


def problems(
    kind: str, beta: float, alpha: float, channels: int | None = None, num_tasks: int | None = None
) -> list[str]:
    """Problems with routing arguments, each naming its argument ([] if all is well).
    `channels` and `num_tasks` are checked when given. Kind 'file' is allowed (its
    tables are read, not computed: `dtr_jax.interop.tables_problems` checks them)."""
    allowed = [*KINDS, FILE]
    out = [] if kind in allowed else [f"kind={kind!r} is unknown: allowed {allowed}"]
    for name, value in (("num_tasks", num_tasks), ("channels", channels)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value <= 0):
            out.append(f"{name}={value!r} must be a positive integer")
    if not 0.0 < beta <= 1.0:
        out.append(f"beta={beta!r} must lie in (0, 1]")
    elif isinstance(channels, (int, np.integer)) and channels > 0:
        if active_channels(channels, beta) < 1:
            out.append(
                f"beta={beta!r} leaves no active channel out of {channels}: "
                "beta * channels must be >= 1"
            )
    if not alpha > 0.0:
        out.append(f"alpha={alpha!r} must be > 0")
    return out


def _check(kind: str, num_tasks: int, channels: int, beta: float, alpha: float) -> None:
    found = problems(kind, beta, alpha, channels, num_tasks)
    if kind == FILE:
        found.append(f"kind={FILE!r} tables are read from a file, not computed")
    if found:
        raise ValueError("routing " + "; ".join(found))


def active_channels(channels: int, beta: float) -> int:
    """Cb = floor(beta * C), the number of ones in every row."""
    return int(beta * channels)


def dtr_starts(num_tasks: int, channels: int, beta: float, alpha: float) -> np.ndarray:
    """Window start per task: round((t / (T-1))**alpha * (C - Cb)), half to even."""
    last = channels - active_channels(channels, beta)
    u = np.linspace(0.0, 1.0, num_tasks, dtype=np.float64)
    return np.round(u**alpha * last).astype(np.int64)


def routing_table(
    kind: str, num_tasks: int, channels: int, beta: float = 0.8, alpha: float = 4.0, seed: int = 0
) -> np.ndarray:
    """The (num_tasks, channels) uint8 table of 0/1 for one block.

    Args:
      kind: 'none' (all ones), 'dtr' (sliding window) or 'random' (a random
        subset of floor(beta*C) channels per task).
      num_tasks: T, the number of diffusion timesteps.
      channels: C, the hidden size of the routed blocks.
      beta: sharing ratio, the fraction of active channels per task, in (0, 1].
      alpha: window speed exponent (> 0); used by 'dtr' only.
      seed: seed of the 'random' table (give each block its own seed).
    """
    _check(kind, num_tasks, channels, beta, alpha)
    if kind == "none":
        return np.ones((num_tasks, channels), np.uint8)
    cb = active_channels(channels, beta)
    c = np.arange(channels)
    if kind == "dtr":
        start = dtr_starts(num_tasks, channels, beta, alpha)[:, None]
        return ((c >= start) & (c < start + cb)).astype(np.uint8)
    rng = np.random.default_rng(seed)
    chosen = np.argsort(rng.random((num_tasks, channels)), axis=1)[:, :cb]
    table = np.zeros((num_tasks, channels), np.uint8)
    np.put_along_axis(table, chosen, 1, axis=1)
    return table


def block_seed(seed: int, block: int) -> int:
    """Seed of block `block`'s random table: distinct per (seed, block) pair."""
    return int(np.random.SeedSequence([seed, block]).generate_state(1)[0])


def model_tables(
    kind: str,
    num_tasks: int,
    channels: int,
    depth: int,
    beta: float = 0.8,
    alpha: float = 4.0,
    seed: int = 0,
) -> np.ndarray | None:
    """Tables for a whole model, shaped (G, T, C) as the DiT expects.

    'dtr' shares one table across blocks (G = 1); 'random' draws one per block
    (G = depth); 'none' returns None, which the model treats as no routing (an
    all-ones mask is the identity, so this is exact and skips the multiply).
    """
    _check(kind, num_tasks, channels, beta, alpha)
    if kind == "none":
        return None
    if kind == "dtr":
        return routing_table("dtr", num_tasks, channels, beta, alpha)[None]
    return np.stack(
        [
            routing_table("random", num_tasks, channels, beta, alpha, seed=block_seed(seed, i))
            for i in range(depth)
        ]
    )


def width_tables(
    kind: str,
    num_tasks: int,
    widths,
    beta: float = 0.8,
    alpha: float = 4.0,
    seed: int = 0,
) -> dict[int, np.ndarray] | None:
    """Tables for a model whose routed sites have several widths (a U-Net): {C: (G, T, C)}.

    `widths` is the width of every routed site in forward order. 'dtr' builds one table
    per width (G = 1: the sites of width C share it, as a DiT's blocks share theirs);
    'random' draws one per site (G = the number of sites of width C, in forward order;
    the i-th site of the model uses the seed `block_seed(seed, i)`); 'none' returns None.
    """
    widths = [int(w) for w in widths]
    for c in sorted(set(widths)):
        _check(kind, num_tasks, c, beta, alpha)
    if kind == "none":
        return None
    if kind == "dtr":
        return {c: routing_table("dtr", num_tasks, c, beta, alpha)[None] for c in set(widths)}
    drawn: dict[int, list[np.ndarray]] = {}
    for i, c in enumerate(widths):
        table = routing_table("random", num_tasks, c, beta, alpha, seed=block_seed(seed, i))
        drawn.setdefault(c, []).append(table)
    return {c: np.stack(tables) for c, tables in drawn.items()}


def route(branches, x, mask):
    """SPEC §2, `x + Block(x * m)`, for a block made of residual branches applied in turn.

    `branches` are the functions f_k of a residual block, h <- h + f_k(h) (a DiT block
    has two: attention, then MLP). Their input h starts as the masked stream x * m, so
    the block reads only the active channels; every update f_k(h) lands on all C
    channels of x, so the inactive channels pass through. This equals the release's
    `Block(x * m) + x * (1 - m)` but keeps the residual stream free of the subtraction
    `- x * m`, which XLA otherwise recomputes through the backward pass (BENCHMARKS.md,
    optimisation log). `mask` is None for no routing; an all-ones mask gives the
    unrouted block bit for bit.
    """
    if mask is None:
        for branch in branches:
            x = x + branch(x)
        return x
    h = x * mask
    for branch in branches:
        update = branch(h)
        h, x = h + update, x + update  # XLA drops the last h, which nothing reads
    return x
