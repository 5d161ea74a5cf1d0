"""Choose on validation, report on test, inside a trial: validation scoring every epoch, the calibrated
threshold, the inner learning-rate x weight-decay search, epoch selection, bootstrap intervals; and the spec
errors that guard them."""
from __future__ import annotations

import gzip
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import TINY_DATA, run_cli, tiny_spec, trial_config, write_spec
from trainables import metrics
from trainables.data import DATASETS, build_dataset
from trainables.data.base import SplitMeta
from trainables.finetune import (INNER_SEARCH_FILE, PREDICTIONS_FILE, STATE_FILE, VAL_PREDICTIONS_FILE, TrialContext,
                                 train_and_evaluate)

POINT = {"backbone": "test_resnet", "paradigm": "scratch", "intervention": "correlation", "magnitude": 0.5,
         "freeze_depth": 0, "seed": 0}
FT = {"size": 200, "epochs": 3, "batch_size": 50, "lr": 0.05, "weight_decay": 0.0, "momentum": 0.9,
      "threshold": "calibrated", "select_epoch": "last"}


CONTEXT = TrialContext(dataset="synthetic_images", dataset_options=dict(TINY_DATA), cache_root="/nonexistent",
                       objectives=("accuracy", "equalized_odds_difference"), bootstrap=200)


def _trial(**finetune):
    return trial_config(POINT, {**FT, **finetune})


def _run(context: TrialContext, trial=None, **kwargs):
    """train_and_evaluate (of ``trial``, default POINT with FT), keeping every epoch's result and the files of the
    last one."""
    results, files = [], {}

    def on_epoch(result, folder: Path) -> None:
        results.append(dict(result))
        files.clear()
        files.update({p.name: p.read_bytes() for p in folder.iterdir()})

    final = train_and_evaluate(trial or _trial(), context, on_epoch=on_epoch, **kwargs)
    return final, results, files


def _frame(files: dict, name: str) -> pd.DataFrame:
    import io

    data = files[name]
    return pd.read_csv(io.BytesIO(gzip.decompress(data) if name.endswith(".gz") else data))


def test_a_trial_scores_validation_and_test_at_the_threshold_calibrated_on_validation():
    final, results, files = _run(CONTEXT)
    assert [r["epoch"] for r in results] == [1, 2, 3] and all(np.isfinite(r["val_loss"]) for r in results)
    val, test = _frame(files, VAL_PREDICTIONS_FILE), _frame(files, PREDICTIONS_FILE)
    # paper A's rule on the validation split, recomputed from the logged scores
    assert final["threshold"] == metrics.calibrated_threshold(val["y_true"], val["y_score"])
    assert (test["y_pred"] == (test["y_score"] >= final["threshold"])).all()
    for split, frame, prefix in (("val", val, "val_"), ("test", test, "")):
        ev = metrics.evaluate(frame["y_true"], frame["y_score"], {"group": frame["group"]}, primary="group",
                              threshold=final["threshold"])
        for name in ("accuracy", "auroc", "equalized_odds_difference", "tpr_difference", "disparate_impact_deviation"):
            assert final[prefix + name] == pytest.approx(ev.metrics[name]), (split, name)
    # intervals on the test split for the objectives and the headline metrics
    for name in ("accuracy", "equalized_odds_difference", "auroc", "tpr_difference"):
        assert final[f"{name}.ci_low"] <= final[name] <= final[f"{name}.ci_high"], name
    assert final["chosen_hparams"] == {"lr": 0.05, "weight_decay": 0.0} and INNER_SEARCH_FILE not in files


def test_a_fixed_threshold_is_used_as_given_and_no_bootstrap_when_off():
    final, _, files = _run(replace(CONTEXT, bootstrap=0), _trial(threshold=0.7))
    assert final["threshold"] == 0.7
    test = _frame(files, PREDICTIONS_FILE)
    assert (test["y_pred"] == (test["y_score"] >= 0.7)).all()
    assert not any(k.endswith(".ci_low") for k in final)


