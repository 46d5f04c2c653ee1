"""Sample-quality metrics on Inception features: FID, Inception Score, improved precision/recall.

Pure numpy/scipy in float64. Feature extraction lives in :mod:`dtr_jax.models.inception`
(``pool`` features for FID and precision/recall, ``logits`` for IS).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable

import numpy as np
from scipy import linalg, special


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``np.cov``, unbiased) of (N, D) features, float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N>=2, D), got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def streamed_stats(chunks: Callable[[], Iterable[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """`stats` of the rows of the (n_i, D) arrays that each call of `chunks()` yields, with
    one of them in memory at a time: two passes (the mean, then the centred products),
    in float64, as ``np.cov`` computes them."""
    n, total = 0, 0.0
    for f in chunks():
        total = total + np.asarray(f, np.float64).sum(axis=0)
        n += len(f)
    if n < 2:
        raise ValueError(f"statistics need at least 2 rows, got {n}")
    mu, scatter = total / n, 0.0
    for f in chunks():
        centred = np.asarray(f, np.float64) - mu
        scatter = scatter + centred.T @ centred
    return mu, scatter / (n - 1)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}), as pytorch-fid.

    If ``sqrtm(S1 S2)`` is not finite, ``eps * I`` is added to both covariances; a
    complex result is accepted (real part kept) only if its diagonal's imaginary
    part is within 1e-3 of 0, else ``ValueError``.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            warnings.warn(
                f"FID: singular product; adding {eps} to the covariance diagonals", stacklevel=2
            )
            offset = np.eye(len(s1)) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def _as_probs(x: np.ndarray, from_logits: bool | None) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if from_logits is None:  # probabilities iff non-negative rows summing to 1
        from_logits = not (x.min() >= 0 and np.allclose(x.sum(axis=1), 1.0, atol=1e-4))
    return special.softmax(x, axis=1) if from_logits else x


def inception_score(
    logits_or_probs: np.ndarray, splits: int = 10, from_logits: bool | None = None
) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))``: (mean, std) over ``splits`` chunks.

    As improved-GAN / TTUR / ADM: consecutive equal chunks, p(y) = chunk mean
    (ADM uses 5000-sample chunks, i.e. ``splits=10`` for 50K samples, and reports
    the mean). Input (N, C): softmax probabilities, or logits (softmax applied).
    ``from_logits=None`` guesses: rows that are non-negative and sum to 1 are probs.
    ``0 log 0 = 0``. To match ADM's evaluator exactly, pass logits computed
    *without* the fc bias (``make_feature_fn(..., fc_bias=False)``).
    """
    p = _as_probs(logits_or_probs, from_logits)
    n = len(p)
    if not 1 <= splits <= n:
        raise ValueError(f"need 1 <= splits <= N, got splits={splits}, N={n}")
    scores = []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        py = part.mean(axis=0, keepdims=True)
        kl = special.rel_entr(part, py).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (len(a), len(b)), clamped at 0."""
    d = (a * a).sum(axis=1)[:, None] - 2.0 * (a @ b.T) + b_sq[None, :]
    return np.maximum(d, 0.0)


def knn_radii(features: np.ndarray, k: int = 3, batch: int = 5000) -> np.ndarray:
    """Squared distance of each point to its k-th nearest neighbour (the point itself excluded).

    As ADM's ManifoldEstimator: the (k+1)-th smallest distance, self (0) counting as
    the first. Blocked: memory O(batch^2), never O(N^2).
    """
    f = np.asarray(features, np.float64)
    if not 1 <= k < len(f):
        raise ValueError(f"need 1 <= k < N, got k={k}, N={len(f)}")
    sq = (f * f).sum(axis=1)
    radii = np.empty(len(f))
    for r in range(0, len(f), batch):
        best = np.full((min(batch, len(f) - r), 0), np.inf)
        for c in range(0, len(f), batch):
            block = _sq_dists(f[r : r + batch], f[c : c + batch], sq[c : c + batch])
            d = np.concatenate([best, block], axis=1)
            best = np.partition(d, k, axis=1)[:, : k + 1] if d.shape[1] > k + 1 else d
        radii[r : r + batch] = np.sort(best, axis=1)[:, k]
    return radii


def _coverage(points: np.ndarray, manifold: np.ndarray, radii: np.ndarray, batch: int) -> float:
    """Fraction of ``points`` within some ball (squared radius ``radii``) around ``manifold``."""
    inside = np.zeros(len(points), bool)
    m_sq = (manifold * manifold).sum(axis=1)
    for r in range(0, len(points), batch):
        for c in range(0, len(manifold), batch):
            d = _sq_dists(points[r : r + batch], manifold[c : c + batch], m_sq[c : c + batch])
            inside[r : r + batch] |= (d <= radii[None, c : c + batch]).any(axis=1)
    return float(inside.mean())


def precision_recall(
    real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, batch: int = 5000
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), as ADM's evaluator.

    Precision: fraction of fake samples inside the k-NN ball of some real sample;
    recall: fraction of real samples inside the k-NN ball of some fake sample
    (``<=``, squared Euclidean distances, float64). ``batch`` bounds the distance
    blocks (batch x batch float64), so 50K x 50K never allocates N^2.
    """
    real = np.asarray(real_features, np.float64)
    fake = np.asarray(fake_features, np.float64)
    real_radii, fake_radii = knn_radii(real, k, batch), knn_radii(fake, k, batch)
    precision = _coverage(fake, real, real_radii, batch)
    recall = _coverage(real, fake, fake_radii, batch)
    return precision, recall


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Save FID statistics to ``path`` (as is, no suffix added): ``.npz`` with ``mu``, ``sigma``."""
    with open(path, "wb") as f:
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load ``(mu, sigma)`` from an ``.npz`` written by :func:`save_stats` (or ADM/pytorch-fid)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID statistics not found at {os.fspath(path)}")
    with np.load(path) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise ValueError(f"{os.fspath(path)} lacks keys 'mu'/'sigma' (has {data.files})")
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
