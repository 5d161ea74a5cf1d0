"""Suite-wide settings and guards.

- Tests that start Ray in this process bind it to 127.0.0.1: Ray reads the variable once, at its first
  import, so it is set here, before any test module imports ray.
- No test may leave /tmp/ray/ray_current_cluster naming another cluster: a bare ``ray.init()`` anywhere
  on the machine (another user's sweep, another test run) joins whatever cluster that file names. A
  test after which it names a new address fails, and the file is put back as it was. A file that
  disappeared is left so (its cluster shut down; another program's, on a shared machine).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")


def _current_cluster() -> bytes | None:
    try:
        return CURRENT_CLUSTER.read_bytes()
    except FileNotFoundError:
        return None


@pytest.fixture(autouse=True)
def _ray_current_cluster_unchanged():
    before = _current_cluster()
    yield
    after = _current_cluster()
    if after is None or after == before:
        return  # gone: a cluster that wrote it shut down (maybe another program's); never write a stale address back
    if before is None:
        CURRENT_CLUSTER.unlink(missing_ok=True)
    else:
        CURRENT_CLUSTER.write_bytes(before)
    pytest.fail(f"the test left {CURRENT_CLUSTER} changed ({before!r} -> {after!r}); restored it. Start test clusters "
                f"with their own temp dir, or put the file back")