def test_best_val_loss_keeps_the_epoch_with_the_lowest_validation_loss():
    final, results, _ = _run(CONTEXT, _trial(select_epoch="best_val_loss", epochs=4, lr=0.2))
    losses = [r["val_loss"] for r in results]
    assert final["selected_epoch"] == 1 + int(np.argmin(losses))  # ties: the first
    assert final["selected_val_loss"] == pytest.approx(min(losses))


# A dataset whose validation labels are the opposite of what its validation images show: whatever fits the
# task well has a high validation loss, so a choice made on validation must differ from one made on test.
@pytest.fixture
def inverted_val():
    name = "inverted_val_images"

    @DATASETS.register(name, options=DATASETS.get("synthetic_images").options, doc="test only")
    def _build(options):
        base = build_dataset("synthetic_images", options)

        class Inverted(type(base)):
            rendering = False

            def meta(self, split):
                m = super().meta(split)
                if split != "val" or self.rendering:  # images are drawn from the true labels
                    return m
                return SplitMeta(1 - m.labels, m.groups, dict(m.attributes), dict(m.extra_labels))

            def inputs(self, split, indices=None):
                self.rendering = True
                try:
                    return super().inputs(split, indices)
                finally:
                    self.rendering = False

        base.__class__ = Inverted
        return base

    yield name
    DATASETS.unregister(name)


def test_the_inner_search_keeps_the_lowest_validation_loss_not_the_lowest_test_loss(inverted_val):
    context = replace(CONTEXT, dataset=inverted_val)
    final, results, files = _run(context, _trial(lr=[0.0001, 0.03], epochs=3))
    assert [r["epoch"] for r in results] == list(range(1, 7))  # 2 candidates x 3 epochs, in one step count
    table = _frame(files, INNER_SEARCH_FILE)
    assert list(table["lr"]) == [0.0001, 0.03] and table["chosen"].tolist() == [True, False]
    assert table["val_loss"][0] < table["val_loss"][1]
    assert final["chosen_hparams"]["lr"] == 0.0001
    # on test, the candidate the search rejected is the better one: the choice did not look at test
    scores = {}
    for lr in (0.0001, 0.03):
        alone, _, alone_files = _run(context, _trial(lr=lr, epochs=3))
        test = _frame(alone_files, PREDICTIONS_FILE)
        p = np.where(test["y_true"] == 1, test["y_score"], 1 - test["y_score"])
        scores[lr] = float(-np.mean(np.log(np.clip(p, 1e-12, 1))))
        if lr == 0.0001:  # the pick's metrics are the ones reported
            assert final["accuracy"] == alone["accuracy"] and final["auroc"] == alone["auroc"]
    assert scores[0.03] < scores[0.0001]


def test_an_inner_search_interrupted_between_candidates_resumes_to_the_same_result():
    trial = _trial(lr=[0.01, 0.05], weight_decay=[0.0, 1e-3], epochs=2)
    full, _, _ = _run(CONTEXT, trial)
    states = []
    train_and_evaluate(trial, CONTEXT, on_epoch=lambda r, d: states.append(torch.load(d / STATE_FILE, weights_only=True)))
    for cut in (2, 3):  # after the first candidate ended; mid-way through the second
        resumed = train_and_evaluate(trial, CONTEXT, state=states[cut - 1])
        assert resumed["chosen_hparams"] == full["chosen_hparams"] and resumed["accuracy"] == full["accuracy"]
        assert resumed["val_loss"] == pytest.approx(full["val_loss"])


