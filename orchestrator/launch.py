"""Run a plan on Ray: the finetuning trials run through a Tune ``Tuner`` with the MLflow tracker as a
driver-side callback; the first trial that needs a pretrained base builds it, once per key, in its own worker.

Embedded by default (a local Ray bound to 127.0.0.1, SQLite MLflow and results in the working
directory); ``address`` / ``storage`` / ``tracking_uri`` point the same plan at a cluster.

Ray, the search (Ray Tune, Optuna), the tracker (MLflow) and the feature cache (torch) are imported
inside the functions that run a sweep: they take seconds to load, Ray only after ``raylocal`` set its
loopback default, and the API, ``fairsweep status`` and ``cache`` import this module without them.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd

from orchestrator import raylocal  # before anything imports ray: a local Ray binds to 127.0.0.1
from orchestrator.driverlock import LOCK_FILE, DriverLock, SweepBusyError, lock_holder
from orchestrator.mlflow_runs import find_parent_run
from orchestrator.plan import Plan, build_plan
from orchestrator.spec import SweepSpec, parse_spec
from orchestrator.storage import (CACHE_DIRNAME, artifact_location, check_storage_writable, experiment_path,
                                  read_sweep_record, resolve_storage, resolve_tracking_uri, sqlite_path,
                                  write_sweep_record)
from orchestrator.store import SchemaAhead, check_store, open_client, store_cause
from trainables.errors import UserError
from trainables.finetune import TrialContext, finetune_trial
from trainables.plugins import TRIAL_WORKER_MODULES, with_plugins  # a plugin's names resolve in every Ray worker too
from trainables.trial import TUNE_KEY

__all__ = ["LaunchOptions", "LaunchResult", "LaunchError", "PlanBuilder", "launch", "resume", "init_ray",
           "quiet_tune_restore_logs", "sweep_interrupted"]


class LaunchError(UserError, RuntimeError):
    """A sweep that cannot start as asked (the message says what to do instead)."""


@dataclass(frozen=True)
class LaunchOptions:
    tracking_uri: str | None = None
    address: str | None = None
    storage: str | None = None
    cache_dir: str | None = None
    max_concurrent_trials: int | None = None
    verbose: int = 0  # Tune's own output: 1 adds its status table and a table per trial (the CLI's --verbose)
    # one line per event of the long phases (a pretrained base built or found; the sweep's counts, front and ETA every
    # few seconds): the CLI prints them, plain lines whether or not the output is a terminal
    progress: Callable[[str], None] | None = None
    trial_output: bool = False  # forward the workers' stdout/stderr (the trials' own prints and warnings)
    dashboard: bool = False  # start Ray's dashboard (on 127.0.0.1 for a local Ray)


@dataclass(frozen=True)
class PlanBuilder:
    """A sweep's spec and how to build its plan, for ``launch`` to call once Ray has started when Ray's idle
    workers preload the trials' modules meanwhile (``_worker_preload``), else at once."""
    spec: SweepSpec
    build: Callable[[], Plan]


@dataclass(frozen=True)
class LaunchResult:
    plan: Plan
    experiment_path: str
    tracking_uri: str
    parent_run_id: str
    front: pd.DataFrame
    finished: int
    failed: list[str] = field(default_factory=list)  # MLflow run ids of FAILED trials
    interrupted: bool = False  # stopped before every trial ended (SIGINT); `fairsweep resume` continues it
    search_ended: str = ""  # an optuna search: why it stopped proposing trials (its budget, failures, a used-up space)


def quiet_tune_restore_logs() -> None:
    """Tune warns once per trial that never wrote result.json (trials interrupted before their first
    report); on restore that is expected and drowns the useful output."""
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)


