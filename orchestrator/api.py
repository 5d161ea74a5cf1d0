"""fairsweep from Python: the CLI's commands as functions, re-exported by the ``orchestrator`` package.

``launch`` and ``resume`` run a sweep and return a ``SweepResult`` read back from MLflow when it ends;
``status`` says where a sweep stands; ``trials``, ``front``, ``best`` and ``compare`` are the queries
(``fairsweep pareto|best|compare``) as pandas DataFrames. Keyword arguments carry the CLI flags' names
and defaults (``--max-concurrent N`` is ``max_concurrent=N``), except ``--filter`` and ``--all``, which
are ``filters`` (a mapping, as ``query.sweep_trials`` takes) and ``all_rows`` here. A mistake raises the
same ``UserError`` the CLI prints before exiting 2. The CLI runs through the same functions
(``checked_plan_builder``, ``launch_options`` and the queries), so the two cannot drift apart.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Union

import pandas as pd

from orchestrator import query
from orchestrator.launch import LaunchOptions, LaunchResult, PlanBuilder
from orchestrator.launch import launch as launch_plan
from orchestrator.launch import resume as resume_sweep
from orchestrator.plan import Plan, build_plan
from orchestrator.query_cli import env_experiment
from orchestrator.search import check_study_storage
from orchestrator.spec import SpecError, SweepSpec, load_spec, parse_spec
from orchestrator.status import SweepStatus, sweep_status
from orchestrator.storage import resolve_tracking_uri
from orchestrator.store import check_store, open_client

__all__ = ["SweepResult", "SweepSource", "launch", "resume", "status", "trials", "front", "best", "compare",
           "load", "checked_plan", "checked_plan_builder", "launch_options"]

SweepSource = Union[str, "os.PathLike[str]", Mapping[str, Any], SweepSpec]
"""What ``launch`` takes: a sweep file's path, its parsed YAML as a mapping, or a ``SweepSpec``."""


@dataclass(frozen=True, eq=False)  # eq=False: DataFrames have no single truth value to compare by
class SweepResult:
    """A sweep that ran (``launch`` or ``resume``), as MLflow holds it when the run ends."""

    name: str
    experiment: str
    tracking_uri: str
    parent_run_id: str  # the sweep's parent MLflow run; its trials are child runs
    performance: str  # the objectives the front is of
    fairness: str
    front: pd.DataFrame  # the Pareto front on the test split: one row per configuration, as `fairsweep pareto` prints
    trials: pd.DataFrame  # every finished trial run: run_id, trial_key, config_key, seed, the axes and the metrics
    finished: int
    failed: tuple[str, ...]  # MLflow run ids of failed trials; resume(name, retry_errored=True) runs them again
    interrupted: bool  # stopped before every trial ended (Ctrl-C); resume(name) continues it
    search_ended: str = ""  # an optuna search: why it stopped proposing (its budget, failures, a used-up space)


def load(spec: SweepSource) -> SweepSpec:
    """The typed spec of a sweep file path, a parsed mapping or a ``SweepSpec`` (returned as is); the MLflow
    experiment defaults to $MLFLOW_EXPERIMENT_NAME where the spec sets none, as on the command line."""
    if isinstance(spec, SweepSpec):
        _check_recordable(spec)
        return spec
    if isinstance(spec, Mapping):
        return parse_spec(spec, default_experiment=env_experiment())
    return load_spec(spec, default_experiment=env_experiment())


def _check_recordable(spec: SweepSpec) -> None:
    """A sweep is recorded for ``resume`` and ``status`` as its source mapping (``spec.source``): a ``SweepSpec``
    changed with ``dataclasses.replace`` or built by hand would run one sweep and record another."""
    try:
        recorded = parse_spec(spec.source, default_experiment=spec.experiment)
    except SpecError as exc:
        recorded, why = None, f"it does not parse ({exc})"
    else:
        why = "it parses to a different sweep"
    if recorded != spec:
        raise SpecError("spec", type(spec).__name__, f"a SweepSpec is recorded for resume as its source mapping, and "
                        f"{why}; change the mapping instead (e.g. parse_spec({{**spec.source, ...}})) or launch "
                        f"from a file")


