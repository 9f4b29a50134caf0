"""Figures for the paper's alignment claims (SAGO, Xiao et al., ACL 2026, arXiv 2604.14808).

The abstract claims SAGO achieves "strictly tighter alignment" with the retain gradient than
PCGrad. Read as cos(d_SAGO, r) >= cos(d_PCGrad, r) this is false in general (docs/theory.md#r4); the
scatter shows, on recorded gradients, where it holds and where not, one panel per objective.
Every count of violations comes from :mod:`geomkit.theory` (the audit's predicate and tolerance,
:func:`geomkit.theory.comparison_cases`), per objective: the scatter's count equals the audit's
R4 count of the same runs, and no rate is pooled over objectives.
"""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, LinearSegmentedColormap, LogNorm, Normalize
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter

from geomkit._deprecation import GeomkitDeprecationWarning, renamed
from geomkit._validation import check_choice, check_integer, invalid
from geomkit.plot._data import Source, require_geometry, require_strategies, single_run
from geomkit.plot.style import (
    PlotResult,
    PlotSkipped,
    axis_label,
    resolve_axes,
    strategy_style,
)
from geomkit.runs import Run, load

__all__ = ["DENSITY_ABOVE", "GRANULARITY_ORDER", "PRINT_WIDTH", "sago_vs_pcgrad", "violation_rates"]

GRANULARITY_ORDER: tuple[str, ...] = (
    "coordinate",
    "tensor",
    "layer",
    "component",
    "module",
    "model",
)
"""Granularities from finest to coarsest; columns follow this order (others after, as given)."""

DENSITY_ABOVE: int = 3000
"""Above this many points in a panel, :func:`sago_vs_pcgrad` draws a density (hexbin)."""

PRINT_WIDTH: float = 3.3
"""Inches: the width of one column of a two-column paper. :func:`violation_rates` is drawn at
this width, and each panel of :func:`sago_vs_pcgrad` is about this wide; every text is then
at least 7 pt when printed at that size."""

_MIN_PT = 7.0


def _objective(run: Run) -> str:
    return run.objective or "unknown objective"


def _points(run: Run, by: str, x: str, y: str) -> dict[str, np.ndarray]:
    """Per case of ``run`` at ``by``: both cosines, |f| / |r|, and the audit's comparison of
    ``cos(d_y, r) >= cos(d_x, r)`` (:func:`geomkit.theory.comparison_cases`)."""
    from geomkit.theory.breakdown import comparison_cases
    from geomkit.theory.cases import field_of
    from geomkit.theory.recorded import _without_damaged, run_cases

    cases = run_cases(_without_damaged(run))[by]
    c = comparison_cases(cases, y, x)
    cos = {}
    for name in (x, y):
        stats = cases.stats[name]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            norm = np.sqrt(field_of(stats, "dd")) * np.sqrt(field_of(stats, "rr"))
            cos[name] = field_of(stats, "dr") / norm
    return {
        "x": cos[x],
        "y": cos[y],
        "ratio": c.ratio,
        "defined": c.defined,
        "non_finite": c.non_finite,
        "violated": c.violated,
    }