def init_ray(address: str | None, *, trial_output: bool = False, dashboard: bool = False,
             preload: tuple[str, ...] = ()) -> tuple[bool, str]:
    """Connect to ``address`` (or RAY_ADDRESS), else start a private local Ray on loopback (its dashboard,
    when asked for, on 127.0.0.1 too), whose idle workers import the modules ``preload`` names as they start
    (Ray's ``preload_python_modules``; a cluster's workers are its own). Returns whether this call started Ray
    (and so should shut it down), and the dashboard's address ("" when none runs)."""
    import ray

    if ray.is_initialized():
        return False, ""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, log_to_driver=trial_output)
        return True, context.dashboard_url or ""
    # bound to 127.0.0.1 because raylocal set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before ray was imported;
    # "local" always starts a private instance: a bare ray.init() would join whatever cluster
    # /tmp/ray/ray_current_cluster names, even a dead one, and hang there.
    # Preloaded workers are kept for the trials: by default Ray ends workers idle for 1 s once more of them
    # live than CPUs are free, as Tune's placement groups take the CPUs, and starts new ones for the trials.
    system_config = ({"preload_python_modules": list(preload), "num_workers_soft_limit": _node_cpus()}
                     if preload else None)
    try:
        context = ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1",
                           log_to_driver=trial_output, configure_logging=False, _system_config=system_config)
    except Exception as exc:
        if dashboard and "missing packages" in str(exc):  # Ray's words when ray[default] is not installed
            _stop_ray()
            raise LaunchError("--dashboard needs Ray's dashboard packages (ray[default]); install them with "
                              "`pip install -e '.[cluster]'`, or leave out --dashboard") from None
        raise
    return True, (context.dashboard_url or "") if dashboard else ""


def _trial_context(plan: Plan, cache_root: str, finished: list | None = None, driver_run: str = "",
                   feature_cache: str | None = None, input_cache: str | None = None) -> Any:
    """What every trial shares. ``feature_cache`` and ``input_cache``: the folders of the frozen-prefix
    feature cache and of decoded folder images (beside the sweeps in the storage path, so a node's workers
    share them); None, or resources.feature_cache / resources.input_cache: false, turns one off.
    ``driver_run``: names this run of the sweep, under which a base that failed to build is remembered."""
    s = plan.spec
    return TrialContext(dataset=s.dataset.name, dataset_options=dict(s.dataset.options), cache_root=cache_root,
                        cpus_per_trial=s.resources.cpus_per_trial, finished=tuple(finished or ()),
                        pretrain_jobs={job.key: job.to_dict() for job in plan.pretrain_jobs}, driver_run=driver_run,
                        objectives=(s.objectives.performance, s.objectives.fairness),
                        bootstrap=s.evaluation.bootstrap, privileged=dict(s.dataset.privileged),
                        feature_cache=feature_cache if s.resources.feature_cache else None,
                        input_cache=input_cache if s.resources.input_cache else None,
                        feature_cache_bytes=s.resources.feature_cache_bytes,
                        input_cache_bytes=s.resources.input_cache_bytes,
                        checkpoint_interval_s=s.resources.checkpoint_interval_s, precision=s.resources.precision)


