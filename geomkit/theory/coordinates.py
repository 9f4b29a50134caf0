"""Coordinate-granularity checks: R1/R6 (no coordinate of d opposes r) and R9 (every d_i is
alpha r_i or gamma f_i), on materialised synthetic updates; and R1/R6 from the recorded
``n_opposed`` counts of a run.

The sign test is exact and product-free (docs/method.md#sign-test-and-zeros): ``d_i`` opposes
``r_i`` iff ``(d_i > 0 and r_i < 0) or (d_i < 0 and r_i > 0)``; zeros, ``-0.0`` included, never
oppose. A coordinate where ``d_i`` (or ``f_i``, ``r_i``) is NaN or infinite is a violation
(``non_finite``): every comparison with NaN is False, so it would otherwise pass. The worst
margin is then ``-inf`` at the first such coordinate (``details["worst_finite_margin"]`` keeps
the most negative finite margin).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from geomkit.theory.cases import rtol
from geomkit.theory.claims import get_claim
from geomkit.theory.report import CheckResult
from geomkit.theory.samplers import Pair

__all__ = ["Flat", "flat64", "opposed_counts", "r9_coordinates", "sign_agreement"]

SIGN_TOLERANCE = (
    "exact sign test: d_i r_i >= 0 as sign(d_i) sign(r_i) >= 0 without products; zeros "
    "(including -0.0) never oppose; tol = 0"
)


@dataclass(frozen=True)
class Flat:
    """The pairs of one sampler as float64 arrays ``[n_pairs, n_coordinates]`` (tensors
    concatenated), with the tensor and in-tensor index of every coordinate."""

    forget: np.ndarray
    retain: np.ndarray
    tensor: np.ndarray
    index: np.ndarray
    starts: np.ndarray
    dtype: torch.dtype

    @classmethod
    def of_pairs(cls, pairs: Sequence[Pair]) -> Flat:
        """Flatten ``pairs`` (all with the same tensor shapes)."""
        shapes = [tuple(t.shape) for t in pairs[0].forget]
        for i, p in enumerate(pairs):
            if [tuple(t.shape) for t in p.forget] != shapes:
                raise ValueError(f"pair {i} has other tensor shapes than pair 0 ({shapes})")
        sizes = [int(np.prod(s)) for s in shapes]
        return cls(
            forget=np.stack([flat64(p.forget) for p in pairs]),
            retain=np.stack([flat64(p.retain) for p in pairs]),
            tensor=np.repeat(np.arange(len(sizes)), sizes),
            index=np.concatenate([np.arange(n) for n in sizes]),
            starts=np.cumsum([0, *sizes[:-1]]),
            dtype=pairs[0].forget[0].dtype,
        )

    def where(self, sample: int, k: int) -> str:
        return f"sample {sample}, tensor {self.tensor[k]}, coordinate {self.index[k]}"


def flat64(tensors: Sequence[Tensor]) -> np.ndarray:
    """The tensors as one concatenated float64 vector (exact for 16/32-bit inputs)."""
    return np.concatenate(
        [t.detach().to("cpu", torch.float64).reshape(-1).numpy() for t in tensors]
    )


def _unit(values: np.ndarray, flat: Flat) -> np.ndarray:
    """Each value divided by the norm of its tensor (0 for a zero tensor); ``[N, L]``."""
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.sqrt(np.add.reduceat(values * values, flat.starts, axis=1))
    den = norms[:, flat.tensor]
    with np.errstate(invalid="ignore"):
        return np.divide(values, den, out=np.zeros_like(values), where=den > 0)


def _worst(
    margin: np.ndarray, flat: Flat, non_finite: np.ndarray
) -> tuple[float, str, dict[str, float], str]:
    """``(worst margin, where, details, note)``: the most negative finite margin, or ``-inf``
    at the first non-finite coordinate when there is one."""
    ok = np.isfinite(margin) & ~non_finite
    worst, where = np.nan, ""
    if ok.any():
        masked = np.where(ok, margin, np.inf)
        i, k = np.unravel_index(int(np.argmin(masked)), margin.shape)
        worst, where = float(margin[i, k]), flat.where(int(i), int(k))
    if not non_finite.any():
        return worst, where, {}, ""
    i, k = np.unravel_index(int(np.argmax(non_finite)), margin.shape)
    at = flat.where(int(i), int(k))
    note = (
        f"{int(non_finite.sum())} non-finite coordinate(s) (NaN or inf in d, f or r) counted "
        f"as violations, first at {at}; worst_margin -inf marks them (worst finite margin in "
        "details)"
    )
    return -np.inf, at, {"worst_finite_margin": worst}, note


def coordinate_result(
    claim_id: str,
    strategy: str,
    source: str,
    cases: int,
    violations: int,
    worst: float,
    where: str,
    tolerance: str,
    evidence: str,
    note: str,
    non_finite: int = 0,
    details: dict[str, float] | None = None,
) -> CheckResult:
    claim = get_claim(claim_id)
    return CheckResult(
        claim=claim.id,
        statement=claim.statement,
        status=claim.status_at(strategy, "coordinate"),
        gates=claim.gates(strategy, "coordinate"),
        strategy=strategy,
        strategies=(strategy,),
        granularity="coordinate",
        source=source,
        cases=cases,
        undefined=0,
        violations=violations,
        non_finite=non_finite,
        worst_margin=worst,
        where=where,
        tolerance=tolerance,
        evidence=evidence,
        note=note,
        details=details or {},
    )


def sign_agreement(
    claim_id: str, strategy: str, flat: Flat, update: np.ndarray, source: str, note: str = ""
) -> CheckResult:
    """R1 / R6 at coordinate granularity on materialised updates.

    Every coordinate of every pair is a case (``update`` is ``[n_pairs, n_coordinates]``); a
    violation is a coordinate where ``d_i`` opposes ``r_i``. The margin is
    ``(d_i / |d_j|) (r_i / |r_j|)`` (tensor j's norms): the worst margin is the most negative
    normalised product (an opposed coordinate whose product underflows counts as ``-tiny``).
    A coordinate where ``d_i`` or ``r_i`` is not finite is a violation (``non_finite``).
    """
    d, r = update, flat.retain
    non_finite = ~(np.isfinite(d) & np.isfinite(r))
    opposed = ((d > 0) & (r < 0)) | ((d < 0) & (r > 0))
    margin = _unit(d, flat) * _unit(r, flat)
    margin = np.where(opposed, np.minimum(margin, -np.finfo(np.float64).tiny), margin)
    worst, where, details, extra = _worst(margin, flat, non_finite)
    return coordinate_result(
        claim_id,
        strategy,
        source,
        d.size,
        int((opposed | non_finite).sum()),
        worst,
        where,
        SIGN_TOLERANCE,
        "materialised",
        "; ".join(p for p in (extra, note) if p),
        non_finite=int(non_finite.sum()),
        details=details,
    )


def r9_coordinates(
    flat: Flat, update: np.ndarray, alpha: float, gamma: float, source: str, note: str = ""
) -> CheckResult:
    """R9 at coordinate granularity: each ``d_i`` is one of the two SAGO parts' values,
    ``alpha r_i`` or ``gamma f_i`` (so the parts ``alpha r 1_C`` and ``gamma f 1_A`` have
    disjoint supports and sum to d).

    Quantity ``-|(d_i - gamma f_i)(d_i - alpha r_i)| / s_i^2`` with ``s_i = |gamma f_i| +
    |alpha r_i|``; violation when ``|(d_i - gamma f_i)(d_i - alpha r_i)| > rtol s_i^2 +
    2 s_i subnormal(dtype)`` (rounding of d to the gradient dtype). A coordinate where
    ``d_i``, ``f_i`` or ``r_i`` is not finite is a violation (``non_finite``).
    """
    d, f, r = update, flat.forget, flat.retain
    tol = rtol(flat.dtype)
    tiny = torch.finfo(flat.dtype).smallest_normal * torch.finfo(flat.dtype).eps
    non_finite = ~(np.isfinite(d) & np.isfinite(f) & np.isfinite(r))
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.abs((d - gamma * f) * (d - alpha * r))
        s = np.abs(gamma * f) + np.abs(alpha * r)
        bad = (e > tol * s * s + 2 * s * tiny) | non_finite | ~np.isfinite(e)
        floor = np.finfo(np.float64).tiny
        margin = -e / np.maximum(s * s, floor)
    non_finite = non_finite | ~np.isfinite(e)
    worst, where, details, extra = _worst(margin, flat, non_finite)
    dtype_name = str(flat.dtype).replace("torch.", "")
    tolerance = (
        "-|(d_i - gamma f_i)(d_i - alpha r_i)| / s_i^2 >= -tol, s_i = |gamma f_i| + |alpha r_i|;"
        f" tol = rtol + 2 subnormal/s_i, rtol = 8 eps({dtype_name}) + 1e-12 = {tol:.3g}"
    )
    return coordinate_result(
        "R9",
        "sago",
        source,
        d.size,
        int(bad.sum()),
        worst,
        where,
        tolerance,
        "materialised",
        "; ".join(p for p in (extra, note) if p),
        non_finite=int(non_finite.sum()),
        details=details,
    )


def opposed_counts(
    claim_id: str,
    strategy: str,
    n_opposed: np.ndarray,
    numel: np.ndarray,
    where: Sequence[str],
    source: str,
    evidence: str,
    note: str = "",
) -> CheckResult:
    """R1 / R6 at coordinate granularity from recorded counts.

    ``n_opposed`` ``[cases]`` (coordinates with ``d_i r_i < 0`` per (step, tensor)) and
    ``numel`` ``[cases]``. Cases are coordinates, violations the opposed ones. A shadow sign
    rule's ``n_opposed`` is 0 by construction (not counted), so pass ``evidence="by
    construction"`` to report nothing evaluated. The statistics carry no ``d_i r_i`` values:
    the worst margin is NaN and ``where`` names the (step, tensor) with the most opposed
    coordinates. A non-finite count (NaN in a kept record) verifies none of the case's
    coordinates: all ``numel`` of them count as violations (``non_finite``), ``worst_margin``
    is ``-inf`` and ``where`` names the first such case.
    """
    if evidence == "by construction":
        return coordinate_result(
            claim_id,
            strategy,
            source,
            0,
            0,
            np.nan,
            "",
            SIGN_TOLERANCE,
            evidence,
            "; ".join(
                p
                for p in (
                    "not evaluable here: n_opposed of a shadow sign rule is recorded as 0 by "
                    "construction (R6), not counted; only the applied update is measured",
                    note,
                )
                if p
            ),
        )
    n_opposed = np.asarray(n_opposed, dtype=np.float64)
    numel = np.asarray(numel, dtype=np.float64)
    bad = ~np.isfinite(n_opposed)
    counted = np.where(bad, 0.0, n_opposed)
    at, worst = "", np.nan
    if counted.size and counted.max() > 0:
        at = f"{where[int(np.argmax(counted))]} ({int(counted.max())} coordinates)"
    text = "counts only: the recorded statistics carry no d_i r_i values, so no margin"
    non_finite = int(numel[bad].sum())
    if bad.any():
        first = where[int(np.argmax(bad))]
        at, worst = f"{first} (non-finite n_opposed)", -np.inf
        text = (
            f"{int(bad.sum())} (step, tensor) case(s) with a non-finite n_opposed: their "
            f"{non_finite} coordinates counted as violations, first at {first}; {text}"
        )
    return coordinate_result(
        claim_id,
        strategy,
        source,
        int(numel.sum()),
        int(counted.sum()) + non_finite,
        worst,
        at,
        SIGN_TOLERANCE,
        evidence,
        "; ".join(p for p in (text, note) if p),
        non_finite=non_finite,
    )
