"""Figures for the paper's alignment claims (SAGO, Xiao et al., ACL 2026, arXiv 2604.14808).

The abstract claims SAGO achieves "strictly tighter alignment" with the retain gradient than
PCGrad. Read as cos(d_SAGO, r) >= cos(d_PCGrad, r) this is false in general (docs/theory.md#r4); the
scatter shows, on recorded gradients, where it holds and where not, against the norm ratio
||f|| / ||r|| that decides it in practice. Violation rates come from the theory module's audit
(a DataFrame; this module does not import :mod:`geomkit.theory`).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.ticker import FuncFormatter

from geomkit._deprecation import renamed
from geomkit._validation import invalid
from geomkit.plot._data import Source, require_geometry, require_strategies, single_run
from geomkit.plot.style import (
    PlotResult,
    PlotSkipped,
    axis_label,
    resolve_axes,
    strategy_style,
)
from geomkit.runs import load

__all__ = ["GRANULARITY_ORDER", "sago_vs_pcgrad", "violation_rates"]

GRANULARITY_ORDER: tuple[str, ...] = (
    "coordinate",
    "tensor",
    "layer",
    "component",
    "module",
    "model",
)
"""Granularities from finest to coarsest; bars follow this order (others after, as given)."""


@renamed(granularity="by")
def sago_vs_pcgrad(
    source: Source,
    *,
    x: str = "pcgrad",
    y: str = "sago",
    by: str = "tensor",
    tolerance: float = 1e-12,
    run: str | int | None = None,
    ax: Axes | None = None,
    cmap: str = "viridis",
    colorbar: bool = True,
) -> PlotResult:
    """cos(d_y, r) against cos(d_x, r) per (recorded step, tensor), coloured by ||f|| / ||r||.

    Points below the diagonal y = x are cases where SAGO aligns *less* with the retain gradient
    than PCGrad on the same (f, r) pair, i.e. violations of the literal reading of the paper's
    claim (docs/theory.md#r4); their count is annotated, never filtered out.

    Parameters
    ----------
    source : Dataset or list of Datasets
        Runs that recorded both strategies (applied or shadow); points of all runs are pooled
        unless ``run`` picks one.
    x, y : str
        The strategies on the axes.
    by : {"tensor", "layer", "component", "module", "model"}
        What one point is.
    tolerance : float
        A point counts as below the diagonal when ``cos_y < cos_x - tolerance``.
    ax : Axes, optional
    cmap : str
        Colour map of the (logarithmic) norm-ratio scale.
    colorbar : bool

    Returns
    -------
    PlotResult
        ``artists["points"]`` (PathCollection), ``artists["diagonal"]``; ``extras`` holds
        ``n_points``, ``n_below``, ``n_undefined`` (a cosine undefined: zero norm) and
        ``colorbar``.
    """
    runs = load(source) if run is None else [single_run(source, run)]
    xs, ys, ratios = [], [], []
    n_undefined = 0
    for one in runs:
        require_geometry(one, "sago_vs_pcgrad")
        require_strategies(one, (x, y), "sago_vs_pcgrad")
        metrics = one.ds.geom.metrics(by=by)
        cos_x = np.ravel(metrics["cos_dr"].sel(strategy=x).values)
        cos_y = np.ravel(metrics["cos_dr"].sel(strategy=y).values)
        ratio = np.ravel(metrics["norm_ratio"].transpose(*metrics["cos_dr"].sel(strategy=x).dims))
        defined = np.isfinite(cos_x) & np.isfinite(cos_y)
        n_undefined += int((~defined).sum())
        xs.append(cos_x[defined])
        ys.append(cos_y[defined])
        ratios.append(ratio[defined])
    cx, cy, ratio = (np.concatenate(a) for a in (xs, ys, ratios))
    if cx.size == 0:
        raise PlotSkipped(f"sago_vs_pcgrad: no defined cosine pairs ({n_undefined} undefined)")
    positive = ratio[np.isfinite(ratio) & (ratio > 0)]
    lo, hi = (positive.min(), positive.max()) if positive.size else (1.0, 1.0)
    if lo == hi:
        lo, hi = lo / 2, hi * 2
    # Zero or infinite ratios (one gradient zero) are clipped to the ends of the colour scale.
    shown = np.clip(np.nan_to_num(ratio, nan=lo, posinf=hi), lo, hi)

    fig, (ax,) = resolve_axes(ax, 1, panel_size=(4.6, 4.0))
    order = np.argsort(shown)  # large ratios on top
    points = ax.scatter(
        cx[order],
        cy[order],
        c=shown[order],
        cmap=cmap,
        norm=LogNorm(vmin=lo, vmax=hi),
        s=9,
        alpha=0.8,
        linewidths=0,
        rasterized=cx.size > 5000,
    )
    diagonal = ax.axline((0.0, 0.0), slope=1.0, color="0.3", linestyle="--", linewidth=0.8)
    diagonal.set_label("y = x")
    below = int(np.sum(cy < cx - tolerance))
    low = min(cx.min(), cy.min(), 0.0)
    high = max(cx.max(), cy.max())
    pad = 0.04 * (high - low or 1.0)
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_aspect("equal", adjustable="box")
    cos_attrs = runs[0].ds.geom.metrics(by="model")["cos_dr"]
    for setter, name in ((ax.set_xlabel, x), (ax.set_ylabel, y)):
        text = f"{strategy_style(name).label}: {axis_label(cos_attrs, 'cos(d, r)', width=500)}"
        setter(textwrap.fill(text, 44))
    runs_text = f"{len(runs)} run{'s' if len(runs) != 1 else ''}"
    ax.set_title(
        f"per {by} and step, {runs_text}\n{strategy_style(y).label} below "
        f"{strategy_style(x).label}:\n{below} of {cx.size} ({below / cx.size:.1%})",
        fontsize="medium",
    )
    extras = {"n_points": int(cx.size), "n_below": below, "n_undefined": n_undefined}
    extras["colorbar"] = None
    if colorbar:
        norm_attrs = runs[0].ds.geom.metrics(by="model")["norm_ratio"]
        bar = fig.colorbar(points, ax=ax, label=axis_label(norm_attrs, "|f| / |r|", width=28))
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        bar.ax.yaxis.set_major_formatter(plain)
        # Within about a decade the minor ticks are the only ones: label them too.
        few = hi / lo < 20
        bar.ax.yaxis.set_minor_formatter(plain if few else FuncFormatter(lambda value, _: ""))
        extras["colorbar"] = bar
    return PlotResult(fig, [ax], {"points": points, "diagonal": diagonal}, extras)


_REQUIRED = ("claim", "granularity", "violation_rate")


def _pool(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (claim, [strategy,] granularity): results of several sources pooled.

    With ``cases`` and ``violations`` columns the rate is ``sum(violations) / sum(cases)``
    over rows that evaluated something; otherwise the mean of the finite rates. NaN when no
    row evaluated anything.
    """
    keys = ["claim", "strategy", "granularity"] if "strategy" in frame else ["claim", "granularity"]
    counted = {"cases", "violations"} <= set(frame.columns)
    rows = []
    for key, part in frame.groupby(keys, sort=False):
        row = dict(zip(keys, key, strict=True))
        if counted:
            cases = float(part["cases"].sum())
            row["cases"] = int(cases)
            row["violations"] = int(part["violations"].sum())
            row["violation_rate"] = row["violations"] / cases if cases else np.nan
        else:
            rates = np.asarray(part["violation_rate"], dtype=np.float64)
            finite = rates[np.isfinite(rates)]
            row["violation_rate"] = float(finite.mean()) if finite.size else np.nan
        if "status" in part:
            row["status"] = "/".join(dict.fromkeys(str(v) for v in part["status"]))
        row["rows"] = len(part)
        rows.append(row)
    pooled = pd.DataFrame(rows)
    pooled["group"] = (
        pooled["claim"] + " " + pooled["strategy"] if "strategy" in pooled else pooled["claim"]
    )
    return pooled


def violation_rates(
    frame: pd.DataFrame,
    *,
    claims: Sequence[str] | None = None,
    ax: Axes | None = None,
) -> PlotResult:
    """Violation rate of each claim at each granularity, as grouped bars.

    Parameters
    ----------
    frame : pandas.DataFrame
        Columns ``claim``, ``granularity``, ``violation_rate`` (fraction in [0, 1]; NaN when
        nothing was evaluated), optionally ``strategy`` (one bar group per claim and strategy,
        e.g. ``sago>=pcgrad``), ``status`` (written above each bar), ``cases`` and
        ``violations``; e.g. ``Audit.to_frame()`` of :mod:`geomkit.theory`. Rows of several
        sources (runs, samplers) are pooled: ``sum(violations) / sum(cases)`` when counts are
        given, else the mean rate.
    claims : sequence of str, optional
        Claims to show, in order; default all, in order of appearance.
    ax : Axes, optional

    Returns
    -------
    PlotResult
        ``artists[(group, granularity)]`` is the bar (Rectangle); ``group`` is the claim, or
        ``"<claim> <strategy>"`` with a strategy column. ``extras["table"]`` is the pooled
        DataFrame that was drawn.
    """
    missing = [c for c in _REQUIRED if c not in frame.columns]
    if missing:
        raise ValueError(
            f"violation_rates: invalid frame with columns {list(frame.columns)}: expected the "
            f"columns {list(_REQUIRED)} (missing {missing})"
        )
    frame = frame.copy()
    for column in ("claim", "granularity", "strategy"):
        if column in frame:
            frame[column] = frame[column].astype(str)
    known = list(dict.fromkeys(frame["claim"]))
    claims = known if claims is None else [str(c) for c in claims]
    unknown = [c for c in claims if c not in known]
    if unknown:
        raise invalid("claims", unknown, "some of the frame's claims " + ", ".join(known))
    if frame.empty:
        raise PlotSkipped("violation_rates: the audit frame has no rows")
    frame = frame[frame["claim"].isin(claims)]
    pooled = _pool(frame)
    pooled["order"] = [claims.index(c) for c in pooled["claim"]]
    groups = list(dict.fromkeys(pooled.sort_values("order", kind="stable")["group"]))
    present = list(dict.fromkeys(pooled["granularity"]))
    grans = [g for g in GRANULARITY_ORDER if g in present] + [
        g for g in present if g not in GRANULARITY_ORDER
    ]
    colors = dict(zip(grans, sns.color_palette("crest", len(grans)), strict=True))
    fig, (ax,) = resolve_axes(ax, 1, panel_size=(5.5, 0.09 * len(groups) * len(grans) + 1.2))
    height = 0.8 / max(1, len(grans))
    rates = pooled.set_index(["group", "granularity"])
    artists = {}
    top = np.nanmax(np.asarray(pooled["violation_rate"], dtype=np.float64), initial=0.0)
    span = top if top > 0 else 1.0
    for j, gran in enumerate(grans):
        for i, group in enumerate(groups):
            if (group, gran) not in rates.index:
                continue
            row = rates.loc[(group, gran)]
            rate = float(row["violation_rate"])
            ypos = i - 0.4 + height * (j + 0.5)
            length = 0.0 if np.isnan(rate) else rate
            (bar,) = ax.barh(ypos, length, height=height * 0.95, color=colors[gran])
            artists[(group, gran)] = bar
            note = str(row["status"]) if "status" in rates.columns else ""
            if np.isnan(rate):
                note = (note + " " if note else "") + "n/a"
            if note:
                ax.text(length + 0.01 * span, ypos, note, va="center", fontsize=5)
    # One legend entry per granularity.
    handles = {gran: artists[next(k for k in artists if k[1] == gran)] for gran in grans}
    legend = ax.legend(
        handles.values(),
        handles.keys(),
        loc="lower left",
        bbox_to_anchor=(0.0, 1.01),
        ncols=len(grans),
        fontsize="small",
        borderaxespad=0.0,
    )
    ax.set_yticks(np.arange(len(groups)), groups)
    ax.set_ylim(len(groups) - 0.5, -0.5)  # first claim at the top
    ax.set_ylabel("claim (docs/theory.md)")
    ax.set_xlabel("violation rate")
    ax.set_xlim(0.0, span * 1.25)
    table = pooled.drop(columns=["order"])
    return PlotResult(fig, [ax], artists, {"legend": legend, "table": table})
