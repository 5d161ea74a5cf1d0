"""Metadata tables -> splits and groups: the encoding rules every real adapter shares."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from trainables.data import SPLITS, DatasetError, parse_options
from trainables.data.tables import build_table, partition_values, table_options

OPTS = table_options(target="y", sensitive=("sex",), user_table=True)


def _frame(n_per_cell: int = 10) -> pd.DataFrame:
    rows = [{"y": y, "sex": s, "age": a} for y, s, a in itertools.product((0, 1), ("F", "M"), ("young", "mid", "old"))]
    return pd.DataFrame(rows * n_per_cell)


def _build(frame: pd.DataFrame, partition=None, **options):
    return build_table(frame, where="t.csv", options=parse_options(options, OPTS), partition=partition)


def test_target_encodings() -> None:
    f = _frame()
    assert (_build(f).metas["test"].labels >= 0).all()
    for values, positive, one in [((-1, 1), None, 1), ((False, True), None, True), (("cat", "dog"), None, "dog"),
                                  (("cat", "dog"), "cat", "cat"), ((2, 7), "2", 2)]:
        g = f.assign(y=np.where(f["y"] == 1, values[1], values[0]))
        t = build_table(g, where="t.csv", options=parse_options({"positive": positive}, OPTS), partition=None)
        rows = t.rows["test"]
        np.testing.assert_array_equal(t.metas["test"].labels, (g["y"].to_numpy()[rows] == one).astype(int))


def test_k_valued_attribute_and_intersection() -> None:
    t = _build(_frame(), sensitive=["age", "sex"], intersect=["sex", "age"])
    assert t.primary == "age" and t.group_names["age"] == ("mid", "old", "young")  # sorted order
    assert t.group_names["sex_x_age"] == ("F&mid", "F&old", "F&young", "M&mid", "M&old", "M&young")
    for split in ("val", "test"):
        meta = t.metas[split]
        np.testing.assert_array_equal(meta.groups, meta.attributes["age"])
        assert set(meta.attributes["sex_x_age"].tolist()) == set(range(6))
        np.testing.assert_array_equal(meta.attributes["sex_x_age"], 3 * meta.attributes["sex"] + meta.attributes["age"])


def test_fractions_are_stratified_and_deterministic() -> None:
    t = _build(_frame(20), sensitive=["sex", "age"], source_fraction=0.25)
    n = {s: len(t.metas[s]) for s in SPLITS}
    assert n == {"test": 48, "val": 24, "source": 48, "finetune": 120}  # 12 cells of 20: 4 test, 2 val, 14 train (3.5 -> 4 source)
    all_rows = np.concatenate([t.rows[s] for s in SPLITS])
    assert sorted(all_rows.tolist()) == list(range(240))
    for split in SPLITS:  # every (label, sex, age) cell in every split
        m = t.metas[split]
        assert len({(y, s, a) for y, s, a in zip(m.labels, m.attributes["sex"], m.attributes["age"])}) == 12
    again = _build(_frame(20), sensitive=["sex", "age"], source_fraction=0.25)
    other = _build(_frame(20), sensitive=["sex", "age"], source_fraction=0.25, seed=1)
    assert all((t.rows[s] == again.rows[s]).all() for s in SPLITS)
    assert any(not np.array_equal(t.rows[s], other.rows[s]) for s in SPLITS)


def test_partition_words_and_codes() -> None:
    raw = np.array([0, 1, 2, "train", "Validation", "TEST", "source", "finetune", 1.0], dtype=object)
    assert partition_values(raw, "split", "t.csv").tolist() == \
        ["train", "val", "test", "train", "val", "test", "source", "finetune", "val"]
    with pytest.raises(DatasetError, match=r"split column 'split' holds unknown values 'dev', 'holdout'"):
        partition_values(np.array(["dev", "holdout", "train"], dtype=object), "split", "t.csv")


def test_explicit_partition_is_kept() -> None:
    f = _frame(5)
    part = np.array([("source", "finetune", "val", "test", "train")[i // 12 % 5] for i in range(len(f))], dtype=object)
    t = _build(f, partition=part)
    assert set(t.rows["val"].tolist()) == set(np.flatnonzero(part == "val").tolist())
    assert set(t.rows["test"].tolist()) == set(np.flatnonzero(part == "test").tolist())
    assert set(np.flatnonzero(part == "source").tolist()) <= set(t.rows["source"].tolist())
    assert set(np.flatnonzero(part == "finetune").tolist()) <= set(t.rows["finetune"].tolist())
    assert len(t.rows["source"]) + len(t.rows["finetune"]) == 36 and len(t.rows["source"]) > 12  # train rows join both


def test_errors_name_the_problem() -> None:
    f = _frame()
    with pytest.raises(DatasetError, match=r"t.csv: no column 'gender' \(dataset.options.sensitive\).*'age'"):
        _build(f, sensitive=["gender"])
    with pytest.raises(DatasetError, match="both the target and a sensitive attribute"):
        _build(f, sensitive=["y"])
    with pytest.raises(DatasetError, match=r"sensitive attribute 'sex' has a single value 'F'"):
        _build(f.assign(sex="F"))
    with pytest.raises(DatasetError, match="cannot name metrics"):
        _build(f.rename(columns={"sex": "sex/gender"}), sensitive=["sex/gender"])
    with pytest.raises(DatasetError, match=r"the source split is empty"):
        _build(f, partition=np.array(["finetune", "val", "test"] * (len(f) // 3), dtype=object))
    rare = (f["y"] == 1) & (f["sex"] == "M")
    thin = pd.concat([f[~rare], f[rare].iloc[:1]])  # one (label 1, M) example: it cannot reach val and test
    with pytest.raises(DatasetError, match=r"group 'M' of attribute 'sex' has no examples with label 1 in the val split"):
        _build(thin)
