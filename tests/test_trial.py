"""The trial contract (trainables/trial.py): Freeze's forms, labels and resolution, and the dict round trips
of TrialConfig and PretrainJob that carry a trial into Tune, a worker, MLflow and back."""
from __future__ import annotations

import json
from dataclasses import replace

import jsonschema
import pytest

from trainables.schema import SchemaError
from trainables.trial import (FREEZE_JSON_SCHEMA, ContractError, Freeze, PretrainHParams, PretrainJob, TrialConfig,
                              TrialPoint, Weights)


@pytest.mark.parametrize("raw, value, label", [
    (0, 0, "0"), (3, 3, "3"), ("linear", "linear", "linear"), ("full", "full", "full"),
    ([2, 0], (0, 2), "[0,2]"), ((4,), (4,), "[4]"),
])
def test_freeze_parses_the_spec_forms_and_labels_them(raw, value, label) -> None:
    freeze = Freeze.parse(raw)
    assert freeze.value == value and freeze.label() == str(freeze) == label
    assert Freeze.from_label(label) == freeze == Freeze.parse(freeze.to_value()) == Freeze.parse(freeze)
    assert json.loads(json.dumps(freeze.to_value())) == freeze.to_value()


@pytest.mark.parametrize("raw, path, words", [
    ("half", "axes.freeze_depth[1]", "expected an integer k >= 0, 'linear', 'full'"),
    (True, "axes.freeze_depth[1]", "expected an integer k >= 0"),
    (2.5, "axes.freeze_depth[1]", "expected an integer k >= 0"),
    ([], "axes.freeze_depth[1]", "use 'full' to freeze nothing"),
    ([1, 1], "axes.freeze_depth[1]", "group indices must be unique"),
    ([0, -1], "axes.freeze_depth[1][1]", "must be >= 0 and <= 10,000"),
    ([0, "a"], "axes.freeze_depth[1][1]", "expected an integer >= 0"),
    (10_001, "axes.freeze_depth[1]", "must be >= 0 and <= 10,000"),
])
def test_freeze_errors_name_the_path_the_value_and_the_forms(raw, path, words) -> None:
    with pytest.raises(SchemaError) as err:
        Freeze.parse(raw, "axes.freeze_depth[1]")
    assert err.value.path == path and words in str(err.value)
    with pytest.raises(jsonschema.ValidationError):  # the published schema refuses what parse refuses
        jsonschema.validate(raw, FREEZE_JSON_SCHEMA)


def test_the_json_schema_accepts_what_parse_accepts() -> None:
    for raw in (0, 7, "linear", "full", [3, 1], [0]):
        jsonschema.validate(raw, FREEZE_JSON_SCHEMA)
        Freeze.parse(raw)


def test_freeze_from_label_refuses_what_is_no_label() -> None:
    for text in ("[a]", "[]", "-1", "2.0", "Linear"):
        with pytest.raises(SchemaError):
            Freeze.from_label(text)


def test_freeze_values_are_canonical() -> None:
    with pytest.raises(TypeError, match="Freeze.parse"):
        Freeze((2, 0))
    with pytest.raises(TypeError, match="Freeze.parse"):
        Freeze([0, 2])
    with pytest.raises(SchemaError):
        Freeze(True)
    assert Freeze((0, 2)) == Freeze.parse([2, 0]) and len({Freeze(1), Freeze.parse(1)}) == 1


def test_freeze_resolves_against_a_backbones_layer_groups() -> None:
    assert Freeze(0).resolve(5) == () == Freeze("full").resolve(5)
    assert Freeze(5).resolve(5) == (0, 1, 2, 3, 4) == Freeze("linear").resolve(5)
    assert Freeze((1, 3)).resolve(5) == (1, 3) and Freeze((4,)).resolve(5) == (4,)
    with pytest.raises(SchemaError) as err:
        Freeze(7).resolve(5, backbone="test_resnet", path="axes.freeze_depth[2]")
    assert err.value.path == "axes.freeze_depth[2]" and err.value.value == 7
    assert "exceeds the 5 layer groups of test_resnet (0..4); use 0..5, 'linear' or 'full'" in str(err.value)
    with pytest.raises(SchemaError, match=r"holds indices \[5, 9\] outside the 5 layer groups \(0..4\)"):
        Freeze((0, 5, 9)).resolve(5)


