"""Dataset adapters behind one interface (``Dataset``), resolved by name through ``DATASETS``.

Importing this package registers every built-in dataset, so ``build_dataset`` sees them all:
synthetic_images, synthetic_timeseries (generated), celeba, waterbirds, image_csv (image folders,
streamed) and timeseries_arrays (an array file plus a metadata table, in memory).
"""
from __future__ import annotations

# Registration order is the order error messages list the datasets in.
from trainables.data import synthetic as _synthetic  # noqa: F401,I001  (registers "synthetic_images")
from trainables.data import timeseries as _timeseries  # noqa: F401  (registers "synthetic_timeseries")
from trainables.data import celeba as _celeba  # noqa: F401  (registers "celeba")
from trainables.data import waterbirds as _waterbirds  # noqa: F401  (registers "waterbirds")
from trainables.data import image_csv as _image_csv  # noqa: F401  (registers "image_csv")
from trainables.data import arrays as _arrays  # noqa: F401  (registers "timeseries_arrays")
from trainables.data.base import (
    DATASETS,
    NAMES,
    PATH,
    REQUIRED,
    SPLITS,
    Dataset,
    DatasetEntry,
    DatasetError,
    DatasetOptionError,
    Option,
    SplitMeta,
    batch_order,
    build_dataset,
    canonical_options,
    check_indices,
    check_split,
    parse_options,
)
from trainables.data.images import ImageReadError

__all__ = [
    "DATASETS",
    "NAMES",
    "PATH",
    "REQUIRED",
    "SPLITS",
    "Dataset",
    "DatasetEntry",
    "DatasetError",
    "DatasetOptionError",
    "ImageReadError",
    "Option",
    "SplitMeta",
    "batch_order",
    "build_dataset",
    "canonical_options",
    "check_indices",
    "check_split",
    "parse_options",
]
