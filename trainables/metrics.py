"""Performance and group-fairness metrics of a binary classifier from (label, score, group) arrays.

Fairness gaps follow fairlearn's ``between_groups`` definitions (largest minus smallest group value),
which hold for any number of groups. Every sensitive attribute is evaluated on the same predictions:
keys ``NAME/attr`` for each attribute, un-suffixed ``NAME`` for the primary one (the names a sweep's
objectives use) and ``worst:NAME``, the worst value over attributes.

``evaluate`` is the reference: it calls fairlearn and scikit-learn. ``bootstrap_ci`` needs hundreds
of resamples, so it recomputes the same definitions on a whole batch of resamples with NumPy
(``_batch_metrics``); the tests hold the two to the same numbers.
"""
from __future__ import annotations

import difflib
import functools
import math
import numbers
import types
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["METRIC_DIRECTIONS", "PERFORMANCE_METRICS", "FAIRNESS_METRICS", "GROUP_METRICS", "OVERALL_METRICS",
           "Evaluation", "evaluate", "direction", "bootstrap_ci"]

OVERALL_METRICS = ("accuracy", "balanced_accuracy", "auroc", "auprc", "f1")
"""Computed over all examples; no ``/attr`` or ``worst:`` forms."""
PERFORMANCE_METRICS: tuple[str, ...] = (*OVERALL_METRICS, "worst_group_accuracy", "worst_group_auroc")
"""Higher is better."""
FAIRNESS_METRICS: tuple[str, ...] = ("accuracy_gap", "auroc_gap", "demographic_parity_difference",
                                     "equalized_odds_difference", "equal_opportunity_difference")
"""Gaps between groups: lower is better."""
GROUP_METRICS: tuple[str, ...] = ("worst_group_accuracy", "worst_group_auroc", *FAIRNESS_METRICS)
"""Computed per sensitive attribute: these take the ``/attr`` and ``worst:`` forms."""
METRIC_DIRECTIONS: Mapping[str, str] = types.MappingProxyType(
    {**{m: "max" for m in PERFORMANCE_METRICS}, **{m: "min" for m in FAIRNESS_METRICS}})

_BOOTSTRAP_CHUNK_ELEMENTS = 2_000_000  # resamples x examples per batch: bounds the bootstrap's memory to ~100 MB
_PER_GROUP_COLUMNS = ("attribute", "group", "n", "n_pos", "accuracy", "tpr", "fpr", "selection_rate", "auroc")


def direction(metric: str) -> str:
    """'max' or 'min' for a key ``evaluate`` produces: ``NAME``, ``NAME/attribute`` or ``worst:NAME``.

    Strict on purpose: the sweep plan validates its objectives with this, so a name ``evaluate``
    never reports (``accuracy/sex``, ``worst:auroc``) fails at plan time, not after the trials ran.
    """
    if not isinstance(metric, str):
        raise ValueError(f"metric name must be a string; got {metric!r} ({type(metric).__name__})")
    base, form = metric, ""
    if metric.startswith("worst:"):
        base, form = metric[len("worst:"):], "worst:"
    elif "/" in metric:
        base, attr = metric.split("/", 1)
        form = "/attr"
        if not attr:
            raise ValueError(f"metric {metric!r} has an empty attribute after '/'; write NAME/ATTRIBUTE, "
                             f"e.g. 'equalized_odds_difference/sex'")
    if base not in METRIC_DIRECTIONS:
        valid = list(GROUP_METRICS) if form else list(METRIC_DIRECTIONS)
        close = difflib.get_close_matches(base, valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown metric {metric!r}; valid names: {', '.join(METRIC_DIRECTIONS)}; the per-attribute "
                         f"ones ({', '.join(GROUP_METRICS)}) also as NAME/ATTRIBUTE and worst:NAME.{hint}")
    if form and base not in GROUP_METRICS:
        raise ValueError(f"metric {metric!r}: {base!r} is computed over all examples, so it has no {form} form; "
                         f"use {base!r}, or one of the per-attribute metrics {', '.join(GROUP_METRICS)}")
    return METRIC_DIRECTIONS[base]


