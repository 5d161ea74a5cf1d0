"""What the frozen-prefix feature cache saves a trial: its wall time uncached, filling the cache, and reading it.

For each freezing (a linear probe and partial freezes; trainables/feature_cache.py), in this one process, on
the quickstart's data, backbone and finetuning settings (sweeps/quickstart.yaml), from random
initialisation: the trial with the cache off; the same trial with an empty cache (it computes the
prefix's outputs for the finetuning pool, validation and test); and the trial at another intervention
magnitude reading them, which is what every later trial on that prefix does (other magnitudes, seeds of
the intervention, sizes, inner-search candidates). Interleaved and repeated, medians. Prints the
speed-up of a reading trial over an uncached one, and the largest difference of the compared metrics
between the cached and the uncached run of the same trial (the cache must not change results). Usage:

    .venv/bin/python benchmarks/feature_cache.py [SPEC] [--freeze linear 2 1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COMPARED = ("accuracy", "equalized_odds_difference", "val_accuracy", "val_loss", "auroc")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default=str(REPO / "sweeps" / "quickstart.yaml"))
    ap.add_argument("--freeze", nargs="+", default=["linear", "2", "1"], help="freeze depths to time (k or linear)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from orchestrator.launch import _trial_context
    from orchestrator.plan import build_plan
    from orchestrator.spec import load_spec
    from trainables.finetune import train_and_evaluate
    from trainables.trial import Freeze, Weights

    plan = build_plan(load_spec(Path(args.spec)))
    first = plan.trials[0].config
    magnitudes = sorted({t.config.point.magnitude for t in plan.trials})
    if len(magnitudes) < 2:
        raise SystemExit(f"{args.spec} has one intervention magnitude; the reading trial needs a second one")
    print(f"spec: {Path(args.spec).name}  backbone: {first.point.backbone}  size {first.point.finetune_size}  "
          f"epochs {first.finetune['epochs']}  repeats: {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:  # untimed: data built once per process, as in a sweep's workers
        train_and_evaluate(replace(first, weights=Weights()), replace(_trial_context(plan, tmp), feature_cache=None))
    for depth in args.freeze:
        freeze = Freeze.parse(int(depth) if depth.isdigit() else depth)
        trial = replace(first, point=replace(first.point, freeze_depth=freeze, magnitude=magnitudes[0]),
                        weights=Weights())
        other = replace(trial, point=replace(trial.point, magnitude=magnitudes[1]))
        times: dict[str, list[float]] = {"uncached": [], "filling": [], "reading": []}
        worst, note = 0.0, ""
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                context = replace(_trial_context(plan, tmp), feature_cache=None)
                started = time.perf_counter()
                plain = train_and_evaluate(trial, context)
                times["uncached"].append(time.perf_counter() - started)
                context = replace(context, feature_cache=str(Path(tmp) / "features"))
                for name, t in (("filling", trial), ("reading", other)):
                    started = time.perf_counter()
                    result = train_and_evaluate(t, context)
                    times[name].append(time.perf_counter() - started)
                    if name == "filling":
                        note = result["feature_cache"]
                        worst = max(worst, *(abs(float(result[m]) - float(plain[m])) for m in COMPARED))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"freeze {freeze.label():<7} uncached {med['uncached']:6.2f} s  filling {med['filling']:6.2f} s  "
              f"reading {med['reading']:6.2f} s  uncached / reading = {med['uncached'] / med['reading']:5.2f}  "
              f"largest metric difference {worst:.1e}  ({note})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
