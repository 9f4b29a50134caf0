"""Claim checks on recorded runs: :func:`audit`.

A run stores, at each recorded step, the additive statistics of the applied strategy (measured
on the update actually formed) and of the shadow strategies (evaluated on the same (f, r)
without being applied), so SAGO and PCGrad are compared on identical gradients. Every claim is
checked from those statistics at tensor, layer and model granularity (``ds.geom``), and at
coordinate granularity where the statistics allow it:

* R1 / R6 from ``n_opposed``: measured for the applied strategy and for shadow projection rules
  (a direct pass over the coordinates); for *shadow* sign rules (SAGO variants) it is 0 by
  construction and not a measurement, except at *verified* records, where the recorder
  materialised the shadow's update with its own code and counted it (``verified_n_opposed``):
  there it is evaluated (evidence ``materialised``); without verified records nothing is
  evaluated (``cases = 0``, with a note);
* V1 (:func:`check_v1`): at verified records, each shadow's closed-form statistics against the
  statistics of its materialised update, per (step, tensor), with a tolerance from the rounding
  of the update to the gradient dtype (docs/theory.md#v1); a store without verification
  variables is reported as not verified;
* R9 needs the gradients themselves at coordinate granularity (``cases = 0``, with a note); its
  additive consequence is checked at tensor, layer and model granularity;
* S1 and S2 (open, never gated) from the step fields of the applied strategy
  (:mod:`geomkit.theory.steps`): S1 per run, S2 between a SAGO run and a PCGrad run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import xarray as xr

from geomkit import strategies as gstrategies
from geomkit._validation import invalid
from geomkit.fields import OPTIONAL_FIELDS, STORED_FIELDS
from geomkit.runs import Run, Source, load
from geomkit.store import VERIFIED_FIELDS, SchemaError
from geomkit.strategies import Global, build
from geomkit.theory.cases import Cases, build_cases
from geomkit.theory.checks import ADDITIVE_CHECKS, check_r0, not_evaluated, summarise
from geomkit.theory.coordinates import coordinate_result, opposed_counts
from geomkit.theory.report import Audit, CheckResult
from geomkit.theory.steps import StepRun, check_s1, check_s2, step_run
from geomkit.theory.synthetic import STRATEGIES, check_claims, sort_results

__all__ = ["audit", "check_r0_verified", "check_v1", "closed_form", "run_cases", "verified_run"]

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


def closed_form(ds: xr.Dataset) -> bool:
    """Whether the run's applied strategy is recorded by closed forms, like the shadows (store
    attribute ``applied_statistics = "closed_form"``; its update is measured at the verified
    records only). Stores without the attribute measured it at every record."""
    return str(ds.attrs.get("applied_statistics", "measured")) == "closed_form"


def _measured(ds: xr.Dataset) -> dict[str, bool]:
    """Strategy name -> measured on the applied update at every record (the run layer sets
    ``measured`` for the applied strategy; none is in a closed-form store)."""
    names = [str(s) for s in ds["strategy"].values]
    formed = not closed_form(ds)
    return dict(zip(names, (formed and bool(m) for m in ds["measured"].values), strict=True))


def run_cases(
    run: Run, dtype: torch.dtype | str | None = None, *, evidence: str | None = None
) -> dict[str, Cases]:
    """:class:`Cases` at tensor, layer and model granularity of one run.

    Their note names the dtype assumption and any all-NaN entries the run layer dropped from a
    Dataset that was not stacked. Padding is removed by :func:`geomkit.runs.load`; a record
    with some non-finite statistic (a NaN update, an overflow) is kept and checked, and counts
    as a violation. ``evidence`` overrides the evidence of every strategy (``"materialised"``
    for the verified records of :func:`verified_run`).
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
        evidence={n: evidence or ("measured" if measured[n] else "shadow") for n in names},
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
    where = [f"step {int(s)}, tensor {t}" for s in ds["record"].values for t in ds["tensor"].values]
    wanted = []
    if "R1" in claims:
        wanted.append(("R1", "sago"))
    if "R6" in claims:
        wanted += [("R6", s) for s in STRATEGIES]
    verified = _verified(ds)
    out = []
    for claim, strategy in wanted:
        if strategy not in strategies:
            out.append(_not_evaluable(claim, strategy, name, "strategy not recorded in this run"))
            continue
        k = strategies.index(strategy)
        counts, cases = n_opposed[:, k], where
        if measured[strategy]:
            evidence = "measured"
        elif build(strategy).rule.never_opposes:
            evidence = "by construction"
            if verified is not None and verified.any():  # counted on the materialised update
                evidence = "materialised"
                counts = ds["verified_n_opposed"].transpose("record", "strategy", "tensor").values
                counts = counts[verified, k]
                n_t = n_opposed.shape[2]
                keep = np.repeat(verified, n_t)
                cases = [w for w, kept in zip(where, keep, strict=True) if kept]
        else:
            evidence = "shadow"
        note = "applied update" if measured[strategy] else "shadow strategy"
        if evidence == "shadow":
            note += " (n_opposed counted in a direct pass over the coordinates)"
        if evidence == "materialised":
            note += (
                f" materialised with its own code at the {int(verified.sum())} verified of "
                f"{verified.size} records (n_opposed counted there; 0 by construction elsewhere)"
            )
        sizes = np.broadcast_to(ds["numel"].values, counts.shape).ravel()
        out.append(
            opposed_counts(claim, strategy, counts.ravel(), sizes, cases, name, evidence, note)
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


def _verified(ds: xr.Dataset) -> np.ndarray | None:
    """Per record: the shadows were verified there (their materialised counts are finite: a
    count is never NaN where it was taken); None when no record is (a store written before
    verification, a run stacked with such stores, or ``verify_every=0``)."""
    if "verified_n_opposed" not in ds:
        return None
    counts = ds["verified_n_opposed"].transpose("record", "strategy", "tensor").values
    verified = np.isfinite(np.asarray(counts, dtype=np.float64)).any(axis=(1, 2))
    return verified if verified.any() else None


_DTYPE_LIMITS = {
    d: (torch.finfo(d).eps / 2, torch.finfo(d).tiny * torch.finfo(d).eps / 2)
    for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
}
"""dtype -> (unit roundoff u, half the smallest subnormal: the absolute error of rounding a
value of the subnormal range)."""


def _label_weights(label: str, alpha: float, gamma: float) -> tuple[str, float, float]:
    """``"sago[alpha=0.5]"`` -> ``("sago", 0.5, gamma)``: the recorder's label of a shadow
    whose weights differ from the run's."""
    base, _, rest = label.partition("[")
    weights = {"alpha": alpha, "gamma": gamma}
    for item in rest.rstrip("]").split(",") if rest else ():
        key, _, value = item.partition("=")
        if key in weights:
            weights[key] = float(value)
    return base, weights["alpha"], weights["gamma"]


def check_v1(run: Run, dtype: torch.dtype | str | None = None) -> list[CheckResult]:
    """V1: each shadow's closed-form statistics equal those of its update materialised with
    the strategy's own code, at the run's verified records (docs/theory.md#v1).

    Per (verified step, shadow, tensor), with ``d`` the closed form (float64) and ``d~`` the
    materialised update (rounded once to the gradient dtype, arithmetic in float64 for the
    projection rules and in float32 for the sign rules on 16/32-bit gradients):
    ``|d~ - d| <= E = (rho |d| + sigma (gamma|f| + alpha|r|) + z sqrt(numel)) (1 + rho)`` with
    ``rho = u + 6 u_c`` (u, u_c the unit roundoffs of the gradient and compute dtypes),
    ``sigma = 5 g_N + 24 u64`` (``g_N = N u64 / (1 - N u64)``, N the recorded coordinates: the
    float64 sums' order and the coefficient they give) and ``z`` the subnormal rounding error.
    Hence ``|<d~,x> - <d,x>| <= E |x| + 2 g_N |d||x|`` for x = f, r and
    ``||d~|^2 - |d|^2| <= 2|d|E + E^2 + 2 g_N |d|^2``. ``n_opposed`` must match up to the
    coordinates where a sign can flip (``verified_n_ambiguous``), ``n_projected`` exactly unless
    the pooled ``|<f,r>| <= 2 g_N sum |f_j||r_j|``. The margin is the largest
    |difference| / tolerance over the five statistics (a violation when > 1).
    """
    ds, source = run.ds, run.label
    names = [str(s) for s in ds["strategy"].values]
    measured = _measured(ds)
    registry = gstrategies.names()  # one order whatever the store's (stacking merges orders)
    shadows = sorted(
        (n for n in names if not measured[n]),
        key=lambda n: (registry.index(n) if n in registry else len(registry), n),
    )
    verified = _verified(ds)
    if not shadows:
        return [_v1_empty("shadows", source, "no shadow strategy recorded in this run")]
    if verified is None:
        note = (
            "not verified: no verified record (a store written before geomkit verified "
            "shadows, or recorded with verify_every=0)"
        )
        return [_v1_empty(n, source, note) for n in shadows]
    alpha_run, gamma_run = _weights(run)
    torch_dtype, dtype_note = _dtype(run, dtype)
    u, z = _DTYPE_LIMITS[torch_dtype]
    compute = torch.float64 if torch_dtype == torch.float64 else torch.float32
    u_c, z_c = _DTYPE_LIMITS[compute]
    u64 = _DTYPE_LIMITS[torch.float64][0]
    rho = u + 6 * u_c
    sub = ds.isel(record=np.flatnonzero(verified))
    numel = np.asarray(sub["numel"].values, dtype=np.float64)
    n_total = float(numel.sum())
    g_n = n_total * u64 / (1 - n_total * u64)
    sigma = 5 * g_n + 24 * u64

    def pair(name: str) -> np.ndarray:
        return np.asarray(sub[name].transpose("record", "tensor").values, dtype=np.float64)

    ff, rr, fr = pair("ff"), pair("rr"), pair("fr")
    f_norm, r_norm = np.sqrt(np.maximum(ff, 0)), np.sqrt(np.maximum(rr, 0))
    where = [
        f"step {int(s)}, tensor {t}" for s in sub["record"].values for t in sub["tensor"].values
    ]
    results = []
    for label in shadows:
        k = names.index(label)
        base, alpha, gamma = _label_weights(label, alpha_run, gamma_run)

        def get(name: str, k: int = k) -> np.ndarray:
            values = sub[name].transpose("record", "strategy", "tensor").values[:, k]
            return np.asarray(values, dtype=np.float64)

        closed = {n: get(n) for n in V1_FIELDS}
        mat = {n: get(f"verified_{n}") for n in V1_FIELDS}
        ambiguous = get("verified_n_ambiguous")
        with np.errstate(invalid="ignore", over="ignore"):
            d_norm = np.sqrt(np.maximum(np.fmax(closed["dd"], mat["dd"]), 0))
            size = (gamma * f_norm + alpha * r_norm) * sigma
            e = (rho * d_norm + size + (z + 6 * z_c) * np.sqrt(numel)) * (1 + rho)
            tol = {
                "dd": 2 * d_norm * e + e * e + 2 * g_n * d_norm**2,
                "df": e * f_norm + 2 * g_n * d_norm * f_norm,
                "dr": e * r_norm + 2 * g_n * d_norm * r_norm,
            }
            ratios = {}
            for n, t in tol.items():
                diff = np.abs(mat[n] - closed[n])
                ratios[n] = np.where(diff == 0, 0.0, diff / np.maximum(t, np.finfo(float).tiny))
            opposed = np.abs(mat["n_opposed"] - closed["n_opposed"])
            ratios["n_opposed"] = opposed / (ambiguous + 0.5)
            flip = _projection_may_flip(base, fr, f_norm * r_norm, g_n)
            projected = np.abs(mat["n_projected"] - closed["n_projected"])
            ratios["n_projected"] = projected / (flip + 0.5)
        q = np.maximum.reduce([ratios[n] for n in V1_FIELDS])
        finite = np.ones(q.shape, dtype=bool)
        for values in (*closed.values(), *mat.values(), ambiguous, ff, rr, fr):
            finite &= np.isfinite(values)
        details = {
            f"max_ratio_{n}": float(np.nanmax(r)) if np.isfinite(r).any() else np.nan
            for n, r in ratios.items()
        }
        details["verified_records"] = float(verified.sum())
        details["n_opposed_mismatches"] = float(np.nansum(opposed > ambiguous))
        details["n_projected_mismatches"] = float(np.nansum(projected > flip))
        note = "; ".join(
            p
            for p in (
                f"{int(verified.sum())} of {verified.size} records verified",
                f"alpha={alpha:g}, gamma={gamma:g}",
                dtype_note,
                *run.dropped,
            )
            if p
        )
        results.append(
            summarise(
                "V1",
                label,
                (label,),
                None,
                q.ravel(),
                1.0,
                np.ones(q.size, dtype=bool),
                granularity="tensor",
                source=source,
                where=tuple(where),
                tolerance=(
                    "|materialised - closed form| / tol <= 1 for <d,d>, <d,f>, <d,r>; tol from "
                    f"rounding d to {str(torch_dtype).replace('torch.', '')} (rho = {rho:.3g}) "
                    f"and float64 sums (sigma = {sigma:.3g}); counts exact up to sign-ambiguous "
                    "coordinates (docs/theory.md#v1)"
                ),
                evidence="materialised",
                note=note,
                deviation=True,
                details=details,
                finite=finite.ravel(),
            )
        )
    return results


V1_FIELDS: tuple[str, ...] = ("dd", "df", "dr", "n_opposed", "n_projected")
"""The statistics V1 compares (the other verified fields, ``n_unrounded`` and ``dr_abs``, are
R0's, checked on the materialised updates of closed-form stores by :func:`check_r0_verified`)."""


def verified_run(run: Run) -> Run | None:
    """The run's verified records with each strategy's update statistics replaced by those of
    its materialised update (``verified_<field>``), or None when there are none (or a
    verification variable is missing)."""
    ds = run.ds
    verified = _verified(ds)
    names = [f"verified_{n}" for n in VERIFIED_FIELDS]
    if verified is None or any(n not in ds for n in names):
        return None
    sub = ds.isel(record=np.flatnonzero(verified))
    keep = np.isfinite(sub["verified_dd"].transpose("record", "strategy", "tensor").values)
    strategies = np.flatnonzero(keep.all(axis=(0, 2)))
    if not strategies.size:
        return None
    sub = sub.isel(strategy=strategies)
    for name in VERIFIED_FIELDS:
        sub[name] = sub[f"verified_{name}"].astype(sub[name].dtype)
    note = (
        f"the updates materialised at the {int(verified.sum())} verified of {verified.size} "
        "records (the record statistics are closed forms)"
    )
    return replace(run, ds=sub, dropped=(*run.dropped, note))


def check_r0_verified(run: Run, dtype: torch.dtype | str | None = None) -> list[CheckResult]:
    """R0 of a closed-form store (attribute ``applied_statistics = "closed_form"``): on the
    update of every strategy, the applied one included, materialised with its own code at the
    verified records (for the applied strategy, the update applied at those steps); the
    record statistics there are closed forms, whose update is never rounded
    (docs/theory.md#r0)."""
    sub = verified_run(run)
    if sub is None:
        note = (
            "not verified: no verified record with n_unrounded (recorded with verify_every=0, "
            "or a store begun by a geomkit without verified_n_unrounded); the applied update's "
            "statistics are closed forms"
        )
        applied = str(run.ds["strategy"].values[0])
        return [
            not_evaluated(
                "R0", applied, (applied,), granularity="tensor", source=run.label, note=note
            )
        ]
    return check_r0(run_cases(sub, dtype, evidence="materialised")["tensor"])


def _projection_may_flip(base: str, fr: np.ndarray, scale: np.ndarray, g_n: float) -> np.ndarray:
    """1 where the projection test ``<f,r> < 0`` (pooled by the strategy's scope) is within
    the float64 summation error of 0, so that two summation orders may disagree, else 0."""
    try:
        strategy = build(base)
    except ValueError:
        strategy = None
    tensor = np.abs(fr) <= 2 * g_n * scale
    model = np.abs(fr.sum(1, keepdims=True)) <= 2 * g_n * scale.sum(1, keepdims=True)
    model = np.broadcast_to(model, fr.shape)
    if strategy is None:  # an unregistered strategy: either pooling
        return (tensor | model).astype(float)
    if not strategy.rule.reduces:
        return np.zeros(fr.shape)
    return (model if isinstance(strategy.scope, Global) else tensor).astype(float)


def _v1_empty(strategy: str, source: str, note: str) -> CheckResult:
    """A V1 result with nothing evaluated (never a pass)."""
    return not_evaluated(
        "V1", strategy, (strategy,), granularity="tensor", source=source, note=note
    )


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
    (false) is measured at the run's own alpha and gamma, stated in each result's note. S1 and
    S2 (open, never gated) are about the step the optimizer took (:mod:`geomkit.theory.steps`):
    S1 per run, S2 across the runs given (a SAGO run against a PCGrad run of the same
    objective, seed and weights); a store without step statistics gives results with nothing
    evaluated.
    """
    claims = check_claims(claims)
    runs = load(source)
    results: list[CheckResult] = []
    steps: list[StepRun] = []
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
        if "V1" in claims:
            results.extend(check_v1(run, dtype))
        if "R0" in claims and closed_form(run.ds):  # the formed updates: at verified records
            results.extend(check_r0_verified(run, dtype))
        for granularity in ("tensor", "layer", "model"):
            for claim in claims:
                if claim in ADDITIVE_CHECKS:
                    results.extend(ADDITIVE_CHECKS[claim](cases[granularity]))
        if "S1" in claims or "S2" in claims:  # the step taken (open, never gated)
            steps.append(step_run(run, cases))
        if "S1" in claims:
            results.extend(check_s1(steps[-1], g) for g in ("tensor", "layer", "model"))
    if "S2" in claims:  # across runs: a SAGO run against a PCGrad run
        results.extend(check_s2(steps))
    attrs = {"kind": "recorded", "runs": [run.label for run in runs]}
    return Audit(sort_results(results), attrs)
