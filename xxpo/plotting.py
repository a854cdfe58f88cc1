"""One matplotlib style for every figure of the book: a mean curve per method with a band over seeds."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
STYLE = {
    "figure.figsize": (6.4, 3.6),
    "figure.dpi": 110,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
    "font.size": 10,
}


def seed_band(ax, runs: pd.DataFrame, metric: str, *, by: str = "method", x: str = "step", label_fmt: str = "{}",
              band: str = "minmax") -> None:
    """Plot the mean of ``metric`` over seeds against ``x`` for each value of ``by``, with a band.

    ``runs`` has one row per (``by``, seed, ``x``); rows where ``metric`` is NaN are skipped (e.g. steps
    without an evaluation). ``band``: ``"minmax"`` (range over seeds) or ``"std"`` (mean +- one std).
    """
    data = runs.dropna(subset=[metric])
    for i, (name, group) in enumerate(data.groupby(by, sort=False)):
        stats = group.groupby(x)[metric].agg(["mean", "std", "min", "max"]).reset_index()
        color = COLORS[i % len(COLORS)]
        ax.plot(stats[x], stats["mean"], color=color, label=label_fmt.format(name), lw=1.8)
        if band == "std":
            low, high = stats["mean"] - stats["std"].fillna(0), stats["mean"] + stats["std"].fillna(0)
        else:
            low, high = stats["min"], stats["max"]
        ax.fill_between(stats[x], low, high, color=color, alpha=0.18, lw=0)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)


def figure(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 3.6):
    """A figure in the house style."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, layout="constrained")
    for ax in axes.flat:
        for key, value in (("top", False), ("right", False)):
            ax.spines[key].set_visible(value)
        ax.grid(True, alpha=0.3)
    return fig, axes
