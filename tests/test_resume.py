"""Interrupted sweeps: SIGKILL and SIGINT of a real driver, then `fairsweep resume`.

After any number of interruptions each trial key has exactly one FINISHED run, nothing stays
RUNNING, finished trials are not trained again and the front is recomputed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.storage import sqlite_path
from tests.helpers import cli_env, kill_session, run_cli, sqlite_uri, tiny_spec, write_spec

pytestmark = pytest.mark.slow

EPOCHS = 3


def _spec(name: str) -> dict:
    return tiny_spec(**{"name": name, "finetune.epochs": EPOCHS, "axes.seed": [0, 1]})  # 16 trials


def _start(tmp: Path, spec: Path, uri: str) -> subprocess.Popen:
    with open(tmp / "driver.log", "w") as log:  # the child keeps its own copy of the handle
        return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "launch", str(spec), "--tracking-uri", uri,
                                 "--storage", str(tmp / "results"), "--quiet"], cwd=tmp, env=cli_env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _trial_runs(name: str) -> pd.DataFrame | None:
    """The trial runs, or None before the driver has put its store in place: a reader never creates the file
    (MLflow's client would build the schema in place, under the driver opening it)."""
    db = sqlite_path(mlflow.get_tracking_uri())
    if db is not None and not db.exists():
        return None
    try:
        return mlflow.search_runs(experiment_names=[name], filter_string="tags.`fairsweep.kind` = 'trial'")
    except Exception:  # noqa: BLE001 - the store may not exist yet or be momentarily locked
        return None


def _trial_counts(uri: str, name: str) -> dict[str, int]:
    mlflow.set_tracking_uri(uri)
    runs = _trial_runs(name)
    return runs["status"].value_counts().to_dict() if runs is not None and len(runs) else {}


def _tag(runs: pd.DataFrame, tag: str) -> pd.Series:
    """A tag's column, empty strings where unset: MLflow's frame has no column for a tag no run carries."""
    column = f"tags.{tag}"
    return runs[column].fillna("") if column in runs else pd.Series("", index=runs.index)


def _interrupt_when(uri: str, name: str, proc: subprocess.Popen, sig: int, *, finished: int, running: int,
                    epochs_to_go: int, timeout: float = 300) -> pd.DataFrame:
    """Send ``sig`` once MLflow holds >= ``finished`` FINISHED trials and >= ``running`` RUNNING ones with at
    least ``epochs_to_go`` epochs left; return the trial runs as they were at that moment.

    The driver, MLflow's only writer, is frozen (SIGSTOP) while the store is read, so the signal lands on
    exactly the state that was checked: the situation a test checks is forced, not left to timing.
    SIGKILL goes to the driver's whole process group (it and its local Ray die at once); other signals
    to the driver alone, delivered as it is let go.
    """
    mlflow.set_tracking_uri(uri)
    client = None  # MlflowClient opens its store at once: made only once the driver's store is in place
    deadline = time.monotonic() + timeout
    seen: dict = {}
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the driver ended before it could be interrupted"
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            runs = _trial_runs(name)
            if runs is not None and len(runs):
                seen = runs["status"].value_counts().to_dict()
                client = client or MlflowClient(uri)
                in_flight = [r for r in runs.loc[runs["status"] == "RUNNING", "run_id"]
                             if len(client.get_metric_history(r, "train_loss")) <= EPOCHS - epochs_to_go]
                if seen.get("FINISHED", 0) >= finished and len(in_flight) >= running:
                    if sig == signal.SIGKILL:
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        os.kill(proc.pid, sig)
                    return runs
        finally:
            os.kill(proc.pid, signal.SIGCONT)  # a signal sent while stopped is delivered now
        time.sleep(0.5)
    raise AssertionError(f"sweep did not reach {finished} finished / {running} running trials: {seen}")


def _stop_session(proc: subprocess.Popen) -> None:
    """Kill whatever the driver left (its local Ray) by the session it was started in."""
    kill_session(proc)
    proc.wait(timeout=30)


def _check_complete(tmp: Path, uri: str, name: str, finished_before: dict[str, int]) -> None:
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    runs = mlflow.search_runs(experiment_names=[name])
    trials = runs[runs["tags.fairsweep.kind"] == "trial"]
    parents = runs[runs["tags.fairsweep.kind"] == "sweep"]
    assert len(parents) == 1 and parents["status"].iloc[0] == "FINISHED"
    assert len(trials) == 16 and trials["tags.fairsweep.trial_key"].nunique() == 16
    assert (trials["status"] == "FINISHED").all(), trials["status"].value_counts()
    assert (runs["status"] != "RUNNING").all()
    assert len(runs[runs["tags.fairsweep.kind"] == "pretrain"]) == 1  # reused from the cache, one run
    # trials finished before the interruption were not trained again: their history is unchanged
    for run_id, n_before in finished_before.items():
        assert len(client.get_metric_history(run_id, "train_loss")) == n_before == EPOCHS
    # the front was recomputed over all 16 trials: tags, the parent's front.csv and status agree
    assert set(trials["tags.fairsweep.pareto_front"]) <= {"true", "false"}
    assert trials["tags.fairsweep.pareto_front"].notna().all()
    on_front = trials[trials["tags.fairsweep.pareto_front"] == "true"]["tags.fairsweep.config_key"].nunique()
    front_csv = pd.read_csv(client.download_artifacts(parents["run_id"].iloc[0], "pareto/front.csv", str(tmp)))
    assert len(front_csv) == on_front >= 1 and set(front_csv["config_key"]) == set(
        trials[trials["tags.fairsweep.pareto_front"] == "true"]["tags.fairsweep.config_key"])
    status = run_cli("status", name, "--storage", str(tmp / "results"), cwd=tmp, timeout=120)
    assert status.returncode == 0, status.stderr
    assert "finished 16" in status.stdout and "pending 0" in status.stdout and "errored 0" in status.stdout
    assert f"Pareto front: {on_front} configurations" in status.stdout and "continue it with" not in status.stdout


def _finished_histories(uri: str, name: str) -> dict[str, int]:
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)  # not left to whichever helper ran before
    runs = mlflow.search_runs(experiment_names=[name], filter_string="tags.`fairsweep.kind` = 'trial' AND attributes.status = 'FINISHED'")
    return {r: len(client.get_metric_history(r, "train_loss")) for r in runs["run_id"]}


