"""Matplotlib figures of a sweep (headless: the Agg backend, no display needed)."""
from __future__ import annotations

from typing import Any

import pandas as pd

__all__ = ["pareto_figure"]


def pareto_figure(table: pd.DataFrame, performance: str, fairness: str, *, title: str = "") -> Any:
    """Every configuration coloured by paradigm; the front drawn as a line through its members."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    for paradigm, part in table.groupby("paradigm", sort=True):
        ax.scatter(part[fairness], part[performance], label=str(paradigm), alpha=0.75, s=28)
    front = table[table["on_front"]].sort_values(fairness)
    if not front.empty:
        ax.plot(front[fairness], front[performance], color="black", lw=1.2, marker="o", mfc="none", ms=9, label="Pareto front")
    ax.set_xlabel(f"{fairness} (unfairness)")
    ax.set_ylabel(performance)
    ax.set_title(title or "performance vs fairness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
