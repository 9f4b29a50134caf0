"""Independent float64 NumPy reference for the combination strategies (docs/method.md#strategies).

This module deliberately shares no code with :mod:`geomkit`: it re-derives every rule from the
table in docs/method.md#rule-and-scope, in float64, with plain NumPy, so that tests can compare
geomkit against it.

Rules (per parameter tensor ``j``: forget gradient ``f``, retain gradient ``r``, weights
``alpha`` on retain and ``gamma`` on forget; C = coordinates with ``sign(f_i) sign(r_i) < 0``,
zeros, including ``-0.0``, never conflict):

======================  =====================================================================
``sum``                 ``d = gamma f + alpha r``
``pcgrad``              per tensor: if ``<f,r> < 0``: ``f <- f - <f,r>/(||r||^2 + 1e-10) r``;
                        then ``d = gamma f + alpha r``
``pcgrad_global``       the same test and coefficient, from the dot products of the whole model
``sago``                ``alpha r`` on C, ``gamma f`` elsewhere
``sago_prefer_retain``  ``alpha r`` on C, ``gamma f + alpha r`` elsewhere
``blur``                whole model, unconditionally: ``r <- r - <r,f>/(||f||^2 + 1e-10) f``;
                        then ``d = gamma f + alpha r``
======================  =====================================================================

Public functions
----------------
:func:`conflict`
    The sign-conflict mask.
:func:`combine`
    The combined update, as float64 arrays (not rounded to any narrower dtype).
:func:`error_scale`
    Per element, the sum of the magnitudes of the terms the update is formed from, before any
    cancellation (``|gamma f| + |alpha r| + |gamma c r| + |alpha k f|``), plus a bound on the
    effect of the rounding of the float64 dot products; a floating-point implementation that
    works in precision ``eps`` is expected to land within a small multiple of ``eps`` times the
    first part of this of the exact value.

Inputs are sequences of array-likes (NumPy arrays, or anything ``np.asarray`` accepts, such as
CPU tensors converted with ``.double().numpy()``); every value is converted to float64 first, so
float16, bfloat16 and float32 inputs are represented exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "EPSILON",
    "NAMES",
    "Coefficients",
    "coefficients",
    "combine",
    "conflict",
    "dot",
    "error_scale",
]

EPSILON = 1e-10
"""Added to the squared norm in the projection denominators (docs/method.md#notation)."""

NAMES = ("sum", "pcgrad", "pcgrad_global", "sago", "sago_prefer_retain", "blur")
"""The strategy names of docs/method.md#strategies, in the registry's order."""

_PROJECTIONS = ("pcgrad", "pcgrad_global", "blur")
_GLOBAL = ("pcgrad_global", "blur")
_F64_EPS = float(np.finfo(np.float64).eps)


def _as_f64(arrays: Sequence) -> list[np.ndarray]:
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def conflict(f: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean mask of ``sign(f_i) * sign(r_i) < 0``, by explicit sign comparisons.

    Comparisons treat ``-0.0`` and ``+0.0`` alike (both are neither ``> 0`` nor ``< 0``), so a
    zero never conflicts, and no product is formed that could underflow.
    """
    f = np.asarray(f, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    return ((f > 0) & (r < 0)) | ((f < 0) & (r > 0))


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """``<a, b>`` in float64 with a correctly rounded sum (``math.fsum``) of the products.

    For float16/bfloat16/float32 data the float64 products are exact, so the result is the
    correctly rounded exact dot product.
    """
    products = np.multiply(np.ravel(a), np.ravel(b), dtype=np.float64)
    return math.fsum(products.tolist())


def _abs_dot(a: np.ndarray, b: np.ndarray) -> float:
    return dot(np.abs(a), np.abs(b))


@dataclass(frozen=True)
class Coefficients:
    """Projection coefficients of one tensor (all zero for rules that do not project).

    Attributes
    ----------
    c : float
        ``<f,r> / (||r||^2 + 1e-10)`` if PCGrad's projection fires, else 0.0.
    k : float
        ``<r,f> / (||f||^2 + 1e-10)`` for BLUR, else 0.0.
    fired : bool
        Whether a projection was applied.
    c_error, k_error : float
        Bounds on how much ``c`` and ``k`` may change when the dot products are accumulated
        in float64 in a different order (``4 n eps64`` times the sums of absolute products over
        the denominator, plus the same relative amount of the coefficient). When the sign of
        ``<f,r>`` is within this uncertainty, ``|c| <= c_error``, so both outcomes of the
        PCGrad test are covered by the tolerance built from it.
    """

    c: float = 0.0
    k: float = 0.0
    fired: bool = False
    c_error: float = 0.0
    k_error: float = 0.0


def coefficients(name: str, forget: Sequence, retain: Sequence) -> list[Coefficients]:
    """Per-tensor projection coefficients of strategy ``name`` (see :class:`Coefficients`)."""
    if name not in NAMES:
        raise ValueError(f"unknown strategy {name!r}")
    forget, retain = _as_f64(forget), _as_f64(retain)
    if name not in _PROJECTIONS:
        return [Coefficients() for _ in forget]

    def sums(fs: Sequence[np.ndarray], rs: Sequence[np.ndarray]) -> tuple[float, ...]:
        ff = math.fsum(dot(f, f) for f in fs)
        rr = math.fsum(dot(r, r) for r in rs)
        fr = math.fsum(dot(f, r) for f, r in zip(fs, rs, strict=True))
        afr = math.fsum(_abs_dot(f, r) for f, r in zip(fs, rs, strict=True))
        n = sum(f.size for f in fs)
        return ff, rr, fr, afr, n

    if name in _GLOBAL:
        pooled = sums(forget, retain)
        per_tensor = [pooled] * len(forget)
    else:
        per_tensor = [sums([f], [r]) for f, r in zip(forget, retain, strict=True)]

    result = []
    for ff, rr, fr, afr, n in per_tensor:
        slack = 4.0 * max(n, 1) * _F64_EPS
        if name == "blur":
            k = fr / (ff + EPSILON)
            k_error = slack * (afr / (ff + EPSILON) + abs(k))
            result.append(Coefficients(k=k, fired=True, k_error=k_error))
        else:
            fired = fr < 0
            c = fr / (rr + EPSILON) if fired else 0.0
            c_error = slack * (afr / (rr + EPSILON) + abs(c))
            result.append(Coefficients(c=c, fired=fired, c_error=c_error))
    return result


def combine(
    name: str,
    forget: Sequence,
    retain: Sequence,
    alpha: float = 1.0,
    gamma: float = 1.0,
    coefs: Sequence[Coefficients] | None = None,
) -> list[np.ndarray]:
    """The combined update of strategy ``name``, one float64 array per tensor.

    Parameters
    ----------
    name : str
        One of :data:`NAMES`.
    forget, retain : sequence of array-like
        Matching forget and retain gradients, one per parameter tensor.
    alpha, gamma : float
        Weights of the retain and the forget gradient.
    coefs : sequence of Coefficients, optional
        The result of :func:`coefficients` for the same inputs, to avoid recomputing it (it does
        not depend on the weights).
    """
    forget, retain = _as_f64(forget), _as_f64(retain)
    if coefs is None:
        coefs = coefficients(name, forget, retain)
    out = []
    for f, r, co in zip(forget, retain, coefs, strict=True):
        if name in ("sago", "sago_prefer_retain"):
            agree = gamma * f + alpha * r if name == "sago_prefer_retain" else gamma * f
            d = np.where(conflict(f, r), alpha * r, agree)
        elif name == "blur":
            d = gamma * f + alpha * (r - co.k * f)
        elif co.fired:  # pcgrad, pcgrad_global with a negative <f,r>
            d = gamma * (f - co.c * r) + alpha * r
        else:  # sum, or PCGrad that did not fire
            d = gamma * f + alpha * r
        out.append(np.asarray(d, dtype=np.float64))
    return out


def error_scale(
    name: str,
    forget: Sequence,
    retain: Sequence,
    alpha: float = 1.0,
    gamma: float = 1.0,
    coefs: Sequence[Coefficients] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Magnitudes against which rounding errors of strategy ``name`` are measured.

    Returns
    -------
    scale : list of float64 arrays
        Per element ``|gamma f| + |alpha r| + |gamma c r| + |alpha k f|`` (the terms the update
        is summed from; for the SAGO rules only the terms actually selected).
    coefficient_error : list of float64 arrays
        Per element ``gamma c_error |r| + alpha k_error |f|``: an absolute allowance for the
        rounding of the float64 dot products (see :class:`Coefficients`).

    Parameters are those of :func:`combine`.
    """
    forget, retain = _as_f64(forget), _as_f64(retain)
    if coefs is None:
        coefs = coefficients(name, forget, retain)
    scales, errors = [], []
    for f, r, co in zip(forget, retain, coefs, strict=True):
        af, ar = np.abs(gamma * f), np.abs(alpha * r)
        if name == "sago":
            scale = np.where(conflict(f, r), ar, af)
        elif name == "sago_prefer_retain":
            scale = np.where(conflict(f, r), ar, af + ar)
        else:
            scale = af + ar + np.abs(gamma * co.c * r) + np.abs(alpha * co.k * f)
        scales.append(scale)
        errors.append(gamma * co.c_error * np.abs(r) + alpha * co.k_error * np.abs(f))
    return scales, errors