def test_freeze_sorts_depths_then_sets_then_words() -> None:
    values = [Freeze("linear"), Freeze((0, 2)), Freeze(10), Freeze(2), Freeze("full"), Freeze(0)]
    assert [str(f) for f in sorted(values, key=Freeze.sort_key)] == ["0", "2", "10", "[0,2]", "full", "linear"]


def _config(**changes) -> TrialConfig:
    point = TrialPoint("test_resnet", "supervised", "correlation", 0.7, Freeze((0, 2)), 3, 128, (("lr", 0.03),))
    fields = {"point": point, "weights": Weights("abc123"),
              "finetune": {"epochs": 2, "batch_size": 50, "lr": 0.03, "weight_decay": (0.0, 0.001), "momentum": 0.9,
                           "threshold": "calibrated", "select_epoch": "last"}}
    return TrialConfig(**{**fields, **changes})


@pytest.mark.parametrize("config", [
    _config(),
    _config(weights=Weights()),
    _config(weights=Weights("file-0123456789abcdef", "/abs/base.pt")),
    _config(point=TrialPoint("cnn1d_tiny", "scratch", "none", 0.5, Freeze("linear"), 0, 2000)),
], ids=["cache-key", "random-init", "file", "no-search"])
def test_trial_configs_round_trip_through_json(config: TrialConfig) -> None:
    carried = json.loads(json.dumps(config.to_dict()))
    assert TrialConfig.from_dict(carried) == config
    assert TrialConfig.from_dict(carried).to_dict() == carried
    assert TrialPoint.from_dict(json.loads(json.dumps(config.point.to_dict()))) == config.point


def test_trial_identity_leaves_out_what_does_not_change_the_result() -> None:
    base = _config()
    key, config_key = base.keys("fp")
    other_seed = _config(point=TrialPoint(**{**base.point.__dict__, "seed": 4}))
    assert other_seed.keys("fp")[1] == config_key and other_seed.keys("fp")[0] != key
    for changed in (_config(weights=Weights("other")), _config(point=TrialPoint(**{**base.point.__dict__,
                                                                                     "finetune_size": 1024}))):
        assert changed.keys("fp")[1] != config_key
    assert base.keys("other data")[1] != config_key
    assert base.identity("fp")["finetune"]["size"] == 128 and base.identity("fp")["freeze_depth"] == "[0,2]"


def test_trial_params_name_every_axis_and_the_inner_searchs_candidates() -> None:
    params = _config().params()
    assert params["freeze_depth"] == "[0,2]" and params["finetune.size"] == "128" and params["seed"] == "3"
    assert params["intervention.kind"] == "correlation" and params["intervention.magnitude"] == "0.7"
    assert params["finetune.lr"] == "0.03" and params["finetune.weight_decay_candidates"] == "(0.0, 0.001)"
    assert "finetune.weight_decay" not in params and all(isinstance(v, str) for v in params.values())


def test_a_dict_from_another_version_is_refused_by_name() -> None:
    old_point = {"backbone": "test_resnet", "paradigm": "scratch", "intervention": "none", "magnitude": 0.5,
                 "freeze_depth": 0, "seed": 0, "finetune": {}}
    with pytest.raises(ContractError, match="lacks finetune_size"):
        TrialPoint.from_dict(old_point)
    with pytest.raises(ContractError, match="lacks point, weights"):
        TrialConfig.from_dict(old_point)
    with pytest.raises(ContractError, match="is a mapping"):
        TrialConfig.from_dict(["not", "a", "dict"])


