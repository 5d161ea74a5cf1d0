"""MLflow -> pandas: a sweep's trials, aggregated over seeds, and their Pareto front.

The tracker uses the same functions to write the front that users call to read it, so what MLflow
holds and what a query answers cannot drift apart.

Uncertainty: a configuration's value is the mean over its seeds, shown with the standard deviation, the
count and a 95 % Student-t interval, mean ± t(0.975, n − 1) · sd / √n (exact for normal repeats and
wider than paper A's 1.96 · sd / √n at the few seeds sweeps use; NaN for one seed), clipped to the values the
metric can take (``trainables.metrics.value_range``: a mean accuracy's interval stops at 1). Signed metrics
(``trainables.metrics.is_signed``, e.g. ``tpr_difference``) are compared by their absolute value,
their distance from parity: a configuration by the mean over its seeds of |value| (``NAME_abs``, with its
interval ``NAME_abs_ci_low``/``NAME_abs_ci_high``), never by |mean|, which reads seeds at +0.3 and −0.3 as
perfectly fair; the tables keep the signed mean beside it for display. Picks (``best``, ``compare``) are made on the
validation split by default (``val_`` metrics) and report the test metrics of what they picked.

scipy is imported inside the functions that compute intervals and paired tests: it is the slowest
import of a query, and the front of a single seed needs none of it.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from orchestrator import pareto as pareto_mod
from orchestrator.mlflow_runs import TAGS, find_parent_run, run_filter, search_runs
from trainables.errors import UserError
from trainables.metrics import direction, is_signed, value_range

__all__ = ["AXIS_PARAMS", "SPLITS", "SweepNotFoundError", "load_trials", "aggregate_seeds", "front_table", "list_sweeps",
           "axis_column", "parent_run", "sweep_objectives", "sweep_trials", "split_metric", "t_interval", "pareto",
           "best", "compare", "paired_tests", "holm", "relative_change", "QueryError", "inheritance", "fairest_level",
           "hypervolume_reference", "abs_columns"]

AXIS_PARAMS = ("backbone", "paradigm", "intervention.kind", "intervention.magnitude", "freeze_depth", "finetune.size")
_NUMERIC_AXES = ("intervention.magnitude", "finetune.size")
# a sweep file's axis names, where the trials' column is spelled differently
_SPEC_AXIS_COLUMNS = {"finetune_size": "finetune.size"}


def axis_column(name: str) -> str:
    """The trials' column for ``name``, which may be spelled as in the sweep file (``finetune_size``)."""
    return _SPEC_AXIS_COLUMNS.get(name, name)


_FALLBACK_RUNS = 1000  # trial runs read to name the sweeps of an experiment without parent runs


class SweepNotFoundError(UserError, LookupError):
    """No runs for the requested sweep/experiment; the message lists what exists."""


class QueryError(UserError, ValueError):
    """A question the trials cannot answer as asked (an unknown column, group, split or metric, a filter of
    the wrong type); the message says what exists."""


def _direction(metric: str) -> str:
    return direction(metric.removeprefix("val_"))


def _is_signed(metric: str) -> bool:
    return is_signed(metric.removeprefix("val_"))


def _signed_column(metric: str) -> bool:
    """``_is_signed`` for any logged column: one that is not a registered metric (a loss) is not signed."""
    try:
        return _is_signed(metric)
    except UserError:
        return False


def _objective_values(rows: pd.DataFrame, metrics: Sequence[str]) -> np.ndarray:
    """The columns as the objectives compare them: signed metrics by their distance from parity, on
    configuration rows the mean over seeds of |value| (``NAME_abs``), on trial rows the trial's |value|."""
    values = rows[list(metrics)].to_numpy(float, copy=True)  # a view may be read-only (copy-on-write)
    for j, m in enumerate(metrics):
        if _is_signed(m):
            values[:, j] = rows[f"{m}_abs"].to_numpy(float) if f"{m}_abs" in rows else np.abs(values[:, j])
    return values


