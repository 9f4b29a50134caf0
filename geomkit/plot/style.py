"""One publication style for every geomkit figure: rcParams, strategy colours and markers, saving.

Strategy markers follow the SAGO paper's Fig. 3 (Xiao et al., ACL 2026, arXiv 2604.14808):
circle = forget-only, square = plain sum (+GD), triangle = PCGrad, star = SAGO. Colours come
from the Okabe-Ito palette (distinguishable with the common colour-vision deficiencies), one hue
per strategy. A strategy has the same colour and marker in every figure; no figure colours by
objective (several objectives go to separate panels).

Every figure is drawn for one of two printed widths, :data:`SINGLE_COLUMN` (3.3 in) and
:data:`DOUBLE_COLUMN` (6.9 in), with no text below :data:`MIN_FONT_SIZE` (7 pt) at that width.
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
    "DOUBLE_COLUMN",
    "MIN_FONT_SIZE",
    "OUTSIDE_BLOCKS",
    "SINGLE_COLUMN",
    "STRATEGY_STYLES",
    "MissingVariable",
    "PlotResult",
    "PlotSkipped",
    "StrategyStyle",
    "apply_style",
    "axis_label",
    "documented_width",
    "figure_legend",
    "group_labels",
    "layer_label",
    "outside_legend",
    "paper_style",
    "save",
    "strategy_style",
]

_PALETTE = sns.color_palette("colorblind", 10)  # fallback colours of unregistered strategies


def _hex(code: str) -> tuple[float, float, float]:
    return tuple(int(code[i : i + 2], 16) / 255 for i in (1, 3, 5))  # type: ignore[return-value]


OKABE_ITO: dict[str, tuple[float, float, float]] = {
    name: _hex(code)
    for name, code in {
        "black": "#000000",
        "orange": "#E69F00",
        "sky blue": "#56B4E9",
        "bluish green": "#009E73",
        "yellow": "#F0E442",
        "blue": "#0072B2",
        "vermillion": "#D55E00",
        "reddish purple": "#CC79A7",
    }.items()
}
"""The Okabe-Ito colour-blind-safe palette (Okabe & Ito 2008), by name."""

SINGLE_COLUMN: float = 3.3
"""Printed width in inches of a single-column figure of a two-column paper."""

DOUBLE_COLUMN: float = 6.9
"""Printed width in inches of a figure spanning both columns."""

MIN_FONT_SIZE: float = 7.0
"""No text of a geomkit figure is smaller than this (points) at its documented width."""

OUTSIDE_BLOCKS: str = "outside blocks"
"""The name of layer ``-1``: tensors outside the transformer blocks (embeddings, final norm,
output head; :mod:`geomkit.layers`), in every figure and table."""


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
    "none": StrategyStyle((0.4, 0.4, 0.4), "o", "forget only"),
    "sum": StrategyStyle(OKABE_ITO["black"], "s", "sum"),
    "pcgrad": StrategyStyle(OKABE_ITO["vermillion"], "^", "PCGrad"),
    "pcgrad_global": StrategyStyle(OKABE_ITO["orange"], "v", "PCGrad (global)"),
    "sago": StrategyStyle(OKABE_ITO["blue"], "*", "SAGO"),
    "sago_prefer_retain": StrategyStyle(OKABE_ITO["bluish green"], "P", "SAGO (prefer retain)"),
    "blur": StrategyStyle(OKABE_ITO["reddish purple"], "D", "BLUR"),
}
"""Colour, marker and display label of every registered strategy (``"none"``: forget-only):
one Okabe-Ito hue each (black for the plain sum, dark grey for forget-only), the same in
every figure."""

_EXTRA_MARKERS = ("X", "h", "<", ">", "p", "d")

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
    # Sizes in points for a figure printed at its documented width (MIN_FONT_SIZE and up).
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "figure.titlesize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
}


def outside_legend(ax: Axes, **kwargs: Any):
    """A legend to the right of ``ax`` (kept inside the saved figure by the tight bbox)."""
    options = {
        "loc": "upper left",
        "bbox_to_anchor": (1.02, 1.0),
        "borderaxespad": 0.0,
    }
    return ax.legend(**{**options, **kwargs})


def figure_legend(fig: Figure, axes: Sequence[Axes], *, ncols: int | None = None, **kwargs: Any):
    """One legend below the panels of ``fig`` with every distinct labelled artist of ``axes``
    (first occurrence; strategies first); None when there is none."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if not entries:
        return None
    # Strategies first, then the rest (a target line, ...).
    known = {style.label for style in STRATEGY_STYLES.values()}
    order = sorted(entries, key=lambda label: label.removesuffix(" (shadow)") not in known)
    entries = {label: entries[label] for label in order}
    if ncols is None:  # as many ~1.6 in wide columns as the figure's width holds
        ncols = max(1, min(len(entries), int(fig.get_figwidth() / 1.6)))
    options = {"loc": "outside lower center", "ncols": ncols}
    return fig.legend(list(entries.values()), list(entries), **{**options, **kwargs})


