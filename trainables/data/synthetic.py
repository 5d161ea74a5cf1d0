"""``synthetic_images``: coloured-border images where the sensitive attribute out-shouts the target.

Paper A's effects appear when the group cue is far more salient than the target (gender in CelebA;
docs/architecture.md, "The science"), so the salience of every cue is an option. Each image is rendered from its own (seed, split, index) RNG, so
rendering index i alone or inside any batch yields the same pixels, in any process, and a trial pays
only for the rows it asks for.

Image of split s, index i (C=3, S=image_size):
  * noise: N(0, noise) per pixel;
  * target (label): a grey square of side S//4 in the top (label 1) or bottom (label 0) half, at a
    random column and a random row offset that is the same distribution in both halves;
  * group (primary attribute "group"): the top 3 rows of channel 0 (red, group 0) or 1 (green,
    group 1) raised by group_strength;
  * stripes (extra label "stripes", unrelated to both): vertical stripes of period 4 on all channels.

The source split has P(group == label) = source_correlation; val and test have eval_correlation (0.5,
balanced, by default; paper A evaluates at a fixed skew, where a model using the group cue gains accuracy
at fairness's expense, so performance and fairness trade off); the finetuning pool is balanced and the
interventions choose from it.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
import torch

from trainables.data.base import (DATASETS, SPLITS, Dataset, DatasetOptionError, Option, SplitMeta, check_indices,
                                    check_split, parse_options)

__all__ = ["SyntheticImages", "OPTIONS", "BORDER_ROWS", "GENERATOR_VERSION"]

GENERATOR_VERSION = 1  # bump when rendering changes, so cached pretrained bases are not reused
BORDER_ROWS = 3
_CELL_MIN = "every (label, group) cell needs an example"
MAX_EXAMPLES = 1_000_000  # per split: metadata is built for every split at plan time
MAX_SEED = 2**32 - 1  # numpy's seed range

OPTIONS: Mapping[str, Option] = {
    "n_source": Option(4000, int, 4, MAX_EXAMPLES, doc=_CELL_MIN),
    "n_finetune": Option(6000, int, 4, MAX_EXAMPLES, doc=_CELL_MIN),
    "n_val": Option(1000, int, 4, MAX_EXAMPLES, doc=_CELL_MIN),
    "n_test": Option(2000, int, 4, MAX_EXAMPLES, doc=_CELL_MIN),
    "source_correlation": Option(0.5, float, 0.0, 1.0, doc="P(group == label) in the source split"),
    "eval_correlation": Option(0.5, float, 0.05, 0.95, doc="P(group == label) in the val and test splits (paper A "
                               "evaluates at a fixed skew); every (label, group) cell keeps examples"),
    "image_size": Option(32, int, 16, 1024, doc="the border, margins and square need 16 pixels; at most 1024 "
                         "like folder images"),
    "noise": Option(0.6, float, 0.0),
    "target_strength": Option(0.8, float, 0.0),
    "group_strength": Option(1.5, float, 0.0),
    "stripe_strength": Option(0.5, float, 0.0),
    "seed": Option(0, int, 0, MAX_SEED, doc="numpy's seed range"),
}

# Stream tags keep the metadata RNG and the per-example RNGs of a split apart.
_META_STREAM, _PIXEL_STREAM = 0, 1
# Balanced cells, in the order that hands a remainder out label-balanced: (label, group).
_CELL_ORDER = ((1, 1), (0, 0), (0, 1), (1, 0))


def _split_counts(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` integers differing by at most one, the larger first."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _cell_counts(n: int, correlation: float) -> dict[tuple[int, int], int]:
    """Counts per (label, group): share ``correlation`` aligned (label == group), labels 50/50.

    Largest-remainder rounding: aligned = round(correlation * n); each side split in halves with the
    odd unit going to label 1 among the aligned and to label 0 among the conflicting.
    """
    aligned = int(np.floor(correlation * n + 0.5 + 1e-9))
    conflicting = n - aligned
    return {(1, 1): aligned - aligned // 2, (0, 0): aligned // 2,
            (0, 1): conflicting - conflicting // 2, (1, 0): conflicting // 2}


def _layout(counts: Mapping[tuple[int, int], int], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Labels, groups and stripes in a random order; stripes balanced within every cell."""
    labels, groups, stripes = [], [], []
    for (y, g), c in counts.items():
        labels.append(np.full(c, y))
        groups.append(np.full(c, g))
        stripes.append(np.arange(c) % 2)
    order = rng.permutation(sum(counts.values()))
    return tuple(np.concatenate(a).astype(np.int64)[order] for a in (labels, groups, stripes))


