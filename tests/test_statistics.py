"""Tests for geomkit.statistics and geomkit.metrics against an independent float64 reference.

The reference below re-implements the strategies of docs/method.md#strategies and the sufficient
statistics of section 2 directly in float64 NumPy, coordinate by coordinate, without the
sign-partitioned Gramian. Counts must match exactly; float sums must match to float64
accumulation error, measured against the magnitudes of the summed terms (so cancellation in
a sum cannot make a correct result look wrong, nor hide a wrong one).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from geomkit import kernels, metrics, statistics, strategies
from geomkit.layers import locate_all
from geomkit.metrics import FIELDS

EPSILON = 1e-10  # the projection denominators' constant, docs/method.md#notation
NAMES = ("sum", "pcgrad", "pcgrad_global", "sago", "sago_prefer_retain", "blur")
WEIGHTS = ((1.0, 1.0), (0.5, 1.0), (1.0, 0.5), (0.0, 1.0), (1.0, 0.0), (0.5, 2.0))
COUNT_FIELDS = ("n_conflict", "n_both_nonzero", "n_opposed", "numel", "n_projected", "n_tensors")
SUM_FIELDS = ("ff", "rr", "fr", "dd", "df", "dr")
IDX = {name: i for i, name in enumerate(FIELDS)}
# sizes: one element, exactly one row, >4096 and not a multiple of it, and more than one CPU
# block of 64K elements with a ragged tail
SIZES = (1, 37, 4096, 2 * 4096 + 5, 2 * 65536 + 123)


# ------------------------------------------------------------------------------------------
# Independent float64 NumPy reference
# ------------------------------------------------------------------------------------------


def as64(t: torch.Tensor) -> np.ndarray:
    """Exact float64 copy of a tensor (every float16/bfloat16/float32 value is exact)."""
    return t.detach().to(torch.float64).reshape(-1).numpy().copy()


def opposite(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """sign(x) * sign(y) < 0, by comparisons (zeros, including -0.0, never oppose)."""
    return ((x > 0) & (y < 0)) | ((x < 0) & (y > 0))


def ref_update(name, alpha, gamma, fs, rs):
    """Materialise a strategy's update in float64.

    Returns ``(ds, fired, terms)``: the per-tensor updates, whether the projection fired per
    tensor, and per-coordinate magnitudes of the terms summed to form ``d`` (a scale for
    rounding-error bounds).
    """
    fr_j = [float(np.sum(f * r)) for f, r in zip(fs, rs, strict=True)]
    rr_j = [float(np.sum(r * r)) for r in rs]
    ff_j = [float(np.sum(f * f)) for f in fs]
    fr_all, rr_all, ff_all = math.fsum(fr_j), math.fsum(rr_j), math.fsum(ff_j)
    ds, fired, terms = [], [], []
    for j, (f, r) in enumerate(zip(fs, rs, strict=True)):
        if name == "sum":
            d, fire, t = gamma * f + alpha * r, 0.0, gamma * abs(f) + alpha * abs(r)
        elif name in ("pcgrad", "pcgrad_global"):
            fr, rr = (fr_j[j], rr_j[j]) if name == "pcgrad" else (fr_all, rr_all)
            c = fr / (rr + EPSILON) if fr < 0 else 0.0
            fp = f - c * r
            d, fire = gamma * fp + alpha * r, float(fr < 0)
            t = gamma * abs(f) + gamma * abs(c * r) + alpha * abs(r)
        elif name in ("sago", "sago_prefer_retain"):
            conflict = opposite(f, r)
            agree = gamma * f + (alpha * r if name == "sago_prefer_retain" else 0.0)
            agree_t = gamma * abs(f) + (alpha * abs(r) if name == "sago_prefer_retain" else 0.0)
            d = np.where(conflict, alpha * r, agree)
            t = np.where(conflict, alpha * abs(r), agree_t)
            fire = 0.0
        elif name == "blur":
            k = fr_all / (ff_all + EPSILON)
            d = gamma * f + alpha * (r - k * f)
            t = gamma * abs(f) + alpha * abs(r) + alpha * abs(k * f)
            fire = 1.0
        else:  # pragma: no cover
            raise AssertionError(name)
        ds.append(d)
        fired.append(fire)
        terms.append(t)
    return ds, fired, terms


def ref_stats(fs, rs, ds, fired, terms=None):
    """Reference statistics rows ``[T, 12]`` and term magnitudes ``[T, 12]`` for tolerances.

    ``terms`` (per-coordinate bounds on |d_i|) replaces |d| in the magnitudes when given.
    """
    rows, mags = [], []
    for f, r, d, fire, t in zip(fs, rs, ds, fired, terms or ds, strict=True):
        row = dict.fromkeys(FIELDS, 0.0)
        row.update(
            ff=np.sum(f * f),
            rr=np.sum(r * r),
            fr=np.sum(f * r),
            dd=np.sum(d * d),
            df=np.sum(d * f),
            dr=np.sum(d * r),
            n_conflict=np.count_nonzero(opposite(f, r)),
            n_both_nonzero=np.count_nonzero((f != 0) & (r != 0)),
            n_opposed=np.count_nonzero(opposite(d, r)),
            numel=f.size,
            n_projected=fire,
            n_tensors=1,
        )
        t = abs(t)
        mag = dict.fromkeys(FIELDS, 0.0)
        mag.update(
            ff=np.sum(f * f),
            rr=np.sum(r * r),
            fr=np.sum(abs(f * r)),
            dd=np.sum(t * t),
            df=np.sum(t * abs(f)),
            dr=np.sum(t * abs(r)),
        )
        rows.append([float(row[k]) for k in FIELDS])
        mags.append([float(mag[k]) for k in FIELDS])
    return np.array(rows), np.array(mags)


def assert_stats(got, want, mag, rtol=1e-12, atol=None, what=""):
    """Counts exactly; sums within ``rtol * magnitude (+ atol)`` of the reference."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    for name in COUNT_FIELDS:
        i = IDX[name]
        np.testing.assert_array_equal(got[..., i], want[..., i], err_msg=f"{what}: {name}")
    for name in SUM_FIELDS:
        i = IDX[name]
        tol = rtol * mag[..., i] + (0.0 if atol is None else atol[..., i])
        err = np.abs(got[..., i] - want[..., i])
        bad = ~(err <= tol)
        assert not bad.any(), (
            f"{what}: field {name} differs beyond tolerance at {np.argwhere(bad).tolist()}: "
            f"got {got[..., i][bad]}, want {want[..., i][bad]}, "
            f"tol {np.broadcast_to(tol, err.shape)[bad]}"
        )


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------

