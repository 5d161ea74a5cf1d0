"""Ray Tune alone, running fairsweep's trials: what Ray and Tune cost before fairsweep adds anything.

The reference between the floor and ``fairsweep launch`` in ``benchmarks/throughput.py``: a private local
Ray, a Tune grid with reused actors, the same ``train_and_evaluate`` and ``run_pretrain_job`` as fairsweep,
one report per trial, and nothing else: no MLflow, no checkpoints, no front. Where the pretraining runs:

  tasks   each pretraining job once, as a Ray task, before the trials (fairsweep's way before it moved the
          pretraining into the trials);
  trials  inside the trials, as fairsweep runs it: a trial whose base is not built yet builds it
          (``run_pretrain_job`` holds the key's lock, so one trial builds and any other waits, then reads it),
          and the grid starts with the first trial of each base (``Plan.run_order``), so the builders run side
          by side. No worker process runs only a task.

Usage:

    .venv/bin/python benchmarks/bare_tune.py SPEC STORAGE [--pretrain-in tasks|trials]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Mapping

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def trial(config: Mapping[str, Any], jobs: Mapping[str, dict], context: Any) -> None:
    from ray import tune

    from trainables.finetune import train_and_evaluate
    from trainables.pretrain import run_pretrain_job
    from trainables.trial import TrialConfig

    config = TrialConfig.from_tune(config)
    job = jobs.get(config.weights.key)
    if job is not None:  # builds the base, or waits for the trial building it, or finds it built
        run_pretrain_job(job, context.cache_root, context.cpus_per_trial)
    result = train_and_evaluate(config, context)
    tune.report({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("storage")
    ap.add_argument("--pretrain-in", choices=("tasks", "trials"), default="trials")
    args = ap.parse_args(argv)

    import ray
    from ray import tune

    from orchestrator.launch import _trial_context
    from orchestrator.plan import build_plan
    from orchestrator.spec import load_spec
    from trainables.data.images import DECODED_CACHE_DIRNAME
    from trainables.feature_cache import FEATURE_CACHE_DIRNAME
    from trainables.trial import TUNE_KEY
    from trainables.pretrain import run_pretrain_job

    plan = build_plan(load_spec(args.spec))
    res = plan.spec.resources
    storage = Path(args.storage).resolve()
    # the same trials as fairsweep's: with the feature and decoded-image caches where the spec turns them on
    context = _trial_context(plan, str(storage / "pretrain_cache"), feature_cache=str(storage / FEATURE_CACHE_DIRNAME),
                             input_cache=str(storage / DECODED_CACHE_DIRNAME))
    jobs = {j.key: j.to_dict() for j in plan.pretrain_jobs}
    trials = list(plan.trials)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        if args.pretrain_in == "tasks":
            task = ray.remote(num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial)(run_pretrain_job)
            ray.get([task.remote(job, context.cache_root, res.cpus_per_trial) for job in jobs.values()])
        else:
            trials = plan.run_order()
        trainable = tune.with_resources(tune.with_parameters(trial, jobs=jobs, context=context),
                                        {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial})
        tuner = tune.Tuner(trainable, param_space={TUNE_KEY: tune.grid_search([t.config.to_dict() for t in trials])},
                           tune_config=tune.TuneConfig(reuse_actors=True),
                           run_config=tune.RunConfig(name="bare", storage_path=str(storage), verbose=0))
        results = tuner.fit()
        errors = [r.error for r in results if r.error]
        print(f"bare tune ({args.pretrain_in}): {len(results)} trials, {len(errors)} failed")
        return 1 if errors else 0
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
