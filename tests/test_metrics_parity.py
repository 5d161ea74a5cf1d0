"""Signed and ratio metrics against a privileged group, the privileged-group rules, calibrated_threshold."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from fairlearn.metrics import (MetricFrame, demographic_parity_ratio, false_negative_rate, false_positive_rate,
                               selection_rate, true_positive_rate)
from sklearn.metrics import accuracy_score, precision_score

from trainables.metrics import bootstrap_ci, calibrated_threshold, evaluate

SIGNED = ("tpr_difference", "fpr_difference", "statistical_parity_difference")
DEVIATIONS = {"disparate_impact_deviation": "sel", "fpr_ratio_deviation": "fpr", "fnr_ratio_deviation": "fnr",
              "fdr_ratio_deviation": "fdr", "for_ratio_deviation": "for", "error_rate_ratio_deviation": "err"}
NEW = (*SIGNED, "average_absolute_odds_difference", "disparate_impact_ratio", *DEVIATIONS)

# The two-group example of test_metrics.py. Scores >= 0.5 predict 1.
#   group a: y = 1 1 1 1 0 0 0 0, pred = 1 1 1 0 0 0 0 1 -> TP 3 FN 1 TN 3 FP 1
#   group b: y = 1 1 1 1 0 0 0 0, pred = 1 0 0 0 0 0 0 0 -> TP 1 FN 3 TN 4 FP 0
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0] * 2)
S = np.array([.9, .8, .7, .2, .1, .3, .4, .6, .9, .4, .3, .2, .1, .1, .2, .3])
G = np.array(["a"] * 8 + ["b"] * 8)


def test_hand_computed_two_groups_privileged_a():
    # rates  a (privileged)          b (unprivileged)
    #   TPR  3/4                     1/4
    #   FPR  1/4                     0
    #   FNR  1/4                     3/4
    #   sel  4/8                     1/8
    #   FDR  FP/(TP+FP) = 1/4        0/1 = 0
    #   FOR  FN/(FN+TN) = 1/4        3/7
    #   err  2/8                     3/8
    m = evaluate(Y, S, {"sex": G}, primary="sex", privileged={"sex": "a"}).metrics
    assert m["tpr_difference"] == pytest.approx(1 / 4 - 3 / 4)  # a model favouring the privileged: negative
    assert m["fpr_difference"] == pytest.approx(0 - 1 / 4)
    assert m["statistical_parity_difference"] == pytest.approx(1 / 8 - 4 / 8)
    assert m["average_absolute_odds_difference"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert m["disparate_impact_ratio"] == pytest.approx((1 / 8) / (4 / 8))
    assert m["disparate_impact_deviation"] == pytest.approx(1 - 1 / 4)
    assert m["fpr_ratio_deviation"] == pytest.approx(1)  # |1 - 0 / (1/4)|
    assert m["fnr_ratio_deviation"] == pytest.approx(2)  # |1 - (3/4) / (1/4)|
    assert m["fdr_ratio_deviation"] == pytest.approx(1)  # |1 - 0 / (1/4)|
    assert m["for_ratio_deviation"] == pytest.approx(5 / 7)  # |1 - (3/7) / (1/4)| = |1 - 12/7|
    assert m["error_rate_ratio_deviation"] == pytest.approx(1 / 2)  # |1 - (3/8) / (2/8)|


def test_hand_computed_two_groups_privileged_b_flips_signs_and_divides_by_zero():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division warnings
        m = evaluate(Y, S, {"sex": G}, primary="sex", privileged={"sex": "b"}).metrics
    assert m["tpr_difference"] == pytest.approx(3 / 4 - 1 / 4)
    assert m["fpr_difference"] == pytest.approx(1 / 4)
    assert m["statistical_parity_difference"] == pytest.approx(3 / 8)
    assert m["average_absolute_odds_difference"] == pytest.approx(3 / 8)  # symmetric
    assert m["disparate_impact_ratio"] == pytest.approx(4)
    assert m["disparate_impact_deviation"] == pytest.approx(3)
    assert m["fpr_ratio_deviation"] == math.inf  # privileged FPR 0, unprivileged 1/4
    assert m["fdr_ratio_deviation"] == math.inf  # privileged FDR 0/1, unprivileged 1/4
    assert m["fnr_ratio_deviation"] == pytest.approx(2 / 3)  # |1 - (1/4) / (3/4)|


def test_hand_computed_three_groups():
    # group 0: y = 1 1 0 0     pred = 1 1 0 0     -> TP 2 FN 0 TN 2 FP 0: TPR 1,   FPR 0,   sel 1/2, err 0
    # group 1: y = 1 1 0 0     pred = 1 0 1 0     -> TP 1 FN 1 TN 1 FP 1: TPR 1/2, FPR 1/2, sel 1/2, err 1/2
    # group 2: y = 1 1 1 0 0 0 pred = 0 0 1 1 0 0 -> TP 1 FN 2 TN 2 FP 1: TPR 1/3, FPR 1/3, sel 1/3, err 1/2
    # FDR = FP/(TP+FP): 0, 1/2, 1/2; FOR = FN/(FN+TN): 0, 1/2, 1/2; FNR: 0, 1/2, 2/3
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0])
    s = np.array([.9, .8, .2, .1, .7, .4, .6, .3, .2, .3, .55, .65, .1, .05])
    g = np.array([0] * 4 + [1] * 4 + [2] * 6)
    # default privileged: group 2, the largest (6 examples)
    ev = evaluate(y, s, {"site": g}, primary="site")
    m = ev.metrics
    assert ev.privileged == {"site": 2}
    assert m["tpr_difference"] == pytest.approx(1 - 1 / 3)  # vs 1/2 - 1/3 for group 1: group 0 is farther
    assert m["fpr_difference"] == pytest.approx(0 - 1 / 3)  # vs +1/6: the farther one, sign kept
    assert m["statistical_parity_difference"] == pytest.approx(1 / 2 - 1 / 3)  # both 1/6: the first, group 0
    assert m["average_absolute_odds_difference"] == pytest.approx((2 / 3 + 1 / 3) / 2)  # group 1: 1/6
    assert m["disparate_impact_ratio"] == pytest.approx((1 / 2) / (1 / 3))
    assert m["disparate_impact_deviation"] == pytest.approx(1 / 2)
    assert m["fnr_ratio_deviation"] == pytest.approx(1)  # group 0: |1 - 0/(2/3)| = 1; group 1: 1/4
    assert m["error_rate_ratio_deviation"] == pytest.approx(1)  # group 0: |1 - 0/(1/2)|; group 1: 0
    # privileged group 0: rates of 0 in the denominator
    m = evaluate(y, s, {"site": g}, primary="site", privileged={"site": 0}).metrics
    assert m["tpr_difference"] == pytest.approx(1 / 3 - 1)  # group 2; group 1: -1/2
    assert m["fpr_difference"] == pytest.approx(1 / 2)  # group 1; group 2: 1/3
    assert m["statistical_parity_difference"] == pytest.approx(1 / 3 - 1 / 2)  # group 2; group 1: 0
    assert m["average_absolute_odds_difference"] == pytest.approx(1 / 2)  # both: (1/2 + 1/2)/2, (2/3 + 1/3)/2
    assert m["disparate_impact_ratio"] == pytest.approx(2 / 3)  # group 2; group 1: 1
    assert m["disparate_impact_deviation"] == pytest.approx(1 / 3)
    for name in ("fpr_ratio_deviation", "fdr_ratio_deviation", "for_ratio_deviation", "error_rate_ratio_deviation"):
        assert m[name] == math.inf, name  # privileged rate 0, unprivileged > 0
    assert m["fnr_ratio_deviation"] == math.inf


def _reference(y, p, g, privileged):
    """The definitions, one group at a time in plain Python, rates from fairlearn / scikit-learn."""
    rates = MetricFrame(metrics={"tpr": true_positive_rate, "fpr": false_positive_rate, "fnr": false_negative_rate,
                                 "sel": selection_rate,
                                 "err": lambda a, b: 1 - accuracy_score(a, b),
                                 "fdr": lambda a, b: 1 - precision_score(a, b, zero_division=np.nan),
                                 "for": lambda a, b: 1 - precision_score(1 - a, 1 - b, zero_division=np.nan)},
                        y_true=y, y_pred=p, sensitive_features=g).by_group
    priv = rates.loc[privileged]
    others = rates.drop(index=privileged)

    def farthest(values, target):
        values = [v for v in values if not math.isnan(v)]
        return max(values, key=lambda v: abs(v - target)) if values else math.nan

    def ratio(u, q):
        if math.isnan(u) or math.isnan(q):
            return math.nan
        return u / q if q else (1.0 if u == 0 else math.inf)

    out = {"tpr_difference": farthest(others["tpr"] - priv["tpr"], 0),
           "fpr_difference": farthest(others["fpr"] - priv["fpr"], 0),
           "statistical_parity_difference": farthest(others["sel"] - priv["sel"], 0),
           "average_absolute_odds_difference": max((abs(r.tpr - priv.tpr) + abs(r.fpr - priv.fpr)) / 2
                                                   for r in others.itertuples()),
           "disparate_impact_ratio": farthest([ratio(u, priv["sel"]) for u in others["sel"]], 1)}
    for name, rate in DEVIATIONS.items():
        out[name] = abs(1 - farthest([ratio(u, priv[rate]) for u in others[rate]], 1))
    return out


def test_every_attribute_against_fairlearn_with_k_above_two():
    rng = np.random.default_rng(0)
    n = 900
    y = rng.integers(0, 2, n)
    attrs = {"sex": rng.choice(["female", "male"], n, p=[0.4, 0.6]), "age": rng.integers(0, 4, n),
             "site": rng.choice(["n", "s", "e"], n)}
    shift = 0.15 * (attrs["sex"] == "male") - 0.05 * attrs["age"]
    s = np.clip(0.45 + 0.3 * (y - 0.5) + shift + rng.normal(0, 0.2, n), 0, 1)
    p = (s >= 0.5).astype(int)
    for privileged in ({}, {"sex": "female", "age": 3, "site": "e"}):
        ev = evaluate(y, s, attrs, primary="sex", privileged=privileged)
        for attr, g in attrs.items():
            priv = privileged.get(attr, max(sorted(set(g)), key=lambda v: (g == v).sum()))
            assert ev.privileged[attr] == priv
            for name, value in _reference(y, p, g, priv).items():
                assert ev.metrics[f"{name}/{attr}"] == pytest.approx(value, abs=1e-12), (name, attr, priv)
        for name in NEW:
            assert ev.metrics[name] == ev.metrics[f"{name}/sex"]
            assert np.isfinite(ev.metrics[name])


def test_disparate_impact_ratio_equals_fairlearns_ratio_when_the_privileged_is_selected_more():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    g = rng.choice(["p", "u"], 400)
    s = np.clip(0.5 + 0.3 * (y - 0.5) + 0.1 * (g == "p") + rng.normal(0, 0.2, 400), 0, 1)
    p = (s >= 0.5).astype(int)
    m = evaluate(y, s, {"g": g}, primary="g", privileged={"g": "p"}).metrics
    assert p[g == "p"].mean() > p[g == "u"].mean()
    assert m["disparate_impact_ratio"] == pytest.approx(demographic_parity_ratio(y, p, sensitive_features=g))
    assert m["disparate_impact_deviation"] == pytest.approx(1 - demographic_parity_ratio(y, p, sensitive_features=g))


def test_sign_convention_a_model_favouring_the_privileged_is_negative():
    rng = np.random.default_rng(2)
    y = np.tile([0, 1], 300)
    g = np.repeat(["priv", "unpriv"], 300)
    s = np.clip(0.5 + 0.3 * (y - 0.5) + 0.15 * (g == "priv") - 0.15 * (g == "unpriv") + rng.normal(0, 0.15, 600),
                0, 1)
    m = evaluate(y, s, {"g": g}, primary="g", privileged={"g": "priv"}).metrics
    assert m["tpr_difference"] < -0.2 and m["statistical_parity_difference"] < -0.2 and m["fpr_difference"] < 0
    assert m["disparate_impact_ratio"] < 1
    flipped = evaluate(y, s, {"g": g}, primary="g", privileged={"g": "unpriv"}).metrics
    for name in SIGNED:
        assert flipped[name] == pytest.approx(-m[name])


def test_worst_of_a_signed_metric_keeps_the_sign_of_the_largest_magnitude():
    m = evaluate(Y, S, {"sex": G, "half": np.array([0, 1] * 8)}, primary="half", privileged={"sex": "a"}).metrics
    values = [m["tpr_difference/sex"], m["tpr_difference/half"]]
    assert m["worst:tpr_difference"] == max(values, key=abs) == pytest.approx(-1 / 2)
    assert m["worst:disparate_impact_ratio"] == max([m["disparate_impact_ratio/sex"],
                                                     m["disparate_impact_ratio/half"]], key=lambda v: abs(1 - v))


def test_undefined_rates_are_nan_and_skipped_for_k_above_two():
    # FDR = FP/(TP+FP) is undefined in a group with no predicted positive.
    #   x: y 1 1 0 0, pred 1 0 1 0 -> FDR 1/2       y: y 1 1 0 0, pred 0 0 0 0 -> FDR undefined
    #   z: y 1 1 0 0, pred 1 1 0 0 -> FDR 0
    y = np.array([1, 1, 0, 0] * 3)
    s = np.array([.9, .1, .9, .1, .1, .1, .1, .1, .9, .9, .1, .1])
    g = np.repeat(["x", "y", "z"], 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two = evaluate(y[:8], s[:8], {"g": g[:8]}, primary="g", privileged={"g": "x"}).metrics
        three = evaluate(y, s, {"g": g}, primary="g", privileged={"g": "x"}).metrics
        undefined_privileged = evaluate(y, s, {"g": g}, primary="g", privileged={"g": "y"}).metrics
        ci = bootstrap_ci(y, s, {"g": g}, primary="g", privileged={"g": "y"}, n_resamples=30,
                          metrics=["fdr_ratio_deviation", "fpr_ratio_deviation", "worst:fdr_ratio_deviation"])
    assert math.isnan(two["fdr_ratio_deviation"])  # the only unprivileged group has no FDR
    assert three["fdr_ratio_deviation"] == pytest.approx(1)  # y skipped; z: |1 - 0/(1/2)|
    assert math.isnan(undefined_privileged["fdr_ratio_deviation"])  # no FDR to compare with
    assert math.isnan(undefined_privileged["worst:fdr_ratio_deviation"])
    assert all(math.isnan(v) for v in ci["fdr_ratio_deviation"])
    assert undefined_privileged["fpr_ratio_deviation"] == math.inf  # y's FPR is 0, x's is 1/2
    assert ci["fpr_ratio_deviation"][1] == math.inf


def test_privileged_defaults_and_errors():
    g = np.array(["b"] * 8 + ["a"] * 8)  # a tie: the first sorted, 'a'
    assert evaluate(Y, S, {"sex": g}, primary="sex").privileged == {"sex": "a"}
    big = np.array(["b"] * 10 + ["a"] * 6)
    assert evaluate(Y, S, {"sex": big}, primary="sex").privileged == {"sex": "b"}
    codes = np.array([0] * 8 + [1] * 8)
    assert evaluate(Y, S, {"sex": codes}, primary="sex", privileged={"sex": 1.0}).privileged == {"sex": 1}
    assert evaluate(Y, S, {"sex": codes}, primary="sex", privileged={"sex": np.int64(1)}).privileged == {"sex": 1}
    with pytest.raises(ValueError, match=r"privileged group 'c' of attribute 'sex' is not one of its groups in the "
                                         r"evaluated split: \['a', 'b'\]"):
        evaluate(Y, S, {"sex": G}, primary="sex", privileged={"sex": "c"})
    with pytest.raises(ValueError, match=r"privileged group '1' of attribute 'sex' is not one of .*\[0, 1\]"):
        evaluate(Y, S, {"sex": codes}, primary="sex", privileged={"sex": "1"})
    with pytest.raises(ValueError, match=r"privileged group True of attribute 'sex'"):
        evaluate(Y, S, {"sex": codes}, primary="sex", privileged={"sex": True})
    with pytest.raises(ValueError, match=r"privileged names attribute\(s\) \['age'\] .* they are: \['sex'\]"):
        evaluate(Y, S, {"sex": G}, primary="sex", privileged={"age": "a"})
    with pytest.raises(ValueError, match="privileged must map attribute -> its privileged group"):
        evaluate(Y, S, {"sex": G}, primary="sex", privileged="a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="privileged group 'c' of attribute 'sex'"):
        bootstrap_ci(Y, S, {"sex": G}, primary="sex", privileged={"sex": "c"}, metrics=["accuracy"])


def test_datasets_can_name_their_privileged_groups():
    from trainables.data.base import Dataset

    assert dict(Dataset.privileged) == {}
    with pytest.raises(TypeError):
        Dataset.privileged["sex"] = "male"  # type: ignore[index]  # shared default is read-only


def test_single_group_attribute_is_parity():
    m = evaluate(Y, S, {"sex": G, "all": np.zeros(16, int)}, primary="all").metrics
    assert (m["tpr_difference"], m["disparate_impact_ratio"], m["fdr_ratio_deviation"],
            m["average_absolute_odds_difference"]) == (0, 1, 0, 0)


# --- calibrated_threshold --------------------------------------------------------------------------------------


def _brute_force_threshold(y, s):
    """Every distinct score as threshold; the count closest to n_pos; equally close -> the higher threshold."""
    n_pos = int(y.sum())
    best = None
    for t in sorted(set(s.tolist())):
        miss = abs(int((s >= t).sum()) - n_pos)
        if best is None or miss <= best[0]:
            best = (miss, t)
    return best[1]


def test_calibrated_threshold_against_brute_force():
    rng = np.random.default_rng(0)
    for case in range(600):
        n = int(rng.integers(1, 60))
        kind = case % 4
        if kind == 0:  # continuous scores, any balance
            y, s = rng.integers(0, 2, n), rng.random(n)
        elif kind == 1:  # heavy ties
            y, s = rng.integers(0, 2, n), np.round(rng.random(n), 1)
        elif kind == 2:  # extreme balance: one positive, or all but one
            y = np.zeros(n, int) if rng.random() < 0.5 else np.ones(n, int)
            y[rng.integers(0, n)] = 1 - y[0] if n > 1 else 1
            s = np.round(rng.random(n), int(rng.integers(0, 3)))
        else:  # a handful of distinct values, incl. 0 and 1
            y, s = rng.integers(0, 2, n), rng.choice([0.0, 0.5, 1.0], n)
        if y.sum() == 0:
            y[0] = 1
        t = calibrated_threshold(y, s)
        assert t == _brute_force_threshold(y, s), (case, y, s)
        # and nothing in a fine grid (above the smallest count 0) does better
        miss = abs(int((s >= t).sum()) - y.sum())
        for u in np.linspace(0, s.max(), 101):
            assert abs(int((s >= u).sum()) - y.sum()) >= miss


def test_calibrated_threshold_examples_and_errors():
    # 2 positives; scores .9 .8 .8 .1: t = .9 predicts 1, t = .8 predicts 3: equally close -> the higher, .9
    assert calibrated_threshold([1, 1, 0, 0], [.9, .8, .8, .1]) == 0.9
    # 3 positives: t = .8 predicts exactly 3
    assert calibrated_threshold([1, 1, 1, 0], [.9, .8, .8, .1]) == 0.8
    assert calibrated_threshold([1, 0, 0], [.5, .5, .5]) == 0.5  # one tie block: the only candidate
    assert calibrated_threshold([True, False], [0.2, 0.7]) == 0.7
    with pytest.raises(ValueError, match="y_true holds no positive example among 3"):
        calibrated_threshold([0, 0, 0], [.1, .2, .3])
    with pytest.raises(ValueError, match="y_score must be probabilities in \\[0, 1\\]"):
        calibrated_threshold([0, 1], [0.1, 3.0])
    with pytest.raises(ValueError, match="y_true has 2 labels but y_score has 1"):
        calibrated_threshold([0, 1], [0.1])
