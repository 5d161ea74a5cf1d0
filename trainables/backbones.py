"""Backbones (timm or registered custom ones), their layer groups, and architecture-neutral freezing.

Freezing depth k means "the first k non-head coarse layer groups" (docs/architecture.md, decision 6), so one
``freeze_depth`` axis means the same thing for a ResNet (5 groups) and a ViT (13 groups). Groups come
from the model's own ``group_matcher(coarse=True)``; freezing is by parameter, so root-level
parameters (a ViT's ``pos_embed``, ``cls_token``) are covered, and BatchNorm layers inside fully
frozen modules become ``FrozenBatchNorm2d`` so their statistics stay put.

Custom backbones (``BACKBONES``) must follow timm's model contract:
``group_matcher(coarse: bool = False)`` returning a timm matcher (a dict of regexes or a callable,
as accepted by ``timm.models.group_parameters``) and ``get_classifier()`` returning the head module.

Call order in a trial: ``create_backbone`` -> ``load_backbone_state`` -> ``layer_groups`` ->
``apply_freeze`` (a ``trainables.trial.Freeze``, resolved against those groups) -> build the optimizer
over ``requires_grad`` parameters -> ``set_train_mode`` before each epoch. ``apply_freeze`` turns frozen BatchNorm parameters into buffers, so compute
groups before freezing and build the optimizer after.

torch, timm, safetensors and the modules that import torch (``trainables.timeseries_backbones``,
``trainables.data``) are imported inside functions: ``trainables.paradigms`` imports this module (through
``trainables.timm_weights``), and ``fairsweep paradigms`` lists the paradigms without loading torch.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from trainables.errors import UserError
from trainables.registry import Registry
from trainables.schema import did_you_mean

if TYPE_CHECKING:  # torch and timm are imported lazily so that importing this module stays cheap
    import torch
    from torch import nn

    from trainables.trial import Freeze

__all__ = [
    "BACKBONES",
    "BackboneError",
    "FreezeInfo",
    "LayerGroups",
    "apply_freeze",
    "backbone_state_dict",
    "count_layer_groups",
    "create_backbone",
    "data_config",
    "layer_groups",
    "load_backbone_state",
    "load_weights_file",
    "outermost_modules_within",
    "param_groups",
    "set_train_mode",
]

BackboneFactory = Callable[[int, int, tuple[int, ...]], "nn.Module"]
"""``factory(num_classes, in_chans, input_shape) -> nn.Module`` for ``BACKBONES`` entries."""

BACKBONES: Registry[BackboneFactory] = Registry("backbone")
"""Custom (non-timm) backbones; consulted before timm, so a registered name shadows a timm one.
The built-in 1-D backbones (``trainables.timeseries_backbones``) register on first lookup."""

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_MAX_LISTED = 5


class BackboneError(UserError, ValueError):
    """Unknown backbone, or weights that do not fit the model."""


# --------------------------------------------------------------------------------------- creation


def _register_builtin() -> None:
    """Import the modules whose entries fill BACKBONES; deferred because they import torch."""
    import trainables.timeseries_backbones  # noqa: F401  (cnn1d_paperb, cnn1d_tiny, transformer1d_tiny)


def _close_timm_names(name: str) -> str:
    """``did you mean ...?`` with up to _MAX_LISTED registered or timm names close to ``name`` ("" if none)."""
    import timm

    _register_builtin()
    return did_you_mean(name, BACKBONES.names() + timm.list_models(), n=_MAX_LISTED)


def _is_timm_model(name: str) -> bool:
    import timm

    return timm.is_model(name.split(".", 1)[0])  # "resnet50.a1_in1k": the tag only picks a config


def create_backbone(name: str, *, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """A freshly initialised classifier for ``input_shape`` = (C, H, W); never downloads weights."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise BackboneError(f"num_classes {num_classes!r} is not a positive int; use e.g. 2 for a binary task")
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise BackboneError(f"input_shape {input_shape!r} must be positive ints (C, H, W) or (C, L)")
    _register_builtin()
    if name in BACKBONES:
        return BACKBONES.get(name)(num_classes, shape[0], shape)
    if not isinstance(name, str) or not _is_timm_model(name):
        close = _close_timm_names(str(name))
        hint = f"; {close}" if close else ""
        raise BackboneError(
            f"backbone {name!r} is neither a registered backbone ({', '.join(BACKBONES.names()) or 'none'}) "
            f"nor a timm model{hint} (see timm.list_models())")
    if len(shape) != 3:
        raise BackboneError(f"input_shape {input_shape!r} for timm backbone {name!r} must be (C, H, W); for time "
                            f"series (C, L) use a 1-D backbone: {', '.join(BACKBONES.names())}")
    import timm
    from timm.models import get_pretrained_cfg

    kwargs: dict[str, Any] = {}
    cfg = get_pretrained_cfg(name)
    if cfg is not None and getattr(cfg, "fixed_input_size", False):  # ViT-like: pos_embed sized at build
        h, w = shape[1], shape[2]
        kwargs["img_size"] = h if h == w else (h, w)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=shape[0], **kwargs)


