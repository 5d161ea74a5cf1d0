"""`--dashboard` starts Ray's dashboard for a local sweep, says where, and serves it on loopback only."""
from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest

from tests.helpers import kill_session, sqlite_uri, start_cli, tiny_spec, write_spec

pytestmark = pytest.mark.slow


def test_the_dashboard_serves_on_loopback_while_a_local_sweep_runs(tmp_path):
    import psutil

    spec = tiny_spec(**{"name": "watched", "axes.paradigm": ["scratch"], "finetune.epochs": 20})
    proc = start_cli("launch", str(write_spec(tmp_path, spec)), "--tracking-uri", sqlite_uri(tmp_path), "--storage",
                     str(tmp_path / "results"), "--dashboard", cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # the progress lines
    reader.start()
    try:
        deadline, url = time.monotonic() + 180, None
        while time.monotonic() < deadline and url is None and proc.poll() is None:
            found = [re.search(r"Ray dashboard: (http://\S+)", line) for line in list(lines)]
            url = next((m.group(1) for m in found if m), None)
            time.sleep(0.5)
        assert url and url.startswith("http://127.0.0.1:"), lines[-20:]
        assert urllib.request.urlopen(url, timeout=10).status == 200
        port = int(url.rsplit(":", 1)[1].strip("/"))
        owners = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        listeners = []
        for p in owners:
            try:
                listeners += [c.laddr for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
            except psutil.Error:
                continue
        assert any(a.port == port for a in listeners), "the dashboard is not this sweep's"
        assert all(a.ip in ("127.0.0.1", "::ffff:127.0.0.1") for a in listeners), listeners
    finally:
        kill_session(proc)  # the sweep itself is not under test here
        proc.wait(timeout=60)
