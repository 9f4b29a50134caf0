"""Claims about the step the optimizer took: S1 and S2 (docs/theory.md#s1, #s2), both open.

R1, R2 and R2b are about the combined update d. The model moves by the optimizer's step
``u = theta_old - theta_new`` (after clipping, AdamW's per-coordinate normalisation and
momentum, weight decay and the learning rate), recorded per (record, tensor) as the step fields
``uu = <u,u>``, ``ur = <u,r>``, ... (:data:`geomkit.fields.STEP_FIELDS`,
docs/method.md#the-step-taken). Only the applied strategy has a step: shadows are never applied.

* **S1** (:func:`check_s1`): ``cos(u, r) >= 0`` for the applied strategy of each run, at tensor,
  layer and model granularity, with the d-level verdict at the same cases beside it.
* **S2** (:func:`check_s2`): ``cos(u_SAGO, r) >= cos(u_PCGrad, r)`` between a run with SAGO
  applied and a run with PCGrad (per tensor or global) applied, paired by objective, seed and
  weights at the same record step, with the d-level ordering (R4) at those records beside it.

Both are measurements: never gated, never ``BUG``, never in ``geomkit check``'s exit status.
A store without step statistics (schema version < 3, or recorded with ``record_step=False``:
every step field NaN) gives a result with nothing evaluated and a note saying so.

Tolerance (docs/theory.md#s1): ``u`` is a float64 model of the optimizer's step computed from the
gradient-dtype d (exact in float64), so its statistics carry float64 rounding only:
``tol = 2 * 2 (N + T + 8) u64 + 64 u64`` in cosine units (the accumulation of ``<u,r>`` and of
both norms, and a few float64 roundings in each ``u_i``). The rounding of the step into the
parameter dtype (the realised change) is not recorded and is outside the claim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from geomkit.kernels import UNIT_ROUNDOFF_64
from geomkit.runs import Run
from geomkit.theory.breakdown import comparison_cases
from geomkit.theory.cases import Cases, field_of
from geomkit.theory.checks import not_evaluated, summarise
from geomkit.theory.claims import Comparison
from geomkit.theory.report import CheckResult

__all__ = [
    "FORMATION_SLACK",
    "NOT_RECORDED",
    "StepRun",
    "check_s1",
    "check_s2",
    "step_cosine",
    "step_run",
]

FORMATION_SLACK: float = 64 * UNIT_ROUNDOFF_64
"""Allowance, relative to ``|u_i|``, for the float64 roundings of forming one coordinate of the
step (SGD: two or three products; AdamW: about a dozen operations): it moves ``cos(u, r)`` by
at most this much, since ``sum |u_i r_i| <= |u||r|``."""

NOT_RECORDED = (
    "the step was not recorded (every step field NaN or absent: a store of schema version < 3, "
    "or recorded with record_step=False / without a step model): nothing evaluated"
)

_GRANULARITIES = ("tensor", "layer", "model")

_D_LEVEL = {
    "sago": "proven (R1)",
    "sago_prefer_retain": "proven (d_i r_i >= 0 at every coordinate, R6)",
    "pcgrad": "proven (R2)",
    "pcgrad_global": "proven for the model (R2b), false per tensor and per layer",
}


@dataclass(frozen=True)
class StepRun:
    """What S1 and S2 need of one recorded run.

    Attributes
    ----------
    run : Run
        The run (its label, objective, seed, weights).
    cases : mapping of str to Cases
        :func:`geomkit.theory.recorded.run_cases` at tensor, layer and model granularity.
    applied : str
        The applied strategy (the only one with a step).
    steps : ndarray
        The step number of each record.
    measured : ndarray of bool
        Per record: the step was measured there (some tensor's ``uu`` is finite).
    absent : bool
        The store has no step fields at all (written before schema version 3).
    """

    run: Run
    cases: dict[str, Cases]
    applied: str
    steps: np.ndarray
    measured: np.ndarray
    absent: bool

    @property
    def label(self) -> str:
        return self.run.label

    def parts(self, granularity: str) -> list[str]:
        """The part labels of one record's cases, as the cases name them (``"tensor <name>"``,
        ``"layer <label>"``; ``["model"]``)."""
        cases = self.cases[granularity]
        n = len(cases) // max(len(self.steps), 1)
        if granularity == "model":
            return ["model"]
        return [w.split(", ", 1)[1] for w in cases.where[:n]]


def step_run(run: Run, cases: dict[str, Cases]) -> StepRun:
    """A :class:`StepRun` of ``run`` from its cases (:func:`geomkit.theory.recorded.run_cases`)."""
    ds = run.ds
    applied = str(ds["strategy"].values[0]) if run.strategy is None else str(run.strategy)
    if applied not in cases["tensor"].stats:  # an applied label the store does not hold
        applied = str(ds["strategy"].values[0])
    absent = "uu" not in ds
    if absent:
        measured = np.zeros(ds.sizes["record"], dtype=bool)
    else:
        uu = np.asarray(ds["uu"].transpose("record", "tensor").values, dtype=np.float64)
        measured = np.isfinite(uu).any(axis=1)
    steps = np.asarray(ds["record"].values, dtype=np.int64)
    return StepRun(run, cases, applied, steps, measured, absent)


def step_cosine(cases: Cases, name: str) -> tuple[np.ndarray, ...]:
    """``(cos, tol, defined, finite)`` per case: ``cos(u, r)`` of the step recorded beside
    strategy ``name`` (the applied one), its float64 tolerance (docs/theory.md#s1), where no
    zero ``|u|`` or ``|r|`` makes it undefined (True for non-finite data: a NaN never hides), and
    where ``uu``, ``ur``, ``rr`` are finite."""
    s = cases.stats[name]
    uu, ur, rr = field_of(s, "uu"), field_of(s, "ur"), field_of(s, "rr")
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        norm = np.sqrt(uu) * np.sqrt(rr)
        cos = np.where(norm > 0, ur / np.where(norm > 0, norm, 1.0), np.nan)
    finite = np.isfinite(uu) & np.isfinite(ur) & np.isfinite(rr)
    defined = ~(norm == 0) | ~finite
    tol = 2 * cases.float64_bound + FORMATION_SLACK
    return cos, tol, defined, finite


def _d_cosine(cases: Cases, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per case: ``cos(d, r) >= -tol`` violated and defined, as R1 / R2 count it."""
    s = cases.stats[name]
    dd, dr, rr = field_of(s, "dd"), field_of(s, "dr"), field_of(s, "rr")
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        norm = np.sqrt(dd) * np.sqrt(rr)
        ok = norm > 0
        cos = np.where(ok, dr / np.where(ok, norm, 1.0), np.nan)
        tol = np.where(
            ok, (cases.rounding[name] + cases.residual[name]) / np.where(ok, norm, 1.0), 0
        )
        finite = np.isfinite(dd) & np.isfinite(dr) & np.isfinite(rr)
        violated = ~(norm == 0) & ((cos < -tol) | ~finite)
    return violated, ~(norm == 0)


_TOLERANCE_S1 = (
    "cos(u,r) >= -tol (ties hold); tol = 2 * 2 (N + T + 8) u64 (float64 sums of <u,r>, |u|^2, "
    "|r|^2) + 64 u64 (float64 roundings of each u_i); u is the optimizer's step modelled in "
    "float64 (docs/method.md#the-step-taken), its rounding into the parameter dtype is outside "
    "the claim (docs/theory.md#s1)"
)


def _list(items: Sequence[str], limit: int) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _locations(where: Sequence[str], bad: np.ndarray, granularity: str) -> tuple[str, int, int]:
    """Which steps and which parts (tensors, layers) the violations are at, in words, and how
    many distinct steps and parts."""
    bad_where = [w for w, b in zip(where, bad, strict=True) if b]
    if not bad_where:
        return "", 0, 0
    steps = list(dict.fromkeys(w.split(", ", 1)[0] for w in bad_where))
    text = f"fails at {_list(steps, 8)}"
    if granularity == "model":
        return text, len(steps), 1
    counts: dict[str, int] = {}
    for w in bad_where:
        part = w.split(", ", 1)[1]
        counts[part] = counts.get(part, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])
    parts = [f"{p} ({n})" for p, n in top]
    return f"{text}; most often at {_list(parts, 3)}", len(steps), len(counts)


