"""One interface for every dataset, so trials, paradigms and interventions never special-case data.

Metadata (labels, sensitive attributes) is separate from inputs because interventions and the
planner need only the former: choosing 2,000 of 6,000 pool examples must not render 6,000 images.

Small datasets are held in memory (``in_memory``): a trial moves a split to the device once and
batches there. Folder datasets are too big for that; they override ``loader`` to stream batches
decoded by worker processes, and trials use ``loader`` for them (``trainables.finetune``).
"""
from __future__ import annotations

import abc
import json
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from trainables.errors import UserError
from trainables.registry import Registry
from trainables.schema import NAMES, PATH, REQUIRED, Option, SchemaError, Section

__all__ = [
    "SPLITS",
    "SplitMeta",
    "Dataset",
    "DatasetError",
    "DatasetOptionError",
    "Option",
    "REQUIRED",
    "PATH",
    "NAMES",
    "parse_options",
    "canonical_options",
    "check_split",
    "check_indices",
    "batch_order",
    "DATASETS",
    "DatasetEntry",
    "build_dataset",
]

SPLITS: tuple[str, ...] = ("source", "finetune", "val", "test")
"""source: pretraining pool; finetune: the pool interventions sample from; val/test: fixed, never
intervened on, holding every (label, group) cell."""


def _frozen_codes(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"SplitMeta.{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"SplitMeta.{name} must hold integer codes, got dtype {arr.dtype}")
    arr = np.array(arr, dtype=np.int64)  # own copy: callers cannot mutate the dataset through it
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class SplitMeta:
    """Per-example metadata of one split; arrays are int64, read-only and of equal length.

    ``groups`` is the primary sensitive attribute (the one interventions act on); ``attributes`` holds
    every sensitive attribute, the primary included, and is what fairness metrics are computed for.
    """

    labels: np.ndarray
    groups: np.ndarray
    attributes: Mapping[str, np.ndarray]
    extra_labels: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        labels = _frozen_codes("labels", self.labels)
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise ValueError(f"SplitMeta.labels must be binary 0/1, got values {np.unique(labels).tolist()}")
        n = len(labels)
        groups = _frozen_codes("groups", self.groups)
        attributes = {k: _frozen_codes(f"attributes[{k!r}]", v) for k, v in self.attributes.items()}
        extra = {k: _frozen_codes(f"extra_labels[{k!r}]", v) for k, v in self.extra_labels.items()}
        for name, arr in [("groups", groups), *((f"attributes[{k!r}]", v) for k, v in attributes.items()),
                          *((f"extra_labels[{k!r}]", v) for k, v in extra.items())]:
            if len(arr) != n:
                raise ValueError(f"SplitMeta.{name} has {len(arr)} entries but labels has {n}")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "attributes", MappingProxyType(attributes))
        object.__setattr__(self, "extra_labels", MappingProxyType(extra))

    def __len__(self) -> int:
        return len(self.labels)

    def __reduce__(self) -> tuple[Any, ...]:  # mappingproxy does not pickle; Ray ships datasets to workers
        return (SplitMeta, (self.labels, self.groups, dict(self.attributes), dict(self.extra_labels)))


class DatasetError(UserError, ValueError):
    """Data on disk that cannot be used as configured (missing root, file, column or value, unreadable
    image, a group absent from an evaluation split). A UserError, so the planner reports it as a spec
    error on ``dataset.options``."""


def check_split(split: str) -> str:
    """Return ``split`` if it is one of SPLITS; otherwise a ValueError listing them."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


def check_indices(indices: Any, n: int, split: str) -> np.ndarray:
    """Indices as a 1-D int64 array within ``[0, n)``; ``None`` means all ``n`` rows."""
    if indices is None:
        return np.arange(n, dtype=np.int64)
    arr = np.asarray(indices)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"indices into split {split!r} must be a 1-D integer array, got shape {arr.shape} "
                         f"and dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        bad = int(arr.min() if arr.min() < 0 else arr.max())
        raise IndexError(f"index {bad} is out of range for split {split!r} of {n} examples (valid: 0..{n - 1})")
    return arr


def batch_order(n: int, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                drop_last: bool = False) -> list[np.ndarray]:
    """Positions ``0..n-1`` cut into batches; shuffled from ``(seed, epoch)`` alone, so a resumed trial
    sees the same order in the same epoch without carrying RNG state."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n) if shuffle else np.arange(n)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    return [order[s:s + batch_size].astype(np.int64) for s in range(0, stop, batch_size)]


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
"""Batches ``(x, pos)``: float32 inputs and int64 positions into the requested rows."""


