"""Claim checks on synthetic gradient pairs: :func:`audit_synthetic`.

For every sampler, each strategy of :mod:`geomkit.strategies` is run on the same pairs (the
update is materialised in the sampler's dtype), its sufficient statistics are computed in
float64 NumPy (independently of :mod:`geomkit.statistics`), and every claim is checked at
coordinate granularity (R1, R6, R9: on the update itself), at tensor and at model granularity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from geomkit._validation import check_choice, check_integer, check_weight, invalid
from geomkit.fields import FIELD_TABLE, FIELDS, SIZE_FIELDS, STEP_FIELDS
from geomkit.kernels import FORMULA_SLACK, UNIT_ROUNDOFF_64, update_rounding
from geomkit.strategies import EPSILON, build
from geomkit.theory.cases import Cases, build_cases
from geomkit.theory.checks import ADDITIVE_CHECKS
from geomkit.theory.claims import CLAIMS, GRANULARITIES
from geomkit.theory.coordinates import Flat, flat64, r9_coordinates, sign_agreement
from geomkit.theory.report import Audit, CheckResult
from geomkit.theory.samplers import Sampler, default_samplers

__all__ = ["STRATEGIES", "audit_synthetic", "check_claims", "synthetic_cases"]

STRATEGIES: tuple[str, ...] = ("sago", "sago_prefer_retain", "pcgrad", "pcgrad_global")
"""The strategies the claims are about."""

Combine = Callable[[Sequence[Tensor], Sequence[Tensor]], Sequence[Tensor]]


def check_claims(claims: Sequence[str] | None) -> tuple[str, ...]:
    """Validate a selection of claim ids (None: all of docs/theory.md)."""
    if claims is None:
        return tuple(CLAIMS)
    if isinstance(claims, str):
        claims = (claims,)
    unknown = [c for c in claims if c not in CLAIMS]
    if unknown:
        raise invalid("claims", unknown, "some of " + ", ".join(CLAIMS))
    return tuple(claims)


def _implementations(
    alpha: float, gamma: float, implementations: Mapping[str, Combine] | None
) -> dict[str, Combine]:
    impl: dict[str, Combine] = {n: build(n, alpha=alpha, gamma=gamma) for n in STRATEGIES}
    for name, fn in (implementations or {}).items():
        check_choice("implementations key", name, STRATEGIES)
        if not callable(fn):
            raise invalid(f"implementations[{name!r}]", fn, "a callable", error=TypeError)
        impl[name] = fn
    return impl


def _formula(flat: Flat, name: str, alpha: float, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """The float64 update ``a f_i + b r_i`` strategy ``name`` should form, and the per-coordinate
    bound on ``|d_i - (a f_i + b r_i)|`` beyond one rounding to the dtype (float64 slack of
    :data:`geomkit.kernels.FORMULA_SLACK`, plus the effect on PCGrad's coefficient of dot
    products summed in another order, ``(n - 1) u64`` of their absolute terms each), written
    here independently of :mod:`geomkit.statistics`."""
    f, r = flat.forget, flat.retain

    def total(x: np.ndarray) -> np.ndarray:
        return np.add.reduceat(x, flat.starts, axis=1)

    conflict = ((f > 0) & (r < 0)) | ((f < 0) & (r > 0))
    weights = alpha + gamma
    if name in ("sago", "sago_prefer_retain"):
        b_agree = alpha if name == "sago_prefer_retain" else 0.0
        ref = np.where(conflict, alpha * r, gamma * f + b_agree * r)
        slack = FORMULA_SLACK * ((gamma + weights) * np.abs(f) + (alpha + weights) * np.abs(r))
        return ref, slack
    fr, rr, frabs = total(f * r), total(r * r), total(np.abs(f * r))
    n = np.diff(np.append(flat.starts, f.shape[1])).astype(np.float64)[None, :]
    if name == "pcgrad_global":
        fr, rr = (np.broadcast_to(x.sum(1, keepdims=True), x.shape) for x in (fr, rr))
        frabs = np.broadcast_to(frabs.sum(1, keepdims=True), frabs.shape)
        n = np.broadcast_to(n.sum(1, keepdims=True), n.shape)
    c = np.where(fr < 0, fr / (rr + EPSILON), 0.0)
    b = alpha - gamma * c
    # torch and NumPy sum fr and rr in other orders: each errs by <= (n - 1) u64 of its terms
    sums = 2 * n * UNIT_ROUNDOFF_64
    delta_c = sums * (frabs + np.abs(c) * rr) / (rr + EPSILON)
    m_r = FORMULA_SLACK * (np.abs(b) + weights) + gamma * delta_c
    ref = gamma * f + b[:, flat.tensor] * r
    slack = FORMULA_SLACK * (gamma + weights) * np.abs(f) + m_r[:, flat.tensor] * np.abs(r)
    return ref, slack


def _statistics(
    flat: Flat, update: np.ndarray, name: str, alpha: float, gamma: float
) -> np.ndarray:
    """Sufficient statistics ``[n_pairs, n_tensors, len(FIELDS)]`` of materialised updates,
    computed here in float64 NumPy (independently of :mod:`geomkit.statistics`, the code the
    checks are meant to catch)."""
    f, r, d = flat.forget, flat.retain, update

    def total(x: np.ndarray) -> np.ndarray:
        return np.add.reduceat(x, flat.starts, axis=1)

    def opposite(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (((x > 0) & (y < 0)) | ((x < 0) & (y > 0))).astype(np.float64)

    fr = total(f * r)
    numel = np.diff(np.append(flat.starts, f.shape[1])).astype(np.float64)
    u, eta = update_rounding(flat.dtype)
    ref, slack = _formula(flat, name, alpha, gamma)
    with np.errstate(invalid="ignore", over="ignore"):
        within = np.abs(d - ref) <= u * np.abs(ref) + slack + eta
        plain = gamma * f + alpha * r  # the update without projection
        unprojected = np.abs(d - plain) <= u * np.abs(plain) + slack + eta
    if name in ("pcgrad", "pcgrad_global"):
        # read off the update: it projected where it is not the plain sum within rounding; where
        # the projection moved no coordinate beyond rounding it cannot be told, and counts as
        # firing exactly when <f, r> < 0
        differs = total((~unprojected).astype(np.float64)) > 0
        fires = fr < 0
        if name == "pcgrad_global":
            differs = np.broadcast_to(differs.any(1, keepdims=True), fr.shape)
            fires = np.broadcast_to(fr.sum(1, keepdims=True) < 0, fr.shape)
        projected = np.where(differs, 1.0, fires.astype(np.float64))
    else:
        projected = np.zeros_like(fr)
    values = {
        "ff": total(f * f),
        "rr": total(r * r),
        "fr": fr,
        "dd": total(d * d),
        "df": total(d * f),
        "dr": total(d * r),
        "n_conflict": total(opposite(f, r)),
        "n_both_nonzero": total(((f != 0) & (r != 0)).astype(np.float64)),
        "n_opposed": total(opposite(d, r)),
        "n_projected": projected,
        "dr_abs": total(np.abs(d * r)),
        "n_unrounded": total((~within).astype(np.float64)),
    }
    for name in SIZE_FIELDS:  # the tensor's coordinates, or a constant per tensor
        constant = FIELD_TABLE[name].constant
        size = numel if constant is None else np.full(numel.shape, constant)
        values[name] = np.broadcast_to(size, fr.shape)
    for name in STEP_FIELDS:  # no optimizer steps synthetic gradients
        values[name] = np.full(fr.shape, np.nan)
    return np.stack([values[k] for k in FIELDS], axis=-1)


def synthetic_cases(
    sampler: Sampler,
    flat: Flat,
    updates: Mapping[str, np.ndarray],
    alpha: float,
    gamma: float,
) -> dict[str, Cases]:
    """:class:`Cases` at tensor and model granularity from materialised updates."""
    tensor_stats = {name: _statistics(flat, d, name, alpha, gamma) for name, d in updates.items()}
    n_pairs, n_tensors = flat.forget.shape[0], len(flat.starts)
    return build_cases(
        tensor_stats,
        batch_labels=[f"sample {i}" for i in range(n_pairs)],
        tensor_labels=[str(j) for j in range(n_tensors)],
        groupings={"model": (np.zeros(n_tensors, dtype=int), ["model"])},
        alpha=alpha,
        gamma=gamma,
        dtype=flat.dtype,
        source=f"synthetic:{sampler.name}",
        evidence={n: "materialised" for n in updates},
    )


def _audit_sampler(
    sampler: Sampler,
    n: int,
    seed: int,
    alpha: float,
    gamma: float,
    claims: tuple[str, ...],
    implementations: Mapping[str, Combine],
) -> list[CheckResult]:
    pairs = sampler.sample(n, seed)
    flat = Flat.of_pairs(pairs)
    updates = {}
    for name, fn in implementations.items():
        rows = []
        for i, p in enumerate(pairs):
            d = list(fn(p.forget, p.retain))
            if [tuple(t.shape) for t in d] != [tuple(t.shape) for t in p.forget]:
                raise ValueError(
                    f"strategy {name!r} returned tensors of shapes {[tuple(t.shape) for t in d]}"
                    f" for pair {i}; expected {[tuple(t.shape) for t in p.forget]}"
                )
            rows.append(flat64(d))
        updates[name] = np.stack(rows)
    source = f"synthetic:{sampler.name}"
    weights = f"alpha={alpha:g}, gamma={gamma:g}"
    results: list[CheckResult] = []
    if "R1" in claims:
        results.append(sign_agreement("R1", "sago", flat, updates["sago"], source, weights))
    if "R6" in claims:
        for name in STRATEGIES:
            results.append(sign_agreement("R6", name, flat, updates[name], source, weights))
    if "R9" in claims:
        results.append(r9_coordinates(flat, updates["sago"], alpha, gamma, source, weights))
    cases = synthetic_cases(sampler, flat, updates, alpha, gamma)
    for granularity in ("tensor", "model"):
        for claim in claims:
            if claim in ADDITIVE_CHECKS:
                results.extend(ADDITIVE_CHECKS[claim](cases[granularity]))
    return results


def sort_results(results: Sequence[CheckResult]) -> tuple[CheckResult, ...]:
    """Order results by claim (docs/theory.md order), then granularity, keeping the rest stable."""
    claim_order = {c: i for i, c in enumerate(CLAIMS)}
    gran_order = {g: i for i, g in enumerate(GRANULARITIES)}
    return tuple(sorted(results, key=lambda r: (claim_order[r.claim], gran_order[r.granularity])))


def audit_synthetic(
    samplers: Sampler | Sequence[Sampler] | None = None,
    *,
    n: int = 32,
    seed: int = 0,
    alpha: float = 1.0,
    gamma: float = 1.0,
    claims: Sequence[str] | None = None,
    implementations: Mapping[str, Combine] | None = None,
) -> Audit:
    """Check every claim of docs/theory.md on synthetic gradient pairs.

    Parameters
    ----------
    samplers : Sampler or sequence of Sampler, optional
        Default :func:`~geomkit.theory.samplers.default_samplers` (dense, sparse, heavy-tailed,
        zeros; four dtypes; the R4 counterexamples).
    n : int
        Pairs per sampler.
    seed : int
        Seed of every sampler.
    alpha, gamma : float
        Weights of the retain and forget gradients (R4 and R7 are stated for 1, 1).
    claims : sequence of str, optional
        Claim ids to check (default all).
    implementations : mapping, optional
        Replace a strategy's implementation (``name -> callable(forget, retain) -> update``),
        e.g. to check a new kernel against the claims, or to plant a bug in a test.

    Returns
    -------
    Audit
        One result per claim, strategy, granularity and sampler; ``bug_detected`` if a proven
        claim is violated beyond tolerance.

    Notes
    -----
    Claims from Xiao et al., "SAGO", ACL 2026 (arXiv 2604.14808), as read in docs/theory.md.
    """
    if samplers is None:
        samplers = default_samplers()
    elif isinstance(samplers, Sampler):
        samplers = (samplers,)
    samplers = tuple(samplers)
    if not samplers:
        raise ValueError("samplers is empty; pass at least one Sampler (or None for defaults)")
    for s in samplers:
        if not isinstance(s, Sampler):
            raise invalid(
                "samplers", s, f"geomkit Sampler objects, got {type(s).__name__}", error=TypeError
            )
    check_integer("n", n, 1, error=ValueError)
    alpha, gamma = check_weight("alpha", alpha), check_weight("gamma", gamma)
    claims = check_claims(claims)
    impl = _implementations(alpha, gamma, implementations)
    results: list[CheckResult] = []
    with torch.no_grad():
        for sampler in samplers:
            results.extend(_audit_sampler(sampler, n, seed, alpha, gamma, claims, impl))
    attrs = {
        "kind": "synthetic",
        "samplers": [s.name for s in samplers],
        "n": int(n),
        "seed": int(seed),
        "alpha": alpha,
        "gamma": gamma,
    }
    return Audit(sort_results(results), attrs)
