"""What a reused Tune worker keeps between trials: dataset objects, rendered evaluation inputs and
pretrained weights, each under the key of what determines it.

Trials of a sweep run in long-lived worker processes (Tune's actor reuse), so without this every trial
would rebuild the same dataset, render the same validation and test images and read the same weights
file again. The values are immutable once made (datasets' metadata is read-only; tensors are handed out
as they are and never written: models copy weights in ``load_state_dict``, inputs only feed forward
passes), the keys are content keys, and each kind holds a few entries (least recently used out), so a
hit is exactly what a rebuild would give and memory stays bounded. One instance per process, made here
on purpose: that process-wide lifetime is the point.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Callable, Hashable, Mapping

from trainables.pretrain_cache import PretrainCache

__all__ = ["Memo", "dataset", "split_inputs", "pretrained_weights"]


class Memo:
    """A small least-recently-used map from a content key to a value made on first use."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


_DATASETS = Memo(4)
_INPUTS = Memo(8)
_WEIGHTS = Memo(8)


def dataset(name: str, options: Mapping[str, Any]) -> Any:
    """``build_dataset(name, options)``, built once per process for equal (name, options)."""
    from trainables.data import build_dataset  # torch: only a worker builds datasets

    key = (name, json.dumps(dict(options), sort_keys=True, default=str))
    return _DATASETS.get(key, lambda: build_dataset(name, options))


def split_inputs(ds: Any, split: str) -> Any:
    """All inputs of an in-memory dataset's ``split`` (CPU tensor), rendered once per process."""
    return _INPUTS.get((ds.fingerprint(), split), lambda: ds.inputs(split))


def pretrained_weights(cache_root: str, key: str) -> tuple[Mapping[str, Any], str]:
    """A pretraining cache entry's weights and their sha256, read (and checksummed) once per process for each
    build of the entry: the memo is keyed by the checksum its meta lists, so a base rebuilt under the same key
    (a damaged entry, one trained in another precision) is read again, never served from the old build."""
    cache = PretrainCache(cache_root)
    try:
        listed = str(cache.meta(key).get("sha256"))
    except (OSError, ValueError, AttributeError):  # missing or unreadable: the load says which
        listed = ""
    return _WEIGHTS.get((cache_root, key, listed), lambda: cache.load_with_digest(key))
