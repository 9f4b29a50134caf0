"""Figures and tables of recorded gradient geometry (the only geomkit module importing matplotlib
and seaborn).

Every plot function takes anything :func:`geomkit.runs.load` does (a run, a ``run``-stacked
Dataset, run directories, :class:`geomkit.runs.Run` objects, or a list of these) and an optional
``ax``; it returns a :class:`PlotResult` with the artists it drew
and never calls ``plt.show``. A figure whose data is missing raises :class:`PlotSkipped`
(:class:`MissingVariable` for an absent variable or strategy) with the reason.
:func:`write_figures` writes the whole set. Figures mirror the SAGO paper (Xiao et al., ACL 2026,
arXiv 2604.14808) where it has them: Fig. 1 (:func:`loss_dynamics`), Fig. 3 (:func:`tradeoff`),
the geometry table of section 5.4 (:func:`geometry_table`). The step the optimizer took (store
schema version 3) has its own figures: :func:`step_alignment`, :func:`attribution`,
:func:`predicted_vs_realized`.

>>> import tempfile, torch, geomkit, geomkit.plot as gp
>>> tmp = tempfile.TemporaryDirectory()                  # a tiny GradDiff + SAGO run, 4 steps
>>> rec = geomkit.Recorder(f"{tmp.name}/run/geometry.zarr", ["layers.0.w"], [8], "sago",
...                        attrs={"objective": "graddiff", "seed": 0})
>>> for step in range(4):
...     rec.record(step, [torch.randn(8)], [torch.randn(8)], forget_loss=-step, retain_loss=1.0)
>>> rec.close()
>>> runs = geomkit.open_runs(tmp.name)                   # every run under a directory
>>> with gp.paper_style():
...     result = gp.loss_dynamics(runs)
...     written = gp.save(result.figure, f"{tmp.name}/figures/loss", formats=["png"], dpi=50)
>>> [path.name for path in written]
['loss.png']
>>> tmp.cleanup()
"""

from geomkit.plot.alignment import (
    alignment_by_layer,
    alignment_distributions,
    alignment_over_steps,
)
from geomkit.plot.dynamics import loss_dynamics
from geomkit.plot.figureset import write_figures
from geomkit.plot.heatmaps import conflict_heatmap, cos_fr_heatmap, layer_heatmap
from geomkit.plot.steps import attribution, predicted_vs_realized, step_alignment, step_shares
from geomkit.plot.style import (
    DOUBLE_COLUMN,
    MIN_FONT_SIZE,
    OUTSIDE_BLOCKS,
    SINGLE_COLUMN,
    STRATEGY_STYLES,
    MissingVariable,
    PlotResult,
    PlotSkipped,
    StrategyStyle,
    apply_style,
    axis_label,
    layer_label,
    paper_style,
    save,
    strategy_style,
)
from geomkit.plot.tables import geometry_table, geometry_table_markdown
from geomkit.plot.theorem import sago_vs_pcgrad, violation_rates
from geomkit.plot.tradeoff import final_evaluation, tradeoff, tradeoff_trajectories

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
    "alignment_by_layer",
    "alignment_distributions",
    "alignment_over_steps",
    "apply_style",
    "attribution",
    "axis_label",
    "conflict_heatmap",
    "cos_fr_heatmap",
    "final_evaluation",
    "geometry_table",
    "geometry_table_markdown",
    "layer_heatmap",
    "layer_label",
    "loss_dynamics",
    "paper_style",
    "predicted_vs_realized",
    "sago_vs_pcgrad",
    "save",
    "step_alignment",
    "step_shares",
    "strategy_style",
    "tradeoff",
    "tradeoff_trajectories",
    "violation_rates",
    "write_figures",
]
