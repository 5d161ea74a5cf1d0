"""Where a sweep's trials run: in the idle Python workers Ray starts with a local node (one per CPU), not in
new workers started for Tune's runtime_env (``launch._trial_actors_in_idle_workers``)."""
from __future__ import annotations

import importlib
import json
import os
import sys
import time

import psutil
import pytest

from tests.helpers import cli_env, finish_cli, kill_session, sqlite_uri, start_cli, tiny_spec, write_spec

launch = importlib.import_module("orchestrator.launch")  # the module (the package exports the function launch)


class _Trainable:
    pass


def _actor_env_vars() -> dict:
    """The env_vars of the runtime_env Tune would give a trial actor now."""
    from ray.tune.execution.class_cache import _ActorClassCache

    runtime_env = _ActorClassCache().get(_Trainable)._default_options.get("runtime_env") or {}
    return dict(runtime_env.get("env_vars") or {})


def test_tune_gives_trial_actors_no_env_of_its_own_during_a_fit_and_its_defaults_come_back(monkeypatch):
    from ray.tune.execution import class_cache

    for name in class_cache.ENV_VARS_TO_PROPAGATE:
        monkeypatch.delenv(name, raising=False)
    before = dict(class_cache.DEFAULT_ENV_VARS)
    assert before, "Tune no longer sets a runtime_env of its own: _trial_actors_in_idle_workers can go"
    assert _actor_env_vars() == before
    with launch._trial_actors_in_idle_workers():
        assert _actor_env_vars() == {}  # an empty env: Ray may run the actor in any idle worker
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-the-driver")  # what Tune propagates still goes with the actor
        assert _actor_env_vars() == {"AWS_ACCESS_KEY_ID": "from-the-driver"}
    assert class_cache.DEFAULT_ENV_VARS == before
    with pytest.raises(RuntimeError), launch._trial_actors_in_idle_workers():
        raise RuntimeError("the fit failed")
    assert class_cache.DEFAULT_ENV_VARS == before


def _python_workers(root: psutil.Process, seen: dict[int, float], prestart: list[int]) -> None:
    """Record every Ray Python worker under ``root`` (pid: start time) and the raylet's prestart count."""
    try:
        procs = root.children(recursive=True)
    except psutil.Error:
        return
    for proc in procs:
        try:
            cmd = proc.cmdline()
            if any(part.endswith("default_worker.py") for part in cmd):
                seen.setdefault(proc.pid, proc.create_time())
            elif not prestart and any(part.endswith("/raylet") for part in cmd[:1]):
                prestart.extend(int(a.split("=", 1)[1]) for a in cmd if a.startswith("--num_prestart_python_workers="))
        except psutil.Error:
            continue


@pytest.mark.slow
def test_a_local_sweeps_trials_run_in_the_workers_ray_started_with_the_node(tmp_path):
    spec = write_spec(tmp_path, tiny_spec(**{"axes.paradigm": ["scratch"]}))  # 4 trials
    proc = start_cli("launch", str(spec), "--tracking-uri", sqlite_uri(tmp_path), "--storage", str(tmp_path / "results"),
                     "--quiet", cwd=tmp_path, env=cli_env())
    seen: dict[int, float] = {}
    prestart: list[int] = []
    try:
        driver = psutil.Process(proc.pid)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:  # --quiet: too little output to fill a pipe
            _python_workers(driver, seen, prestart)
            time.sleep(0.1)
        out = finish_cli(proc, timeout=30)
    finally:
        kill_session(proc)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert prestart and prestart[0] >= 1, "the raylet's --num_prestart_python_workers was not seen"
    first = sorted(seen, key=lambda pid: seen[pid])[:prestart[0]]  # the workers Ray started with the node
    trial_pids = {json.loads(line)["pid"] for result in (tmp_path / "results").glob("tiny/*/result.json")
                  for line in result.read_text().splitlines() if line.strip()}
    assert len(trial_pids) >= 1 and len(list((tmp_path / "results").glob("tiny/*/result.json"))) == 4
    # With Tune's env on the actors no trial ever runs in those workers. Without it each normally does; now and
    # then (1 launch in about 40 here) Ray ends one idle worker as the actors are placed and starts another.
    assert trial_pids & set(first), (f"trials ran in {sorted(trial_pids)}; the node's first {prestart[0]} workers "
                                     f"were {first}; all workers seen: {sorted(seen)}")


def test_the_trial_workers_entry_point_sets_tunes_variable_before_any_plugin_is_imported(monkeypatch, tmp_path):
    """PL_DISABLE_FORK (for PyTorch Lightning in a plugin), which Tune's actor env set from the worker's start, is
    set by the entry point before the plugins are imported; a value the worker already has is kept."""
    from trainables.plugins import TRIAL_WORKER_ENV, with_plugins

    assert TRIAL_WORKER_ENV == {"PL_DISABLE_FORK": "1"}
    (tmp_path / "fs_env_probe_plugin.py").write_text(
        "import os\nSEEN_AT_IMPORT = os.environ.get('PL_DISABLE_FORK')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fs_env_probe_plugin", raising=False)
    monkeypatch.setenv("PL_DISABLE_FORK", "placeholder")  # recorded, so the teardown restores the test's env
    monkeypatch.delenv("PL_DISABLE_FORK")
    seen: list[str | None] = []
    entry = with_plugins(lambda: seen.append(os.environ.get("PL_DISABLE_FORK")) or "done", ["fs_env_probe_plugin"])
    assert entry() == "done" and seen == ["1"]
    import fs_env_probe_plugin

    assert fs_env_probe_plugin.SEEN_AT_IMPORT == "1"
    monkeypatch.setenv("PL_DISABLE_FORK", "0")
    no_plugins = with_plugins(lambda: seen.append(os.environ.get("PL_DISABLE_FORK")), [])
    no_plugins()
    assert seen == ["1", "0"]
    monkeypatch.delenv("PL_DISABLE_FORK")
    no_plugins()
    assert seen == ["1", "0", "1"]


def test_the_launchs_fit_runs_with_tunes_actor_env_defaults_empty_and_restores_them(monkeypatch):
    from ray.tune.execution import class_cache

    before = dict(class_cache.DEFAULT_ENV_VARS)

    class _Tuner:
        def fit(self):
            self.during = dict(class_cache.DEFAULT_ENV_VARS)
            return "grid"

    tuner = _Tuner()
    assert launch._fit(tuner, 0) == "grid"
    assert tuner.during == {} and class_cache.DEFAULT_ENV_VARS == before
