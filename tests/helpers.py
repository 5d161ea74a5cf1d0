"""Tiny specs and temporary stores shared by the tests."""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent

UNREACHABLE_URI = "http://127.0.0.1:9"  # the discard port: nothing listens there (a port found free a moment
# ago could be taken meanwhile, e.g. by the Ray of a test file running beside)

TINY_DATA = {"n_source": 400, "n_finetune": 600, "n_val": 200, "n_test": 400, "image_size": 32, "seed": 0}

TINY_SPEC: dict[str, Any] = {
    "name": "tiny",
    "dataset": {"name": "synthetic_images", "options": TINY_DATA},
    "pretraining": {"epochs": 1, "batch_size": 64, "lr": 0.05},
    "axes": {
        "backbone": ["test_resnet"],
        "paradigm": ["scratch", "supervised"],
        "intervention": {"kind": "correlation", "magnitudes": [0.5, 0.9]},
        "freeze_depth": [0, "linear"],
        "seed": [0],
    },
    "finetune": {"size": 200, "epochs": 2, "batch_size": 50, "lr": 0.02},
    "objectives": {"performance": "accuracy", "fairness": "equalized_odds_difference"},
    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
    "search": {"type": "grid"},
}


def tiny_spec(**overrides: Any) -> dict[str, Any]:
    """A deep copy of TINY_SPEC with dotted-path overrides, e.g. ``tiny_spec(**{"axes.seed": [0, 1]})``."""
    spec = copy.deepcopy(TINY_SPEC)
    for path, value in overrides.items():
        node = spec
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return spec


def write_spec(tmp: Path, spec: dict[str, Any], name: str = "sweep.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sqlite_uri(tmp: Path) -> str:
    return f"sqlite:///{(tmp / 'mlflow.db').resolve()}"


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for running the real CLI in a subprocess: loopback-only Ray, no usage stats."""
    env = dict(os.environ)
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)  # the sweep name is the experiment unless a test says otherwise
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``fairsweep ARGS`` as a subprocess of this interpreter, in its own session. On a timeout the
    whole session is killed (the driver and the local Ray it started), then TimeoutExpired is raised."""
    cmd = [sys.executable, "-m", "orchestrator.cli", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def start_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``fairsweep ARGS`` in its own session without waiting (for commands that must overlap)."""
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env or cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish_cli(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    """Wait for a ``start_cli`` command; on a timeout kill its whole session, then raise TimeoutExpired."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(proc.args, timeout, output=stdout, stderr=stderr) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the session a ``start_cli`` command leads (the driver and the local Ray it
    started). By session, not by process group: Ray gives each worker a group of its own, and a worker still
    starting when its raylet dies lingers for about 45 s before it notices."""
    import psutil

    for pid in psutil.pids():
        try:
            if os.getsid(pid) == proc.pid:
                os.kill(pid, signal.SIGKILL)
        except OSError:  # gone meanwhile
            pass


def batch_metrics(y: Any, scores: Any, groups: Any, primary: str, threshold: float,
                  privileged: Any = None) -> dict[str, Any]:
    """Every ``evaluate`` key for each row of ``scores`` (B, n) by the computation ``evaluate`` (B = 1) and
    the bootstrap (B resamples) share: the tests compare the two through it."""
    from trainables.metrics import _attributes, _compute

    return _compute(y, scores, _attributes(groups, privileged), primary, threshold)[0]


def trial_config(point: dict[str, Any], finetune: dict[str, Any], weights_key: str | None = None) -> Any:
    """A ``TrialConfig`` from a test's axis values and finetuning settings written as in a sweep file
    (``size`` among them, lists for the inner search's candidates), starting from the cache entry
    ``weights_key`` (None: random initialisation): what the plan would hand a worker."""
    from trainables.trial import Freeze, TrialConfig, TrialPoint, Weights

    hparams = {k: tuple(v) if isinstance(v, list) else v for k, v in finetune.items() if k != "size"}
    p = TrialPoint(point["backbone"], point["paradigm"], point["intervention"], float(point["magnitude"]),
                   Freeze.parse(point["freeze_depth"]), int(point["seed"]), int(finetune["size"]))
    return TrialConfig(p, hparams, Weights(weights_key))
