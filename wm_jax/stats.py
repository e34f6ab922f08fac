"""Small shared math: the reparameterised Gaussian sample, masked means, AUC and correlation.

Numbers every component needs, written once (no model code here: it imports nothing of wm_jax).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def gaussian_sample(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """z ~ N(mean, exp(logvar)) by reparameterisation (Kingma & Welling 2014, eq. 10)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def masked_mean(x: jax.Array, m: jax.Array) -> jax.Array:
    """Mean of x where the mask m (bool or 0/1) is set; 0 when nothing is. where(), not x * m: a NaN
    in a masked slot must not leak in."""
    return jnp.sum(jnp.where(m > 0, x, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting half."""
    pos, neg = np.asarray(pos, np.float64).ravel(), np.asarray(neg, np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    neg = np.sort(neg)
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float(np.mean(below + 0.5 * ties) / neg.size)


def correlation(xs: list[float], ys: list[float]) -> float:
    """Pearson correlation; NaN when fewer than 3 points or a constant series."""
    x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    if x.size < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])