def layer_label(layer: int, *, prefix: bool = False) -> str:
    """How a layer index is written in figures: ``"3"`` (``"layer 3"`` with ``prefix``), and
    :data:`OUTSIDE_BLOCKS` for ``-1``.

    Examples
    --------
    >>> layer_label(3), layer_label(3, prefix=True), layer_label(-1)
    ('3', 'layer 3', 'outside blocks')
    """
    layer = int(layer)
    if layer < 0:
        return OUTSIDE_BLOCKS
    return f"layer {layer}" if prefix else str(layer)


def group_labels(by: str, values: Sequence[Any]) -> list[str]:
    """Tick labels of groups ``values`` of the grouping ``by`` (layer ``-1`` by name)."""
    if by == "layer":
        return [layer_label(v) for v in values]
    return [str(v) for v in values]


def strategy_style(name: str) -> StrategyStyle:
    """The :class:`StrategyStyle` of ``name``; unknown names get a stable fallback style."""
    if name in STRATEGY_STYLES:
        return STRATEGY_STYLES[name]
    # Stable across calls and processes (no hash randomisation): derived from the characters.
    code = sum(ord(c) for c in name)
    return StrategyStyle(_PALETTE[code % 10], _EXTRA_MARKERS[code % len(_EXTRA_MARKERS)], name)


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


def documented_width(width: float) -> float:
    """The documented width a figure of natural ``width`` inches is drawn at:
    :data:`SINGLE_COLUMN` up to 4 in, else :data:`DOUBLE_COLUMN`."""
    return SINGLE_COLUMN if width <= 4.0 else DOUBLE_COLUMN


def resolve_axes(
    ax: Axes | Sequence[Axes] | np.ndarray | None,
    n: int,
    *,
    ncols: int | None = None,
    panel_size: tuple[float, float] = (3.2, 2.4),
    width: float | None = None,
    height: float | None = None,
    **kwargs: Any,
) -> tuple[Figure, list[Axes]]:
    """``n`` panels: the given axes (checked to be ``n``) or a new figure laid out in a grid.

    A new figure is ``width`` inches wide (default the :func:`documented_width` of
    ``panel_size[0] * ncols``) and ``height`` inches tall (default ``panel_size[1]`` per row).
    In a grid with an
    incomplete last row, panels with nothing below them keep their x tick labels.
    """
    if ax is None:
        ncols = max(1, min(n, ncols or n))
        nrows = -(-n // ncols)
        width = documented_width(panel_size[0] * ncols) if width is None else width
        height = panel_size[1] * nrows if height is None else height
        fig, grid = new_figure(nrows, ncols, figsize=(width, height), **kwargs)
        flat = list(grid.ravel())
        for extra in flat[n:]:
            extra.set_visible(False)
        for i in range(max(0, n - ncols), n):  # the lowest visible panel of each column
            flat[i].xaxis.set_tick_params(labelbottom=True)
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