def test_sigkill_driver_then_resume(tmp_path):
    uri = sqlite_uri(tmp_path)
    proc = _start(tmp_path, write_spec(tmp_path, _spec("killed")), uri)
    try:
        at_kill = _interrupt_when(uri, "killed", proc, signal.SIGKILL, finished=3, running=1, epochs_to_go=0)
    finally:
        _stop_session(proc)
    before = _finished_histories(uri, "killed")
    stale = set(at_kill.loc[at_kill["status"] == "RUNNING", "run_id"])
    assert stale and _trial_counts(uri, "killed").get("RUNNING", 0) == len(stale)  # left behind by the kill
    # status sees that the driver is gone: its RUNNING runs are stale, and it says how to resume
    status = run_cli("status", "killed", "--storage", str(tmp_path / "results"), cwd=tmp_path, timeout=120)
    assert status.returncode == 0, status.stderr
    assert "driver: stopped" in status.stdout and "running 0" in status.stdout
    assert f"continue it with: fairsweep resume killed --storage {tmp_path / 'results'}" in status.stdout

    cache = _cache_files(tmp_path)
    assert cache  # pretraining finished before the trials started
    again = run_cli("launch", str(tmp_path / "sweep.yaml"), "--tracking-uri", uri, "--storage", str(tmp_path / "results"),
                    cwd=tmp_path, timeout=120)
    assert again.returncode == 2 and "fairsweep resume killed" in again.stderr  # no silent restart

    out = run_cli("resume", "killed", "--tracking-uri", uri, "--storage", str(tmp_path / "results"), "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _check_complete(tmp_path, uri, "killed", before)
    assert _cache_files(tmp_path) == cache  # the pretrained model came from the cache, not trained again


def _cache_files(tmp: Path) -> dict[str, int]:
    """Every file of the pretraining cache with its modification time (a retrain rewrites them)."""
    root = tmp / "results" / "_pretrain_cache"
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts}


