"""One publication style for every geomkit figure: rcParams, strategy colours and markers, saving.

Strategy markers follow the SAGO paper's Fig. 3 (Xiao et al., ACL 2026, arXiv 2604.14808):
circle = forget-only, square = plain sum (+GD), triangle = PCGrad, star = SAGO; objective colours
follow the same figure (GA blue, NPO red, SimNPO orange, RMU purple), taken from seaborn's
colorblind palette. Colours and markers are fixed per name, so a strategy looks the same in
every plot.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from geomkit._validation import invalid

__all__ = [
    "OBJECTIVE_COLORS",
    "STRATEGY_STYLES",
    "MissingVariable",
    "PlotResult",
    "PlotSkipped",
    "StrategyStyle",
    "apply_style",
    "axis_label",
    "objective_color",
    "outside_legend",
    "paper_style",
    "save",
    "strategy_style",
]

_PALETTE = sns.color_palette("colorblind", 10)


class PlotSkipped(RuntimeError):
    """A figure cannot be drawn from this data (e.g. nothing was evaluated); the message says why.

    :func:`geomkit.plot.write_figures` catches it, logs the message and goes on.
    """


class MissingVariable(PlotSkipped):
    """A variable (or strategy) that a figure needs is not in the run.

    Attributes
    ----------
    variable : str
        The missing name.
    """

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(message)
        self.variable = variable


@dataclass(frozen=True)
class StrategyStyle:
    """How one combination strategy is drawn."""

    color: tuple[float, float, float]
    marker: str
    label: str


STRATEGY_STYLES: dict[str, StrategyStyle] = {
    "none": StrategyStyle(_PALETTE[7], "o", "forget only"),
    "sum": StrategyStyle(_PALETTE[0], "s", "sum"),
    "pcgrad": StrategyStyle(_PALETTE[1], "^", "PCGrad"),
    "pcgrad_global": StrategyStyle(_PALETTE[4], "v", "PCGrad (global)"),
    "sago": StrategyStyle(_PALETTE[2], "*", "SAGO"),
    "sago_prefer_retain": StrategyStyle(_PALETTE[9], "P", "SAGO (prefer retain)"),
    "blur": StrategyStyle(_PALETTE[5], "D", "BLUR"),
}
"""Colour, marker and display label of every registered strategy (``"none"``: forget-only)."""

_EXTRA_MARKERS = ("X", "h", "<", ">", "p", "d")

OBJECTIVE_COLORS: dict[str, tuple[float, float, float]] = {
    "ga": _PALETTE[0],
    "graddiff": _PALETTE[0],
    "npo": _PALETTE[3],
    "simnpo": _PALETTE[1],
    "rmu": _PALETTE[4],
}
"""Objective colours of the paper's Fig. 3: GA blue, NPO red, SimNPO orange, RMU purple."""

_RC: dict[str, Any] = {
    "pdf.fonttype": 42,  # TrueType: text stays editable in the PDF
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "savefig.bbox": "tight",
    "savefig.dpi": 300,
    "figure.dpi": 100,
    "figure.constrained_layout.use": True,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "legend.frameon": False,
    "lines.linewidth": 1.4,
    "lines.markersize": 5,
    "image.cmap": "viridis",
}


def outside_legend(ax: Axes, **kwargs: Any):
    """A legend to the right of ``ax`` (kept inside the saved figure by the tight bbox)."""
    options = {
        "loc": "upper left",
        "bbox_to_anchor": (1.02, 1.0),
        "borderaxespad": 0.0,
        "fontsize": "small",
    }
    return ax.legend(**{**options, **kwargs})


def strategy_style(name: str) -> StrategyStyle:
    """The :class:`StrategyStyle` of ``name``; unknown names get a stable fallback style."""
    if name in STRATEGY_STYLES:
        return STRATEGY_STYLES[name]
    # Stable across calls and processes (no hash randomisation): derived from the characters.
    code = sum(ord(c) for c in name)
    return StrategyStyle(_PALETTE[code % 10], _EXTRA_MARKERS[code % len(_EXTRA_MARKERS)], name)


def objective_color(name: str) -> tuple[float, float, float]:
    """The Fig. 3 colour of an objective; unknown objectives get a stable palette colour."""
    if name in OBJECTIVE_COLORS:
        return OBJECTIVE_COLORS[name]
    return _PALETTE[sum(ord(c) for c in name) % 10]


def _theme(font_scale: float) -> None:
    sns.set_theme(
        context="paper", style="ticks", palette="colorblind", font_scale=font_scale, rc=_RC
    )


@contextlib.contextmanager
def paper_style(font_scale: float = 1.0) -> Iterator[None]:
    """Apply the geomkit publication style inside a ``with`` block; rcParams are restored after.

    seaborn's ``"paper"`` context, ``"ticks"`` style and colorblind palette, TrueType fonts in
    PDF, tight bounding boxes, constrained layout.

    Examples
    --------
    >>> import matplotlib as mpl
    >>> before = mpl.rcParams["pdf.fonttype"]
    >>> with paper_style():
    ...     inside = mpl.rcParams["pdf.fonttype"]  # TrueType fonts: text stays editable in PDF
    >>> inside, mpl.rcParams["pdf.fonttype"] == before  # restored after the block
    (42, True)
    """
    with mpl.rc_context():
        _theme(font_scale)
        yield


