"""``synthetic_timeseries``: wearable-like multichannel signals with demographics (paper B's setting).

Each example is ``channels`` x ``length`` samples of an accelerometer-like recording. The label is
the activity (1 "active", 0 "rest"), and three demographic attributes change the signal in ways the
options control, so both kinds of unfairness paper B studies can be produced on demand:

* activity (target): a sinusoid of amplitude ``target_strength`` on every channel, at 6 cycles per
  window when active and 2 when at rest, with a random phase per channel;
* sex (binary: female, male): the last channel's baseline is raised by ``sex_strength`` for male
  examples - a cue a network can use as a shortcut when the source split correlates it with the label
  (``source_correlation`` = P(sex code == label) in the source split);
* age band (k = 3: young, middle, old): the activity amplitude shrinks by ``age_attenuation`` from
  young to old (old examples are harder: a per-group performance gap), and channel 0 drifts by up to
  ``age_strength`` over the window;
* skin tone (binary: light, dark): optical wrist sensors read darker skin with a weaker signal, so
  ``skin_noise`` adds N(0, ``skin_noise``) noise per sample to dark examples (0, the default, leaves the
  signal alone: then skin is an attribute no model has a reason to treat differently);
* device (extra label, unrelated to all of the above): a period-4 square wave of amplitude
  ``device_strength`` on every channel - the control attribute for the ``control`` paradigm;
* noise: N(0, ``noise``) per sample.

``sensitive`` orders the attributes (the first drives interventions, so it must be binary - sex or
skin - for the correlation and representation interventions). The finetuning, validation and test
splits hold every (label, primary group) cell in equal numbers with the other attributes balanced
inside each cell; the source split follows ``source_correlation`` on sex. A split is generated at once from its
own seeded generator and held in memory, so every index maps to the same signal in any process.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from trainables.data.base import (DATASETS, NAMES, SPLITS, Dataset, DatasetOptionError, Option, SplitMeta,
                                  canonical_options, check_indices, check_split, parse_options)
from trainables.data.synthetic import MAX_EXAMPLES, MAX_SEED, _cell_counts, _split_counts
from trainables.data.tables import INTERSECT_SEP

__all__ = ["SyntheticTimeseries", "OPTIONS", "GENERATOR_VERSION", "ATTRIBUTES", "ACTIVE_CYCLES", "REST_CYCLES"]

GENERATOR_VERSION = 1  # bump when the signals change, so cached pretrained bases are not reused
ATTRIBUTES: Mapping[str, tuple[str, ...]] = {"sex": ("female", "male"), "age": ("young", "middle", "old"),
                                             "skin": ("light", "dark")}
ACTIVE_CYCLES, REST_CYCLES = 6.0, 2.0
_CELLS = "every (label, sex, age band) cell needs an example"
_META_STREAM, _SIGNAL_STREAM, _SKIN_STREAM = 0, 1, 2
_SIZES = {**{a: len(groups) for a, groups in ATTRIBUTES.items()}, "device": 2}  # values of each laid-out column

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
    "skin_noise": Option(0.0, float, 0.0, doc="extra noise (sd) on dark-skin examples: a sensor that reads them worse"),
    "sensitive": Option(("sex", "age"), NAMES, doc="of sex, age, skin; the first drives interventions"),
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


def _others(primary: str) -> tuple[str, ...]:
    """The columns laid out inside each (label, primary) cell, in the order they are balanced."""
    return (*(a for a in ("sex", "age") if a != primary), "device", *(a for a in ("skin",) if a != primary))


def _layout(counts: Mapping[tuple[int, int], int], sizes: tuple[int, ...],
            rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Labels, primary codes and the other columns (``sizes`` values each) in random order; each other
    column is balanced inside each (label, primary) cell, and inside each combination of the columns
    before it (the j-th cycles through its values every prod(sizes[:j]) examples)."""
    strides = np.cumprod((1, *sizes[:-1]))
    cols: list[list[np.ndarray]] = [[] for _ in range(2 + len(sizes))]
    for (y, g), c in counts.items():
        pos = np.arange(c)
        values = (np.full(c, y), np.full(c, g), *((pos // st) % k for st, k in zip(strides, sizes)))
        for col, v in zip(cols, values):
            col.append(v)
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
        others = _others(primary)
        k_p = len(ATTRIBUTES[primary])
        if split == "source":
            counts = _cell_counts(n, float(o["source_correlation"]))
        else:
            cells = [(y, g) for g in range(k_p) for y in (1, 0)]
            counts = dict(zip(cells, _split_counts(n, len(cells))))
        labels, p_codes, *columns = _layout(counts, tuple(_SIZES[a] for a in others), rng)
        codes = {primary: p_codes, **dict(zip(others, columns))}
        self._codes[split] = {**codes, "labels": labels}
        for a in o["sensitive"] if split != "source" else ():  # metrics need both labels in every group
            missing = [ATTRIBUTES[a][g] for g in range(len(ATTRIBUTES[a]))
                       if len(set(labels[codes[a] == g].tolist())) < 2]
            if missing:
                raise DatasetOptionError(f"n_{split}", n, f"too few examples for both labels in the {a} groups "
                                         f"{missing}; raise n_{split}")
        attributes = {a: codes[a] for a in o["sensitive"]}
        if o["intersect"]:
            parts = tuple(o["intersect"])
            sizes = [len(ATTRIBUTES[a]) for a in parts]
            attributes[INTERSECT_SEP.join(parts)] = np.ravel_multi_index([codes[a] for a in parts], sizes)
        return SplitMeta(labels=labels, groups=codes[self.primary], attributes=attributes,
                         extra_labels={"device": codes["device"]})

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
        y, sex, age, device, skin = codes["labels"], codes["sex"], codes["age"], codes["device"], codes["skin"]
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
        if o["skin_noise"] > 0:  # its own stream: every other draw stays as it was without it
            extra = np.random.default_rng([int(o["seed"]), SPLITS.index(split), _SKIN_STREAM])
            out += (np.float32(o["skin_noise"]) * skin.astype(np.float32))[:, None, None] * \
                extra.standard_normal((n, c, t_len), dtype=np.float32)
        return out

    def inputs(self, split: str, indices: np.ndarray | None = None) -> torch.Tensor:
        meta = self.meta(split)
        idx = check_indices(indices, len(meta), split)
        return self._signal(split)[torch.from_numpy(idx)]

    def fingerprint(self) -> str:
        return f"{self.name}/v{GENERATOR_VERSION}:{canonical_options(self.options, OPTIONS)}"

    def __getstate__(self) -> dict[str, Any]:  # ship metadata to Ray workers, regenerate signals there
        return {**self.__dict__, "_signals": {}}


@DATASETS.register("synthetic_timeseries", options=OPTIONS,
                   doc="Wearable-like multichannel signals with sex, age-band and skin-tone effects (paper B's setting "
                       "on generated data).")
def _synthetic_timeseries(options: Mapping[str, Any]) -> Dataset:
    return SyntheticTimeseries(options)
