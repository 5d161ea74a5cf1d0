"""``axes.finetune_size`` end to end: the real ``fairsweep launch`` (local Ray, SQLite MLflow, synthetic data)
of a sweep over two finetuning sizes; its trials draw that many examples, carry the size in their keys,
params and point tags, and the queries and the report group by it like by any other axis."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.mlflow_runs import TAGS
from orchestrator.plan import build_plan
from orchestrator.query import best, compare, paired_tests, sweep_trials
from orchestrator.spec import parse_spec
from tests.helpers import run_cli, sqlite_uri, tiny_spec, write_spec

pytestmark = pytest.mark.slow

SIZES = [64, 128]


def _spec() -> dict:
    spec = tiny_spec(name="sizes", **{"axes.paradigm": ["scratch"], "axes.freeze_depth": ["linear"],
                                      "axes.intervention": {"kind": "correlation", "magnitudes": [0.7]},
                                      "axes.seed": [0, 1], "axes.finetune_size": SIZES})
    spec["finetune"] = {"epochs": 1, "batch_size": 32, "lr": 0.02}
    return spec


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sizes")
    uri = sqlite_uri(tmp)
    out = run_cli("launch", str(write_spec(tmp, _spec())), "--tracking-uri", uri, "--storage", str(tmp / "results"),
                  "--quiet", cwd=tmp)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp, uri, out


def test_the_plan_crosses_the_sizes_with_every_other_axis():
    plan = build_plan(parse_spec(_spec()))
    assert sorted((t.point.finetune_size, t.point.seed) for t in plan.trials) == [(64, 0), (64, 1), (128, 0), (128, 1)]
    by_size = {t.point.finetune_size: t for t in plan.trials if t.point.seed == 0}
    assert by_size[64].config_key != by_size[128].config_key  # a size is another configuration, not another seed


def test_each_trial_draws_its_size_and_records_it(launched):
    tmp, uri, out = launched
    assert "4 trials finished, 0 failed" in out.stdout
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sizes")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(TAGS.KIND) == "trial"]
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        size = int(r.data.params["finetune.size"])
        assert size in SIZES and r.data.metrics["n_finetune"] == size  # the intervention drew that many
        assert json.loads(r.data.tags[TAGS.POINT])["finetune_size"] == size
    assert sorted(int(r.data.params["finetune.size"]) for r in runs) == [64, 64, 128, 128]
    assert len({r.data.tags[TAGS.CONFIG_KEY] for r in runs}) == 2  # seeds share a configuration, sizes do not
    parent = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(TAGS.KIND) == "sweep")
    assert parent.data.params["finetune.size"] == "[64, 128]" and parent.data.params["grid_size"] == "4"


def test_queries_group_by_the_size(launched):
    tmp, uri, _ = launched
    client = MlflowClient(uri)
    trials = sweep_trials(client, "sizes")
    assert sorted(trials["finetune.size"]) == [64, 64, 128, 128]
    assert len(sweep_trials(client, "sizes", filters={"finetune.size": 128})) == 2
    table = compare(trials, "finetune.size", "accuracy", "equalized_odds_difference", max_drop=1.0)
    assert list(table["finetune.size"]) == [64, 128] and list(table["n_pairs"]) == [0, 2]  # paired on seed
    # the sweep file's spelling of the axis names the same column
    assert len(sweep_trials(client, "sizes", filters={"finetune_size": 128})) == 2
    spelled = compare(trials, "finetune_size", "accuracy", "equalized_odds_difference", max_drop=1.0)
    pd.testing.assert_frame_equal(spelled, table)
    pd.testing.assert_frame_equal(
        best(trials, "accuracy", "equalized_odds_difference", max_drop=1.0, reference={"finetune_size": 128}),
        best(trials, "accuracy", "equalized_odds_difference", max_drop=1.0, reference={"finetune.size": 128}))
    pd.testing.assert_frame_equal(paired_tests(trials, "finetune_size", "equalized_odds_difference", 64),
                                  paired_tests(trials, "finetune.size", "equalized_odds_difference", 64))
    out = run_cli("compare", "sizes", "--by", "finetune.size", "--max-drop", "1", "--tracking-uri", uri,
                  "--format", "json", cwd=tmp)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["finetune.size"] for r in json.loads(out.stdout)] == [64, 128]


def test_the_report_draws_the_size_axis(launched):
    tmp, uri, _ = launched
    out = run_cli("report", "sizes", "--out", str(tmp / "report"), "--tracking-uri", uri, cwd=tmp)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp / "report" / "vs_finetune_size.png").stat().st_size > 0
    assert "finetune.size" in (tmp / "report" / "summary.md").read_text()
