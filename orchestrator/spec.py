"""YAML sweep file -> typed, frozen ``SweepSpec``.

Everything a user can get wrong in the file is caught here, before Ray or MLflow start, with an
error that names the field path, the value received and what is allowed. The file's fields are
written in the one schema dialect of ``trainables.schema`` (as dataset and paradigm options are), which
also yields the file's JSON Schema (``json_schema``, ``fairsweep schema``). This module imports neither
torch nor Ray, so ``fairsweep validate`` answers fast. Name checks against registries (datasets,
backbones, paradigms, metrics) happen in ``plan``, which may import the trainables; the Optuna sampler
is checked here against ``orchestrator.samplers``. Modules named under ``plugins:`` are imported before
anything else is checked, so what they register counts (``trainables.plugins``).

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
``axes.finetune_size``, ``finetune.size``              4 .. ``MAX_FINETUNE_SIZE`` (10,000,000)
``axes.freeze_depth`` (k and group indices)            0 .. ``MAX_LAYER_GROUPS`` (10,000; trainables/trial.py)
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from orchestrator.samplers import SAMPLERS
from trainables.plugins import MODULE_PATTERN, PluginError, import_plugin
from trainables.schema import Custom, ListOf, Option, SchemaError, Section, as_mapping, at, distinct, excerpt
from trainables.trial import FREEZE_JSON_SCHEMA, PRECISIONS, Freeze

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
    "TrackingSpec",
    "load_spec",
    "parse_spec",
    "excerpt",
    "json_schema",
]

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
DEFAULT_FINETUNE_SIZE = 2000
MAX_TRIALS = 100_000
MAX_RESOURCE = 1024
MIN_RESOURCE_FRACTION = 0.0001  # Ray's resource granularity
MAX_FAILURES = 1000
MAX_BOOTSTRAP = 100_000
MAX_RATE = 10.0  # finetune.lr / weight_decay: larger values only diverge
MAX_CANDIDATES = 16  # per inner-search list
MAX_CHECKPOINT_INTERVAL_S = 86_400.0
MAX_CACHE_GB = 1_048_576.0  # a cache budget of 1 PiB: beyond any node's disk
MAX_PATH_CHARS = 4096
MAX_PATH_PART_BYTES = 255  # NAME_MAX: a longer part fails the lookup itself
MAX_METRIC_CHARS = 200
_OPTION_INT = 2**63  # integers in free-form options stay within 64 bits

class SpecError(SchemaError):
    """A sweep file that cannot run; ``path`` is the dotted field path (e.g. ``axes.seed[1]``).

    The message holds an excerpt of the value and a bounded ``allowed`` text (it may quote other
    libraries' messages), so any error prints in a few lines whatever the file held.
    """


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
    freeze_depth: tuple[Freeze, ...]
    seed: tuple[int, ...]
    # the finetuning set's sizes (paper A's moderator): axes.finetune_size, or the one finetune.size
    finetune_size: tuple[int, ...] = (DEFAULT_FINETUNE_SIZE,)


@dataclass(frozen=True)
class FinetuneSpec:
    """How every trial finetunes; its size is an axis (``Axes.finetune_size``), also when it is one ``finetune.size``."""

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
        return {k: v for k, v in asdict(self).items() if k not in self.ranges()}


@dataclass(frozen=True)
class EvaluationSpec:
    bootstrap: int = 500  # stratified bootstrap resamples per trial for the test intervals; 0 turns them off


LOG_MODELS = ("front", "all", "none")


@dataclass(frozen=True)
class TrackingSpec:
    # Finetuned models kept in MLflow: "front" logs the front's members as MLflow PyTorch models when the sweep
    # ends; "all" also logs every trial's weights (weights/finetuned.safetensors) as it finishes, which is what
    # `fairsweep cka` compares; "none" logs no model.
    log_models: str = "front"


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
    # A trial whose frozen layers form a prefix (a linear probe, freeze depth k) trains on the prefix's outputs,
    # computed once per content key and shared by the trials of a node (trainables/feature_cache.py); false
    # recomputes them in every epoch of every trial.
    feature_cache: bool = True
    # its budget (GiB) on each node's folder, which the sweeps of one storage path share: each keeps the folder within
    # its own budget, least recently read entries first
    feature_cache_gb: float = 4.0
    # Folder datasets (celeba, waterbirds, image_csv) decode each split once into resized uint8 pixels that the
    # workers of a node share (trainables/data/images.py); false decodes the files in every epoch of every trial.
    input_cache: bool = True
    input_cache_gb: float = 16.0  # likewise (CelebA at 64 px takes 2.5 GiB)
    # A trial checkpoints at most this often (and always at its end); 0 checkpoints every epoch. A trial
    # interrupted in between continues from its last checkpoint and repeats the epochs since.
    checkpoint_interval_s: float = 60.0
    # bf16: autocast to bfloat16 on GPUs that support it (fast; some models learn differently, README "GPUs");
    # fp32: full precision everywhere, TF32 off, what the CPU computes. Bases a GPU trains in bf16 are keyed apart.
    precision: str = "bf16"

    @property
    def feature_cache_bytes(self) -> int:
        return int(self.feature_cache_gb * 2**30)

    @property
    def input_cache_bytes(self) -> int:
        return int(self.input_cache_gb * 2**30)


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
    tracking: "TrackingSpec" = field(default_factory=lambda: TrackingSpec())
    plugins: tuple[str, ...] = ()  # modules imported before validation, in the driver and every worker

    @property
    def grid_size(self) -> int:
        """Distinct configurations of the axes (ranges count once)."""
        a = self.axes
        n_mag = sum(i.count() for i in a.intervention)
        return len(a.backbone) * len(a.paradigm) * n_mag * len(a.freeze_depth) * len(a.finetune_size) * len(a.seed)

    @property
    def n_trials(self) -> int:
        return self.search.budget if self.search.type == "optuna" else self.grid_size


# ----------------------------------------------------------------------------- values


def _int(value: Any, path: str, *, minimum: int | None = None, maximum: int | None = None,
         why: str = "") -> int:
    """An integer within ``[minimum, maximum]``; ``why`` says where an upper limit comes from."""
    return Option(kind=int, low=minimum, high=maximum, doc=why).parse(value, path)


def _name(value: Any, path: str) -> str:
    if not isinstance(value, str):  # YAML read `2024` or `007` as a number, `yes` as a boolean
        raise SpecError(path, value, f"expected a name, got a {type(value).__name__}: quote it in the sweep file "
                                     f"(e.g. {path.rsplit('.', 1)[-1]}: \"{value}\") so YAML keeps it as written")
    if not _NAME_RE.fullmatch(value):
        raise SpecError(path, value, "expected a name on one line of letters, digits, '_', '-', '.' "
                                     "(at most 100 characters)")
    return value


_NAME_SCHEMA = {"type": "string", "pattern": "^" + _NAME_RE.pattern + "$"}


def _registered(registry: Any, pattern: Mapping[str, Any] = _NAME_SCHEMA) -> dict:
    """A name an editor completes from ``registry`` that may also be one a plugin registers."""
    return {"anyOf": [{"enum": list(registry)}, dict(pattern)]}


def _range(raw: Any, path: str, *, low: float | None = None, high: float | None = None) -> Range:
    r = Section({"low": Option(kind=float, low=low, high=high), "high": Option(kind=float, low=low, high=high),
                 "log": Option(False)}, required=("low", "high")).parse(raw, path)
    lo, hi, log = r["low"], r["high"], r.get("log", False)
    if hi <= lo:
        raise SpecError(f"{path}.high", hi, f"must be greater than low ({lo})")
    if log and lo <= 0:
        raise SpecError(f"{path}.low", lo, "a log range needs low > 0")
    return Range(lo, hi, log)


def _range_schema(low: float | None, high: float | None) -> dict:
    bounded = {"type": "number", **({"minimum": low} if low is not None else {}),
               **({"maximum": high} if high is not None else {})}
    return {"type": "object", "additionalProperties": False, "required": ["low", "high"],
            "properties": {"low": bounded, "high": bounded, "log": {"type": "boolean", "default": False}},
            "description": "a continuous range for the optuna search (log: true samples on a log scale)"}


_MAGNITUDES = ListOf(Option(kind=float, low=0.0, high=1.0))


def _magnitudes(value: Any, path: str) -> "tuple[float, ...] | Range":
    if isinstance(value, Mapping):
        return _range(value, path, low=0.0, high=1.0)
    return _MAGNITUDES.parse(value, path)


def _intervention_kinds() -> dict:
    from trainables.interventions import INTERVENTIONS  # here: it imports numpy, which validation never needs

    return _registered(INTERVENTIONS)


_INTERVENTION = Section({
    "kind": Custom(_name, _intervention_kinds, doc="what the intervention changes in the finetuning set"),
    "magnitudes": Custom(_magnitudes, lambda: {"anyOf": [_MAGNITUDES.json_schema(), _range_schema(0.0, 1.0)]},
                         doc="values in [0, 1]; a {low, high} range under the optuna search"),
}, required=("kind", "magnitudes"))


def _interventions(raw: Any, path: str) -> tuple[InterventionAxis, ...]:
    items = [raw] if isinstance(raw, Mapping) else raw
    if not isinstance(items, list) or not items:
        raise SpecError(path, raw, "expected a mapping {kind, magnitudes} or a non-empty list of them")
    out = []
    for i, item in enumerate(items):
        parsed = _INTERVENTION.parse(item, path if isinstance(raw, Mapping) else f"{path}[{i}]")
        out.append(InterventionAxis(parsed["kind"], parsed["magnitudes"]))
    seen: set = set()
    for i, a in enumerate(out):
        if a.kind in seen:
            raise SpecError(f"{path}[{i}].kind", a.kind, "each intervention kind may appear once; merge the magnitudes")
        seen.add(a.kind)
    return tuple(out)


def _rate(minimum: float, open_low: bool, doc: str) -> Custom:
    """A finetuning rate: a number, a list of candidates for the inner search (each trial trains every one,
    so the list is bounded), or a range {low, high, log} for the optuna search. At most MAX_RATE."""
    number = Option(kind=float, low=minimum, high=MAX_RATE, low_open=open_low)

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
            values = [number.parse(x, f"{p}[{i}]") for i, x in enumerate(v)]
            return values[0] if len(values) == 1 else distinct(values, p)
        return number.parse(v, p)

    scalar = number.json_schema()
    return Custom(parse, {"anyOf": [scalar, {"type": "array", "items": scalar, "minItems": 1, "maxItems": MAX_CANDIDATES},
                                    _range_schema(minimum, MAX_RATE)]}, doc=doc)


def _resource(gpus: bool) -> Custom:
    """CPUs or GPUs per trial as Ray accepts them: bounded, fractions no finer than Ray's 0.0001;
    a GPU share is a fraction of one GPU or a whole number of GPUs (1.5 GPUs cannot be placed)."""
    number = Option(kind=float, low=0.0, low_open=not gpus, high=MAX_RESOURCE)

    def parse(value: Any, path: str) -> float:
        v = number.parse(value, path)
        if 0 < v < MIN_RESOURCE_FRACTION:
            raise SpecError(path, value, f"a fraction must be >= {MIN_RESOURCE_FRACTION} (Ray's resource granularity)")
        if gpus and v > 1 and not v.is_integer():
            raise SpecError(path, value, "GPUs per trial must be a fraction <= 1 (a share of one GPU) or a whole number")
        return v

    what = "GPUs: a fraction <= 1 (a share of one GPU) or a whole number" if gpus else "CPUs"
    return Custom(parse, number.json_schema(), doc=f"{what} each trial reserves (a trial that builds its pretrained base builds it on them)")


def _options(raw: Any, path: str) -> dict[str, Any]:
    """Free-form options (``dataset.options``, ``pretraining.paradigms.NAME``): names are strings and
    values are scalars or flat lists of them. Their schemas check them at plan time; this keeps what
    reaches those checks plain (no nested junk, integers within 64 bits)."""
    out = {}
    for key, value in as_mapping(raw, path).items():
        if not isinstance(key, str):
            raise SpecError(at(path, key), key, "option names are strings")
        where = at(path, key)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            here = f"{where}[{i}]" if isinstance(value, list) else where
            if item is not None and not isinstance(item, (str, bool, int, float)):
                raise SpecError(here, item, "expected a number, a string, true/false" +
                                ("" if isinstance(value, list) else " or a list of them"))
            if isinstance(item, int) and not isinstance(item, bool) and not -_OPTION_INT <= item < _OPTION_INT:
                raise SpecError(here, item, "integers in options must fit in 64 bits")
        out[key] = value
    return out


_PLAIN = {"type": ["string", "number", "boolean", "null"]}
_FREE_OPTIONS_SCHEMA = {"type": "object", "additionalProperties": {"anyOf": [_PLAIN, {"type": "array", "items": _PLAIN}]}}


def _privileged(raw: Any, path: str) -> dict[str, Any]:
    """``{attribute: group}``: a group name (text) or code (integer) per sensitive attribute."""
    out = {}
    for attr, group in as_mapping(raw, path).items():
        where = f"{path}.{excerpt(attr, 60)}"
        if not isinstance(attr, str) or not attr:
            raise SpecError(where, attr, "expected a sensitive attribute's name as the key")
        if isinstance(group, bool) or not isinstance(group, (str, int)):
            raise SpecError(where, group, "expected the privileged group's name (or its integer code)")
        out[attr] = _int(group, where) if isinstance(group, int) else group
    return out


def _threshold(value: Any, path: str) -> "str | float":
    """``calibrated`` (paper A: on validation, as many predicted positives as true positives) or a fixed
    number strictly between 0 and 1 (0 or 1 would predict one class for every example)."""
    if value == "calibrated":
        return value
    if isinstance(value, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(path, value, "expected 'calibrated' or a number strictly between 0 and 1, e.g. 0.5")
    number = Option(kind=float).parse(value, path)
    if not 0.0 < number < 1.0:
        raise SpecError(path, number, "a fixed threshold must lie strictly between 0 and 1; or use 'calibrated'")
    return number


def _check_search(search: SearchSpec, axes: Axes, finetune: FinetuneSpec, raw: Mapping[str, Any]) -> None:
    """Ranges need a sampler; a grid needs lists and at most MAX_TRIALS cells. Optuna needs a budget."""
    sizes = {"backbone": len(axes.backbone), "paradigm": len(axes.paradigm),
             "intervention magnitude": sum(a.count() for a in axes.intervention),
             "freeze_depth": len(axes.freeze_depth), "finetune_size": len(axes.finetune_size), "seed": len(axes.seed)}
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


def _paradigm_names() -> dict:
    from trainables.paradigms import PARADIGMS  # here: it imports numpy and timm's weight lookup

    return {"anyOf": [{"enum": PARADIGMS.names()}, _NAME_SCHEMA, {"type": "string", "pattern": "^file:."}]}


def _paradigm_options(raw: Any, path: str) -> Mapping[str, Mapping[str, Any]]:
    return {_paradigm_name(k, at(path, k)): _options(o, at(path, k)) for k, o in as_mapping(raw, path).items()}


def _paradigm_options_schema() -> dict:
    """Each registered paradigm's own options, for its name and its ``NAME.VARIANT`` bases
    (``trainables.paradigms.lookup``); any other key (a plugin's paradigm) takes free-form options."""
    from trainables.paradigms import PARADIGMS  # as in _paradigm_names

    own = {name: Section(dict(p.options), doc=p.doc).json_schema() for name, p in PARADIGMS.entries().items()}
    return {"type": "object", "additionalProperties": _FREE_OPTIONS_SCHEMA, "properties": own,
            "patternProperties": {f"^{re.escape(name)}\\.": schema for name, schema in own.items()}}


def _metric_name(value: Any, path: str) -> str:
    if (not isinstance(value, str) or not value or len(value) > MAX_METRIC_CHARS
            or not value.isprintable()):
        raise SpecError(path, value, "expected a metric name such as 'accuracy' or 'equalized_odds_difference' "
                                     f"(one line, at most {MAX_METRIC_CHARS} characters)")
    return value


def _metric_names(direction: str) -> Any:
    def schema() -> dict:
        from trainables.metrics import METRIC_DIRECTIONS  # here: it imports numpy and pandas

        names = [m for m, d in METRIC_DIRECTIONS.items() if d == direction]
        # NAME/ATTRIBUTE and worst:NAME forms exist too, so the listed names are suggestions, not a limit
        return {"anyOf": [{"enum": names}, {"type": "string", "minLength": 1, "maxLength": MAX_METRIC_CHARS}]}

    return schema


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


def _module(value: Any, path: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(MODULE_PATTERN, value):
        raise SpecError(path, value, "expected a module name as `import` takes it, e.g. mypkg.myparadigm")
    return value


def _dataset_names() -> dict:
    from trainables.data import DATASETS  # here: the datasets import torch, which validation never needs

    return _registered(DATASETS)


def _dataset_options_schemas() -> dict:
    """Each registered dataset's own options, chosen by ``name`` (a plugin's dataset: free-form)."""
    from trainables.data import DATASETS  # as in _dataset_names

    return {"allOf": [{"if": {"properties": {"name": {"const": name}}, "required": ["name"]},
                       "then": {"properties": {"options": Section(dict(sorted(entry.options.items())),
                                                                  doc=entry.doc).json_schema()}}}
                      for name, entry in DATASETS.entries().items()]}


# ----------------------------------------------------------------------------- the sweep file's schema

_SEED = Option(kind=int, low=0, high=MAX_SEED, doc="numpy's seed range")
_EPOCHS = Option(kind=int, low=1, high=MAX_EPOCHS)
_BATCH_SIZE = Option(kind=int, low=2, high=MAX_BATCH_SIZE)

_DATASET = Section({
    "name": Custom(_name, _dataset_names, doc="a registered dataset (trainables/data)"),
    "options": Custom(_options, _FREE_OPTIONS_SCHEMA, default={},
                      doc="the dataset's options (`fairsweep schema` lists each dataset's)"),
    "privileged": Custom(_privileged, {"type": "object", "additionalProperties": {"type": ["string", "integer"]}},
                         default={}, doc="sensitive attribute -> its privileged group (name or integer code)"),
}, required=("name",), extra=_dataset_options_schemas)

_PRETRAINING = Section.of(PretrainingSpec, {
    "epochs": replace(_EPOCHS, doc="pretraining epochs over the source split"),
    "batch_size": _BATCH_SIZE,
    "lr": Option(kind=float, low=0.0, low_open=True),
    "weight_decay": Option(kind=float, low=0.0),
    "momentum": Option(kind=float, low=0.0, high=1.0),
    "seed": _SEED,
    "paradigms": Custom(_paradigm_options, _paradigm_options_schema,
                        doc="per-paradigm options, e.g. {simclr: {temperature: 0.1}}"),
}, doc="how every pretrained base is trained (one job per backbone x paradigm, cached)")

_AXES = Section({
    "backbone": ListOf(Custom(_name, {**_NAME_SCHEMA, "description": "a timm model or a registered backbone"}),
                       doc="timm models (e.g. resnet18) or registered backbones"),
    "paradigm": ListOf(Custom(_paradigm_name, _paradigm_names),
                       doc="registered pretraining paradigms, or file:PATH for a local checkpoint"),
    "intervention": Custom(_interventions, lambda: {"anyOf": [_INTERVENTION.json_schema(), {
        "type": "array", "items": _INTERVENTION.json_schema(), "minItems": 1}]},
        default={"kind": "none", "magnitudes": [0.5]}, doc="interventions on the finetuning set and their magnitudes"),
    "freeze_depth": ListOf(Custom(Freeze.parse, FREEZE_JSON_SCHEMA),
                           doc="k (the first k layer groups frozen), 'linear', 'full' or a list of group indices"),
    "finetune_size": ListOf(Option(kind=int, low=4, high=MAX_FINETUNE_SIZE, doc="examples an intervention draws"),
                            default=[DEFAULT_FINETUNE_SIZE],
                            doc="finetuning set sizes (paper A's moderator); or one size as finetune.size"),
    "seed": ListOf(_SEED, default=[0], doc="repeats of every configuration"),
}, required=("backbone", "paradigm", "freeze_depth"), doc="the grid: every combination is a trial")

_FINETUNE = Section.of(FinetuneSpec, {
    "size": Option(kind=int, low=4, high=MAX_FINETUNE_SIZE, default=DEFAULT_FINETUNE_SIZE,
                   doc="examples an intervention draws for finetuning: one size (axes.finetune_size gives several)"),
    "epochs": replace(_EPOCHS, doc="finetuning epochs per trial"),
    "batch_size": _BATCH_SIZE,
    "lr": _rate(0.0, True, "a number; a list of candidates for the inner search; a range under optuna"),
    "weight_decay": _rate(0.0, False, "as lr"),
    "momentum": Option(kind=float, low=0.0, high=1.0),
    "threshold": Custom(_threshold, {"anyOf": [{"const": "calibrated"},
                                               {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}]},
                        doc="'calibrated' (on validation) or a fixed decision threshold"),
    "select_epoch": Option(kind=str, choices=("last", "best_val_loss")),
}, doc="how each trial finetunes its pretrained base")

_EVALUATION = Section.of(EvaluationSpec, {
    "bootstrap": Option(kind=int, low=0, high=MAX_BOOTSTRAP, doc="bootstrap resamples per trial"),
})

_TRACKING = Section.of(TrackingSpec, {
    "log_models": Option(kind=str, choices=LOG_MODELS,
                         doc="finetuned models kept in MLflow: the front's (front), every trial's weights too (all: "
                             "what fairsweep cka compares), or none"),
}, doc="what the trial runs keep in MLflow beyond metrics and predictions")

_OBJECTIVES = Section.of(Objectives, {
    "performance": Custom(_metric_name, _metric_names("max"), doc="maximised"),
    "fairness": Custom(_metric_name, _metric_names("min"), doc="minimised (NAME/ATTRIBUTE and worst:NAME forms too)"),
}, doc="the two metrics of the Pareto front")

_RESOURCES = Section.of(Resources, {
    "cpus_per_trial": _resource(gpus=False),
    "gpus_per_trial": _resource(gpus=True),
    "max_concurrent_trials": Option(kind=int, low=1, high=MAX_TRIALS),
    "max_failures": Option(kind=int, low=0, high=MAX_FAILURES, doc="retries of a failed trial"),
    "feature_cache": Option(kind=bool, doc="share a frozen prefix's outputs (linear probe, freeze depth k) between "
                                           "the trials of a node"),
    "feature_cache_gb": Option(kind=float, low=0.0, high=MAX_CACHE_GB, low_open=True,
                               doc="the feature cache's budget per node in GiB; least recently read entries go "
                                   "first beyond it, and a trial whose outputs alone exceed it runs uncached"),
    "input_cache": Option(kind=bool, doc="decode folder images once into resized pixels the trials of a node share"),
    "input_cache_gb": Option(kind=float, low=0.0, high=MAX_CACHE_GB, low_open=True,
                             doc="the decoded-image cache's budget per node in GiB; least recently read out, and a "
                                 "split that alone exceeds it streams from its files"),
    "checkpoint_interval_s": Option(kind=float, low=0.0, high=MAX_CHECKPOINT_INTERVAL_S,
                                    doc="a trial checkpoints at most this often (0: every epoch)"),
    "precision": Option(kind=str, choices=PRECISIONS,
                        doc="bf16: bfloat16 autocast on GPUs that support it; fp32: full precision, TF32 off "
                            "(on CPUs both are fp32)"),
})

_SEARCH = Section.of(SearchSpec, {
    "type": Option(kind=str, choices=("grid", "optuna")),
    "sampler": Option(kind=str, choices=SAMPLERS, doc="optuna only"),
    "budget": Option(kind=int, low=1, high=MAX_TRIALS, doc="optuna only: the trials that must finish; at most the "
                                                           "trials a sweep may hold"),
    "seed": replace(_SEED, doc="optuna only: the sampler's seed; numpy's seed range"),
    "storage": Custom(_storage_url, {"type": ["string", "null"], "pattern": "^" + _RDB_URL.pattern},
                      doc="optuna only: a database URL for the study (default: a journal file beside the sweep)"),
})

_SWEEP = Section({
    "name": Custom(_name, _NAME_SCHEMA, doc="the sweep's name (resume, status and the queries use it)"),
    "experiment": Custom(_name, _NAME_SCHEMA, doc="the MLflow experiment (default: MLFLOW_EXPERIMENT_NAME, else name)"),
    "plugins": ListOf(Custom(_module, {"type": "string", "pattern": "^" + MODULE_PATTERN + "$"}), default=(), empty=True,
                      doc="modules imported first, in the driver and every Ray worker, that register datasets, "
                          "backbones, paradigms, interventions, metrics or samplers"),
    "dataset": _DATASET,
    "pretraining": _PRETRAINING,
    "axes": _AXES,
    "finetune": _FINETUNE,
    "evaluation": _EVALUATION,
    "tracking": _TRACKING,
    "objectives": _OBJECTIVES,
    "resources": _RESOURCES,
    "search": _SEARCH,
}, required=("name", "dataset", "axes"))


def json_schema() -> dict:
    """The sweep file's JSON Schema (draft 2020-12), generated from the fields that validate it, with the
    registered datasets', paradigms', interventions' and metrics' names and options (``fairsweep schema``;
    committed as docs/sweep.schema.json, which sweep files name on their first line)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "fairsweep sweep file",
            "description": "A sweep: backbones x paradigms x interventions x freezing depths x seeds (README.md).",
            **_SWEEP.json_schema()}


def _import_plugins(modules: Sequence[str]) -> None:
    """Import the file's plugins before anything else is checked, so the names they register count."""
    for i, module in enumerate(modules):
        try:
            import_plugin(module)
        except PluginError as exc:
            raise SpecError(f"plugins[{i}]", module, str(exc)) from exc.__cause__


def parse_spec(raw: Any, *, default_experiment: str | None = None) -> SweepSpec:
    """Validate a loaded YAML document and return the typed spec (raises ``SpecError``).

    The file's ``plugins`` are imported first (``trainables.plugins``). The MLflow experiment is the
    file's ``experiment:``, else ``default_experiment`` (the CLI passes $MLFLOW_EXPERIMENT_NAME; this
    module never reads the environment), else the sweep's name. A default that is used is written into
    the spec's ``source``, so the recorded spec resumes into the same one.
    """
    if not isinstance(raw, Mapping):
        raise SpecError("<root>", raw, "a sweep file is a YAML mapping with keys " + ", ".join(_SWEEP.fields))
    try:
        return _parse(raw, default_experiment)
    except SpecError:
        raise
    except SchemaError as exc:  # a field of the dialect: the same error, as the spec's type
        raise SpecError(exc.path, exc.value, exc.allowed) from None


def _parse(raw: Mapping[str, Any], default_experiment: str | None) -> SweepSpec:
    _SWEEP.check_keys(raw, "")
    plugins = _SWEEP.fields["plugins"].parse(raw["plugins"], "plugins") if "plugins" in raw else ()
    _import_plugins(plugins)
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
    dataset = DatasetSpec(**_DATASET.complete(raw["dataset"], "dataset"))
    pretraining = PretrainingSpec(**_PRETRAINING.parse(raw.get("pretraining"), "pretraining"))
    axes_values = _AXES.complete(raw["axes"], "axes")
    finetune_values = _FINETUNE.parse(raw.get("finetune"), "finetune")
    if "size" in finetune_values:  # one size: the one-value form of axes.finetune_size, where the sizes live
        if "finetune_size" in raw["axes"]:
            raise SpecError("finetune.size", finetune_values["size"], "axes.finetune_size gives the finetuning sizes "
                            "already; remove finetune.size, or list its value in axes.finetune_size")
        axes_values["finetune_size"] = (finetune_values.pop("size"),)
    axes = Axes(**axes_values)
    finetune = FinetuneSpec(**finetune_values)
    evaluation = EvaluationSpec(**_EVALUATION.parse(raw.get("evaluation"), "evaluation"))
    tracking = TrackingSpec(**_TRACKING.parse(raw.get("tracking"), "tracking"))
    objectives = Objectives(**_OBJECTIVES.parse(raw.get("objectives"), "objectives"))
    resources = Resources(**_RESOURCES.parse(raw.get("resources"), "resources"))
    search = SearchSpec(**_SEARCH.parse(raw.get("search"), "search"))
    _check_search(search, axes, finetune, raw.get("search") or {})
    return SweepSpec(name, dataset, pretraining, axes, finetune, objectives, resources, search, experiment, dict(raw),
                     evaluation=evaluation, plugins=plugins, tracking=tracking)


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
