"""Several runs as one Dataset along ``run``: :func:`open_runs`, :func:`stack_runs`.

Their public home is :mod:`geomkit.store`; :mod:`geomkit.runs` (the run layer, which reads the
runs) is imported on use, since it imports :mod:`geomkit.store`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr


def open_runs(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> xr.Dataset:
    """Open several runs along a new ``run`` dimension.

    Parameters
    ----------
    paths : path or iterable of paths
        A directory whose subdirectories are runs (as written by ``geomkit run --out DIR``), or
        the run paths themselves (:func:`geomkit.runs.find`).

    Returns
    -------
    xarray.Dataset
        Runs stacked along ``run`` (labelled by directory name); steps and records that only
        some runs have are filled with NaN. Per-run attributes become ``run`` coordinates
        where they differ (e.g. ``applied_strategy``, ``seed``). :func:`geomkit.runs.load`
        splits it back into runs without that padding.

    Raises
    ------
    FileNotFoundError
        If a path does not exist or holds no geomkit run.
    """
    from geomkit.runs import load  # the run layer sits above the store: import on use

    runs = load(paths if isinstance(paths, str | os.PathLike) else list(paths))
    return stack_runs([run.ds for run in runs], [run.label for run in runs])


def stack_runs(runs: Sequence[xr.Dataset], labels: Sequence[str]) -> xr.Dataset:
    """Stack opened runs along a new ``run`` dimension labelled ``labels``.

    Steps, records, evaluations, tensors and strategies that only some runs have are filled
    with NaN (tensors and strategies keep the runs' own order where they agree); per-run
    attributes that differ between the runs become ``run`` coordinates.
    """
    if len(runs) != len(labels):
        raise ValueError(f"{len(runs)} runs but {len(labels)} labels")
    varying = sorted(
        key
        for key in set().union(*(ds.attrs for ds in runs))
        if key not in ("source", "run") and len({repr(ds.attrs.get(key)) for ds in runs}) > 1
    )
    # the coordinates along tensor and strategy are put back by _first_seen, from the runs
    aligned = [
        ds.drop_vars([n for n, c in ds.coords.items() if n not in ds.dims and c.dims in _ALIGNED])
        for ds in runs
    ]
    combined = xr.concat(
        aligned,
        dim="run",
        join="outer",
        combine_attrs="drop_conflicts",
        coords="minimal",
        compat="override",
    )
    combined = combined.assign_coords(run=list(labels))
    for dim in ("tensor", "strategy"):
        combined = _first_seen(combined, runs, dim)
    for key in varying:
        values = [ds.attrs.get(key) for ds in runs]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        column = np.asarray(values) if numeric else np.array([str(v) for v in values], object)
        combined = combined.assign_coords({key: ("run", column)})
    return combined


_ALIGNED = (("tensor",), ("strategy",))


def _first_seen(combined: xr.Dataset, runs: Sequence[xr.Dataset], dim: str) -> xr.Dataset:
    """``dim`` of the stacked runs in the runs' own order (merged), with its
    coordinates (``layer``, ``numel``, ...) taken from the runs that have each entry; a
    coordinate the runs disagree on becomes a ``(run, dim)`` coordinate. ``measured`` is left
    out: it differs between runs by design (:func:`geomkit.runs.load` restores it)."""
    if dim not in combined.dims:
        return combined
    order: list[Any] = []
    for ds in runs:  # each new entry right after its predecessor in its own run
        at = 0
        for value in ds[dim].values if dim in ds.dims else ():
            if value in order:
                at = order.index(value) + 1
            else:
                order.insert(at, value)
                at += 1
    if list(combined[dim].values) != order:
        combined = combined.sel({dim: order})
    names = [n for ds in runs for n, c in ds.coords.items() if n != dim and c.dims == (dim,)]
    for name in dict.fromkeys(n for n in names if n != "measured"):
        per_run = [
            ds[name].to_series().reindex(order) if name in ds.coords else None for ds in runs
        ]
        known = pd.concat([s for s in per_run if s is not None], axis=1)
        first = next(ds[name] for ds in runs if name in ds.coords)
        if (known.nunique(axis=1, dropna=True) <= 1).all():
            values = known.bfill(axis=1).iloc[:, 0].to_numpy().astype(first.dtype)
            coord = xr.Variable((dim,), values, attrs=first.attrs)
        else:
            rows = [s if s is not None else pd.Series(np.nan, order) for s in per_run]
            coord = xr.Variable(("run", dim), np.stack(rows), attrs=first.attrs)
        combined = combined.assign_coords({name: coord})
    return combined
