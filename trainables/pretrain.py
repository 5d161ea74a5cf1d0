"""Pretraining paradigms and the pretraining cache (docs/architecture.md, decision 3).

A paradigm turns a freshly initialised backbone into a pretrained one, usually by training on the
dataset's *source* split. Its result is keyed by everything that determines the weights, trained once
per cache and shared by every trial (and every later sweep) that needs it. Entries are written
atomically with sha256 checksums of the weights and of the metadata; a damaged entry is reported and
rebuilt, never loaded.

Every paradigm is a ``PARADIGMS`` entry whose ``doc`` says what it does and whose ``options`` are the
keys accepted under ``pretraining.paradigms.NAME`` in a sweep file (unknown keys are errors). Checks
that need only names and metadata (``check``, ``check_backbone``) run at plan time, before anything
trains; ``file:PATH`` paradigms are checked by ``check_weights_fit``.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from trainables.locks import key_lock
from trainables.registry import Registry

if TYPE_CHECKING:  # torch is imported lazily so that plan-time imports stay cheap
    import torch
    from torch import nn

__all__ = ["Option", "Paradigm", "PARADIGMS", "PretrainCache", "CacheError", "TimmWeightsMissing",
           "run_pretrain_job", "PretrainOutcome", "timm_weights_file", "check_weights_fit", "describe_paradigms",
           "model_view", "preprocessing_part"]

WEIGHTS, META = "weights.safetensors", "meta.json"
_log = logging.getLogger(__name__)


class CacheError(RuntimeError):
    """A cache entry that is missing or fails its checksum."""


class TimmWeightsMissing(ValueError):
    """timm's pretrained weights for a backbone are not in the local cache (fairsweep never downloads)."""


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    """One paradigm hyper-parameter: its default (whose type is the option's type), meaning and bounds."""

    default: bool | int | float | str
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: the value must be > low

    def parse(self, paradigm: str, key: str, value: Any) -> bool | int | float | str:
        where = f"pretraining.paradigms.{paradigm}.{key}"
        kind = type(self.default)
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: got {value!r}; expected true or false ({self.doc})")
            return value
        if kind is str:
            if not isinstance(value, str) or not value:
                raise ValueError(f"{where}: got {value!r}; expected a non-empty string ({self.doc})")
            return value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
        if ok and kind is int:
            ok = float(value).is_integer()
        if ok:
            v = float(value)
            ok = (self.low is None or (v > self.low if self.low_open else v >= self.low)) and (self.high is None or v <= self.high)
        if not ok:
            bounds = [f"{'>' if self.low_open else '>='} {self.low:g}"] if self.low is not None else []
            bounds += [f"<= {self.high:g}"] if self.high is not None else []
            expected = " ".join(["an integer" if kind is int else "a number", " and ".join(bounds)]).strip()
            raise ValueError(f"{where}: got {value!r}; expected {expected} ({self.doc})")
        return int(value) if kind is int else float(value)


# ----------------------------------------------------------------------------- paradigms


@dataclass(frozen=True)
class TrainContext:
    """What a paradigm's trainer receives inside ``run_pretrain_job``."""

    backbone: str
    dataset: Any  # trainables.data.Dataset
    hparams: Mapping[str, Any]  # epochs, batch_size, lr, weight_decay, momentum, seed
    options: Mapping[str, Any]  # resolved paradigm options
    device: Any  # torch.device from loop.select_device()
    generator: Any  # torch.Generator seeded with hparams["seed"]


Trainer = Callable[["Paradigm", TrainContext], "tuple[nn.Module, list[float]]"]


