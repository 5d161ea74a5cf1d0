"""Where a sweep's trials run: in the idle Python workers Ray starts with a local node (one per CPU), not in
new workers started for Tune's runtime_env (``launch._trial_actors_in_idle_workers``)."""
from __future__ import annotations

import contextlib
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
            if _is_python_worker(proc):
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
    # With Tune's env on the actors no trial ever runs in those workers. Where the 4 trials fill the node's CPUs the
    # launch preloads them and sets Ray's soft limit, so every trial runs there; on a larger node nothing is
    # preloaded and now and then (1 launch in about 40 here) Ray ends an idle worker as the actors are placed.
    where = (f"trials ran in {sorted(trial_pids)}; the node's first {prestart[0]} workers were {first}; all workers "
             f"seen: {sorted(seen)}")
    if launch._node_cpus() <= 4:
        assert trial_pids <= set(first), where
    else:
        assert trial_pids & set(first), where


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


@pytest.mark.parametrize("overrides, options, preloaded", [
    ({}, {}, True),                                                  # 8 trials of one CPU on 4 CPUs
    ({"resources.cpus_per_trial": 0.5}, {}, True),
    ({"resources.cpus_per_trial": 2}, {}, False),                    # half the idle workers would wait unused
    ({"resources.gpus_per_trial": 0.25}, {}, False),                 # the GPU, not the CPUs, sets the trial slots
    ({"resources.max_concurrent_trials": 2}, {}, False),             # a cap below the 4 CPUs
    ({"resources.max_concurrent_trials": 4}, {}, True),
    ({}, {"max_concurrent_trials": 3}, False),                       # --max-concurrent
    ({"axes.paradigm": ["scratch"], "axes.freeze_depth": [0]}, {}, False),  # 2 trials: 2 workers would idle
    ({}, {"address": "127.0.0.1:6379"}, False),                      # a cluster's workers are its own
])
def test_idle_workers_load_the_trials_modules_only_when_each_will_run_a_trial(monkeypatch, overrides, options,
                                                                             preloaded):
    from orchestrator.spec import parse_spec
    from trainables.plugins import TRIAL_WORKER_MODULES

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(launch, "_node_cpus", lambda: 4)
    got = launch._worker_preload(parse_spec(tiny_spec(**overrides)), launch.LaunchOptions(**options))
    assert got == (TRIAL_WORKER_MODULES if preloaded else ())


def test_a_local_ray_gets_rays_settings_only_with_modules_to_preload(monkeypatch):
    import ray

    calls: list[dict] = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        return type("Context", (), {"dashboard_url": ""})()

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(launch, "_node_cpus", lambda: 3)
    assert launch.init_ray(None) == (True, "")
    assert launch.init_ray(None, preload=("torch",)) == (True, "")
    assert calls[0]["_system_config"] is None
    assert calls[1]["_system_config"] == {"preload_python_modules": ["torch"], "num_workers_soft_limit": 3}


def test_resume_starts_ray_without_preloading(monkeypatch, tmp_path):
    """A resume counts its finished trials in the spec and builds its plan before Ray: nothing to preload for."""
    seen: list[tuple] = []

    @contextlib.contextmanager
    def session(spec, options, preload=()):
        seen.append(preload)
        raise RuntimeError("stop at Ray's start")
        yield

    from orchestrator.storage import experiment_path, write_sweep_record

    monkeypatch.setattr(launch, "_ray_session", session)
    monkeypatch.setattr(launch, "_node_cpus", lambda: 1)
    storage = tmp_path / "results"
    write_sweep_record(experiment_path(str(storage), "tiny"), {
        "spec": tiny_spec(), "tracking_uri": sqlite_uri(tmp_path), "cache_root": "cache", "cwd": str(tmp_path)})
    from mlflow.tracking import MlflowClient

    MlflowClient(sqlite_uri(tmp_path)).search_experiments()  # a store to resume into
    with pytest.raises(RuntimeError, match="stop at Ray's start"):
        launch.resume("tiny", launch.LaunchOptions(storage=str(storage)))
    assert seen == [()]


def test_the_preloaded_modules_are_the_trials_own_and_import(monkeypatch):
    """Ray only logs a module that fails to preload, so a wrong name here would turn preloading off unseen."""
    from orchestrator.spec import parse_spec
    from trainables.plugins import TRIAL_WORKER_MODULES

    assert {"torch", "timm", "ray.tune", "trainables.finetune"} <= set(TRIAL_WORKER_MODULES)
    for module in TRIAL_WORKER_MODULES:
        importlib.import_module(module)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster named only in the environment
    assert launch._worker_preload(parse_spec(tiny_spec()), launch.LaunchOptions()) == ()
    assert launch._node_cpus() >= 1


