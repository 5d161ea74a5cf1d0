"""One way into the MLflow tracking store for every command: a probe that fails at once with what to
do, an SQLite schema no reader can race, and calls that wait out a busy SQLite file within a bound.

Why: MLflow retries an unreachable server for minutes; it builds an SQLite schema in place, in many
non-atomic steps, on whichever process opens the file first (a second opener mid-build breaks both);
and it turns "database is locked" into an exception that would end the driver's Tune loop.

MLflow is imported inside the functions that open or create a store: the probe every command runs
first answers before MLflow, which takes seconds to import, has loaded.
"""
from __future__ import annotations

import fcntl
import functools
import logging
import os
import socket
import sqlite3
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlparse

from orchestrator.storage import sqlite_path
from trainables.errors import UserError

__all__ = ["StoreError", "StoreLockedError", "LOCK_WAIT_ENV", "check_store", "open_client", "lock_wait_s",
           "store_cause", "RetryingClient", "sqlalchemy_engine", "SchemaAhead"]

LOCK_WAIT_ENV = "FAIRSWEEP_STORE_LOCK_WAIT_S"
DEFAULT_LOCK_WAIT_S = 120.0
SCHEMA_WAIT_S = 30.0  # another process building or migrating the schema has this long to finish
PROBE_TIMEOUT_S = 3.0
_LOCKED = ("database is locked", "database table is locked", "database schema is locked")
_SCHEMA_RACE = ("already exists", "duplicate column", "no such table", "out-of-date database schema")

T = TypeVar("T")


class StoreError(UserError, RuntimeError):
    """The tracking store cannot be used as asked; the message says what to do (exit 2)."""


class StoreLockedError(StoreError):
    """An SQLite store stayed locked by another process for longer than the bound."""


def lock_wait_s() -> float:
    """How long a call waits for a locked SQLite store: $FAIRSWEEP_STORE_LOCK_WAIT_S, else 120 s."""
    raw = os.environ.get(LOCK_WAIT_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_LOCK_WAIT_S
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise StoreError(f"{LOCK_WAIT_ENV}={raw!r}: expected a number of seconds >= 0, e.g. {DEFAULT_LOCK_WAIT_S:g}")
    return value


# -- the probe ------------------------------------------------------------------------------------
def check_store(uri: str, *, create: bool) -> None:
    """Fail in seconds, with the fix, when ``uri`` cannot be used: a server that does not accept
    connections; an SQLite file that is missing (``create=False``), cannot be created, is corrupt,
    is not an MLflow store, or stays locked. Writes nothing."""
    path = sqlite_path(uri)
    if path is not None:
        _check_sqlite(path, create=create)
    elif urlparse(uri).scheme in ("http", "https"):
        _check_server(uri)


def _check_server(uri: str) -> None:
    parsed = urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "localhost", port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise StoreError(f"cannot reach the MLflow tracking server at {uri} ({exc}); start it (mlflow server --host "
                         f"127.0.0.1 --port {port} ...), or pass another --tracking-uri / MLFLOW_TRACKING_URI "
                         f"(default: sqlite:///mlflow.db in the working directory)") from None


def _existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path("/")


def _check_sqlite(path: Path, *, create: bool) -> None:
    if not path.exists():
        if not create:
            raise StoreError(f"no MLflow database at {path}; run a sweep first, or pass the --tracking-uri "
                             f"(or MLFLOW_TRACKING_URI) the sweep was tracked in")
        folder = _existing_ancestor(path)
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise StoreError(f"cannot create the MLflow database {path}: {folder} is not a writable folder; pass "
                             f"--tracking-uri sqlite:////A/WRITABLE/PATH/mlflow.db, or an http:// tracking server")
        return
    if path.is_dir():
        raise StoreError(f"--tracking-uri sqlite:///{path}: {path} is a folder, not an SQLite file; name the "
                         f"database file, e.g. sqlite:///{path / 'mlflow.db'}")
    wait = lock_wait_s()
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=wait)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        if _is_locked(exc):
            raise StoreLockedError(_locked_message(path, wait)) from None
        if "unable to open" in str(exc):
            raise StoreError(f"cannot open the MLflow database {path} ({exc}); check that this user may read and "
                             f"write it and its folder, or pass another --tracking-uri") from None
        raise StoreError(f"{path} is not a readable SQLite database ({exc}): it is damaged or another kind of file; "
                         f"move it aside (mv {path} {path}.bad) to start a new store there, or pass the --tracking-uri "
                         f"of the right one") from None
    if tables and not {"experiments", "alembic_version"} & tables:
        raise StoreError(f"{path} is an SQLite database but not an MLflow store (its tables: "
                         f"{', '.join(sorted(tables)[:8])}); pass --tracking-uri sqlite:///ANOTHER.db")