def _check_resources(res: Any, *, local: bool) -> None:
    """A trial that asks for more CPUs or GPUs than any node has would wait forever. On the local
    instance that is certain, so it is an error; a cluster may be autoscaling, so there it is a warning."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    best = {r: max((n.get(r, 0.0) for n in nodes), default=0.0) for r in ("CPU", "GPU")}
    short = [f"{field} = {want:g} but the largest node has {best[r]:g} {r}s"
             for field, want, r in (("cpus_per_trial", res.cpus_per_trial, "CPU"), ("gpus_per_trial", res.gpus_per_trial, "GPU"))
             if want > best[r] + 1e-9]
    if not short:
        return
    message = f"resources.{'; resources.'.join(short)}: no trial could ever be scheduled"
    if local:
        raise LaunchError(f"{message}; lower them in the spec (gpus_per_trial: 0 runs on the CPU), or pass --address "
                          f"to run on a Ray cluster that has them")
    logging.getLogger(__name__).warning("%s yet; trials wait until the cluster has such a node (autoscaling)", message)


def _cache_root(folder: str | None, *, base: str | None = None) -> str | None:
    """``--cache-dir`` made absolute (against ``base``, default the working directory): Tune runs each trial in
    its own folder, where a relative path would name a different, unshared cache for every trial."""
    if not folder:
        return None
    # abspath, not resolve: a symlinked path stays as given, for workers whose mounts differ from the driver's
    return os.path.abspath(os.path.join(base or os.getcwd(), os.path.expanduser(folder)))


def sweep_interrupted(spec: Any, *, unfinished: int, search_ended: str | None, finished: int, failed: int) -> bool:
    """Whether a sweep stopped before its end (a resume continues it) rather than ended, once Tune's fit returned.

    ``unfinished``: trials Tune still held as pending or running (a Ctrl-C). A grid ends when every trial
    finished or failed in MLflow, the ground truth. An optuna search replaces failed trials until its budget
    has finished; it also ends when its searcher says why (``search_ended``: failures, a used-up space), which
    MLflow's counts alone cannot tell from an interruption (a trial without objective values finishes in MLflow
    while the study counts it failed); for a study from before such reasons were kept, the counts decide."""
    if unfinished > 0:
        return True
    if spec.search.type != "optuna":
        return finished + failed < spec.n_trials
    budget = spec.search.budget
    return search_ended is None and finished < budget and failed < max(budget, 10)


def _check_max_concurrent(options: LaunchOptions) -> None:
    cap = options.max_concurrent_trials
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise LaunchError(f"--max-concurrent {cap!r}: give a whole number of at least 1, or leave it out to use the "
                          f"spec's resources.max_concurrent_trials")


def _refuse_deleted_experiment(client: Any, spec: Any, tracking_uri: str) -> Any:
    """The sweep's MLflow experiment, or None; a deleted one (in MLflow's trash) is refused before anything
    starts: MLflow refuses runs in it, which would stop the sweep at its first write. Returns the experiment."""
    exp = client.get_experiment_by_name(spec.experiment)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise LaunchError(f"MLflow experiment {spec.experiment!r} (id {exp.experiment_id}) at {tracking_uri} is "
                          f"deleted; restore it (`mlflow experiments restore --experiment-id {exp.experiment_id}` with "
                          f"MLFLOW_TRACKING_URI={tracking_uri}), or give the sweep another `experiment:`")
    return exp


def _refuse_tracked_sweep(spec: Any, tracking_uri: str, storage: str) -> None:
    """A new launch must not adopt another launch's MLflow runs (e.g. the same name with a new
    --storage): it would continue that parent run and take its finished trials for its own."""
    db = sqlite_path(tracking_uri)
    if db is not None and not db.exists():
        return  # no store yet, so no sweep in it (and no database file created just to look)
    client = open_client(tracking_uri)
    exp = _refuse_deleted_experiment(client, spec, tracking_uri)
    parent = find_parent_run(client, exp.experiment_id, spec.name) if exp is not None else None
    if parent is not None:
        raise LaunchError(f"sweep {spec.name!r} already has a parent run ({parent.info.run_id}) in MLflow experiment "
                          f"{spec.experiment!r} at {tracking_uri}, but no Tune state under {storage}; resume it with the "
                          f"storage it was launched with (`fairsweep resume {spec.name} --storage DIR`), or give this "
                          f"sweep another `name:` (or `experiment:`)")


def _new_tuner(plan: Plan, path: str, storage: str, options: LaunchOptions, search_id: str) -> Callable:
    """How a sweep's Tuner is made when Tune has no state to restore: a launch, or a resume of a launch that
    stopped before Tune first saved its state. ``search_id`` marks the optuna study as this sweep's."""
    from ray import tune

    spec = plan.spec

    def make_tuner(trainable: Any, tracker: Any) -> Any:
        res = spec.resources
        concurrency = options.max_concurrent_trials or res.max_concurrent_trials
        if spec.search.type == "optuna":
            from orchestrator.search import STUDY_FILE, StudySearcher

            param_space: dict = {}
            # the searcher holds the cap itself: Tune's wrapper for max_concurrent_trials would keep a second
            # list of live trials, saved apart, and lose completions after a driver killed mid-save
            searcher = StudySearcher(plan, f"{path}/{STUDY_FILE}", study_name=spec.name, max_concurrent=concurrency,
                                     sweep_id=search_id)
            tune_config = tune.TuneConfig(search_alg=searcher, num_samples=-1, reuse_actors=True)
        else:
            param_space = {TUNE_KEY: tune.grid_search([t.config.to_dict() for t in plan.run_order()])}
            # long-lived workers: torch, timm and the data are imported and built once per worker, not per trial
            tune_config = tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True)
        return tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune_config,
            run_config=tune.RunConfig(
                name=spec.name, storage_path=storage, callbacks=[tracker], verbose=options.verbose,
                failure_config=tune.FailureConfig(max_failures=res.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )

    return make_tuner


def launch(plan: Plan | PlanBuilder, options: LaunchOptions = LaunchOptions()) -> LaunchResult:
    """Run a new sweep to the end. Raises ``LaunchError`` if the sweep already exists (use ``resume``)
    or cannot start, ``StorageError`` for a storage path or tracking URI that cannot be used as given,
    ``StoreError`` if the tracking store cannot be used; either way nothing is written.
    Every check runs before the first write; the sweep's folder and its driver lock come first.

    ``plan`` may be a ``PlanBuilder`` (the spec, and how to build its plan). When Ray's idle workers preload the
    trials' modules (``_worker_preload``), the plan is then built once Ray has started, while they import; its
    errors then come a few seconds later, still before any write. Otherwise it is built first."""
    raylocal.loopback_default(options.address)
    from ray import tune

    _check_max_concurrent(options)
    builder = plan if isinstance(plan, PlanBuilder) else PlanBuilder(plan.spec, lambda ready=plan: ready)
    preload = _worker_preload(builder.spec, options)
    built_first = None if preload else builder.build()  # as before: the plan's errors come before Ray's start
    spec = builder.spec
    storage = resolve_storage(options.storage)
    path = experiment_path(storage, spec.name)

    def refuse_existing() -> None:
        if tune.Tuner.can_restore(path):
            raise LaunchError(f"sweep {spec.name!r} already exists at {path}; continue it with `fairsweep resume "
                              f"{spec.name} --storage {storage}`, or give the sweep another name or storage")

    _refuse_running(path, spec.name, storage)
    refuse_existing()
    check_storage_writable(storage)
    tracking_uri = resolve_tracking_uri(options.tracking_uri)
    check_store(tracking_uri, create=True)
    _refuse_tracked_sweep(spec, tracking_uri, storage)
    cache_root = _cache_root(options.cache_dir) or f"{storage.rstrip('/')}/{CACHE_DIRNAME}"

    schema = SchemaAhead(tracking_uri)  # a new store's schema is built while Ray starts; in place only once all passed
    try:
        with _ray_session(spec, options, preload):  # the resource check needs Ray; it must pass before any write
            plan = built_first if built_first is not None else builder.build()
            spec = plan.spec  # its data paths made absolute: what the record keeps for resume
            with _driver_lock(path, spec.name, storage, new=True):
                refuse_existing()  # a launch of the same sweep may have run while this one started Ray
                # before this process opens the store again: MLflow's schema code is not thread-safe; and a store
                # that did not exist holds no sweep to refuse, so what follows refuses only over an existing one
                schema.install()
                _refuse_tracked_sweep(spec, tracking_uri, storage)
                # cwd: a relative file (a checkpoint, a dataset folder) resolves against it on resume
                search_id = uuid.uuid4().hex
                write_sweep_record(path, {"spec": dict(spec.source), "tracking_uri": tracking_uri,
                                          "cache_root": cache_root, "cwd": os.getcwd(), "search_id": search_id,
                                          "dataset_fingerprint": plan.dataset_fingerprint})
                return _run(plan, path, tracking_uri, cache_root, options,
                            _new_tuner(plan, path, storage, options, search_id))
    finally:
        schema.discard()


def resume(name: str, options: LaunchOptions = LaunchOptions(), *, retry_errored: bool = False) -> LaunchResult:
    """Continue an interrupted sweep with Tune's restore: finished trials stay finished, trials in flight
    continue from their last checkpoint, errored ones run again only with ``retry_errored``.

    MLflow is the ground truth for finished work: a trial that finished after Tune's last state save
    is not trained again. Raises ``StorageError`` when the storage holds no sweep ``name``.
    """
    raylocal.loopback_default(options.address)
    from ray import tune

    storage = resolve_storage(options.storage)
    path = experiment_path(storage, name)
    record = read_sweep_record(path)
    _refuse_running(path, name, storage)
    _check_max_concurrent(options)
    restorable = tune.Tuner.can_restore(path)
    spec = parse_spec(record["spec"])
    if restorable and options.max_concurrent_trials and spec.search.type != "optuna":
        raise LaunchError(f"--max-concurrent: a grid sweep keeps the cap it was launched with (Tune's restore "
                          f"brings back its grid's state, cap included); resume {name!r} without --max-concurrent")
    plan = build_plan(spec, base_dir=record.get("cwd"))
    launched_on = record.get("dataset_fingerprint")  # absent from records written before it was kept
    if launched_on and launched_on != plan.dataset_fingerprint:
        raise LaunchError(f"sweep {name!r}: its dataset is not the one it was launched on (fingerprint {launched_on} "
                          f"then, {plan.dataset_fingerprint} now): image files changed or were copied without their "
                          f"times, or another fairsweep keys them differently. Its trials and bases are keyed by it, "
                          f"so resuming would run them again under new keys; put the files back as they were (copies "
                          f"with their times: cp -p, rsync -a), or launch it as a new sweep")
    tracking_uri = resolve_tracking_uri(options.tracking_uri or record["tracking_uri"])
    check_store(tracking_uri, create=True)
    _refuse_deleted_experiment(open_client(tracking_uri), plan.spec, tracking_uri)
    # a record from before cache roots were made absolute may hold a relative one: it meant the launch's folder
    cache_root = _cache_root(options.cache_dir) or _cache_root(record["cache_root"], base=record.get("cwd"))

    def restore_tuner(trainable: Any, tracker: Any) -> Any:
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=retry_errored)
        # Tune restores the run config it pickled: this driver's tracker (fresh client, this URI) replaces the
        # old one, and this command's verbosity the launch's (`_tune_console` follows the same option)
        run_config = tuner._local_tuner.get_run_config()
        run_config.callbacks = [tracker]
        run_config.verbose = options.verbose
        _searcher_holds_the_cap(tuner._local_tuner._tune_config, options.max_concurrent_trials)
        return tuner

    # A launch that stopped before Tune first saved its state (Ctrl-C as the trials started, a store error) left
    # its record and its MLflow parent run but nothing to restore: it starts again from the record, continuing
    # that parent run and skipping trials MLflow holds as finished, as `launch` would not (it refuses the run).
    make_tuner = restore_tuner if restorable else _new_tuner(plan, path, storage, options,
                                                             record.get("search_id") or uuid.uuid4().hex)
    with _ray_session(plan.spec, options), _driver_lock(path, name, storage, new=False):
        return _run(plan, path, tracking_uri, cache_root, options, make_tuner)


