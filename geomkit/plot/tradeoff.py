"""Forget-retain trade-off across runs, after Fig. 3 of the SAGO paper (Xiao et al., ACL 2026,
arXiv 2604.14808): final forget accuracy (lower is better) against retained accuracy, one marker
per method, dashed arrows from the plain sum to its PCGrad and SAGO variants, and a dashed line
for the target model (evaluation 0, before unlearning)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from geomkit.plot._data import EVALUATIONS, Run, Source, require
from geomkit.plot._methods import group_methods, method_label, objective_linestyle
from geomkit.plot.dynamics import seed_statistics
from geomkit.plot.style import (
    MissingVariable,
    PlotResult,
    PlotSkipped,
    axis_label,
    objective_color,
    outside_legend,
    resolve_axes,
    strategy_style,
)
from geomkit.runs import load

__all__ = ["final_evaluation", "tradeoff", "tradeoff_trajectories"]


def _evaluated(runs: list[Run], variables: tuple[str, ...], figure: str):
    """Runs with evaluation data for both variables; raises when there are none."""
    usable, errors = [], []
    for run in runs:
        try:
            require(run, variables, figure)
        except PlotSkipped as error:
            errors.append(error)
            continue
        usable.append(run)
    reasons = [str(e) for e in errors]
    if not usable:
        message = "; ".join(reasons[:3])
        if len(reasons) > 3:
            message += f" (and {len(reasons) - 3} more runs)"
        names = {getattr(e, "variable", None) for e in errors}
        if len(names) == 1 and None not in names:
            raise MissingVariable(names.pop(), message)
        raise PlotSkipped(message)
    return usable, reasons


def _final(run: Run, variables: tuple[str, ...]) -> dict[str, float] | None:
    """Values of ``variables`` at the run's last evaluation after step 0 where all are finite
    (``"evaluation"``: its step count); None when the run was not evaluated after step 0."""
    table = xr.Dataset({v: run.ds[v] for v in variables})
    table = table.sel(evaluation=table["evaluation"] > 0)
    finite = np.all([np.isfinite(table[v].values) for v in variables], axis=0)
    if not np.any(finite):
        return None
    last = int(np.flatnonzero(finite)[-1])
    row = {v: float(table[v].values[last]) for v in variables}
    row["evaluation"] = int(table["evaluation"].values[last])
    return row


def final_evaluation(
    source: Source, variables: Sequence[str] = EVALUATIONS, *, target: bool = True
) -> pd.DataFrame:
    """The final evaluation of every run (and the target model), one row each.

    Parameters
    ----------
    source : Dataset or list of Datasets
        Runs with the evaluation variables (dim ``evaluation``).
    variables : sequence of str
        Evaluation variables; default those of the embedded benchmark that are present.
    target : bool
        Add a first row ``run="target"`` with the mean over runs at evaluation 0 (the model
        before unlearning).

    Returns
    -------
    pandas.DataFrame
        Columns ``run``, ``objective``, ``strategy`` (``"none"`` for forget-only runs), ``seed``,
        ``evaluation`` (optimizer steps completed at the last evaluation where every variable is
        finite; NaN when a run was not evaluated after step 0) and one column per variable.
    """
    runs = load(source)
    wanted = tuple(variables)
    if wanted == EVALUATIONS:
        wanted = tuple(v for v in EVALUATIONS if any(v in r.ds for r in runs)) or EVALUATIONS
    runs, _ = _evaluated(runs, wanted, "final_evaluation")
    rows = []
    for run in runs:
        final = _final(run, wanted) or {v: np.nan for v in (*wanted, "evaluation")}
        objective, strategy = run.method
        rows.append(
            {"run": run.label, "objective": objective, "strategy": strategy, "seed": run.seed}
            | final
        )
    if target:
        rows.insert(
            0,
            {"run": "target", "objective": "", "strategy": "", "seed": None, "evaluation": 0}
            | {v: _target(runs, v) for v in wanted},
        )
    return pd.DataFrame(
        rows, columns=["run", "objective", "strategy", "seed", "evaluation", *wanted]
    )


def _target(runs: list[Run], variable: str) -> float:
    values = []
    for run in runs:
        if 0 in run.ds["evaluation"].values:
            values.append(float(run.ds[variable].sel(evaluation=0)))
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _target_line(ax: Axes, runs: list[Run], variable: str) -> Line2D | None:
    """The dashed line of the target model's ``variable`` (evaluation 0), if it was evaluated."""
    level = _target(runs, variable)
    if not np.isfinite(level):
        return None
    return ax.axhline(level, color="0.3", linestyle="--", linewidth=0.9, label="target", zorder=1)


def _better_label(da: xr.DataArray, fallback: str, lower: bool) -> str:
    return f"final {axis_label(da, fallback)} ({'lower' if lower else 'higher'} is better)"


