"""CUDA tests (marker ``cuda``; skipped without a CUDA device, see ``conftest.py``).

Run them with ``python -m pytest -m cuda tests/test_cuda.py`` (``benchmarks/gpu_check.py`` does,
docs/gpu.md). They reuse the CPU tests' helpers and the float64 references:

1. strategies in bfloat16, float16 and float32 on CUDA against ``tests/reference.py``, and
   against the same call on the CPU: the element-wise kernels are the same sequence of IEEE
   operations on every device (:mod:`geomkit.kernels`), so rules without a projection (sum,
   SAGO) are bit-identical to the CPU; the projection rules take a scalar coefficient from
   float64 reductions, which agree to float64 rounding, so they agree to one rounding of the
   dtype;
2. statistics (``sufficient`` and ``shadow``) on CUDA against the float64 reference, and equal to
   the CPU's to float64 rounding (counts exactly);
3. the engine in bfloat16 on a tiny Llama on CUDA: steps, recording every step with all six
   strategies, the recorded geometry against a float32 CPU reference of the same weights, and
   the theorem audit of the recorded run gates nothing;
4. the compiled backend on CUDA (last, since Triton compiles are slow): element-wise kernels
   bit-identical to eager, reductions equal to float64 rounding, an engine run with it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import torch
from test_statistics import IDX as STAT_IDX
from test_statistics import as64, assert_stats, make_model, ref_stats, ref_update
from test_strategies import (
    NAMES,
    WEIGHTS,
    assert_bitwise_equal,
    assert_matches_reference,
    random_pair,
)

import geomkit
from geomkit import kernels, statistics, theory
from geomkit.fields import STEP_FIELDS
from geomkit.strategies import build

pytestmark = pytest.mark.cuda

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ELEMENTWISE_ONLY = ("sum", "sago", "sago_prefer_retain")
"""Rules whose update involves no reduction: bit-identical on every device."""
SEQ = 12


def cuda(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Fresh copies on the CUDA device."""
    return [t.to("cuda", copy=True) for t in tensors]


def cpu(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.to("cpu") for t in tensors]


