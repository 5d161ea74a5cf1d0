"""Performance and group-fairness metrics of a binary classifier from (label, score, group) arrays.

Predictions are ``y_score >= threshold``. Every metric is ONE registration (``register_metric``): from it
follow its point estimate in ``evaluate``, its bootstrap in ``bootstrap_ci``, its ``direction``, whether
it ``is_signed``, its ``value_range`` (the queries clip intervals over seeds to it) and its key forms.
Per-attribute metrics are functions of per-group count tables
(``GroupCounts``: n, n_pos, tp, fp, tn, fn and AUROC, arrays of shape (B, groups)), so one function
serves the point estimate (B = 1) and the bootstrap (B resamples); a metric that cannot be written on
counts registers with ``vectorised=False`` and is called once per resample instead. The tests hold every
metric to fairlearn / scikit-learn, or to hand-derived values where those have no such metric.

Keys. Overall metrics appear once (``accuracy``). Per-attribute metrics appear for every sensitive
attribute as ``NAME/attr``, un-suffixed ``NAME`` for the primary attribute (the names a sweep's
objectives use) and ``worst:NAME``, the worst value over attributes: the minimum of a 'max' metric, the
maximum of a 'min' metric, the value farthest from 0 of a signed metric (sign kept) and farthest from
its target of a reported one (``disparate_impact_ratio``: from 1). Attributes where a metric is
undefined (NaN) are skipped; ``worst:`` is NaN only when it is undefined for every attribute.

Privileged group. The signed and ratio metrics compare each unprivileged group with the privileged
group of the attribute: ``evaluate(..., privileged={"sex": "male"})`` (datasets name theirs in
``Dataset.privileged``). An attribute without an entry defaults to its largest group in the evaluated
split, ties broken by the first group in sorted order. With k > 2 groups each such metric reports the
unprivileged group farthest from parity (below); ties between groups go to the first in sorted order.
An attribute with a single group has no disparity: differences 0, ratio 1, deviations 0.

Overall (computed over all examples; no ``/attr`` or ``worst:`` forms), direction 'max':
  accuracy                  (TP + TN) / n
  balanced_accuracy         (TPR + TNR) / 2
  auroc                     area under the ROC curve (ties count 1/2)
  auprc                     average precision (scikit-learn's ``average_precision_score``)
  f1                        2TP / (2TP + FP + FN); 0 when TP = FP = FN = 0

Per attribute, direction 'max':
  worst_group_accuracy      min over groups of accuracy
  worst_group_auroc         min over groups of within-group AUROC

Per attribute, direction 'min' (0 is parity). Gaps: largest minus smallest group value, fairlearn's
``between_groups`` definitions, symmetric in the groups (no privileged group needed):
  accuracy_gap                      max - min of group accuracy
  auroc_gap                         max - min of group AUROC
  demographic_parity_difference     max - min of group selection rate (TP + FP) / n
  equal_opportunity_difference      max - min of group TPR
  equalized_odds_difference         max(TPR gap, FPR gap)
Signed (``is_signed``: the queries minimise their absolute value), unprivileged minus privileged, so a
model that favours the privileged group scores negative on tpr/statistical parity:
  tpr_difference                    TPR_u - TPR_p
  fpr_difference                    FPR_u - FPR_p
  statistical_parity_difference     selection_rate_u - selection_rate_p
    (k > 2: the unprivileged group u with the largest |difference|, its sign kept)
Unsigned, comparing with the privileged group:
  average_absolute_odds_difference  (|TPR_u - TPR_p| + |FPR_u - FPR_p|) / 2 (k > 2: max over u)
Parity deviations |1 - rate_u / rate_p| (k > 2: max over u), for the rates
  disparate_impact_deviation        selection rate (TP + FP) / n
  fpr_ratio_deviation               FPR = FP / (FP + TN)
  fnr_ratio_deviation               FNR = FN / (FN + TP)
  fdr_ratio_deviation               false discovery rate FP / (TP + FP)
  for_ratio_deviation               false omission rate FN / (FN + TN)
  error_rate_ratio_deviation        (FP + FN) / n

Reported, not optimised (``direction`` raises; its best value, 1, is neither end of its range):
  disparate_impact_ratio            selection_rate_u / selection_rate_p (k > 2: the u with the largest
                                    |1 - ratio|); use ``disparate_impact_deviation`` (= |1 - ratio|) as
                                    the objective

Zero denominators. A group rate over an empty set (the FDR of a group with no predicted positive, the
FOR of a group with none predicted negative) is NaN: undefined, and that group is skipped by the
k > 2 choice; the metric is NaN only when no unprivileged group has it defined. A ratio with a zero
privileged rate is 1 when the unprivileged rate is 0 too (both equal: parity) and +inf otherwise (so
its deviation is +inf); nothing raises. ``bootstrap_ci`` ignores NaN resamples and keeps +inf bounds.
TPR, FPR, FNR, selection and error rates are always defined, because ``evaluate`` requires both labels
in every group.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Mapping as MappingABC, Sequence as SequenceABC
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from trainables.errors import UserError
from trainables.registry import Registry
from trainables.schema import did_you_mean

__all__ = ["METRIC_DIRECTIONS", "PERFORMANCE_METRICS", "FAIRNESS_METRICS", "GROUP_METRICS", "OVERALL_METRICS",
           "REPORTED_METRICS", "METRICS", "MetricSpec", "MetricError", "OverallCounts", "GroupCounts",
           "register_metric", "unregister_metric", "temporary_metric", "Evaluation", "evaluate", "direction",
           "is_signed", "value_range", "bootstrap_ci", "calibrated_threshold"]

_BOOTSTRAP_CHUNK_ELEMENTS = 2_000_000  # resamples x examples per batch: bounds the bootstrap's memory to ~100 MB
_PER_GROUP_COLUMNS = ("attribute", "group", "n", "n_pos", "accuracy", "tpr", "fpr", "selection_rate", "auroc",
                      "privileged", "tp", "fp", "tn", "fn")


# --- registry --------------------------------------------------------------------------------------------------


class MetricError(UserError, ValueError):
    """A metric name that is not registered or cannot be an objective, or a registration that cannot be
    accepted; the message names the metric and what to write instead."""


@dataclass(frozen=True)
class MetricSpec:
    """One registered metric. ``fn`` signatures:

    vectorised, overall:        fn(counts: OverallCounts) -> (B,) array
    vectorised, per attribute:  fn(counts: GroupCounts) -> (B,) array
    not vectorised, overall:    fn(y_true, y_score, y_pred) -> float           (called once per resample)
    not vectorised, per attr.:  fn(y_true, y_score, y_pred, groups, privileged) -> float
    """

    name: str
    fn: Callable[..., Any]
    direction: str | None  # 'max', 'min', or None: reported only (best at ``target``)
    per_attribute: bool
    signed: bool  # best at 0 with a meaningful sign: objectives minimise |value|
    vectorised: bool
    target: float | None  # the best value of a reported metric
    use_instead: str | None  # for a reported metric: the objective to name instead
    bounds: tuple[float, float] = (-math.inf, math.inf)  # the values it can take: intervals are clipped to them

    @property
    def best(self) -> float | None:
        """The value ``worst:`` measures distance from, when that is how worse is defined."""
        return 0.0 if self.signed else self.target


def _metric_entry(name: str, fn: Callable, *, direction: str | None, per_attribute: bool = True, signed: bool = False,
                  vectorised: bool = True, target: float | None = None, use_instead: str | None = None,
                  bounds: tuple[float, float] | None = None) -> MetricSpec:
    """The entry ``register_metric(name, direction=..., ...)`` makes of ``fn``; ``evaluate``, ``bootstrap_ci``,
    ``direction``, ``is_signed`` and ``value_range`` know it from then on (see MetricSpec for ``fn``'s signature).

    ``direction``: 'max' or 'min' for an objective; None for a metric that is reported but not optimised,
    which then needs ``target`` (its best value, what ``worst:`` measures distance from) and may name
    ``use_instead``. ``signed=True`` (only with 'min'): best at 0, sign kept, queries minimise |value|.
    ``bounds=(low, high)``: the values the metric can take (e.g. (0, 1) for a rate); an interval over seeds is
    clipped to them, since a mean accuracy cannot exceed 1. Default: unbounded, nothing clipped.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise MetricError(f"metric name must be an identifier such as 'tpr_difference' (it becomes the keys NAME, "
                          f"NAME/attr and worst:NAME); got {name!r}")
    if name in _METRICS:
        raise MetricError(f"metric {name!r} is already registered; call unregister_metric({name!r}) first or "
                          f"choose another name")
    if direction not in ("max", "min", None):
        raise MetricError(f"direction of metric {name!r} must be 'max', 'min' or None (reported, not optimised); "
                          f"got {direction!r}")
    if signed and direction != "min":
        raise MetricError(f"metric {name!r}: signed=True means best at 0 with the sign kept, which needs "
                          f"direction='min' (objectives minimise |value|); got direction={direction!r}")
    if direction is None and (not isinstance(target, numbers.Real) or isinstance(target, bool)):
        raise MetricError(f"metric {name!r} has direction=None (reported only), so it needs target=<its best "
                          f"value> (e.g. 1.0 for a ratio); got target={target!r}")
    if direction is not None and target is not None:
        raise MetricError(f"metric {name!r}: target={target!r} is only for reported metrics (direction=None); "
                          f"a '{direction}' metric is best at its {'largest' if direction == 'max' else 'smallest'} "
                          f"value; drop target")
    if not callable(fn):
        raise MetricError(f"metric {name!r} must be registered on a function; got {fn!r}")
    return MetricSpec(name, fn, direction, bool(per_attribute), bool(signed), bool(vectorised),
                      None if target is None else float(target), use_instead, _checked_bounds(name, bounds, signed))


def _checked_bounds(name: str, bounds: Any, signed: bool) -> tuple[float, float]:
    if bounds is None:
        return (-math.inf, math.inf)
    reals = (isinstance(bounds, SequenceABC) and len(bounds) == 2
             and all(isinstance(b, numbers.Real) and not isinstance(b, bool) and not math.isnan(b) for b in bounds))
    if not reals or not bounds[0] < bounds[1]:
        raise MetricError(f"metric {name!r}: bounds must be (low, high) with low < high, the values it can take "
                          f"(e.g. (0, 1) for a rate, (0, math.inf) for a deviation); got {bounds!r}")
    if signed and not bounds[0] <= 0 <= bounds[1]:
        raise MetricError(f"metric {name!r} is signed (best at 0), so its bounds must hold 0; got {bounds!r}")
    return (float(bounds[0]), float(bounds[1]))


_METRICS: Registry[MetricSpec] = Registry("metric", _metric_entry)  # the module's only mutable state
METRICS: Mapping[str, MetricSpec] = _METRICS.entries()
"""Read-only live view of the registry, in registration order."""
register_metric = _METRICS.register
"""Decorator, the registry's one style: ``@register_metric("name", direction="min")`` on ``fn`` (see
``_metric_entry`` for the keywords); one registration gives the point estimate, its bootstrap interval and
its direction to the queries."""


def unregister_metric(name: str) -> None:
    """Remove a metric registered after import; built-in metrics stay (other modules rely on them)."""
    if name not in _METRICS:
        raise MetricError(f"metric {name!r} is not registered; registered: {', '.join(_METRICS)}")
    if name in _BUILTIN:
        raise MetricError(f"metric {name!r} is built in and cannot be unregistered; register yours under "
                          f"another name")
    _METRICS.unregister(name)


@contextlib.contextmanager
def temporary_metric(name: str, fn: Callable, **options: Any) -> Iterator[MetricSpec]:
    """``register_metric(name, **options)(fn)`` for the duration of a ``with`` block (tests, notebooks)."""
    register_metric(name, **options)(fn)
    try:
        yield METRICS[name]
    finally:
        if name in _METRICS:
            _METRICS.unregister(name)


class _Names(SequenceABC):
    """A live, read-only tuple of the registered names passing ``keep``: a metric registered later shows up."""

    def __init__(self, keep: Callable[[MetricSpec], bool], doc: str):
        self._keep, self.__doc__ = keep, doc

    def _names(self) -> tuple[str, ...]:
        return tuple(n for n, s in METRICS.items() if self._keep(s))

    def __getitem__(self, i: Any) -> Any:
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SequenceABC) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