def checked_plan_builder(spec: SweepSpec, tracking_uri: str | None = None) -> PlanBuilder:
    """The checks of a sweep about to launch that answer in seconds (the study's database, the tracking store),
    then how to build its plan: ``launch`` builds it once Ray has started when Ray's idle workers load the
    trials' modules meanwhile, else at once (``orchestrator.launch.PlanBuilder``)."""
    if spec.search.type == "optuna" and spec.search.storage:
        check_study_storage(spec)
    check_store(resolve_tracking_uri(tracking_uri), create=True)
    return PlanBuilder(spec, functools.partial(build_plan, spec))


def checked_plan(spec: SweepSpec, tracking_uri: str | None = None) -> Plan:
    """The plan of a sweep about to launch, after the checks that answer in seconds (the study's database,
    the tracking store) and before anything starts."""
    return checked_plan_builder(spec, tracking_uri).build()


def _progress_line(line: str) -> None:
    print(f"[fairsweep] {line}", file=sys.stderr, flush=True)


def launch_options(*, tracking_uri: str | None = None, address: str | None = None, storage: str | None = None,
                   cache_dir: str | None = None, max_concurrent: int | None = None, quiet: bool = False,
                   verbose: bool = False, dashboard: bool = False) -> LaunchOptions:
    """``LaunchOptions`` from the flags of ``fairsweep launch`` and ``resume``, with their meaning: ``quiet``
    silences the progress lines (on stderr); ``verbose`` adds Tune's own output (its status table, a table of
    each trial's configuration and results: thousands of lines for a sweep of dozens of trials) and forwards
    the trials' own output. Tune's report of a failed trial shows either way."""
    return LaunchOptions(tracking_uri=tracking_uri, address=address, storage=storage, cache_dir=cache_dir,
                         max_concurrent_trials=max_concurrent, verbose=1 if verbose else 0,
                         progress=None if quiet else _progress_line, trial_output=verbose, dashboard=dashboard)


def _result(run: LaunchResult) -> SweepResult:
    spec = run.plan.spec
    perf, fair = spec.objectives.performance, spec.objectives.fairness
    rows = query.sweep_trials(open_client(run.tracking_uri), spec.name, spec.experiment)
    try:
        front = query.pareto(rows, perf, fair)
    except query.QueryError:  # no trial logged an objective (e.g. a ratio infinite everywhere): the sweep still ran
        front = query.pareto(rows.iloc[0:0], perf, fair)
    return SweepResult(spec.name, spec.experiment, run.tracking_uri, run.parent_run_id, perf, fair,
                       front, rows, run.finished, tuple(run.failed), run.interrupted, run.search_ended)


def launch(spec: SweepSource, *, tracking_uri: str | None = None, address: str | None = None,
           storage: str | None = None, cache_dir: str | None = None, max_concurrent: int | None = None,
           quiet: bool = False, verbose: bool = False, dashboard: bool = False) -> SweepResult:
    """Run a new sweep to the end (``fairsweep launch``): a local Ray on 127.0.0.1 and ``sqlite:///mlflow.db``
    in the working directory unless ``address`` / ``tracking_uri`` (or RAY_ADDRESS / MLFLOW_TRACKING_URI)
    say otherwise. A sweep that exists already is refused (``LaunchError``: resume it instead)."""
    return _result(launch_plan(checked_plan_builder(load(spec), tracking_uri), launch_options(
        tracking_uri=tracking_uri, address=address, storage=storage, cache_dir=cache_dir,
        max_concurrent=max_concurrent, quiet=quiet, verbose=verbose, dashboard=dashboard)))


def resume(name: str, *, retry_errored: bool = False, tracking_uri: str | None = None, address: str | None = None,
           storage: str | None = None, cache_dir: str | None = None, max_concurrent: int | None = None,
           quiet: bool = False, verbose: bool = False, dashboard: bool = False) -> SweepResult:
    """Continue an interrupted sweep from its folder under ``storage`` (``fairsweep resume``); finished
    trials stay finished, ``retry_errored`` runs failed ones again."""
    return _result(resume_sweep(name, launch_options(
        tracking_uri=tracking_uri, address=address, storage=storage, cache_dir=cache_dir,
        max_concurrent=max_concurrent, quiet=quiet, verbose=verbose, dashboard=dashboard),
        retry_errored=retry_errored))


def status(name: str, *, storage: str | None = None, tracking_uri: str | None = None) -> SweepStatus:
    """Where a sweep stands (``fairsweep status``): finished / running / pending / errored trials, the
    front's size, whether a driver runs it; ``.render()`` is the CLI's table, ``.to_dict()`` its JSON."""
    return sweep_status(name, storage, tracking_uri)


