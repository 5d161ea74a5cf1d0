"""``waterbirds``: the standard Waterbirds ``metadata.csv`` layout (Sagawa et al.'s release).

Layout::

    ROOT/metadata.csv    columns img_filename, y (0 landbird, 1 waterbird), split (0 train, 1 val,
                         2 test), place (0 land, 1 water); extra columns are ignored
    ROOT/<img_filename>  e.g. 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg

Target ``y``, sensitive ``place`` by default (the background the birds were pasted on). Splits as for
CelebA: val and test kept, train divided into source and finetuning pools by ``source_fraction``.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

from trainables.data.base import DATASETS, Dataset, DatasetError, Option, parse_options
from trainables.data.images import FolderImages, file_digest, image_options, resolve_root
from trainables.data.tables import build_table, partition_values, require_columns, table_options

__all__ = ["OPTIONS", "load_waterbirds"]

VERSION = 1
METADATA = "metadata.csv"
_NAMES = {"place": {0: "land", 1: "water"}, "y": {0: "landbird", 1: "waterbird"}}

OPTIONS: Mapping[str, Option] = {
    **image_options(64),
    **table_options(target="y", sensitive=("place",), user_table=False),
}


def load_waterbirds(options: Mapping[str, Any]) -> Dataset:
    parsed = parse_options(options, OPTIONS)
    root = resolve_root(parsed["root"], "Waterbirds")
    meta_file = root / METADATA
    if not meta_file.is_file():
        raise DatasetError(f"Waterbirds metadata file {meta_file} is missing; root must hold metadata.csv "
                           "(img_filename, y, split, place) and the image folders it lists")
    frame = pd.read_csv(meta_file)
    where = str(meta_file)
    require_columns(frame, {"img_filename": "root (the Waterbirds layout)", "split": "root (the Waterbirds layout)"},
                    where)
    partition = partition_values(frame["split"].to_numpy(), "split", where)
    if np.isin(partition, ("source", "finetune")).any():
        raise DatasetError(f"{where}: Waterbirds splits are 0 (train), 1 (val) and 2 (test)")
    table = build_table(frame, where=where, options=parsed, partition=partition, value_names=_NAMES)
    paths = np.array([str(root / p) for p in frame["img_filename"].astype(str)], dtype=object)
    return FolderImages(name="waterbirds", version=VERSION, options=parsed, schema=OPTIONS, table=table,
                        paths=paths, digest=file_digest([meta_file]), where=where)


DATASETS.register("waterbirds", options=OPTIONS,
                  doc="The Waterbirds metadata.csv layout (bird label, background place).")(load_waterbirds)
