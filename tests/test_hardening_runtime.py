"""The runtime half of hardening: an unusable tracking store, two drivers of one sweep, readers racing
the driver on SQLite, resources no node has, and names that point outside the storage folder. Each
answer is exit 2 with a message that says what to do, and nothing written; or, for readers, a driver
that does not notice them."""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.driverlock import LOCK_FILE, DriverLock, SweepBusyError, lock_holder
from orchestrator.storage import SWEEP_RECORD
from tests.helpers import (REPO, UNREACHABLE_URI, cli_env, finish_cli, kill_session, run_cli, sqlite_uri, start_cli,
                           tiny_spec, write_spec)

DOWN = UNREACHABLE_URI
SMALL = {"axes.paradigm": ["scratch"], "axes.freeze_depth": [0]}  # 2 trials, no pretraining job


def _record(storage: Path, spec: dict, tracking_uri: str) -> Path:
    """A sweep folder as launch leaves it (the record status and resume read), without running anything."""
    folder = storage / spec["name"]
    folder.mkdir(parents=True)
    (folder / SWEEP_RECORD).write_text(json.dumps({"spec": spec, "tracking_uri": tracking_uri,
                                                   "cache_root": str(storage / "_pretrain_cache"), "cwd": str(storage)}))
    return folder


def _timed(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    out = run_cli(*args, cwd=cwd, env=env, timeout=timeout)
    return out, time.monotonic() - start


def _usage_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    text = out.stdout[-2000:] + out.stderr[-3000:]
    assert out.returncode == 2, text
    assert "Traceback" not in out.stderr, text
    for needle in needles:
        assert needle in out.stderr, text


# -- an unreachable server ----------------------------------------------------------------------
@pytest.mark.parametrize("command", ["launch", "status", "report"])
def test_an_unreachable_tracking_server_exits_2_within_seconds(tmp_path, command):
    spec = tiny_spec()
    args = {"launch": ["launch", str(write_spec(tmp_path, spec)), "--storage", str(tmp_path / "results")],
            "status": ["status", "tiny", "--storage", str(tmp_path / "results")],
            "report": ["report", "tiny", "--out", str(tmp_path / "report")]}[command]
    if command == "status":
        _record(tmp_path / "results", spec, DOWN)
    out, seconds = _timed(*args, "--tracking-uri", DOWN, cwd=tmp_path)
    _usage_error(out, f"cannot reach the MLflow tracking server at {DOWN}", "mlflow server")
    # MLflow alone retries for minutes; the bound leaves room for the CLI's start on a machine loaded by a
    # test file running beside this one (make test runs two)
    assert seconds < 30, f"{command} took {seconds:.1f} s"
    if command == "launch":
        assert not (tmp_path / "results").exists()
    assert not (tmp_path / "report").exists()


# -- an SQLite file that cannot be used ------------------------------------------------------------
@pytest.mark.parametrize("command", ["launch", "status", "report"])
def test_a_corrupt_sqlite_store_exits_2_and_is_left_alone(tmp_path, command):
    spec = tiny_spec()
    db = tmp_path / "mlflow.db"
    junk = b"this is not an sqlite file\x00\xff" * 200
    db.write_bytes(junk)
    args = {"launch": ["launch", str(write_spec(tmp_path, spec)), "--storage", str(tmp_path / "results")],
            "status": ["status", "tiny", "--storage", str(tmp_path / "results")],
            "report": ["report", "tiny", "--out", str(tmp_path / "report")]}[command]
    if command == "status":
        _record(tmp_path / "results", spec, sqlite_uri(tmp_path))
    out, seconds = _timed(*args, "--tracking-uri", sqlite_uri(tmp_path), cwd=tmp_path)
    _usage_error(out, f"{db} is not a readable SQLite database", f"mv {db} {db}.bad")
    assert db.read_bytes() == junk
    if command == "launch":
        assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db.lock").exists()


def _mlflow_store(tmp_path: Path) -> str:
    uri = sqlite_uri(tmp_path)
    MlflowClient(uri).search_experiments()  # creates the store
    return uri


def test_a_store_locked_longer_than_the_bound_exits_2_naming_the_holder(tmp_path):
    uri = _mlflow_store(tmp_path)
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # readers and writers both wait on this
    try:
        out, seconds = _timed("launch", str(write_spec(tmp_path, tiny_spec(**SMALL))), "--tracking-uri", uri,
                              "--storage", str(tmp_path / "results"), cwd=tmp_path,
                              env=cli_env(FAIRSWEEP_STORE_LOCK_WAIT_S="2"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    _usage_error(out, "is locked by another process", f"pid {os.getpid()}", "stayed locked for 2 s",
                 "FAIRSWEEP_STORE_LOCK_WAIT_S")
    assert seconds < 60
    assert not (tmp_path / "results").exists()


def test_calls_wait_out_a_lock_released_within_the_bound(tmp_path, monkeypatch):
    from orchestrator import store

    uri = _mlflow_store(tmp_path)
    monkeypatch.setenv(store.LOCK_WAIT_ENV, "60")
    client = store.open_client(uri)
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(1.5, lambda: (holder.execute("ROLLBACK"), holder.close()))
    release.start()
    start = time.monotonic()
    try:
        experiment_id = client.create_experiment("after_the_lock")
    finally:
        release.join()
    assert time.monotonic() - start >= 1.0
    assert client.get_experiment(experiment_id).name == "after_the_lock"

    monkeypatch.setenv(store.LOCK_WAIT_ENV, "0.5")  # and past the bound: the named error, not MLflow's
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(store.StoreLockedError, match="is locked by another process"):
            client.create_experiment("never")
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_one_call_on_a_locked_store_waits_the_bound_not_mlflows_20_s(tmp_path, monkeypatch):
    """MLflow sets SQLite's busy timeout to 20 s per session; a client from open_client sets the bound."""
    from sqlalchemy import event

    from orchestrator import store

    uri = _mlflow_store(tmp_path)
    monkeypatch.setenv(store.LOCK_WAIT_ENV, "0.5")
    client = store.open_client(uri)
    engine = store.sqlalchemy_engine(client._client)
    seen: list[str] = []

    def record(conn, cursor, statement, *args):
        seen.append(statement)

    event.listen(engine, "after_cursor_execute", record)
    try:
        client.search_experiments()
        monkeypatch.setenv(store.LOCK_WAIT_ENV, "300")  # read per session: capped at MLflow's own 20 s
        client.search_experiments()
    finally:
        event.remove(engine, "after_cursor_execute", record)
    timeouts = [s for s in seen if s.startswith("PRAGMA busy_timeout")]
    assert timeouts == ["PRAGMA busy_timeout = 500;", "PRAGMA busy_timeout = 20000;"], timeouts
    store.open_client(uri)  # a second client of the same URI shares the engine: the rewrite is not doubled
    assert sum(1 for fn in engine.dispatch.before_cursor_execute if fn is store._bounded_busy_timeout) == 1


def test_a_schema_built_ahead_appears_whole_and_only_once_installed(tmp_path):
    """launch builds a new store's schema while Ray starts (SchemaAhead): the database shows up complete, at
    install, and a discarded one (a refused launch) leaves nothing behind."""
    from orchestrator import store

    uri, db = sqlite_uri(tmp_path), tmp_path / "mlflow.db"
    ahead = store.SchemaAhead(uri)
    ahead._thread.join()  # built, and still private
    assert not db.exists() and [p.name for p in tmp_path.iterdir()] == [f".mlflow.db.ahead-{os.getpid()}"]
    ahead.install()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "mlflow.db.lock"]
    assert [e.name for e in store.open_client(uri).search_experiments()] == ["Default"]

    other = tmp_path / "other"
    other.mkdir()
    store.SchemaAhead(sqlite_uri(other)).discard()
    assert list(other.iterdir()) == []

    ahead = store.SchemaAhead(sqlite_uri(other))  # another program creates the store meanwhile: its store stays
    ahead._thread.join()
    subprocess.run([sys.executable, "-c", "from orchestrator.store import open_client; "
                    f"open_client({sqlite_uri(other)!r}, create=True).create_experiment('theirs')"], check=True,
                   cwd=REPO, env=cli_env(), timeout=120)
    ahead.install()
    assert "theirs" in [e.name for e in store.open_client(sqlite_uri(other)).search_experiments()]
    assert sorted(p.name for p in other.iterdir()) == ["mlflow.db", "mlflow.db.lock"]


def test_the_schema_thread_keeps_the_gil_slices_short_only_while_it_runs(tmp_path):
    """Ray's start in the main thread must not wait out 5 ms slices of the migrations: the slices are short
    from the thread's start to its end, then what they were."""
    from orchestrator import store

    before = sys.getswitchinterval()
    ahead = store.SchemaAhead(sqlite_uri(tmp_path))
    assert sys.getswitchinterval() == pytest.approx(min(before, store.SCHEMA_SWITCH_INTERVAL_S))
    ahead.install()
    assert sys.getswitchinterval() == pytest.approx(before)
    assert [e.name for e in store.open_client(sqlite_uri(tmp_path)).search_experiments()] == ["Default"]
    store.SchemaAhead(sqlite_uri(tmp_path)).discard()  # an existing store: no thread, the slices untouched
    assert sys.getswitchinterval() == pytest.approx(before)


# -- storage and names -------------------------------------------------------------------------------
def test_an_unusable_storage_path_exits_2(tmp_path):
    spec = write_spec(tmp_path, tiny_spec())
    (tmp_path / "a_file").write_text("x")
    for storage in ("/proc/x", str(tmp_path / "a_file" / "results")):
        out = run_cli("launch", str(spec), "--storage", storage, "--tracking-uri", sqlite_uri(tmp_path),
                      cwd=tmp_path, timeout=300)
        _usage_error(out, f"--storage {storage}", "pass --storage a folder this user can write")
    assert not (tmp_path / "mlflow.db").exists()


def test_names_that_leave_the_storage_folder_are_refused(tmp_path):
    spec = tiny_spec()
    outside = _record(tmp_path / "results", dict(spec, name="x"), sqlite_uri(tmp_path))  # a real sweep, elsewhere
    storage = tmp_path / "S"
    storage.mkdir()
    for args in (["status", "../results/x"], ["status", "a/b"], ["status", ".."], ["resume", "../results/x"]):
        out = run_cli(*args, "--storage", str(storage), cwd=tmp_path, timeout=300)
        _usage_error(out, f"sweep name {args[1]!r} is not a sweep name")
    assert sorted(p.name for p in outside.iterdir()) == [SWEEP_RECORD]  # untouched, and no lock taken there


# -- one sweep, one driver ---------------------------------------------------------------------------
_HOLD = textwrap.dedent("""
    import sys, time
    from orchestrator.driverlock import DriverLock
    lock = DriverLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def _hold_lock(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("record,needle", [
    ({"spec": {**tiny_spec(), "axes": {**tiny_spec()["axes"], "seed": [2**40]}}, "tracking_uri": "sqlite:///x.db",
      "cache_root": "c"}, "holds a spec this fairsweep refuses"),  # written when the bounds were looser
    ({"tracking_uri": "sqlite:///x.db"}, "not a sweep record this fairsweep can read"),  # damaged
])
def test_status_and_resume_of_an_unreadable_sweep_record_exit_2(tmp_path, record, needle):
    folder = tmp_path / "results" / "tiny"
    folder.mkdir(parents=True)
    (folder / SWEEP_RECORD).write_text(json.dumps(record))
    for command in ("status", "resume"):
        out = run_cli(command, "tiny", "--storage", str(tmp_path / "results"), cwd=tmp_path, timeout=120)
        assert out.returncode == 2 and "Traceback" not in out.stderr, (command, out.stderr[-2000:])
        if command == "status" or "spec" not in record:
            assert needle in out.stderr, (command, out.stderr)


def test_a_held_sweep_refuses_resume_naming_the_holder_but_not_status(tmp_path):
    spec = tiny_spec()
    folder = _record(tmp_path / "results", spec, sqlite_uri(tmp_path))
    holder = _hold_lock(folder)
    try:
        assert lock_holder(folder).startswith(f"{socket.gethostname()}:{holder.pid} started ")
        out = run_cli("resume", "tiny", "--storage", str(tmp_path / "results"), cwd=tmp_path, timeout=300)
        _usage_error(out, f"already being run by the driver {socket.gethostname()}:{holder.pid}",
                     "fairsweep status tiny")
        status = run_cli("status", "tiny", "--storage", str(tmp_path / "results"), cwd=tmp_path, timeout=300)
        assert status.returncode == 0, status.stderr[-2000:]
        assert lock_holder(folder) is not None  # status neither took nor broke it
    finally:
        kill_session(holder)
        holder.wait()


def test_a_driver_that_died_leaves_no_lock_behind(tmp_path):
    folder = tmp_path / "sweep"
    folder.mkdir()
    holder = _hold_lock(folder)
    with pytest.raises(SweepBusyError, match=f"{socket.gethostname()}:{holder.pid}"):
        DriverLock(folder).acquire()
    kill_session(holder)  # SIGKILL: no cleanup ran, the file still names it
    holder.wait()
    assert str(holder.pid) in (folder / LOCK_FILE).read_text() and lock_holder(folder) is None
    lock = DriverLock(folder)
    lock.acquire()
    try:
        assert (folder / LOCK_FILE).read_text().startswith(f"{socket.gethostname()}:{os.getpid()} started ")
    finally:
        lock.release()
    assert (folder / LOCK_FILE).read_text() == ""


def _check_one_clean_sweep(uri: str, experiment: str, n_trials: int) -> None:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    kinds = [r.data.tags.get("fairsweep.kind") for r in runs]
    assert kinds.count("sweep") == 1 and kinds.count("trial") == n_trials, kinds
    trials = [r for r in runs if r.data.tags.get("fairsweep.kind") == "trial"]
    assert len({r.data.tags["fairsweep.trial_key"] for r in trials}) == n_trials
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]


@pytest.mark.slow
@pytest.mark.parametrize("store", ["existing", "fresh"])
def test_two_launches_of_one_sweep_run_it_once(tmp_path, store):
    uri = _mlflow_store(tmp_path) if store == "existing" else sqlite_uri(tmp_path)
    spec = write_spec(tmp_path, tiny_spec(**SMALL))
    args = ("launch", str(spec), "--tracking-uri", uri, "--storage", str(tmp_path / "results"), "--quiet")
    first, second = start_cli(*args, cwd=tmp_path), start_cli(*args, cwd=tmp_path)
    try:
        outs = {first.pid: finish_cli(first, timeout=900), second.pid: finish_cli(second, timeout=900)}
    finally:
        kill_session(first)
        kill_session(second)
    (winner, won), (loser, lost) = sorted(outs.items(), key=lambda kv: kv[1].returncode)
    assert won.returncode == 0, won.stdout[-2000:] + won.stderr[-3000:]
    _usage_error(lost, f"already being run by the driver {socket.gethostname()}:{winner} started ")
    _check_one_clean_sweep(uri, "tiny", 2)
    assert lock_holder(tmp_path / "results" / "tiny") is None  # released at the end


# -- readers on the driver's SQLite file ----------------------------------------------------------
_READER = textwrap.dedent("""
    import json, os, sys, time
    from mlflow.tracking import MlflowClient
    from orchestrator.store import open_client
    db, uri, stop, report, mode = sys.argv[1:6]
    reads, errors, first = 0, [], None
    while not os.path.exists(stop):
        if not os.path.exists(db):
            time.sleep(0.001)  # polls, so it opens the file the moment it appears
            continue
        try:
            if mode == "raw":  # what `mlflow ui` or a script does: MLflow's own client, no fairsweep lock
                client = MlflowClient(uri)
            else:  # what `fairsweep status` and the queries do
                client = open_client(uri)
            client.search_runs([e.experiment_id for e in client.search_experiments()] or ["0"], max_results=50)
            reads += 1
            first = first or time.time()
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
    with open(report, "w") as f:
        json.dump({"reads": reads, "errors": errors[:20], "n_errors": len(errors), "first": first}, f)
""")


@pytest.mark.slow
def test_readers_polling_from_before_the_store_exists_do_not_disturb_the_driver(tmp_path):
    db, uri, stop = tmp_path / "mlflow.db", sqlite_uri(tmp_path), tmp_path / "stop"
    readers = {mode: subprocess.Popen([sys.executable, "-c", _READER, str(db), uri, str(stop), str(tmp_path / f"{mode}.json"),
                                       mode], cwd=REPO, env=cli_env(), start_new_session=True)
               for mode in ("raw", "fairsweep")}
    try:
        time.sleep(2)
        assert not db.exists()
        out = run_cli("launch", str(write_spec(tmp_path, tiny_spec(**SMALL))), "--tracking-uri", uri,
                      "--storage", str(tmp_path / "results"), "--quiet", cwd=tmp_path, timeout=900)
        ended = time.time()
    finally:
        stop.touch()
        for proc in readers.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                kill_session(proc)
                proc.wait()
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "2 trials finished, 0 failed" in out.stdout
    _check_one_clean_sweep(uri, "tiny", 2)
    for mode in readers:
        seen = json.loads((tmp_path / f"{mode}.json").read_text())
        assert seen["reads"] > 0 and seen["first"] < ended, (mode, seen)  # they really read while it ran


# -- resources no node has -----------------------------------------------------------------------------
@pytest.mark.slow
def test_unschedulable_resources_exit_2_and_write_nothing(tmp_path):
    spec = write_spec(tmp_path, tiny_spec(**SMALL, **{"resources.gpus_per_trial": 1000}))
    out = run_cli("launch", str(spec), "--tracking-uri", sqlite_uri(tmp_path), "--storage", str(tmp_path / "results"),
                  cwd=tmp_path, timeout=600)
    _usage_error(out, "resources.gpus_per_trial = 1000 but the largest node has")
    assert sorted(p.name for p in tmp_path.iterdir()) == [spec.name]  # no results, mlflow.db, lock or artifacts


@pytest.mark.slow
def test_a_store_locked_mid_sweep_stops_it_with_exit_2_and_resume_finishes_it(tmp_path):
    uri, storage = sqlite_uri(tmp_path), str(tmp_path / "results")
    spec = write_spec(tmp_path, tiny_spec(**SMALL, **{"finetune.epochs": 3}))
    env = cli_env(FAIRSWEEP_STORE_LOCK_WAIT_S="3")
    proc = start_cli("launch", str(spec), "--tracking-uri", uri, "--storage", storage, "--quiet", cwd=tmp_path, env=env)
    holder = None
    try:
        deadline = time.monotonic() + 600
        while holder is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                exp = MlflowClient(uri).get_experiment_by_name("tiny") if (tmp_path / "mlflow.db").exists() else None
                running = exp and MlflowClient(uri).search_runs(
                    [exp.experiment_id], "tags.`fairsweep.kind` = 'trial' AND attributes.status = 'RUNNING'")
            except Exception:  # noqa: BLE001 - the store is being created
                running = None
            if running:  # a trial is in flight: the driver will write its results soon, and must wait
                holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
                holder.execute("BEGIN EXCLUSIVE")
        out = finish_cli(proc, timeout=600)  # held until the driver gives up
    finally:
        if holder is not None:
            holder.execute("ROLLBACK")
            holder.close()
        kill_session(proc)
    assert holder is not None, "no trial was ever seen running"
    text = out.stdout[-2000:] + out.stderr[-3000:]
    assert out.returncode == 2, text
    assert "is locked by another process" in out.stderr and f"fairsweep resume tiny --storage {storage}" in out.stderr, text

    again = run_cli("resume", "tiny", "--storage", storage, "--quiet", cwd=tmp_path, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    _check_one_clean_sweep(uri, "tiny", 2)