@pytest.mark.parametrize("override,field,needle", [
    ({"finetune.threshold": 0}, "finetune.threshold", "strictly between 0 and 1"),
    ({"finetune.threshold": 1.5}, "finetune.threshold", "strictly between 0 and 1"),
    ({"finetune.threshold": "auto"}, "finetune.threshold", "'calibrated'"),
    ({"finetune.select_epoch": "best"}, "finetune.select_epoch", "last, best_val_loss"),
    ({"finetune.lr": []}, "finetune.lr", "at least one candidate"),
    ({"finetune.lr": [0.1, -1]}, "finetune.lr[1]", "> 0"),
    ({"finetune.lr": [0.001 * i for i in range(1, 18)]}, "finetune.lr", "at most 16 candidates"),
    ({"finetune.lr": 50}, "finetune.lr", "<= 10.0"),
    ({"evaluation": {"bootstrap": -1}}, "evaluation.bootstrap", ">= 0"),
    ({"dataset.privileged": {"group": "purple"}}, "dataset.privileged.group", "its groups: red, green"),
    ({"dataset.privileged": {"shoe_size": "big"}}, "dataset.privileged.shoe_size", "no sensitive attribute"),
])
def test_bad_selection_settings_exit_2_naming_the_field(tmp_path, override, field, needle):
    spec = tiny_spec()
    for path, value in override.items():
        node = spec
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    out = run_cli("validate", str(write_spec(tmp_path, spec)), cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{field}:" in out.stderr and needle in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_privileged_groups_reach_the_trial(tmp_path):
    out = run_cli("validate", str(write_spec(tmp_path, tiny_spec(**{"dataset.privileged": {"group": "green"}}))),
                  cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    a, _, _ = _run(replace(CONTEXT, privileged={"group": "green"}))
    b, _, _ = _run(replace(CONTEXT, privileged={"group": "red"}))
    assert a["accuracy"] == b["accuracy"] and a["tpr_difference"] == pytest.approx(-b["tpr_difference"])


@pytest.mark.slow
def test_a_sweep_with_an_inner_search_records_its_choices_in_mlflow(tmp_path):
    import json

    import mlflow
    from mlflow.tracking import MlflowClient

    from tests.helpers import sqlite_uri

    spec = tiny_spec(**{"name": "inner", "axes.paradigm": ["scratch"], "axes.freeze_depth": [0],
                        "finetune.lr": [0.005, 0.05], "finetune.select_epoch": "best_val_loss",
                        "evaluation": {"bootstrap": 100}})  # 2 trials x 2 candidates x 2 epochs
    uri = sqlite_uri(tmp_path)
    out = run_cli("launch", str(write_spec(tmp_path, spec)), "--tracking-uri", uri, "--storage", str(tmp_path / "r"),
                  "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    trials = mlflow.search_runs(experiment_names=["inner"], filter_string="tags.`fairsweep.kind` = 'trial'")
    assert len(trials) == 2
    for _, run in trials.iterrows():
        run_id = run["run_id"]
        assert run["params.finetune.lr_candidates"] == "(0.005, 0.05)"
        table = pd.read_csv(client.download_artifacts(run_id, INNER_SEARCH_FILE, str(tmp_path)))
        chosen = table[table["chosen"]].iloc[0]
        assert chosen["val_loss"] == table["val_loss"].min() and float(run["params.finetune.lr"]) == chosen["lr"]
        assert run["metrics.selected_val_loss"] == pytest.approx(chosen["val_loss"])
        history = client.get_metric_history(run_id, "val_loss")
        assert sorted(m.step for m in history) == [1, 2, 3, 4]  # every epoch of every candidate
        assert 0 < run["metrics.threshold"] < 1
        for name in ("accuracy", "equalized_odds_difference", "tpr_difference"):
            assert run[f"metrics.val_{name}"] == run[f"metrics.val_{name}"]  # logged (not NaN)
            assert run[f"metrics.{name}.ci_low"] <= run[f"metrics.{name}"] <= run[f"metrics.{name}.ci_high"]
        contexts = {i.dataset.name: [t.value for t in i.tags] for i in client.get_run(run_id).inputs.dataset_inputs}
        assert contexts["synthetic_images:val"] == ["validation"] and contexts["synthetic_images:test"] == ["testing"]
        assert [c for name, c in contexts.items() if name.startswith("synthetic_images:finetune:")] == [["training"]]
        junk = [c for c in trials.columns if c.startswith(("metrics.config/", "metrics.chosen_hparams/"))]
        assert not junk, junk  # Tune's config and the inner search's pick are params and tags, not metrics
        val = pd.read_csv(client.download_artifacts(run_id, VAL_PREDICTIONS_FILE, str(tmp_path)))
        assert metrics.calibrated_threshold(val["y_true"], val["y_score"]) == run["metrics.threshold"]
    trials = mlflow.search_runs(experiment_names=["inner"], filter_string="tags.`fairsweep.kind` = 'trial'")
    on_front = trials["tags.fairsweep.pareto_front"] == "true"
    assert on_front.any() and trials.loc[on_front, "tags.mlflow.runName"].str.startswith("[front] ").all()
    assert not trials.loc[~on_front, "tags.mlflow.runName"].str.startswith("[front]").any()
    # the fairest front member's model loads in one call, and predicts what its trial reported
    import mlflow.pytorch
    import torch

    member = trials[on_front].sort_values("metrics.equalized_odds_difference").iloc[0]
    model = mlflow.pytorch.load_model(f"runs:/{member['run_id']}/model")
    test = pd.read_csv(client.download_artifacts(member["run_id"], PREDICTIONS_FILE, str(tmp_path / "m")))
    from trainables.data import build_dataset

    with torch.no_grad():
        x = build_dataset("synthetic_images", tiny_spec()["dataset"]["options"]).inputs("test")
        scores = torch.softmax(model.eval()(x), dim=1)[:, 1].numpy()
    assert np.allclose(scores, test["y_score"], atol=1e-5)
    parent = mlflow.search_runs(experiment_names=["inner"], filter_string="tags.`fairsweep.kind` = 'sweep'").iloc[0]
    assert parent["tags.fairsweep.front_split"] == "test"  # the descriptive front says which split it is of
    # the MLflow UI tells the story on the parent run: the front's size and hypervolume as trials finish,
    # and a description with the front and how to query it
    assert parent["metrics.trials_finished"] == 2 and parent["metrics.front_size"] >= 1
    assert 0 < parent["metrics.hypervolume"] <= 1
    steps = [m.step for m in client.get_metric_history(parent["run_id"], "trials_finished")]
    assert steps == sorted(steps) and steps[-1] == 2
    note = parent["tags.mlflow.note.content"]
    assert "Pareto front after 2 finished trials" in note and "tags.fairsweep.pareto_front = 'true'" in note
    best = run_cli("best", "inner", "--tracking-uri", uri, "--max-drop", "0.05", "--format", "json", cwd=tmp_path,
                   timeout=120)
    assert best.returncode == 0, best.stderr
    (pick,) = json.loads(best.stdout)
    assert pick["selected_on"] == "val" and pick["run_id"] in set(trials["run_id"])
    signed = run_cli("pareto", "inner", "--tracking-uri", uri, "--fairness", "tpr_difference", "--format", "json",
                     cwd=tmp_path, timeout=120)  # every registered metric is known to the queries
    assert signed.returncode == 0, signed.stderr
    assert {r["trial_key"] for r in json.loads(signed.stdout)} <= set(trials["tags.fairsweep.trial_key"])


def test_the_default_privileged_group_is_the_same_on_validation_and_test(tmp_path):
    """The largest group is the default privileged one; it is worked out once (on test) and used on validation
    too, so a signed metric compares the same two groups on both splits even when their sizes differ."""
    from types import SimpleNamespace

    from trainables.data.base import SplitMeta
    from trainables.finetune import _evaluate

    rng = np.random.default_rng(0)

    def split(n_red: int, n_green: int) -> SplitMeta:
        groups = np.array([0] * n_red + [1] * n_green)
        labels = np.array([0, 1] * ((n_red + n_green) // 2))
        return SplitMeta(labels, groups, {"group": groups})

    metas = {"test": split(60, 40), "val": split(40, 60)}  # red is largest on test, green on validation
    data = SimpleNamespace(meta=metas.__getitem__, group_names={"group": ("red", "green")}, primary="group",
                           privileged={})
    scores = {s: rng.uniform(size=len(m.labels)) for s, m in metas.items()}
    out = _evaluate(scores.__getitem__, data, {"threshold": 0.5}, tmp_path, metrics,
                    TrialContext(dataset="-", dataset_options={}, cache_root="-", bootstrap=0))
    val = metrics.evaluate(metas["val"].labels, scores["val"], {"group": np.array(["red", "green"], dtype=object)[
        metas["val"].groups]}, primary="group", threshold=0.5, privileged={"group": "red"})
    assert out["val_tpr_difference"] == pytest.approx(val.metrics["tpr_difference"])
    assert pd.read_csv(tmp_path / "per_group.csv").query("privileged")["group"].tolist() == ["red"]
