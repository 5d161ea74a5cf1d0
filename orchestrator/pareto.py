"""Pure multi-objective logic over plain arrays: fronts, hypervolume, constrained best.

No MLflow, no Ray: the tracker and the queries pass in numbers and directions ("max"/"min" per
column), so this logic is tested on its own. Internally every objective is turned into
minimisation. A row with any NaN (a failed or unfinished trial) is never on the front and never
dominates another row; identical rows do not dominate each other, so duplicates are on the front together.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from trainables.errors import UserError

__all__ = ["pareto_mask", "hypervolume", "constrained_best", "check_budget", "BudgetError"]

_CHUNK_ELEMENTS = 4_000_000  # bounds the pairwise comparison blocks of the m > 2 fallback to a few MB


class BudgetError(UserError, ValueError):
    """A performance budget that is missing, given twice, negative or not finite (the message names it)."""


def _as_min(values: Any, directions: Sequence[str]) -> np.ndarray:
    """``values`` as an (n, m) float array in which smaller is better in every column."""
    if isinstance(directions, str):
        raise ValueError(f"directions must be a sequence with one 'max'/'min' per column; got the string "
                         f"{directions!r}; write e.g. ['max', 'min']")
    directions = list(directions)
    for i, d in enumerate(directions):
        if d not in ("max", "min"):
            raise ValueError(f"directions[{i}] = {d!r}; use 'max' or 'min'")
    if not directions:
        raise ValueError("directions is empty; give one 'max'/'min' per objective column")
    arr = np.asarray(values, dtype=float)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, len(directions))
    if arr.ndim != 2:
        raise ValueError(f"values must be a 2-D array (points x objectives); got shape {arr.shape}; "
                         f"reshape a single point to (1, m)")
    if arr.shape[1] != len(directions):
        raise ValueError(f"{arr.shape[1]} objective columns but {len(directions)} directions {directions}; "
                         f"give one direction per column")
    sign = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    return arr * sign


def _front_2d(p: np.ndarray) -> np.ndarray:
    """Non-dominated rows of NaN-free (k, 2) minimisation points, by one sort: O(k log k).

    After sorting by (f0, f1), a point is dominated iff a point with a strictly smaller f0 has
    f1 <= its f1, or a point with the same f0 has a strictly smaller f1.
    """
    k = len(p)
    order = np.lexsort((p[:, 1], p[:, 0]))
    f0, f1 = p[order, 0], p[order, 1]
    starts = np.flatnonzero(np.r_[True, f0[1:] != f0[:-1]])  # first row of each equal-f0 block
    block = np.cumsum(np.r_[True, f0[1:] != f0[:-1]]) - 1
    block_min = f1[starts]  # sorted by f1 inside a block
    best_before = np.minimum.accumulate(f1)[np.maximum(starts - 1, 0)]  # best f1 with strictly smaller f0
    first_block = block == 0
    keep_sorted = (f1 == block_min[block]) & (first_block | (f1 < best_before[block]))
    keep = np.empty(k, dtype=bool)
    keep[order] = keep_sorted
    return keep


def _front_generic(p: np.ndarray) -> np.ndarray:
    """Non-dominated rows of NaN-free (k, m) minimisation points by pairwise comparison: O(k^2 m)."""
    k, m = p.shape
    dominated = np.zeros(k, dtype=bool)
    step = max(1, _CHUNK_ELEMENTS // max(1, k * m))
    for start in range(0, k, step):
        q = p[start:start + step, None, :]  # candidates (c, 1, m) against every point (1, k, m)
        weakly = (p[None, :, :] <= q).all(axis=2)
        strictly = (p[None, :, :] < q).any(axis=2)
        dominated[start:start + step] = (weakly & strictly).any(axis=1)
    return ~dominated


def _mask_min(pts: np.ndarray) -> np.ndarray:
    """Front mask of minimisation points; NaN rows are False and take no part."""
    valid = ~np.isnan(pts).any(axis=1)
    mask = np.zeros(len(pts), dtype=bool)
    idx = np.flatnonzero(valid)
    if idx.size:
        p = pts[idx]
        mask[idx] = _front_2d(p) if p.shape[1] == 2 else _front_generic(p)
    return mask


def pareto_mask(values: Any, directions: Sequence[str]) -> np.ndarray:
    """True for rows no other row dominates.

    ``values`` is (n, m); ``directions`` gives 'max' or 'min' per column. Duplicates are all kept;
    NaN rows are never on the front. O(n log n) for two objectives, O(n^2) beyond.
    """
    return _mask_min(_as_min(values, directions))


def hypervolume(values: Any, directions: Sequence[str], reference: Sequence[float]) -> float:
    """Volume dominated by the points and bounded by ``reference`` (given in the original units).

    A point contributes only if it is strictly better than the reference in every objective; NaN
    rows contribute nothing. Exact sweep for one and two objectives; Optuna's exact (WFG) algorithm
    for more.
    """
    pts = _as_min(values, directions)
    ref_raw = np.asarray(reference, dtype=float)
    if ref_raw.shape != (pts.shape[1],) or not np.isfinite(ref_raw).all():
        raise ValueError(f"reference must be {pts.shape[1]} finite numbers, one per objective, in the original "
                         f"units; got {reference!r}")
    ref = _as_min(ref_raw[None, :], directions)[0]
    pts = pts[~np.isnan(pts).any(axis=1)]
    pts = pts[(pts < ref).all(axis=1)]
    if len(pts) == 0:
        return 0.0
    front = np.unique(pts[_mask_min(pts)], axis=0)  # sorted by f0; on a 2-D front f1 then strictly falls
    m = front.shape[1]
    if m == 1:
        return float(ref[0] - front[0, 0])
    if m == 2:
        upper = np.r_[ref[1], front[:-1, 1]]
        return float(np.sum((ref[0] - front[:, 0]) * (upper - front[:, 1])))
    try:
        from optuna._hypervolume import compute_hypervolume  # Optuna: only 3+ objectives
    except ImportError as exc:  # a private Optuna module; its path may change between releases
        raise NotImplementedError(f"hypervolume for {m} objectives needs optuna._hypervolume.compute_hypervolume, "
                                  f"which this Optuna does not provide ({exc}); use two objectives or pin "
                                  f"an Optuna that has it") from None
    return float(compute_hypervolume(front, ref, assume_pareto=True))


def check_budget(max_drop: float | None, max_rel_drop: float | None) -> None:
    """Exactly one performance budget, finite and >= 0; ``BudgetError`` naming the bad one otherwise."""
    if (max_drop is None) == (max_rel_drop is None):
        raise BudgetError(f"give exactly one of max_drop (absolute) or max_rel_drop (relative); got "
                          f"max_drop={max_drop!r}, max_rel_drop={max_rel_drop!r}")
    name, value = ("max_drop", max_drop) if max_drop is not None else ("max_rel_drop", max_rel_drop)
    if not np.isfinite(value) or value < 0:
        raise BudgetError(f"{name} = {value!r}; use a finite number >= 0")


def constrained_best(values: Any, directions: Sequence[str], *, performance_col: int = 0,
                     max_drop: float | None = None, max_rel_drop: float | None = None) -> int | None:
    """Row index of the fairest row among those whose performance is within a budget of the best.

    ``values`` has two columns, performance (``performance_col``) and fairness (the other one).
    Give exactly one budget: ``max_drop`` (absolute, in the performance's units) or ``max_rel_drop``
    (a fraction of |best performance|). The budget boundary is inclusive, with a 1e-12 relative
    tolerance so that e.g. 0.9 - 0.1 admits 0.8. Ties go to better performance, then the lower index.
    NaN rows are excluded; None when no row is left.
    """
    pts = _as_min(values, directions)
    if pts.shape[1] != 2:
        raise ValueError(f"constrained_best takes two columns (performance and fairness); got {pts.shape[1]}")
    if performance_col not in (0, 1):
        raise ValueError(f"performance_col = {performance_col!r}; use 0 or 1 (fairness is the other column)")
    check_budget(max_drop, max_rel_drop)
    valid = np.flatnonzero(~np.isnan(pts).any(axis=1))
    if valid.size == 0:
        return None
    perf = pts[valid, performance_col]  # minimisation form: smaller is better
    fair = pts[valid, 1 - performance_col]
    best = perf.min()
    budget = max_drop if max_drop is not None else abs(best) * max_rel_drop
    limit = best + budget
    eligible = perf <= limit + 1e-12 * max(1.0, abs(limit))
    cand = valid[eligible]
    order = np.lexsort((cand, perf[eligible], fair[eligible]))  # last key sorts first
    return int(cand[order[0]])
