"""Where a sweep lives: the tracking URI and the storage folder resolve one way for every command, and a
flag that cannot be used is the same StorageError (exit 2, what to pass instead) whichever command got it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.storage import (SWEEP_RECORD, StorageError, artifact_location, experiment_path, read_sweep_record,
                                  resolve_storage, resolve_tracking_uri, sqlite_path, write_sweep_record)
from tests.helpers import sqlite_uri, tiny_spec, write_spec

NOT_A_URI = "tracking URI 'mlflow.db' is not a URI; use sqlite:///PATH.db or http://HOST:PORT"
NOT_A_PATH = "--storage 's3://bucket/results': use a filesystem path"


def test_tracking_uris_resolve_to_absolute_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path / 'sub' / 'x.db'}"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5000"  # the flag, else the environment
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    with pytest.raises(StorageError, match=NOT_A_URI):
        resolve_tracking_uri("mlflow.db")


def test_an_sqlite_store_keeps_its_artifacts_beside_it_and_a_server_decides_for_itself(tmp_path):
    uri = sqlite_uri(tmp_path)
    assert sqlite_path(uri) == tmp_path / "mlflow.db"
    assert artifact_location(uri) == (tmp_path / "mlartifacts").as_uri()
    assert sqlite_path("http://127.0.0.1:5000") is None and artifact_location("http://127.0.0.1:5000") is None


def test_storage_resolves_to_an_absolute_folder_and_a_sweep_to_one_folder_in_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_storage(None) == str(tmp_path / "fairsweep_results")
    assert experiment_path(resolve_storage("r/"), "tiny") == f"{tmp_path / 'r'}/tiny"
    with pytest.raises(StorageError, match=NOT_A_PATH):
        resolve_storage("s3://bucket/results")
    with pytest.raises(StorageError, match=r"sweep name '\.\./x' is not a sweep name"):
        experiment_path(str(tmp_path), "../x")


def test_a_sweep_record_reads_back_what_was_written(tmp_path):
    path = experiment_path(str(tmp_path), "tiny")
    with pytest.raises(StorageError, match=f"no fairsweep sweep at {path} \\(no {SWEEP_RECORD}\\)"):
        read_sweep_record(path)
    record = {"spec": tiny_spec(), "tracking_uri": sqlite_uri(tmp_path), "cache_root": "c", "cwd": str(tmp_path)}
    write_sweep_record(path, record)
    assert read_sweep_record(path) == record


@pytest.fixture
def main(monkeypatch):
    """``cli.main`` in this process; the variables a command sets for itself are restored afterwards."""
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    from orchestrator import cli

    return cli.main


def _args(command: list[str], tmp_path: Path) -> list[str]:
    """The command with its placeholders filled: SPEC a sweep file, RESULTS a storage folder holding sweep
    'tiny', URI an SQLite store that does not exist yet."""
    spec = str(write_spec(tmp_path, tiny_spec()))
    results = tmp_path / "results"
    (results / "tiny").mkdir(parents=True)
    (results / "tiny" / SWEEP_RECORD).write_text(json.dumps({"spec": tiny_spec(), "tracking_uri": "sqlite:///x.db"}))
    values = {"SPEC": spec, "RESULTS": str(results), "URI": sqlite_uri(tmp_path)}
    return [values.get(a, a) for a in command]


@pytest.mark.parametrize("command", [
    ["launch", "SPEC", "--tracking-uri", "mlflow.db"],
    ["status", "tiny", "--storage", "RESULTS", "--tracking-uri", "mlflow.db"],
    ["report", "tiny", "--tracking-uri", "mlflow.db", "--out", "report"],
    ["pareto", "tiny", "--tracking-uri", "mlflow.db"],
    ["best", "tiny", "--tracking-uri", "mlflow.db", "--max-drop", "0.01"],
])
def test_every_command_refuses_a_tracking_uri_that_is_not_one(tmp_path, monkeypatch, capsys, main, command):
    monkeypatch.chdir(tmp_path)
    assert main(_args(command, tmp_path)) == 2
    assert NOT_A_URI in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results", "sweep.yaml"]  # nothing written


@pytest.mark.parametrize("command", [["status", "tiny", "--tracking-uri", "URI"], ["resume", "tiny", "--tracking-uri", "URI"],
                                     ["cache", "list"], ["launch", "SPEC", "--tracking-uri", "URI"]])
def test_every_command_refuses_a_storage_url(tmp_path, monkeypatch, capsys, main, command):
    monkeypatch.chdir(tmp_path)
    assert main([*_args(command, tmp_path), "--storage", "s3://bucket/results"]) == 2
    assert NOT_A_PATH in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results", "sweep.yaml"]  # no store, nothing new
