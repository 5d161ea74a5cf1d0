"""Failures: a trial that diverges, a worker node that dies, and a sweep on a real `ray start` cluster."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.helpers import cli_env, run_cli, sqlite_uri, tiny_spec, write_spec

pytestmark = pytest.mark.slow

EPOCHS = 20  # of the node-failure test's trials: long enough that one is always in flight when its node dies
LEFT = 6  # epochs a trial still has to run when its node dies: the kill lands before it can finish
# epochs a trial has reported before its node dies: Tune registers an epoch's checkpoint with a separate call to
# the actor after that epoch's result, so a node lost right after a trial's first result can take the trial's
# only checkpoint with it, and the retry rightly starts from scratch; once a second result is in, the first
# checkpoint is registered (Tune runs the next epoch only after the save) and the retry must continue from it
FIRST = 2


def _nan_checkpoint(path: Path) -> Path:
    """A readable checkpoint whose weights are NaN: loads fine, diverges at the first batch."""
    from trainables import backbones

    model = backbones.create_backbone("test_resnet", num_classes=2, input_shape=(3, 32, 32))
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in backbones.backbone_state_dict(model).items()}
    torch.save(state, path)
    return path


def test_diverging_trial_is_a_failed_run_and_the_sweep_goes_on(tmp_path):
    ckpt = _nan_checkpoint(tmp_path / "nan.pt")
    spec = tiny_spec(**{"name": "diverge", "axes.paradigm": ["scratch", f"file:{ckpt}"], "axes.freeze_depth": [0],
                        "axes.intervention": {"kind": "correlation", "magnitudes": [0.5]}})
    uri = sqlite_uri(tmp_path)
    storage = str(tmp_path / "results")
    out = run_cli("launch", str(write_spec(tmp_path, spec)), "--tracking-uri", uri, "--storage", storage, "--quiet", cwd=tmp_path)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "1 trials finished, 1 failed" in out.stdout
    assert f"fairsweep resume diverge --storage {storage} --retry-errored" in out.stdout
    mlflow.set_tracking_uri(uri)
    trials = mlflow.search_runs(experiment_names=["diverge"], filter_string="tags.`fairsweep.kind` = 'trial'")
    failed = trials[trials["status"] == "FAILED"]
    assert len(failed) == 1 and failed["params.paradigm"].iloc[0].startswith("file:")
    assert "loss became nan" in failed["tags.fairsweep.error"].iloc[0]
    assert failed["run_id"].iloc[0] in out.stdout
    assert (trials[trials["params.paradigm"] == "scratch"]["status"] == "FINISHED").all()
    assert trials["tags.fairsweep.pareto_front"].dropna().tolist() == ["true"]  # the front holds finished trials only

    failed_id = failed["run_id"].iloc[0]
    client = MlflowClient(uri)
    ended = client.get_run(failed_id).info.end_time

    # a plain resume leaves the errored trial alone: its run is not touched
    plain = run_cli("resume", "diverge", "--storage", storage, "--quiet", cwd=tmp_path)
    assert plain.returncode == 1, plain.stdout[-2000:] + plain.stderr[-2000:]
    assert client.get_run(failed_id).info.end_time == ended

    # retrying runs the errored trial again into the same run: still one run per key
    again = run_cli("resume", "diverge", "--storage", storage, "--retry-errored", "--quiet", cwd=tmp_path)
    assert again.returncode == 1, again.stdout[-2000:] + again.stderr[-2000:]
    trials = mlflow.search_runs(experiment_names=["diverge"], filter_string="tags.`fairsweep.kind` = 'trial'")
    assert len(trials) == 2 and trials["tags.fairsweep.trial_key"].nunique() == 2
    assert sorted(trials["status"]) == ["FAILED", "FINISHED"]
    retried = client.get_run(failed_id)
    assert retried.info.end_time > ended and "loss became nan" in retried.data.tags["fairsweep.error"]  # it ran again


def test_failed_pretraining_fails_its_trials_with_the_reason_and_the_rest_run(tmp_path):
    """A pretraining job that diverges is a FAILED pretrain run; the trials built on it fail at once
    naming it, the scratch trials finish, and the summary says how to retry."""
    spec = tiny_spec(**{"name": "badbase", "pretraining.lr": 1.0e9, "axes.freeze_depth": [0],
                        "axes.intervention": {"kind": "correlation", "magnitudes": [0.5]}, "axes.seed": [0, 1]})
    spec["experiment"] = "team_runs"  # the sweep's runs go to this experiment, not one named after it
    uri = sqlite_uri(tmp_path)
    storage = str(tmp_path / "results")
    out = run_cli("launch", str(write_spec(tmp_path, spec)), "--storage", storage, "--quiet", cwd=tmp_path,
                  env=cli_env(MLFLOW_TRACKING_URI=uri))  # the URI from the environment, no flag
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "2 trials finished, 2 failed" in out.stdout and "--retry-errored" in out.stdout
    mlflow.set_tracking_uri(uri)
    assert mlflow.get_experiment_by_name("badbase") is None
    runs = mlflow.search_runs(experiment_names=["team_runs"])
    pretrain = runs[runs["tags.fairsweep.kind"] == "pretrain"]
    assert list(pretrain["status"]) == ["FAILED"] and "loss became" in pretrain["tags.fairsweep.error"].iloc[0]
    trials = runs[runs["tags.fairsweep.kind"] == "trial"]
    sup = trials[trials["params.paradigm"] == "supervised"]
    assert (sup["status"] == "FAILED").all() and len(sup) == 2
    assert sup["tags.fairsweep.error"].str.contains("pretraining test_resnet/supervised").all()
    assert sup["tags.fairsweep.error"].str.contains(pretrain["run_id"].iloc[0]).all()
    assert (trials[trials["params.paradigm"] == "scratch"]["status"] == "FINISHED").all()
    assert runs[runs["tags.fairsweep.kind"] == "sweep"]["status"].iloc[0] == "FINISHED"


def test_worker_node_failure_retries_trials(tmp_path, monkeypatch, ray_cluster_record):
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.launch import LaunchOptions, launch
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_spec

    for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = tiny_spec(**{"name": "preempted", "finetune.epochs": EPOCHS, "axes.freeze_depth": [0],
                        "resources.max_failures": 3, "resources.checkpoint_interval_s": 0})  # 4 trials
    plan = build_plan(parse_spec(spec))
    uri = sqlite_uri(tmp_path)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # trials can only run on workers
    gcs_address = cluster.address
    doomed = cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)  # the survivor
    killed = threading.Event()

    def preempt() -> None:
        from orchestrator.store import open_client

        client = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed.is_set():
            try:
                client = client or open_client(uri)  # a reader: never creates the store, never races its schema
                exp = client.get_experiment_by_name("preempted")
                runs = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING' AND tags.`fairsweep.kind` = 'trial'") if exp else []
                epochs_done = [len(client.get_metric_history(r.info.run_id, "train_loss")) for r in runs]
            except Exception:  # noqa: BLE001 - store not created yet / locked
                epochs_done = []
            # both workers busy (one trial each, at least FIRST epochs in and at least LEFT from their last):
            # the doomed node certainly has a trial in flight that cannot finish before it is gone, and that
            # trial has a registered checkpoint to continue from. The window is most of a trial: the two
            # workers' trials need not start together on a loaded machine.
            if sum(FIRST <= n <= EPOCHS - LEFT for n in epochs_done) >= 2:
                cluster.remove_node(doomed)
                killed.set()
                return
            time.sleep(0.3)

    thread = threading.Thread(target=preempt, daemon=True)
    thread.start()
    try:
        result = launch(plan, LaunchOptions(address=cluster.address, tracking_uri=uri, storage=str(tmp_path / "results"), verbose=0))
        was_killed = killed.is_set()
    finally:
        killed.set()
        thread.join(timeout=30)
        ray.shutdown()
        node_pids = [info.process.pid for node in (cluster.head_node, *cluster.worker_nodes)
                     for infos in node.all_processes.values() for info in infos if info.process is not None]
        cluster.shutdown()  # deletes Ray's record; the fixture puts back what it said before the test
    # the test cluster is gone: none of its processes (GCS, raylets, their workers' parents) outlives the test
    import psutil

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 30
    while any(alive(p) for p in node_pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert node_pids and not [p for p in node_pids if alive(p)]
    record = ray_cluster_record.read_text() if ray_cluster_record.exists() else ""
    assert gcs_address not in record  # Ray's machine-wide record never names the stopped test cluster
    assert was_killed, "the worker node was never removed"
    assert result.failed == [] and result.finished == 4 and not result.interrupted
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(result.experiment_path)
    retried = [t for t in analysis.trials if t.num_failures > 0]
    assert retried, "no trial was interrupted by the node failure"
    # it continued from its last checkpoint (one per epoch here): Tune's own record of what it reported
    # never goes back to epoch 1 (a restart from scratch would), and ends at the last epoch
    for t in retried:
        epochs = analysis.trial_dataframes[t.trial_id]["epoch"].tolist()
        assert epochs[0] == 1 and epochs[-1] == EPOCHS and 1 not in epochs[1:], epochs
    mlflow.set_tracking_uri(uri)
    trials = mlflow.search_runs(experiment_names=["preempted"], filter_string="tags.`fairsweep.kind` = 'trial'")
    assert len(trials) == 4 and (trials["status"] == "FINISHED").all()
    # and MLflow holds every epoch once
    client = MlflowClient(uri)
    for run_id in trials["run_id"]:
        assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == list(range(1, EPOCHS + 1)), run_id


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GRACE_S = 5.0  # `ray stop` waits 16 s. On SIGTERM most of a node's processes exit at once; here its raylet
# took about 10 s and its GCS about 32 s, which the test need not wait for


def _group_alive(pgid: int, within: float = 0.0) -> list[int]:
    """Pids still alive in process group ``pgid`` (zombies excluded) once it has emptied or ``within`` seconds
    have passed."""
    import psutil

    deadline = time.monotonic() + within
    while True:
        alive = []
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(proc.pid)
            except (ProcessLookupError, psutil.Error):
                continue
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


def test_sweep_on_a_ray_start_head_cluster_through_address(tmp_path):
    """A real `ray start --head` node, reached through --address. The node gets its own --temp-dir (short:
    Ray's socket paths must stay under 108 bytes), so Ray's record of "the local cluster" in
    /tmp/ray/ray_current_cluster is never touched (the conftest guard checks it), and it is stopped as
    `ray stop` stops one: SIGTERM to its processes, SIGKILL to what is left after a grace period, then a
    check that none of its processes is left."""
    import tempfile

    port = _free_port()
    env = cli_env(RAY_AUTH_MODE="disabled")
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp_dir = Path(tempfile.mkdtemp(prefix="fsray"))
    head = subprocess.Popen([ray_bin, "start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard=false",
                             "--disable-usage-stats", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir),
                             "--block"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        record = temp_dir / "ray_current_cluster"  # written once the node is up, in its own folder
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0 and record.exists():
                    break
            time.sleep(0.5)
        assert record.read_text().endswith(f":{port}")
        spec = write_spec(tmp_path, tiny_spec(**{"name": "oncluster", "axes.freeze_depth": [0]}))
        uri = sqlite_uri(tmp_path)
        out = run_cli("launch", str(spec), "--address", f"127.0.0.1:{port}", "--tracking-uri", uri,
                      "--storage", str(tmp_path / "shared"), "--quiet", cwd=tmp_path, env=env)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        mlflow.set_tracking_uri(uri)
        trials = mlflow.search_runs(experiment_names=["oncluster"], filter_string="tags.`fairsweep.kind` = 'trial'")
        assert len(trials) == 4 and (trials["status"] == "FINISHED").all()
        assert (tmp_path / "shared" / "_pretrain_cache").is_dir()
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # what `ray stop` sends first
        if _group_alive(head.pid, within=GRACE_S):
            os.killpg(head.pid, signal.SIGKILL)  # what `ray stop` sends after its grace period
        head.wait(timeout=30)
        left = _group_alive(head.pid, within=30)
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"processes of the test's ray node outlived SIGTERM and SIGKILL: {left}"
    # and Ray's machine-wide record of "the local cluster" never named it, so a user's plain ray.init() is unaffected
    default_record = Path("/tmp/ray/ray_current_cluster")
    assert not (default_record.exists() and default_record.read_text().strip().endswith(f":{port}"))
