"""Habits users bring from other command-line tools: --version, help on every flag, the exit codes in
--help, --format json, a confirmed `cache clear`, MLFLOW_EXPERIMENT_NAME, and shell completion."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from orchestrator.spec import parse_spec
from tests.helpers import REPO, cli_env, tiny_spec, write_spec

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"


def _env(**extra: str) -> dict[str, str]:
    env = cli_env(**extra)
    if EXPERIMENT_ENV not in extra:
        env.pop(EXPERIMENT_ENV, None)  # the caller's shell must not decide these tests
    return env


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command, with stdin that is not a terminal (as in CI)."""
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env or _env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def in_process(monkeypatch):
    """``cli.main`` in this process, with the environment it may touch restored afterwards."""
    monkeypatch.delenv(EXPERIMENT_ENV, raising=False)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, os.environ.get(name, "1" if "RETRIES" in name else "10"))
    from orchestrator import cli

    return cli.main


# ----------------------------------------------------------------------------- version, help, exit codes


def test_version_is_the_installed_packages(tmp_path):
    out = _cli("--version", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"fairsweep {version('fairsweep')}"


def test_version_falls_back_to_pyproject_when_not_installed(monkeypatch):
    import importlib.metadata
    import tomllib

    from orchestrator.cli import _version

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert _version() == expected


def test_help_lists_the_exit_codes_and_imports_nothing_heavy(tmp_path):
    code = ("import sys\nfrom orchestrator.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as exc:\n"
            "    assert exc.code == 0, exc.code\n"
            "print('HEAVY', sorted(m for m in ('torch', 'ray', 'mlflow', 'optuna', 'pandas', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    for line in ("0    done", "1    the sweep ran but some trials failed", "2    bad input", "130  interrupted"):
        assert line in out.stdout, line
    assert "spec `experiment:` > MLFLOW_EXPERIMENT_NAME > the sweep's name" in " ".join(out.stdout.split())


def test_every_argument_of_every_command_has_help():
    from orchestrator.cli import _parser

    parser = _parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"fairsweep {name}: {action.dest}" for name, sub in subparsers.choices.items()
               for action in sub._actions if not action.help or action.help == argparse.SUPPRESS]
    missing += [f"fairsweep: {a.dest}" for a in parser._actions
                if not isinstance(a, argparse._SubParsersAction) and not a.help]
    assert not missing
    assert set(subparsers.choices) >= {"launch", "resume", "status", "report", "paradigms", "pareto", "best",
                                       "compare", "validate", "cache"}


# ----------------------------------------------------------------------------- --format json


def test_validate_json_is_the_plan_and_the_table_stays_the_default(tmp_path):
    spec = write_spec(tmp_path, tiny_spec())
    out = _cli("validate", str(spec), "--format", "json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["name"] == "tiny" and plan["experiment"] == "tiny" and plan["search"] == {"type": "grid"}
    assert plan["n_trials"] == 8 == len(plan["trials"]) == len({t["key"] for t in plan["trials"]})
    assert {t["config"]["paradigm"] for t in plan["trials"]} == {"scratch", "supervised"}
    assert [j["paradigm"] for j in plan["pretrain_jobs"]] == ["supervised"]
    assert plan["objectives"] == {"performance": "accuracy", "fairness": "equalized_odds_difference"}
    table = _cli("validate", str(spec), cwd=tmp_path)
    assert table.returncode == 0 and table.stdout.startswith("sweep 'tiny' (MLflow experiment 'tiny')")
    assert "trials: 8" in table.stdout
    bad = _cli("validate", str(write_spec(tmp_path, tiny_spec(**{"axes.seed": [-1]}), "bad.yaml")), "--format", "json",
               cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout == "" and "axes.seed[0]" in bad.stderr


def test_status_json_is_one_record_with_the_resume_command(tmp_path):
    storage = (tmp_path / "results").resolve()
    (storage / "tiny").mkdir(parents=True)
    record = {"spec": tiny_spec(), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
              "cache_root": str(storage / "_pretrain_cache"), "cwd": str(tmp_path)}
    (storage / "tiny" / "fairsweep_sweep.json").write_text(json.dumps(record))
    out = _cli("status", "tiny", "--storage", str(storage), "--format", "json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert (status["name"], status["total"], status["finished"], status["pending"], status["errored"]) == ("tiny", 8, 0, 8, 0)
    assert status["driver"] == "none" and status["front_size"] is None and status["tune_states"] == {}
    assert status["resume"] == f"fairsweep resume tiny --storage {storage}" and status["retry"] is None
    assert not (tmp_path / "mlflow.db").exists()  # status only reads
    table = _cli("status", "tiny", "--storage", str(storage), cwd=tmp_path)
    assert table.returncode == 0 and "trials: 8 planned | finished 0" in table.stdout
    missing = _cli("status", "nope", "--storage", str(storage), "--format", "json", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stdout == "" and "no fairsweep sweep at" in missing.stderr


def test_paradigms_json_lists_every_paradigm_with_its_options(in_process, capsys):
    from trainables.paradigms import PARADIGMS

    assert in_process(["paradigms", "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in records] == [*PARADIGMS.names(), "file:PATH"]
    for r in records[:-1]:
        paradigm = PARADIGMS.get(r["name"])
        assert r["doc"] == paradigm.doc and r["pretrains"] == paradigm.pretrains
        assert [o["name"] for o in r["options"]] == list(paradigm.options)
        assert all(o["default"] == paradigm.options[o["name"]].default and o["doc"] for o in r["options"])


# ----------------------------------------------------------------------------- cache list / clear


def _cache_with_two_entries(tmp_path: Path):
    import torch

    from trainables.pretrain_cache import PretrainCache

    root = tmp_path / "cache"
    cache = PretrainCache(root)
    for key in ("aaaa", "bbbb"):
        cache.write(key, {"w": torch.zeros(4)}, {"backbone": "test_resnet", "paradigm": "supervised",
                                                 "created": "2024-01-01T00:00:00"})
    return root, cache


def _on_a_terminal(args: list[str], answer: str, cwd: Path) -> subprocess.CompletedProcess:
    """The command with a pseudo-terminal as stdin, ``answer`` typed into it."""
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=_env(), stdin=slave,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.write(master, answer.encode())
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        os.close(slave)
        os.close(master)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_cache_list_json_and_clearing_everything_needs_a_confirmation(tmp_path):
    root, cache = _cache_with_two_entries(tmp_path)
    out = _cli("cache", "list", "--cache-dir", str(root), "--format", "json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    entries = json.loads(out.stdout)
    assert [(e["key"], e["status"], e["backbone"], e["path"]) for e in entries] == [
        ("aaaa", "ok", "test_resnet", str(root / "aaaa")), ("bbbb", "ok", "test_resnet", str(root / "bbbb"))]
    assert all(e["bytes"] > 0 for e in entries)

    # no terminal (CI, a pipe): refused, nothing asked, nothing removed
    out = _cli("cache", "clear", "--cache-dir", str(root), cwd=tmp_path)
    assert out.returncode == 2
    assert "stdin is not a terminal" in out.stderr and "--yes" in out.stderr and "(2 now)" in out.stderr
    assert [e["key"] for e in cache.entries()] == ["aaaa", "bbbb"]

    # on a terminal: asked; anything but yes keeps them
    out = _on_a_terminal(["cache", "clear", "--cache-dir", str(root)], "n\n", tmp_path)
    assert out.returncode == 2 and "delete all 2 entries" in out.stderr and "nothing removed" in out.stderr
    assert [e["key"] for e in cache.entries()] == ["aaaa", "bbbb"]
    out = _on_a_terminal(["cache", "clear", "--cache-dir", str(root)], "y\n", tmp_path)
    assert out.returncode == 0 and "removed 2 entries" in out.stdout, out.stderr
    assert cache.entries() == []


def test_clearing_one_key_needs_no_confirmation(tmp_path):
    root, cache = _cache_with_two_entries(tmp_path)
    out = _cli("cache", "clear", "--cache-dir", str(root), "--key", "aaaa", cwd=tmp_path)
    assert out.returncode == 0 and "removed 1 entries" in out.stdout, out.stderr
    assert [e["key"] for e in cache.entries()] == ["bbbb"]


# ----------------------------------------------------------------------------- MLFLOW_EXPERIMENT_NAME


def test_validate_takes_the_experiment_from_mlflow_experiment_name(tmp_path):
    spec = write_spec(tmp_path, tiny_spec())
    out = _cli("validate", str(spec), "--format", "json", cwd=tmp_path, env=_env(**{EXPERIMENT_ENV: "team-exp"}))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["experiment"] == "team-exp"


@pytest.mark.parametrize("in_file, in_env, expected", [
    (None, None, "tiny"),  # the sweep's name
    (None, "team-exp", "team-exp"),  # the environment
    ("file-exp", "team-exp", "file-exp"),  # the spec wins
    (None, "", "tiny"),  # empty counts as unset
])
def test_experiment_precedence_is_spec_then_environment_then_name(tmp_path, monkeypatch, capsys, in_process,
                                                                   in_file, in_env, expected):
    spec = write_spec(tmp_path, tiny_spec(**({"experiment": in_file} if in_file else {})))
    if in_env is not None:
        monkeypatch.setenv(EXPERIMENT_ENV, in_env)
    assert in_process(["validate", str(spec), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["experiment"] == expected
    assert in_process(["launch", str(spec), "--dry-run"]) == 0  # launch reads the spec the same way
    assert f"(MLflow experiment {expected!r})" in capsys.readouterr().out


def test_an_unusable_experiment_from_the_environment_names_the_variable(tmp_path, monkeypatch, capsys, in_process):
    monkeypatch.setenv(EXPERIMENT_ENV, "/Users/me/my exp")
    assert in_process(["validate", str(write_spec(tmp_path, tiny_spec()))]) == 2
    err = capsys.readouterr().err
    assert "experiment: got '/Users/me/my exp'" in err and "MLFLOW_EXPERIMENT_NAME" in err and "`experiment:`" in err


def test_the_default_experiment_is_recorded_with_the_spec():
    """Resume and status parse the recorded spec, without the environment: the experiment must be in it."""
    spec = parse_spec(tiny_spec(), default_experiment="team-exp")
    assert spec.experiment == "team-exp" and spec.source["experiment"] == "team-exp"
    assert parse_spec(dict(spec.source)).experiment == "team-exp"
    assert "experiment" not in parse_spec(tiny_spec()).source


def test_queries_default_to_mlflow_experiment_name(tmp_path, monkeypatch, capsys, in_process):
    from mlflow.tracking import MlflowClient

    from orchestrator.store import check_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    check_store(uri, create=True)
    MlflowClient(uri).create_experiment("team-exp")
    assert in_process(["pareto", "tiny", "--tracking-uri", uri]) == 2
    assert "no MLflow experiment 'tiny'" in capsys.readouterr().err  # no variable: the sweep's name
    monkeypatch.setenv(EXPERIMENT_ENV, "team-exp")
    assert in_process(["pareto", "tiny", "--tracking-uri", uri]) == 2
    assert "no sweep 'tiny' in MLflow experiment 'team-exp'" in capsys.readouterr().err
    assert in_process(["best", "tiny", "--max-drop", "0.01", "--tracking-uri", uri, "--experiment", "Default"]) == 2
    assert "no sweep 'tiny' in MLflow experiment 'Default'" in capsys.readouterr().err  # the flag wins


# ----------------------------------------------------------------------------- shell completion


def test_argcomplete_completes_commands_and_flags(tmp_path):
    pytest.importorskip("argcomplete")
    results = {}
    for line in ("fairsweep sta", "fairsweep cache list --fo", "fairsweep status x --format "):
        out_file = tmp_path / "completions"
        env = _env(_ARGCOMPLETE="1", COMP_LINE=line, COMP_POINT=str(len(line)), _ARGCOMPLETE_IFS="\n",
                   _ARGCOMPLETE_STDOUT_FILENAME=str(out_file))
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli"], env=env, cwd=tmp_path,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        results[line] = out_file.read_text().split()
    assert results["fairsweep sta"] == ["status"]
    assert "--format" in results["fairsweep cache list --fo"]
    assert sorted(results["fairsweep status x --format "]) == ["json", "table"]
