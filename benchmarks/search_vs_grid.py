"""Is searching worth it? Hypervolume of the front each Optuna sampler finds at a fixed budget,
against a random subset of the grid of the same size and against the full grid's front.

    .venv/bin/python benchmarks/search_vs_grid.py [--seeds 10] [--budgets 12 24 48] [--fail-rate 0.1] [--real]

The many repeats use a cheap, deterministic stand-in for a trial: a function of the configuration
(paradigm, backbone, intervention magnitude, fraction of parameters frozen, seed) that returns
(accuracy, equalized-odds difference) with the tradeoffs of the seed papers: a biased base is
accurate but unfair unless finetuned fully on decorrelated data; self-supervised bases are fairer;
a stronger spurious correlation buys accuracy with unfairness. Proposals come from fairsweep's real
searcher (orchestrator.search.StudySearcher: same sampler settings, exact budget, failed trials
replaced, no configuration twice), driven in-process without Ray. Hypervolume is
orchestrator.pareto.hypervolume (tested against Optuna's WFG), with a reference point just below the
worst accuracy and above the worst unfairness of the whole grid.

``--real`` adds one small real run: a 16-cell grid and a tpe search of budget 6 over the same space,
both through ``fairsweep launch`` on local Ray, compared the same way from what MLflow recorded.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DIRECTIONS = ("max", "min")
DATA = {"n_source": 400, "n_finetune": 600, "n_val": 200, "n_test": 400, "image_size": 32, "seed": 0}
SPACE = {
    "name": "search_vs_grid",
    "dataset": {"name": "synthetic_images", "options": DATA},
    "pretraining": {"epochs": 1, "batch_size": 64, "lr": 0.05},
    "axes": {
        "backbone": ["test_resnet", "test_convnext"],
        "paradigm": ["scratch", "supervised", "biased", "simclr"],
        "intervention": {"kind": "correlation", "magnitudes": [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]},
        "freeze_depth": [0, 1, 2, "linear"],
        "seed": [0],
    },
    "finetune": {"size": 200, "epochs": 2, "batch_size": 50, "lr": 0.02},
    "objectives": {"performance": "accuracy", "fairness": "equalized_odds_difference"},
    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
    "search": {"type": "grid"},
}
# paradigm -> (accuracy of the base, bias it carries, how much finetuning can undo it)
PARADIGMS = {"scratch": (0.70, 0.05, 1.0), "supervised": (0.86, 0.20, 0.8), "biased": (0.88, 0.60, 0.9),
             "simclr": (0.84, 0.08, 0.9)}
BACKBONE_ACC = {"test_resnet": 0.0, "test_convnext": 0.02}


def stand_in(plan, point) -> tuple[float, float]:
    """(accuracy, equalized_odds_difference) of a configuration, deterministic per trial key."""
    planned = plan.resolve(point)
    frozen = len(planned.frozen_groups) / max(planned.n_groups, 1)
    acc0, bias, undo = PARADIGMS[point.paradigm]
    shortcut = (point.magnitude - 0.5) / 0.45  # 0 at no correlation, 1 at 0.95
    kept_bias = bias * (frozen + (1 - frozen) * (1 - undo * (1 - shortcut)))
    accuracy = acc0 + BACKBONE_ACC[point.backbone] + 0.05 * shortcut - 0.06 * frozen * (point.paradigm == "scratch") \
        - 0.03 * frozen + 0.04 * kept_bias
    unfairness = kept_bias + 0.25 * shortcut ** 2 * (1 - 0.5 * frozen)
    noise = int(hashlib.sha256(planned.key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF - 0.5
    return float(np.clip(accuracy + 0.01 * noise, 0, 1)), float(np.clip(unfairness + 0.01 * noise, 0, 1))


def _plan(search: dict):
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_spec

    return build_plan(parse_spec({**SPACE, "search": search}))


def run_sampler(sampler: str, budget: int, seed: int, fail_rate: float, folder: Path) -> tuple[np.ndarray, int, int]:
    """The searcher's proposals until ``budget`` trials finished: (values, finished, failed)."""
    from orchestrator.search import StudySearcher
    from ray.tune.search import Searcher

    plan = _plan({"type": "optuna", "sampler": sampler, "budget": budget, "seed": seed})
    searcher = StudySearcher(plan, str(folder / f"{sampler}-{budget}-{seed}.journal"), study_name="bench")
    rng = np.random.default_rng(seed + 1000)
    values, i = [], 0
    while True:
        config = searcher.suggest(f"t{i}")
        if config is None or config == Searcher.FINISHED:
            break
        point = plan.trial_for(config).point
        if rng.random() < fail_rate:  # a trial that errors: reported as failed, replaced by the searcher
            searcher.on_trial_complete(f"t{i}", None, error=True)
        else:
            acc, unf = stand_in(plan, point)
            values.append((acc, unf))
            searcher.on_trial_complete(f"t{i}", {"val_accuracy": acc, "val_equalized_odds_difference": unf})
        i += 1
    return np.array(values), searcher.finished(), searcher.failed()


def _summary(ratios: list[float]) -> str:
    sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
    return f"{statistics.mean(ratios):.3f} ± {sd:.3f}"


