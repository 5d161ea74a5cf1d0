"""Suite-wide settings and guards.

- Tests that start Ray in this process bind it to 127.0.0.1: Ray reads the variable once, at its first
  import, so it is set here, before any test module imports ray.
- One Ray authentication mode for the whole session: ``disabled`` (every test cluster is a throwaway on
  loopback). Left unset, the first local ``ray.init()`` of this process sets ``RAY_AUTH_MODE=token`` in
  ``os.environ`` and in Ray's cached per-process config; a later test that starts its own cluster with auth
  disabled then has its driver refuse the cluster's unauthenticated calls, and every trial actor is
  cancelled before it runs. The CLI's own default (token) is exercised by ``tests/test_loopback.py``.
- No test may leave /tmp/ray/ray_current_cluster naming a cluster it started: a bare ``ray.init()``
  anywhere on the machine (another user's script, another test run) joins whatever cluster that file
  names, and fails when it is gone. A test whose cluster is still running there fails, and the file is
  put back as it was; tests that start clusters also check the record against their own port. Changes
  made by other programs on a shared machine are theirs: never failed, never undone.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
AUTH_MODE = "disabled"
os.environ["RAY_AUTH_MODE"] = AUTH_MODE  # outright: a developer's exported token mode would break the cluster tests

CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")


def _current_cluster() -> bytes | None:
    try:
        return CURRENT_CLUSTER.read_bytes()
    except FileNotFoundError:
        return None


def _started_here(address: bytes) -> bool:
    """Whether a process of this test session (this process or a descendant) listens on the address's port."""
    import psutil

    port = address.decode(errors="replace").strip().rpartition(":")[2]
    if not port.isdigit():
        return False
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == int(port) for c in proc.net_connections("inet")):
                return True
        except psutil.Error:
            continue
    return False


@pytest.fixture(autouse=True)
def _ray_current_cluster_unchanged():
    before = _current_cluster()
    yield
    after = _current_cluster()
    if after is None or after == before or not _started_here(after):
        # Not attributable to this session: another program's cluster on a shared machine (alive, or
        # stopping). A record naming a stopped cluster of this session's own tests cannot be told apart
        # from that here, so the tests that start clusters check their own port against the record.
        return
    if before is None:
        CURRENT_CLUSTER.unlink(missing_ok=True)
    else:
        CURRENT_CLUSTER.write_bytes(before)
    pytest.fail(f"the test left {CURRENT_CLUSTER} naming a cluster it started and did not stop ({before!r} -> "
                f"{after!r}); restored it. Start test clusters with their own temp dir, and shut them down")


@pytest.fixture(autouse=True)
def _ray_auth_mode_unchanged():
    """The session's Ray authentication mode is the one pinned above after every test: a test (or the code
    it runs) that changes it in this process is named here, not by the later test whose cluster it breaks."""
    yield
    now = os.environ.get("RAY_AUTH_MODE")
    if now != AUTH_MODE:
        os.environ["RAY_AUTH_MODE"] = AUTH_MODE
        pytest.fail(f"the test left RAY_AUTH_MODE={now!r} in this process (the session runs with {AUTH_MODE!r}); "
                    "restored it; Ray caches the mode per process at its first init, so a test that needs another "
                    "mode runs Ray in a subprocess")


@pytest.fixture
def ray_cluster_record():
    """For tests that start ``ray.cluster_utils.Cluster``: it writes its head's address to
    /tmp/ray/ray_current_cluster and deletes the file on shutdown, whoever wrote it. The test runs holding an
    exclusive lock on a file beside the suite's temp folders, so two test files running at once (``make
    test`` runs two) never have clusters up together, where each would put back the other's dead address;
    and what the record said before is put back after the test. Yields the record's path."""
    import fcntl
    import tempfile

    with open(Path(tempfile.gettempdir()) / "fairsweep-tests-ray-cluster.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        before = _current_cluster()
        try:
            yield CURRENT_CLUSTER
        finally:
            if before is not None:
                CURRENT_CLUSTER.parent.mkdir(parents=True, exist_ok=True)
                CURRENT_CLUSTER.write_bytes(before)