@functools.lru_cache(maxsize=64)
def _data_config(name: str, input_shape: tuple[int, ...]) -> Any:
    from timm.data import resolve_model_data_config

    from trainables.data.preprocessing import Preprocessing

    model = _meta_model(name, input_shape)
    if not getattr(model, "pretrained_cfg", None):
        return None
    return Preprocessing.from_config(resolve_model_data_config(model)).with_size(input_shape)


def data_config(name: str, input_shape: tuple[int, ...]) -> Any:
    """The model's own preprocessing (``trainables.data.preprocessing.Preprocessing``) at ``input_shape``.

    Mean, std, interpolation, crop fraction and mode come from timm's ``resolve_model_data_config`` of
    the model as ``create_backbone`` builds it (never downloading; a tag such as ``.clip`` picks its
    config); the size stays ``input_shape``, the size the sweep builds the model for. None for models
    without a timm data config (the 1-D backbones, custom ones lacking ``pretrained_cfg``): their
    datasets keep their own preprocessing. Pass it to ``Dataset.for_model``.
    """
    shape = tuple(input_shape)
    if len(shape) != 3:  # time series: nothing to resize or normalise from a model config
        return None
    return _data_config(name, shape)


def _meta_model(name: str, input_shape: tuple[int, ...]) -> nn.Module:
    """The backbone on the meta device (no memory for weights) when its constructor allows."""
    import torch

    try:
        with torch.device("meta"):
            return create_backbone(name, num_classes=2, input_shape=input_shape)
    except BackboneError:
        raise
    except Exception:  # some constructors compute on tensors (e.g. .item()); real weights then
        return create_backbone(name, num_classes=2, input_shape=input_shape)


# ----------------------------------------------------------------------------------- layer groups


@dataclass(frozen=True)
class LayerGroups:
    """Coarse non-head parameter groups in forward order (stem first) plus the classifier's parameters."""

    names: tuple[str, ...]
    params: tuple[tuple[str, ...], ...]
    head: tuple[str, ...]

    @property
    def n(self) -> int:
        return len(self.params)


def _classifier_modules(model: nn.Module) -> list[nn.Module]:
    get = getattr(model, "get_classifier", None)
    if get is None:
        raise BackboneError(
            f"model {type(model).__name__} has no get_classifier(); custom backbones must define "
            "get_classifier() and group_matcher(coarse) like timm models")
    head = get()
    return list(head) if isinstance(head, (tuple, list)) else [head]  # distilled ViTs return two heads


def _head_param_names(model: nn.Module) -> tuple[str, ...]:
    ids = {id(p) for m in _classifier_modules(model) for p in m.parameters()}
    return tuple(n for n, p in model.named_parameters() if id(p) in ids)


def _labels(groups: list[list[str]], head: tuple[str, ...]) -> tuple[str, ...]:
    """Readable labels: top-level module names, with the index added where a container spans groups."""
    owners: dict[str, set[int]] = {}
    for g, names in enumerate([*groups, list(head)]):
        for n in names:
            owners.setdefault(n.split(".", 1)[0], set()).add(g)
    labels = []
    for names in groups:
        parts: list[str] = []
        for n in names:
            comps = n.split(".")
            part = ".".join(comps[:2]) if len(owners[comps[0]]) > 1 and len(comps) > 2 else comps[0]
            if part not in parts:
                parts.append(part)
        labels.append("+".join(parts[:4]) + ("+..." if len(parts) > 4 else ""))
    return tuple(labels)


