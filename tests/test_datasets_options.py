"""Dataset options beyond numbers (strings, paths, name lists, switches) and the registry's schemas."""
from __future__ import annotations

import json

import pytest

from trainables.data import (DATASETS, NAMES, PATH, REQUIRED, DatasetOptionError, Option, batch_order,
                             canonical_options, parse_options)

SCHEMA = {
    "root": Option(None, PATH),
    "target": Option("label", str),
    "sensitive": Option(("group",), NAMES),
    "verify": Option(False, bool),
    "workers": Option(2, int, 0, identity=False),
    "size": Option(32, int, 8),
    "needed": Option(REQUIRED, str, doc="e.g. 'x'"),
}


def test_strings_paths_names_and_switches_parse() -> None:
    out = parse_options({"root": "~/data", "target": "Smiling", "sensitive": "Male", "verify": True,
                         "needed": "x"}, SCHEMA)
    assert out["root"].endswith("/data") and not out["root"].startswith("~")
    assert out["target"] == "Smiling" and out["verify"] is True and out["needed"] == "x"
    assert out["sensitive"] == ("Male",)  # one name becomes a one-element tuple
    assert parse_options({"sensitive": ["sex", "age"], "needed": "x"}, SCHEMA)["sensitive"] == ("sex", "age")
    assert list(out) == sorted(SCHEMA)  # every option, defaults filled, key-sorted


def test_optional_options_default_to_none_and_accept_null() -> None:
    assert parse_options({"needed": "x"}, SCHEMA)["root"] is None
    assert parse_options({"needed": "x", "root": None}, SCHEMA)["root"] is None


@pytest.mark.parametrize("key,value,fragment", [
    ("sensitive", [], "a name or a list"),
    ("sensitive", ["sex", "sex"], "more than once"),
    ("sensitive", ["sex", 3], "not names"),
    ("sensitive", {"sex": 1}, "a name or a list"),
    ("target", "", "non-empty string"),
    ("target", 5, "non-empty string"),
    ("root", 3, "a path"),
    ("verify", "yes", "true or false"),
    ("size", "32", "an integer"),
])
def test_bad_values_name_the_option_and_the_value(key: str, value: object, fragment: str) -> None:
    with pytest.raises(DatasetOptionError) as err:
        parse_options({key: value, "needed": "x"}, SCHEMA)
    assert f"dataset.options.{key}" in str(err.value) and fragment in str(err.value)
    assert repr(value) in str(err.value)


def test_required_option_is_named() -> None:
    with pytest.raises(DatasetOptionError, match=r"dataset.options.needed: got None; this field is required: a non-empty string \(e.g. 'x'\)"):
        parse_options({}, SCHEMA)


def test_canonical_options_leave_out_what_does_not_change_the_data() -> None:
    a = parse_options({"needed": "x", "workers": 0, "root": "/a"}, SCHEMA)
    b = parse_options({"needed": "x", "workers": 8, "root": "/b"}, SCHEMA)
    assert canonical_options(a, SCHEMA, leave_out=("root",)) == canonical_options(b, SCHEMA, leave_out=("root",))
    assert canonical_options(a, SCHEMA) != canonical_options(b, SCHEMA)
    assert "workers" not in json.loads(canonical_options(a, SCHEMA))


def test_every_adapter_is_registered_with_its_schema() -> None:
    names = set(DATASETS.names())
    assert {"synthetic_images", "synthetic_timeseries", "celeba", "waterbirds", "image_csv",
            "timeseries_arrays"} <= names
    for name in ("celeba", "waterbirds", "image_csv"):
        opts = DATASETS.get(name).options
        assert {"root", "target", "sensitive", "image_size", "intersect", "source_fraction"} <= set(opts)
    assert {"root", "target", "sensitive", "intersect"} <= set(DATASETS.get("timeseries_arrays").options)
    assert DATASETS.get("celeba").doc


def test_batch_order_is_a_function_of_seed_and_epoch() -> None:
    a = batch_order(10, 4, shuffle=True, seed=3, epoch=1)
    assert [len(b) for b in a] == [4, 4, 2] and sorted(sum((b.tolist() for b in a), [])) == list(range(10))
    assert all((x == y).all() for x, y in zip(a, batch_order(10, 4, shuffle=True, seed=3, epoch=1)))
    assert any((x != y).any() for x, y in zip(a, batch_order(10, 4, shuffle=True, seed=3, epoch=2)))
    assert [len(b) for b in batch_order(10, 4, shuffle=False, drop_last=True)] == [4, 4]
    assert [b.tolist() for b in batch_order(3, 4, shuffle=False, drop_last=True)] == [[0, 1, 2]]