# value ranges (log10 of the magnitude) per dtype: wide, with exact underflow of f_i * r_i
RANGES = {
    torch.float32: (-30, 30),
    torch.bfloat16: (-30, 30),
    torch.float64: (-30, 30),
    torch.float16: (-7, 2),
}
# the smallest magnitude per dtype whose square underflows in that dtype
TINY = {torch.float32: 1e-30, torch.bfloat16: 1e-30, torch.float16: 1e-4, torch.float64: 1e-200}


def _loguniform(rng, n, lo, hi):
    x = np.sign(rng.uniform(-1, 1, n)) * 10.0 ** rng.uniform(lo, hi, n)
    u = rng.uniform(size=n)
    x[u < 0.10] = 0.0
    x[(u >= 0.10) & (u < 0.15)] = -0.0
    return x


def _special(dtype):
    """Coordinate pairs that break naive conflict tests: underflowing products, signed zeros."""
    t = TINY[dtype]
    pairs = [
        (t, -t),
        (-t, t),
        (t, t),
        (-t, -t),
        (-0.0, 1.0),
        (-0.0, -1.0),
        (1.0, -0.0),
        (-1.0, -0.0),
        (-0.0, -0.0),
        (0.0, -0.0),
        (0.0, 0.0),
        (t, -1.0),
        (-1.0, t),
    ]
    return np.array(pairs).T