class _Directions(MappingABC):
    """Live read-only ``{name: 'max' | 'min'}`` of the optimisable metrics."""

    def __getitem__(self, name: str) -> str:
        spec = METRICS.get(name)
        if spec is None or spec.direction is None:
            raise KeyError(name)
        return spec.direction

    def __iter__(self) -> Iterator[str]:
        return (n for n, s in METRICS.items() if s.direction is not None)

    def __len__(self) -> int:
        return sum(s.direction is not None for s in METRICS.values())

    def __repr__(self) -> str:
        return repr(dict(self))


OVERALL_METRICS: Sequence[str] = _Names(lambda s: not s.per_attribute,
                                        "Computed over all examples; no ``/attr`` or ``worst:`` forms.")
GROUP_METRICS: Sequence[str] = _Names(lambda s: s.per_attribute,
                                      "Computed per sensitive attribute: the ``/attr`` and ``worst:`` forms exist.")
PERFORMANCE_METRICS: Sequence[str] = _Names(lambda s: s.direction == "max", "Higher is better.")
FAIRNESS_METRICS: Sequence[str] = _Names(lambda s: s.direction == "min",
                                         "Lower is better (the signed ones: lower |value|).")
REPORTED_METRICS: Sequence[str] = _Names(lambda s: s.direction is None,
                                         "Reported, not optimised: ``direction`` raises for them.")
