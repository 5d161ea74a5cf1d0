"""Pretraining paradigms and the pretraining cache (DESIGN decision 3).

A paradigm turns a freshly initialised backbone into a pretrained one using the dataset's *source*
split. Its result is keyed by everything that determines the weights, trained once per cache and
shared by every trial (and every later sweep) that needs it. Entries are written atomically with a
sha256 checksum; a damaged entry is reported and rebuilt, never loaded.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from trainables.registry import Registry

__all__ = ["Paradigm", "PARADIGMS", "PretrainCache", "CacheError", "run_pretrain_job", "PretrainOutcome"]

WEIGHTS, META = "weights.safetensors", "meta.json"


class CacheError(RuntimeError):
    """A cache entry that is missing or fails its checksum."""


@dataclass(frozen=True)
class Paradigm:
    """A registered pretraining procedure. ``labels`` picks the source-split target it trains on."""

    name: str
    doc: str
    pretrains: bool
    labels: Callable[[Any], np.ndarray] | None = None  # SplitMeta -> int labels (supervised-style paradigms)
    ssl_method: str | None = None  # a trainables.ssl method name (self-supervised paradigms)
    option_names: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ("image", "timeseries")

    def check(self, dataset: Any, options: Mapping[str, Any]) -> None:
        """Raise ValueError when this paradigm cannot run on ``dataset`` with ``options``."""
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            allowed = ", ".join(self.option_names) or "none"
            raise ValueError(f"unknown option(s) {unknown} for paradigm {self.name!r}; allowed: {allowed}")
        if dataset.modality not in self.modalities:
            raise ValueError(f"paradigm {self.name!r} does not support {dataset.modality} data")
        if self.labels is not None:
            self.labels(dataset.meta("source"))  # raises if the dataset lacks what the paradigm needs

    def check_backbone(self, backbone: str, dataset: Any) -> None:
        """SSL needs a pooled representation before the classifier (timm's ``forward_head(pre_logits=True)``)."""
        if self.ssl_method is None:
            return
        from trainables import backbones

        model = backbones.create_backbone(backbone, num_classes=2, input_shape=dataset.input_shape)
        if not hasattr(model, "forward_head") or not hasattr(model, "forward_features"):
            raise ValueError(f"paradigm {self.name!r} needs a backbone with forward_features/forward_head "
                             f"(pooled features before the classifier); {backbone!r} has none")


PARADIGMS: Registry[Paradigm] = Registry("paradigm")


def _register(p: Paradigm) -> Paradigm:
    return PARADIGMS.register(p.name)(p)


def _extra_label(name: str) -> Callable[[Any], np.ndarray]:
    def pick(meta: Any) -> np.ndarray:
        if name not in meta.extra_labels:
            raise ValueError(f"the dataset's source split has no {name!r} label (has: {sorted(meta.extra_labels) or 'none'})")
        return meta.extra_labels[name]

    return pick


_register(Paradigm("scratch", "Random initialisation; no pretraining.", pretrains=False))
_register(Paradigm("supervised", "Trained on the source split's target label.", pretrains=True,
                   labels=lambda m: m.labels))
_register(Paradigm("biased", "Trained to predict the sensitive attribute, so the representation encodes the "
                             "group as a shortcut (paper A's gendered base).", pretrains=True,
                   labels=lambda m: m.groups))
_register(Paradigm("simclr", "Contrastive self-supervised pretraining (NT-Xent on two augmented views; lightly). "
                            "Options: temperature (0.1), projection_dim (64).", pretrains=True, ssl_method="simclr",
                   option_names=("temperature", "projection_dim")))
_register(Paradigm("vicreg", "Non-contrastive self-supervised pretraining (variance-invariance-covariance; lightly). "
                            "Options: projection_dim (256), invariance, variance (25), covariance (1).",
                   pretrains=True, ssl_method="vicreg", option_names=("projection_dim", "invariance", "variance", "covariance")))
_register(Paradigm("control", "Trained on an unrelated attribute of the source split (paper A's control bases; "
                              "needs the dataset's 'stripes' label).", pretrains=True,
                   labels=_extra_label("stripes")))


# ----------------------------------------------------------------------------- the cache


class PretrainCache:
    """Directory of pretrained backbones: ``ROOT/KEY/{weights.safetensors, meta.json}``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key

    def status(self, key: str) -> str:
        """'ok', 'missing' or 'damaged' (meta unreadable, weights absent or checksum mismatch)."""
        d = self.entry(key)
        if not d.exists():
            return "missing"
        try:
            meta = json.loads((d / META).read_text())
            return "ok" if _sha256(d / WEIGHTS) == meta["sha256"] else "damaged"
        except (OSError, ValueError, KeyError):
            return "damaged"

    def meta(self, key: str) -> dict:
        return json.loads((self.entry(key) / META).read_text())

    def load(self, key: str) -> dict:
        """The backbone state dict of an intact entry; ``CacheError`` for anything else."""
        from safetensors.torch import load_file

        state = self.status(key)
        if state != "ok":
            raise CacheError(f"pretraining cache entry {key} under {self.root} is {state}; rerun the sweep to rebuild it")
        return load_file(str(self.entry(key) / WEIGHTS))

    def write(self, key: str, state: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
        """Write to a temporary folder, then rename into place, so readers never see half an entry."""
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS))
        (tmp / META).write_text(json.dumps({**meta, "key": key, "sha256": _sha256(tmp / WEIGHTS)}, indent=1, default=str))
        dest = self.entry(key)
        if dest.exists():  # a damaged entry: move it aside first (rename is atomic, rmtree is not)
            aside = self.root / f".damaged-{key}-{uuid.uuid4().hex[:8]}"
            dest.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        tmp.rename(dest)
        return dest

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """An exclusive lock per key, so concurrent sweeps sharing a cache train each key once."""
        lock_dir = self.root / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{key}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def entries(self) -> list[dict]:
        """Every entry with its status and metadata (for ``fairsweep cache list``)."""
        if not self.root.exists():
            return []
        out = []
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            status = self.status(d.name)
            meta = self.meta(d.name) if status == "ok" else {}
            size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
            out.append({"key": d.name, "status": status, "bytes": size, **{k: meta.get(k) for k in ("backbone", "paradigm", "created")}})
        return out

    def clear(self, keys: list[str] | None = None) -> list[str]:
        removed = []
        for e in self.entries():
            if keys is None or e["key"] in keys:
                shutil.rmtree(self.entry(e["key"]), ignore_errors=True)
                removed.append(e["key"])
        return removed


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- running a job


@dataclass(frozen=True)
class PretrainOutcome:
    key: str
    path: str
    reused: bool
    rebuilt_damaged: bool
    losses: tuple[float, ...] = ()
    seconds: float = 0.0
    device: str = "cpu"
    meta: Mapping[str, Any] = field(default_factory=dict)


def run_pretrain_job(job: Mapping[str, Any], cache_root: str, cpus: float = 1.0) -> PretrainOutcome:
    """Build (or reuse) one cache entry. ``job`` is a ``PretrainJob`` as a dict; runs inside a Ray task."""
    import torch

    from trainables import backbones, loop
    from trainables.data import build_dataset

    cache = PretrainCache(cache_root)
    key = job["key"]
    with cache.lock(key):
        status = cache.status(key)
        if status == "ok":
            meta = cache.meta(key)
            return PretrainOutcome(key, str(cache.entry(key)), True, False, tuple(meta.get("losses", ())), 0.0,
                                   meta.get("device", "cpu"), meta)
        loop.set_threads(cpus)
        device = loop.select_device()
        started = time.time()
        hp = job["hparams"]
        dataset = build_dataset(job["dataset"], job["dataset_options"])
        paradigm = PARADIGMS.get(job["paradigm"])
        torch.manual_seed(hp["seed"])
        x = dataset.inputs("source").to(device)
        gen = torch.Generator().manual_seed(hp["seed"])
        if paradigm.ssl_method is not None:
            from trainables.ssl import train_ssl

            model = backbones.create_backbone(job["backbone"], num_classes=2, input_shape=dataset.input_shape).to(device)
            losses = train_ssl(model, x, method=paradigm.ssl_method, options=hp.get("options", {}),
                               modality=dataset.modality, hparams=hp, device=device, generator=gen)
        else:
            model, losses = _train_supervised(job["backbone"], paradigm.labels(dataset.meta("source")), x, dataset, hp, device, gen)
        meta = {"backbone": job["backbone"], "paradigm": job["paradigm"], "dataset": job["dataset"],
                "dataset_options": job["dataset_options"], "hparams": hp, "losses": losses,
                "device": str(device), "seconds": time.time() - started,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        path = cache.write(key, backbones.backbone_state_dict(model), meta)
        return PretrainOutcome(key, str(path), False, status == "damaged", tuple(losses), meta["seconds"], str(device), meta)


def _train_supervised(backbone: str, labels: np.ndarray, x: Any, dataset: Any, hp: Mapping[str, Any],
                      device: Any, gen: Any) -> tuple[Any, list[float]]:
    """Cross-entropy on ``labels``; returns the trained model and its per-epoch losses."""
    import torch

    from trainables import backbones, loop

    model = backbones.create_backbone(backbone, num_classes=max(2, int(labels.max()) + 1),
                                      input_shape=dataset.input_shape).to(device)
    y = torch.tensor(labels, dtype=torch.long, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=hp["epochs"])
    losses = []
    for _ in range(hp["epochs"]):
        losses.append(loop.train_epoch(model, x, y, opt, batch_size=hp["batch_size"], generator=gen, device=device))
        sched.step()
    return model, losses