@dataclass(frozen=True)
class Evaluation:
    """Flat metric dict (what the trial reports) plus the per-group table (what the run stores as CSV)."""

    metrics: dict[str, float]
    per_group: pd.DataFrame  # attribute, group, n, n_pos, accuracy, tpr, fpr, selection_rate, auroc


def _plain(value: Any) -> Any:
    """NumPy scalar -> Python scalar, so messages read ``'b'``/``3``, not ``np.str_('b')``."""
    return value.item() if isinstance(value, np.generic) else value


def _validate(y_true: Any, y_score: Any, sensitive: Mapping[str, Any], primary: str,
              threshold: float) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Arrays ready for the metrics, or a ValueError naming the field, the value and the fix."""
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
    y = y_num.astype(int)
    if len(np.unique(y)) < 2:
        raise ValueError(f"y_true holds a single class ({y[0]}) in all {len(y)} examples; AUROC and the TPR/FPR "
                         f"gaps are undefined; evaluate on data that holds both labels")
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


def _auroc_or_nan(y_true: Any, y_score: Any) -> float:
    """AUROC of one group; NaN where the group holds one class (``evaluate`` rejects that case earlier)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y_true, y_score)) if len(np.unique(y_true)) == 2 else math.nan


def _group_table(attr: str, y: np.ndarray, s: np.ndarray, p: np.ndarray, g: np.ndarray) -> pd.DataFrame:
    """One row per group of ``attr``, from fairlearn's MetricFrame."""
    from fairlearn.metrics import (MetricFrame, count, false_positive_rate, selection_rate,
                                   true_positive_rate)
    from sklearn.metrics import accuracy_score

    features = pd.Series(g, name="group")
    rates = MetricFrame(metrics={"n": count, "n_pos": lambda yt, yp: int(np.sum(yt)), "accuracy": accuracy_score,
                                 "tpr": functools.partial(true_positive_rate, pos_label=1),
                                 "fpr": functools.partial(false_positive_rate, pos_label=1),
                                 "selection_rate": selection_rate},
                        y_true=y, y_pred=p, sensitive_features=features).by_group
    auroc = MetricFrame(metrics=_auroc_or_nan, y_true=y, y_pred=s, sensitive_features=features).by_group
    table = rates.assign(auroc=auroc).reset_index()
    table.insert(0, "attribute", attr)
    table["group"] = [_plain(v) for v in table["group"]]
    return table.astype({"n": int, "n_pos": int, "accuracy": float, "tpr": float, "fpr": float,
                         "selection_rate": float, "auroc": float})[list(_PER_GROUP_COLUMNS)]


def _attribute_metrics(table: pd.DataFrame, y: np.ndarray, p: np.ndarray, g: np.ndarray) -> dict[str, float]:
    """GROUP_METRICS of one attribute: the gaps from fairlearn's own functions, the rest from its table."""
    from fairlearn.metrics import (demographic_parity_difference, equal_opportunity_difference,
                                   equalized_odds_difference)

    acc, auroc = table["accuracy"], table["auroc"]
    return {
        "worst_group_accuracy": float(acc.min()),
        "worst_group_auroc": float(auroc.min()),
        "accuracy_gap": float(acc.max() - acc.min()),
        "auroc_gap": float(auroc.max() - auroc.min()),
        "demographic_parity_difference": float(demographic_parity_difference(y, p, sensitive_features=g)),
        "equalized_odds_difference": float(equalized_odds_difference(y, p, sensitive_features=g)),
        "equal_opportunity_difference": float(equal_opportunity_difference(y, p, sensitive_features=g)),
    }


