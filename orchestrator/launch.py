"""Run a plan on Ray: phase 1 builds each pretraining key once, phase 2 runs the finetuning trials
through a Tune ``Tuner`` with the MLflow tracker as a driver-side callback.

Embedded by default (a local Ray bound to 127.0.0.1, SQLite MLflow and results in the working
directory); ``address`` / ``storage`` / ``tracking_uri`` point the same plan at a cluster.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.plan import Plan

__all__ = ["LaunchOptions", "LaunchResult", "LaunchError", "resolve_tracking_uri", "resolve_storage", "launch"]

DEFAULT_STORAGE = "fairsweep_results"
CACHE_DIRNAME = "_pretrain_cache"


class LaunchError(RuntimeError):
    """A sweep that cannot start as asked (the message says what to do instead)."""


@dataclass(frozen=True)
class LaunchOptions:
    tracking_uri: str | None = None
    address: str | None = None
    storage: str | None = None
    cache_dir: str | None = None
    max_concurrent_trials: int | None = None
    verbose: int = 1


@dataclass(frozen=True)
class LaunchResult:
    experiment_path: str
    tracking_uri: str
    parent_run_id: str
    front: pd.DataFrame
    finished: int
    failed: list[str] = field(default_factory=list)  # MLflow run ids of FAILED trials


def resolve_tracking_uri(flag: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else SQLite in the working directory; always absolute."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri:
        raise LaunchError(f"tracking URI {uri!r} is not a URI; use sqlite:///PATH.db or http://HOST:PORT")
    return uri


def resolve_storage(flag: str | None) -> str:
    """Absolute, because Tune runs each trial in its own working directory."""
    storage = flag or DEFAULT_STORAGE
    if "://" in storage:
        return storage
    return str(Path(storage).expanduser().resolve())


def _artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store sit beside the database file; a server decides for itself."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def init_ray(address: str | None) -> bool:
    """Connect to ``address`` (or RAY_ADDRESS), else start a private local Ray on loopback.
    Returns True when this call started Ray (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return True
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind the local node to 127.0.0.1 only
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    return True


def _trial_context(plan: Plan, cache_root: str) -> Any:
    from dataclasses import asdict

    from trainables.finetune import TrialContext

    s = plan.spec
    pretrained = {f"{j.backbone}|{j.paradigm}": j.key for j in plan.pretrain_jobs}
    return TrialContext(dataset=s.dataset.name, dataset_options=dict(s.dataset.options), finetune=asdict(s.finetune),
                        cache_root=cache_root, pretrained=pretrained, weight_files=dict(plan.file_weights),
                        cpus_per_trial=s.resources.cpus_per_trial)


def run_pretraining(plan: Plan, cache_root: str, tracker: Any) -> list:
    """Phase 1: each pretraining key once, as Ray tasks on the trials' resources; logged to MLflow."""
    import ray
    from dataclasses import asdict

    from trainables.pretrain import run_pretrain_job

    res = plan.spec.resources
    task = ray.remote(num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial, max_retries=max(1, res.max_failures))(run_pretrain_job)
    refs = {task.remote(asdict(job), cache_root, res.cpus_per_trial): job for job in plan.pretrain_jobs}
    outcomes = []
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        outcome = ray.get(done[0])
        tracker.log_pretrain(refs[done[0]], outcome)
        outcomes.append(outcome)
    return outcomes


def launch(plan: Plan, options: LaunchOptions = LaunchOptions()) -> LaunchResult:
    """Run the sweep to the end; returns the front. Raises ``LaunchError`` if the sweep already exists."""
    from ray import tune

    from orchestrator.tracking import SweepTracker
    from trainables.finetune import finetune_trial

    spec = plan.spec
    storage = resolve_storage(options.storage)
    experiment_path = f"{storage.rstrip('/')}/{spec.name}"
    if tune.Tuner.can_restore(experiment_path):
        raise LaunchError(f"sweep {spec.name!r} already exists at {experiment_path}; continue it with "
                          f"`fairsweep resume {spec.name} --storage {storage}`, or give the sweep another name or storage")
    tracking_uri = resolve_tracking_uri(options.tracking_uri)
    cache_root = options.cache_dir or f"{storage.rstrip('/')}/{CACHE_DIRNAME}"

    started_ray = init_ray(options.address)
    tracker = SweepTracker(plan, tracking_uri, artifact_location=_artifact_location(tracking_uri))
    status = "FAILED"
    try:
        tracker.open()
        run_pretraining(plan, cache_root, tracker)
        res = spec.resources
        trainable = tune.with_resources(tune.with_parameters(finetune_trial, context=_trial_context(plan, cache_root)),
                                        {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial})
        tuner = tune.Tuner(
            trainable,
            param_space={"point": tune.grid_search([t.point.as_config() for t in plan.trials])},
            tune_config=tune.TuneConfig(max_concurrent_trials=options.max_concurrent_trials or res.max_concurrent_trials),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=storage, callbacks=[tracker], verbose=options.verbose,
                failure_config=tune.FailureConfig(max_failures=res.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )
        tuner.fit()
        front = tracker.refresh_front()
        failed = [r.info.run_id for r in tracker._find_runs(
            f"tags.`fairsweep.sweep` = '{spec.name}' AND tags.`fairsweep.kind` = 'trial' AND attributes.status = 'FAILED'")]
        finished = int(front["n_seeds"].sum()) if not front.empty else 0
        status = "FINISHED"
        return LaunchResult(experiment_path, tracking_uri, tracker.parent_run_id, front, finished, failed)
    finally:
        tracker.close(status)
        if started_ray:
            import ray

            ray.shutdown()