def layer_groups(model: nn.Module) -> LayerGroups:
    """The model's coarse groups (``group_matcher(coarse=True)``) minus the classifier's parameters."""
    from timm.models import group_parameters

    matcher_fn = getattr(model, "group_matcher", None)
    if matcher_fn is None:
        raise BackboneError(
            f"model {type(model).__name__} has no group_matcher(); custom backbones must define "
            "group_matcher(coarse: bool = False) returning a timm matcher (dict of regexes or callable)")
    head = _head_param_names(model)
    head_set = set(head)
    grouped = group_parameters(model, matcher_fn(coarse=True))
    groups = [[n for n in grouped[g] if n not in head_set] for g in sorted(grouped)]
    groups = [g for g in groups if g]
    covered = head_set.union(*map(set, groups)) if groups else head_set
    stray = [n for n, _ in model.named_parameters() if n not in covered]
    if stray:
        raise BackboneError(f"parameters {stray[:_MAX_LISTED]} of {type(model).__name__} are in no layer group; "
                            "make group_matcher(coarse=True) match every parameter")
    return LayerGroups(names=_labels(groups, head), params=tuple(map(tuple, groups)), head=head)


def count_layer_groups(name: str, input_shape: tuple[int, ...]) -> int:
    """Number of non-head groups, built on the meta device so large models count without weights."""
    return layer_groups(_meta_model(name, input_shape)).n


# ------------------------------------------------------------------------------------------ freezing


@dataclass(frozen=True)
class FreezeInfo:
    """What ``apply_freeze`` did; recorded per trial (counts differ by architecture)."""

    frozen_groups: tuple[int, ...]
    n_groups: int
    frozen_fraction: float  # of all parameters, head included in the denominator
    frozen_modules: tuple[str, ...]  # outermost modules whose parameters are all frozen; kept in eval mode


def outermost_modules_within(model: nn.Module, params: set[str]) -> tuple[str, ...]:
    """Outermost non-root modules that own parameters, all of them in ``params`` (pre-order walk): the modules
    a set of parameter names spans, e.g. those a freeze keeps in eval mode or whose outputs CKA reads."""
    out: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(o + ".") for o in out):
            continue
        names = [f"{name}.{n}" for n, _ in module.named_parameters()]
        if names and all(n in params for n in names):
            out.append(name)
    return tuple(out)


def apply_freeze(model: nn.Module, groups: LayerGroups, spec: Freeze, *, backbone: str | None = None) -> FreezeInfo:
    """Freeze the parameters of the groups ``spec`` names in ``groups`` (a ``SchemaError`` naming ``backbone``
    when it does not fit them); only freezes, so call it on a model not frozen before."""
    from timm.utils.model import freeze

    frozen = spec.resolve(groups.n, backbone=backbone)
    names = {n for g in frozen for n in groups.params[g]}
    params = dict(model.named_parameters())
    missing = sorted(names - params.keys())
    if missing:
        raise BackboneError(f"layer-group parameters {missing[:_MAX_LISTED]} are not in the model; "
                            "compute layer_groups on this model, before any freezing")
    total = sum(p.numel() for p in params.values())
    n_frozen = sum(params[n].numel() for n in names)
    modules = outermost_modules_within(model, names)
    for n in names:  # root-level parameters (pos_embed, cls_token) belong to no frozen submodule
        params[n].requires_grad_(False)
    if modules:  # an empty list would make timm freeze the whole model
        freeze(model, submodules=list(modules), include_bn_running_stats=True)
    return FreezeInfo(frozen_groups=frozen, n_groups=groups.n,
                      frozen_fraction=n_frozen / total if total else 0.0, frozen_modules=modules)