def _combine(overall: dict[str, Any], per_attr: Mapping[str, dict[str, Any]], primary: str) -> dict[str, Any]:
    """The flat key layout shared by ``evaluate`` and the bootstrap.

    ``worst:NAME`` is written for one attribute too (it then equals ``NAME/attr``), so a ``worst:``
    objective works on every dataset.
    """
    out = dict(overall)
    out.update(per_attr[primary])
    for attr, values in per_attr.items():
        out.update({f"{k}/{attr}": v for k, v in values.items()})
    for k in GROUP_METRICS:
        values = [per_attr[a][k] for a in per_attr]  # floats, or (B,) arrays in the bootstrap
        out[f"worst:{k}"] = np.min(values, axis=0) if METRIC_DIRECTIONS[k] == "max" else np.max(values, axis=0)
    return out


def evaluate(y_true: Sequence[int] | np.ndarray, y_score: Sequence[float] | np.ndarray,
             sensitive: Mapping[str, Sequence[Any] | np.ndarray], *, primary: str,
             threshold: float = 0.5) -> Evaluation:
    """All metrics with predictions ``y_score >= threshold``.

    Keys: ``accuracy``, ``balanced_accuracy``, ``auroc``, ``auprc`` (average precision), ``f1``; each of
    GROUP_METRICS un-suffixed (primary attribute), as ``NAME/attr`` for every attribute and as
    ``worst:NAME`` (worst over attributes). Raises ValueError on malformed input and when a group lacks a
    label (TPR/FPR would be undefined: fairlearn would only warn and return NaN).
    """
    from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score

    y, s, groups = _validate(y_true, y_score, sensitive, primary, threshold)
    p = (s >= threshold).astype(int)
    overall = {"accuracy": float(np.mean(p == y)), "balanced_accuracy": float(balanced_accuracy_score(y, p)),
               "auroc": float(roc_auc_score(y, s)), "auprc": float(average_precision_score(y, s)),
               "f1": float(f1_score(y, p, zero_division=0))}
    tables, per_attr = [], {}
    for attr, g in groups.items():
        table = _group_table(attr, y, s, p, g)
        tables.append(table)
        per_attr[attr] = _attribute_metrics(table, y, p, g)
    per_group = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
    return Evaluation({k: float(v) for k, v in _combine(overall, per_attr, primary).items()}, per_group)


# --- bootstrap -------------------------------------------------------------------------------------------------


def _row_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n within each row, ties sharing their average rank (what the Mann-Whitney AUROC needs)."""
    from scipy.stats import rankdata

    return rankdata(x, axis=1)


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


def _batch_metrics(y: np.ndarray, scores: np.ndarray, groups: Mapping[str, np.ndarray], primary: str,
                   threshold: float) -> dict[str, np.ndarray]:
    """Every ``evaluate`` key for each row of ``scores`` (B, n), labels and groups fixed per column.

    Resampling within (label, group) cells keeps each column's label and groups, so only the scores
    differ between resamples and everything reduces to row-wise counts and ranks.
    """
    pos = y == 1
    pred = scores >= threshold
    correct = pred == pos
    n_pos, n_neg = pos.sum(), (~pos).sum()
    tp, fp = (pred & pos).sum(axis=1), (pred & ~pos).sum(axis=1)
    overall = {"accuracy": correct.mean(axis=1),
               "balanced_accuracy": (tp / n_pos + 1 - fp / n_neg) / 2,
               "auroc": _batch_auroc(scores, pos),
               "auprc": _batch_average_precision(scores, pos),
               "f1": 2 * tp / (2 * tp + fp + (n_pos - tp))}
    per_attr = {}
    for attr, g in groups.items():
        rows: dict[str, list[np.ndarray]] = {"accuracy": [], "tpr": [], "fpr": [], "selection_rate": [], "auroc": []}
        for value in pd.unique(g):
            m = g == value
            rows["accuracy"].append(correct[:, m].mean(axis=1))
            rows["tpr"].append(pred[:, m & pos].mean(axis=1))
            rows["fpr"].append(pred[:, m & ~pos].mean(axis=1))
            rows["selection_rate"].append(pred[:, m].mean(axis=1))
            rows["auroc"].append(_batch_auroc(scores[:, m], pos[m]))
        t = {k: np.stack(v, axis=1) for k, v in rows.items()}  # (B, groups)

        def gap(x: np.ndarray) -> np.ndarray:
            return x.max(axis=1) - x.min(axis=1)

        per_attr[attr] = {
            "worst_group_accuracy": t["accuracy"].min(axis=1),
            "worst_group_auroc": t["auroc"].min(axis=1),
            "accuracy_gap": gap(t["accuracy"]),
            "auroc_gap": gap(t["auroc"]),
            "demographic_parity_difference": gap(t["selection_rate"]),
            "equalized_odds_difference": np.maximum(gap(t["tpr"]), gap(t["fpr"])),
            "equal_opportunity_difference": gap(t["tpr"]),
        }
    return _combine(overall, per_attr, primary)


def _cells(y: np.ndarray, groups: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Example indices of each (label, group of every attribute) cell: the bootstrap's strata."""
    keys = pd.DataFrame({"__label__": y, **{f"a{i}": g for i, g in enumerate(groups.values())}})
    return [np.asarray(ix) for ix in keys.groupby(list(keys.columns), sort=True).indices.values()]


