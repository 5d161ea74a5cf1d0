"""Content-keyed arrays on disk that the worker processes of a node share: one ``KEY.npy`` each.

The frozen-prefix feature cache (``trainables.feature_cache``) and the decoded-image cache of folder
datasets (``trainables.data.images``) both hold arrays that many trials read and any one of them can
rebuild: they live under the storage path, are read memory-mapped (every worker of a node shares the
page cache instead of holding a copy), are written atomically under the key's file lock (concurrent
trials build a key once; readers see a whole file or none) and stay within a byte budget by deleting the
least recently read entries. The key names everything the bytes depend on, so an entry is never stale.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from trainables.locks import key_lock

__all__ = ["ArrayCache"]


class ArrayCache:
    """Arrays under ``root``, at most ``budget_bytes`` in all (least recently used out)."""

    def __init__(self, root: str | os.PathLike, budget_bytes: int):
        self.root = Path(root)
        self.budget_bytes = int(budget_bytes)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npy"

    def fits(self, nbytes: int) -> bool:
        """Whether an entry of ``nbytes`` can be kept at all (one larger than the budget never is)."""
        return nbytes <= self.budget_bytes

    def get_or_compute(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The array under ``key`` (memory-mapped, read-only), computing and storing it first if absent."""

        def write(path: str) -> None:
            with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a name
                np.save(f, np.ascontiguousarray(compute()))

        return self._get(key, write)

    def get_or_fill(self, key: str, shape: tuple[int, ...], dtype: np.dtype | type,
                    fill: Callable[[np.ndarray], None]) -> np.ndarray:
        """The array under ``key``; if absent, ``fill`` writes it in place into a new memory-mapped file of
        ``shape`` and ``dtype`` (so an array larger than memory is never held whole)."""

        def write(path: str) -> None:
            out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            fill(out)
            out.flush()
            del out

        return self._get(key, write)

    def _get(self, key: str, write: Callable[[str], None]) -> np.ndarray:
        target = self.path(key)
        with key_lock(self.root, key):
            with contextlib.suppress(FileNotFoundError):  # absent, or evicted by another key's writer
                return self._open(target)
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".npy.tmp")
            os.close(fd)
            try:
                write(tmp)
                # mapped before the rename: the mapping stays valid should another key's writer evict the file
                array = np.load(tmp, mmap_mode="r")
                os.replace(tmp, target)  # readers see a whole file or none
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self._evict(keep=target)
            return array

    @staticmethod
    def _open(target: Path) -> np.ndarray:
        now = time.time_ns()
        os.utime(target, ns=(now, now))  # "recently used", for eviction
        return np.load(target, mmap_mode="r")

    def _evict(self, keep: Path) -> None:
        """Delete least recently used entries until the folder fits its budget (never ``keep``)."""
        entries = []
        for p in self.root.glob("[!.]*.npy"):  # not the hidden temporary files of writers
            with contextlib.suppress(FileNotFoundError):
                if p != keep:
                    st = p.stat()
                    entries.append((st.st_mtime_ns, st.st_size, p))
        try:
            kept = keep.stat().st_size
        except FileNotFoundError:  # already evicted by another key's writer: nothing of it to keep
            kept = 0
        total = sum(size for _, size, _ in entries) + kept
        for _, size, path in sorted(entries):
            if total <= self.budget_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                total -= size