def assert_within_one_rounding(
    got: torch.Tensor, want: torch.Tensor, allowance: np.ndarray, what: str
) -> None:
    """``|got - want| <= eps(dtype) (|want| + a) + a + smallest subnormal`` element by element,
    with ``a`` twice the reference's allowance for the projection coefficients' float64
    rounding (:func:`reference.error_scale`): both devices' coefficients lie within it."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    info = torch.finfo(want.dtype)
    g, w = got.double().numpy(), want.double().numpy()
    a = 2 * allowance
    bound = info.eps * (np.abs(w) + a) + a + info.tiny * info.eps
    bad = ~(np.abs(g - w) <= bound)
    assert not bad.any(), f"{what}: {int(bad.sum())} element(s) differ by more than one rounding"


# ============================================================================================
# 1. Strategies
# ============================================================================================


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_strategy_on_cuda_matches_reference_and_cpu(name, dtype):
    for seed in (0, 1):  # even seeds: the global PCGrad test fires; odd: it does not
        forget, retain = random_pair(seed, dtype)
        forget_gpu, retain_gpu = cuda(forget), cuda(retain)
        for alpha, gamma in WEIGHTS:
            strategy = build(name, alpha=alpha, gamma=gamma)
            result = strategy(forget_gpu, retain_gpu)
            assert all(d.device.type == "cuda" and d.dtype == dtype for d in result)
            on_host = cpu(result)
            assert_matches_reference(name, forget, retain, alpha, gamma, on_host)
            expected = strategy(forget, retain)
            as_np = [[t.double().numpy() for t in ts] for ts in (forget, retain)]
            _, allowances = ref.error_scale(name, *as_np, alpha=alpha, gamma=gamma)
            for j, (got, want) in enumerate(zip(on_host, expected, strict=True)):
                what = f"{name} {dtype} seed={seed} alpha={alpha} gamma={gamma} tensor {j}"
                if name in ELEMENTWISE_ONLY:
                    assert_bitwise_equal(got, want)
                else:
                    assert_within_one_rounding(got, want, allowances[j], what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_strategy_on_cuda_writes_in_place_over_an_input(name, dtype):
    # The engine may form the update over one of the two gradient buffers (out= an input).
    forget, retain = random_pair(15, dtype, [(3, 4099), (7,), ()])
    strategy = build(name, alpha=0.5, gamma=2.0)
    expected = strategy(cuda(forget), cuda(retain))
    for target in ("forget", "retain"):
        f, r = cuda(forget), cuda(retain)
        out = f if target == "forget" else r
        result = strategy(f, r, out=out)
        for d, o, e in zip(result, out, expected, strict=True):
            assert d is o
            assert_bitwise_equal(d, e)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["sago", "sago_prefer_retain"])
def test_sago_never_opposes_retain_on_cuda(name, dtype):
    forget, retain = random_pair(3, dtype)
    for alpha, gamma in WEIGHTS:
        result = build(name, alpha=alpha, gamma=gamma)(cuda(forget), cuda(retain))
        for d, r in zip(result, cuda(retain), strict=True):
            assert not bool((((d > 0) & (r < 0)) | ((d < 0) & (r > 0))).any())


# ============================================================================================
# 2. Statistics
# ============================================================================================


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha, gamma", [(1.0, 1.0), (0.5, 0.0), (0.5, 2.0)])
def test_statistics_on_cuda_match_reference_and_cpu(dtype, alpha, gamma):
    fs, rs = make_model(1, dtype)
    fs_gpu, rs_gpu = cuda(fs), cuda(rs)
    f64, r64 = [as64(f) for f in fs], [as64(r) for r in rs]
    strats = [build(n, alpha=alpha, gamma=gamma) for n in NAMES]
    # shadow: every rule's moments from (f, r) alone
    shadow_gpu = statistics.shadow(fs_gpu, rs_gpu, strats)
    assert shadow_gpu.device.type == "cuda" and shadow_gpu.dtype == torch.float64
    got = statistics.to_numpy(shadow_gpu)
    on_cpu = statistics.to_numpy(statistics.shadow(fs, rs, strats))
    for k, name in enumerate(NAMES):
        ds, fired, terms = ref_update(name, alpha, gamma, f64, r64)
        want, mag = ref_stats(f64, r64, ds, fired, terms)
        what = f"shadow {name} alpha={alpha} gamma={gamma} {dtype}"
        assert_stats(got[k], want, mag, what=f"{what} (CUDA vs reference)")
        assert_stats(got[k], on_cpu[k], mag, what=f"{what} (CUDA vs CPU)")
    # sufficient: the statistics of an update formed on CUDA, measured on CUDA
    for s in strats:
        ds_gpu = s(fs_gpu, rs_gpu)
        got = statistics.to_numpy(statistics.sufficient(fs_gpu, rs_gpu, ds_gpu, strategy=s))
        d64 = [as64(d.cpu()) for d in ds_gpu]
        _, fired, _ = ref_update(s.name, alpha, gamma, f64, r64)
        want, mag = ref_stats(f64, r64, d64, fired)
        what = f"sufficient {s.name} alpha={alpha} gamma={gamma} {dtype}"
        assert_stats(got, want, mag, what=f"{what} (CUDA vs reference)")
        on_cpu = statistics.sufficient(fs, rs, cpu(ds_gpu), strategy=s)
        assert_stats(got, statistics.to_numpy(on_cpu), mag, what=f"{what} (CUDA vs CPU)")


def test_conflict_count_exact_on_cuda_when_products_underflow():
    # bfloat16: 1e-30 * 1e-30 underflows even in float32; the sign test must not.
    t = 1e-30
    f = torch.tensor([t, -t, t, t, -0.0, 1.0, -t], dtype=torch.bfloat16, device="cuda")
    r = torch.tensor([-t, t, t, -0.0, -1.0, -t, -t], dtype=torch.bfloat16, device="cuda")
    sh = statistics.to_numpy(statistics.shadow([f], [r], [build(n) for n in NAMES]))
    np.testing.assert_array_equal(sh[:, 0, STAT_IDX["n_conflict"]], 3.0)
    np.testing.assert_array_equal(sh[:, 0, STAT_IDX["n_both_nonzero"]], 5.0)
    np.testing.assert_array_equal(sh[NAMES.index("sago"), 0, STAT_IDX["n_opposed"]], 0.0)


# ============================================================================================
# 3. The engine in bfloat16 on CUDA
# ============================================================================================


def tiny_bf16_model(seed: int = 0) -> torch.nn.Module:
    from tiny import tiny_llama

    return tiny_llama(seed).to(torch.bfloat16)


def make_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` equal-length sequences without padding (on the CPU; the engine moves them)."""
    from tiny import VOCAB

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def run_engine(model, out: Path, steps: int = 3, strategy: str = "sago"):
    from geomkit.engine import EngineConfig, Unlearner
    from geomkit.objectives import build_objective

    config = EngineConfig(
        strategy=strategy, lr=1e-3, steps=steps, record_every=1, verify_every=1, flush_every=2
    )
    forget = [make_batch(4, 1), make_batch(4, 3)]
    retain = [make_batch(4, 2), make_batch(4, 4)]
    unlearner = Unlearner(model, build_objective("graddiff"), forget, retain, config, out=out)
    return unlearner.run()


