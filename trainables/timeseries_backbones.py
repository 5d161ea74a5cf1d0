"""1-D backbones for time series (input ``(C, T)``), registered in ``backbones.BACKBONES``.

They follow timm's model contract, so freezing, pretraining paradigms and the trainable treat them
like any timm model: ``forward_features`` (unpooled features), ``forward_head(x, pre_logits)``
(pool, then the classifier unless ``pre_logits``), ``get_classifier()`` and
``group_matcher(coarse)`` with the stem and each later layer as its own group.

* ``cnn1d_paperb``: paper B's encoder (docs/architecture.md): conv 32/64/96 filters with kernels 24/16/8
  ('valid' padding, ReLU, dropout 0.1), global max pooling, then a dense head 128 -> classes. Its three
  layer groups are the three conv layers, so paper B's freezing setups read: nothing = ``full`` or 0,
  first conv = 1 (or [0]), middle conv = [1], first two = 2, first and last = [0, 2], all three
  (a probe of the dense head) = 3 or ``linear``. The dense head is the classifier, so it is rebuilt
  for every finetuning, as in paper B.
* ``cnn1d_tiny``: the same family with 8/16/16 filters, 'same' padding (any length) - for tests.
* ``transformer1d_tiny``: patch embedding (a strided conv) + learned position embedding, two
  pre-norm transformer blocks, a final norm, mean pooling and a linear head; groups: stem (patches and
  positions), then each block (the final norm joins the last block, as in timm's ViTs).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainables.backbones import BACKBONES, BackboneError

__all__ = ["CNN1d", "Transformer1d"]


def _sequence_shape(name: str, in_chans: int, input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 2 or input_shape[0] != in_chans:
        raise BackboneError(f"backbone {name!r} is a 1-D model; input_shape must be (channels, length), got "
                            f"{tuple(input_shape)} - use it with a time-series dataset")
    return int(input_shape[1])


class CNN1d(nn.Module):
    """Conv blocks (conv, ReLU, dropout), global max pooling and a dense head (paper B's family)."""

    def __init__(self, in_chans: int, num_classes: int, *, filters: tuple[int, ...], kernels: tuple[int, ...],
                 dropout: float, hidden: int, padding: str):
        super().__init__()

        def block(cin: int, cout: int, k: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv1d(cin, cout, k, padding=padding), nn.ReLU(), nn.Dropout(dropout))

        self.stem = block(in_chans, filters[0], kernels[0])
        self.blocks = nn.Sequential(*[block(filters[i - 1], filters[i], kernels[i]) for i in range(1, len(filters))])
        self.num_features = filters[-1]
        self.head = nn.Sequential(nn.Linear(self.num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.amax(dim=-1)  # global max pooling over time
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^stem", "blocks": r"^blocks\.(\d+)"}

    def get_classifier(self) -> nn.Module:
        return self.head


class Transformer1d(nn.Module):
    """A small ViT for sequences: non-overlapping patches of ``patch`` samples become tokens."""

    def __init__(self, in_chans: int, num_classes: int, length: int, *, dim: int, depth: int, heads: int,
                 patch: int, mlp_ratio: int = 2):
        super().__init__()
        self.patch_embed = nn.Conv1d(in_chans, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, length // patch, dim))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(dim, heads, dim * mlp_ratio, dropout=0.0,
                                                                 activation="gelu", batch_first=True,
                                                                 norm_first=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.num_features = dim
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).transpose(1, 2) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^pos_embed|^patch_embed", "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    def get_classifier(self) -> nn.Module:
        return self.head


@BACKBONES.register("cnn1d_paperb")
def cnn1d_paperb(num_classes: int, in_chans: int, input_shape: tuple[int, ...]) -> nn.Module:
    length = _sequence_shape("cnn1d_paperb", in_chans, input_shape)
    if length < 46:  # three 'valid' convolutions shorten the sequence by 23 + 15 + 7 samples
        raise BackboneError(f"backbone 'cnn1d_paperb' needs sequences of at least 46 samples (its 'valid' "
                            f"convolutions have kernels 24, 16, 8); got length {length} - use cnn1d_tiny")
    return CNN1d(in_chans, num_classes, filters=(32, 64, 96), kernels=(24, 16, 8), dropout=0.1, hidden=128,
                 padding="valid")


@BACKBONES.register("cnn1d_tiny")
def cnn1d_tiny(num_classes: int, in_chans: int, input_shape: tuple[int, ...]) -> nn.Module:
    _sequence_shape("cnn1d_tiny", in_chans, input_shape)
    return CNN1d(in_chans, num_classes, filters=(8, 16, 16), kernels=(7, 5, 3), dropout=0.1, hidden=16,
                 padding="same")


@BACKBONES.register("transformer1d_tiny")
def transformer1d_tiny(num_classes: int, in_chans: int, input_shape: tuple[int, ...]) -> nn.Module:
    length = _sequence_shape("transformer1d_tiny", in_chans, input_shape)
    patch = 8
    if length < patch:
        raise BackboneError(f"backbone 'transformer1d_tiny' needs sequences of at least {patch} samples (one "
                            f"patch); got length {length} - use cnn1d_tiny")
    return Transformer1d(in_chans, num_classes, length, dim=32, depth=2, heads=4, patch=patch)
