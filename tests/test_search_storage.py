"""The optuna study as Optuna's own tools see it: named objectives, optuna-dashboard opening what a sweep
writes, and `search.storage` keeping the study in a database instead of the journal file."""
from __future__ import annotations

import json
import pickle
import sqlite3
from pathlib import Path

import pytest

from orchestrator.plan import build_plan
from orchestrator.search import StudySearcher, StudyStorageError, check_study_storage, objective_names
from orchestrator.spec import Objectives, SpecError, parse_spec
from tests.helpers import run_cli, sqlite_uri, tiny_spec, write_spec

OPTUNA = {"type": "optuna", "sampler": "tpe", "budget": 6, "seed": 0}
RANGES = {"axes.intervention": {"kind": "correlation", "magnitudes": {"low": 0.5, "high": 0.95}},
          "finetune.lr": {"low": 1.0e-3, "high": 1.0e-1, "log": True}}
GOOD = {"val_accuracy": 0.7, "val_equalized_odds_difference": 0.2}
NAMES = ["val_accuracy", "val_equalized_odds_difference"]


def _spec(**search):
    return tiny_spec(**{"search": {**OPTUNA, **search}, **RANGES})


def _plan(**search):
    return build_plan(parse_spec(_spec(**search)))


def _db(tmp_path: Path, name: str = "optuna.db") -> str:
    return f"sqlite:///{tmp_path / name}"


# ----------------------------------------------------------------------------- objective names


def test_the_study_names_its_objectives(tmp_path):
    searcher = StudySearcher(_plan(), str(tmp_path / "s.journal"), study_name="s")
    searcher.suggest("t0")
    assert searcher.study.metric_names == NAMES
    restored = pickle.loads(pickle.dumps(searcher))  # reopened from the journal: the names are in it
    assert restored.study.metric_names == NAMES
    # a signed metric is told as its distance from parity, and named so
    assert objective_names(Objectives("auroc", "tpr_difference")) == ["val_auroc", "abs(val_tpr_difference)"]


def _dashboard_get(app, path: str) -> dict:
    from wsgiref.util import setup_testing_defaults

    environ: dict = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = path
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status == ["200 OK"], (status, body[:500])
    return json.loads(body)


