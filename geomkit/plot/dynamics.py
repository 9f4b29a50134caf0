"""Loss dynamics per strategy, after Fig. 1 (a, b) of the SAGO paper (Xiao et al., ACL 2026,
arXiv 2604.14808): retain and forget loss over optimizer steps, one line per method, seeds
averaged with a spread band."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import xarray as xr
from matplotlib.axes import Axes

from geomkit._validation import check_choice
from geomkit.plot._data import Source, require
from geomkit.plot._methods import group_methods, method_label, objective_linestyle
from geomkit.plot.style import (
    PlotResult,
    axis_label,
    outside_legend,
    resolve_axes,
    strategy_style,
)
from geomkit.runs import load

__all__ = ["loss_dynamics", "seed_statistics"]

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


def loss_dynamics(
    source: Source,
    variables: Sequence[str] = ("retain_loss", "forget_loss"),
    *,
    band: str | None = "sd",
    ax: Axes | Sequence[Axes] | None = None,
    legend: bool = True,
) -> PlotResult:
    """Retain and forget loss over optimizer steps, one line per method (Fig. 1 a, b).

    Runs are grouped by objective and applied strategy; seeds of a method are averaged (line)
    with a band (standard deviation across seeds, or min-max).

    Parameters
    ----------
    source : Dataset or list of Datasets
        Runs stacked along ``run`` (:func:`geomkit.open_runs`), or a list of runs.
    variables : sequence of str
        One panel per step variable (default retain loss, then forget loss as in Fig. 1).
    band : {"sd", "range", None}
        Spread across seeds; nothing is drawn for a single seed.
    ax : Axes or sequence of Axes, optional
        One per variable.
    legend : bool

    Returns
    -------
    PlotResult
        ``artists[(variable, (objective, strategy))]`` is the mean Line2D;
        ``extras["bands"]`` holds the band collections under the same keys.
    """
    runs = load(source)
    for run in runs:
        require(run, variables, "loss_dynamics")
    methods = group_methods(runs)
    objectives = sorted({m[0] for m in methods})
    fig, axes = resolve_axes(ax, len(variables), sharex=True, panel_size=(3.4, 2.6))
    artists, bands = {}, {}
    for i, (panel, variable) in enumerate(zip(axes, variables, strict=True)):
        drawn = False
        for method, members in methods.items():
            arrays = [r.ds[variable] for r in members]
            x, mean, lower, upper = seed_statistics(arrays, "step", band)
            style = strategy_style(method[1])
            (line,) = panel.plot(
                x,
                mean,
                color=style.color,
                marker=style.marker,
                markevery=max(1, len(x) // 10),
                markersize=6 if style.marker == "*" else 4,
                linestyle=objective_linestyle(method[0], objectives),
                label=method_label(method, len(objectives) > 1, len(members)),
            )
            artists[(variable, method)] = line
            drawn = drawn or bool(np.isfinite(mean).any())
            if band is not None and len(members) > 1:
                bands[(variable, method)] = panel.fill_between(
                    x, lower, upper, color=style.color, alpha=0.2, linewidth=0
                )
        if not drawn:
            panel.text(0.5, 0.5, f"no {variable} values", transform=panel.transAxes, ha="center")
        first = runs[0].ds
        panel.set_xlabel(axis_label(first["step"], "optimizer step"))
        panel.set_ylabel(axis_label(first[variable], variable))
        panel.set_title(f"({chr(ord('a') + i)}) {first[variable].attrs.get('long_name', variable)}")
    extras = {"bands": bands, "legend": outside_legend(axes[-1]) if legend else None}
    return PlotResult(fig, axes, artists, extras)
