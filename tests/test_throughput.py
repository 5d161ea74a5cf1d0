"""A sweep costs what its training costs: long-lived workers, the frozen-prefix feature cache through a real
launch (identical results with it off) and checkpoints by time. (The driver's progress lines are tested
with the launch of tests/test_launch_e2e.py.)"""
from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from tests.helpers import run_cli, sqlite_uri, tiny_spec, write_spec

pytestmark = pytest.mark.slow

COMPARED = ("accuracy", "auroc", "equalized_odds_difference", "val_accuracy", "val_loss", "threshold")


def _launch(tmp: Path, name: str, **overrides) -> tuple:
    spec = tiny_spec(**{"name": name, "axes.paradigm": ["supervised"], "axes.seed": [0, 1], **overrides})  # 8 trials
    uri = sqlite_uri(tmp)
    out = run_cli("launch", str(write_spec(tmp, spec, f"{name}.yaml")), "--tracking-uri", uri, "--storage",
                  str(tmp / "results"), "--quiet", cwd=tmp)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    trials = mlflow.search_runs(experiment_names=[name], filter_string="tags.`fairsweep.kind` = 'trial'")
    return trials.set_index("tags.fairsweep.trial_key"), tmp / "results" / name


def test_cached_features_long_lived_workers_and_checkpoints_by_time(tmp_path):
    from ray.tune import ExperimentAnalysis

    cached, path = _launch(tmp_path, "cached")  # default: feature cache on, a checkpoint at most every 60 s
    plain, plain_path = _launch(tmp_path, "plain", **{"resources.feature_cache": False,
                                                      "resources.checkpoint_interval_s": 0})
    # the same trials (the keys do not depend on how they are computed), the same results
    assert sorted(cached.index) == sorted(plain.index) and len(cached) == 8
    probes = cached[cached["params.freeze_depth"] == "linear"]
    assert len(probes) == 4 and (probes["tags.fairsweep.feature_cache"] == "linear probe on cached pre-logits").all()
    assert cached[cached["params.freeze_depth"] == "0"]["tags.fairsweep.feature_cache"].str.startswith("off").all()
    assert plain["tags.fairsweep.feature_cache"].str.startswith("off (resources.feature_cache: false)").all()
    # where each trial trained, and in what precision (bf16 autocast is asked for, but a CPU computes fp32)
    assert (cached["tags.fairsweep.device"] == "cpu").all() and (cached["tags.fairsweep.precision"] == "fp32").all()
    base = mlflow.search_runs(experiment_names=["cached"], filter_string="tags.`fairsweep.kind` = 'pretrain'")
    assert base[["tags.fairsweep.device", "tags.fairsweep.precision"]].values.tolist() == [["cpu", "fp32"]]
    for key in cached.index:
        for m in COMPARED:
            assert cached.loc[key, f"metrics.{m}"] == pytest.approx(plain.loc[key, f"metrics.{m}"], abs=1e-5), (key, m)
    # one pretrained base: its features (finetuning pool, val, test) are the same for both seeds and magnitudes
    assert len(list((tmp_path / "results" / "_feature_cache").glob("*.npy"))) == 3
    # long-lived workers: 8 trials ran in fewer processes than trials
    analysis = ExperimentAnalysis(str(path))
    pids = {int(df["pid"].iloc[0]) for df in analysis.trial_dataframes.values()}
    assert len(pids) < 8
    # checkpoints: by time, so these short trials keep only their final one; every epoch when the interval is 0
    for trial in analysis.trials:
        assert [p.name for p in sorted(Path(trial.path).glob("checkpoint_*"))] == ["checkpoint_000000"]  # the only one: numbered by checkpoint, not epoch
    for trial in ExperimentAnalysis(str(plain_path)).trials:
        assert len(list(Path(trial.path).glob("checkpoint_*"))) == 2  # num_to_keep of one per epoch
