"""The step the optimizer took, u = theta_old - theta_new, against the gradients and the combined
update d (store schema version 3; docs/method.md#the-step-taken).

The model moves by u, not by d: clipping, AdamW's normalisation, weight decay and the learning
rate turn d into u. These figures show whether the optimizer keeps the alignment of d with the
retain gradient (:func:`step_alignment`), which layers make each step's predicted change of the
forget and retain losses (:func:`attribution`: the first-order changes -<u, f> and -<u, r> are
sums over tensors, so a layer's share is exact), and whether that first-order prediction
matches the realised change of the losses (:func:`predicted_vs_realized`). They are not in the
SAGO paper (Xiao et al., ACL 2026, arXiv 2604.14808), whose geometry is that of d.

cos(u, .) exists for the applied strategy of each run only: shadow strategies are never applied,
so they take no step. Stores written before the step was recorded (schema version < 3), and
runs recorded with ``record_step=False``, have no step fields (NaN when opened): every figure
here raises :class:`~geomkit.plot.PlotSkipped` with that reason.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from geomkit._validation import check_choice, check_real, invalid
from geomkit.plot._data import Run, Source, single_run
from geomkit.plot._methods import group_methods
from geomkit.plot.heatmaps import _edges
from geomkit.plot.style import (
    DOUBLE_COLUMN,
    MissingVariable,
    PlotResult,
    PlotSkipped,
    axis_label,
    figure_legend,
    group_labels,
    outside_legend,
    resolve_axes,
    strategy_style,
)
from geomkit.runs import load

__all__ = [
    "PAIRS",
    "UNSTABLE_BELOW",
    "attribution",
    "predicted_vs_realized",
    "step_alignment",
    "step_shares",
]

PAIRS: dict[str, tuple[str, str, str]] = {
    "r": ("cos_dr", "cos_ur", "retain gradient r"),
    "f": ("cos_df", "cos_uf", "forget gradient f"),
}
"""The panels of :func:`step_alignment`: gradient -> (metric of d, metric of u, title)."""

_CHANGES: dict[str, tuple[str, str, str, str]] = {
    "forget": ("pred_forget_change", "forget_loss", "forget_loss_after", "-<u, f>"),
    "retain": ("pred_retain_change", "retain_loss", "retain_loss_after", "-<u, r>"),
}
"""Loss -> (predicted-change metric, loss before, loss after the step, its formula)."""

_NO_STEP = (
    "the statistics of the step u the optimizer took (uu, uf, ur, ...) are absent or all NaN: "
    "a store of schema version < 3, or a run recorded with record_step=False "
    "(geomkit run --no-record-step)"
)


def _letter(k: int) -> str:
    return f"({chr(ord('a') + k)})"


def _has_step(run: Run) -> bool:
    """Whether ``run`` measured the step at some record (a finite ``uu``)."""
    ds = run.ds
    if "uu" not in ds.variables or ds.sizes.get("record", 0) == 0:
        return False
    return bool(np.isfinite(np.asarray(ds["uu"].values, dtype=np.float64)).any())


def _labels(runs: Sequence[Run]) -> str:
    """``"run 'a'"``, or ``"runs 'a', 'b', 'c' and 9 more"``."""
    names = ", ".join(repr(r.label) for r in runs[:3])
    more = f" and {len(runs) - 3} more" if len(runs) > 3 else ""
    return f"run {names}" if len(runs) == 1 else f"runs {names}{more}"


def _step_runs(runs: list[Run], figure: str) -> list[Run]:
    """The runs of ``runs`` that measured the step; raises with the reason when none did."""
    usable = [r for r in runs if _has_step(r)]
    if usable:
        return usable
    message = f"{figure}: no step statistics in {_labels(runs)}: {_NO_STEP}"
    if all("uu" not in r.ds.variables for r in runs):
        raise MissingVariable("uu", message)
    raise PlotSkipped(message)


def _applied(run: Run) -> str:
    """The applied strategy of ``run`` (first along ``strategy``)."""
    return run.strategy or str(run.ds["strategy"].values[0])


def _square(ax: Axes, x: np.ndarray, y: np.ndarray, pad: float = 0.06) -> tuple[float, float]:
    """Equal x and y limits holding the points and 0, the panel square."""
    values = np.concatenate([np.ravel(x), np.ravel(y), [0.0]])
    values = values[np.isfinite(values)]
    low, high = float(values.min()), float(values.max())
    span = (high - low) or max(abs(high), 1e-12)
    limits = (low - pad * span, high + pad * span)
    ax.set_xlim(*limits)
    ax.set_ylim(*limits)
    ax.set_aspect("equal", adjustable="box")
    return limits


def _guides(ax: Axes) -> object:
    """The y = x diagonal (dashed, labelled) and the zero lines of a scatter panel."""
    ax.axhline(0.0, color="0.5", linewidth=0.6, zorder=1)
    ax.axvline(0.0, color="0.5", linewidth=0.6, zorder=1)
    return ax.axline(
        (0.0, 0.0), slope=1.0, color="0.3", linestyle="--", linewidth=0.8, zorder=1, label="y = x"
    )


def _points_style(strategy: str, small: bool = False) -> dict:
    style = strategy_style(strategy)
    size = 6 if style.marker == "*" else 4
    return {
        "color": style.color,
        "marker": style.marker,
        "linestyle": "none",
        "markersize": size * (0.55 if small else 1.0),
        "markeredgewidth": 0.0 if small else 0.5,
        "markeredgecolor": "white",
        "alpha": 0.35 if small else 0.9,
        "zorder": 2 if small else 3,
    }


def _panel_grid(ax, objectives: list[str], columns: int, height: float):
    """One row of panels per objective, one column per quantity."""
    return resolve_axes(
        ax,
        len(objectives) * columns,
        ncols=columns,
        panel_size=(3.2, height),
        height=height * len(objectives) + 1.1,
    )


# --------------------------------------------------------------------------------------------
# cos(u, r) against cos(d, r)
# --------------------------------------------------------------------------------------------


def _alignment_frame(run: Run, by: str, pairs: Sequence[str]) -> pd.DataFrame:
    """Per recorded step (and ``by`` group): cos(d, g) of the applied strategy and cos(u, g)."""
    metrics = run.ds.geom.metrics(by=by)
    applied = _applied(run)
    parts = []
    for pair in pairs:
        of_d, of_u, _ = PAIRS[pair]
        table = xr.Dataset(
            {"x": metrics[of_d].sel(strategy=applied, drop=True), "y": metrics[of_u]}
        )
        frame = table.reset_coords(drop=True).to_dataframe().reset_index()
        frame["pair"] = pair
        parts.append(frame)
    frame = pd.concat(parts, ignore_index=True)
    frame["run"] = run.label
    frame["objective"], frame["strategy"] = run.method
    finite = np.isfinite(frame["x"]) & np.isfinite(frame["y"])
    return frame[finite]


def step_alignment(
    source: Source,
    *,
    pairs: Sequence[str] = ("r", "f"),
    layers: bool = False,
    ax: Axes | Sequence[Axes] | None = None,
    legend: bool = True,
) -> PlotResult:
    """cos(u, r) of the step the optimizer took against cos(d, r) of the combined update, one
    point per recorded step and run, one style per applied strategy, one row of panels per
    objective (and cos(u, f) against cos(d, f) beside it).

    A point on the dashed diagonal y = x means the optimizer kept the update's alignment;
    above it the step is better aligned with the gradient than d, below it worse (below zero:
    the step works against the gradient). Only the applied strategy takes a step, so each run
    gives the points of its own strategy; seeds of one method are pooled.

    Parameters
    ----------
    source : Dataset, path, Run or list of these
        Runs with step statistics (store schema version 3, ``record_step=True``); runs without
        them are left out (``extras["left_out"]``).
    pairs : sequence of {"r", "f"}
        The panels of each row: the retain gradient (cos(u, r) against cos(d, r)) and the
        forget gradient (cos(u, f) against cos(d, f)).
    layers : bool
        Add one small point per layer and recorded step (same style, faint) behind the
        whole-model points.
    ax : Axes or sequence of Axes, optional
        One per (objective, pair), objectives in sorted order, pairs within.
    legend : bool
        Add a legend: below a new figure, or right of the last of the given panels.

    Returns
    -------
    PlotResult
        ``artists[(objective, pair, strategy)]`` is the Line2D of the whole-model points
        (``(..., "layers")`` the per-layer points), ``artists[(objective, pair, "diagonal")]``
        the y = x line. ``extras``: ``points`` (DataFrame: run, objective, strategy, pair,
        record, [layer], x = cos(d, .), y = cos(u, .), and ``level``: ``"model"`` or
        ``"layer"``), ``panels`` ((objective, pair) -> Axes), ``left_out`` (runs without step
        statistics), ``legend``.

    Raises
    ------
    PlotSkipped
        When no run has step statistics (:class:`MissingVariable` when none has the fields).
    """
    pairs = list(pairs)
    if not pairs:
        raise invalid("pairs", pairs, "one or both of 'r', 'f'")
    for pair in pairs:
        check_choice("pairs", pair, list(PAIRS), owner="step_alignment")
    runs = load(source)
    usable = _step_runs(runs, "step_alignment")
    frames = []
    for run in usable:
        frame = _alignment_frame(run, "model", pairs)
        frame["level"] = "model"
        frames.append(frame)
        if layers:
            frame = _alignment_frame(run, "layer", pairs)
            frame["level"] = "layer"
            frames.append(frame)
    points = pd.concat(frames, ignore_index=True)
    methods = group_methods(usable)
    objectives = sorted({objective for objective, _ in methods})
    fig, axes = _panel_grid(ax, objectives, len(pairs), 3.0)
    panels = {
        (objective, pair): axes[i * len(pairs) + j]
        for i, objective in enumerate(objectives)
        for j, pair in enumerate(pairs)
    }
    first = usable[0].ds.geom.metrics(by="model")
    artists: dict[object, object] = {}
    for k, ((objective, pair), panel) in enumerate(panels.items()):
        of_d, of_u, title = PAIRS[pair]
        here = points[(points["objective"] == objective) & (points["pair"] == pair)]
        for (owner, strategy), members in methods.items():
            if owner != objective:
                continue
            labels = {r.label for r in members}
            mine = here[here["run"].isin(labels)]
            if layers:
                small = mine[mine["level"] == "layer"]
                (artists[(objective, pair, strategy, "layers")],) = panel.plot(
                    small["x"], small["y"], label="_nolegend_", **_points_style(strategy, True)
                )
            model = mine[mine["level"] == "model"]
            (artists[(objective, pair, strategy)],) = panel.plot(
                model["x"],
                model["y"],
                label=strategy_style(strategy).label,
                **_points_style(strategy),
            )
        artists[(objective, pair, "diagonal")] = _guides(panel)
        if here.empty:
            panel.text(0.5, 0.5, f"no {of_u} values", transform=panel.transAxes, ha="center")
        _square(panel, here["x"].to_numpy(), here["y"].to_numpy())
        panel.set_xlabel(f"{axis_label(first[of_d], of_d)} of the update d")
        panel.set_ylabel(f"{axis_label(first[of_u], of_u)} of the step u")
        panel.set_title(f"{_letter(k)} {objective}: {title}")
    place = None
    if legend:
        place = figure_legend(fig, axes) if ax is None else outside_legend(axes[-1])
    if ax is None:
        what = "recorded step" + (" (small: per layer)" if layers else "")
        fig.suptitle(
            textwrap.fill(
                f"Alignment of the step taken, u, against that of the combined update d, one "
                f"point per {what}. Above y = x the optimizer's step is better aligned with the "
                f"gradient than d; below, worse.",
                int(16 * fig.get_figwidth()),
            )
        )
    left_out = [r.label for r in runs if r not in usable]
    extras = {"points": points, "panels": panels, "left_out": left_out, "legend": place}
    return PlotResult(fig, axes, artists, extras)


# --------------------------------------------------------------------------------------------
# Attribution: each layer's share of the step's predicted loss changes
# --------------------------------------------------------------------------------------------


def step_shares(source: Source, by: str = "layer", *, run: str | int | None = None) -> xr.Dataset:
    """Each group's share of the step's predicted change of the forget and retain losses.

    ``forget`` is ``-<u, f>`` of the group divided by ``-<u, f>`` of the whole model at each
    recorded step (``retain`` likewise with ``-<u, r>``): the predicted changes are sums over
    tensors, so at every step where the model's change is finite and non-zero the shares of
    the groups sum to 1 exactly. A positive share moves the loss the way the whole model's step
    does, a negative one against it. NaN where the model's change is zero or not measured.

    Returns
    -------
    xarray.Dataset
        ``forget`` and ``retain`` of dims ``(by, record)``, and the model's predicted changes
        ``forget_total`` and ``retain_total`` (dim ``record``).
    """
    check_choice("by", by, ("layer", "component", "module", "tensor"), owner="step_shares")
    picked = single_run(source, run)
    _step_runs([picked], "attribution")
    groups = picked.ds.geom.metrics(by=by)
    model = picked.ds.geom.metrics(by="model")
    out = {}
    for loss, (metric, *_rest, formula) in _CHANGES.items():
        total = model[metric]
        usable = total.where(np.isfinite(total) & (total != 0))
        share = (groups[metric] / usable).transpose(by, "record")
        share.attrs = {
            "long_name": f"share of the predicted change of the {loss} loss",
            "units": "1",
            "description": f"{formula} of the {by} over {formula} of the whole model",
        }
        out[loss] = share
        out[f"{loss}_total"] = total
    result = xr.Dataset(out)
    result.attrs = {"run": picked.label, "strategy": _applied(picked), "grouping": by}
    return result


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least ``value``."""
    if not np.isfinite(value) or value <= 0:
        return 1.0
    power = 10.0 ** np.floor(np.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if step * power >= value * (1 - 1e-9):
            return float(step * power)
    return float(10 * power)  # pragma: no cover


UNSTABLE_BELOW: float = 0.1
""":func:`attribution` hatches the steps whose model change is smaller than this fraction of the
median magnitude of the run's model changes: a share of a change near 0 is large and unstable."""


def _unstable(total: xr.DataArray) -> np.ndarray:
    """Steps where the model's predicted change is non-zero but tiny (:data:`UNSTABLE_BELOW`);
    a change of exactly 0 has no shares (grey), not unstable ones."""
    values = np.abs(np.asarray(total.values, dtype=np.float64))
    defined = np.isfinite(values) & (values > 0)
    if not defined.any():
        return defined
    with np.errstate(invalid="ignore"):
        return defined & (values < UNSTABLE_BELOW * float(np.median(values[defined])))


def attribution(
    source: Source,
    *,
    by: str = "layer",
    run: str | int | None = None,
    ax: Sequence[Axes] | None = None,
    vmax: float | None = None,
    cmap: str = "RdBu_r",
    totals: bool = True,
    colorbar: bool = True,
) -> PlotResult:
    """Each layer's share of the predicted forgetting -<u, f> and of the predicted change of
    the retain loss -<u, r> of every recorded step: two layer x step heatmaps, one run.

    A share is the layer's first-order change divided by the whole model's at that step
    (:func:`step_shares`): exact, because the changes are sums over tensors, so each column
    sums to 1. Red (positive) layers move the loss the way the model's step does, blue
    (negative) ones against it; which way the model's step moves each loss is drawn above each
    heatmap (``totals``). The diverging colour scale is centred at 0 and symmetric; by default
    it reaches the 98th percentile of the magnitudes of the shares of the steps that are not
    hatched, rounded up (shares beyond it get the end colours, marked by the colour bar's
    arrows). Hatched steps: the model's change is
    below :data:`UNSTABLE_BELOW` of its median non-zero magnitude, so the shares of that step
    divide by nearly 0 and are large and unstable. Grey cells: the model's change is 0 or was
    not measured at that step.

    Parameters
    ----------
    source : Dataset, path, Run or list of these
        One run (or pick one of several with ``run``) with step statistics.
    by : {"layer", "component", "module", "tensor"}
        The rows.
    ax : sequence of two Axes, optional
        The forget and retain heatmaps (the model totals are then not drawn); default a new
        figure.
    vmax : float, optional
        The colour scale's limit (-vmax to vmax).
    cmap : str
        A diverging colour map.
    totals : bool
        Draw the model's predicted change over the steps above each heatmap (new figure only).
    colorbar : bool
        One colour bar below both heatmaps, its label stating the sign convention and scale.

    Returns
    -------
    PlotResult
        ``artists["forget"]`` and ``artists["retain"]`` are the QuadMeshes (arrays
        ``(group, record)``), ``artists[("forget", "total")]`` (and retain) the model-total
        lines. ``extras``: ``shares`` (the Dataset of :func:`step_shares`), ``groups``,
        ``records``, ``scale`` (the colour limits), ``unstable`` (loss -> the hatched
        records), ``colorbar``.
    """
    check_choice("by", by, ("layer", "component", "module", "tensor"), owner="attribution")
    if vmax is not None:
        check_real("vmax", vmax, 0.0, strict=True, owner="attribution")
    picked = single_run(source, run)
    shares = step_shares(picked, by)
    groups = [str(g) for g in shares[by].values]
    records = np.asarray(shares["record"].values)
    unstable = {loss: _unstable(shares[f"{loss}_total"]) for loss in _CHANGES}
    raw = np.concatenate([np.ravel(shares[loss].values) for loss in _CHANGES])
    finite = np.abs(raw[np.isfinite(raw)])
    if not finite.size:
        raise PlotSkipped(
            f"attribution: the whole model's predicted loss changes of run {picked.label!r} "
            "are zero or not finite at every recorded step (no share is defined)"
        )
    if vmax is None:  # the steps whose shares are stable (not hatched) set the scale
        stable = np.concatenate(
            [np.ravel(shares[loss].values[:, ~unstable[loss]]) for loss in _CHANGES]
        )
        stable = np.abs(stable[np.isfinite(stable)])
        top = _nice_ceiling(float(np.percentile(stable if stable.size else finite, 98)))
    else:
        top = float(vmax)
    extend = "neither" if finite.max() <= top * (1 + 1e-9) else "both"
    rows = 0.25 * len(groups) + 0.6
    strip = totals and ax is None
    if ax is None:
        fig, axes = resolve_axes(
            None,
            4 if strip else 2,
            ncols=2,
            width=DOUBLE_COLUMN,
            height=max(1.8, rows) + (1.1 if strip else 0.0) + 1.6,
            sharex="col",
            gridspec_kw={"height_ratios": [1.0, max(1.8, rows)]} if strip else {},
        )
        heat = axes[2:] if strip else axes
        lines = axes[:2] if strip else []
    else:
        fig, heat = resolve_axes(ax, 2)
        lines = []
    norm = Normalize(vmin=-top, vmax=top)
    artists: dict[object, object] = {}
    hatched: dict[str, np.ndarray] = {}
    applied = strategy_style(_applied(picked))
    for k, (loss, (*_, formula)) in enumerate(_CHANGES.items()):
        panel = heat[k]
        share = shares[loss]
        mesh = panel.pcolormesh(
            _edges(records),
            np.arange(len(groups) + 1) - 0.5,
            np.ma.masked_invalid(np.asarray(share.values, dtype=np.float64)),
            cmap=cmap,
            norm=norm,
        )
        artists[loss] = mesh
        hatched[loss] = records[unstable[loss]]
        edges = _edges(records)
        for i in np.flatnonzero(unstable[loss]):
            panel.add_patch(
                Rectangle(
                    (edges[i], -0.5),
                    edges[i + 1] - edges[i],
                    len(groups),
                    fill=False,
                    hatch="////",
                    edgecolor="0.35",
                    linewidth=0.0,
                    zorder=2,
                )
            )
        panel.set_facecolor("0.8")  # masked cells: the model's change is 0 or unmeasured
        panel.grid(False)
        panel.set_yticks(np.arange(len(groups)), group_labels(by, shares[by].values))
        panel.set_ylim(len(groups) - 0.5, -0.5)  # first group at the top
        panel.set_xlabel(axis_label(picked.ds["record"], "recorded optimizer step"))
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        if k == 0:
            panel.set_ylabel(axis_label(picked.ds[by] if by in picked.ds.coords else {}, by))
        title = f"{_letter(k)} {loss} loss: shares of {formula}"
        if lines:
            line_ax = lines[k]
            total = shares[f"{loss}_total"]
            (artists[(loss, "total")],) = line_ax.plot(
                records,
                np.asarray(total.values, dtype=np.float64),
                color=applied.color,
                marker=applied.marker,
                markersize=5 if applied.marker == "*" else 3,
                linewidth=1.0,
            )
            line_ax.axhline(0.0, color="0.5", linewidth=0.6, zorder=1)
            line_ax.set_ylabel(f"model\n{formula}")
            line_ax.set_title(title)
            line_ax.xaxis.set_tick_params(labelbottom=False)
            line_ax.yaxis.set_major_locator(MaxNLocator(nbins=3))
        else:
            panel.set_title(title)
    extras: dict[str, object] = {
        "shares": shares,
        "groups": groups,
        "records": records,
        "scale": (-top, top),
        "unstable": hatched,
        "colorbar": None,
    }
    if ax is None:
        fig.suptitle(
            f"Per-{by} share of each step's predicted loss changes, "
            f"{applied.label} applied, {picked.label}"
        )
    if colorbar:
        label = (
            f"share of the model's predicted change ({by}'s / model's; each column sums to 1)\n"
            f"> 0 (red): with the model's change, < 0 (blue): against it; scale ±{top:g}"
        )
        if any(len(v) for v in hatched.values()):
            label += (
                f"\nhatched: the model's change is below {UNSTABLE_BELOW:g} of its median size "
                "(shares unstable)"
            )
        extras["colorbar"] = fig.colorbar(
            artists["forget"],
            ax=list(heat),
            location="bottom",
            label=label,
            extend=extend,
            aspect=40,
            shrink=0.8,
        )
    return PlotResult(fig, [*heat, *lines], artists, extras)


# --------------------------------------------------------------------------------------------
# Predicted against realised loss changes
# --------------------------------------------------------------------------------------------


def _realized(run: Run) -> bool:
    """Whether ``run`` evaluated a loss after some step (``record_realized``)."""
    for _, before, after, _ in _CHANGES.values():
        if after in run.ds and before in run.ds:
            if np.isfinite(np.asarray(run.ds[after].values, dtype=np.float64)).any():
                return True
    return False


def _change_frame(run: Run) -> pd.DataFrame:
    """Per recorded step: predicted and realised change of each loss (finite pairs only)."""
    metrics = run.ds.geom.metrics(by="model")
    records = np.asarray(metrics["record"].values)
    rows = []
    for loss, (metric, before, after, _) in _CHANGES.items():
        if after not in run.ds or before not in run.ds:
            continue
        realised = (run.ds[after] - run.ds[before]).reindex(step=records)
        rows.append(
            pd.DataFrame(
                {
                    "record": records,
                    "loss": loss,
                    "predicted": np.asarray(metrics[metric].values, dtype=np.float64),
                    "realised": np.asarray(realised.values, dtype=np.float64),
                }
            )
        )
    frame = pd.concat(rows, ignore_index=True)
    frame["run"] = run.label
    frame["objective"], frame["strategy"] = run.method
    return frame[np.isfinite(frame["predicted"]) & np.isfinite(frame["realised"])]


def predicted_vs_realized(
    source: Source,
    *,
    losses: Sequence[str] = ("forget", "retain"),
    ax: Axes | Sequence[Axes] | None = None,
    legend: bool = True,
) -> PlotResult:
    """Realised change of the forget and retain losses against the first-order prediction of
    the step, -<u, f> and -<u, r>, one point per recorded step, one style per strategy, one
    row of panels per objective.

    The realised change is the loss on the step's own batches after the step minus before it
    (``forget_loss_after - forget_loss``; recorded with ``EngineConfig(record_realized=True)``
    or ``geomkit run --record-realized``). Points on the dashed diagonal y = x are predicted
    exactly; the gap is the step's higher-order (curvature) part, which grows with the step.

    Parameters
    ----------
    source : Dataset, path, Run or list of these
        Runs with step statistics and losses after the step; others are left out
        (``extras["left_out"]``).
    losses : sequence of {"forget", "retain"}
        The panels of each row.
    ax : Axes or sequence of Axes, optional
        One per (objective, loss), objectives in sorted order, losses within.
    legend : bool

    Returns
    -------
    PlotResult
        ``artists[(objective, loss, strategy)]`` is the Line2D of the points,
        ``artists[(objective, loss, "diagonal")]`` the y = x line. ``extras``: ``points``
        (DataFrame: run, objective, strategy, loss, record, predicted, realised), ``panels``,
        ``left_out``, ``legend``.

    Raises
    ------
    PlotSkipped
        When no run has step statistics, or none evaluated the losses after its steps.
    """
    losses = list(losses)
    if not losses:
        raise invalid("losses", losses, "one or both of 'forget', 'retain'")
    for loss in losses:
        check_choice("losses", loss, list(_CHANGES), owner="predicted_vs_realized")
    runs = load(source)
    stepped = _step_runs(runs, "predicted_vs_realized")
    usable = [r for r in stepped if _realized(r)]
    if not usable:
        raise PlotSkipped(
            f"predicted_vs_realized: no losses evaluated after the steps of {_labels(stepped)} "
            "(forget_loss_after and retain_loss_after are absent or all NaN); record them with "
            "EngineConfig(record_realized=True) or geomkit run --record-realized"
        )
    points = pd.concat([_change_frame(r) for r in usable], ignore_index=True)
    methods = group_methods(usable)
    objectives = sorted({objective for objective, _ in methods})
    fig, axes = _panel_grid(ax, objectives, len(losses), 3.0)
    panels = {
        (objective, loss): axes[i * len(losses) + j]
        for i, objective in enumerate(objectives)
        for j, loss in enumerate(losses)
    }
    first = usable[0]
    metrics = first.ds.geom.metrics(by="model")
    artists: dict[object, object] = {}
    for k, ((objective, loss), panel) in enumerate(panels.items()):
        metric, before, _, formula = _CHANGES[loss]
        here = points[(points["objective"] == objective) & (points["loss"] == loss)]
        for (owner, strategy), members in methods.items():
            if owner != objective:
                continue
            mine = here[here["run"].isin({r.label for r in members})]
            (artists[(objective, loss, strategy)],) = panel.plot(
                mine["predicted"],
                mine["realised"],
                label=strategy_style(strategy).label,
                **_points_style(strategy),
            )
        artists[(objective, loss, "diagonal")] = _guides(panel)
        if here.empty:
            panel.text(0.5, 0.5, f"no {loss} changes", transform=panel.transAxes, ha="center")
        _square(panel, here["predicted"].to_numpy(), here["realised"].to_numpy())
        name = first.ds[before].attrs.get("long_name", before)
        attrs = metrics[metric].attrs
        predicted = {**attrs, "long_name": f"{attrs.get('long_name', metric)}, {formula}"}
        panel.set_xlabel(axis_label(predicted, metric))
        panel.set_ylabel(f"realised change of the {name}\n(after - before the step)")
        panel.set_title(f"{_letter(k)} {objective}: {name}")
    place = None
    if legend:
        place = figure_legend(fig, axes) if ax is None else outside_legend(axes[-1])
    if ax is None:
        fig.suptitle(
            textwrap.fill(
                "Realised against first-order predicted change of each loss on the step's own "
                "batches, one point per recorded step; on y = x the prediction is exact.",
                int(16 * fig.get_figwidth()),
            )
        )
    left_out = [r.label for r in runs if r not in usable]
    extras = {"points": points, "panels": panels, "left_out": left_out, "legend": place}
    return PlotResult(fig, axes, artists, extras)
