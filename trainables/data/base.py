"""One interface for every dataset, so trials, paradigms and interventions never special-case data.

Metadata (labels, sensitive attributes) is separate from inputs because interventions and the
planner need only the former: choosing 2,000 of 6,000 pool examples must not render 6,000 images.
"""
from __future__ import annotations

import abc
import difflib
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np
import torch

from trainables.registry import Registry

__all__ = [
    "SPLITS",
    "SplitMeta",
    "Dataset",
    "DatasetOptionError",
    "Option",
    "parse_options",
    "check_split",
    "check_indices",
    "DATASETS",
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
    """Per-example metadata of one split; arrays are int64, read-only and of equal length."""

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


class Dataset(abc.ABC):
    """A dataset with the four SPLITS. Subclasses set the attributes below in ``__init__``."""

    name: str
    modality: str  # "image" | "timeseries"
    input_shape: tuple[int, ...]  # (C, H, W) for images
    primary: str  # the sensitive attribute that drives interventions (SplitMeta.groups)
    group_names: Mapping[str, tuple[str, ...]]  # attribute -> names of its codes

    @abc.abstractmethod
    def meta(self, split: str) -> SplitMeta:
        """Labels and attributes of ``split``; cheap (no inputs are materialised)."""

    @abc.abstractmethod
    def inputs(self, split: str, indices: np.ndarray | None = None) -> torch.Tensor:
        """float32 ``(len, *input_shape)`` for ``indices`` (None = all); only those rows are materialised."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Stable string naming the data (name, generator version, canonical options) for cache keys."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.fingerprint()}>"


# ----------------------------------------------------------------------------- options


class DatasetOptionError(ValueError):
    """An unknown or invalid ``dataset.options`` entry; names the key, the value and the fix."""

    def __init__(self, key: str, value: Any, message: str):
        self.key, self.value = key, value
        path = f"dataset.options.{key}" if key else "dataset.options"
        super().__init__(f"{path}: {message} (got {value!r})")


@dataclass(frozen=True)
class Option:
    """One dataset option: its default, its type (int or float) and inclusive bounds."""

    default: int | float
    kind: type = float
    low: float | None = None
    high: float | None = None
    why: str = ""  # appended to range errors, e.g. why a minimum exists


def _describe(opt: Option) -> str:
    word = "an integer" if opt.kind is int else "a number"
    bounds = []
    if opt.low is not None:
        bounds.append(f">= {opt.low}")
    if opt.high is not None:
        bounds.append(f"<= {opt.high}")
    return f"{word} {' and '.join(bounds)}".rstrip() + (f" ({opt.why})" if opt.why else "")


def _coerce(key: str, value: Any, opt: Option) -> int | float:
    if isinstance(value, (bool, np.bool_)):
        raise DatasetOptionError(key, value, f"must be {_describe(opt)}, not a boolean")
    if opt.kind is int:
        if isinstance(value, (int, np.integer)):
            out: int | float = int(value)
        elif isinstance(value, (float, np.floating)) and float(value).is_integer():
            out = int(value)
        else:
            raise DatasetOptionError(key, value, f"must be {_describe(opt)}")
    else:
        if not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(float(value)):
            raise DatasetOptionError(key, value, f"must be {_describe(opt)}")
        out = float(value)
    if (opt.low is not None and out < opt.low) or (opt.high is not None and out > opt.high):
        raise DatasetOptionError(key, value, f"must be {_describe(opt)}")
    return out


def parse_options(options: Mapping[str, Any] | None, schema: Mapping[str, Option]) -> dict[str, int | float]:
    """Validate ``options`` against ``schema``; return every option (defaults filled), typed, key-sorted."""
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise DatasetOptionError("", options, "must be a mapping of option names to values")
    allowed = sorted(schema)
    for key in options:
        if key not in schema:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DatasetOptionError(str(key), options[key],
                                     f"unknown option; allowed: {', '.join(allowed)}{hint}")
    return {key: _coerce(key, options.get(key, schema[key].default), schema[key]) for key in allowed}


# ----------------------------------------------------------------------------- registry

DATASETS: Registry[Callable[[Mapping[str, Any]], Dataset]] = Registry("dataset")


def build_dataset(name: str, options: Mapping[str, Any] | None = None) -> Dataset:
    """Resolve ``name`` (UnknownNameError lists valid names) and build it from ``options``."""
    factory = DATASETS.get(name)
    return factory({} if options is None else options)