def make_model(seed, dtype, sizes=SIZES):
    """A list of (forget, retain) tensors of mixed kinds (heavy-tailed, normal, anti-aligned)."""
    rng = np.random.default_rng(seed)
    lo, hi = RANGES[dtype]
    kinds = ("loguniform", "anti", "normal", "special", "loguniform", "zero_f")
    fs, rs = [], []
    for j, n in enumerate(sizes):
        kind = kinds[(j + seed) % len(kinds)]
        if kind == "loguniform":
            f, r = _loguniform(rng, n, lo, hi), _loguniform(rng, n, lo, hi)
        elif kind == "anti":  # <f, r> < 0: the projections fire
            r = rng.standard_normal(n)
            f = -2.0 * r + 0.1 * rng.standard_normal(n)
            f[rng.uniform(size=n) < 0.1] = 0.0
        elif kind == "normal":
            f, r = rng.standard_normal(n), rng.standard_normal(n)
            f[rng.uniform(size=n) < 0.1] = -0.0
        elif kind == "zero_f":
            f, r = np.zeros(n), rng.standard_normal(n)
        else:
            f, r = _loguniform(rng, n, lo, hi), _loguniform(rng, n, lo, hi)
            sf, sr = _special(dtype)
            m = min(n, sf.size)
            f[:m], r[:m] = sf[:m], sr[:m]
        fs.append(torch.from_numpy(f).to(dtype).reshape(_shape(n)))
        rs.append(torch.from_numpy(r).to(dtype).reshape(_shape(n)))
    return fs, rs


