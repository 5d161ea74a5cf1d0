"""One error hierarchy, mapped to exit codes in one place: a user's mistake exits 2 with its message and no
traceback; a bug exits 1 with its traceback, never dressed up as a mistake in the sweep file."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import textwrap
from pathlib import Path

import orchestrator
import trainables
from tests.helpers import REPO, cli_env, run_cli, tiny_spec, write_spec
from trainables.errors import FairsweepError, UserError

# A plugin module (the spec's `plugins:`) registering two datasets: one whose data is missing, which is the
# user's to fix, and one whose factory has a bug. Both raise ValueErrors, so only the hierarchy tells them apart.
PLUGIN = textwrap.dedent('''
    from trainables.data import DATASETS
    from trainables.data.base import DatasetError


    @DATASETS.register("missing_folder", options={}, doc="a folder dataset whose folder is not there")
    def missing_folder(options):
        raise DatasetError("the image folder /nonexistent/images does not exist; set dataset.options.root")


    @DATASETS.register("buggy_factory", options={}, doc="a dataset whose factory has a bug")
    def buggy_factory(options):
        return int("0x1f")  # a bug: int() of a hex string without base=16 raises ValueError
''')


def _modules() -> list[str]:
    names = []
    for package in (orchestrator, trainables):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            names.append(info.name)
    return names


def test_every_error_class_fairsweep_defines_is_a_fairsweep_error():
    defined = {}
    for name in _modules():
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == name:
                defined[f"{name}.{attr}"] = obj
    assert len(defined) >= 15, sorted(defined)
    outside = sorted(n for n, cls in defined.items() if not issubclass(cls, FairsweepError))
    assert not outside, f"error classes outside the hierarchy (derive them from trainables.errors): {outside}"
    user = {n.rsplit(".", 1)[1] for n, cls in defined.items() if issubclass(cls, UserError)}
    assert {"SpecError", "LaunchError", "StoreError", "StorageError", "UnknownNameError", "QueryError", "MetricError",
            "SweepNotFoundError", "DatasetError", "InterventionError"} <= user
    bugs_or_failures = {n.rsplit(".", 1)[1] for n, cls in defined.items() if not issubclass(cls, UserError)}
    assert {"PretrainingFailedError", "NonFiniteLossError", "CacheError"} <= bugs_or_failures


def _spec_with_plugin(tmp_path: Path, dataset: str) -> tuple[Path, dict[str, str]]:
    (tmp_path / "plugin_datasets.py").write_text(PLUGIN)
    spec = tiny_spec(**{"dataset": {"name": dataset, "options": {}}})
    spec["plugins"] = ["plugin_datasets"]
    env = cli_env()
    env["PYTHONPATH"] = f"{tmp_path}:{REPO}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else f"{tmp_path}:{REPO}"
    return write_spec(tmp_path, spec), env


def test_a_user_mistake_exits_2_with_its_message_and_no_traceback(tmp_path):
    path, env = _spec_with_plugin(tmp_path, "missing_folder")
    proc = run_cli("validate", str(path), cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"fairsweep: error: {path}: dataset.options: got {{}}; the image folder "
                                  "/nonexistent/images does not exist; set dataset.options.root"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_an_internal_error_exits_1_with_its_traceback_not_as_a_spec_error(tmp_path):
    """The factory's ValueError used to become "dataset.options: got {}; invalid literal for int()": a bug
    reported as the user's YAML. It now propagates from build_plan with its traceback."""
    path, env = _spec_with_plugin(tmp_path, "buggy_factory")
    proc = run_cli("validate", str(path), cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "ValueError: invalid literal for int() with base 10: '0x1f'"
    assert 'plugin_datasets.py", line' in proc.stderr and "in buggy_factory" in proc.stderr
    assert "fairsweep: error" not in proc.stderr and "got {}" not in proc.stderr


def test_the_cli_maps_errors_in_one_place():
    """No command turns an error into an exit code itself: only main catches UserError."""
    for name in ("cli.py", "query_cli.py"):
        source = (REPO / "orchestrator" / name).read_text()
        assert "return _fail(" not in source.replace("        return _fail(str(exc))", "", 1), name
    cli = (REPO / "orchestrator" / "cli.py").read_text()
    assert cli.count("except UserError") == 1 and "except ValueError" not in cli
