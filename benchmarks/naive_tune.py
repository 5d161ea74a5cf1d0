"""The sweep a user writes without fairsweep: a plain Ray Tune grid, MLflow through Ray's own
``MLflowLoggerCallback``, and the pretraining inside every trial.

The same training code as fairsweep (``run_pretrain_job`` into a private cache, then
``train_and_evaluate``), so the comparison in ``benchmarks/throughput.py`` measures orchestration, not
a different model: no shared pretraining stage, a fresh worker process per trial (Tune's default), one
report per trial. Usage:

    .venv/bin/python benchmarks/naive_tune.py SPEC STORAGE TRACKING_URI
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def trial(config: Mapping[str, Any], jobs: Mapping[str, dict], context: Any) -> None:
    from dataclasses import replace

    from ray import tune

    from trainables.finetune import train_and_evaluate
    from trainables.pretrain import run_pretrain_job
    from trainables.trial import TrialConfig

    config = TrialConfig.from_tune(config)
    job = jobs.get(config.weights.key)
    with tempfile.TemporaryDirectory() as cache:
        if job is not None:  # every trial builds its own base
            run_pretrain_job(job, cache, context.cpus_per_trial)
        result = train_and_evaluate(config, replace(context, cache_root=cache))
    tune.report({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


def main(spec_path: str, storage: str, tracking_uri: str) -> int:
    import ray
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from orchestrator.launch import _trial_context
    from orchestrator.plan import build_plan
    from orchestrator.spec import load_spec

    plan = build_plan(load_spec(spec_path))
    context = _trial_context(plan, cache_root="/unused")
    jobs = {j.key: j.to_dict() for j in plan.pretrain_jobs}
    res = plan.spec.resources
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        trainable = tune.with_resources(tune.with_parameters(trial, jobs=jobs, context=context),
                                        {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial})
        tuner = tune.Tuner(trainable, param_space={"trial": tune.grid_search([t.config.to_dict() for t in plan.trials])},
                           run_config=tune.RunConfig(name="naive", storage_path=storage, verbose=0,
                                                     callbacks=[MLflowLoggerCallback(tracking_uri=tracking_uri,
                                                                                     experiment_name="naive")]))
        results = tuner.fit()
        errors = [r.error for r in results if r.error]
        print(f"naive: {len(results)} trials, {len(errors)} failed")
        return 1 if errors else 0
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