METRIC_DIRECTIONS: Mapping[str, str] = _Directions()


def _lookup(metric: Any) -> tuple[MetricSpec, str]:
    """The spec behind a key ``NAME``, ``NAME/attribute`` or ``worst:NAME``, and its form."""
    if not isinstance(metric, str):
        raise MetricError(f"metric name must be a string; got {metric!r} ({type(metric).__name__})")
    base, form = metric, ""
    if metric.startswith("worst:"):
        base, form = metric[len("worst:"):], "worst:"
    elif "/" in metric:
        base, attr = metric.split("/", 1)
        form = "/attr"
        if not attr:
            raise MetricError(f"metric {metric!r} has an empty attribute after '/'; write NAME/ATTRIBUTE, "
                              f"e.g. 'equalized_odds_difference/sex'")
    spec = METRICS.get(base)
    if spec is None:
        hint = did_you_mean(base, list(GROUP_METRICS) if form else list(METRICS), sentence=True)
        raise MetricError(f"unknown metric {metric!r}; valid names: {', '.join(METRICS)}; the per-attribute "
                          f"ones ({', '.join(GROUP_METRICS)}) also as NAME/ATTRIBUTE and worst:NAME.{hint}")
    if form and not spec.per_attribute:
        raise MetricError(f"metric {metric!r}: {base!r} is computed over all examples, so it has no {form} form; "
                          f"use {base!r}, or one of the per-attribute metrics {', '.join(GROUP_METRICS)}")
    return spec, form


def direction(metric: str) -> str:
    """'max' or 'min' for a key ``evaluate`` produces: ``NAME``, ``NAME/attribute`` or ``worst:NAME``.

    Strict on purpose: the sweep plan validates its objectives with this, so a name ``evaluate`` never
    reports (``accuracy/sex``, ``worst:auroc``) or one that is reported but cannot be an objective
    (``disparate_impact_ratio``) fails at plan time, not after the trials ran.
    """
    spec, _ = _lookup(metric)
    if spec.direction is None:
        instead = f"; optimise {spec.use_instead!r} instead" if spec.use_instead else ""
        raise MetricError(f"metric {metric!r} is reported, not optimised: it is best at {spec.target:g}, neither "
                          f"its largest nor its smallest value, so it has no direction{instead}")
    return spec.direction


def is_signed(metric: str) -> bool:
    """True for signed metrics (best at 0, the sign says who is favoured): objectives minimise |value|."""
    return _lookup(metric)[0].signed


def value_range(metric: str) -> tuple[float, float]:
    """(low, high): the values a key ``NAME``, ``NAME/attribute`` or ``worst:NAME`` can take (its registration's
    ``bounds``; unbounded if it gave none)."""
    return _lookup(metric)[0].bounds


# --- count tables ----------------------------------------------------------------------------------------------