def _searcher_holds_the_cap(tune_config: Any, override: int | None) -> None:
    """On resume, an optuna sweep's concurrency cap lives in its study searcher, never in Tune's
    ConcurrencyLimiter (see launch): a sweep launched before that had Tune wrap its searcher, so the cap moves
    into the searcher here; ``--max-concurrent``, if given, replaces it. A grid sweep is left as it was (``resume``
    refuses ``--max-concurrent`` for one: Tune's restore would bring back the grid's cap over it)."""
    from orchestrator.search import StudySearcher

    searcher = tune_config.search_alg
    if isinstance(searcher, StudySearcher):
        searcher.max_concurrent = override or tune_config.max_concurrent_trials or searcher.max_concurrent
        tune_config.max_concurrent_trials = None


def _busy_message(name: str, storage: str) -> str:
    return (f"sweep {name!r} is already being run by the driver {{holder}}: a sweep has one driver at a time; watch it "
            f"with `fairsweep status {name} --storage {storage}`, or stop that process and then `fairsweep resume "
            f"{name} --storage {storage}`")


def _refuse_running(path: str, name: str, storage: str) -> None:
    """Refuse at once, before Ray starts, while another driver holds the sweep."""
    holder = lock_holder(path)
    if holder is not None:
        raise LaunchError(_busy_message(name, storage).replace("{holder}", holder))


