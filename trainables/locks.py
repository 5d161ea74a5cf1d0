"""One exclusive lock per cache key, shared by the content-keyed caches (pretrained bases, features)."""
from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Iterator

__all__ = ["key_lock"]


@contextlib.contextmanager
def key_lock(root: Path, key: str) -> Iterator[None]:
    """Hold ``ROOT/.locks/KEY.lock`` exclusively (``flock``: released when the holder dies, so a crash never
    leaves a key locked), so concurrent trials, jobs and sweeps sharing a cache build each key once."""
    locks = Path(root) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