def _divide(num: Any, den: Any) -> np.ndarray:
    """num / den elementwise; NaN where den == 0 (a rate over an empty set is undefined)."""
    num, den = np.broadcast_arrays(np.asarray(num, dtype=float), np.asarray(den, dtype=float))
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _farthest(values: np.ndarray, target: float) -> np.ndarray:
    """(B, m) -> (B,): per row the value farthest from ``target`` (sign kept), skipping NaN; ties -> first
    column. NaN where a row is all NaN; ``target`` where m == 0 (nothing to compare: parity)."""
    if values.shape[1] == 0:
        return np.full(values.shape[0], float(target))
    dist = np.abs(values - target)
    idx = np.where(np.isnan(dist), -1.0, dist).argmax(axis=1)
    return values[np.arange(values.shape[0]), idx]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den of non-negative rates: 1 where both are 0 (parity), +inf where only den is; NaN stays NaN."""
    num, den = np.broadcast_arrays(num, den)
    out = _divide(num, den)
    both = ~np.isnan(num) & (den == 0)
    out[both & (num == 0)] = 1.0
    out[both & (num > 0)] = np.inf
    return out


class OverallCounts:
    """Confusion counts over all examples for B score vectors (B = 1: ``evaluate``; B resamples: bootstrap).

    ``y`` (n,) labels, ``scores`` (B, n), ``pred`` (B, n) bool; counts are (B,) arrays.
    """

    def __init__(self, y: np.ndarray, scores: np.ndarray, pred: np.ndarray):
        self.y, self.scores, self.pred = y, scores, pred
        self.pos = y == 1
        self.n = len(y)
        self.n_pos = int(self.pos.sum())
        self.n_neg = self.n - self.n_pos
        self.tp = np.count_nonzero(pred[:, self.pos], axis=1).astype(float)
        self.fp = np.count_nonzero(pred[:, ~self.pos], axis=1).astype(float)
        self.fn = self.n_pos - self.tp
        self.tn = self.n_neg - self.fp

    @cached_property
    def auroc(self) -> np.ndarray:
        return _batch_auroc(self.scores, self.pos)

    @cached_property
    def auprc(self) -> np.ndarray:
        return _batch_average_precision(self.scores, self.pos)


class GroupCounts:
    """Per-group confusion counts of one attribute for B score vectors: arrays (B, k), one column per group
    (``groups``, sorted); ``privileged`` is the privileged group's column. The rate properties are NaN
    where their denominator is 0; the helpers compare unprivileged groups with the privileged one."""

    def __init__(self, attribute: str, codes: np.ndarray, groups: tuple, privileged: int, pos: np.ndarray,
                 scores: np.ndarray, predf: np.ndarray):
        self.attribute, self.codes, self.groups, self.privileged = attribute, codes, groups, privileged
        self._pos, self._scores = pos, scores
        k, b = len(groups), scores.shape[0]
        onehot = codes[:, None] == np.arange(k)[None, :]
        in_pos = onehot & pos[:, None]
        shape = (b, k)
        self.n = np.broadcast_to(onehot.sum(axis=0).astype(float), shape)
        self.n_pos = np.broadcast_to(in_pos.sum(axis=0).astype(float), shape)
        self.n_neg = self.n - self.n_pos
        self.tp = predf @ in_pos.astype(float)  # exact: sums of 0/1 in float64
        self.fp = predf @ onehot.astype(float) - self.tp
        self.fn = self.n_pos - self.tp
        self.tn = self.n_neg - self.fp

    # rates (B, k)
    @property
    def accuracy(self) -> np.ndarray:
        return _divide(self.tp + self.tn, self.n)

    @property
    def error_rate(self) -> np.ndarray:
        return _divide(self.fp + self.fn, self.n)

    @property
    def selection_rate(self) -> np.ndarray:
        return _divide(self.tp + self.fp, self.n)

    @property
    def tpr(self) -> np.ndarray:
        return _divide(self.tp, self.n_pos)

    @property
    def fpr(self) -> np.ndarray:
        return _divide(self.fp, self.n_neg)

    @property
    def fnr(self) -> np.ndarray:
        return _divide(self.fn, self.n_pos)

    @property
    def fdr(self) -> np.ndarray:
        return _divide(self.fp, self.tp + self.fp)

    @property
    def false_omission_rate(self) -> np.ndarray:
        return _divide(self.fn, self.fn + self.tn)

    @cached_property
    def auroc(self) -> np.ndarray:
        out = np.full(self.tp.shape, np.nan)
        for j in range(len(self.groups)):
            m = self.codes == j
            if self._pos[m].any() and not self._pos[m].all():
                out[:, j] = _batch_auroc(self._scores[:, m], self._pos[m])
        return out

    # comparisons (B,)
    @staticmethod
    def gap(rate: np.ndarray) -> np.ndarray:
        """Largest minus smallest group value (symmetric; no privileged group)."""
        return rate.max(axis=1) - rate.min(axis=1)

    def unprivileged(self, values: np.ndarray) -> np.ndarray:
        """(B, k) -> (B, k-1): the columns of the unprivileged groups."""
        return np.delete(values, self.privileged, axis=1)

    def privileged_value(self, values: np.ndarray) -> np.ndarray:
        """(B, k) -> (B, 1): the privileged group's column."""
        return values[:, [self.privileged]]

    def differences(self, rate: np.ndarray) -> np.ndarray:
        """(B, k-1): rate_u - rate_p for each unprivileged group u."""
        return self.unprivileged(rate) - self.privileged_value(rate)

    def difference(self, rate: np.ndarray) -> np.ndarray:
        """rate_u - rate_p of the unprivileged group with the largest |difference| (sign kept)."""
        return _farthest(self.differences(rate), 0.0)

    def ratio(self, rate: np.ndarray) -> np.ndarray:
        """rate_u / rate_p of the unprivileged group farthest from 1 (|1 - ratio|)."""
        return _farthest(_ratio(self.unprivileged(rate), self.privileged_value(rate)), 1.0)

    def ratio_deviation(self, rate: np.ndarray) -> np.ndarray:
        """max over unprivileged groups of |1 - rate_u / rate_p|."""
        return np.abs(1.0 - self.ratio(rate))


# --- built-in metrics ------------------------------------------------------------------------------------------

_UNIT, _SIGNED_UNIT, _NON_NEGATIVE = (0.0, 1.0), (-1.0, 1.0), (0.0, math.inf)  # rates and gaps; signed; ratios


@register_metric("accuracy", direction="max", per_attribute=False, bounds=_UNIT)
def _accuracy(c: OverallCounts) -> np.ndarray:
    return (c.tp + c.tn) / c.n


@register_metric("balanced_accuracy", direction="max", per_attribute=False, bounds=_UNIT)
def _balanced_accuracy(c: OverallCounts) -> np.ndarray:
    return (c.tp / c.n_pos + c.tn / c.n_neg) / 2


@register_metric("auroc", direction="max", per_attribute=False, bounds=_UNIT)
def _auroc(c: OverallCounts) -> np.ndarray:
    return c.auroc


@register_metric("auprc", direction="max", per_attribute=False, bounds=_UNIT)
def _auprc(c: OverallCounts) -> np.ndarray:
    return c.auprc


@register_metric("f1", direction="max", per_attribute=False, bounds=_UNIT)
def _f1(c: OverallCounts) -> np.ndarray:
    return np.nan_to_num(_divide(2 * c.tp, 2 * c.tp + c.fp + c.fn), nan=0.0)  # scikit-learn's zero_division=0


