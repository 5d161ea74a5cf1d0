"""The driver-side tracker against a real SQLite store: what resume may skip, what a new launch may adopt."""
from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator.launch import LaunchError, _refuse_tracked_sweep
from orchestrator.plan import build_plan
from orchestrator.spec import parse_spec
from orchestrator.storage import artifact_location
from orchestrator.tracking import SweepTracker
from tests.helpers import REPO, run_cli, sqlite_uri, tiny_spec, write_spec


def _finish_one_trial(plan, uri: str) -> dict:
    tracker = SweepTracker(plan, uri, artifact_location=artifact_location(uri))  # beside the store, never ./mlruns
    tracker.open()
    planned = plan.trials[0]
    run_id = tracker._create_trial_run(planned, "trial_0")
    tracker.client.log_metric(run_id, "accuracy", 0.75)
    tracker.client.log_metric(run_id, "equalized_odds_difference", 0.125)
    tracker.client.set_terminated(run_id, "FINISHED")
    tracker.close()
    return planned.config


def test_finished_trials_only_count_runs_of_this_plans_trial_keys(tmp_path):
    uri = sqlite_uri(tmp_path)
    plan = build_plan(parse_spec(tiny_spec()))
    config = _finish_one_trial(plan, uri)
    same = SweepTracker(plan, uri)
    same.open()
    assert same.finished_trials() == [(config, {"accuracy": 0.75, "equalized_odds_difference": 0.125})]
    # same axis values, other finetuning settings: another trial key, so nothing may be skipped
    changed = build_plan(parse_spec(tiny_spec(**{"finetune.lr": 0.05})))
    assert changed.trials[0].point == config.point and changed.trials[0].key != plan.trials[0].key
    other = SweepTracker(changed, uri)
    other.open()
    assert other.finished_trials() == []


def test_a_finished_trials_infinite_objective_reaches_the_search_again_on_resume(tmp_path):
    """MLflow cannot hold +inf (a ratio against a zero rate): the run's tag names it, and a resume tells the
    search so, instead of a result without the objective, which the study would count as a failure."""
    from orchestrator.mlflow_runs import TAGS
    from orchestrator.search import search_values

    uri = sqlite_uri(tmp_path)
    plan = build_plan(parse_spec(tiny_spec(**{"objectives.fairness": "fpr_ratio_deviation"})))
    tracker = SweepTracker(plan, uri, artifact_location=artifact_location(uri))
    tracker.open()
    run_id = tracker._create_trial_run(plan.trials[0], "trial_0")
    tracker.client.log_metric(run_id, "val_accuracy", 0.75)
    tracker.client.set_tag(run_id, TAGS.INFINITE_METRICS, "fpr_ratio_deviation,val_fpr_ratio_deviation,other")
    tracker.client.set_terminated(run_id, "FINISHED")
    resumed = SweepTracker(plan, uri)
    resumed.open()
    [(_, told)] = resumed.finished_trials()
    assert told == {"val_accuracy": 0.75, "infinite_metrics": "fpr_ratio_deviation,val_fpr_ratio_deviation"}
    assert search_values(plan.spec.objectives, told) == [0.75, float("inf")]


