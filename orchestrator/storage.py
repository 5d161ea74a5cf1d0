"""Where a sweep lives, for every command: the storage folder (Tune's state, the pretraining cache), the
sweep's folder in it and the record there, and the MLflow tracking URI with where its artifacts go.

launch and resume write these places; status, report, the queries and ``cache`` read them. Each
resolves a flag the same way whichever command is given it, and a bad one is a ``StorageError``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from trainables.errors import UserError

__all__ = ["StorageError", "DEFAULT_STORAGE", "CACHE_DIRNAME", "SWEEP_RECORD", "resolve_tracking_uri", "sqlite_path",
           "artifact_location", "resolve_storage", "check_storage_writable", "experiment_path", "write_sweep_record",
           "read_sweep_record"]

DEFAULT_STORAGE = "fairsweep_results"
CACHE_DIRNAME = "_pretrain_cache"
SWEEP_RECORD = "fairsweep_sweep.json"  # beside Tune's state: the spec and where it was tracked, for resume/status


class StorageError(UserError, ValueError):
    """A storage path, sweep folder or tracking URI that cannot be used as given (the message says what to pass)."""


# -- the tracking URI -----------------------------------------------------------------------------
def resolve_tracking_uri(flag: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else SQLite in the working directory; always absolute."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri:
        raise StorageError(f"tracking URI {uri!r} is not a URI; use sqlite:///PATH.db or http://HOST:PORT")
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of an SQLite tracking URI; None for any other store (a server)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store sit beside the database file; a server decides for itself."""
    path = sqlite_path(tracking_uri)
    return (path.parent / "mlartifacts").resolve().as_uri() if path is not None else None


# -- the storage folder and the sweep's folder in it ----------------------------------------------
def resolve_storage(flag: str | None) -> str:
    """Absolute, because Tune runs each trial in its own working directory. A filesystem path (on a
    cluster: shared storage mounted at the same path on every node), since the pretraining cache
    locks its entries with flock and the optuna study is a journal file."""
    storage = flag or DEFAULT_STORAGE
    if "://" in storage:
        raise StorageError(f"--storage {storage!r}: use a filesystem path; on a cluster, shared storage (NFS, Lustre, "
                           f"EFS, ...) mounted at the same path on every node")
    return str(Path(storage).expanduser().resolve())


def check_storage_writable(storage: str) -> None:
    """A storage folder that cannot be made (``/proc/x``, a file's path, a read-only mount) fails
    before Ray starts; the probe folder it makes in the nearest existing parent is removed at once."""
    target = Path(storage)
    existing = next((p for p in (target, *target.parents) if p.exists()), Path("/"))
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    else:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".fairsweep-probe-", dir=existing))
        except OSError as exc:
            problem = f"nothing can be created in {existing} ({exc.strerror or exc})"
    if problem:
        raise StorageError(f"--storage {storage}: {problem}; pass --storage a folder this user can write (default "
                           f"./{DEFAULT_STORAGE}; on a cluster, shared storage mounted at the same path on every node)")


def experiment_path(storage: str, name: str) -> str:
    """STORAGE/NAME; a name that is not one plain folder name (``../x``, ``a/b``) is refused, so no
    command reads or writes outside the storage folder."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name != name.strip():
        raise StorageError(f"sweep name {name!r} is not a sweep name: it is the sweep's folder under --storage, one "
                           f"plain name such as 'quickstart' (no '/', no '..'); pass the folder above it with --storage")
    return f"{storage.rstrip('/')}/{name}"


def write_sweep_record(path: str, record: dict) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / SWEEP_RECORD).write_text(json.dumps(record, indent=1))


def read_sweep_record(path: str) -> dict:
    """The spec and settings a sweep was launched with; ``StorageError`` when there is no sweep at ``path``."""
    try:
        record = json.loads((Path(path) / SWEEP_RECORD).read_text())
    except (OSError, ValueError):
        raise StorageError(f"no fairsweep sweep at {path} (no {SWEEP_RECORD}); check the sweep name and --storage") from None
    if not isinstance(record, dict) or not isinstance(record.get("spec"), dict) or "tracking_uri" not in record:
        raise StorageError(f"{Path(path) / SWEEP_RECORD} is not a sweep record this fairsweep can read (damaged, or "
                           f"from another version): it lacks the spec or the tracking URI; launch the sweep again "
                           f"under another name")
    return record
