"""Orchestration at scale: thousands of near-empty trials through the real driver path
(Tune -> SweepTracker -> MLflow in SQLite), on a local Ray or a multi-node cluster simulated on this
machine (``ray.cluster_utils.Cluster``, loopback only).

Each trial reports one final result at once (random metrics, no training, no checkpoint), so what is
measured is what the driver spends per trial: the tracker's callbacks (run creation, params, metrics,
artifacts, front tags) and the front refreshes, which are throttled (at most every FRONT_REFRESH_S) and
must not grow faster than linearly with the finished trials. Prints the wall time, the driver's time
per trial and every front refresh (finished trials, seconds) with seconds per 1,000 trials. Usage:

    .venv/bin/python benchmarks/orchestration_scale.py [--trials 2000] [--cluster]

Targets: <= 0.1 s of driver time per trial; front-refresh time per finished trial roughly constant.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only, before ray is imported
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def near_empty_trial(config: Mapping[str, Any]) -> None:
    """One final result with plausible metrics: the driver cannot tell it from a real trial."""
    import random

    from ray import tune

    rng = random.Random(hash(str(config["trial"]["point"])))
    acc, unfair = 0.5 + 0.5 * rng.random(), 0.5 * rng.random()
    tune.report({"epoch": 1, "train_loss": 0.5, "val_loss": 0.5, "accuracy": acc, "equalized_odds_difference": unfair,
                 "val_accuracy": acc, "val_equalized_odds_difference": unfair, "done_training": True})


def spec(n_trials: int) -> dict:
    seeds = max(1, n_trials // 20)
    return {"name": "scale", "dataset": {"name": "synthetic_images", "options": {"n_source": 40, "n_finetune": 400,
                                                                                  "n_val": 40, "n_test": 40}},
            "axes": {"backbone": ["test_resnet"], "paradigm": ["scratch"],
                     "intervention": {"kind": "correlation", "magnitudes": [round(0.5 + 0.02 * i, 2) for i in range(20)]},
                     "freeze_depth": [0], "seed": list(range(seeds))},
            "finetune": {"size": 100}, "resources": {"cpus_per_trial": 0.5}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--cluster", action="store_true", help="a head and two worker nodes on this machine")
    args = ap.parse_args()

    import ray
    from ray import tune

    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_spec
    from orchestrator.tracking import SweepTracker

    plan = build_plan(parse_spec(spec(args.trials)))
    timings: dict[str, float] = {}
    refreshes: list[tuple[int, float]] = []

    class TimedTracker(SweepTracker):
        """The real tracker, with the time of each callback added up."""

        def _timed(self, name: str, fn: Any, *a: Any, **k: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - started

        def on_trial_start(self, *a: Any, **k: Any) -> None:
            self._timed("on_trial_start", super().on_trial_start, *a, **k)

        def on_trial_result(self, *a: Any, **k: Any) -> None:
            self._timed("on_trial_result", super().on_trial_result, *a, **k)

        def on_trial_complete(self, *a: Any, **k: Any) -> None:
            self._timed("on_trial_complete", super().on_trial_complete, *a, **k)

        def refresh_front(self, *a: Any, **k: Any) -> Any:
            started = time.perf_counter()
            table = super().refresh_front(*a, **k)
            refreshes.append((int(table["n_seeds"].sum()) if len(table) else 0, time.perf_counter() - started))
            return table

    cluster = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.cluster:
            from ray.cluster_utils import Cluster

            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
            for _ in range(2):
                cluster.add_node(num_cpus=1)
            ray.init(address=cluster.address, log_to_driver=False)
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            tracker = TimedTracker(plan, f"sqlite:///{tmp}/mlflow.db")
            tracker.open()
            started = time.perf_counter()
            tuner = tune.Tuner(
                tune.with_resources(near_empty_trial, {"cpu": 0.5}),
                param_space={"trial": tune.grid_search([t.config.to_dict() for t in plan.trials])},
                tune_config=tune.TuneConfig(reuse_actors=True),
                run_config=tune.RunConfig(name="scale", storage_path=f"{tmp}/results", callbacks=[tracker], verbose=0))
            tuner.fit()
            wall = time.perf_counter() - started
            tracker.refresh_front()  # the final one, with the figure
            tracker.close()
        finally:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
    n = len(plan.trials)
    driver = sum(timings.values())
    front = sum(s for _, s in refreshes)
    print(f"trials: {n}  nodes: {'head + 2 workers (simulated)' if args.cluster else 'local'}  cpus: {os.cpu_count()}")
    print(f"wall: {wall:.1f} s  ({wall / n * 1000:.1f} ms per trial, Tune's scheduling included)")
    print(f"driver time in the tracker: {driver:.1f} s = {driver / n * 1000:.1f} ms per trial (target <= 100 ms)")
    for name, secs in sorted(timings.items()):
        print(f"  {name:<18} {secs:7.2f} s  {secs / n * 1000:6.2f} ms per trial")
    print(f"front refreshes: {len(refreshes)} taking {front:.1f} s in all; finished trials -> seconds (per 1,000 trials):")
    for finished, secs in refreshes:
        print(f"  {finished:6d} -> {secs:6.3f} s  ({secs / max(finished, 1) * 1000:6.3f} s per 1,000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
