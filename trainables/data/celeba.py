"""``celeba``: the standard CelebA folder, read locally; any attribute as target, any as sensitive.

Layout (as distributed by the CelebA authors)::

    ROOT/img_align_celeba/000001.jpg ...
    ROOT/list_attr_celeba.txt      line 1: image count; line 2: the 40 attribute names;
                                   then "000001.jpg -1 1 ..." (-1 absent, 1 present)
    ROOT/list_eval_partition.txt   "000001.jpg 0" (0 train, 1 val, 2 test)

The Kaggle copy's CSV files (``list_attr_celeba.csv``/``list_eval_partition.csv`` with an
``image_id`` column) are read as well when the .txt files are absent.

Splits: CelebA's val and test partitions are our val and test; its train partition is divided,
stratified by (label, attributes) and deterministic in ``seed``, into the source pool (share
``source_fraction``, what pretraining paradigms train on - paper A's biased bases) and the
finetuning pool the interventions sample from. Groups are named ``not_ATTR``/``ATTR``
(code 1 = the attribute is present).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from trainables.data.base import DATASETS, Dataset, DatasetError, Option, parse_options
from trainables.data.images import FolderImages, file_digest, image_options, resolve_root
from trainables.data.tables import build_table, partition_values, table_options

__all__ = ["OPTIONS", "load_celeba", "read_celeba_tables"]

VERSION = 1
IMAGES, ATTRS, PARTITION = "img_align_celeba", "list_attr_celeba", "list_eval_partition"

OPTIONS: Mapping[str, Option] = {
    **image_options(64),
    **table_options(target="Blond_Hair", sensitive=("Male",), user_table=False),
}


def _read_txt_attrs(path: Path) -> pd.DataFrame:
    with open(path) as f:
        first = f.readline().strip()
    try:
        declared = int(first)
    except ValueError:
        raise DatasetError(f"{path}: line 1 must be the image count, got {first[:60]!r}; is this the CelebA "
                           "attribute file?") from None
    frame = pd.read_csv(path, sep=r"\s+", skiprows=1)  # header has one name fewer: file names become the index
    if len(frame) != declared:
        raise DatasetError(f"{path}: line 1 declares {declared} images but {len(frame)} rows follow; the file is "
                           "truncated or edited - restore it")
    return frame


def _read_attrs(root: Path) -> tuple[pd.DataFrame, Path]:
    txt, csv = root / f"{ATTRS}.txt", root / f"{ATTRS}.csv"
    if txt.is_file():
        return _read_txt_attrs(txt), txt
    if csv.is_file():
        return pd.read_csv(csv, index_col="image_id"), csv
    raise DatasetError(f"CelebA attribute file {txt} is missing (nor is there {csv.name}); root must hold the "
                       f"standard layout: {IMAGES}/, {ATTRS}.txt, {PARTITION}.txt")


def _read_partition(root: Path) -> tuple[pd.Series, Path]:
    txt, csv = root / f"{PARTITION}.txt", root / f"{PARTITION}.csv"
    if txt.is_file():
        frame = pd.read_csv(txt, sep=r"\s+", header=None, names=["image_id", "partition"], dtype={"image_id": str})
        return frame.set_index("image_id")["partition"], txt
    if csv.is_file():
        return pd.read_csv(csv, index_col="image_id")["partition"], csv
    raise DatasetError(f"CelebA partition file {txt} is missing (nor is there {csv.name}); root must hold the "
                       f"standard layout: {IMAGES}/, {ATTRS}.txt, {PARTITION}.txt")


def read_celeba_tables(root: Path) -> tuple[pd.DataFrame, np.ndarray, list[Path]]:
    """Attributes (index: file name) aligned with partition values, and the files read."""
    attrs, attr_file = _read_attrs(root)
    part, part_file = _read_partition(root)
    attrs.index = attrs.index.astype(str)
    part.index = part.index.astype(str)
    missing = attrs.index.difference(part.index)
    if len(missing):
        raise DatasetError(f"{part_file} has no partition for {len(missing)} images of {attr_file.name}, e.g. "
                           f"{', '.join(missing[:5])}; the two files must list the same images")
    return attrs, part.loc[attrs.index].to_numpy(), [attr_file, part_file]


def load_celeba(options: Mapping[str, Any]) -> Dataset:
    parsed = parse_options(options, OPTIONS)
    root = resolve_root(parsed["root"], "CelebA")
    if not (root / IMAGES).is_dir():
        raise DatasetError(f"CelebA image folder {root / IMAGES} is missing; root must hold the standard layout "
                           f"{IMAGES}/*.jpg with {ATTRS}.txt and {PARTITION}.txt")
    attrs, raw_part, files = read_celeba_tables(root)
    where = str(files[0])
    partition = partition_values(raw_part, "partition", str(files[1]))
    if np.isin(partition, ("source", "finetune")).any():
        raise DatasetError(f"{files[1]}: CelebA partitions are 0 (train), 1 (val) and 2 (test)")
    columns = [parsed["target"], *parsed["sensitive"], *(parsed["extra_labels"] or ())]
    names = {c: {-1: f"not_{c}", 1: c} for c in columns if c in attrs.columns}
    table = build_table(attrs, where=where, options=parsed, partition=partition, value_names=names)
    paths = np.array([str(root / IMAGES / name) for name in attrs.index], dtype=object)
    return FolderImages(name="celeba", version=VERSION, options=parsed, schema=OPTIONS, table=table, paths=paths,
                        digest=file_digest(files), where=where)


DATASETS.register("celeba", options=OPTIONS,
                  doc="The standard CelebA folder (images + attribute and partition files).")(load_celeba)