@contextlib.contextmanager
def _driver_lock(path: str, name: str, storage: str, *, new: bool) -> Iterator[None]:
    """Hold the sweep's driver lock for the block. For a new sweep the folder is created here, and
    removed again if the block fails before writing anything else into it."""
    folder = Path(path)
    created = [p for p in (folder, *folder.parents) if not p.exists()] if new else []
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LaunchError(f"cannot create the sweep folder {path} ({exc.strerror or exc}); pass --storage a folder "
                          f"this user can write") from None
    lock = DriverLock(folder, _busy_message(name, storage))
    try:
        lock.acquire()
    except SweepBusyError as exc:
        raise LaunchError(str(exc)) from None
    empty = False
    try:
        yield
    except BaseException:
        empty = bool(created) and {p.name for p in folder.iterdir()} <= {LOCK_FILE}
        raise
    finally:
        lock.release(remove=empty)
        if empty:
            for p in created:  # innermost first; one that is not empty (someone else wrote there) stays
                with contextlib.suppress(OSError):
                    p.rmdir()


def _joins_cluster(options: LaunchOptions) -> bool:
    """Whether this launch joins a cluster (``--address`` or RAY_ADDRESS) rather than starting a local Ray."""
    return bool(options.address or os.environ.get("RAY_ADDRESS"))


