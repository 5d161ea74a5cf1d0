"""Interventions: exact sizes, realised magnitudes, balance, determinism, and errors that teach."""
from __future__ import annotations

import numpy as np
import pytest

from trainables.interventions import (
    INTERVENTIONS,
    InterventionError,
    InterventionResult,
    apply_intervention,
    check_feasible,
)
from trainables.registry import UnknownNameError

MAGNITUDES = [round(0.1 * i, 1) for i in range(11)]


def _pool(per_cell: dict[tuple[int, int], int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A shuffled pool with the given count per (label, group) cell."""
    labels = np.concatenate([np.full(n, y) for (y, _), n in per_cell.items()]).astype(np.int64)
    groups = np.concatenate([np.full(n, g) for (_, g), n in per_cell.items()]).astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    return labels[order], groups[order]


BALANCED = _pool({(0, 0): 300, (0, 1): 300, (1, 0): 300, (1, 1): 300})


def test_registry_names() -> None:
    assert set(INTERVENTIONS.names()) == {"correlation", "representation", "none"}
    with pytest.raises(UnknownNameError, match="correlation"):
        apply_intervention("corelation", *BALANCED, 0.5, 10, 0)


@pytest.mark.parametrize("kind", ["correlation", "representation", "none"])
@pytest.mark.parametrize("size", [200, 255, 600])
def test_exact_size_no_repeats_and_achieved(kind: str, size: int) -> None:
    labels, groups = BALANCED
    for m in MAGNITUDES:
        r = apply_intervention(kind, labels, groups, m, size, seed=3)
        assert isinstance(r, InterventionResult) and r.kind == kind
        assert r.indices.dtype == np.int64 and len(r.indices) == size
        assert len(np.unique(r.indices)) == size
        assert r.indices.min() >= 0 and r.indices.max() < len(labels)
        y, g = labels[r.indices], groups[r.indices]
        assert r.achieved == pytest.approx(INTERVENTIONS.get(kind).measure(y, g))
        # labels stay balanced (off by at most one example when size is odd)
        if kind != "none":
            assert abs(int(y.sum()) - size / 2) <= 0.5
            assert r.requested == m
            assert abs(r.achieved - m) <= 1 / size


def test_correlation_splits_each_side_evenly() -> None:
    labels, groups = BALANCED
    r = apply_intervention("correlation", labels, groups, 0.7, 200, seed=0)
    y, g = labels[r.indices], groups[r.indices]
    cells = {(a, b): int(((y == a) & (g == b)).sum()) for a in (0, 1) for b in (0, 1)}
    assert cells == {(1, 1): 70, (0, 0): 70, (1, 0): 30, (0, 1): 30}
    assert r.achieved == pytest.approx(0.7)


def test_representation_balances_labels_within_groups() -> None:
    labels, groups = BALANCED
    r = apply_intervention("representation", labels, groups, 0.2, 200, seed=0)
    y, g = labels[r.indices], groups[r.indices]
    assert (g == 1).sum() == 40 and y[g == 1].sum() == 20 and y[g == 0].sum() == 80
    assert r.achieved == pytest.approx(0.2)


@pytest.mark.parametrize("kind", ["correlation", "representation", "none"])
def test_deterministic_under_seed_and_seeds_differ(kind: str) -> None:
    a = apply_intervention(kind, *BALANCED, 0.6, 300, seed=7)
    b = apply_intervention(kind, *BALANCED, 0.6, 300, seed=7)
    c = apply_intervention(kind, *BALANCED, 0.6, 300, seed=8)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)


def test_inputs_are_not_mutated() -> None:
    labels, groups = BALANCED
    before = labels.copy(), groups.copy()
    apply_intervention("correlation", labels, groups, 0.9, 100, seed=0)
    np.testing.assert_array_equal(labels, before[0])
    np.testing.assert_array_equal(groups, before[1])


def test_feasible_range_on_a_balanced_pool() -> None:
    labels, groups = BALANCED
    check_feasible("correlation", labels, groups, MAGNITUDES, 600)  # every magnitude fits 600 of 1200
    # 900 examples: each aligned cell holds 300, so aligned <= 600 -> c <= 2/3; symmetric below
    check_feasible("correlation", labels, groups, [300 / 900, 0.5, 600 / 900], 900)
    for outside in (0.3, 0.7):
        with pytest.raises(InterventionError, match="minimum feasible magnitude is 0.3333 and the maximum 0.6667"):
            check_feasible("correlation", labels, groups, [outside], 900)
    check_feasible("none", labels, groups, MAGNITUDES, 1200)  # a uniform subset ignores the magnitude


def test_infeasible_magnitude_names_the_range() -> None:
    labels, groups = BALANCED
    with pytest.raises(InterventionError) as err:
        apply_intervention("correlation", labels, groups, 0.9, 900, seed=0)
    msg = str(err.value)
    assert "0.9" in msg and "900" in msg and "1200" in msg  # magnitude, size, pool
    assert "maximum 0.6667" in msg and "minimum feasible magnitude is 0.3333" in msg
    assert "size of at most 667" in msg  # round(0.9 * 667) = 600 aligned = 2 x 300
    check_feasible("correlation", labels, groups, [0.4, 0.5, 0.6], 900)  # feasible ones pass
    with pytest.raises(InterventionError, match="magnitude 0.7 "):
        check_feasible("correlation", labels, groups, [0.5, 0.7], 900)


def test_skewed_pool_limits_representation() -> None:
    labels, groups = _pool({(0, 0): 500, (1, 0): 500, (0, 1): 50, (1, 1): 50})
    hi = 100 / 400  # the minority group's 100 examples
    for m in MAGNITUDES:
        if m <= hi:
            r = apply_intervention("representation", labels, groups, m, 400, seed=1)
            assert abs(r.achieved - m) <= 1 / 400
        else:
            with pytest.raises(InterventionError, match="minimum feasible magnitude is 0 and the maximum 0.25"):
                apply_intervention("representation", labels, groups, m, 400, seed=1)


def test_size_larger_than_pool() -> None:
    for kind in ("correlation", "representation", "none"):
        with pytest.raises(InterventionError, match="at most 1200"):
            apply_intervention(kind, *BALANCED, 0.5, 1201, seed=0)
        with pytest.raises(InterventionError, match="at most 1200"):
            check_feasible(kind, *BALANCED, [0.5], 1201)


def test_no_feasible_magnitude_at_all() -> None:
    labels, groups = _pool({(0, 0): 10, (1, 1): 10, (0, 1): 10, (1, 0): 500})
    with pytest.raises(InterventionError, match="no correlation magnitude is feasible"):
        check_feasible("correlation", labels, groups, [0.5], 100)


@pytest.mark.parametrize("magnitude", [-0.1, 1.01, float("nan"), "0.5"])
def test_magnitude_outside_unit_interval(magnitude: object) -> None:
    with pytest.raises(InterventionError, match=r"\[0, 1\]"):
        apply_intervention("correlation", *BALANCED, magnitude, 100, seed=0)  # type: ignore[arg-type]
    with pytest.raises(InterventionError, match=r"\[0, 1\]"):
        check_feasible("representation", *BALANCED, [0.5, magnitude], 100)  # type: ignore[list-item]


def test_bad_size_and_seed() -> None:
    for size in (0, -3, 2.5):
        with pytest.raises(InterventionError, match="size"):
            apply_intervention("none", *BALANCED, 0.5, size, seed=0)  # type: ignore[arg-type]
    with pytest.raises(InterventionError, match="seed"):
        apply_intervention("none", *BALANCED, 0.5, 10, seed=-1)


def test_correlation_needs_a_binary_group() -> None:
    labels, groups = BALANCED
    three = groups + (np.arange(len(groups)) % 3 == 0)  # codes 0, 1, 2
    for call in (lambda: apply_intervention("correlation", labels, three, 0.5, 100, seed=0),
                 lambda: check_feasible("correlation", labels, three, [0.5], 100)):
        with pytest.raises(InterventionError, match="binary group"):
            call()
    # a uniform subset does not care
    assert len(apply_intervention("none", labels, three, 0.0, 100, seed=0).indices) == 100


def test_the_measures_of_the_achieved_value() -> None:
    y = np.array([1, 1, 0, 0])
    g = np.array([1, 0, 0, 1])
    assert INTERVENTIONS.get("correlation").measure(y, g) == 0.5
    assert INTERVENTIONS.get("representation").measure(y, np.array([1, 0, 0, 0])) == 0.25
    empty = np.array([], dtype=np.int64)
    assert np.isnan(INTERVENTIONS.get("correlation").measure(empty, empty))


def test_works_on_the_synthetic_pool() -> None:
    from trainables.data import build_dataset

    pool = build_dataset("synthetic_images", {"n_finetune": 600, "image_size": 16}).meta("finetune")
    r = apply_intervention("correlation", pool.labels, pool.groups, 0.9, 200, seed=0)
    assert len(r.indices) == 200 and r.achieved == pytest.approx(0.9)