def float32_reference(model_bf16, forget, retain) -> dict[str, float]:
    """Model-level cos(f, r), |f|, |r| and the losses of GradDiff, in float32 on the CPU, from
    the same bfloat16 weights (f: gradient of -NLL(forget), r: of NLL(retain), token means)."""
    model = copy.deepcopy(model_bf16).to("cpu", torch.float32)
    model.train()
    params = list(model.parameters())
    forget_loss = -model(**forget).loss
    retain_loss = model(**retain).loss
    f = torch.autograd.grad(forget_loss, params)
    r = torch.autograd.grad(retain_loss, params)
    fv = torch.cat([x.reshape(-1).double() for x in f])
    rv = torch.cat([x.reshape(-1).double() for x in r])
    return {
        "cos_fr": float(fv @ rv / (fv.norm() * rv.norm())),
        "norm_f": float(fv.norm()),
        "norm_r": float(rv.norm()),
        "forget_loss": float(forget_loss.detach()),
        "retain_loss": float(retain_loss.detach()),
    }


def test_engine_bf16_on_cuda_records_every_step_and_audits_clean(tmp_path):
    model = tiny_bf16_model(0).to("cuda")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    results = run_engine(model, tmp_path / "run", steps=3)
    assert [r.step for r in results] == [0, 1, 2]
    for r in results:
        assert r.recorded and not r.skipped
        assert all(math.isfinite(x) for x in (r.forget_loss, r.retain_loss, r.grad_norm))
        assert r.grad_norm > 0
    for n, p in model.named_parameters():  # trained in place, still bfloat16 on CUDA
        assert p.dtype == torch.bfloat16 and p.device.type == "cuda", n
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())

    ds = geomkit.open_run(tmp_path / "run").load()
    assert ds.attrs["dtype"] == "bfloat16" and ds.attrs["device"] == "cuda"
    np.testing.assert_array_equal(ds["record"].values, [0, 1, 2])
    labels = [str(s) for s in ds["strategy"].values]
    assert labels[0] == "sago" and sorted(labels) == sorted(NAMES)
    for key in ("ff", "rr", "fr", "dd", "df", "dr"):
        assert np.isfinite(ds[key].values).all(), key
    applied = ds.isel(strategy=0)
    assert (applied["n_opposed"].values == 0).all()  # R1 holds exactly for the applied SAGO
    # the recorded update norm is the step's grad norm (the update as formed, before clipping)
    recorded_norm = np.sqrt(applied["dd"].sum("tensor").values)
    np.testing.assert_allclose(recorded_norm, [r.grad_norm for r in results], rtol=1e-2)

    for key in STEP_FIELDS:  # the step of AdamW, modelled on the GPU at every record
        assert np.isfinite(ds[key].values).all(), key
    assert (ds["uu"].values > 0).all()

    audit = theory.audit(ds)
    assert not audit.bug_detected, [str(f) for f in audit.failures]
    v1 = [res for res in audit if res.claim == "V1" and res.cases > 0]
    assert v1, "the shadows were not verified (claim V1 evaluated no case)"


