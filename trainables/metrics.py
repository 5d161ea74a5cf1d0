"""Performance and group-fairness metrics from predictions (label, score, group).

Fairness gaps use fairlearn's definitions (``between_groups``: the largest minus the smallest group
value), which hold for any number of groups. Every sensitive attribute is evaluated on the same
predictions; the primary one also fills the un-suffixed names the sweep's objectives refer to.
"""
from __future__ import annotations

import difflib
import types
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["METRIC_DIRECTIONS", "PERFORMANCE_METRICS", "FAIRNESS_METRICS", "GROUP_METRICS", "Evaluation",
           "evaluate", "direction", "bootstrap_ci"]

PERFORMANCE_METRICS = ("accuracy", "balanced_accuracy", "auroc", "auprc", "f1")
GROUP_METRICS = ("worst_group_accuracy", "worst_group_auroc", "accuracy_gap", "auroc_gap",
                 "demographic_parity_difference", "equalized_odds_difference", "equal_opportunity_difference")
FAIRNESS_METRICS = tuple(m for m in GROUP_METRICS if not m.startswith("worst_group"))
METRIC_DIRECTIONS: Mapping[str, str] = types.MappingProxyType(
    {**{m: "max" for m in PERFORMANCE_METRICS}, "worst_group_accuracy": "max", "worst_group_auroc": "max",
     **{m: "min" for m in FAIRNESS_METRICS}})


def direction(metric: str) -> str:
    """'max' or 'min' for a metric name, also ``NAME/attribute`` and ``worst:NAME``."""
    base = metric.split(":", 1)[1] if metric.startswith("worst:") else metric
    base = base.split("/", 1)[0]
    if base not in METRIC_DIRECTIONS:
        valid = list(METRIC_DIRECTIONS)
        close = difflib.get_close_matches(base, valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(valid)} (optionally NAME/attribute or "
                         f"worst:NAME).{hint}")
    return METRIC_DIRECTIONS[base]


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    per_group: pd.DataFrame  # attribute, group, n, n_pos, accuracy, tpr, fpr, selection_rate, auroc


def _check(y_true: np.ndarray, y_score: np.ndarray, sensitive: Mapping[str, np.ndarray], primary: str) -> None:
    if y_true.ndim != 1 or y_true.shape != y_score.shape:
        raise ValueError(f"y_true {y_true.shape} and y_score {y_score.shape} must be 1-D and of equal length")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError(f"y_true must be binary 0/1; got values {np.unique(y_true)[:5].tolist()}")
    if len(np.unique(y_true)) < 2:
        raise ValueError("y_true holds a single class; AUROC and the TPR/FPR gaps are undefined")
    if np.isnan(y_score).any() or (y_score < 0).any() or (y_score > 1).any():
        raise ValueError("y_score must be probabilities in [0, 1] without NaN")
    if primary not in sensitive:
        raise ValueError(f"primary attribute {primary!r} is not among the sensitive attributes {list(sensitive)}")
    for name, g in sensitive.items():
        if len(g) != len(y_true):
            raise ValueError(f"sensitive attribute {name!r} has {len(g)} values for {len(y_true)} examples")


def _group_table(attr: str, y: np.ndarray, s: np.ndarray, p: np.ndarray, g: np.ndarray) -> pd.DataFrame:
    from sklearn.metrics import roc_auc_score

    rows = []
    for value in pd.unique(g):
        m = g == value
        yt, yp, ys = y[m], p[m], s[m]
        pos, neg = yt == 1, yt == 0
        if not pos.any() or not neg.any():
            missing = "positive" if not pos.any() else "negative"
            plain = value.item() if isinstance(value, np.generic) else value
            raise ValueError(f"group {plain!r} of attribute {attr!r} has no {missing} examples in the evaluation split; "
                             f"TPR/FPR gaps are undefined (evaluation data must hold every (label, group) cell)")
        rows.append({"attribute": attr, "group": value, "n": int(m.sum()), "n_pos": int(pos.sum()),
                     "accuracy": float((yt == yp).mean()), "tpr": float(yp[pos].mean()), "fpr": float(yp[neg].mean()),
                     "selection_rate": float(yp.mean()), "auroc": float(roc_auc_score(yt, ys))})
    return pd.DataFrame(rows)