class SyntheticImages(Dataset):
    """Deterministic synthetic images; see the module docstring for the design."""

    modality = "image"
    primary = "group"
    group_names: Mapping[str, tuple[str, ...]] = {"group": ("red", "green")}

    def __init__(self, options: Mapping[str, Any] | None = None, name: str = "synthetic_images"):
        self.name = name
        self.options: Mapping[str, Any] = parse_options(options, OPTIONS)
        size = int(self.options["image_size"])
        self.input_shape = (3, size, size)
        self._meta = {split: self._make_meta(split) for split in SPLITS}
        self._square = size // 4
        self._half = size // 2
        self._max_offset = self._half - BORDER_ROWS - self._square  # >= 1 for size >= 16
        self._stripe_columns = ((np.arange(size) // 2) % 2 == 0).astype(np.float32)

    def _make_meta(self, split: str) -> SplitMeta:
        o = self.options
        n = int(o[f"n_{split}"])
        rng = np.random.default_rng([int(o["seed"]), SPLITS.index(split), _META_STREAM])
        if split == "source":
            counts = _cell_counts(n, float(o["source_correlation"]))
        elif split in ("val", "test") and float(o["eval_correlation"]) != 0.5:
            counts = _cell_counts(n, float(o["eval_correlation"]))
        else:
            counts = dict(zip(_CELL_ORDER, _split_counts(n, len(_CELL_ORDER))))
        empty = [cell for cell in _CELL_ORDER if counts[cell] == 0]
        if split in ("val", "test") and empty:  # the metrics need both labels in both groups
            skewed = float(o["eval_correlation"]) != 0.5
            raise DatasetOptionError("eval_correlation" if skewed else f"n_{split}",
                                     o["eval_correlation"] if skewed else n,
                                     f"leaves the {split} split's (label, group) cells {empty} empty at "
                                     f"n_{split} = {n}; raise n_{split}"
                                     + (" or move eval_correlation towards 0.5" if skewed else ""))
        labels, groups, stripes = _layout(counts, rng)
        return SplitMeta(labels=labels, groups=groups, attributes={"group": groups},
                         extra_labels={"stripes": stripes})

    def meta(self, split: str) -> SplitMeta:
        return self._meta[check_split(split)]

    def inputs(self, split: str, indices: np.ndarray | None = None) -> torch.Tensor:
        meta = self.meta(split)
        idx = check_indices(indices, len(meta), split)
        return torch.from_numpy(self._render(split, idx, meta))

    def _render(self, split: str, idx: np.ndarray, meta: SplitMeta) -> np.ndarray:
        o = self.options
        b, size = len(idx), self.input_shape[-1]
        out = np.empty((b, *self.input_shape), dtype=np.float32)
        cols = np.empty(b, dtype=np.int64)
        offsets = np.empty(b, dtype=np.int64)
        seed, split_id, noise = int(o["seed"]), SPLITS.index(split), np.float32(o["noise"])
        for row, i in enumerate(idx.tolist()):  # per-example RNG: what makes rendering index-stable
            rng = np.random.default_rng([seed, split_id, _PIXEL_STREAM, i])
            cols[row] = rng.integers(0, size - self._square + 1)
            offsets[row] = rng.integers(0, self._max_offset + 1)
            out[row] = rng.standard_normal(self.input_shape, dtype=np.float32)
        out *= noise

        labels, groups, stripes = meta.labels[idx], meta.groups[idx], meta.extra_labels["stripes"][idx]
        # target: square in the top half (label 1) or the bottom half (label 0), same offsets in both
        top = BORDER_ROWS + offsets + np.where(labels == 1, 0, size - self._half)
        pos = np.arange(size)
        in_rows = (pos >= top[:, None]) & (pos < top[:, None] + self._square)
        in_cols = (pos >= cols[:, None]) & (pos < cols[:, None] + self._square)
        square = (in_rows[:, :, None] & in_cols[:, None, :]).astype(np.float32)
        out += np.float32(o["target_strength"]) * square[:, None]
        # group: a top border on the group's colour channel
        out[np.arange(b), groups, :BORDER_ROWS, :] += np.float32(o["group_strength"])
        # control: vertical stripes on every channel
        out += (np.float32(o["stripe_strength"]) * stripes.astype(np.float32))[:, None, None, None] \
            * self._stripe_columns[None, None, None, :]
        return out

    def fingerprint(self) -> str:
        options = dict(self.options)
        if options.get("eval_correlation") == 0.5:  # the default, balanced: keys from before the option stay valid
            del options["eval_correlation"]
        canonical = json.dumps(options, sort_keys=True, separators=(",", ":"))
        return f"{self.name}/v{GENERATOR_VERSION}:{canonical}"


@DATASETS.register("synthetic_images", options=OPTIONS,
                   doc="Coloured-border images whose group cue out-shouts the target (paper A's effects on generated "
                       "data).")
def _synthetic_images(options: Mapping[str, Any]) -> Dataset:
    return SyntheticImages(options)
