"""Small exact statistics shared by the detectors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.stats as sps


def fit_temperature(logits: np.ndarray, y: np.ndarray, grid: Sequence[float]) -> float:
    """The scale ``t`` of ``grid`` whose ``softmax(logits * t)`` gives the held-out labels ``y``
    the best log-likelihood (a grid search: deterministic, no optimiser tolerance)."""
    best_t, best_ll = 1.0, np.inf
    rows = np.arange(len(y))
    for t in grid:
        z = logits * t
        z = z - z.max(axis=1, keepdims=True)
        ll = -(z[rows, y] - np.log(np.exp(z).sum(axis=1))).mean()
        if ll < best_ll - 1e-12:
            best_t, best_ll = float(t), ll
    return best_t


def poisson_binomial_log10_sf(p: np.ndarray, a: int) -> float:
    """log10 P(X >= a) for X = sum of independent Bernoulli(p_i): exact up to 3,000 terms
    (rescaled dynamic programme), normal approximation beyond."""
    k = len(p)
    if a <= 0:
        return 0.0
    if a > k:
        return -np.inf
    if k > 3000:
        mu = p.sum()
        sd = math.sqrt(max((p * (1 - p)).sum(), 1e-12))
        return float(sps.norm.logsf((a - 0.5 - mu) / sd)) / math.log(10)
    # dist[m] = P(m successes so far) for m < a; dist[a] absorbs every count >= a (O(k a), not O(k^2))
    dist = np.zeros(a + 1)
    dist[0] = 1.0
    scale = 0.0
    for pi in p:
        top = dist[a] + dist[a - 1] * pi
        dist[1:a] = dist[1:a] * (1 - pi) + dist[0:a - 1] * pi
        dist[0] *= (1 - pi)
        dist[a] = top
        m = dist.max()
        if 0 < m < 1e-200:
            dist /= m
            scale += math.log10(m)
    tail = dist[a]
    if tail <= 0:
        return -300.0
    return math.log10(tail) + scale
