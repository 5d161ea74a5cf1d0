"""Example sweeps plan as written (on fixture copies of their data), and a time-series sweep runs from the CLI."""
from __future__ import annotations

import copy
from pathlib import Path

import mlflow
import pytest
import yaml

from orchestrator.plan import build_plan
from orchestrator.spec import SpecError, parse_spec
from tests.helpers import REPO, run_cli, sqlite_uri, write_spec
from trainables.data import fixtures as F


def _example(name: str) -> dict:
    return yaml.safe_load((REPO / "sweeps" / f"{name}.yaml").read_text())


def test_timeseries_example_plans_paper_b_freezing_setups() -> None:
    plan = build_plan(parse_spec(_example("timeseries")))
    assert plan.layer_groups == {"cnn1d_paperb": 3} and len(plan.trials) == 48
    frozen = {t.point.freeze_depth.value: t.frozen_groups for t in plan.trials}
    assert frozen == {"full": (), 1: (0,), (1,): (1,), 2: (0, 1), (0, 2): (0, 2), 3: (0, 1, 2)}
    assert {j.paradigm for j in plan.pretrain_jobs} == {"supervised", "simclr"}


@pytest.mark.parametrize("example,write", [
    ("celeba", F.write_celeba),
    ("waterbirds", F.write_waterbirds),
    ("image_csv", F.write_image_csv),
    ("timeseries_arrays", lambda root: F.write_timeseries_arrays(root, length=64, channels_last=True)),
])
def test_examples_with_real_layouts_plan_on_fixture_copies(tmp_path, example: str, write) -> None:
    """The options each example names exist in its layout; only the data's location and size differ."""
    fixture = write(tmp_path / "data")
    raw = _example(example)
    raw["dataset"]["options"]["root"] = fixture["root"]
    raw["finetune"]["size"] = 10  # the fixtures' pools are tiny
    plan = build_plan(parse_spec(raw))
    assert plan.trials and all(n >= 3 for n in plan.layer_groups.values())


def test_non_binary_primary_attribute_is_a_spec_error_for_correlation() -> None:
    raw = copy.deepcopy(_example("timeseries"))
    raw["dataset"]["options"]["sensitive"] = ["age", "sex"]
    with pytest.raises(SpecError) as err:
        build_plan(parse_spec(raw))
    assert err.value.path == "axes.intervention[0].magnitudes"
    assert "binary group" in str(err.value)


def test_missing_data_is_a_spec_error_on_dataset_options(tmp_path) -> None:
    raw = _example("celeba")
    raw["dataset"]["options"]["root"] = str(tmp_path / "absent")
    with pytest.raises(SpecError) as err:
        build_plan(parse_spec(raw))
    assert err.value.path == "dataset.options" and "absent" in str(err.value) and "does not exist" in str(err.value)


SWEEP = {
    "name": "ts-tiny",
    "dataset": {"name": "synthetic_timeseries",
                "options": {"n_source": 64, "n_finetune": 96, "n_val": 24, "n_test": 48, "length": 32,
                            "intersect": ["sex", "age"]}},
    "pretraining": {"epochs": 1, "batch_size": 32, "lr": 0.05, "paradigms": {"simclr": {"projection_dim": 16}}},
    "axes": {"backbone": ["cnn1d_tiny"], "paradigm": ["scratch", "simclr"],
             "intervention": {"kind": "correlation", "magnitudes": [0.5, 0.9]},
             "freeze_depth": ["full", [0, 2]], "seed": [0]},
    "finetune": {"size": 40, "epochs": 1, "batch_size": 16, "lr": 0.05},
    "objectives": {"performance": "auroc", "fairness": "worst:equalized_odds_difference"},
    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
    "search": {"type": "grid"},
}


@pytest.mark.slow
def test_time_series_sweep_from_the_cli_logs_every_attribute(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, SWEEP)
    uri = sqlite_uri(tmp_path)
    out = run_cli("launch", str(spec), "--tracking-uri", uri, "--storage", str(tmp_path / "results"), "--quiet",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "8 trials finished, 0 failed" in out.stdout
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["ts-tiny"])
    trials = runs[runs["tags.fairsweep.kind"] == "trial"]
    assert len(trials) == 8 and (trials["status"] == "FINISHED").all()
    assert set(trials["params.freeze_depth"]) == {"full", "[0,2]"}
    for attr in ("sex", "age", "sex_x_age"):
        for metric in ("equalized_odds_difference", "worst_group_auroc", "accuracy_gap", "demographic_parity_difference"):
            values = trials[f"metrics.{metric}/{attr}"]
            assert values.notna().all() and values.between(0, 1).all(), f"{metric}/{attr}"
    worst = trials["metrics.worst:equalized_odds_difference"]
    per_attr = trials[[f"metrics.equalized_odds_difference/{a}" for a in ("sex", "age", "sex_x_age")]].max(axis=1)
    assert (worst == per_attr).all()
    assert (trials.loc[trials["params.paradigm"] == "simclr", "tags.fairsweep.pretrain_key"].str.len() > 0).all()