@register_metric("worst_group_accuracy", direction="max", bounds=_UNIT)
def _worst_group_accuracy(c: GroupCounts) -> np.ndarray:
    return c.accuracy.min(axis=1)


@register_metric("worst_group_auroc", direction="max", bounds=_UNIT)
def _worst_group_auroc(c: GroupCounts) -> np.ndarray:
    return c.auroc.min(axis=1)


@register_metric("accuracy_gap", direction="min", bounds=_UNIT)
def _accuracy_gap(c: GroupCounts) -> np.ndarray:
    return c.gap(c.accuracy)


@register_metric("auroc_gap", direction="min", bounds=_UNIT)
def _auroc_gap(c: GroupCounts) -> np.ndarray:
    return c.gap(c.auroc)


@register_metric("demographic_parity_difference", direction="min", bounds=_UNIT)
def _demographic_parity_difference(c: GroupCounts) -> np.ndarray:
    return c.gap(c.selection_rate)


@register_metric("equalized_odds_difference", direction="min", bounds=_UNIT)
def _equalized_odds_difference(c: GroupCounts) -> np.ndarray:
    return np.maximum(c.gap(c.tpr), c.gap(c.fpr))


@register_metric("equal_opportunity_difference", direction="min", bounds=_UNIT)
def _equal_opportunity_difference(c: GroupCounts) -> np.ndarray:
    return c.gap(c.tpr)


@register_metric("tpr_difference", direction="min", signed=True, bounds=_SIGNED_UNIT)
def _tpr_difference(c: GroupCounts) -> np.ndarray:
    return c.difference(c.tpr)


@register_metric("fpr_difference", direction="min", signed=True, bounds=_SIGNED_UNIT)
def _fpr_difference(c: GroupCounts) -> np.ndarray:
    return c.difference(c.fpr)


@register_metric("statistical_parity_difference", direction="min", signed=True, bounds=_SIGNED_UNIT)
def _statistical_parity_difference(c: GroupCounts) -> np.ndarray:
    return c.difference(c.selection_rate)


@register_metric("average_absolute_odds_difference", direction="min", bounds=_UNIT)
def _average_absolute_odds_difference(c: GroupCounts) -> np.ndarray:
    pairwise = (np.abs(c.differences(c.tpr)) + np.abs(c.differences(c.fpr))) / 2
    return _farthest(pairwise, 0.0)


@register_metric("disparate_impact_ratio", direction=None, target=1.0, use_instead="disparate_impact_deviation",
                 bounds=_NON_NEGATIVE)
def _disparate_impact_ratio(c: GroupCounts) -> np.ndarray:
    return c.ratio(c.selection_rate)


@register_metric("disparate_impact_deviation", direction="min", bounds=_NON_NEGATIVE)
def _disparate_impact_deviation(c: GroupCounts) -> np.ndarray:
    return c.ratio_deviation(c.selection_rate)


@register_metric("fpr_ratio_deviation", direction="min", bounds=_NON_NEGATIVE)
def _fpr_ratio_deviation(c: GroupCounts) -> np.ndarray:
    return c.ratio_deviation(c.fpr)


@register_metric("fnr_ratio_deviation", direction="min", bounds=_NON_NEGATIVE)
def _fnr_ratio_deviation(c: GroupCounts) -> np.ndarray:
    return c.ratio_deviation(c.fnr)


@register_metric("fdr_ratio_deviation", direction="min", bounds=_NON_NEGATIVE)
def _fdr_ratio_deviation(c: GroupCounts) -> np.ndarray:
    return c.ratio_deviation(c.fdr)


@register_metric("for_ratio_deviation", direction="min", bounds=_NON_NEGATIVE)
def _for_ratio_deviation(c: GroupCounts) -> np.ndarray:
    return c.ratio_deviation(c.false_omission_rate)


@register_metric("error_rate_ratio_deviation", direction="min", bounds=_NON_NEGATIVE)
def _error_rate_ratio_deviation(c: GroupCounts) -> np.ndarray:
    return c.ratio_deviation(c.error_rate)


_BUILTIN = frozenset(METRICS)


# --- validation ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """Flat metric dict (what the trial reports) plus the per-group table (what the run stores as CSV)."""

    metrics: dict[str, float]
    per_group: pd.DataFrame  # _PER_GROUP_COLUMNS: attribute, group, n, n_pos, rates, auroc, privileged, counts
    privileged: dict[str, Any] = field(default_factory=dict)  # attribute -> privileged group used


def _plain(value: Any) -> Any:
    """NumPy scalar -> Python scalar, so messages read ``'b'``/``3``, not ``np.str_('b')``."""
    return value.item() if isinstance(value, np.generic) else value


def _labels_and_scores(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray]:
    """0/1 int labels and float scores in [0, 1], or a ValueError naming the field, the value and the fix."""
    y_raw = np.asarray(y_true)
    s = np.asarray(y_score)
    if y_raw.ndim != 1 or s.ndim != 1:
        raise ValueError(f"y_true and y_score must be 1-D; got shapes {y_raw.shape} and {s.shape}")
    if len(y_raw) != len(s):
        raise ValueError(f"y_true has {len(y_raw)} labels but y_score has {len(s)} scores; they must be of equal "
                         f"length (one score per example)")
    if len(y_raw) == 0:
        raise ValueError("y_true is empty; evaluate needs at least one example of each label in each group")
    try:
        y_num = y_raw.astype(float)
    except (TypeError, ValueError):
        y_num = None
    if y_num is None or not np.isin(y_num, (0.0, 1.0)).all():
        bad = pd.unique(y_raw[~np.isin(y_raw, (0, 1))] if y_num is not None else y_raw)[:5]
        raise ValueError(f"y_true must be binary 0/1 labels; got values such as {[_plain(v) for v in bad]}; "
                         f"map the classes to 0/1 first")
    try:
        s = s.astype(float)
    except (TypeError, ValueError):
        raise ValueError(f"y_score must be numeric probabilities P(y=1); got dtype {s.dtype}") from None
    if np.isnan(s).any():
        nan = np.flatnonzero(np.isnan(s))
        raise ValueError(f"y_score holds {len(nan)} NaN value(s) (first at index {nan[0]}); the model produced "
                         f"invalid scores; fix the model output before evaluating")
    if (s < 0).any() or (s > 1).any():
        bad = np.flatnonzero((s < 0) | (s > 1))
        raise ValueError(f"y_score must be probabilities in [0, 1]; {len(bad)} value(s) outside, e.g. {s[bad[0]]!r} "
                         f"at index {bad[0]}; pass sigmoid/softmax outputs, not logits")
    return y_num.astype(int), s


