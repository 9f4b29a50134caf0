"""Forget-retain trade-off across runs, after Fig. 3 of the SAGO paper (Xiao et al., ACL 2026,
arXiv 2604.14808): forget accuracy (lower is better) against retained accuracy, one marker per
strategy and one panel per objective, grey arrows from the plain sum to its PCGrad and SAGO
variants, and a dashed line for the target model (evaluation 0, before unlearning)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from geomkit._validation import check_choice, check_real, invalid
from geomkit.plot._data import EVALUATIONS, Run, Source, require
from geomkit.plot._methods import group_methods
from geomkit.plot.dynamics import seed_statistics
from geomkit.plot.style import (
    MissingVariable,
    PlotResult,
    PlotSkipped,
    axis_label,
    figure_legend,
    resolve_axes,
    strategy_style,
)
from geomkit.runs import load

__all__ = ["ARROW_PROPS", "final_evaluation", "tradeoff", "tradeoff_trajectories"]

ARROW_PROPS: dict = {
    "arrowstyle": "->",
    "linestyle": "--",
    "color": "0.55",
    "linewidth": 0.7,
    "shrinkA": 6,
    "shrinkB": 8,
}
"""How the trade-off's arrows from ``sum`` are drawn: grey, dashed, an open head (never a
filled triangle in a strategy colour, which would read as a PCGrad marker)."""


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
    return ax.axhline(
        level, color="0.5", linestyle="--", linewidth=0.9, label="target model", zorder=1
    )


def _better_label(da: xr.DataArray, fallback: str, lower: bool, at: str = "final") -> str:
    when = "final" if at == "final" else "matched-forgetting"
    return f"{when} {axis_label(da, fallback)} ({'lower' if lower else 'higher'} is better)"


def _learning_rates(runs: list[Run]) -> str:
    """``"lr 0.001"`` when the runs share one recorded peak learning rate, else what differs."""
    rates = {run.ds.attrs.get("learning_rate_peak") for run in runs}
    if None in rates:
        return "learning rate not recorded"
    if len(rates) == 1:
        return f"lr {float(rates.pop()):g}"
    return "learning rates differ: " + ", ".join(f"{float(r):g}" for r in sorted(rates))


def _matched(run: Run, x: str, y: str, threshold: float) -> dict[str, float] | None:
    """``x`` and ``y`` at the first evaluation after step 0 where forgetting reached
    ``threshold`` (:func:`geomkit.bench.evaluate.matched_forgetting`); None if it never did."""
    from geomkit.bench.evaluate import matched_forgetting

    names = tuple(dict.fromkeys(("forget_acc", "retain_acc", "general_acc", x, y)))
    table = xr.Dataset({v: run.ds[v] for v in names if v in run.ds})
    table = table.sel(evaluation=table["evaluation"] > 0)
    history = [
        (int(step), {v: float(table[v].values[i]) for v in table.data_vars})
        for i, step in enumerate(table["evaluation"].values)
        if all(np.isfinite(float(table[v].values[i])) for v in table.data_vars)
    ]
    hit = matched_forgetting(history, threshold)
    if hit is None:
        return None
    at = dict(history)[hit["step"]]
    return {x: at[x], y: at[y], "evaluation": hit["step"]}


def _facets(
    ax: Axes | Sequence[Axes] | None, objectives: list[str]
) -> tuple[Figure, list[Axes], bool]:
    """One panel per objective (shared axes in a new figure); True when the figure is new."""
    # Room below for the legend and above for the description.
    fig, axes = resolve_axes(
        ax, len(objectives), panel_size=(3.0, 2.6), height=3.4, sharex=True, sharey=True
    )
    return fig, axes, ax is None


def _describe(fig: Figure, axes: list[Axes], text: str, new: bool) -> None:
    """What the points are: the figure's title, or a line under the first panel's title."""
    text = textwrap.fill(text, int(16 * fig.get_figwidth()))  # ~16 characters per inch at 8 pt
    if new:
        fig.suptitle(text)
    else:
        title = axes[0].get_title()
        axes[0].set_title(f"{title}\n{text}" if title else text)


def tradeoff(
    source: Source,
    *,
    x: str = "forget_acc",
    y: str = "retain_acc",
    at: str = "final",
    threshold: float = 0.1,
    arrows: bool = True,
    target: bool = True,
    ax: Axes | Sequence[Axes] | None = None,
    legend: bool = True,
) -> PlotResult:
    """Forget accuracy against retained accuracy, one marker per strategy and one panel per
    objective (Fig. 3).

    Markers and colours are the strategy's (:func:`~geomkit.plot.style.strategy_style`); the
    objective goes to the panel. Seeds of a method give the mean position with
    standard-deviation error bars. The figure says what the points are: the final evaluation
    of runs trained for the same steps at the learning rate of the panel (``at="final"``), or
    the first evaluation where forget accuracy reached ``threshold`` (``at="matched"``,
    :func:`geomkit.bench.evaluate.matched_forgetting`), which compares retained accuracy at
    equal forgetting.

    Parameters
    ----------
    source : Dataset or list of Datasets
        Runs with the evaluation variables (dim ``evaluation``, 0 = the target model).
    x, y : str
        Evaluation variables; ``y`` e.g. ``"retain_acc"`` or ``"general_acc"``. With
        ``at="matched"``, ``x`` must be ``"forget_acc"``.
    at : {"final", "matched"}
        Which evaluation of each run is plotted.
    threshold : float
        Forget accuracy that counts as forgotten for ``at="matched"``; runs that never reach
        it are left out (and counted in the figure's title).
    arrows : bool
        Grey dashed arrows with open heads from each objective's ``sum`` to its other
        strategies.
    target : bool
        Dashed horizontal line at the target model's ``y`` (evaluation 0).
    ax : Axes or sequence of Axes, optional
        One per objective (sorted).
    legend : bool

    Returns
    -------
    PlotResult
        ``artists[(objective, strategy)]`` is the errorbar container;
        ``extras["points"][(objective, strategy)]`` the plotted ``(x, y)``;
        ``extras["arrows"][(objective, from, to)]`` the arrow Annotations;
        ``extras["target"]`` the target line of the first panel (or None);
        ``extras["description"]`` what the points are; ``extras["skipped"]`` the reasons runs
        were left out; ``extras["panels"][objective]`` the Axes.
    """
    check_choice("at", at, ("final", "matched"), owner="tradeoff")
    if at == "matched" and x != "forget_acc":
        raise invalid("x", x, "'forget_acc' with at='matched' (forgetting is matched on it)")
    check_real("threshold", threshold, 0.0, 1.0, owner="tradeoff")
    needed = (x, y) if at == "final" else ("forget_acc", "retain_acc", "general_acc")
    runs, skipped = _evaluated(load(source), tuple(dict.fromkeys((*needed, x, y))), "tradeoff")
    finals: dict[tuple[str, str], list[dict[str, float]]] = {}
    missed = 0
    for method, members in group_methods(runs).items():
        rows = []
        for member in members:
            row = _final(member, (x, y)) if at == "final" else _matched(member, x, y, threshold)
            if row is None:
                missed += at == "matched"
                continue
            rows.append(row)
        if rows:
            finals[method] = rows
    if not finals:
        if at == "matched":
            raise PlotSkipped(f"tradeoff: no run reached forget accuracy <= {threshold:g}")
        raise PlotSkipped(f"tradeoff: no run was evaluated after step 0 ({x!r}, {y!r})")
    objectives = sorted({m[0] for m in finals})
    fig, axes, new = _facets(ax, objectives)
    panels = dict(zip(objectives, axes, strict=True))
    artists, points = {}, {}
    for method, rows in finals.items():
        panel = panels[method[0]]
        xs = np.array([row[x] for row in rows])
        ys = np.array([row[y] for row in rows])
        spread = len(rows) > 1
        style = strategy_style(method[1])
        container = panel.errorbar(
            xs.mean(),
            ys.mean(),
            xerr=xs.std(ddof=1) if spread else None,
            yerr=ys.std(ddof=1) if spread else None,
            fmt=style.marker,
            color=style.color,
            markersize=10 if style.marker == "*" else 7,
            markeredgecolor="white",
            markeredgewidth=0.5,
            capsize=2,
            elinewidth=0.8,
            label=style.label,
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
            # An open, grey head: a filled triangle in a strategy colour reads as a marker.
            arrow_artists[(objective, "sum", strategy)] = panels[objective].annotate(
                "",
                xy=end,
                xytext=start,
                arrowprops=ARROW_PROPS,
                zorder=2,
            )
    lines = {}
    for objective, panel in panels.items():
        members = [r for r in runs if r.method[0] == objective]
        lines[objective] = _target_line(panel, members, y) if target else None
        steps = sorted(
            {
                int(row["evaluation"])
                for m, rows in finals.items()
                for row in rows
                if m[0] == objective
            }
        )
        where = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
        panel.set_title(f"{objective} ({_learning_rates(members)}, {where})")
        panel.set_xlabel(_better_label(runs[0].ds[x], x, lower=True, at=at))
    axes[0].set_ylabel(textwrap.fill(_better_label(runs[0].ds[y], y, lower=False, at=at), 34))
    counts = sorted({len(rows) for rows in finals.values()})
    n_seeds = "/".join(str(n) for n in counts)
    seeds = f"mean ± sd of {n_seeds} seeds" if counts != [1] else "one seed each"
    if at == "final":
        text = "final evaluation: equal steps and learning rate within a panel; " + seeds
    else:
        text = (
            f"at matched forgetting: first evaluation with forget QA accuracy <= {threshold:g}; "
            + seeds
        )
        if missed:
            text += f"; {missed} run(s) never reached it (left out)"
    _describe(fig, axes, text, new)
    extras = {
        "points": points,
        "arrows": arrow_artists,
        "target": lines[objectives[0]],
        "description": text,
        "skipped": skipped,
        "panels": panels,
        "legend": figure_legend(fig, axes) if legend else None,
    }
    return PlotResult(fig, axes, artists, extras)


def tradeoff_trajectories(
    source: Source,
    *,
    x: str = "forget_acc",
    y: str = "retain_acc",
    target: bool = True,
    ax: Axes | Sequence[Axes] | None = None,
    legend: bool = True,
) -> PlotResult:
    """The path of each strategy through the trade-off plane over evaluations, one panel per
    objective.

    Each line starts at the target model (evaluation 0) and visits the seed-mean of every
    later evaluation; the final point carries the strategy's marker.

    Returns
    -------
    PlotResult
        ``artists[(objective, strategy)]`` is the path Line2D (marker at its final point);
        ``extras["target"]`` the target line of the first panel; ``extras["panels"]``.
    """
    runs, skipped = _evaluated(load(source), (x, y), "tradeoff_trajectories")
    methods = group_methods(runs)
    objectives = sorted({m[0] for m in methods})
    fig, axes, new = _facets(ax, objectives)
    panels = dict(zip(objectives, axes, strict=True))
    artists = {}
    for method, members in methods.items():
        _, mx, _, _ = seed_statistics([r.ds[x] for r in members], "evaluation", None)
        _, my, _, _ = seed_statistics([r.ds[y] for r in members], "evaluation", None)
        keep = np.isfinite(mx) & np.isfinite(my)
        if not keep.any():
            continue
        mx, my = mx[keep], my[keep]
        style = strategy_style(method[1])
        (line,) = panels[method[0]].plot(
            mx,
            my,
            color=style.color,
            marker=style.marker,
            markevery=[len(mx) - 1],  # the strategy's marker at the final evaluation
            markersize=10 if style.marker == "*" else 7,
            markeredgecolor="white",
            markeredgewidth=0.5,
            linewidth=1.1,
            label=style.label,
        )
        artists[method] = line
    if not artists:
        raise PlotSkipped(f"tradeoff_trajectories: no finite evaluations of {x!r} and {y!r}")
    lines = {}
    for objective, panel in panels.items():
        members = [r for r in runs if r.method[0] == objective]
        lines[objective] = _target_line(panel, members, y) if target else None
        panel.set_title(f"{objective} ({_learning_rates(members)})")
        panel.set_xlabel(axis_label(runs[0].ds[x], x) + " (lower is better)")
    axes[0].set_ylabel(textwrap.fill(axis_label(runs[0].ds[y], y) + " (higher is better)", 34))
    _describe(fig, axes, "path over evaluations from the target model; seed means", new)
    extras = {
        "target": lines[objectives[0]],
        "skipped": skipped,
        "panels": panels,
        "legend": figure_legend(fig, axes) if legend else None,
    }
    return PlotResult(fig, axes, artists, extras)