def tradeoff(
    source: Source,
    *,
    x: str = "forget_acc",
    y: str = "retain_acc",
    arrows: bool = True,
    target: bool = True,
    ax: Axes | None = None,
    legend: bool = True,
) -> PlotResult:
    """Final forget accuracy against final retained accuracy, one marker per method (Fig. 3).

    Markers: square = sum, triangle = PCGrad, star = SAGO, circle = forget-only; colours per
    objective when several are shown (as in Fig. 3), else per strategy. Seeds of a method give
    the mean position with standard-deviation error bars.

    Parameters
    ----------
    source : Dataset or list of Datasets
        Runs with the evaluation variables (dim ``evaluation``, 0 = the target model).
    x, y : str
        Evaluation variables; ``y`` e.g. ``"retain_acc"`` or ``"general_acc"``.
    arrows : bool
        Dashed arrows from each objective's ``sum`` run to its other strategies.
    target : bool
        Dashed horizontal line at the target model's ``y`` (evaluation 0).
    ax : Axes, optional
    legend : bool

    Returns
    -------
    PlotResult
        ``artists[(objective, strategy)]`` is the errorbar container;
        ``extras["points"][(objective, strategy)]`` the plotted ``(x, y)``;
        ``extras["arrows"][(objective, from, to)]`` the arrow Annotations;
        ``extras["target"]`` the target line (or None); ``extras["skipped"]`` the reasons runs
        without evaluations were left out.
    """
    runs, skipped = _evaluated(load(source), (x, y), "tradeoff")
    finals: dict[tuple[str, str], list[dict[str, float]]] = {}
    for method, members in group_methods(runs).items():
        rows = [row for r in members if (row := _final(r, (x, y))) is not None]
        if rows:
            finals[method] = rows
    if not finals:
        raise PlotSkipped(f"tradeoff: no run was evaluated after step 0 ({x!r}, {y!r})")
    objectives = {m[0] for m in finals}
    fig, (ax,) = resolve_axes(ax, 1, panel_size=(5.2, 3.6))
    artists, points = {}, {}
    for method, rows in finals.items():
        xs = np.array([row[x] for row in rows])
        ys = np.array([row[y] for row in rows])
        spread = len(rows) > 1
        style = strategy_style(method[1])
        color = objective_color(method[0]) if len(objectives) > 1 else style.color
        container = ax.errorbar(
            xs.mean(),
            ys.mean(),
            xerr=xs.std(ddof=1) if spread else None,
            yerr=ys.std(ddof=1) if spread else None,
            fmt=style.marker,
            color=color,
            markersize=10 if style.marker == "*" else 7,
            markeredgecolor="white",
            markeredgewidth=0.5,
            capsize=2,
            elinewidth=0.8,
            label=method_label(method, len(objectives) > 1, len(rows)),
            zorder=3,
        )
        artists[method] = container
        points[method] = (float(xs.mean()), float(ys.mean()))
    arrow_artists = {}
    if arrows:
        for (objective, strategy), end in points.items():
            start = points.get((objective, "sum"))
            if start is None or strategy in ("sum", "none"):
                continue
            arrow_artists[(objective, "sum", strategy)] = ax.annotate(
                "",
                xy=end,
                xytext=start,
                arrowprops={
                    "arrowstyle": "-|>",
                    "linestyle": "--",
                    "color": objective_color(objective) if len(objectives) > 1 else "0.35",
                    "linewidth": 0.8,
                    "shrinkA": 5,
                    "shrinkB": 6,
                },
                zorder=2,
            )
    target_line = _target_line(ax, runs, y) if target else None
    first = runs[0].ds
    if len(objectives) == 1:
        ax.set_title(next(iter(objectives)), fontsize="medium")
    ax.set_xlabel(_better_label(first[x], x, lower=True))
    ax.set_ylabel(_better_label(first[y], y, lower=False))
    extras = {
        "points": points,
        "arrows": arrow_artists,
        "target": target_line,
        "skipped": skipped,
        "legend": outside_legend(ax) if legend else None,
    }
    return PlotResult(fig, [ax], artists, extras)


def tradeoff_trajectories(
    source: Source,
    *,
    x: str = "forget_acc",
    y: str = "retain_acc",
    target: bool = True,
    ax: Axes | None = None,
    legend: bool = True,
) -> PlotResult:
    """The path of each method through the trade-off plane over evaluations.

    Each line starts at the target model (evaluation 0) and visits the seed-mean of every
    later evaluation; the final point carries the method's marker.

    Returns
    -------
    PlotResult
        ``artists[(objective, strategy)]`` is the path Line2D (marker at its final point);
        ``extras["target"]`` the target line.
    """
    runs, skipped = _evaluated(load(source), (x, y), "tradeoff_trajectories")
    methods = group_methods(runs)
    objectives = sorted({m[0] for m in methods})
    fig, (ax,) = resolve_axes(ax, 1, panel_size=(5.2, 3.6))
    artists = {}
    for method, members in methods.items():
        _, mx, _, _ = seed_statistics([r.ds[x] for r in members], "evaluation", None)
        _, my, _, _ = seed_statistics([r.ds[y] for r in members], "evaluation", None)
        keep = np.isfinite(mx) & np.isfinite(my)
        if not keep.any():
            continue
        mx, my = mx[keep], my[keep]
        style = strategy_style(method[1])
        color = objective_color(method[0]) if len(objectives) > 1 else style.color
        (line,) = ax.plot(
            mx,
            my,
            color=color,
            linestyle=objective_linestyle(method[0], objectives),
            marker=style.marker,
            markevery=[len(mx) - 1],  # the method's marker at the final evaluation
            markersize=10 if style.marker == "*" else 7,
            markeredgecolor="white",
            markeredgewidth=0.5,
            linewidth=1.1,
            label=method_label(method, len(objectives) > 1, len(members)),
        )
        artists[method] = line
    if not artists:
        raise PlotSkipped(f"tradeoff_trajectories: no finite evaluations of {x!r} and {y!r}")
    target_line = _target_line(ax, runs, y) if target else None
    first = runs[0].ds
    ax.set_xlabel(axis_label(first[x], x) + " (lower is better)")
    ax.set_ylabel(axis_label(first[y], y) + " (higher is better)")
    extras = {
        "target": target_line,
        "skipped": skipped,
        "legend": outside_legend(ax) if legend else None,
    }
    return PlotResult(fig, [ax], artists, extras)