def _node_cpus() -> int:
    """The CPUs a local Ray gives this node (and starts as many idle workers for): a container's quota, if any."""
    try:
        from ray._private.utils import get_num_cpus
    except ImportError:  # moved in another Ray
        return os.cpu_count() or 1
    return max(1, int(get_num_cpus(override_docker_cpu_warning=True)))  # Ray warns once itself, at its start


def _worker_preload(spec: Any, options: LaunchOptions) -> tuple[str, ...]:
    """The trials' modules (``TRIAL_WORKER_MODULES``) for a local Ray's idle workers to import as they start, when
    each of them will run trials, else nothing. Ray starts one idle worker per CPU and the trials run in them
    (``_trial_actors_in_idle_workers``): with CPU trials of at most one CPU, and no cap or trial count below the
    CPUs, there is a trial for every worker. Otherwise most would hold torch and timm (hundreds of MB) for nothing."""
    if _joins_cluster(options):
        return ()
    res = spec.resources
    at_once = min(n for n in (options.max_concurrent_trials or res.max_concurrent_trials, spec.n_trials) if n)
    if res.gpus_per_trial or res.cpus_per_trial > 1 or at_once < _node_cpus():
        return ()
    return TRIAL_WORKER_MODULES


@contextlib.contextmanager
def _ray_session(spec: Any, options: LaunchOptions, preload: tuple[str, ...] = ()) -> Iterator[None]:
    """Ray for the block, its resources checked first; a Ray this process started is shut down after."""
    cluster = _joins_cluster(options)
    started, dashboard_url = init_ray(options.address, trial_output=options.trial_output, dashboard=options.dashboard,
                                      preload=preload)
    if options.dashboard and options.progress:
        options.progress(f"Ray dashboard: http://{dashboard_url}" if dashboard_url else
                         "Ray dashboard: not running (it needs ray[default]: pip install -e '.[cluster]')")
    try:
        _check_resources(spec.resources, local=started and not cluster)
        yield
    finally:
        if started:
            _stop_ray()