def _validate(y_true: Any, y_score: Any, sensitive: Mapping[str, Any], primary: str,
              threshold: float) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Arrays ready for the metrics, or a ValueError naming the field, the value and the fix."""
    y, s = _labels_and_scores(y_true, y_score)
    if len(np.unique(y)) < 2:
        raise ValueError(f"y_true holds a single class ({y[0]}) in all {len(y)} examples; AUROC and the TPR/FPR "
                         f"gaps are undefined; evaluate on data that holds both labels")
    if not isinstance(threshold, numbers.Real) or not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1]; got {threshold!r}")
    if not isinstance(sensitive, Mapping) or not sensitive:
        raise ValueError(f"sensitive must map attribute name -> group codes, with at least one attribute; "
                         f"got {sensitive!r}")
    if primary not in sensitive:
        raise ValueError(f"primary attribute {primary!r} is not among the sensitive attributes {list(sensitive)}; "
                         f"name one of them")
    groups: dict[str, np.ndarray] = {}
    for attr, codes in sensitive.items():
        if not isinstance(attr, str) or not attr:
            raise ValueError(f"sensitive attribute names must be non-empty strings (they become metric keys "
                             f"NAME/attr); got {attr!r}")
        g = np.asarray(codes)
        if g.ndim != 1 or len(g) != len(y):
            raise ValueError(f"sensitive attribute {attr!r} has shape {g.shape} but there are {len(y)} examples; "
                             f"give one group code per example")
        missing = pd.isna(g)
        if missing.any():
            raise ValueError(f"sensitive attribute {attr!r} has {int(missing.sum())} missing group code(s) (first "
                             f"at index {int(np.flatnonzero(missing)[0])}); fill them (e.g. an 'unknown' group) or "
                             f"drop those examples")
        table = pd.crosstab(pd.Series(g), pd.Series(y)).reindex(columns=[0, 1], fill_value=0)
        for value, row in table.iterrows():
            if row[1] == 0:
                raise ValueError(f"group {_plain(value)!r} of attribute {attr!r} has no positive examples in the "
                                 f"evaluated split; equal opportunity (TPR) is undefined. Evaluation data must hold "
                                 f"every (label, group) cell: re-split or merge the group")
            if row[0] == 0:
                raise ValueError(f"group {_plain(value)!r} of attribute {attr!r} has no negative examples in the "
                                 f"evaluated split; the false positive rate (so equalized odds) is undefined. "
                                 f"Evaluation data must hold every (label, group) cell: re-split or merge the group")
        groups[attr] = g
    return y, s, groups


@dataclass(frozen=True)
class _Attribute:
    """One sensitive attribute, factorised: ``codes`` index ``groups`` (sorted); ``privileged`` is a column."""

    values: np.ndarray  # the group of each example, as given
    codes: np.ndarray
    groups: tuple
    privileged: int

    def reordered(self, order: np.ndarray) -> "_Attribute":
        return _Attribute(self.values[order], self.codes[order], self.groups, self.privileged)


def _same_group(group: Any, value: Any) -> bool:
    """Equal and of the same kind: 1 names the group 1 or 1.0, but not '1' nor True."""
    def number(x: Any) -> bool:
        return isinstance(x, numbers.Number) and not isinstance(x, bool)

    return (type(group) is type(value) or (number(group) and number(value))) and bool(group == value)


def _attributes(groups: Mapping[str, np.ndarray], privileged: Mapping[str, Any] | None) -> dict[str, _Attribute]:
    """Factorise every attribute and resolve its privileged group (given, else the largest; ties -> first)."""
    if privileged is None:
        privileged = {}
    if not isinstance(privileged, Mapping):
        raise ValueError(f"privileged must map attribute -> its privileged group, e.g. {{'sex': 'male'}}; "
                         f"got {privileged!r}")
    unknown = [a for a in privileged if a not in groups]
    if unknown:
        raise ValueError(f"privileged names attribute(s) {unknown} that are not sensitive attributes; they are: "
                         f"{list(groups)}")
    out = {}
    for attr, g in groups.items():
        try:
            codes, uniques = pd.factorize(g, sort=True)
        except TypeError:  # groups of mixed types do not sort: keep first-appearance order
            codes, uniques = pd.factorize(g, sort=False)
        names = tuple(_plain(v) for v in np.asarray(uniques, dtype=object))
        if attr in privileged:
            value = _plain(privileged[attr])
            matches = [j for j, v in enumerate(names) if _same_group(v, value)]
            if not matches:
                raise ValueError(f"privileged group {value!r} of attribute {attr!r} is not one of its groups in the "
                                 f"evaluated split: {list(names)}; name one of those (group names as evaluate sees "
                                 f"them, e.g. 'male' rather than its code)")
            priv = matches[0]
        else:
            priv = int(np.bincount(codes, minlength=len(names)).argmax())  # largest; ties -> first sorted
        out[attr] = _Attribute(g, codes.astype(np.intp), names, priv)
    return out


# --- computation -----------------------------------------------------------------------------------------------


def _keys(attributes: Sequence[str]) -> list[str]:
    """Every key ``evaluate`` reports for these attributes, in its order."""
    group = list(GROUP_METRICS)
    return [*OVERALL_METRICS, *group, *(f"{m}/{a}" for a in attributes for m in group),
            *(f"worst:{m}" for m in group)]


def _base(key: str) -> str:
    return key[len("worst:"):] if key.startswith("worst:") else key.split("/", 1)[0]


def _as_batch(value: Any, b: int, name: str) -> np.ndarray:
    """A metric function's result as a float (B,) array, or an error naming the metric and the fix."""
    out = np.asarray(value, dtype=float)
    if out.shape != (b,):
        raise ValueError(f"metric {name!r} returned shape {out.shape} for {b} score vector(s); a vectorised metric "
                         f"returns one value per row of the count tables (shape ({b},)); register it with "
                         f"vectorised=False to be called once per sample instead")
    return out


