"""Fuzzing sweep-file validation: valid specs mutated into wrong types, out-of-range numbers, missing and
extra keys, control and unicode characters, huge numbers, nested junk, deleted sections and damaged
bytes. Whatever the file holds, ``fairsweep validate`` / ``launch --dry-run`` answers 0 or 2, never 1,
never a traceback, within a time bound. Most examples call ``main`` in-process (fast); a handful of
fixed nasty files go through the real CLI in a subprocess."""
from __future__ import annotations

import contextlib
import copy
import io
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from orchestrator.cli import main
from tests.helpers import TINY_SPEC, run_cli

PER_EXAMPLE_S = 30  # the first example imports torch and timm; the others take milliseconds

_NASTY_INTS = [-1, 0, 1, 2, 3, 4, 2**31, 2**32 - 1, 2**32, 2**63, 2**64, 2**70, 10**400, -(10**400)]
_NASTY_FLOATS = [-0.0, 0.5, 0.9, 1.0, 1.5, 1e-9, 1e300, -1e300, float("inf"), float("nan")]
_WORDS = ["grid", "optuna", "tpe", "linear", "full", "none", "scratch", "supervised", "simclr", "timm", "file:",
          "file:x.pt", "file:\n", "file:/", "file:~nobody_here/x.pt", "file:" + "x" * 300 + ".pt", "test_resnet",
          "correlation", "representation", "accuracy", "worst:group", "equalized_odds_difference/group",
          "synthetic_images", "synthetic_timeseries", "celeba", "image_csv", "low", "high", "log", "budget", "seed",
          "sampler", "paradigms", "options", "root", "image_size", "n_finetune", "/tmp", "~nobody_here/x"]
_NASTY_TEXT = ["", " ", "tiny\n", "a\x00b", "\t", "\u202e", "\u2028", "\ud800", "é", "x" * 300, *_WORDS]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-10, 10**6), st.integers(-(2**600), 2**600), st.sampled_from(_NASTY_INTS),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(_NASTY_FLOATS),
    st.text(max_size=20), st.sampled_from(_NASTY_TEXT),
)
keys = st.one_of(st.sampled_from(_NASTY_TEXT), st.text(max_size=10), st.integers(-5, 5), st.none())
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(keys, inner, max_size=4)), max_leaves=10)
# Values of the right shape, so that half the mutations get past the spec into the plan-time checks.
plausible = st.one_of(st.integers(0, 5000), st.floats(0, 1), st.sampled_from(_WORDS),
                      st.lists(st.sampled_from([0, 1, 2, "linear", "full", 0.5, 0.7]), min_size=1, max_size=3, unique=True))
_SYNTAX = [b"\xff", b"\xe9", b"\x00", b":", b": ", b"&a ", b"*a", b"*b ", b"[", b"{", b"- ", b"\t", b"\n  ", b"!!", b"'", b"#",
           b"!!int ", b"!!float ", b"!!bool ", b"!!timestamp ", b"!!binary ", b"!!set ", b"!!omap ", b"!!str ",
           b"!!python/name:os.system ", b" 2001-13-45", b" 0x", b" 1:2:3", b"<<: "]


def _containers(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Paths to every value inside ``node`` (the root is ``()``)."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _containers(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _containers(v, prefix + (i,))
    return out


def _get(node: Any, path: tuple) -> Any:
    for p in path:
        node = node[p]
    return node


@st.composite
def mutated_specs(draw: st.DrawFn) -> Any:
    """TINY_SPEC after 1-3 mutations: replace a value, delete it, add a key or item, or wrap it."""
    spec: Any = copy.deepcopy(TINY_SPEC)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_containers(spec)))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "wrap"]))
        if action in ("replace", "wrap"):
            node = _get(spec, path)
            value = draw(junk | plausible) if action == "replace" else draw(st.sampled_from([[node], {"x": node}, [node, node]]))
            if not path:
                spec = value
            else:
                _get(spec, path[:-1])[path[-1]] = value
        elif action == "delete" and path:
            parent = _get(spec, path[:-1])
            del parent[path[-1]]
        elif action == "add":
            node = _get(spec, path)
            if isinstance(node, dict):
                node[draw(keys)] = draw(junk)
            elif isinstance(node, list):
                node.append(draw(junk))
    return spec


@st.composite
def spec_files(draw: st.DrawFn) -> bytes:
    """A mutated spec as YAML bytes; sometimes with a few bytes of the text overwritten or inserted."""
    data = yaml.safe_dump(draw(mutated_specs()), sort_keys=False).encode()
    if draw(st.integers(0, 7)) == 0:
        at = draw(st.integers(0, len(data)))
        cut = draw(st.integers(0, 3))
        data = data[:at] + draw(st.sampled_from(_SYNTAX) | st.binary(min_size=1, max_size=4)) + data[at + cut:]
    return data


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _run_in_process(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(data=spec_files(), dry_run=st.booleans())
def test_mutated_specs_exit_0_or_2_without_a_traceback(fuzz_dir, data, dry_run):
    path = fuzz_dir / "sweep.yaml"
    path.write_bytes(data)
    args = ["launch", str(path), "--dry-run"] if dry_run else ["validate", str(path)]
    start = time.monotonic()
    rc, out, err = _run_in_process(args)  # an exception escaping main fails the example
    elapsed = time.monotonic() - start
    assert rc in (0, 2), (rc, err)
    assert "Traceback" not in out + err
    assert elapsed < PER_EXAMPLE_S, elapsed
    if rc == 2:
        assert err.startswith(f"fairsweep: error: {path}: ") and ": got " in err, err
        assert len(err) < 4000, f"error output of {len(err)} characters"
        field = err[len(f"fairsweep: error: {path}: "):].split(":", 1)[0]
        event(f"exit 2 at {field.split('.')[0].split('[')[0][:20]}")  # --hypothesis-show-statistics: what got hit
    else:
        assert out.startswith("sweep "), out[:200]
        event("exit 0")


_NASTY_FILES = {
    "empty": b"",
    "top_level_list": b"- name: tiny\n- axes: {}\n",
    "python_tag": yaml.safe_dump(TINY_SPEC, sort_keys=False).encode().replace(
        b"name: tiny", b"name: !!python/object/apply:os.system ['touch pwned']", 1),
    "two_documents": yaml.safe_dump(TINY_SPEC).encode() + b"---\n" + yaml.safe_dump(TINY_SPEC).encode(),
    "control_characters": yaml.safe_dump({**TINY_SPEC, "name": "ti\x00ny\x1b[31m"}).encode(),
    "binary_and_dates": yaml.safe_dump(TINY_SPEC, sort_keys=False).encode().replace(
        b"name: tiny", b"name: !!binary aGVsbG8=\nexperiment: 2001-12-14", 1),
    "tab_indent": b"name: tiny\naxes:\n\tbackbone: [test_resnet]\n",
    "impossible_date": yaml.safe_dump(TINY_SPEC, sort_keys=False).encode().replace(b"name: tiny", b"name: 2001-13-45", 1),
    "malformed_tagged_int": yaml.safe_dump(TINY_SPEC, sort_keys=False).encode().replace(b"lr: 0.02", b"lr: !!int abc", 1),
    "utf16": yaml.safe_dump(TINY_SPEC).encode("utf-16"),
}


@pytest.mark.parametrize("case", sorted(_NASTY_FILES))
def test_nasty_files_through_the_real_cli(tmp_path, case):
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(_NASTY_FILES[case])
    proc = run_cli("validate", str(path), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and proc.stderr.startswith(f"fairsweep: error: {path}: "), proc.stderr
    assert not (tmp_path / "pwned").exists()
