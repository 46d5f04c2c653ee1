"""Loss weighting for multi-task diffusion training (SPEC §5).

Kinds: ``constant``, ``min_snr``, ``p2`` (per-sample weights on the eps-MSE term)
and ``uw`` (ANT uncertainty weighting over K timestep clusters). Tables that are
computed once (SNR, cluster boundaries) are numpy; what runs inside the jitted
train step is jnp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dtr_jax.errors import choice_problems

KINDS = ("constant", "min_snr", "p2", "uw")
CLUSTERINGS = ("uniform", "snr")


def snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """SNR(t) = abar_t / (1 - abar_t), float64."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    return abar / (1.0 - abar)


def mse_weight(kind: str, snr_t: jax.Array, gamma: float = 5.0, k: float = 1.0) -> jax.Array:
    """Per-sample weight on the MSE term, same shape as ``snr_t``."""
    snr_t = jnp.asarray(snr_t)
    if kind in ("constant", "uw"):
        return jnp.ones_like(snr_t)
    if kind == "min_snr":
        # min(snr, gamma) / snr, written so that snr -> 0 gives 1 (not 0/0).
        return jnp.where(snr_t > gamma, gamma / jnp.maximum(snr_t, gamma), 1.0).astype(snr_t.dtype)
    if kind == "p2":
        return 1.0 / (k + snr_t) ** gamma
    raise ValueError(f"unknown weighting kind {kind!r}; expected one of {KINDS}")


# ----------------------------------------------------------------------------- clusters


def uniform_intervals(num_timesteps: int, num_clusters: int) -> np.ndarray:
    """Boundaries (K+1,) of K uniform intervals: floor(k T / K), k = 0..K."""
    _check_num_clusters(num_timesteps, num_clusters)
    return (np.arange(num_clusters + 1, dtype=np.int64) * num_timesteps) // num_clusters


