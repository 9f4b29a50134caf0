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

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import xarray as xr

from geomkit._validation import invalid
from geomkit.fields import OPTIONAL_FIELDS, STORED_FIELDS
from geomkit.runs import Run, Source, load
from geomkit.store import SchemaError
from geomkit.strategies import build
from geomkit.theory.cases import Cases, build_cases
from geomkit.theory.checks import ADDITIVE_CHECKS
from geomkit.theory.coordinates import coordinate_result, opposed_counts
from geomkit.theory.report import Audit, CheckResult
from geomkit.theory.synthetic import STRATEGIES, check_claims, sort_results

__all__ = ["audit", "run_cases"]

_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _weights(run: Run) -> tuple[float, float]:
    if run.alpha is None or run.gamma is None:
        key = "alpha" if run.alpha is None else "gamma"
        raise SchemaError(f"run {run.label!r} has no {key!r} attribute; is it a geomkit run?")
    return run.alpha, run.gamma


def _dtype(run: Run, override: torch.dtype | str | None) -> tuple[torch.dtype, str]:
    value = override if override is not None else run.dtype
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise invalid("dtype", value, "one of " + ", ".join(_DTYPES))
        return value, ""
    if value is None:
        return torch.float32, "gradient dtype not recorded; tolerances assume float32"
    text = str(value).replace("torch.", "")
    if text not in _DTYPES:
        if override is not None:
            raise invalid("dtype", override, "one of " + ", ".join(_DTYPES))
        return torch.float32, f"unknown gradient dtype {value!r}; tolerances assume float32"
    return _DTYPES[text], ""


def _measured(ds: xr.Dataset) -> dict[str, bool]:
    """Strategy name -> measured on the applied update (the run layer sets ``measured``)."""
    names = [str(s) for s in ds["strategy"].values]
    return dict(zip(names, (bool(m) for m in ds["measured"].values), strict=True))


def run_cases(run: Run, dtype: torch.dtype | str | None = None) -> dict[str, Cases]:
    """:class:`Cases` at tensor, layer and model granularity of one run.

    Their note names the dtype assumption and any all-NaN entries the run layer dropped from a
    Dataset that was not stacked. Padding is removed by :func:`geomkit.runs.load`; a record
    with some non-finite statistic (a NaN update, an overflow) is kept and checked, and counts
    as a violation.
    """
    alpha, gamma = _weights(run)
    dtype, note = _dtype(run, dtype)
    absent = [n for n in OPTIONAL_FIELDS if n not in run.ds]
    old = ", ".join(absent) + " not recorded (a store written before they existed)"
    note = "; ".join(p for p in (note, old if absent else "", *run.dropped) if p)
    ds, name = run.ds, run.label
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
    return build_cases(
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
        absent=absent,
    )


_STATISTICS: tuple[str, ...] = tuple(n for n in STORED_FIELDS if n not in OPTIONAL_FIELDS)


def _without_damaged(run: Run) -> Run:
    """The run without the records that ``open_run(path, on_damage="mask")`` masked (their NaN
    are lost data, not a violation); the left-out steps are named in the results' notes."""
    if "record_damaged" not in run.ds.coords:
        return run
    damaged = run.ds["record_damaged"].values.astype(bool)
    steps = ", ".join(str(int(s)) for s in run.ds["record"].values[damaged])
    note = f"{int(damaged.sum())} damaged record(s) left out (steps {steps})"
    return replace(
        run, ds=run.ds.isel(record=np.flatnonzero(~damaged)), dropped=(*run.dropped, note)
    )


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
    source: Source,
    *,
    claims: Sequence[str] | None = None,
    dtype: torch.dtype | str | None = None,
) -> Audit:
    """Check every claim of docs/theory.md on recorded runs, at every granularity the data allow.

    Parameters
    ----------
    source : Dataset, path, Run or list of these
        One run (:func:`geomkit.open_run`), runs stacked along ``run``
        (:func:`geomkit.open_runs`), paths to open, or runs (:func:`geomkit.runs.load`). Each
        run is checked on its own (the result's ``source`` is the run label), with its own
        ``alpha``, ``gamma`` and dtype.
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
    Claims from Xiao et al., "SAGO", ACL 2026 (arXiv 2604.14808), as read in docs/theory.md. R4
    (false) is measured at the run's own alpha and gamma, stated in each result's note.
    """
    claims = check_claims(claims)
    runs = load(source)
    results: list[CheckResult] = []
    for run in runs:
        missing = [name for name in _STATISTICS if name not in run.ds]
        if missing:
            raise SchemaError(
                f"run {run.label!r} has no {missing} variables; expected a geomkit run "
                "(geomkit.open_run / open_runs / geomkit.runs.load)"
            )
        run = _without_damaged(run)
        cases = run_cases(run, dtype)
        results.extend(_coordinate(claims, run.ds, run.label))
        for granularity in ("tensor", "layer", "model"):
            for claim in claims:
                if claim in ADDITIVE_CHECKS:
                    results.extend(ADDITIVE_CHECKS[claim](cases[granularity]))
    attrs = {"kind": "recorded", "runs": [run.label for run in runs]}
    return Audit(sort_results(results), attrs)