def test_sigint_stops_cleanly_then_resume(tmp_path):
    uri = sqlite_uri(tmp_path)
    proc = _start(tmp_path, write_spec(tmp_path, _spec("stopped")), uri)
    try:
        # a trial two epochs from its end when Ctrl-C lands is still in flight when Tune stops
        _interrupt_when(uri, "stopped", proc, signal.SIGINT, finished=2, running=1, epochs_to_go=2)
        assert proc.wait(timeout=120) == 130
    finally:
        _stop_session(proc)
    log = (tmp_path / "driver.log").read_text()
    assert "fairsweep resume stopped" in log
    counts = _trial_counts(uri, "stopped")
    assert counts.get("RUNNING", 0) == 0 and counts.get("KILLED", 0) >= 1
    before = _finished_histories(uri, "stopped")
    status = run_cli("status", "stopped", "--storage", str(tmp_path / "results"), cwd=tmp_path, timeout=120)
    assert "continue it with: fairsweep resume stopped" in status.stdout

    out = run_cli("resume", "stopped", "--storage", str(tmp_path / "results"), "--quiet", cwd=tmp_path)  # URI from the record
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _check_complete(tmp_path, uri, "stopped", before)


def test_resume_of_unknown_sweep_is_a_clear_error(tmp_path):
    out = run_cli("resume", "nosuch", "--storage", str(tmp_path / "results"), cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert "no fairsweep sweep at" in out.stderr and "nosuch" in out.stderr


def test_optuna_search_survives_sigkill_with_exactly_budget_trials(tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    spec = tiny_spec(**{"name": "study", "finetune.epochs": EPOCHS, "resources.max_concurrent_trials": 2,
                        "axes.intervention": {"kind": "correlation", "magnitudes": {"low": 0.5, "high": 0.95}},
                        "search": {"type": "optuna", "sampler": "tpe", "budget": 6, "seed": 0}})
    uri = sqlite_uri(tmp_path)
    proc = _start(tmp_path, write_spec(tmp_path, spec), uri)
    try:
        at_kill = _interrupt_when(uri, "study", proc, signal.SIGKILL, finished=2, running=1, epochs_to_go=0)
    finally:
        _stop_session(proc)
    in_flight = set(at_kill.loc[at_kill["status"] == "RUNNING", "run_id"])
    before = _finished_histories(uri, "study")
    out = run_cli("resume", "study", "--storage", str(tmp_path / "results"), "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "6 trials finished, 0 failed" in out.stdout, [line for line in out.stdout.splitlines() if "finished" in line]

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["study"])
    trials = runs[runs["tags.fairsweep.kind"] == "trial"]
    finished = trials[trials["status"] == "FINISHED"]
    assert len(finished) == 6 and finished["tags.fairsweep.trial_key"].nunique() == 6
    assert (runs["status"] != "RUNNING").all()
    parent = runs[runs["tags.fairsweep.kind"] == "sweep"].iloc[0]
    assert parent["params.search.sampler"] == "tpe" and parent["tags.fairsweep.study_name"] == "study"
    client = MlflowClient(uri)
    for run_id, n in before.items():
        assert len(client.get_metric_history(run_id, "train_loss")) == n == EPOCHS
    # the same study continued: its completed trials are exactly the six finished runs
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "results" / "study" / "optuna_study.journal")))
    study = optuna.load_study(study_name="study", storage=storage)
    complete = [t for t in study.trials if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    assert sorted(t.user_attrs["trial_key"] for t in complete) == sorted(finished["tags.fairsweep.trial_key"])
    # Each run in flight at the kill either continued to the end, or (started after Tune's last state save,
    # so never resumed: an orphan) was closed with the reason. Which happens depends on when Tune last
    # saved, so both outcomes are allowed; a KILLED run without its reason never is.
    after = trials.set_index("run_id")
    assert in_flight and in_flight <= set(after.index)
    assert set(after.loc[sorted(in_flight), "status"]) <= {"FINISHED", "KILLED"}
    killed = trials[trials["status"] == "KILLED"]
    assert set(killed["run_id"]) <= in_flight  # only runs of the killed driver can be orphans
    assert _tag(killed, "fairsweep.error").str.contains("never resumed").all(), _tag(killed, "fairsweep.error")
    # the query commands work on an optuna sweep as on a grid
    front = run_cli("pareto", "study", "--tracking-uri", uri, "--format", "json", cwd=tmp_path, timeout=120)
    assert front.returncode == 0, front.stderr
    records = json.loads(front.stdout)
    assert records and {r["trial_key"] for r in records} <= set(finished["tags.fairsweep.trial_key"])
    best = run_cli("best", "study", "--tracking-uri", uri, "--max-drop", "0.05", "--format", "json", cwd=tmp_path,
                   timeout=120)
    assert best.returncode == 0 and json.loads(best.stdout)[0]["run_id"] in set(finished["run_id"])
