"""`fairsweep report`: the figures and a Markdown summary of one sweep, written to a folder and
logged to the sweep's parent run under ``report/``.

Everything is read back from MLflow (metrics, params, per-group artifacts), so a report can be made
at any time after, or during, a sweep, from any machine that reaches the tracking server.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator import figures, query
from orchestrator.query import QueryError, SweepNotFoundError, front_table, load_trials
from trainables.metrics import direction
from trainables.trial import Freeze

__all__ = ["Report", "write_report", "front_story"]


@dataclass(frozen=True)
class Report:
    files: tuple[Path, ...]
    parent_run_id: str
    n_trials: int
    front_size: int


def _per_group_tables(client: Any, front: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """Per-group tables of every run of each front member (the bars average its seeds, like the front)."""
    frames = []
    for i, row in front.reset_index(drop=True).iterrows():
        member = f"{i + 1}: {row['backbone']}/{row['paradigm']}/{row['intervention.magnitude']:g}/f{row['freeze_depth']}"
        for run_id in row["run_ids"]:
            try:
                path = client.download_artifacts(run_id, "per_group.csv", str(folder / run_id))
            except Exception:  # noqa: BLE001 - a run without the artifact (e.g. logged by hand) is left out of the bars
                continue
            frames.append(pd.read_csv(path).assign(member=member))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_report(client: Any, sweep: str, out: Path, *, experiment: str | None = None, performance: str | None = None,
                 fairness: str | None = None, max_drop: float = 0.01, log_to_mlflow: bool = True,
                 select_on: str = "val") -> Report:
    """Write the report's PNGs and ``summary.md`` into ``out`` (and log them to the parent run)."""
    experiment = experiment or sweep
    parent = query.parent_run(client, sweep, experiment)
    if not performance or not fairness:
        perf_default, fair_default = query.sweep_objectives(client, sweep, experiment, parent=parent)
        performance, fairness = performance or perf_default, fairness or fair_default
    perf, fair = performance, fairness
    direction(perf), direction(fair)  # unknown names fail here, listing the valid ones
    trials = load_trials(client, experiment, sweep)
    if trials.empty:
        raise SweepNotFoundError(f"sweep {sweep!r} has no finished trials yet")
    for metric in (perf, fair):
        if metric not in trials:
            raise QueryError(f"no trial of sweep {sweep!r} has the metric {metric!r}")
    table = front_table(trials, perf, fair)
    front = table[table["on_front"]]
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.savefig(out / name)
        files.append(out / name)

    save(figures.pareto_figure(table, perf, fair, title=f"{sweep}: {len(front)} of {len(table)} configurations on the front"),
         "pareto.png")
    save(figures.axis_figure(trials, "intervention.magnitude", perf, fair), "vs_intervention_magnitude.png")
    depths = sorted(trials["freeze_depth"].unique(), key=lambda label: Freeze.from_label(label).sort_key())
    by_depth = trials.assign(freeze_depth=pd.Categorical(trials["freeze_depth"], depths, ordered=True))
    save(figures.axis_figure(by_depth, "freeze_depth", perf, fair), "vs_freeze_depth.png")
    if "finetune.size" in trials and trials["finetune.size"].nunique() > 1:  # axes.finetune_size
        save(figures.axis_figure(trials, "finetune.size", perf, fair), "vs_finetune_size.png")
    paper_a = _paper_a(trials, perf, fair, out, save, files)
    with tempfile.TemporaryDirectory() as tmp:
        groups = _per_group_tables(client, front, Path(tmp))
    if not groups.empty:
        save(figures.group_bars_figure(groups), "front_group_accuracy.png")

    try:
        best = query.best(trials, perf, fair, max_drop=max_drop, by_config=True, select_on=select_on)
    except QueryError as exc:  # e.g. a sweep from before validation scoring: the figures still stand
        best, skipped = pd.DataFrame(), str(exc)
    else:
        skipped = ""
    files.append(_write_summary(out / "summary.md", sweep, experiment, trials, table, perf, fair, best, max_drop, select_on,
                                skipped))
    if paper_a:
        with open(out / "summary.md", "a") as fh:
            fh.write("\n" + "\n".join(paper_a) + "\n")
    if log_to_mlflow:
        for f in files:
            client.log_artifact(parent.info.run_id, str(f), artifact_path="report")
    return Report(tuple(files), parent.info.run_id, len(trials), len(front))


