"""Metadata table -> per-split ``SplitMeta``: the part every real adapter shares.

Real layouts (CelebA's attribute file, Waterbirds' metadata.csv, a user's CSV or Parquet table) all
reduce to one row per example with a target column, sensitive-attribute columns and an optional
partition. This module turns such a table into the four SPLITS with one set of rules, so adapters
differ only in how they read their files:

* the target must have exactly two values: {0, 1} and {-1, 1} (CelebA) map as written, anything else
  by sorted order unless ``positive`` names the value that is label 1;
* each sensitive attribute is coded by the sorted order of its values (code 1 is the later value;
  interventions call code 1 the minority group). The first attribute is the primary one;
  ``intersect`` adds an attribute ``A_x_B`` whose groups are the observed combinations;
* the training partition is split into the source (pretraining) pool and the finetuning pool by
  ``source_fraction``; a table without a partition is first split into train/val/test by
  ``val_fraction``/``test_fraction``. Both splits are stratified by (label, every attribute) and
  deterministic in ``seed``;
* nothing is dropped silently: missing columns, empty cells, unknown partition values, and any
  (label, group) cell absent from val or test are errors naming the column or value and the fix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from trainables.data.base import NAMES, SPLITS, DatasetError, Option, SplitMeta
from trainables.schema import did_you_mean

__all__ = ["Table", "build_table", "table_options", "partition_values", "PARTITION_WORDS", "INTERSECT_SEP",
           "require_columns", "read_table", "split_of"]

INTERSECT_SEP = "_x_"
"""``intersect: [sex, age]`` adds the attribute ``sex_x_age`` (metric keys ``NAME/sex_x_age``)."""

PARTITION_WORDS: Mapping[str, str] = MappingProxyType({
    "train": "train", "training": "train", "0": "train",
    "source": "source", "finetune": "finetune",
    "val": "val", "valid": "val", "validation": "val", "1": "val",
    "test": "test", "testing": "test", "2": "test",
})
"""Accepted partition values (case-insensitive): CelebA's and Waterbirds' 0/1/2, words, or our own
split names. ``train`` rows are divided into source and finetune by ``source_fraction``."""

_ATTR_NAME = re.compile(r"^[A-Za-z0-9_.\- ]+$")  # what MLflow accepts in a metric-name suffix, minus '/' and ':'
_SHOWN = 5


def table_options(*, target: Any, sensitive: Any, user_table: bool) -> dict[str, Option]:
    """The options of every table-backed adapter. ``user_table`` (image_csv, timeseries_arrays) adds the
    split column, the positive value and the fractions used when the table has no split column."""
    opts = {
        "target": Option(target, str, doc="the column holding the binary label"),
        "sensitive": Option(sensitive, NAMES, doc="sensitive-attribute columns; the first drives interventions"),
        "intersect": Option(None, NAMES, doc="two or more of the sensitive attributes; adds the attribute "
                                             "A_x_B whose groups are their combinations"),
        "extra_labels": Option(None, NAMES, doc="further columns exposed as extra labels, e.g. for the "
                                                "control paradigm"),
        "source_fraction": Option(0.5, float, 0.05, 0.95, doc="share of the training partition that becomes "
                                                              "the source (pretraining) pool; the rest is the "
                                                              "finetuning pool"),
        "seed": Option(0, int, 0, 2**32 - 1, doc="seed of the deterministic, stratified splits; numpy's seed range"),
    }
    if user_table:
        opts.update({
            "split_column": Option(None, str, doc="the column holding each row's split; unset: a column named "
                                                  "'split' if there is one, else the rows are split by the fractions"),
            "positive": Option(None, str, doc="the target value that is label 1; unset: 1 for 0/1 and -1/1 "
                                              "columns, else the later value in sorted order"),
            "val_fraction": Option(0.1, float, 0.01, 0.5, doc="share of rows held out for validation when the "
                                                              "table has no split column"),
            "test_fraction": Option(0.2, float, 0.01, 0.5, doc="share of rows held out for testing when the "
                                                               "table has no split column"),
        })
    return opts


@dataclass(frozen=True)
class Table:
    """The encoded table: per split, the table rows it holds (in order) and their metadata."""

    rows: Mapping[str, np.ndarray]  # split -> row positions into the table, int64
    metas: Mapping[str, SplitMeta]
    primary: str
    group_names: Mapping[str, tuple[str, ...]]

    def __reduce__(self) -> tuple[Any, ...]:  # mappingproxy does not pickle; Ray ships datasets to workers
        return (Table, (dict(self.rows), dict(self.metas), self.primary, dict(self.group_names)))


def _listing(values: Sequence[Any]) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:_SHOWN])
    return shown + (f" and {len(values) - _SHOWN} more" if len(values) > _SHOWN else "")


def require_columns(frame: pd.DataFrame, columns: Mapping[str, str], where: str) -> None:
    """Raise naming the first column (and the option that names it) that ``frame`` lacks."""
    have = [str(c) for c in frame.columns]
    for column, option in columns.items():
        if column not in frame.columns:
            hint = did_you_mean(column, have)
            hint = f"; {hint}" if hint else ""
            raise DatasetError(f"{where}: no column {column!r} (dataset.options.{option}); it has {_listing(have)}"
                               f"{hint}")


def _no_empty_cells(frame: pd.DataFrame, column: str, where: str) -> None:
    empty = frame[column].isna().to_numpy()
    if empty.any():
        rows = np.flatnonzero(empty)
        raise DatasetError(f"{where}: column {column!r} is empty in {len(rows)} rows (row numbers from 0: "
                           f"{_listing(rows.tolist())}); fill them or remove those rows - nothing is dropped "
                           "silently")


def _sorted_values(values: np.ndarray) -> list[Any]:
    uniq = pd.unique(values)
    try:
        return sorted(uniq.tolist())
    except TypeError:  # mixed types: order by their text
        return sorted(uniq.tolist(), key=str)


def _encode_target(values: np.ndarray, column: str, positive: str | None, where: str) -> np.ndarray:
    uniq = _sorted_values(values)
    if len(uniq) != 2:
        raise DatasetError(f"{where}: target column {column!r} must hold exactly two values (a binary task), "
                           f"it holds {len(uniq)}: {_listing(uniq)}; pick a binary column as dataset.options.target")
    if positive is not None:
        match = [v for v in uniq if str(v) == positive]
        if not match:
            raise DatasetError(f"{where}: dataset.options.positive {positive!r} is not a value of target column "
                               f"{column!r} (values: {_listing(uniq)})")
        one = match[0]
    elif set(uniq) in ({0, 1}, {-1, 1}, {False, True}):
        one = 1
    else:
        one = uniq[1]
    return (values == one).astype(np.int64)


def _encode_attribute(values: np.ndarray, column: str, names: Mapping[Any, str] | None,
                      where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    uniq = _sorted_values(values)
    if len(uniq) < 2:
        raise DatasetError(f"{where}: sensitive attribute {column!r} has a single value {_listing(uniq)}; "
                           "fairness between groups needs at least two - pick another column")
    codes = np.empty(len(values), dtype=np.int64)
    lookup = {v: i for i, v in enumerate(uniq)}
    codes[:] = [lookup[v] for v in values.tolist()]
    labels = tuple((names or {}).get(v, str(v)) for v in uniq)
    return codes, labels


def _intersection(attrs: Mapping[str, np.ndarray], names: Mapping[str, tuple[str, ...]],
                  parts: tuple[str, ...]) -> tuple[np.ndarray, tuple[str, ...]]:
    stacked = np.stack([attrs[p] for p in parts], axis=1)
    combos, codes = np.unique(stacked, axis=0, return_inverse=True)
    labels = tuple("&".join(names[p][c] for p, c in zip(parts, row)) for row in combos.tolist())
    return codes.reshape(-1).astype(np.int64), labels


def partition_values(values: np.ndarray, column: str, where: str) -> np.ndarray:
    """Raw partition values -> 'train' | 'source' | 'finetune' | 'val' | 'test' (see PARTITION_WORDS)."""
    text = np.array([str(v).strip().lower() for v in values.tolist()], dtype=object)
    for i, v in enumerate(values.tolist()):  # 0.0 from a float column means 0
        if isinstance(v, float) and v.is_integer():
            text[i] = str(int(v))
    bad = sorted({t for t in text.tolist() if t not in PARTITION_WORDS})
    if bad:
        raise DatasetError(f"{where}: split column {column!r} holds unknown values {_listing(bad)}; use "
                           f"{', '.join(sorted(set(PARTITION_WORDS)))}")
    return np.array([PARTITION_WORDS[t] for t in text.tolist()], dtype=object)


def read_table(path: Any, what: str) -> pd.DataFrame:
    """A .csv or .parquet metadata table; a clear error when it is missing or of another kind."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{what} {p} does not exist; check dataset.options.root and the file option")
    if p.suffix.lower() == ".parquet":
        return pd.read_parquet(p)
    if p.suffix.lower() in (".csv", ".tsv", ".txt"):
        return pd.read_csv(p, sep="\t" if p.suffix.lower() == ".tsv" else ",")
    raise DatasetError(f"{what} {p} has suffix {p.suffix!r}; use a .csv or .parquet table")