def _shape(n):
    """A 2-D shape when one exists (statistics must not care), else 1-D."""
    for k in (7, 5, 3, 2):
        if n % k == 0 and n > k:
            return (k, n // k)
    return (n,)


def rounding(dtype):
    """(unit roundoff bound, absolute underflow bound) of the dtype an update is stored in."""
    info = torch.finfo(dtype)
    return info.eps, info.smallest_normal * info.eps


DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ------------------------------------------------------------------------------------------
# 1. Brute force: sufficient and shadow against the float64 reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha, gamma", [(1.0, 1.0), (0.5, 0.0)])
def test_sufficient_matches_reference(dtype, alpha, gamma):
    fs, rs = make_model(1, dtype)
    f64, r64 = [as64(f) for f in fs], [as64(r) for r in rs]
    for name in NAMES:
        s = strategies.build(name, alpha=alpha, gamma=gamma)
        ds = s(fs, rs)
        got = statistics.to_numpy(statistics.sufficient(fs, rs, ds, strategy=s))
        _, fired, _ = ref_update(name, alpha, gamma, f64, r64)
        d64 = [as64(d) for d in ds]
        want, mag = ref_stats(f64, r64, d64, fired)
        assert_stats(got, want, mag, what=f"sufficient {name} {dtype}")
        # without a strategy, n_projected is 0 and everything else is unchanged
        plain = statistics.to_numpy(statistics.sufficient(fs, rs, ds))
        np.testing.assert_array_equal(plain[:, IDX["n_projected"]], 0.0)
        keep = [i for i in range(len(FIELDS)) if i != IDX["n_projected"]]
        np.testing.assert_array_equal(plain[:, keep], got[:, keep])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shadow_matches_materialised_float64_reference(dtype):
    fs, rs = make_model(2, dtype)
    f64, r64 = [as64(f) for f in fs], [as64(r) for r in rs]
    for alpha, gamma in WEIGHTS:
        strats = [strategies.build(n, alpha=alpha, gamma=gamma) for n in NAMES]
        got = statistics.to_numpy(statistics.shadow(fs, rs, strats))
        assert got.shape == (len(NAMES), len(fs), len(FIELDS))
        for k, name in enumerate(NAMES):
            ds, fired, terms = ref_update(name, alpha, gamma, f64, r64)
            want, mag = ref_stats(f64, r64, ds, fired, terms)
            assert_stats(
                got[k], want, mag, what=f"shadow {name} alpha={alpha} gamma={gamma} {dtype}"
            )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conflict_count_exact_when_product_underflows(dtype):
    t = TINY[dtype]
    f = torch.tensor([t, -t, t, t, -0.0, 1.0, -t], dtype=dtype)
    r = torch.tensor([-t, t, t, -0.0, -1.0, -t, -t], dtype=dtype)
    assert f[0] * r[0] == 0  # the naive product test would miss this conflict
    strats = [strategies.build(n) for n in NAMES]
    sh = statistics.to_numpy(statistics.shadow([f], [r], strats))
    np.testing.assert_array_equal(sh[:, 0, IDX["n_conflict"]], 3.0)
    np.testing.assert_array_equal(sh[:, 0, IDX["n_both_nonzero"]], 5.0)
    s = strategies.build("sum")
    d = torch.tensor([-t, -t, t, 0.0, 1.0, -t, t], dtype=dtype)  # d_i r_i underflows too
    got = statistics.to_numpy(statistics.sufficient([f], [r], [d], strategy=s))[0]
    assert got[IDX["n_conflict"]] == 3
    assert got[IDX["n_both_nonzero"]] == 5
    # d opposes r at 1 (-t vs t), 4 (1 vs -1) and 6 (t vs -t); each product underflows
    assert got[IDX["n_opposed"]] == 3
    # SAGO never opposes r; PCGrad / sum here do, by the exact sign test
    np.testing.assert_array_equal(sh[NAMES.index("sago"), 0, IDX["n_opposed"]], 0.0)


# ------------------------------------------------------------------------------------------
# 2. shadow agrees with the statistics of the materialised update
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha, gamma", [(1.0, 1.0), (0.5, 1.0), (0.0, 1.0), (1.0, 0.0)])
def test_shadow_agrees_with_sufficient_of_materialised_update(dtype, alpha, gamma):
    fs, rs = make_model(3, dtype)
    f64, r64 = [as64(f) for f in fs], [as64(r) for r in rs]
    strats = [strategies.build(n, alpha=alpha, gamma=gamma) for n in NAMES]
    sh = statistics.to_numpy(statistics.shadow(fs, rs, strats))
    eps, tiny = rounding(dtype)
    for k, s in enumerate(strats):
        ds = s(fs, rs)
        assert all(d.dtype == dtype for d in ds)
        suf = statistics.to_numpy(statistics.sufficient(fs, rs, ds, strategy=s))
        ref_d, fired, terms = ref_update(s.name, alpha, gamma, f64, r64)
        # the materialised d_i carries at most a few roundings of its terms (float32 arithmetic,
        # then the storage dtype) plus underflow
        err = [4 * eps * t + 2 * tiny for t in terms]
        _, mag = ref_stats(f64, r64, ref_d, fired, terms)
        atol = np.zeros_like(mag)
        for j, (f, r, t, e) in enumerate(zip(f64, r64, terms, err, strict=True)):
            atol[j, IDX["dd"]] = np.sum(e * (2 * t + e))
            atol[j, IDX["df"]] = np.sum(e * abs(f))
            atol[j, IDX["dr"]] = np.sum(e * abs(r))
        what = f"shadow vs sufficient {s.name} alpha={alpha} gamma={gamma} {dtype}"
        # coordinates whose sign could flip or vanish by rounding may change n_opposed
        ambiguous = np.array(
            [
                np.count_nonzero((abs(d) <= e) & (r != 0))
                for d, e, r in zip(ref_d, err, r64, strict=True)
            ]
        )
        n_opp = IDX["n_opposed"]
        assert np.all(np.abs(sh[k, :, n_opp] - suf[:, n_opp]) <= ambiguous), what
        sh_k = sh[k].copy()
        sh_k[:, n_opp] = suf[:, n_opp]
        assert_stats(sh_k, suf, mag, atol=atol, what=what)
        # n_projected is exactly whether the projection fired
        np.testing.assert_array_equal(suf[:, IDX["n_projected"]], fired, err_msg=what)
        np.testing.assert_array_equal(sh[k, :, IDX["n_projected"]], fired, err_msg=what)


def test_n_projected_semantics():
    # tensor 0: <f,r> < 0 on its own; tensor 1: > 0; model total > 0
    fs = [torch.tensor([1.0, -1.0]), torch.tensor([10.0, 10.0])]
    rs = [torch.tensor([-1.0, 0.5]), torch.tensor([1.0, 1.0])]
    strats = [strategies.build(n) for n in NAMES]
    sh = statistics.to_numpy(statistics.shadow(fs, rs, strats))[..., IDX["n_projected"]]
    want = {
        "sum": [0, 0],
        "pcgrad": [1, 0],
        "pcgrad_global": [0, 0],
        "sago": [0, 0],
        "sago_prefer_retain": [0, 0],
        "blur": [1, 1],
    }
    for k, name in enumerate(NAMES):
        np.testing.assert_array_equal(sh[k], want[name], err_msg=name)
        s = strats[k]
        suf = statistics.to_numpy(statistics.sufficient(fs, rs, s(fs, rs), strategy=s))
        np.testing.assert_array_equal(suf[:, IDX["n_projected"]], want[name], err_msg=name)
    # model total < 0: global PCGrad fires for every tensor, including the one with <f,r> > 0
    rs2 = [torch.tensor([-100.0, 0.5]), torch.tensor([1.0, 1.0])]
    sh2 = statistics.to_numpy(statistics.shadow(fs, rs2, strats))[..., IDX["n_projected"]]
    np.testing.assert_array_equal(sh2[NAMES.index("pcgrad_global")], [1, 1])
    np.testing.assert_array_equal(sh2[NAMES.index("pcgrad")], [1, 0])


# ------------------------------------------------------------------------------------------
# 3. Exact aggregation
# ------------------------------------------------------------------------------------------

PARAM_NAMES = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
)
PARAM_SIZES = (300, 64, 64, 4096 + 17, 64, 128, 128, 1, 300)
DERIVED = (
    "cos_fr",
    "cos_dr",
    "cos_df",
    "norm_f",
    "norm_r",
    "norm_d",
    "norm_ratio",
    "conflict_rate",
    "conflict_rate_nonzero",
    "opposed_rate",
)