def apply_style(font_scale: float = 1.0) -> None:
    """Apply the geomkit publication style globally (e.g. once at the top of a notebook)."""
    _theme(font_scale)


def save(
    fig: Figure,
    path_stem: str | os.PathLike,
    formats: Sequence[str] = ("pdf", "png"),
    *,
    dpi: int = 300,
) -> list[Path]:
    """Write ``fig`` as ``path_stem.<format>`` for each format (vector PDF and PNG by default).

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    path_stem : path
        Output path without suffix; parent directories are created.
    formats : sequence of str
        Any format matplotlib writes (``"pdf"``, ``"png"``, ``"svg"``, ...).
    dpi : int
        Resolution of raster formats.

    Returns
    -------
    list of Path
        The written files, in the order of ``formats``.
    """
    if isinstance(formats, str):
        formats = (formats,)
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    supported = fig.canvas.get_supported_filetypes()
    paths = []
    for fmt in formats:
        fmt = fmt.lower().lstrip(".")
        if fmt not in supported:
            raise invalid(
                "format", fmt, "a format matplotlib writes: " + ", ".join(sorted(supported))
            )
        path = stem.with_name(stem.name + "." + fmt)
        # No creation date: the same figure gives the same PDF bytes.
        metadata = {"CreationDate": None} if fmt == "pdf" else None
        fig.savefig(path, format=fmt, dpi=dpi, metadata=metadata)
        paths.append(path)
    return paths


def axis_label(source: Any, fallback: str | None = None, *, width: int = 48) -> str:
    """An axis label from a variable's ``long_name`` and ``units`` (units ``"1"`` are omitted).

    Parameters
    ----------
    source : DataArray or mapping
        Anything with ``.attrs``, or the attributes themselves.
    fallback : str, optional
        Used when there is no ``long_name`` (default: the variable's name).
    width : int
        Labels longer than this are wrapped onto several lines.
    """
    attrs: Mapping[str, Any] = getattr(source, "attrs", source) or {}
    name = attrs.get("long_name") or fallback or str(getattr(source, "name", "") or "")
    units = attrs.get("units")
    label = f"{name} [{units}]" if units not in (None, "", "1") else str(name)
    return "\n".join(textwrap.wrap(label, width)) if len(label) > width else label


# --------------------------------------------------------------------------------------------
# Figures and results
# --------------------------------------------------------------------------------------------

_DETACHED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "geomkit_plot_detached", default=False
)


@contextlib.contextmanager
def detached_figures() -> Iterator[None]:
    """Inside the block, plot functions create plain :class:`~matplotlib.figure.Figure` objects
    that pyplot does not track (no backend, nothing to close), as the figure-set writer does."""
    token = _DETACHED.set(True)
    try:
        yield
    finally:
        _DETACHED.reset(token)


def new_figure(
    nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None, **kwargs: Any
) -> tuple[Figure, np.ndarray]:
    """A new figure and a 2-D array of axes (pyplot-managed unless :func:`detached_figures`)."""
    if _DETACHED.get():
        fig = Figure(figsize=figsize)
        axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    else:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, **kwargs)
    return fig, axes


@dataclass
class PlotResult:
    """What a plot function drew.

    Attributes
    ----------
    figure : Figure
        The figure holding the axes.
    axes : list of Axes
        The panels drawn on, in order (``ax`` is the first).
    artists : dict
        The data artists, keyed by what they show (a strategy name, ``(layer, strategy)``,
        ``"heatmap"``, a method key, ...).
    extras : dict
        Supporting artists and values: ``"colorbar"``, ``"legend"``, ``"arrows"``,
        ``"target"``, computed ``"points"``, ...
    """

    figure: Figure
    axes: list[Axes]
    artists: dict[Any, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def ax(self) -> Axes:
        """The first (often the only) panel."""
        return self.axes[0]


def resolve_axes(
    ax: Axes | Sequence[Axes] | np.ndarray | None,
    n: int,
    *,
    ncols: int | None = None,
    panel_size: tuple[float, float] = (3.2, 2.4),
    **kwargs: Any,
) -> tuple[Figure, list[Axes]]:
    """``n`` panels: the given axes (checked to be ``n``) or a new figure laid out in a grid."""
    if ax is None:
        ncols = max(1, min(n, ncols or n))
        nrows = -(-n // ncols)
        fig, grid = new_figure(
            nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), **kwargs
        )
        flat = list(grid.ravel())
        for extra in flat[n:]:
            extra.set_visible(False)
        return fig, flat[:n]
    axes = [ax] if isinstance(ax, Axes) else list(np.ravel(np.asarray(ax, dtype=object)))
    if len(axes) != n:
        raise ValueError(f"invalid ax of {len(axes)} axes: expected {n}, one per panel")
    return root_figure(axes[0]), axes


def root_figure(ax: Axes) -> Figure:
    """The top-level figure of ``ax`` (through subfigures)."""
    fig = ax.figure
    while getattr(fig, "figure", fig) is not fig:
        fig = fig.figure
    return fig