def _holders(path: Path, budget_s: float = 5.0) -> list[str]:
    """'pid (name)' of the local processes that have ``path`` open: the likely holders of its lock."""
    try:
        import psutil  # optional (the test extra); without it the holders go unnamed
    except ImportError:
        return []
    target, found, deadline = str(path.resolve()), [], time.monotonic() + budget_s
    for proc in psutil.process_iter(["pid", "name"]):
        if time.monotonic() > deadline:
            break
        if proc.pid == os.getpid():
            continue
        try:
            if any(f.path == target for f in proc.open_files()):
                found.append(f"pid {proc.pid} ({proc.info['name']})")
        except (psutil.Error, OSError):
            continue
    return found


def _locked_message(path: Path, wait: float) -> str:
    holders = _holders(path)
    held = f" (open in {', '.join(holders[:5])})" if holders else ""
    return (f"the MLflow database {path} is locked by another process{held} and stayed locked for {wait:g} s: an open "
            f"write transaction (a sqlite3 shell, a script, a stuck program) blocks every reader and writer; end it "
            f"(commit, or close that program) and run the command again, or wait longer with {LOCK_WAIT_ENV}=SECONDS; "
            f"for many concurrent writers use an MLflow server (--tracking-uri http://HOST:PORT)")


# -- errors ---------------------------------------------------------------------------------------
def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def _is_locked(exc: BaseException) -> bool:
    return any(any(m in str(e) for m in _LOCKED) for e in _chain(exc))


def _is_schema_race(exc: BaseException) -> bool:
    return any(any(m in str(e) for m in _SCHEMA_RACE) for e in _chain(exc))


def store_cause(exc: BaseException) -> StoreError | None:
    """The StoreError behind ``exc`` (e.g. raised in a Tune callback and wrapped by Tune), if any."""
    return next((e for e in _chain(exc) if isinstance(e, StoreError)), None)


class _DropLockedLogs(logging.Filter):
    """MLflow logs a full traceback for each "database is locked" before raising it; retries here make
    those noise (a lock that outlasts the bound is still reported, once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + str(record.exc_info[1] if record.exc_info else "")
        return not any(m in text for m in _LOCKED)


_db_logger = logging.getLogger("mlflow.store.db.utils")
if not any(isinstance(f, _DropLockedLogs) for f in _db_logger.filters):
    _db_logger.addFilter(_DropLockedLogs())


def _retry(fn: Callable[[], T], path: Path, *, schema: bool = False) -> T:
    """``fn()``, again while the SQLite file is locked (up to the bound) or, with ``schema``, while
    another process is still building its schema (up to SCHEMA_WAIT_S)."""
    wait = lock_wait_s()
    start, delay = time.monotonic(), 0.05
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - sorted below; anything else propagates unchanged
            locked, racing = _is_locked(exc), schema and _is_schema_race(exc)
            if not locked and not racing:
                raise
            elapsed = time.monotonic() - start
            if locked and elapsed >= wait:
                raise StoreLockedError(_locked_message(path, wait)) from exc
            if racing and not locked and elapsed >= min(wait, SCHEMA_WAIT_S):
                raise StoreError(f"the MLflow database {path} has an incomplete or outdated schema "
                                 f"({str(exc).splitlines()[0][:300]}); if another program was creating it, it "
                                 f"stopped half-way: move the file aside (mv {path} {path}.bad) and run again; if it "
                                 f"is an older MLflow's store, back it up and run `mlflow db upgrade sqlite:///{path}`") from exc
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


# -- clients --------------------------------------------------------------------------------------
_MLFLOW_BUSY_TIMEOUT = "PRAGMA busy_timeout = 20000"


def _bounded_busy_timeout(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                          executemany: bool) -> tuple[str, Any]:
    """MLflow sets SQLite's busy timeout to 20 s at the start of every session, so one call on a locked file
    would block 20 s whatever the bound; below 20 s the bound's own value is set instead."""
    if statement.startswith(_MLFLOW_BUSY_TIMEOUT):
        statement = f"PRAGMA busy_timeout = {int(min(lock_wait_s(), 20.0) * 1000)};"
    return statement, parameters


def sqlalchemy_engine(client: Any) -> Any:
    """The SQLAlchemy engine behind an MlflowClient of a database store (None for others); MLflow shares
    one per URI."""
    return getattr(getattr(getattr(client, "_tracking_client", None), "store", None), "engine", None)


def _bound_busy_waits(client: Any) -> None:
    """Rewrite MLflow's busy timeout on this client's engine (once per engine). The client's construction
    itself still runs under MLflow's 20 s: a lock taken between the probe and that moment can hold the
    first open up to 20 s a try."""
    from sqlalchemy import event

    engine = sqlalchemy_engine(client)
    if engine is not None and not event.contains(engine, "before_cursor_execute", _bounded_busy_timeout):
        event.listen(engine, "before_cursor_execute", _bounded_busy_timeout, retval=True)


