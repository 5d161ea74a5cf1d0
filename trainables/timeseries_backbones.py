"""1-D backbones for time series (input ``(C, T)``), registered in ``backbones.BACKBONES``.

They follow timm's model contract, so freezing, pretraining paradigms and the trainable treat them
like any timm model: ``forward_features`` (unpooled features), ``forward_head(x, pre_logits)``
(pool, then the classifier unless ``pre_logits``), ``get_classifier()`` and
``group_matcher(coarse)`` with the stem and each later layer as its own group.

* ``cnn1d_paperb``: paper B's encoder and finetuning head, as its public code builds them
  (Nokia-Bell-Labs/SSLfairness, ``code/baselines/SimCLR/simclr_models.py``: ``create_base_model`` and
  ``create_full_classification_model_from_base_model``; the supervised baseline,
  ``code/baselines/Supervised/supervised_models.py``, has the same encoder):

  - three conv blocks of 32/64/96 filters with kernels 24/16/8, each Conv1D -> ReLU -> Dropout(0.1),
    ``padding='same'`` (module constants ``padding='same'``, ``dropout=0.1``), then global max pooling;
  - the head the freezing experiments attach (``create_full_classification_model_from_base_model``):
    Dense(128, ReLU) -> Dropout(0.6) -> Dense(classes). (The supervised baseline's head drops 0.1; the
    freezing setups are paper B's question, so their head is the one kept.)
  - L2 regularisation ``kernel_regularizer=l2(1e-4)`` on every conv kernel and ``l2(1e-2)`` on the
    Dense(128) kernel, none on biases or the last Dense (``l2_penalties``). Keras adds them to the loss
    in ``fit`` (supervised training, finetuning); paper B's SimCLR loop takes gradients of NT-Xent alone
    (``simclr_utitlities.simclr_train_model``), so SimCLR pretraining runs without them, here as there.

  Translated from Keras to torch: Keras' 'same' pads an even kernel with (k - 1) // 2 samples on the
  left and the rest on the right (``_SameConv1d``, identical to torch's ``padding='same'``, without its
  warning and copy on even kernels); Keras initialises kernels glorot-uniform and biases with zeros
  (torch: kaiming-uniform and uniform biases), so both are set explicitly; ``l2(λ)`` adds λ·Σw² to the
  loss, which is a per-parameter SGD weight decay of 2λ (``backbones.param_groups``). Inputs are
  (channels, time), Keras' (time, channels) transposed. Frozen blocks keep their dropout off while
  training (decision 6); Keras leaves a frozen Dropout layer active.

  Its three layer groups are the three conv blocks, so paper B's freezing setups
  (``train_model_freeze_alternatives.py``: ``frozen_layers`` 0-3, ``middle``, ``first_last``) read:
  nothing = ``full`` or 0, first conv = 1 (or [0]), middle conv = [1], first two = 2, first and last
  = [0, 2], all three (a probe of the dense head) = 3 or ``linear``. The head is the classifier, so it
  is rebuilt for every finetuning, as in paper B.
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

__all__ = ["CNN1d", "Transformer1d", "cnn1d_paperb", "cnn1d_tiny", "transformer1d_tiny"]


def _sequence_shape(name: str, in_chans: int, input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 2 or input_shape[0] != in_chans:
        raise BackboneError(f"backbone {name!r} is a 1-D model; input_shape must be (channels, length), got "
                            f"{tuple(input_shape)} - use it with a time-series dataset")
    return int(input_shape[1])


class _SameConv1d(nn.Conv1d):
    """A stride-1 convolution with Keras' 'same' padding: (k - 1) // 2 zeros on the left, the rest on the
    right, so the output is as long as the input for any kernel (torch's ``padding='same'`` does the same,
    but warns and copies the input on every call when the kernel is even)."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__(cin, cout, k)
        self.pad = ((k - 1) // 2, k - 1 - (k - 1) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, self.pad))


class CNN1d(nn.Module):
    """Conv blocks (conv with 'same' padding, ReLU, dropout), global max pooling and a dense head (paper B's
    family).

    ``head_dropout`` > 0 adds a dropout between the head's two layers; ``l2`` maps parameter names to
    Keras-style L2 coefficients (``l2_penalties``); ``keras_init`` initialises as Keras does."""

    def __init__(self, in_chans: int, num_classes: int, *, filters: tuple[int, ...], kernels: tuple[int, ...],
                 dropout: float, hidden: int, head_dropout: float = 0.0,
                 l2: dict[str, float] | None = None, keras_init: bool = False):
        super().__init__()

        def block(cin: int, cout: int, k: int) -> nn.Sequential:
            return nn.Sequential(_SameConv1d(cin, cout, k), nn.ReLU(), nn.Dropout(dropout))

        self.stem = block(in_chans, filters[0], kernels[0])
        self.blocks = nn.Sequential(*[block(filters[i - 1], filters[i], kernels[i]) for i in range(1, len(filters))])
        self.num_features = filters[-1]
        drop = [nn.Dropout(head_dropout)] if head_dropout > 0 else []
        self.head = nn.Sequential(nn.Linear(self.num_features, hidden), nn.ReLU(), *drop, nn.Linear(hidden, num_classes))
        self._l2 = dict(l2 or {})
        if keras_init:  # glorot-uniform kernels, zero biases (Keras' Conv1D and Dense defaults)
            for m in self.modules():
                if isinstance(m, (nn.Conv1d, nn.Linear)):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)

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

    def l2_penalties(self) -> dict[str, float]:
        """Parameter name -> λ of a Keras ``l2(λ)`` regulariser (λ·Σw² added to the training loss)."""
        return dict(self._l2)


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
    _sequence_shape("cnn1d_paperb", in_chans, input_shape)
    conv_kernels = ("stem.0.weight", "blocks.0.0.weight", "blocks.1.0.weight")
    return CNN1d(in_chans, num_classes, filters=(32, 64, 96), kernels=(24, 16, 8), dropout=0.1, hidden=128,
                 head_dropout=0.6, keras_init=True,
                 l2={**{k: 1e-4 for k in conv_kernels}, "head.0.weight": 1e-2})


@BACKBONES.register("cnn1d_tiny")
def cnn1d_tiny(num_classes: int, in_chans: int, input_shape: tuple[int, ...]) -> nn.Module:
    _sequence_shape("cnn1d_tiny", in_chans, input_shape)
    return CNN1d(in_chans, num_classes, filters=(8, 16, 16), kernels=(7, 5, 3), dropout=0.1, hidden=16)


@BACKBONES.register("transformer1d_tiny")
def transformer1d_tiny(num_classes: int, in_chans: int, input_shape: tuple[int, ...]) -> nn.Module:
    length = _sequence_shape("transformer1d_tiny", in_chans, input_shape)
    patch = 8
    if length < patch:
        raise BackboneError(f"backbone 'transformer1d_tiny' needs sequences of at least {patch} samples (one "
                            f"patch); got length {length} - use cnn1d_tiny")
    return Transformer1d(in_chans, num_classes, length, dim=32, depth=2, heads=4, patch=patch)
