"""An offline evaluator for the digits default: nothing to download.

A small MLP classifier, trained deterministically on the digits training
split, gives (a) the accuracy of class-conditional samples (the fraction it
classifies as the requested digit) and (b) a Fréchet distance in its
penultimate feature space against the held-out real test digits.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dtr_jax import metrics
from dtr_jax.data.sources import digits_split


class DigitsMLP(nn.Module):
    features: int = 64

    @nn.compact
    def __call__(self, x):
        h = x.reshape(x.shape[0], -1)
        h = nn.relu(nn.Dense(256, name="hidden_0")(h))
        feats = nn.relu(nn.Dense(self.features, name="hidden_1")(h))
        return nn.Dense(10, name="logits")(feats), feats


@dataclasses.dataclass(frozen=True)
class DigitsEvaluator:
    """Classifier params and the feature statistics of the real test split."""

    params: dict
    test_accuracy: float
    mu: np.ndarray
    sigma: np.ndarray

    def __call__(self, images, labels=None) -> dict:
        """{'accuracy' (if labels), 'fd'} of samples (uint8 0..255 or floats in [-1, 1])."""
        logits, feats = _classify(self.params, images)
        out = {"fd": metrics.frechet_distance(*metrics.stats(feats), self.mu, self.sigma)}
        if labels is not None:
            out["accuracy"] = float(np.mean(logits.argmax(-1) == np.asarray(labels)))
        return out


@jax.jit
def _forward(params, x):
    return DigitsMLP().apply({"params": params}, x)


def _classify(params, images) -> tuple[np.ndarray, np.ndarray]:
    """(logits, penultimate features) of images, in batches of 1024."""
    x = _as_unit_range(images)
    logits, feats = [], []
    for i in range(0, len(x), 1024):
        lo, fe = _forward(params, jnp.asarray(x[i : i + 1024]))
        logits.append(np.asarray(lo))
        feats.append(np.asarray(fe))
    return np.concatenate(logits), np.concatenate(feats)


def _as_unit_range(images) -> np.ndarray:
    """uint8 (0..255) or float ([-1, 1]) images -> float32 in [-1, 1], shape (N, 8, 8, 1)."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 127.5 - 1.0
    x = x.astype(np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[1:] != (8, 8, 1):
        raise ValueError(f"digits evaluator takes 8x8x1 images, got shape {x.shape}")
    return x


def train_evaluator(seed: int = 0, steps: int = 400) -> DigitsEvaluator:
    """Trains the classifier (full batch, deterministic on CPU) in a few seconds."""
    train, test = digits_split("train"), digits_split("test")
    model = DigitsMLP()
    params = model.init(jax.random.key(seed), train.images[:1])["params"]
    tx = optax.adamw(3e-3, weight_decay=1e-4)
    x, y = jnp.asarray(train.images), jnp.asarray(train.labels)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    logits, feats = _classify(params, test.images)
    mu, sigma = metrics.stats(feats)
    accuracy = float(np.mean(logits.argmax(-1) == test.labels))
    return DigitsEvaluator(params, accuracy, mu, sigma)