def _tracked(sweep: str, experiment: str | None, tracking_uri: str | None) -> tuple[Any, str]:
    """An MLflow client of the store (StoreError for a missing, damaged or locked one, a server that is
    down) and the sweep's experiment: the one given, else $MLFLOW_EXPERIMENT_NAME, else the sweep's name."""
    return open_client(resolve_tracking_uri(tracking_uri)), experiment or env_experiment() or sweep


def _open_sweep(sweep: str, *, experiment: str | None = None, tracking_uri: str | None = None,
               perf: str | None = None, fairness: str | None = None,
               filters: Mapping[str, Any] | None = None) -> tuple[pd.DataFrame, str, str]:
    """(trials, performance, fairness) of a tracked sweep, as every query starts: the experiment defaults
    to $MLFLOW_EXPERIMENT_NAME, else the sweep's name; the metrics to the sweep's objectives."""
    client, experiment = _tracked(sweep, experiment, tracking_uri)
    if not perf or not fairness:
        default_perf, default_fair = query.sweep_objectives(client, sweep, experiment)
        perf, fairness = perf or default_perf, fairness or default_fair
    return query.sweep_trials(client, sweep, experiment, filters=filters), perf, fairness


def trials(sweep: str, *, experiment: str | None = None, tracking_uri: str | None = None,
           filters: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Every finished trial of a sweep, one row per MLflow run, with its axes and metrics (validation
    ones prefixed ``val_``); ``filters`` maps a column to a value or a list of accepted values."""
    client, experiment = _tracked(sweep, experiment, tracking_uri)
    return query.sweep_trials(client, sweep, experiment, filters=filters)


def front(sweep: str, *, experiment: str | None = None, tracking_uri: str | None = None, perf: str | None = None,
          fairness: str | None = None, filters: Mapping[str, Any] | None = None, per_trial: bool = False,
          all_rows: bool = False, split: str = "test") -> pd.DataFrame:
    """The Pareto front (``fairsweep pareto``): seed means per configuration with sd and 95 % t-intervals,
    or single trials with ``per_trial``; every row with an ``on_front`` column with ``all_rows``."""
    rows, perf, fairness = _open_sweep(sweep, experiment=experiment, tracking_uri=tracking_uri, perf=perf,
                                      fairness=fairness, filters=filters)
    return query.pareto(rows, perf, fairness, by_config=not per_trial, front_only=not all_rows, split=split)


def best(sweep: str, *, max_drop: float | None = None, max_rel_drop: float | None = None,
         reference: Mapping[str, Any] | None = None, per_trial: bool = False, select_on: str = "val",
         experiment: str | None = None, tracking_uri: str | None = None, perf: str | None = None,
         fairness: str | None = None, filters: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The least unfair configuration within a performance budget of the best (``fairsweep best``): give one
    of ``max_drop`` (absolute) or ``max_rel_drop``; chosen on validation, its test metrics reported."""
    rows, perf, fairness = _open_sweep(sweep, experiment=experiment, tracking_uri=tracking_uri, perf=perf,
                                      fairness=fairness, filters=filters)
    return query.best(rows, perf, fairness, max_drop=max_drop, max_rel_drop=max_rel_drop, reference=reference,
                      by_config=not per_trial, select_on=select_on)


def compare(sweep: str, *, by: str, reference: Any = None, max_drop: float | None = None,
            max_rel_drop: float | None = None, per_trial: bool = False, select_on: str = "val",
            experiment: str | None = None, tracking_uri: str | None = None, perf: str | None = None,
            fairness: str | None = None, filters: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Per value of the axis ``by``, the fairest configuration at the same performance floor and a paired
    test against the ``reference`` group (``fairsweep compare``); the budget is ``max_drop`` 0.01 unless
    one is given."""
    if max_drop is None and max_rel_drop is None:
        max_drop = 0.01
    rows, perf, fairness = _open_sweep(sweep, experiment=experiment, tracking_uri=tracking_uri, perf=perf,
                                      fairness=fairness, filters=filters)
    return query.compare(rows, by, perf, fairness, max_drop=max_drop, max_rel_drop=max_rel_drop,
                         reference_group=reference, by_config=not per_trial, select_on=select_on)
