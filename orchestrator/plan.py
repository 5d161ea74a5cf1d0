"""SweepSpec -> Plan: the pretraining jobs (one per unique key) and the finetuning trials.

Everything that can be known before a GPU is touched is checked here: registry names, intervention
feasibility on the pool's metadata, freeze depths against each backbone's layer groups, metric names.
A trial's identity is the hash of its canonical config (docs/architecture.md, decision 1); the pretraining key hashes
everything that determines the pretrained weights (decision 3).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from orchestrator.spec import FreezeSpec, SpecError, SweepSpec, freeze_label
from trainables.errors import UserError
from trainables.schema import SchemaError

__all__ = ["PretrainJob", "TrialPoint", "PlannedTrial", "Plan", "build_plan", "grid_points", "canonical_hash"]


def canonical_hash(obj: Any, length: int = 16) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace): equal configs, equal keys, any process."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class PretrainJob:
    """One pretrained model to build; shared by every trial with the same (backbone, paradigm)."""

    key: str
    backbone: str
    paradigm: str
    dataset: str
    dataset_options: Mapping[str, Any]
    hparams: Mapping[str, Any]  # epochs, batch_size, lr, weight_decay, momentum, seed, options

    def identity(self) -> dict:
        return {"backbone": self.backbone, "paradigm": self.paradigm, "dataset": self.dataset,
                "dataset_options": dict(self.dataset_options), "hparams": dict(self.hparams)}


@dataclass(frozen=True)
class TrialPoint:
    """One cell of the grid: the axis values a trial receives from Tune."""

    backbone: str
    paradigm: str
    intervention: str
    magnitude: float
    freeze_depth: FreezeSpec
    seed: int
    finetune: tuple[tuple[str, float], ...] = ()  # searched finetuning hyper-parameters (optuna), sorted

    def as_config(self) -> dict:
        d = asdict(self)
        if isinstance(self.freeze_depth, tuple):
            d["freeze_depth"] = list(self.freeze_depth)
        d["finetune"] = dict(self.finetune)
        return d

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "TrialPoint":
        """From a Tune config: a grid cell (``{"point": {...}}``) or the optuna searcher's flat dict."""
        cfg = cfg.get("point", cfg)
        fd = cfg["freeze_depth"]
        fd = tuple(fd) if isinstance(fd, (list, tuple)) else _parse_freeze_label(fd)
        ft = tuple(sorted((str(k), float(v)) for k, v in (cfg.get("finetune") or {}).items()))
        return cls(str(cfg["backbone"]), str(cfg["paradigm"]), str(cfg["intervention"]),
                   float(cfg["magnitude"]), fd, int(cfg["seed"]), ft)

    def params(self) -> dict[str, str]:
        """The MLflow params of a trial run (names fixed by the launch issue)."""
        return {"backbone": self.backbone, "paradigm": self.paradigm,
                "intervention.kind": self.intervention, "intervention.magnitude": repr(self.magnitude),
                "freeze_depth": freeze_label(self.freeze_depth), "seed": str(self.seed),
                **{f"finetune.{k}": repr(v) for k, v in self.finetune}}


def _parse_freeze_label(value: Any) -> FreezeSpec:
    """Inverse of ``freeze_label`` for the optuna searcher, whose categorical choices are scalars."""
    if isinstance(value, str) and value.startswith("["):
        return tuple(int(v) for v in value[1:-1].split(",") if v)
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


@dataclass(frozen=True)
class PlannedTrial:
    point: TrialPoint
    key: str  # hash of the whole config; what resume and MLflow recognise
    config_key: str  # the same without the seed: repeats of one configuration share it
    pretrain_key: str | None
    frozen_groups: tuple[int, ...]
    n_groups: int


