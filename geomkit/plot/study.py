"""Figures of a study (``geomkit sweep``): the Pareto front and matched forgetting.

See docs/study.md#outputs. Both read the study's tables (:mod:`geomkit.study.report`), not
the geometry stores.

* :func:`pareto` - forget accuracy (lower is better) against retain accuracy at every
  evaluation of every learning rate and length, averaged over seeds; the non-dominated points of
  each strategy are joined into its front, with a band of the 95% t-interval of the retain
  accuracy over seeds.
* :func:`matched_forgetting` - each strategy's metric at the forget-accuracy targets, at its
  cross-fitted learning rate, with 95% bootstrap intervals and the number of censored runs.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from geomkit._validation import invalid
from geomkit.plot.style import (
    DOUBLE_COLUMN,
    SINGLE_COLUMN,
    PlotResult,
    figure_legend,
    new_figure,
    strategy_style,
)
from geomkit.study.compare import t_interval

__all__ = ["front", "matched_forgetting", "pareto"]


def _require(frame: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing or frame.empty:
        raise invalid(what, f"a table with columns {list(frame.columns)}", f"rows with {columns}")


def front(points: pd.DataFrame, x: str = "forget_acc", y: str = "retain_acc") -> pd.DataFrame:
    """The points not dominated (no other has lower-or-equal ``x`` and higher ``y``), by ``x``.

    >>> pts = pd.DataFrame({"forget_acc": [0.1, 0.2, 0.3, 0.15],
    ...                     "retain_acc": [0.5, 0.9, 0.8, 0.4]})
    >>> front(pts)["forget_acc"].tolist()
    [0.1, 0.2]
    """
    ordered = points.sort_values([x, y], ascending=[True, False])
    keep, best = [], -math.inf
    for index, value in zip(ordered.index, ordered[y], strict=True):
        if value > best:
            keep.append(index)
            best = value
    return ordered.loc[keep]


def pareto(runs: pd.DataFrame, metric: str = "retain_acc") -> PlotResult:
    """One panel per objective: each strategy's front of forget accuracy against ``metric``.

    Parameters
    ----------
    runs : DataFrame
        ``runs.csv``: ``objective, strategy, lr, steps, seed, step, forget_acc`` and ``metric``.
    """
    _require(runs, ("objective", "strategy", "lr", "steps", "step", "forget_acc", metric), "runs")
    objectives = list(dict.fromkeys(runs["objective"]))
    width = SINGLE_COLUMN if len(objectives) == 1 else DOUBLE_COLUMN
    fig, axes = new_figure(1, len(objectives), figsize=(width, 2.6), sharey=True)
    artists = {}
    for ax, objective in zip(axes[0], objectives, strict=True):
        data = runs[runs["objective"] == objective]
        for strategy in dict.fromkeys(data["strategy"]):
            rows = data[data["strategy"] == strategy]
            points = []
            for _, group in rows.groupby(["lr", "steps", "step"]):
                low, high = t_interval(group[metric].to_numpy(float))
                points.append(
                    {
                        "forget_acc": group["forget_acc"].mean(),
                        metric: group[metric].mean(),
                        "low": low,
                        "high": high,
                    }
                )
            best = front(pd.DataFrame(points), "forget_acc", metric)
            style = strategy_style(strategy)
            x = best["forget_acc"].to_numpy(float)
            (line,) = ax.plot(
                x,
                best[metric],
                drawstyle="steps-post",
                color=style.color,
                marker=style.marker,
                markersize=3.5,
                label=style.label,
            )
            low, high = best["low"].clip(0, 1), best["high"].clip(0, 1)  # accuracies
            ax.fill_between(x, low, high, step="post", color=style.color, alpha=0.15, lw=0)
            artists[(objective, strategy)] = line
        ax.set_title(objective)
        ax.set_xlabel("forget accuracy (lower: more forgotten)")
        ax.set_xlim(-0.02, 1.02)
    axes[0][0].set_ylabel(metric.replace("_acc", " accuracy").replace("_", " "))
    legend = figure_legend(fig, list(axes[0]))
    return PlotResult(fig, list(axes[0]), artists, {"legend": legend})


def matched_forgetting(
    table: pd.DataFrame, metrics: tuple[str, ...] = ("retain_acc", "general_acc")
) -> PlotResult:
    """Each strategy's metrics at the forget-accuracy targets (``strategies.csv``).

    One column of panels per objective, one row per metric; points are the mean over the runs
    that reached the target, bars the 95% bootstrap interval, and ``c=k/n`` at a panel's foot
    marks k of n runs censored (they never reached the target).
    """
    metrics = tuple(m for m in metrics if m in table.columns)
    _require(table, ("objective", "target", "strategy", "seeds", "censored", *metrics), "table")
    objectives = list(dict.fromkeys(table["objective"]))
    width = SINGLE_COLUMN if len(objectives) == 1 else DOUBLE_COLUMN
    fig, axes = new_figure(
        len(metrics),
        len(objectives),
        figsize=(width, 1.9 * len(metrics) + 0.5),
        sharex=True,
        sharey="row",
    )
    strategies = list(dict.fromkeys(table["strategy"]))
    offsets = dict(zip(strategies, np.linspace(-0.012, 0.012, len(strategies)), strict=True))
    artists = {}
    for column, objective in enumerate(objectives):
        data = table[table["objective"] == objective]
        for row, metric in enumerate(metrics):
            ax = axes[row][column]
            for strategy in strategies:
                rows = data[data["strategy"] == strategy].sort_values("target")
                if rows.empty:
                    continue
                style = strategy_style(strategy)
                x = rows["target"].to_numpy(float) + offsets[strategy]
                y = rows[metric].to_numpy(float)
                error = np.abs(np.vstack([y - rows[f"{metric}_low"], rows[f"{metric}_high"] - y]))
                artists[(objective, metric, strategy)] = ax.errorbar(
                    x,
                    y,
                    yerr=np.nan_to_num(error),
                    color=style.color,
                    marker=style.marker,
                    markersize=3.5,
                    capsize=2,
                    lw=0.8,
                    label=style.label,
                )
                for xi, censored, runs in zip(x, rows["censored"], rows["seeds"], strict=True):
                    if censored:  # at the panel's foot: censored runs have no value to plot at
                        level = 0.03 + 0.08 * strategies.index(strategy)
                        ax.annotate(
                            f"c={int(censored)}/{int(runs)}",
                            (xi, level),
                            xycoords=("data", "axes fraction"),
                            ha="center",
                            fontsize=7,
                            color=style.color,
                        )
            if row == 0:
                ax.set_title(objective)
            if column == 0:
                ax.set_ylabel(metric.replace("_acc", " accuracy").replace("_", " "))
            if row == len(metrics) - 1:
                ax.set_xlabel("forget accuracy matched")
    targets = table["target"].to_numpy(float)  # every target, censored ones too
    pad = 0.05 * max(targets.max() - targets.min(), 0.2)
    axes[0][0].set_xlim(targets.max() + pad, targets.min() - pad)  # more forgetting: right
    legend = figure_legend(fig, [ax for line in axes for ax in line])
    return PlotResult(fig, [ax for line in axes for ax in line], artists, {"legend": legend})
