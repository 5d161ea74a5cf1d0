"""Coverage of bootstrap_ci: simulate many test sets from a known model, count how often the 95 % interval
holds the true value.

The design matches the bootstrap's: every (label, group) cell has a fixed size (150), and within a cell
scores are i.i.d. ``sigmoid(z)``, ``z ~ N(mu[group, label], 1)``. Predictions are ``score >= 0.5``, i.e.
``z >= 0``, so every cell's positive rate is ``Phi(mu)`` and the true metric values follow in closed form;
a within-group AUROC is ``Phi((mu_pos - mu_neg) / sqrt(2))``. 200 simulated sets x 200 resamples each
(fewer than the default 500, to stay fast; the percentile bounds then rest on the 5th and 195th draw).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm

from trainables.metrics import bootstrap_ci

CELL = 150
MU = {("a", 1): 1.0, ("a", 0): -1.0, ("b", 1): 0.4, ("b", 0): -0.8}  # a: privileged, better separated
PHI = {cell: norm.cdf(mu) for cell, mu in MU.items()}  # P(pred = 1 | cell)
TRUE = {
    "accuracy": (PHI["a", 1] + (1 - PHI["a", 0]) + PHI["b", 1] + (1 - PHI["b", 0])) / 4,
    "tpr_difference": PHI["b", 1] - PHI["a", 1],
    "worst_group_auroc": min(norm.cdf((MU["a", 1] - MU["a", 0]) / math.sqrt(2)),
                             norm.cdf((MU["b", 1] - MU["b", 0]) / math.sqrt(2))),
    "disparate_impact_deviation": abs(1 - (PHI["b", 1] + PHI["b", 0]) / (PHI["a", 1] + PHI["a", 0])),
}


def test_95_percent_intervals_cover_the_true_values():
    rng = np.random.default_rng(2024)
    cells = list(MU)
    y = np.concatenate([np.full(CELL, label) for _, label in cells])
    g = np.concatenate([np.full(CELL, group) for group, _ in cells])
    mu = np.concatenate([np.full(CELL, MU[cell]) for cell in cells])
    hits = {name: 0 for name in TRUE}
    n_sets = 200
    for i in range(n_sets):
        s = 1 / (1 + np.exp(-(mu + rng.standard_normal(len(mu)))))
        ci = bootstrap_ci(y, s, {"g": g}, primary="g", metrics=list(TRUE), n_resamples=200, seed=i,
                          privileged={"g": "a"})
        for name, truth in TRUE.items():
            hits[name] += ci[name][0] <= truth <= ci[name][1]
    coverage = {name: h / n_sets for name, h in hits.items()}
    assert all(0.90 <= c <= 0.99 for c in coverage.values()), coverage
