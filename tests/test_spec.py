"""Sweep-file validation: the issue's shape is accepted; every mistake names its field path."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from orchestrator.spec import SpecError, load_spec, parse_spec
from tests.helpers import REPO, tiny_spec, write_spec
from trainables.trial import Freeze


def test_quickstart_file_parses_into_frozen_typed_spec():
    spec = load_spec(REPO / "sweeps" / "quickstart.yaml")
    assert spec.name == "quickstart" and spec.experiment == "quickstart"
    assert spec.axes.backbone == ("test_convnext",)
    assert spec.axes.paradigm == ("scratch", "supervised", "biased")  # the story needs a biased base
    assert spec.axes.intervention[0].kind == "correlation"
    assert spec.axes.intervention[0].magnitudes == (0.5, 0.7, 0.9)
    assert spec.axes.freeze_depth == (Freeze(0), Freeze("linear"))
    assert spec.n_trials == 1 * 3 * 3 * 2 * 2 == 36
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]


def test_issue_shape_verbatim():
    raw = yaml.safe_load("""
name: quickstart
dataset: {name: synthetic_images, options: {}}
pretraining: {epochs: 5, batch_size: 128, lr: 0.05}
axes:
  backbone: [test_resnet, test_convnext]
  paradigm: [scratch, supervised]
  intervention:
    kind: correlation
    magnitudes: [0.5, 0.7, 0.9]
  freeze_depth: [0, 2, linear]
  seed: [0]
finetune: {size: 2000, epochs: 3, batch_size: 64, lr: 0.01}
objectives: {performance: accuracy, fairness: equalized_odds_difference}
resources: {cpus_per_trial: 1, gpus_per_trial: 0}
search: {type: grid}
""")
    assert parse_spec(raw).n_trials == 36


def test_explicit_freeze_sets_and_intervention_lists():
    spec = parse_spec(tiny_spec(**{
        "axes.freeze_depth": [[2, 0], "full", 1],
        "axes.intervention": [{"kind": "correlation", "magnitudes": [0.5]},
                              {"kind": "representation", "magnitudes": [0.1, 0.3]}],
        "axes.seed": [0, 1, 2]}))
    assert spec.axes.freeze_depth == (Freeze((0, 2)), Freeze("full"), Freeze(1))
    assert [a.kind for a in spec.axes.intervention] == ["correlation", "representation"]
    assert spec.n_trials == 1 * 2 * 3 * 3 * 3


@pytest.mark.parametrize("overrides, path, fragment", [
    ({"axes.seed": [0, "one"]}, "axes.seed[1]", "integer"),
    ({"axes.seed": [0, 0]}, "axes.seed[1]", "duplicate"),
    ({"axes.freeze_depth": [0, "deep"]}, "axes.freeze_depth[1]", "'linear', 'full'"),
    ({"axes.freeze_depth": [-1]}, "axes.freeze_depth[0]", ">= 0"),
    ({"axes.freeze_depth": [[0, 0]]}, "axes.freeze_depth[0]", "unique"),
    ({"axes.intervention": {"kind": "correlation", "magnitudes": [0.5, 1.5]}}, "axes.intervention.magnitudes[1]", "<= 1.0"),
    ({"axes.intervention": {"kind": "correlation"}}, "axes.intervention.magnitudes", "required"),
    ({"axes.backbone": []}, "axes.backbone", "non-empty"),
    ({"finetune.size": 0}, "finetune.size", ">= 4"),
    ({"finetune.lr": "fast"}, "finetune.lr", "finite number"),
    ({"finetune.lr": 0}, "finetune.lr", "> 0.0"),
    ({"finetune.optimiser": "adam"}, "finetune.optimiser", "allowed keys here"),
    ({"resources.gpus_per_trial": -1}, "resources.gpus_per_trial", ">= 0.0"),
    ({"search.type": "bayes"}, "search.type", "grid"),
    ({"name": "has space"}, "name", "letters, digits"),
])
def test_bad_values_name_the_field(overrides, path, fragment):
    with pytest.raises(SpecError) as info:
        parse_spec(tiny_spec(**overrides))
    assert info.value.path == path
    assert fragment in str(info.value)
    assert path in str(info.value)


def test_finetune_size_is_an_axis_and_one_finetune_size_is_its_one_value_form():
    spec = parse_spec(tiny_spec(**{"axes.finetune_size": [128, 1024]}, finetune={"epochs": 2, "lr": 0.02}))
    assert spec.axes.finetune_size == (128, 1024) and "size" not in spec.finetune.fixed()
    assert spec.n_trials == 2 * parse_spec(tiny_spec()).n_trials
    assert parse_spec(tiny_spec()).axes.finetune_size == (200,)  # TINY_SPEC's finetune.size
    assert parse_spec(tiny_spec(finetune={"epochs": 2})).axes.finetune_size == (2000,)  # the default
    assert parse_spec(tiny_spec(**{"axes.finetune_size": 64}, finetune={})).axes.finetune_size == (64,)


@pytest.mark.parametrize("overrides, path, fragment", [
    ({"axes.finetune_size": [128, 2]}, "axes.finetune_size[1]", ">= 4"),
    ({"axes.finetune_size": [128, 10**8]}, "axes.finetune_size[1]", "<= 10,000,000"),
    ({"axes.finetune_size": [128, 128]}, "axes.finetune_size[1]", "duplicate"),
    ({"axes.finetune_size": ["big"]}, "axes.finetune_size[0]", "integer"),
    ({"axes.finetune_size": [128.5]}, "axes.finetune_size[0]", "integer"),
    ({"axes.finetune_size": []}, "axes.finetune_size", "non-empty"),
    ({"axes.finetune_size": [128, 1024]}, "finetune.size", "remove finetune.size, or list its value in axes.finetune_size"),
])
def test_finetune_size_errors_name_the_field_the_value_and_the_fix(overrides, path, fragment):
    with pytest.raises(SpecError) as info:
        parse_spec(tiny_spec(**overrides))
    assert info.value.path == path and fragment in str(info.value)


def test_tracking_log_models_defaults_to_the_front_and_names_its_choices():
    assert parse_spec(tiny_spec()).tracking.log_models == "front"
    assert parse_spec(tiny_spec(tracking={"log_models": "all"})).tracking.log_models == "all"
    with pytest.raises(SpecError) as info:
        parse_spec(tiny_spec(tracking={"log_models": "every"}))
    assert info.value.path == "tracking.log_models" and "front" in str(info.value) and "all" in str(info.value)


def test_unknown_top_level_key_suggests_the_closest():
    raw = tiny_spec()
    raw["finetuning"] = raw.pop("finetune")
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    assert info.value.path == "finetuning"
    assert "did you mean 'finetune'" in str(info.value)


def test_missing_required_section():
    raw = tiny_spec()
    del raw["axes"]
    with pytest.raises(SpecError, match="axes: got None; this field is required"):
        parse_spec(raw)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="no such sweep file"):
        load_spec(tmp_path / "nope.yaml")


def test_roundtrip_through_file(tmp_path):
    assert load_spec(write_spec(tmp_path, tiny_spec())).n_trials == 8
