"""A local sweep's Ray: it listens on loopback only (every socket the driver and its Ray processes listen on is
127.0.0.1 or ::1, with nobody having set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER beforehand), and it stops whole."""
from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time

import psutil
import pytest

from orchestrator.raylocal import ENV
from tests.helpers import REPO, cli_env, finish_cli, kill_session, sqlite_uri, start_cli, tiny_spec, write_spec


def _listening(root: psutil.Process) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening inet socket of ``root`` and its descendants."""
    found = set()
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return found
    for proc in procs:
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, name))
        except psutil.Error:
            continue
    return found


def _loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or 127.x as an IPv4-mapped IPv6 address (Ray's gRPC servers bind ``::ffff:127.0.0.1``)."""
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@pytest.mark.slow
def test_a_local_sweep_listens_on_loopback_only(tmp_path):
    env = cli_env()
    env.pop(ENV)  # the CLI's own default, not the test helper's, is what is tested
    env.pop("RAY_AUTH_MODE", None)  # and Ray's own (token authentication for a new local cluster)
    spec = write_spec(tmp_path, tiny_spec(**{"axes.paradigm": ["scratch"], "axes.freeze_depth": [0]}))
    proc = start_cli("launch", str(spec), "--tracking-uri", sqlite_uri(tmp_path), "--storage", str(tmp_path / "results"),
                     "--quiet", cwd=tmp_path, env=env)
    seen: set[tuple[str, int, str]] = set()
    try:
        driver = psutil.Process(proc.pid)
        while proc.poll() is None:
            seen |= _listening(driver)
            time.sleep(0.3)
        out = finish_cli(proc, timeout=60)
    finally:
        kill_session(proc)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    names = {name for _, _, name in seen}
    assert len(seen) >= 3 and any("raylet" in n for n in names) and any("gcs" in n for n in names), seen
    exposed = sorted(s for s in seen if not _loopback(s[0]))
    assert not exposed, f"listening beyond loopback: {exposed}"


def _ray_binds_everywhere(code: str, **env: str) -> tuple[str, str]:
    base = cli_env(**env)
    base.pop(ENV, None)
    base.update(env)
    out = subprocess.run([sys.executable, "-c", code + "\nimport ray._private.ray_constants as c\n"
                          "print(c.ENABLE_RAY_CLUSTER)"], cwd=REPO, env=base, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1], out.stderr


def test_the_library_binds_a_local_ray_to_loopback_unless_told_otherwise():
    # importing the API before ray is enough for a local Ray on loopback
    assert _ray_binds_everywhere("import orchestrator.launch\nimport ray")[0] == "False"
    assert _ray_binds_everywhere("import orchestrator.tracking")[0] == "False"
    # a cluster address, or the user's own setting, is left alone
    assert _ray_binds_everywhere("import orchestrator.launch\nimport ray", RAY_ADDRESS="10.0.0.1:6379")[0] == "True"
    assert _ray_binds_everywhere("import orchestrator.launch\nimport ray", **{ENV: "1"})[0] == "True"
    # launch(address=...) after the import gives the setting back before ray is imported
    # (``import orchestrator.launch as L`` would bind the public launch function, which the package exports)
    code = ("import os, orchestrator.launch\nfrom orchestrator import raylocal\n"
            "raylocal.loopback_default('10.0.0.1:6379')\nassert raylocal.ENV not in os.environ\nimport ray")
    assert _ray_binds_everywhere(code)[0] == "True"
    # too late: ray came first, so the user is told
    value, stderr = _ray_binds_everywhere("import ray\nimport orchestrator.launch")
    assert value == "True" and "RuntimeWarning" in stderr and "listens on every network interface" in stderr


_STOP_LOCAL_RAY = """
import importlib, json
from orchestrator import raylocal
raylocal.loopback_default(None)
import ray
launch = importlib.import_module("orchestrator.launch")
assert launch.init_ray(None)[0]
procs = {kind: [info.process for info in infos] for kind, infos in ray._private.worker._global_node.all_processes.items()}
print(json.dumps({"pids": [p.pid for ps in procs.values() for p in ps]}), flush=True)
seen = {}
real_shutdown = ray.shutdown
def shutdown(*args, **kwargs):
    seen["alive when Ray's shutdown began"] = sorted(k for k, ps in procs.items() if any(p.poll() is None for p in ps))
    return real_shutdown(*args, **kwargs)
ray.shutdown = shutdown
launch._stop_ray()
seen["left"] = sorted(k for k, ps in procs.items() if any(p.poll() is None for p in ps))
seen["initialized"] = ray.is_initialized()
print(json.dumps(seen), flush=True)
"""


def test_stopping_a_local_ray_ends_its_monitor_first_and_leaves_nothing():
    # Ray stops its autoscaler monitor after the GCS, and the monitor then blocks reporting to the GCS until Ray
    # kills it a second later; _stop_ray ends it first, so only Ray's own order is left for the rest
    proc = subprocess.Popen([sys.executable, "-c", _STOP_LOCAL_RAY], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    pids: list[int] = []
    try:
        stdout, stderr = proc.communicate(timeout=180)
        lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        pids = lines[0]["pids"] if lines else []
        assert proc.returncode == 0 and len(lines) == 2, stdout[-2000:] + stderr[-3000:]
        seen = lines[1]
        assert "monitor" not in seen["alive when Ray's shutdown began"]
        assert {"gcs_server", "raylet"} <= set(seen["alive when Ray's shutdown began"])
        assert seen["left"] == [] and seen["initialized"] is False
    finally:
        kill_session(proc)
        for pid in pids:  # a Ray process outside the session (none expected) is stopped by its id
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
