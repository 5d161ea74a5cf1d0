"""SweepSpec -> Plan: the pretraining jobs (one per unique key) and the finetuning trials.

Everything that can be known before a GPU is touched is checked here: registry names, intervention
feasibility on the pool's metadata, freeze depths against each backbone's layer groups, metric names.
The plan builds the trial contract (trainables/trial.py): a ``TrialConfig`` per trial, keyed by the hash of
its canonical config (docs/architecture.md, decision 1), and a ``PretrainJob`` per base, keyed by everything
that determines its weights (decision 3).

The datasets (torch) and the registries the trainables fill are imported inside the functions that
build a plan: the plan's types travel through the driver's modules and the CLI, which must not load torch
before a plan is built.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from orchestrator.spec import SpecError, SweepSpec
from trainables.errors import UserError
from trainables.schema import SchemaError
from trainables.trial import PretrainHParams, PretrainJob, TrialConfig, TrialPoint, Weights

__all__ = ["PlannedTrial", "Plan", "build_plan", "grid_points"]


@dataclass(frozen=True)
class PlannedTrial:
    config: TrialConfig  # what the worker receives (as its dict)
    key: str  # hash of the whole config; what resume and MLflow recognise
    config_key: str  # the same without the seed: repeats of one configuration share it
    frozen_groups: tuple[int, ...]
    n_groups: int

    @property
    def point(self) -> TrialPoint:
        return self.config.point


@dataclass(frozen=True)
class Plan:
    spec: SweepSpec
    pretrain_jobs: tuple[PretrainJob, ...]
    trials: tuple[PlannedTrial, ...]
    layer_groups: Mapping[str, int]  # backbone -> number of non-head layer groups
    file_weights: Mapping[str, str]  # "file:..." paradigm -> absolute checkpoint path
    dataset_fingerprint: str = ""
    weights: Mapping[tuple[str, str], Weights] | None = None  # (backbone, paradigm) -> where trials start

    def resolve(self, point: TrialPoint) -> PlannedTrial:
        """The trial of any point of the space (grid cells and optuna proposals alike): its config, keys and freezing."""
        finetune = {**self.spec.finetune.fixed(), **dict(point.searched)}  # the sampler's values win
        config = TrialConfig(point, finetune, self.weights[(point.backbone, point.paradigm)])
        n = self.layer_groups[point.backbone]
        frozen = point.freeze_depth.resolve(n, backbone=point.backbone)
        return PlannedTrial(config, *config.keys(self.dataset_fingerprint), frozen, n)

    def trial_for(self, config: Mapping[str, Any]) -> PlannedTrial:
        """The planned trial behind a Tune config (``TrialConfig.from_tune``; the tracker's view)."""
        return self.resolve(TrialConfig.from_tune(config).point)

    def run_order(self) -> list[PlannedTrial]:
        """The trials in the order Tune starts them: the first trial of each base to pretrain, then the rest in
        the grid's order. Those first trials build the bases side by side on the first free slots (a trial builds
        its base itself, trainables/finetune.py), so few trials wait on the lock of a base another one builds."""
        jobs = {job.key for job in self.pretrain_jobs}
        first: dict[str, int] = {}
        for i, t in enumerate(self.trials):
            key = t.config.weights.key
            if key in jobs:
                first.setdefault(key, i)
        lead = set(first.values())
        return [self.trials[i] for i in sorted(lead)] + [t for i, t in enumerate(self.trials) if i not in lead]

    def summary(self, n_examples: int = 3) -> str:
        s = self.spec
        search = s.search.type if s.search.type == "grid" else f"optuna ({s.search.sampler}, budget {s.search.budget}, seed {s.search.seed}) over {s.grid_size} grid cells"
        lines = [f"sweep {s.name!r} (MLflow experiment {s.experiment!r}), search: {search}",
                 f"dataset: {s.dataset.name} {dict(s.dataset.options) or ''}".rstrip(),
                 "layer groups: " + ", ".join(f"{b}={n}" for b, n in self.layer_groups.items()),
                 f"pretraining jobs: {len(self.pretrain_jobs)}"]
        for job in self.pretrain_jobs:
            lines.append(f"  {job.key}  {job.backbone:<24} {job.paradigm}  epochs={job.hparams.epochs}")
        lines.append(f"trials: {s.n_trials}")
        for t in self.trials[:n_examples]:
            lines.append(f"  {t.key}  {json.dumps(t.point.to_dict())}  frozen groups={list(t.frozen_groups)}/{t.n_groups}")
        if len(self.trials) > n_examples:
            lines.append(f"  ... and {len(self.trials) - n_examples} more")
        return "\n".join(lines)


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
            # absolute, symlinks kept as given (a dataset's key names its files under the root as reached)
            options[key] = os.path.abspath(Path(value).expanduser())  # pathlib raises on an unknown ~user
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
            direction = metrics.direction(name)
        except UserError as exc:
            raise _as_spec_error(f"objectives.{field_name}", name, exc) from None
        wanted = "max" if field_name == "performance" else "min"  # the front, the search and the queries rely on it
        if direction != wanted:
            raise SpecError(f"objectives.{field_name}", name, (
                "lower is better for this metric, and the performance objective is maximised: choose one where "
                "higher is better (e.g. accuracy, auroc, worst_group_accuracy)") if wanted == "max" else (
                "higher is better for this metric, and the fairness objective is minimised: choose an unfairness "
                "metric, lower is fairer (e.g. equalized_odds_difference, accuracy_gap), or make this one the "
                "performance objective"))
        attr = name.split("/", 1)[1] if "/" in name else None
        if attr is not None and attr not in dataset.group_names:
            raise SpecError(f"objectives.{field_name}", name, f"the dataset has no sensitive attribute {attr!r}; "
                            f"it has: {', '.join(dataset.group_names)}")
    _check_privileged(spec, dataset)
    spec = _with_absolute_paths(spec)

    # Interventions: feasible on this pool at every finetuning size (metadata only, no pixels).
    pool = dataset.meta("finetune")
    for k, size in enumerate(spec.axes.finetune_size):
        if size > len(pool):
            where = f"axes.finetune_size[{k}]" if "finetune_size" in spec.source.get("axes", {}) else "finetune.size"
            raise SpecError(where, size, f"exceeds the finetuning pool of {len(pool)} examples; use a size of at most "
                                         f"{len(pool)} (or a larger pool)")
    for i, axis in enumerate(spec.axes.intervention):
        try:
            interventions.INTERVENTIONS.get(axis.kind)
            for size in spec.axes.finetune_size:
                interventions.check_feasible(axis.kind, pool.labels, pool.groups, axis.endpoints(), size)
        except UnknownNameError as exc:
            raise _as_spec_error(f"axes.intervention[{i}].kind", axis.kind, exc) from None
        except UserError as exc:
            raise _as_spec_error(f"axes.intervention[{i}].magnitudes", list(axis.endpoints()), exc) from None

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
            paradigm = paradigms.lookup(name)  # a registered name, or NAME.VARIANT
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
                fd.resolve(n_groups[name], backbone=name, path=f"axes.freeze_depth[{j}]")
            except SchemaError as exc:
                raise _as_spec_error(exc.path, exc.value, exc) from None
        for j, p in enumerate(spec.axes.paradigm):
            try:
                if p in file_weights:
                    paradigms.check_weights_fit(file_weights[p], name, dataset.input_shape)
                else:
                    paradigms.lookup(p).check_backbone(name, dataset)
            except UserError as exc:
                raise _as_spec_error(f"axes.paradigm[{j}]", p, f"{exc} (backbone {name!r})") from None

    # Pretraining jobs: one per (backbone, paradigm) that needs training; every pair's starting weights.
    pt = spec.pretraining
    # what the jobs compute in: bf16 autocast only where they get a GPU (keys: trainables/trial.py PretrainHParams)
    res = spec.resources
    planned_precision = "bf16" if res.precision == "bf16" and res.gpus_per_trial > 0 else "fp32"
    jobs: list[PretrainJob] = []
    files = {p: Weights.from_file(path) for p, path in file_weights.items()}  # keyed by content
    weights: dict[tuple[str, str], Weights] = {}
    for b in spec.axes.backbone:
        for p in spec.axes.paradigm:
            if p in files or not paradigms.lookup(p).pretrains:
                weights[(b, p)] = files.get(p, Weights())  # a file: checkpoint, or the seed's random initialisation
                continue
            paradigm = paradigms.lookup(p)
            hparams = PretrainHParams(pt.epochs, pt.batch_size, pt.lr, pt.weight_decay, pt.momentum, pt.seed,
                                      paradigm.resolve_options(pt.paradigms.get(p, {})),  # defaults filled: in the key
                                      # folder images: the model's own mean/std/crop
                                      pretrain.preprocessing_part(dataset, b).get("preprocessing"),
                                      planned_precision)
            job = PretrainJob.create(b, p, spec.dataset.name, spec.dataset.options, hparams,
                                     dataset_fingerprint=dataset.fingerprint(), key_parts=paradigm.key_parts(b))
            jobs.append(job)
            weights[(b, p)] = Weights(job.key)

    plan = Plan(spec, tuple(jobs), (), n_groups, file_weights, dataset.fingerprint(), weights)
    if spec.search.type == "optuna":
        return plan  # the sampler proposes points; plan.resolve keys them as they come
    return replace(plan, trials=tuple(plan.resolve(pt) for pt in grid_points(spec)))


def grid_points(spec: SweepSpec) -> list[TrialPoint]:
    """Every cell of the axes (lists only), in a fixed order."""
    return [TrialPoint(b, p, axis.kind, m, fd, seed, size)
            for b in spec.axes.backbone for p in spec.axes.paradigm for axis in spec.axes.intervention
            for m in axis.magnitudes for fd in spec.axes.freeze_depth for size in spec.axes.finetune_size
            for seed in spec.axes.seed]