def _paper_a(trials: pd.DataFrame, perf: str, fair: str, out: Path, save: Any, files: list[Path]) -> list[str]:
    """Paper A's views of a sweep: ``fair`` and ``perf`` against the intervention magnitude per base (a panel
    per freezing depth and finetuning size), the fairest magnitude per base and its cost
    (``fairest_magnitude.csv``), and, when the sweep has a ``biased`` base and another pretrained one, the
    inheritance table (``inheritance.csv``) and figure. Returns the summary's Markdown lines for them."""
    if trials["intervention.magnitude"].nunique() < 2:
        return []
    configs = query.aggregate_seeds(trials, [perf, fair])
    # a signed metric by its mean distance from parity over seeds, as the front and the fairest level read it
    save(figures.magnitude_figure(configs, f"{fair}_abs" if f"{fair}_abs" in configs else fair),
         "unfairness_vs_magnitude.png")
    save(figures.magnitude_figure(configs, perf), "performance_vs_magnitude.png")
    fairest = query.fairest_level(trials, perf, fair)
    fairest.to_csv(out / "fairest_magnitude.csv", index=False)
    files.append(out / "fairest_magnitude.csv")
    lines = ["## Unfairness against the intervention magnitude (paper A)", "",
             "`unfairness_vs_magnitude.png`, `performance_vs_magnitude.png`: means over seeds with 95 % intervals. The "
             f"fairest magnitude per base, its {fair} and {perf}, and the {perf} it costs against the best magnitude "
             "(`fairest_magnitude.csv`):", "", _markdown_table(fairest.drop(columns=[c for c in fairest if c.endswith("_ci_low")
                                                                                  or c.endswith("_ci_high")])), ""]
    controls = sorted(set(trials["paradigm"]) - {"biased", "scratch"})
    if "biased" in set(trials["paradigm"]) and controls:
        table = query.inheritance(trials, fair)
        table.to_csv(out / "inheritance.csv", index=False)
        files.append(out / "inheritance.csv")
        if "finetune.size" in table and table["finetune.size"].nunique() > 1:
            save(figures.inheritance_figure(table, metric=fair), "inheritance_vs_size.png")
        lines += ["## Inheritance of the biased base's unfairness (paper A)", "",
                  f"{fair} of the `biased` base minus that of each control base ({', '.join(controls)}), trials paired "
                  "on every other axis and the seed; 95 % t-intervals in `inheritance.csv`"
                  + (", and against the finetuning size in `inheritance_vs_size.png`" if "finetune.size" in table
                     and table["finetune.size"].nunique() > 1 else "") + ".", ""]
        shown = table[[c for c in table if not c.endswith("_ci_low") and not c.endswith("_ci_high")]].copy()
        shown["inheritance 95% CI"] = [_interval(r, "inheritance") for _, r in table.iterrows()]
        lines += [_markdown_table(shown), ""]
    return lines


