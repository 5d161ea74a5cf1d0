"""`fairsweep status`: where a sweep stands, read from its storage path and MLflow, no driver needed.

MLflow is the ground truth for finished and failed trials (Tune saves its state only every ~10 s);
Tune's saved state tells which trials were in flight when it was last written.

Ray Tune and the driver's modules (launch, tracking: Ray, MLflow, pandas) are imported inside
functions: a name without a sweep is refused before any of them loads.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from orchestrator.mlflow_runs import TAGS, find_parent_run, run_filter, search_runs
from orchestrator.spec import SpecError, parse_spec
from orchestrator.storage import (StorageError, experiment_path, read_sweep_record, resolve_storage,
                                  resolve_tracking_uri, sqlite_path)
from orchestrator.store import open_client

__all__ = ["SweepStatus", "sweep_status"]


@dataclass(frozen=True)
class SweepStatus:
    name: str
    path: str
    tracking_uri: str
    total: int
    finished: int
    running: int
    pending: int
    errored: int
    front_size: int | None
    parent_status: str | None
    tune_states: Mapping[str, int] = field(default_factory=dict)
    driver: str = "none"  # running | stopped (its process is gone: stale RUNNING runs) | unknown (another host)
    storage_flag: str = ""  # " --storage PATH" where the sweep is not under the default storage

    def to_dict(self) -> dict[str, Any]:
        """The record ``fairsweep status --format json`` prints: every field, plus the commands ``render``
        suggests (``resume``, ``retry``: null when there is nothing to continue or retry)."""
        record = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(self).items() if k != "storage_flag"}
        resumable = self.pending + self.running > 0 and self.driver not in ("running", "unknown")
        record["resume"] = f"fairsweep resume {self.name}{self.storage_flag}" if resumable else None
        record["retry"] = f"fairsweep resume {self.name}{self.storage_flag} --retry-errored" if self.errored else None
        return record

    def render(self) -> str:
        front = "unknown" if self.front_size is None else str(self.front_size)
        lines = [f"sweep {self.name!r} at {self.path}",
                 f"  trials: {self.total} planned | finished {self.finished} | running {self.running} | "
                 f"pending {self.pending} | errored {self.errored}",
                 f"  Pareto front: {front} configurations | parent run: {self.parent_status or 'none'} | "
                 f"driver: {self.driver}",
                 "  Tune's last saved state: " + (", ".join(f"{k} {v}" for k, v in sorted(self.tune_states.items())) or "none"),
                 f"  MLflow: {self.tracking_uri}"]
        if self.driver == "stopped":
            lines.append("  the driver stopped without closing the sweep (killed?); its RUNNING runs are stale")
        if self.pending + self.running > 0 and self.driver not in ("running", "unknown"):
            lines.append(f"  continue it with: fairsweep resume {self.name}{self.storage_flag}")
        if self.errored:
            lines.append(f"  retry errored trials with: fairsweep resume {self.name}{self.storage_flag} --retry-errored")
        return "\n".join(lines)


def _tune_states(path: str) -> dict[str, int]:
    from ray.tune import ExperimentAnalysis

    from orchestrator.launch import quiet_tune_restore_logs

    quiet_tune_restore_logs()
    try:
        analysis = ExperimentAnalysis(path)
    except Exception:  # noqa: BLE001 - no Tune state yet (stopped before Tune started): report none
        return {}
    states: dict[str, int] = {}
    for trial in analysis.trials:
        states[trial.status] = states.get(trial.status, 0) + 1
    return states


def sweep_status(name: str, storage: str | None = None, tracking_uri: str | None = None) -> SweepStatus:
    """Raises ``StorageError`` for a name or storage without a sweep (or with a record this fairsweep
    cannot read), ``StoreError`` for an unusable store. Reads only: it never takes the driver lock, and
    never creates an MLflow database."""
    from orchestrator.tracking import driver_alive

    path = experiment_path(resolve_storage(storage), name)
    record = read_sweep_record(path)
    try:
        spec = parse_spec(record["spec"])
    except SpecError as exc:  # recorded by an older fairsweep, whose bounds were looser
        raise StorageError(f"the sweep record of {name!r} in {path} holds a spec this fairsweep refuses ({exc}); "
                           f"read its runs with `fairsweep pareto {name}` or the MLflow UI") from None
    uri = resolve_tracking_uri(tracking_uri or record["tracking_uri"])
    db = sqlite_path(uri)
    client = None if db is not None and not db.exists() else open_client(uri)  # no store yet: nothing tracked
    counts: dict[str, int] = {}
    parent_status, front_size, driver_tag = None, None, None
    exp = client.get_experiment_by_name(spec.experiment) if client is not None else None
    if exp is not None:
        for r in search_runs(client, [exp.experiment_id], run_filter(sweep=name, kind="trial")):
            counts[r.info.status] = counts.get(r.info.status, 0) + 1
        parent = find_parent_run(client, exp.experiment_id, name)
        if parent is not None:
            parent_status = parent.info.status
            driver_tag = parent.data.tags.get(TAGS.DRIVER)
            tag: Any = parent.data.tags.get(TAGS.FRONT_SIZE)
            front_size = int(tag) if tag is not None else 0
    tune_states = _tune_states(path)
    finished, errored = counts.get("FINISHED", 0), counts.get("FAILED", 0)
    driver = "none"
    if parent_status == "RUNNING":
        alive = driver_alive(driver_tag)
        driver = "unknown" if alive is None else "running" if alive else "stopped"
    running = counts.get("RUNNING", 0) if driver in ("running", "unknown") else 0
    # a failed optuna trial is replaced until the budget has finished; a failed grid cell stays failed
    settled = finished if spec.search.type == "optuna" else finished + errored
    pending = max(0, spec.n_trials - settled - running)
    storage_flag = "" if storage is None else f" --storage {resolve_storage(storage)}"
    return SweepStatus(name, path, uri, spec.n_trials, finished, running, pending, errored, front_size, parent_status,
                       tune_states, driver, storage_flag)