def check_s1(view: StepRun, granularity: str) -> CheckResult:
    """S1 (open): ``cos(u, r) >= 0`` for the applied strategy of one run at ``granularity``
    (docs/theory.md#s1). Only records where the step was measured are cases; the d-level
    verdict at the same cases (``cos(d, r) >= -tol`` as R1 / R2 count it) is in ``details``
    (``d_violations``; ``optimizer_introduced``: the step fails where d held;
    ``optimizer_repaired``: the step holds where d failed)."""
    name, cases = view.applied, view.cases[granularity]
    if not view.measured.any():
        return not_evaluated(
            "S1",
            name,
            (name,),
            granularity=granularity,
            source=view.label,
            note=NOT_RECORDED,
        )
    n_parts = len(cases) // len(view.steps)
    keep = np.repeat(view.measured, n_parts)
    cos, tol, defined, finite = (np.asarray(a)[keep] for a in step_cosine(cases, name))
    tol = np.broadcast_to(tol, cos.shape)
    where = tuple(w for w, k in zip(cases.where, keep, strict=True) if k)
    d_bad, d_defined = (a[keep] for a in _d_cosine(cases, name))
    with np.errstate(invalid="ignore"):
        bad = defined & ((cos < -tol) | ~finite | ~np.isfinite(tol))
    ok = defined & finite & np.isfinite(cos)
    located, n_steps, n_parts_bad = _locations(where, bad, granularity)
    details: dict[str, float] = {
        "measured_records": float(view.measured.sum()),
        "unmeasured_records": float((~view.measured).sum()),
        "failing_steps": float(n_steps),
        "d_cases": float(d_defined.sum()),
        "d_violations": float(d_bad.sum()),
        "optimizer_introduced": float((bad & d_defined & ~d_bad).sum()),
        "optimizer_repaired": float((ok & ~bad & d_bad).sum()),
    }
    if granularity != "model":
        details["failing_parts"] = float(n_parts_bad)
    if ok.any():
        details["mean_cos_ur"] = float(np.mean(cos[ok]))
        details["median_cos_ur"] = float(np.median(cos[ok]))
    unmeasured = int((~view.measured).sum())
    note = "; ".join(
        p
        for p in (
            "open: measured, not gated",
            located,
            f"d-level cos(d,r) >= 0 for {name}: {_D_LEVEL.get(name, 'not a claim')}; at "
            f"these cases d fails in {int(d_bad.sum())}, and the step fails in "
            f"{int(details['optimizer_introduced'])} where d held",
            f"{unmeasured} record(s) without a measured step left out" if unmeasured else "",
            "undefined: |u| = 0 or |r| = 0" if (~defined).any() else "",
            f"alpha={cases.alpha:g}, gamma={cases.gamma:g}",
            cases.notes.get(name, ""),
        )
        if p
    )
    return summarise(
        "S1",
        name,
        (name,),
        cases,
        cos,
        tol,
        defined,
        granularity=granularity,
        source=view.label,
        where=where,
        tolerance=_TOLERANCE_S1,
        evidence="measured",
        note=note,
        details=details,
        finite=finite,
    )


