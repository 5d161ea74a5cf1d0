"""MLflow -> pandas: a sweep's trials, aggregated over seeds, and their Pareto front.

The tracker uses the same functions to write the front that users call to read it, so what MLflow
holds and what a query answers cannot drift apart.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from orchestrator import pareto

__all__ = ["AXIS_PARAMS", "SweepNotFoundError", "load_trials", "aggregate_seeds", "front_table"]

AXIS_PARAMS = ("backbone", "paradigm", "intervention.kind", "intervention.magnitude", "freeze_depth")
TAG = "fairsweep."


class SweepNotFoundError(LookupError):
    """No runs for the requested sweep/experiment; the message lists what exists."""


def _direction(metric: str) -> str:
    from trainables.metrics import direction

    return direction(metric)


def load_trials(client: Any, experiment: str, sweep: str, *, finished_only: bool = True) -> pd.DataFrame:
    """One row per trial run of ``sweep``: run_id, status, trial_key, config_key, axis params, metrics."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise SweepNotFoundError(f"no MLflow experiment {experiment!r}; experiments: {', '.join(names) or 'none'}")
    flt = f"tags.`fairsweep.sweep` = '{sweep}' AND tags.`fairsweep.kind` = 'trial'"
    if finished_only:
        flt += " AND attributes.status = 'FINISHED'"
    rows = []
    page = None
    while True:
        runs = client.search_runs([exp.experiment_id], filter_string=flt, max_results=5000, page_token=page)
        for r in runs:
            row = {"run_id": r.info.run_id, "status": r.info.status,
                   "trial_key": r.data.tags.get(TAG + "trial_key"), "config_key": r.data.tags.get(TAG + "config_key"),
                   "seed": r.data.params.get("seed")}
            row.update({p: r.data.params.get(p) for p in AXIS_PARAMS})
            row.update(r.data.metrics)
            rows.append(row)
        page = runs.token
        if not page:
            break
    df = pd.DataFrame(rows)
    if "intervention.magnitude" in df:
        df["intervention.magnitude"] = pd.to_numeric(df["intervention.magnitude"], errors="coerce")
    return df


def aggregate_seeds(trials: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Mean, std and count of ``metrics`` per configuration (repeats over seeds share a config_key)."""
    if trials.empty:
        return pd.DataFrame(columns=["config_key", *AXIS_PARAMS, "n_seeds", *metrics])
    keep = ["config_key", *[p for p in AXIS_PARAMS if p in trials]]
    present = [m for m in metrics if m in trials]
    grouped = trials.groupby("config_key", sort=False)
    out = grouped[keep[1:]].first() if len(keep) > 1 else pd.DataFrame(index=grouped.size().index)
    out["n_seeds"] = grouped.size()
    for m in present:
        out[m] = grouped[m].mean()
        out[f"{m}_std"] = grouped[m].std(ddof=1)
    for m in set(metrics) - set(present):
        out[m] = np.nan
    out["run_ids"] = grouped["run_id"].agg(list)
    return out.reset_index()


def front_table(trials: pd.DataFrame, performance: str, fairness: str) -> pd.DataFrame:
    """Seed-averaged configurations with an ``on_front`` column (performance max, unfairness min by default)."""
    agg = aggregate_seeds(trials, [performance, fairness])
    if agg.empty:
        agg["on_front"] = pd.Series(dtype=bool)
        return agg
    directions = [_direction(performance), _direction(fairness)]
    agg["on_front"] = pareto.pareto_mask(agg[[performance, fairness]].to_numpy(float), directions)
    return agg.sort_values(["on_front", performance], ascending=[False, directions[0] == "min"]).reset_index(drop=True)