def _gaps(table: pd.DataFrame, y: np.ndarray, p: np.ndarray, g: np.ndarray) -> dict[str, float]:
    from fairlearn.metrics import (demographic_parity_difference, equal_opportunity_difference,
                                   equalized_odds_difference)

    return {
        "worst_group_accuracy": float(table["accuracy"].min()),
        "worst_group_auroc": float(table["auroc"].min()),
        "accuracy_gap": float(table["accuracy"].max() - table["accuracy"].min()),
        "auroc_gap": float(table["auroc"].max() - table["auroc"].min()),
        "demographic_parity_difference": float(demographic_parity_difference(y, p, sensitive_features=g)),
        "equalized_odds_difference": float(equalized_odds_difference(y, p, sensitive_features=g)),
        "equal_opportunity_difference": float(equal_opportunity_difference(y, p, sensitive_features=g)),
    }


def evaluate(y_true: Sequence[int], y_score: Sequence[float], sensitive: Mapping[str, Sequence], *, primary: str,
             threshold: float = 0.5) -> Evaluation:
    """All metrics at ``y_score >= threshold``; keys ``NAME`` (primary), ``NAME/attr`` and ``worst:NAME``
    (the worst over attributes; equal to the attribute's own value when there is one)."""
    from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score

    y = np.asarray(y_true).astype(int)
    s = np.asarray(y_score, dtype=float)
    groups = {k: np.asarray(v) for k, v in sensitive.items()}
    _check(y, s, groups, primary)
    p = (s >= threshold).astype(int)
    metrics = {"accuracy": float((p == y).mean()), "balanced_accuracy": float(balanced_accuracy_score(y, p)),
               "auroc": float(roc_auc_score(y, s)), "auprc": float(average_precision_score(y, s)),
               "f1": float(f1_score(y, p, zero_division=0))}
    tables, per_attr = [], {}
    for attr, g in groups.items():
        table = _group_table(attr, y, s, p, g)
        tables.append(table)
        per_attr[attr] = _gaps(table, y, p, g)
        metrics.update({f"{k}/{attr}": v for k, v in per_attr[attr].items()})
    metrics.update(per_attr[primary])
    for k in GROUP_METRICS:  # also with one attribute, so a `worst:` objective works on any dataset
        values = [per_attr[a][k] for a in groups]
        metrics[f"worst:{k}"] = float(min(values) if METRIC_DIRECTIONS[k] == "max" else max(values))
    return Evaluation(metrics, pd.concat(tables, ignore_index=True))


def bootstrap_ci(y_true: Sequence[int], y_score: Sequence[float], sensitive: Mapping[str, Sequence], *, primary: str,
                 metrics: Sequence[str], n_resamples: int = 500, confidence: float = 0.95, seed: int = 0,
                 threshold: float = 0.5) -> dict[str, tuple[float, float]]:
    """Percentile intervals from resampling within each (label, primary group) cell, so every cell stays present."""
    y = np.asarray(y_true).astype(int)
    g = np.asarray(sensitive[primary])
    cells = [np.flatnonzero((y == label) & (g == value)) for label in (0, 1) for value in pd.unique(g)]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {m: [] for m in metrics}
    s = np.asarray(y_score, dtype=float)
    attrs = {k: np.asarray(v) for k, v in sensitive.items()}
    for _ in range(n_resamples):
        idx = np.concatenate([rng.choice(c, size=len(c), replace=True) for c in cells if len(c)])
        ev = evaluate(y[idx], s[idx], {k: v[idx] for k, v in attrs.items()}, primary=primary, threshold=threshold)
        for m in metrics:
            draws[m].append(ev.metrics[m])
    alpha = (1 - confidence) / 2
    return {m: (float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))) for m, v in draws.items()}
