"""What the shared pretraining stage saves: one small grid run twice on the same local Ray.

  shared  - fairsweep's way: the first trial of each base builds it once into the shared cache (the others of
            that base wait for it on the key's lock), then every trial loads it from the cache;
  inside  - every trial pretrains its own base into a private cache, then finetunes (what a sweep without
            the shared stage would do).

Both use the same plan, trainable and resources; Ray start-up is outside both timings and MLflow is not
involved. Prints both wall times and their ratio, measured in this one run, plus the largest metric
difference between matching trials (the shared stage must not change results). Usage:

    .venv/bin/python benchmarks/pretrain_sharing.py [--seeds 2] [--magnitudes 0.5 0.7 0.9] [--pretrain-epochs 5] [--n-source 4000]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.plan import Plan, build_plan  # noqa: E402
from orchestrator.spec import parse_spec  # noqa: E402


def grid(seeds: int, magnitudes: list[float], pretrain_epochs: int, n_source: int) -> dict:
    return {
        "name": "pretrain_sharing",
        "dataset": {"name": "synthetic_images", "options": {"n_source": n_source, "n_finetune": 1000, "n_val": 200,
                                                            "n_test": 500, "seed": 0}},
        "pretraining": {"epochs": pretrain_epochs, "batch_size": 128, "lr": 0.05},
        "axes": {"backbone": ["test_resnet"], "paradigm": ["supervised", "biased"],
                 "intervention": {"kind": "correlation", "magnitudes": magnitudes},
                 "freeze_depth": [0], "seed": list(range(seeds))},
        "finetune": {"size": 256, "epochs": 2, "batch_size": 64, "lr": 0.02},
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
    }


def pretrain_then_finetune(config: Mapping[str, Any], context: Any, jobs: Mapping[str, dict]) -> None:
    """The no-sharing trainable: pretrain this trial's base into a private cache, then the normal trial."""
    from trainables.finetune import finetune_trial
    from trainables.pretrain import run_pretrain_job

    job = jobs.get(config["trial"]["weights"]["key"])
    if job is None:
        finetune_trial(config, context)
        return
    private = tempfile.mkdtemp(prefix="fairsweep-private-cache-")
    try:
        run_pretrain_job(job, private, context.cpus_per_trial)
        finetune_trial(config, replace(context, cache_root=private))
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _fit(trainable: Any, plan: Plan, storage: Path, name: str) -> dict[str, dict]:
    from ray import tune

    res = plan.spec.resources
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial}),
        param_space={"trial": tune.grid_search([t.config.to_dict() for t in plan.run_order()])},
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0),
    )
    results = tuner.fit()
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} trials failed; first: {errors[0]}")
    return {json.dumps(r.config["trial"]["point"], sort_keys=True): r.metrics for r in results}


def run_shared(plan: Plan, tmp: Path) -> tuple[float, dict]:
    from ray import tune

    from orchestrator.launch import _trial_context
    from trainables.finetune import finetune_trial

    cache = str(tmp / "shared_cache")
    started = time.perf_counter()
    context = _trial_context(plan, cache, driver_run="shared")
    metrics = _fit(tune.with_parameters(finetune_trial, context=context), plan, tmp, "shared")
    return time.perf_counter() - started, metrics


def run_inside(plan: Plan, tmp: Path) -> tuple[float, dict]:
    from ray import tune

    from orchestrator.launch import _trial_context

    jobs = {j.key: j.to_dict() for j in plan.pretrain_jobs}
    context = _trial_context(plan, str(tmp / "unused_cache"))
    started = time.perf_counter()
    metrics = _fit(tune.with_parameters(pretrain_then_finetune, context=context, jobs=jobs), plan, tmp, "inside")
    return time.perf_counter() - started, metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--magnitudes", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--pretrain-epochs", type=int, default=5)
    ap.add_argument("--n-source", type=int, default=4000)
    args = ap.parse_args(argv)
    plan = build_plan(parse_spec(grid(args.seeds, args.magnitudes, args.pretrain_epochs, args.n_source)))

    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with tempfile.TemporaryDirectory() as d:
            shared_s, shared = run_shared(plan, Path(d))
            inside_s, inside = run_inside(plan, Path(d))
        cpus = int(ray.cluster_resources().get("CPU", 0))
    finally:
        ray.shutdown()

    perf = plan.spec.objectives.performance
    diff = max(abs(shared[k][perf] - inside[k][perf]) for k in shared)
    n, k = len(plan.trials), len(plan.pretrain_jobs)
    print(f"grid: {n} trials sharing {k} pretraining keys ({', '.join(j.paradigm for j in plan.pretrain_jobs)} on "
          f"{', '.join(plan.spec.axes.backbone)}); pretraining {args.pretrain_epochs} epochs on {args.n_source} "
          f"images; Ray CPUs: {cpus}")
    print(f"shared stage : {k:>3} pretraining jobs + {n} trials  {shared_s:7.1f} s")
    print(f"inside trials: {n:>3} pretraining jobs + {n} trials  {inside_s:7.1f} s")
    print(f"wall-time ratio (inside / shared): {inside_s / shared_s:.2f}x")
    print(f"largest {perf} difference between matching trials: {diff:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
