"""What a sweep costs beyond its training: fairsweep against the floor and against the naive script.

Three ways to run the same spec, interleaved and repeated in one invocation (A B C A B C ..., medians):

  floor      the same trials through ``train_and_evaluate`` (pretraining jobs first, then the trials) in a
             pool of plain worker processes, one per trial slot: no Ray, no MLflow, no checkpoints; timed
             as a fresh ``python`` process, like the launch (interpreter start and imports included);
  fairsweep  ``fairsweep launch SPEC`` (Ray, MLflow, checkpoints, the shared stages);
  naive      ``benchmarks/naive_tune.py``: a plain Tune grid with MLflowLoggerCallback and the pretraining
             inside every trial (what a user writes instead);
  tune       (with ``--bare-tune``) ``benchmarks/bare_tune.py``: Ray Tune alone on the same trials, each base
             built once inside the trials as fairsweep does, no MLflow, no checkpoints: what Ray and Tune
             cost before fairsweep adds anything.

Prints every wall time, the medians, the ratios fairsweep/floor and naive/fairsweep (and tune/floor,
fairsweep/tune), the seconds fairsweep adds to the floor (median over the interleaved pairs), and the largest
metric difference between floor and fairsweep trials of the same key (the orchestration must not change
results). Usage:

    .venv/bin/python benchmarks/throughput.py [SPEC] [--repeats 2] [--skip-naive] [--bare-tune]

SPEC defaults to sweeps/quickstart.yaml; benchmarks/throughput_long.yaml is the same grid with training that
takes minutes, where the ratio shows what orchestration adds beyond its fixed start-up cost.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COMPARED = ("accuracy", "equalized_odds_difference", "val_accuracy", "auroc")


def _env() -> dict[str, str]:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def _pretrain(job: dict, cache: str, cpus: float, input_cache: str | None, input_cache_bytes: int | None) -> None:
    from trainables.pretrain import run_pretrain_job

    run_pretrain_job(job, cache, cpus, input_cache, input_cache_bytes)


def _trial(trial: dict, context: Any) -> dict:
    from trainables.finetune import train_and_evaluate
    from trainables.trial import TrialConfig

    return train_and_evaluate(TrialConfig.from_dict(trial), context)


def run_floor(spec: Path, workdir: Path) -> tuple[float, dict[str, dict]]:
    from orchestrator.launch import _trial_context
    from orchestrator.plan import build_plan
    from orchestrator.spec import load_spec
    from trainables.data.images import DECODED_CACHE_DIRNAME
    from trainables.feature_cache import FEATURE_CACHE_DIRNAME

    started = time.perf_counter()
    plan = build_plan(load_spec(spec))
    res = plan.spec.resources
    slots = max(1, int((os.cpu_count() or 1) // max(res.cpus_per_trial, 1e-9)))
    cache = str(workdir / "pretrain_cache")
    # the same trials: with the feature and decoded-image caches where the spec gives fairsweep them
    context = _trial_context(plan, cache, feature_cache=str(workdir / FEATURE_CACHE_DIRNAME),
                             input_cache=str(workdir / DECODED_CACHE_DIRNAME))
    with ProcessPoolExecutor(max_workers=slots) as pool:
        for f in [pool.submit(_pretrain, j.to_dict(), cache, res.cpus_per_trial, context.input_cache,
                              context.input_cache_bytes)
                  for j in plan.pretrain_jobs]:
            f.result()
        futures = {t.key: pool.submit(_trial, t.config.to_dict(), context) for t in plan.trials}
        results = {key: f.result() for key, f in futures.items()}
    return time.perf_counter() - started, results


def _timed(what: str, cmd: list[str], workdir: Path) -> float:
    """Wall time of ``cmd`` as a fresh process in ``workdir``; raises with its output if it fails."""
    started = time.perf_counter()
    out = subprocess.run(cmd, cwd=workdir, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed ({out.returncode}): {out.stdout[-1500:]}{out.stderr[-1500:]}")
    return wall


def run_floor_cold(spec: Path, workdir: Path) -> tuple[float, dict[str, dict]]:
    """``run_floor`` in a fresh Python process, timed from outside like ``fairsweep launch``: a warm benchmark
    process (torch already imported, forked into the pool) would leave the floor's start-up uncounted."""
    out_file = workdir / "floor.json"
    wall = _timed("floor", [sys.executable, __file__, str(spec), "--floor-into", str(out_file)], workdir)
    return wall, json.loads(out_file.read_text())


