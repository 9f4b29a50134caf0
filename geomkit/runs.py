"""Runs: whatever a user passes, turned into :class:`Run` objects.

A source is a run's zarr store, a run directory holding one (``geometry.zarr``), a directory of
runs, an opened Dataset (one run, or several stacked along ``run`` by
:func:`geomkit.store.open_runs`), a :class:`Run`, or a list of any of these. :func:`load` is
the one entry point the runner, :mod:`geomkit.theory`, :mod:`geomkit.plot` and ``ds.geom`` use.

>>> import tempfile, torch, geomkit
>>> tmp = tempfile.TemporaryDirectory()  # two tiny runs in a directory of runs
>>> for strategy in ("sago", "pcgrad"):
...     rec = geomkit.Recorder(f"{tmp.name}/{strategy}/geometry.zarr", ["w"], [4], strategy,
...                            attrs={"objective": "graddiff", "seed": 0})
...     rec.record(0, [torch.ones(4)], [-torch.ones(4)], forget_loss=1.0, retain_loss=1.0)
...     rec.close()
>>> runs = geomkit.runs.load(tmp.name)
>>> runs
[Run('pcgrad': graddiff + pcgrad, seed 0; 1 step, 1 record, 0 evaluations), Run('sago': ...)]
>>> runs[1].strategy, runs[1].alpha, float(runs[1].ds.geom.metrics().cos_dr.sel(strategy="sago")[0])
('sago', 1.0, 1.0)
>>> tmp.cleanup()

Padding
-------
Stacking aligns runs on the union of their steps, records, evaluations, tensors and strategies
and fills what a run lacks with NaN. An entry of one of these dimensions is padding when
*every* data variable along that dimension is NaN there (records first; tensors and strategies
are then judged on the remaining records). The writer never produces such an entry: every step
has a wall time and a ``skipped`` flag, and every record has integer counts (``n_conflict``,
``n_opposed``, ...), which are never NaN. So a record whose gradient was not finite, with NaN
in some or all float statistics, is kept, and the theory audit counts it as a violation. A
Dataset that is not stacked has no padding; an all-NaN entry there (not written by geomkit) is
dropped too and named in :attr:`Run.dropped`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import xarray as xr

from geomkit.store import COORDINATES, STORE_NAME, VARIABLES, _store_path, open_run

__all__ = ["Run", "Source", "find", "load"]

_EXPECTED = "a run's zarr store, a run directory holding geometry.zarr, or a directory of runs"

_GROWING = ("step", "record", "evaluation")
"""Dimensions judged first; ``tensor`` and ``strategy`` are judged on the remaining records."""

_FIXED = ("tensor", "strategy")

_NOUN = {"step": "steps", "record": "steps", "evaluation": "after steps"}


@dataclass(frozen=True, eq=False, repr=False)
class Run:
    """One recorded run: its label, its Dataset (no ``run`` dimension, no padding) and the
    metadata read from the store attributes (``None`` where not recorded).

    Attributes
    ----------
    label : str
        Unique among the runs of one :func:`load`: the ``run`` coordinate of a stacked Dataset,
        else the ``run`` attribute given when recording (``geomkit run`` writes the run
        directory's name), else the run directory's name (a store's own name without
        ``.zarr``), else ``run<index>``.
    ds : xarray.Dataset
        The run as :func:`geomkit.open_run` gives it: applied strategy first, ``measured``
        coordinate, per-run attributes in ``ds.attrs``.
    objective, strategy : str or None
        The objective (``graddiff``, ...) and the applied strategy.
    seed : int or None
    alpha, gamma : float or None
        The applied strategy's weights.
    dtype : str or None
        The gradient dtype (``float32``, ``bfloat16``, ...).
    dropped : tuple of str
        What was dropped as all-NaN from a Dataset that was not stacked (padding of a stacked
        Dataset is dropped silently).
    """

    label: str
    ds: xr.Dataset
    objective: str | None = None
    strategy: str | None = None
    seed: int | None = None
    alpha: float | None = None
    gamma: float | None = None
    dtype: str | None = None
    dropped: tuple[str, ...] = ()

    @property
    def forget_only(self) -> bool:
        """True when the run has no retain loss (e.g. the ``ga`` objective)."""
        if "retain_loss" not in self.ds or self.ds.sizes.get("step", 0) == 0:
            return False
        return bool(np.isnan(np.asarray(self.ds["retain_loss"], dtype=np.float64)).all())

    @property
    def method(self) -> tuple[str, str]:
        """``(objective, strategy)``; strategy ``"none"`` for forget-only runs."""
        strategy = "none" if self.forget_only else self.strategy or "unknown"
        return (self.objective or "unknown", strategy)

    def __repr__(self) -> str:
        method = " + ".join(p for p in (self.objective, self.strategy) if p) or "unknown"
        seed = "" if self.seed is None else f", seed {self.seed}"
        counts = [(self.ds.sizes[d], d) for d in _GROWING if d in self.ds.dims]
        sizes = ", ".join(f"{n} {d}{'' if n == 1 else 's'}" for n, d in counts)
        return f"Run({self.label!r}: {method}{seed}; {sizes or 'no data'})"


Source: TypeAlias = (
    str | os.PathLike | xr.Dataset | Run | Iterable[str | os.PathLike | xr.Dataset | Run]
)
"""What :func:`load` accepts."""


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------


def _is_run(path: Path) -> bool:
    try:
        _store_path(path)
    except FileNotFoundError:
        return False
    return True


def find(source: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The runs named by ``source``, in order: each path is a run (its store or directory)
    or a directory whose subdirectories are runs (sorted by name; others are skipped).

    Raises
    ------
    FileNotFoundError
        If a path does not exist or holds no geomkit run.
    """
    items = [source] if isinstance(source, str | os.PathLike) else list(source)
    found: list[Path] = []
    for item in items:
        if not isinstance(item, str | os.PathLike):
            raise TypeError(f"invalid run path {item!r}: expected a str or os.PathLike")
        path = Path(item)
        if _is_run(path):
            found.append(path)
            continue
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; expected {_EXPECTED}")
        inside = (
            sorted(p for p in path.iterdir() if p.is_dir() and _is_run(p)) if path.is_dir() else []
        )
        if not inside:
            raise FileNotFoundError(f"{path} holds no geomkit run; expected {_EXPECTED}")
        found.extend(inside)
    return found


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


def load(source: Source, *, on_damage: str = "raise") -> list[Run]:
    """Every run in ``source``, in order, as :class:`Run` objects with unique labels.

    Parameters
    ----------
    source : path, Dataset, Run, or a list of any of these
        A run's store, a run directory, a directory of runs (:func:`find`), a Dataset of one
        run or of runs stacked along ``run``, or runs already loaded (returned as they are).
    on_damage : {"raise", "mask"}
        Passed to :func:`geomkit.store.open_run` for every store read from disk: ``"raise"``
        refuses a damaged store (:class:`geomkit.store.DamagedStoreError`), ``"mask"`` reads the
        rest with the damaged entries NaN and listed in ``Run.ds.attrs["damaged"]``.

    Raises
    ------
    FileNotFoundError
        If a path does not exist or holds no run.
    geomkit.store.DamagedStoreError
        If a store is damaged and ``on_damage="raise"``.
    TypeError
        If an item is none of the above.
    ValueError
        If ``source`` holds no run (an empty list).
    """
    single = isinstance(source, str | os.PathLike | xr.Dataset | Run)
    if not single and (isinstance(source, Mapping) or not isinstance(source, Iterable)):
        raise TypeError(f"invalid runs source of type {type(source).__name__}: expected {_KINDS}")
    runs: list[Run] = []
    for item in [source] if single else source:
        if isinstance(item, Run):
            runs.append(item)
        elif isinstance(item, xr.Dataset):
            runs.extend(_split(item, len(runs)))
        elif isinstance(item, str | os.PathLike):
            for path in find(item):
                runs.append(_from_dataset(open_run(path, on_damage=on_damage), len(runs)))
        else:
            raise TypeError(
                f"invalid run {item!r} of type {type(item).__name__}: expected {_KINDS}"
            )
    if not runs:
        raise ValueError(f"no runs in {source!r}; expected {_KINDS}")
    return _unique(runs)


_KINDS = f"{_EXPECTED}, an xarray.Dataset, a geomkit.runs.Run, or a list of these"


def _split(ds: xr.Dataset, start: int) -> list[Run]:
    if "run" in ds.dims:
        return [_from_dataset(ds.isel(run=i), start + i, True) for i in range(ds.sizes["run"])]
    stacked = "run" in ds.coords and ds["run"].ndim == 0  # one run picked from a stack
    return [_from_dataset(ds, start, stacked)]


def _from_dataset(ds: xr.Dataset, index: int, stacked: bool = False) -> Run:
    label = _label(ds, index)
    if stacked:
        ds = _unstack_attrs(ds)
    ds, dropped = _drop_padding(ds)
    if stacked:
        ds, dropped = _restore_dtypes(ds), ()
    applied = _applied(ds)
    ds = _order_strategies(ds, applied)
    return Run(
        label=label,
        ds=ds,
        objective=_text(ds, "objective"),
        strategy=applied,
        seed=_number(ds, "seed", int, label),
        alpha=_number(ds, "alpha", float, label),
        gamma=_number(ds, "gamma", float, label),
        dtype=_text(ds, "dtype"),
        dropped=dropped,
    )


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    return value.decode() if isinstance(value, bytes) else value


def _label(ds: xr.Dataset, index: int) -> str:
    if "run" in ds.coords and ds["run"].ndim == 0:
        return str(_plain(ds["run"].values))
    if ds.attrs.get("run") not in (None, "none"):  # a name given when recording
        return str(ds.attrs["run"])
    if "source" in ds.attrs:
        path = Path(str(ds.attrs["source"]))
        return path.parent.name if path.name == STORE_NAME else path.name.removesuffix(".zarr")
    return f"run{index}"


def _unique(runs: list[Run]) -> list[Run]:
    """Relabel runs whose labels repeat: ``parent/name`` for runs opened from directories of
    the same name, else a ``#k`` suffix."""
    out = list(runs)
    for attempt in ("parent", "suffix"):
        seen: dict[str, list[int]] = {}
        for i, run in enumerate(out):
            seen.setdefault(run.label, []).append(i)
        for label, indices in seen.items():
            if len(indices) < 2:
                continue
            for k, i in enumerate(indices):
                if attempt == "parent" and "source" in out[i].ds.attrs:
                    path = Path(str(out[i].ds.attrs["source"]))
                    folder = path.parent if path.name == STORE_NAME else path
                    new = f"{folder.parent.name}/{label}"
                elif attempt == "suffix" and k:
                    new = f"{label}#{k + 1}"
                else:
                    continue
                out[i] = replace(out[i], label=new)
    return out


def _unstack_attrs(ds: xr.Dataset) -> xr.Dataset:
    """Per-run attributes that stacking turned into ``run`` coordinates, back to attributes."""
    scalars = [n for n, c in ds.coords.items() if c.ndim == 0 and n not in COORDINATES]
    attrs = dict(ds.attrs)
    attrs.update({n: _plain(ds[n].values) for n in scalars if n != "run"})
    ds = ds.drop_vars(scalars)
    ds.attrs = attrs
    return ds


def _padding(ds: xr.Dataset, dim: str) -> np.ndarray:
    """Per entry of ``dim``: every data variable along ``dim`` is NaN there (and has values)."""
    n = ds.sizes.get(dim, 0)
    variables = [v for v in ds.data_vars.values() if dim in v.dims and v.size]
    if not variables or any(v.dtype.kind in "biuSU" for v in variables):
        return np.zeros(n, dtype=bool)  # a variable that cannot hold NaN: nothing is padding
    mask = np.ones(n, dtype=bool)
    for var in variables:
        mask &= np.asarray(var.isnull().all([d for d in var.dims if d != dim]))
    return mask


def _drop_padding(ds: xr.Dataset) -> tuple[xr.Dataset, tuple[str, ...]]:
    """``ds`` without its all-NaN entries (see the module docstring), and what was dropped."""
    dropped = []
    for group in (_GROWING, _FIXED):
        masks = {dim: _padding(ds, dim) for dim in group if dim in ds.dims}
        for dim, mask in masks.items():
            if mask.any():
                values = ", ".join(str(_plain(v)) for v in ds[dim].values[mask])
                what = f"{_NOUN[dim]} {values}" if dim in _NOUN else values
                dropped.append(f"{int(mask.sum())} {dim}(s) with every value NaN dropped ({what})")
        ds = ds.isel({dim: np.flatnonzero(~mask) for dim, mask in masks.items() if mask.any()})
    return ds, tuple(dropped)


def _restore_dtypes(ds: xr.Dataset) -> xr.Dataset:
    """The integer and boolean variables and coordinates stacking promoted to float, back."""
    wanted = {n: spec["dtype"] for n, spec in VARIABLES.items()}
    wanted.update(layer="int64", numel="int64")
    for name, dtype in wanted.items():
        if name not in ds.variables or ds[name].dtype == dtype or ds[name].isnull().any():
            continue
        if name in ds.data_vars:
            ds = ds.assign({name: ds[name].astype(dtype)})
        else:
            ds = ds.assign_coords({name: ds[name].astype(dtype)})
    return ds


def _applied(ds: xr.Dataset) -> str | None:
    applied = _text(ds, "applied_strategy")
    if applied is None and ds.sizes.get("strategy", 0):
        names = ds["strategy"].values
        if "measured" in ds.coords and bool(ds["measured"].values.any()):
            applied = str(names[int(np.argmax(ds["measured"].values))])
        else:
            applied = str(names[0])
    return applied


def _order_strategies(ds: xr.Dataset, applied: str | None) -> xr.Dataset:
    """The applied strategy first, and a ``measured`` coordinate (true for it alone)."""
    if "strategy" not in ds.dims:
        return ds
    names = [str(s) for s in ds["strategy"].values]
    order = ([applied] if applied in names else []) + [s for s in names if s != applied]
    if order != names:
        ds = ds.sel(strategy=order)
    if "measured" not in ds.coords:
        ds = ds.assign_coords(measured=("strategy", np.array([s == applied for s in order])))
    return ds


def _attr(ds: xr.Dataset, key: str) -> Any:
    value = _plain(ds.attrs.get(key))
    return None if value is None or value == "none" else value


def _text(ds: xr.Dataset, key: str) -> str | None:
    value = _attr(ds, key)
    return None if value is None else str(value)


def _number(ds: xr.Dataset, key: str, kind: type, label: str) -> Any:
    value = _attr(ds, key)
    if value is None:
        return None
    try:
        number = float(value)
        if kind is int and not number.is_integer():
            raise ValueError
    except (TypeError, ValueError):
        expected = "an integer" if kind is int else "a number"
        raise ValueError(
            f"invalid {key}={value!r} in the attributes of run {label!r}: expected {expected}"
        ) from None
    return int(number) if kind is int else number