@dataclass(frozen=True)
class Plan:
    spec: SweepSpec
    pretrain_jobs: tuple[PretrainJob, ...]
    trials: tuple[PlannedTrial, ...]
    layer_groups: Mapping[str, int]  # backbone -> number of non-head layer groups
    file_weights: Mapping[str, str]  # "file:..." paradigm -> absolute checkpoint path
    dataset_fingerprint: str = ""
    pretrain_keys: Mapping[tuple[str, str], str | None] = None  # (backbone, paradigm) -> key

    def resolve(self, point: TrialPoint) -> PlannedTrial:
        """Key and freezing of any point of the space (grid cells and optuna proposals alike)."""
        from trainables.backbones import resolve_freeze

        ft = {**self.spec.finetune.fixed(), **dict(point.finetune)}
        pretrain_key = self.pretrain_keys[(point.backbone, point.paradigm)]
        ident = {"dataset": self.dataset_fingerprint, "backbone": point.backbone, "pretrain": pretrain_key,
                 "paradigm": point.paradigm, "intervention": point.intervention, "magnitude": point.magnitude,
                 "freeze_depth": freeze_label(point.freeze_depth), "finetune": ft}
        n = self.layer_groups[point.backbone]
        frozen = resolve_freeze(point.freeze_depth, n, backbone=point.backbone)
        return PlannedTrial(point, canonical_hash({**ident, "seed": point.seed}), canonical_hash(ident),
                            pretrain_key, frozen, n)

    def trial_for(self, config: Mapping[str, Any]) -> PlannedTrial:
        """The planned trial behind a Tune config (used by the driver-side tracker)."""
        return self.resolve(TrialPoint.from_config(config))

    def summary(self, n_examples: int = 3) -> str:
        s = self.spec
        search = s.search.type if s.search.type == "grid" else f"optuna ({s.search.sampler}, budget {s.search.budget}, seed {s.search.seed}) over {s.grid_size} grid cells"
        lines = [f"sweep {s.name!r} (MLflow experiment {s.experiment!r}), search: {search}",
                 f"dataset: {s.dataset.name} {dict(s.dataset.options) or ''}".rstrip(),
                 "layer groups: " + ", ".join(f"{b}={n}" for b, n in self.layer_groups.items()),
                 f"pretraining jobs: {len(self.pretrain_jobs)}"]
        for job in self.pretrain_jobs:
            lines.append(f"  {job.key}  {job.backbone:<24} {job.paradigm}  epochs={job.hparams['epochs']}")
        lines.append(f"trials: {s.n_trials}")
        for t in self.trials[:n_examples]:
            lines.append(f"  {t.key}  {json.dumps(t.point.as_config())}  frozen groups={list(t.frozen_groups)}/{t.n_groups}")
        if len(self.trials) > n_examples:
            lines.append(f"  ... and {len(self.trials) - n_examples} more")
        return "\n".join(lines)


