"""Alignment of the update with each gradient: cos(d, r) and cos(d, f) over steps and per layer.

The paper's geometry table (SAGO, Xiao et al., ACL 2026, arXiv 2604.14808, section 5.4) averages
these cosines over 100 steps; these figures show the curves behind the averages, for the applied
strategy (solid) and the shadow strategies evaluated on the same (f, r) pair (dashed).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib import MatplotlibDeprecationWarning
from matplotlib.axes import Axes
from matplotlib.legend import Legend
from matplotlib.ticker import MaxNLocator

from geomkit._deprecation import warn_renamed
from geomkit._validation import check_choice, invalid
from geomkit.plot._data import Run, Source, require_geometry, require_strategies, single_run
from geomkit.plot.style import (
    DOUBLE_COLUMN,
    PlotResult,
    axis_label,
    figure_legend,
    group_labels,
    layer_label,
    outside_legend,
    resolve_axes,
    strategy_style,
)

__all__ = ["alignment_by_layer", "alignment_distributions", "alignment_over_steps"]


def strategy_label(name: str, applied: str) -> str:
    """Display label of a strategy; shadow strategies are marked ``(shadow)``."""
    label = strategy_style(name).label
    return label if name == applied else f"{label} (shadow)"


def _strategies(run: Run, strategies: Sequence[str] | None, figure: str) -> list[str]:
    recorded = [str(s) for s in run.ds["strategy"].values]
    if strategies is None:
        return recorded
    require_strategies(run, strategies, figure)
    return list(strategies)


def _select_layer(metrics: xr.Dataset, layer: int, run: Run) -> xr.Dataset:
    layers = [int(v) for v in metrics["layer"].values]
    check_choice("layer", layer, layers, owner=f"run {run.label!r}")
    return metrics.sel(layer=layer)


def _draw_lines(
    ax: Axes, da: xr.DataArray, strategies: list[str], applied: str
) -> dict[str, object]:
    lines = {}
    x = np.asarray(da["record"].values)
    for name in strategies:
        style = strategy_style(name)
        shadow = name != applied
        (line,) = ax.plot(
            x,
            np.asarray(da.sel(strategy=name).values, dtype=np.float64),
            color=style.color,
            marker=style.marker,
            markevery=max(1, len(x) // 12),
            markersize=6 if style.marker == "*" else 4,
            linestyle="--" if shadow else "-",
            linewidth=1.0 if shadow else 1.6,
            alpha=0.85 if shadow else 1.0,
            label=strategy_label(name, applied),
            zorder=2 if shadow else 3,
        )
        lines[name] = line
    ax.axhline(0.0, color="0.5", linewidth=0.6, zorder=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimizer steps
    return lines


def alignment_over_steps(
    source: Source,
    metric: str | Sequence[str] = ("cos_dr", "cos_df"),
    *,
    layer: int | None = None,
    strategies: Sequence[str] | None = None,
    run: str | int | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    legend: bool = True,
) -> PlotResult:
    """cos(d, r) and cos(d, f) over recorded steps, one line per strategy.

    The applied strategy is drawn solid, shadow strategies (same (f, r) pair, not applied)
    dashed and labelled ``(shadow)``.

    Parameters
    ----------
    source : Dataset or list of Datasets
        One run (or pick one of several with ``run``).
    metric : str or sequence of str
        One panel per metric of ``ds.geom.metrics`` with a strategy dimension.
    layer : int, optional
        One transformer block; default the whole model (all recorded tensors).
    strategies : sequence of str, optional
        Strategies to draw; default every recorded one.
    run : str or int, optional
        Which run when ``source`` holds several.
    ax : Axes or sequence of Axes, optional
        One Axes per metric; default a new figure.
    legend : bool
        Add a legend: below a new figure, or right of the last of the given panels.

    Returns
    -------
    PlotResult
        ``artists[(metric, strategy)]`` is the Line2D of that strategy.
    """
    picked = single_run(source, run)
    require_geometry(picked, "alignment_over_steps")
    names = [metric] if isinstance(metric, str) else list(metric)
    chosen = _strategies(picked, strategies, "alignment_over_steps")
    if layer is None:
        data = picked.ds.geom.metrics(by="model")
    else:
        data = _select_layer(picked.ds.geom.metrics(by="layer"), layer, picked)
    fig, axes = resolve_axes(ax, len(names), sharex=True, panel_size=(2.6, 2.3))
    artists = {}
    for panel, name in zip(axes, names, strict=True):
        if name not in data or "strategy" not in data[name].dims:
            raise invalid(
                "metric",
                name,
                "a metric with a strategy dimension, one of "
                + ", ".join(str(n) for n, v in data.data_vars.items() if "strategy" in v.dims),
            )
        lines = _draw_lines(panel, data[name], chosen, picked.strategy)
        artists.update({(name, strategy): line for strategy, line in lines.items()})
        panel.set_xlabel(axis_label(data["record"], "recorded optimizer step"))
        panel.set_ylabel(axis_label(data[name], name, width=36))
        where = "whole model" if layer is None else layer_label(layer, prefix=True)
        panel.set_title(f"{data[name].attrs.get('long_name', name)}, {where}\n{picked.label}")
    # Below a new figure (full width for the entries); right of given axes.
    place = None
    if legend:
        place = figure_legend(fig, axes) if ax is None else outside_legend(axes[-1])
    extras = {"legend": place}
    return PlotResult(fig, axes, artists, extras)


def alignment_by_layer(
    source: Source,
    metric: str = "cos_dr",
    *,
    layers: Sequence[int] | None = None,
    strategies: Sequence[str] | None = None,
    run: str | int | None = None,
    ax: Sequence[Axes] | None = None,
    ncols: int = 4,
) -> PlotResult:
    """Small multiples: ``metric`` over recorded steps, one panel per layer, one line per
    strategy (applied solid, shadows dashed).

    Parameters
    ----------
    metric : str
        A metric with a strategy dimension (``cos_dr``, ``cos_df``, ``norm_d``, ...).
    layers : sequence of int, optional
        Default every layer index present (-1 collects the tensors outside the blocks, titled
        :data:`~geomkit.plot.style.OUTSIDE_BLOCKS`).
    ax : sequence of Axes, optional
        One Axes per layer.
    ncols : int
        Panels per row of a new figure.

    Returns
    -------
    PlotResult
        ``artists[(layer, strategy)]`` is the Line2D; ``axes`` follow ``layers``.
    """
    picked = single_run(source, run)
    require_geometry(picked, "alignment_by_layer")
    chosen = _strategies(picked, strategies, "alignment_by_layer")
    data = picked.ds.geom.metrics(by="layer")
    if metric not in data or "strategy" not in data[metric].dims:
        raise invalid("metric", metric, "a metric with a strategy dimension")
    present = [int(v) for v in data["layer"].values]
    layers = present if layers is None else list(layers)
    fig, axes = resolve_axes(
        ax,
        len(layers),
        ncols=ncols,
        panel_size=(1.7, 1.5),
        width=DOUBLE_COLUMN,
        height=1.5 * -(-len(layers) // max(1, min(len(layers), ncols))) + 1.0,
        sharex=True,
        sharey=True,
    )
    ncols = max(1, min(len(layers), ncols))
    artists = {}
    for i, (panel, layer) in enumerate(zip(axes, layers, strict=True)):
        da = _select_layer(data, layer, picked)[metric]
        lines = _draw_lines(panel, da, chosen, picked.strategy)
        artists.update({(layer, name): line for name, line in lines.items()})
        panel.set_title(layer_label(layer, prefix=True))
        if i % ncols == 0:
            panel.set_ylabel(axis_label(data[metric], metric, width=28))
        if i >= len(layers) - ncols:
            panel.set_xlabel(axis_label(data["record"], "recorded optimizer step", width=28))
    legend = figure_legend(fig, axes[:1])
    long_name = data[metric].attrs.get("long_name", metric)
    fig.suptitle(f"{long_name} per layer, {picked.label}")
    return PlotResult(fig, axes, artists, {"legend": legend})


def _long_frame(run: Run, metric: str, x: str, by: str, chosen: list[str]):
    data = run.ds.geom.metrics(by=by)
    check_choice("metric", metric, [str(v) for v in data.data_vars])
    da = data[metric]
    if "strategy" in da.dims:
        da = da.sel(strategy=chosen)
    frame = da.reset_coords(drop=True).to_dataframe(name="value").reset_index()
    if by == "tensor":
        groups = dict(zip(run.ds["tensor"].values, run.ds[x].values, strict=True))
        frame["group"] = frame.pop("tensor").map(groups)
    else:
        frame = frame.rename(columns={by: "group"})
    frame = frame[np.isfinite(frame["value"])]
    if "strategy" in frame:
        frame["strategy"] = [strategy_label(str(s), run.strategy) for s in frame["strategy"]]
    return frame, da


def alignment_distributions(
    source: Source,
    metric: str = "cos_dr",
    *,
    by: str = "layer",
    x: str | None = None,
    kind: str = "violin",
    strategies: Sequence[str] | None = None,
    run: str | int | None = None,
    ax: Axes | None = None,
    granularity: str | None = None,
) -> PlotResult:
    """Distribution of a metric per layer (x) and strategy (hue) over recorded steps.

    Parameters
    ----------
    metric : str
        Any metric of ``ds.geom.metrics``; pair metrics (``cos_fr``) have no hue.
    by : {"layer", "component", "module", "tensor"}
        What one value is: one per (recorded step, group), the group's exact cosine, or with
        ``"tensor"`` one per (recorded step, tensor), placed in its ``x`` group.
    x : {"layer", "component", "module"}, optional
        The x groups (default ``by``, or ``"layer"`` when ``by="tensor"``).
    granularity : {"group", "tensor"}, optional
        Deprecated: ``granularity="tensor"`` is ``x=by, by="tensor"``.
    kind : {"violin", "box", "strip"}
        The seaborn plot.

    Returns
    -------
    PlotResult
        ``artists["distribution"]`` lists the artists seaborn added; ``extras["data"]`` the
        long-format DataFrame (columns group, [strategy], value) that was drawn.
    """
    if granularity is not None:  # deprecated: (by, granularity="tensor") is (x=by, by="tensor")
        warn_renamed("granularity=", "by=", stacklevel=2)
        if granularity not in ("group", "tensor"):
            raise ValueError(f"invalid granularity={granularity!r}: expected 'group' or 'tensor'")
        by, x = ("tensor", by) if granularity == "tensor" else (by, x)
    x = ("layer" if by == "tensor" else by) if x is None else x
    if by not in ("tensor", x):
        raise ValueError(f"invalid by={by!r}: expected 'tensor' or the x group {x!r}")
    plotters = {"violin": sns.violinplot, "box": sns.boxplot, "strip": sns.stripplot}
    check_choice("kind", kind, list(plotters))
    picked = single_run(source, run)
    require_geometry(picked, "alignment_distributions")
    chosen = _strategies(picked, strategies, "alignment_distributions")
    frame, da = _long_frame(picked, metric, x, by, chosen)
    order = sorted(frame["group"].unique(), key=lambda g: (isinstance(g, str), g))
    fig, (ax,) = resolve_axes(ax, 1, panel_size=(max(3.2, 0.9 * len(order) + 1.5), 2.6))
    names = order
    if x == "layer":
        names = group_labels("layer", order)
    before = set(ax.get_children())
    kwargs: dict = {"data": frame, "x": "group", "y": "value", "order": order, "ax": ax}
    if "strategy" in frame:
        hue_order = [strategy_label(s, picked.strategy) for s in chosen]
        kwargs.update(
            hue="strategy",
            hue_order=hue_order,
            palette={strategy_label(s, picked.strategy): strategy_style(s).color for s in chosen},
        )
    else:
        kwargs.update(color="0.6")
    if kind != "strip" and "strategy" in frame:
        kwargs.update(saturation=1.0)  # the strategy colours themselves, not desaturated
    if kind == "violin":
        # White quartile lines stay visible on every strategy colour (black included).
        kwargs.update(
            cut=0,
            inner="quart",
            inner_kws={"color": "white"},
            density_norm="width",
            linewidth=0.6,
        )
    elif kind == "box":
        kwargs.update(fliersize=1.5, linewidth=0.8)
    else:
        kwargs.update(size=2.5, alpha=0.7, dodge="strategy" in frame)
    with warnings.catch_warnings():
        # seaborn 0.13 passes matplotlib arguments that newer matplotlib deprecates.
        warnings.filterwarnings("ignore", category=MatplotlibDeprecationWarning)
        plotters[kind](**kwargs)
    drawn = [a for a in ax.get_children() if a not in before and not isinstance(a, Legend)]
    ax.set_xlabel(axis_label(picked.ds[x] if x in picked.ds.coords else {}, x))
    ax.set_ylabel(axis_label(da, metric, width=36))
    ax.set_xticks(range(len(order)), names)
    ax.set_title(f"{da.attrs.get('long_name', metric)} per {x}, {picked.label}")
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1.0), title=None)
    legend = ax.get_legend()
    if metric.startswith("cos_"):
        ax.axhline(0.0, color="0.5", linewidth=0.6, zorder=0)
    return PlotResult(fig, [ax], {"distribution": drawn}, {"data": frame, "legend": legend})
