"""The sweep file's JSON Schema: generated from the fields that validate the spec, committed as
docs/sweep.schema.json, named on the first line of every shipped sweep, and as strict as the spec."""
from __future__ import annotations

import copy
import json

import jsonschema
import pytest
import yaml

from orchestrator.spec import json_schema, load_spec
from trainables.schema import REQUIRED, Option, SchemaError, Section
from tests.helpers import REPO, run_cli, tiny_spec

SCHEMA_FILE = REPO / "docs" / "sweep.schema.json"
HEADER = "# yaml-language-server: $schema=../docs/sweep.schema.json"
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_committed_schema_is_what_fairsweep_schema_prints(tmp_path):
    out = run_cli("schema", cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert SCHEMA_FILE.read_text() == out.stdout, \
        "docs/sweep.schema.json is stale: regenerate it with `fairsweep schema > docs/sweep.schema.json`"
    assert json.loads(out.stdout) == json_schema()


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_every_shipped_sweep_names_the_schema_and_validates_against_it(path, validator):
    assert path.read_text().splitlines()[0] == HEADER
    sweep = yaml.safe_load(path.read_text())
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(sweep)]
    assert not errors, errors
    load_spec(path)  # and the spec itself accepts it


def test_the_schema_lists_each_datasets_and_paradigms_own_options():
    schema = json_schema()
    dataset = schema["properties"]["dataset"]
    assert {"synthetic_images", "celeba", "timeseries_arrays"} <= set(dataset["properties"]["name"]["anyOf"][0]["enum"])
    branch = next(b for b in dataset["allOf"] if b["if"]["properties"]["name"]["const"] == "synthetic_images")
    image_size = branch["then"]["properties"]["options"]["properties"]["image_size"]
    assert image_size["type"] == "integer" and image_size["minimum"] == 16 and image_size["default"] == 32
    celeba = next(b for b in dataset["allOf"] if b["if"]["properties"]["name"]["const"] == "celeba")
    root = celeba["then"]["properties"]["options"]["properties"]["root"]  # optional: None means not set
    assert root["anyOf"] == [{"type": "string", "minLength": 1}, {"type": "null"}] and root["default"] is None
    paradigms = schema["properties"]["pretraining"]["properties"]["paradigms"]["properties"]
    assert paradigms["simclr"]["properties"]["temperature"] == {
        "type": "number", "exclusiveMinimum": 0.0, "description": "NT-Xent temperature (paper B's train_model.py: 0.1)",
        "default": 0.1}
    assert paradigms["simclr"]["additionalProperties"] is False
    search = schema["properties"]["search"]["properties"]
    assert search["sampler"]["anyOf"][0]["enum"] == ["tpe", "nsga2", "random"] and search["sampler"]["default"] == "tpe"


@pytest.mark.parametrize("path, value", [
    (("surprise",), 1),                                                # unknown top-level key
    (("dataset", "options", "image_sise"), 32),                        # a typo in synthetic_images' options
    (("dataset", "options", "image_size"), 8),                         # below that option's minimum
    (("pretraining", "paradigms"), {"simclr": {"temprature": 0.5}}),   # a typo in a paradigm's options
    (("pretraining", "paradigms"), {"simclr": {"temperature": 0}}),    # temperature must be > 0
    (("finetune", "epochs"), 0),
    (("finetune", "lr"), "fast"),
    (("axes", "freeze_depth"), ["deep"]),
    (("axes", "seed"), [-1]),
    (("search", "type"), "bayes"),
    (("resources", "cpus_per_trial"), 0),
    (("plugins",), ["not a module"]),
])
def test_the_schema_refuses_what_the_file_may_not_hold(validator, path, value):
    assert not list(validator.iter_errors(tiny_spec()))
    spec = copy.deepcopy(tiny_spec())
    node = spec
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    assert list(validator.iter_errors(spec)), f"{'.'.join(path)} = {value!r} was accepted"


def test_an_option_without_a_default_is_required_and_one_schema_checks_both_ways():
    section = Section({"needed": Option(REQUIRED, str, doc="e.g. 'x'"), "size": Option(32, int, 8)})
    schema = section.json_schema()
    assert schema["required"] == ["needed"] and schema["properties"]["size"] == {"type": "integer", "minimum": 8,
                                                                                "default": 32}
    check = jsonschema.Draft202012Validator(schema)
    assert not list(check.iter_errors({"needed": "x"})) and section.complete({"needed": "x"}, "p") == {
        "needed": "x", "size": 32}
    for bad in ({}, {"needed": "x", "size": 4}, {"needed": "x", "sise": 32}):
        assert list(check.iter_errors(bad)), bad
        with pytest.raises(SchemaError):
            section.complete(bad, "p")