def _groupings():
    locs = locate_all(PARAM_NAMES)
    return {
        "layer": [loc.layer for loc in locs],
        "module": [loc.module for loc in locs],
        "component": [loc.component for loc in locs],
        "model": ["model"] * len(locs),
    }


def _concat_stats(fs, rs, ds, members):
    cat = lambda xs: torch.cat([xs[j].reshape(-1) for j in members])  # noqa: E731
    return statistics.to_numpy(statistics.sufficient([cat(fs)], [cat(rs)], [cat(ds)]))[0]


def _assert_derived_equal(got, want, what):
    for key in DERIVED:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=0, err_msg=f"{what} {key}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_aggregate_then_derive_equals_concatenated(name, dtype):
    fs, rs = make_model(4, dtype, PARAM_SIZES)
    s = strategies.build(name, alpha=0.5, gamma=1.0)
    ds = s(fs, rs)
    per_tensor = statistics.to_numpy(statistics.sufficient(fs, rs, ds, strategy=s))
    fired = per_tensor[:, IDX["n_projected"]]
    for grouping, labels in _groupings().items():
        names, grouped = metrics.aggregate(per_tensor, labels)
        assert names == list(dict.fromkeys(labels))
        got = metrics.derive(grouped)
        for g, label in enumerate(names):
            members = [j for j, lab in enumerate(labels) if lab == label]
            want = metrics.derive(_concat_stats(fs, rs, ds, members))
            _assert_derived_equal({k: v[g] for k, v in got.items()}, want, f"{grouping}={label}")
            assert got["projected_fraction"][g] == np.mean(fired[members])
            assert grouped[g, IDX["n_tensors"]] == len(members)
            assert grouped[g, IDX["numel"]] == sum(fs[j].numel() for j in members)


def test_shadow_aggregates_like_concatenation():
    """Rules without a scope (and global rules at model level) give the same statistics on the
    concatenated group as the sum of their per-tensor shadow rows."""
    fs, rs = make_model(5, torch.float32, PARAM_SIZES)
    strats = [strategies.build(n, alpha=1.0, gamma=0.5) for n in NAMES]
    sh = statistics.to_numpy(statistics.shadow(fs, rs, strats))
    for grouping, labels in _groupings().items():
        names, grouped = metrics.aggregate(sh, labels)  # [S, G, 12]
        assert grouped.shape == (len(NAMES), len(names), len(FIELDS))
        for g, label in enumerate(names):
            members = [j for j, lab in enumerate(labels) if lab == label]
            cat = [torch.cat([x[j].reshape(-1) for j in members]) for x in (fs, rs)]
            whole = statistics.to_numpy(statistics.shadow([cat[0]], [cat[1]], strats))[:, 0]
            for k, name in enumerate(NAMES):
                if name in ("pcgrad",) and len(members) > 1:
                    continue  # per-tensor projection differs from a projection of the group
                if name in ("pcgrad_global", "blur") and grouping != "model":
                    continue
                what = f"{name} {grouping}={label}"
                _assert_derived_equal(
                    {key: v[k, g] for key, v in metrics.derive(grouped).items()},
                    metrics.derive(whole[k]),
                    what,
                )
    # the default tensor axis is -2; a step axis in front is fine too
    steps = np.stack([sh[0], sh[1]])  # [2 steps, T, 12]
    _, by_model = metrics.aggregate(steps, ["m"] * len(fs))
    np.testing.assert_allclose(by_model[:, 0], steps.sum(axis=1), rtol=1e-14, atol=0)
    _, by_axis = metrics.aggregate(np.moveaxis(steps, 1, 0), ["m"] * len(fs), axis=0)
    np.testing.assert_allclose(by_axis[0], steps.sum(axis=1), rtol=1e-14, atol=0)


