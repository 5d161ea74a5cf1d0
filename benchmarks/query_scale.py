"""Scale of the query API: log N trial runs into a temporary SQLite store, then time loading them
(query.sweep_trials) and computing the Pareto front (query.pareto, per configuration and per trial).

    .venv/bin/python benchmarks/query_scale.py [--runs 10000] [--keep DIR]

Runs are created with MlflowClient.create_run + one log_batch each (params, metrics and status in
one call), so logging is dominated by SQLite commits, not by the benchmark. Target (issue 6): the
query and the front together under 5 s for 10,000 runs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PARADIGMS = ("scratch", "supervised", "simclr", "byol", "mae")
FREEZE = ("0", "1", "2", "linear")
METRICS = ("accuracy", "balanced_accuracy", "auroc", "equalized_odds_difference", "demographic_parity_difference",
           "accuracy_gap")


def log_runs(client, exp_id: str, sweep: str, n: int, seed: int = 0) -> None:
    from mlflow.entities import Metric, Param, RunTag

    from orchestrator.mlflow_runs import TAGS

    rng = np.random.default_rng(seed)
    now = int(time.time() * 1000)
    for i in range(n):
        cfg, s = divmod(i, 3)  # three seeds per configuration
        paradigm, freeze = PARADIGMS[cfg % len(PARADIGMS)], FREEZE[(cfg // len(PARADIGMS)) % len(FREEZE)]
        mag = round(0.05 * ((cfg // 20) % 20), 2)
        config_key = f"c{cfg:05d}"
        run = client.create_run(exp_id, start_time=now + i)
        params = {"backbone": "resnet18", "paradigm": paradigm, "intervention.kind": "correlation",
                  "intervention.magnitude": str(mag), "freeze_depth": freeze, "seed": str(s)}
        tags = {TAGS.KIND: "trial", TAGS.SWEEP: sweep, TAGS.TRIAL_KEY: f"{config_key}-s{s}", TAGS.CONFIG_KEY: config_key,
                TAGS.FRONT: "false"}
        values = rng.uniform(0, 1, len(METRICS))
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric(k, float(v), now, 0) for k, v in zip(METRICS, values)],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        client.set_terminated(run.info.run_id, "FINISHED")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--keep", help="use (and keep) this folder for the store; reuses an existing one")
    args = ap.parse_args()

    from mlflow.tracking import MlflowClient

    from orchestrator import query

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fairsweep_query_scale_"))
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "mlflow.db"
    fresh = not db.exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{db.resolve()}")
    sweep = "scale"
    if fresh:
        exp_id = client.create_experiment(sweep)
        t0 = time.perf_counter()
        log_runs(client, exp_id, sweep, args.runs)
        t_log = time.perf_counter() - t0
        print(f"logged {args.runs} runs in {t_log:.1f} s ({1e3 * t_log / args.runs:.2f} ms/run) into {db}")

    t0 = time.perf_counter()
    trials = query.sweep_trials(client, sweep)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    front_cfg = query.pareto(trials, "accuracy", "equalized_odds_difference")
    t_cfg = time.perf_counter() - t0
    t0 = time.perf_counter()
    front_trial = query.pareto(trials, "accuracy", "equalized_odds_difference", by_config=False)
    t_trial = time.perf_counter() - t0
    t0 = time.perf_counter()
    query.best(trials, "accuracy", "equalized_odds_difference", max_drop=0.01)
    query.compare(trials, "paradigm", "accuracy", "equalized_odds_difference", max_drop=0.01)
    t_other = time.perf_counter() - t0
    n = len(trials)
    print(f"load      {n} runs: {t_load:.2f} s ({1e3 * t_load / n:.3f} ms/run)")
    print(f"front     per config ({len(front_cfg)} of {trials['config_key'].nunique()} on it): {1e3 * t_cfg:.1f} ms")
    print(f"front     per trial ({len(front_trial)} of {n}): {1e3 * t_trial:.1f} ms")
    print(f"best+compare: {1e3 * t_other:.1f} ms")
    total = t_load + t_cfg
    print(f"query + front: {total:.2f} s ({1e3 * total / n:.3f} ms/run); target < 5 s: {'met' if total < 5 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
