"""Pareto logic against brute force on random points (ties, duplicates, NaN)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from orchestrator.pareto import constrained_best, hypervolume, knee_index, pareto_mask, pareto_ranks


def brute_mask(pts, directions):
    sign = np.array([-1 if d == "max" else 1 for d in directions])
    p = pts * sign
    ok = ~np.isnan(p).any(axis=1)
    out = []
    for i in range(len(p)):
        if not ok[i]:
            out.append(False); continue
        dominated = any(ok[j] and (p[j] <= p[i]).all() and (p[j] < p[i]).any() for j in range(len(p)) if j != i)
        out.append(not dominated)
    return np.array(out, dtype=bool)


@pytest.mark.parametrize("seed, m, integer", list(itertools.product(range(6), [2, 3], [True, False])))
@pytest.mark.parametrize("directions", [("max", "min"), ("min", "min"), ("max", "max")])
def test_mask_and_ranks_match_brute_force(seed, m, integer, directions):
    rng = np.random.default_rng(seed)
    pts = rng.integers(0, 5, (60, m)).astype(float) if integer else rng.random((60, m))
    pts[rng.random(60) < 0.05, 0] = np.nan
    dirs = (directions + ("min",))[:m]
    assert (pareto_mask(pts, dirs) == brute_mask(pts, dirs)).all()
    ranks = pareto_ranks(pts, dirs)
    remaining = ~np.isnan(pts).any(axis=1)
    assert (ranks[~remaining] == -1).all()
    r = 0
    while remaining.any():
        idx = np.flatnonzero(remaining)
        front = idx[brute_mask(pts[idx], dirs)]
        assert (ranks[front] == r).all()
        remaining[front] = False
        r += 1


def test_duplicates_all_on_front_and_empty_input():
    pts = [[0.9, 0.1], [0.9, 0.1], [0.8, 0.2]]
    assert pareto_mask(pts, ["max", "min"]).tolist() == [True, True, False]
    assert pareto_mask(np.zeros((0, 2)), ["max", "min"]).tolist() == []


def test_bad_directions():
    with pytest.raises(ValueError, match=r"directions\[1\] = 'up'"):
        pareto_mask([[1, 2]], ["max", "up"])
    with pytest.raises(ValueError, match="2 objective columns but 1"):
        pareto_mask([[1, 2]], ["max"])


def test_hypervolume_hand_computed_and_monte_carlo():
    # maximise accuracy, minimise gap; reference (0, 1). Points (0.9, 0.5), (0.6, 0.2):
    # union of [0,0.9]x[0.5,1] (0.45) and [0,0.6]x[0.2,1] (0.48) minus overlap [0,0.6]x[0.5,1] (0.3) = 0.63
    pts = [[0.9, 0.5], [0.6, 0.2], [0.5, 0.6]]
    assert hypervolume(pts, ["max", "min"], [0.0, 1.0]) == pytest.approx(0.63)
    rng = np.random.default_rng(0)
    pts = rng.random((15, 2))
    samples = rng.random((200_000, 2))
    dominated = ((samples[:, None, 0] <= pts[None, :, 0]) & (samples[:, None, 1] >= pts[None, :, 1])).any(axis=1)
    assert hypervolume(pts, ["max", "min"], [0.0, 1.0]) == pytest.approx(dominated.mean(), abs=0.01)
    three = rng.random((10, 3))
    mc = rng.random((100_000, 3))
    dom3 = ((mc[:, None, :] >= three[None]).all(axis=2)).any(axis=1)
    assert hypervolume(three, ["min"] * 3, [1, 1, 1]) == pytest.approx(dom3.mean(), abs=0.01)


def test_knee_and_constrained_best_against_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(20):
        pts = np.round(rng.random((30, 2)), 1)
        mask = pareto_mask(pts, ["max", "min"])
        k = knee_index(pts, ["max", "min"])
        assert mask[k]
        for drop in (0.0, 0.1, 0.3):
            best = pts[:, 0].max()
            eligible = [i for i in range(30) if pts[i, 0] >= best - drop - 1e-12]
            want = min(eligible, key=lambda i: (pts[i, 1], -pts[i, 0], i))
            assert constrained_best(pts, ["max", "min"], max_drop=drop) == want
    assert constrained_best([[1.0, 0.5], [0.5, 0.1]], ["max", "min"], max_rel_drop=0.5) == 1
    assert constrained_best([[np.nan, 0.1]], ["max", "min"], max_drop=0.1) is None
    assert knee_index(np.zeros((0, 2)), ["max", "min"]) is None