def test_cosines_are_nan_for_zero_gradients_and_never_raise():
    fs = [torch.zeros(5), torch.zeros(2, 3)]
    rs = [torch.randn(5, generator=torch.Generator().manual_seed(0)), torch.ones(2, 3)]
    strats = [strategies.build(n) for n in NAMES]
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        sh = statistics.to_numpy(statistics.shadow(fs, rs, strats))
        out = metrics.derive(sh)
        _, model = metrics.aggregate(sh, [0, 0])
        model_out = metrics.derive(model)
        zero = metrics.derive(np.zeros(len(FIELDS)))  # nothing at all: every ratio undefined
    for result in (out, model_out):
        assert np.isnan(result["cos_fr"]).all()
        assert np.isnan(result["cos_df"]).all()
        np.testing.assert_array_equal(result["norm_f"], 0.0)
        np.testing.assert_array_equal(result["norm_ratio"], 0.0)
        np.testing.assert_array_equal(result["conflict_rate"], 0.0)
        assert np.isnan(result["conflict_rate_nonzero"]).all()  # no coordinate is nonzero in both
    # SAGO keeps gamma * f = 0 everywhere (no conflicts): d = 0, cos(d, r) undefined
    assert np.isnan(out["cos_dr"][NAMES.index("sago")]).all()
    assert np.isnan(model_out["cos_dr"][NAMES.index("sago")]).all()
    np.testing.assert_array_equal(out["norm_d"][NAMES.index("sago")], 0.0)
    # the others keep alpha * r (nothing to project when <f, r> = 0): cos(d, r) = 1
    for name in ("sum", "pcgrad", "pcgrad_global", "blur", "sago_prefer_retain"):
        np.testing.assert_allclose(out["cos_dr"][NAMES.index(name)], 1.0, rtol=1e-12)
    for key, value in zero.items():
        if key.startswith(("cos", "conflict", "opposed", "projected", "norm_ratio", "u_opposes")):
            assert np.isnan(value), key
        else:
            assert value == 0.0, key
    assert set(out) == set(metrics.METRICS)


def test_aggregate_and_derive_errors():
    stats = np.zeros((3, len(FIELDS)))
    with pytest.raises(ValueError, match=r"groups has 2 labels but the statistics have 3 tensors"):
        metrics.aggregate(stats, ["a", "b"])
    with pytest.raises(ValueError, match=r"groups has 4 labels"):
        metrics.aggregate(stats, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"invalid axis=1: expected the tensor axis"):
        metrics.aggregate(stats, ["a"] * len(FIELDS), axis=-1)
    n = len(FIELDS)
    with pytest.raises(
        ValueError, match=rf"invalid statistics of shape \(3, {n - 1}\): expected {n} fields"
    ):
        metrics.derive(np.zeros((3, n - 1)))
    with pytest.raises(ValueError, match=r"ff, rr, fr, dd, df, dr"):
        metrics.derive(np.zeros(n + 1))
    with pytest.raises(KeyError, match="invalid field='cos': expected one of ff"):
        metrics.field(stats, "cos")


def test_input_errors_name_the_offending_argument():
    one = [torch.ones(3)]
    with pytest.raises(
        ValueError,
        match=r"invalid retain\[0\].*expected the shape, dtype and device of forget\[0\]",
    ):
        statistics.sufficient(one, [torch.ones(4)], one)
    # a mismatched update must be reported as `combined`, not as `retain`
    for bad in ([torch.ones(4)], [torch.ones(3, dtype=torch.float64)]):
        with pytest.raises(ValueError, match=r"combined\[0\]"):
            statistics.sufficient(one, one, bad)
    with pytest.raises(ValueError, match=r"got 1 forget and 2 combined tensors"):
        statistics.sufficient(one, one, one + one)
    with pytest.raises(ValueError, match="strategies is empty"):
        statistics.shadow(one, one, [])
    with pytest.raises(
        TypeError, match="invalid strategies='sago': expected geomkit Strategy objects, got str"
    ):
        statistics.shadow(one, one, ["sago"])


# ------------------------------------------------------------------------------------------
# 4. One host transfer
# ------------------------------------------------------------------------------------------


def _forbid_host_sync(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("host synchronisation while computing statistics")

    for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, attr, refuse)