@dataclass(frozen=True, eq=False)
class Paradigm:
    """A registered pretraining procedure; ``doc`` is its user-facing documentation.

    ``labels(meta, options)`` picks the source-split target of supervised-style paradigms;
    ``ssl_method`` names a ``trainables.ssl`` method for self-supervised ones.
    """

    name: str
    doc: str
    pretrains: bool
    trainer: Trainer | None = None
    labels: Callable[[Any, Mapping[str, Any]], np.ndarray] | None = None
    ssl_method: str | None = None
    options: Mapping[str, Option] = field(default_factory=dict)
    modalities: tuple[str, ...] = ("image", "timeseries")
    constraint: Callable[[Mapping[str, Any]], None] | None = None  # checks across options; raises ValueError
    weights_file: Callable[[str], Path] | None = None  # backbone -> local file the weights come from (timm)

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(self.options)

    def resolve_options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """Every option, typed and bounds-checked, defaults filled (so keys change when defaults do)."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(self.options) or "none"
            close = difflib.get_close_matches(unknown[0], list(self.options), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown option(s) {unknown} under pretraining.paradigms.{self.name}; "
                             f"allowed: {allowed}{hint}")
        resolved = {k: o.parse(self.name, k, options.get(k, o.default)) for k, o in self.options.items()}
        if self.constraint is not None:
            self.constraint(resolved)
        return resolved

    def check(self, dataset: Any, options: Mapping[str, Any]) -> None:
        """Raise ValueError when this paradigm cannot run on ``dataset`` with ``options``."""
        resolved = self.resolve_options(options)
        if dataset.modality not in self.modalities:
            raise ValueError(f"paradigm {self.name!r} supports {', '.join(self.modalities)} data, not "
                             f"{dataset.modality}; pick another paradigm for this dataset")
        if self.labels is not None:
            self.labels(dataset.meta("source"), resolved)  # raises if the dataset lacks what the paradigm needs

    def check_backbone(self, backbone: str, dataset: Any) -> None:
        """Raise ValueError when this paradigm cannot serve ``backbone`` (plan time, nothing trains)."""
        if self.weights_file is not None:
            self.weights_file(backbone)  # raises, naming what to fetch, when the file is not on disk
        if self.ssl_method is None:
            return
        from trainables.ssl import SSL_METHODS

        model = _build_for_check(backbone, dataset.input_shape)
        reason = SSL_METHODS.get(self.ssl_method).serves(model, tuple(dataset.input_shape))
        if reason:
            raise ValueError(f"paradigm {self.name!r} cannot pretrain backbone {backbone!r}: {reason}")

    def key_parts(self, backbone: str) -> dict[str, str]:
        """Identity of inputs outside the spec that determine the weights (timm's cached file)."""
        if self.weights_file is not None:
            return {"weights_file": _content_id(self.weights_file(backbone))}
        return {}

    def describe(self) -> str:
        lines = [f"{self.name}: {self.doc}"]
        lines += [f"    {k} (default {o.default!r}): {o.doc}" for k, o in self.options.items()]
        return "\n".join(lines)


def _build_for_check(backbone: str, input_shape: tuple[int, ...]) -> nn.Module:
    """The backbone on the meta device when its constructor allows (no memory for weights)."""
    import torch

    from trainables import backbones

    try:
        with torch.device("meta"):
            return backbones.create_backbone(backbone, num_classes=2, input_shape=input_shape)
    except backbones.BackboneError:
        raise
    except Exception:  # noqa: BLE001 - some constructors compute on tensors; build real weights then
        return backbones.create_backbone(backbone, num_classes=2, input_shape=input_shape)


PARADIGMS: Registry[Paradigm] = Registry("paradigm")


def _register(p: Paradigm) -> Paradigm:
    return PARADIGMS.register(p.name)(p)


def describe_paradigms() -> str:
    """Every paradigm with its options: the text a user reads to write ``pretraining.paradigms``."""
    return "\n".join(PARADIGMS.get(n).describe() for n in PARADIGMS.names()) + \
        "\nfile:PATH: weights-only load of a local .safetensors/.pt/.pth/.bin/.ckpt state dict (no options)."


def _mae_constraint(options: Mapping[str, Any]) -> None:
    if options["decoder_dim"] % options["decoder_heads"]:
        raise ValueError(f"pretraining.paradigms.mae: decoder_heads {options['decoder_heads']} must divide decoder_dim "
                         f"{options['decoder_dim']}; e.g. decoder_dim 64 with decoder_heads 4")


def _control_label(meta: Any, options: Mapping[str, Any]) -> np.ndarray:
    name = options["label"]
    if name not in meta.extra_labels:
        raise ValueError(f"pretraining.paradigms.control.label {name!r}: the dataset's source split has no such "
                         f"label (has: {', '.join(sorted(meta.extra_labels)) or 'none'})")
    return meta.extra_labels[name]


# ----------------------------------------------------------------------------- trainers


def _source_stream(ctx: TrainContext, epoch: int) -> Any:
    """One epoch of the source split streamed by the dataset's worker processes (folder data)."""
    n, bs = len(ctx.dataset.meta("source")), int(ctx.hparams["batch_size"])
    return ctx.dataset.loader("source", batch_size=bs, shuffle=True, seed=int(ctx.hparams["seed"]), epoch=epoch,
                              drop_last=n > bs)


def _train_supervised(paradigm: Paradigm, ctx: TrainContext) -> tuple[nn.Module, list[float]]:
    """Cross-entropy on the paradigm's source labels; returns the model and its per-epoch losses."""
    import torch

    from trainables import backbones, loop

    labels = paradigm.labels(ctx.dataset.meta("source"), ctx.options)
    hp = ctx.hparams
    model = backbones.create_backbone(ctx.backbone, num_classes=max(2, int(labels.max()) + 1),
                                      input_shape=ctx.dataset.input_shape).to(ctx.device)
    y = torch.tensor(labels, dtype=torch.long, device=ctx.device)
    smoothing = float(ctx.options.get("label_smoothing", 0.0))
    loss_fn = lambda logits, target: torch.nn.functional.cross_entropy(logits, target, label_smoothing=smoothing)  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=hp["epochs"])
    # Small data: the whole source split on the device once. Folder data: streamed by worker processes.
    x = ctx.dataset.inputs("source").to(ctx.device) if ctx.dataset.in_memory else None
    losses = []
    for epoch in range(hp["epochs"]):
        if x is not None:
            losses.append(loop.train_epoch(model, x, y, opt, batch_size=hp["batch_size"], generator=ctx.generator,
                                           device=ctx.device, loss_fn=loss_fn))
        else:
            losses.append(loop.train_epoch_batches(model, _source_stream(ctx, epoch), y, opt, device=ctx.device,
                                                   loss_fn=loss_fn))
        sched.step()
    return model, losses