@renamed(granularity="by")
def sago_vs_pcgrad(
    source: Source,
    *,
    x: str = "pcgrad",
    y: str = "sago",
    by: str = "tensor",
    run: str | int | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    cmap: str = "viridis",
    colorbar: bool = True,
    density_above: int = DENSITY_ABOVE,
    tolerance: float | None = None,
) -> PlotResult:
    """cos(d_y, r) against cos(d_x, r) per (recorded step, tensor), one panel per objective.

    Points below the diagonal y = x are cases where SAGO aligns *less* with the retain gradient
    than PCGrad on the same (f, r) pair, i.e. violations of the literal reading of the paper's
    claim (docs/theory.md#r4). Each panel's title gives its objective's violation count and
    rate, counted as the audit counts R4 (:func:`geomkit.theory.comparison_cases`: its
    predicate and tolerance, non-finite cases included), so it equals ``audit.txt``'s count
    for the same runs and granularity. With at most ``density_above`` points in every panel,
    points are coloured by ``|f| / |r|``; above, each panel is a density (hexagons coloured by
    the number of points, logarithmic). Each panel is drawn about :data:`PRINT_WIDTH` wide.

    Parameters
    ----------
    source : Dataset or list of Datasets
        Runs that recorded both strategies (applied or shadow); the cases of all runs of an
        objective are pooled in its panel, unless ``run`` picks one run.
    x, y : str
        The strategies on the axes (the audit's comparison ``y >= x``).
    by : {"tensor", "layer", "model"}
        What one point is: the audit's granularities.
    ax : Axes or sequence of Axes, optional
        One per objective, in sorted order of the objectives.
    cmap : str
        Colour map of the (logarithmic) norm-ratio or density scale.
    colorbar : bool
    density_above : int
        Points per panel above which every panel is a density.
    tolerance : float, optional
        Deprecated and ignored: the audit's tolerance is used.

    Returns
    -------
    PlotResult
        ``artists[objective]``: the panel's PathCollection (points) or PolyCollection
        (hexbin); ``artists[(objective, "diagonal")]``. ``extras``: ``counts`` (objective ->
        ``cases``, ``violations``, ``undefined``, ``non_finite``, ``runs``), ``mode``
        (``"points"`` or ``"density"``), the totals ``n_points`` (drawn), ``n_below``
        (violations), ``n_undefined``, and ``colorbar``.
    """
    if tolerance is not None:
        warnings.warn(
            "argument 'tolerance=' of sago_vs_pcgrad is deprecated, ignored and will be "
            "removed: violations are counted with the audit's tolerance (geomkit.theory)",
            GeomkitDeprecationWarning,
            stacklevel=3,
        )
    check_choice("by", by, ("tensor", "layer", "model"))
    check_integer("density_above", density_above, 0)
    runs = load(source) if run is None else [single_run(source, run)]
    panels: dict[str, dict[str, object]] = {}
    for one in runs:
        require_geometry(one, "sago_vs_pcgrad")
        require_strategies(one, (x, y), "sago_vs_pcgrad")
        p = _points(one, by, x, y)
        panel = panels.setdefault(_objective(one), {"parts": [], "runs": 0})
        panel["parts"].append(p)
        panel["runs"] += 1
    counts: dict[str, dict[str, int]] = {}
    data: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for objective in sorted(panels):
        parts = panels[objective]["parts"]
        joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        drawn = joined["defined"] & ~joined["non_finite"]
        counts[objective] = {
            "cases": int(joined["defined"].sum()),
            "violations": int(joined["violated"].sum()),
            "undefined": int((~joined["defined"]).sum()),
            "non_finite": int(joined["non_finite"].sum()),
            "runs": int(panels[objective]["runs"]),
        }
        data[objective] = (joined["x"][drawn], joined["y"][drawn], joined["ratio"][drawn])
    n_points = sum(v[0].size for v in data.values())
    if n_points == 0:
        undefined = sum(c["undefined"] for c in counts.values())
        raise PlotSkipped(f"sago_vs_pcgrad: no defined cosine pairs ({undefined} undefined)")
    objectives = list(data)
    density = max(v[0].size for v in data.values()) > density_above
    fig, axes = resolve_axes(ax, len(objectives), panel_size=(PRINT_WIDTH, PRINT_WIDTH))
    norm: Normalize
    if density:
        norm = LogNorm(vmin=1, vmax=2)  # set to the largest hexagon count below
    else:
        ratio = np.concatenate([v[2] for v in data.values()])
        positive = ratio[np.isfinite(ratio) & (ratio > 0)]
        lo, hi = (positive.min(), positive.max()) if positive.size else (1.0, 1.0)
        if lo == hi:
            lo, hi = lo / 2, hi * 2
        norm = LogNorm(vmin=lo, vmax=hi)
    artists: dict[object, object] = {}
    cos_attrs = runs[0].ds.geom.metrics(by="model")["cos_dr"]
    for objective, panel_ax in zip(objectives, axes, strict=True):
        cx, cy, ratio = data[objective]
        low = min(cx.min(initial=0.0), cy.min(initial=0.0))
        high = max(cx.max(initial=0.0), cy.max(initial=0.0))
        pad = 0.04 * (high - low or 1.0)
        limits = (low - pad, high + pad)
        if density:
            mesh = panel_ax.hexbin(
                cx,
                cy,
                gridsize=50,
                extent=(*limits, *limits),
                mincnt=1,
                cmap=cmap,
                norm=norm,
                linewidths=0.0,
                rasterized=True,
            )
        else:
            # Zero or infinite ratios (one gradient zero) are clipped to the ends of the scale.
            lo, hi = norm.vmin, norm.vmax
            shown = np.clip(np.nan_to_num(ratio, nan=lo, posinf=hi), lo, hi)
            order = np.argsort(shown)  # large ratios on top
            mesh = panel_ax.scatter(
                cx[order],
                cy[order],
                c=shown[order],
                cmap=cmap,
                norm=norm,
                s=9,
                alpha=0.8,
                linewidths=0,
                rasterized=cx.size > 1000,
            )
        artists[objective] = mesh
        diagonal = panel_ax.axline((0, 0), slope=1.0, color="0.3", linestyle="--", linewidth=0.8)
        diagonal.set_label("y = x")
        artists[(objective, "diagonal")] = diagonal
        panel_ax.set_xlim(*limits)
        panel_ax.set_ylim(*limits)
        panel_ax.set_aspect("equal", adjustable="box")
        for setter, name in ((panel_ax.set_xlabel, x), (panel_ax.set_ylabel, y)):
            text = f"{strategy_style(name).label}: {axis_label(cos_attrs, 'cos(d, r)', width=500)}"
            setter(textwrap.fill(text, 44))
        n = counts[objective]
        rate = n["violations"] / n["cases"] if n["cases"] else float("nan")
        runs_text = f"{n['runs']} run{'s' if n['runs'] != 1 else ''}"
        extra = f", {n['non_finite']} non-finite" if n["non_finite"] else ""
        panel_ax.set_title(
            f"{objective}: {runs_text}, per ({by}, step)\n{strategy_style(y).label} below "
            f"{strategy_style(x).label}: {n['violations']} of {n['cases']} "
            f"({rate:.1%}){extra}",
            fontsize=8,
        )
    if density:
        top = max(float(np.ma.max(artists[o].get_array())) for o in objectives)
        norm.vmax = max(top, 2.0)
        for objective in objectives:
            artists[objective].set_norm(norm)
    extras: dict[str, object] = {
        "counts": counts,
        "mode": "density" if density else "points",
        "n_points": int(n_points),
        "n_below": int(sum(c["violations"] for c in counts.values())),
        "n_undefined": int(sum(c["undefined"] for c in counts.values())),
        "colorbar": None,
    }
    if colorbar:
        mappable = artists[objectives[-1]]
        if density:
            label = f"({by}, step) points per hexagon"
        else:
            norm_attrs = runs[0].ds.geom.metrics(by="model")["norm_ratio"]
            label = axis_label(norm_attrs, "|f| / |r|", width=28)
        bar = fig.colorbar(mappable, ax=axes, label=label, shrink=0.9)
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        bar.ax.yaxis.set_major_formatter(plain)
        # Within about a decade the minor ticks are the only ones: label them too.
        few = norm.vmax / norm.vmin < 20
        bar.ax.yaxis.set_minor_formatter(plain if few else FuncFormatter(lambda v, _: ""))
        extras["colorbar"] = bar
    return PlotResult(fig, list(axes), artists, extras)


