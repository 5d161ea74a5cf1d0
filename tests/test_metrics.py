"""Metrics against hand-computed confusion counts and independent sklearn/fairlearn calls."""
from __future__ import annotations

import numpy as np
import pytest
from fairlearn.metrics import MetricFrame, true_positive_rate, false_positive_rate
from sklearn.metrics import roc_auc_score

from trainables.metrics import bootstrap_ci, direction, evaluate

# Two groups, 8 examples each. Scores >= 0.5 predict 1.
#   group a: y = 1 1 1 1 0 0 0 0, pred = 1 1 1 0 0 0 0 1 -> TP 3 FN 1 TN 3 FP 1: acc 6/8, TPR 3/4, FPR 1/4, sel 4/8
#   group b: y = 1 1 1 1 0 0 0 0, pred = 1 0 0 0 0 0 0 0 -> TP 1 FN 3 TN 4 FP 0: acc 5/8, TPR 1/4, FPR 0,   sel 1/8
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0] * 2)
S = np.array([.9, .8, .7, .2, .1, .3, .4, .6, .9, .4, .3, .2, .1, .1, .2, .3])
G = np.array(["a"] * 8 + ["b"] * 8)


def test_hand_computed_two_groups():
    ev = evaluate(Y, S, {"sex": G}, primary="sex")
    m = ev.metrics
    assert m["accuracy"] == pytest.approx(11 / 16)
    assert m["worst_group_accuracy"] == pytest.approx(5 / 8)
    assert m["accuracy_gap"] == pytest.approx(1 / 8)
    assert m["equal_opportunity_difference"] == pytest.approx(3 / 4 - 1 / 4)
    assert m["equalized_odds_difference"] == pytest.approx(max(3 / 4 - 1 / 4, 1 / 4 - 0))
    assert m["demographic_parity_difference"] == pytest.approx(4 / 8 - 1 / 8)
    assert m["balanced_accuracy"] == pytest.approx(((4 / 8) + (7 / 8)) / 2)  # TPR 4/8, TNR 7/8 overall
    assert m["auroc"] == pytest.approx(roc_auc_score(Y, S))
    assert m["equalized_odds_difference/sex"] == m["equalized_odds_difference"]
    row = ev.per_group.set_index("group").loc["b"]
    assert (row["n"], row["n_pos"], row["tpr"], row["fpr"]) == (8, 4, 0.25, 0.0)


def test_three_groups_match_fairlearn_metricframe():
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 150)
    g = np.repeat([0, 1, 2], 100)
    s = np.clip(0.5 + 0.3 * (y - 0.5) + 0.1 * g - 0.1 + rng.normal(0, 0.25, len(y)), 0, 1)
    ev = evaluate(y, s, {"age": g}, primary="age")
    p = (s >= 0.5).astype(int)
    mf = MetricFrame(metrics={"tpr": true_positive_rate, "fpr": false_positive_rate}, y_true=y, y_pred=p, sensitive_features=g)
    gaps = mf.difference()
    assert ev.metrics["equal_opportunity_difference"] == pytest.approx(gaps["tpr"])
    assert ev.metrics["equalized_odds_difference"] == pytest.approx(max(gaps["tpr"], gaps["fpr"]))
    accs = [float((p[g == k] == y[g == k]).mean()) for k in range(3)]
    assert ev.metrics["worst_group_accuracy"] == pytest.approx(min(accs))
    assert ev.metrics["accuracy_gap"] == pytest.approx(max(accs) - min(accs))
    assert len(ev.per_group) == 3


def test_several_attributes_and_worst_keys():
    age = np.array([0, 1] * 8)
    ev = evaluate(Y, S, {"sex": G, "age": age}, primary="sex")
    m = ev.metrics
    assert m["equalized_odds_difference"] == m["equalized_odds_difference/sex"]
    assert m["worst:equalized_odds_difference"] == max(m["equalized_odds_difference/sex"], m["equalized_odds_difference/age"])
    assert m["worst:worst_group_accuracy"] == min(m["worst_group_accuracy/sex"], m["worst_group_accuracy/age"])
    assert set(ev.per_group["attribute"]) == {"sex", "age"}


def test_threshold_changes_predictions():
    assert evaluate(Y, S, {"g": G}, primary="g", threshold=0.05).metrics["accuracy"] == 0.5


@pytest.mark.parametrize("y, s, g, fragment", [
    (Y, S[:-1], G, "equal length"),
    (Y * 2, S, G, "binary"),
    (np.ones(16, int), S, G, "single class"),
    (Y, S + 1, G, "[0, 1]"),
    (Y, np.where(np.arange(16) == 3, np.nan, S), G, "NaN"),
    (Y, S, np.array(["a"] * 8 + ["b"] * 4 + ["c"] * 4), "group 'b' of attribute 'sex' has no negative"),
])
def test_bad_input_is_named(y, s, g, fragment):
    with pytest.raises(ValueError) as info:
        evaluate(y, s, {"sex": g}, primary="sex")
    assert fragment in str(info.value)


def test_direction_and_unknown_metric():
    assert direction("accuracy") == "max" and direction("equalized_odds_difference/sex") == "min"
    assert direction("worst:worst_group_accuracy") == "max"
    with pytest.raises(ValueError, match="Did you mean 'equalized_odds_difference'"):
        direction("equalised_odds_difference")


def test_bootstrap_interval_contains_point_estimate_and_narrows_with_data():
    rng = np.random.default_rng(1)
    def sample(n):
        y = np.tile([0, 1], n // 2); g = np.repeat([0, 1], n // 2)
        return y, np.clip(0.5 + 0.4 * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1), g
    y, s, g = sample(200)
    ci = bootstrap_ci(y, s, {"g": g}, primary="g", metrics=["accuracy"], n_resamples=100, seed=0)
    point = evaluate(y, s, {"g": g}, primary="g").metrics["accuracy"]
    assert ci["accuracy"][0] <= point <= ci["accuracy"][1]
    y2, s2, g2 = sample(2000)
    ci2 = bootstrap_ci(y2, s2, {"g": g2}, primary="g", metrics=["accuracy"], n_resamples=100, seed=0)
    assert ci2["accuracy"][1] - ci2["accuracy"][0] < ci["accuracy"][1] - ci["accuracy"][0]


def test_worst_keys_exist_for_a_single_attribute():
    m = evaluate(Y, S, {"sex": G}, primary="sex").metrics
    assert m["worst:equalized_odds_difference"] == m["equalized_odds_difference"]
    assert m["worst:worst_group_accuracy"] == m["worst_group_accuracy"]