def _resample_indices(cells: Sequence[np.ndarray], n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, n) indices; column block c always draws, with replacement, from cell c."""
    blocks = [cell[rng.integers(0, len(cell), size=(n_resamples, len(cell)))] for cell in cells]
    return np.concatenate(blocks, axis=1)


def bootstrap_ci(y_true: Sequence[int] | np.ndarray, y_score: Sequence[float] | np.ndarray,
                 sensitive: Mapping[str, Sequence[Any] | np.ndarray], *, primary: str, metrics: Sequence[str],
                 n_resamples: int = 500, confidence: float = 0.95, seed: int = 0,
                 threshold: float = 0.5) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals ``{metric: (low, high)}`` for keys of ``evaluate``.

    Resamples with replacement within each (label, group) cell, where a group is the combination of all
    sensitive attributes, so every cell keeps its size and no resample loses a (label, group) cell (which
    would leave TPR/FPR undefined). The intervals thus describe the sampling of examples within a fixed
    test-set composition. A cell with a single example is copied unchanged and adds no spread.
    """
    y, s, groups = _validate(y_true, y_score, sensitive, primary, threshold)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer; got {n_resamples!r} (a few hundred is usual)")
    if not isinstance(confidence, numbers.Real) or not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1; got {confidence!r} (e.g. 0.95)")
    if isinstance(metrics, str):
        raise ValueError(f"metrics must be a sequence of metric names; got the string {metrics!r}; "
                         f"wrap it in a list: [{metrics!r}]")
    valid = list(_batch_metrics(y, s[None, :], groups, primary, threshold))
    for name in metrics:
        if name not in valid:
            close = difflib.get_close_matches(str(name), valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"metrics holds {name!r}, which evaluate does not report for these attributes; "
                             f"valid: {', '.join(valid)}.{hint}")
    cells = _cells(y, groups)
    order = np.concatenate(cells)
    y_fixed, groups_fixed = y[order], {a: g[order] for a, g in groups.items()}
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // len(y))
    draws: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    for start in range(0, n_resamples, chunk):
        idx = _resample_indices(cells, min(chunk, n_resamples - start), rng)
        batch = _batch_metrics(y_fixed, s[idx], groups_fixed, primary, threshold)
        for m in metrics:
            draws[m].append(batch[m])
    alpha = (1 - confidence) / 2
    out = {}
    for m in metrics:
        low, high = np.quantile(np.concatenate(draws[m]), [alpha, 1 - alpha])
        out[m] = (float(low), float(high))
    return out
