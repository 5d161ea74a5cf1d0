"""benchmarks/throughput.py counts a command's CPU time with every process it started: also the children of a
parent that ignores SIGCHLD (Ray's raylet does, and the trials run in its workers), and one orphaned when its
parent exited first. The benchmark's argument that only less work can meet its target rests on that count."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A command whose only work is done by a grandchild orphaned at once: the parent forks and exits, the child
# notes its pid, then burns 1.5 s of CPU.
ORPHANING = """
import os, sys, time
if os.fork() == 0:
    open(sys.argv[1], "w").write(str(os.getpid()))
    start = time.process_time()
    while time.process_time() - start < 1.5:
        pass
    os._exit(0)
os._exit(0)
"""

# Ray's raylet ignores SIGCHLD: the kernel then discards its children's CPU time from every rusage count
IGNORING_SIGCHLD = """
import os, signal, sys, time
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
if os.fork() == 0:
    start = time.process_time()
    while time.process_time() - start < 1.5:
        pass
    os._exit(0)
try:
    os.wait()  # returns once the child ended, which the kernel reaped itself
except ChildProcessError:
    pass
"""

# Run _timed on that command in a fresh process (the reaper setting holds for the whole process, so not in pytest's)
MEASURE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("throughput", sys.argv[1])
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
reaper = bench.become_subreaper() if sys.argv[2] == "reaper" else False
timing = bench._timed("orphaning", [sys.executable, "-c", sys.argv[3], sys.argv[4]], bench.Path(sys.argv[5]))
print(json.dumps({"reaper": reaper, "wall": timing.wall, "cpu": timing.cpu}))
"""


def _measure(tmp_path: Path, mode: str, command: str, arg: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(REPO / "benchmarks" / "throughput.py"), mode, command, arg,
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_time_counts_children_of_a_parent_ignoring_sigchld(tmp_path):
    timing = _measure(tmp_path, "plain", IGNORING_SIGCHLD, "unused")
    assert timing["cpu"] >= 1.2, timing  # the child's 1.5 s, less at most one polling interval


def _stop_orphan(pid_file: Path) -> None:
    """The control's orphan is nobody's child here: stop it by its pid if it still runs."""
    for _ in range(50):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    if pid_file.exists() and pid_file.read_text():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_CHILD_SUBREAPER is Linux's")
def test_cpu_time_counts_orphaned_processes(tmp_path):
    counted = _measure(tmp_path, "reaper", ORPHANING, str(tmp_path / "orphan-reaper.pid"))
    assert counted["reaper"] is True
    assert counted["cpu"] >= 1.2, counted  # the orphan's 1.5 s (less one polling interval), reaped here
    pid_file = tmp_path / "orphan-plain.pid"
    control = _measure(tmp_path, "plain", ORPHANING, str(pid_file))
    try:
        assert control["reaper"] is False
        assert control["cpu"] < 1.0, control  # without the setting the orphan leaves this process's descendants
    finally:
        _stop_orphan(pid_file)