@pytest.mark.parametrize("preprocessing", [None, '{"mean":[0.5,0.5,0.5]}'])
def test_pretrain_jobs_round_trip_and_are_keyed_by_what_makes_their_weights(preprocessing) -> None:
    hp = PretrainHParams(2, 64, 0.05, 5e-4, 0.9, 0, {"temperature": 0.1}, preprocessing)

    def job(**changes) -> PretrainJob:
        args = {"backbone": "test_resnet", "paradigm": "simclr", "dataset": "synthetic_images",
                "dataset_options": {"n_source": 400}, "hparams": hp, **changes}
        return PretrainJob.create(**args, dataset_fingerprint="fp")

    made = job()
    carried = json.loads(json.dumps(made.to_dict()))
    assert PretrainJob.from_dict(carried) == made and PretrainJob.from_dict(carried).to_dict() == carried
    assert ("preprocessing" in carried["hparams"]) == (preprocessing is not None)
    assert job().key == made.key and len(made.key) == 16
    others = [job(backbone="resnet18"), job(hparams=PretrainHParams(3, 64, 0.05, 5e-4, 0.9, 0, {"temperature": 0.1},
                                                                    preprocessing)),
              job(dataset_options={"n_source": 800}), PretrainJob.create(
                  "test_resnet", "simclr", "synthetic_images", {"n_source": 400}, hp, dataset_fingerprint="fp",
                  key_parts={"weights_file": "model.safetensors:0123"}),
              job(hparams=replace(hp, precision="bf16"))]  # a base trained in bf16 is not the fp32 one
    assert len({made.key, *(o.key for o in others)}) == 6
    # fp32, the default, stays out of the key: keys made before resources.precision existed still match
    assert "precision" not in carried["hparams"] and made.hparams.precision == "fp32"
    bf16 = job(hparams=replace(hp, precision="bf16")).to_dict()
    assert bf16["hparams"]["precision"] == "bf16" and PretrainJob.from_dict(bf16).hparams.precision == "bf16"
    with pytest.raises(ContractError, match="precision 'fp16' is not one of bf16, fp32"):
        PretrainJob.from_dict({**bf16, "hparams": {**bf16["hparams"], "precision": "fp16"}})


def test_weights_from_a_file_are_keyed_by_content(tmp_path) -> None:
    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    a.write_bytes(b"same weights")
    b.write_bytes(b"same weights")
    c.write_bytes(b"other weights")
    wa, wb, wc = (Weights.from_file(str(p)) for p in (a, b, c))
    assert wa.key == wb.key != wc.key and wa.key.startswith("file-") and wa.file == str(a)
    assert Weights.from_dict(json.loads(json.dumps(wa.to_dict()))) == wa


def test_the_plans_keys_are_the_ones_sweeps_already_carry() -> None:
    """Trial and pretraining keys name runs in MLflow, checkpoints and cache entries: building them from the
    contract must give the keys earlier versions gave (values recorded before the contract existed)."""
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_spec
    from tests.helpers import tiny_spec

    plan = build_plan(parse_spec(tiny_spec(**{"axes.freeze_depth": [0, "linear", [1, 0]], "finetune.lr": [0.01, 0.1]})))
    assert [j.key for j in plan.pretrain_jobs] == ["a2a3c77dd1a5a33c"]
    keys = {(t.point.paradigm, t.point.magnitude, str(t.point.freeze_depth)): (t.key, t.config_key) for t in plan.trials}
    assert keys[("scratch", 0.5, "0")] == ("493c25a08c4785d8", "e0667d93f656682c")
    assert keys[("scratch", 0.9, "[0,1]")] == ("7282e699de104b50", "a6f89efbea5ef75d")
    assert keys[("supervised", 0.5, "linear")] == ("9ffb23406dc5861f", "75a2efc574c5542a")
    assert keys[("supervised", 0.9, "[0,1]")] == ("04c4fd8ede1f964a", "0151e6cfca9140ce")
    searched = build_plan(parse_spec(tiny_spec(**{"search": {"type": "optuna", "budget": 3},
                                                  "finetune.lr": {"low": 0.001, "high": 0.1, "log": True}})))
    t = searched.resolve(TrialPoint("test_resnet", "supervised", "correlation", 0.9, Freeze("linear"), 0, 200,
                                    (("lr", 0.03),)))
    assert (t.key, t.config_key, t.config.weights.key) == ("a948538d7d55e8d8", "994d629065ceab76", "a2a3c77dd1a5a33c")


def test_a_tune_config_carries_the_trial_under_its_key() -> None:
    from trainables.trial import TUNE_KEY

    config = _config()
    assert TrialConfig.from_tune(json.loads(json.dumps({TUNE_KEY: config.to_dict()}))) == config
    with pytest.raises(ContractError, match="Tune config lacks trial"):  # e.g. a grid cell saved by an older version
        TrialConfig.from_tune({"point": config.point.to_dict()})
