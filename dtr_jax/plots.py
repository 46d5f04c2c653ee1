"""Plots a training run leaves in its workdir (PNG, written atomically; local or gs://).

routing.png           the routing tables: which channels each denoising task uses
loss_by_timestep.png  the unweighted loss per timestep interval at the end of training
"""

from __future__ import annotations

import io

import numpy as np

from dtr_jax import files


def _figure(width: float, height: float):
    import matplotlib  # only where plots are drawn

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=100)


def _save(plt, fig, path: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    files.write_atomically(path, buffer.getvalue())


def routing_tables(tables, path: str, title: str, max_blocks: int = 4) -> None:
    """The (G, T, C) 0/1 tables as images (task t down, channel across; dark = active),
    for the first `max_blocks` tables; a U-Net's {width: (G, T, width)}, the first
    `max_blocks` tables of each width, one row per width."""
    groups = tables if isinstance(tables, dict) else {None: tables}
    shown = {w: t[:max_blocks] for w, t in sorted(groups.items(), key=lambda kv: kv[0] or 0)}
    columns = max(len(t) for t in shown.values())
    plt, fig = _figure(3.2 * columns, 3.4 * len(shown))
    for row, (width, group) in enumerate(shown.items()):
        for g, table in enumerate(group):
            ax = fig.add_subplot(len(shown), columns, row * columns + g + 1)
            ax.imshow(table, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
            ax.set_xlabel("channel")
            ax.set_ylabel("task (timestep t)")
            which = "all blocks" if len(groups[width]) == 1 else f"block {g}"
            which += "" if width is None else f" of width {width}"
            ax.set_title(which, fontsize=9)
    fig.suptitle(title, fontsize=10)
    _save(plt, fig, path)


def loss_by_timestep(boundaries: np.ndarray, losses: list[float | None], path: str, title: str):
    """Mean loss per timestep interval [b_k, b_k+1) against t (log scale); None = no sample."""
    plt, fig = _figure(5.0, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    for (lo, hi), loss in zip(
        zip(boundaries[:-1], boundaries[1:], strict=True), losses, strict=True
    ):
        if loss is not None:
            ax.hlines(loss, lo, hi - 1, colors="C0", linewidth=2)
    ax.set_yscale("log")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("loss (mse + vb)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _save(plt, fig, path)