def t_interval(values: Sequence[float], confidence: float = 0.95,
               bounds: tuple[float, float] = (-math.inf, math.inf)) -> tuple[float, float]:
    """Student-t interval of the mean of ``values`` (NaN, NaN for fewer than two finite values), clipped to
    ``bounds``, the values the mean can take: the mean lies within them, so clipping keeps the coverage. A mean
    outside them (bounds that do not hold for these values) leaves the interval as it is."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return (math.nan, math.nan)
    mean = float(x.mean())
    half = _t_quantile(0.5 + confidence / 2, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    if not bounds[0] <= mean <= bounds[1]:
        return (mean - half, mean + half)
    return (max(mean - half, bounds[0]), min(mean + half, bounds[1]))


def _range(metric: str) -> tuple[float, float]:
    """The values a logged column can take: its metric's ``value_range``; unbounded for one that is not a
    registered metric (a loss, a calibration error)."""
    try:
        return value_range(metric.removeprefix("val_"))
    except UserError:
        return (-math.inf, math.inf)


def _objective_range(metric: str) -> tuple[float, float]:
    """``_range`` of the column as ``_objective_values`` has it: a signed metric by its absolute value."""
    low, high = _range(metric)
    return (0.0, max(-low, high)) if _signed_column(metric) else (low, high)


def hypervolume_reference(table: pd.DataFrame, perf: str, fair: str) -> list[float]:
    """The reference point of the front's hypervolume, per objective the worst value it can take
    (``_objective_range``: a 'max' metric's low bound, a 'min' one's high bound; a signed one by |value|);
    where that is infinite (a ratio deviation), the worst finite value of ``table``, else 0.0. A fixed
    1.0 would leave every point of a deviation above 1 outside the volume."""
    out = []
    for metric in (perf, fair):
        maximised = _direction(metric) == "max"
        low, high = _objective_range(metric)
        bound = low if maximised else high
        if not math.isfinite(bound):
            values = _objective_values(table, [metric])[:, 0] if len(table) else np.array([])
            values = values[np.isfinite(values)]
            bound = float(values.min() if maximised else values.max()) if len(values) else 0.0
        out.append(float(bound))
    return out


@functools.lru_cache(maxsize=256)
def _t_quantile(q: float, df: int) -> float:
    """Student-t quantile (scipy.special's inverse of the t CDF: the same number as ``scipy.stats.t.ppf``, and
    importing scipy.special takes about a third of scipy.stats's time, which every launch paid at its first
    front refresh). Cached: a front refresh asks for the same few quantiles hundreds of times."""
    from scipy import special

    return float(special.stdtrit(df, q))


def _experiment(client: Any, experiment: str) -> Any:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise SweepNotFoundError(f"no MLflow experiment {experiment!r}; experiments: {', '.join(names) or 'none'}")
    return exp


def load_trials(client: Any, experiment: str, sweep: str, *, finished_only: bool = True) -> pd.DataFrame:
    """One row per trial run of ``sweep``: run_id, status, trial_key, config_key, axis params, metrics."""
    exp = _experiment(client, experiment)
    flt = run_filter(sweep=sweep, kind="trial", status="FINISHED" if finished_only else None)
    rows = []
    for r in search_runs(client, [exp.experiment_id], flt):
        row = {"run_id": r.info.run_id, "status": r.info.status,
               "trial_key": r.data.tags.get(TAGS.TRIAL_KEY), "config_key": r.data.tags.get(TAGS.CONFIG_KEY),
               "seed": r.data.params.get("seed")}
        row.update({p: r.data.params.get(p) for p in AXIS_PARAMS})
        row.update(r.data.metrics)
        rows.append(row)
    df = pd.DataFrame(rows)
    for axis in _NUMERIC_AXES:
        if axis in df:
            df[axis] = pd.to_numeric(df[axis], errors="coerce")
    return df


def abs_columns(metric: str) -> list[str]:
    """The columns a signed metric's configurations are compared by: mean |value| over seeds and its interval."""
    return [f"{metric}_abs", f"{metric}_abs_ci_low", f"{metric}_abs_ci_high"] if _signed_column(metric) else []