_REQUIRED = ("claim", "granularity", "violation_rate")

_NO_OBJECTIVE = "objective not given"


def _objectives(frame: pd.DataFrame, objectives: Mapping[str, str] | Source | None) -> pd.Series:
    """The objective of every row of an audit frame."""
    if "objective" in frame:
        return frame["objective"].astype(str)
    if objectives is None or "source" not in frame:
        return pd.Series(_NO_OBJECTIVE, index=frame.index)
    if isinstance(objectives, Mapping):
        mapping = {str(k): str(v) for k, v in objectives.items()}
    else:
        mapping = {run.label: _objective(run) for run in load(objectives)}

    def one(source: str) -> str:
        if source in mapping:
            return mapping[source]
        return "synthetic" if source.startswith("synthetic:") else _NO_OBJECTIVE

    return frame["source"].astype(str).map(one)


def _pool(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (objective, claim, [strategy,] granularity): the rows of the objective's
    sources pooled, never those of different objectives.

    With ``cases`` and ``violations`` columns the rate is ``sum(violations) / sum(cases)``
    (NaN, not evaluated, when no case was evaluated); otherwise the mean of the finite rates.
    """
    keys = ["objective", "claim", "granularity"]
    if "strategy" in frame:
        keys.insert(2, "strategy")
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
        if "gates" in part:
            row["gates"] = bool(part["gates"].astype(bool).any())
        row["rows"] = len(part)
        rows.append(row)
    pooled = pd.DataFrame(rows)
    pooled["group"] = (
        pooled["claim"] + " " + pooled["strategy"] if "strategy" in pooled else pooled["claim"]
    )
    return pooled


def _group_label(claim: str, strategy: str | None) -> str:
    """``R4 SAGO ≥ PCGrad (global)``: a claim and its strategy (or compared pair) by their
    display labels, wrapped onto a second line when long."""
    if strategy is None:
        return claim
    names = strategy.split(">=")
    text = f"{claim} " + " ≥ ".join(strategy_style(n.strip()).label for n in names)
    return "\n".join(textwrap.wrap(text, 26, subsequent_indent="   "))


def _rate_text(rate: float) -> str:
    """A cell's rate in percent: ``0`` only for none, ``<1`` / ``>99`` never rounded to 0/100."""
    if rate == 0:
        return "0"
    percent = 100 * rate
    if percent < 1:
        return "<1"
    if percent > 99 and rate < 1:
        return ">99"
    return f"{percent:.0f}"


def violation_rates(
    frame: pd.DataFrame,
    *,
    claims: Sequence[str] | None = None,
    objectives: Mapping[str, str] | Source | None = None,
    ax: Axes | Sequence[Axes] | None = None,
) -> PlotResult:
    """Violation rate of each claim at each granularity, one panel per objective, as a grid of
    cells; drawn :data:`PRINT_WIDTH` wide with no text below 7 pt.

    A cell gives the percentage of evaluated cases that violate the claim (``0`` only when
    none does; ``<1`` and ``>99`` are never rounded to 0 or 100), shaded by it. A claim
    evaluated at a granularity with no case (e.g. a shadow's R6 accepted by construction) is
    a grey hatched ``n/e`` cell, never a 0; a granularity a claim is not stated at has no cell.
    Cells of results that gate the audit (proven claims) are outlined; proven results outside
    the gate (R7 against global PCGrad) get a dashed outline.

    Parameters
    ----------
    frame : pandas.DataFrame
        Columns ``claim``, ``granularity``, ``violation_rate`` (fraction in [0, 1]; NaN when
        nothing was evaluated), optionally ``strategy`` (one row per claim and strategy, e.g.
        ``sago>=pcgrad``), ``cases`` and ``violations``, ``gates``, ``source`` and
        ``objective``; e.g. ``Audit.to_frame()`` of :mod:`geomkit.theory`. Rows of the sources
        (runs) of one objective are pooled: ``sum(violations) / sum(cases)`` when counts are
        given, else the mean rate; objectives are never pooled.
    claims : sequence of str, optional
        Claims to show, in order; default all, in order of appearance.
    objectives : mapping or runs, optional
        The objective of each ``source`` when the frame has no ``objective`` column: a mapping
        of source labels to objectives, or the runs the audit was made of (anything
        :func:`geomkit.runs.load` takes). Sources ``synthetic:*`` are "synthetic". Without
        either, all rows form one panel titled "objective not given".
    ax : Axes or sequence of Axes, optional
        One per objective, in sorted order.

    Returns
    -------
    PlotResult
        ``artists[(objective, group, granularity)]`` is the cell (Rectangle); ``group`` is the
        claim, or ``"<claim> <strategy>"`` with a strategy column. ``extras["table"]`` is the
        pooled DataFrame that was drawn (with ``objective``), ``extras["texts"]`` the cell
        texts keyed like the cells.
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
    frame["objective"] = _objectives(frame, objectives)
    frame = frame[frame["claim"].isin(claims)]
    pooled = _pool(frame)
    pooled["order"] = [claims.index(c) for c in pooled["claim"]]
    ordered = pooled.sort_values("order", kind="stable")
    groups = list(dict.fromkeys(ordered["group"]))
    labels = {
        g: _group_label(c, s if "strategy" in ordered else None)
        for g, c, s in zip(
            ordered["group"],
            ordered["claim"],
            ordered["strategy"] if "strategy" in ordered else ordered["claim"],
            strict=True,
        )
    }
    present = list(dict.fromkeys(pooled["granularity"]))
    grans = [g for g in GRANULARITY_ORDER if g in present] + [
        g for g in present if g not in GRANULARITY_ORDER
    ]
    panels = sorted(set(pooled["objective"]))
    # rows of one or two lines: a row's height follows its label
    heights = [1.0 + 0.75 * labels[g].count("\n") for g in groups]
    tops = np.concatenate([[0.0], np.cumsum(heights)])
    inch_per_row = 0.16
    header = 0.25 + 0.055 * max(len(g) for g in grans)  # title and upright column labels
    panel_height = tops[-1] * inch_per_row + header
    fig, axes = resolve_axes(ax, len(panels), ncols=1, panel_size=(PRINT_WIDTH, panel_height))
    if ax is None:  # room for the caption below the panels
        fig.set_size_inches(PRINT_WIDTH, panel_height * len(panels) + 0.6)
    cmap = _rate_cmap()
    cells = pooled.set_index(["objective", "group", "granularity"])
    artists: dict[tuple[str, str, str], Rectangle] = {}
    texts = {}
    for objective, panel_ax in zip(panels, axes, strict=True):
        for i, group in enumerate(groups):
            for j, gran in enumerate(grans):
                if (objective, group, gran) not in cells.index:
                    continue
                row = cells.loc[(objective, group, gran)]
                rate = float(row["violation_rate"])
                evaluated = np.isfinite(rate)
                color = cmap(rate) if evaluated else "0.88"
                cell = Rectangle(
                    (j, tops[i]),
                    1.0,
                    heights[i],
                    facecolor=color,
                    edgecolor="0.55" if evaluated else "0.6",
                    hatch=None if evaluated else "////",
                    linewidth=0.5,
                )
                if evaluated and bool(row.get("gates", False)):
                    cell.set_edgecolor("black")
                    cell.set_linewidth(1.2)
                elif evaluated and "proven" in str(row.get("status", "")).split("/"):
                    cell.set_edgecolor("black")  # proven, but reported outside the gate
                    cell.set_linewidth(1.2)
                    cell.set_linestyle((0, (2, 1.5)))
                panel_ax.add_patch(cell)
                artists[(objective, group, gran)] = cell
                text = _rate_text(rate) if evaluated else "n/e"
                dark = evaluated and rate > 0.6
                texts[(objective, group, gran)] = panel_ax.text(
                    j + 0.5,
                    tops[i] + heights[i] / 2,
                    text,
                    ha="center",
                    va="center",
                    fontsize=_MIN_PT,
                    color="white" if dark else "0.1",
                    bbox=None if evaluated else {"facecolor": "0.88", "edgecolor": "none"},
                )
        panel_ax.set_xlim(0, len(grans))
        panel_ax.set_ylim(tops[-1], 0)  # first claim at the top
        panel_ax.set_xticks(
            np.arange(len(grans)) + 0.5, grans, fontsize=_MIN_PT, rotation=90, va="bottom"
        )
        panel_ax.xaxis.tick_top()
        centres = (tops[:-1] + tops[1:]) / 2
        panel_ax.set_yticks(centres, [labels[g] for g in groups], fontsize=_MIN_PT)
        panel_ax.tick_params(length=0, pad=2)
        panel_ax.grid(False)
        for spine in panel_ax.spines.values():
            spine.set_visible(False)
        title = objective
        if "source" in frame:
            n = int(frame.loc[frame["objective"] == objective, "source"].nunique())
            title += f" ({n} run{'s' if n != 1 else ''})" if objective != "synthetic" else ""
        panel_ax.set_title(title, fontsize=8, loc="left")
    caption = (
        "Cell: % of the evaluated cases that violate the claim; 0 only when none does. "
        "n/e: not evaluated (no case). Solid outline: proven claims that gate the audit; "
        "dashed outline: proven, reported outside the gate. No cell: the claim is not "
        "stated at that granularity."
    )
    caption = "\n".join(textwrap.wrap(caption, 58))
    if ax is None:  # our own figure: the caption spans it, inside the layout
        fig.supxlabel(caption, fontsize=_MIN_PT, x=0.02, ha="left", multialignment="left")
    else:
        axes[-1].set_xlabel(caption, fontsize=_MIN_PT)
    table = pooled.drop(columns=["order"])
    return PlotResult(fig, list(axes), artists, {"table": table, "texts": texts})


def _rate_cmap() -> Colormap:
    """White (0) to a muted red (1): the shading of violation rates."""
    import seaborn as sns

    red = sns.color_palette("colorblind")[3]
    return LinearSegmentedColormap.from_list("geomkit_violations", [(1.0, 1.0, 1.0), red])
