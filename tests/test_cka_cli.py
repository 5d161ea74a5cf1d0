"""``fairsweep cka`` end to end: a tiny paper-B sweep through the real CLI keeps every trial's weights
(tracking.log_models: all), then the command, as a subprocess, writes and logs its heatmap and table, whose
numbers a direct computation on the logged weights reproduces. A sweep that kept no weights (the default,
log_models: front) is refused with the fix: tests/test_launch_e2e.py checks it on its own launch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import run_cli, sqlite_uri, write_spec

pytestmark = pytest.mark.slow

SWEEP = {
    "name": "cka-tiny",
    "dataset": {"name": "synthetic_timeseries",
                "options": {"n_source": 96, "n_finetune": 96, "n_val": 48, "n_test": 96, "length": 32,
                            "sensitive": ["sex", "age", "skin"], "skin_noise": 0.8}},
    "pretraining": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "axes": {"backbone": ["cnn1d_paperb"], "paradigm": ["supervised", "simclr"],
             "intervention": {"kind": "none", "magnitudes": [0.0]}, "freeze_depth": ["full", [1]], "seed": [0]},
    "finetune": {"size": 48, "epochs": 2, "batch_size": 16, "lr": 0.05},
    "objectives": {"performance": "auroc", "fairness": "worst:equalized_odds_difference"},
    "evaluation": {"bootstrap": 0},
    "tracking": {"log_models": "all"},
    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
    "search": {"type": "grid"},
}


def test_cka_between_simclr_and_supervised_trials_from_the_cli(tmp_path: Path) -> None:
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from trainables import backbones
    from trainables.cka import cka_matrix, layer_group_outputs
    from trainables.data import build_dataset

    uri, storage = sqlite_uri(tmp_path), str(tmp_path / "results")
    out = run_cli("launch", str(write_spec(tmp_path, SWEEP)), "--tracking-uri", uri, "--storage", storage, "--quiet",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    trials = mlflow.search_runs(experiment_names=["cka-tiny"])
    trials = trials[trials["tags.fairsweep.kind"] == "trial"]
    assert len(trials) == 4
    for run_id in trials["run_id"]:  # log_models: all keeps every trial's weights, weights only
        assert [a.path for a in client.list_artifacts(run_id, "weights")] == ["weights/finetuned.safetensors"]

    cka = run_cli("cka", "cka-tiny", "--a", "paradigm=simclr", "--b", "paradigm=supervised", "--by", "age",
                  "--out", str(tmp_path / "cka"), "--tracking-uri", uri, cwd=tmp_path)
    assert cka.returncode == 0, cka.stdout[-3000:] + cka.stderr[-3000:]
    assert "2 pairs of trials (paradigm=simclr vs paradigm=supervised)" in cka.stdout
    stem = "cka_paradigm=simclr_vs_paradigm=supervised_by_age"
    png, csv = tmp_path / "cka" / f"{stem}.png", tmp_path / "cka" / f"{stem}.csv"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(csv)
    # 2 pairs (one per freezing setup) x 3 age bands x 3 x 3 layer groups
    assert len(table) == 2 * 3 * 9 and set(table["group"]) == {"young", "middle", "old"}
    assert set(table["layer_a"]) == set(table["layer_b"]) == {"stem", "blocks.0", "blocks.1"}
    assert set(table["freeze_depth"].astype(str)) == {"full", "[1]"} and (table["n_examples"] == 32).all()
    assert sorted(set(table["rank"].fillna(""))) == ["", "best", "worst"]
    assert table["cka"].between(-0.5, 1.0 + 1e-9).all()
    best = table.loc[table["rank"] == "best", "group"].iat[0]
    worst = table.loc[table["rank"] == "worst", "group"].iat[0]
    means = table.groupby("group")[["auroc_a", "auroc_b"]].mean().mean(axis=1)
    assert means[best] == means.max() and means[worst] == means.min()
    parent = client.search_runs([trials["experiment_id"].iat[0]], "tags.`fairsweep.kind` = 'sweep'")[0]
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id, "cka")) == [f"cka/{stem}.csv",
                                                                                        f"cka/{stem}.png"]

    # the same number, computed directly from the logged weights on the group's test examples
    row = table[(table["freeze_depth"].astype(str) == "full") & (table["group"] == "old")
                & (table["layer_a"] == "blocks.0") & (table["layer_b"] == "blocks.1")].iloc[0]
    ds = build_dataset("synthetic_timeseries", SWEEP["dataset"]["options"])
    old = np.flatnonzero(ds.meta("test").attributes["age"] == 2)
    feats = []
    for run_id in (row["run_a"], row["run_b"]):
        model = backbones.create_backbone("cnn1d_paperb", num_classes=2, input_shape=ds.input_shape)
        model.load_state_dict(load_file(client.download_artifacts(run_id, "weights/finetuned.safetensors",
                                                                  str(tmp_path / run_id))))
        feats.append(layer_group_outputs(model, ds.inputs("test")[torch.from_numpy(old)])[0])
    assert cka_matrix([feats[0][1]], [feats[1][2]])[0, 0] == pytest.approx(row["cka"], abs=1e-6)
    assert trials.set_index("run_id").loc[row["run_a"], "params.paradigm"] == "simclr"
