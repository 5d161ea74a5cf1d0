"""Pretraining paradigms: their options, their trainers and the registry (docs/architecture.md, decision 3).

A paradigm turns a freshly initialised backbone into a pretrained one, usually by training on the
dataset's *source* split. Every paradigm is a ``PARADIGMS`` entry whose ``doc`` says what it does and
whose ``options`` are the keys accepted under ``pretraining.paradigms.NAME`` in a sweep file (unknown
keys are errors). Checks that need only names and metadata (``check``, ``check_backbone``) run at plan
time, before anything trains; ``file:PATH`` paradigms are checked by ``check_weights_fit``. Running a
job and caching its result live in ``trainables.pretrain`` and ``trainables.pretrain_cache``.

torch and the modules that import it (``trainables.loop``; ``trainables.ssl``, which also imports this
module's ``ParadigmError``) are imported inside functions: ``fairsweep paradigms`` lists the paradigms and the
plan reads their options without loading torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from trainables import backbones, interventions
from trainables.errors import UserError
from trainables.registry import Registry
from trainables.schema import Option, SchemaError, Section
from trainables.timm_weights import content_id, timm_model_from_cache, timm_weights_file

if TYPE_CHECKING:  # torch is imported lazily so that plan-time imports stay cheap
    from torch import nn

__all__ = ["Paradigm", "ParadigmError", "PARADIGMS", "TrainContext", "check_weights_fit", "describe_paradigms", "lookup"]


# ----------------------------------------------------------------------------- options


class ParadigmError(UserError, ValueError):
    """A paradigm that cannot run as the sweep file asks (the data's modality or labels, the backbone);
    the message names the field and what is allowed. An option the schema refuses is a SchemaError."""


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
    precision: str = "bf16"  # resources.precision: pass it to loop's training functions (loop.autocast)


Trainer = Callable[["Paradigm", TrainContext], "tuple[nn.Module, list[float]]"]


@dataclass(frozen=True, eq=False)
class Paradigm:
    """A registered pretraining procedure; ``doc`` is its user-facing documentation.

    ``labels(meta, options)`` picks the source-split target of supervised-style paradigms and
    ``rows(meta, options, seed)`` the source rows they train on (None: all of them);
    ``ssl_method`` names a ``trainables.ssl`` method for self-supervised ones.
    """

    name: str
    doc: str
    pretrains: bool
    trainer: Trainer | None = None
    labels: Callable[[Any, Mapping[str, Any]], np.ndarray] | None = None
    rows: Callable[[Any, Mapping[str, Any], int], np.ndarray | None] | None = None
    ssl_method: str | None = None
    options: Mapping[str, Option] = field(default_factory=dict)
    modalities: tuple[str, ...] = ("image", "timeseries")
    constraint: Callable[[Mapping[str, Any]], None] | None = None  # checks across options; raises a UserError
    weights_file: Callable[[str], Path] | None = None  # backbone -> local file the weights come from (timm)

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(self.options)

    def resolve_options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """Every option, typed and bounds-checked, defaults filled (so keys change when defaults do); a
        refused one is a SchemaError at ``pretraining.paradigms.NAME.KEY`` (trainables.schema's dialect,
        like the whole sweep file)."""
        resolved = Section(dict(self.options)).complete(options, f"pretraining.paradigms.{self.name}")
        if self.constraint is not None:
            self.constraint(resolved)
        return resolved

    def check(self, dataset: Any, options: Mapping[str, Any]) -> None:
        """Raise ParadigmError when this paradigm cannot run on ``dataset`` with ``options``."""
        resolved = self.resolve_options(options)
        if dataset.modality not in self.modalities:
            raise ParadigmError(f"paradigm {self.name!r} supports {', '.join(self.modalities)} data, not "
                                f"{dataset.modality}; pick another paradigm for this dataset")
        if self.labels is not None:
            self.labels(dataset.meta("source"), resolved)  # raises if the dataset lacks what the paradigm needs
        if self.rows is not None:
            self.rows(dataset.meta("source"), resolved, 0)  # raises if the subset cannot be drawn

    def check_backbone(self, backbone: str, dataset: Any) -> None:
        """Raise a UserError (ParadigmError, TimmWeightsMissing) when this paradigm cannot serve ``backbone``
        (plan time, nothing trains)."""
        if self.weights_file is not None:
            self.weights_file(backbone)  # raises, naming what to fetch, when the file is not on disk
        if self.ssl_method is None:
            return
        from trainables.ssl import SSL_METHODS

        model = _build_for_check(backbone, dataset.input_shape)
        reason = SSL_METHODS.get(self.ssl_method).serves(model, tuple(dataset.input_shape))
        if reason:
            raise ParadigmError(f"paradigm {self.name!r} cannot pretrain backbone {backbone!r}: {reason}")

    def key_parts(self, backbone: str) -> dict[str, str]:
        """Identity of inputs outside the spec that determine the weights (timm's cached file)."""
        if self.weights_file is not None:
            return {"weights_file": content_id(self.weights_file(backbone))}
        return {}

    def describe(self) -> str:
        lines = [f"{self.name}: {self.doc}"]
        lines += [f"    {k} (default {o.default!r}): {o.doc}" for k, o in self.options.items()]
        return "\n".join(lines)


def _build_for_check(backbone: str, input_shape: tuple[int, ...]) -> nn.Module:
    """The backbone on the meta device when its constructor allows (no memory for weights)."""
    import torch

    try:
        with torch.device("meta"):
            return backbones.create_backbone(backbone, num_classes=2, input_shape=input_shape)
    except backbones.BackboneError:
        raise
    except Exception:  # noqa: BLE001 - some constructors compute on tensors; build real weights then
        return backbones.create_backbone(backbone, num_classes=2, input_shape=input_shape)


def _paradigm(name: str, trainer: Trainer | None, *, doc: str, **attributes: Any) -> Paradigm:
    """The entry ``PARADIGMS.register(name, doc=..., **attributes)`` makes of ``trainer``; None registers a
    paradigm that trains nothing (scratch)."""
    return Paradigm(name, doc, trainer is not None, trainer, **attributes)


PARADIGMS: Registry[Paradigm] = Registry("paradigm", _paradigm)
"""Every pretraining paradigm, one decorator each::

    @PARADIGMS.register("my_paradigm", doc="what it does", options={"alpha": Option(0.5, doc="...", low=0.0)})
    def train(paradigm: Paradigm, ctx: TrainContext) -> tuple[nn.Module, list[float]]: ...
"""


def lookup(name: str) -> Paradigm:
    """The paradigm an axis value names: a registered name, or ``NAME.VARIANT``, the registered paradigm NAME
    as a base of its own (its options under ``pretraining.paradigms.NAME.VARIANT``), so one sweep holds
    several bases of one paradigm, e.g. paper A's control bases ``control.hat`` and ``control.bangs``. An
    unknown name raises the registry's UnknownNameError."""
    if name in PARADIGMS or "." not in name or name.split(".", 1)[0] not in PARADIGMS:
        return PARADIGMS.get(name)
    return replace(PARADIGMS.get(name.split(".", 1)[0]), name=name)


def describe_paradigms() -> str:
    """Every paradigm with its options: the text a user reads to write ``pretraining.paradigms``."""
    return "\n".join(PARADIGMS.get(n).describe() for n in PARADIGMS.names()) + \
        "\nfile:PATH: weights-only load of a local .safetensors/.pt/.pth/.bin/.ckpt state dict (no options)."


def _mae_constraint(options: Mapping[str, Any]) -> None:
    if options["decoder_dim"] % options["decoder_heads"]:
        raise SchemaError("pretraining.paradigms.mae", dict(options), f"decoder_heads {options['decoder_heads']} must "
                          f"divide decoder_dim {options['decoder_dim']}; e.g. decoder_dim 64 with decoder_heads 4")


def _control_attribute(meta: Any, options: Mapping[str, Any]) -> np.ndarray:
    name = options["label"]
    if name not in meta.extra_labels:
        raise ParadigmError(f"label {name!r}: the dataset's source split has no such extra label (has: "
                            f"{', '.join(sorted(meta.extra_labels)) or 'none'})")
    return meta.extra_labels[name]


def _group_attribute(meta: Any, options: Mapping[str, Any]) -> np.ndarray:
    return meta.groups


def _attribute_or_target(attribute: Callable[[Any, Mapping[str, Any]], np.ndarray]) -> Callable[..., np.ndarray]:
    """The labels of a base built around an attribute: the attribute itself (paper A's bases), or the target
    when ``shortcut_correlation`` is set (the attribute is then a shortcut in its rows, ``_shortcut_rows``)."""

    def labels(meta: Any, options: Mapping[str, Any]) -> np.ndarray:
        values = attribute(meta, options)  # checked either way, so a missing attribute fails at plan time
        return values if options["shortcut_correlation"] is None else meta.labels

    return labels


def _shortcut_rows(attribute: Callable[[Any, Mapping[str, Any]], np.ndarray]) -> Callable[..., Any]:
    """The source rows of a shortcut base: the largest subset in which the attribute equals the target in a
    share ``shortcut_correlation`` of the examples, labels balanced (the correlation intervention's
    composition, drawn with the pretraining seed); None (every row) when the option is unset."""
    def rows(meta: Any, options: Mapping[str, Any], seed: int) -> np.ndarray | None:
        share = options["shortcut_correlation"]
        if share is None:
            return None
        values = attribute(meta, options)
        try:
            size = interventions.largest_feasible_size("correlation", meta.labels, values, share)
            if size == 0:
                raise interventions.InterventionError("no subset of the source split realises it")
            return interventions.apply_intervention("correlation", meta.labels, values, share, size, seed).indices
        except interventions.InterventionError as exc:
            raise ParadigmError(f"shortcut_correlation {share}: {exc} (the target and the attribute must be binary, "
                                "and every (target, attribute) cell the share needs must have examples)") from None

    return rows


def _shortcut_option(attribute: str) -> Option:
    return Option(None, kind=float, low=0.0, high=1.0, doc=f"unset: predict {attribute} itself (paper A's base). A "
                  f"share c: predict the target instead, on the largest subset of the source split in which {attribute} "
                  f"equals the target in a share c of the examples (labels balanced), so the base learns {attribute} as "
                  "a shortcut beside the target and still encodes the target (e.g. 0.95 on synthetic_images, whose "
                  "source split is balanced)")


def _views(augmentations: str, negate_p: float) -> dict[str, Option]:
    """The time-series view options of a two-view method (``trainables.ssl.TimeseriesViews``)."""
    return {"augmentations": Option(augmentations, doc="time-series views: a comma-separated list of scale, negate, "
                                    "time_warp, jitter, mask, applied in that order (images use a fixed crop, flip "
                                    "and colour set)"),
            "scale_sigma": Option(0.1, doc="sd of the per-channel scaling factor N(1, sd) (paper B's "
                                  "scaling_transform_vectorized)", low=0.0),
            "negate_p": Option(negate_p, doc="probability that a view is negated; paper B negates every input (1.0), "
                               "which flips the sign of both views alike; 0.5 makes it a random flip per view",
                               low=0.0, high=1.0)}


def _views_constraint(name: str) -> Callable[[Mapping[str, Any]], None]:
    """Checks a two-view method's ``augmentations`` names at plan time (ParadigmError naming the field)."""

    def check(options: Mapping[str, Any]) -> None:
        from trainables.ssl import parse_augmentations

        parse_augmentations(options["augmentations"], where=f"pretraining.paradigms.{name}.augmentations")

    return check


# ----------------------------------------------------------------------------- trainers


def _source_stream(ctx: TrainContext, epoch: int, rows: np.ndarray | None = None) -> Any:
    """One epoch of the source split (or its ``rows``) streamed by the dataset's worker processes (folder data)."""
    n = len(ctx.dataset.meta("source")) if rows is None else len(rows)
    bs = int(ctx.hparams["batch_size"])
    return ctx.dataset.loader("source", rows, batch_size=bs, shuffle=True, seed=int(ctx.hparams["seed"]), epoch=epoch,
                              drop_last=n > bs)


def _train_supervised(paradigm: Paradigm, ctx: TrainContext) -> tuple[nn.Module, list[float]]:
    """Cross-entropy on the paradigm's source labels; returns the model and its per-epoch losses."""
    import torch

    from trainables import loop

    hp = ctx.hparams
    meta = ctx.dataset.meta("source")
    labels = paradigm.labels(meta, ctx.options)
    rows = paradigm.rows(meta, ctx.options, int(hp["seed"])) if paradigm.rows is not None else None
    if rows is not None:
        labels = labels[rows]
    model = loop.to_device(backbones.create_backbone(ctx.backbone, num_classes=max(2, int(labels.max()) + 1),
                                                     input_shape=ctx.dataset.input_shape), ctx.device)
    y = torch.tensor(labels, dtype=torch.long, device=ctx.device)
    smoothing = float(ctx.options.get("label_smoothing", 0.0))
    loss_fn = lambda logits, target: torch.nn.functional.cross_entropy(logits, target, label_smoothing=smoothing)  # noqa: E731
    # a backbone's own L2 penalties (cnn1d_paperb: paper B's, which Keras' fit adds to the loss) join the decay
    opt = torch.optim.SGD(backbones.param_groups(model, hp["weight_decay"]), lr=hp["lr"], momentum=hp["momentum"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=hp["epochs"])
    # Small data: the whole source split on the device once. Folder data: streamed by worker processes.
    x = ctx.dataset.inputs("source", rows).to(ctx.device) if ctx.dataset.in_memory else None
    losses = []
    for epoch in range(hp["epochs"]):
        if x is not None:
            losses.append(loop.train_epoch(model, x, y, opt, batch_size=hp["batch_size"], generator=ctx.generator,
                                           device=ctx.device, loss_fn=loss_fn, precision=ctx.precision))
        else:
            losses.append(loop.train_epoch_batches(model, _source_stream(ctx, epoch, rows), y, opt, device=ctx.device,
                                                   loss_fn=loss_fn, precision=ctx.precision))
        sched.step()
    return model, losses


def _train_ssl(paradigm: Paradigm, ctx: TrainContext) -> tuple[nn.Module, list[float]]:
    from trainables.ssl import train_ssl

    model = backbones.create_backbone(ctx.backbone, num_classes=2, input_shape=ctx.dataset.input_shape).to(ctx.device)
    # folder data: each epoch's shuffled batches decoded by worker processes
    data = ctx.dataset.inputs("source").to(ctx.device) if ctx.dataset.in_memory else partial(_source_stream, ctx)
    losses = train_ssl(model, data, method=paradigm.ssl_method, options=ctx.options, modality=ctx.dataset.modality,
                       hparams=ctx.hparams, device=ctx.device, generator=ctx.generator, precision=ctx.precision)
    return model, losses


def _materialise_timm(paradigm: Paradigm, ctx: TrainContext) -> tuple[nn.Module, list[float]]:
    """timm's own weights from the local cache, adapted by timm (classifier dropped, input channels,
    ViT position embeddings resized) and stored like any other pretrained backbone. Nothing trains."""
    model = timm_model_from_cache(ctx.backbone, ctx.dataset.input_shape)
    return model.to(ctx.device), []


# ----------------------------------------------------------------------------- the registry

_SUPERVISED_OPTS = {"label_smoothing": Option(0.0, doc="cross-entropy label smoothing", low=0.0, high=0.5)}
_PROJ = "output width of the projection head"

PARADIGMS.register("scratch", doc="Random initialisation; no pretraining (the trial's own seed initialises it).")(None)
PARADIGMS.register(
    "supervised", labels=lambda m, o: m.labels, options=_SUPERVISED_OPTS,
    doc="Cross-entropy on the source split's target label: the ordinary supervised base. With dataset option "
        "source_correlation 0.5 the group carries no information about the label, so the model has no reason to "
        "encode it.")(_train_supervised)
PARADIGMS.register(
    "biased", labels=_attribute_or_target(_group_attribute), rows=_shortcut_rows(_group_attribute),
    options={**_SUPERVISED_OPTS, "shortcut_correlation": _shortcut_option("the sensitive attribute")},
    doc="Cross-entropy on the source split's sensitive attribute, so the representation encodes the group as a "
        "shortcut: paper A's controlled 'biased pretrained model' (its gendered base). With shortcut_correlation it "
        "predicts the target where the group is a shortcut instead, so it encodes the target as well as the "
        "group.")(_train_supervised)
PARADIGMS.register(
    "control", labels=_attribute_or_target(_control_attribute), rows=_shortcut_rows(_control_attribute),
    options={**_SUPERVISED_OPTS, "label": Option("stripes", doc="which extra source label to predict"),
             "shortcut_correlation": _shortcut_option("the label")},
    doc="Cross-entropy on an attribute unrelated to both target and group (paper A's control bases); the attribute "
        "is an extra label of the source split. With shortcut_correlation it predicts the target where that "
        "attribute is a shortcut instead: built like a shortcut biased base, with the group left out.")(_train_supervised)
PARADIGMS.register(
    "simclr", ssl_method="simclr", constraint=_views_constraint("simclr"),
    options={"temperature": Option(0.1, doc="NT-Xent temperature (paper B's train_model.py: 0.1)", low=0.0,
                                   low_open=True),
             "hidden_dim": Option(256, doc="first hidden width of the projection head (paper B's attach_simclr_head: "
                                  "256)", low=1),
             "hidden_dim_2": Option(128, doc="second hidden width of the projection head (paper B: 128)", low=1),
             "projection_dim": Option(50, doc=_PROJ + " (paper B: 50)", low=1),
             **_views("scale,negate", 1.0)},
    doc="Contrastive self-supervised pretraining, paper B's SSL method as its code runs it "
        "(Nokia-Bell-Labs/SSLfairness, code/baselines/SimCLR): NT-Xent (lightly) at temperature 0.1 between two views "
        "made by scaling and negation, through a 256 -> 128 -> 50 projection head. Uses no labels.")(_train_ssl)
PARADIGMS.register(
    "vicreg", ssl_method="vicreg", constraint=_views_constraint("vicreg"),
    options={"projection_dim": Option(256, doc=_PROJ + " (also its hidden width)", low=1),
             "invariance": Option(25.0, doc="weight of the invariance (MSE) term", low=0.0),
             "variance": Option(25.0, doc="weight of the variance term", low=0.0),
             "covariance": Option(1.0, doc="weight of the covariance term", low=0.0),
             **_views("time_warp,scale,negate,jitter,mask", 0.5)},
    doc="Non-contrastive self-supervised pretraining: variance-invariance-covariance regularisation between two "
        "augmented views (lightly). Uses no labels.")(_train_ssl)
PARADIGMS.register(
    "byol", ssl_method="byol", constraint=_views_constraint("byol"),
    options={"projection_dim": Option(64, doc=_PROJ, low=1),
             "hidden_dim": Option(256, doc="hidden width of the heads", low=1),
             "ema": Option(0.99, doc="momentum of the target network", low=0.0, high=1.0),
             **_views("time_warp,scale,negate,jitter,mask", 0.5)},
    doc="Non-contrastive self-supervised pretraining without negatives: an online network with a predictor regresses "
        "a momentum (EMA) copy of itself across two augmented views (lightly heads and loss). Uses no "
        "labels.")(_train_ssl)
PARADIGMS.register(
    "mae", ssl_method="mae", modalities=("image",), constraint=_mae_constraint,
    options={"mask_ratio": Option(0.75, doc="share of patch tokens hidden from the encoder", low=0.0, high=1.0,
                                  low_open=True),
             "decoder_dim": Option(64, doc="decoder token width", low=8),
             "decoder_depth": Option(1, doc="decoder transformer blocks", low=1),
             "decoder_heads": Option(4, doc="decoder attention heads (must divide decoder_dim)", low=1),
             "norm_pix_loss": Option(True, doc="normalise each target patch (MAE's default)")},
    doc="Masked autoencoding for ViT backbones: most patch tokens are dropped, the backbone encodes the rest and a "
        "small transformer decoder reconstructs the missing pixels (lightly's masked ViT modules). Images only; a "
        "plan-time error for non-ViT backbones.")(_train_ssl)
PARADIGMS.register(
    "timm", modalities=("image",), weights_file=lambda b: timm_weights_file(b),
    doc="timm's own pretrained weights for the backbone (e.g. resnet50.a1_in1k; the tag picks which), read only from "
        "the local Hugging Face / torch hub cache - fairsweep never downloads. A plan-time error names the files to "
        "fetch when they are absent. The classifier is dropped and timm adapts input channels and ViT position "
        "embeddings to the dataset.")(_materialise_timm)


# ----------------------------------------------------------------------------- file: checkpoints


def check_weights_fit(path: str | os.PathLike, backbone: str, input_shape: tuple[int, ...]) -> None:
    """Raise BackboneError unless the weights-only checkpoint at ``path`` loads into ``backbone``."""
    state = backbones.load_weights_file(path)
    model = backbones.create_backbone(backbone, num_classes=2, input_shape=input_shape)
    backbones.load_backbone_state(model, state)

