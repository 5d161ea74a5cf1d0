"""Matplotlib figures of a sweep, drawn on ``matplotlib.figure.Figure`` objects, never through pyplot's
global state: no display is needed, and the process's backend is left as it is (a notebook that launched a
sweep keeps its inline plots). Save them with ``fig.savefig``. matplotlib is imported inside the functions
that draw, so importing this module costs nothing until a figure is made."""
from __future__ import annotations

from typing import Any

import pandas as pd

__all__ = ["pareto_figure", "axis_figure", "group_bars_figure", "magnitude_figure", "inheritance_figure"]


def _signed(metric: str) -> bool:
    """Whether the queries compare ``metric`` by |value| (a signed metric; any other column: no)."""
    from orchestrator.query import _signed_column

    return _signed_column(metric)


def pareto_figure(table: pd.DataFrame, performance: str, fairness: str, *, title: str = "") -> Any:
    """Every configuration coloured by paradigm, with its 95 % interval over seeds as error bars where the
    table has one (``*_ci_low``/``*_ci_high``); the front drawn as a line through its members. A signed
    fairness metric is drawn as the front compares it, by |value|: a configuration's mean |value| over
    seeds (``{fairness}_abs``, with its interval) where the table has it, else each row's |value|."""
    from matplotlib.figure import Figure

    x = fairness
    if _signed(fairness):
        x = f"{fairness}_abs"
        if x not in table:  # trial rows: their own distance from parity (no interval to draw)
            table = table.assign(**{x: table[fairness].abs()})

    def err(part: pd.DataFrame, metric: str) -> Any:
        if f"{metric}_ci_low" not in part:
            return None
        low = (part[metric] - part[f"{metric}_ci_low"]).fillna(0).clip(lower=0)
        high = (part[f"{metric}_ci_high"] - part[metric]).fillna(0).clip(lower=0)
        return [low.to_numpy(), high.to_numpy()]

    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    ax = fig.subplots()
    for paradigm, part in table.groupby("paradigm", sort=True):
        ax.errorbar(part[x], part[performance], xerr=err(part, x), yerr=err(part, performance), fmt="o",
                    label=str(paradigm), alpha=0.75, ms=5, elinewidth=0.8, capsize=2)
    front = table[table["on_front"]].sort_values(x)
    if not front.empty:
        ax.plot(front[x], front[performance], color="black", lw=1.2, marker="o", mfc="none", ms=9, label="Pareto front")
    ax.set_xlabel(f"|{fairness}| (unfairness)" if x != fairness else f"{fairness} (unfairness)")
    ax.set_ylabel(performance)
    ax.set_title(title or "performance vs fairness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def axis_figure(trials: pd.DataFrame, axis: str, performance: str, fairness: str, *, title: str = "") -> Any:
    """Unfairness and performance against one axis (e.g. intervention magnitude), a line per paradigm;
    points are means over the other axes and seeds (a signed fairness metric: the mean of each trial's
    |value|, its distance from parity, as the queries compare it). A non-numeric axis (freezing depth) has
    one position per level for the whole figure, in ``_sorted_levels``' order for freeze_depth, else sorted
    as text, so every paradigm's point for a level sits above that level's tick."""
    from matplotlib.figure import Figure

    signed = _signed(fairness)
    if signed:
        trials = trials.assign(**{fairness: trials[fairness].abs()})
    numeric = pd.api.types.is_numeric_dtype(trials[axis])
    levels = [] if numeric else (_sorted_levels(trials[axis]) if axis == "freeze_depth"
                                 else sorted(trials[axis].dropna().unique(), key=str))
    position = {str(v): i for i, v in enumerate(levels)}
    fig = Figure(figsize=(10, 4), dpi=100)
    axes = fig.subplots(1, 2)
    for paradigm, part in trials.groupby("paradigm", sort=True):
        means = part.groupby(axis, sort=True, observed=True)[[fairness, performance]].mean()
        if not numeric:
            means = means.set_axis([position[str(v)] for v in means.index]).sort_index()
        for ax, metric in zip(axes, (fairness, performance)):
            ax.plot(means.index, means[metric], marker="o", label=str(paradigm))
    for ax, metric in zip(axes, (fairness, performance)):
        if not numeric:
            ax.set_xticks(range(len(levels)), [str(v) for v in levels])
        ax.set_xlabel(axis)
        ax.set_ylabel(f"|{metric}|" if signed and metric == fairness else metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or f"{fairness} and {performance} vs {axis}")
    fig.tight_layout()
    return fig


def group_bars_figure(per_group: pd.DataFrame, *, title: str = "") -> Any:
    """Per-group accuracy of each front member: one bar cluster per member, a bar per (attribute, group)."""
    from matplotlib.figure import Figure

    table = per_group.assign(group_label=per_group["attribute"].astype(str) + "=" + per_group["group"].astype(str))
    pivot = table.pivot_table(index="member", columns="group_label", values="accuracy", aggfunc="mean")
    fig = Figure(figsize=(max(6.4, 1.2 * len(pivot)), 4.8), dpi=100)
    ax = fig.subplots()
    pivot.plot.bar(ax=ax, rot=30)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title or "per-group accuracy of the front's members")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _panels(n_rows: int, n_cols: int, *, width: float = 4.2, height: float = 3.2) -> tuple[Any, Any]:
    """A figure with a grid of panels, always indexable as ``axes[row][col]``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * n_cols, height * n_rows), dpi=100, layout="constrained")
    return fig, fig.subplots(n_rows, n_cols, squeeze=False, sharey=True)


def _yerr(part: pd.DataFrame, metric: str) -> Any:
    low = (part[metric] - part[f"{metric}_ci_low"]).fillna(0).clip(lower=0)
    high = (part[f"{metric}_ci_high"] - part[metric]).fillna(0).clip(lower=0)
    return [low.to_numpy(), high.to_numpy()]


def _sorted_levels(values: pd.Series) -> list:
    from trainables.trial import Freeze

    levels = list(values.dropna().unique())
    try:
        return sorted(levels, key=lambda v: Freeze.from_label(str(v)).sort_key())
    except ValueError:
        return sorted(levels, key=str)


def magnitude_figure(configs: pd.DataFrame, metric: str, *, axis: str = "intervention.magnitude",
                     title: str = "") -> Any:
    """``metric`` against ``axis``, a line per paradigm with its 95 % interval over seeds as error bars; a
    panel per freezing depth (rows) and finetuning size (columns). ``configs`` is ``query.aggregate_seeds``."""
    # A sweep older than the finetune_size axis has the column with no values: one panel, not zero.
    depths = (_sorted_levels(configs["freeze_depth"]) if "freeze_depth" in configs else []) or [None]
    sizes = (sorted(configs["finetune.size"].dropna().unique()) if "finetune.size" in configs else []) or [None]
    fig, axes = _panels(len(depths), len(sizes))
    for r, depth in enumerate(depths):
        for c, size in enumerate(sizes):
            ax = axes[r][c]
            part = configs
            if depth is not None:
                part = part[part["freeze_depth"] == depth]
            if size is not None:
                part = part[part["finetune.size"] == size]
            for paradigm, line in part.groupby("paradigm", sort=True):
                line = line.sort_values(axis)
                ax.errorbar(line[axis], line[metric], yerr=_yerr(line, metric), marker="o", ms=4, capsize=2,
                            elinewidth=0.8, label=str(paradigm))
            ax.set_title(", ".join(t for t in (f"freeze {depth}" if depth is not None else "",
                                                f"finetuning size {size:g}" if size is not None else "") if t),
                         fontsize=9)
            ax.set_xlabel(axis)
            ax.grid(alpha=0.3)
        axes[r][0].set_ylabel(metric)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or f"{metric} vs {axis} per base (mean over seeds, 95 % interval)", fontsize=10)
    return fig


def inheritance_figure(table: pd.DataFrame, *, metric: str = "", title: str = "") -> Any:
    """Paper A's size moderator: inheritance (biased base − control base, paired by seed; ``query.inheritance``)
    against the finetuning size, a line per intervention magnitude with 95 % error bars; a panel per
    freezing depth (rows) and control base (columns)."""
    from matplotlib import colormaps

    depths = _sorted_levels(table["freeze_depth"]) if "freeze_depth" in table else [None]
    controls = sorted(table["control"].unique())
    fig, axes = _panels(len(depths), len(controls))
    magnitudes = sorted(table["intervention.magnitude"].dropna().unique()) if "intervention.magnitude" in table else [None]
    colours = colormaps["viridis"]
    for r, depth in enumerate(depths):
        for c, control in enumerate(controls):
            ax = axes[r][c]
            part = table[table["control"] == control]
            if depth is not None:
                part = part[part["freeze_depth"] == depth]
            for i, magnitude in enumerate(magnitudes):
                line = part if magnitude is None else part[part["intervention.magnitude"] == magnitude]
                line = line.sort_values("finetune.size")
                ax.errorbar(line["finetune.size"], line["inheritance"], yerr=_yerr(line, "inheritance"), marker="o",
                            ms=4, capsize=2, elinewidth=0.8, color=colours(i / max(1, len(magnitudes) - 1)),
                            label="" if magnitude is None else f"magnitude {magnitude:g}")
            ax.axhline(0.0, color="black", lw=0.8)
            ax.set_xscale("log", base=2)
            sizes = sorted(table["finetune.size"].dropna().unique())
            ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
            ax.minorticks_off()
            ax.set_title(f"biased − {control}" + (f", freeze {depth}" if depth is not None else ""), fontsize=9)
            ax.set_xlabel("finetuning size")
            ax.grid(alpha=0.3)
        axes[r][0].set_ylabel(f"inheritance ({metric})" if metric else "inheritance")
    if magnitudes != [None]:
        axes[0][-1].legend(fontsize=7)
    fig.suptitle(title or "inheritance: the biased base's unfairness minus a control's, vs finetuning size "
                 "(paired by seed, 95 % interval)", fontsize=10)
    return fig