def set_train_mode(model: nn.Module, info: FreezeInfo) -> None:
    """``model.train()`` with frozen modules back in eval, so their dropout and norm layers stay fixed."""
    model.train()
    for name in info.frozen_modules:
        model.get_submodule(name).eval()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters as optimiser groups: ``weight_decay`` for each, plus 2λ where the model
    declares a Keras-style L2 penalty λ (``l2_penalties()``, e.g. ``cnn1d_paperb``): λ·Σw² in the loss has
    the gradient 2λ·w, which is what SGD's (coupled) weight decay adds. Groups keep the parameters' order."""
    l2 = model.l2_penalties() if hasattr(model, "l2_penalties") else {}
    groups: dict[float, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(weight_decay + 2.0 * l2.get(name, 0.0), []).append(p)
    return [{"params": params, "weight_decay": wd} for wd, params in groups.items()]


# ------------------------------------------------------------------------------------------- weights


def _classifier_keys(model: nn.Module) -> set[str]:
    heads = {id(m) for m in _classifier_modules(model)}
    keys: set[str] = set()
    for name, module in model.named_modules():
        if id(module) in heads:
            keys.update(f"{name}.{k}" if name else k for k in module.state_dict())
    return keys


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without classifier entries: what the pretraining cache stores and reuses."""
    head = _classifier_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in head}


def _unwrap(state: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in ("state_dict", "model"):
        inner = state.get(key) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping):
            return inner
    return state


def _is_bn_counter(key: str, expected: Mapping[str, Any]) -> bool:
    """``num_batches_tracked`` exists on BatchNorm but not on its frozen form: harmless either way."""
    return key.endswith(".num_batches_tracked") and key.rsplit(".", 1)[0] + ".running_mean" in expected


def _listing(keys: list[str]) -> str:
    more = f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def load_backbone_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a backbone state dict; the model's classifier keeps its own initialisation.

    Classifier entries in ``state`` are ignored (a pretraining head has its own class count), and every
    other key must match in name and shape, so weights of another architecture fail loudly.
    """
    import torch

    state = _unwrap(state)
    if not isinstance(state, Mapping):
        raise BackboneError(f"state of type {type(state).__name__} is not a state dict; pass a mapping name -> tensor")
    expected = model.state_dict()
    head = _classifier_keys(model)
    body = {k: v for k, v in state.items() if k not in head}
    not_tensor = [k for k, v in body.items() if not isinstance(v, torch.Tensor)]
    unexpected = [k for k in body if k not in expected and not _is_bn_counter(k, expected)]
    missing = [k for k in expected if k not in body and k not in head and not _is_bn_counter(k, expected)]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in body.items()
              if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape]
    problems = [f"{what}: {_listing(keys)}" for what, keys in (
        ("not tensors", not_tensor), ("unexpected keys", unexpected), ("missing keys", missing),
        ("shape mismatches (checkpoint vs model)", shapes)) if keys]
    if problems:
        raise BackboneError(f"weights do not fit {type(model).__name__} ({'; '.join(problems)}); "
                            "use weights saved from the same backbone and input channels")
    model.load_state_dict(body, strict=False)


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights-only checkpoint (.safetensors, or a torch file loaded with ``weights_only``)."""
    import torch

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in _WEIGHT_SUFFIXES:
        raise BackboneError(f"weights file {str(p)!r} has suffix {suffix!r}; use one of {', '.join(_WEIGHT_SUFFIXES)}")
    if not p.is_file():
        raise BackboneError(f"weights file {str(p)!r} does not exist; check the path")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, safetensors and zip errors have no common base class
        raise BackboneError(f"weights file {str(p)!r} is not a readable checkpoint ({type(exc).__name__}: "
                            f"{str(exc)[:200]}); save weights with safetensors or torch.save(state_dict)") from None
    state = _unwrap(state) if isinstance(state, Mapping) else state
    if not isinstance(state, Mapping):
        raise BackboneError(f"weights file {str(p)!r} holds a {type(state).__name__}, not a state dict; "
                            "save model.state_dict()")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise BackboneError(f"weights file {str(p)!r} has non-tensor entries {_listing(bad)}; save model.state_dict()")
    return dict(state)
