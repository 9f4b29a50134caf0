"""Turning what users pass (one run, a ``run``-stacked Dataset, a list) into runs to plot."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

import geomkit.analysis  # noqa: F401  (registers the ds.geom accessor)
from geomkit.fields import STORED_FIELDS
from geomkit.plot.style import MissingVariable, PlotSkipped

__all__ = ["EVALUATIONS", "GEOMETRY", "Run", "Source", "require", "runs_of", "single_run"]

Source = xr.Dataset | Sequence[xr.Dataset]
"""One run, several runs stacked along ``run`` (:func:`geomkit.open_runs`), or a list of either."""

GEOMETRY: tuple[str, ...] = STORED_FIELDS
"""The recorded statistics every geometry figure needs."""

EVALUATIONS: tuple[str, ...] = ("forget_acc", "retain_acc", "general_acc")


@dataclass(frozen=True)
class Run:
    """One run with its identity: the Dataset has no ``run`` dimension and no padding."""

    label: str
    ds: xr.Dataset
    objective: str
    strategy: str
    seed: Any

    @property
    def forget_only(self) -> bool:
        """True when the run has no retain loss (e.g. the ``ga`` objective)."""
        if "retain_loss" not in self.ds or self.ds.sizes.get("step", 0) == 0:
            return False
        return bool(np.isnan(np.asarray(self.ds["retain_loss"], dtype=np.float64)).all())

    @property
    def method(self) -> tuple[str, str]:
        """``(objective, strategy)``; strategy ``"none"`` for forget-only runs."""
        return (self.objective, "none" if self.forget_only else self.strategy)


def _meta(ds: xr.Dataset, key: str, default: Any = None) -> Any:
    if key in ds.coords and ds[key].ndim == 0:
        value = ds[key].item()
        return value.item() if isinstance(value, np.generic) else value
    return ds.attrs.get(key, default)


def _float_vars(ds: xr.Dataset, dim: str) -> list[str]:
    return [
        name
        for name, var in ds.data_vars.items()
        if var.dims and var.dims[0] == dim and np.issubdtype(var.dtype, np.floating)
    ]


def _drop_padding(ds: xr.Dataset) -> xr.Dataset:
    """Drop the NaN rows :func:`geomkit.open_runs` adds where runs differ in length."""
    for dim, subset in (
        ("step", _float_vars(ds, "step")),
        ("record", [n for n in ("ff", "rr") if n in ds]),
        ("evaluation", [n for n in EVALUATIONS if n in ds]),
    ):
        if dim in ds.dims and subset and ds.sizes[dim]:
            ds = ds.dropna(dim, how="all", subset=subset)
    if "strategy" in ds.dims and "dd" in ds and ds.sizes.get("record", 0):
        ds = ds.dropna("strategy", how="all", subset=["dd"])
    return ds


def _label(ds: xr.Dataset, index: int) -> str:
    label = _meta(ds, "run")
    if label is None and "source" in ds.attrs:
        from pathlib import Path

        path = Path(str(ds.attrs["source"]))
        label = path.parent.name if path.suffix == ".zarr" else path.name
    return str(label) if label is not None else f"run{index}"


def _applied(ds: xr.Dataset) -> str:
    applied = _meta(ds, "applied_strategy")
    if applied is None and "strategy" in ds.dims and ds.sizes["strategy"]:
        if "measured" in ds.coords and bool(ds["measured"].values.any()):
            applied = ds["strategy"].values[int(np.argmax(ds["measured"].values))]
        else:
            applied = ds["strategy"].values[0]
    return str(applied) if applied is not None else "unknown"


def _order_strategies(ds: xr.Dataset, applied: str) -> xr.Dataset:
    if "strategy" not in ds.dims:
        return ds
    names = [str(s) for s in ds["strategy"].values]
    order = ([applied] if applied in names else []) + [s for s in names if s != applied]
    if order != names:
        ds = ds.sel(strategy=order)
    return ds


def _one(ds: xr.Dataset, index: int) -> Run:
    label = _label(ds, index)
    strategy = _applied(ds)
    ds = _order_strategies(_drop_padding(ds), strategy)
    return Run(
        label=label,
        ds=ds,
        objective=str(_meta(ds, "objective", "unknown")),
        strategy=strategy,
        seed=_meta(ds, "seed"),
    )


def runs_of(source: Source) -> list[Run]:
    """Every run in ``source``, in order."""
    items: Iterable[xr.Dataset | Run] = (
        [source] if isinstance(source, (xr.Dataset, Run)) else source
    )
    runs: list[Run] = []
    for item in items:
        if isinstance(item, Run):
            runs.append(item)
            continue
        if not isinstance(item, xr.Dataset):
            raise TypeError(
                f"expected an xarray.Dataset or a list of them, got {type(item).__name__}"
            )
        if "run" in item.dims:
            runs.extend(_one(item.isel(run=i), len(runs)) for i in range(item.sizes["run"]))
        else:
            runs.append(_one(item, len(runs)))
    if not runs:
        raise ValueError("no runs given")
    return runs


def single_run(source: Source, run: str | int | None = None) -> Run:
    """The one run a single-run figure draws; ``run`` (label or index) picks among several."""
    runs = runs_of(source)
    if run is None:
        if len(runs) > 1:
            raise ValueError(
                f"this figure shows one run but {len(runs)} were given; pass run= one of "
                f"{[r.label for r in runs]}"
            )
        return runs[0]
    if isinstance(run, int) and not isinstance(run, bool):
        if not -len(runs) <= run < len(runs):
            raise ValueError(f"run={run} is out of range for {len(runs)} runs")
        return runs[run]
    for candidate in runs:
        if candidate.label == run:
            return candidate
    raise ValueError(f"unknown run {run!r}; runs are {[r.label for r in runs]}")


def require(run: Run, names: Iterable[str], figure: str) -> None:
    """Raise :class:`MissingVariable` / :class:`PlotSkipped` unless ``run`` has data for
    ``names`` (present, and a non-empty dimension)."""
    for name in names:
        if name not in run.ds.variables:
            raise MissingVariable(
                name, f"{figure} needs variable {name!r}, which run {run.label!r} does not have"
            )
        empty = [d for d in run.ds[name].dims if run.ds.sizes[d] == 0]
        if empty:
            raise PlotSkipped(
                f"{figure}: variable {name!r} of run {run.label!r} has no data "
                f"(empty dimension {empty[0]!r})"
            )


def require_geometry(run: Run, figure: str) -> None:
    """Like :func:`require` for the recorded geometry statistics."""
    require(run, GEOMETRY, figure)


def require_strategies(run: Run, names: Iterable[str], figure: str) -> None:
    """Raise :class:`MissingVariable` unless every strategy in ``names`` was recorded."""
    have = [str(s) for s in run.ds["strategy"].values] if "strategy" in run.ds.dims else []
    for name in names:
        if name not in have:
            raise MissingVariable(
                name,
                f"{figure} needs strategy {name!r}, which run {run.label!r} did not record "
                f"(recorded: {have}); record it as a shadow strategy",
            )
