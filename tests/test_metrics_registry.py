"""The metric registry: one registration reaches evaluate, bootstrap_ci, direction and is_signed."""
from __future__ import annotations

import numpy as np
import pytest

import trainables.metrics as M
from tests.helpers import batch_metrics
from trainables.metrics import (FAIRNESS_METRICS, GROUP_METRICS, METRIC_DIRECTIONS, METRICS, OVERALL_METRICS,
                                PERFORMANCE_METRICS, _cells, _resample_indices, bootstrap_ci,
                                direction, evaluate, is_signed, register_metric, temporary_metric,
                                unregister_metric, value_range)

BUILTIN = tuple(METRICS)


@pytest.fixture(autouse=True)
def registry_is_restored():
    """No test may leave a metric behind (nor remove one)."""
    yield
    assert tuple(METRICS) == BUILTIN


def _case(n: int = 240, seed: int = 0):
    """Rounded scores (ties, also at the threshold), a 3-group and two 2-group attributes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.round(np.clip(0.5 + 0.25 * (y - 0.5) + rng.normal(0, 0.25, n), 0, 1), 1)
    return y, s, {"sex": rng.choice(["f", "m"], n), "age": rng.integers(0, 3, n), "site": rng.choice(["x", "y"], n)}


def _keys_of(name: str, attrs) -> set[str]:
    return {name, f"worst:{name}", *(f"{name}/{a}" for a in attrs)}


def test_one_registration_reaches_everything():
    y, s, attrs = _case()

    def selection_rate_spread(c: M.GroupCounts):  # a toy: largest minus smallest selection rate, on counts
        return c.gap(c.selection_rate)

    with temporary_metric("toy_spread", selection_rate_spread, direction="min") as spec:
        assert spec.per_attribute and spec.vectorised and not spec.signed
        m = evaluate(y, s, attrs, primary="age").metrics
        assert _keys_of("toy_spread", attrs) <= set(m)
        for key in _keys_of("toy_spread", attrs):  # the toy equals the built-in with the same definition
            assert m[key] == m[key.replace("toy_spread", "demographic_parity_difference")]
        assert direction("toy_spread") == direction("worst:toy_spread") == direction("toy_spread/sex") == "min"
        assert not is_signed("toy_spread/age")
        assert "toy_spread" in GROUP_METRICS and "toy_spread" in FAIRNESS_METRICS
        assert METRIC_DIRECTIONS["toy_spread"] == "min"
        ci = bootstrap_ci(y, s, attrs, primary="age", metrics=["toy_spread/sex", "worst:toy_spread"],
                          n_resamples=40, seed=1)
        ref = bootstrap_ci(y, s, attrs, primary="age", n_resamples=40, seed=1,
                           metrics=["demographic_parity_difference/sex", "worst:demographic_parity_difference"])
        assert list(ci.values()) == list(ref.values())
    assert "toy_spread" not in GROUP_METRICS and "toy_spread" not in METRIC_DIRECTIONS
    assert not _keys_of("toy_spread", attrs) & set(evaluate(y, s, attrs, primary="age").metrics)
    with pytest.raises(ValueError, match="unknown metric 'toy_spread'"):
        direction("toy_spread")
    with pytest.raises(ValueError, match="'toy_spread', which evaluate does not report"):
        bootstrap_ci(y, s, attrs, primary="age", metrics=["toy_spread"])


def test_decorator_and_explicit_unregister_for_an_overall_metric():
    y, s, attrs = _case(seed=1)

    @register_metric("toy_precision", direction="max", per_attribute=False)
    def toy_precision(c: M.OverallCounts):
        return c.tp / (c.tp + c.fp)

    try:
        m = evaluate(y, s, attrs, primary="sex").metrics
        p = s >= 0.5
        assert m["toy_precision"] == pytest.approx(y[p].mean())
        assert "toy_precision/sex" not in m and "worst:toy_precision" not in m
        assert "toy_precision" in OVERALL_METRICS and "toy_precision" in PERFORMANCE_METRICS
        assert direction("toy_precision") == "max"
        with pytest.raises(ValueError, match="computed over all examples"):
            direction("toy_precision/sex")
        low, high = bootstrap_ci(y, s, attrs, primary="sex", metrics=["toy_precision"], n_resamples=50)["toy_precision"]
        assert low <= m["toy_precision"] <= high
    finally:
        unregister_metric("toy_precision")
    assert "toy_precision" not in evaluate(y, s, attrs, primary="sex").metrics


def test_per_resample_fallback_for_metrics_not_written_on_counts():
    """vectorised=False: called once per resample with the raw arrays; same intervals as evaluate per resample."""
    y, s, attrs = _case(160, seed=2)
    attrs = {"sex": attrs["sex"], "age": attrs["age"]}
    seen_privileged = set()

    def brier(y_true, y_score, y_pred):
        return float(np.mean((y_score - y_true) ** 2))

    def mean_score_gap(y_true, y_score, y_pred, groups, privileged):  # privileged minus the others, signed
        seen_privileged.add(privileged)
        return float(y_score[groups != privileged].mean() - y_score[groups == privileged].mean())

    with temporary_metric("brier", brier, direction="min", per_attribute=False, vectorised=False), \
            temporary_metric("score_gap", mean_score_gap, direction="min", signed=True, vectorised=False):
        m = evaluate(y, s, attrs, primary="age", privileged={"sex": "m"}).metrics
        assert m["brier"] == pytest.approx(np.mean((s - y) ** 2))
        sex = attrs["sex"]
        assert m["score_gap/sex"] == pytest.approx(s[sex == "f"].mean() - s[sex == "m"].mean())
        assert is_signed("worst:score_gap")
        assert m["worst:score_gap"] == max((m["score_gap/sex"], m["score_gap/age"]), key=abs)
        names = ["brier", "score_gap/sex", "worst:score_gap", "score_gap"]
        ci = bootstrap_ci(y, s, attrs, primary="age", metrics=names, n_resamples=10, confidence=0.8, seed=3,
                          privileged={"sex": "m"})
        idx = _resample_indices(_cells(y, attrs), 10, np.random.default_rng(3))
        draws = [evaluate(y[i], s[i], {a: g[i] for a, g in attrs.items()}, primary="age",
                          privileged={"sex": "m"}).metrics for i in idx]
        for name in names:
            assert ci[name] == pytest.approx(tuple(np.quantile([d[name] for d in draws], [0.1, 0.9])), abs=1e-12)
    sizes = np.bincount(attrs["age"])
    assert sizes.argmax() == 2 and sizes[2] > max(sizes[:2])
    assert seen_privileged == {"m", 2}  # sex as named; age: the largest group of the split


def test_every_registered_metric_bootstrap_row_equals_evaluate():
    """The property the registry exists for: B = 1 on the original sample is evaluate's value, for every key,
    and the bootstrap's draws are evaluate on each resample, for every key."""
    y, s, attrs = _case(300, seed=4)
    for privileged in (None, {"age": 0, "sex": "f"}):
        ref = evaluate(y, s, attrs, primary="age", privileged=privileged).metrics
        got = batch_metrics(y, s[None, :], attrs, "age", 0.5, privileged)
        assert set(got) == set(ref)
        assert {k.split("/")[0].removeprefix("worst:") for k in ref} == set(METRICS)
        for key, value in ref.items():
            np.testing.assert_allclose(got[key][0], value, rtol=0, atol=1e-12, err_msg=key)
    names = list(ref)
    n_resamples = 6
    ci = bootstrap_ci(y, s, attrs, primary="age", metrics=names, n_resamples=n_resamples, confidence=0.5, seed=9,
                      privileged={"age": 0, "sex": "f"})
    idx = _resample_indices(_cells(y, attrs), n_resamples, np.random.default_rng(9))
    draws = [evaluate(y[i], s[i], {a: g[i] for a, g in attrs.items()}, primary="age",
                      privileged={"age": 0, "sex": "f"}).metrics for i in idx]
    for name in names:
        values = np.array([d[name] for d in draws])
        values = values[~np.isnan(values)]
        expected = tuple(np.quantile(values, [0.25, 0.75])) if len(values) else (np.nan, np.nan)
        np.testing.assert_allclose(ci[name], expected, rtol=0, atol=1e-12, err_msg=name)