@pytest.mark.parametrize("where", ["journal", "sqlite"])
def test_optuna_dashboard_opens_the_sweeps_study_and_shows_the_objective_names(tmp_path, where):
    """What `optuna-dashboard PATH_OR_URL` opens: the dashboard's own storage loader (``wsgi`` resolves the
    argument as its command line does), queried through its HTTP API without a server or a browser."""
    dashboard = pytest.importorskip("optuna_dashboard")
    journal = tmp_path / "tiny" / "optuna_study.journal"
    journal.parent.mkdir()
    plan = _plan(storage=_db(tmp_path)) if where == "sqlite" else _plan()
    searcher = StudySearcher(plan, str(journal), study_name="tiny")
    searcher.suggest("t0")
    searcher.on_trial_complete("t0", GOOD)
    searcher.suggest("t1")
    app = dashboard.wsgi(str(journal) if where == "journal" else _db(tmp_path))
    studies = _dashboard_get(app, "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["tiny"]
    assert studies[0]["directions"] == ["maximize", "minimize"]
    detail = _dashboard_get(app, f"/api/studies/{studies[0]['study_id']}")
    assert detail["objective_names"] == NAMES
    assert [t["values"] for t in detail["trials"] if t.get("values")] == [[0.7, 0.2]]
    assert len(detail["trials"]) == 2


# ----------------------------------------------------------------------------- search.storage in the spec


def test_the_spec_accepts_database_urls():
    for url in ("sqlite:///study.db", "sqlite:////abs/study.db", "postgresql://optuna@db.internal/studies",
                "postgresql+psycopg2://optuna@db:5432/studies?sslmode=require", "mysql+pymysql://optuna@db/studies"):
        assert parse_spec(_spec(storage=url)).search.storage == url
    assert parse_spec(_spec()).search.storage is None


@pytest.mark.parametrize("value, fragment", [
    ("redis://localhost:6379/0", "SQLAlchemy's form"),
    ("/data/study.db", "sqlite:////ABSOLUTE/PATH.db"),
    ("sqlite://", "in-memory database would not survive a resume"),
    ("sqlite:///:memory:", "in-memory database would not survive a resume"),
    ("sqlite:///folder/", "lives in a file"),
    ("postgresql://optuna@db", "names no database"),
    ("sqlite:///a\nb.db", "SQLAlchemy's form"),
    (42, "SQLAlchemy's form"),
])
def test_bad_storage_urls_name_the_field_and_the_fix(value, fragment):
    with pytest.raises(SpecError) as info:
        parse_spec(_spec(storage=value))
    assert info.value.path == "search.storage" and fragment in str(info.value)


def test_a_password_in_the_url_is_refused_and_never_printed():
    with pytest.raises(SpecError) as info:
        parse_spec(_spec(storage="postgresql://optuna:hunter2@db/studies"))
    message = str(info.value)
    assert info.value.path == "search.storage" and "hunter2" not in message
    assert "postgresql://optuna:***@db/studies" in message and "~/.pgpass" in message


def test_storage_is_only_for_the_optuna_search():
    with pytest.raises(SpecError, match=r"search.storage: got 'sqlite:///x.db'; only used with type: optuna"):
        parse_spec(tiny_spec(search={"type": "grid", "storage": "sqlite:///x.db"}))


# ----------------------------------------------------------------------------- the searcher on a database


def test_a_restored_searcher_continues_the_same_sqlite_study(tmp_path):
    """As the journal case (test_search): after Tune's last save and a dead driver, the restored
    searcher reopens the same study from the database, fails the orphan and keeps counting."""
    import optuna

    url = _db(tmp_path)
    journal = tmp_path / "unused.journal"
    searcher = StudySearcher(_plan(storage=url), str(journal), study_name="s")
    for i in range(3):
        searcher.suggest(f"t{i}")
    searcher.on_trial_complete("t0", GOOD)
    searcher.save(str(tmp_path / "state.json"))  # Tune's last save: t1, t2 in flight
    searcher.suggest("t3")  # asked after the last save, then the driver dies
    restored = pickle.loads(pickle.dumps(searcher))
    restored.restore(str(tmp_path / "state.json"))
    assert restored.finished() == 1
    assert sorted(t.state.name for t in restored.study.trials) == ["COMPLETE", "FAIL", "RUNNING", "RUNNING"]
    restored.on_trial_complete("t1", {"val_accuracy": 0.6, "val_equalized_odds_difference": 0.1})
    assert restored.finished() == 2
    assert restored.suggest("t4") is not None  # and it goes on proposing
    assert not journal.exists() and (tmp_path / "optuna.db").exists()
    study = optuna.load_study(study_name="s", storage=url)  # any Optuna program sees the same study
    assert [t.state.name for t in study.trials].count("COMPLETE") == 2 and len(study.trials) == 5
    assert study.metric_names == NAMES


def test_a_relative_sqlite_path_is_fixed_where_the_sweep_is_launched(tmp_path, monkeypatch):
    launched, elsewhere = tmp_path / "launched", tmp_path / "elsewhere"
    launched.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(launched)
    searcher = StudySearcher(_plan(storage="sqlite:///study.db"), "unused.journal", study_name="s")
    searcher.suggest("t0")
    monkeypatch.chdir(elsewhere)  # resume runs from another directory
    restored = pickle.loads(pickle.dumps(searcher))
    assert len(restored.study.trials) == 1 and restored.storage_url == f"sqlite:///{launched / 'study.db'}"
    assert not (elsewhere / "study.db").exists()


def test_another_launchs_searcher_refuses_the_study(tmp_path):
    url = _db(tmp_path)
    first = StudySearcher(_plan(storage=url), "unused", study_name="s")
    first.suggest("t0")
    second = StudySearcher(_plan(storage=url), "unused", study_name="s")  # a new launch, same name and database
    with pytest.raises(StudyStorageError, match="already holds a study named 's' from another launch"):
        second.study
    with pytest.raises(StudyStorageError):  # and stays refused: the foreign study was never kept
        second.suggest("t0")
    assert len(pickle.loads(pickle.dumps(first)).study.trials) == 1


# ----------------------------------------------------------------------------- the check before a launch


def test_check_before_launch_accepts_a_new_file_without_creating_it(tmp_path):
    spec = parse_spec(_spec(storage=_db(tmp_path)))
    check_study_storage(spec)
    assert not (tmp_path / "optuna.db").exists()
    check_study_storage(parse_spec(_spec()))  # the journal: nothing to check


def test_check_before_launch_refuses_a_missing_folder_and_another_programs_database(tmp_path):
    with pytest.raises(StudyStorageError, match=r"the folder .*nowhere does not exist"):
        check_study_storage(parse_spec(_spec(storage=f"sqlite:///{tmp_path / 'nowhere' / 'x.db'}")))
    with sqlite3.connect(tmp_path / "mlflow.db") as db:  # e.g. MLflow's store, which the study must not share
        db.execute("CREATE TABLE experiments (id INTEGER)")
    with pytest.raises(StudyStorageError, match=r"is an SQLite database but not an Optuna storage \(its tables: "
                                                r"experiments\)"):
        check_study_storage(parse_spec(_spec(storage=sqlite_uri(tmp_path))))


def test_check_before_launch_refuses_a_study_of_the_same_name(tmp_path):
    import optuna

    url = _db(tmp_path)
    optuna.create_study(study_name="tiny", storage=url, directions=["maximize", "minimize"])
    with pytest.raises(StudyStorageError) as info:
        check_study_storage(parse_spec(_spec(storage=url)))
    message = str(info.value)
    assert message.startswith(f"search.storage {url}: already holds an Optuna study named 'tiny' (0 trials)")
    assert "fairsweep resume tiny" in message and "optuna delete-study" in message
    check_study_storage(parse_spec({**_spec(storage=url), "name": "other"}))  # another name is free


def test_check_before_launch_says_what_to_do_about_an_unreachable_server():
    with pytest.raises(StudyStorageError) as info:
        check_study_storage(parse_spec(_spec(storage="postgresql://optuna@127.0.0.1:1/studies")))
    message = str(info.value)
    assert message.startswith("search.storage postgresql://optuna@127.0.0.1:1/studies: ")
    assert "pip install psycopg2-binary" in message or "cannot open the Optuna storage" in message


def test_launch_refuses_a_database_holding_the_sweeps_study_before_anything_is_written(tmp_path):
    import optuna

    url = _db(tmp_path)
    optuna.create_study(study_name="tiny", storage=url, directions=["maximize", "minimize"])
    spec = write_spec(tmp_path, _spec(storage=url))
    out = run_cli("launch", str(spec), "--storage", str(tmp_path / "results"), "--tracking-uri", sqlite_uri(tmp_path),
                  cwd=tmp_path, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "search.storage" in out.stderr and "already holds an Optuna study named 'tiny'" in out.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()