def _train_ssl(paradigm: Paradigm, ctx: TrainContext) -> tuple[nn.Module, list[float]]:
    from trainables import backbones
    from trainables.ssl import train_ssl

    model = backbones.create_backbone(ctx.backbone, num_classes=2, input_shape=ctx.dataset.input_shape).to(ctx.device)
    # folder data: each epoch's shuffled batches decoded by worker processes
    data = ctx.dataset.inputs("source").to(ctx.device) if ctx.dataset.in_memory else partial(_source_stream, ctx)
    losses = train_ssl(model, data, method=paradigm.ssl_method, options=ctx.options, modality=ctx.dataset.modality,
                       hparams=ctx.hparams, device=ctx.device, generator=ctx.generator)
    return model, losses


def _materialise_timm(paradigm: Paradigm, ctx: TrainContext) -> tuple[nn.Module, list[float]]:
    """timm's own weights from the local cache, adapted by timm (classifier dropped, input channels,
    ViT position embeddings resized) and stored like any other pretrained backbone. Nothing trains."""
    model = timm_model_from_cache(ctx.backbone, ctx.dataset.input_shape)
    return model.to(ctx.device), []


# ----------------------------------------------------------------------------- the registry

_SUPERVISED_OPTS = {"label_smoothing": Option(0.0, "cross-entropy label smoothing", 0.0, 0.5)}
_PROJ = "output width of the projection head"

_register(Paradigm("scratch", "Random initialisation; no pretraining (the trial's own seed initialises it).",
                   pretrains=False))
_register(Paradigm("supervised", "Cross-entropy on the source split's target label: the ordinary supervised base. "
                   "With dataset option source_correlation 0.5 the group carries no information about the label, "
                   "so the model has no reason to encode it.", pretrains=True, trainer=_train_supervised,
                   labels=lambda m, o: m.labels, options=_SUPERVISED_OPTS))
_register(Paradigm("biased", "Cross-entropy on the source split's sensitive attribute, so the representation encodes "
                   "the group as a shortcut: paper A's controlled 'biased pretrained model' (its gendered base).",
                   pretrains=True, trainer=_train_supervised, labels=lambda m, o: m.groups, options=_SUPERVISED_OPTS))
