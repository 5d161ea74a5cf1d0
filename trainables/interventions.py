"""Finetuning-data interventions: paper A's two notions of bias, as pure functions of pool metadata.

An intervention picks exactly ``size`` examples of the finetuning pool from its labels and groups,
a magnitude and a seed, so every trial of a sweep finetunes on the same amount of data and only its
composition moves (docs/architecture.md, decision 4). The realised value is measured and reported next to the
requested one.

* ``correlation``: magnitude c = share of examples whose label equals their group code (aligned);
  labels stay 50/50 and each side (aligned / conflicting) is split evenly between its two cells.
* ``representation``: magnitude m = share of the minority group (code 1); labels 50/50 within
  each group.
* ``none``: a uniform random subset (the magnitude is ignored).

Counts come from largest-remainder rounding done hierarchically (first the magnitude's side, then
its halves), so they sum to ``size`` exactly, the achieved value is within 1/(2*size) of the request
and the label marginal is off by at most one example.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from trainables.errors import UserError
from trainables.registry import Registry

__all__ = [
    "InterventionResult",
    "InterventionError",
    "Intervention",
    "INTERVENTIONS",
    "apply_intervention",
    "check_feasible",
    "largest_feasible_size",
]

Cell = tuple[int, int]  # (label, group)
CELLS: tuple[Cell, ...] = ((1, 1), (0, 0), (0, 1), (1, 0))


@dataclass(frozen=True)
class InterventionResult:
    """The chosen finetuning subset and the magnitude it realises."""

    kind: str
    requested: float
    achieved: float
    indices: np.ndarray  # int64 into the pool, sorted, no repeats, length == size


class InterventionError(UserError, ValueError):
    """An intervention that cannot be carried out on this pool (the message gives the feasible range)."""


@dataclass(frozen=True)
class Intervention:
    """A registry entry. ``counts(k, size)`` gives per-cell counts for k = round(magnitude * size)
    (None: a uniform subset); it must work elementwise on integer arrays too, which makes the feasible
    range a vectorised scan."""

    name: str
    description: str
    measure: Callable[[np.ndarray, np.ndarray], float]
    counts: Callable[[np.ndarray, int], dict[Cell, np.ndarray]] | None = None


def _aligned_share(labels: np.ndarray, groups: np.ndarray) -> float:
    return float(np.mean(labels == groups)) if len(labels) else math.nan


def _minority_share(labels: np.ndarray, groups: np.ndarray) -> float:
    return float(np.mean(groups == 1)) if len(groups) else math.nan


def _intervention(name: str, counts: Callable[[np.ndarray, int], dict[Cell, np.ndarray]] | None, *, doc: str,
                  measure: Callable[[np.ndarray, np.ndarray], float]) -> Intervention:
    """The entry ``INTERVENTIONS.register(name, doc=..., measure=...)`` makes of ``counts`` (None: a uniform subset)."""
    return Intervention(name, doc, measure, counts)


INTERVENTIONS: Registry[Intervention] = Registry("intervention", _intervention)
"""Every intervention kind, one decorator each on its ``counts`` (see ``Intervention``)."""


@INTERVENTIONS.register("correlation", measure=_aligned_share,
                        doc="Share of examples whose label equals their (binary) group code; labels 50/50.")
def _correlation_counts(k: np.ndarray, size: int) -> dict[Cell, np.ndarray]:
    # k aligned: odd unit to (y=1, g=1); size - k conflicting: odd unit to (y=0, g=1) -> labels balanced
    c = size - k
    return {(1, 1): k - k // 2, (0, 0): k // 2, (0, 1): c - c // 2, (1, 0): c // 2}


@INTERVENTIONS.register("representation", measure=_minority_share,
                        doc="Share of the minority group (code 1); labels 50/50 within each group.")
def _representation_counts(k: np.ndarray, size: int) -> dict[Cell, np.ndarray]:
    # k in group 1: odd unit to label 1; size - k in group 0: odd unit to label 0 -> labels balanced
    r = size - k
    return {(1, 1): k - k // 2, (0, 1): k // 2, (0, 0): r - r // 2, (1, 0): r // 2}


INTERVENTIONS.register("none", measure=_aligned_share, doc="A uniform random subset; the magnitude is ignored.")(None)


# ----------------------------------------------------------------------------- validation


def _codes(name: str, values: object) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise InterventionError(f"{name} must be a 1-D array of integer codes, got shape {arr.shape} "
                                f"and dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _pool(kind: str, labels: object, groups: object) -> tuple[Intervention, np.ndarray, np.ndarray]:
    entry = INTERVENTIONS.get(kind)
    y, g = _codes("labels", labels), _codes("groups", groups)
    if len(y) != len(g):
        raise InterventionError(f"labels ({len(y)}) and groups ({len(g)}) must have the same length")
    if y.size and not np.isin(y, (0, 1)).all():
        raise InterventionError(f"intervention {kind!r} needs binary 0/1 labels, got {np.unique(y).tolist()}")
    if entry.counts is not None and g.size and not np.isin(g, (0, 1)).all():
        raise InterventionError(f"intervention {kind!r} needs a binary group (codes 0/1); this pool's groups "
                                f"have codes {np.unique(g).tolist()}. Use a binary primary attribute or "
                                f"kind 'none'.")
    return entry, y, g


def _check_size(size: object, pool: int) -> int:
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)) or size < 1:
        raise InterventionError(f"size must be a positive integer, got {size!r}")
    if size > pool:
        raise InterventionError(f"size {size} exceeds the finetuning pool of {pool} examples; "
                                f"use a size of at most {pool} (or a larger pool)")
    return int(size)


def _check_magnitude(magnitude: object) -> float:
    if isinstance(magnitude, (bool, np.bool_)) or not isinstance(magnitude, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(magnitude) <= 1.0:
        raise InterventionError(f"magnitude must be a number in [0, 1], got {magnitude!r}")
    return float(magnitude)


def _k(magnitude: float, size: int) -> int:
    """round(magnitude * size), halves up, tolerant of float error (0.35 * 20 is 7.000000000000001)."""
    return min(size, int(math.floor(magnitude * size + 0.5 + 1e-9)))


def _available(y: np.ndarray, g: np.ndarray) -> dict[Cell, int]:
    return {cell: int(np.count_nonzero((y == cell[0]) & (g == cell[1]))) for cell in CELLS}


def _fits(entry: Intervention, k: np.ndarray, size: int | np.ndarray, avail: dict[Cell, int]) -> np.ndarray:
    assert entry.counts is not None
    need = entry.counts(k, size)
    return np.logical_and.reduce([np.asarray(need[c]) <= avail[c] for c in CELLS])


def _feasible_ks(entry: Intervention, size: int, avail: dict[Cell, int]) -> np.ndarray:
    ks = np.arange(size + 1, dtype=np.int64)
    return ks[_fits(entry, ks, size, avail)]


def _describe_pool(avail: dict[Cell, int]) -> str:
    return ", ".join(f"(label {y}, group {g}): {n}" for (y, g), n in avail.items())


def _range_or_raise(kind: str, entry: Intervention, size: int, y: np.ndarray, g: np.ndarray) -> tuple[float, float]:
    avail = _available(y, g)
    ks = _feasible_ks(entry, size, avail)
    if not len(ks):
        raise InterventionError(f"no {kind} magnitude is feasible with size {size} on a pool of {len(y)} "
                                f"examples (cells: {_describe_pool(avail)}); reduce the finetuning size")
    return float(ks[0]) / size, float(ks[-1]) / size


# ----------------------------------------------------------------------------- public functions


def _largest_feasible_size(entry: Intervention, magnitude: float, avail: dict[Cell, int], upto: int) -> int:
    sizes = np.arange(1, upto + 1, dtype=np.int64)
    ks = np.minimum(sizes, np.floor(magnitude * sizes + 0.5 + 1e-9).astype(np.int64))
    ok = sizes[_fits(entry, ks, sizes, avail)]
    return int(ok[-1]) if len(ok) else 0


def largest_feasible_size(kind: str, labels: object, groups: object, magnitude: float) -> int:
    """The most examples of this pool that realise ``magnitude`` (0 when none does): how a paradigm that
    pretrains on a skewed subset of the source split (``trainables.paradigms``, shortcut_correlation) sizes
    it."""
    entry, y, g = _pool(kind, labels, groups)
    if entry.counts is None:
        return len(y)
    return _largest_feasible_size(entry, _check_magnitude(magnitude), _available(y, g), len(y))


def check_feasible(kind: str, labels: object, groups: object, magnitudes: Iterable[float], size: int) -> None:
    """Raise InterventionError naming the first magnitude this pool cannot realise at ``size``, with the
    feasible range (cell counts are monotone in the magnitude, so every magnitude between its ends is
    feasible), or when ``size`` exceeds the pool."""
    entry, y, g = _pool(kind, labels, groups)
    size = _check_size(size, len(y))
    if entry.counts is None:  # a uniform subset: any magnitude is ignored
        return
    mags = [_check_magnitude(m) for m in magnitudes]
    avail = _available(y, g)
    for m in mags:
        if not _fits(entry, np.int64(_k(m, size)), size, avail):
            lo, hi = _range_or_raise(kind, entry, size, y, g)
            biggest = _largest_feasible_size(entry, m, avail, size)
            raise InterventionError(
                f"{kind} magnitude {m} is infeasible with size {size} on a pool of {len(y)} examples "
                f"(cells: {_describe_pool(avail)}); for this pool and size the minimum feasible magnitude is "
                f"{lo:.4g} and the maximum {hi:.4g}. Use magnitudes in [{lo:.4g}, {hi:.4g}]"
                + (f" or a size of at most {biggest}" if biggest else ""))


def apply_intervention(kind: str, labels: object, groups: object, magnitude: float, size: int,
                       seed: int) -> InterventionResult:
    """Pick ``size`` distinct pool indices realising ``magnitude``; deterministic in ``seed``."""
    entry, y, g = _pool(kind, labels, groups)
    size = _check_size(size, len(y))
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InterventionError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    if entry.counts is None:
        requested = float(magnitude)
        chosen = rng.choice(len(y), size=size, replace=False)
    else:
        requested = _check_magnitude(magnitude)
        check_feasible(kind, y, g, [requested], size)
        need = entry.counts(np.int64(_k(requested, size)), size)
        parts = []
        for cell in CELLS:
            members = np.flatnonzero((y == cell[0]) & (g == cell[1]))
            parts.append(rng.choice(members, size=int(need[cell]), replace=False))
        chosen = np.concatenate(parts)
    indices = np.sort(chosen).astype(np.int64)
    return InterventionResult(kind=kind, requested=requested, achieved=entry.measure(y[indices], g[indices]),
                              indices=indices)
