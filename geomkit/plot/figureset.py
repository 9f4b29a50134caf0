"""The whole figure set of one or several runs, written to a directory (``geomkit plot``)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from geomkit._deprecation import renamed
from geomkit.plot._data import Run, Source
from geomkit.plot.alignment import alignment_by_layer, alignment_distributions, alignment_over_steps
from geomkit.plot.dynamics import loss_dynamics
from geomkit.plot.heatmaps import conflict_heatmap, cos_fr_heatmap
from geomkit.plot.steps import attribution, predicted_vs_realized, step_alignment
from geomkit.plot.style import PlotResult, PlotSkipped, detached_figures, paper_style, save
from geomkit.plot.tables import geometry_table, geometry_table_markdown
from geomkit.plot.theorem import sago_vs_pcgrad, violation_rates
from geomkit.plot.tradeoff import tradeoff, tradeoff_trajectories
from geomkit.runs import load

__all__ = ["RUN_FIGURES", "SET_FIGURES", "write_figures"]

logger = logging.getLogger("geomkit.plot")

RUN_FIGURES: dict[str, Callable[[Run], PlotResult]] = {
    "cos_fr_heatmap": lambda run: cos_fr_heatmap(run),
    "conflict_heatmap": lambda run: conflict_heatmap(run, nonzero=True),
    "alignment": lambda run: alignment_over_steps(run),
    "alignment_layers_cos_dr": lambda run: alignment_by_layer(run, "cos_dr"),
    "alignment_layers_cos_df": lambda run: alignment_by_layer(run, "cos_df"),
    "distribution_cos_dr": lambda run: alignment_distributions(run, "cos_dr"),
    "distribution_cos_df": lambda run: alignment_distributions(run, "cos_df"),
    "attribution": lambda run: attribution(run),
}
"""Figures drawn for each run (in a subdirectory per run when there are several)."""

SET_FIGURES: dict[str, Callable[[list[Run]], PlotResult]] = {
    "loss_dynamics": loss_dynamics,
    "tradeoff_retain": lambda runs: tradeoff(runs, y="retain_acc"),
    "tradeoff_general": lambda runs: tradeoff(runs, y="general_acc"),
    "tradeoff_trajectories_retain": lambda runs: tradeoff_trajectories(runs, y="retain_acc"),
    "tradeoff_trajectories_general": lambda runs: tradeoff_trajectories(runs, y="general_acc"),
    "sago_vs_pcgrad": sago_vs_pcgrad,
    "step_alignment": step_alignment,
    "predicted_vs_realized": predicted_vs_realized,
}
"""Figures drawn once for all runs together."""


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", label).strip("._") or "run"


@renamed(out_dir="out")
def write_figures(
    source: Source,
    out: str | os.PathLike,
    formats: Sequence[str] = ("pdf", "png"),
    *,
    audit: pd.DataFrame | None = None,
    dpi: int = 300,
    per_run: Sequence[str] | None = None,
) -> dict[str, list[Path] | str]:
    """Write every figure and the geometry table for one or several runs.

    Figures whose data is missing (e.g. no evaluations, a strategy not recorded) are skipped:
    the reason is logged (logger ``geomkit.plot``) and returned instead of paths. Figures are
    drawn in the :func:`~geomkit.plot.paper_style` on figures pyplot does not track, so nothing
    is left open and no backend is needed.

    Parameters
    ----------
    source : Dataset, path, Run or list of these
        Anything :func:`geomkit.runs.load` takes: a run, a ``run``-stacked Dataset, a run
        directory, a directory of runs, runs, or a list of these.
    out : path
        Created if needed. With several runs, per-run figures go to ``out/<run>/``.
    formats : sequence of str
        File formats of each figure (vector PDF and PNG by default).
    audit : pandas.DataFrame, optional
        ``Audit.to_frame()`` of :mod:`geomkit.theory` for the violation-rate figure.
    dpi : int
        Resolution of raster formats.
    per_run : sequence of str, optional
        Labels of the runs that get the per-run figures (default: every run); the figures of
        the whole set always use every run.

    Returns
    -------
    dict
        Figure name (``<run>/<figure>`` for per-run figures of several runs) to the written
        paths, or to ``"skipped: <reason>"``. Names: the keys of :data:`RUN_FIGURES` and
        :data:`SET_FIGURES`, ``geometry_table`` (``.md`` and ``.csv``: same gradients),
        ``geometry_table_own`` (own trajectory) and ``violation_rates``; each figure is written
        as ``<name>.<format>`` (docs/figures.md shows them all).
    """
    runs = load(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[Path] | str] = {}

    def emit(name: str, stem: Path, draw: Callable[[], PlotResult]) -> None:
        try:
            result = draw()
        except PlotSkipped as reason:
            logger.warning("skipped figure %s: %s", name, reason)
            results[name] = f"skipped: {reason}"
            return
        try:
            results[name] = save(result.figure, stem, formats, dpi=dpi)
        finally:
            result.figure.clear()

    with paper_style(), detached_figures():
        several = len(runs) > 1
        labels = {run.label for run in runs}
        unknown = sorted(set(per_run or ()) - labels)
        if unknown:
            raise ValueError(f"per_run names runs that are not in the source: {unknown}")
        for run in runs:
            if per_run is not None and run.label not in per_run:
                continue
            folder = out / _safe(run.label) if several else out
            for name, draw in RUN_FIGURES.items():
                key = f"{run.label}/{name}" if several else name
                emit(key, folder / name, lambda draw=draw, run=run: draw(run))
        for name, draw in SET_FIGURES.items():
            emit(name, out / name, lambda draw=draw: draw(runs))
        if audit is None:
            reason = "no audit frame given (pass audit=Audit.to_frame() of geomkit.theory)"
            logger.info("skipped figure violation_rates: %s", reason)
            results["violation_rates"] = f"skipped: {reason}"
        else:
            emit(
                "violation_rates",
                out / "violation_rates",
                lambda: violation_rates(audit, objectives=runs),
            )
    # the same-gradient table is the default; the own-trajectory table beside it
    for name, view in (("geometry_table", "same"), ("geometry_table_own", "own")):
        try:
            table = geometry_table(runs, view=view)
        except PlotSkipped as reason:
            logger.warning("skipped %s: %s", name, reason)
            results[name] = f"skipped: {reason}"
        else:
            markdown, csv = out / f"{name}.md", out / f"{name}.csv"
            markdown.write_text(geometry_table_markdown(table))
            table.to_csv(csv, index=False)
            results[name] = [markdown, csv]
    return results
