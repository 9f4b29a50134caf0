"""Loss dynamics per strategy, after Fig. 1 (a, b) of the SAGO paper (Xiao et al., ACL 2026,
arXiv 2604.14808): retain loss and forget NLL over optimizer steps, one line per strategy, one
row of panels per objective, seeds averaged with a spread band."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from geomkit._validation import check_choice
from geomkit.plot._data import Source, require
from geomkit.plot._methods import group_methods
from geomkit.plot.style import (
    DOUBLE_COLUMN,
    PlotResult,
    axis_label,
    outside_legend,
    resolve_axes,
    strategy_style,
)
from geomkit.runs import load

__all__ = ["FORGET_NLL_OBJECTIVES", "loss_dynamics", "seed_statistics"]

_BANDS = ("sd", "range", None)


def seed_statistics(
    arrays: list[xr.DataArray], dim: str, band: str | None = "sd"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean over replicates aligned on ``dim`` (outer join), with the band's lower and upper
    edges (mean -/+ standard deviation, or min/max); returns ``(x, mean, lower, upper)``."""
    check_choice("band", band, _BANDS)
    stacked = xr.concat(
        [a.reset_coords(drop=True) for a in arrays], dim="replicate", join="outer"
    ).astype(np.float64)
    x = np.asarray(stacked[dim].values)
    values = np.asarray(stacked.transpose("replicate", dim).values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (padding) give NaN
        mean = np.nanmean(values, axis=0)
        if band == "sd":
            sd = np.nanstd(values, axis=0, ddof=1) if len(arrays) > 1 else np.zeros_like(mean)
            lower, upper = mean - sd, mean + sd
        elif band == "range":
            lower, upper = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
        else:
            lower = upper = mean
    return x, mean, lower, upper


FORGET_NLL_OBJECTIVES: tuple[str, ...] = ("ga", "graddiff")
"""Objectives whose forget loss is gradient ascent, L_f = -(mean token NLL)
(:class:`geomkit.objectives.GA`): for them the forget NLL is ``-forget_loss``."""


def _panel(run_ds: xr.Dataset, variable: str, objective: str, forget_nll: bool):
    """(sign applied to the values, y label, panel title) of ``variable`` for ``objective``."""
    da = run_ds[variable]
    name = da.attrs.get("long_name", variable)
    if variable == "forget_loss" and forget_nll and objective in FORGET_NLL_OBJECTIVES:
        return -1.0, "forget NLL (= -forget loss)\n(higher: more forgotten)", "forget NLL"
    if variable == "forget_loss":
        # Not an NLL: the objective's own forget loss, which minimisation lowers.
        return 1.0, f"{objective} forget loss L_f\n(not an NLL; lower: more forgotten)", name
    return 1.0, axis_label(da, variable), name


def loss_dynamics(
    source: Source,
    variables: Sequence[str] = ("retain_loss", "forget_loss"),
    *,
    band: str | None = "sd",
    forget_nll: bool = True,
    ax: Axes | Sequence[Axes] | None = None,
    legend: bool = True,
) -> PlotResult:
    """Retain loss and forget NLL over optimizer steps, one line per strategy and one row of
    panels per objective (Fig. 1 a, b).

    Runs are grouped by objective and applied strategy; seeds of a method are averaged (line)
    with a band (standard deviation across seeds, or min-max), named in the legend.
    Different objectives' forget losses are different quantities, so each objective has its own
    panels. The paper's Fig. 1(b) plots the forget NLL (positive, rising as the model forgets):
    for objectives whose forget loss is gradient ascent (:data:`FORGET_NLL_OBJECTIVES`) it is
    ``-forget_loss``; for other objectives (NPO, SimNPO, RMU) the NLL is not recorded and their
    own forget loss is drawn, labelled as such.

    Parameters
    ----------
    source : Dataset or list of Datasets
        Runs stacked along ``run`` (:func:`geomkit.open_runs`), or a list of runs.
    variables : sequence of str
        One panel per step variable and objective (default retain loss, then the forget loss
        as in Fig. 1).
    band : {"sd", "range", None}
        Spread across seeds; nothing is drawn for a single seed.
    forget_nll : bool
        Draw the forget NLL ``-forget_loss`` where the forget loss is gradient ascent (default);
        False draws ``forget_loss`` as recorded.
    ax : Axes or sequence of Axes, optional
        One per (objective, variable), objectives in sorted order, variables within.
    legend : bool

    Returns
    -------
    PlotResult
        ``artists[(variable, (objective, strategy))]`` is the mean Line2D (its y data as drawn,
        i.e. negated for a forget NLL); ``extras["bands"]`` holds the band collections under
        the same keys; ``extras["panels"][(objective, variable)]`` the Axes.
    """
    runs = load(source)
    for run in runs:
        require(run, variables, "loss_dynamics")
    methods = group_methods(runs)
    objectives = sorted({m[0] for m in methods})
    n = len(objectives) * len(variables)
    fig, axes = resolve_axes(
        ax,
        n,
        ncols=len(variables),
        sharex=True,
        panel_size=(2.6, 2.2),
        width=DOUBLE_COLUMN,
    )
    panels = {
        (objective, variable): axes[i * len(variables) + j]
        for i, objective in enumerate(objectives)
        for j, variable in enumerate(variables)
    }
    artists, bands = {}, {}
    for k, ((objective, variable), panel) in enumerate(panels.items()):
        members_of = {m: r for m, r in methods.items() if m[0] == objective}
        first = next(iter(members_of.values()))[0].ds
        sign, ylabel, title = _panel(first, variable, objective, forget_nll)
        drawn = False
        for method, members in members_of.items():
            arrays = [sign * r.ds[variable] for r in members]
            x, mean, lower, upper = seed_statistics(arrays, "step", band)
            style = strategy_style(method[1])
            (line,) = panel.plot(
                x,
                mean,
                color=style.color,
                marker=style.marker,
                markevery=max(1, len(x) // 10),
                markersize=6 if style.marker == "*" else 4,
                label=style.label,
            )
            artists[(variable, method)] = line
            drawn = drawn or bool(np.isfinite(mean).any())
            if band is not None and len(members) > 1:
                bands[(variable, method)] = panel.fill_between(
                    x, lower, upper, color=style.color, alpha=0.2, linewidth=0
                )
        if not drawn:
            panel.text(0.5, 0.5, f"no {variable} values", transform=panel.transAxes, ha="center")
        panel.set_xlabel(axis_label(first["step"], "optimizer step"))
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        panel.set_ylabel(ylabel)
        panel.set_title(f"({chr(ord('a') + k)}) {objective}: {title}")
    handles = None
    if legend:
        labels = {}
        for panel in axes:
            for handle, label in zip(*panel.get_legend_handles_labels(), strict=True):
                labels.setdefault(label, handle)
        if bands:
            what = {"sd": "mean ± 1 sd", "range": "mean, min to max"}[str(band)]
            spread = Patch(color="0.6", alpha=0.4, linewidth=0)
            labels[f"band: {what} over seeds"] = spread
        n_seeds = sorted({len(m) for m in methods.values()})
        seeds = "/".join(str(s) for s in n_seeds)
        handles = outside_legend(
            axes[len(variables) - 1],
            handles=list(labels.values()),
            labels=list(labels),
            title=f"line: mean of {seeds} seed{'s' if n_seeds != [1] else ''}",
        )
    extras = {"bands": bands, "legend": handles, "panels": panels}
    return PlotResult(fig, axes, artists, extras)
