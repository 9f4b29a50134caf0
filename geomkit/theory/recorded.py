"""Claim checks on recorded runs: :func:`audit`.

A run stores, at each recorded step, the additive statistics of the applied strategy (measured
on the update actually formed) and of the shadow strategies (evaluated on the same (f, r)
without being applied), so SAGO and PCGrad are compared on identical gradients. Every claim is
checked from those statistics at tensor, layer and model granularity (``ds.geom``), and at
coordinate granularity where the statistics allow it:

* R1 / R6 from ``n_opposed``: measured for the applied strategy and for shadow projection rules
  (a direct pass over the coordinates); for *shadow* sign rules (SAGO variants) it is 0 by
  construction and not a measurement, so nothing is evaluated (``cases = 0``, with a note);
* R9 needs the gradients themselves at coordinate granularity (``cases = 0``, with a note); its
  additive consequence is checked at tensor, layer and model granularity.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

import geomkit.analysis  # noqa: F401  (registers the ds.geom accessor)
from geomkit.metrics import FIELDS
from geomkit.store import SchemaError
from geomkit.strategies import build
from geomkit.theory.cases import Cases, build_cases
from geomkit.theory.checks import ADDITIVE_CHECKS
from geomkit.theory.coordinates import coordinate_result, opposed_counts
from geomkit.theory.report import Audit, CheckResult
from geomkit.theory.synthetic import STRATEGIES, check_claims, sort_results

__all__ = ["audit", "open_source", "run_cases", "split_runs"]

_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def open_source(source: xr.Dataset | str | os.PathLike | Sequence) -> xr.Dataset:
    """A Dataset from a Dataset, a run directory, a directory of runs, or a list of runs."""
    if isinstance(source, xr.Dataset):
        return source
    from geomkit.store import open_run, open_runs

    if isinstance(source, str | os.PathLike):
        try:
            return open_run(source)
        except FileNotFoundError:
            return open_runs(source)
    if (
        isinstance(source, Sequence)
        and source
        and all(isinstance(s, str | os.PathLike) for s in source)
    ):
        return open_runs(list(source))
    raise TypeError(
        "source must be an xarray Dataset (geomkit.open_run / open_runs), a run path or a list "
        f"of run paths, got {type(source).__name__}: {source!r}"
    )


def _value(ds: xr.Dataset, key: str, default: Any = None) -> Any:
    """A run attribute, or a scalar coordinate of the same name (as left by ``isel(run=i)``)."""
    if key in ds.coords and ds[key].ndim == 0:
        value = ds[key].values.item()
        return value.decode() if isinstance(value, bytes) else value
    return ds.attrs.get(key, default)


def split_runs(ds: xr.Dataset) -> list[tuple[str, xr.Dataset]]:
    """``[(run name, single-run Dataset)]`` of a run or of runs stacked along ``run``."""
    if "run" in ds.dims:
        return [(str(ds["run"].values[i]), ds.isel(run=i)) for i in range(ds.sizes["run"])]
    name = ds.attrs.get("run")
    if name is None and "source" in ds.attrs:
        path = Path(str(ds.attrs["source"]))
        name = path.parent.name if path.name.endswith(".zarr") else path.name
    return [(str(name or "run"), ds)]


def _weights(ds: xr.Dataset, name: str) -> tuple[float, float]:
    out = []
    for key in ("alpha", "gamma"):
        value = _value(ds, key)
        if value is None:
            raise SchemaError(f"run {name!r} has no {key!r} attribute; is it a geomkit run?")
        out.append(float(value))
    return out[0], out[1]


def _dtype(ds: xr.Dataset, override: torch.dtype | str | None) -> tuple[torch.dtype, str]:
    value = override if override is not None else _value(ds, "dtype")
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {value}")
        return value, ""
    if value is None:
        return torch.float32, "gradient dtype not recorded; tolerances assume float32"
    text = str(value).replace("torch.", "")
    if text not in _DTYPES:
        if override is not None:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {override!r}")
        return torch.float32, f"unknown gradient dtype {value!r}; tolerances assume float32"
    return _DTYPES[text], ""


def _measured(ds: xr.Dataset) -> dict[str, bool]:
    names = [str(s) for s in ds["strategy"].values]
    if "measured" in ds.coords:
        return dict(zip(names, (bool(m) for m in ds["measured"].values), strict=True))
    applied = _value(ds, "applied_strategy", names[0])
    return {n: n == str(applied) for n in names}


def run_cases(
    ds: xr.Dataset, name: str, dtype: torch.dtype | str | None = None
) -> tuple[dict[str, Cases], xr.Dataset, str]:
    """:class:`Cases` at tensor, layer and model granularity of one run.

    Returns the cases, the run restricted to its records, and a note (the dtype assumption and
    any dropped records, else empty).

    Only *padding* is dropped: a record (or tensor) at which every geometry statistic is NaN,
    as ``open_runs`` fills the records (tensors) that only other runs have. The integer counts
    (``n_opposed``, ...) of a written record are never NaN, so a real record is never all NaN;
    a record with some non-finite statistic (a NaN update, an overflow) is kept and checked,
    and counts as a violation. Padding of a stacked run is dropped silently; all-NaN records
    of a single run (no stacking, so not padding) are dropped and named in the note.
    """
    alpha, gamma = _weights(ds, name)
    dtype, note = _dtype(ds, dtype)
    ds, dropped = _drop_padding(ds)
    note = "; ".join(p for p in (note, dropped) if p)
    names = [str(s) for s in ds["strategy"].values]
    measured = _measured(ds)
    geom = ds.geom
    by_tensor = geom.statistics("tensor").transpose("record", "strategy", "tensor", "field").values
    by_layer = geom.statistics("layer").transpose("record", "strategy", "layer", "field")
    by_model = geom.statistics("model").transpose("record", "strategy", "field").values
    layers = list(by_layer["layer"].values)
    index = {label: i for i, label in enumerate(layers)}
    tensor_layer = ds["layer"].values
    codes = np.array([index[label] for label in tensor_layer])
    by_layer = by_layer.values
    cases = build_cases(
        {n: by_tensor[:, k] for k, n in enumerate(names)},
        batch_labels=[f"step {int(s)}" for s in ds["record"].values],
        tensor_labels=[str(t) for t in ds["tensor"].values],
        groupings={
            "layer": (codes, [str(x) for x in layers]),
            "model": (np.zeros(len(codes), dtype=int), ["model"]),
        },
        grouped_stats={
            "layer": {n: by_layer[:, k] for k, n in enumerate(names)},
            "model": {n: by_model[:, k, None] for k, n in enumerate(names)},
        },
        alpha=alpha,
        gamma=gamma,
        dtype=dtype,
        source=name,
        evidence={n: "measured" if measured[n] else "shadow" for n in names},
        notes={n: note for n in names} if note else None,
        tensor_groups=tensor_layer,
    )
    return cases, ds, note


_STATISTICS: tuple[str, ...] = tuple(f for f in FIELDS if f not in ("numel", "n_tensors"))


def _all_nan(ds: xr.Dataset, dim: str) -> np.ndarray:
    """Per index of ``dim``: every value of every geometry statistic is NaN there."""
    out = np.ones(ds.sizes[dim], dtype=bool)
    for var in _STATISTICS:
        if var not in ds or dim not in ds[var].dims:
            continue
        da = ds[var]
        if not np.issubdtype(da.dtype, np.floating):
            return np.zeros(ds.sizes[dim], dtype=bool)  # an integer count is never padding
        other = [d for d in da.dims if d != dim]
        out &= np.isnan(da.transpose(dim, *other).values.reshape(ds.sizes[dim], -1)).all(-1)
    return out


def _drop_padding(ds: xr.Dataset) -> tuple[xr.Dataset, str]:
    """Drop the all-NaN records and tensors; a note names them unless they are the padding of
    a run stacked by ``open_runs`` (the single-run Dataset then has a scalar ``run``)."""
    stacked = "run" in ds.coords and ds["run"].ndim == 0
    parts = []
    empty = _all_nan(ds, "record") if ds.sizes.get("record") else np.zeros(0, dtype=bool)
    if empty.any():
        if not stacked:
            steps = ", ".join(str(int(s)) for s in ds["record"].values[empty])
            parts.append(
                f"{int(empty.sum())} record(s) with every statistic NaN dropped (steps {steps})"
            )
        ds = ds.isel(record=np.flatnonzero(~empty))
    if ds.sizes.get("record") and ds.sizes.get("tensor"):
        absent = _all_nan(ds, "tensor")
        if absent.any():
            if not stacked:
                names = ", ".join(str(t) for t in ds["tensor"].values[absent])
                parts.append(f"tensor(s) with every statistic NaN dropped ({names})")
            ds = ds.isel(tensor=np.flatnonzero(~absent))
    return ds, "; ".join(parts)


def _coordinate(claims: tuple[str, ...], ds: xr.Dataset, name: str) -> list[CheckResult]:
    """R1 / R6 from ``n_opposed``; R9 reported as not evaluable."""
    measured = _measured(ds)
    strategies = [str(s) for s in ds["strategy"].values]
    n_opposed = ds["n_opposed"].transpose("record", "strategy", "tensor").values
    numel = np.broadcast_to(ds["numel"].values, n_opposed[:, 0].shape).ravel()
    where = [f"step {int(s)}, tensor {t}" for s in ds["record"].values for t in ds["tensor"].values]
    wanted = []
    if "R1" in claims:
        wanted.append(("R1", "sago"))
    if "R6" in claims:
        wanted += [("R6", s) for s in STRATEGIES]
    out = []
    for claim, strategy in wanted:
        if strategy not in strategies:
            out.append(_not_evaluable(claim, strategy, name, "strategy not recorded in this run"))
            continue
        k = strategies.index(strategy)
        if measured[strategy]:
            evidence = "measured"
        elif build(strategy).rule.never_opposes:
            evidence = "by construction"
        else:
            evidence = "shadow"
        note = "applied update" if measured[strategy] else "shadow strategy"
        if evidence == "shadow":
            note += " (n_opposed counted in a direct pass over the coordinates)"
        out.append(
            opposed_counts(
                claim, strategy, n_opposed[:, k].ravel(), numel, where, name, evidence, note
            )
        )
    if "R9" in claims:
        out.append(
            _not_evaluable(
                "R9",
                "sago",
                name,
                "needs the gradients (d_i, f_i, r_i); the recorded statistics are sums. Its "
                "additive consequence is checked at tensor, layer and model granularity",
            )
        )
    return out


def _not_evaluable(claim_id: str, strategy: str, source: str, note: str) -> CheckResult:
    """A coordinate-level result with nothing evaluated (never a pass)."""
    return coordinate_result(
        claim_id, strategy, source, 0, 0, np.nan, "", "n/a (nothing evaluated)", "none", note
    )


def audit(
    source: xr.Dataset | str | os.PathLike | Sequence,
    *,
    claims: Sequence[str] | None = None,
    dtype: torch.dtype | str | None = None,
) -> Audit:
    """Check every THEORY.md claim on recorded runs, at every granularity the data allow.

    Parameters
    ----------
    source : xarray.Dataset, path or list of paths
        One run (:func:`geomkit.open_run`), runs stacked along ``run``
        (:func:`geomkit.open_runs`), or paths to open. Each run is checked on its own (the
        result's ``source`` is the run name), with its own ``alpha``, ``gamma`` and dtype.
    claims : sequence of str, optional
        Claim ids (default all).
    dtype : torch.dtype or str, optional
        Gradient dtype for the tolerances (default: the run's ``dtype`` attribute).

    Returns
    -------
    Audit
        ``bug_detected`` is True only if a proven claim is violated beyond tolerance.

    Notes
    -----
    Claims from Xiao et al., "SAGO", ACL 2026 (arXiv 2604.14808), as read in THEORY.md. R4
    (false) is measured at the run's own alpha and gamma, stated in each result's note.
    """
    claims = check_claims(claims)
    ds = open_source(source)
    for required in ("ff", "rr", "fr", "dd", "df", "dr", "n_opposed"):
        if required not in ds:
            raise SchemaError(
                f"source has no {required!r} variable; expected a geomkit run Dataset "
                "(geomkit.open_run / open_runs)"
            )
    results: list[CheckResult] = []
    runs = split_runs(ds)
    for name, run in runs:
        cases, run, _ = run_cases(run, name, dtype)
        results.extend(_coordinate(claims, run, name))
        for granularity in ("tensor", "layer", "model"):
            for claim in claims:
                if claim in ADDITIVE_CHECKS:
                    results.extend(ADDITIVE_CHECKS[claim](cases[granularity]))
    attrs = {"kind": "recorded", "runs": [name for name, _ in runs]}
    return Audit(sort_results(results), attrs)
