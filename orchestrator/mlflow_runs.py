"""fairsweep's runs in MLflow: the tag names it writes, the filters that find runs by them, paged search
and the sweep's parent run. The tracker writes with these names and every reader (queries, status,
report, resume) finds runs with these filters, so the two cannot drift apart.

How a run is stored and reached (the probe, the SQLite schema, retries on a busy file) is
``orchestrator/store.py``; this module only knows what fairsweep's runs look like.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Any, Iterator, Literal, Sequence

from trainables.errors import UserError

__all__ = ["TAGS", "RunKind", "PAGE_SIZE", "WEIGHTS_ARTIFACT", "FilterValueError", "run_filter", "search_runs",
           "find_parent_run"]

RunKind = Literal["sweep", "trial", "pretrain"]  # the value of TAGS.KIND: a parent run, a trial, a pretraining job
PAGE_SIZE = 5000  # runs asked for per call; MLflow returns at most this many and a token for the next page
# a trial run's finetuned weights (safetensors), logged under tracking.log_models: all; what `fairsweep cka` loads
WEIGHTS_ARTIFACT = "weights/finetuned.safetensors"


class TAGS:
    """Every tag fairsweep sets on a run (MLflow's own last)."""

    # what a run is and which sweep it belongs to: how every run is found again (docs/architecture.md, decision 1)
    SWEEP, KIND = "fairsweep.sweep", "fairsweep.kind"
    TRIAL_KEY, CONFIG_KEY = "fairsweep.trial_key", "fairsweep.config_key"
    POINT = "fairsweep.point"  # the trial's axis values as JSON: what resume skips once finished
    TUNE_TRIAL_ID = "fairsweep.tune_trial_id"
    PRETRAIN_KEY, PRETRAIN_RUN = "fairsweep.pretrain_key", "fairsweep.pretrain_run_id"
    ERROR = "fairsweep.error"
    # a trial's outcome beyond its metrics
    FROZEN_GROUPS = "fairsweep.frozen_groups"
    INFINITE_METRICS = "fairsweep.infinite_metrics"  # ratios against a zero rate: +inf, which MLflow cannot hold
    FEATURE_CACHE = "fairsweep.feature_cache"  # whether it trained on cached frozen-prefix features, and why (not)
    DEVICE, PRECISION = "fairsweep.device", "fairsweep.precision"  # where it trained, and in bf16 or fp32
    FRONT = "fairsweep.pareto_front"  # "true" on the front's members, "false" on the others
    # a pretraining run's cache entry
    REUSED_CACHE, REBUILT_DAMAGED, CACHE_PATH = "fairsweep.reused_cache", "fairsweep.rebuilt_damaged", "fairsweep.cache_path"
    # the parent run
    DRIVER = "fairsweep.driver"  # host:pid of the driver writing the sweep, so status can tell a dead one
    STUDY_NAME = "fairsweep.study_name"
    FRONT_SIZE, FRONT_SPLIT = "fairsweep.front_size", "fairsweep.front_split"
    # MLflow's
    PARENT = "mlflow.parentRunId"
    RUN_NAME = "mlflow.runName"
    NOTE = "mlflow.note.content"  # the run's description in the UI (Markdown)


class FilterValueError(UserError, ValueError):
    """A sweep name (or other tag value) a filter cannot hold: the user's to fix, so the CLI exits 2 with the message."""


def _quoted(name: str, value: str) -> str:
    if "'" in value:
        raise FilterValueError(f"{name} {value!r} contains a quote; {name}s are plain identifiers")
    return f"'{value}'"


def run_filter(*, sweep: str | None = None, kind: RunKind | None = None, status: str | None = None,
               pretrain_key: str | None = None) -> str:
    """The MLflow filter string for fairsweep's runs with these tags and, given ``status``, that status
    (FINISHED, RUNNING, FAILED, KILLED). FilterValueError (a UserError and a ValueError) for a value holding a
    quote (it would end the filter)."""
    parts = [f"tags.`{tag}` = {_quoted(name, value)}"
             for tag, name, value in ((TAGS.SWEEP, "sweep name", sweep), (TAGS.KIND, "run kind", kind),
                                      (TAGS.PRETRAIN_KEY, "pretraining key", pretrain_key)) if value is not None]
    if status is not None:
        parts.append(f"attributes.status = {_quoted('run status', status)}")
    if not parts:
        raise ValueError("run_filter needs a sweep, kind, status or pretraining key: an empty filter is every run")
    return " AND ".join(parts)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """MLflow's SQL store builds ~20 ORM objects per run; the cyclic collector re-scans them all as
    they pile up, which is 60 % of loading 10,000 runs. Nothing cyclic is freed meanwhile, so pause it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def search_runs(client: Any, experiment_ids: Sequence[str], filter_string: str, *, limit: int | None = None,
                page_size: int | None = None) -> Iterator[Any]:
    """Every run matching ``filter_string``, page after page (MLflow returns one page a call), or the
    first ``limit`` of them. A generator: a sweep's runs are read one page at a time, ``page_size``
    runs a call (default PAGE_SIZE)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit}: expected a number of runs >= 1, or None for every run")
    page_size = page_size or PAGE_SIZE
    left, token = limit, None
    while True:
        size = page_size if left is None else min(page_size, left)
        with _gc_paused():  # only around the call: the caller's own work runs with the collector on
            page = client.search_runs(list(experiment_ids), filter_string=filter_string, max_results=size,
                                      page_token=token)
        yield from page
        if left is not None:
            left -= len(page)
        token = page.token
        if not token or (left is not None and left <= 0):
            return


def find_parent_run(client: Any, experiment_id: str, sweep: str) -> Any | None:
    """The sweep's parent run in that experiment, or None."""
    return next(search_runs(client, [experiment_id], run_filter(sweep=sweep, kind="sweep"), limit=1), None)