def test_a_new_launch_refuses_a_sweep_mlflow_already_holds(tmp_path):
    uri = sqlite_uri(tmp_path)
    spec = tiny_spec()
    plan = build_plan(parse_spec(spec))
    _refuse_tracked_sweep(plan.spec, uri, str(tmp_path / "results"))  # no store yet: fine, and none created
    assert not (tmp_path / "mlflow.db").exists()
    _finish_one_trial(plan, uri)
    with pytest.raises(LaunchError, match=r"already has a parent run .*`fairsweep resume tiny --storage DIR`"):
        _refuse_tracked_sweep(plan.spec, uri, str(tmp_path / "results"))
    renamed = build_plan(parse_spec(tiny_spec(name="tiny2")))
    _refuse_tracked_sweep(renamed.spec, uri, str(tmp_path / "results"))  # another name is another sweep

    # the real command: exit 2, nothing new in MLflow, no sweep folder written
    before = len(MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("tiny").experiment_id]))
    out = run_cli("launch", str(write_spec(tmp_path, spec)), "--tracking-uri", uri, "--storage",
                  str(tmp_path / "fresh_results"), cwd=tmp_path, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "already has a parent run" in out.stderr
    mlflow.set_tracking_uri(uri)
    assert len(mlflow.search_runs(experiment_names=["tiny"])) == before
    assert not (tmp_path / "fresh_results").exists()


def test_driver_alive_tells_a_live_driver_from_a_dead_one():
    import socket
    import subprocess
    import sys

    from orchestrator.tracking import driver_alive, driver_id

    assert driver_alive(driver_id()) is True
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert driver_alive(f"{socket.gethostname()}:{done.stdout.strip()}") is False  # exited and reaped
    assert driver_alive("another-host:1") is None and driver_alive(None) is None and driver_alive("garbage") is None


def test_the_front_models_flavour_loads_without_lightning_and_leaves_it_importable():
    """``log_front_models`` imports mlflow.pytorch without pytorch_lightning (2.7 s); the block is only for that
    import: mlflow's Lightning autologging module still imports afterwards, for whoever asks."""
    code = ("import sys\nfrom orchestrator.tracking import _import_mlflow_pytorch\n"
            "m = _import_mlflow_pytorch()\n"
            "print(callable(m.save_model), 'pytorch_lightning' in sys.modules,"
            " 'mlflow.pytorch._lightning_autolog' in sys.modules)\n"
            "import mlflow.pytorch._lightning_autolog\nprint('pytorch_lightning' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False", "False", "True"]


def test_progress_lines_name_the_best_validation_objectives_so_far():
    """The progress line carries what Tune's per-trial tables (now only with --verbose) were read for: the
    best validation objectives of the finished trials, each in its own direction, signed ones nearest 0."""
    tracker = SweepTracker(build_plan(parse_spec(tiny_spec())), "sqlite:///unused.db")
    assert tracker._val_summary() == ""  # nothing finished: nothing claimed
    tracker._remember_val_objectives({"val_accuracy": 0.7, "val_equalized_odds_difference": 0.05})
    tracker._remember_val_objectives({"val_accuracy": 0.9, "val_equalized_odds_difference": 0.3})
    tracker._remember_val_objectives({"val_accuracy": float("nan"), "val_equalized_odds_difference": 0.0})
    assert tracker._val_summary() == " best so far: val_accuracy 0.900, val_equalized_odds_difference 0.050;"
    # a resumed sweep's trials that finished under an earlier driver count too (what finished_trials reads)
    tracker.remember_finished([(tracker.plan.trials[0].config, {"accuracy": 0.99, "val_accuracy": 0.95,
                                                                "val_equalized_odds_difference": 0.04})])
    assert tracker._val_summary() == " best so far: val_accuracy 0.950, val_equalized_odds_difference 0.040;"
    signed = SweepTracker(build_plan(parse_spec(tiny_spec(**{"objectives.fairness": "tpr_difference"}))),
                          "sqlite:///unused.db")
    for value in (-0.4, 0.1, -0.05):
        signed._remember_val_objectives({"val_accuracy": 0.8, "val_tpr_difference": value})
    assert signed._val_summary() == " best so far: val_accuracy 0.800, val_tpr_difference -0.050;"


def test_tune_tables_only_with_verbose_and_progress_lines_unless_quiet():
    from orchestrator.api import launch_options

    default, quiet, verbose = launch_options(), launch_options(quiet=True), launch_options(verbose=True)
    assert (default.verbose, quiet.verbose, verbose.verbose) == (0, 0, 1)
    assert default.progress is not None and quiet.progress is None
    assert not default.trial_output and verbose.trial_output


def test_tunes_console_reporter_is_the_silent_one_only_for_a_quiet_fit(monkeypatch):
    """At verbosity 0 the fit runs under Tune's older console reporter (the newer one prints a configuration table
    and a TensorBoard hint whatever the verbosity); the process's own setting is back afterwards."""
    import os

    from orchestrator.launch import _tune_console

    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    with _tune_console(0):
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ
    with _tune_console(1):
        assert "RAY_AIR_NEW_OUTPUT" not in os.environ
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    with _tune_console(0):
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"


def test_a_repeated_library_warning_is_passed_once(caplog):
    import logging

    from orchestrator.tracking import _OnlyOnce

    logger, once = logging.getLogger("fairsweep.test.once"), _OnlyOnce()
    logger.addFilter(once)
    try:
        for message in ("pickle", "pickle", "other", "pickle"):
            logger.warning(message)
    finally:
        logger.removeFilter(once)
    logger.warning("pickle")  # the filter is gone: passes again
    assert [r.getMessage() for r in caplog.records] == ["pickle", "other", "pickle"]


def test_time_left_follows_the_pace_of_endings_not_the_start_up_before_them():
    from orchestrator.tracking import _time_left

    # 30 s of start-up, then a trial ends every 2 s: 10 left take 20 s, whatever the start-up cost
    assert _time_left([30.0, 32.0, 34.0, 36.0], 10) == pytest.approx(20.0)
    assert _time_left([30.0], 10) is None and _time_left([], 5) is None  # no pace yet
    assert _time_left([30.0, 30.0], 4) is None  # two at once: no pace either
    assert _time_left([30.0, 32.0], 0) is None  # nothing left


def test_the_progress_line_counts_the_trial_that_just_ended_as_ended():
    """Tune calls the tracker back before it marks the trial that just ended: it is not still running."""
    from types import SimpleNamespace

    lines: list[str] = []
    tracker = SweepTracker(build_plan(parse_spec(tiny_spec())), "sqlite:///unused.db", progress=lines.append)
    trials = [SimpleNamespace(status="RUNNING"), SimpleNamespace(status="RUNNING"), SimpleNamespace(status="TERMINATED")]
    tracker._report_progress(trials, just_ended=(trials[0], "TERMINATED"))
    assert lines and lines[0].startswith("trials: 2/8 finished, 1 running, 0 failed;"), lines


def _base_report(outcome) -> dict:
    """What a trial's report says of its base (trainables/finetune.py's PRETRAIN_OUTCOME)."""
    import json
    from dataclasses import asdict

    from trainables.finetune import PRETRAIN_OUTCOME

    return {PRETRAIN_OUTCOME: json.dumps(asdict(outcome))}


def test_the_first_report_naming_a_base_logs_its_pretraining_run_once(tmp_path):
    """Trials build their bases and say how in their reports; the driver logs one pretraining run per key. A trial
    that only waited for another one's build (the entry found, but built in this driver's run) logs it as built."""
    from trainables.pretrain import PretrainOutcome

    uri = sqlite_uri(tmp_path)
    plan = build_plan(parse_spec(tiny_spec(**{"axes.paradigm": ["supervised", "biased"]})))
    said: list[str] = []
    tracker = SweepTracker(plan, uri, artifact_location=artifact_location(uri), progress=said.append)
    tracker.open()
    sup, biased = plan.pretrain_jobs
    meta = {"seconds": 3.0, "losses": [0.5, 0.25], "device": "cpu", "precision": "fp32"}

    def report(job, *, built_in_run: str) -> dict:
        return _base_report(PretrainOutcome(job.key, f"/cache/{job.key}", True, False, (0.5, 0.25), 0.0, "cpu",
                                            {**meta, "built_in_run": built_in_run}))

    first = tracker._note_pretraining(report(sup, built_in_run=tracker.driver_run))  # a waiter reported first
    assert tracker._note_pretraining(report(sup, built_in_run=tracker.driver_run)) == first  # the builder: no new run
    found = tracker._note_pretraining(report(biased, built_in_run="an-earlier-run"))  # built by an earlier run
    assert tracker._note_pretraining({}) is None  # a trial from scratch names no base
    client = MlflowClient(uri)
    runs = client.search_runs([tracker.experiment_id], "tags.`fairsweep.kind` = 'pretrain'")
    assert sorted(r.info.run_id for r in runs) == sorted([first, found])
    built, reused = client.get_run(first), client.get_run(found)
    assert built.data.tags["fairsweep.reused_cache"] == "false" and built.data.metrics["seconds"] == 3.0
    assert [m.value for m in client.get_metric_history(first, "loss")] == [0.5, 0.25]
    assert reused.data.tags["fairsweep.reused_cache"] == "true"
    assert said == ["pretraining 1/2 done: test_resnet/supervised (2 epochs, last loss 0.2500, 3 s)",
                    "pretraining 2/2 done: test_resnet/biased (from the cache, 0 s)"]


def test_a_search_counts_its_bases_as_up_to_the_plans_since_it_may_never_pick_some(tmp_path):
    from trainables.pretrain import PretrainOutcome

    uri = sqlite_uri(tmp_path)
    spec = tiny_spec(**{"axes.paradigm": ["supervised", "biased"], "axes.seed": [0, 1, 2]})
    spec["search"] = {"type": "optuna", "sampler": "tpe", "budget": 2, "seed": 0}
    plan = build_plan(parse_spec(spec))
    said: list[str] = []
    tracker = SweepTracker(plan, uri, artifact_location=artifact_location(uri), progress=said.append)
    tracker.open()
    tracker.announce_pretraining()
    job = plan.pretrain_jobs[1]
    tracker._note_pretraining(_base_report(PretrainOutcome(job.key, f"/cache/{job.key}", False, False, (0.5,), 2.0,
                                                           "cpu", {"seconds": 2.0})))
    assert said == ["pretraining: up to 2 job(s), each when the search first picks its base "
                    "(test_resnet/supervised, test_resnet/biased)",
                    "pretraining 1 of up to 2 done: test_resnet/biased (1 epochs, last loss 0.5000, 2 s)"]


class _Trial:
    """What the tracker reads of a Tune trial: its id and config."""

    def __init__(self, trial_id: str, planned) -> None:
        self.trial_id, self.config = trial_id, {"trial": planned.config.to_dict()}


def test_a_base_that_failed_to_build_is_one_failed_pretraining_run_named_by_its_trials(tmp_path):
    from trainables.pretrain_cache import PretrainCache

    uri = sqlite_uri(tmp_path)
    plan = build_plan(parse_spec(tiny_spec(**{"axes.seed": [0, 1], "axes.freeze_depth": [0]})))
    tracker = SweepTracker(plan, uri, artifact_location=artifact_location(uri), cache_root=str(tmp_path / "cache"))
    tracker.open()
    (job,) = plan.pretrain_jobs
    sup = [t for t in plan.trials if t.config.weights.key == job.key]
    scratch = next(t for t in plan.trials if t.config.weights.key is None)
    error = ("Traceback ...\ntrainables.pretrain.PretrainingFailedError: pretraining test_resnet/supervised (key "
             f"{job.key}) failed: NonFiniteLossError: loss became nan")
    said = [tracker._note_pretraining_failure(_Trial(f"t{i}", t), error) for i, t in enumerate(sup)]
    client = MlflowClient(uri)
    (failed,) = client.search_runs([tracker.experiment_id], "tags.`fairsweep.kind` = 'pretrain'")
    assert failed.info.status == "FAILED" and "loss became nan" in failed.data.tags["fairsweep.error"]
    for text in said:  # each trial's error: the build's error, the failed run, and how to retry
        assert text.startswith(error) and f"(MLflow run {failed.info.run_id})" in text
        assert "`fairsweep resume tiny --retry-errored`" in text
    assert tracker._note_pretraining_failure(_Trial("s", scratch), "OOM") == "OOM"  # no base: unchanged

    # a trial that failed after its base was built, before any report: the base's run is logged from the cache
    # and the trial names it
    meta = {"losses": [0.5], "seconds": 2.0, "device": "cpu", "built_in_run": tracker.driver_run}
    PretrainCache(tmp_path / "cache").write(job.key, {"w": torch.zeros(1)}, meta)
    trial = _Trial("t9", sup[0])
    assert tracker._note_pretraining_failure(trial, "CUDA out of memory") == "CUDA out of memory"
    built = client.search_runs([tracker.experiment_id], "tags.`fairsweep.kind` = 'pretrain' and attributes.status = 'FINISHED'")
    assert len(built) == 1 and built[0].data.tags["fairsweep.reused_cache"] == "false"
    assert client.get_run(tracker._trial_run(trial)).data.tags["fairsweep.pretrain_run_id"] == built[0].info.run_id