# ----------------------------------------------------------------------------------------------
# S2: SAGO's run against a PCGrad run, step against step
# ----------------------------------------------------------------------------------------------


def _key(view: StepRun) -> tuple:
    run = view.run
    return (run.objective, run.seed, run.alpha, run.gamma)


def _describe(view: StepRun) -> str:
    run = view.run
    return (
        f"objective {run.objective}, seed {run.seed}, alpha={run.alpha:g}, gamma={run.gamma:g}"
        if run.alpha is not None and run.gamma is not None
        else f"objective {run.objective}, seed {run.seed}"
    )


def _grid(values: np.ndarray, n_records: int) -> np.ndarray:
    values = np.asarray(values)
    return values.reshape(n_records, values.size // n_records)


_TOLERANCE_S2 = (
    "cos(u_sago,r) - cos(u_other,r) >= -tol (ties hold); tol = the sum of both runs' S1 "
    "tolerances, each 2 * 2 (N + T + 8) u64 + 64 u64 (docs/theory.md#s2)"
)


def _pair(sago: StepRun, other: StepRun, pair: Comparison) -> list[CheckResult]:
    """S2 at tensor, layer and model granularity for one SAGO run and one PCGrad run."""
    for view in (sago, other):
        if not view.measured.any():
            note = f"run {view.label!r}: {NOT_RECORDED}"
            return [_missing_pair(pair, sago.label, note)]
    steps = sorted(
        set(sago.steps[sago.measured].tolist()) & set(other.steps[other.measured].tolist())
    )
    if not steps:
        note = f"no record step where both {sago.label!r} and {other.label!r} measured the step"
        return [_missing_pair(pair, sago.label, note)]
    rows_s = np.array([int(np.flatnonzero(sago.steps == s)[0]) for s in steps])
    rows_o = np.array([int(np.flatnonzero(other.steps == s)[0]) for s in steps])
    out = []
    for granularity in _GRANULARITIES:
        parts_s, parts_o = sago.parts(granularity), other.parts(granularity)
        common = [p for p in parts_s if p in parts_o]
        if not common:
            note = (
                f"the runs share no {granularity} ({sago.label!r}, {other.label!r}): not comparable"
            )
            out.append(_missing_pair(pair, sago.label, note, granularity))
            continue
        cols_s = np.array([parts_s.index(p) for p in common])
        cols_o = np.array([parts_o.index(p) for p in common])

        def pick(values: np.ndarray, view: StepRun, rows: np.ndarray, cols: np.ndarray):
            return _grid(values, len(view.steps))[np.ix_(rows, cols)].ravel()

        cs, co = sago.cases[granularity], other.cases[granularity]
        got_s = [
            pick(np.broadcast_to(a, (len(cs),)), sago, rows_s, cols_s)
            for a in step_cosine(cs, "sago")
        ]
        got_o = [
            pick(np.broadcast_to(a, (len(co),)), other, rows_o, cols_o)
            for a in step_cosine(co, pair.second)
        ]
        cos_s, tol_s, def_s, fin_s = got_s
        cos_o, tol_o, def_o, fin_o = got_o
        finite = fin_s & fin_o
        defined = (def_s & def_o) | ~finite
        gap, tol = cos_s - cos_o, tol_s + tol_o
        ok = defined & finite & np.isfinite(gap)
        with np.errstate(invalid="ignore"):
            bad = defined & ((gap < -tol) | ~finite)
        if granularity == "model":
            where = tuple(f"step {s}" for s in steps)
        else:
            where = tuple(f"step {s}, {p}" for s in steps for p in common)
        details: dict[str, float] = {"records": float(len(steps))}
        if ok.any():
            details["mean_gap"] = float(np.mean(gap[ok]))
            details["median_gap"] = float(np.median(gap[ok]))
        # the d-level ordering (R4) on each run's own gradients, at the same cases
        d_text = []
        for label, view, c, rows, cols in (
            ("sago_run", sago, cs, rows_s, cols_s),
            ("other_run", other, co, rows_o, cols_o),
        ):
            if "sago" not in c.stats or pair.second not in c.stats:
                d_text.append(f"d-level not available in {view.label!r} (a shadow is missing)")
                continue
            comp = comparison_cases(c, "sago", pair.second)
            d_bad = pick(comp.violated, view, rows, cols)
            d_def = pick(comp.defined, view, rows, cols)
            details[f"d_cases_{label}"] = float(d_def.sum())
            details[f"d_violations_{label}"] = float(d_bad.sum())
            if label == "sago_run":
                details["step_fails_d_holds"] = float((bad & d_def & ~d_bad).sum())
                details["d_fails_step_holds"] = float((ok & ~bad & d_bad).sum())
            d_text.append(
                f"d-level cos(d_sago,r) >= cos(d_{pair.second},r) in {view.label!r}: fails in "
                f"{int(d_bad.sum())} of {int(d_def.sum())}"
            )
        located, n_steps, _ = _locations(where, bad, granularity)
        details["failing_steps"] = float(n_steps)
        note = "; ".join(
            p
            for p in (
                "open: measured, not gated",
                f"against run {other.label!r} ({pair.second} applied; paired by {_describe(sago)}"
                f", {len(steps)} common record steps)",
                "the runs share the gradients only at the first step; afterwards each follows "
                "its own trajectory, so f and r differ between them and the gap mixes the rule "
                "with the trajectory",
                located,
                *d_text,
                "undefined: a zero |u| or |r|" if (~defined).any() else "",
                f"{len(parts_s) - len(common)} {granularity}(s) of the SAGO run not in the other"
                if len(common) < len(parts_s)
                else "",
            )
            if p
        )
        out.append(
            summarise(
                "S2",
                pair,
                pair,
                None,
                gap,
                tol,
                defined,
                granularity=granularity,
                source=sago.label,
                where=where,
                tolerance=_TOLERANCE_S2,
                evidence="measured",
                note=note,
                details=details,
                finite=finite,
            )
        )
    return out


def _missing_pair(
    pair: Comparison, source: str, note: str, granularity: str = "model"
) -> CheckResult:
    return not_evaluated("S2", pair, pair, granularity=granularity, source=source, note=note)


def check_s2(views: Sequence[StepRun]) -> list[CheckResult]:
    """S2 (open): ``cos(u_SAGO, r) >= cos(u_PCGrad, r)`` for each pair of a run with ``sago``
    applied and a run with ``pcgrad`` (or ``pcgrad_global``) applied of the same objective,
    seed and weights, at their common record steps (docs/theory.md#s2); the result's source is
    the SAGO run. A run of either side without a partner, or a pair without a measured step,
    gives one result with nothing evaluated (model granularity) that says why."""
    out: list[CheckResult] = []
    if not views:
        return out
    for second in ("pcgrad", "pcgrad_global"):
        pair = Comparison("sago", second)
        sagos = [v for v in views if v.applied == "sago"]
        others = [v for v in views if v.applied == second]
        if not sagos and not others:
            note = f"no run with sago or {second} applied among the audited runs"
            out.append(_missing_pair(pair, views[0].label, note))
            continue
        matched = set()
        for view in sagos:
            partners = [o for o in others if _key(o) == _key(view)]
            if not partners:
                note = (
                    f"no run with {second} applied for {_describe(view)}: S2 pairs a SAGO run "
                    "with a PCGrad run of the same objective, seed and weights"
                )
                out.append(_missing_pair(pair, view.label, note))
            for partner in partners:
                matched.add(partner.label)
                out.extend(_pair(view, partner, pair))
        for view in others:
            if view.label not in matched:
                note = (
                    f"no run with sago applied for {_describe(view)}: S2 pairs a SAGO run with "
                    f"a {second} run of the same objective, seed and weights"
                )
                out.append(_missing_pair(pair, view.label, note))
    return out
