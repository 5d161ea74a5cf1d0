"""timm's pretrained weights, found only in the local Hugging Face / torch hub cache (fairsweep never downloads).

timm, torch and huggingface_hub are imported inside the functions that use them: ``trainables.paradigms``
imports this module, and ``fairsweep paradigms`` lists the paradigms without loading torch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainables import backbones
from trainables.errors import UserError
from trainables.pretrain_cache import sha256_file

if TYPE_CHECKING:
    from torch import nn

__all__ = ["TimmWeightsMissing", "timm_weights_file", "timm_model_from_cache", "content_id"]


class TimmWeightsMissing(UserError, ValueError):
    """timm's pretrained weights for a backbone are not in the local cache (fairsweep never downloads)."""


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

    cfg = get_pretrained_cfg(backbone) if isinstance(backbone, str) and backbone not in backbones.BACKBONES else None
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


def content_id(path: Path) -> str:
    """A content hash of a cached weights file: the HF blob name when it is one (already a sha256), else ours."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and len(real.name) == 64:
        return f"{path.name}:{real.name[:16]}"
    return f"{path.name}:{sha256_file(real)[:16]}"


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

    path = timm_weights_file(backbone)
    state = backbones.load_weights_file(path)
    return timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay={"state_dict": state},
                             **_timm_kwargs(backbone, input_shape))
