"""What launch, resume and the Python API refuse before Ray starts or anything is written, and the paths they
make absolute; no Ray here (each refusal happens before `ray.init`)."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import api
from orchestrator.launch import LaunchError, LaunchOptions, _cache_root, launch, resume
from orchestrator.plan import build_plan
from orchestrator.spec import SpecError, parse_spec
from orchestrator.storage import experiment_path, write_sweep_record
from orchestrator.store import StoreError
from tests.helpers import sqlite_uri, tiny_spec


def test_a_relative_cache_dir_is_made_absolute_against_the_launch_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _cache_root("cache") == str(tmp_path / "cache")
    assert _cache_root("../cache", base=str(tmp_path / "a")) == str(tmp_path / "cache")  # a resume: the launch's cwd
    assert _cache_root(str(tmp_path / "abs")) == str(tmp_path / "abs")
    assert _cache_root("~/c") == os.path.expanduser("~/c")
    assert _cache_root(None) is None and _cache_root("") is None


@pytest.mark.parametrize("cap", [0, -1, 1.5, True])
def test_launch_refuses_a_concurrency_cap_below_one(tmp_path, cap):
    plan = build_plan(parse_spec(tiny_spec(name="capped")))
    with pytest.raises(LaunchError, match=r"--max-concurrent .*at least 1"):
        launch(plan, LaunchOptions(storage=str(tmp_path / "results"), tracking_uri=sqlite_uri(tmp_path),
                                   max_concurrent_trials=cap))
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()


def test_resume_of_a_grid_sweep_refuses_a_new_concurrency_cap(tmp_path):
    storage = tmp_path / "results"
    path = experiment_path(str(storage), "g")
    write_sweep_record(path, {"spec": tiny_spec(name="g"), "tracking_uri": sqlite_uri(tmp_path), "cache_root": "cache",
                              "cwd": str(tmp_path)})
    (tmp_path / "results" / "g" / "tuner.pkl").write_bytes(b"")  # what Tune.can_restore looks for: a state to restore
    with pytest.raises(LaunchError, match="a grid sweep keeps the cap it was launched with"):
        resume("g", LaunchOptions(storage=str(storage), max_concurrent_trials=2))
    with pytest.raises(LaunchError, match="at least 1"):
        resume("g", LaunchOptions(storage=str(storage), max_concurrent_trials=0))


def test_a_deleted_mlflow_experiment_is_refused_naming_how_to_restore_it(tmp_path):
    uri = sqlite_uri(tmp_path)
    client = MlflowClient(uri)
    exp_id = client.create_experiment("trashed")
    client.delete_experiment(exp_id)
    plan = build_plan(parse_spec(tiny_spec(name="trashed")))
    with pytest.raises(LaunchError, match=rf"experiment 'trashed' \(id {exp_id}\) .* is deleted; restore it "
                                          rf"\(`mlflow experiments restore --experiment-id {exp_id}`"):
        launch(plan, LaunchOptions(storage=str(tmp_path / "results"), tracking_uri=uri))
    assert not (tmp_path / "results").exists()  # refused before the sweep's folder was made


def test_the_api_refuses_a_spec_changed_after_parsing_since_resume_would_run_its_source(tmp_path):
    spec = parse_spec(tiny_spec(name="api"))
    assert api.load(spec) is spec
    with pytest.raises(SpecError, match="recorded for resume as its source mapping, and it parses to a different"):
        api.load(replace(spec, axes=replace(spec.axes, seed=(7, 8, 9))))
    with pytest.raises(SpecError, match="it does not parse"):
        api.load(replace(spec, source={}))


def test_a_yaml_number_as_a_name_says_to_quote_it():
    with pytest.raises(SpecError, match=r'name: got 2024; expected a name, got a int: quote it in the sweep file '
                                        r'\(e.g. name: "2024"\)'):
        parse_spec(tiny_spec(name=2024))


def test_an_infeasible_magnitude_range_under_optuna_is_a_field_error():
    """The whole finetuning pool (600, half of it conflicting) at correlation 1.0 cannot be drawn: the grid's
    field error, not a TypeError on the range."""
    spec = tiny_spec(**{"search": {"type": "optuna", "budget": 2},
                        "axes.intervention": {"kind": "correlation", "magnitudes": {"low": 0.5, "high": 1.0}},
                        "finetune.size": 600})
    with pytest.raises(SpecError, match=r"axes\.intervention\[0\]\.magnitudes: got \[0\.5, 1\.0\]"):
        build_plan(parse_spec(spec))


@pytest.mark.slow
def test_a_launch_stopped_before_tunes_first_state_save_resumes_from_its_record(tmp_path):
    """The state a launch leaves when it stops between opening its MLflow parent run and Tune's first state
    save (Ctrl-C as the trials start, a store error): `launch` refuses (the parent run exists) and points to
    `resume`, which starts the sweep again from its record and continues that parent run."""
    from orchestrator.store import check_store
    from orchestrator.tracking import SweepTracker
    from tests.helpers import run_cli, write_spec

    spec = tiny_spec(**{"name": "restart", "axes.paradigm": ["scratch"], "axes.freeze_depth": ["linear"]})  # 2 trials
    uri, storage = sqlite_uri(tmp_path), tmp_path / "results"
    plan = build_plan(parse_spec(spec))
    check_store(uri, create=True)
    tracker = SweepTracker(plan, uri)
    parent = tracker.open()  # what the stopped launch had done ...
    tracker.close("KILLED")
    write_sweep_record(experiment_path(str(storage.resolve()), "restart"),  # ... and its record, no Tune state
                       {"spec": spec, "tracking_uri": uri, "cache_root": str(tmp_path / "cache"), "cwd": str(tmp_path)})

    refused = run_cli("launch", str(write_spec(tmp_path, spec)), "--tracking-uri", uri, "--storage", str(storage),
                      "--quiet", cwd=tmp_path, timeout=300)
    assert refused.returncode == 2 and "fairsweep resume restart --storage" in refused.stderr, refused.stderr
    resumed = run_cli("resume", "restart", "--storage", str(storage), "--quiet", cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("restart").experiment_id])
    trials = [r for r in runs if r.data.tags.get("fairsweep.kind") == "trial"]
    assert sorted(r.info.status for r in trials) == ["FINISHED", "FINISHED"]
    assert {r.data.tags.get("mlflow.parentRunId") for r in trials} == {parent}  # the same parent run, continued
    assert MlflowClient(uri).get_run(parent).info.status == "FINISHED"


@pytest.mark.parametrize("objectives, field, says", [
    ({"performance": "accuracy", "fairness": "worst_group_accuracy"}, "fairness", "the fairness objective is minimised"),
    ({"performance": "accuracy_gap", "fairness": "equalized_odds_difference"}, "performance",
     "the performance objective is maximised")])
def test_an_objective_against_its_direction_is_refused_at_plan_time(objectives, field, says):
    """The front, the search and the queries read performance as maximised and fairness as minimised (the spec's
    documented meaning): a metric of the other direction is a field error, not a front read backwards."""
    with pytest.raises(SpecError, match=rf"objectives\.{field}: got '{objectives[field]}'; .*{says}"):
        build_plan(parse_spec(tiny_spec(objectives=objectives)))


def test_the_apis_result_of_a_sweep_whose_trials_logged_no_fairness_value_has_an_empty_front(tmp_path):
    """A finished sweep whose trials all lack the fairness objective (e.g. a ratio infinite everywhere, left out
    of MLflow) still returns its result (parent run, trials) instead of raising after the sweep ran."""
    import pandas as pd

    from orchestrator.launch import LaunchResult
    from orchestrator.mlflow_runs import TAGS
    from orchestrator.store import check_store
    from orchestrator.tracking import SweepTracker

    uri = sqlite_uri(tmp_path)
    plan = build_plan(parse_spec(tiny_spec(name="nofair")))
    check_store(uri, create=True)
    tracker = SweepTracker(plan, uri)
    parent = tracker.open()
    client = MlflowClient(uri)
    run = client.create_run(tracker.experiment_id, tags={TAGS.SWEEP: "nofair", TAGS.KIND: "trial", TAGS.TRIAL_KEY: "t",
                                                         TAGS.CONFIG_KEY: "c", TAGS.PARENT: parent})
    client.log_metric(run.info.run_id, "accuracy", 0.9)
    client.set_terminated(run.info.run_id)
    result = api._result(LaunchResult(plan, str(tmp_path), uri, parent, pd.DataFrame(), finished=1))
    assert result.parent_run_id == parent and len(result.trials) == 1 and result.front.empty


def test_resume_refuses_a_dataset_other_than_the_one_the_sweep_was_launched_on(tmp_path):
    """Trials and bases are keyed by the dataset's fingerprint (for image folders: the files' sizes and times):
    resumed over other data, every trial would run again under new keys beside the old ones."""
    storage = tmp_path / "results"
    spec = tiny_spec(name="moved")
    launched = build_plan(parse_spec(spec)).dataset_fingerprint
    record = {"spec": spec, "tracking_uri": sqlite_uri(tmp_path), "cache_root": "cache", "cwd": str(tmp_path)}
    write_sweep_record(experiment_path(str(storage), "moved"), {**record, "dataset_fingerprint": "other-data"})
    with pytest.raises(LaunchError, match=r"not the one it was launched on \(fingerprint other-data then, .* now\)"):
        resume("moved", LaunchOptions(storage=str(storage)))
    write_sweep_record(experiment_path(str(storage), "moved"), {**record, "dataset_fingerprint": launched})
    with pytest.raises(StoreError, match="no MLflow database"):  # the same data passes, up to the missing store
        resume("moved", LaunchOptions(storage=str(storage)))


@pytest.mark.parametrize("search, unfinished, ended, finished, failed, interrupted", [
    ("grid", 0, None, 16, 0, False),           # every trial finished
    ("grid", 0, None, 14, 2, False),           # ... or failed: resume --retry-errored reruns those
    ("grid", 0, None, 15, 0, True),            # stopped between trials
    ("grid", 1, None, 16, 0, True),            # Tune still held one to run (MLflow's count was ahead)
    ("optuna", 0, "budget reached", 6, 0, False),
    ("optuna", 0, "10 trials failed", 2, 3, False),  # the study counted trials without objectives as failed
    ("optuna", 1, "10 trials failed", 2, 10, True),  # Ctrl-C while the trials in flight at that end still ran
    ("optuna", 0, None, 2, 0, True),           # stopped between trials
    ("optuna", 0, None, 6, 0, False),          # a study from before reasons were kept: the counts decide
    ("optuna", 0, None, 2, 10, False),
])
def test_a_sweep_is_interrupted_when_tune_or_the_counts_say_work_is_left(search, unfinished, ended, finished, failed,
                                                                         interrupted):
    from orchestrator.launch import sweep_interrupted

    spec = parse_spec(tiny_spec(**{"axes.seed": [0, 1], "search": {"type": search, "budget": 6}} if search == "optuna"
                                else {"axes.seed": [0, 1]}))  # 16 cells; an optuna budget of 6
    assert sweep_interrupted(spec, unfinished=unfinished, search_ended=ended, finished=finished,
                             failed=failed) is interrupted
