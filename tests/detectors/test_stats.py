"""Shared exact statistics: the Poisson-binomial tail against brute-force enumeration."""

from __future__ import annotations

import itertools
import math

import numpy as np

from poisonguard.detectors._stats import fit_temperature, poisson_binomial_log10_sf


def test_poisson_binomial_tail_matches_enumeration():
    rng = np.random.default_rng(0)
    for k in (1, 3, 7):
        p = rng.random(k)
        for a in range(k + 1):
            exact = sum(math.prod(p[i] if b else 1 - p[i] for i, b in enumerate(bits))
                        for bits in itertools.product((0, 1), repeat=k) if sum(bits) >= a)
            assert math.isclose(poisson_binomial_log10_sf(p, a), math.log10(exact), abs_tol=1e-9)
    assert poisson_binomial_log10_sf(np.array([0.5, 0.5]), 3) == -np.inf
    # far tails do not underflow to "impossible": 40 of 2,000 rare events, Poisson(2) ~ 10^-36.9
    assert -38 < poisson_binomial_log10_sf(np.full(2000, 1e-3), 40) < -35


def test_fit_temperature_picks_the_scale_that_fits():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4000, 2)) * 4
    probs = 1 / (1 + np.exp(-(logits[:, 1] - logits[:, 0]) * 0.5))   # the truth is temperature 0.5
    y = (rng.random(4000) < probs).astype(int)
    assert fit_temperature(logits, y, (0.1, 0.25, 0.5, 1.0, 2.0)) == 0.5