def split_of(frame: pd.DataFrame, options: Mapping[str, Any], where: str) -> np.ndarray | None:
    """Per-row partition values from the split column, or None when the table has none."""
    column = options["split_column"]
    if column is None:
        column = "split" if "split" in frame.columns else None
        if column is None:
            return None
    require_columns(frame, {column: "split_column"}, where)
    if frame[column].isna().any():
        rows = np.flatnonzero(frame[column].isna().to_numpy())[:5].tolist()
        raise DatasetError(f"{where}: split column {column!r} is empty in rows {rows} (from 0); fill every row")
    return partition_values(frame[column].to_numpy(), column, where)


def _round(x: float) -> int:
    return int(np.floor(x + 0.5 + 1e-9))


def _take(n: int, fraction: float, *, keep_each: bool) -> int:
    """round(n * fraction); with ``keep_each`` both sides get at least one row when n >= 2."""
    k = _round(n * fraction)
    return min(max(k, 1), n - 1) if keep_each and n >= 2 else k


def _assign(part: np.ndarray, strata: np.ndarray, options: Mapping[str, Any]) -> np.ndarray:
    """Split name of every row: explicit partitions kept, 'train' and unpartitioned rows divided."""
    out = part.copy()
    rng = np.random.default_rng([int(options["seed"]), 4])
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        loose = rng.permutation(members[part[members] == ""])
        if len(loose):  # no partition: test, val, then train
            n = len(loose)
            n_test = _take(n, float(options["test_fraction"]), keep_each=n >= 3)
            n_val = _take(n - n_test, float(options["val_fraction"]) / max(1e-9, 1 - float(options["test_fraction"])),
                          keep_each=n - n_test >= 2)
            out[loose[:n_test]] = "test"
            out[loose[n_test:n_test + n_val]] = "val"
            out[loose[n_test + n_val:]] = "train"
        train = rng.permutation(members[out[members] == "train"])
        n_src = _take(len(train), float(options["source_fraction"]), keep_each=True)
        out[train[:n_src]] = "source"
        out[train[n_src:]] = "finetune"
    return out