def interval_cost(log_snr: np.ndarray, start: int, end: int) -> float:
    """ANT SNR cost of [start, end): sum_t |log_snr[center] - log_snr[t]|,
    center = start + (end - start) // 2."""
    seg = np.asarray(log_snr, dtype=np.float64)[start:end]
    return float(np.abs(seg[len(seg) // 2] - seg).sum())


def _cost_matrix(log_snr: np.ndarray) -> np.ndarray:
    """C[s, e] = interval_cost(log_snr, s, e) for 0 <= s < e <= T, +inf elsewhere. (T+1, T+1)."""
    lam = np.asarray(log_snr, dtype=np.float64)
    n = len(lam)
    # prefix[c, t] = sum_{u < t} |lam[c] - lam[u]|  (exact for any, not only monotone, log_snr)
    prefix = np.zeros((n, n + 1))
    np.cumsum(np.abs(lam[:, None] - lam[None, :]), axis=1, out=prefix[:, 1:])
    s, e = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    valid = s < e
    center = np.where(valid, s + (e - s) // 2, 0)
    cost = prefix[center, e] - prefix[center, s]
    return np.where(valid, cost, np.inf)


def interval_clustering(log_snr: np.ndarray, num_clusters: int) -> np.ndarray:
    """Boundaries (K+1,) of K contiguous non-empty intervals of [0, T) minimising the total
    cost (dynamic programming)."""
    n = len(log_snr)
    _check_num_clusters(n, num_clusters)
    cost = _cost_matrix(log_snr)
    best = np.full(n + 1, np.inf)  # best[e]: min cost of covering [0, e) with j intervals
    best[0] = 0.0
    splits = np.zeros((num_clusters, n + 1), dtype=np.int64)
    for j in range(num_clusters):
        total = best[:, None] + cost  # [s, e]: best prefix up to s, then interval [s, e)
        splits[j] = np.argmin(total, axis=0)
        best = total[splits[j], np.arange(n + 1)]
    bounds = [n]
    for j in range(num_clusters - 1, -1, -1):
        bounds.append(int(splits[j, bounds[-1]]))
    return np.asarray(bounds[::-1], dtype=np.int64)


def cluster_boundaries(
    clustering: str, alphas_cumprod: np.ndarray, num_clusters: int
) -> np.ndarray:
    """Boundaries (K+1,) for 'uniform' intervals or ANT's 'snr' interval clustering."""
    if clustering == "uniform":
        return uniform_intervals(len(alphas_cumprod), num_clusters)
    if clustering == "snr":
        return interval_clustering(np.log(snr(alphas_cumprod)), num_clusters)
    raise ValueError(f"unknown clustering {clustering!r}; expected one of {CLUSTERINGS}")


def cluster_index(t: jax.Array, boundaries) -> jax.Array:
    """Index (B,) int32 of the interval [b_k, b_{k+1}) containing each t."""
    b = jnp.asarray(boundaries, dtype=jnp.int32)
    idx = jnp.searchsorted(b, jnp.asarray(t, jnp.int32), side="right") - 1
    return jnp.clip(idx, 0, b.shape[0] - 2).astype(jnp.int32)


def sample_timesteps(
    rng: jax.Array, batch_size: int, num_timesteps: int, boundaries=None
) -> jax.Array:
    """t (batch_size,) int32: uniform on [0, T), or stratified over the clusters of
    ``boundaries`` if given.

    Stratified: batch_size / K samples per cluster, uniform inside it, laid out
    cluster-interleaved (0, 1, .., K-1, 0, 1, ..) so contiguous shards stay balanced.
    """
    if boundaries is None:
        return jax.random.randint(rng, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
    b = np.asarray(boundaries, dtype=np.int64)
    num_clusters = len(b) - 1
    for problem in _stratify_problems(num_clusters, "batch_size", batch_size):
        raise ValueError(problem)
    reps = batch_size // num_clusters
    lo = jnp.asarray(np.tile(b[:-1], reps), jnp.int32)
    hi = jnp.asarray(np.tile(b[1:], reps), jnp.int32)
    return jax.random.randint(rng, (batch_size,), lo, hi, dtype=jnp.int32)


# ----------------------------------------------------------------------------- losses


def cluster_sums(per_sample: jax.Array, cluster_ids: jax.Array, num_clusters: int):
    """(sum of the per-sample loss, number of samples) per cluster, each (K,)."""
    onehot = jax.nn.one_hot(cluster_ids, num_clusters, dtype=per_sample.dtype)
    return onehot.T @ per_sample, onehot.sum(axis=0)


def uw_objective(sums: jax.Array, counts: jax.Array, log_vars: jax.Array):
    """ANT uncertainty weighting, sum_k 0.5 (exp(-s_k) L_k / K + s_k), from the loss sums
    and sample counts per cluster (`cluster_sums`); (loss, the cluster means L (K,))."""
    means = sums / jnp.maximum(counts, 1.0)
    loss = jnp.sum(0.5 * (jnp.exp(-log_vars) * means / log_vars.shape[0] + log_vars))
    return loss, means


def combine(
    kind: str,
    mse: jax.Array,
    vb: jax.Array,
    t: jax.Array,
    snr_table,
    *,
    gamma: float = 5.0,
    k: float = 1.0,
    log_vars=None,
    boundaries=None,
):
    """Scalar loss and aux dict from per-sample ``mse`` and ``vb`` (B,).

    With ``boundaries``, aux holds the unweighted loss summed per timestep cluster
    (``cluster_loss_sum``) and the samples per cluster (``cluster_count``): UW's
    objective is made of them, and training logs them.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown weighting kind {kind!r}; expected one of {KINDS}")
    if kind == "uw" and (log_vars is None or boundaries is None):
        raise ValueError("weighting kind 'uw' needs log_vars and boundaries")
    aux = {}
    if boundaries is not None:
        sums, counts = cluster_sums(mse + vb, cluster_index(t, boundaries), len(boundaries) - 1)
        aux = {"cluster_loss_sum": sums, "cluster_count": counts}
    if kind == "uw":
        return uw_objective(sums, counts, log_vars)[0], aux
    snr_t = jnp.asarray(snr_table, dtype=mse.dtype)[t]
    w = mse_weight(kind, snr_t, gamma=gamma, k=k)
    return jnp.mean(w * mse + vb), aux


def init_log_vars(num_clusters: int) -> jax.Array:
    """UW log-variances s_k, initialised to 0."""
    return jnp.zeros((num_clusters,), jnp.float32)


def uw_optimizer(learning_rate: float = 0.025) -> optax.GradientTransformation:
    """The UW parameters' own AdamW group: lr 0.025, no weight decay (SPEC §5)."""
    return optax.adamw(learning_rate, weight_decay=0.0)


# ----------------------------------------------------------------------------- config


def _check_num_clusters(num_timesteps: int, num_clusters: int) -> None:
    found = _num_clusters_problems(num_clusters, num_timesteps)
    if found:
        raise ValueError(found[0])


def _num_clusters_problems(num_clusters: int, num_timesteps: int) -> list[str]:
    if 1 <= num_clusters <= num_timesteps:
        return []
    return [f"num_clusters={num_clusters} must be in [1, {num_timesteps}], the number of timesteps"]


def _stratify_problems(num_clusters: int, batch_name: str, batch_size: int) -> list[str]:
    if batch_size % num_clusters == 0:
        return []
    return [
        f"num_clusters={num_clusters} cannot stratify {batch_name}={batch_size}: it must "
        "divide the batch (an equal share of samples per cluster)"
    ]


def problems(
    kind: str,
    *,
    gamma: float,
    k: float,
    num_clusters: int,
    clustering: str,
    global_batch_size: int | None = None,
    num_timesteps: int = 1000,
) -> list[str]:
    """Problems with a weighting section, each naming its field ([] if fine)."""
    out = choice_problems("kind", kind, KINDS) + choice_problems(
        "clustering", clustering, CLUSTERINGS
    )
    if kind in ("min_snr", "p2") and not gamma > 0:
        out.append(f"gamma={gamma} must be > 0 for kind {kind!r}")
    if kind == "p2" and not k >= 0:
        out.append(f"k={k} must be >= 0 for kind 'p2'")
    found = _num_clusters_problems(num_clusters, num_timesteps)
    if not found and kind == "uw" and global_batch_size is not None:
        found = _stratify_problems(num_clusters, "global_batch_size", global_batch_size)
    return out + found
