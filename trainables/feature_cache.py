"""Frozen-prefix features: computed once per content key, shared by every trial of a node.

A linear probe (every layer group frozen but the classifier) computes the same function of the same
input in every epoch, seed, intervention magnitude, finetuning size and inner-search candidate: only the
classifier learns. When nothing between the frozen part and the classifier is stochastic or stateful in
training (no dropout or drop-path with p > 0, no BatchNorm left in train mode), the frozen part's
outputs ("pre-logits") can be computed once and the classifier trained on them, with the same batches,
the same updates and the same predictions (to float rounding; ``probe_plan`` checks 1e-5 on real inputs
before a trial relies on it).

``FeatureCache`` keeps them as ``.npy`` files under a folder the workers of a node share (the storage
path's ``_feature_cache``), read memory-mapped, written atomically under a file lock so concurrent
trials compute a key once, within a byte budget with least-recently-used eviction. The key is the hash
of what determines the bytes: the dataset's fingerprint, the split, the backbone, the starting weights
(the pretraining key or checkpoint; for random initialisation, the seed) and the frozen groups.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from trainables.locks import key_lock

__all__ = ["FeatureCache", "ProbePlan", "probe_plan", "compute_features", "feature_key", "DEFAULT_BUDGET_BYTES",
           "FEATURE_CACHE_DIRNAME"]

FEATURE_CACHE_DIRNAME = "_feature_cache"
DEFAULT_BUDGET_BYTES = 4 << 30  # 4 GiB per cache folder; the oldest-read entries go first beyond it
_TOLERANCE = 1e-5


def feature_key(**parts: Any) -> str:
    """sha256 of the canonical JSON of what determines the features (equal parts, equal key, any process)."""
    import hashlib
    import json

    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class FeatureCache:
    """Content-keyed float32 feature matrices on disk, one ``KEY.npy`` each."""

    def __init__(self, root: str | os.PathLike, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.root = Path(root)
        self.budget_bytes = int(budget_bytes)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npy"

    def get_or_compute(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The features under ``key`` (memory-mapped, read-only), computing and storing them first if absent."""
        target = self.path(key)
        with key_lock(self.root, key):
            if not target.exists():
                features = np.ascontiguousarray(compute(), dtype=np.float32)
                self.root.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".npy.tmp")
                try:
                    with os.fdopen(fd, "wb") as f:
                        np.save(f, features)
                    os.replace(tmp, target)  # readers see a whole file or none
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                self._evict(keep=target)
            now = time.time_ns()
            os.utime(target, ns=(now, now))  # "recently used", for eviction
            return np.load(target, mmap_mode="r")

    def _evict(self, keep: Path) -> None:
        """Delete least recently used entries until the folder fits its budget (never ``keep``)."""
        entries = sorted((p.stat().st_mtime_ns, p.stat().st_size, p) for p in self.root.glob("*.npy") if p != keep)
        total = sum(size for _, size, _ in entries) + keep.stat().st_size
        for _, size, path in entries:
            if total <= self.budget_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                total -= size


@dataclass(frozen=True)
class ProbePlan:
    """How a linear probe runs on cached features: the classifier alone, on pre-logits."""

    classifier: nn.Module

    @staticmethod
    def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Pre-logits of ``x``: everything before the classifier (timm's forward_head(pre_logits=True))."""
        return model.forward_head(model.forward_features(x), pre_logits=True)


def _stochastic_outside(model: nn.Module, frozen_modules: tuple[str, ...]) -> str | None:
    """The first module outside the frozen (eval-mode) ones whose training behaviour differs from eval."""
    if float(getattr(model, "drop_rate", 0.0) or 0.0) > 0:  # timm applies it functionally before the classifier
        return f"dropout p={model.drop_rate} before the classifier"
    for name, module in model.named_modules():
        if any(name == f or name.startswith(f + ".") for f in frozen_modules):
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return f"{name} ({type(module).__name__} in train mode)"
        if isinstance(module, nn.Dropout) and module.p > 0:
            return f"{name} (dropout p={module.p})"
        if type(module).__name__ == "DropPath" and float(getattr(module, "drop_prob", 0.0)) > 0:
            return f"{name} (drop path {module.drop_prob})"
    return None


def probe_plan(model: nn.Module, n_groups: int, frozen_groups: tuple[int, ...], frozen_modules: tuple[str, ...],
               sample: torch.Tensor, autocast: Callable[[], Any],
               train_mode: Callable[[], None] | None = None) -> tuple[ProbePlan | None, str]:
    """A ProbePlan when this trial is a linear probe whose classifier sees the same pre-logits every epoch,
    else None; the reason either way (logged with the trial). ``sample`` (a few inputs on the model's
    device) checks the classifier on eval-mode pre-logits against the whole model as it trains
    (``train_mode``: frozen parts in eval), to 1e-5, so whatever acts differently in training shows."""
    if len(frozen_groups) != n_groups:
        return None, "not a linear probe (layers before the classifier train)"
    if not all(hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier")):
        return None, "the model has no forward_features/forward_head"
    moving = _stochastic_outside(model, frozen_modules)
    if moving:
        return None, f"{moving} changes between epochs"
    head = model.get_classifier()
    if isinstance(head, (tuple, list)):
        return None, "two classifier heads (distilled model)"
    was_training = model.training
    rng = torch.get_rng_state()  # the check must not shift the random stream the trial then draws from
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        with torch.no_grad(), autocast():
            (train_mode or model.train)()
            whole = model(sample).float()
            model.eval()
            split = head(ProbePlan.features(model, sample)).float()
    finally:
        model.train(was_training)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    if whole.shape != split.shape or not torch.allclose(whole, split, atol=_TOLERANCE, rtol=0):
        return None, "the classifier on pre-logits does not reproduce the model's output"
    return ProbePlan(head), "linear probe on cached pre-logits"


def compute_features(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], n: int,
                     device: torch.device, autocast: Callable[[], Any]) -> np.ndarray:
    """Pre-logits of ``n`` rows arriving as ``(x, pos)`` batches, in row order (float32)."""
    model.eval()
    out: np.ndarray | None = None
    started = time.monotonic()
    with torch.no_grad():
        for xb, pos in batches:
            with autocast():
                feats = ProbePlan.features(model, xb.to(device, non_blocking=True)).float().cpu().numpy()
            if out is None:
                out = np.empty((n, *feats.shape[1:]), dtype=np.float32)
            out[pos.numpy()] = feats
    if out is None:
        raise ValueError(f"no rows arrived to compute features for ({n} expected, {time.monotonic() - started:.1f} s)")
    return out
