"""Real sweeps through the CLI: pretraining keys are trained once and shared, and a later sweep reuses them;
a ``file:`` checkpoint changes what a trial learns compared with ``scratch``."""
from __future__ import annotations

import json

import mlflow
import pytest
import torch

from orchestrator.plan import build_plan
from orchestrator.spec import parse_spec
from trainables.pretrain import run_pretrain_job
from trainables.pretrain_cache import PretrainCache
from tests.helpers import cli_env, run_cli, sqlite_uri, tiny_spec, write_spec

pytestmark = pytest.mark.slow

# A private Ray per sweep: without an address, ray.init() joins the cluster named in
# /tmp/ray/ray_current_cluster, which on a shared machine may be another sweep's, about to shut down.
ENV = cli_env(RAY_ADDRESS="local")


def _dedup_spec(name: str) -> dict:
    # 1 backbone x [supervised, biased] -> K = 2 pretraining keys, each shared by 2 trials (seeds 0, 1);
    # 1 CPU per trial on a 2-CPU machine, so trials run two at a time.
    return tiny_spec(**{"name": name, "axes.paradigm": ["supervised", "biased"],
                        "axes.intervention": {"kind": "correlation", "magnitudes": [0.5]},
                        "axes.freeze_depth": [0], "axes.seed": [0, 1], "finetune.epochs": 1,
                        "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0}})


def _runs(uri: str, experiment: str, kind: str):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.`fairsweep.kind` = '{kind}'")


def _overlapping(trials) -> bool:
    spans = sorted(zip(trials["start_time"], trials["end_time"]))
    return any(later_start < end for (_, end), (later_start, _) in zip(spans, spans[1:]))


def test_each_pretraining_key_trains_once_and_a_later_sweep_reuses_it(tmp_path):
    uri, storage = sqlite_uri(tmp_path), tmp_path / "results"
    first = _dedup_spec("dedup_a")
    plan = build_plan(parse_spec(first))
    keys = {(j.paradigm): j.key for j in plan.pretrain_jobs}
    assert len(keys) == 2 and len(plan.trials) == 4

    out = run_cli("launch", str(write_spec(tmp_path, first, "a.yaml")), "--tracking-uri", uri, "--storage", str(storage),
                  "--quiet", cwd=tmp_path, env=ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    pre = _runs(uri, "dedup_a", "pretrain")
    assert len(pre) == 2  # exactly K pretraining runs ...
    assert set(pre["tags.fairsweep.pretrain_key"]) == set(keys.values())
    assert (pre["tags.fairsweep.reused_cache"] == "false").all()  # ... each of which trained
    cache = PretrainCache(storage / "_pretrain_cache")
    entries = cache.entries()
    assert sorted(e["key"] for e in entries) == sorted(keys.values())  # ... and K cache entries
    assert all(e["status"] == "ok" for e in entries)
    before = {k: (cache.meta(k)["created"], cache.meta(k)["sha256"]) for k in keys.values()}

    trials = _runs(uri, "dedup_a", "trial")
    assert len(trials) == 4 and (trials["status"] == "FINISHED").all()
    assert _overlapping(trials), "trials should have run concurrently"
    run_of_key = dict(zip(pre["tags.fairsweep.pretrain_key"], pre["run_id"]))
    for _, t in trials.iterrows():
        key = keys[t["params.paradigm"]]
        assert t["tags.fairsweep.pretrain_key"] == key
        assert t["tags.fairsweep.pretrain_run_id"] == run_of_key[key]

    # A second sweep (another name, same storage and cache) with the same keys trains nothing.
    second = _dedup_spec("dedup_b")
    out = run_cli("launch", str(write_spec(tmp_path, second, "b.yaml")), "--tracking-uri", uri, "--storage", str(storage),
                  "--quiet", cwd=tmp_path, env=ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    pre_b = _runs(uri, "dedup_b", "pretrain")
    assert len(pre_b) == 2 and set(pre_b["tags.fairsweep.pretrain_key"]) == set(keys.values())
    assert (pre_b["tags.fairsweep.reused_cache"] == "true").all()
    assert {k: (cache.meta(k)["created"], cache.meta(k)["sha256"]) for k in keys.values()} == before
    assert len(cache.entries()) == 2
    trials_b = _runs(uri, "dedup_b", "trial")
    run_of_key_b = dict(zip(pre_b["tags.fairsweep.pretrain_key"], pre_b["run_id"]))
    assert len(trials_b) == 4
    assert all(t["tags.fairsweep.pretrain_run_id"] == run_of_key_b[t["tags.fairsweep.pretrain_key"]]
               for _, t in trials_b.iterrows())


def test_a_file_checkpoint_loads_and_changes_the_trial_result(tmp_path):
    spec = tiny_spec(**{"name": "from_file", "axes.freeze_depth": ["linear"], "axes.seed": [0],
                        "axes.intervention": {"kind": "correlation", "magnitudes": [0.5]},
                        "finetune.epochs": 4, "finetune.lr": 0.05, "pretraining.epochs": 3})
    # The checkpoint: a backbone trained on the target, written by the test as a plain torch state dict.
    job = next(j for j in build_plan(parse_spec(spec)).pretrain_jobs if j.paradigm == "supervised")
    out = run_pretrain_job(job.to_dict(), str(tmp_path / "own_cache"))
    ckpt = tmp_path / "supervised_base.pt"
    torch.save(PretrainCache(tmp_path / "own_cache").load(out.key), ckpt)
    spec["axes"]["paradigm"] = ["scratch", f"file:{ckpt}"]

    uri = sqlite_uri(tmp_path)
    res = run_cli("launch", str(write_spec(tmp_path, spec)), "--tracking-uri", uri, "--storage",
                  str(tmp_path / "results"), "--quiet", cwd=tmp_path, env=ENV)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    trials = _runs(uri, "from_file", "trial").set_index("params.paradigm")
    assert len(trials) == 2 and not len(_runs(uri, "from_file", "pretrain"))
    loaded, scratch = trials.loc[f"file:{ckpt}"], trials.loc["scratch"]
    assert loaded["tags.fairsweep.pretrain_key"].startswith("file-")
    # frozen features: only the checkpoint's representation can make the linear head accurate
    assert loaded["metrics.accuracy"] >= scratch["metrics.accuracy"] + 0.15, (loaded["metrics.accuracy"],
                                                                            scratch["metrics.accuracy"])


def test_trials_that_start_together_on_one_base_build_it_once(tmp_path):
    """Two trials of one base start side by side: one builds it while the other waits on the key's lock, then
    reads it. One pretraining run, logged as built in this sweep whichever trial reported first; both trials
    name it; one cache entry, marked as built by this run; and the driver started no process to pretrain."""
    uri, storage = sqlite_uri(tmp_path), tmp_path / "results"
    spec = tiny_spec(**{"name": "waiters", "axes.paradigm": ["supervised"], "axes.freeze_depth": [0],
                        "axes.intervention": {"kind": "correlation", "magnitudes": [0.5]}, "axes.seed": [0, 1],
                        "finetune.epochs": 1, "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0}})
    out = run_cli("launch", str(write_spec(tmp_path, spec)), "--tracking-uri", uri, "--storage", str(storage),
                  cwd=tmp_path, env=ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stderr.splitlines()  # the progress lines
    assert any(line.startswith("[fairsweep] pretraining 1/1 done: test_resnet/supervised (") and "epochs, last loss" in line
               for line in lines), out.stderr[-3000:]

    pre = _runs(uri, "waiters", "pretrain")
    assert len(pre) == 1 and pre["status"].iloc[0] == "FINISHED"
    assert pre["tags.fairsweep.reused_cache"].iloc[0] == "false"
    trials = _runs(uri, "waiters", "trial")
    assert len(trials) == 2 and (trials["status"] == "FINISHED").all()
    assert _overlapping(trials), "the two trials should have started together"
    assert (trials["tags.fairsweep.pretrain_run_id"] == pre["run_id"].iloc[0]).all()
    (entry,) = PretrainCache(storage / "_pretrain_cache").entries()
    assert entry["status"] == "ok"
    assert PretrainCache(storage / "_pretrain_cache").meta(entry["key"]).get("built_in_run")
    # what each trial said in its reports (Tune's result files): exactly one built the base, the other found it
    reused = []
    for results in (storage / "waiters").glob("*/result.json"):
        last = json.loads(results.read_text().strip().splitlines()[-1])
        reused.append(json.loads(last["pretrain_outcome"])["reused"])
    assert sorted(reused) == [False, True]
