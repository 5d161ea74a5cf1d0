"""YAML sweep file -> typed, frozen ``SweepSpec``.

Everything a user can get wrong in the file is caught here, before Ray or MLflow start, with an
error that names the field path, the value received and what is allowed. This module imports
neither torch nor Ray, so ``fairsweep validate`` answers fast. Name checks against registries
(datasets, backbones, paradigms, metrics) happen in ``plan``, which may import the trainables.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import yaml

__all__ = [
    "SpecError",
    "DatasetSpec",
    "PretrainingSpec",
    "InterventionAxis",
    "Axes",
    "FinetuneSpec",
    "Objectives",
    "Resources",
    "SearchSpec",
    "Range",
    "SweepSpec",
    "FreezeSpec",
    "load_spec",
    "parse_spec",
    "freeze_label",
]

FreezeSpec = Union[int, str, tuple]  # k | "linear" | "full" | (i, j, ...)
FREEZE_WORDS = ("linear", "full")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


class SpecError(ValueError):
    """A sweep file that cannot run; ``path`` is the dotted field path (e.g. ``axes.seed[1]``)."""

    def __init__(self, path: str, value: Any, allowed: str):
        self.path, self.value, self.allowed = path, value, allowed
        super().__init__(f"{path}: got {value!r}; {allowed}")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PretrainingSpec:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    seed: int = 0
    # Per-paradigm hyper-parameters, e.g. {"simclr": {"temperature": 0.1}}; checked by the paradigm.
    paradigms: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Range:
    """A continuous axis for the optuna search: ``{low: 0.5, high: 0.95}`` (``log: true`` for rates)."""

    low: float
    high: float
    log: bool = False

    def endpoints(self) -> tuple[float, float]:
        return (self.low, self.high)


@dataclass(frozen=True)
class InterventionAxis:
    kind: str
    magnitudes: "tuple[float, ...] | Range"

    def count(self) -> int:
        return 1 if isinstance(self.magnitudes, Range) else len(self.magnitudes)

    def endpoints(self) -> tuple[float, ...]:
        return self.magnitudes.endpoints() if isinstance(self.magnitudes, Range) else self.magnitudes


@dataclass(frozen=True)
class Axes:
    backbone: tuple[str, ...]
    paradigm: tuple[str, ...]
    intervention: tuple[InterventionAxis, ...]
    freeze_depth: tuple[FreezeSpec, ...]
    seed: tuple[int, ...]


@dataclass(frozen=True)
class FinetuneSpec:
    size: int = 2000
    epochs: int = 3
    batch_size: int = 64
    lr: "float | Range" = 0.01  # a Range only under the optuna search
    weight_decay: "float | Range" = 0.0
    momentum: float = 0.9
    threshold: float = 0.5

    def ranges(self) -> dict[str, Range]:
        """The searched hyper-parameters (optuna search only)."""
        return {k: v for k, v in (("lr", self.lr), ("weight_decay", self.weight_decay)) if isinstance(v, Range)}

    def fixed(self) -> dict[str, Any]:
        """Every hyper-parameter with a single value."""
        from dataclasses import asdict

        return {k: v for k, v in asdict(self).items() if k not in self.ranges()}


@dataclass(frozen=True)
class Objectives:
    performance: str = "accuracy"
    fairness: str = "equalized_odds_difference"


@dataclass(frozen=True)
class Resources:
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int | None = None
    max_failures: int = 0


SAMPLERS = ("tpe", "nsga2", "random")


@dataclass(frozen=True)
class SearchSpec:
    type: str = "grid"  # grid | optuna
    sampler: str = "tpe"  # optuna only: tpe | nsga2 | random
    budget: int | None = None  # optuna only: trials that must finish
    seed: int = 0  # optuna only: the sampler's seed


@dataclass(frozen=True)
class SweepSpec:
    name: str
    dataset: DatasetSpec
    pretraining: PretrainingSpec
    axes: Axes
    finetune: FinetuneSpec
    objectives: Objectives
    resources: Resources
    search: SearchSpec
    experiment: str  # MLflow experiment; the sweep name unless the file says otherwise
    source: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)  # raw YAML

    @property
    def grid_size(self) -> int:
        """Distinct configurations of the axes (ranges count once)."""
        a = self.axes
        n_mag = sum(i.count() for i in a.intervention)
        return len(a.backbone) * len(a.paradigm) * n_mag * len(a.freeze_depth) * len(a.seed)

    @property
    def n_trials(self) -> int:
        return self.search.budget if self.search.type == "optuna" else self.grid_size


def freeze_label(spec: FreezeSpec) -> str:
    """A stable text form of a freeze spec, as logged in MLflow params (``2``, ``linear``, ``[0,2]``)."""
    if isinstance(spec, tuple):
        return "[" + ",".join(str(i) for i in spec) + "]"
    return str(spec)


# ----------------------------------------------------------------------------- parsing helpers


def _mapping(raw: Any, path: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SpecError(path, raw, "expected a mapping of option: value")
    return raw


def _check_keys(raw: Mapping[str, Any], path: str, allowed: Sequence[str], required: Sequence[str] = ()) -> None:
    for key in raw:
        if key not in allowed:
            import difflib

            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"{path}.{key}" if path else str(key)
            raise SpecError(where, raw[key], f"unknown key{hint}; allowed keys here: {', '.join(allowed)}")
    for key in required:
        if key not in raw:
            where = f"{path}.{key}" if path else key
            raise SpecError(where, None, "this field is required")


def _int(value: Any, path: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(path, value, "expected an integer" + (f" >= {minimum}" if minimum is not None else ""))
    if minimum is not None and value < minimum:
        raise SpecError(path, value, f"must be >= {minimum}")
    return value


def _float(value: Any, path: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(path, value, "expected a finite number")
    value = float(value)
    if low is not None and (value < low or (low_open and value == low)):
        raise SpecError(path, value, f"must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise SpecError(path, value, f"must be <= {high}")
    return value


def _name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise SpecError(path, value, "expected a name of letters, digits, '_', '-', '.' (at most 100 characters)")
    return value


def _list(value: Any, path: str) -> list:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]  # a single value is a one-element axis
    if not isinstance(value, list) or not value:
        raise SpecError(path, value, "expected a non-empty list")
    return value


def _unique(values: Sequence[Any], path: str) -> tuple:
    seen: list = []
    for i, v in enumerate(values):
        if v in seen:
            raise SpecError(f"{path}[{i}]", v, "duplicate value; each axis value must appear once")
        seen.append(v)
    return tuple(values)


def _freeze(value: Any, path: str) -> FreezeSpec:
    if isinstance(value, str):
        if value not in FREEZE_WORDS:
            raise SpecError(path, value, "expected an integer k >= 0, 'linear', 'full' or a list of group indices like [0, 2]")
        return value
    if isinstance(value, list):
        if not value:
            raise SpecError(path, value, "an explicit freeze set needs at least one group index; use 'full' to freeze nothing")
        idx = tuple(_int(v, f"{path}[{j}]", minimum=0) for j, v in enumerate(value))
        if len(set(idx)) != len(idx):
            raise SpecError(path, value, "group indices must be unique")
        return tuple(sorted(idx))
    return _int(value, path, minimum=0)


def _interventions(raw: Any, path: str) -> tuple[InterventionAxis, ...]:
    items = [raw] if isinstance(raw, Mapping) else raw
    if not isinstance(items, list) or not items:
        raise SpecError(path, raw, "expected a mapping {kind, magnitudes} or a non-empty list of them")
    out = []
    for i, item in enumerate(items):
        p = path if isinstance(raw, Mapping) else f"{path}[{i}]"
        item = _mapping(item, p)
        _check_keys(item, p, ("kind", "magnitudes"), required=("kind", "magnitudes"))
        kind = _name(item["kind"], f"{p}.kind")
        if isinstance(item["magnitudes"], Mapping):
            out.append(InterventionAxis(kind, _range(item["magnitudes"], f"{p}.magnitudes", low=0.0, high=1.0)))
            continue
        mags = _list(item["magnitudes"], f"{p}.magnitudes")
        mags = [_float(m, f"{p}.magnitudes[{j}]", low=0.0, high=1.0) for j, m in enumerate(mags)]
        out.append(InterventionAxis(kind, _unique(mags, f"{p}.magnitudes")))
    kinds = [a.kind for a in out]
    for i, k in enumerate(kinds):
        if kinds.index(k) != i:
            raise SpecError(f"{path}[{i}].kind", k, "each intervention kind may appear once; merge the magnitudes")
    return tuple(out)


def _range(raw: Mapping[str, Any], path: str, *, low: float | None = None, high: float | None = None) -> Range:
    _check_keys(raw, path, ("low", "high", "log"), required=("low", "high"))
    lo = _float(raw["low"], f"{path}.low", low=low, high=high)
    hi = _float(raw["high"], f"{path}.high", low=low, high=high)
    if hi <= lo:
        raise SpecError(f"{path}.high", hi, f"must be greater than low ({lo})")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise SpecError(f"{path}.log", log, "expected true or false")
    if log and lo <= 0:
        raise SpecError(f"{path}.low", lo, "a log range needs low > 0")
    return Range(lo, hi, log)


def _rate(minimum: float, open_low: bool) -> Any:
    """A finetuning rate: a number, or a range {low, high, log} for the optuna search."""

    def parse(v: Any, p: str) -> "float | Range":
        if isinstance(v, Mapping):
            return _range(v, p, low=minimum)
        return _float(v, p, low=minimum, low_open=open_low)

    return parse


def _section(raw: Mapping[str, Any], key: str, cls: type, parse: Mapping[str, Any]) -> Any:
    """Parse a flat section whose fields all have defaults; ``parse`` maps field -> converter(value, path)."""
    sec = _mapping(raw.get(key), key)
    _check_keys(sec, key, tuple(parse))
    return cls(**{k: conv(sec[k], f"{key}.{k}") for k, conv in parse.items() if k in sec})


_TOP_KEYS = ("name", "experiment", "dataset", "pretraining", "axes", "finetune", "objectives", "resources", "search")
_AXES_KEYS = ("backbone", "paradigm", "intervention", "freeze_depth", "seed")


def parse_spec(raw: Any) -> SweepSpec:
    """Validate a loaded YAML document and return the typed spec (raises ``SpecError``)."""
    if not isinstance(raw, Mapping):
        raise SpecError("<root>", raw, "a sweep file is a YAML mapping with keys " + ", ".join(_TOP_KEYS))
    _check_keys(raw, "", _TOP_KEYS, required=("name", "dataset", "axes"))
    name = _name(raw["name"], "name")
    experiment = _name(raw.get("experiment", name), "experiment")

    ds = _mapping(raw["dataset"], "dataset")
    _check_keys(ds, "dataset", ("name", "options"), required=("name",))
    dataset = DatasetSpec(_name(ds["name"], "dataset.name"), dict(_mapping(ds.get("options"), "dataset.options")))

    def _paradigm_options(v: Any, p: str) -> Mapping[str, Mapping[str, Any]]:
        v = _mapping(v, p)
        return {str(k): dict(_mapping(o, f"{p}.{k}")) for k, o in v.items()}

    pretraining = _section(raw, "pretraining", PretrainingSpec, {
        "epochs": lambda v, p: _int(v, p, minimum=1),
        "batch_size": lambda v, p: _int(v, p, minimum=2),
        "lr": lambda v, p: _float(v, p, low=0.0, low_open=True),
        "weight_decay": lambda v, p: _float(v, p, low=0.0),
        "momentum": lambda v, p: _float(v, p, low=0.0, high=1.0),
        "seed": lambda v, p: _int(v, p, minimum=0),
        "paradigms": _paradigm_options,
    })

    ax = _mapping(raw["axes"], "axes")
    _check_keys(ax, "axes", _AXES_KEYS, required=("backbone", "paradigm", "freeze_depth"))
    backbone = _unique([_name(v, f"axes.backbone[{i}]") for i, v in enumerate(_list(ax["backbone"], "axes.backbone"))], "axes.backbone")
    paradigm_values = _list(ax["paradigm"], "axes.paradigm")
    paradigm = _unique([_paradigm_name(v, f"axes.paradigm[{i}]") for i, v in enumerate(paradigm_values)], "axes.paradigm")
    intervention = _interventions(ax.get("intervention", {"kind": "none", "magnitudes": [0.5]}), "axes.intervention")
    freeze_raw = ax["freeze_depth"] if isinstance(ax["freeze_depth"], list) else [ax["freeze_depth"]]
    if not freeze_raw:
        raise SpecError("axes.freeze_depth", freeze_raw, "expected a non-empty list")
    freeze = _unique([_freeze(v, f"axes.freeze_depth[{i}]") for i, v in enumerate(freeze_raw)], "axes.freeze_depth")
    seed = _unique([_int(v, f"axes.seed[{i}]", minimum=0) for i, v in enumerate(_list(ax.get("seed", [0]), "axes.seed"))], "axes.seed")
    axes = Axes(backbone, paradigm, intervention, freeze, seed)

    finetune = _section(raw, "finetune", FinetuneSpec, {
        "size": lambda v, p: _int(v, p, minimum=4),
        "epochs": lambda v, p: _int(v, p, minimum=1),
        "batch_size": lambda v, p: _int(v, p, minimum=2),
        "lr": _rate(0.0, True),
        "weight_decay": _rate(0.0, False),
        "momentum": lambda v, p: _float(v, p, low=0.0, high=1.0),
        "threshold": lambda v, p: _float(v, p, low=0.0, high=1.0),
    })
    objectives = _section(raw, "objectives", Objectives, {"performance": _metric_name, "fairness": _metric_name})
    resources = _section(raw, "resources", Resources, {
        "cpus_per_trial": lambda v, p: _float(v, p, low=0.0, low_open=True),
        "gpus_per_trial": lambda v, p: _float(v, p, low=0.0),
        "max_concurrent_trials": lambda v, p: None if v is None else _int(v, p, minimum=1),
        "max_failures": lambda v, p: _int(v, p, minimum=0),
    })
    search = _section(raw, "search", SearchSpec, {
        "type": _search_type,
        "sampler": lambda v, p: _choice(v, p, SAMPLERS),
        "budget": lambda v, p: _int(v, p, minimum=1),
        "seed": lambda v, p: _int(v, p, minimum=0),
    })
    _check_search(search, axes, finetune, raw.get("search") or {})
    return SweepSpec(name, dataset, pretraining, axes, finetune, objectives, resources, search, experiment, dict(raw))


def _choice(value: Any, path: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise SpecError(path, value, f"expected one of: {', '.join(allowed)}")
    return value


def _check_search(search: SearchSpec, axes: Axes, finetune: FinetuneSpec, raw: Mapping[str, Any]) -> None:
    """Ranges need a sampler; a grid needs lists. Optuna needs a budget."""
    if search.type == "grid":
        for key in ("sampler", "budget", "seed"):
            if key in raw:
                raise SpecError(f"search.{key}", raw[key], "only used with type: optuna")
        for i, axis in enumerate(axes.intervention):
            if isinstance(axis.magnitudes, Range):
                raise SpecError(f"axes.intervention[{i}].magnitudes", {"low": axis.magnitudes.low, "high": axis.magnitudes.high},
                                "a range needs search type optuna; under a grid list the values, e.g. [0.5, 0.7, 0.9]")
        for key, rng in finetune.ranges().items():
            raise SpecError(f"finetune.{key}", {"low": rng.low, "high": rng.high},
                            "a range needs search type optuna; under a grid give one value")
        return
    if search.budget is None:
        raise SpecError("search.budget", None, "the optuna search needs a budget: the number of trials that must finish")
    continuous = any(isinstance(a.magnitudes, Range) for a in axes.intervention) or finetune.ranges()
    cells = (len(axes.backbone) * len(axes.paradigm) * sum(a.count() for a in axes.intervention)
             * len(axes.freeze_depth) * len(axes.seed))
    if not continuous and search.budget > cells:
        raise SpecError("search.budget", search.budget, f"the axes hold only {cells} distinct configurations and none runs "
                        f"twice; lower the budget or use search type grid")


def _paradigm_name(value: Any, path: str) -> str:
    if isinstance(value, str) and value.startswith("file:") and len(value) > 5:
        return value  # a local checkpoint path; existence is checked at plan time
    return _name(value, path)


def _metric_name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(path, value, "expected a metric name such as 'accuracy' or 'equalized_odds_difference'")
    return value


def _search_type(value: Any, path: str) -> str:
    return _choice(value, path, ("grid", "optuna"))


def load_spec(path: str | Path) -> SweepSpec:
    """Read a sweep file with ``yaml.safe_load`` (nothing in it is executed) and validate it."""
    p = Path(path)
    if not p.is_file():
        raise SpecError("<file>", str(path), "no such sweep file; pass a path like sweeps/quickstart.yaml")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise SpecError("<file>", str(path), f"not valid YAML: {exc}") from None
    return parse_spec(raw)
