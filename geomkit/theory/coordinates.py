"""Coordinate-granularity checks: R1/R6 (no coordinate of d opposes r) and R9 (every d_i is
alpha r_i or gamma f_i), on materialised synthetic updates; and R1/R6 from the recorded
``n_opposed`` counts of a run.

The sign test is exact and product-free (DESIGN.md section 2): ``d_i`` opposes ``r_i`` iff
``(d_i > 0 and r_i < 0) or (d_i < 0 and r_i > 0)``; zeros, ``-0.0`` included, never oppose.
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
    norms = np.sqrt(np.add.reduceat(values * values, flat.starts, axis=1))
    den = norms[:, flat.tensor]
    return np.divide(values, den, out=np.zeros_like(values), where=den > 0)


def _worst(margin: np.ndarray, flat: Flat) -> tuple[float, str]:
    if margin.size == 0:
        return np.nan, ""
    i, k = np.unravel_index(int(np.argmin(margin)), margin.shape)
    return float(margin[i, k]), flat.where(int(i), int(k))


def _result(
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
) -> CheckResult:
    claim = get_claim(claim_id)
    return CheckResult(
        claim=claim.id,
        statement=claim.statement,
        status=claim.status_at(strategy, "coordinate"),
        strategy=strategy,
        strategies=(strategy,),
        granularity="coordinate",
        source=source,
        cases=cases,
        undefined=0,
        violations=violations,
        worst_margin=worst,
        where=where,
        tolerance=tolerance,
        evidence=evidence,
        note=note,
    )


def sign_agreement(
    claim_id: str, strategy: str, flat: Flat, update: np.ndarray, source: str, note: str = ""
) -> CheckResult:
    """R1 / R6 at coordinate granularity on materialised updates.

    Every coordinate of every pair is a case (``update`` is ``[n_pairs, n_coordinates]``); a
    violation is a coordinate where ``d_i`` opposes ``r_i``. The margin is
    ``(d_i / |d_j|) (r_i / |r_j|)`` (tensor j's norms): the worst margin is the most negative
    normalised product (an opposed coordinate whose product underflows counts as ``-tiny``).
    """
    d, r = update, flat.retain
    opposed = ((d > 0) & (r < 0)) | ((d < 0) & (r > 0))
    margin = _unit(d, flat) * _unit(r, flat)
    margin = np.where(opposed, np.minimum(margin, -np.finfo(np.float64).tiny), margin)
    worst, where = _worst(margin, flat)
    return _result(
        claim_id,
        strategy,
        source,
        d.size,
        int(opposed.sum()),
        worst,
        where,
        SIGN_TOLERANCE,
        "materialised",
        note,
    )


def r9_coordinates(
    flat: Flat, update: np.ndarray, alpha: float, gamma: float, source: str, note: str = ""
) -> CheckResult:
    """R9 at coordinate granularity: each ``d_i`` is one of the two SAGO parts' values,
    ``alpha r_i`` or ``gamma f_i`` (so the parts ``alpha r 1_C`` and ``gamma f 1_A`` have
    disjoint supports and sum to d).

    Quantity ``-|(d_i - gamma f_i)(d_i - alpha r_i)| / s_i^2`` with ``s_i = |gamma f_i| +
    |alpha r_i|``; violation when ``|(d_i - gamma f_i)(d_i - alpha r_i)| > rtol s_i^2 +
    2 s_i subnormal(dtype)`` (rounding of d to the gradient dtype).
    """
    d, f, r = update, flat.forget, flat.retain
    tol = rtol(flat.dtype)
    tiny = torch.finfo(flat.dtype).smallest_normal * torch.finfo(flat.dtype).eps
    e = np.abs((d - gamma * f) * (d - alpha * r))
    s = np.abs(gamma * f) + np.abs(alpha * r)
    bad = e > tol * s * s + 2 * s * tiny
    floor = np.finfo(np.float64).tiny
    margin = -e / np.maximum(s * s, floor)
    worst, where = _worst(margin, flat)
    dtype_name = str(flat.dtype).replace("torch.", "")
    tolerance = (
        "-|(d_i - gamma f_i)(d_i - alpha r_i)| / s_i^2 >= -tol, s_i = |gamma f_i| + |alpha r_i|;"
        f" tol = rtol + 2 subnormal/s_i, rtol = 8 eps({dtype_name}) + 1e-12 = {tol:.3g}"
    )
    return _result(
        "R9",
        "sago",
        source,
        d.size,
        int(bad.sum()),
        worst,
        where,
        tolerance,
        "materialised",
        note,
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
    coordinates.
    """
    if evidence == "by construction":
        return _result(
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
    at = ""
    if n_opposed.size and n_opposed.max() > 0:
        at = f"{where[int(np.argmax(n_opposed))]} ({int(n_opposed.max())} coordinates)"
    text = "counts only: the recorded statistics carry no d_i r_i values, so no margin"
    return _result(
        claim_id,
        strategy,
        source,
        int(numel.sum()),
        int(n_opposed.sum()),
        np.nan,
        at,
        SIGN_TOLERANCE,
        evidence,
        "; ".join(p for p in (text, note) if p),
    )