def test_is_signed_and_reported_only_metrics():
    for name in ("tpr_difference", "fpr_difference/sex", "worst:statistical_parity_difference"):
        assert is_signed(name) and direction(name) == "min"
    for name in ("accuracy", "equalized_odds_difference", "average_absolute_odds_difference",
                 "disparate_impact_deviation/sex", "disparate_impact_ratio", "worst:disparate_impact_ratio"):
        assert not is_signed(name)
    for name in ("disparate_impact_ratio", "disparate_impact_ratio/sex", "worst:disparate_impact_ratio"):
        with pytest.raises(ValueError, match=r"reported, not optimised: it is best at 1.*"
                                             r"optimise 'disparate_impact_deviation' instead"):
            direction(name)
    with pytest.raises(ValueError, match="Did you mean 'tpr_difference'"):
        is_signed("tpr_diference")


BOUNDS = {**dict.fromkeys(("accuracy", "balanced_accuracy", "auroc", "auprc", "f1", "worst_group_accuracy",
                            "worst_group_auroc", "accuracy_gap", "auroc_gap", "demographic_parity_difference",
                            "equalized_odds_difference", "equal_opportunity_difference",
                            "average_absolute_odds_difference"), (0.0, 1.0)),
          **dict.fromkeys(("tpr_difference", "fpr_difference", "statistical_parity_difference"), (-1.0, 1.0)),
          **dict.fromkeys(("disparate_impact_ratio", "disparate_impact_deviation", "fpr_ratio_deviation",
                           "fnr_ratio_deviation", "fdr_ratio_deviation", "for_ratio_deviation",
                           "error_rate_ratio_deviation"), (0.0, np.inf))}