def test_a_local_rays_idle_workers_load_the_given_modules_and_outlive_placement_groups(monkeypatch, tmp_path):
    """The workers Ray starts with the node import what ``init_ray`` names, and are still there to run actors in
    placement groups (Tune's trials) after idling for seconds, as while a launch builds its plan: by default Ray
    ends idle workers once the groups hold the CPUs, and starts new ones for the actors."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    (tmp_path / "fs_preload_probe.py").write_text("LOADED = True\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    started, _ = launch.init_ray(None, preload=("fs_preload_probe",))  # with the soft limit that keeps them
    assert started
    try:
        node_cpus = int(ray.cluster_resources()["CPU"])
        deadline = time.monotonic() + 60
        idle: set[int] = set()
        while time.monotonic() < deadline and len(idle) < node_cpus:  # the workers Ray started with the node
            idle = {p.pid for p in psutil.Process().children(recursive=True) if _is_python_worker(p)}
            time.sleep(0.2)
        assert len(idle) >= node_cpus, f"Ray started {sorted(idle)} with the node, expected {node_cpus} workers"
        time.sleep(3)  # idle past Ray's 1 s threshold

        @ray.remote(num_cpus=1, runtime_env={"env_vars": {}})
        class Probe:
            def where(self):
                return os.getpid(), "fs_preload_probe" in sys.modules

        groups = [placement_group([{"CPU": 1}]) for _ in range(node_cpus)]
        ray.get([g.ready() for g in groups], timeout=60)
        time.sleep(1.5)  # the groups hold every CPU: past Ray's next round of ending idle workers
        probes = [Probe.options(scheduling_strategy=PlacementGroupSchedulingStrategy(g)).remote() for g in groups]
        where = ray.get([p.where.remote() for p in probes], timeout=120)
    finally:
        launch._stop_ray()
    assert all(loaded for _, loaded in where), where
    assert {pid for pid, _ in where} <= idle, f"actors ran in {where}; the node's idle workers were {sorted(idle)}"


def _is_python_worker(proc: psutil.Process) -> bool:
    """A Ray Python worker: ``default_worker.py`` until it names itself ``ray::IDLE`` (or its task's name)."""
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return False
    return any(part.endswith("default_worker.py") for part in cmd) or bool(cmd) and cmd[0].startswith("ray::IDLE")


@pytest.mark.parametrize("cpus_per_trial, after_ray", [(1, True), (2, False)])
def test_a_launchs_plan_is_built_once_ray_runs_only_when_workers_preload_and_its_error_leaves_nothing(
        tmp_path, monkeypatch, cpus_per_trial, after_ray):
    """``launch(PlanBuilder(...))`` (the CLI's and the API's way) builds the plan after Ray's start when Ray's idle
    workers preload torch meanwhile, else first, as before; a plan that fails stops Ray and writes nothing."""
    import ray

    from orchestrator.spec import parse_spec

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(launch, "_node_cpus", lambda: 2)  # the 8 trials fill this machine's or any 2 CPUs
    spec = parse_spec(tiny_spec(name="built", **{"resources.cpus_per_trial": cpus_per_trial}))
    seen: list[bool] = []

    def build():
        seen.append(ray.is_initialized())
        raise RuntimeError("axes.freeze_depth: 9 is past the backbone's layer groups")

    options = launch.LaunchOptions(storage=str(tmp_path / "results"), tracking_uri=sqlite_uri(tmp_path))
    with pytest.raises(RuntimeError, match="past the backbone's layer groups"):
        launch.launch(launch.PlanBuilder(spec, build), options)
    assert seen == [after_ray] and not ray.is_initialized()
    assert not (tmp_path / "results" / "built").exists() and not list(tmp_path.glob("*mlflow.db*"))


def test_a_plan_built_after_rays_start_is_recorded_with_its_data_paths_absolute(tmp_path, monkeypatch):
    """The sweep record keeps the plan's spec, whose dataset paths the plan made absolute (resume reads them
    from any folder), not the builder's spec as written."""
    from orchestrator.api import checked_plan_builder
    from orchestrator.spec import parse_spec
    from orchestrator.storage import experiment_path, read_sweep_record
    from trainables.data.fixtures import write_image_csv

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(launch, "_node_cpus", lambda: 2)
    monkeypatch.chdir(tmp_path)
    options = {**write_image_csv(tmp_path / "lesions"), "root": "lesions", "image_size": 32}
    spec = parse_spec(tiny_spec(name="rel", **{"dataset": {"name": "image_csv", "options": options},
                                               "axes.intervention": {"kind": "none", "magnitudes": [0.5]},
                                               "finetune.size": 8}))

    class Stop(Exception):
        pass

    def stop_after_the_record(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(launch, "_run", stop_after_the_record)  # the record is written just before the run
    storage = tmp_path / "results"
    with pytest.raises(Stop):
        launch.launch(checked_plan_builder(spec, sqlite_uri(tmp_path)),
                      launch.LaunchOptions(storage=str(storage), tracking_uri=sqlite_uri(tmp_path)))
    record = read_sweep_record(experiment_path(str(storage), "rel"))
    assert record["spec"]["dataset"]["options"]["root"] == str(tmp_path / "lesions")