def _file_key(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "file-" + h.hexdigest()[:16]


def _with_absolute_paths(spec: SweepSpec) -> SweepSpec:
    """Dataset path options relative to the working directory become absolute, in the spec and its
    recorded source: Tune runs each trial in its own directory, and resume may run from elsewhere.
    Options that live under ``root`` (``under_root``) stay as given: they follow the absolute root."""
    from trainables.data import DATASETS
    from trainables.data.base import PATH

    schema = DATASETS.get(spec.dataset.name).options
    options = dict(spec.dataset.options)
    for key, value in options.items():
        if key in schema and schema[key].kind == PATH and not schema[key].under_root and isinstance(value, str) and value:
            options[key] = str(Path(os.path.expanduser(value)).resolve())  # pathlib raises on an unknown ~user
    if options == dict(spec.dataset.options):
        return spec
    source = {**spec.source, "dataset": {**dict(spec.source.get("dataset", {})), "options": options}}
    return replace(spec, dataset=replace(spec.dataset, options=options), source=source)


def _check_privileged(spec: SweepSpec, dataset: Any) -> None:
    """Every named privileged group is a group of a sensitive attribute of this dataset (by name where
    the attribute names its groups, else by integer code), so the signed metrics compare real groups."""
    for attr, group in spec.dataset.privileged.items():
        where = f"dataset.privileged.{attr}"
        if attr not in dataset.group_names:
            raise SpecError(where, group, f"the dataset has no sensitive attribute {attr!r}; it has: "
                                          f"{', '.join(dataset.group_names)}")
        names = list(dataset.group_names.get(attr) or ())
        groups = names or sorted({int(c) for c in dataset.meta("test").attributes[attr]})
        if group not in groups:
            raise SpecError(where, group, f"not a group of {attr!r}; its groups: {', '.join(map(str, groups))}")


def _as_spec_error(path: str, value: Any, exc: Exception) -> SpecError:
    """``exc`` as an error on ``path``; a SchemaError (dataset or paradigm options) already names its
    own field, e.g. ``dataset.options.image_size``, and keeps it."""
    if isinstance(exc, SchemaError):
        return SpecError(exc.path, exc.value, exc.allowed)
    return SpecError(path, value, str(exc))


def build_plan(spec: SweepSpec, *, base_dir: str | None = None) -> Plan:
    """Resolve names through the registries and check feasibility; raises ``SpecError`` with a field path.

    Only a ``UserError`` (an unknown name, an infeasible magnitude, a refused option) becomes a
    ``SpecError`` on the field that caused it; any other exception is a bug and propagates as it is.

    Relative ``file:`` checkpoints resolve against ``base_dir`` (default: the working directory);
    resume passes the directory the sweep was launched from, so it may run from anywhere.
    """
    from trainables import backbones, interventions, metrics, paradigms, pretrain
    from trainables.data import build_dataset
    from trainables.registry import UnknownNameError

    try:
        dataset = build_dataset(spec.dataset.name, spec.dataset.options)
        dataset.check()
    except UnknownNameError as exc:
        raise _as_spec_error("dataset.name", spec.dataset.name, exc) from None
    except UserError as exc:
        raise _as_spec_error("dataset.options", dict(spec.dataset.options), exc) from None

    for field_name in ("performance", "fairness"):
        name = getattr(spec.objectives, field_name)
        try:
            metrics.direction(name)
        except UserError as exc:
            raise _as_spec_error(f"objectives.{field_name}", name, exc) from None
        attr = name.split("/", 1)[1] if "/" in name else None
        if attr is not None and attr not in dataset.group_names:
            raise SpecError(f"objectives.{field_name}", name, f"the dataset has no sensitive attribute {attr!r}; "
                            f"it has: {', '.join(dataset.group_names)}")
    _check_privileged(spec, dataset)
    spec = _with_absolute_paths(spec)

    # Interventions: feasible on this pool at this size (metadata only, no pixels).
    pool = dataset.meta("finetune")
    for i, axis in enumerate(spec.axes.intervention):
        try:
            interventions.INTERVENTIONS.get(axis.kind)
            interventions.check_feasible(axis.kind, pool.labels, pool.groups, axis.endpoints(), spec.finetune.size)
        except UnknownNameError as exc:
            raise _as_spec_error(f"axes.intervention[{i}].kind", axis.kind, exc) from None
        except UserError as exc:
            raise _as_spec_error(f"axes.intervention[{i}].magnitudes", list(axis.magnitudes), exc) from None

    # Paradigms: registered, suitable for the modality, checkpoint files readable.
    file_weights: dict[str, str] = {}
    for i, name in enumerate(spec.axes.paradigm):
        path = f"axes.paradigm[{i}]"
        if name.startswith("file:"):
            ckpt = (Path(base_dir or ".") / os.path.expanduser(name[5:])).resolve()  # an unknown ~user stays as written
            try:
                backbones.load_weights_file(ckpt)
            except UserError as exc:
                raise _as_spec_error(path, name, exc) from None
            if spec.pretraining.paradigms.get(name):
                raise SpecError(f"pretraining.paradigms.{name}", dict(spec.pretraining.paradigms[name]),
                                "a file: checkpoint is loaded as is and takes no options; remove them")
            file_weights[name] = str(ckpt)
            continue
        try:
            paradigm = paradigms.PARADIGMS.get(name)
        except UnknownNameError as exc:
            raise _as_spec_error(path, name, f"{exc} (or 'file:PATH' for a local checkpoint)") from None
        options = spec.pretraining.paradigms.get(name, {})
        try:
            paradigm.resolve_options(options)
        except UserError as exc:
            raise _as_spec_error(f"pretraining.paradigms.{name}", dict(options), exc) from None
        try:
            paradigm.check(dataset, options)
        except UserError as exc:
            raise _as_spec_error(path, name, exc) from None
    for name in spec.pretraining.paradigms:
        if name not in spec.axes.paradigm:
            raise SpecError(f"pretraining.paradigms.{name}", dict(spec.pretraining.paradigms[name]),
                            f"options for a paradigm not on axes.paradigm ({', '.join(spec.axes.paradigm)})")

    # Backbones: known, and every freeze depth fits their layer groups.
    n_groups: dict[str, int] = {}
    for i, name in enumerate(spec.axes.backbone):
        try:
            n_groups[name] = backbones.count_layer_groups(name, dataset.input_shape)
        except UserError as exc:
            raise _as_spec_error(f"axes.backbone[{i}]", name, exc) from None
        for j, fd in enumerate(spec.axes.freeze_depth):
            try:
                backbones.resolve_freeze(fd, n_groups[name], backbone=name)
            except UserError as exc:
                raise _as_spec_error(f"axes.freeze_depth[{j}]", fd if not isinstance(fd, tuple) else list(fd), exc) from None
        for j, p in enumerate(spec.axes.paradigm):
            try:
                if p in file_weights:
                    paradigms.check_weights_fit(file_weights[p], name, dataset.input_shape)
                elif p in paradigms.PARADIGMS:
                    paradigms.PARADIGMS.get(p).check_backbone(name, dataset)
            except UserError as exc:
                raise _as_spec_error(f"axes.paradigm[{j}]", p, f"{exc} (backbone {name!r})") from None

    # Pretraining jobs: one per (backbone, paradigm) that needs training.
    pt = spec.pretraining
    jobs: list[PretrainJob] = []
    pretrain_keys: dict[tuple[str, str], str | None] = {}
    for b in spec.axes.backbone:
        for p in spec.axes.paradigm:
            if p in file_weights:
                pretrain_keys[(b, p)] = _file_key(file_weights[p])
                continue
            paradigm = paradigms.PARADIGMS.get(p)
            if not paradigm.pretrains:
                pretrain_keys[(b, p)] = None
                continue
            hparams = {"epochs": pt.epochs, "batch_size": pt.batch_size, "lr": pt.lr,
                       "weight_decay": pt.weight_decay, "momentum": pt.momentum, "seed": pt.seed,
                       "options": paradigm.resolve_options(pt.paradigms.get(p, {})),  # defaults filled: part of the key
                       **pretrain.preprocessing_part(dataset, b)}  # folder images: the model's own mean/std/crop
            job = PretrainJob("", b, p, spec.dataset.name, dict(spec.dataset.options), hparams)
            identity = {"fingerprint": dataset.fingerprint(), **job.identity(), **paradigm.key_parts(b)}
            job = PretrainJob(canonical_hash(identity), b, p, spec.dataset.name, dict(spec.dataset.options), hparams)
            jobs.append(job)
            pretrain_keys[(b, p)] = job.key

    plan = Plan(spec, tuple(jobs), (), n_groups, file_weights, dataset.fingerprint(), pretrain_keys)
    if spec.search.type == "optuna":
        return plan  # the sampler proposes points; plan.resolve keys them as they come
    return replace(plan, trials=tuple(plan.resolve(pt) for pt in grid_points(spec)))


def grid_points(spec: SweepSpec) -> list[TrialPoint]:
    """Every cell of the axes (lists only), in a fixed order."""
    return [TrialPoint(b, p, axis.kind, m, fd, seed)
            for b in spec.axes.backbone for p in spec.axes.paradigm for axis in spec.axes.intervention
            for m in axis.magnitudes for fd in spec.axes.freeze_depth for seed in spec.axes.seed]

