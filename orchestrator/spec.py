"""YAML sweep file -> typed, frozen ``SweepSpec``.

Everything a user can get wrong in the file is caught here, before Ray or MLflow start, with an
error that names the field path, the value received and what is allowed. This module imports
neither torch nor Ray, so ``fairsweep validate`` answers fast. Name checks against registries
(datasets, backbones, paradigms, metrics) happen in ``plan``, which may import the trainables.

The file is untrusted input, so reading it is bounded: at most ``MAX_FILE_BYTES`` (1 MiB), UTF-8
only, YAML nested at most ``MAX_YAML_DEPTH`` (50) levels, integers of at most ``MAX_INT_DIGITS``
(1000) characters. Anchors and aliases are allowed (``&opts`` / ``*opts`` save repetition), but the
document they expand to may hold at most ``MAX_YAML_NODES`` (10,000) values: a "billion laughs" file
is refused while it is composed, before any value is built from it, and so is a recursive alias.
Errors print a bounded excerpt of the value (``excerpt``), never the whole of it.

Limits on values, generous for real sweeps and there so that a typo cannot exhaust the machine:

=====================================================  =============================================
field                                                  allowed
=====================================================  =============================================
``axes.seed``, ``pretraining.seed``, ``search.seed``   0 .. 2**32-1 (numpy's seed range)
``pretraining/finetune.epochs``                        1 .. ``MAX_EPOCHS`` (10,000)
``pretraining/finetune.batch_size``                    2 .. ``MAX_BATCH_SIZE`` (65,536)
``finetune.size``                                      4 .. ``MAX_FINETUNE_SIZE`` (10,000,000)
``axes.freeze_depth`` (k and group indices)            0 .. ``MAX_LAYER_GROUPS`` (10,000)
grid cells / ``search.budget``                         at most ``MAX_TRIALS`` (100,000)
``resources.cpus_per_trial``, ``gpus_per_trial``       <= ``MAX_RESOURCE`` (1024), fractions >= 0.0001;
                                                       GPUs: a fraction <= 1 or a whole number
``resources.max_concurrent_trials``                    1 .. ``MAX_TRIALS``
``resources.max_failures``                             0 .. ``MAX_FAILURES`` (1,000)
integers in ``dataset.options``, paradigm options      within 64 bits (their own bounds apply at plan time)
``file:`` checkpoint paths                             one printable line, <= 4096 characters,
                                                       each folder or file name <= 255 bytes
=====================================================  =============================================

At plan time the dataset schemas add their own (``trainables/data``): e.g. ``n_source``/``n_finetune``/
``n_val``/``n_test`` <= 1,000,000 and ``image_size`` <= 1024 for the synthetic datasets, dataset seeds
within 0 .. 2**32-1, and path options within PATH_MAX (4096 bytes) and NAME_MAX (255 bytes per part).
"""
from __future__ import annotations

import math
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import yaml

from trainables.errors import UserError

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
    "EvaluationSpec",
    "FreezeSpec",
    "load_spec",
    "parse_spec",
    "freeze_label",
    "excerpt",
]

FreezeSpec = Union[int, str, tuple]  # k | "linear" | "full" | (i, j, ...)
FREEZE_WORDS = ("linear", "full")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")  # used with fullmatch: one line, no trailing newline

# Reading the file (see the module docstring).
MAX_FILE_BYTES = 1 << 20
MAX_YAML_NODES = 10_000
MAX_YAML_DEPTH = 50
MAX_INT_DIGITS = 1000
# Values.
MAX_SEED = 2**32 - 1
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 65_536
MAX_FINETUNE_SIZE = 10_000_000
MAX_LAYER_GROUPS = 10_000
MAX_TRIALS = 100_000
MAX_RESOURCE = 1024
MIN_RESOURCE_FRACTION = 0.0001  # Ray's resource granularity
MAX_FAILURES = 1000
MAX_BOOTSTRAP = 100_000
MAX_RATE = 10.0  # finetune.lr / weight_decay: larger values only diverge
MAX_CANDIDATES = 16  # per inner-search list
MAX_CHECKPOINT_INTERVAL_S = 86_400.0
MAX_PATH_CHARS = 4096
MAX_PATH_PART_BYTES = 255  # NAME_MAX: a longer part fails the lookup itself
MAX_METRIC_CHARS = 200
_OPTION_INT = 2**63  # integers in free-form options stay within 64 bits