def test_every_value_a_metric_takes_lies_in_its_range():
    """The ranges the queries clip intervals to are the metrics' own, for every built-in metric and key form:
    over resamples of skewed cases, and of classifiers at the edges (perfect, inverted, one that favours one
    group outright), values reach the ends of the ranges and never leave them."""
    assert {name: value_range(name) for name in BUILTIN} == BOUNDS
    y, s, attrs = _case(200, seed=0)
    female = attrs["sex"] == "f"
    edges = [y.astype(float), 1.0 - y, np.ones(len(y)), np.where(female, 1.0, 0.0), np.where(female, y, 1.0 - y)]
    score_sets = [np.stack(edges)]
    for seed in range(4):
        shifted = np.clip(s + 0.3 * (seed - 1.5), 0, 1)  # thresholds that predict mostly one class, or only one
        score_sets.append(np.stack([shifted[i] for i in _resample_indices(_cells(y, attrs), 40,
                                                                           np.random.default_rng(seed))]))
    seen: dict[str, list[float]] = {}
    for scores in score_sets:
        for privileged in (None, {"age": 0, "sex": "f"}):
            for key, values in batch_metrics(y, scores, attrs, "age", 0.5, privileged).items():
                low, high = value_range(key)
                values = np.asarray(values, dtype=float)
                values = values[~np.isnan(values)]
                assert ((values >= low) & (values <= high)).all(), (key, values.min(), values.max(), (low, high))
                seen.setdefault(key.split("/")[0].removeprefix("worst:"), []).extend(values.tolist())
    for name in ("accuracy", "auroc", "worst_group_accuracy", "equalized_odds_difference", "demographic_parity_difference"):
        assert min(seen[name]) == 0.0 and max(seen[name]) == 1.0, name  # both ends reached
    assert min(seen["tpr_difference"]) == -1.0 and max(seen["tpr_difference"]) == 1.0
    assert max(seen["disparate_impact_deviation"]) > 1.0  # a deviation is no rate
    with temporary_metric("unbounded_score", lambda c: c.tp / c.n, direction="max", per_attribute=False):
        assert value_range("unbounded_score") == (-np.inf, np.inf)
    with temporary_metric("bounded_score", lambda c: c.tp / c.n, direction="max", per_attribute=False, bounds=(0, 1)):
        assert value_range("bounded_score") == (0.0, 1.0)


@pytest.mark.parametrize("name, options, fragment", [
    ("accuracy", {"direction": "max"}, "'accuracy' is already registered; call unregister_metric('accuracy')"),
    ("worst:x", {"direction": "max"}, "must be an identifier"),
    ("x/sex", {"direction": "max"}, "must be an identifier"),
    ("", {"direction": "max"}, "must be an identifier"),
    ("x", {"direction": "up"}, "must be 'max', 'min' or None"),
    ("x", {"direction": "max", "signed": True}, "needs direction='min'"),
    ("x", {"direction": None}, "needs target=<its best value>"),
    ("x", {"direction": "min", "target": 0.0}, "only for reported metrics"),
    ("x", {"direction": "max", "bounds": (1, 0)}, "bounds must be (low, high) with low < high"),
    ("x", {"direction": "max", "bounds": (0,)}, "bounds must be (low, high)"),
    ("x", {"direction": "max", "bounds": (0, float("nan"))}, "got (0, nan)"),
    ("x", {"direction": "max", "bounds": "01"}, "bounds must be (low, high)"),
    ("x", {"direction": "min", "signed": True, "bounds": (0.1, 1)}, "signed (best at 0), so its bounds must hold 0"),
])
def test_bad_registrations_are_named(name, options, fragment):
    with pytest.raises(ValueError) as info:
        register_metric(name, **options)(lambda c: c.tp)
    assert fragment in str(info.value)


def test_unregister_errors_and_cleanup_on_exception():
    with pytest.raises(ValueError, match="'accuracy' is built in and cannot be unregistered"):
        unregister_metric("accuracy")
    with pytest.raises(ValueError, match="'nope' is not registered"):
        unregister_metric("nope")
    with pytest.raises(RuntimeError, match="boom"):
        with temporary_metric("tmp", lambda c: c.tp, direction="max", per_attribute=False):
            assert "tmp" in METRICS
            raise RuntimeError("boom")
    assert "tmp" not in METRICS


def test_a_vectorised_metric_of_the_wrong_shape_is_named():
    y, s, attrs = _case(seed=5)
    with temporary_metric("bad_shape", lambda c: c.tpr, direction="min"):  # (B, k), not (B,)
        with pytest.raises(ValueError, match=r"metric 'bad_shape' returned shape \(1, 2\).*vectorised=False"):
            evaluate(y, s, {"sex": attrs["sex"]}, primary="sex")


def test_name_tuples_are_live_read_only_views():
    assert OVERALL_METRICS[:2] == ("accuracy", "balanced_accuracy")
    assert OVERALL_METRICS == ("accuracy", "balanced_accuracy", "auroc", "auprc", "f1")
    assert (*OVERALL_METRICS, "x")[-1] == "x" and len(GROUP_METRICS) == len(list(GROUP_METRICS))
    with pytest.raises(TypeError):
        METRICS["accuracy"] = None  # type: ignore[index]
    with pytest.raises(TypeError):
        METRIC_DIRECTIONS["accuracy"] = "min"  # type: ignore[index]