class RetryingClient:
    """An MlflowClient whose calls wait out a locked SQLite file (bounded, then StoreLockedError).
    A call that failed on the lock was rolled back by SQLite, so calling it again writes once."""

    def __init__(self, client: Any, path: Path | None):
        self._client = client
        self._path = path

    @property
    def tracking_uri(self) -> str:
        return self._client.tracking_uri

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if self._path is None or not callable(attr):
            return attr
        path = self._path

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return _retry(lambda: attr(*args, **kwargs), path)

        return call


@contextmanager
def _init_lock(path: Path, *, create: bool) -> Iterator[None]:
    """An flock on ``PATH.lock`` beside the database while a process builds or opens its schema, so
    fairsweep's own processes never race MLflow's table creation. A reader that may not create the
    file (read-only folder) opens without it."""
    lock = path.with_name(path.name + ".lock")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        if create:
            raise
        yield
        return
    try:
        deadline = time.monotonic() + lock_wait_s()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreLockedError(f"{lock} is held by another process creating or opening the MLflow database "
                                           f"{path} for longer than {lock_wait_s():g} s; end that process (e.g. a "
                                           f"stuck fairsweep command) and run again") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _build_schema(tmp: Path) -> None:
    """MLflow's full schema (its migrations, default experiment included) in the private file ``tmp``."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store

    tmp_uri = f"sqlite:///{tmp}"
    tmp.unlink(missing_ok=True)
    _get_sqlalchemy_store(tmp_uri, None)  # what MlflowClient would build
    engine = SqlAlchemyStore._engine_map.pop(tmp_uri, None)
    if engine is not None:
        engine.dispose()


def _link_into_place(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another program created it meanwhile: open that one
    except OSError:  # a filesystem without hard links
        if not path.exists():
            os.replace(tmp, path)


def _create_sqlite(path: Path) -> None:
    """Build the full schema in a private file, then link it into place: the database appears
    complete or not at all, so a reader polling for it (``mlflow ui``, a script) never opens it half-built."""
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    try:
        _build_schema(tmp)
        _link_into_place(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# While the schema's thread runs beside ray.init: Ray's start makes many short system calls in the main
# thread, and with Python's default 5 ms slices each return waits out the busy thread's slice. Measured
# here: ray.init 4.5-5.3 s alone; beside the migrations 6.5 s, 4.8-6.2 s with 0.5 ms slices; beside a thread
# that only computes 9-12 s, 4.7-5.7 s with 0.5 ms slices. A quickstart launch reached Tune 1.7 s sooner
# (13.1 s against 11.4 s, medians of 3 interleaved).
SCHEMA_SWITCH_INTERVAL_S = 0.0005


class SchemaAhead:
    """A new SQLite store's schema, built in a thread while the driver starts Ray, in a private file that
    ``install`` links into place once the launch's checks have passed and ``discard`` removes otherwise.
    Why: MLflow's migrations take seconds of a launch's fixed cost, and a refused launch must leave no
    database behind. While the thread runs, the GIL's slices are short (SCHEMA_SWITCH_INTERVAL_S), so the
    migrations do not slow Ray's start down. For a server URI or an existing file it does nothing."""

    def __init__(self, uri: str):
        path = sqlite_path(uri)
        self._path = path if path is not None and not path.exists() else None
        self._tmp: Path | None = None
        self._failed = False
        self._thread: threading.Thread | None = None
        if self._path is not None:
            self._tmp = self._path.with_name(f".{self._path.name}.ahead-{os.getpid()}")
            interval = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, SCHEMA_SWITCH_INTERVAL_S))
            self._thread = threading.Thread(target=self._build, args=(interval,), name="fairsweep-mlflow-schema",
                                            daemon=True)
            self._thread.start()

    def _build(self, interval: float) -> None:
        try:
            _build_schema(self._tmp)
        except Exception:  # noqa: BLE001 - install then leaves the creation to open_client, which says what failed
            self._failed = True
        finally:
            sys.setswitchinterval(interval)

    def install(self) -> None:
        """Link the built schema into place (unless another process created the store meanwhile)."""
        if self._thread is None:
            return
        self._thread.join()
        if not self._failed:
            with _init_lock(self._path, create=True):
                if not self._path.exists():
                    _link_into_place(self._tmp, self._path)
        self.discard()

    def discard(self) -> None:
        if self._thread is None:
            return
        self._thread.join()
        self._tmp.unlink(missing_ok=True)
        self._thread = None


def open_client(uri: str, *, create: bool = False) -> RetryingClient:
    """A checked MLflow client for ``uri``. ``create`` lets an SQLite store be created (the driver);
    readers (``create=False``) refuse a missing file instead of creating an empty one."""
    check_store(uri, create=create)
    from mlflow.tracking import MlflowClient

    path = sqlite_path(uri)
    if path is None:
        return RetryingClient(MlflowClient(tracking_uri=uri), None)
    with _init_lock(path, create=create):
        if create and not path.exists():
            _retry(lambda: _create_sqlite(path), path, schema=True)
        client = _retry(lambda: MlflowClient(tracking_uri=uri), path, schema=True)
    _bound_busy_waits(client)
    return RetryingClient(client, path)
