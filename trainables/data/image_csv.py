"""``image_csv``: images listed in a CSV with label and group columns (medical, product, your own data).

Layout::

    ROOT/metadata.csv      one row per image; column names are options:
                           path_column (default "path"), target ("label"), sensitive (["group"], more
                           columns for more attributes), optional split_column
    ROOT/<path>            image paths relative to the CSV's folder (absolute paths work too)

Splits: with a split column its values are used (train/val/test, 0/1/2, or source/finetune/val/test;
train is divided into source and finetune by ``source_fraction``). Without one (``split_column``
unset and no column named ``split``), rows are split by ``val_fraction``/``test_fraction`` and
``source_fraction``, stratified by (label, attributes) and deterministic in ``seed``.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from trainables.data.base import DATASETS, PATH, Dataset, DatasetError, Option, parse_options
from trainables.data.images import FolderImages, file_digest, image_options, resolve_root
from trainables.data.tables import build_table, read_table, require_columns, split_of, table_options

__all__ = ["OPTIONS", "load_image_csv"]

VERSION = 1

OPTIONS: Mapping[str, Option] = {
    **image_options(64),
    **table_options(target="label", sensitive=("group",), user_table=True),
    "csv": Option("metadata.csv", PATH, doc="the CSV, relative to root (or absolute)", under_root=True),
    "path_column": Option("path", str, doc="the column holding image paths, relative to the CSV's folder"),
}


def load_image_csv(options: Mapping[str, Any]) -> Dataset:
    parsed = parse_options(options, OPTIONS)
    root = resolve_root(parsed["root"], "image_csv")
    csv = (root / parsed["csv"]).absolute()
    frame = read_table(csv, "image_csv table (dataset.options.csv)")
    where = str(csv)
    require_columns(frame, {parsed["path_column"]: "path_column"}, where)
    if frame[parsed["path_column"]].isna().any():
        rows = np.flatnonzero(frame[parsed["path_column"]].isna().to_numpy())[:5].tolist()
        raise DatasetError(f"{where}: path column {parsed['path_column']!r} is empty in rows {rows} (from 0)")
    table = build_table(frame, where=where, options=parsed, partition=split_of(frame, parsed, where))
    paths = np.array([str(csv.parent / p) for p in frame[parsed["path_column"]].astype(str)], dtype=object)
    return FolderImages(name="image_csv", version=VERSION, options=parsed, schema=OPTIONS, table=table, paths=paths,
                        digest=file_digest([csv]), where=where)


DATASETS.register("image_csv", options=OPTIONS,
                  doc="Images listed in a CSV with path, label and group columns.")(load_image_csv)
