"""Claim checks at tensor, layer and model granularity, from additive statistics (:class:`Cases`).

One function per claim of docs/theory.md; each returns :class:`CheckResult` objects, one per
strategy (or compared pair of strategies) present in the cases. The same functions serve
synthetic samplers (statistics of materialised updates) and recorded runs (stored statistics of
the applied and shadow strategies, paired on the same gradients).

Conventions (docs/theory.md#conventions):

* a case whose quantity needs a zero norm (``|r| = 0``, ``|d| = 0``) of finite statistics is
  *undefined*: counted apart, never a pass or a violation. Only a true zero is undefined;
* a case whose statistics, quantity or tolerance are NaN or infinite is a *violation*
  (``non_finite``), never undefined and never a pass: a NaN update must not hide;
* ties count as holding: a quantity ``q`` that should be ``>= 0`` violates only when
  ``q < -tol``, with ``tol`` from :mod:`geomkit.theory.cases` (stated in each result);
* the worst margin is the smallest ``q`` over the defined, finite cases (R3: the largest
  deviation); with a non-finite case it is ``-inf`` (R3: ``+inf``) at the first non-finite case,
  and the smallest finite margin goes to ``details["worst_finite_margin"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from geomkit.kernels import subnormal_rounding, update_rounding
from geomkit.strategies import build
from geomkit.theory.cases import FORMED, Cases, field_of, rtol
from geomkit.theory.claims import Comparison, get_claim
from geomkit.theory.report import CheckResult

__all__ = ["ADDITIVE_CHECKS", "check_r0", "check_r1", "check_r2", "check_r2b", "check_r3"]
__all__ += ["check_r3b", "check_r4"]
__all__ += ["check_r5", "check_r7", "check_r8", "check_r9", "summarise", "cosine_gap"]

_NO_DATA_NOTE = "strategy not present in this source"


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _sqrt(x: np.ndarray) -> np.ndarray:
    """Square root; NaN (not a warning) for a negative (tampered) sum of squares."""
    with np.errstate(invalid="ignore"):
        return np.sqrt(x)


def _finite(cases: Cases, names: tuple[str, ...], fields: tuple[str, ...]) -> np.ndarray:
    """Per case: every listed statistic of every listed strategy, and their rounding and
    residual bounds, are finite."""
    out = np.ones(len(cases), dtype=bool)
    for name in names:
        s = cases.stats[name]
        for f in fields:
            out &= np.isfinite(field_of(s, f))
        out &= np.isfinite(cases.rounding[name]) & np.isfinite(cases.residual[name])
    return out


def summarise(
    claim_id: str,
    strategy: str | Comparison,
    strategies: tuple[str, ...],
    cases: Cases | None,
    q: np.ndarray,
    tol: np.ndarray,
    defined: np.ndarray,
    *,
    granularity: str,
    source: str,
    where: tuple[str, ...],
    tolerance: str,
    evidence: str,
    note: str = "",
    deviation: bool = False,
    details: dict[str, float] | None = None,
    finite: np.ndarray | None = None,
) -> CheckResult:
    """Count cases, undefined cases and violations of ``q >= -tol`` (``|q| <= tol`` for a
    ``deviation``), and locate the worst margin, into a :class:`CheckResult`.

    ``defined`` is False only where a zero norm makes ``q`` undefined; ``finite`` (default all
    True) says where the statistics behind ``q`` are finite. A case with non-finite statistics,
    or a defined case with a non-finite ``q`` or ``tol``, is a violation (``non_finite``)."""
    claim = get_claim(claim_id)
    q = np.asarray(q, dtype=np.float64)
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), q.shape)
    inputs = np.ones(q.shape, dtype=bool) if finite is None else np.asarray(finite, dtype=bool)
    defined = np.asarray(defined, dtype=bool) | ~inputs  # non-finite data is never undefined
    non_finite = defined & ~(inputs & np.isfinite(q) & np.isfinite(tol))
    with np.errstate(invalid="ignore"):
        exceeded = (q > tol) if deviation else (q < -tol)
    bad = defined & (exceeded | non_finite)
    details = dict(details or {})
    worst, at = np.nan, ""
    ok = defined & ~non_finite
    if ok.any():
        idx = np.flatnonzero(ok)
        k = idx[np.argmax(q[idx])] if deviation else idx[np.argmin(q[idx])]
        worst, at = float(q[k]), where[k]
    if non_finite.any():
        k = int(np.flatnonzero(non_finite)[0])
        details["worst_finite_margin"] = worst
        worst, at = (np.inf if deviation else -np.inf), where[k]
        note = _join(
            f"{int(non_finite.sum())} non-finite case(s) (NaN or inf statistic, quantity or "
            f"tolerance) counted as violations, first at {where[k]}; worst_margin "
            f"{'+inf' if deviation else '-inf'} marks them (worst finite margin in details)",
            note,
        )
    return CheckResult(
        claim=claim.id,
        statement=claim.statement,
        status=claim.status_at(strategy, granularity),
        gates=claim.gates(strategy, granularity),
        strategy=str(strategy),
        strategies=strategies,
        granularity=granularity,
        source=source,
        cases=int(defined.sum()),
        undefined=int((~defined).sum()),
        violations=int(bad.sum()),
        non_finite=int(non_finite.sum()),
        worst_margin=worst,
        where=at,
        tolerance=tolerance,
        evidence=evidence,
        note=note,
        details=details,
    )


def not_evaluated(
    claim_id: str,
    strategy: str | Comparison,
    strategies: tuple[str, ...],
    *,
    granularity: str,
    source: str,
    note: str,
) -> CheckResult:
    """A result with nothing evaluated (0 cases: never a pass, never a violation)."""
    claim = get_claim(claim_id)
    return CheckResult(
        claim=claim.id,
        statement=claim.statement,
        status=claim.status_at(strategy, granularity),
        gates=claim.gates(strategy, granularity),
        strategy=str(strategy),
        strategies=strategies,
        granularity=granularity,
        source=source,
        cases=0,
        undefined=0,
        violations=0,
        worst_margin=np.nan,
        where="",
        tolerance="n/a (nothing evaluated)",
        evidence="none",
        note=note,
    )


def _missing(
    claim_id: str, strategy: str | Comparison, strategies: tuple[str, ...], cases: Cases
) -> CheckResult:
    absent = ", ".join(s for s in strategies if s not in cases.stats)
    return not_evaluated(
        claim_id,
        strategy,
        strategies,
        granularity=cases.granularity,
        source=cases.source,
        note=f"{_NO_DATA_NOTE} ({absent})",
    )


def _evidence(cases: Cases, names: tuple[str, ...]) -> str:
    kinds = {cases.evidence.get(n, "materialised") for n in names}
    if "shadow" in kinds:
        return "shadow"
    return "measured" if "measured" in kinds else kinds.pop()


def _weights_note(cases: Cases) -> str:
    return f"alpha={cases.alpha:g}, gamma={cases.gamma:g}"


def _source_notes(cases: Cases, names: tuple[str, ...]) -> str:
    return "; ".join(cases.notes[n] for n in names if n in cases.notes)


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


# ----------------------------------------------------------------------------------------------
# <d, r> >= 0: R1 (SAGO), R2 (per-tensor PCGrad), R2b (global PCGrad)
# ----------------------------------------------------------------------------------------------


def _alignment(claim_id: str, name: str, cases: Cases, residual_text: str) -> CheckResult:
    if name not in cases.stats:
        return _missing(claim_id, name, (name,), cases)
    s = cases.stats[name]
    dd, rr, dr = field_of(s, "dd"), field_of(s, "rr"), field_of(s, "dr")
    norm = _sqrt(dd) * _sqrt(rr)
    defined = ~(norm == 0)  # only a true zero norm is undefined; NaN is a violation
    finite = _finite(cases, (name,), ("ff", "rr", "fr", "dd", "dr"))
    q = _div(dr, norm)  # cos(d, r)
    tol = _div(cases.rounding[name] + cases.residual[name], norm)
    tolerance = (
        f"cos(d,r) >= -tol (ties hold); tol = [{_rounding_text(cases, name)}{residual_text}]"
    )
    tolerance += " / (|d||r|), summed over tensors"
    note = _join(
        "undefined: |d| = 0 or |r| = 0" if (~defined & finite).any() else "",
        _weights_note(cases),
        _source_notes(cases, (name,)),
    )
    return summarise(
        claim_id,
        name,
        (name,),
        cases,
        q,
        tol,
        defined,
        granularity=cases.granularity,
        source=cases.source,
        where=cases.where,
        tolerance=tolerance,
        evidence=_evidence(cases, (name,)),
        note=note,
        finite=finite,
    )


_RESIDUAL = " + gamma|<f,r>| 1e-10/(|r|^2 + 1e-10) per projected tensor"


def _rounding_text(cases: Cases, name: str) -> str:
    """The rounding bound of ``name`` in words (docs/theory.md#tolerances)."""
    text = "2 (N + T + 8) u64 (A|f||r| + B|r|^2)"
    formed = cases.evidence.get(name, "materialised") in FORMED
    try:
        keeps_signs = build(name).rule.never_opposes
    except ValueError:
        keeps_signs = False
    if formed and not keeps_signs:
        u, _ = update_rounding(cases.dtype)
        s = "(1 + u)(A|f||r| + B|r|^2)" if "dr_abs" in cases.absent else "sum|d_i r_i|"
        text += f" + u/(1-u) {s} + eta sqrt(n)|r|, u = {u:.3g} ({cases.dtype_name})"
    elif formed:
        text += " (a sign rule: rounding keeps every d_i r_i >= 0)"
    else:
        text += " (shadow: float64 only)"
    return (
        text
        + "; A, B the largest |a|, |b| of d = a f + b r, N, T the model's coordinates and tensors"
    )


def check_r1(cases: Cases) -> list[CheckResult]:
    """R1: ``<d_SAGO, r> >= 0`` (reported as cos(d, r)) at the cases' granularity."""
    return [_alignment("R1", "sago", cases, "")]


def check_r2(cases: Cases) -> list[CheckResult]:
    """R2: per-tensor PCGrad ``<d, r> >= -(1e-10 residual)`` per tensor, layer or model."""
    return [_alignment("R2", "pcgrad", cases, _RESIDUAL)]


def check_r2b(cases: Cases) -> list[CheckResult]:
    """R2b: global PCGrad ``<d, r> >= 0``: proven for the model, false per tensor or layer."""
    model = cases.granularity == "model"
    text = " + gamma|<f,r>| 1e-10/(|r|^2 + 1e-10) of the model" if model else ""
    return [_alignment("R2b", "pcgrad_global", cases, text)]


# ----------------------------------------------------------------------------------------------
# R3: PCGrad's closed form in the projected branch
# ----------------------------------------------------------------------------------------------


def check_r3(cases: Cases) -> list[CheckResult]:
    """R3: where PCGrad's projection fires, cos(d, r) = alpha|r| / sqrt(alpha^2|r|^2 +
    gamma^2|f~|^2); per tensor for ``pcgrad``, for the model for ``pcgrad_global`` (the only
    vectors the projection is made on; proven and gated there). Margin: the largest
    ``|cos(d, r) - closed form|``."""
    scope = {"tensor": "pcgrad", "model": "pcgrad_global"}.get(cases.granularity)
    if scope is None:
        return []
    if scope not in cases.stats:
        return [_missing("R3", scope, (scope,), cases)]
    a, g = cases.alpha, cases.gamma
    s = cases.stats[scope]
    ff, rr, fr = field_of(s, "ff"), field_of(s, "rr"), field_of(s, "fr")
    dd, dr = field_of(s, "dd"), field_of(s, "dr")
    finite = _finite(cases, (scope,), ("ff", "rr", "fr", "dd", "dr"))
    fired = (fr < 0) | ~finite  # a non-finite case is never outside the claim
    # |f~|^2 with c = <f,r>/(|r|^2 + 1e-10), written to avoid cancelling 2c<f,r> - c^2|r|^2:
    # |f~|^2 = (|f|^2 - <f,r>^2/|r|^2) + (<f,r>^2/|r|^2) (1 - s)^2, s = |r|^2/(|r|^2 + 1e-10)
    ratio = _div(fr * fr, rr)
    shrink = _div(rr, rr + 1e-10)
    ft2 = np.maximum(ff - ratio, 0.0) + ratio * (1.0 - shrink) ** 2
    rn, dn = _sqrt(rr), _sqrt(dd)
    base = a * a * rr + g * g * ft2
    closed = _div(a * rn, _sqrt(base))
    measured = _div(dr, dn * rn)
    defined = fired & ~((dd == 0) | (rr == 0) | (base == 0))  # zero norms only
    # exact cos with the 1e-10 term: <f~, r> = <f,r> 1e-10/(|r|^2 + 1e-10) =: rho / gamma
    rho = g * fr * _div(np.full_like(rr, 1e-10), rr + 1e-10)
    exact = _div(a * rr + rho, rn * _sqrt(np.maximum(base + 2 * a * rho, 0.0)))
    big_f = cases.float64_bound
    b = np.abs(a - g * _div(fr, rr + 1e-10))
    with np.errstate(invalid="ignore", over="ignore"):
        # the closed form from recorded sums: |f|^2, <f,r>, |r|^2 each err by <= big_f of
        # their absolute terms, so |f~|^2 by <= (4 big_f + 8 u64)|f|^2; d cos / d|f~|^2 =
        # -gamma^2 alpha |r| / (2 base^1.5)
        d_ft2 = (4 * big_f + 8 * 2.0**-53) * ff
        cancel = _div(g * g * a * rn * d_ft2, 2 * base**1.5)
        # |d| of the recorded update against the formula's: float64 sums of (gamma|f_i| +
        # b|r_i|)^2, and for a formed update the rounding of every d_i
        rel_d = _div(big_f * 2 * (g * g * ff + b * b * rr), dd)
        if cases.evidence.get(scope) in FORMED:
            u, _ = update_rounding(cases.dtype)
            eta = subnormal_rounding(cases.dtype)
            rel_d = rel_d + u / (1 - u) + _div(eta * _sqrt(field_of(s, "numel")), dn)
    tol = np.abs(exact - closed) + _div(cases.rounding[scope], dn * rn) + rel_d + cancel
    q = np.abs(measured - closed)
    outside = int((~fired).sum())
    note = _join(
        f"{outside} cases outside the projected branch (<f,r> >= 0) are outside the claim"
        if outside
        else "",
        _weights_note(cases),
        _source_notes(cases, (scope,)),
    )
    tolerance = (
        "|cos(d,r) - closed form| <= tol; tol = |effect of the 1e-10 term| + ["
        f"{_rounding_text(cases, scope)}] / (|d||r|) + relative error of |d| (float64 sums"
        "; u/(1-u) + eta sqrt(n)/|d| for a formed update) + float64 error of the closed form"
    )
    return [
        summarise(
            "R3",
            scope,
            (scope,),
            cases,
            np.where(defined, q, np.nan)[fired],
            np.where(defined, tol, np.nan)[fired],
            defined[fired],
            granularity=cases.granularity,
            source=cases.source,
            where=tuple(w for w, f in zip(cases.where, fired, strict=True) if f),
            tolerance=tolerance,
            evidence=_evidence(cases, (scope,)),
            note=note,
            deviation=True,
            finite=finite[fired],
        )
    ]


def check_r3b(cases: Cases) -> list[CheckResult]:
    """R3b: PCGrad's projection fires exactly when ``<f, r> < 0`` on the vector it is made on
    (per tensor for ``pcgrad``, the model for ``pcgrad_global``, where every tensor must follow
    the model's test), from the recorded ``n_projected``.

    Quantity: ``-cos(f, r)`` where it fired, ``cos(f, r)`` where it did not (``-1`` for a zero
    norm that fired, or for a model where only some tensors fired); it must be
    ``>= -2 (N + T + 8) u64``, the float64 error of the recorded ``<f, r>`` against the one the
    strategy tested (the same sum in another order)."""
    scope = {"tensor": "pcgrad", "model": "pcgrad_global"}.get(cases.granularity)
    if scope is None:
        return []
    if scope not in cases.stats:
        return [_missing("R3b", scope, (scope,), cases)]
    s = cases.stats[scope]
    ff, rr, fr = field_of(s, "ff"), field_of(s, "rr"), field_of(s, "fr")
    projected, tensors = field_of(s, "n_projected"), field_of(s, "n_tensors")
    finite = _finite(cases, (scope,), ("ff", "rr", "fr", "n_projected"))
    fired = projected > 0
    norm = _sqrt(ff) * _sqrt(rr)
    cos = _div(fr, norm)
    q = np.where(norm > 0, np.where(fired, -cos, cos), np.where(fired, -1.0, 0.0))
    q = np.where(fired & (projected != tensors), -1.0, q)  # some tensors of the model only
    tolerance = (
        "-cos(f,r) where the projection fired, cos(f,r) where it did not, >= -tol; tol = "
        "2 (N + T + 8) u64 (float64 error of the recorded <f,r>); a model with only some "
        "tensors projected, or a zero |f||r| that fired, scores -1"
    )
    return [
        summarise(
            "R3b",
            scope,
            (scope,),
            cases,
            q,
            cases.float64_bound,
            np.ones(len(cases), dtype=bool),
            granularity=cases.granularity,
            source=cases.source,
            where=cases.where,
            tolerance=tolerance,
            evidence=_evidence(cases, (scope,)),
            note=_join(
                f"{int((fired & finite).sum())} of {len(cases)} cases projected",
                _source_notes(cases, (scope,)),
            ),
            finite=finite,
        )
    ]


def check_r0(cases: Cases) -> list[CheckResult]:
    """R0: the update that was formed (applied or materialised) is, at every coordinate, its
    strategy's float64 linear form rounded once to the gradient dtype: ``n_unrounded = 0`` per
    tensor. Shadow strategies form no update and are not evaluated."""
    if cases.granularity != "tensor":
        return []
    out = []
    for name, s in cases.stats.items():
        if cases.evidence.get(name, "materialised") not in FORMED:
            continue
        u, eta = update_rounding(cases.dtype)
        tolerance = (
            f"n_unrounded = 0: |d_i - (a f_i + b r_i)| <= u |a f_i + b r_i| + 32 u64 ((max|a| "
            f"+ alpha + gamma)|f_i| + (max|b| + alpha + gamma)|r_i|) + eta at every coordinate; "
            f"u = {u:.3g}, eta = {eta:.3g} ({cases.dtype_name})"
        )
        if "n_unrounded" in cases.absent:
            out.append(
                replace(
                    _missing("R0", name, (name,), cases),
                    tolerance=tolerance,
                    note="n_unrounded not recorded (a store written before it existed): "
                    "nothing evaluated",
                )
            )
            continue
        count = field_of(s, "n_unrounded")
        q = -count
        consistency = ""
        if name in cases.formula:  # a uniform rule: <d, r> within rounding of <d*, r>
            dr_formula, tol_formula = cases.formula[name]
            excess = np.abs(field_of(s, "dr") - dr_formula) - tol_formula
            norm = _sqrt(field_of(s, "dd")) * _sqrt(field_of(s, "rr"))
            with np.errstate(invalid="ignore"):
                slack = np.where(norm > 0, _div(-excess, norm), np.where(excess <= 0, 0.0, -1.0))
            slack = np.where(np.isnan(excess), np.nan, slack)
            q = np.where(count > 0, -count, slack)
            consistency = (
                "; and |<d,r> - <d*,r>| <= rounding bound, <d*,r> = a<f,r> + b|r|^2 the "
                "formula's float64 value (uniform rules; margin in cosine units)"
            )
        out.append(
            summarise(
                "R0",
                name,
                (name,),
                cases,
                q,
                0.0,
                np.ones(len(cases), dtype=bool),
                granularity=cases.granularity,
                source=cases.source,
                where=cases.where,
                tolerance=tolerance + consistency,
                evidence=_evidence(cases, (name,)),
                note=_join(
                    "margin: minus the number of coordinates off the rounded formula"
                    + (", else the additive slack over |d||r|" if consistency else ""),
                    _weights_note(cases),
                    _source_notes(cases, (name,)),
                ),
                finite=np.isfinite(count),
            )
        )
    return out


# ----------------------------------------------------------------------------------------------
# Comparisons: R4, R7, R8 (cosines) and R5 (numerators)
# ----------------------------------------------------------------------------------------------


def cosine_gap(cases: Cases, first: str, second: str) -> tuple[np.ndarray, ...]:
    """``(gap, tol, defined, norm_ratio, finite)`` per case: ``gap = cos(d_first, r) -
    cos(d_second, r)``, its rounding tolerance, where no zero norm makes a cosine undefined
    (True for non-finite data: a NaN is never undefined), ``|f| / |r|``, and where the
    statistics of both strategies are finite."""
    a, b = cases.stats[first], cases.stats[second]
    rr = field_of(a, "rr")
    rn = _sqrt(rr)
    na, nb = _sqrt(field_of(a, "dd")) * rn, _sqrt(field_of(b, "dd")) * rn
    cos_a, cos_b = _div(field_of(a, "dr"), na), _div(field_of(b, "dr"), nb)
    gap = cos_a - cos_b
    tol = _div(cases.rounding[first], na) + _div(cases.rounding[second], nb)
    # a formed update's |d| is rounded too: each cosine moves by up to |cos| u / (1 - u)
    u, _ = update_rounding(cases.dtype)
    for name, cos in ((first, cos_a), (second, cos_b)):
        if cases.evidence.get(name, "materialised") in FORMED:
            tol = tol + np.abs(cos) * u / (1 - u)
    finite = _finite(cases, (first, second), ("ff", "rr", "fr", "dd", "dr"))
    defined = ~((na == 0) | (nb == 0)) | ~finite
    ratio = _div(_sqrt(field_of(a, "ff")), rn)
    return gap, tol, defined, ratio, finite


def _comparison(claim_id: str, first: str, second: str, cases: Cases) -> list[CheckResult]:
    pair = Comparison(first, second)
    claim = get_claim(claim_id)
    if not claim.evaluated_at(pair, cases.granularity):
        return []  # e.g. global PCGrad below the model: a slice of it is outside the claim
    if first not in cases.stats or second not in cases.stats:
        return [_missing(claim_id, pair, pair, cases)]
    gap, tol, defined, ratio, finite = cosine_gap(cases, first, second)
    details: dict[str, float] = {}
    ok = defined & finite & np.isfinite(gap) & np.isfinite(tol)
    if ok.any():
        details["mean_gap"] = float(np.mean(gap[ok]))
        details["median_gap"] = float(np.median(gap[ok]))
        bad = ok & (gap < -tol)
        for name, mask in (("ratio_below_1", ratio < 1), ("ratio_at_least_1", ratio >= 1)):
            n = int((ok & mask).sum())
            details[f"cases_{name}"] = n
            details[f"rate_{name}"] = float((bad & mask).sum() / n) if n else float("nan")
    weights = _weights_note(cases)
    if claim_id in ("R4", "R7") and (cases.alpha, cases.gamma) != (1.0, 1.0):
        weights += " (the claim is stated for alpha = gamma = 1; measured at these weights)"
    if claim.status_at(pair, cases.granularity) == "proven":
        gate = "proven (docs/theory.md#r7), reported but outside the bug gate"
    else:
        gate = "measured, not gated" if claim_id in ("R4", "R7", "R8") else ""
    note = _join(
        gate,
        "undefined: a zero |d| or |r|" if (~defined).any() else "",
        weights,
        _source_notes(cases, pair),
    )
    result = summarise(
        claim_id,
        pair,
        pair,
        cases,
        gap,
        tol,
        defined,
        granularity=cases.granularity,
        source=cases.source,
        where=cases.where,
        tolerance=(
            f"cos(d_{first},r) - cos(d_{second},r) >= -tol (ties hold); tol = sum of both "
            "cosines' rounding bounds (docs/theory.md#tolerances), plus |cos| u/(1-u) for an "
            "update that was formed"
        ),
        evidence=_evidence(cases, pair),
        note=note,
        details=details,
        finite=finite,
    )
    return [result]


def check_r4(cases: Cases) -> list[CheckResult]:
    """R4 (false, measured): cos(d_SAGO, r) >= cos(d_PCGrad, r), against per-tensor and
    global PCGrad. ``details``: mean and median gap, violation rate for ``|f| < |r|`` and
    ``|f| >= |r|``."""
    return [r for p in ("pcgrad", "pcgrad_global") for r in _comparison("R4", "sago", p, cases)]


def check_r7(cases: Cases) -> list[CheckResult]:
    """R7: cos(d_sago_prefer_retain, r) >= cos(d_PCGrad, r). Against per-tensor PCGrad (open)
    at every granularity; against global PCGrad (proven, outside the bug gate) for the model
    only: a tensor or layer slice of the globally projected update is outside the claim."""
    return [
        r
        for p in ("pcgrad", "pcgrad_global")
        for r in _comparison("R7", "sago_prefer_retain", p, cases)
    ]


def check_r8(cases: Cases) -> list[CheckResult]:
    """R8 (open): cos(d_PCGrad per tensor, r) >= cos(d_PCGrad global, r), for the model only
    (the claim is about the model-level vectors)."""
    return _comparison("R8", "pcgrad", "pcgrad_global", cases)


def check_r5(cases: Cases) -> list[CheckResult]:
    """R5 (false): ``<d_SAGO, r> >= <d_PCGrad, r>``, reported as a difference over ``|r|^2``."""
    out = []
    for other in ("pcgrad", "pcgrad_global"):
        pair = Comparison("sago", other)
        if "sago" not in cases.stats or other not in cases.stats:
            out.append(_missing("R5", pair, pair, cases))
            continue
        s, p = cases.stats["sago"], cases.stats[other]
        rr = field_of(s, "rr")
        finite = _finite(cases, pair, ("ff", "rr", "fr", "dr"))
        q = _div(field_of(s, "dr") - field_of(p, "dr"), rr)
        tol = _div(cases.rounding["sago"] + cases.rounding[other], rr)
        out.append(
            summarise(
                "R5",
                pair,
                pair,
                cases,
                q,
                tol,
                ~(rr == 0),
                granularity=cases.granularity,
                source=cases.source,
                where=cases.where,
                tolerance=(
                    "(<d_sago,r> - <d_pcgrad,r>) / |r|^2 >= -tol; tol = both rounding bounds / "
                    "|r|^2 (docs/theory.md#tolerances)"
                ),
                evidence=_evidence(cases, pair),
                note=_join("measured, not gated", _weights_note(cases)),
                finite=finite,
            )
        )
    return out


# ----------------------------------------------------------------------------------------------
# R9: SAGO's two parts have disjoint supports
# ----------------------------------------------------------------------------------------------


def check_r9(cases: Cases) -> list[CheckResult]:
    """R9 from additive statistics: if ``d = alpha r 1_C + gamma f 1_A`` (disjoint supports),
    then ``e = gamma<d,f> + alpha<d,r> - <d,d> - alpha gamma <f,r> = 0`` (coordinate-wise
    ``e_i = -(d_i - gamma f_i)(d_i - alpha r_i)``). A necessary condition: checked as
    ``-|e| / (alpha|r| + gamma|f|)^2 >= -rtol``."""
    if "sago" not in cases.stats:
        return [_missing("R9", "sago", ("sago",), cases)]
    a, g = cases.alpha, cases.gamma
    s = cases.stats["sago"]
    ff, rr, fr = field_of(s, "ff"), field_of(s, "rr"), field_of(s, "fr")
    dd, df, dr = field_of(s, "dd"), field_of(s, "df"), field_of(s, "dr")
    finite = _finite(cases, ("sago",), ("ff", "rr", "fr", "dd", "df", "dr"))
    with np.errstate(invalid="ignore", over="ignore"):
        e = g * df + a * dr - dd - a * g * fr
        scale = (a * _sqrt(rr) + g * _sqrt(ff)) ** 2
    defined = ~(scale == 0)
    q = -_div(np.abs(e), scale)
    shadow = cases.evidence.get("sago") == "shadow"
    note = _join(
        "necessary condition from sums only (the per-coordinate test needs the gradients)",
        "shadow statistics: a consistency check of the closed form" if shadow else "",
        "undefined: f = r = 0" if (~defined & finite).any() else "",
        _weights_note(cases),
        _source_notes(cases, ("sago",)),
    )
    return [
        summarise(
            "R9",
            "sago",
            ("sago",),
            cases,
            q,
            rtol(cases.dtype),
            defined,
            granularity=cases.granularity,
            source=cases.source,
            where=cases.where,
            tolerance=(
                "-|gamma<d,f> + alpha<d,r> - <d,d> - alpha gamma<f,r>| / (alpha|r| + gamma|f|)^2 "
                f">= -rtol; rtol = 8 eps({cases.dtype_name}) + 1e-12 = {rtol(cases.dtype):.3g}"
            ),
            evidence=_evidence(cases, ("sago",)),
            note=note,
            finite=finite,
        )
    ]


ADDITIVE_CHECKS: dict[str, Callable[[Cases], list[CheckResult]]] = {
    "R0": check_r0,
    "R1": check_r1,
    "R2": check_r2,
    "R2b": check_r2b,
    "R3": check_r3,
    "R3b": check_r3b,
    "R4": check_r4,
    "R5": check_r5,
    "R7": check_r7,
    "R8": check_r8,
    "R9": check_r9,
}
"""Claim id -> check over :class:`Cases` (tensor, layer, model). R6 is coordinate-wise only."""