def test_statistics_single_tensor_without_host_sync(monkeypatch):
    fs, rs = make_model(6, torch.float32, (1, 4096 * 2 + 5, 300))
    strats = [strategies.build(n, alpha=0.5, gamma=1.0) for n in NAMES]
    updates = [s(fs, rs) for s in strats]
    # as on an accelerator: the CPU's free finiteness check is off
    monkeypatch.setattr(kernels, "HOST_READ_FREE", set())
    with monkeypatch.context() as patch:
        _forbid_host_sync(patch)
        probe = torch.ones(2)
        for call in (probe.item, probe.tolist, lambda: bool(probe[0]), lambda: float(probe[0])):
            with pytest.raises(AssertionError, match="host synchronisation"):
                call()
        sh = statistics.shadow(fs, rs, strats)
        sufs = [
            statistics.sufficient(fs, rs, d, strategy=s)
            for s, d in zip(strats, updates, strict=True)
        ]
        # the strategies themselves do not synchronise either
        again = [s(fs, rs) for s in strats]
    assert isinstance(sh, torch.Tensor)
    assert sh.dtype == torch.float64 and sh.shape == (len(NAMES), len(fs), len(FIELDS))
    assert sh.device == fs[0].device
    for suf in sufs:
        assert isinstance(suf, torch.Tensor)
        assert suf.dtype == torch.float64 and suf.shape == (len(fs), len(FIELDS))
    for a, b in zip(updates, again, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    host = statistics.to_numpy(sh)
    assert isinstance(host, np.ndarray) and host.dtype == np.float64
    np.testing.assert_array_equal(host, sh.numpy())


def test_statistics_are_device_agnostic_on_meta():
    """On the meta device any host read raises: the whole computation is traceable."""
    fs = [torch.empty(10, device="meta"), torch.empty(3, 4096 + 1, device="meta")]
    rs = [torch.empty(10, device="meta"), torch.empty(3, 4096 + 1, device="meta")]
    strats = [strategies.build(n) for n in NAMES]
    sh = statistics.shadow(fs, rs, strats)
    assert sh.device.type == "meta" and sh.shape == (len(NAMES), 2, len(FIELDS))
    for s in strats:
        suf = statistics.sufficient(fs, rs, s(fs, rs), strategy=s)
        assert suf.device.type == "meta" and suf.shape == (2, len(FIELDS))


# ------------------------------------------------------------------------------------------
# 5. Backends
# ------------------------------------------------------------------------------------------


def test_compiled_backend_matches_eager():
    fs, rs = make_model(7, torch.float32, (2 * 4096 + 5, 1, 300))
    strats = [strategies.build(n, alpha=0.5, gamma=1.0) for n in NAMES]
    updates = [s(fs, rs) for s in strats]  # formed eagerly: only the reductions are compared
    assert kernels.get_backend() == "eager"
    eager_sh = statistics.to_numpy(statistics.shadow(fs, rs, strats))
    eager_suf = [
        statistics.to_numpy(statistics.sufficient(fs, rs, d, strategy=s))
        for s, d in zip(strats, updates, strict=True)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a silent fallback to eager fails
        with kernels.use_backend("compiled"):
            assert kernels.get_backend() == "compiled"
            comp_sh = statistics.to_numpy(statistics.shadow(fs, rs, strats))
            comp_suf = [
                statistics.to_numpy(statistics.sufficient(fs, rs, d, strategy=s))
                for s, d in zip(strats, updates, strict=True)
            ]
    assert kernels.get_backend() == "eager"
    assert not kernels.compile_failed()
    f64, r64 = [as64(f) for f in fs], [as64(r) for r in rs]
    for k, s in enumerate(strats):
        _, _, terms = ref_update(s.name, 0.5, 1.0, f64, r64)
        _, mag = ref_stats(f64, r64, [as64(d) for d in updates[k]], [0.0] * len(fs), terms)
        assert_stats(comp_sh[k], eager_sh[k], mag, rtol=1e-12, what=f"compiled shadow {s.name}")
        _, mag = ref_stats(f64, r64, [as64(d) for d in updates[k]], [0.0] * len(fs))
        assert_stats(comp_suf[k], eager_suf[k], mag, rtol=1e-12, what=f"compiled {s.name}")
        np.testing.assert_allclose(comp_suf[k], eager_suf[k], rtol=1e-12, atol=0)