_register(Paradigm("control", "Cross-entropy on an attribute unrelated to both target and group (paper A's control "
                   "bases); the attribute is an extra label of the source split.", pretrains=True,
                   trainer=_train_supervised, labels=_control_label,
                   options={**_SUPERVISED_OPTS, "label": Option("stripes", "which extra source label to predict")}))
_register(Paradigm("simclr", "Contrastive self-supervised pretraining: NT-Xent between two augmented views (lightly), "
                   "paper B's SSL method. Uses no labels.", pretrains=True, trainer=_train_ssl, ssl_method="simclr",
                   options={"temperature": Option(0.1, "NT-Xent temperature", 0.0, low_open=True),
                            "projection_dim": Option(64, _PROJ, 1)}))
_register(Paradigm("vicreg", "Non-contrastive self-supervised pretraining: variance-invariance-covariance "
                   "regularisation between two augmented views (lightly). Uses no labels.", pretrains=True,
                   trainer=_train_ssl, ssl_method="vicreg",
                   options={"projection_dim": Option(256, _PROJ + " (also its hidden width)", 1),
                            "invariance": Option(25.0, "weight of the invariance (MSE) term", 0.0),
                            "variance": Option(25.0, "weight of the variance term", 0.0),
                            "covariance": Option(1.0, "weight of the covariance term", 0.0)}))
_register(Paradigm("byol", "Non-contrastive self-supervised pretraining without negatives: an online network with a "
                   "predictor regresses a momentum (EMA) copy of itself across two augmented views (lightly heads "
                   "and loss). Uses no labels.", pretrains=True, trainer=_train_ssl, ssl_method="byol",
                   options={"projection_dim": Option(64, _PROJ, 1), "hidden_dim": Option(256, "hidden width of the heads", 1),
                            "ema": Option(0.99, "momentum of the target network", 0.0, 1.0)}))
_register(Paradigm("mae", "Masked autoencoding for ViT backbones: most patch tokens are dropped, the backbone encodes "
                   "the rest and a small transformer decoder reconstructs the missing pixels (lightly's masked ViT "
                   "modules). Images only; a plan-time error for non-ViT backbones.", pretrains=True,
                   trainer=_train_ssl, ssl_method="mae", modalities=("image",),
                   options={"mask_ratio": Option(0.75, "share of patch tokens hidden from the encoder", 0.0, 1.0, low_open=True),
                            "decoder_dim": Option(64, "decoder token width", 8),
                            "decoder_depth": Option(1, "decoder transformer blocks", 1),
                            "decoder_heads": Option(4, "decoder attention heads (must divide decoder_dim)", 1),
                            "norm_pix_loss": Option(True, "normalise each target patch (MAE's default)")},
                   constraint=_mae_constraint))
_register(Paradigm("timm", "timm's own pretrained weights for the backbone (e.g. resnet50.a1_in1k; the tag picks "
                   "which), read only from the local Hugging Face / torch hub cache - fairsweep never downloads. "
                   "A plan-time error names the files to fetch when they are absent. The classifier is dropped and "
                   "timm adapts input channels and ViT position embeddings to the dataset.", pretrains=True,
                   trainer=_materialise_timm, modalities=("image",), weights_file=lambda b: timm_weights_file(b)))


# ----------------------------------------------------------------------------- the model's preprocessing


def model_view(dataset: Any, backbone: str) -> Any:
    """``dataset`` as ``backbone`` expects its pixels (its timm data config: mean, std, interpolation,
    crop); generated data, which has no preprocessing, is returned as is without building anything."""
    if dataset.preprocessing is None:
        return dataset
    from trainables import backbones

    return dataset.for_model(backbones.data_config(backbone, dataset.input_shape))


def preprocessing_part(dataset: Any, backbone: str) -> dict[str, str]:
    """``{"preprocessing": canonical text}`` for a pretraining job's hyper-parameters, so its key (and its
    MLflow run) name the preprocessing its base was trained under; ``{}`` for generated data, whose keys
    stay as they were."""
    record = model_view(dataset, backbone).preprocessing_record()
    return {"preprocessing": record} if record else {}


# ----------------------------------------------------------------------------- timm's cached weights


