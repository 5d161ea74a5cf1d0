"""The real thing: `fairsweep launch` as a subprocess, local Ray, a temporary SQLite MLflow store."""
from __future__ import annotations

import math
import re

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import run_cli, sqlite_uri, tiny_spec, write_spec

pytestmark = pytest.mark.slow

METRICS = ["accuracy", "balanced_accuracy", "auroc", "worst_group_accuracy", "accuracy_gap",
           "demographic_parity_difference", "equalized_odds_difference", "equal_opportunity_difference"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch")
    spec = write_spec(tmp, tiny_spec())
    uri = sqlite_uri(tmp)
    out = run_cli("launch", str(spec), "--tracking-uri", uri, "--storage", str(tmp / "results"), cwd=tmp)  # not --quiet
    return tmp, uri, out


def test_long_phases_print_progress_lines(launched):
    """Without --quiet the driver says what it is doing: each pretraining job as it ends, then the sweep's
    counts, front size and time left every few seconds (plain lines, also when not on a terminal)."""
    _, _, out = launched
    lines = [line for line in out.stderr.splitlines() if line.startswith("[fairsweep] ")]
    assert "[fairsweep] pretraining: 1 job(s) (test_resnet/supervised)" in lines
    assert any(line.startswith("[fairsweep] pretraining 1/1 done: test_resnet/supervised (1 epochs, last loss ")
               for line in lines), lines
    trial_lines = [line for line in lines if line.startswith("[fairsweep] trials: ")]
    assert trial_lines and "/8 finished" in trial_lines[0] and "Pareto front:" in trial_lines[0], lines
    # once a trial has finished, the lines name the best objectives on validation (what choices are made on)
    assert any(re.search(r"; best so far: val_accuracy [01]\.\d{3}, val_equalized_odds_difference [01]\.\d{3};", line)
               for line in trial_lines), trial_lines
    # Tune's tables (a configuration and a result table per trial) only with --verbose
    assert "started with configuration" not in out.stdout and "Trial status:" not in out.stdout
    assert "Configuration for experiment" not in out.stdout and "TensorBoard" not in out.stdout
    assert "Tune results (checkpoints, experiment state): " in out.stdout


def test_launch_exits_cleanly_and_prints_the_front(launched):
    tmp, uri, out = launched
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "8 trials finished, 0 failed" in out.stdout
    assert "Pareto front" in out.stdout and f"mlflow ui --backend-store-uri {uri}" in out.stdout
    # the printed table holds exactly the front MLflow records: a header, then one line per configuration
    lines = out.stdout.split("configurations on the Pareto front", 1)[1].splitlines()[1:]
    table = lines[:next(i for i, line in enumerate(lines) if not line.strip())]
    front = pd.read_csv(MlflowClient(uri).download_artifacts(_parent_id(uri), "pareto/front.csv", str(tmp)))
    assert table[0].split()[:2] == ["backbone", "paradigm"] and len(table) - 1 == len(front) >= 1
    for row, (_, want) in zip(table[1:], front.iterrows()):  # both in the order the front was computed
        assert row.split()[1] == want["paradigm"] and f"{want['accuracy']:.4f}" in row


def test_mlflow_holds_parent_children_params_metrics_tags(launched):
    tmp, uri, _ = launched
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tiny"])
    parent = runs[runs["tags.fairsweep.kind"] == "sweep"]
    trials = runs[runs["tags.fairsweep.kind"] == "trial"]
    pretrain = runs[runs["tags.fairsweep.kind"] == "pretrain"]
    assert len(parent) == 1 and len(trials) == 8 and len(pretrain) == 1
    parent_id = parent["run_id"].iloc[0]
    assert (trials["tags.mlflow.parentRunId"] == parent_id).all()
    assert (trials["status"] == "FINISHED").all() and (parent["status"] == "FINISHED").all()
    assert trials["tags.fairsweep.trial_key"].nunique() == 8
    assert (trials["tags.fairsweep.sweep"] == "tiny").all()
    assert set(trials["params.paradigm"]) == {"scratch", "supervised"}
    assert set(trials["params.intervention.kind"]) == {"correlation"}
    assert set(trials["params.intervention.magnitude"].astype(float)) == {0.5, 0.9}
    assert set(trials["params.freeze_depth"]) == {"0", "linear"}
    assert set(trials["params.seed"]) == {"0"} and set(trials["params.backbone"]) == {"test_resnet"}
    for m in METRICS:
        values = trials[f"metrics.{m}"]
        assert values.notna().all(), m
        assert ((values >= 0) & (values <= 1)).all(), m
    # every supervised trial names the pretraining run it used
    sup = trials[trials["params.paradigm"] == "supervised"]
    assert (sup["tags.fairsweep.pretrain_run_id"] == pretrain["run_id"].iloc[0]).all()
    assert (sup["tags.fairsweep.pretrain_key"] == pretrain["tags.fairsweep.pretrain_key"].iloc[0]).all()
    # the pretraining run holds its loss curve: one finite value per pretraining epoch
    curve = MlflowClient(uri).get_metric_history(pretrain["run_id"].iloc[0], "loss")
    assert sorted(m.step for m in curve) == list(range(1, tiny_spec()["pretraining"]["epochs"] + 1))
    assert all(math.isfinite(m.value) and m.value > 0 and m.timestamp > 0 for m in curve)
    # achieved intervention values sit beside the requested ones
    assert np.allclose(trials["metrics.achieved_magnitude"], trials["params.intervention.magnitude"].astype(float), atol=0.01)


def test_predictions_artifact_recomputes_the_logged_metrics(launched):
    tmp, uri, _ = launched
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    trials = mlflow.search_runs(experiment_names=["tiny"], filter_string="tags.`fairsweep.kind` = 'trial'")
    row = trials.iloc[0]
    path = client.download_artifacts(row["run_id"], "predictions.csv.gz", str(tmp))
    preds = pd.read_csv(path)
    assert list(preds.columns[:4]) == ["y_true", "y_score", "y_pred", "group"]
    assert len(preds) == 400
    acc = float((preds["y_true"] == preds["y_pred"]).mean())
    assert math.isclose(acc, row["metrics.accuracy"], abs_tol=1e-9)
    per_group = pd.read_csv(client.download_artifacts(row["run_id"], "per_group.csv", str(tmp)))
    assert per_group["n"].sum() == 400


def test_pareto_front_tags_and_artifacts(launched):
    tmp, uri, _ = launched
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tiny"])
    trials = runs[runs["tags.fairsweep.kind"] == "trial"]
    pts = trials[["metrics.accuracy", "metrics.equalized_odds_difference"]].to_numpy()
    # brute force: a trial is on the front iff no other trial is at least as good on both and better on one
    expected = [not any((q[0] >= p[0] and q[1] <= p[1]) and (q[0] > p[0] or q[1] < p[1]) for q in pts) for p in pts]
    assert list(trials["tags.fairsweep.pareto_front"] == "true") == expected
    parent_id = runs[runs["tags.fairsweep.kind"] == "sweep"]["run_id"].iloc[0]
    names = {a.path for a in client.list_artifacts(parent_id, "pareto")}
    assert {"pareto/front.csv", "pareto/front.png"} <= names
    front = pd.read_csv(client.download_artifacts(parent_id, "pareto/front.csv", str(tmp)))
    assert len(front) == sum(expected)
    assert {"spec.yaml"} <= {a.path for a in client.list_artifacts(parent_id)}


def test_report_writes_figures_and_summary_and_logs_them(launched):
    tmp, uri, _ = launched
    out = run_cli("report", "tiny", "--out", str(tmp / "report"), "--tracking-uri", uri, cwd=tmp, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    names = {"pareto.png", "vs_intervention_magnitude.png", "vs_freeze_depth.png", "front_group_accuracy.png", "summary.md"}
    assert names <= {p.name for p in (tmp / "report").iterdir()}
    assert all((tmp / "report" / n).stat().st_size > 1000 for n in names if n.endswith(".png"))
    summary = (tmp / "report" / "summary.md").read_text()
    client = MlflowClient(uri)
    parent_id = _parent_id(uri)  # sets the tracking URI itself: this test may run alone
    front = pd.read_csv(client.download_artifacts(parent_id, "pareto/front.csv", str(tmp)))
    assert f"## Pareto front ({len(front)} configurations)" in summary
    assert {f"report/{n}" for n in names} <= {a.path for a in client.list_artifacts(parent_id, "report")}


def test_report_of_unknown_sweep_lists_what_exists(launched):
    tmp, uri, _ = launched
    out = run_cli("report", "nosuch", "--experiment", "tiny", "--out", str(tmp / "r2"), "--tracking-uri", uri, cwd=tmp, timeout=120)
    assert out.returncode == 2 and "no sweep 'nosuch'" in out.stderr and "tiny" in out.stderr


def test_cka_of_a_sweep_that_kept_no_weights_exits_2_with_the_fix(launched):
    """The default (tracking.log_models: front) keeps no trial's weights, so ``fairsweep cka`` has nothing
    to compare: exit 2, no traceback, nothing written, and the message names the setting that keeps them."""
    tmp, uri, _ = launched
    refused = run_cli("cka", "tiny", "--a", "paradigm=scratch", "--b", "paradigm=supervised",
                      "--out", str(tmp / "cka"), "--tracking-uri", uri, cwd=tmp, timeout=300)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "has no finetuned weights" in refused.stderr and "tracking: {log_models: all}" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp / "cka").exists()


def _parent_id(uri: str) -> str:
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tiny"], filter_string="tags.`fairsweep.kind` = 'sweep'")
    return runs["run_id"].iloc[0]


def test_the_first_trial_of_each_base_starts_first(launched):
    """Tune's grid starts with the first trial of each pretrained base (Tune numbers its trials in the grid's
    order), so the bases build side by side from the start; the spec's grid lists the scratch trials first."""
    _, uri, _ = launched
    mlflow.set_tracking_uri(uri)
    trials = mlflow.search_runs(experiment_names=["tiny"], filter_string="tags.`fairsweep.kind` = 'trial'")
    in_grid_order = trials.sort_values("tags.fairsweep.tune_trial_id")["params.paradigm"].tolist()
    assert in_grid_order == ["supervised"] + ["scratch"] * 4 + ["supervised"] * 3, in_grid_order