def _markdown_table(frame: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [" | ".join(map(str, frame.columns)), " | ".join("---" for _ in frame.columns)]
    rows += [" | ".join(cell(v) for v in record) for record in frame.itertuples(index=False)]
    return "\n".join(f"| {r} |" for r in rows)


def _interval(row: Any, metric: str) -> str:
    low, high = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    return "n/a (one seed)" if low is None or pd.isna(low) else f"[{low:.4f}, {high:.4f}]"


def _fairness(row: Any, fair: str, digits: int = 4) -> str:
    """A pick's fairness as the front compares it: a signed metric by the mean over seeds of |value| (its signed
    mean beside it), since seeds at +0.3 and -0.3 average to a parity they never reached."""
    if f"{fair}_abs" in row and not pd.isna(row[f"{fair}_abs"]):
        return (f"|{fair}| {row[f'{fair}_abs']:.{digits}f} {_interval(row, f'{fair}_abs')} "
                f"(signed mean {row[fair]:+.{digits}f})")
    return f"{fair} {row[fair]:.{digits}f} {_interval(row, fair)}"


def _seeds(row: Any, perf: str, fair: str) -> str:
    """How many seeds the shown means are over: the trials that logged both metrics (``n_seeds`` counts every
    finished trial of the configuration, one that logged no value of a metric included)."""
    counts = [row.get(f"{m}_count") for m in (perf, fair)]
    n = int(min(counts)) if all(c is not None and not pd.isna(c) for c in counts) else int(row["n_seeds"])
    return f"{n} seed(s)" + (f" of {int(row['n_seeds'])}" if n != int(row["n_seeds"]) else "")


def _write_summary(path: Path, sweep: str, experiment: str, trials: pd.DataFrame, table: pd.DataFrame, perf: str,
                   fair: str, best: pd.DataFrame, max_drop: float, select_on: str, skipped: str = "") -> Path:
    cols = ["backbone", "paradigm", "intervention.kind", "intervention.magnitude", "freeze_depth", "finetune.size",
            "n_seeds"]
    front = table[table["on_front"]]
    shown = front[[c for c in cols if c in front]].copy()
    for m in (perf, fair):
        shown[m] = front[m]
        shown[f"{m} sd"] = front[f"{m}_std"]
        shown[f"{m} 95% CI"] = [_interval(r, m) for _, r in front.iterrows()]
    if f"{fair}_abs" in front:  # a signed metric: the front compares the mean over seeds of |value|
        shown[f"abs({fair})"] = front[f"{fair}_abs"]  # a pipe would end the Markdown cell
        shown[f"abs({fair}) 95% CI"] = [_interval(r, f"{fair}_abs") for _, r in front.iterrows()]
    lines = [f"# Sweep `{sweep}`", "",
             f"- MLflow experiment: `{experiment}`; finished trials: {len(trials)}; configurations: {len(table)}",
             f"- objectives: `{perf}` and `{fair}` on the test split: means over seeds, their standard deviation and a "
             f"95 % Student-t interval (clipped to the metric's range)"
             + (f"; `{fair}` is signed, and the front compares `abs({fair})`, the mean over seeds of each trial's "
                f"distance from parity" if f"{fair}_abs" in table else ""), "",
             f"## Pareto front ({len(front)} configurations)", "", _markdown_table(shown), ""]
    if not best.empty:
        row = best.iloc[0]
        sel = f"val_{perf}" if select_on == "val" else perf
        lines += [f"## Fairest within {max_drop:g} of the best {perf}, chosen on the {select_on} split", "",
                  f"`{row['backbone']}` / `{row['paradigm']}` / {row['intervention.kind']} {row['intervention.magnitude']:g} / "
                  f"freeze `{row['freeze_depth']}`: {perf} {row[perf]:.4f} {_interval(row, perf)}, "
                  f"{_fairness(row, fair)} on test (means over {_seeds(row, perf, fair)}; chosen "
                  f"by {sel} {row[sel]:.4f}, best {row[f'reference_{sel}']:.4f}; `fairsweep best {sweep} "
                  f"--select-on {select_on} --max-drop {max_drop:g}` gives the same).", ""]
    if skipped:
        lines += [f"## Fairest within {max_drop:g} of the best {perf}", "", f"Not chosen: {skipped}", ""]
    lines += ["## Figures", "", "- `pareto.png`: every configuration, coloured by paradigm, the front as a line",
              "- `vs_intervention_magnitude.png`, `vs_freeze_depth.png` (and `vs_finetune_size.png` over several "
              "finetuning sizes): means per paradigm",
              "- `front_group_accuracy.png`: per-group accuracy of the front's members", ""]
    path.write_text("\n".join(lines))
    return path


def front_story(trials: pd.DataFrame, perf: str, fair: str, *, max_drop: float = 0.01) -> str:
    """One line on what a finished sweep shows: the fairest configuration within ``max_drop`` of the best
    ``perf`` (chosen on validation when the trials have val_ metrics; test metrics reported, with their
    interval over seeds) and, where the sweep has one, the biased base under a linear probe against the
    other pretrained bases under one (a signed metric by |value|, averaged per trial), with the paired
    difference and its interval (paper A's inheritance, ``query.inheritance``). Empty when nothing finished."""
    if trials.empty or perf not in trials or fair not in trials:
        return ""
    select_on = "val" if f"val_{perf}" in trials and f"val_{fair}" in trials else "test"
    pick = query.best(trials, perf, fair, max_drop=max_drop, select_on=select_on)
    parts = []
    if not pick.empty:
        row = pick.iloc[0]
        parts.append(f"fairest within {max_drop:g} of the best {perf} (chosen on {select_on}): {row['paradigm']} / "
                     f"freeze {row['freeze_depth']} / {row['intervention.kind']} {row['intervention.magnitude']:g}, "
                     f"{perf} {row[perf]:.3f} {_interval(row, perf)}, {_fairness(row, fair, digits=3)}")
    probes = trials[trials["freeze_depth"].astype(str) == "linear"]
    if "biased" in set(probes["paradigm"]):
        # a signed metric by its distance from parity, per trial before the mean: +0.3 and -0.3 are not fair
        signed = query._signed_column(fair)
        values = probes[fair].abs() if signed else probes[fair]
        means = values.groupby(probes["paradigm"]).mean()
        others = ", ".join(f"{p} {v:.3f}" for p, v in means.items() if p not in ("biased", "scratch"))
        parts.append(f"{f'|{fair}|' if signed else fair} of a linear probe on the biased base {means['biased']:.3f}"
                     + (f" (other bases: {others})" if others else "") + ", means over magnitudes and seeds")
        if others:  # paper A's inheritance, paired on everything else, with its interval
            gaps = query.inheritance(probes, fair, cells=())
            parts.append("the biased base passes on " + ", ".join(
                f"{r['inheritance']:+.3f} {_interval(r, 'inheritance')} over {r['control']}" for _, r in gaps.iterrows())
                + f" (paired over magnitudes and seeds, {int(gaps['n_pairs'].min())} pairs)")
    return "; ".join(parts)