class Dataset(abc.ABC):
    """A dataset with the four SPLITS. Subclasses set the attributes below in ``__init__``."""

    name: str
    modality: str  # "image" | "timeseries"
    input_shape: tuple[int, ...]  # (C, H, W) for images, (C, T) for time series
    primary: str  # the sensitive attribute that drives interventions (SplitMeta.groups)
    group_names: Mapping[str, tuple[str, ...]]  # attribute -> names of its codes
    in_memory: bool = True  # False: splits are too big to materialise; use ``loader``
    # attribute -> its privileged group, as evaluation sees it (the name from ``group_names``, else the
    # code); the signed and ratio metrics compare every other group with it. An attribute left out gets
    # trainables.metrics' default (the largest group of the evaluated split). Read-only and shared:
    # a subclass that names groups assigns its own mapping in ``__init__``.
    privileged: Mapping[str, Any] = MappingProxyType({})
    # How files become pixels (trainables.data.preprocessing.Preprocessing) for datasets that read image
    # files; None where inputs are generated, already normalised, the same for every model.
    preprocessing: Any = None

    @abc.abstractmethod
    def meta(self, split: str) -> SplitMeta:
        """Labels and attributes of ``split``; cheap (no inputs are materialised)."""

    @abc.abstractmethod
    def inputs(self, split: str, indices: np.ndarray | None = None) -> torch.Tensor:
        """float32 ``(len, *input_shape)`` for ``indices`` (None = all); only those rows are materialised."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Stable string naming the data (name, generator version, canonical options) for cache keys."""

    def check(self) -> None:
        """Plan-time validation of the values themselves, beyond what construction checked; raises
        DatasetError. Cheap adapters have nothing more to check."""

    def loader(self, split: str, indices: np.ndarray | None = None, *, batch_size: int, shuffle: bool = False,
               seed: int = 0, epoch: int = 0, drop_last: bool = False, num_workers: int | None = None) -> Batches:
        """Batches ``(x, pos)`` over ``indices`` (None = the whole split); ``pos`` indexes into ``indices``.

        This default materialises the rows once and slices them (in-memory datasets); folder datasets
        override it to decode in ``num_workers`` worker processes.
        """
        n = len(check_indices(indices, len(self.meta(split)), split))
        order = batch_order(n, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last)
        x = self.inputs(split, indices)
        return ((x[torch.from_numpy(b)], torch.from_numpy(b)) for b in order)

    def for_model(self, data_config: Any) -> Dataset:
        """This dataset as a model with ``data_config`` expects its inputs (timm's data config dict, a
        ``Preprocessing``, or None for no preference), so pretrained weights see pixels normalised as in
        their own training. Generated data has no files to preprocess: it is returned as is, and so are
        its fingerprint and cache keys. Folder datasets return a view with that preprocessing."""
        return self

    def with_input_cache(self, folder: str | os.PathLike | None, budget_bytes: int | None = None) -> Dataset:
        """This dataset with its decoded inputs cached under ``folder`` (shared by a node's workers, within
        ``budget_bytes``; None: the dataset's default), so files are decoded once rather than in every epoch
        of every trial; the inputs are the same. Data held in memory has nothing to decode: returned as is.
        Folder datasets return a caching view."""
        return self

    def preprocessing_record(self) -> str:
        """The preprocessing applied to inputs as canonical text for results and keys; "" when none."""
        return "" if self.preprocessing is None else self.preprocessing.canonical()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.fingerprint()}>"


# ----------------------------------------------------------------------------- options


class DatasetOptionError(SchemaError):
    """An unknown or invalid ``dataset.options`` entry; names the key, the value and the fix."""

    def __init__(self, key: str, value: Any, message: str):
        self.key = key
        super().__init__(f"{OPTIONS_PATH}.{key}" if key else OPTIONS_PATH, value, message)


OPTIONS_PATH = "dataset.options"


def parse_options(options: Mapping[str, Any] | None, schema: Mapping[str, Option]) -> dict[str, Any]:
    """Validate ``options`` against ``schema`` (trainables.schema's dialect, like the whole sweep file);
    return every option (defaults filled), typed, key-sorted."""
    try:
        return Section({key: schema[key] for key in sorted(schema)}).complete(options, OPTIONS_PATH)
    except DatasetOptionError:
        raise
    except SchemaError as exc:
        key = exc.path[len(OPTIONS_PATH) + 1:] if exc.path.startswith(OPTIONS_PATH + ".") else ""
        raise DatasetOptionError(key, exc.value, exc.allowed) from None


def canonical_options(parsed: Mapping[str, Any], schema: Mapping[str, Option], *, leave_out: Iterable[str] = ()) -> str:
    """Canonical JSON of the options that determine the data (``identity``), for fingerprints."""
    skip = set(leave_out)
    body = {k: v for k, v in sorted(parsed.items()) if schema[k].identity and k not in skip}
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: its factory, its option schema and a one-line description."""

    name: str
    factory: Callable[[Mapping[str, Any]], Dataset]
    options: Mapping[str, Option]
    doc: str = ""

    def __call__(self, options: Mapping[str, Any]) -> Dataset:
        return self.factory(options)


def _dataset_entry(name: str, factory: Callable[[Mapping[str, Any]], Dataset], *, options: Mapping[str, Option],
                   doc: str = "") -> DatasetEntry:
    """The entry ``DATASETS.register(name, options=..., doc=...)`` makes of ``factory(options) -> Dataset``."""
    return DatasetEntry(name, factory, MappingProxyType(dict(options)), doc)


DATASETS: Registry[DatasetEntry] = Registry("dataset", _dataset_entry)
"""Every dataset, one decorator each: ``@DATASETS.register("my_data", options={...}, doc="...")`` on a
factory taking the ``dataset.options`` mapping (check it with ``parse_options(options, OPTIONS)``)."""


def build_dataset(name: str, options: Mapping[str, Any] | None = None) -> Dataset:
    """Resolve ``name`` (UnknownNameError lists valid names) and build it from ``options``."""
    entry = DATASETS.get(name)
    return entry({} if options is None else options)