def _check_coverage(table: Table, where: str) -> None:
    for split in SPLITS:
        if not len(table.metas[split]):
            raise DatasetError(f"{where}: the {split} split is empty; every split needs examples "
                               "(check the split column, source_fraction and the fractions)")
    for split in ("val", "test"):
        meta = table.metas[split]
        for label in (0, 1):
            if not (meta.labels == label).any():
                raise DatasetError(f"{where}: label {label} is absent from the {split} split ({len(meta)} examples); "
                                   "evaluation needs both labels - use a larger split or another target")
        for attr, codes in meta.attributes.items():
            for code, name in enumerate(table.group_names[attr]):
                for label in (0, 1):
                    if not ((codes == code) & (meta.labels == label)).any():
                        n = int((codes == code).sum())
                        raise DatasetError(
                            f"{where}: group {name!r} of attribute {attr!r} has no examples with label {label} in "
                            f"the {split} split ({n} examples of that group there); fairness metrics need every "
                            f"(label, group) cell - use a larger {split} split, merge rare values, or drop {attr!r} "
                            "from dataset.options.sensitive/intersect")


def build_table(frame: pd.DataFrame, *, where: str, options: Mapping[str, Any], partition: np.ndarray | None,
                value_names: Mapping[str, Mapping[Any, str]] | None = None) -> Table:
    """Encode ``frame`` (one row per example) with the table options (see ``table_options``).

    ``partition`` holds per-row values of ``partition_values`` (None: the table has none and is split by
    the fractions); ``value_names`` gives readable group names per column (e.g. CelebA's -1/1).
    """
    target, sensitive = options["target"], tuple(options["sensitive"])
    intersect = tuple(options.get("intersect") or ())
    extra = tuple(options.get("extra_labels") or ())
    require_columns(frame, {target: "target", **{c: "sensitive" for c in sensitive},
                            **{c: "extra_labels" for c in extra}}, where)
    if target in sensitive:
        raise DatasetError(f"{where}: column {target!r} is both the target and a sensitive attribute; pick another")
    for column in (target, *sensitive, *extra):
        _no_empty_cells(frame, column, where)
    bad = [a for a in sensitive if not _ATTR_NAME.match(a) or a in (".", "..")]
    if bad:
        raise DatasetError(f"{where}: sensitive attribute names {bad} cannot name metrics (allowed: letters, digits, "
                           "_ . - and spaces); rename those columns")
    if intersect:
        if len(intersect) < 2 or any(a not in sensitive for a in intersect):
            raise DatasetError(f"{where}: dataset.options.intersect {list(intersect)} must name two or more of the "
                               f"sensitive attributes {list(sensitive)}; add them to dataset.options.sensitive")

    names = value_names or {}
    labels = _encode_target(frame[target].to_numpy(), target, options.get("positive"), where)
    attrs: dict[str, np.ndarray] = {}
    group_names: dict[str, tuple[str, ...]] = {}
    for column in sensitive:
        attrs[column], group_names[column] = _encode_attribute(frame[column].to_numpy(), column, names.get(column), where)
    if intersect:
        key = INTERSECT_SEP.join(intersect)
        attrs[key], group_names[key] = _intersection(attrs, group_names, intersect)
    extras = {c: _encode_attribute(frame[c].to_numpy(), c, names.get(c), where)[0] for c in extra}

    part = np.full(len(frame), "", dtype=object) if partition is None else np.asarray(partition, dtype=object)
    if partition is None and "test_fraction" not in options:
        raise DatasetError(f"{where}: the table has no split column; name one with dataset.options.split_column")
    strata = np.unique(np.stack([labels, *attrs.values()], axis=1), axis=0, return_inverse=True)[1].reshape(-1)
    assigned = _assign(part, strata, options)
    rows, metas = {}, {}
    for split in SPLITS:
        idx = np.flatnonzero(assigned == split).astype(np.int64)
        rows[split] = idx
        metas[split] = SplitMeta(labels=labels[idx], groups=attrs[sensitive[0]][idx],
                                 attributes={a: v[idx] for a, v in attrs.items()},
                                 extra_labels={c: v[idx] for c, v in extras.items()})
    table = Table(MappingProxyType(rows), MappingProxyType(metas), sensitive[0], MappingProxyType(group_names))
    _check_coverage(table, where)
    return table
