"""The pretraining cache (docs/architecture.md, decision 3).

A pretrained backbone is keyed by everything that determines its weights, trained once per cache and
shared by every trial (and every later sweep) that needs it. Entries are written atomically with sha256
checksums of the weights and of the metadata; a damaged entry is reported and rebuilt, never loaded.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from trainables.errors import FairsweepError
from trainables.locks import key_lock

if TYPE_CHECKING:  # torch is imported lazily so that plan-time imports stay cheap
    import torch

__all__ = ["PretrainCache", "CacheError", "WEIGHTS", "META", "sha256_file"]

WEIGHTS, META = "weights.safetensors", "meta.json"


class CacheError(FairsweepError, RuntimeError):
    """A cache entry that is missing or fails its checksum."""


# ----------------------------------------------------------------------------- the cache


class PretrainCache:
    """Directory of pretrained backbones: ``ROOT/KEY/{weights.safetensors, meta.json}``.

    ``meta.json`` holds the sha256 of the weights and of its own content; an entry is intact only when
    both match, the key inside equals the folder name, and nothing is missing.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key

    def _read_meta(self, key: str) -> dict:
        meta = json.loads((self.entry(key) / META).read_text())
        if not isinstance(meta, dict):
            raise ValueError("meta is not a JSON object")
        return meta

    def _verdict(self, key: str, digest: str | None = None) -> str:
        """``digest``: the sha256 of weights the caller already read (else the file's is computed here)."""
        d = self.entry(key)
        if not d.exists():
            return "missing"
        try:
            meta = self._read_meta(key)
            digest = digest if digest is not None else sha256_file(d / WEIGHTS)
            intact = (digest == meta["sha256"] and meta.get("key") == key
                      and _meta_digest(meta) == meta["meta_sha256"])
            return "ok" if intact else "damaged"
        except (OSError, ValueError, KeyError, TypeError):
            return "damaged"

    def status(self, key: str) -> str:
        """'ok', 'missing' or 'damaged' (meta unreadable or edited, weights absent, truncated or changed)."""
        return self._verdict(key)

    def meta(self, key: str) -> dict:
        return self._read_meta(key)

    def load(self, key: str) -> dict[str, torch.Tensor]:
        """The backbone state dict of an intact entry; ``CacheError`` for anything else."""
        return self.load_with_digest(key)[0]

    def load_with_digest(self, key: str) -> tuple[dict[str, torch.Tensor], str]:
        """``load`` and the sha256 of the weights it returns: what tells one build of a key from another (a damaged
        entry or one trained in another precision is rebuilt under the same key, with other weights on a GPU).

        The file is read once and those very bytes are checked and deserialised, so a concurrent rebuild
        cannot slip unchecked weights in between the check and the load.
        """
        from safetensors.torch import load as load_bytes  # torch, only to read weights: `cache list` needs none

        d = self.entry(key)
        try:
            data: bytes | None = (d / WEIGHTS).read_bytes()
        except OSError:
            data = None
        digest = hashlib.sha256(data).hexdigest() if data is not None else None
        state = "missing" if not d.exists() else "damaged" if digest is None else self._verdict(key, digest)
        if state != "ok":
            raise CacheError(f"pretraining cache entry {key} under {self.root} is {state}; rerun the sweep to rebuild "
                             f"it (or `fairsweep cache clear --key {key}`)")
        return load_bytes(data), digest

    def write(self, key: str, state: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
        """Write to a temporary folder, then rename into place, so readers never see half an entry."""
        from safetensors.torch import save_file  # torch, only to write weights

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS))
        full = json.loads(json.dumps({**meta, "key": key, "sha256": sha256_file(tmp / WEIGHTS)}, default=str))
        full["meta_sha256"] = _meta_digest(full)
        (tmp / META).write_text(json.dumps(full, indent=1))
        with open(tmp / META, "rb") as fh:  # flush both files before the rename publishes them
            os.fsync(fh.fileno())
        with open(tmp / WEIGHTS, "rb") as fh:
            os.fsync(fh.fileno())
        dest = self.entry(key)
        if dest.exists():  # damaged, or trained in another precision: move it aside first (rename is atomic)
            self._discard(dest)
        tmp.rename(dest)
        return dest

    def _discard(self, path: Path) -> None:
        aside = self.root / f".discard-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            path.rename(aside)
        except FileNotFoundError:  # removed by someone else in the meantime
            return
        shutil.rmtree(aside, ignore_errors=True)

    def _sweep_leftovers(self, key: str) -> None:
        """Remove temporary folders of ``key`` left by a killed writer; call while holding its lock."""
        for p in self.root.glob(f".tmp-{key}-*"):
            shutil.rmtree(p, ignore_errors=True)

    def record_failure(self, key: str, run: str, error: str) -> None:
        """Remember that building ``key`` failed in ``run`` (one driver's run of a sweep), with its error."""
        self._write_marker(self._failure_file(key, run), error)

    def recorded_failure(self, key: str, run: str) -> str | None:
        """The error ``record_failure`` kept for ``key`` in ``run``; None when that run has not failed to build it."""
        try:
            return self._failure_file(key, run).read_text()
        except FileNotFoundError:
            return None

    def start_build(self, key: str, run: str) -> int:
        """Count a build of ``key`` starting in ``run``; returns how many started in that run before it. Called
        under the key's lock."""
        counter = self.root / f".builds-{key}-{run}"
        try:
            before = int(counter.read_text() or 0)
        except (FileNotFoundError, ValueError):
            before = 0
        self._write_marker(counter, str(before + 1))
        return before

    def _write_marker(self, path: Path, text: str) -> None:
        """A small file beside the entries, replaced whole (written aside, then renamed into place)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-marker-{uuid.uuid4().hex[:8]}"
        tmp.write_text(text)
        tmp.rename(path)

    def _failure_file(self, key: str, run: str) -> Path:
        return self.root / f".failed-{key}-{run}"

    def lock(self, key: str) -> contextlib.AbstractContextManager:
        """An exclusive lock per key, so concurrent jobs and sweeps sharing a cache train each key once."""
        return key_lock(self.root, key)

    def entries(self) -> list[dict]:
        """Every entry with its status and metadata (for ``fairsweep cache list``)."""
        if not self.root.exists():
            return []
        out = []
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            status = self.status(d.name)
            try:
                meta = self.meta(d.name)
            except (OSError, ValueError):
                meta = {}
            size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
            out.append({"key": d.name, "status": status, "bytes": size,
                        **{k: meta.get(k) for k in ("backbone", "paradigm", "created")}})
        return out

    def clear(self, keys: list[str] | None = None) -> list[str]:
        """Remove the given entries (all when None); each disappears atomically, by a rename aside."""
        removed = []
        for e in self.entries():
            if keys is None or e["key"] in keys:
                self._discard(self.entry(e["key"]))
                removed.append(e["key"])
        return removed


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _meta_digest(meta: Mapping[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
