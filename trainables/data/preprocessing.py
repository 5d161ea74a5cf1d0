"""How image files become a model's input pixels: resize, crop, normalise, as the model was trained with.

Each timm model carries a data config (``timm.data.resolve_model_data_config(model)``): its
normalisation mean and std, interpolation, crop fraction and crop mode. A model pretrained with CLIP's
or 0.5/0.5 statistics that is fed ImageNet-normalised pixels still runs, with silently worse results,
so folder datasets apply the config of the model they feed (``Dataset.for_model``) through timm's own
evaluation transform. ``Preprocessing`` is that config as a frozen, hashable value whose ``canonical()``
text is recorded with trials and is part of pretraining cache keys.

torch, timm and torchvision are imported inside the functions that build or apply a transform: a
``Preprocessing`` and its canonical text (part of cache keys, computed when a plan is built) need none.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["Preprocessing", "IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "CROP_MODES"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # timm's names (PIL filters)
CROP_MODES = ("center", "squash", "border")  # timm's eval crop modes


def _channels(name: str, value: Any) -> tuple[float, float, float]:
    """Three finite floats (one value is repeated, as timm does for a single-value mean)."""
    vals = [value] if isinstance(value, (int, float)) else list(value) if isinstance(value, (list, tuple)) else None
    if (vals is None or len(vals) not in (1, 3)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals)):
        raise ValueError(f"preprocessing {name} {value!r} must be 1 or 3 finite numbers (one per RGB channel)")
    vals = vals * 3 if len(vals) == 1 else vals
    return (float(vals[0]), float(vals[1]), float(vals[2]))


@dataclass(frozen=True)
class Preprocessing:
    """A model's evaluation preprocessing: timm's data config fields that decide the pixels.

    ``input_size`` is (C, H, W) with C = 3 (files are decoded as RGB); the shorter side is resized to
    ``floor(size / crop_pct)`` with ``interpolation`` and the centre ``size`` cropped (``crop_mode``
    'squash' resizes both sides, 'border' pads), then pixels in [0, 1] are normalised with mean and std.
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        size = tuple(self.input_size) if isinstance(self.input_size, (list, tuple)) else None
        if size is None or len(size) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                      for d in size):
            raise ValueError(f"preprocessing input_size {self.input_size!r} must be three positive ints (C, H, W)")
        if size[0] != 3:
            raise ValueError(f"preprocessing input_size {size!r} has {size[0]} channels; image files are decoded as "
                             "RGB, so build the model with in_chans=3")
        mean, std = _channels("mean", self.mean), _channels("std", self.std)
        if min(std) <= 0:
            raise ValueError(f"preprocessing std {std!r} must be positive (pixels are divided by it)")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"preprocessing interpolation {self.interpolation!r} is not one of "
                             f"{', '.join(INTERPOLATIONS)}")
        if (isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float))
                or not 0 < self.crop_pct <= 4):
            raise ValueError(f"preprocessing crop_pct {self.crop_pct!r} must be a number in (0, 4] (timm's eval "
                             "crop fraction, e.g. 0.875 or 1.0)")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"preprocessing crop_mode {self.crop_mode!r} is not one of {', '.join(CROP_MODES)}")
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "crop_pct", float(self.crop_pct))

    @classmethod
    def imagenet(cls, size: int) -> Preprocessing:
        """What folder datasets do for a caller that names no model: shorter side to ``size``, centre
        square, bilinear, ImageNet statistics."""
        return cls((3, int(size), int(size)))

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Preprocessing) -> Preprocessing:
        """From timm's data config dict (``resolve_model_data_config``; extra keys ignored) or as is."""
        if isinstance(config, Preprocessing):
            return config
        if not isinstance(config, Mapping):
            raise TypeError(f"a data config must be a mapping like timm's resolve_model_data_config(model) returns, "
                            f"or a Preprocessing; got {type(config).__name__}")
        missing = [k for k in ("input_size", "mean", "std") if k not in config]
        if missing:
            raise ValueError(f"data config {dict(config)!r} lacks {', '.join(missing)}; pass "
                             "timm.data.resolve_model_data_config(model) or backbones.data_config(name, input_shape)")
        return cls(tuple(config["input_size"]), config["mean"], config["std"],
                   config.get("interpolation") or "bilinear",
                   config.get("crop_pct") or 0.875, config.get("crop_mode") or "center")  # timm's defaults

    def with_size(self, input_shape: tuple[int, ...]) -> Preprocessing:
        """The same normalisation, interpolation and crop at another (C, H, W)."""
        return Preprocessing(tuple(input_shape), self.mean, self.std, self.interpolation, self.crop_pct,
                             self.crop_mode)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def canonical(self) -> str:
        """Compact sorted JSON: the record logged with trials and hashed into pretraining keys."""
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))

    def geometry(self) -> str:
        """Canonical text of what decides the pixels before normalisation (size, interpolation, crop): models
        that differ only in mean and std share ``pixels``, and the decoded-image cache is keyed by this."""
        d = self.as_dict()
        return json.dumps({k: d[k] for k in ("input_size", "interpolation", "crop_pct", "crop_mode")},
                          sort_keys=True, separators=(",", ":"))

    def pixels(self, image: Any) -> np.ndarray:
        """uint8 (C, H, W) from an RGB PIL image: timm's evaluation transform up to its tensor conversion
        (resize, crop), the part worth caching; ``normalize`` does the rest."""
        return np.ascontiguousarray(np.asarray(_geometric(self)(image), dtype=np.uint8).transpose(2, 0, 1))

    def normalize(self, pixels: Any) -> Any:
        """float32 torch tensor from uint8 ``pixels`` (C, H, W) or (N, C, H, W): x / 255, minus mean, over std,
        the operations of timm's (torchvision's) ToTensor and Normalize in their order, so the result is
        bit for bit what the whole transform gives."""
        import torch

        x = torch.as_tensor(pixels).to(torch.float32).div(255)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return x.sub_(mean).div_(std)

    def __call__(self, image: Any) -> np.ndarray:
        """float32 (C, H, W) from an RGB PIL image, as timm's evaluation transform makes it."""
        return self.normalize(self.pixels(image)).numpy()


@functools.lru_cache(maxsize=16)
def _transform(pre: Preprocessing) -> Any:
    """timm's eval pipeline for ``pre``, built once per process (DataLoader workers inherit or rebuild it)."""
    from timm.data import create_transform

    return create_transform(input_size=pre.input_size, is_training=False, interpolation=pre.interpolation,
                            mean=pre.mean, std=pre.std, crop_pct=pre.crop_pct, crop_mode=pre.crop_mode)


@functools.lru_cache(maxsize=16)
def _geometric(pre: Preprocessing) -> Callable[[Any], Any]:
    """The PIL part of timm's eval pipeline: every step before its last two (to tensor, normalise)."""
    from torchvision import transforms

    steps = list(_transform(pre).transforms)
    if len(steps) < 2 or not isinstance(steps[-2], transforms.ToTensor) or not isinstance(steps[-1],
                                                                                          transforms.Normalize):
        raise RuntimeError(f"timm's evaluation transform no longer ends with ToTensor, Normalize ({steps}); "
                           "Preprocessing.pixels must be updated for this timm version")
    return transforms.Compose(steps[:-2])
