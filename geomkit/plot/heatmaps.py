"""Layer x step heatmaps of the (f, r) geometry: cos(f, r) and the sign-conflict rate.

Per-layer views are not in the SAGO paper (Xiao et al., ACL 2026, arXiv 2604.14808;
docs/method.md#references); they are exact groupings of the recorded sufficient statistics.
"""

from __future__ import annotations

import textwrap

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Normalize, TwoSlopeNorm

from geomkit._validation import check_choice, invalid
from geomkit.plot._data import Source, require_geometry, single_run
from geomkit.plot.style import (
    SINGLE_COLUMN,
    PlotResult,
    axis_label,
    group_labels,
    resolve_axes,
    strategy_style,
)

__all__ = ["conflict_heatmap", "cos_fr_heatmap", "layer_heatmap"]


def _edges(values: np.ndarray) -> np.ndarray:
    """Cell edges centred on ``values`` (irregular spacing allowed)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 1:
        return np.array([v[0] - 0.5, v[0] + 0.5])
    mid = (v[1:] + v[:-1]) / 2
    return np.concatenate([[v[0] - (mid[0] - v[0])], mid, [v[-1] + (v[-1] - mid[-1])]])


def _scale(values: np.ndarray, cosine: bool) -> tuple[float, float]:
    """Colour limits fit to the finite ``values``: symmetric about 0 for a cosine (its largest
    magnitude rounded up to a tenth, at most 1), else the data range."""
    finite = values[np.isfinite(values)]
    if cosine:
        top = float(np.abs(finite).max()) if finite.size else 1.0
        top = min(1.0, max(0.1, np.ceil(top * 10 - 1e-9) / 10))
        return -top, top
    if not finite.size:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        low, high = low - 0.05, high + 0.05
    return low, high


def layer_heatmap(
    source: Source,
    metric: str = "cos_fr",
    *,
    by: str = "layer",
    strategy: str | None = None,
    run: str | int | None = None,
    ax: Axes | None = None,
    cmap: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
) -> PlotResult:
    """Heatmap of one derived metric, groups (layers) x recorded steps.

    Parameters
    ----------
    source : Dataset or list of Datasets
        One run (or pick one of several with ``run``).
    metric : str
        A metric of ``ds.geom.metrics`` (``cos_fr``, ``conflict_rate``, ``cos_dr``, ...).
    by : {"layer", "component", "module", "tensor"}
        The rows.
    strategy : str, optional
        For update metrics (``cos_dr``, ...): which strategy; default the applied one.
    run : str or int, optional
        Which run when ``source`` holds several.
    ax : Axes, optional
        Draw here; default a new figure.
    cmap, vmin, vmax : optional
        Colour map and limits. Cosines default to a diverging map centred on 0, symmetric
        about 0 to the largest magnitude (rounded up to a tenth); other metrics (rates) to a
        sequential map over the data's range. The colourbar label states the scale.
    colorbar : bool
        Add a colorbar labelled from the metric's ``long_name`` and the scale.

    Returns
    -------
    PlotResult
        ``artists["heatmap"]`` is the QuadMesh; its array is ``(group, record)``.
        ``extras["colorbar"]``, ``extras["groups"]``, ``extras["records"]``,
        ``extras["scale"]`` (the colour limits).
    """
    check_choice("by", by, ("layer", "component", "module", "tensor"), owner="layer_heatmap")
    picked = single_run(source, run)
    require_geometry(picked, f"layer_heatmap({metric!r})")
    metrics = picked.ds.geom.metrics(by=by)
    check_choice("metric", metric, [str(v) for v in metrics.data_vars])
    da = metrics[metric]
    per_strategy = "strategy" in da.dims
    if per_strategy:
        strategy = picked.strategy if strategy is None else strategy
        names = [str(s) for s in da["strategy"].values]
        check_choice("strategy", strategy, names)
        da = da.sel(strategy=strategy)
    elif strategy is not None:
        raise invalid(
            "strategy", strategy, f"None (metric {metric!r} does not depend on the strategy)"
        )
    da = da.transpose(by, "record")
    groups = [str(g) for g in da[by].values]
    records = np.asarray(da["record"].values)
    raw = np.asarray(da.values, dtype=np.float64)
    values = np.ma.masked_invalid(raw)

    fig, (ax,) = resolve_axes(
        ax, 1, panel_size=(SINGLE_COLUMN, 0.3 * len(groups) + 2.0), width=SINGLE_COLUMN
    )
    cosine = metric.startswith("cos_")
    low, high = _scale(raw, cosine)
    low, high = (low if vmin is None else vmin), (high if vmax is None else vmax)
    if cosine:
        norm: Normalize = TwoSlopeNorm(vcenter=0.0, vmin=min(low, -1e-12), vmax=max(high, 1e-12))
        cmap = cmap or "RdBu_r"
        scale = f"scale {low:g} to {high:g}, centred at 0"
    else:
        norm = Normalize(vmin=low, vmax=high)
        cmap = cmap or "magma"
        scale = f"scale fit to data: {low:.3g} to {high:.3g}"
    mesh = ax.pcolormesh(
        _edges(records), np.arange(len(groups) + 1) - 0.5, values, cmap=cmap, norm=norm
    )
    ax.set_yticks(np.arange(len(groups)), group_labels(by, da[by].values))
    ax.set_ylim(len(groups) - 0.5, -0.5)  # first group at the top
    ax.grid(False)
    ax.set_xlabel(axis_label(da["record"], "recorded optimizer step"))
    ax.set_ylabel(axis_label(picked.ds[by] if by in picked.ds.coords else {}, by))
    title = f"{da.attrs.get('long_name', metric)} per {by}"
    if per_strategy:
        title += f", {strategy_style(strategy).label}"
    ax.set_title("\n".join([*textwrap.wrap(title, 36), picked.label]))  # fits 3.3 in
    extras = {"groups": groups, "records": records, "colorbar": None, "scale": (low, high)}
    if colorbar:
        # Below the map: the full width of a single column for the map and the label.
        label = axis_label(da, metric, width=40) + f"\n({scale})"
        extras["colorbar"] = fig.colorbar(
            mesh, ax=ax, label=label, location="bottom", aspect=30, pad=0.02
        )
    return PlotResult(fig, [ax], {"heatmap": mesh}, extras)


def cos_fr_heatmap(source: Source, *, ax: Axes | None = None, **kwargs) -> PlotResult:
    """Per-layer cos(f, r) over recorded steps (:func:`layer_heatmap` with ``cos_fr``)."""
    return layer_heatmap(source, "cos_fr", ax=ax, **kwargs)


def conflict_heatmap(
    source: Source, *, nonzero: bool = False, ax: Axes | None = None, **kwargs
) -> PlotResult:
    """Per-layer sign-conflict rate over recorded steps.

    ``nonzero=True`` uses the rate among coordinates where both gradients are non-zero
    (``conflict_rate_nonzero``); zeros never conflict.
    """
    metric = "conflict_rate_nonzero" if nonzero else "conflict_rate"
    return layer_heatmap(source, metric, ax=ax, **kwargs)