def test_step_model_on_cuda_matches_cpu():
    """The step statistics of AdamW on CUDA equal the CPU's to float64 rounding (the same
    float64 formulas; the sums' order may differ), counts exactly."""
    from geomkit.step import STEP_STATISTICS, StepModel

    g = torch.Generator().manual_seed(0)
    values = {}
    for device in ("cpu", "cuda"):
        p = torch.nn.Parameter(torch.randn(3000, generator=torch.Generator().manual_seed(1)))
        p = torch.nn.Parameter(p.detach().to(device))
        optimizer = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01)
        p.grad = torch.randn(3000, generator=torch.Generator().manual_seed(2)).to(device)
        optimizer.step()
        f, r, d = (torch.randn(3000, generator=g.manual_seed(k)).to(device) for k in (3, 4, 5))
        model = StepModel(optimizer, [p], max_grad_norm=1.0)
        model.begin(float((d.double() ** 2).sum()))
        values[device] = model.statistics(0, f, r, d).cpu()
    scale = values["cpu"].abs().max()
    for i, name in enumerate(STEP_STATISTICS):
        if name.startswith("n_"):
            assert values["cuda"][i] == values["cpu"][i], name
        else:
            assert abs(values["cuda"][i] - values["cpu"][i]) <= 1e-12 * scale, name


def test_engine_bf16_on_cuda_matches_float32_reference(tmp_path):
    model = tiny_bf16_model(1)
    forget, retain = make_batch(4, 1), make_batch(4, 2)
    want = float32_reference(model, forget, retain)
    gpu_model = copy.deepcopy(model).to("cuda")
    from geomkit.engine import EngineConfig, Unlearner
    from geomkit.objectives import build_objective

    config = EngineConfig(strategy="pcgrad", lr=1e-3, steps=1, record_every=1)
    unlearner = Unlearner(
        gpu_model, build_objective("graddiff"), [forget], [retain], config, out=tmp_path / "run"
    )
    (result,) = unlearner.run()
    m = geomkit.open_run(tmp_path / "run").geom.metrics(by="model").isel(record=0)
    got = {key: float(m[key].squeeze()) for key in ("cos_fr", "norm_f", "norm_r")}
    # bfloat16 activations: on the CPU the same comparison is within 1e-4 (cos) and 3e-4
    # (relative norms, losses); CUDA kernels round differently, so allow 50x that.
    assert abs(got["cos_fr"] - want["cos_fr"]) <= 5e-3, (got, want)
    for key in ("norm_f", "norm_r"):
        assert got[key] == pytest.approx(want[key], rel=1e-2), (key, got, want)
    assert result.forget_loss == pytest.approx(want["forget_loss"], rel=1e-2)
    assert result.retain_loss == pytest.approx(want["retain_loss"], rel=1e-2)


# ============================================================================================
# 4. The compiled backend on CUDA (last: Triton compiles are the slowest part)
# ============================================================================================


@contextlib.contextmanager
def compiled_backend() -> Iterator[None]:
    """``use_backend("compiled")`` that fails the test on a silent fallback to eager (a failed
    compile, or dynamo's recompile limit)."""
    assert kernels.get_backend() == "eager"
    with (
        warnings.catch_warnings(record=True) as caught,
        torch._dynamo.config.patch(fail_on_recompile_limit_hit=True),
    ):
        warnings.simplefilter("always")
        with kernels.use_backend("compiled"):
            yield
    fallbacks = [w for w in caught if "falling back to the eager" in str(w.message)]
    assert not fallbacks, f"the compiled backend was not used: {fallbacks[0].message}"
    assert not kernels.compile_failed()
    assert kernels.get_backend() == "eager"