def _stop_ray() -> None:
    """``ray.shutdown()``, less the second Ray's autoscaler monitor costs it. Ray stops the monitor after the GCS;
    the monitor's SIGTERM handler then blocks reporting its end to the GCS that is gone, until Ray kills it 1 s
    later. A private local instance has nothing to autoscale, so its monitor is killed outright first; a driver
    connected to a cluster has no such process of its own (and leaves the cluster's running)."""
    import ray
    from ray._private import ray_constants, worker

    node = getattr(worker, "_global_node", None)
    for info in (getattr(node, "all_processes", None) or {}).get(ray_constants.PROCESS_TYPE_MONITOR, []):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            info.process.kill()
            info.process.wait(timeout=1)
    ray.shutdown()


def _run(plan: Plan, path: str, tracking_uri: str, cache_root: str, options: LaunchOptions,
         make_tuner: Callable[[Any, Any], Any]) -> LaunchResult:
    """Shared by launch and resume, under the driver lock with Ray up: parent run, Tune (its trials build their bases), then
    the summary. A store that fails mid-sweep (locked past the bound) stops it as a StoreError that says how to continue."""
    importlib.import_module("orchestrator.tracking")  # MLflow and Tune loaded before the freeze below
    quiet_tune_restore_logs()
    with _long_lived_objects_frozen():
        return _run_sweep(plan, path, tracking_uri, cache_root, options, make_tuner)