def _worst(values: np.ndarray, spec: MetricSpec) -> np.ndarray:
    """(attributes, B) -> (B,): the worst attribute per row, skipping NaN (see the module docstring)."""
    if spec.best is not None:
        return _farthest(values.T, spec.best)
    nan = np.isnan(values)
    if spec.direction == "max":
        worst = np.where(nan, np.inf, values).min(axis=0)
    else:
        worst = np.where(nan, -np.inf, values).max(axis=0)
    return np.where(nan.all(axis=0), np.nan, worst)


def _compute(y: np.ndarray, scores: np.ndarray, attrs: Mapping[str, _Attribute], primary: str, threshold: float,
             names: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, GroupCounts]]:
    """Every key (or those whose metric ``names`` needs) for each row of ``scores`` (B, n), labels and
    groups fixed per column, plus each attribute's count table (for the per-group CSV)."""
    bases = set(METRICS) if names is None else {_base(k) for k in names}
    specs = [s for n, s in METRICS.items() if n in bases]
    b = scores.shape[0]
    pred = scores >= threshold
    out: dict[str, np.ndarray] = {}
    overall = [s for s in specs if not s.per_attribute]
    if overall:
        oc = OverallCounts(y, scores, pred)
        for spec in overall:
            if spec.vectorised:
                out[spec.name] = _as_batch(spec.fn(oc), b, spec.name)
            else:
                out[spec.name] = np.array([float(spec.fn(y, scores[i], pred[i].astype(int))) for i in range(b)])
    per_attr_specs = [s for s in specs if s.per_attribute]
    per_attr: dict[str, dict[str, np.ndarray]] = {}
    counts: dict[str, GroupCounts] = {}
    predf = pred.astype(float) if per_attr_specs else None
    for attr, a in attrs.items():
        counts[attr] = gc = GroupCounts(attr, a.codes, a.groups, a.privileged, y == 1, scores, predf) \
            if per_attr_specs else None
        values = {}
        for spec in per_attr_specs:
            if spec.vectorised:
                values[spec.name] = _as_batch(spec.fn(gc), b, spec.name)
            else:
                priv = a.groups[a.privileged]
                values[spec.name] = np.array([float(spec.fn(y, scores[i], pred[i].astype(int), a.values, priv))
                                              for i in range(b)])
        per_attr[attr] = values
    for spec in per_attr_specs:
        out[spec.name] = per_attr[primary][spec.name]
    for attr, values in per_attr.items():
        out.update({f"{k}/{attr}": v for k, v in values.items()})
    for spec in per_attr_specs:  # written for one attribute too, so a worst: objective works on every dataset
        out[f"worst:{spec.name}"] = _worst(np.stack([per_attr[a][spec.name] for a in per_attr]), spec)
    return out, counts


def _per_group_table(counts: Mapping[str, GroupCounts]) -> pd.DataFrame:
    frames = []
    for attr, c in counts.items():
        frames.append(pd.DataFrame({
            "attribute": attr, "group": list(c.groups), "n": c.n[0].astype(int), "n_pos": c.n_pos[0].astype(int),
            "accuracy": c.accuracy[0], "tpr": c.tpr[0], "fpr": c.fpr[0], "selection_rate": c.selection_rate[0],
            "auroc": c.auroc[0], "privileged": np.arange(len(c.groups)) == c.privileged,
            "tp": c.tp[0].astype(int), "fp": c.fp[0].astype(int), "tn": c.tn[0].astype(int),
            "fn": c.fn[0].astype(int)}))
    return pd.concat(frames, ignore_index=True)[list(_PER_GROUP_COLUMNS)]


def evaluate(y_true: Sequence[int] | np.ndarray, y_score: Sequence[float] | np.ndarray,
             sensitive: Mapping[str, Sequence[Any] | np.ndarray], *, primary: str,
             threshold: float = 0.5, privileged: Mapping[str, Any] | None = None) -> Evaluation:
    """Every registered metric with predictions ``y_score >= threshold`` (keys: module docstring).

    ``privileged``: attribute -> privileged group for the signed and ratio metrics; an attribute left out
    gets its largest group (ties -> first sorted). Raises ValueError on malformed input, on a privileged
    group that is not a group of its attribute, and when a group lacks a label (TPR/FPR undefined).
    """
    y, s, groups = _validate(y_true, y_score, sensitive, primary, threshold)
    attrs = _attributes(groups, privileged)
    values, counts = _compute(y, s[None, :], attrs, primary, float(threshold))  # built-ins: counts exist
    return Evaluation({k: float(v[0]) for k, v in values.items()}, _per_group_table(counts),
                      {a: x.groups[x.privileged] for a, x in attrs.items()})


def calibrated_threshold(y_true: Sequence[int] | np.ndarray, y_score: Sequence[float] | np.ndarray) -> float:
    """The threshold ``t`` at which the predicted positives (``score >= t``) number as nearly as possible
    the true positives n_pos, so the classifier predicts the observed prevalence.

    ``t`` is always one of the scores (a threshold above them all predicts nothing, which is never the
    intent). Tied scores are predicted together, so an exact match may be impossible: of the distinct
    scores, the one whose count ``#{score >= t}`` is closest to n_pos wins, and between two equally close
    counts (one above n_pos, one below) the higher threshold, i.e. fewer predicted positives.
    """
    y, s = _labels_and_scores(y_true, y_score)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError(f"y_true holds no positive example among {len(y)}; a threshold matching the number of "
                         f"positives (0) would predict nothing; calibrate on data that holds positives")
    distinct = np.unique(s)  # ascending
    predicted = len(s) - np.searchsorted(np.sort(s), distinct, side="left")  # #{score >= t} per candidate t
    miss = np.abs(predicted - n_pos)
    return float(distinct[np.flatnonzero(miss == miss.min())[-1]])  # ties -> the highest threshold


