"""Dataset adapters behind one interface (``Dataset``), resolved by name through ``DATASETS``.

Importing this package registers every built-in dataset, so ``build_dataset`` sees them all.
"""
from __future__ import annotations

from trainables.data import synthetic as _synthetic  # noqa: F401  (registers "synthetic_images")
from trainables.data.base import (
    DATASETS,
    SPLITS,
    Dataset,
    DatasetOptionError,
    Option,
    SplitMeta,
    build_dataset,
    check_indices,
    check_split,
    parse_options,
)

__all__ = [
    "DATASETS",
    "SPLITS",
    "Dataset",
    "DatasetOptionError",
    "Option",
    "SplitMeta",
    "build_dataset",
    "check_indices",
    "check_split",
    "parse_options",
]