@contextlib.contextmanager
def _long_lived_objects_frozen() -> Iterator[None]:
    """The driver's full collections skip what exists before the sweep: the modules the plan and Ray's start
    loaded (torch, timm, Ray, MLflow: ~0.5 M objects, which every full collection re-scanned: ~0.9 s of a
    quickstart's driver CPU, beside its trials on the same cores). What the sweep creates is collected as
    usual; the frozen objects become collectable again after it. A process that froze objects itself keeps
    its own policy."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _trial_actors_in_idle_workers() -> Iterator[None]:
    """Let Tune start its trial actors in the idle workers Ray starts on the driver's node, one per CPU.
    Why: Tune gives every trainable actor the runtime_env
    ``{"env_vars": {"PL_DISABLE_FORK": "1"}}`` (its ``class_cache.DEFAULT_ENV_VARS``, for PyTorch Lightning),
    and Ray runs an actor that has a runtime_env only in a worker started for that env: each trial worker was
    a new process started through Ray's runtime-env agent while the idle workers sat unused until Ray ended
    them. With the defaults empty for the fit, the quickstart launch took 49-54 s against 58-60 s (five
    interleaved pairs, README "Throughput"). The trial worker's entry point sets the variable instead
    (``trainables.plugins.TRIAL_WORKER_ENV``). On a cluster's other nodes a trial's worker is still a new
    process, now one without a runtime env. Nothing is gained, and nothing changes, for trials whose actors
    get an env anyway: a job with its own runtime_env, or a variable Tune propagates from the driver (cloud
    credentials, Ray Train's). Tune reads the defaults when it creates each actor, within the fit; they are
    restored after it. One launch per process at a time, as for Ray itself. A Ray without that module
    attribute is left alone."""
    try:
        from ray.tune.execution.class_cache import DEFAULT_ENV_VARS as defaults
    except ImportError:  # the module or the name gone
        defaults = None
    if not isinstance(defaults, dict):
        yield
        return
    saved = dict(defaults)
    try:
        defaults.clear()
        yield
    finally:
        defaults.clear()
        defaults.update(saved)


def _fit(tuner: Any, verbose: int) -> Any:
    """``tuner.fit()`` with Tune's console as asked and the trial actors in Ray's idle workers."""
    with _tune_console(verbose), _trial_actors_in_idle_workers():
        return tuner.fit()


@contextlib.contextmanager
def _tune_console(verbose: int) -> Iterator[None]:
    """Tune's console output as asked: at verbosity 0 its newer console reporter still prints a configuration
    table and a TensorBoard hint naming a temporary Ray folder; its older one, chosen for the fit, prints nothing
    (a failed trial is still reported, with its traceback, by Tune's logger). The variable is restored afterwards
    (a later fit in this process may ask for output)."""
    if verbose:
        yield
        return
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def _run_sweep(plan: Plan, path: str, tracking_uri: str, cache_root: str, options: LaunchOptions,
               make_tuner: Callable[[Any, Any], Any]) -> LaunchResult:
    from ray import tune

    from orchestrator.tracking import SweepTracker
    from trainables.data.images import DECODED_CACHE_DIRNAME
    from trainables.feature_cache import FEATURE_CACHE_DIRNAME

    spec = plan.spec
    # num_to_keep forces a state snapshot after checkpoints; that is what keeps resume exact here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    tracker = SweepTracker(plan, tracking_uri, artifact_location=artifact_location(tracking_uri),
                           progress=options.progress, cache_root=cache_root)
    status, store_failed = "FAILED", False
    try:
        tracker.open()
        shared = Path(path).parent  # the storage path: what the workers of a node share
        tracker.announce_pretraining()
        finished = tracker.finished_trials()
        tracker.remember_finished(finished)
        context = _trial_context(plan, cache_root, finished=finished, driver_run=tracker.driver_run,
                                 feature_cache=str(shared / FEATURE_CACHE_DIRNAME),
                                 input_cache=str(shared / DECODED_CACHE_DIRNAME))
        res = spec.resources
        trainable = tune.with_resources(tune.with_parameters(with_plugins(finetune_trial, spec.plugins), context=context),
                                        {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial})
        tuner = make_tuner(trainable, tracker)
        searcher = tuner._local_tuner._tune_config.search_alg  # Tune keeps no public handle on it
        searcher = getattr(searcher, "searcher", searcher)  # inside a ConcurrencyLimiter (sweeps resumed from before)
        grid = _fit(tuner, options.verbose)
        unfinished = len(grid) - grid.num_terminated - grid.num_errors  # Tune's own: stopped with these to run
        tracker.log_unreported_pretraining()
        front = tracker.refresh_front()
        try:  # a convenience at the end: a sweep whose models cannot be logged has still finished
            tracker.log_front_models(front)
        except Exception as exc:  # noqa: BLE001 - e.g. a checkpoint on storage this driver cannot read
            logging.getLogger(__name__).warning("the front's models were not logged to MLflow: %s", exc)
        counts = tracker.trial_status_counts()
        failed = tracker.trial_run_ids("FAILED")
        finished = counts.get("FINISHED", 0)
        ended = None
        if spec.search.type == "optuna":
            try:
                ended = searcher.ended() if hasattr(searcher, "ended") else None
            except Exception as exc:  # noqa: BLE001 - a study database gone at the end: the counts decide
                logging.getLogger(__name__).warning("could not read why the search ended (%s); judged from MLflow's "
                                                    "counts", exc)
        interrupted = sweep_interrupted(spec, unfinished=unfinished, search_ended=ended, finished=finished,
                                        failed=len(failed))
        if interrupted:
            tracker.mark_in_flight_killed()
        else:
            tracker.mark_in_flight_killed(reason="in flight when an earlier driver stopped, and not in Tune's saved "
                                                 "state, so it never resumed; the search ran another trial instead")
        status = "KILLED" if interrupted else "FINISHED"
        return LaunchResult(plan, path, tracking_uri, tracker.parent_run_id, front, finished, failed, interrupted,
                            ended or "")
    except Exception as exc:
        cause = store_cause(exc)  # Tune wraps what its callbacks raise
        if cause is None:
            raise
        store_failed = True  # closing the parent run would wait out the same lock again
        storage, name = str(Path(path).parent), Path(path).name
        raise type(cause)(f"{cause}; the sweep stopped: continue it with `fairsweep resume {name} --storage {storage}` "
                          f"once the store is usable") from None
    finally:
        if not store_failed:
            tracker.close(status)
