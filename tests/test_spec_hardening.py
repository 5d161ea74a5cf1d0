"""Hostile or absurd sweep files: each is refused with exit 2 naming the field, fast, in bounded memory,
never with a traceback. Most run the real CLI (``fairsweep validate``) as a subprocess."""
from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.spec import (MAX_TRIALS, MAX_YAML_NODES, SpecError, excerpt, load_spec, parse_spec)
from tests.helpers import TINY_DATA, cli_env, run_cli, tiny_spec, write_spec

BIG = 10**400  # a 401-digit integer: float() overflows on it
MEMORY_LIMIT = 1 << 30  # address space for the CLI where it must not import torch


def _validate(tmp: Path, spec_file: Path, *, memory_limit: int | None = None) -> subprocess.CompletedProcess:
    """``fairsweep validate FILE`` in a subprocess, optionally under an address-space limit."""
    if memory_limit is None:
        return run_cli("validate", str(spec_file), cwd=tmp, timeout=300)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(spec_file)], cwd=tmp,
                          env=cli_env(), capture_output=True, text=True, timeout=120, preexec_fn=limit)


def _assert_refused(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, one short error line in the project's style that holds every fragment, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    err = proc.stderr
    assert "Traceback" not in err and err.startswith("fairsweep: error: "), err[-3000:]
    assert len(err) < 4000, f"error output of {len(err)} characters"
    for f in fragments:
        assert f in err, (f, err)
    return err


def _bomb_lines(levels: int = 9, width: int = 10) -> list[str]:
    """A "billion laughs" mapping: each level lists the previous one ``width`` times (width**levels leaves)."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return lines


def _with_paradigm_block(block: list[str]) -> str:
    """TINY_SPEC as YAML with ``block`` under pretraining.paradigms.scratch (an accepted mapping)."""
    text = yaml.safe_dump(tiny_spec(), sort_keys=False)
    nested = "\n".join("      " + line for line in block)
    return text.replace("pretraining:\n", f"pretraining:\n  paradigms:\n    scratch:\n{nested}\n", 1)


# ----------------------------------------------------------------------------- the YAML itself


def test_alias_bomb_under_an_accepted_mapping_exits_2_fast_in_bounded_memory(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_with_paradigm_block(_bomb_lines()))
    start = time.monotonic()
    proc = _validate(tmp_path, path, memory_limit=MEMORY_LIMIT)
    elapsed = time.monotonic() - start
    _assert_refused(proc, "bomb.yaml", "aliases", f"{MAX_YAML_NODES:,}")
    assert elapsed < 60, elapsed


def test_recursive_alias_exits_2(tmp_path):
    path = tmp_path / "rec.yaml"
    path.write_text(_with_paradigm_block(["loop: &loop [*loop]"]))
    _assert_refused(_validate(tmp_path, path, memory_limit=MEMORY_LIMIT), "rec.yaml", "recursive alias")


def test_a_few_aliases_still_work(tmp_path):
    text = yaml.safe_dump(tiny_spec(), sort_keys=False).replace("name: tiny", "name: &sweep tiny", 1)
    path = tmp_path / "alias.yaml"
    path.write_text(text + "experiment: *sweep\n")
    spec = load_spec(path)
    assert spec.experiment == spec.name == "tiny"


def test_deep_nesting_exits_2_instead_of_a_recursion_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(), sort_keys=False) + "junk: " + "[" * 20_000 + "]" * 20_000 + "\n")
    _assert_refused(_validate(tmp_path, path, memory_limit=MEMORY_LIMIT), "deep.yaml", "nested more than")


def test_integer_beyond_the_digit_limit_exits_2_naming_the_line(tmp_path):
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(), sort_keys=False).replace("lr: 0.02", "lr: " + "9" * 5000))
    _assert_refused(_validate(tmp_path, path), "digits.yaml", "an integer of more than", "line ")


@pytest.mark.parametrize("scalar", ["2001-13-45", "!!int abc", "!!int 0x", "!!float abc", "!!bool maybe",
                                    "!!timestamp soon"])
def test_malformed_tagged_or_date_like_scalars_are_yaml_errors(tmp_path, scalar):
    """SafeLoader turns these into ValueError/KeyError/AttributeError; here they are errors with a line."""
    path = tmp_path / "tagged.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(), sort_keys=False).replace("name: tiny", f"name: {scalar}", 1))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.path == "<file>" and "cannot read this" in str(info.value) and "line 1" in str(info.value)


def test_non_utf8_file_exits_2_naming_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(yaml.safe_dump(tiny_spec(), sort_keys=False).encode() + "# caf\xe9\n".encode("latin-1"))
    _assert_refused(_validate(tmp_path, path), "latin1.yaml", "not UTF-8", "0xe9", "save the file as UTF-8")


def test_oversized_file_exits_2(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(), sort_keys=False) + "# " + "x" * (2 << 20) + "\n")
    _assert_refused(_validate(tmp_path, path), "huge.yaml", "at most 1,048,576 bytes")


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("overrides, field", [
    ({"finetune.lr": BIG}, "finetune.lr"),
    ({"pretraining.lr": BIG}, "pretraining.lr"),
    ({"axes.intervention": {"kind": "correlation", "magnitudes": [0.5, BIG]}}, "axes.intervention.magnitudes[1]"),
    ({"axes.intervention": {"kind": "correlation", "magnitudes": {"low": 0.5, "high": BIG}},
      "search": {"type": "optuna", "budget": 2}}, "axes.intervention.magnitudes.high"),
])
def test_400_digit_integer_for_a_number_exits_2_naming_the_field(tmp_path, overrides, field):
    proc = _validate(tmp_path, write_spec(tmp_path, tiny_spec(**overrides)))
    err = _assert_refused(proc, f": {field}: got ", "expected a finite number", "too large")
    assert "0" * 300 not in err  # the value is an excerpt


@pytest.mark.parametrize("overrides, field", [
    ({"name": "tiny\n"}, "name"),
    ({"experiment": "exp\n"}, "experiment"),
    ({"dataset.name": "synthetic_images\n"}, "dataset.name"),
    ({"axes.backbone": ["test_resnet\n"]}, "axes.backbone[0]"),
    ({"axes.paradigm": ["scratch", "supervised\n"]}, "axes.paradigm[1]"),
    ({"axes.intervention": {"kind": "correlation\n", "magnitudes": [0.5]}}, "axes.intervention.kind"),
    ({"axes.paradigm": ["file:weights.pt\nx"]}, "axes.paradigm[0]"),
    ({"objectives.fairness": "equalized_odds_difference\n"}, "objectives.fairness"),
])
def test_names_are_a_single_line(tmp_path, overrides, field):
    _assert_refused(_validate(tmp_path, write_spec(tmp_path, tiny_spec(**overrides))), f": {field}: got ", "one line")


@pytest.mark.parametrize("overrides, field", [
    ({"axes.seed": [0, 2**70]}, "axes.seed[1]"),
    ({"pretraining.seed": 2**70}, "pretraining.seed"),
    ({"search": {"type": "optuna", "budget": 2, "seed": 2**70}}, "search.seed"),
    ({"axes.seed": [2**32]}, "axes.seed[0]"),
])
def test_seeds_within_numpys_range(tmp_path, overrides, field):
    _assert_refused(_validate(tmp_path, write_spec(tmp_path, tiny_spec(**overrides))),
                    f": {field}: got ", "<= 4,294,967,295", "numpy's seed range")


def test_largest_seed_is_accepted():
    assert parse_spec(tiny_spec(**{"axes.seed": [0, 2**32 - 1]})).axes.seed == (0, 2**32 - 1)


@pytest.mark.parametrize("option, value", [("image_size", 1_000_000), ("n_finetune", 10**9), ("seed", 2**40)])
def test_dataset_sizes_bounded_at_plan_time(tmp_path, option, value):
    spec = tiny_spec(**{"dataset.options": {**TINY_DATA, option: value}})
    _assert_refused(_validate(tmp_path, write_spec(tmp_path, spec)), f": dataset.options.{option}: got {value}; must be", "<= ")


@pytest.mark.parametrize("overrides, field, bound", [
    ({"finetune.size": 10**12}, "finetune.size", "<= 10,000,000"),
    ({"finetune.epochs": 10**9}, "finetune.epochs", "<= 10,000"),
    ({"pretraining.epochs": 10**9}, "pretraining.epochs", "<= 10,000"),
    ({"finetune.batch_size": 10**9}, "finetune.batch_size", "<= 65,536"),
    ({"pretraining.batch_size": 10**9}, "pretraining.batch_size", "<= 65,536"),
    ({"axes.freeze_depth": [0, 10**9]}, "axes.freeze_depth[1]", "<= 10,000"),
    ({"resources.max_failures": 10**9}, "resources.max_failures", "<= 1,000"),
    ({"resources.max_concurrent_trials": 10**9}, "resources.max_concurrent_trials", "<= 100,000"),
    ({"search": {"type": "optuna", "budget": 10**9}}, "search.budget", "<= 100,000"),
])
def test_sizes_epochs_and_batches_bounded(overrides, field, bound):
    with pytest.raises(SpecError) as info:
        parse_spec(tiny_spec(**overrides))
    assert info.value.path == field and bound in str(info.value)


def test_sizes_bounded_through_the_cli(tmp_path):
    proc = _validate(tmp_path, write_spec(tmp_path, tiny_spec(**{"finetune.epochs": 10**9})))
    _assert_refused(proc, ": finetune.epochs: got 1000000000; must be >= 1 and <= 10,000")


def test_grid_larger_than_the_trial_limit_exits_2(tmp_path):
    spec = tiny_spec(**{"axes.seed": list(range(400)), "axes.freeze_depth": list(range(200))})
    proc = _validate(tmp_path, write_spec(tmp_path, spec))
    _assert_refused(proc, ": axes: got ", f"at most {MAX_TRIALS:,} trials", "400 seed")


@pytest.mark.parametrize("field, value, fragment", [
    ("gpus_per_trial", 1.5, "a fraction <= 1"),
    ("gpus_per_trial", 1e300, "<= 1024"),
    ("gpus_per_trial", 2048, "<= 1024"),
    ("gpus_per_trial", 1e-9, ">= 0.0001"),
    ("gpus_per_trial", -1, ">= 0.0"),
    ("cpus_per_trial", 1e300, "<= 1024"),
    ("cpus_per_trial", 0, "> 0.0"),
    ("cpus_per_trial", BIG, "too large"),
])
def test_resources_bounded(tmp_path, field, value, fragment):
    proc = _validate(tmp_path, write_spec(tmp_path, tiny_spec(**{f"resources.{field}": value})))
    _assert_refused(proc, f": resources.{field}: got ", fragment)


@pytest.mark.parametrize("gpus", [0, 0.25, 1, 2, 8])
def test_valid_gpu_shares_accepted(gpus):
    assert parse_spec(tiny_spec(**{"resources.gpus_per_trial": gpus})).resources.gpus_per_trial == gpus


@pytest.mark.parametrize("options, field, fragment", [
    ({"temperature": 2**64}, "pretraining.paradigms.simclr.temperature", "64 bits"),
    ({"temperature": {"nested": [1, 2]}}, "pretraining.paradigms.simclr.temperature", "expected a number"),
    ({"temperature": [[0.1]]}, "pretraining.paradigms.simclr.temperature[0]", "expected a number"),
])
def test_free_form_options_hold_plain_values(tmp_path, options, field, fragment):
    spec = tiny_spec(**{"axes.paradigm": ["simclr"], "pretraining.paradigms": {"simclr": options}})
    _assert_refused(_validate(tmp_path, write_spec(tmp_path, spec)), f": {field}: got ", fragment)


@pytest.mark.parametrize("overrides, fragments", [
    ({"axes.paradigm": ["file:" + "a" * 300 + ".pt"]}, (": axes.paradigm[0]: got ", "at most 255 bytes")),
    ({"axes.paradigm": ["file:~nobody_here_xyz/w.pt"]}, (": axes.paradigm[0]: got ", "does not exist")),
    ({"dataset": {"name": "celeba", "options": {"root": "a" * 300}}}, (": dataset.options.root: got ", "must be a path", "at most 255")),
    ({"dataset": {"name": "celeba", "options": {"root": "~nobody_here_xyz/celeba"}}}, ("dataset.options.root", "does not exist")),
    ({"dataset": {"name": "image_csv", "options": {"root": "/tmp", "csv": "b" * 300 + ".csv"}}},
     (": dataset.options.csv: got ", "must be a path", "at most 255")),
])
def test_paths_the_filesystem_cannot_look_up_exit_2(tmp_path, overrides, fragments):
    """Overlong names and unknown ~users made the lookup itself raise (OSError, RuntimeError)."""
    _assert_refused(_validate(tmp_path, write_spec(tmp_path, tiny_spec(**overrides))), *fragments)


# ----------------------------------------------------------------------------- bounded messages


def test_excerpt_is_bounded_without_walking_a_shared_structure():
    value: object = ["lol"] * 10
    for _ in range(30):  # 10**30 leaves if expanded
        value = [value] * 10
    start = time.monotonic()
    text = excerpt(value)
    assert len(text) <= 200 and text.endswith("\u2026")
    assert time.monotonic() - start < 1
    assert excerpt(10**5000).startswith("<an integer of about 500")


def test_spec_error_message_is_bounded():
    err = SpecError("finetune.lr", "x" * 1_000_000, "y" * 1_000_000)
    assert len(str(err)) < 2600 and str(err).startswith("finetune.lr: got 'xxx")
    assert err.value == "x" * 1_000_000  # the value itself is kept for callers