EXCERPT_CHARS = 200


class _ExcerptRepr(reprlib.Repr):
    """reprlib's bounded repr (a few levels, a few items each), also for ints too long to print."""

    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:  # beyond Python's int -> str digit limit
            return f"<an integer of about {int(x.bit_length() * 0.30103) + 1} digits>"


_REPR = _ExcerptRepr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 8, 8, 8, 8
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = EXCERPT_CHARS, EXCERPT_CHARS, 60


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A repr of ``value`` of at most ``limit`` characters, built without walking all of it: a huge
    or deeply shared value in an error must not exhaust memory or flood the terminal."""
    return _clip(_REPR.repr(value), limit)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


class SpecError(UserError, ValueError):
    """A sweep file that cannot run; ``path`` is the dotted field path (e.g. ``axes.seed[1]``).

    The message holds an excerpt of the value and a bounded ``allowed`` text (it may quote other
    libraries' messages), so any error prints in a few lines whatever the file held.
    """

    def __init__(self, path: str, value: Any, allowed: str):
        self.path, self.value, self.allowed = path, value, allowed
        super().__init__(f"{_clip(str(path), 300)}: got {excerpt(value)}; {_clip(str(allowed), 2000)}")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    # sensitive attribute -> its privileged group (a group name, or a code where the attribute has no names);
    # the signed and ratio metrics compare the other groups with it. Checked against the data in plan.
    privileged: Mapping[str, Any] = field(default_factory=dict)


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
    # A list is the inner search's candidates (each trial trains every lr x weight_decay pair and keeps the
    # lowest validation loss); a Range only under the optuna search.
    lr: "float | tuple[float, ...] | Range" = 0.01
    weight_decay: "float | tuple[float, ...] | Range" = 0.0
    momentum: float = 0.9
    threshold: "str | float" = "calibrated"  # "calibrated" (paper A's rule, on validation) or a fixed number
    select_epoch: str = "last"  # last | best_val_loss

    def ranges(self) -> dict[str, Range]:
        """The searched hyper-parameters (optuna search only)."""
        return {k: v for k, v in (("lr", self.lr), ("weight_decay", self.weight_decay)) if isinstance(v, Range)}

    def fixed(self) -> dict[str, Any]:
        """Every hyper-parameter with a single value."""
        from dataclasses import asdict

        return {k: v for k, v in asdict(self).items() if k not in self.ranges()}


@dataclass(frozen=True)
class EvaluationSpec:
    bootstrap: int = 500  # stratified bootstrap resamples per trial for the test intervals; 0 turns them off


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
    # A linear probe trains on its frozen part's outputs, computed once per content key and shared by the
    # trials of a node (trainables/feature_cache.py); false recomputes them in every epoch of every trial.
    feature_cache: bool = True
    # A trial checkpoints at most this often (and always at its end); 0 checkpoints every epoch. A trial
    # interrupted in between continues from its last checkpoint and repeats the epochs since.
    checkpoint_interval_s: float = 60.0


SAMPLERS = ("tpe", "nsga2", "random")


@dataclass(frozen=True)
class SearchSpec:
    type: str = "grid"  # grid | optuna
    sampler: str = "tpe"  # optuna only: tpe | nsga2 | random
    budget: int | None = None  # optuna only: trials that must finish
    seed: int = 0  # optuna only: the sampler's seed
    # optuna only: an RDB URL (sqlite:///PATH, postgresql://USER@HOST/DB) for the study, where a journal file on
    # the storage path will not do (a network filesystem with unreliable locks, one database for many sweeps);
    # None keeps the journal file beside the sweep's Tune state.
    storage: str | None = None


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
    evaluation: "EvaluationSpec" = field(default_factory=lambda: EvaluationSpec())

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


def _at(path: str, key: Any) -> str:
    """``path.key`` for messages; a key that is not a short one-line string shows as an excerpt."""
    text = key if isinstance(key, str) and key.isprintable() and 0 < len(key) <= 60 else excerpt(key, 60)
    return f"{path}.{text}" if path else text


def _check_keys(raw: Mapping[str, Any], path: str, allowed: Sequence[str], required: Sequence[str] = ()) -> None:
    for key in raw:
        if key not in allowed:
            import difflib

            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(_at(path, key), raw[key], f"unknown key{hint}; allowed keys here: {', '.join(allowed)}")
    for key in required:
        if key not in raw:
            where = f"{path}.{key}" if path else key
            raise SpecError(where, None, "this field is required")


def _int(value: Any, path: str, *, minimum: int | None = None, maximum: int | None = None,
         why: str = "") -> int:
    """An integer within ``[minimum, maximum]``; ``why`` says where an upper limit comes from."""
    bounds = " and ".join(b for b in (f">= {minimum}" if minimum is not None else "",
                                      f"<= {maximum:,}" if maximum is not None else "") if b)
    because = f" ({why})" if why else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(path, value, f"expected an integer {bounds}".rstrip() + because)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise SpecError(path, value, f"must be {bounds}{because}")
    return value


def _seed(value: Any, path: str) -> int:
    return _int(value, path, minimum=0, maximum=MAX_SEED, why="numpy's seed range")


def _float(value: Any, path: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(path, value, "expected a finite number")
    try:
        value = float(value)  # an int of hundreds of digits overflows here
    except OverflowError:
        raise SpecError(path, value, "expected a finite number; this integer is too large for a float") from None
    if not math.isfinite(value):
        raise SpecError(path, value, "expected a finite number")
    if low is not None and (value < low or (low_open and value == low)):
        raise SpecError(path, value, f"must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise SpecError(path, value, f"must be <= {high}")
    return value


def _name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise SpecError(path, value, "expected a name on one line of letters, digits, '_', '-', '.' "
                                     "(at most 100 characters)")
    return value


def _list(value: Any, path: str) -> list:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]  # a single value is a one-element axis
    if not isinstance(value, list) or not value:
        raise SpecError(path, value, "expected a non-empty list")
    return value


def _unique(values: Sequence[Any], path: str) -> tuple:
    """The values (parsed, hence hashable) as a tuple; a repeat is an error naming its index."""
    seen: set = set()
    for i, v in enumerate(values):
        if v in seen:
            raise SpecError(f"{path}[{i}]", v, "duplicate value; each axis value must appear once")
        seen.add(v)
    return tuple(values)


def _freeze(value: Any, path: str) -> FreezeSpec:
    if isinstance(value, str):
        if value not in FREEZE_WORDS:
            raise SpecError(path, value, "expected an integer k >= 0, 'linear', 'full' or a list of group indices like [0, 2]")
        return value
    if isinstance(value, list):
        if not value:
            raise SpecError(path, value, "an explicit freeze set needs at least one group index; use 'full' to freeze nothing")
        idx = tuple(_int(v, f"{path}[{j}]", minimum=0, maximum=MAX_LAYER_GROUPS) for j, v in enumerate(value))
        if len(set(idx)) != len(idx):
            raise SpecError(path, value, "group indices must be unique")
        return tuple(sorted(idx))
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(path, value, "expected an integer k >= 0, 'linear', 'full' or a list of group indices like [0, 2]")
    return _int(value, path, minimum=0, maximum=MAX_LAYER_GROUPS)


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
    seen: set = set()
    for i, a in enumerate(out):
        if a.kind in seen:
            raise SpecError(f"{path}[{i}].kind", a.kind, "each intervention kind may appear once; merge the magnitudes")
        seen.add(a.kind)
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
    """A finetuning rate: a number, a list of candidates for the inner search (each trial trains every one,
    so the list is bounded), or a range {low, high, log} for the optuna search. At most MAX_RATE."""

    def parse(v: Any, p: str) -> "float | tuple[float, ...] | Range":
        if isinstance(v, Mapping):
            return _range(v, p, low=minimum, high=MAX_RATE)
        if isinstance(v, list):
            if not v:
                raise SpecError(p, v, "an inner search needs at least one candidate, e.g. [0.001, 0.01, 0.1]; or give "
                                      "one number")
            if len(v) > MAX_CANDIDATES:
                raise SpecError(p, v, f"at most {MAX_CANDIDATES} candidates: every trial trains each lr x weight_decay "
                                      f"pair; search wider spaces with search type optuna and a range")
            values = [_float(x, f"{p}[{i}]", low=minimum, high=MAX_RATE, low_open=open_low) for i, x in enumerate(v)]
            return values[0] if len(values) == 1 else _unique(values, p)
        return _float(v, p, low=minimum, high=MAX_RATE, low_open=open_low)

    return parse


def _section(raw: Mapping[str, Any], key: str, cls: type, parse: Mapping[str, Any]) -> Any:
    """Parse a flat section whose fields all have defaults; ``parse`` maps field -> converter(value, path)."""
    sec = _mapping(raw.get(key), key)
    _check_keys(sec, key, tuple(parse))
    return cls(**{k: conv(sec[k], f"{key}.{k}") for k, conv in parse.items() if k in sec})


_TOP_KEYS = ("name", "experiment", "dataset", "pretraining", "axes", "finetune", "evaluation", "objectives", "resources",
             "search")
_AXES_KEYS = ("backbone", "paradigm", "intervention", "freeze_depth", "seed")


def parse_spec(raw: Any, *, default_experiment: str | None = None) -> SweepSpec:
    """Validate a loaded YAML document and return the typed spec (raises ``SpecError``).

    The MLflow experiment is the file's ``experiment:``, else ``default_experiment`` (the CLI passes
    $MLFLOW_EXPERIMENT_NAME; this module never reads the environment), else the sweep's name. A default
    that is used is written into the spec's ``source``, so the recorded spec resumes into the same one.
    """
    if not isinstance(raw, Mapping):
        raise SpecError("<root>", raw, "a sweep file is a YAML mapping with keys " + ", ".join(_TOP_KEYS))
    _check_keys(raw, "", _TOP_KEYS, required=("name", "dataset", "axes"))
    name = _name(raw["name"], "name")
    if "experiment" in raw or not default_experiment:
        experiment = _name(raw.get("experiment", name), "experiment")
    else:
        try:
            experiment = _name(default_experiment, "experiment")
        except SpecError as exc:
            raise SpecError("experiment", default_experiment, f"{exc.allowed}; the file sets no experiment, so this "
                            "default was used (MLFLOW_EXPERIMENT_NAME for the fairsweep command): set `experiment:` "
                            "in the file or change that default") from None
        raw = {**raw, "experiment": experiment}

    ds = _mapping(raw["dataset"], "dataset")
    _check_keys(ds, "dataset", ("name", "options", "privileged"), required=("name",))
    dataset = DatasetSpec(_name(ds["name"], "dataset.name"), _options(ds.get("options"), "dataset.options"),
                          _privileged(ds.get("privileged"), "dataset.privileged"))

    def _paradigm_options(v: Any, p: str) -> Mapping[str, Mapping[str, Any]]:
        v = _mapping(v, p)
        return {_paradigm_name(k, _at(p, k)): _options(o, _at(p, k)) for k, o in v.items()}

    pretraining = _section(raw, "pretraining", PretrainingSpec, {
        "epochs": _epochs,
        "batch_size": _batch_size,
        "lr": lambda v, p: _float(v, p, low=0.0, low_open=True),
        "weight_decay": lambda v, p: _float(v, p, low=0.0),
        "momentum": lambda v, p: _float(v, p, low=0.0, high=1.0),
        "seed": _seed,
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
    seed = _unique([_seed(v, f"axes.seed[{i}]") for i, v in enumerate(_list(ax.get("seed", [0]), "axes.seed"))], "axes.seed")
    axes = Axes(backbone, paradigm, intervention, freeze, seed)

    finetune = _section(raw, "finetune", FinetuneSpec, {
        "size": lambda v, p: _int(v, p, minimum=4, maximum=MAX_FINETUNE_SIZE),
        "epochs": _epochs,
        "batch_size": _batch_size,
        "lr": _rate(0.0, True),
        "weight_decay": _rate(0.0, False),
        "momentum": lambda v, p: _float(v, p, low=0.0, high=1.0),
        "threshold": _threshold,
        "select_epoch": lambda v, p: _choice(v, p, ("last", "best_val_loss")),
    })
    evaluation = _section(raw, "evaluation", EvaluationSpec, {
        "bootstrap": lambda v, p: _int(v, p, minimum=0, maximum=MAX_BOOTSTRAP, why="bootstrap resamples per trial"),
    })
    objectives = _section(raw, "objectives", Objectives, {"performance": _metric_name, "fairness": _metric_name})
    resources = _section(raw, "resources", Resources, {
        "cpus_per_trial": lambda v, p: _resource(v, p, gpus=False),
        "gpus_per_trial": lambda v, p: _resource(v, p, gpus=True),
        "max_concurrent_trials": lambda v, p: None if v is None else _int(v, p, minimum=1, maximum=MAX_TRIALS),
        "max_failures": lambda v, p: _int(v, p, minimum=0, maximum=MAX_FAILURES),
        "feature_cache": _bool,
        "checkpoint_interval_s": lambda v, p: _float(v, p, low=0.0, high=MAX_CHECKPOINT_INTERVAL_S),
    })
    search = _section(raw, "search", SearchSpec, {
        "type": _search_type,
        "sampler": lambda v, p: _choice(v, p, SAMPLERS),
        "budget": lambda v, p: _int(v, p, minimum=1, maximum=MAX_TRIALS, why="trials a sweep may hold"),
        "seed": _seed,
        "storage": _storage_url,
    })
    _check_search(search, axes, finetune, raw.get("search") or {})
    return SweepSpec(name, dataset, pretraining, axes, finetune, objectives, resources, search, experiment, dict(raw),
                     evaluation=evaluation)


def _epochs(value: Any, path: str) -> int:
    return _int(value, path, minimum=1, maximum=MAX_EPOCHS)


def _batch_size(value: Any, path: str) -> int:
    return _int(value, path, minimum=2, maximum=MAX_BATCH_SIZE)


def _resource(value: Any, path: str, *, gpus: bool) -> float:
    """CPUs or GPUs per trial as Ray accepts them: bounded, fractions no finer than Ray's 0.0001;
    a GPU share is a fraction of one GPU or a whole number of GPUs (1.5 GPUs cannot be placed)."""
    v = _float(value, path, low=0.0, low_open=not gpus, high=MAX_RESOURCE)
    if 0 < v < MIN_RESOURCE_FRACTION:
        raise SpecError(path, value, f"a fraction must be >= {MIN_RESOURCE_FRACTION} (Ray's resource granularity)")
    if gpus and v > 1 and not v.is_integer():
        raise SpecError(path, value, "GPUs per trial must be a fraction <= 1 (a share of one GPU) or a whole number")
    return v


def _options(raw: Any, path: str) -> dict[str, Any]:
    """Free-form options (``dataset.options``, ``pretraining.paradigms.NAME``): names are strings and
    values are scalars or flat lists of them. Their schemas check them at plan time; this keeps what
    reaches those checks plain (no nested junk, integers within 64 bits)."""
    out = {}
    for key, value in _mapping(raw, path).items():
        if not isinstance(key, str):
            raise SpecError(_at(path, key), key, "option names are strings")
        where = _at(path, key)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            at = f"{where}[{i}]" if isinstance(value, list) else where
            if item is not None and not isinstance(item, (str, bool, int, float)):
                raise SpecError(at, item, "expected a number, a string, true/false" +
                                ("" if isinstance(value, list) else " or a list of them"))
            if isinstance(item, int) and not isinstance(item, bool) and not -_OPTION_INT <= item < _OPTION_INT:
                raise SpecError(at, item, "integers in options must fit in 64 bits")
        out[key] = value
    return out


def _privileged(raw: Any, path: str) -> dict[str, Any]:
    """``{attribute: group}``: a group name (text) or code (integer) per sensitive attribute."""
    out = {}
    for attr, group in _mapping(raw, path).items():
        where = f"{path}.{excerpt(attr, 60)}"
        if not isinstance(attr, str) or not attr:
            raise SpecError(where, attr, "expected a sensitive attribute's name as the key")
        if isinstance(group, bool) or not isinstance(group, (str, int)):
            raise SpecError(where, group, "expected the privileged group's name (or its integer code)")
        out[attr] = _int(group, where) if isinstance(group, int) else group
    return out


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(path, value, "expected true or false")
    return value


def _threshold(value: Any, path: str) -> "str | float":
    """``calibrated`` (paper A: on validation, as many predicted positives as true positives) or a fixed
    number strictly between 0 and 1 (0 or 1 would predict one class for every example)."""
    if value == "calibrated":
        return value
    if isinstance(value, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(path, value, "expected 'calibrated' or a number strictly between 0 and 1, e.g. 0.5")
    number = _float(value, path)
    if not 0.0 < number < 1.0:
        raise SpecError(path, number, "a fixed threshold must lie strictly between 0 and 1; or use 'calibrated'")
    return number


def _choice(value: Any, path: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise SpecError(path, value, f"expected one of: {', '.join(allowed)}")
    return value


def _check_search(search: SearchSpec, axes: Axes, finetune: FinetuneSpec, raw: Mapping[str, Any]) -> None:
    """Ranges need a sampler; a grid needs lists and at most MAX_TRIALS cells. Optuna needs a budget."""
    sizes = {"backbone": len(axes.backbone), "paradigm": len(axes.paradigm),
             "intervention magnitude": sum(a.count() for a in axes.intervention),
             "freeze_depth": len(axes.freeze_depth), "seed": len(axes.seed)}
    cells = math.prod(sizes.values())
    if search.type == "grid":
        if cells > MAX_TRIALS:
            counts = " x ".join(f"{n} {k}" for k, n in sizes.items())
            raise SpecError("axes", f"{cells:,} trials ({counts})", f"a grid may hold at most {MAX_TRIALS:,} trials; "
                            "shorten the axes, or use search type optuna with a budget")
        for key in ("sampler", "budget", "seed", "storage"):
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
    if not continuous and search.budget > cells:
        raise SpecError("search.budget", search.budget, f"the axes hold only {cells} distinct configurations and none runs "
                        f"twice; lower the budget or use search type grid")


def _paradigm_name(value: Any, path: str) -> str:
    if isinstance(value, str) and value.startswith("file:") and len(value) > 5:
        parts = value[5:].encode("utf-8", "surrogatepass").split(b"/")
        if (len(value) > MAX_PATH_CHARS + 5 or not value.isprintable()
                or any(len(part) > MAX_PATH_PART_BYTES for part in parts)):
            raise SpecError(path, value, f"a file: checkpoint path is one line of printable characters, at most "
                                         f"{MAX_PATH_CHARS} long, each folder or file name at most "
                                         f"{MAX_PATH_PART_BYTES} bytes")
        return value  # a local checkpoint path; existence is checked at plan time
    return _name(value, path)


def _metric_name(value: Any, path: str) -> str:
    if (not isinstance(value, str) or not value or len(value) > MAX_METRIC_CHARS
            or not value.isprintable()):
        raise SpecError(path, value, "expected a metric name such as 'accuracy' or 'equalized_odds_difference' "
                                     f"(one line, at most {MAX_METRIC_CHARS} characters)")
    return value


def _search_type(value: Any, path: str) -> str:
    return _choice(value, path, ("grid", "optuna"))


_RDB_URL = re.compile(r"(sqlite|postgresql|mysql)(\+[A-Za-z0-9_]+)?://(.*)")
_RDB_FORMS = ("expected a database URL in SQLAlchemy's form: sqlite:////ABSOLUTE/PATH.db (sqlite:///PATH.db is relative "
              "to where launch runs), postgresql://USER@HOST/DB or mysql://USER@HOST/DB; leave search.storage out to "
              "keep the study in a journal file beside the sweep")


def _storage_url(value: Any, path: str) -> str | None:
    """The optuna study's RDB storage: only its form is checked here (nothing is opened); a database
    that does not answer fails at launch. A password in the URL is refused: the spec is copied into
    MLflow and the sweep record, so credentials belong in ~/.pgpass / PGPASSWORD or the driver's config."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_PATH_CHARS or not value.isprintable():
        raise SpecError(path, value, _RDB_FORMS)
    match = _RDB_URL.fullmatch(value)
    if match is None:
        raise SpecError(path, value, _RDB_FORMS)
    scheme, rest = match.group(1), match.group(3)
    if scheme == "sqlite":
        if not rest.startswith("/") or rest[1:] in ("", ":memory:") or rest.endswith("/"):
            raise SpecError(path, value, "an SQLite study lives in a file, sqlite:///PATH (an in-memory database "
                                         "would not survive a resume); " + _RDB_FORMS)
        return value
    netloc, _, database = rest.partition("/")
    userinfo = netloc.rpartition("@")[0]
    if ":" in userinfo:
        masked = value.replace(userinfo, userinfo.partition(":")[0] + ":***", 1)
        raise SpecError(path, masked, "the URL holds a password, which would be copied with the spec into MLflow and "
                                      "the sweep record; leave it out (postgresql://USER@HOST/DB) and give it "
                                      "through ~/.pgpass or PGPASSWORD (MySQL: an option file)")
    if not database.split("?")[0]:
        raise SpecError(path, value, "the URL names no database; " + _RDB_FORMS)
    return value


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (nothing in the file is executed) that also bounds what the file can cost:
    nesting depth, integer length, and the size of the document once aliases are expanded."""

    def __init__(self, stream: str, name: str = "<unicode string>"):
        self._depth = 0
        try:
            super().__init__(stream)  # the reader checks every character here
        except yaml.reader.ReaderError as exc:
            exc.name = name
            raise
        self.name = name  # marks in errors name the file

    def compose_node(self, parent: Any, index: Any) -> Any:
        # The composer recurses once per level: bound it before Python's recursion limit does.
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()
        _check_expansion(node)
        return node

    def construct_yaml_int(self, node: Any) -> int:
        if len(node.value) > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(None, None, f"an integer of more than {MAX_INT_DIGITS} characters",
                                                    node.start_mark)
        return super().construct_yaml_int(node)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        # SafeConstructor converts tagged or date-like scalars with int(), float(), date() and dict
        # look-ups that raise plain exceptions on malformed text (`!!int abc`, `2001-13-45`,
        # `!!bool maybe`): a property of the file, so a YAML error with its line, not a traceback.
        try:
            return super().construct_object(node, deep)
        except (ArithmeticError, AttributeError, LookupError, TypeError, ValueError) as exc:
            raise yaml.constructor.ConstructorError(None, None, f"cannot read this {node.tag.rsplit(':', 1)[-1]} "
                                                    f"value: {exc}", node.start_mark) from None


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _check_expansion(root: Any) -> None:
    """Refuse a document whose aliases expand to more than MAX_YAML_NODES nodes, or recurse.

    Aliases share nodes, so the expanded size is counted once per distinct node (memoised), in time
    linear in the file; a billion-laughs file is refused here, before any value is built from it.
    """
    size: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        if done:
            active.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            if size[key] > MAX_YAML_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"the document expands to more than {MAX_YAML_NODES:,} values once its aliases "
                    "(*name) are expanded; write the values out or use fewer aliases", node.start_mark)
            continue
        if key in size:
            continue
        if key in active:
            raise yaml.composer.ComposerError(None, None, "a recursive alias (an anchor used inside itself)",
                                              node.start_mark)
        active.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def load_spec(path: str | Path, *, default_experiment: str | None = None) -> SweepSpec:
    """Read a sweep file (UTF-8, at most MAX_FILE_BYTES, bounded YAML: see the module docstring) and
    validate it. ``default_experiment``: the MLflow experiment where the file sets none (see parse_spec)."""
    p = Path(path)
    try:
        if not p.is_file():
            raise SpecError("<file>", str(path), "no such sweep file; pass a path like sweeps/quickstart.yaml")
        with p.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SpecError("<file>", str(path), f"cannot read the sweep file: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise SpecError("<file>", str(path), f"a sweep file may be at most {MAX_FILE_BYTES:,} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SpecError("<file>", str(path), f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} "
                        f"(offset {exc.start}); save the file as UTF-8") from None
    try:
        loader = _BoundedLoader(text, str(path))  # reading starts here: a control character fails already
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise SpecError("<file>", str(path), f"not valid YAML: {exc}") from None
    return parse_spec(raw, default_experiment=default_experiment)
