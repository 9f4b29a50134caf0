"""The paper's gradient-geometry table (SAGO, Xiao et al., ACL 2026, arXiv 2604.14808, section
5.4): cos(f, r), cos(d, r) and cos(d, f) on the whole model, averaged over recorded steps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from geomkit.plot._data import Source, require_geometry
from geomkit.plot._methods import group_methods
from geomkit.plot.style import strategy_style
from geomkit.runs import load

__all__ = ["COLUMNS", "geometry_table", "geometry_table_markdown"]

COLUMNS: dict[str, str] = {
    "cos_fr": "Forget-Retain cos(f, r)",
    "cos_dr": "Comb-Retain cos(d, r)",
    "cos_df": "Comb-Forget cos(d, f)",
}
"""The table's cosines with the paper's column names (section 5.4)."""


def geometry_table(source: Source, *, shadows: bool = False) -> pd.DataFrame:
    """Mean over recorded steps of the model-level cosines, per method.

    Each run contributes its applied strategy (the paper's table: one row per method, each
    from its own run, so cos(f, r) differs between rows). With ``shadows=True`` each run also
    contributes the shadow strategies evaluated on its gradients (same cos(f, r) as the run).
    Seeds of a method are averaged; ``*_sd`` columns give the standard deviation across seeds.

    Parameters
    ----------
    source : Dataset or list of Datasets
    shadows : bool
        Add rows for shadow strategies.

    Returns
    -------
    pandas.DataFrame
        Columns ``objective``, ``trajectory`` (the applied strategy of the runs the gradients
        come from), ``strategy``, ``applied``, ``runs``, ``records`` (recorded steps per run,
        mean), ``cos_fr``, ``cos_dr``, ``cos_df`` and ``cos_fr_sd``, ``cos_dr_sd``, ``cos_df_sd``.
    """
    rows = []
    for (objective, trajectory), members in group_methods(load(source)).items():
        per_strategy: dict[str, list[dict[str, float]]] = {}
        for run in members:
            require_geometry(run, "geometry_table")
            metrics = run.ds.geom.metrics(by="model")
            names = [str(s) for s in metrics["strategy"].values]
            chosen = names if shadows else [run.strategy]
            cos_fr = _mean(metrics["cos_fr"])
            for name in chosen:
                if name not in names:
                    continue
                per_strategy.setdefault(name, []).append(
                    {
                        "records": metrics.sizes["record"],
                        "cos_fr": cos_fr,
                        "cos_dr": _mean(metrics["cos_dr"].sel(strategy=name)),
                        "cos_df": _mean(metrics["cos_df"].sel(strategy=name)),
                    }
                )
        for name, values in per_strategy.items():
            frame = pd.DataFrame(values)
            row = {
                "objective": objective,
                "trajectory": trajectory,
                "strategy": name,
                "applied": name == members[0].strategy,
                "runs": len(values),
                "records": float(frame["records"].mean()),
            }
            for column in COLUMNS:
                row[column] = float(frame[column].mean())
            for column in COLUMNS:
                row[f"{column}_sd"] = (
                    float(frame[column].std(ddof=1)) if len(values) > 1 else np.nan
                )
            rows.append(row)
    columns = ["objective", "trajectory", "strategy", "applied", "runs", "records"]
    columns += list(COLUMNS) + [f"{c}_sd" for c in COLUMNS]
    return pd.DataFrame(rows, columns=columns)


def _mean(da: xr.DataArray) -> float:
    values = np.asarray(da.values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _cell(mean: float, sd: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "n/a"
    text = f"{mean:.{digits}f}"
    return f"{text} ± {sd:.{digits}f}" if np.isfinite(sd) else text


def geometry_table_markdown(table: pd.DataFrame | Source, *, digits: int = 2) -> str:
    """The geometry table as a Markdown table (paper column names; mean ± sd across seeds).

    Parameters
    ----------
    table : DataFrame or runs
        The result of :func:`geometry_table`, or runs to compute it from.
    digits : int
        Decimal places.
    """
    if not isinstance(table, pd.DataFrame):
        table = geometry_table(table)
    several = table["objective"].nunique() > 1
    header = ["Objective"] if several else []
    header += ["Method", "Runs", "Steps", *COLUMNS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.itertuples(index=False):
        label = strategy_style(row.strategy).label
        if not row.applied:
            label += f" (shadow on {strategy_style(row.trajectory).label} runs)"
        cells = [str(row.objective)] if several else []
        cells += [label, str(row.runs), f"{row.records:g}"]
        cells += [_cell(getattr(row, c), getattr(row, f"{c}_sd"), digits) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
