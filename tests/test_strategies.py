"""Tests for geomkit.strategies: the combination rules of docs/method.md#strategies.

Layout:

1. golden values worked out by hand (each expected number is written literally, with the
   arithmetic in a comment), including zero handling and the counterexamples of docs/theory.md#r4;
2. brute force against the independent float64 NumPy reference in ``tests/reference.py``, on
   random multi-tensor inputs spanning many orders of magnitude, in four dtypes;
3. ``out=``, non-contiguous tensors, and that inputs are never modified;
4. the ``"compiled"`` kernel backend is bit-identical to ``"eager"``;
5. input validation errors;
6. the small public API (names, repr, equality);
7. no host synchronisation during a strategy call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import numpy as np
import pytest
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geomkit import kernels
from geomkit.strategies import (
    BLUR,
    SAGO,
    Global,
    PCGrad,
    PerTensor,
    SAGOPreferRetain,
    Strategy,
    Sum,
    as_strategy,
    build,
    names,
    register,
)

NAMES = ref.NAMES
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
F64 = torch.float64


def vec(*values: float, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def combine(name, forget, retain, alpha=1.0, gamma=1.0, out=None):
    return build(name, alpha=alpha, gamma=gamma)(forget, retain, out=out)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape, values and sign bits (so -0.0 and +0.0 are told apart)."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert torch.equal(actual, expected), f"{actual} != {expected}"
    assert torch.equal(torch.signbit(actual), torch.signbit(expected)), (
        f"sign bits differ: {actual} vs {expected}"
    )


def assert_values(actual: torch.Tensor, expected: list[float], abs_tol: float = 0.0) -> None:
    got = actual.double().tolist()
    assert got == pytest.approx(expected, rel=0.0, abs=abs_tol), f"{got} != {expected}"


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(a @ b / (a.norm() * b.norm()))


# ============================================================================================
# 1. Golden values
# ============================================================================================


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_golden(dtype):
    # d = gamma f + alpha r with gamma = 2, alpha = 0.5:
    # (2*1 + 0.5*4, 2*(-2) + 0.5*5, 2*3 + 0.5*(-6)) = (4, -1.5, 3); exact in every dtype.
    (d,) = combine("sum", [vec(1, -2, 3, dtype=dtype)], [vec(4, 5, -6, dtype=dtype)], 0.5, 2.0)
    assert_bitwise_equal(d, vec(4, -1.5, 3, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_weights_zero(dtype):
    f, r = vec(1, -2, 3, dtype=dtype), vec(4, 5, -6, dtype=dtype)
    (d,) = combine("sum", [f], [r], alpha=0.0, gamma=1.0)  # f + 0*r = f
    assert_values(d, [1, -2, 3])
    (d,) = combine("sum", [f], [r], alpha=1.0, gamma=0.0)  # 0*f + r = r
    assert_values(d, [4, 5, -6])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_signed_zeros(dtype):
    # IEEE: (-0) + (-0) = -0, (-0) + (+0) = +0, (+0) + (-0) = +0.
    f = vec(-0.0, -0.0, 0.0, 2.0, dtype=dtype)
    r = vec(-0.0, 0.0, -0.0, -0.0, dtype=dtype)
    (d,) = combine("sum", [f], [r])
    assert_bitwise_equal(d, vec(-0.0, 0.0, 0.0, 2.0, dtype=dtype))


def test_pcgrad_golden_projection_fires():
    # f = (1, -2), r = (1, 1): <f,r> = -1 < 0, ||r||^2 = 2, c = -1 / (2 + 1e-10)
    #   = -0.499999999975 (to 1e-21); f~ = f - c r = (1.499999999975, -1.500000000025).
    f, r = vec(1, -2), vec(1, 1)
    for name in ("pcgrad", "pcgrad_global"):  # one tensor: both scopes agree
        # alpha = gamma = 1: d = f~ + r = (2.499999999975, -0.500000000025)
        (d,) = combine(name, [f], [r])
        assert_values(d, [2.499999999975, -0.500000000025], abs_tol=1e-15)
        # gamma = 2, alpha = 0.5: d = 2 f~ + 0.5 r = (3.49999999995, -2.50000000005)
        (d,) = combine(name, [f], [r], alpha=0.5, gamma=2.0)
        assert_values(d, [3.49999999995, -2.50000000005], abs_tol=1e-15)
        # alpha = 0: d = f~ only (the retain gradient is not added back)
        (d,) = combine(name, [f], [r], alpha=0.0, gamma=1.0)
        assert_values(d, [1.499999999975, -1.500000000025], abs_tol=1e-15)
    # In float32 the coefficient rounds to -0.5 exactly: d = (1.5 + 1, -1.5 + 1) = (2.5, -0.5).
    (d,) = combine("pcgrad", [f.float()], [r.float()])
    assert_bitwise_equal(d, vec(2.5, -0.5, dtype=torch.float32))


@pytest.mark.parametrize("name", ["pcgrad", "pcgrad_global"])
@pytest.mark.parametrize(
    ("f", "r", "expected"),
    [
        # <f,r> = 3 - 2 = 1 > 0 although coordinate 2 conflicts: no projection,
        # d = 2 f + 0.5 r = (2 + 1.5, 4 - 0.5) = (3.5, 3.5)
        ((1, 2), (3, -1), (3.5, 3.5)),
        # <f,r> = 1 - 1 = 0 exactly: no projection, d = (2 + 0.5, 2 - 0.5) = (2.5, 1.5)
        ((1, 1), (1, -1), (2.5, 1.5)),
        # f = 0: <f,r> = 0, d = 0.5 r = (1.5, -2)
        ((0, 0), (3, -4), (1.5, -2.0)),
        # r = 0: <f,r> = 0, d = 2 f = (2, -8)
        ((1, -4), (0, 0), (2.0, -8.0)),
    ],
)
def test_pcgrad_no_projection_when_dot_nonnegative(name, f, r, expected):
    (d,) = combine(name, [vec(*f)], [vec(*r)], alpha=0.5, gamma=2.0)
    assert_bitwise_equal(d, vec(*expected))


def test_pcgrad_projection_test_is_strict():
    # The projection fires only for <f,r> < 0; at exactly 0 (either sign) it does not.
    strategy = build("pcgrad")
    dots = torch.tensor(
        [[1.0, 2.0, 0.0], [1.0, 2.0, -0.0], [1.0, 2.0, -1e-300], [1.0, 2.0, 3.0]], dtype=F64
    )
    assert strategy.projected(dots).tolist() == [0.0, 0.0, 1.0, 0.0]


def test_pcgrad_per_tensor_versus_global_one_tensor_conflicts():
    # Tensor A: f = (1), r = (-1): <f,r>_A = -1. Tensor B: f = (2), r = (2): <f,r>_B = 4.
    forget, retain = [vec(1), vec(2)], [vec(-1), vec(2)]
    # Per tensor, A is projected: c = -1/(1 + 1e-10), f~ = 1 - 1/(1 + 1e-10) = 1e-10 (to 1e-20),
    # d_A = f~ + r = -0.9999999999; B is untouched: d_B = 2 + 2 = 4.
    d_a, d_b = combine("pcgrad", forget, retain)
    assert_values(d_a, [-0.9999999999], abs_tol=1e-16)
    assert_bitwise_equal(d_b, vec(4))
    # Globally <f,r> = -1 + 4 = 3 > 0: nothing is projected, d = f + r = (0, 4).
    d_a, d_b = combine("pcgrad_global", forget, retain)
    assert_bitwise_equal(d_a, vec(0))
    assert_bitwise_equal(d_b, vec(4))


def test_pcgrad_global_projects_every_tensor_with_one_coefficient():
    # Tensor A: f = (1), r = (1); tensor B: f = (3), r = (-1). Globally <f,r> = 1 - 3 = -2,
    # ||r||^2 = 2, c = -2/(2 + 1e-10) = -(1 - 5e-11); f~ = f - c r:
    #   A: 1 + (1 - 5e-11) = 1.99999999995, d_A = f~ + 1 = 2.99999999995
    #   B: 3 - (1 - 5e-11) = 2.00000000005, d_B = f~ - 1 = 1.00000000005
    forget, retain = [vec(1), vec(3)], [vec(1), vec(-1)]
    d_a, d_b = combine("pcgrad_global", forget, retain)
    assert_values(d_a, [2.99999999995], abs_tol=1e-15)
    assert_values(d_b, [1.00000000005], abs_tol=1e-15)
    # docs/theory.md#r2b: global PCGrad can leave a tensor opposing its retain gradient.
    assert float(d_b @ retain[1]) < 0
    # Per tensor: A has <f,r> = 1 > 0 (d_A = 2); B: c = -3/(1 + 1e-10),
    # f~ = 3 - 3/(1 + 1e-10) = 3e-10, d_B = -1 + 3e-10 = -0.9999999997 (and <d_B, r_B> > 0).
    d_a, d_b = combine("pcgrad", forget, retain)
    assert_bitwise_equal(d_a, vec(2))
    assert_values(d_b, [-0.9999999997], abs_tol=1e-16)
    assert float(d_b @ retain[1]) > 0


def test_blur_golden():
    # f = (2, 0), r = (-1, 3): <r,f> = -2, ||f||^2 = 4, k = -2/(4 + 1e-10) = -(0.5 - 1.25e-11);
    # r~ = r - k f = (-1 + 1 - 2.5e-11, 3) = (-2.5e-11, 3); the forget gradient is not changed.
    f, r = vec(2, 0), vec(-1, 3)
    (d,) = combine("blur", [f], [r])  # d = f + r~ = (1.999999999975, 3)
    assert_values(d, [1.999999999975, 3.0], abs_tol=1e-15)
    (d,) = combine("blur", [f], [r], alpha=0.5, gamma=2.0)  # 2 f + 0.5 r~ = (3.9999999999875, 1.5)
    assert_values(d, [3.9999999999875, 1.5], abs_tol=1e-15)
    # Unconditional: it also projects when <r,f> > 0. f = (1, 0), r = (1, 1): k = 1/(1 + 1e-10),
    # r~ = (1 - 1/(1 + 1e-10), 1) = (1e-10, 1) (to 1e-20), d = f + r~ = (1.0000000001, 1).
    (d,) = combine("blur", [vec(1, 0)], [vec(1, 1)])
    assert_values(d, [1.0000000001, 1.0], abs_tol=1e-16)
    # f = 0: k = 0 / (0 + 1e-10) = 0, d = alpha r.
    (d,) = combine("blur", [vec(0, 0)], [vec(1, -2)], alpha=0.5)
    assert_values(d, [0.5, -1.0])


def test_blur_is_global():
    # A: f = (1), r = (1); B: f = (1), r = (-3). Globally <r,f> = 1 - 3 = -2, ||f||^2 = 2,
    # k = -2/(2 + 1e-10) = -(1 - 5e-11); r~ = r - k f:
    #   A: 1 + 0.99999999995 = 1.99999999995, d_A = 1 + r~ = 2.99999999995
    #   B: -3 + 0.99999999995 = -2.00000000005, d_B = 1 + r~ = -1.00000000005
    # (a per-tensor projection would give r~ = 1e-10 and 3e-10 instead, d close to (1, 1)).
    d_a, d_b = combine("blur", [vec(1), vec(1)], [vec(1), vec(-3)])
    assert_values(d_a, [2.99999999995], abs_tol=1e-15)
    assert_values(d_b, [-1.00000000005], abs_tol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sago_golden(dtype):
    # f = (1, -2, 3, 0), r = (-4, -5, 6, 7), alpha = 0.5, gamma = 2.
    # conflicts: coordinate 1 only (1 vs -4); coordinate 4 has f = 0, never a conflict.
    f, r = vec(1, -2, 3, 0, dtype=dtype), vec(-4, -5, 6, 7, dtype=dtype)
    # sago: (0.5*-4, 2*-2, 2*3, 2*0) = (-2, -4, 6, 0)
    (d,) = combine("sago", [f], [r], alpha=0.5, gamma=2.0)
    assert_bitwise_equal(d, vec(-2, -4, 6, 0, dtype=dtype))
    # prefer retain: (0.5*-4, 2*-2 + 0.5*-5, 2*3 + 0.5*6, 2*0 + 0.5*7) = (-2, -6.5, 9, 3.5)
    (d,) = combine("sago_prefer_retain", [f], [r], alpha=0.5, gamma=2.0)
    assert_bitwise_equal(d, vec(-2, -6.5, 9, 3.5, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sago_zero_handling(dtype):
    # No coordinate conflicts: every pair contains a zero (of either sign) or agrees in sign.
    f = vec(0.0, 2.0, 0.0, -0.0, 0.0, -0.0, -0.0, 5.0, dtype=dtype)
    r = vec(3.0, 0.0, 0.0, 1.0, -1.0, -0.0, 0.0, -0.0, dtype=dtype)
    # sago, gamma = 1: d = 1*f, signs of zeros included: f = -0.0, r = 1 gives d = -0.0
    # (a sign-bit XOR test would call it a conflict and give r = 1); f = 0, r = 3 gives 0
    # (SAGO drops the retain gradient outside C).
    (d,) = combine("sago", [f], [r])
    assert_bitwise_equal(d, vec(0.0, 2.0, 0.0, -0.0, 0.0, -0.0, -0.0, 5.0, dtype=dtype))
    # gamma = 0.5, alpha = 2: d = 0.5 f
    (d,) = combine("sago", [f], [r], alpha=2.0, gamma=0.5)
    assert_bitwise_equal(d, vec(0.0, 1.0, 0.0, -0.0, 0.0, -0.0, -0.0, 2.5, dtype=dtype))
    # prefer retain, alpha = gamma = 1: d = f + r; -0 + -0 = -0, -0 + 0 = 0, 5 + -0 = 5.
    (d,) = combine("sago_prefer_retain", [f], [r])
    assert_bitwise_equal(d, vec(3.0, 2.0, 0.0, 1.0, -1.0, -0.0, 0.0, 5.0, dtype=dtype))
    # prefer retain, gamma = 0.5, alpha = 2: d = 0.5 f + 2 r
    (d,) = combine("sago_prefer_retain", [f], [r], alpha=2.0, gamma=0.5)
    assert_bitwise_equal(d, vec(6.0, 1.0, 0.0, 2.0, -2.0, -0.0, 0.0, 2.5, dtype=dtype))


@pytest.mark.parametrize(
    ("dtype", "f", "r"),
    [
        # products that underflow in the input dtype must still count as conflicts
        (torch.float32, (1e-30, -1e-30, 1e-45, 3e-39), (-1e-30, 2e-30, -1e-45, -5e-39)),
        (torch.float64, (1e-200, -1e-300, 5e-324, 1e-170), (-1e-200, 1e-100, -5e-324, -1e-170)),
        (torch.bfloat16, (1e-30, -1e-38, 1e-40), (-1e-30, 1e-38, -1e-40)),
        (torch.float16, (1e-4, -6e-8, 1e-5), (-1e-4, 6e-8, -1e-5)),
    ],
    ids=str,
)
def test_sago_conflict_test_does_not_underflow(dtype, f, r):
    # Every coordinate conflicts, so with alpha = 1 the SAGO update is exactly r (with gamma = 2
    # a missed conflict would show up as 2 f).
    ft, rt = vec(*f, dtype=dtype), vec(*r, dtype=dtype)
    assert (ft != 0).all() and (rt != 0).all()  # the values are representable
    (d,) = combine("sago", [ft], [rt], alpha=1.0, gamma=2.0)
    assert_bitwise_equal(d, rt)
    # prefer retain: conflicting coordinates are also exactly alpha r
    (d,) = combine("sago_prefer_retain", [ft], [rt], alpha=1.0, gamma=2.0)
    assert_bitwise_equal(d, rt)


@pytest.mark.parametrize(
    ("r", "f", "sago_cos", "pcgrad_cos"),
    [
        # no conflict at all: SAGO d = f = (0.01, 1), cos = 0.02/1.00005 = 0.020;
        # PCGrad (<f,r> = 0.02 > 0) d = f + r = (1.01, 1.01), cos = 1.01/(1.41421*1.00005) = 0.714
        ((1.0, 0.01), (0.01, 1.0), 0.020, 0.714),
        # SAGO d = f, cos = 100.01/(100.0000005*1.41421) = 0.707;
        # PCGrad d = (101, 1.01), cos = 102.01/(101.00505*1.41421) = 0.714
        ((1.0, 1.0), (100.0, 0.01), 0.707, 0.714),
        # coordinate 1 conflicts: SAGO d = (1, 0.001), cos = 1.001/(1.0000005*1.41421) = 0.708;
        # PCGrad projects: c = -0.999/2, f~ = (-0.5005, 0.5005), d = (0.4995, 1.5005),
        # cos = 2/(1.58146*1.41421) = 0.894
        ((1.0, 1.0), (-1.0, 0.001), 0.708, 0.894),
    ],
)
def test_theory_r4_counterexamples(r, f, sago_cos, pcgrad_cos):
    # docs/theory.md#r4: on these inputs SAGO's update is LESS aligned with r than PCGrad's.
    rt, ft = vec(*r), vec(*f)
    (d_sago,) = combine("sago", [ft], [rt])
    (d_pcgrad,) = combine("pcgrad", [ft], [rt])
    c_sago, c_pcgrad = cos(d_sago, rt), cos(d_pcgrad, rt)
    assert round(c_sago, 3) == sago_cos
    assert round(c_pcgrad, 3) == pcgrad_cos
    assert c_sago < c_pcgrad


# ============================================================================================
# 2. Brute force against the float64 NumPy reference
# ============================================================================================

# Exponent range (base 10) of the random magnitudes, inside each dtype's range; float16 stops
# at 1e3 so that sums and projections stay far from its maximum (65504).
EXPONENTS = {
    torch.float16: (-7.0, 3.0),
    torch.bfloat16: (-30.0, 30.0),
    torch.float32: (-30.0, 30.0),
    torch.float64: (-30.0, 30.0),
}
SHAPES = [(), (1,), (0,), (7,), (5, 3, 2), (2, 4096), (3, 4099), (70001,)]
WEIGHTS = [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.5, 2.0), (0.3, 0.7), (0.5, 0.5)]
K_ROUNDINGS = 8  # allowance, in units of eps of the computing dtype, times the error scale


def random_gradient(gen: np.random.Generator, shape, dtype, zero_fraction=0.2) -> torch.Tensor:
    """Random signs, magnitudes log-uniform over EXPONENTS[dtype], some +0.0 and some -0.0."""
    lo, hi = EXPONENTS[dtype]
    n = math.prod(shape)
    x = gen.choice([-1.0, 1.0], n) * 10.0 ** gen.uniform(lo, hi, n)
    u = gen.random(n)
    x[u < zero_fraction / 2] = 0.0
    x[(u >= zero_fraction / 2) & (u < zero_fraction)] = -0.0
    t = torch.from_numpy(x.reshape(shape)).to(dtype)
    assert torch.isfinite(t).all()
    return t


def random_pair(seed: int, dtype: torch.dtype, shapes=SHAPES):
    gen = np.random.default_rng(seed)
    forget = [random_gradient(gen, s, dtype) for s in shapes]
    retain = [random_gradient(gen, s, dtype) for s in shapes]
    # Give some tensors a strongly anti-correlated (even seeds) or correlated (odd seeds) pair,
    # so that the global PCGrad test fires for even seeds and, typically, not for odd ones.
    sign = -1.0 if seed % 2 == 0 else 1.0
    for j in range(0, len(shapes), 3):
        retain[j] = (sign * 0.5 * forget[j].double() + 1e-3 * retain[j].double()).to(dtype)
    return forget, retain


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _subnormal(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.tiny * info.eps


def assert_matches_reference(name, forget, retain, alpha, gamma, result, coefs=None) -> None:
    """Compare a geomkit result with the reference, element by element, dtype aware.

    Allowed error: ``K eps_c scale + coefficient_error + eps_o |d_ref| + tiny``, with eps_c of
    the computing dtype (float32 for 16-bit inputs), eps_o of the output dtype (only for 16-bit
    inputs, for the final rounding), ``scale`` and ``coefficient_error`` from
    :func:`reference.error_scale`.
    """
    as_np = [[t.double().numpy() for t in ts] for ts in (forget, retain)]
    if coefs is None:
        coefs = ref.coefficients(name, *as_np)
    expected = ref.combine(name, *as_np, alpha=alpha, gamma=gamma, coefs=coefs)
    scales, coef_errors = ref.error_scale(name, *as_np, alpha=alpha, gamma=gamma, coefs=coefs)
    assert len(result) == len(forget)
    for j, (d, f, e, s, ce) in enumerate(
        zip(result, forget, expected, scales, coef_errors, strict=True)
    ):
        assert d.dtype == f.dtype and d.shape == f.shape and d.device == f.device
        cdt = _compute_dtype(f.dtype)
        tol = K_ROUNDINGS * torch.finfo(cdt).eps * s + ce
        tol = tol + K_ROUNDINGS * _subnormal(cdt) + _subnormal(f.dtype)
        if cdt != f.dtype:
            tol = tol + torch.finfo(f.dtype).eps * np.abs(e)
        got = d.double().numpy()
        bad = ~(np.abs(got - e) <= tol)  # also catches NaN
        if bad.any():
            idx = np.flatnonzero(bad.reshape(-1))[:5]
            fv, rv = as_np[0][j].reshape(-1), as_np[1][j].reshape(-1)
            rows = "\n".join(
                f"  [{i}] f={fv[i]!r} r={rv[i]!r} got={got.reshape(-1)[i]!r} "
                f"expected={e.reshape(-1)[i]!r} tol={tol.reshape(-1)[i]!r}"
                for i in idx
            )
            pytest.fail(
                f"{name} (alpha={alpha}, gamma={gamma}, {f.dtype}) tensor {j} shape "
                f"{tuple(f.shape)}: {int(bad.sum())} element(s) off the reference:\n{rows}"
            )


@functools.cache
def _cached_pair(seed: int, dtype: torch.dtype):
    return random_pair(seed, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference_random(name, dtype):
    for seed in (0, 1):
        forget, retain = _cached_pair(seed, dtype)
        coefs = ref.coefficients(
            name, [f.double().numpy() for f in forget], [r.double().numpy() for r in retain]
        )
        if name == "pcgrad_global":  # the data exercise both outcomes of the global test
            assert coefs[0].fired == (seed % 2 == 0)
        for alpha, gamma in WEIGHTS:
            result = combine(name, forget, retain, alpha, gamma)
            assert_matches_reference(name, forget, retain, alpha, gamma, result, coefs)


@pytest.mark.parametrize("name", NAMES)
def test_matches_reference_mixed_dtypes(name):
    # One list may hold tensors of different dtypes (pairwise equal); global scopes pool them.
    gen = np.random.default_rng(7)
    specs = [((4100,), torch.float32), ((33,), torch.bfloat16), ((9,), torch.float16)]
    specs += [((2, 3), torch.float64)]
    forget = [random_gradient(gen, s, dt) for s, dt in specs]
    retain = [random_gradient(gen, s, dt) for s, dt in specs]
    for alpha, gamma in [(1.0, 1.0), (0.5, 2.0)]:
        result = combine(name, forget, retain, alpha, gamma)
        assert_matches_reference(name, forget, retain, alpha, gamma, result)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["sago", "sago_prefer_retain"])
def test_sago_never_opposes_retain(name, dtype):
    # R1/R6 (docs/theory.md#r6): no coordinate of d opposes r, exactly, for any alpha, gamma >= 0.
    forget, retain = _cached_pair(3, dtype)
    for alpha, gamma in WEIGHTS:
        for d, r in zip(combine(name, forget, retain, alpha, gamma), retain, strict=True):
            assert not ref.conflict(d.double().numpy(), r.double().numpy()).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sago_exact_for_power_of_two_weights(dtype):
    # With weights that are powers of two (or 0), alpha r and gamma f are single correctly
    # rounded products, so SAGO must equal the reference rounded to the dtype bit for bit.
    forget, retain = _cached_pair(4, dtype)
    for alpha, gamma in [(1.0, 1.0), (0.5, 2.0), (0.0, 1.0), (4.0, 0.0)]:
        result = combine("sago", forget, retain, alpha, gamma)
        as_np = [[t.double().numpy() for t in ts] for ts in (forget, retain)]
        expected = ref.combine("sago", *as_np, alpha=alpha, gamma=gamma)
        for d, e in zip(result, expected, strict=True):
            assert_bitwise_equal(d, torch.from_numpy(e).to(dtype))


_BOUND32 = float(np.float32(1e30))  # magnitudes up to 1e30, exactly representable in float32
_finite32 = st.one_of(
    st.sampled_from([0.0, -0.0]),
    st.floats(-_BOUND32, _BOUND32, allow_nan=False, allow_infinity=False, width=32),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    name=st.sampled_from(NAMES),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    weights=st.sampled_from(WEIGHTS),
    data=st.lists(
        st.lists(st.tuples(_finite32, _finite32), min_size=1, max_size=5), min_size=1, max_size=3
    ),
)
def test_matches_reference_hypothesis(name, dtype, weights, data):
    forget = [torch.tensor([p[0] for p in pairs], dtype=dtype) for pairs in data]
    retain = [torch.tensor([p[1] for p in pairs], dtype=dtype) for pairs in data]
    alpha, gamma = weights
    result = combine(name, forget, retain, alpha, gamma)
    assert_matches_reference(name, forget, retain, alpha, gamma, result)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("name", "f", "r", "alpha", "gamma"),
    [
        # <f,r> = -1, ||r||^2 = 1e40: c = -1e-40, a float32 subnormal (only ~17 bits left).
        # f~ = f - c r = f 1e-10/(1e40 + 1e-10) ~ 1e-70, i.e. 0 in float32: d = gamma f~ ~ 0.
        ("pcgrad", 1e-20, -1e20, 0.0, 1.0),
        # c = -1e-50 is 0 in float32: the projection is lost entirely (f~ = f = 1e-25 instead
        # of ~1e-85).
        ("pcgrad", 1e-25, -1e25, 0.0, 1.0),
        # BLUR, mirrored: k = <r,f>/(||f||^2 + 1e-10) = -1e-50, r~ = r - k f ~ 1e-85, d = alpha r~.
        ("blur", -1e25, 1e-25, 1.0, 0.0),
        # ||r||^2 = 1e-10 is comparable to the 1e-10 in the denominator: c = -1e31/2e-10 = -5e40,
        # beyond float32's maximum (3.4e38), although f~ = f - c r = 1e36 - 5e35 = 5e35 and
        # d = f~ + r = 5e35 are ordinary float32 numbers.
        ("pcgrad", 1e36, -1e-5, 1.0, 1.0),
        # BLUR, mirrored: k = -5e40, r~ = 1e36 - 5e35, d = f + r~ = 5e35.
        ("blur", -1e-5, 1e36, 1.0, 1.0),
    ],
)
def test_projection_coefficient_outside_float32_range(name, f, r, alpha, gamma, dtype):
    # The projection coefficient is computed in float64; the update must not lose it when the
    # coefficient itself lies outside the float32 range although every input and the result
    # are well inside it. Compared with the reference like every other case.
    forget, retain = [vec(f, dtype=dtype)], [vec(r, dtype=dtype)]
    result = combine(name, forget, retain, alpha, gamma)
    assert_matches_reference(name, forget, retain, alpha, gamma, result)


# ============================================================================================
# 3. out=, non-contiguous tensors, inputs unchanged
# ============================================================================================


def _bitwise_clone(tensors):
    return [t.clone() for t in tensors]


def _assert_unchanged(tensors, clones):
    for t, c in zip(tensors, clones, strict=True):
        assert_bitwise_equal(t, c)


OUT_SHAPES = [(3, 4099), (7,), (), (4, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_out_writes_into_given_tensors(name, dtype):
    forget, retain = random_pair(11, dtype, OUT_SHAPES)
    strategy = build(name, alpha=0.5, gamma=2.0)
    expected = strategy(forget, retain)
    out = [torch.full_like(f, float("nan")) for f in forget]
    pointers = [o.data_ptr() for o in out]
    result = strategy(forget, retain, out=out)
    assert isinstance(result, list) and len(result) == len(out)
    for j, (res, o, e) in enumerate(zip(result, out, expected, strict=True)):
        assert res is o
        assert o.data_ptr() == pointers[j]
        assert_bitwise_equal(o, e)
    # a tuple of outputs is accepted too
    result = strategy(forget, retain, out=tuple(out))
    assert all(a is b for a, b in zip(result, out, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_out_non_contiguous(name):
    forget, retain = random_pair(12, torch.float32, [(6, 4099), (8,)])
    strategy = build(name, alpha=0.5, gamma=2.0)
    expected = strategy(forget, retain)
    # out[0]: a transposed view; out[1]: every other element of a larger buffer.
    base0 = torch.full((4099, 6), 123.0)
    base1 = torch.full((16,), 123.0)
    out = [base0.t(), base1[::2]]
    assert not out[0].is_contiguous() and not out[1].is_contiguous()
    result = strategy(forget, retain, out=out)
    assert result[0] is out[0] and result[1] is out[1]
    assert_bitwise_equal(out[0], expected[0])
    assert_bitwise_equal(out[1], expected[1])
    assert_bitwise_equal(base1[1::2], torch.full((8,), 123.0))  # untouched in between


@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_inputs(name):
    forget, retain = random_pair(13, torch.float32, [(4099, 3), (10,)])
    strategy = build(name, alpha=0.5, gamma=2.0)
    expected = strategy(forget, retain)
    # same values, stored transposed / strided
    f_nc = [forget[0].t().contiguous().t(), torch.stack([forget[1], forget[1]], 1)[:, 0]]
    r_nc = [retain[0].t().contiguous().t(), torch.stack([retain[1], retain[1]], 1)[:, 0]]
    assert not f_nc[0].is_contiguous() and not r_nc[1].is_contiguous()
    for d, e in zip(strategy(f_nc, r_nc), expected, strict=True):
        assert_bitwise_equal(d, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_inputs_never_modified(name, dtype):
    forget, retain = random_pair(14, dtype, OUT_SHAPES)
    forget_before, retain_before = _bitwise_clone(forget), _bitwise_clone(retain)
    strategy = build(name, alpha=0.5, gamma=2.0)
    strategy(forget, retain)
    strategy(forget, retain, out=[torch.empty_like(f) for f in forget])
    _assert_unchanged(forget, forget_before)
    _assert_unchanged(retain, retain_before)


@pytest.mark.parametrize("name", NAMES)
def test_out_may_alias_an_input(name):
    # Writing the update over the forget (or retain) gradient, e.g. into .grad, is allowed.
    forget, retain = random_pair(15, torch.float32, OUT_SHAPES)
    strategy = build(name, alpha=0.5, gamma=2.0)
    expected = strategy(forget, retain)
    for target in ("forget", "retain"):
        f, r = _bitwise_clone(forget), _bitwise_clone(retain)
        out = f if target == "forget" else r
        result = strategy(f, r, out=out)
        for d, e in zip(result, expected, strict=True):
            assert_bitwise_equal(d, e)


# ============================================================================================
# 4. Backends
# ============================================================================================


@pytest.mark.parametrize("name", NAMES)
def test_compiled_backend_bit_identical(name):
    # Each case starts from an empty dynamo cache and makes dynamo raise (instead of silently
    # running the eager function) if it hits its recompile limit; geomkit turns that into its
    # fallback warning, which fails the test. So the comparison really is compiled vs eager.
    shapes = [(3 * 4096 + 17,), (5, 7)]
    assert kernels.get_backend() == "eager"
    torch._dynamo.reset()
    for dtype in (torch.float32, torch.bfloat16):
        forget, retain = random_pair(21, dtype, shapes)
        strategy = build(name, alpha=0.5, gamma=2.0)
        eager = strategy(forget, retain)
        with (
            warnings.catch_warnings(record=True) as caught,
            torch._dynamo.config.patch(fail_on_recompile_limit_hit=True),
        ):
            warnings.simplefilter("always")
            with kernels.use_backend("compiled"):
                assert kernels.get_backend() == "compiled"
                compiled = strategy(forget, retain)
        fallbacks = [w for w in caught if "falling back to the eager" in str(w.message)]
        assert not fallbacks, f"the compiled backend was not used: {fallbacks[0].message}"
        assert not kernels.compile_failed()  # sticky flag: once set, "compiled" runs eager
        assert kernels.get_backend() == "eager"
        for c, e in zip(compiled, eager, strict=True):
            assert c.dtype == e.dtype
            assert torch.equal(c, e), f"{name} {dtype}: compiled differs from eager"


def test_backend_selection_errors_and_restores():
    with pytest.raises(
        ValueError, match=r"invalid backend='fast': expected one of .*eager.*compiled"
    ):
        kernels.set_backend("fast")
    assert kernels.get_backend() == "eager"
    with pytest.raises(RuntimeError, match="boom"), kernels.use_backend("compiled"):
        raise RuntimeError("boom")
    assert kernels.get_backend() == "eager"


# ============================================================================================
# 5. Errors
# ============================================================================================


def _pair(*shape, dtype=torch.float32, device="cpu"):
    return torch.ones(shape, dtype=dtype, device=device)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="invalid strategy='sago2': expected one of") as info:
        build("sago2")
    for name in NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_input_errors(name):
    s = build(name)
    a, b = _pair(3), _pair(3)
    with pytest.raises(
        ValueError,
        match=r"invalid retain: expected the same number of tensors.*2 forget and 1 retain",
    ):
        s([a, a], [b])
    with pytest.raises(ValueError, match=r"empty"):
        s([], [])
    with pytest.raises(
        ValueError, match=r"invalid retain\[1\] \(shape \(4,\).*of forget\[1\] \(shape \(3,\)"
    ):
        s([a, a], [b, _pair(4)])
    with pytest.raises(
        ValueError, match=r"invalid retain\[0\] \(.*float64.*of forget\[0\] \(.*float32"
    ):
        s([a], [_pair(3, dtype=torch.float64)])
    with pytest.raises(
        ValueError, match=r"invalid retain\[0\] \(.*device meta\).*of forget\[0\] \(.*device cpu"
    ):
        s([a], [_pair(3, device="meta")])
    with pytest.raises(
        TypeError, match=r"invalid forget\[0\] of dtype torch.int64: expected a floating-point"
    ):
        s([torch.ones(3, dtype=torch.int64)], [b])
    with pytest.raises(
        TypeError, match=r"invalid retain\[0\] of dtype torch.int32: expected a floating-point"
    ):
        s([a], [torch.ones(3, dtype=torch.int32)])
    with pytest.raises(TypeError, match=r"single tensor.*wrap it in a list"):
        s(a, b)
    with pytest.raises(TypeError, match=r"single tensor"):
        s([a], b)
    with pytest.raises(
        TypeError, match=r"invalid forget\[0\] of type ndarray: expected a torch.Tensor"
    ):
        s([np.ones(3)], [b])


@pytest.mark.parametrize("name", NAMES)
def test_out_errors(name):
    s = build(name)
    f, r = [_pair(3), _pair(2, 2)], [_pair(3), _pair(2, 2)]
    with pytest.raises(ValueError, match=r"invalid out of 1 tensors: expected 2"):
        s(f, r, out=[_pair(3)])
    with pytest.raises(
        ValueError, match=r"invalid out\[1\] \(shape \(4,\).*expected .* of forget\[1\]"
    ):
        s(f, r, out=[_pair(3), _pair(4)])
    with pytest.raises(
        ValueError, match=r"invalid out\[0\] \(.*float16.*expected .* of forget\[0\]"
    ):
        s(f, r, out=[_pair(3, dtype=torch.float16), _pair(2, 2)])
    with pytest.raises(
        ValueError, match=r"invalid out\[0\] \(.*device meta.*expected .* of forget\[0\]"
    ):
        s(f, r, out=[_pair(3, device="meta"), _pair(2, 2)])
    with pytest.raises(TypeError, match=r"invalid out: expected a sequence of tensors"):
        s(f, r, out=_pair(3))
    with pytest.raises(TypeError, match=r"invalid out\[1\] of type .*: expected a torch.Tensor"):
        s(f, r, out=[_pair(3), [1.0, 2.0]])


def test_errors_are_raised_before_anything_is_written():
    s = build("sago")
    out = [torch.full((3,), 7.0), torch.full((2,), 7.0)]
    with pytest.raises(ValueError):
        s([_pair(3), _pair(2)], [_pair(3), _pair(5)], out=out)  # second pair mismatched
    with pytest.raises(ValueError):
        s([_pair(3), _pair(2)], [_pair(3), _pair(2)], out=[out[0], torch.empty(4)])
    assert_bitwise_equal(out[0], torch.full((3,), 7.0))


@pytest.mark.parametrize("weight", ["alpha", "gamma"])
def test_weight_errors(weight):
    with pytest.raises(ValueError, match=rf"invalid {weight}=-1.0: expected a finite number >= 0"):
        build("sum", **{weight: -1.0})
    with pytest.raises(
        ValueError, match=rf"invalid {weight}=-1e-300: expected a finite number >= 0"
    ):
        build("pcgrad", **{weight: -1e-300})
    with pytest.raises(ValueError, match=rf"invalid {weight}=nan: expected a finite number >= 0"):
        build("sago", **{weight: float("nan")})
    for bad in (float("inf"), float("-inf")):
        with pytest.raises(
            ValueError, match=rf"invalid {weight}=-?inf: expected a finite number >= 0"
        ):
            build("blur", **{weight: bad})
    for bad in (True, "1", None):
        with pytest.raises(TypeError, match=rf"invalid {weight}=.*: expected a finite number >= 0"):
            build("sum", **{weight: bad})
    with pytest.raises(ValueError, match=weight):
        Strategy(Sum(), **{weight: -2.0})
    # -0.0 and integers are fine
    assert getattr(build("sum", **{weight: 2}), weight) == 2.0
    assert getattr(build("sum", **{weight: -0.0}), weight) == 0.0


def test_composition_errors():
    for rule in (PCGrad(), BLUR()):
        with pytest.raises(ValueError, match=r"invalid scope=None: .*projects and needs a scope"):
            Strategy(rule)
        with pytest.raises(ValueError, match=r"needs a scope"):
            Strategy(rule, scope="global")
    for rule in (Sum(), SAGO(), SAGOPreferRetain()):
        for scope in (PerTensor(), Global()):
            with pytest.raises(
                ValueError, match=r"invalid scope=.*: expected None .*coordinate-wise"
            ):
                Strategy(rule, scope)
    with pytest.raises(TypeError, match=r"invalid rule='sago': expected a geomkit Rule"):
        Strategy("sago")


# ============================================================================================
# 6. API
# ============================================================================================


def test_names():
    assert names() == list(NAMES)
    names().append("mutated")  # a copy: the registry is not changed
    assert names() == list(NAMES)


def test_repr_is_a_constructor_call():
    namespace = {
        "Strategy": Strategy,
        "PCGrad": PCGrad,
        "BLUR": BLUR,
        "SAGO": SAGO,
        "SAGOPreferRetain": SAGOPreferRetain,
        "Sum": Sum,
        "PerTensor": PerTensor,
        "Global": Global,
    }
    assert repr(build("pcgrad_global")) == (
        "Strategy(PCGrad(), scope=Global(), alpha=1.0, gamma=1.0)"
    )
    assert repr(build("sago", alpha=0.5, gamma=2)) == "Strategy(SAGO(), alpha=0.5, gamma=2.0)"
    for name in NAMES:
        strategy = build(name, alpha=0.25, gamma=3.0)
        assert eval(repr(strategy), namespace) == strategy


@pytest.fixture
def registry(monkeypatch):
    """The strategy registry, restored after the test."""
    from geomkit.strategies import registry as module

    monkeypatch.setattr(module, "_REGISTRY", dict(module._REGISTRY))
    return module


def test_registering_the_same_strategy_again_is_a_no_op(registry):
    for name in NAMES:
        rule, scope = registry._REGISTRY[name]
        register(name, rule, scope)
    assert names() == list(NAMES)
    register("blur_per_tensor", BLUR, PerTensor)
    register("blur_per_tensor", BLUR, PerTensor)  # a re-run notebook cell
    assert names() == [*NAMES, "blur_per_tensor"]
    assert build("blur_per_tensor") == Strategy(BLUR(), PerTensor())


def test_registering_a_name_with_another_meaning_raises(registry):
    with pytest.raises(ValueError, match=r"'sago' is already registered as SAGO; .*SAGOPrefer"):
        register("sago", SAGOPreferRetain, None)
    with pytest.raises(ValueError, match=r"'pcgrad' is already registered .*PCGrad x Global"):
        register("pcgrad", PCGrad, Global)
    with pytest.raises(ValueError, match=r"'blur' .*BLUR x PerTensor"):
        register("blur", BLUR, PerTensor)
    with pytest.raises(ValueError, match=r"'sum' .*Sum x Global"):
        register("sum", Sum, Global)
    assert build("sago") == Strategy(SAGO()) and build("pcgrad").scope == PerTensor()
    with pytest.raises(ValueError, match=r"invalid strategy name='a b'"):
        register("a b", Sum, None)


def test_lambda_and_partial_factories_cannot_change_a_meaning(registry):
    import functools

    register("mine", lambda: SAGO(), None)
    register("mine", lambda: SAGO(), None)  # the same meaning again: a no-op
    with pytest.raises(ValueError, match="would change its meaning"):
        register("mine", lambda: Sum(), None)
    register("other", functools.partial(SAGO), None)
    with pytest.raises(ValueError, match="would change its meaning"):
        register("other", functools.partial(Sum), None)
    assert build("mine").rule == SAGO() and build("other").rule == SAGO()


def test_a_redefined_rule_class_re_registers_and_replaces(registry):
    """A notebook cell defining a rule and registering it runs twice: the second class has the
    same qualified name, so the name keeps its meaning and now builds the new class."""

    def define():
        class Halved(Sum):
            def linear_form(self, dots, alpha, gamma):
                return super().linear_form(dots, alpha / 2, gamma / 2)

        return Halved

    first, second = define(), define()
    assert first is not second
    register("halved", first, None)
    register("halved", second, None)
    assert type(build("halved").rule) is second
    assert str(Strategy(second())) == "halved"
    assert first.label == "halved"  # the default label: the snake-case class name


def test_str_is_a_short_label():
    for name in NAMES:
        assert str(build(name, alpha=0.5, gamma=2.0)) == name
    # composed without a name: the registered name of the same composition, else rule/scope
    assert str(Strategy(SAGO(), alpha=0.3)) == "sago"
    assert str(Strategy(PCGrad(), Global())) == "pcgrad_global"
    assert str(Strategy(BLUR(), PerTensor())) == "blur/per_tensor"
    assert str(Strategy(BLUR(), PerTensor(), name="blur_pt")) == "blur_pt"
    assert str(Strategy(SAGO(), name="mine")) == "mine"
    assert [c.label for c in (Sum, PCGrad, BLUR, SAGO, SAGOPreferRetain)] == [
        "sum",
        "pcgrad",
        "blur",
        "sago",
        "sago_prefer_retain",
    ]
    assert (PerTensor.label, Global.label) == ("per_tensor", "global")
    with pytest.raises(ValueError, match=r"invalid name=''"):
        Strategy(SAGO(), name="")


def test_as_strategy_takes_names_and_objects():
    blur = Strategy(BLUR(), PerTensor(), alpha=0.5)
    assert as_strategy(blur) is blur and as_strategy(blur, alpha=0.5) is blur
    assert as_strategy("sago", 0.5, 2.0) == Strategy(SAGO(), alpha=0.5, gamma=2.0)
    with pytest.raises(ValueError, match=r"invalid gamma=3.0: the strategy blur/per_tensor"):
        as_strategy(blur, gamma=3.0)
    with pytest.raises(TypeError, match=r"invalid strategy=None: expected a Strategy or"):
        as_strategy(None)
    with pytest.raises(ValueError, match=r"invalid strategy='nope'"):
        as_strategy("nope")


def test_equality_and_hash():
    for name in NAMES:
        a, b = build(name, alpha=0.5, gamma=2.0), build(name, alpha=0.5, gamma=2.0)
        assert a == b and hash(a) == hash(b)
        assert a != build(name, alpha=0.5, gamma=1.0)
        assert a.name == name
    assert build("pcgrad") == Strategy(PCGrad(), PerTensor())
    assert build("pcgrad_global") == Strategy(PCGrad(), Global())
    assert build("blur") == Strategy(BLUR(), Global())
    assert build("sago_prefer_retain") == Strategy(SAGOPreferRetain())
    assert len({build(n) for n in NAMES}) == len(NAMES)  # all six are distinct
    assert build("pcgrad") != build("pcgrad_global")
    assert build("sago") != build("sago_prefer_retain")


def test_strategies_are_immutable():
    strategy = build("sago")
    with pytest.raises(dataclasses.FrozenInstanceError):
        strategy.alpha = 2.0


# ============================================================================================
# 7. No host synchronisation
# ============================================================================================


@pytest.mark.parametrize("name", NAMES)
def test_no_host_synchronisation(name, monkeypatch):
    forget, retain = random_pair(31, torch.float32, [(3, 4099), (7,), ()])
    strategy = build(name, alpha=0.5, gamma=2.0)
    expected = strategy(forget, retain)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside a strategy call")

    for attr in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, attr, forbidden)
    # sanity check: the patches are live
    probe = torch.ones(())
    for call in (probe.item, probe.tolist, lambda: float(probe), lambda: bool(probe)):
        with pytest.raises(AssertionError, match="host synchronisation"):
            call()

    result = strategy(forget, retain)
    out = [torch.empty_like(f) for f in forget]
    strategy(forget, retain, out=out)
    monkeypatch.undo()
    for d, o, e in zip(result, out, expected, strict=True):
        assert_bitwise_equal(d, e)
        assert_bitwise_equal(o, e)
