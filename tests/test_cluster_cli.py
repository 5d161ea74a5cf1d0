"""The CLI against a real multi-node Ray cluster on this machine's loopback: `fairsweep launch --address`
on a head and two worker nodes (``ray.cluster_utils.Cluster``, bound to 127.0.0.1), one worker node
killed mid-sweep, and every trial still finishing exactly once."""
from __future__ import annotations

import threading
import time

import mlflow
import pytest

from tests.helpers import cli_env, run_cli, sqlite_uri, tiny_spec, write_spec

pytestmark = pytest.mark.slow

EPOCHS = 20
LEFT = 6  # epochs still to run when the node dies: the kill lands before the trial can finish
FIRST = 2  # epochs reported before: the first checkpoint is registered (tests/test_fault_tolerance.py, FIRST)


def _kill_when_both_workers_are_mid_trial(cluster, doomed, uri: str, name: str, stop: threading.Event) -> None:
    """Remove ``doomed`` once two trials (one per worker: the head has no CPUs) have each reported FIRST epochs
    and have at least LEFT epochs to go, so a trial is certainly in flight on the node that dies. The
    window is most of a trial, as the two workers' trials need not start together on a loaded machine."""
    from orchestrator.store import open_client

    client, deadline = None, time.monotonic() + 300
    while time.monotonic() < deadline and not stop.is_set():
        try:
            client = client or open_client(uri)  # a reader: never creates the store
            exp = client.get_experiment_by_name(name)
            runs = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") if exp else []
            done = [len(client.get_metric_history(r.info.run_id, "train_loss")) for r in runs]
        except Exception:  # noqa: BLE001 - the store does not exist yet, or is busy
            done = []
        if sum(FIRST <= n <= EPOCHS - LEFT for n in done) >= 2:
            cluster.remove_node(doomed)
            stop.set()
            return
        time.sleep(0.3)


def test_the_cli_runs_a_sweep_on_a_multi_node_cluster_through_a_lost_node(tmp_path, monkeypatch, ray_cluster_record):
    from ray.cluster_utils import Cluster

    for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}.items():
        monkeypatch.setenv(key, value)  # this process's cluster on loopback, without a token
    spec = tiny_spec(**{"name": "multinode", "finetune.epochs": EPOCHS, "axes.freeze_depth": [0],
                        "resources.max_failures": 3, "resources.checkpoint_interval_s": 0})  # 4 trials
    uri = sqlite_uri(tmp_path)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    gcs_address = cluster.address
    doomed = cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    killed = threading.Event()
    killer = threading.Thread(target=_kill_when_both_workers_are_mid_trial,
                              args=(cluster, doomed, uri, "multinode", killed), daemon=True)
    killer.start()
    try:
        out = run_cli("launch", str(write_spec(tmp_path, spec)), "--address", cluster.address, "--tracking-uri", uri,
                      "--storage", str(tmp_path / "shared"), "--quiet", cwd=tmp_path,
                      env=cli_env(RAY_AUTH_MODE="disabled"))
        was_killed = killed.is_set()
    finally:
        killed.set()
        killer.join(timeout=30)
        cluster.shutdown()  # deletes Ray's record; the fixture puts back what it said before the test
    assert was_killed, "the worker node was never removed"
    record = ray_cluster_record.read_text() if ray_cluster_record.exists() else ""
    assert gcs_address not in record  # Ray's machine-wide record never names the stopped test cluster
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "4 trials finished, 0 failed" in out.stdout
    from ray.tune import ExperimentAnalysis

    retried = [t for t in ExperimentAnalysis(str(tmp_path / "shared" / "multinode")).trials if t.num_failures > 0]
    assert retried, "no trial was interrupted by the node failure"
    mlflow.set_tracking_uri(uri)
    trials = mlflow.search_runs(experiment_names=["multinode"], filter_string="tags.`fairsweep.kind` = 'trial'")
    assert len(trials) == 4 and (trials["status"] == "FINISHED").all() and trials["tags.fairsweep.trial_key"].nunique() == 4