def test_compiled_strategies_on_cuda_bit_identical_to_eager():
    # One test for all rules, so that each kernel compiles once (Triton compiles are slow).
    shapes = [(3 * 4096 + 17,), (5, 7)]
    forget, retain = random_pair(21, torch.bfloat16, shapes)
    forget, retain = cuda(forget), cuda(retain)
    strats = [build(n, alpha=0.5, gamma=2.0) for n in NAMES]
    eager = [s(forget, retain) for s in strats]
    with compiled_backend():
        compiled = [s(forget, retain) for s in strats]
    for s, c_list, e_list in zip(strats, compiled, eager, strict=True):
        assert_matches_reference(s.name, cpu(forget), cpu(retain), 0.5, 2.0, cpu(c_list))
        for j, (c, e) in enumerate(zip(c_list, e_list, strict=True)):
            assert c.dtype == e.dtype and c.device == e.device
            assert torch.equal(c, e), f"{s.name} tensor {j}: compiled differs from eager on CUDA"


def test_compiled_statistics_on_cuda_match_eager():
    fs, rs = make_model(7, torch.bfloat16, (2 * 4096 + 5, 1, 300))
    fs_gpu, rs_gpu = cuda(fs), cuda(rs)
    strats = [build(n, alpha=0.5, gamma=1.0) for n in NAMES]
    updates = [s(fs_gpu, rs_gpu) for s in strats]  # formed eagerly: only reductions compared
    eager_sh = statistics.to_numpy(statistics.shadow(fs_gpu, rs_gpu, strats))
    eager_suf = [
        statistics.to_numpy(statistics.sufficient(fs_gpu, rs_gpu, d, strategy=s))
        for s, d in zip(strats, updates, strict=True)
    ]
    with compiled_backend():
        comp_sh = statistics.to_numpy(statistics.shadow(fs_gpu, rs_gpu, strats))
        comp_suf = [
            statistics.to_numpy(statistics.sufficient(fs_gpu, rs_gpu, d, strategy=s))
            for s, d in zip(strats, updates, strict=True)
        ]
    f64, r64 = [as64(f) for f in fs], [as64(r) for r in rs]
    for k, s in enumerate(strats):
        d64 = [as64(d.cpu()) for d in updates[k]]
        _, _, terms = ref_update(s.name, 0.5, 1.0, f64, r64)
        _, mag = ref_stats(f64, r64, d64, [0.0] * len(fs), terms)
        assert_stats(comp_sh[k], eager_sh[k], mag, what=f"compiled shadow {s.name} (CUDA)")
        _, mag = ref_stats(f64, r64, d64, [0.0] * len(fs))
        assert_stats(comp_suf[k], eager_suf[k], mag, what=f"compiled sufficient {s.name} (CUDA)")


def test_engine_bf16_on_cuda_with_compiled_backend(tmp_path):
    eager_model = tiny_bf16_model(2).to("cuda")
    compiled_model = copy.deepcopy(eager_model)
    eager_results = run_engine(eager_model, tmp_path / "eager", steps=2, strategy="pcgrad")
    with compiled_backend():
        results = run_engine(compiled_model, tmp_path / "compiled", steps=2, strategy="pcgrad")
    assert all(r.recorded and math.isfinite(r.grad_norm) for r in results)
    # Step 0 starts from the same weights: only CUDA's non-deterministic backward (atomic adds)
    # and the backend's float64 reductions can tell the runs apart.
    first = [
        geomkit.open_run(tmp_path / name).geom.metrics(by="model").isel(record=0)
        for name in ("eager", "compiled")
    ]
    for key in ("cos_fr", "cos_dr", "norm_f", "norm_r", "norm_d"):
        np.testing.assert_allclose(
            first[1][key].values, first[0][key].values, rtol=1e-3, atol=1e-4, err_msg=key
        )
    assert results[0].forget_loss == pytest.approx(eager_results[0].forget_loss, rel=1e-3)
    audit = theory.audit(geomkit.open_run(tmp_path / "compiled"))
    assert not audit.bug_detected, [str(f) for f in audit.failures]
