"""Pareto logic against brute force on random points (ties, duplicates, NaN) and hand-computed cases."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from orchestrator.pareto import BudgetError, constrained_best, hypervolume, pareto_mask
from trainables.errors import UserError

DIRECTION_SETS = [("max", "min"), ("min", "min"), ("max", "max"), ("min", "max")]


def _to_min(pts, directions):
    return np.asarray(pts, dtype=float) * np.array([-1.0 if d == "max" else 1.0 for d in directions])


def brute_mask(pts, directions):
    """O(n^2) definition: i is on the front iff no valid j is <= in every objective and < in one."""
    p = _to_min(pts, directions)
    ok = ~np.isnan(p).any(axis=1)
    out = np.zeros(len(p), dtype=bool)
    for i in range(len(p)):
        if ok[i]:
            out[i] = not any(ok[j] and (p[j] <= p[i]).all() and (p[j] < p[i]).any() for j in range(len(p)) if j != i)
    return out


def random_points(seed, n, m, integer):
    rng = np.random.default_rng(seed)
    pts = rng.integers(0, 5, (n, m)).astype(float) if integer else rng.random((n, m))
    pts[rng.random(n) < 0.08, rng.integers(0, m)] = np.nan
    return pts


@pytest.mark.parametrize("seed, m, integer", list(itertools.product(range(5), [1, 2, 3, 4], [True, False])))
@pytest.mark.parametrize("directions", DIRECTION_SETS)
def test_mask_matches_brute_force(seed, m, integer, directions):
    pts = random_points(seed, 50, m, integer)
    dirs = (directions * 2)[:m]
    mask = pareto_mask(pts, dirs)
    assert mask.dtype == bool and mask.shape == (50,)
    assert (mask == brute_mask(pts, dirs)).all()


def test_integer_points_have_ties_and_duplicates():
    pts = random_points(0, 50, 2, True)
    valid = pts[~np.isnan(pts).any(axis=1)]
    assert len(np.unique(valid, axis=0)) < len(valid)  # the brute-force comparison above did see duplicates


def test_duplicates_share_the_front():
    pts = [[0.9, 0.1], [0.9, 0.1], [0.8, 0.2], [0.8, 0.2], [0.9, 0.3]]
    assert pareto_mask(pts, ["max", "min"]).tolist() == [True, True, False, False, False]
    # same first objective: only the better second one is on the front
    assert pareto_mask([[1, 5], [1, 3], [1, 3]], ["min", "min"]).tolist() == [False, True, True]


def test_nan_rows_never_on_front_and_never_dominate():
    pts = [[np.nan, 0.0], [0.5, 0.5], [1.0, np.nan], [0.4, 0.3]]  # a NaN row would dominate if it counted
    assert pareto_mask(pts, ["max", "min"]).tolist() == [False, True, False, True]
    assert pareto_mask([[np.nan, np.nan]], ["max", "min"]).tolist() == [False]
    assert pareto_mask([[np.nan, 1.0]], ["max", "min"]).tolist() == [False]


def test_infinite_values_are_ordinary_numbers():
    pts = [[np.inf, 5.0], [1.0, 1.0], [2.0, -np.inf], [np.inf, 6.0]]
    for dirs in DIRECTION_SETS:
        assert (pareto_mask(pts, dirs) == brute_mask(np.array(pts), dirs)).all()
    p = np.array([[np.inf, 0, 0], [1, 0, 0], [np.inf, 0, 0]])
    assert pareto_mask(p, ["max"] * 3).tolist() == [True, False, True]
    assert pareto_mask(p, ["min"] * 3).tolist() == [False, True, False]


def test_empty_input():
    for m in (2, 3):
        assert pareto_mask(np.zeros((0, m)), ["max"] * m).tolist() == []
        assert hypervolume(np.zeros((0, m)), ["max"] * m, [0] * m) == 0.0
    assert pareto_mask([], ["max", "min"]).tolist() == []
    assert constrained_best(np.zeros((0, 2)), ["max", "min"], max_drop=0.1) is None


def test_validation_names_the_problem():
    with pytest.raises(ValueError, match=r"directions\[1\] = 'up'; use 'max' or 'min'"):
        pareto_mask([[1, 2]], ["max", "up"])
    with pytest.raises(ValueError, match=r"2 objective columns but 1 directions \['max'\]"):
        pareto_mask([[1, 2]], ["max"])
    with pytest.raises(ValueError, match="got the string 'maxmin'"):
        pareto_mask([[1, 2]], "maxmin")
    with pytest.raises(ValueError, match=r"must be a 2-D array .* got shape \(2,\)"):
        pareto_mask([1, 2], ["max", "min"])
    with pytest.raises(ValueError, match=r"must be a 2-D array .* got shape \(1, 1, 2\)"):
        hypervolume([[[1, 2]]], ["max", "min"], [0, 0])
    with pytest.raises(ValueError, match="reference must be 2 finite numbers"):
        hypervolume([[1, 2]], ["max", "min"], [0, 1, 2])
    with pytest.raises(ValueError, match="reference must be 2 finite numbers"):
        hypervolume([[1, 2]], ["max", "min"], [0, np.nan])


def test_two_objectives_on_many_points():
    rng = np.random.default_rng(0)
    pts = rng.random((200_000, 2))
    mask = pareto_mask(pts, ["max", "min"])
    small = pts[:400]
    assert (pareto_mask(small, ["max", "min"]) == brute_mask(small, ["max", "min"])).all()
    assert 0 < mask.sum() < 100


def test_hypervolume_hand_computed():
    # maximise accuracy, minimise gap; reference (0, 1). Points (0.9, 0.5), (0.6, 0.2); (0.5, 0.6) is dominated.
    # union of [0,0.9]x[0.5,1] (0.45) and [0,0.6]x[0.2,1] (0.48) minus overlap [0,0.6]x[0.5,1] (0.3) = 0.63
    pts = [[0.9, 0.5], [0.6, 0.2], [0.5, 0.6]]
    assert hypervolume(pts, ["max", "min"], [0.0, 1.0]) == pytest.approx(0.63)
    # duplicates, NaN rows and points not strictly inside the reference box change nothing
    more = pts + [[0.9, 0.5], [np.nan, 0.0], [0.95, 1.0], [0.0, 0.1], [-0.2, 0.0]]
    assert hypervolume(more, ["max", "min"], [0.0, 1.0]) == pytest.approx(0.63)
    # the same points mirrored into (min, max) give the same volume
    mirrored = [[-a, -b] for a, b in pts]
    assert hypervolume(mirrored, ["min", "max"], [0.0, -1.0]) == pytest.approx(0.63)
    # one objective: the distance from the best value to the reference
    assert hypervolume([[0.2], [0.7], [np.nan]], ["max"], [0.1]) == pytest.approx(0.6)
    assert hypervolume([[0.2]], ["min"], [0.1]) == 0.0
    # 3-D: two boxes [0,2]^3 (8) and [0,1]x[0,1]x[0,3] (3) overlapping in [0,1]x[0,1]x[0,2] (2): 9
    assert hypervolume([[2, 2, 2], [1, 1, 3]], ["max"] * 3, [0, 0, 0]) == pytest.approx(9.0)


def _grid_hypervolume(pts, ref):
    """Exact volume for integer minimisation points and reference: count dominated unit cells."""
    if len(pts) == 0:
        return 0.0
    cells = itertools.product(*[range(int(pts.min()), int(r)) for r in ref])
    # the unit cell [c, c + 1] is dominated iff some point is <= its lower corner c
    return float(sum(bool((pts <= np.array(c)).all(axis=1).any()) for c in cells))


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("seed", range(4))
def test_hypervolume_exact_on_integer_grids(m, seed):
    rng = np.random.default_rng(seed)
    pts = rng.integers(0, 6, (12, m)).astype(float)
    ref = np.full(m, 5.0)
    inside = pts[(pts < ref).all(axis=1)]
    want = _grid_hypervolume(inside, ref)
    assert hypervolume(pts, ["min"] * m, ref) == pytest.approx(want)
    dirs = ["max"] * m  # mirrored: maximise -x against -ref
    assert hypervolume(-pts, dirs, -ref) == pytest.approx(want)


def test_hypervolume_against_monte_carlo():
    rng = np.random.default_rng(0)
    pts = rng.random((15, 2))
    samples = rng.random((200_000, 2))
    dominated = ((samples[:, None, 0] <= pts[None, :, 0]) & (samples[:, None, 1] >= pts[None, :, 1])).any(axis=1)
    assert hypervolume(pts, ["max", "min"], [0.0, 1.0]) == pytest.approx(dominated.mean(), abs=0.005)
    three = rng.random((10, 3))
    mc = rng.random((100_000, 3))
    dom3 = (mc[:, None, :] >= three[None]).all(axis=2).any(axis=1)
    assert hypervolume(three, ["min"] * 3, [1, 1, 1]) == pytest.approx(dom3.mean(), abs=0.01)




def brute_constrained(pts, directions, performance_col, drop, rel):
    p = _to_min(pts, directions)
    valid = [i for i in range(len(p)) if not np.isnan(p[i]).any()]
    if not valid:
        return None
    best = min(p[i, performance_col] for i in valid)
    budget = drop if drop is not None else abs(best) * rel
    fair_col = 1 - performance_col
    eligible = [i for i in valid if p[i, performance_col] <= best + budget + 1e-9]
    return min(eligible, key=lambda i: (p[i, fair_col], p[i, performance_col], i))


def test_constrained_best_against_brute_force():
    rng = np.random.default_rng(3)
    for trial in range(40):
        pts = np.round(rng.random((30, 2)), 1)  # one decimal: ties in both columns
        pts[rng.random(30) < 0.1, rng.integers(0, 2)] = np.nan
        dirs = DIRECTION_SETS[trial % 4]
        col = trial % 2
        for drop in (0.0, 0.1, 0.3):
            assert constrained_best(pts, dirs, performance_col=col, max_drop=drop) == \
                brute_constrained(pts, dirs, col, drop, None)
        for rel in (0.0, 0.125, 0.5):
            assert constrained_best(pts, dirs, performance_col=col, max_rel_drop=rel) == \
                brute_constrained(pts, dirs, col, None, rel)


def test_constrained_best_hand_cases():
    # best accuracy 0.9; within 0.1: rows 0, 1, 3 (0.8 is on the boundary: admitted despite 0.9 - 0.1 rounding)
    pts = [[0.9, 0.30], [0.8, 0.10], [0.7, 0.00], [0.85, 0.10]]
    assert constrained_best(pts, ["max", "min"], max_drop=0.1) == 3  # gap tie 0.10: better accuracy wins
    assert constrained_best(pts, ["max", "min"], max_drop=0.05) == 3  # 0.85 sits on the boundary
    assert constrained_best(pts, ["max", "min"], max_drop=0.04) == 0
    assert constrained_best(pts, ["max", "min"], max_drop=0.2) == 2
    assert constrained_best([[1.0, 0.5], [0.5, 0.1]], ["max", "min"], max_rel_drop=0.5) == 1
    assert constrained_best([[1.0, 0.5], [0.5, 0.1]], ["max", "min"], max_rel_drop=0.4) == 0
    assert constrained_best([[0.5, 0.1], [0.5, 0.1]], ["max", "min"], max_drop=0.0) == 0  # full tie -> lower index
    # fairness in column 0, performance (a loss, minimised) in column 1
    assert constrained_best([[0.2, 1.0], [0.1, 1.2], [0.0, 2.0]], ["min", "min"], performance_col=1,
                            max_drop=0.25) == 1
    assert constrained_best([[np.nan, 0.1]], ["max", "min"], max_drop=0.1) is None


def test_constrained_best_validation():
    """A bad budget is the user's to fix (BudgetError, a UserError: the CLI exits 2); a malformed array or
    column index is a caller's bug and stays a plain ValueError."""
    pts = [[0.9, 0.1]]
    with pytest.raises(BudgetError, match="exactly one of max_drop"):
        constrained_best(pts, ["max", "min"])
    with pytest.raises(BudgetError, match="exactly one of max_drop"):
        constrained_best(pts, ["max", "min"], max_drop=0.1, max_rel_drop=0.1)
    with pytest.raises(BudgetError, match="max_drop = -0.1; use a finite number >= 0"):
        constrained_best(pts, ["max", "min"], max_drop=-0.1)
    with pytest.raises(BudgetError, match="max_rel_drop = nan"):
        constrained_best(pts, ["max", "min"], max_rel_drop=float("nan"))
    assert issubclass(BudgetError, UserError) and issubclass(BudgetError, ValueError)
    with pytest.raises(ValueError, match="performance_col = 2") as info:
        constrained_best(pts, ["max", "min"], performance_col=2, max_drop=0.1)
    assert not isinstance(info.value, UserError)
    with pytest.raises(ValueError, match="two columns .* got 3"):
        constrained_best([[0.9, 0.1, 0.2]], ["max", "min", "min"], max_drop=0.1)


@pytest.mark.parametrize("n_obj", [2, 3])
def test_hypervolume_agrees_with_optunas(n_obj):
    """Our 2-D sweep (and the 3-D path through Optuna) against Optuna's own WFG on random sets, with
    mixed directions converted by hand to Optuna's all-minimise convention."""
    from optuna._hypervolume import compute_hypervolume

    rng = np.random.default_rng(n_obj)
    directions = ["max", "min", "min"][:n_obj]
    sign = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    for _ in range(25):
        pts = rng.random((int(rng.integers(1, 40)), n_obj))
        reference = np.array([0.0, 1.0, 1.0][:n_obj])
        inside = pts[(pts * sign < reference * sign).all(axis=1)] * sign
        want = compute_hypervolume(inside, reference * sign) if len(inside) else 0.0
        assert hypervolume(pts, directions, reference) == pytest.approx(want, rel=1e-9, abs=1e-12)