def stand_in_study(seeds: int, budgets: list[int], fail_rate: float) -> None:
    from orchestrator.pareto import hypervolume, pareto_mask
    from orchestrator.plan import grid_points

    plan = _plan({"type": "grid"})
    grid = np.array([stand_in(plan, p) for p in grid_points(plan.spec)])
    reference = (grid[:, 0].min() - 0.01, grid[:, 1].max() + 0.01)
    hv_grid = hypervolume(grid, DIRECTIONS, reference)
    print(f"stand-in space: {len(grid)} grid cells, {int(pareto_mask(grid, DIRECTIONS).sum())} on the full grid's front, "
          f"hypervolume {hv_grid:.4f} (reference accuracy {reference[0]:.3f}, unfairness {reference[1]:.3f})")
    print(f"{seeds} seeds per cell below; ratio = hypervolume found / the full grid's; failure rate {fail_rate:g}")
    print("(nsga2's first generation, 50 trials, is random sampling: below that budget it matches random)\n")
    print(f"{'budget':>6} {'share':>6}  {'method':<14} {'HV ratio (mean ± sd)':<22} {'finished':>8} {'failed':>7} {'s/run':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for budget in budgets:
            rows: dict[str, dict] = {}
            for seed in range(seeds):
                rng = np.random.default_rng(seed)
                subset = grid[rng.choice(len(grid), size=budget, replace=False)]
                rows.setdefault("grid subset", {"hv": [], "fin": [], "fail": [], "t": []})
                rows["grid subset"]["hv"].append(hypervolume(subset, DIRECTIONS, reference) / hv_grid)
                rows["grid subset"]["fin"].append(budget)
                rows["grid subset"]["fail"].append(0)
                rows["grid subset"]["t"].append(0.0)
                for sampler in ("tpe", "nsga2", "random"):
                    start = time.perf_counter()
                    values, finished, failed = run_sampler(sampler, budget, seed, fail_rate, Path(tmp))
                    r = rows.setdefault(f"optuna {sampler}", {"hv": [], "fin": [], "fail": [], "t": []})
                    r["hv"].append(hypervolume(values, DIRECTIONS, reference) / hv_grid)
                    r["fin"].append(finished)
                    r["fail"].append(failed)
                    r["t"].append(time.perf_counter() - start)
            for name, r in rows.items():
                print(f"{budget:>6} {budget / len(grid):>6.1%}  {name:<14} {_summary(r['hv']):<22} "
                      f"{statistics.mean(r['fin']):>8.1f} {statistics.mean(r['fail']):>7.1f} {statistics.mean(r['t']):>7.2f}")
            print(f"{budget:>6} {'100%':>6}  {'full grid':<14} {'1.000':<22} {len(grid):>8}")
            print()


def real_run() -> None:
    """A 16-cell grid and a tpe search (budget 6) of the same space through the real CLI."""
    import yaml
    from mlflow.tracking import MlflowClient

    from orchestrator import query
    from orchestrator.pareto import hypervolume

    space = {**SPACE, "axes": {**SPACE["axes"], "backbone": ["test_resnet"], "paradigm": ["scratch", "supervised"],
                               "intervention": {"kind": "correlation", "magnitudes": [0.5, 0.9]},
                               "freeze_depth": [0, 1, 2, "linear"]}}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        seconds = {}
        for name, search in (("real_grid", {"type": "grid"}), ("real_tpe", {"type": "optuna", "sampler": "tpe",
                                                                             "budget": 6, "seed": 0})):
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump({**space, "name": name, "search": search}))
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "orchestrator.cli", "launch", str(path), "--tracking-uri", uri,
                            "--storage", str(Path(tmp) / "results"), "--quiet"], cwd=tmp, check=True,
                           capture_output=True, env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
            seconds[name] = time.perf_counter() - start
        client = MlflowClient(uri)
        values = {n: query.sweep_trials(client, n)[["accuracy", "equalized_odds_difference"]].to_numpy(float)
                  for n in ("real_grid", "real_tpe")}
        both = np.vstack(list(values.values()))
        reference = (both[:, 0].min() - 0.01, both[:, 1].max() + 0.01)
        hv = {n: hypervolume(v, DIRECTIONS, reference) for n, v in values.items()}
        rng = np.random.default_rng(0)
        subsets = [hypervolume(values["real_grid"][rng.choice(len(values["real_grid"]), 6, replace=False)], DIRECTIONS,
                               reference) / hv["real_grid"] for _ in range(50)]
        print("one real run (test_resnet, 2 paradigms x 2 magnitudes x 4 freeze depths, synthetic images):")
        print(f"  full grid  {len(values['real_grid']):>3} trials  HV ratio 1.000  {seconds['real_grid']:.0f} s")
        print(f"  optuna tpe {len(values['real_tpe']):>3} trials  HV ratio {hv['real_tpe'] / hv['real_grid']:.3f}  "
              f"{seconds['real_tpe']:.0f} s")
        print(f"  random 6 of the grid's trials (50 draws)  HV ratio {_summary(subsets)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--budgets", type=int, nargs="+", default=[12, 24, 48])
    ap.add_argument("--fail-rate", type=float, default=0.1, help="share of stand-in trials that error (replaced)")
    ap.add_argument("--real", action="store_true", help="also one small real grid and tpe search through the CLI")
    args = ap.parse_args()
    stand_in_study(args.seeds, args.budgets, args.fail_rate)
    if args.real:
        real_run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
