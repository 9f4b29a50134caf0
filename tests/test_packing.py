"""The packed (batched) eager kernels equal the per-tensor kernels and a float64 reference.

``geomkit.kernels.gram_batch``, ``linear_moments_batch`` and ``triple_batch`` pack many tensors
into row-aligned, zero-padded float64 chunks (pieces of large tensors, several small tensors
together) and add per-row sums up per tensor. These tests cut the chunks small so that tensors
straddle chunks and share them, and check every field against sums formed here in float64 with
a correctly rounded sum (``math.fsum``), counts exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geomkit import kernels, statistics, strategies
from geomkit.statistics import _formula_checks

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _as64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).reshape(-1).numpy()


def _fsum(x: np.ndarray) -> float:
    return math.fsum(x.tolist())


def _opposite(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return ((x > 0) & (y < 0)) | ((x < 0) & (y > 0))


def _ref_gram(f: np.ndarray, r: np.ndarray) -> tuple[list[float], list[float]]:
    c = _opposite(f, r)
    a = ~c
    vals = [
        _fsum(f[c] * f[c]),
        _fsum(f[a] * f[a]),
        _fsum(r[c] * r[c]),
        _fsum(r[a] * r[a]),
        _fsum(f[c] * r[c]),
        _fsum(f[a] * r[a]),
        float(np.count_nonzero(c)),
        float(np.count_nonzero((f != 0) & (r != 0))),
    ]
    mags = [abs(v) for v in vals[:4]] + [_fsum(abs(f[c] * r[c])), _fsum(abs(f[a] * r[a]))]
    return vals, [*mags, 0.0, 0.0]


def _ref_moments(f, r, coefficients) -> tuple[np.ndarray, np.ndarray]:
    rows, mags = [], []
    for a, b in coefficients:
        d = a * f + b * r
        t = abs(a * f) + abs(b * r)  # |d_i| before cancellation
        e = a * (f * r) + b * (r * r)
        rows.append(
            [
                float(np.count_nonzero(e < 0)),
                _fsum(d * d),
                _fsum(d * f),
                _fsum(d * r),
                _fsum(abs(d * r)),
            ]
        )
        mags.append([0.0, _fsum(t * t), _fsum(t * abs(f)), _fsum(t * abs(r)), _fsum(t * abs(r))])
    return np.array(rows), np.array(mags)


def _ref_triple(f, r, d) -> tuple[np.ndarray, np.ndarray]:
    vals = [
        _fsum(f * f),
        _fsum(r * r),
        _fsum(f * r),
        _fsum(d * d),
        _fsum(d * f),
        _fsum(d * r),
        float(np.count_nonzero(_opposite(f, r))),
        float(np.count_nonzero((f != 0) & (r != 0))),
        float(np.count_nonzero(_opposite(d, r))),
        _fsum(abs(d * r)),
        0.0,
    ]
    mags = [
        _fsum(f * f),
        _fsum(r * r),
        _fsum(abs(f * r)),
        _fsum(d * d),
        _fsum(abs(d * f)),
        _fsum(abs(d * r)),
        0,
        0,
        0,
        _fsum(abs(d * r)),
        0,
    ]
    return np.array(vals), np.array(mags, dtype=np.float64)


def _close(got, want, mag, what: str) -> None:
    got, want, mag = (np.asarray(x, dtype=np.float64) for x in (got, want, mag))
    tol = 1e-12 * mag
    bad = ~(np.abs(got - want) <= tol)
    assert not bad.any(), f"{what}: got {got[bad]}, want {want[bad]}, tol {tol[bad]}"


def _tensors(seed: int, dtype: torch.dtype, sizes) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    fs, rs = [], []
    for n in sizes:
        f = torch.randn(n, generator=g, dtype=torch.float64)
        r = torch.randn(n, generator=g, dtype=torch.float64) - 0.3 * f
        if n > 4:  # exact zeros in both and in one of them
            f[::5] = 0.0
            r[1::7] = 0.0
        fs.append(f.to(dtype))
        rs.append(r.to(dtype))
    return fs, rs


@pytest.fixture(params=[512, 1 << 16], ids=["small-chunks", "default-chunks"])
def chunk(request, monkeypatch):
    """Tiny chunks (two rows) so that tensors straddle chunks, or the CPU default."""
    monkeypatch.setitem(kernels._CHUNK_ELEMENTS, "cpu", request.param)
    return request.param


# empty, one element, less than a row, exactly one row, ragged multi-row, several chunks
SIZES = (0, 1, 37, 256, 2 * 256 + 5, 0, 3000, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gram_batch_matches_reference_and_per_tensor(dtype, chunk):
    fs, rs = _tensors(1, dtype, SIZES)
    got = kernels.gram_batch(fs, rs).numpy()
    assert got.shape == (len(SIZES), len(kernels.GRAM_FIELDS))
    for j, (f, r) in enumerate(zip(fs, rs, strict=True)):
        want, mag = _ref_gram(_as64(f), _as64(r))
        _close(got[j], want, mag, f"gram tensor {j} {dtype}")
        _close(got[j], kernels.gram(f, r).numpy(), mag, f"gram per tensor {j} {dtype}")
    assert np.all(got[[0, 5]] == 0.0)  # empty tensors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_moments_batch_matches_reference_and_per_tensor(dtype, chunk):
    fs, rs = _tensors(2, dtype, SIZES)
    g = torch.Generator().manual_seed(3)
    coefficients = torch.randn(len(fs), 3, 2, generator=g, dtype=torch.float64)
    coefficients[:, 0] = torch.tensor([1.0, 1.0])  # the sum
    coefficients[:, 1, 1] = 0.0  # b = 0: d = a f
    got = kernels.linear_moments_batch(fs, rs, coefficients).numpy()
    assert got.shape == (len(fs), 3, len(kernels.MOMENT_FIELDS))
    for j, (f, r) in enumerate(zip(fs, rs, strict=True)):
        want, mag = _ref_moments(_as64(f), _as64(r), coefficients[j].numpy())
        _close(got[j], want, mag, f"moments tensor {j} {dtype}")
        per = kernels.linear_moments(f, r, coefficients[j]).numpy()
        _close(got[j], per, mag, f"moments per tensor {j} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triple_batch_matches_reference_and_per_tensor(dtype, chunk):
    fs, rs = _tensors(4, dtype, SIZES)
    sago = strategies.build("sago", alpha=0.5)
    ds = sago(fs, rs)
    got = kernels.triple_batch(fs, rs, ds).numpy()
    for j, (f, r, d) in enumerate(zip(fs, rs, ds, strict=True)):
        want, mag = _ref_triple(_as64(f), _as64(r), _as64(d))
        _close(got[j], want, mag, f"triple tensor {j} {dtype}")
        _close(got[j], kernels.triple(f, r, d).numpy(), mag, f"triple per tensor {j}")


@pytest.mark.parametrize("name", ["sum", "pcgrad", "blur", "sago"])
def test_triple_batch_checks_equal_per_tensor(name, chunk):
    fs, rs = _tensors(5, torch.bfloat16, SIZES)
    s = strategies.build(name, alpha=0.5)
    ds = s(fs, rs)
    ds[6][::3] += 1.0  # off the strategy's formula: counted by n_unrounded
    rows = statistics.sufficient(fs, rs, ds, strategy=s)

    checks, _ = _formula_checks(s, fs, rs, None)
    per = torch.stack(
        [kernels.triple(f, r, d, c) for f, r, d, c in zip(fs, rs, ds, checks, strict=True)]
    )
    batch = kernels.triple_batch(fs, rs, ds, checks)
    unrounded = kernels.TRIPLE_FIELDS.index("n_unrounded")
    assert torch.equal(batch[:, unrounded], per[:, unrounded])
    assert batch[6, unrounded] > 0 and batch[[0, 1, 2, 3, 4, 5, 7], unrounded].sum() == 0
    from geomkit.metrics import field

    np.testing.assert_array_equal(field(rows, "n_unrounded"), batch[:, unrounded].numpy())


def test_mixed_dtypes_keep_tensor_order(chunk):
    """Tensors of several dtypes in one list are packed per dtype and returned in order."""
    fs, rs = [], []
    for k, dtype in enumerate((torch.float32, torch.float64, torch.bfloat16, torch.float32)):
        f, r = _tensors(10 + k, dtype, (300 + k,))
        fs += f
        rs += r
    got = kernels.gram_batch(fs, rs)
    want = torch.stack([kernels.gram(f, r) for f, r in zip(fs, rs, strict=True)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    coefficients = torch.randn(len(fs), 2, 2, dtype=torch.float64)
    got = kernels.linear_moments_batch(fs, rs, coefficients)
    want = torch.stack(
        [kernels.linear_moments(f, r, c) for f, r, c in zip(fs, rs, coefficients, strict=True)]
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_magnitudes_and_zeros(dtype, chunk):
    info = torch.finfo(dtype)
    big, tiny = info.max**0.5 / 4 if dtype == torch.float64 else info.max, info.tiny / 4
    f = torch.tensor([big, -big, tiny, -tiny, 0.0, -0.0, 1.0, tiny, big], dtype=dtype)
    r = torch.tensor([-1.0, -tiny, tiny, tiny, -1.0, 1.0, -0.0, -big, big], dtype=dtype)
    zeros = torch.zeros(700, dtype=dtype)
    fs, rs = [f, zeros, f[:1]], [r, zeros, r[:1]]
    got = kernels.gram_batch(fs, rs).numpy()
    for j, (a, b) in enumerate(zip(fs, rs, strict=True)):
        want, mag = _ref_gram(_as64(a), _as64(b))
        _close(got[j], want, mag, f"extreme gram {j} {dtype}")
    assert np.all(got[1] == 0.0)
    coefficients = torch.tensor([[[1.0, 1.0], [0.5, -2.0]]] * 3, dtype=torch.float64)
    got = kernels.linear_moments_batch(fs, rs, coefficients).numpy()
    for j, (a, b) in enumerate(zip(fs, rs, strict=True)):
        want, mag = _ref_moments(_as64(a), _as64(b), coefficients[j].numpy())
        if dtype == torch.float64:  # products may underflow: the sign comparisons decide
            d = [x * _as64(a) + y * _as64(b) for x, y in coefficients[j].numpy()]
            want[:, 0] = [np.count_nonzero(_opposite(v, _as64(b))) for v in d]
        _close(got[j], want, mag, f"extreme moments {j} {dtype}")


def test_empty_lists_are_rejected():
    with pytest.raises(ValueError, match="forget is empty"):
        kernels.gram_batch([], [])


def test_cancelling_update_has_a_non_negative_exact_norm(chunk):
    """PCGrad with alpha = 0 on f = 3 r leaves only rounding noise in d: <d,d> is summed
    directly (never a difference of large sums), so it stays non-negative and equals the float64
    sum of the same d_i^2."""
    g = torch.Generator().manual_seed(11)
    r = torch.randn(1500, generator=g, dtype=torch.float64) * 2.0**14
    f = 3 * r
    pcgrad = strategies.build("pcgrad", alpha=0.0)
    rows = statistics.shadow([f], [r], [pcgrad]).numpy()
    a, b = pcgrad.linear_form(torch.stack([f @ f, r @ r, f @ r]))[:2].tolist()
    d = a * _as64(f) + b * _as64(r)  # the same float64 operations as the kernel
    want = _fsum(d * d)
    dd = rows[0, 0, statistics.FIELDS.index("dd")]
    assert dd >= 0.0 and want > 0.0
    _close([dd], [want], [want], "dd of a cancelling update")


def test_empty_groups_give_zero_rows(chunk):
    """A (device, dtype) group of empty tensors only (an empty shard) adds nothing."""
    fs = [torch.zeros(0), torch.ones(3, dtype=torch.float16)]
    rs = [torch.zeros(0), -torch.ones(3, dtype=torch.float16)]
    assert torch.equal(kernels.gram_batch(fs, rs)[0], torch.zeros(len(kernels.GRAM_FIELDS)))
    moments = kernels.linear_moments_batch(fs, rs, torch.ones(2, 1, 2, dtype=torch.float64))
    assert torch.equal(moments[0], torch.zeros_like(moments[0]))
    assert kernels.triple_batch(fs, rs, fs)[1, 6] == 3.0  # n_conflict of the float16 tensor


@pytest.mark.parametrize("checked", [True, False], ids=["cpu-fast-checked", "selection"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_values_stay_in_their_part(dtype, chunk, checked, monkeypatch):
    """inf / NaN land in their own part's sums, as in gram(): through the CPU's arithmetic split
    with its finiteness check, and through the selection that accelerators run directly."""
    monkeypatch.setattr(kernels, "HOST_READ_FREE", {"cpu"} if checked else set())
    inf, nan = float("inf"), float("nan")
    small = ([1.0, inf, -2.0, 0.5], [1.0, 1.0, 1.0, -1.0])  # inf on A
    cases = [small, ([1.0, -inf, 3.0], [2.0, 1.0, 0.0]), ([nan, 1.0, -1.0], [1.0, -inf, 2.0])]
    for f_values, r_values in cases:
        f = [torch.tensor(f_values, dtype=dtype)]
        r = [torch.tensor(r_values, dtype=dtype)]
        want = kernels.gram(f[0], r[0])
        torch.testing.assert_close(kernels.gram_batch(f, r)[0], want, equal_nan=True)
    # a flat (large) tensor next to a finite one: only its own row is affected
    g = torch.Generator().manual_seed(3)
    big_f, big_r = torch.randn(5000, generator=g), torch.randn(5000, generator=g)
    big_f[[10, 4000]] = torch.tensor([inf, -inf])  # one on C or A each, whatever the signs
    big_r[77] = nan
    f = [big_f.to(dtype), torch.randn(300, generator=g).to(dtype)]
    r = [big_r.to(dtype), torch.randn(300, generator=g).to(dtype)]
    want = torch.stack([kernels.gram(a, b) for a, b in zip(f, r, strict=True)])
    got = kernels.gram_batch(f, r)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-12, atol=0.0)
    assert torch.isfinite(got[1]).all()


def test_sums_do_not_depend_on_the_thread_count():
    """The chunks fix the order of the float64 sums: 1 and 2 threads agree to the last bit."""
    g = torch.Generator().manual_seed(5)
    f, r = [torch.randn(300_000, generator=g)], [torch.randn(300_000, generator=g)]
    coefficients = torch.tensor([[[1.0, -0.3], [0.5, 2.0]]], dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(
                (kernels.gram_batch(f, r), kernels.linear_moments_batch(f, r, coefficients))
            )
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


def test_overflowing_products_give_an_infinite_abs_sum_as_per_tensor(chunk):
    """sum |d_i r_i| is inf, not inf - inf = NaN, when d_i r_i overflows to -inf (float64
    gradients near 1e300): packed and per-tensor kernels agree."""
    f = [torch.tensor([1e300, 1.0], dtype=torch.float64)]
    r = [torch.tensor([-1e300, 2.0], dtype=torch.float64)]
    coefficients = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    packed = kernels.linear_moments_batch(f, r, coefficients)[0]
    torch.testing.assert_close(packed, kernels.linear_moments(f[0], r[0], coefficients[0]))
    assert packed[0, 4] == math.inf
    triple = kernels.triple_batch(f, r, f)[0]
    torch.testing.assert_close(triple, kernels.triple(f[0], r[0], f[0]))
