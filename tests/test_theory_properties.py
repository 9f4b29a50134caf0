"""Property tests of the claims in docs/theory.md, at coordinate, tensor and model granularity.

Each claim is checked twice: on the update a strategy actually materialises (in the input
dtype), and through the statistics (:func:`geomkit.statistics.sufficient` and the closed-form
:func:`geomkit.statistics.shadow`). Tolerances are derived from the dtype's rounding and, for
the projection rules, from the exact residual the ``1e-10`` in the denominator leaves:
``gamma * |<f,r>| * 1e-10 / (||r||^2 + 1e-10)``. The false claim R4 is checked as false.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from geomkit import kernels, metrics, statistics, strategies
from geomkit.metrics import FIELDS

EPSILON = 1e-10
IDX = {name: i for i, name in enumerate(FIELDS)}
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# largest magnitude per dtype such that no rule can overflow with weights <= 4
LIMIT = {torch.float32: 1e4, torch.bfloat16: 1e4, torch.float64: 1e4, torch.float16: 1e2}
# tiny values whose products underflow in the dtype (the conflict test must still be exact)
TINY = {torch.float32: 1e-20, torch.bfloat16: 1e-20, torch.float64: 1e-170, torch.float16: 1e-4}
PROPERTY = settings(max_examples=60, deadline=None)


# ------------------------------------------------------------------------------------------
# Drawing gradient pairs (lists of tensors: a small "model")
# ------------------------------------------------------------------------------------------


def _values(dtype):
    lim, tiny = LIMIT[dtype], TINY[dtype]
    return st.one_of(
        st.sampled_from([0.0, -0.0]),
        st.floats(-lim, lim, allow_nan=False, allow_infinity=False),
        st.floats(-tiny, tiny, allow_nan=False, allow_infinity=False),
    )


@st.composite
def models(draw, dtype):
    """1-4 tensors; per tensor, f independent of r, or f = +-lambda r + eta noise (projections
    fire; eta = 0 makes f exactly (anti-)parallel to r)."""
    n_tensors = draw(st.integers(1, 4))
    fs, rs = [], []
    for _ in range(n_tensors):
        size = draw(st.integers(1, 24))
        vec = arrays(np.float64, size, elements=_values(dtype))
        r = draw(vec)
        mode = draw(st.sampled_from(["independent", "anti", "aligned"]))
        if mode == "independent":
            f = draw(vec)
        else:
            lam = draw(st.sampled_from([0.5, 1.0, 3.0])) * (-1 if mode == "anti" else 1)
            eta = draw(st.sampled_from([0.0, 1e-3, 0.1]))
            f = lam * r + eta * draw(vec)
        fs.append(torch.from_numpy(f).to(dtype))
        rs.append(torch.from_numpy(r).to(dtype))
    return fs, rs


weights = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 4.0))


def as64(t):
    return t.detach().to(torch.float64).reshape(-1).numpy().copy()


def opposite(x, y):
    """sign(x) sign(y) < 0 without products (which may underflow); zeros never oppose."""
    return ((x > 0) & (y < 0)) | ((x < 0) & (y > 0))


def rounding(dtype):
    info = torch.finfo(dtype)
    return info.eps, info.smallest_normal * info.eps


def sh_stats(fs, rs, strats):
    return statistics.to_numpy(statistics.shadow(fs, rs, strats))


def model_total(stats):
    """Aggregate the tensor axis of [..., T, 12] statistics into one model row."""
    _, total = metrics.aggregate(stats, ["model"] * stats.shape[-2])
    return total[..., 0, :]


# ------------------------------------------------------------------------------------------
# R1 and R6: SAGO never opposes r
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@PROPERTY
@given(data=st.data(), alpha=weights, gamma=weights)
def test_r1_sago_aligns_with_retain_at_every_granularity(dtype, data, alpha, gamma):
    fs, rs = data.draw(models(dtype))
    s = strategies.build("sago", alpha=alpha, gamma=gamma)
    ds = s(fs, rs)
    products = [as64(d) * as64(r) for d, r in zip(ds, rs, strict=True)]
    # coordinate: d_i r_i >= 0 (float64 products of 16/32-bit values are exact)
    for p in products:
        assert (p >= 0).all()
    # tensor and model: sums of non-negative terms are non-negative, with no tolerance needed
    per_tensor = [math.fsum(p) for p in products]
    assert min(per_tensor) >= 0 and math.fsum(per_tensor) >= 0
    # through the statistics: no opposed coordinate, <d, r> >= 0 per tensor and for the model
    suf = statistics.to_numpy(statistics.sufficient(fs, rs, ds, strategy=s))
    sh = sh_stats(fs, rs, [s])[0]
    for stats in (suf, sh, model_total(suf)[None], model_total(sh)[None]):
        np.testing.assert_array_equal(stats[:, IDX["n_opposed"]], 0.0)
        assert (stats[:, IDX["dr"]] >= 0).all(), stats[:, IDX["dr"]]
        cos = metrics.derive(stats)["cos_dr"]
        assert np.all(np.isnan(cos) | (cos >= 0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@PROPERTY
@given(data=st.data(), alpha=weights, gamma=weights)
def test_r6_no_coordinate_of_sago_opposes_retain(dtype, data, alpha, gamma):
    fs, rs = data.draw(models(dtype))
    for name in ("sago", "sago_prefer_retain"):
        s = strategies.build(name, alpha=alpha, gamma=gamma)
        ds = s(fs, rs)
        for d, r in zip(ds, rs, strict=True):
            assert not opposite(as64(d), as64(r)).any(), name
        suf = statistics.to_numpy(statistics.sufficient(fs, rs, ds, strategy=s))
        np.testing.assert_array_equal(suf[:, IDX["n_opposed"]], 0.0)
    sh = sh_stats(
        fs, rs, [strategies.build(n, alpha, gamma) for n in ("sago", "sago_prefer_retain")]
    )
    np.testing.assert_array_equal(sh[..., IDX["n_opposed"]], 0.0)
    assert (sh[..., IDX["dr"]] >= 0).all()


@pytest.mark.parametrize(
    "f, r, fires",
    [
        ([-3.0, 0.0], [1.0, 1.0], True),  # projected: f' = (-1.5, 1.5), d = (-0.5, 2.5)
        ([-3.0, 5.0], [1.0, 1.0], False),  # <f,r> > 0, no projection: d = (-2, 6)
    ],
)
def test_r6_pcgrad_can_oppose_retain(f, r, fires):
    fs, rs = [torch.tensor(f)], [torch.tensor(r)]
    names = ("pcgrad", "pcgrad_global", "sago", "sago_prefer_retain")
    strats = [strategies.build(n) for n in names]
    sh = sh_stats(fs, rs, strats)
    for k, s in enumerate(strats):
        d = s(fs, rs)[0]
        suf = statistics.to_numpy(statistics.sufficient(fs, rs, [d], strategy=s))[0]
        want = 1.0 if s.name.startswith("pcgrad") else 0.0
        assert suf[IDX["n_opposed"]] == want, s.name
        assert sh[k, 0, IDX["n_opposed"]] == want, s.name
        assert int(opposite(as64(d), np.array(r)).sum()) == want, s.name
        if s.name.startswith("pcgrad"):
            assert d[0] < 0 < r[0]
            assert sh[k, 0, IDX["n_projected"]] == float(fires)
            assert sh[k, 0, IDX["dr"]] >= 0  # the tensor as a whole still aligns (R2)


# ------------------------------------------------------------------------------------------
# R2 / R2b: PCGrad's <d, r> >= -tol, per tensor (per-tensor PCGrad) and for the model
# ------------------------------------------------------------------------------------------


def pcgrad_bounds(fs64, rs64, alpha, gamma, dtype, scope):
    """Per-tensor tolerances for <d, r> >= 0 of PCGrad: (materialised, closed form).

    The exact <d, r> with c = <f,r>/(||r||^2 + 1e-10) is gamma <f,r> 1e-10/(||r||^2 + 1e-10)
    + alpha ||r||^2, so the projection's own residual is the first term; the materialised d_i
    additionally carries a few roundings of its terms gamma|f_i| + gamma|c r_i| + alpha|r_i|
    in the storage dtype. For the global scope the residual belongs to the model only.
    """
    eps, tiny = rounding(dtype)
    fr_j = np.array([math.fsum(f * r) for f, r in zip(fs64, rs64, strict=True)])
    rr_j = np.array([math.fsum(r * r) for r in rs64])
    if scope == "global":
        fr_c = np.full_like(fr_j, fr_j.sum())
        rr_c = np.full_like(rr_j, rr_j.sum())
    else:
        fr_c, rr_c = fr_j, rr_j
    c = np.where(fr_c < 0, fr_c / (rr_c + EPSILON), 0.0)
    # (1e-10 / (rr + 1e-10) first: gamma |fr| 1e-10 can underflow when |fr| is subnormal)
    residual = np.where(fr_c < 0, gamma * np.abs(fr_c) * (EPSILON / (rr_c + EPSILON)), 0.0)
    floor = 4 * np.finfo(np.float64).smallest_subnormal  # float64 sums resolve nothing below
    # c, and the coefficients a = gamma, b = alpha - gamma c the shadow forms from it, are float64
    # numbers: where one is subnormal (gamma = 5e-324, or f = -5e-324 against r = 5) it is off by
    # up to half the subnormal spacing, so <d, r> is off by that times sum |f r| + ||r||^2, and
    # each coordinate of d = a f + b r (subnormal too) by half a spacing, times sum |r|
    sub = np.finfo(np.float64).smallest_subnormal
    underflow = np.array(
        [
            sub * (math.fsum(abs(f * r)) + math.fsum(r * r) + math.fsum(abs(r)))
            for f, r in zip(fs64, rs64, strict=True)
        ]
    )
    mat, closed = [], []
    for j, (f, r) in enumerate(zip(fs64, rs64, strict=True)):
        terms = gamma * abs(f) + gamma * abs(c[j] * r) + alpha * abs(r)
        scale = math.fsum(terms * abs(r))
        rounding_d = math.fsum((4 * eps * terms + 2 * tiny) * abs(r))
        mat.append(rounding_d + 1e-12 * scale + floor + underflow[j])
        closed.append(1e-12 * scale + floor + underflow[j])
    return np.array(mat), np.array(closed), residual, fr_j, rr_j


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@PROPERTY
@given(data=st.data(), alpha=weights, gamma=weights)
def test_r2_per_tensor_pcgrad_aligns_every_tensor(dtype, data, alpha, gamma):
    fs, rs = data.draw(models(dtype))
    s = strategies.build("pcgrad", alpha=alpha, gamma=gamma)
    ds = s(fs, rs)
    fs64, rs64 = [as64(f) for f in fs], [as64(r) for r in rs]
    tol_mat, tol_closed, residual, _, _ = pcgrad_bounds(fs64, rs64, alpha, gamma, dtype, "tensor")
    # materialised update, per tensor: the 1e-10 residual (its own tensor's) plus rounding
    dr = np.array([math.fsum(as64(d) * r) for d, r in zip(ds, rs64, strict=True)])
    assert (dr >= -(1.01 * residual + tol_mat)).all(), (dr, residual, tol_mat)
    assert dr.sum() >= -(1.01 * residual + tol_mat).sum()
    # statistics of the materialised update, per tensor and for the model
    suf = statistics.to_numpy(statistics.sufficient(fs, rs, ds, strategy=s))
    assert (suf[:, IDX["dr"]] >= -(1.01 * residual + tol_mat)).all()
    assert model_total(suf)[IDX["dr"]] >= -(1.01 * residual + tol_mat).sum()
    # closed form (float64 from the exact inputs): only the residual and float64 rounding
    sh = sh_stats(fs, rs, [s])[0]
    assert (sh[:, IDX["dr"]] >= -(1.01 * residual + tol_closed)).all()
    assert model_total(sh)[IDX["dr"]] >= -(1.01 * residual + tol_closed).sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@PROPERTY
@given(data=st.data(), alpha=weights, gamma=weights)
def test_r2b_global_pcgrad_aligns_the_model(dtype, data, alpha, gamma):
    fs, rs = data.draw(models(dtype))
    s = strategies.build("pcgrad_global", alpha=alpha, gamma=gamma)
    ds = s(fs, rs)
    fs64, rs64 = [as64(f) for f in fs], [as64(r) for r in rs]
    tol_mat, tol_closed, residual, _, _ = pcgrad_bounds(fs64, rs64, alpha, gamma, dtype, "global")
    model_residual = 1.01 * residual[0]  # the same global residual, once for the model
    dr = math.fsum(math.fsum(as64(d) * r) for d, r in zip(ds, rs64, strict=True))
    assert dr >= -(model_residual + tol_mat.sum())
    suf = statistics.to_numpy(statistics.sufficient(fs, rs, ds, strategy=s))
    assert model_total(suf)[IDX["dr"]] >= -(model_residual + tol_mat.sum())
    sh = sh_stats(fs, rs, [s])[0]
    assert model_total(sh)[IDX["dr"]] >= -(model_residual + tol_closed.sum())
    # the projection fires for every tensor or none (one test for the model)
    fired = suf[:, IDX["n_projected"]]
    assert fired.min() == fired.max()
    np.testing.assert_array_equal(sh[:, IDX["n_projected"]], fired)


def test_r2b_global_pcgrad_fails_per_tensor():
    # tensor 0: f strongly opposes r; tensor 1: a large retain gradient, no forget gradient.
    # Global <f,r> = -10, ||r||^2 = 101, c = -10/101; tensor 0: d = -10 + 10/101 + 1 < 0.
    fs = [torch.tensor([-10.0]), torch.tensor([0.0])]
    rs = [torch.tensor([1.0]), torch.tensor([10.0])]
    strats = [strategies.build(n) for n in ("pcgrad_global", "pcgrad")]
    sh = sh_stats(fs, rs, strats)
    glob, per = sh[0], sh[1]
    assert glob[0, IDX["dr"]] < 0  # a tensor with a negative <d_j, r_j> ...
    np.testing.assert_allclose(glob[0, IDX["dr"]], -10 + 10 / 101 + 1, rtol=1e-12)
    assert model_total(glob)[IDX["dr"]] >= 0  # ... while the model aligns
    assert (per[:, IDX["dr"]] >= 0).all()  # per-tensor PCGrad aligns every tensor
    d = strats[0](fs, rs)
    suf = statistics.to_numpy(statistics.sufficient(fs, rs, d, strategy=strats[0]))
    assert suf[0, IDX["dr"]] < 0 and model_total(suf)[IDX["dr"]] > 0
    cos = metrics.derive(glob)["cos_dr"]
    assert cos[0] == pytest.approx(-1.0) and cos[1] > 0


def test_r2_residual_of_the_1e_10_denominator():
    """The projection leaves gamma <f,r> 1e-10/(||r||^2 + 1e-10): negligible for ||r|| ~ 1,
    but for a tensor with a small retain gradient the projection hardly happens at all."""
    u = torch.tensor([0.6, -0.8], dtype=torch.float64)
    # f exactly anti-parallel, alpha = 0: d = f 1e-10/(||r||^2 + 1e-10), so cos(d, r) = -1
    s = strategies.build("pcgrad", alpha=0.0, gamma=1.0)
    d = s([-u], [u])
    suf = statistics.to_numpy(statistics.sufficient([-u], [u], d, strategy=s))[0]
    residual = EPSILON / (1.0 + EPSILON)
    assert -1.01 * residual <= suf[IDX["dr"]] < 0
    assert metrics.derive(suf)["cos_dr"] == pytest.approx(-1.0)
    sh = sh_stats([-u], [u], [s])[0, 0]
    assert -1.01 * residual <= sh[IDX["dr"]] < 0
    # the closed-form <d,d> = ||f||^2 - 2 b <f,r> + b^2 ||r||^2 (b = -c ~ 1) cancels to ~1e-20:
    # it is only known to float64 rounding of its terms (~1e-16), so its value is unreliable
    # (here 0, which makes the shadow cos(d, r) NaN although d != 0 and cos(d, r) = -1)
    assert abs(sh[IDX["dd"]] - suf[IDX["dd"]]) <= 8 * np.finfo(np.float64).eps * 4.0
    # alpha = gamma = 1 and ||r|| = 1e-6 (plausible for one small tensor): <d, r> < 0 and
    # cos(d, r) ~ -1, with no cancellation, in the materialised update and in the closed form
    s = strategies.build("pcgrad")
    f, r = [-u.float()], [1e-6 * u.float()]
    rr, fr = 1e-12, -1e-6
    sh = sh_stats(f, r, [s])[0, 0]
    suf = statistics.to_numpy(statistics.sufficient(f, r, s(f, r), strategy=s))[0]
    for stats in (sh, suf):
        assert stats[IDX["n_projected"]] == 1
        np.testing.assert_allclose(stats[IDX["dr"]], fr * EPSILON / (rr + EPSILON) + rr, rtol=1e-5)
        assert stats[IDX["dr"]] < 0 and metrics.derive(stats)["cos_dr"] < -0.99


# ------------------------------------------------------------------------------------------
# R9: SAGO's surviving parts have disjoint supports
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@PROPERTY
@given(data=st.data(), alpha=weights, gamma=weights)
def test_r9_sago_parts_are_orthogonal(dtype, data, alpha, gamma):
    fs, rs = data.draw(models(dtype))
    s = strategies.build("sago", alpha=alpha, gamma=gamma)
    ds = s(fs, rs)
    eps, tiny = rounding(dtype)
    for f, r, d in zip(fs, rs, ds, strict=True):
        f64, r64, d64 = as64(f), as64(r), as64(d)
        conflict = opposite(f64, r64)
        part_c = np.where(conflict, alpha * r64, 0.0)  # alpha r 1_C
        part_a = np.where(conflict, 0.0, gamma * f64)  # gamma f 1_A
        assert math.fsum(part_c * part_a) == 0.0
        assert not (part_c * part_a).any()
        # the update is exactly these parts (up to rounding to the dtype; alpha and gamma are
        # rounded to it too, by up to tiny / 2 when subnormal, an error that |f| or |r| scales)
        bound = eps * np.abs(part_c + part_a) + tiny * (1.0 + np.abs(f64) + np.abs(r64))
        assert (np.abs(d64 - (part_c + part_a)) <= bound).all()
        # ... so its own restrictions are orthogonal, and |d|^2 = |d_C|^2 + |d_A|^2
        d_c, d_a = np.where(conflict, d64, 0.0), np.where(conflict, 0.0, d64)
        assert math.fsum(d_c * d_a) == 0.0
        # closed form: <d,d> = alpha^2 sum_C r^2 + gamma^2 sum_A f^2, <d,f>, <d,r> likewise
        g = kernels.gram(f, r).numpy()
        _, ff_a, rr_c, _, fr_c, fr_a = g[:6]
        sh = sh_stats([f], [r], [s])[0, 0]
        assert sh[IDX["dd"]] == pytest.approx(alpha**2 * rr_c + gamma**2 * ff_a, rel=1e-12, abs=0)
        assert sh[IDX["dr"]] == pytest.approx(alpha * rr_c + gamma * fr_a, rel=1e-12, abs=0)
        assert sh[IDX["df"]] == pytest.approx(alpha * fr_c + gamma * ff_a, rel=1e-12, abs=0)


# ------------------------------------------------------------------------------------------
# R4 is false: SAGO's cosine with r can be lower than PCGrad's
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "r, f, sago_cos, pcgrad_cos, fires",
    [
        ([1.0, 0.01], [0.01, 1.0], 0.020, 0.714, False),
        ([1.0, 1.0], [100.0, 0.01], 0.707, 0.714, False),
        ([1.0, 1.0], [-1.0, 0.001], 0.708, 0.894, True),
    ],
)
def test_r4_counterexamples(dtype, r, f, sago_cos, pcgrad_cos, fires):
    fs, rs = [torch.tensor(f, dtype=dtype)], [torch.tensor(r, dtype=dtype)]
    names = ("sago", "pcgrad", "pcgrad_global")
    sh = sh_stats(fs, rs, [strategies.build(n) for n in names])
    cos = metrics.derive(sh)["cos_dr"][:, 0]
    assert cos[0] < cos[1]  # the claim cos(d_SAGO, r) >= cos(d_PCGrad, r) fails
    assert cos[0] == pytest.approx(sago_cos, abs=1e-3)
    assert cos[1] == pytest.approx(pcgrad_cos, abs=1e-3)
    assert cos[2] == pytest.approx(cos[1], rel=1e-12)  # one tensor: global == per tensor
    assert sh[1, 0, IDX["n_projected"]] == float(fires)
    # the same verdict from the materialised updates
    for k, name in enumerate(names):
        s = strategies.build(name)
        suf = statistics.sufficient(fs, rs, s(fs, rs), strategy=s)
        got = metrics.derive(statistics.to_numpy(suf))["cos_dr"][0]
        assert got == pytest.approx(cos[k], rel=1e-6)