def aggregate_seeds(trials: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Per configuration (repeats over seeds share a config_key): each metric's mean, ``_std``, and 95 %
    Student-t interval ``_ci_low`` / ``_ci_high`` (see the module docstring); for a signed metric also the
    mean of |value| over seeds, ``_abs``, with its interval ``_abs_ci_low`` / ``_abs_ci_high``, which the
    objectives compare (the signed mean keeps the sign for display)."""
    if trials.empty:
        return pd.DataFrame(columns=["config_key", *AXIS_PARAMS, "n_seeds", *metrics,
                                     *(c for m in dict.fromkeys(metrics) for c in abs_columns(m))])
    keep = ["config_key", *[p for p in AXIS_PARAMS if p in trials]]
    present = [m for m in metrics if m in trials]
    grouped = trials.groupby("config_key", sort=False)
    out = grouped[keep[1:]].first() if len(keep) > 1 else pd.DataFrame(index=grouped.size().index)
    out["n_seeds"] = grouped.size()
    for m in present:
        out[m] = grouped[m].mean()
        out[f"{m}_std"] = grouped[m].std(ddof=1)
        intervals = grouped[m].agg(lambda v, bounds=_range(m): t_interval(v.to_numpy(), bounds=bounds))
        out[f"{m}_ci_low"] = intervals.str[0]
        out[f"{m}_ci_high"] = intervals.str[1]
        if _signed_column(m):  # seeds at +0.3 and -0.3 are 0.3 from parity each, not 0.0 on average
            distance = trials[m].abs().groupby(trials["config_key"], sort=False)
            out[f"{m}_abs"] = distance.mean()
            intervals = distance.agg(lambda v, bounds=_objective_range(m): t_interval(v.to_numpy(), bounds=bounds))
            out[f"{m}_abs_ci_low"] = intervals.str[0]
            out[f"{m}_abs_ci_high"] = intervals.str[1]
    for m in dict.fromkeys(metrics):
        if m not in present:
            out[m] = np.nan
            for col in abs_columns(m):
                out[col] = np.nan
    out["run_ids"] = grouped["run_id"].agg(list)
    return out.reset_index()


def front_table(trials: pd.DataFrame, performance: str, fairness: str) -> pd.DataFrame:
    """Seed-averaged configurations with an ``on_front`` column (performance max, unfairness min by default)."""
    agg = aggregate_seeds(trials, [performance, fairness])
    if agg.empty:
        agg["on_front"] = pd.Series(dtype=bool)
        return agg
    directions = [_direction(performance), _direction(fairness)]
    agg["on_front"] = pareto_mod.pareto_mask(_objective_values(agg, [performance, fairness]), directions)
    return agg.sort_values(["on_front", performance], ascending=[False, directions[0] == "min"]).reset_index(drop=True)


# -- query API ------------------------------------------------------------------------------------
# Everything below answers the questions users ask after a sweep: which trials/configurations are
# Pareto-optimal for any two metrics, the least unfair one within a performance budget, and how the
# groups of one axis compare at that budget. Metric directions come from trainables.metrics.direction.

_BASE_COLUMNS = ("run_id", "status", "trial_key", "config_key", "seed", *AXIS_PARAMS)


def list_sweeps(client: Any, experiment: str) -> list[str]:
    """Names of the sweeps with a parent run (or, failing that, trial runs) in ``experiment``, sorted."""
    exp = _experiment(client, experiment)
    for kind, limit in (("sweep", None), ("trial", _FALLBACK_RUNS)):  # trial runs only for sweeps without a parent run
        names = {r.data.tags.get(TAGS.SWEEP) for r in search_runs(client, [exp.experiment_id], run_filter(kind=kind),
                                                                  limit=limit)} - {None, ""}
        if names:
            return sorted(names)
    return []


def _not_found(client: Any, experiment: str, sweep: str) -> SweepNotFoundError:
    sweeps = list_sweeps(client, experiment)
    return SweepNotFoundError(f"no sweep {sweep!r} in MLflow experiment {experiment!r}; sweeps there: "
                              f"{', '.join(sweeps) or 'none'}")


def parent_run(client: Any, sweep: str, experiment: str | None = None) -> Any:
    """The sweep's parent MLflow run; SweepNotFoundError listing the experiments or sweeps that exist."""
    experiment = experiment or sweep
    exp = _experiment(client, experiment)
    parent = find_parent_run(client, exp.experiment_id, sweep)
    if parent is None:
        raise _not_found(client, experiment, sweep)
    return parent


def sweep_objectives(client: Any, sweep: str, experiment: str | None = None, *, parent: Any = None) -> tuple[str, str]:
    """(performance, fairness) metric names the sweep optimised, from its parent run's params
    (``parent`` when the caller already holds it)."""
    parent = parent or parent_run(client, sweep, experiment)
    params = parent.data.params
    perf, fair = params.get("objectives.performance"), params.get("objectives.fairness")
    if not perf or not fair:
        raise SweepNotFoundError(f"the parent run {parent.info.run_id} of sweep {sweep!r} has no objectives.performance/"
                                 f"objectives.fairness params; name the metrics explicitly (--perf/--fairness)")
    return perf, fair


def _matches(column: pd.Series, value: Any) -> pd.Series:
    values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
    if pd.api.types.is_numeric_dtype(column):
        try:
            nums = [float(v) for v in values]
        except (TypeError, ValueError):
            raise QueryError(f"filter on numeric column {column.name!r} needs numbers; got {value!r}") from None
        return column.astype(float).isin(nums)
    return column.astype(str).isin([str(v) for v in values])


def sweep_trials(client: Any, sweep: str, experiment: str | None = None, *,
                 filters: Mapping[str, Any] | None = None, finished_only: bool = True) -> pd.DataFrame:
    """One row per trial run of ``sweep`` (run_id, status, trial_key, config_key, seed, axis params, metrics).

    ``experiment`` defaults to the sweep's name. ``filters`` maps a column (an axis param, seed,
    config_key, status, ...) to a value or a list of accepted values; params compare as strings,
    numeric columns (intervention.magnitude, finetune.size, metrics) as numbers. Raises
    SweepNotFoundError, listing what exists, for an unknown experiment or sweep; an existing sweep
    without finished trials gives an empty frame.
    """
    experiment = experiment or sweep
    df = load_trials(client, experiment, sweep, finished_only=finished_only)
    if df.empty:
        exp = _experiment(client, experiment)
        if find_parent_run(client, exp.experiment_id, sweep) is None and next(
                search_runs(client, [exp.experiment_id], run_filter(sweep=sweep), limit=1), None) is None:
            raise _not_found(client, experiment, sweep)
    for col in _BASE_COLUMNS:
        if col not in df:
            df[col] = pd.Series(dtype=float if col in _NUMERIC_AXES else object)
    for key, value in (filters or {}).items():
        key = axis_column(key)
        if key not in df:
            raise QueryError(f"cannot filter on {key!r}: not a column of the trials; columns: {', '.join(df.columns)}")
        df = df[_matches(df[key], value)]
    return df.reset_index(drop=True)


SPLITS = ("test", "val")


def split_metric(metric: str, split: str) -> str:
    """The name ``metric`` is logged under for ``split``: test keeps its name, validation adds ``val_``."""
    if split not in SPLITS:
        raise QueryError(f"split {split!r}: use 'val' (the split picks are made on) or 'test' (the split that reports)")
    return f"val_{metric}" if split == "val" and not metric.startswith("val_") else metric


def _check_metrics(trials: pd.DataFrame, *metrics: str) -> list[str]:
    """Directions of ``metrics``; ValueError for an unknown name or one no trial logged."""
    dirs = [_direction(m) for m in metrics]  # raises ValueError listing valid names
    if not trials.empty:
        missing = [m for m in metrics if m not in trials]
        if missing:
            logged = sorted(c for c in trials.columns if c not in _BASE_COLUMNS and pd.api.types.is_numeric_dtype(trials[c])
                            and c != "intervention.magnitude")
            hint = ""
            if all(m.startswith("val_") for m in missing):
                hint = ("; these trials logged no validation metrics (sweeps before validation scoring): choose on the "
                        "test split with --select-on test (or select_on='test'), knowing the pick is optimistic")
            raise QueryError(f"metric(s) {', '.join(map(repr, missing))} not logged by any of these trials; "
                             f"logged metrics: {', '.join(logged) or 'none'}{hint}")
    return dirs


def _config_rows(trials: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Seed means per config_key (aggregate_seeds) plus per-metric counts of non-missing values.

    ``run_ids``/``trial_keys`` list every member trial in seed order; ``run_id``/``trial_key`` name the
    first of them, so every record (JSON included) points at a concrete trial run to open.
    """
    metrics = list(dict.fromkeys(metrics))
    if not trials.empty and "seed" in trials:
        trials = trials.sort_values("seed", key=lambda s: pd.to_numeric(s, errors="coerce"), kind="stable")
    agg = aggregate_seeds(trials, metrics)
    if agg.empty:
        for col in [*(f"{m}_{x}" for m in metrics for x in ("std", "ci_low", "ci_high", "count")),
                    *(c for m in metrics for c in abs_columns(m)), "run_ids", "trial_keys", "run_id", "trial_key"]:
            agg[col] = pd.Series(dtype=object)
        return agg
    grouped = trials.groupby("config_key", sort=False)
    for m in metrics:
        counts = grouped[m].count() if m in trials else pd.Series(0, index=grouped.size().index)
        agg[f"{m}_count"] = agg["config_key"].map(counts).astype(int)
    agg["trial_keys"] = agg["config_key"].map(grouped["trial_key"].agg(list))
    agg.insert(1, "run_id", agg["run_ids"].str[0])
    agg.insert(2, "trial_key", agg["trial_keys"].str[0])
    return agg


def _rows(trials: pd.DataFrame, metrics: Sequence[str], by_config: bool) -> pd.DataFrame:
    if by_config:
        return _config_rows(trials, metrics)
    rows = trials.copy()
    for m in metrics:
        if m not in rows:
            rows[m] = np.nan
    return rows.reset_index(drop=True)


def pareto(trials: pd.DataFrame, perf: str, fair: str, *, by_config: bool = True,
           front_only: bool = True, split: str = "test") -> pd.DataFrame:
    """The Pareto front of ``perf`` (its direction) against ``fair`` (its direction; signed metrics by |value|).

    ``split``: the descriptive front of the test metrics (default) or of the validation ones (``val_``
    columns). ``by_config``: one row per configuration (config_key) with seed means, ``*_std``,
    ``*_ci_low``/``*_ci_high`` (95 % t-interval), ``*_count`` (non-missing values), ``n_seeds``,
    ``run_ids`` and ``trial_keys`` (a signed metric also ``*_abs``, its mean |value|, by which the front
    compares it); otherwise one row per trial. Rows missing either metric are never on
    the front. ``front_only=False`` returns every row with an ``on_front`` column. Sorted by
    performance, best first.
    """
    perf, fair = split_metric(perf, split), split_metric(fair, split)
    directions = _check_metrics(trials, perf, fair)
    rows = _rows(trials, [perf, fair], by_config)
    rows["on_front"] = (pareto_mod.pareto_mask(_objective_values(rows, [perf, fair]), directions)
                        if len(rows) else pd.Series(dtype=bool))
    if front_only:
        rows = rows[rows["on_front"]]
    return rows.sort_values([perf, fair], ascending=[directions[0] == "min", directions[1] == "min"],
                            na_position="last", kind="stable").reset_index(drop=True)


def _check_unfairness(fair: str, question: str) -> None:
    """Refuse a fairness metric where higher is better: ``question`` reads lower as fairer, so it would
    answer backwards (rel_change, mean_diff "negative = fairer", the least value picked)."""
    if _direction(fair) == "max":
        raise QueryError(f"{question}: fairness metric {fair!r} is maximised (higher is better), so it cannot be read "
                         "as unfairness; use one where lower is fairer (signed metrics count by |value|), e.g. "
                         "equalized_odds_difference")


def _perf_limit(ref_perf: float, direction: str, max_drop: float | None, max_rel_drop: float | None) -> float:
    budget = max_drop if max_drop is not None else abs(ref_perf) * max_rel_drop
    return ref_perf - budget if direction == "max" else ref_perf + budget


def _fairest_within(rows: pd.DataFrame, perf: str, fair: str, directions: list[str], limit: float) -> int | None:
    """Position in ``rows`` of the least unfair row whose performance reaches ``limit`` (inclusive, with
    constrained_best's tolerance); ties to better performance, then the earlier row. None if none."""
    values = _objective_values(rows, [perf, fair])
    perf_min = values[:, 0] * (-1.0 if directions[0] == "max" else 1.0)  # minimisation form
    lim_min = -limit if directions[0] == "max" else limit
    ok = ~np.isnan(values).any(axis=1) & (perf_min <= lim_min + 1e-12 * max(1.0, abs(lim_min)))
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return None
    span = float(np.ptp(perf_min[idx]))  # every eligible row lies within this drop of the eligible best
    pick = pareto_mod.constrained_best(values[idx], directions, max_drop=span)
    return None if pick is None else int(idx[pick])


def best(trials: pd.DataFrame, perf: str, fair: str, *, max_drop: float | None = None,
         max_rel_drop: float | None = None, reference: Mapping[str, Any] | None = None,
         by_config: bool = True, select_on: str = "val") -> pd.DataFrame:
    """The least unfair configuration (seed means; one trial with ``by_config=False``) whose ``perf`` is within
    the budget of the best one's, as a one-row frame.

    The choice is made on ``select_on`` (default ``val``: the ``val_`` metrics), never the split that
    reports: the row carries the test metrics of its pick beside the validation ones it was chosen by
    (choosing on test would report the luckiest noise as the result). Give exactly one budget:
    ``max_drop`` (absolute, in the metric's units: 0.01 = one point of accuracy) or ``max_rel_drop``
    (a fraction of |reference performance|). The budget is measured from the best row having both
    selection metrics or, with ``reference`` (axis -> value, e.g. ``{"paradigm": "supervised"}``), from
    the best row of that configuration. Inclusive boundary; ties go to higher performance, then to the
    earlier row. Adds ``selected_on``, ``reference_<perf>`` and ``<perf>_limit`` (selection-split names).
    Empty frame if nothing qualifies.
    """
    sel_perf, sel_fair = split_metric(perf, select_on), split_metric(fair, select_on)
    directions = _check_metrics(trials, sel_perf, sel_fair)
    pareto_mod.check_budget(max_drop, max_rel_drop)
    rows = _rows(trials, [sel_perf, sel_fair, perf, fair], by_config)
    valid = rows[sel_perf].notna() & rows[sel_fair].notna() if len(rows) else pd.Series(dtype=bool)
    if reference:
        sel = valid.copy()
        for key, value in reference.items():
            key = axis_column(key)
            if key not in rows:
                raise QueryError(f"reference key {key!r} is not a column; use one of {', '.join(AXIS_PARAMS)}")
            sel &= _matches(rows[key], value)
        if not sel.any():
            values = {c: sorted(map(str, rows[c].dropna().unique())) for c in map(axis_column, reference) if c in rows}
            raise QueryError(f"no trial with both metrics matches reference {dict(reference)}; values present: {values}")
        ref_rows = rows[sel]
    else:
        ref_rows = rows[valid]
    extra = {"selected_on": pd.Series(dtype=object), f"reference_{sel_perf}": pd.Series(dtype=float),
             f"{sel_perf}_limit": pd.Series(dtype=float)}
    if ref_rows.empty:
        return rows.iloc[0:0].assign(**extra)
    ref_perf = float(ref_rows[sel_perf].max() if directions[0] == "max" else ref_rows[sel_perf].min())
    limit = _perf_limit(ref_perf, directions[0], max_drop, max_rel_drop)
    pos = _fairest_within(rows, sel_perf, sel_fair, directions, limit)
    out = rows.iloc[[] if pos is None else [pos]].copy()
    out["selected_on"] = select_on
    out[f"reference_{sel_perf}"] = ref_perf
    out[f"{sel_perf}_limit"] = limit
    return out.reset_index(drop=True)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error), NaNs left out of the family and kept as NaN."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def paired_tests(trials: pd.DataFrame, by: str, metric: str, reference_group: Any) -> pd.DataFrame:
    """Per group of ``by`` against the reference: trials matched on every other axis and the seed, the mean
    paired difference of ``metric`` (group − reference; signed metrics by |value|), a paired t-test and a
    Wilcoxon signed-rank test (scipy), both two-sided with Holm-adjusted p-values across the groups."""
    from scipy import stats

    by = axis_column(by)
    others = [c for c in (*AXIS_PARAMS, "seed") if c in trials and c != by]
    values = trials.assign(_v=_objective_values(trials, [metric])[:, 0]) if len(trials) else trials.assign(_v=np.nan)
    values = values[values["_v"].notna()]

    def cells(frame: pd.DataFrame) -> pd.DataFrame:
        """One value per matched cell (a cell an optuna search ran twice, e.g. at two learning rates, is
        averaged): pairs are one-to-one, never a cross product."""
        return frame.groupby(others, dropna=False, as_index=False)["_v"].mean() if others else frame[["_v"]]

    ref = cells(values[values[by].astype(str) == str(reference_group)])
    out = []
    for key in sorted(values[by].dropna().unique(), key=str):
        rec = {by: key, "n_pairs": 0, "mean_diff": np.nan, "p_ttest": np.nan, "p_wilcoxon": np.nan}
        if str(key) != str(reference_group):
            pairs = cells(values[values[by] == key]).merge(ref, on=others, suffixes=("", "_ref"))
            diff = (pairs["_v"] - pairs["_v_ref"]).to_numpy(float)
            rec["n_pairs"], rec["mean_diff"] = len(diff), float(diff.mean()) if len(diff) else np.nan
            if len(diff) >= 2:
                if np.all(diff == 0):  # no difference at all: both tests are undefined; nothing to reject
                    rec["p_ttest"] = rec["p_wilcoxon"] = 1.0
                else:
                    with warnings.catch_warnings():  # identical differences: scipy warns, the p-value stands
                        warnings.simplefilter("ignore", RuntimeWarning)
                        rec["p_ttest"] = float(stats.ttest_rel(pairs["_v"], pairs["_v_ref"]).pvalue)
                        rec["p_wilcoxon"] = float(stats.wilcoxon(diff).pvalue)
        out.append(rec)
    table = pd.DataFrame(out, columns=[by, "n_pairs", "mean_diff", "p_ttest", "p_wilcoxon"])
    for col in ("p_ttest", "p_wilcoxon"):
        table[col] = holm(table[col].tolist())
    return table


def relative_change(value: float, reference: float) -> float:
    """(value − reference) / |reference|. Against a perfectly fair reference (0) that is 0 for a group that is
    fair too and +inf (infinitely worse) for any other: defined, never NaN."""
    if not (np.isfinite(value) and np.isfinite(reference)):
        return math.nan
    if reference == 0:
        return 0.0 if value == 0 else math.inf
    return (value - reference) / abs(reference)


def compare(trials: pd.DataFrame, by: str, perf: str, fair: str, *, max_drop: float | None = 0.01,
            max_rel_drop: float | None = None, reference_group: Any = None, by_config: bool = True,
            select_on: str = "val") -> pd.DataFrame:
    """Per value of the axis ``by``: the least unfair configuration within the budget of the overall best,
    and a paired test of each group against the reference.

    The pick is made on ``select_on`` (default ``val``) as in ``best`` and reports its test metrics.
    The budget (one of ``max_drop``/``max_rel_drop``; pass ``max_drop=None`` to use the relative one)
    is measured from the best row of the whole sweep, so every group faces the same performance floor.
    Columns: ``by``, n_trials (rows), n_within (rows reaching the floor), run_id(s), trial_key(s),
    config_key, the selection metrics, ``perf``, ``fair`` (with ``_ci_low``/``_ci_high`` on
    configuration means, and for a signed ``fair`` its mean |value| over seeds ``_abs`` with its interval),
    ``rel_change`` = (u − u_ref) / u_ref of the picks' unfairness u (|fair|; on configurations the mean
    |fair| over seeds) against ``reference_group`` (default: the first group in sorted order; see
    ``relative_change``), and from ``paired_tests`` on ``fair`` over matched trials: n_pairs, mean_diff,
    p_ttest, p_wilcoxon (Holm). Negative means fairer. Groups with no row within budget have NaN metrics.
    ``fair`` must be a metric where lower is fairer; ``by="seed"`` needs ``by_config=False`` (a
    configuration averages its seeds).
    """
    sel_perf, sel_fair = split_metric(perf, select_on), split_metric(fair, select_on)
    directions = _check_metrics(trials, sel_perf, sel_fair)
    _check_metrics(trials, perf, fair)
    _check_unfairness(fair, "compare")
    pareto_mod.check_budget(max_drop, max_rel_drop)
    by = axis_column(by)
    if by == "seed" and by_config:
        raise QueryError("cannot group by 'seed' on configuration rows: seeds are averaged within a configuration; "
                         "compare single trials with --per-trial (by_config=False)")
    rows = _rows(trials, [sel_perf, sel_fair, perf, fair], by_config)
    if by not in rows:
        raise QueryError(f"cannot group by {by!r}; use one of {', '.join(c for c in AXIS_PARAMS + ('seed',) if c in rows)}")
    shown = list(dict.fromkeys([sel_perf, sel_fair, perf, fair]))
    if by_config:  # the pick's uncertainty over seeds: sd, count and 95 % t-interval
        shown += ["n_seeds", *(f"{m}_{x}" for m in (perf, fair) for x in ("std", "count", "ci_low", "ci_high"))]
        shown += abs_columns(fair)  # a signed fair: what rel_change compares
    ids = ["run_ids", "trial_keys"] if by_config else ["run_id", "trial_key"]
    tests = ["n_pairs", "mean_diff", "p_ttest", "p_wilcoxon"]
    cols = [by, "n_trials", "n_within", *ids, "config_key", *shown, "rel_change", *tests]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    valid = rows[sel_perf].notna() & rows[sel_fair].notna()
    if not valid.any():
        raise QueryError(f"no row has both {sel_perf!r} and {sel_fair!r}")
    ref_perf = float(rows.loc[valid, sel_perf].max() if directions[0] == "max" else rows.loc[valid, sel_perf].min())
    limit = _perf_limit(ref_perf, directions[0], max_drop, max_rel_drop)
    tol = 1e-12 * max(1.0, abs(limit))
    out = []
    for key, group in rows.groupby(by, sort=True, dropna=False):
        group = group.reset_index(drop=True)
        gp = group[sel_perf].to_numpy(float)
        within = (gp >= limit - tol) if directions[0] == "max" else (gp <= limit + tol)
        within &= group[sel_fair].notna().to_numpy()
        pos = _fairest_within(group, sel_perf, sel_fair, directions, limit)
        rec = {by: key, "n_trials": len(group), "n_within": int(within.sum())}
        pick = group.iloc[pos] if pos is not None else None
        for c in [*ids, "config_key", *shown]:
            value = pick[c] if pick is not None and c in group else None
            rec[c] = value if c in (*ids, "config_key") else (np.nan if value is None else float(value))
        out.append(rec)
    table = pd.DataFrame(out)
    keys = table[by].tolist()
    if reference_group is None:
        ref_idx = 0
    else:
        matches = [i for i, k in enumerate(keys) if str(k) == str(reference_group) or
                   (isinstance(k, (int, float)) and _is_number(reference_group) and float(k) == float(reference_group))]
        if not matches:
            raise QueryError(f"reference group {reference_group!r} not among the values of {by!r}: "
                             f"{', '.join(map(str, keys))}")
        ref_idx = matches[0]
    unfair = _objective_values(table, [fair])[:, 0]
    table["rel_change"] = [relative_change(v, unfair[ref_idx]) for v in unfair]
    paired = paired_tests(trials, by, fair, keys[ref_idx]).set_index(by)
    for c in tests:
        table[c] = [paired[c].get(k, np.nan) if k in paired.index else np.nan for k in keys]
    table.attrs.update({"reference_group": keys[ref_idx], "selected_on": select_on, f"best_{sel_perf}": ref_perf,
                        f"{sel_perf}_limit": limit})
    return table[cols]


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


# -- paper A's questions -------------------------------------------------------------------------
# Whether a biased base passes its bias on (inheritance: its unfairness minus a control base's, trials
# paired on every other axis and the seed) and which finetuning correlation is fairest at what cost.

PAPER_A_CELLS = ("freeze_depth", "finetune.size", "intervention.magnitude")


def _interval_columns(values: np.ndarray, name: str, bounds: tuple[float, float]) -> dict[str, float]:
    low, high = t_interval(values, bounds=bounds)
    finite = values[np.isfinite(values)]
    return {name: float(finite.mean()) if len(finite) else math.nan, f"{name}_ci_low": low, f"{name}_ci_high": high}


def inheritance(trials: pd.DataFrame, metric: str, *, biased: str = "biased", controls: Sequence[str] | None = None,
                cells: Sequence[str] = PAPER_A_CELLS) -> pd.DataFrame:
    """Paper A's inheritance per cell of ``cells`` and per control base: the biased base's ``metric`` minus the
    control's (signed metrics by |value|), trials paired on every other axis and the seed.

    Columns: ``control``, the cell axes, ``n_pairs``, ``biased`` and ``control_value`` (means over seeds)
    and ``inheritance`` (mean paired difference), each with its 95 % Student-t interval (``_ci_low`` /
    ``_ci_high``), clipped to what it can take: the metric's range for the bases, and for the difference that
    range's width either way (equalized odds: [-1, 1]). ``controls`` defaults to every paradigm but the
    biased base and ``scratch``.
    """
    _check_metrics(trials, metric)
    if "paradigm" not in trials or biased not in set(trials["paradigm"]):
        raise QueryError(f"no trial has paradigm {biased!r}; paradigms: "
                         f"{', '.join(sorted(map(str, trials.get('paradigm', pd.Series()).dropna().unique()))) or 'none'}")
    present = sorted(set(trials["paradigm"].dropna()) - {biased, "scratch"})
    controls = list(controls) if controls is not None else present
    unknown = [c for c in controls if c not in set(trials["paradigm"])]
    if unknown:
        raise QueryError(f"control base(s) {unknown} have no trials; paradigms: {', '.join(sorted(set(trials['paradigm'])))}")
    cells = [c for c in cells if c in trials]
    others = [c for c in (*AXIS_PARAMS, "seed") if c in trials and c not in ("paradigm", *cells)]
    values = trials.assign(_v=_objective_values(trials, [metric])[:, 0])
    values = values[values["_v"].notna()]
    keys = [*cells, *others]
    # one value per matched cell (a cell run twice, e.g. by a search at two rates, is averaged)
    side = {p: values[values["paradigm"] == p].groupby(keys, dropna=False, as_index=False)["_v"].mean()
            for p in (biased, *controls)}
    low, high = _objective_range(metric)
    out = []
    for control in controls:
        pairs = side[biased].merge(side[control], on=keys, suffixes=("_b", "_c"))
        for cell, part in (pairs.groupby(cells, sort=True, dropna=False) if cells else [((), pairs)]):
            cell = cell if isinstance(cell, tuple) else (cell,)
            b, c = part["_v_b"].to_numpy(float), part["_v_c"].to_numpy(float)
            out.append({"control": control, **dict(zip(cells, cell)), "n_pairs": len(part),
                        **_interval_columns(b, "biased", (low, high)),
                        **_interval_columns(c, "control_value", (low, high)),
                        **_interval_columns(b - c, "inheritance", (low - high, high - low))})
    columns = ["control", *cells, "n_pairs", *(f"{n}{s}" for n in ("biased", "control_value", "inheritance")
                                               for s in ("", "_ci_low", "_ci_high"))]
    return pd.DataFrame(out, columns=columns)


def fairest_level(trials: pd.DataFrame, perf: str, fair: str, *, axis: str = "intervention.magnitude") -> pd.DataFrame:
    """Per configuration of every axis but ``axis`` (seeds averaged): the level of ``axis`` with the least
    mean unfairness (a signed ``fair``: the least mean |value| over seeds, shown as ``{fair}_abs`` with its
    interval), its ``fair`` and ``perf`` with 95 % t-intervals, the best mean ``perf`` over the levels and
    ``perf_cost`` = how much worse perf is at the fairest level than at the best, always >= 0 (0 when the
    fairest level is also the best). Paper A's "correcting the finetuning data at little cost", per base.
    ``fair`` must be a metric where lower is fairer."""
    _check_metrics(trials, perf, fair)
    _check_unfairness(fair, "fairest_level")
    axis = axis_column(axis)
    if axis not in trials:
        raise QueryError(f"no column {axis!r}; axes: {', '.join(c for c in AXIS_PARAMS if c in trials)}")
    configs = aggregate_seeds(trials, [perf, fair])
    configs = configs.assign(_u=_objective_values(configs, [fair])[:, 0])
    group_by = [c for c in AXIS_PARAMS if c in configs and c != axis]
    perf_best = "max" if _direction(perf) == "max" else "min"
    out = []
    for key, part in configs.groupby(group_by, sort=True, dropna=False):
        part = part[part["_u"].notna()]
        if part.empty:
            continue
        # equally fair levels: the one with the best perf, so perf_cost does not depend on the runs' order
        pick = part.sort_values(["_u", perf], ascending=[True, perf_best == "min"], na_position="last").iloc[0]
        best = float(part[perf].agg(perf_best))
        cost = best - float(pick[perf]) if perf_best == "max" else float(pick[perf]) - best
        out.append({**dict(zip(group_by, key if isinstance(key, tuple) else (key,))), f"fairest_{axis}": pick[axis],
                    **{f"{m}{s}": pick[f"{m}{s}"] for m in (fair, perf) for s in ("", "_ci_low", "_ci_high")},
                    **{c: pick[c] for c in abs_columns(fair)},
                    f"best_{perf}": best, "perf_cost": cost, "n_seeds": int(pick["n_seeds"])})
    return pd.DataFrame(out)
