"""Pure multi-objective logic over plain arrays: fronts, ranks, hypervolume, knee, constrained best.

No MLflow, no Ray: the tracker and the queries pass in numbers and directions ("max"/"min" per
column). Internally every objective is turned into minimisation.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["pareto_mask", "pareto_ranks", "hypervolume", "knee_index", "constrained_best"]


def _as_min(values: object, directions: Sequence[str]) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, len(directions))
    if arr.ndim != 2:
        raise ValueError(f"values must be a 2-D array (points x objectives); got shape {arr.shape}")
    if arr.shape[1] != len(directions):
        raise ValueError(f"{arr.shape[1]} objective columns but {len(directions)} directions {list(directions)}")
    for i, d in enumerate(directions):
        if d not in ("max", "min"):
            raise ValueError(f"directions[{i}] = {d!r}; use 'max' or 'min'")
    sign = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    return arr * sign


def _mask_min(pts: np.ndarray) -> np.ndarray:
    """Non-dominated rows of a minimisation problem; NaN rows never on the front, never dominate."""
    n, m = pts.shape
    valid = ~np.isnan(pts).any(axis=1)
    mask = np.zeros(n, dtype=bool)
    idx = np.flatnonzero(valid)
    if idx.size == 0:
        return mask
    p = pts[idx]
    if m == 2:
        # sort by f0 then f1; a point is dominated iff some earlier point (in a strictly smaller f0
        # block, or equal f0 with smaller f1) has f1 <= its f1 with one strict inequality.
        order = np.lexsort((p[:, 1], p[:, 0]))
        best_f1 = np.inf  # best f1 among points with strictly smaller f0
        keep = np.zeros(len(p), dtype=bool)
        i = 0
        while i < len(order):
            j = i
            while j < len(order) and p[order[j], 0] == p[order[i], 0]:
                j += 1
            block = order[i:j]
            block_min = p[block, 1].min()
            for k in block:
                f1 = p[k, 1]
                keep[k] = f1 < best_f1 and f1 == block_min
            best_f1 = min(best_f1, block_min)
            i = j
        mask[idx] = keep
        return mask
    le = (p[:, None, :] <= p[None, :, :]).all(axis=2)
    lt = (p[:, None, :] < p[None, :, :]).any(axis=2)
    dominated = (le & lt).any(axis=0)
    mask[idx] = ~dominated
    return mask


def pareto_mask(values: object, directions: Sequence[str]) -> np.ndarray:
    """True for rows no other row dominates (duplicates are all kept; NaN rows are never on the front)."""
    return _mask_min(_as_min(values, directions))


def pareto_ranks(values: object, directions: Sequence[str]) -> np.ndarray:
    """Non-dominated sorting: 0 for the front, 1 for the front of the rest, ...; -1 for NaN rows."""
    pts = _as_min(values, directions)
    ranks = np.full(len(pts), -1, dtype=int)
    remaining = np.flatnonzero(~np.isnan(pts).any(axis=1))
    rank = 0
    while remaining.size:
        front = _mask_min(pts[remaining])
        ranks[remaining[front]] = rank
        remaining = remaining[~front]
        rank += 1
    return ranks


def hypervolume(values: object, directions: Sequence[str], reference: Sequence[float]) -> float:
    """Volume dominated by the points and bounded by ``reference`` (in the original units).

    Exact sweep for two objectives; Optuna's implementation for more.
    """
    pts = _as_min(values, directions)
    ref = _as_min(np.asarray(reference, dtype=float)[None, :], directions)[0]
    pts = pts[~np.isnan(pts).any(axis=1)]
    pts = pts[(pts < ref).all(axis=1)]
    if len(pts) == 0:
        return 0.0
    pts = pts[_mask_min(pts)]
    if pts.shape[1] == 2:
        pts = pts[np.argsort(pts[:, 0])]
        volume, prev_f1 = 0.0, ref[1]
        for f0, f1 in pts:
            if f1 < prev_f1:
                volume += (ref[0] - f0) * (prev_f1 - f1)
                prev_f1 = f1
        return float(volume)
    from optuna._hypervolume import compute_hypervolume

    return float(compute_hypervolume(pts, ref))


def knee_index(values: object, directions: Sequence[str]) -> int | None:
    """The front member closest to the ideal point after min-max scaling each objective over the front."""
    pts = _as_min(values, directions)
    mask = _mask_min(pts)
    if not mask.any():
        return None
    front = pts[mask]
    lo, hi = front.min(axis=0), front.max(axis=0)
    scaled = (front - lo) / np.where(hi > lo, hi - lo, 1.0)
    return int(np.flatnonzero(mask)[int(np.argmin(np.linalg.norm(scaled, axis=1)))])


def constrained_best(values: object, directions: Sequence[str], *, performance_col: int = 0,
                     max_drop: float | None = None, max_rel_drop: float | None = None) -> int | None:
    """Index of the fairest row (the other column) whose performance is within the budget of the best.

    ``max_drop`` is absolute, ``max_rel_drop`` relative to |best|; ties go to better performance, then
    the lower index. NaN rows are excluded.
    """
    pts = _as_min(values, directions)
    if pts.shape[1] != 2:
        raise ValueError("constrained_best takes two columns: performance and fairness")
    if max_drop is None and max_rel_drop is None:
        raise ValueError("give max_drop (absolute) or max_rel_drop (relative)")
    valid = np.flatnonzero(~np.isnan(pts).any(axis=1))
    if valid.size == 0:
        return None
    perf = pts[valid, performance_col]  # minimisation form: smaller is better
    fair = pts[valid, 1 - performance_col]
    best = perf.min()
    budget = max_drop if max_drop is not None else abs(best) * max_rel_drop
    eligible = perf <= best + budget + 1e-12
    order = np.lexsort((valid, perf, np.where(eligible, fair, np.inf)))
    return int(valid[order[0]])