def _hf_cache_dir() -> Path:
    """HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default; read at call time, not import time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _torch_hub_checkpoints() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def timm_weights_file(backbone: str) -> Path:
    """The local file holding timm's pretrained weights for ``backbone``; looks only at the disk.

    Follows timm 1.0's own resolution order (``_resolve_pretrained_source``): a ``file`` in the pretrained
    config, else the Hugging Face hub id (``model.safetensors``, then ``pytorch_model.bin``, or the
    config's ``hf_hub_filename``) in the HF cache, else the URL's file in torch hub's checkpoint folder.
    """
    from timm.models import get_pretrained_cfg

    from trainables.backbones import BACKBONES

    cfg = get_pretrained_cfg(backbone) if isinstance(backbone, str) and backbone not in BACKBONES else None
    if cfg is None:
        raise TimmWeightsMissing(f"backbone {backbone!r} has no timm pretrained weights (not a timm model with a "
                                 "pretrained config); use another paradigm or a file:PATH checkpoint")
    looked: list[str] = []
    if cfg.file:
        looked.append(str(cfg.file))
        if Path(cfg.file).is_file():
            return Path(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        cache = _hf_cache_dir()
        for name in names:
            found = try_to_load_from_cache(repo, name, cache_dir=str(cache), revision=revision or None)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
            looked.append(f"{repo}/{name} in {cache}")
    if cfg.url:
        path = _torch_hub_checkpoints() / os.path.basename(cfg.url.split("?")[0])
        if path.is_file():
            return path
        looked.append(str(path))
    if not looked:
        raise TimmWeightsMissing(f"timm publishes no pretrained weights for {backbone!r}; use another paradigm")
    repo = cfg.hf_hub_id or backbone
    raise TimmWeightsMissing(
        f"timm's pretrained weights for backbone {backbone!r} are not in the local cache (looked for: "
        f"{'; '.join(looked)}); fairsweep never downloads during a sweep. Fetch them once where there is network "
        f"(`huggingface-cli download {repo}` or `python -c \"import timm; timm.create_model('{backbone}', "
        f"pretrained=True)\"`), or point HF_HUB_CACHE / HF_HOME at a cache that holds them")


def _content_id(path: Path) -> str:
    """A content hash of a cached weights file: the HF blob name when it is one (already a sha256), else ours."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and len(real.name) == 64:
        return f"{path.name}:{real.name[:16]}"
    return f"{path.name}:{_sha256(real)[:16]}"


def _timm_kwargs(backbone: str, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """The constructor arguments ``backbones.create_backbone`` uses, so both build the same architecture."""
    from timm.models import get_pretrained_cfg

    kwargs: dict[str, Any] = {"num_classes": 2, "in_chans": input_shape[0]}
    cfg = get_pretrained_cfg(backbone)
    if cfg is not None and getattr(cfg, "fixed_input_size", False):
        h, w = input_shape[1], input_shape[2]
        kwargs["img_size"] = h if h == w else (h, w)
    return kwargs


def timm_model_from_cache(backbone: str, input_shape: tuple[int, ...]) -> nn.Module:
    """A timm model holding its cached pretrained weights; the file is read weights-only and handed to
    timm as an in-memory state dict, so timm's loader never reaches for the network."""
    import timm

    from trainables import backbones

    path = timm_weights_file(backbone)
    state = backbones.load_weights_file(path)
    return timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay={"state_dict": state},
                             **_timm_kwargs(backbone, input_shape))


# ----------------------------------------------------------------------------- file: checkpoints


def check_weights_fit(path: str | os.PathLike, backbone: str, input_shape: tuple[int, ...]) -> None:
    """Raise ValueError unless the weights-only checkpoint at ``path`` loads into ``backbone``."""
    from trainables import backbones

    state = backbones.load_weights_file(path)
    model = backbones.create_backbone(backbone, num_classes=2, input_shape=input_shape)
    backbones.load_backbone_state(model, state)


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

    def _verdict(self, key: str, weights: bytes | None = None) -> str:
        d = self.entry(key)
        if not d.exists():
            return "missing"
        try:
            meta = self._read_meta(key)
            digest = hashlib.sha256(weights).hexdigest() if weights is not None else _sha256(d / WEIGHTS)
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
        """The backbone state dict of an intact entry; ``CacheError`` for anything else.

        The file is read once and those very bytes are checked and deserialised, so a concurrent rebuild
        cannot slip unchecked weights in between the check and the load.
        """
        from safetensors.torch import load as load_bytes

        d = self.entry(key)
        try:
            data: bytes | None = (d / WEIGHTS).read_bytes()
        except OSError:
            data = None
        state = "missing" if not d.exists() else "damaged" if data is None else self._verdict(key, data)
        if state != "ok":
            raise CacheError(f"pretraining cache entry {key} under {self.root} is {state}; rerun the sweep to rebuild "
                             f"it (or `fairsweep cache clear --key {key}`)")
        return load_bytes(data)

    def write(self, key: str, state: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
        """Write to a temporary folder, then rename into place, so readers never see half an entry."""
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS))
        full = json.loads(json.dumps({**meta, "key": key, "sha256": _sha256(tmp / WEIGHTS)}, default=str))
        full["meta_sha256"] = _meta_digest(full)
        (tmp / META).write_text(json.dumps(full, indent=1))
        with open(tmp / META, "rb") as fh:  # flush both files before the rename publishes them
            os.fsync(fh.fileno())
        with open(tmp / WEIGHTS, "rb") as fh:
            os.fsync(fh.fileno())
        dest = self.entry(key)
        if dest.exists():  # a damaged entry: move it aside first (rename is atomic, rmtree is not)
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _meta_digest(meta: Mapping[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ----------------------------------------------------------------------------- running a job


@dataclass(frozen=True)
class PretrainOutcome:
    key: str
    path: str
    reused: bool  # True: an intact entry existed and nothing trained
    rebuilt_damaged: bool  # True: a damaged entry was found, discarded and rebuilt
    losses: tuple[float, ...] = ()
    seconds: float = 0.0
    device: str = "cpu"
    meta: Mapping[str, Any] = field(default_factory=dict)


def run_pretrain_job(job: Mapping[str, Any], cache_root: str, cpus: float = 1.0) -> PretrainOutcome:
    """Build (or reuse) one cache entry. ``job`` is a ``PretrainJob`` as a dict; runs inside a Ray task.

    Holding the key's lock, an intact entry is returned as is; a missing or damaged one is (re)built on
    ``loop.select_device()`` and written atomically. Concurrent calls for one key train it once.
    """
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
        if status == "damaged":
            _log.warning("pretraining cache entry %s under %s is damaged; discarding and rebuilding it", key, cache_root)
        cache._sweep_leftovers(key)
        loop.set_threads(cpus)
        device = loop.select_device()
        started = time.time()
        hp = dict(job["hparams"])
        paradigm = PARADIGMS.get(job["paradigm"])
        options = paradigm.resolve_options(hp.get("options", {}))
        dataset = model_view(build_dataset(job["dataset"], job["dataset_options"]), job["backbone"])
        planned = hp.get("preprocessing")
        if planned is not None and planned != dataset.preprocessing_record():
            raise ValueError(f"pretraining job {key} was planned with preprocessing {planned} but this worker resolves "
                             f"{dataset.preprocessing_record() or 'none'} for {job['backbone']!r}; install the same "
                             "timm version on the driver and every worker")
        torch.manual_seed(hp["seed"])
        gen = torch.Generator().manual_seed(hp["seed"])
        ctx = TrainContext(job["backbone"], dataset, hp, MappingProxyType(options), device, gen)
        with loop.memory_hint(device, int(hp["batch_size"])):
            model, losses = paradigm.trainer(paradigm, ctx)
        meta = {"backbone": job["backbone"], "paradigm": job["paradigm"], "dataset": job["dataset"],
                "dataset_options": job["dataset_options"], "hparams": hp, "options": options,
                "losses": [float(v) for v in losses], "device": str(device), "seconds": time.time() - started,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "rebuilt_damaged": status == "damaged",
                **paradigm.key_parts(job["backbone"])}
        path = cache.write(key, backbones.backbone_state_dict(model), meta)
        return PretrainOutcome(key, str(path), False, status == "damaged", tuple(meta["losses"]), meta["seconds"],
                               str(device), cache.meta(key))