def run_fairsweep(spec: Path, workdir: Path) -> tuple[float, dict[str, dict]]:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    wall = _timed("fairsweep launch", [sys.executable, "-m", "orchestrator.cli", "launch", str(spec), "--quiet",
                                       "--tracking-uri", uri, "--storage", str(workdir / "results")], workdir)
    from mlflow.tracking import MlflowClient

    from orchestrator.plan import build_plan
    from orchestrator.query import load_trials
    from orchestrator.spec import load_spec

    name = build_plan(load_spec(spec)).spec
    trials = load_trials(MlflowClient(uri), name.experiment, name.name)
    return wall, {row["trial_key"]: row.to_dict() for _, row in trials.iterrows()}


def run_naive(spec: Path, workdir: Path) -> tuple[float, dict]:
    return _timed("naive script", [sys.executable, str(REPO / "benchmarks" / "naive_tune.py"), str(spec),
                                    str(workdir / "naive"), f"sqlite:///{workdir / 'naive.db'}"], workdir), {}


def run_bare_tune(spec: Path, workdir: Path) -> tuple[float, dict]:
    return _timed("bare Tune", [sys.executable, str(REPO / "benchmarks" / "bare_tune.py"), str(spec),
                                str(workdir / "bare")], workdir), {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default=str(REPO / "sweeps" / "quickstart.yaml"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-naive", action="store_true", help="floor and fairsweep only (the naive script is slow)")
    ap.add_argument("--bare-tune", action="store_true", help="also Ray Tune alone on the same trials (bare_tune.py)")
    ap.add_argument("--floor-into", help=argparse.SUPPRESS)  # internal: run the floor here, write its results there
    args = ap.parse_args()
    spec = Path(args.spec).resolve()
    if args.floor_into:
        _, results = run_floor(spec, Path(args.floor_into).parent)
        Path(args.floor_into).write_text(json.dumps(results, default=str))
        return 0
    modes = {"floor": run_floor_cold, "fairsweep": run_fairsweep, **({"tune": run_bare_tune} if args.bare_tune else {}),
             **({} if args.skip_naive else {"naive": run_naive})}
    times: dict[str, list[float]] = {m: [] for m in modes}
    worst = 0.0
    for rep in range(args.repeats):
        outcomes = {}
        for mode, run in modes.items():  # interleaved: A B C, A B C, ...
            with tempfile.TemporaryDirectory() as tmp:
                wall, outcomes[mode] = run(spec, Path(tmp))
            times[mode].append(wall)
            print(f"repeat {rep + 1} {mode:<9} {wall:7.1f} s", flush=True)
        for key, want in outcomes["floor"].items():
            got = outcomes["fairsweep"].get(key)
            if got is None:
                raise RuntimeError(f"trial {key} ran in the floor but has no finished fairsweep run")
            worst = max(worst, *(abs(float(got[m]) - float(want[m])) for m in COMPARED))
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"\nspec: {spec.name}  cpus: {os.cpu_count()}  repeats: {args.repeats}")
    for m, v in med.items():
        print(f"median {m:<9} {v:7.1f} s")
    print(f"fairsweep / floor   = {med['fairsweep'] / med['floor']:.2f}  (target <= 1.3)")
    # each repeat's pair ran back to back, so its difference shrugs off the machine's drift between minutes
    added = statistics.median(f - b for f, b in zip(times["fairsweep"], times["floor"]))
    print(f"fairsweep - floor   = {added:.1f} s  (median over the repeats' pairs: what a launch adds to the same "
          f"training, about fixed whatever the sweep's length)")
    if "naive" in med:
        print(f"naive / fairsweep   = {med['naive'] / med['fairsweep']:.2f}  (target >= 3)")
    if "tune" in med:
        print(f"tune / floor        = {med['tune'] / med['floor']:.2f}  (what Ray and Tune alone cost)")
        print(f"fairsweep / tune    = {med['fairsweep'] / med['tune']:.2f}  (what fairsweep adds to them)")
    print(f"largest metric difference floor vs fairsweep over {', '.join(COMPARED)}: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
