"""Metrics against hand-computed confusion counts and independent sklearn/fairlearn calls."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from fairlearn.metrics import (MetricFrame, demographic_parity_difference, equalized_odds_difference,
                               false_positive_rate, true_positive_rate)
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from tests.helpers import batch_metrics
from trainables.metrics import (FAIRNESS_METRICS, GROUP_METRICS, METRIC_DIRECTIONS, OVERALL_METRICS,
                                PERFORMANCE_METRICS, REPORTED_METRICS, _cells, _resample_indices,
                                bootstrap_ci, direction, evaluate, is_signed)

# Two groups with string labels, 8 examples each. Scores >= 0.5 predict 1.
#   group a: y = 1 1 1 1 0 0 0 0, pred = 1 1 1 0 0 0 0 1 -> TP 3 FN 1 TN 3 FP 1: acc 6/8, TPR 3/4, FPR 1/4, sel 4/8
#   group b: y = 1 1 1 1 0 0 0 0, pred = 1 0 0 0 0 0 0 0 -> TP 1 FN 3 TN 4 FP 0: acc 5/8, TPR 1/4, FPR 0,   sel 1/8
#   overall: TP 4 FN 4 TN 7 FP 1
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0] * 2)
S = np.array([.9, .8, .7, .2, .1, .3, .4, .6, .9, .4, .3, .2, .1, .1, .2, .3])
G = np.array(["a"] * 8 + ["b"] * 8)


def test_hand_computed_two_groups():
    ev = evaluate(Y, S, {"sex": G}, primary="sex")
    m = ev.metrics
    assert m["accuracy"] == pytest.approx(11 / 16)
    assert m["balanced_accuracy"] == pytest.approx((4 / 8 + 7 / 8) / 2)  # TPR 4/8, TNR 7/8 overall
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 4))  # 2TP / (2TP + FP + FN)
    assert m["f1"] == pytest.approx(f1_score(Y, S >= 0.5))
    assert m["auroc"] == pytest.approx(roc_auc_score(Y, S))
    assert m["auprc"] == pytest.approx(average_precision_score(Y, S))
    assert m["worst_group_accuracy"] == pytest.approx(5 / 8)
    assert m["accuracy_gap"] == pytest.approx(1 / 8)
    assert m["equal_opportunity_difference"] == pytest.approx(3 / 4 - 1 / 4)
    assert m["equalized_odds_difference"] == pytest.approx(max(3 / 4 - 1 / 4, 1 / 4 - 0))
    assert m["demographic_parity_difference"] == pytest.approx(4 / 8 - 1 / 8)
    # group AUROCs, positive-negative pairs ranked right (a tie counts 1/2):
    #   a: positives .9 .8 .7 .2 vs negatives .1 .3 .4 .6 -> 4 + 4 + 4 + 1 = 13 of 16
    #   b: positives .9 .4 .3 .2 vs negatives .1 .1 .2 .3 -> 4 + 4 + 3.5 + 2.5 = 14 of 16
    assert m["worst_group_auroc"] == pytest.approx(13 / 16)
    assert m["auroc_gap"] == pytest.approx(1 / 16)
    for key in GROUP_METRICS:
        assert m[f"{key}/sex"] == m[key]
    table = ev.per_group.set_index("group")
    assert list(ev.per_group.columns) == ["attribute", "group", "n", "n_pos", "accuracy", "tpr", "fpr",
                                          "selection_rate", "auroc", "privileged", "tp", "fp", "tn", "fn"]
    # both groups have 8 examples: the default privileged group is the first sorted, 'a'
    assert table["privileged"].to_dict() == {"a": True, "b": False} and ev.privileged == {"sex": "a"}
    assert table.loc["a", ["tp", "fp", "tn", "fn"]].tolist() == [3, 1, 3, 1]
    assert table.loc["b", ["tp", "fp", "tn", "fn"]].tolist() == [1, 0, 4, 3]
    assert table.loc["a", ["n", "n_pos", "accuracy", "tpr", "fpr", "selection_rate", "auroc"]].tolist() == \
        pytest.approx([8, 4, 6 / 8, 3 / 4, 1 / 4, 4 / 8, 13 / 16])
    assert table.loc["b", ["n", "n_pos", "accuracy", "tpr", "fpr", "selection_rate", "auroc"]].tolist() == \
        pytest.approx([8, 4, 5 / 8, 1 / 4, 0.0, 1 / 8, 14 / 16])
    assert (ev.per_group["attribute"] == "sex").all()


def test_hand_computed_three_integer_groups():
    # group 0: y = 1 1 0 0     pred = 1 1 0 0     -> TP 2 FN 0 TN 2 FP 0: acc 1,   TPR 1,   FPR 0,   sel 2/4
    # group 1: y = 1 1 0 0     pred = 1 0 1 0     -> TP 1 FN 1 TN 1 FP 1: acc 1/2, TPR 1/2, FPR 1/2, sel 2/4
    # group 2: y = 1 1 1 0 0 0 pred = 0 0 1 1 0 0 -> TP 1 FN 2 TN 2 FP 1: acc 1/2, TPR 1/3, FPR 1/3, sel 2/6
    # AUROC: group 0 all 4 pairs right (1); group 1: .7>.6 .7>.3 .4>.3, .4<.6 (3/4);
    #        group 2: each of .2 .3 .55 beats .1 .05, loses to .65 (6/9)
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0])
    s = np.array([.9, .8, .2, .1, .7, .4, .6, .3, .2, .3, .55, .65, .1, .05])
    g = np.array([0] * 4 + [1] * 4 + [2] * 6)
    m = evaluate(y, s, {"site": g}, primary="site").metrics
    assert m["accuracy"] == pytest.approx(9 / 14)
    assert m["worst_group_accuracy"] == pytest.approx(1 / 2)
    assert m["accuracy_gap"] == pytest.approx(1 / 2)
    assert m["demographic_parity_difference"] == pytest.approx(2 / 4 - 2 / 6)
    assert m["equal_opportunity_difference"] == pytest.approx(1 - 1 / 3)
    assert m["equalized_odds_difference"] == pytest.approx(max(1 - 1 / 3, 1 / 2 - 0))
    assert m["worst_group_auroc"] == pytest.approx(6 / 9)
    assert m["auroc_gap"] == pytest.approx(1 - 6 / 9)


def test_three_groups_match_fairlearn_and_sklearn():
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 150)
    g = np.repeat(["lo", "mid", "hi"], 100)
    s = np.clip(0.5 + 0.3 * (y - 0.5) + 0.1 * (g == "hi") + rng.normal(0, 0.25, len(y)), 0, 1)
    ev = evaluate(y, s, {"age": g}, primary="age")
    p = (s >= 0.5).astype(int)
    mf = MetricFrame(metrics={"tpr": true_positive_rate, "fpr": false_positive_rate}, y_true=y, y_pred=p,
                     sensitive_features=g)
    gaps = mf.difference()
    assert ev.metrics["equal_opportunity_difference"] == pytest.approx(gaps["tpr"])
    assert ev.metrics["equalized_odds_difference"] == pytest.approx(max(gaps["tpr"], gaps["fpr"]))
    rates = [p[g == k].mean() for k in ("lo", "mid", "hi")]
    assert ev.metrics["demographic_parity_difference"] == pytest.approx(max(rates) - min(rates))
    assert ev.metrics["demographic_parity_difference"] == pytest.approx(
        demographic_parity_difference(y, p, sensitive_features=g))
    accs = {k: float((p[g == k] == y[g == k]).mean()) for k in ("lo", "mid", "hi")}
    aurocs = {k: roc_auc_score(y[g == k], s[g == k]) for k in ("lo", "mid", "hi")}
    assert ev.metrics["worst_group_accuracy"] == pytest.approx(min(accs.values()))
    assert ev.metrics["accuracy_gap"] == pytest.approx(max(accs.values()) - min(accs.values()))
    assert ev.metrics["worst_group_auroc"] == pytest.approx(min(aurocs.values()))
    table = ev.per_group.set_index("group")
    assert len(table) == 3
    for k in ("lo", "mid", "hi"):
        assert table.loc[k, "auroc"] == pytest.approx(aurocs[k])
        assert table.loc[k, "accuracy"] == pytest.approx(accs[k])
        assert table.loc[k, "n"] == 100


def test_several_attributes_suffixed_and_worst_keys():
    age = np.array([0, 1] * 8)
    site = np.array(["n", "n", "s", "s"] * 4)
    ev = evaluate(Y, S, {"sex": G, "age": age, "site": site}, primary="age")
    m = ev.metrics
    expected = set(OVERALL_METRICS) | set(GROUP_METRICS) | {f"worst:{k}" for k in GROUP_METRICS} | {
        f"{k}/{a}" for k in GROUP_METRICS for a in ("sex", "age", "site")}
    assert set(m) == expected
    for attr, codes in {"sex": G, "age": age, "site": site}.items():
        alone = evaluate(Y, S, {attr: codes}, primary=attr).metrics
        for k in GROUP_METRICS:
            assert m[f"{k}/{attr}"] == pytest.approx(alone[k])
    for k in GROUP_METRICS:
        assert m[k] == m[f"{k}/age"]  # primary drives the un-suffixed names
        values = [m[f"{k}/{a}"] for a in ("sex", "age", "site")]
        if k in REPORTED_METRICS:  # disparate_impact_ratio: farthest from its best value, 1
            assert m[f"worst:{k}"] == max(values, key=lambda v: abs(1 - v))
        elif is_signed(k):
            assert m[f"worst:{k}"] == max(values, key=abs)
        else:
            assert m[f"worst:{k}"] == (min(values) if direction(k) == "max" else max(values))
    for attr, codes in {"sex": G, "site": site}.items():
        independent = equalized_odds_difference(Y, (S >= .5).astype(int), sensitive_features=codes)
        assert m[f"equalized_odds_difference/{attr}"] == pytest.approx(independent)
    assert ev.per_group.groupby("attribute").size().to_dict() == {"sex": 2, "age": 2, "site": 2}
    assert ev.per_group.groupby("attribute")["n"].sum().to_dict() == {"sex": 16, "age": 16, "site": 16}


def test_worst_keys_exist_for_a_single_attribute():
    m = evaluate(Y, S, {"sex": G}, primary="sex").metrics
    assert m["worst:equalized_odds_difference"] == m["equalized_odds_difference"]
    assert m["worst:worst_group_accuracy"] == m["worst_group_accuracy"]


def test_threshold_and_input_types():
    assert evaluate(Y, S, {"g": G}, primary="g", threshold=0.05).metrics["accuracy"] == 0.5
    as_lists = evaluate(Y.astype(bool).tolist(), S.tolist(), {"g": G.tolist()}, primary="g").metrics
    assert as_lists == evaluate(Y, S.astype(np.float32).astype(float), {"g": G}, primary="g").metrics


def test_valid_input_raises_no_fairlearn_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(Y, S, {"sex": G, "age": np.array([0, 1] * 8)}, primary="sex")


@pytest.mark.parametrize("y, s, g, fragment", [
    (Y, S[:-1], G, "y_true has 16 labels but y_score has 15"),
    (Y * 2, S, G, "binary 0/1"),
    (np.where(np.arange(16) == 0, 0.5, Y), S, G, "[0.5]"),
    (np.array(["yes"] * 8 + ["no"] * 8), S, G, "binary 0/1"),
    (np.ones(16, int), S, G, "single class"),
    (Y, S + 1, G, "[0, 1]"),
    (Y, np.where(np.arange(16) == 3, np.nan, S), G, "NaN value(s) (first at index 3)"),
    (Y, S, np.array(["a"] * 8 + ["b"] * 4 + ["c"] * 4), "group 'b' of attribute 'sex' has no negative"),
    (Y, S, np.array(["a"] * 8 + ["b"] * 4 + ["c"] * 4), "re-split"),
    (Y, S, np.array(["a"] * 12 + ["c"] * 4), "group 'c' of attribute 'sex' has no positive examples"),
    (Y, S, np.array(["a"] * 12 + ["c"] * 4), "equal opportunity"),
    (Y, S, np.array([0] * 12 + [7] * 4), "group 7 of attribute 'sex'"),
    (Y, S, G[:10], "attribute 'sex' has shape (10,)"),
    (Y, S, np.array(["a", None] * 8, dtype=object), "'sex' has 8 missing group code(s)"),
])
def test_bad_input_is_named(y, s, g, fragment):
    with pytest.raises(ValueError) as info:
        evaluate(y, s, {"sex": g}, primary="sex")
    assert fragment in str(info.value)


def test_bad_primary_threshold_and_attributes():
    with pytest.raises(ValueError, match=r"primary attribute 'age' is not among .*\['sex'\]"):
        evaluate(Y, S, {"sex": G}, primary="age")
    with pytest.raises(ValueError, match="threshold must be a number in \\[0, 1\\]; got 1.5"):
        evaluate(Y, S, {"sex": G}, primary="sex", threshold=1.5)
    with pytest.raises(ValueError, match="at least one attribute"):
        evaluate(Y, S, {}, primary="sex")


def test_direction_forms_and_errors():
    assert direction("accuracy") == "max" and direction("equalized_odds_difference/sex") == "min"
    assert direction("worst:worst_group_accuracy") == "max"
    assert direction("worst:auroc_gap") == "min"
    assert direction("worst_group_auroc/sex_x_age") == "max"
    with pytest.raises(ValueError, match="Did you mean 'equalized_odds_difference'"):
        direction("equalised_odds_difference")
    with pytest.raises(ValueError, match="Did you mean 'equal_opportunity_difference'"):
        direction("worst:equal_oportunity_difference")
    with pytest.raises(ValueError, match="'accuracy' is computed over all examples"):
        direction("accuracy/sex")
    with pytest.raises(ValueError, match="no worst: form"):
        direction("worst:auroc")
    with pytest.raises(ValueError, match="empty attribute"):
        direction("accuracy_gap/")
    with pytest.raises(ValueError, match="unknown metric"):
        direction("worst:accuracy_gap/sex")


def test_metric_tables_are_consistent():
    assert set(METRIC_DIRECTIONS) == set(PERFORMANCE_METRICS) | set(FAIRNESS_METRICS)
    assert not set(PERFORMANCE_METRICS) & set(FAIRNESS_METRICS)
    assert set(OVERALL_METRICS) | set(GROUP_METRICS) == set(METRIC_DIRECTIONS) | set(REPORTED_METRICS)
    assert tuple(REPORTED_METRICS) == ("disparate_impact_ratio",)
    assert {METRIC_DIRECTIONS[m] for m in FAIRNESS_METRICS} == {"min"}
    assert {METRIC_DIRECTIONS[m] for m in PERFORMANCE_METRICS} == {"max"}
    with pytest.raises(TypeError):
        METRIC_DIRECTIONS["accuracy"] = "min"  # type: ignore[index]
    keys = evaluate(Y, S, {"sex": G, "age": np.array([0, 1] * 8)}, primary="sex").metrics
    for key in keys:  # every key has a direction (so can be an objective), or is reported only and says so
        if key.split("/")[0].removeprefix("worst:") in REPORTED_METRICS:
            with pytest.raises(ValueError, match="reported, not optimised.*'disparate_impact_deviation' instead"):
                direction(key)
        else:
            assert direction(key) in ("max", "min")


def _random_case(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Labels, rounded scores (so ties occur, also at the threshold) and three attributes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.round(np.clip(0.5 + 0.25 * (y - 0.5) + rng.normal(0, 0.25, n), 0, 1), 1)
    attrs = {"sex": rng.choice(["f", "m"], n), "age": rng.integers(0, 3, n), "site": rng.choice(["x", "y"], n)}
    return y, s, attrs


def test_batch_metrics_equal_evaluate():
    for seed in range(3):
        y, s, attrs = _random_case(300, seed)
        ref = evaluate(y, s, attrs, primary="age").metrics
        got = batch_metrics(y, s[None, :], attrs, "age", 0.5)
        assert set(got) == set(ref)
        for key, value in ref.items():
            assert got[key][0] == pytest.approx(value, abs=1e-12), key


def test_bootstrap_equals_evaluate_on_the_same_resamples():
    y, s, attrs = _random_case(200, 5)
    attrs = {"sex": attrs["sex"], "age": attrs["age"]}
    names = ["accuracy", "auroc", "auprc", "f1", "balanced_accuracy", "equalized_odds_difference/sex",
             "worst:worst_group_auroc", "demographic_parity_difference"]
    n_resamples = 12
    ci = bootstrap_ci(y, s, attrs, primary="age", metrics=names, n_resamples=n_resamples, confidence=0.8, seed=3)
    idx = _resample_indices(_cells(y, attrs), n_resamples, np.random.default_rng(3))
    draws = [evaluate(y[i], s[i], {a: g[i] for a, g in attrs.items()}, primary="age").metrics for i in idx]
    for name in names:
        low, high = np.quantile([d[name] for d in draws], [0.1, 0.9])
        assert ci[name] == pytest.approx((low, high), abs=1e-12), name


def test_resamples_keep_every_label_group_cell():
    y, s, attrs = _random_case(120, 2)
    cells = _cells(y, attrs)
    order = np.concatenate(cells)
    idx = _resample_indices(cells, 50, np.random.default_rng(0))
    assert (y[idx] == y[order]).all()
    for g in attrs.values():
        assert (g[idx] == g[order]).all()
    assert len(np.unique(idx)) > 0.5 * len(y)  # it does resample


def test_bootstrap_interval_contains_point_estimate_and_narrows_with_data():
    rng = np.random.default_rng(1)

    def sample(n):
        y = np.tile([0, 1], n // 2)
        g = np.repeat([0, 1], n // 2)
        return y, np.clip(0.5 + 0.4 * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1), g

    names = ["accuracy", "auroc", "equalized_odds_difference"]
    y, s, g = sample(200)
    ci = bootstrap_ci(y, s, {"g": g}, primary="g", metrics=names, n_resamples=300, seed=0)
    point = evaluate(y, s, {"g": g}, primary="g").metrics
    for name in names:
        assert ci[name][0] <= point[name] <= ci[name][1]
    assert ci == bootstrap_ci(y, s, {"g": g}, primary="g", metrics=names, n_resamples=300, seed=0)
    assert ci != bootstrap_ci(y, s, {"g": g}, primary="g", metrics=names, n_resamples=300, seed=1)
    y2, s2, g2 = sample(5000)
    ci2 = bootstrap_ci(y2, s2, {"g": g2}, primary="g", metrics=names, n_resamples=300, seed=0)
    for name in names:
        assert ci2[name][1] - ci2[name][0] < ci[name][1] - ci[name][0]


def test_bootstrap_with_a_one_example_cell_and_bad_arguments():
    y = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 0])
    s = np.linspace(0.05, 0.95, 10)
    g = np.array(["a"] * 8 + ["b"] * 2)  # group b: one positive, one negative
    ci = bootstrap_ci(y, s, {"g": g}, primary="g", metrics=["worst_group_auroc/g"], n_resamples=50)
    assert 0 <= ci["worst_group_auroc/g"][0] <= ci["worst_group_auroc/g"][1] <= 1
    with pytest.raises(ValueError, match="Did you mean 'equalized_odds_difference'"):
        bootstrap_ci(y, s, {"g": g}, primary="g", metrics=["equalised_odds_difference"])
    with pytest.raises(ValueError, match="'worst_group_accuracy/age', which evaluate does not report"):
        bootstrap_ci(y, s, {"g": g}, primary="g", metrics=["worst_group_accuracy/age"])
    with pytest.raises(ValueError, match="n_resamples must be a positive integer; got 0"):
        bootstrap_ci(y, s, {"g": g}, primary="g", metrics=["accuracy"], n_resamples=0)
    with pytest.raises(ValueError, match="confidence must be strictly between 0 and 1; got 95"):
        bootstrap_ci(y, s, {"g": g}, primary="g", metrics=["accuracy"], confidence=95)
    with pytest.raises(ValueError, match=r"wrap it in a list: \['accuracy'\]"):
        bootstrap_ci(y, s, {"g": g}, primary="g", metrics="accuracy")


def test_bootstrap_chunks_follow_one_random_stream(monkeypatch):
    import trainables.metrics as metrics_module

    y, s, attrs = _random_case(100, 7)
    attrs = {"sex": attrs["sex"]}
    monkeypatch.setattr(metrics_module, "_BOOTSTRAP_CHUNK_ELEMENTS", 300)  # 3 resamples per batch
    ci = bootstrap_ci(y, s, attrs, primary="sex", metrics=["auroc", "accuracy_gap"], n_resamples=10, seed=4)
    rng, cells = np.random.default_rng(4), _cells(y, attrs)
    idx = np.concatenate([_resample_indices(cells, k, rng) for k in (3, 3, 3, 1)])
    order = np.concatenate(cells)
    draws = batch_metrics(y[order], s[idx], {"sex": attrs["sex"][order]}, "sex", 0.5)
    for name in ("auroc", "accuracy_gap"):
        assert ci[name] == pytest.approx(tuple(np.quantile(draws[name], [0.025, 0.975])), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 4), n=st.integers(0, 12), levels=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_row_ranks_are_scipys_average_ranks(rows: int, n: int, levels: int, seed: int) -> None:
    """The rank AUROC's ranks, ties averaged, are scipy's (rankdata), on rows with few distinct values (many ties)."""
    from scipy.stats import rankdata

    from trainables.metrics import _row_ranks

    x = np.random.default_rng(seed).integers(0, levels, size=(rows, n)).astype(float) / levels
    np.testing.assert_array_equal(_row_ranks(x), rankdata(x, axis=1))
