"""The paper's gradient-geometry table (SAGO, Xiao et al., ACL 2026, arXiv 2604.14808, section
5.4): cos(f, r), cos(d, r) and cos(d, f) on the whole model, averaged over recorded steps, in two
views.

* ``"same"`` (same gradients, the default): every strategy's update formed on the same (f, r),
  the gradients of each recorded run (the applied strategy measured, the others as shadows), so
  rows differ only by the method.
* ``"own"`` (own trajectory, the paper's table): each strategy on the runs that applied it, so
  rows also differ by where training went (e.g. SAGO's runs reach a larger |f| / |r|).

Both report the median |f| / |r| of their steps and count the steps with defined cosines.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd

from geomkit._deprecation import GeomkitDeprecationWarning
from geomkit._validation import check_choice
from geomkit.plot._data import Run, Source, require_geometry
from geomkit.plot.style import STRATEGY_STYLES, strategy_style
from geomkit.runs import load

__all__ = ["COLUMNS", "TABLE_COLUMNS", "VIEWS", "geometry_table", "geometry_table_markdown"]

logger = logging.getLogger("geomkit.plot")

COLUMNS: dict[str, str] = {
    "cos_fr": "Forget-Retain cos(f, r)",
    "cos_dr": "Comb-Retain cos(d, r)",
    "cos_df": "Comb-Forget cos(d, f)",
}
"""The table's cosines with the paper's column names (section 5.4)."""

VIEWS: dict[str, str] = {
    "same": "same gradients",
    "own": "own trajectory",
}
"""The two views of :func:`geometry_table`."""

TABLE_COLUMNS: tuple[str, ...] = (
    "objective",
    "view",
    "trajectory",
    "strategy",
    "applied",
    "runs",
    "steps",
    "median_ratio",
    *COLUMNS,
    *(f"{c}_sd" for c in COLUMNS),
)
"""Columns of :func:`geometry_table`."""


def _order(name: str) -> tuple[int, str]:
    names = list(STRATEGY_STYLES)
    return (names.index(name) if name in names else len(names), name)


def _per_run(run: Run, names: list[str]) -> dict[str, dict[str, object]]:
    """For each strategy of ``names``: the means over the steps where its three model-level
    cosines are defined, their count, and the |f| / |r| of those steps."""
    require_geometry(run, "geometry_table")
    metrics = run.ds.geom.metrics(by="model")
    cos_fr = np.asarray(metrics["cos_fr"].values, dtype=np.float64)
    ratio = np.asarray(metrics["norm_ratio"].values, dtype=np.float64)
    out = {}
    for name in names:
        cos_dr = np.asarray(metrics["cos_dr"].sel(strategy=name).values, dtype=np.float64)
        cos_df = np.asarray(metrics["cos_df"].sel(strategy=name).values, dtype=np.float64)
        defined = np.isfinite(cos_fr) & np.isfinite(cos_dr) & np.isfinite(cos_df)
        n = int(defined.sum())
        values = {"cos_fr": cos_fr, "cos_dr": cos_dr, "cos_df": cos_df}
        out[name] = {
            "steps": n,
            "ratio": ratio[defined],
            **{k: float(v[defined].mean()) if n else np.nan for k, v in values.items()},
        }
    return out


def _row(
    objective: str,
    view: str,
    trajectories: list[str],
    name: str,
    members: list[Run],
    values: list[dict[str, object]],
) -> dict[str, object]:
    ratio = np.concatenate([np.asarray(v["ratio"], dtype=np.float64) for v in values])
    finite = ratio[np.isfinite(ratio)]
    row: dict[str, object] = {
        "objective": objective,
        "view": view,
        "trajectory": ",".join(trajectories),
        "strategy": name,
        "applied": all(run.strategy == name for run in members),
        "runs": len(values),
        "steps": int(sum(int(v["steps"]) for v in values)),
        "median_ratio": float(np.median(finite)) if finite.size else np.nan,
    }
    for column in COLUMNS:
        runs = np.asarray([v[column] for v in values], dtype=np.float64)
        runs = runs[np.isfinite(runs)]  # a run without a defined step has no mean
        row[column] = float(runs.mean()) if runs.size else np.nan
        row[f"{column}_sd"] = float(runs.std(ddof=1)) if runs.size > 1 else np.nan
    return row


def geometry_table(
    source: Source,
    *,
    view: str = "same",
    by_trajectory: bool = False,
    shadows: bool | None = None,
) -> pd.DataFrame:
    """Model-level cosines per method: mean over recorded steps, then mean ± sd over runs.

    Parameters
    ----------
    source : Dataset or list of Datasets
        Runs (anything :func:`geomkit.runs.load` takes); runs of one objective and applied
        strategy (e.g. seeds) are replicates.
    view : {"same", "own"}
        ``"same"`` (same gradients): every strategy recorded in all runs of an objective
        (applied or shadow), on the gradients of each of those runs; one row per (objective,
        strategy), so every row of an objective averages over the same steps of the same runs.
        ``"own"`` (own trajectory, the paper's table): one row per (objective, applied
        strategy), from the runs that applied it.
    by_trajectory : bool
        With ``view="same"``: one row per (objective, trajectory, strategy) instead, each on
        the gradients of the runs that applied ``trajectory``.
    shadows : bool, optional
        Deprecated: ``shadows=False`` is ``view="own"``, ``shadows=True`` is ``view="same",
        by_trajectory=True``.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`TABLE_COLUMNS`: ``objective``, ``view``, ``trajectory`` (the applied
        strategies of the runs the gradients come from, comma-separated), ``strategy``,
        ``applied`` (every value is from the applied, measured update), ``runs``, ``steps``
        (recorded steps, over the runs, where the row's three cosines are all defined; means
        are over these steps), ``median_ratio`` (median model |f| / |r| over those steps),
        ``cos_fr``, ``cos_dr``, ``cos_df`` and their ``*_sd`` across runs (NaN for one run).

    Examples
    --------
    >>> import tempfile, torch, geomkit
    >>> import geomkit.plot as gp
    >>> tmp = tempfile.TemporaryDirectory()
    >>> with geomkit.Recorder(f"{tmp.name}/geometry.zarr", ["w"], [8], "sago",
    ...                       shadows=["pcgrad"]) as rec:
    ...     for step in range(3):
    ...         rec.record(step, [torch.randn(8)], [torch.randn(8)])
    >>> table = gp.geometry_table(geomkit.open_run(tmp.name))
    >>> list(table["strategy"]), list(table["steps"])   # both on the same 3 steps
    (['pcgrad', 'sago'], [3, 3])
    >>> tmp.cleanup()
    """
    if shadows is not None:
        warnings.warn(
            "argument 'shadows=' is deprecated and will be removed; use view='own' "
            "(shadows=False) or view='same', by_trajectory=True (shadows=True)",
            GeomkitDeprecationWarning,
            stacklevel=2,
        )
        view, by_trajectory = ("same", True) if shadows else ("own", False)
    check_choice("view", view, tuple(VIEWS))
    runs = load(source)
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        objective, trajectory = run.method
        key = (objective,) if view == "same" and not by_trajectory else (objective, trajectory)
        groups.setdefault(key, []).append(run)
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], *(_order(x) for x in k[1:]))):
        members = groups[key]
        trajectories = sorted({run.method[1] for run in members}, key=_order)
        if view == "own":
            names = [key[1]]
            present = [[str(s) for s in run.ds["strategy"].values] for run in members]
            if not all(key[1] in p for p in present):
                continue  # e.g. forget-only runs: no combined update
        else:
            common = set.intersection(
                *({str(s) for s in run.ds["strategy"].values} for run in members)
            )
            recorded = {str(s) for run in members for s in run.ds["strategy"].values}
            if recorded - common:
                logger.warning(
                    "geometry_table: strategies %s are not recorded in every run of %s and are "
                    "left out of the same-gradient view",
                    sorted(recorded - common),
                    "/".join(key),
                )
            names = sorted(common, key=_order)
        per_run = [_per_run(run, names) for run in members]
        for name in names:
            values = [p[name] for p in per_run]
            rows.append(_row(key[0], VIEWS[view], trajectories, name, members, values))
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _cell(mean: float, sd: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "n/a"
    text = f"{mean:.{digits}f}"
    return f"{text} ± {sd:.{digits}f}" if np.isfinite(sd) else text


_CAPTIONS = {
    VIEWS["same"]: (
        "Same gradients: every strategy's update formed on the (f, r) of the same runs "
        "(trajectories: {trajectories}; applied strategy measured, the others as shadows). "
    ),
    VIEWS["own"]: "Own trajectory: each strategy on the runs that applied it. ",
}
_CAPTION_TAIL = (
    "Model level; mean over the recorded steps with defined cosines (Steps, summed over runs), "
    "then mean ± sd over runs; median |f|/|r| over those steps."
)


def geometry_table_markdown(
    table: pd.DataFrame | Source, *, digits: int = 2, caption: bool = True
) -> str:
    """The geometry table as a Markdown table (paper column names; mean ± sd across runs).

    Parameters
    ----------
    table : DataFrame or runs
        The result of :func:`geometry_table`, or runs to compute it from (same-gradient view).
    digits : int
        Decimal places of the cosines.
    caption : bool
        Add a line after the table saying which view it is and how the numbers were averaged.
    """
    if not isinstance(table, pd.DataFrame):
        table = geometry_table(table)
    several = table["objective"].nunique() > 1
    header = ["Objective"] if several else []
    header += ["Method", "Runs", "Steps", "median \\|f\\|/\\|r\\|", *COLUMNS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    trajectories = table.groupby("objective")["trajectory"].nunique()
    for row in table.itertuples(index=False):
        label = strategy_style(row.strategy).label
        if row.view == VIEWS["own"] or trajectories[row.objective] > 1:
            if not row.applied:
                names = ", ".join(strategy_style(t).label for t in row.trajectory.split(","))
                label += f" (on {names} runs)"
        cells = [str(row.objective)] if several else []
        ratio = f"{row.median_ratio:.3g}" if np.isfinite(row.median_ratio) else "n/a"
        cells += [label, str(row.runs), str(row.steps), ratio]
        cells += [_cell(getattr(row, c), getattr(row, f"{c}_sd"), digits) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    views = set(table["view"])
    if caption and len(views) == 1:
        (view,) = views
        names = sorted({t for ts in table["trajectory"] for t in ts.split(",")}, key=_order)
        head = _CAPTIONS.get(view, "").format(
            trajectories=", ".join(strategy_style(t).label for t in names)
        )
        text += "\n" + head + _CAPTION_TAIL + "\n"
    return text
