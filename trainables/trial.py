"""The trial contract: the typed values the plan decides and every later stage reads back
(docs/architecture.md, decision 11).

A finetuning trial is a ``TrialConfig``: its axis values (a ``TrialPoint``, its freezing a ``Freeze``), its
finetuning hyper-parameters and where its starting weights come from (``Weights``: a pretraining cache
key or a ``file:`` checkpoint). A pretrained base is a ``PretrainJob``. The plan builds them; they cross
process boundaries as plain JSON dicts (Tune's param space and searcher, the trials' shared context, MLflow's
``fairsweep.point`` tag) and are decoded on the other side by the ``from_dict`` here, in the worker, the
pretraining job, the tracker, the searcher and the report alike. The identities (trial keys, pretraining
keys; decisions 1 and 3) are hashed here too, so no other module parses a freeze depth or builds a key.

This module imports neither torch nor Ray: the spec and the plan use it before anything heavy loads.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from trainables.errors import FairsweepError
from trainables.pretrain_cache import sha256_file
from trainables.schema import SchemaError

__all__ = ["Freeze", "TrialPoint", "Weights", "TrialConfig", "PretrainHParams", "PretrainJob", "ContractError",
           "canonical_hash", "FREEZE_WORDS", "FREEZE_JSON_SCHEMA", "MAX_LAYER_GROUPS", "TUNE_KEY",
           "PRECISIONS"]

FREEZE_WORDS = ("linear", "full")
MAX_LAYER_GROUPS = 10_000  # a bound on k and on group indices, so a typo cannot build a huge range
_FREEZE_FORMS = "expected an integer k >= 0, 'linear', 'full' or a list of group indices like [0, 2]"
_FREEZE_USE = "'linear' or 'full', or a list of group indices"
TUNE_KEY = "trial"  # a Tune config is {TUNE_KEY: TrialConfig.to_dict()} (a grid cell, or the searcher's proposal)
_GROUP_INDEX_SCHEMA = {"type": "integer", "minimum": 0, "maximum": MAX_LAYER_GROUPS}
FREEZE_JSON_SCHEMA = {"anyOf": [_GROUP_INDEX_SCHEMA, {"enum": list(FREEZE_WORDS)},
                                {"type": "array", "items": _GROUP_INDEX_SCHEMA, "minItems": 1, "uniqueItems": True}]}
"""What ``Freeze.parse`` accepts, as JSON Schema (the sweep file's schema uses it for ``axes.freeze_depth``)."""


class ContractError(FairsweepError, ValueError):
    """A dict that does not decode into the contract's type: written by another fairsweep version, or a bug."""


def canonical_hash(obj: Any, length: int = 16) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace): equal configs, equal keys, any process."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# ----------------------------------------------------------------------------- freezing


