"""``synthetic_timeseries``: wearable-like multichannel signals with demographics (paper B's setting).

Each example is ``channels`` x ``length`` samples of an accelerometer-like recording. The label is
the activity (1 "active", 0 "rest"), and two demographic attributes change the signal in ways the
options control, so both kinds of unfairness paper B studies can be produced on demand:

* activity (target): a sinusoid of amplitude ``target_strength`` on every channel, at 6 cycles per
  window when active and 2 when at rest, with a random phase per channel;
* sex (binary: female, male): the last channel's baseline is raised by ``sex_strength`` for male
  examples - a cue a network can use as a shortcut when the source split correlates it with the label
  (``source_correlation`` = P(sex code == label) in the source split);
* age band (k = 3: young, middle, old): the activity amplitude shrinks by ``age_attenuation`` from
  young to old (old examples are harder: a per-group performance gap), and channel 0 drifts by up to
  ``age_strength`` over the window;
* device (extra label, unrelated to all of the above): a period-4 square wave of amplitude
  ``device_strength`` on every channel - the control attribute for the ``control`` paradigm;
* noise: N(0, ``noise``) per sample.

``sensitive`` orders the attributes (the first drives interventions, so it must be ``sex`` for the
correlation and representation interventions). The finetuning, validation and test splits hold
every (label, primary group) cell in equal numbers with the other attribute balanced inside each
cell; the source split follows ``source_correlation`` on sex. A split is generated at once from its
own seeded generator and held in memory, so every index maps to the same signal in any process.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from trainables.data.base import (NAMES, SPLITS, Dataset, DatasetOptionError, Option, SplitMeta, canonical_options,
                                  check_indices, check_split, parse_options, register_dataset)
from trainables.data.synthetic import MAX_EXAMPLES, MAX_SEED, _cell_counts, _split_counts
from trainables.data.tables import INTERSECT_SEP

__all__ = ["SyntheticTimeseries", "OPTIONS", "GENERATOR_VERSION", "ATTRIBUTES", "ACTIVE_CYCLES", "REST_CYCLES"]

GENERATOR_VERSION = 1  # bump when the signals change, so cached pretrained bases are not reused
ATTRIBUTES: Mapping[str, tuple[str, ...]] = {"sex": ("female", "male"), "age": ("young", "middle", "old")}
ACTIVE_CYCLES, REST_CYCLES = 6.0, 2.0
_CELLS = "every (label, sex, age band) cell needs an example"
_META_STREAM, _SIGNAL_STREAM = 0, 1

OPTIONS: Mapping[str, Option] = {
    "n_source": Option(2000, int, 12, MAX_EXAMPLES, doc=_CELLS),
    "n_finetune": Option(3000, int, 12, MAX_EXAMPLES, doc=_CELLS),
    "n_val": Option(600, int, 12, MAX_EXAMPLES, doc=_CELLS),
    "n_test": Option(1200, int, 12, MAX_EXAMPLES, doc=_CELLS),
    "channels": Option(3, int, 1, 64),
    "length": Option(128, int, 16, 100_000, doc="samples per window"),
    "source_correlation": Option(0.5, float, 0.0, 1.0, doc="P(sex code == label) in the source split"),
    "noise": Option(1.0, float, 0.0),
    "target_strength": Option(1.0, float, 0.0),
    "sex_strength": Option(1.5, float, 0.0),
    "age_strength": Option(0.5, float, 0.0),
    "age_attenuation": Option(0.5, float, 0.0, 1.0, doc="share of the activity amplitude the oldest band loses"),
    "device_strength": Option(0.5, float, 0.0),
    "sensitive": Option(("sex", "age"), NAMES, doc="of sex, age; the first drives interventions"),
    "intersect": Option(None, NAMES, doc="[sex, age] adds the attribute sex_x_age (6 groups)"),
    "seed": Option(0, int, 0, MAX_SEED, doc="numpy's seed range"),
}


def _check_attributes(o: Mapping[str, Any]) -> None:
    unknown = [a for a in o["sensitive"] if a not in ATTRIBUTES]
    if unknown:
        raise DatasetOptionError("sensitive", list(o["sensitive"]), f"unknown attributes {unknown}; "
                                 f"synthetic_timeseries has {', '.join(ATTRIBUTES)}")
    if o["intersect"] is not None:
        if len(o["intersect"]) < 2 or any(a not in o["sensitive"] for a in o["intersect"]):
            raise DatasetOptionError("intersect", list(o["intersect"]), "must name two or more of the sensitive "
                                     f"attributes {list(o['sensitive'])}")


def _layout(counts: Mapping[tuple[int, int], int], k_other: int,
            rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Labels, primary codes, other-attribute codes and device in random order; the other attribute is
    balanced inside each (label, primary) cell and the device balanced inside each of those."""
    cols: list[list[np.ndarray]] = [[], [], [], []]
    for (y, g), c in counts.items():
        pos = np.arange(c)
        for col, values in zip(cols, (np.full(c, y), np.full(c, g), pos % k_other, (pos // k_other) % 2)):
            col.append(values)
    order = rng.permutation(sum(counts.values()))
    return tuple(np.concatenate(col).astype(np.int64)[order] for col in cols)


class SyntheticTimeseries(Dataset):
    """Deterministic synthetic wearable signals; see the module docstring for the design."""

    modality = "timeseries"

    def __init__(self, options: Mapping[str, Any] | None = None, name: str = "synthetic_timeseries"):
        self.name = name
        self.options: Mapping[str, Any] = parse_options(options, OPTIONS)
        _check_attributes(self.options)
        o = self.options
        self.input_shape = (int(o["channels"]), int(o["length"]))
        self.primary = o["sensitive"][0]
        self.group_names = {a: ATTRIBUTES[a] for a in o["sensitive"]}
        if o["intersect"]:
            parts = tuple(o["intersect"])
            combos = np.array(np.meshgrid(*[np.arange(len(ATTRIBUTES[a])) for a in parts], indexing="ij"))
            combos = combos.reshape(len(parts), -1).T
            self.group_names[INTERSECT_SEP.join(parts)] = tuple(
                "&".join(ATTRIBUTES[a][c] for a, c in zip(parts, row)) for row in combos.tolist())
        self._codes: dict[str, dict[str, np.ndarray]] = {}
        self._meta = {split: self._make_meta(split) for split in SPLITS}
        self._signals: dict[str, torch.Tensor] = {}  # filled on first use; not pickled

    def _make_meta(self, split: str) -> SplitMeta:
        o = self.options
        n = int(o[f"n_{split}"])
        rng = np.random.default_rng([int(o["seed"]), SPLITS.index(split), _META_STREAM])
        primary = "sex" if split == "source" else self.primary
        other = "age" if primary == "sex" else "sex"
        k_p = len(ATTRIBUTES[primary])
        if split == "source":
            counts = _cell_counts(n, float(o["source_correlation"]))
        else:
            cells = [(y, g) for g in range(k_p) for y in (1, 0)]
            counts = dict(zip(cells, _split_counts(n, len(cells))))
        labels, p_codes, o_codes, device = _layout(counts, len(ATTRIBUTES[other]), rng)
        codes = {primary: p_codes, other: o_codes}
        self._codes[split] = {**codes, "device": device, "labels": labels}
        attributes = {a: codes[a] for a in o["sensitive"]}
        if o["intersect"]:
            parts = tuple(o["intersect"])
            sizes = [len(ATTRIBUTES[a]) for a in parts]
            attributes[INTERSECT_SEP.join(parts)] = np.ravel_multi_index([codes[a] for a in parts], sizes)
        return SplitMeta(labels=labels, groups=codes[self.primary], attributes=attributes,
                         extra_labels={"device": device})

    def meta(self, split: str) -> SplitMeta:
        return self._meta[check_split(split)]

    def _signal(self, split: str) -> torch.Tensor:
        if split not in self._signals:
            self._signals[split] = torch.from_numpy(self._render(split))
        return self._signals[split]

    def _render(self, split: str) -> np.ndarray:
        o = self.options
        c, t_len = self.input_shape
        codes = self._codes[split]
        y, sex, age, device = codes["labels"], codes["sex"], codes["age"], codes["device"]
        n = len(y)
        rng = np.random.default_rng([int(o["seed"]), SPLITS.index(split), _SIGNAL_STREAM])
        t = np.arange(t_len, dtype=np.float32) / t_len
        out = rng.standard_normal((n, c, t_len), dtype=np.float32) * np.float32(o["noise"])
        phase = rng.uniform(0, 2 * np.pi, size=(n, c, 1)).astype(np.float32)
        cycles = np.where(y == 1, ACTIVE_CYCLES, REST_CYCLES).astype(np.float32)[:, None, None]
        age_frac = (age / (len(ATTRIBUTES["age"]) - 1)).astype(np.float32)
        amp = np.float32(o["target_strength"]) * (1 - np.float32(o["age_attenuation"]) * age_frac)
        out += amp[:, None, None] * np.sin(2 * np.pi * cycles * t[None, None, :] + phase)
        out[:, -1, :] += (np.float32(o["sex_strength"]) * sex.astype(np.float32))[:, None]
        out[:, 0, :] += np.float32(o["age_strength"]) * age_frac[:, None] * (2 * t[None, :] - 1)
        square = np.where((np.arange(t_len) // 2) % 2 == 0, 1.0, -1.0).astype(np.float32)
        out += (np.float32(o["device_strength"]) * device.astype(np.float32))[:, None, None] * square[None, None, :]
        return out

    def inputs(self, split: str, indices: np.ndarray | None = None) -> torch.Tensor:
        meta = self.meta(split)
        idx = check_indices(indices, len(meta), split)
        return self._signal(split)[torch.from_numpy(idx)]

    def fingerprint(self) -> str:
        return f"{self.name}/v{GENERATOR_VERSION}:{canonical_options(self.options, OPTIONS)}"

    def __getstate__(self) -> dict[str, Any]:  # ship metadata to Ray workers, regenerate signals there
        return {**self.__dict__, "_signals": {}}


@register_dataset("synthetic_timeseries", OPTIONS, "Wearable-like multichannel signals with sex and age-band "
                  "effects (paper B's setting on generated data).")
def _synthetic_timeseries(options: Mapping[str, Any]) -> Dataset:
    return SyntheticTimeseries(options)