# --- bootstrap -------------------------------------------------------------------------------------------------


def _row_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n within each row, ties sharing their average rank (what the Mann-Whitney AUROC needs): the
    numbers of ``scipy.stats.rankdata(x, axis=1)`` for finite ``x``, computed the same way (a stable sort,
    then each run of equal values given the mean of its positions), without importing scipy.stats, which
    cost each trial worker about 1 s."""
    order = np.argsort(x, axis=1, kind="stable")
    ordered = np.take_along_axis(x, order, axis=1)
    n = x.shape[1]
    starts = np.ones(ordered.shape, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]  # a run of equal values begins here
    ends = np.ones(ordered.shape, dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    position = np.arange(n)
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=1)  # where each value's run begins
    last = np.minimum.accumulate(np.where(ends, position, n)[:, ::-1], axis=1)[:, ::-1]  # and where it ends
    ranks = np.empty(x.shape, dtype=float)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=1)
    return ranks


def _batch_auroc(scores: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """AUROC of every row of ``scores`` (B, n) against the fixed labels ``pos`` (n,) = roc_auc_score per row."""
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    rank_sum = _row_ranks(scores)[:, pos].sum(axis=1)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _batch_average_precision(scores: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """average_precision_score per row: sum over distinct thresholds (descending) of recall step x precision."""
    order = np.argsort(-scores, axis=1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=1)
    tp = np.cumsum(pos[order], axis=1)
    n = scores.shape[1]
    # a threshold is the last position of each run of equal scores
    last = np.ones_like(sorted_scores, dtype=bool)
    last[:, :-1] = sorted_scores[:, :-1] != sorted_scores[:, 1:]
    tp_at_last = np.where(last, tp, 0)
    tp_before = np.zeros_like(tp)
    tp_before[:, 1:] = np.maximum.accumulate(tp_at_last, axis=1)[:, :-1]  # tp is non-decreasing
    precision = tp / np.arange(1, n + 1)
    return np.where(last, (tp - tp_before) * precision, 0.0).sum(axis=1) / pos.sum()


def _cells(y: np.ndarray, groups: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Example indices of each (label, group of every attribute) cell: the bootstrap's strata."""
    keys = pd.DataFrame({"__label__": y, **{f"a{i}": g for i, g in enumerate(groups.values())}})
    return [np.asarray(ix) for ix in keys.groupby(list(keys.columns), sort=True).indices.values()]


def _resample_indices(cells: Sequence[np.ndarray], n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, n) indices; column block c always draws, with replacement, from cell c."""
    blocks = [cell[rng.integers(0, len(cell), size=(n_resamples, len(cell)))] for cell in cells]
    return np.concatenate(blocks, axis=1)


def _interval(draws: np.ndarray, alpha: float) -> tuple[float, float]:
    """Percentile interval of the defined (non-NaN) draws; +-inf draws give +-inf bounds, not NaN."""
    d = draws[~np.isnan(draws)]
    if d.size == 0:
        return math.nan, math.nan
    big = np.finfo(float).max
    with np.errstate(over="ignore", invalid="ignore"):
        low, high = np.quantile(np.clip(d, -big, big), [alpha, 1 - alpha])
    return tuple(float(np.sign(v) * np.inf) if abs(v) >= big else float(v) for v in (low, high))  # type: ignore


def bootstrap_ci(y_true: Sequence[int] | np.ndarray, y_score: Sequence[float] | np.ndarray,
                 sensitive: Mapping[str, Sequence[Any] | np.ndarray], *, primary: str, metrics: Sequence[str],
                 n_resamples: int = 500, confidence: float = 0.95, seed: int = 0,
                 threshold: float = 0.5, privileged: Mapping[str, Any] | None = None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals ``{metric: (low, high)}`` for keys of ``evaluate``.

    Resamples with replacement within each (label, group) cell, where a group is the combination of all
    sensitive attributes, so every cell keeps its size and no resample loses a (label, group) cell (which
    would leave TPR/FPR undefined); the privileged groups are resolved once, on the original sample. The
    intervals thus describe the sampling of examples within a fixed test-set composition. A cell with a
    single example is copied unchanged and adds no spread. Resamples where a metric is undefined (NaN)
    are left out of its interval; (NaN, NaN) if it is undefined in all of them.
    """
    y, s, groups = _validate(y_true, y_score, sensitive, primary, threshold)
    attrs = _attributes(groups, privileged)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer; got {n_resamples!r} (a few hundred is usual)")
    if not isinstance(confidence, numbers.Real) or not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1; got {confidence!r} (e.g. 0.95)")
    if isinstance(metrics, str):
        raise ValueError(f"metrics must be a sequence of metric names; got the string {metrics!r}; "
                         f"wrap it in a list: [{metrics!r}]")
    valid = _keys(list(groups))
    for name in metrics:
        if name not in valid:
            hint = did_you_mean(name, valid, sentence=True)
            raise ValueError(f"metrics holds {name!r}, which evaluate does not report for these attributes; "
                             f"valid: {', '.join(valid)}.{hint}")
    cells = _cells(y, groups)
    order = np.concatenate(cells)
    y_fixed, attrs_fixed = y[order], {a: x.reordered(order) for a, x in attrs.items()}
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // len(y))
    draws: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    for start in range(0, n_resamples, chunk):
        idx = _resample_indices(cells, min(chunk, n_resamples - start), rng)
        batch, _ = _compute(y_fixed, s[idx], attrs_fixed, primary, float(threshold), list(metrics))
        for m in metrics:
            draws[m].append(batch[m])
    alpha = (1 - confidence) / 2
    return {m: _interval(np.concatenate(draws[m]), alpha) for m in metrics}