def _group_index(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SchemaError(path, value, f"expected an integer >= 0 and <= {MAX_LAYER_GROUPS:,}")
    if not 0 <= value <= MAX_LAYER_GROUPS:
        raise SchemaError(path, value, f"must be >= 0 and <= {MAX_LAYER_GROUPS:,}")
    return value


def _canonical_freeze(value: Any, path: str) -> int | str | tuple[int, ...]:
    """A freeze value in its one canonical form (k, a word, or sorted unique indices); SchemaError otherwise."""
    if isinstance(value, Freeze):
        return value.value
    if isinstance(value, str):
        if value not in FREEZE_WORDS:
            raise SchemaError(path, value, _FREEZE_FORMS)
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise SchemaError(path, list(value), "an explicit freeze set needs at least one group index; use 'full' "
                                                 "to freeze nothing")
        indices = tuple(_group_index(v, f"{path}[{j}]") for j, v in enumerate(value))
        if len(set(indices)) != len(indices):
            raise SchemaError(path, list(value), "group indices must be unique")
        return tuple(sorted(indices))
    if isinstance(value, bool) or not isinstance(value, int):
        raise SchemaError(path, value, _FREEZE_FORMS)
    return _group_index(value, path)


@dataclass(frozen=True, repr=False)
class Freeze:
    """Which layer groups a trial freezes (docs/architecture.md, decision 6): the first ``k`` non-head
    groups, ``linear`` (all but the head), ``full`` (nothing) or exactly the listed groups. It means the
    same for every architecture until ``resolve`` meets one backbone's group count.

    ``value`` is canonical (k, a word, or a sorted tuple of unique indices); build one with ``parse`` from
    the sweep file's forms or ``from_label`` from its text form.
    """

    value: int | str | tuple[int, ...]

    def __post_init__(self) -> None:
        if _canonical_freeze(self.value, "freeze_depth") != self.value:
            raise TypeError(f"Freeze({self.value!r}) is not canonical; build it with Freeze.parse")

    @classmethod
    def parse(cls, value: Any, path: str = "freeze_depth") -> Freeze:
        """From the sweep file's forms: an integer k, ``linear``, ``full`` or a list of group indices
        (any order); a ``SchemaError`` at ``path`` names what is allowed."""
        return cls(_canonical_freeze(value, path))

    @classmethod
    def from_label(cls, text: Any, path: str = "freeze_depth") -> Freeze:
        """The inverse of ``label``: ``"2"``, ``"linear"``, ``"[0,2]"`` (MLflow params, Optuna's choices)."""
        if isinstance(text, str) and text.startswith("[") and text.endswith("]"):
            parts = [p.strip() for p in text[1:-1].split(",") if p.strip()]
            if not all(p.isdigit() for p in parts):
                raise SchemaError(path, text, _FREEZE_FORMS)
            return cls.parse([int(p) for p in parts], path)
        if isinstance(text, str) and text.isdigit():
            return cls.parse(int(text), path)
        return cls.parse(text, path)

    def label(self) -> str:
        """The stable text form: ``2``, ``linear``, ``[0,2]`` (MLflow params, run names, Optuna's choices)."""
        if isinstance(self.value, tuple):
            return "[" + ",".join(str(i) for i in self.value) + "]"
        return str(self.value)

    __str__ = label

    def __repr__(self) -> str:
        return f"Freeze({self.value!r})"

    def to_value(self) -> int | str | list[int]:
        """The sweep file's (and JSON's) form; ``parse`` reads it back."""
        return list(self.value) if isinstance(self.value, tuple) else self.value

    def sort_key(self) -> tuple:
        """0, 1, 2, ... then explicit sets, then linear and full: how a depth axis reads left to right."""
        if isinstance(self.value, int):
            return (0, self.value, "")
        return (1 if isinstance(self.value, tuple) else 2, 0, self.label())

    def resolve(self, n_groups: int, *, backbone: str | None = None, path: str = "freeze_depth") -> tuple[int, ...]:
        """The sorted indices of the groups frozen in a backbone of ``n_groups`` non-head layer groups;
        a ``SchemaError`` at ``path`` when the value does not fit it."""
        span = f"the {n_groups} layer groups{f' of {backbone}' if backbone else ''} (0..{n_groups - 1})"
        use = f"use 0..{n_groups}, {_FREEZE_USE}"
        if self.value == "full":
            return ()
        if self.value == "linear":
            return tuple(range(n_groups))
        if isinstance(self.value, int):
            if self.value > n_groups:
                raise SchemaError(path, self.value, f"exceeds {span}; {use}")
            return tuple(range(self.value))
        outside = [i for i in self.value if i >= n_groups]
        if outside:
            raise SchemaError(path, self.to_value(), f"holds indices {outside} outside {span}; {use}")
        return self.value


# ----------------------------------------------------------------------------- decoding helpers


def _fields(d: Any, kind: str, required: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise ContractError(f"a {kind} is a mapping, not {type(d).__name__}")
    missing = [k for k in required if k not in d]
    if missing:
        raise ContractError(f"this {kind} lacks {', '.join(missing)} (has: {', '.join(map(str, d)) or 'nothing'}); "
                            "it was written by another fairsweep version: resume the sweep with the version that "
                            "launched it, or launch it anew under another name")
    return d


def _hparam(value: Any) -> Any:
    """A finetuning hyper-parameter as the plan holds it: a candidate list of the inner search as a tuple."""
    return tuple(value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------- trials


@dataclass(frozen=True)
class TrialPoint:
    """A trial's axis values: one cell of the grid, or one proposal of the Optuna search."""

    backbone: str
    paradigm: str
    intervention: str
    magnitude: float
    freeze_depth: Freeze
    seed: int
    finetune_size: int
    searched: tuple[tuple[str, float], ...] = ()  # finetuning hyper-parameters the sampler chose, by name

    _KEYS = ("backbone", "paradigm", "intervention", "magnitude", "freeze_depth", "seed", "finetune_size")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; also the MLflow ``fairsweep.point`` tag, which ``fairsweep cka`` pairs trials by."""
        return {"backbone": self.backbone, "paradigm": self.paradigm, "intervention": self.intervention,
                "magnitude": self.magnitude, "freeze_depth": self.freeze_depth.to_value(), "seed": self.seed,
                "finetune_size": self.finetune_size, "searched": dict(self.searched)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrialPoint:
        d = _fields(d, "trial point", cls._KEYS)
        searched = tuple(sorted((str(k), float(v)) for k, v in (d.get("searched") or {}).items()))
        return cls(str(d["backbone"]), str(d["paradigm"]), str(d["intervention"]), float(d["magnitude"]),
                   Freeze.parse(d["freeze_depth"]), int(d["seed"]), int(d["finetune_size"]), searched)

    def run_name(self) -> str:
        """A readable MLflow run name; the trial key, not this, identifies the run."""
        return f"{self.backbone}-{self.paradigm}-{self.intervention}{self.magnitude:g}-f{self.freeze_depth}-s{self.seed}"


@dataclass(frozen=True)
class Weights:
    """Where a trial's backbone starts: ``key`` identifies the weights (a pretraining cache key, or the
    content hash of a ``file:`` checkpoint), ``file`` is that checkpoint's absolute path; no key: the
    backbone's random initialisation from the trial's seed."""

    key: str | None = None
    file: str | None = None

    @classmethod
    def from_file(cls, path: str) -> Weights:
        """A weights-only checkpoint, keyed by its content: the same file under another name is the same base."""
        return cls("file-" + sha256_file(path)[:16], path)

    def to_dict(self) -> dict[str, str | None]:
        return {"key": self.key, "file": self.file}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Weights:
        d = _fields(d, "weights reference", ("key", "file"))
        return cls(None if d["key"] is None else str(d["key"]), None if d["file"] is None else str(d["file"]))


@dataclass(frozen=True)
class TrialConfig:
    """Everything a worker needs to run one trial, beyond what every trial of the sweep shares."""

    point: TrialPoint
    # epochs, batch_size, lr, weight_decay (one value, or the inner search's candidates as a tuple), momentum,
    # threshold ("calibrated" or a number), select_epoch; the values the sampler chose (point.searched) included
    finetune: Mapping[str, Any] = field(default_factory=dict)
    weights: Weights = Weights()

    def identity(self, dataset_fingerprint: str) -> dict[str, Any]:
        """What determines the trial's result apart from its seed (docs/architecture.md, decision 1)."""
        p = self.point
        return {"dataset": dataset_fingerprint, "backbone": p.backbone, "pretrain": self.weights.key,
                "paradigm": p.paradigm, "intervention": p.intervention, "magnitude": p.magnitude,
                "freeze_depth": p.freeze_depth.label(), "finetune": {**self.finetune, "size": p.finetune_size}}

    def keys(self, dataset_fingerprint: str) -> tuple[str, str]:
        """(trial key, config key): the config key leaves the seed out, so repeats of a configuration share it."""
        ident = self.identity(dataset_fingerprint)
        return canonical_hash({**ident, "seed": self.point.seed}), canonical_hash(ident)

    def params(self) -> dict[str, str]:
        """The MLflow params of the trial's run. An inner search's candidate list is ``finetune.NAME_candidates``
        (the pick becomes ``finetune.NAME`` when the trial ends)."""
        p = self.point
        hparams = {(f"{k}_candidates" if isinstance(v, tuple) else k): v for k, v in self.finetune.items()}
        return {**{f"finetune.{k}": str(v) for k, v in hparams.items()}, "finetune.size": str(p.finetune_size),
                "backbone": p.backbone, "paradigm": p.paradigm, "intervention.kind": p.intervention,
                "intervention.magnitude": repr(p.magnitude), "freeze_depth": p.freeze_depth.label(),
                "seed": str(p.seed)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what Tune carries in ``config[TUNE_KEY]``."""
        return {"point": self.point.to_dict(),
                "finetune": {k: list(v) if isinstance(v, tuple) else v for k, v in self.finetune.items()},
                "weights": self.weights.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrialConfig:
        d = _fields(d, "trial config", ("point", "finetune", "weights"))
        return cls(TrialPoint.from_dict(d["point"]), {str(k): _hparam(v) for k, v in d["finetune"].items()},
                   Weights.from_dict(d["weights"]))

    @classmethod
    def from_tune(cls, config: Mapping[str, Any]) -> TrialConfig:
        """The trial of a Tune config (``{TUNE_KEY: to_dict()}``), as the worker and the tracker receive it."""
        return cls.from_dict(_fields(config, "Tune config", (TUNE_KEY,))[TUNE_KEY])


# ----------------------------------------------------------------------------- pretraining


# resources.precision: bf16 autocast on GPUs that support it, or fp32 throughout (trainables/loop.py)
PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class PretrainHParams:
    """A pretraining job's hyper-parameters: the spec's ``pretraining`` section, the paradigm's options with
    their defaults filled, and, for folder images, the preprocessing the base is trained under."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    momentum: float
    seed: int
    options: Mapping[str, Any] = field(default_factory=dict)
    preprocessing: str | None = None  # canonical text; None for generated data, whose keys stay as they were
    # what the job computes in: bf16 (a GPU sweep with resources.precision bf16) or fp32 (an fp32 sweep, or any
    # sweep on CPUs). A bf16 base differs from an fp32 one, so bf16 enters the key; fp32 stays out of it, so CPU
    # keys made before the option existed stay as they were
    precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        d = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "weight_decay": self.weight_decay,
             "momentum": self.momentum, "seed": self.seed, "options": dict(self.options)}
        if self.preprocessing is not None:
            d["preprocessing"] = self.preprocessing
        return {**d, "precision": self.precision} if self.precision != "fp32" else d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PretrainHParams:
        d = _fields(d, "pretraining hparams", ("epochs", "batch_size", "lr", "weight_decay", "momentum", "seed"))
        if d.get("precision", "fp32") not in PRECISIONS:
            raise ContractError(f"pretraining hparams: precision {d['precision']!r} is not one of "
                                f"{', '.join(PRECISIONS)}")
        return cls(int(d["epochs"]), int(d["batch_size"]), float(d["lr"]), float(d["weight_decay"]),
                   float(d["momentum"]), int(d["seed"]), dict(d.get("options") or {}), d.get("preprocessing"),
                   str(d.get("precision", "fp32")))


@dataclass(frozen=True)
class PretrainJob:
    """One pretrained base to build; shared by every trial with the same (backbone, paradigm)."""

    key: str
    backbone: str
    paradigm: str
    dataset: str
    dataset_options: Mapping[str, Any]
    hparams: PretrainHParams

    @classmethod
    def create(cls, backbone: str, paradigm: str, dataset: str, dataset_options: Mapping[str, Any],
               hparams: PretrainHParams, *, dataset_fingerprint: str,
               key_parts: Mapping[str, str] | None = None) -> PretrainJob:
        """The job keyed by everything that determines its weights (docs/architecture.md, decision 3):
        the source data's fingerprint, the job's fields and ``key_parts`` (inputs outside the spec, such as
        the content of timm's cached file)."""
        job = cls("", backbone, paradigm, dataset, dict(dataset_options), hparams)
        identity = {"fingerprint": dataset_fingerprint, **job._identity(), **dict(key_parts or {})}
        return cls(canonical_hash(identity), backbone, paradigm, dataset, dict(dataset_options), hparams)

    def _identity(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "paradigm": self.paradigm, "dataset": self.dataset,
                "dataset_options": dict(self.dataset_options), "hparams": self.hparams.to_dict()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what the trial that builds the base receives (``TrialContext.pretrain_jobs``)."""
        return {"key": self.key, **self._identity()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PretrainJob:
        d = _fields(d, "pretraining job", ("key", "backbone", "paradigm", "dataset", "dataset_options", "hparams"))
        return cls(str(d["key"]), str(d["backbone"]), str(d["paradigm"]), str(d["dataset"]),
                   dict(d["dataset_options"]), PretrainHParams.from_dict(d["hparams"]))
