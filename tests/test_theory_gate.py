"""The audit gate (issue 10, A1 and A2): tolerances that follow how each number was computed.

Planted violations must gate (``bug_detected``) in bfloat16, float16 and float32, for the applied
and for shadow strategies; honest runs and samplers must not. Runs are real stores written through
:class:`geomkit.Recorder` from real tensors of each dtype.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import geomkit
from geomkit import statistics as gstats
from geomkit import theory
from geomkit.metrics import field
from geomkit.store import SINCE
from geomkit.strategies import EPSILON, PCGrad, PerTensor, Strategy, build
from geomkit.strategies.base import Global
from geomkit.theory.samplers import Gaussian

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = ((48, 32), (700,), (24, 24), (300,))
NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "lm_head.weight",
]
PLANTED = -1e-3


def sample(dtype: torch.dtype, n: int = 4, seed: int = 0, rho: float = -0.3):
    return Gaussian(rho=rho, norm_ratio=(0.3, 3.0), shapes=SHAPES, dtype=dtype).sample(n, seed)


def write(path: Path, pairs, strategy, combine=None, shadows=None) -> Path:
    """A store written through the public Recorder hook, the applied update measured at every
    record (``applied_statistics = "measured"``); ``combine(step, pair)`` may replace the
    update the applied strategy forms."""
    rec = geomkit.Recorder(
        path,
        NAMES,
        [math.prod(s) for s in SHAPES],
        strategy,
        shadows=shadows,
        flush_every=100,
        attrs={"dtype": str(pairs[0].forget[0].dtype).replace("torch.", ""), "run": path.name},
    )
    for step, p in enumerate(pairs):
        if combine is None:
            combined = rec.applied(p.forget, p.retain)
        else:
            combined = combine(step, p)
        rec.record(step, p.forget, p.retain, combined, forget_loss=0.0, retain_loss=0.0)
    rec.close()
    return path


def planted(d: torch.Tensor, r: torch.Tensor, cos: float) -> torch.Tensor:
    """``d`` moved to ``cos(d, r) = cos`` in d's dtype (its part orthogonal to r kept; a few
    secant steps absorb the rounding to the dtype)."""
    d64, r64 = d.double().reshape(-1), r.double().reshape(-1)
    p = d64 - (d64 @ r64) / (r64 @ r64) * r64
    unit = r64 / r64.norm()

    def make(s: float) -> torch.Tensor:
        return (p - s * unit).reshape(d.shape).to(d.dtype)

    s0 = float(-cos * p.norm() / math.sqrt(1 - cos * cos))
    s1 = 1.1 * s0
    e0, e1 = cosine(make(s0), r) - cos, cosine(make(s1), r) - cos
    for _ in range(8):
        if e1 == e0 or abs(e1) < 2e-5:
            break
        s0, s1 = s1, s1 - e1 * (s1 - s0) / (e1 - e0)
        e0, e1 = e1, cosine(make(s1), r) - cos
    return make(s1)


def cosine(d: torch.Tensor, r: torch.Tensor) -> float:
    d64, r64 = d.double().reshape(-1), r.double().reshape(-1)
    return float(d64 @ r64 / (d64.norm() * r64.norm()))


def tamper_cos(ds, strategy: str, record: int, tensor: str, cos: float):
    """The stored <d, r> of one (record, strategy, tensor) set to give ``cos(d, r) = cos``."""
    ds = ds.load().copy(deep=True)
    at = {"strategy": strategy, "tensor": tensor, "record": ds["record"].values[record]}
    dd, rr = float(ds["dd"].loc[at]), float(ds["rr"].loc[{k: at[k] for k in ("tensor", "record")}])
    ds["dr"].loc[at] = cos * math.sqrt(dd * rr)
    return ds


def gated(audit, claim: str, granularity: str, strategy: str):
    result = audit.get(claim, granularity, strategy)
    assert result.gates and result.status == "proven", result
    return result


# ----------------------------------------------------------------------------------------------
# Honest runs and samplers never gate
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("applied", ["sago", "pcgrad", "pcgrad_global"])
def test_honest_runs_do_not_gate(tmp_path, dtype, applied):
    pairs = sample(dtype, n=3, seed=1) + sample(dtype, n=2, seed=2, rho=0.4)
    ds = geomkit.open_run(write(tmp_path / "run", pairs, applied))
    audit = theory.audit(ds)
    assert not audit.bug_detected, audit.failures
    r0 = gated(audit, "R0", "tensor", applied)
    assert (r0.cases, r0.violations, r0.evidence) == (5 * 4, 0, "measured")
    r3b = gated(audit, "R3b", "tensor", "pcgrad")
    assert r3b.cases == 5 * 4 and r3b.violations == 0
    assert gated(audit, "R3", "tensor", "pcgrad").cases > 0  # some tensors projected
    # the tolerance says how it was computed
    r1 = audit.get("R1", "tensor", "sago")
    assert "u64" in r1.tolerance
    r2 = audit.get("R2", "tensor", "pcgrad")
    assert ("sum|d_i r_i|" in r2.tolerance) == (applied == "pcgrad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_real_updates_are_their_rounded_formula(dtype):
    """n_unrounded = 0 for every strategy's real update, also at extreme norm ratios."""
    for ratio in (1e-4, 1.0, 1e4):
        f = [torch.randn(300, dtype=torch.float64).to(dtype) for _ in range(3)]
        r = [(ratio * torch.randn(300, dtype=torch.float64)).to(dtype) for _ in range(3)]
        for name in ("sum", "pcgrad", "pcgrad_global", "sago", "sago_prefer_retain", "blur"):
            s = build(name, alpha=0.3, gamma=1.7)
            stats = gstats.sufficient(f, r, s(f, r), strategy=s)
            assert field(stats, "n_unrounded").sum() == 0, (name, ratio)
            shadow = gstats.shadow(f, r, [s])[0]
            assert field(shadow, "n_unrounded").sum() == 0
            # sum |d_i r_i| of the shadow (float64 d*) and of the formed update agree to rounding
            u, _ = geomkit.kernels.update_rounding(dtype)
            np.testing.assert_allclose(
                field(stats, "dr_abs"), field(shadow, "dr_abs"), rtol=1.01 * u + 1e-13, atol=0
            )


def test_synthetic_audit_of_honest_strategies_is_bug_free():
    audit = theory.audit_synthetic(n=6, claims=["R0", "R1", "R2", "R2b", "R3", "R3b"])
    assert not audit.bug_detected, audit.failures
    assert {r.claim for r in audit if r.gates} == {"R0", "R1", "R2", "R2b", "R3", "R3b"}


# ----------------------------------------------------------------------------------------------
# A1: a planted cos(d, r) = -1e-3 on one tensor gates, applied and shadow, every dtype
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("strategy", "claim"), [("sago", "R1"), ("pcgrad", "R2")])
def test_planted_cosine_on_a_shadow_gates(tmp_path, dtype, strategy, claim):
    ds = geomkit.open_run(write(tmp_path / "run", sample(dtype), "sum"))
    assert not theory.audit(ds).bug_detected
    bad = tamper_cos(ds, strategy, 2, NAMES[1], PLANTED)
    audit = theory.audit(bad, claims=[claim])
    assert audit.bug_detected
    result = gated(audit, claim, "tensor", strategy)
    assert result.evidence == "shadow"
    assert (result.violations, result.where) == (1, f"step 2, tensor {NAMES[1]}")
    assert result.worst_margin == pytest.approx(PLANTED, rel=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_planted_cosine_on_applied_sago_statistics_gates(tmp_path, dtype):
    """Rounding never flips a sign of SAGO's d_i r_i: R1 of the applied update needs only the
    float64 tolerance."""
    ds = geomkit.open_run(write(tmp_path / "run", sample(dtype), "sago"))
    audit = theory.audit(tamper_cos(ds, "sago", 1, NAMES[0], PLANTED), claims=["R1"])
    result = gated(audit, "R1", "tensor", "sago")
    assert audit.bug_detected and result.violations == 1 and result.evidence == "measured"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("applied", ["sum", "pcgrad", "pcgrad_global"])
def test_planted_cosine_on_applied_uniform_rule_statistics_gates(tmp_path, dtype, applied):
    """A stored <d, r> of a sum or projection rule, on a tensor that was not projected, edited to
    cos(d, r) = -1e-3: R2 alone allows the rounding of d (a few 1e-3 in bfloat16), but R0's
    additive check compares <d, r> with the formula's float64 <d*, r> and catches it."""
    pairs = sample(dtype, rho=0.3)
    ds = geomkit.open_run(write(tmp_path / "run", pairs, applied))
    at = {"strategy": applied, "record": ds["record"].values[1]}
    assert float(ds["n_projected"].loc[{**at, "tensor": NAMES[1]}]) == 0  # not projected
    audit = theory.audit(tamper_cos(ds, applied, 1, NAMES[1], PLANTED), claims=["R0"])
    result = gated(audit, "R0", "tensor", applied)
    assert audit.bug_detected and result.violations == 1
    assert result.where == f"step 1, tensor {NAMES[1]}"
    honest = theory.audit(ds, claims=["R0"]).get("R0", "tensor", applied)
    assert honest.violations == 0 and honest.cases == len(pairs) * len(NAMES)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("applied", ["sago", "pcgrad", "pcgrad_global"])
def test_planted_cosine_in_the_applied_update_gates(tmp_path, dtype, applied):
    """The update a buggy strategy applies: one tensor moved to cos(d, r) = -1e-3."""
    strategy = build(applied)

    def combine(step, pair):
        d = strategy(pair.forget, pair.retain)
        if step == 2:
            d[1] = planted(d[1], pair.retain[1], PLANTED)
            assert cosine(d[1], pair.retain[1]) == pytest.approx(PLANTED, abs=3e-4)
        return d

    ds = geomkit.open_run(write(tmp_path / "run", sample(dtype), applied, combine))
    audit = theory.audit(ds)
    assert audit.bug_detected
    r0 = gated(audit, "R0", "tensor", applied)
    assert r0.violations == 1 and r0.where == f"step 2, tensor {NAMES[1]}"
    if applied == "sago":
        assert gated(audit, "R1", "tensor", "sago").violations == 1
    # the shadows of the same gradients are untouched
    assert audit.get("R1", "tensor", "sago").violations == (1 if applied == "sago" else 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_planted_cosine_in_a_synthetic_implementation_gates(dtype):
    honest = build("pcgrad")

    def buggy(forget, retain):
        d = honest(forget, retain)
        d[0] = planted(d[0], retain[0], PLANTED)
        return d

    sampler = Gaussian(rho=-0.3, norm_ratio=(0.3, 3.0), shapes=SHAPES, dtype=dtype)
    audit = theory.audit_synthetic(sampler, n=3, implementations={"pcgrad": buggy})
    assert audit.bug_detected
    assert gated(audit, "R0", "tensor", "pcgrad").violations == 3


def test_stores_without_the_new_fields_still_audit(tmp_path):
    path = write(tmp_path / "old", sample(torch.bfloat16, n=2), "pcgrad")
    for name in ("dr_abs", "n_unrounded", *SINCE):  # a version 2 store before these fields
        shutil.rmtree(path / name)
    zarr.open_group(path, mode="r+").attrs["schema_version"] = 2
    ds = geomkit.open_run(path)
    assert "dr_abs" not in ds and "n_unrounded" not in ds
    audit = theory.audit(ds)
    assert not audit.bug_detected
    r0 = audit.get("R0", "tensor", "pcgrad")
    assert r0.cases == 0 and "not recorded" in r0.note
    r2 = audit.get("R2", "tensor", "pcgrad")
    assert r2.cases == 2 * 4 and "(1 + u)(A|f||r| + B|r|^2)" in r2.tolerance
    assert "not recorded" in r2.note


# ----------------------------------------------------------------------------------------------
# A2: R3 gated where proven, R3b one-sidedness
# ----------------------------------------------------------------------------------------------


class TenfoldPCGrad(PCGrad):
    """A planted bug: the projection coefficient 10x too large."""

    label = "pcgrad"

    @staticmethod
    def coefficient(dots):
        c, fired = PCGrad.coefficient(dots)
        return 10 * c, fired


class TwoSidedPCGrad(PCGrad):
    """A planted bug: projects also when <f, r> >= 0."""

    label = "pcgrad"

    @staticmethod
    def coefficient(dots):
        rr, fr = dots[..., 1], dots[..., 2]
        return fr / (rr + EPSILON), torch.ones_like(fr, dtype=torch.bool)


def mutated(rule, scope):
    name = "pcgrad" if isinstance(scope, PerTensor) else "pcgrad_global"
    return Strategy(rule, scope, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", [PerTensor(), Global()])
@pytest.mark.parametrize("where", ["applied", "shadow"])
def test_tenfold_projection_coefficient_gates_r3(tmp_path, dtype, scope, where):
    bug = mutated(TenfoldPCGrad(), scope)
    name, granularity = str(bug), "tensor" if isinstance(scope, PerTensor) else "model"
    pairs = sample(dtype, n=4, rho=-0.6)
    if where == "applied":
        path = write(tmp_path / "run", pairs, bug, shadows=["sago"])
    else:
        path = write(tmp_path / "run", pairs, "sum", shadows=[bug])
    audit = theory.audit(geomkit.open_run(path), claims=["R3"])
    result = gated(audit, "R3", granularity, name)
    assert audit.bug_detected and result.violations == result.cases > 0
    assert result.evidence == ("measured" if where == "applied" else "shadow")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", [PerTensor(), Global()])
@pytest.mark.parametrize("where", ["applied", "shadow"])
def test_projecting_when_f_and_r_agree_gates_r3b(tmp_path, dtype, scope, where):
    bug = mutated(TwoSidedPCGrad(), scope)
    name, granularity = str(bug), "tensor" if isinstance(scope, PerTensor) else "model"
    pairs = sample(dtype, n=4, rho=0.5)  # <f, r> > 0: an honest PCGrad never projects
    if where == "applied":
        path = write(tmp_path / "run", pairs, bug, shadows=["sago"])
    else:
        path = write(tmp_path / "run", pairs, "sum", shadows=[bug])
    audit = theory.audit(geomkit.open_run(path), claims=["R3b"])
    result = gated(audit, "R3b", granularity, name)
    assert audit.bug_detected and result.violations == result.cases > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_r3_and_r3b_gate_on_synthetic_implementations(dtype):
    sampler = Gaussian(rho=-0.5, norm_ratio=(0.3, 3.0), shapes=SHAPES, dtype=dtype)
    tenfold = mutated(TenfoldPCGrad(), PerTensor())
    audit = theory.audit_synthetic(sampler, n=4, claims=["R3"], implementations={"pcgrad": tenfold})
    r3 = gated(audit, "R3", "tensor", "pcgrad")
    assert audit.bug_detected and r3.violations == r3.cases > 0
    agree = Gaussian(rho=0.5, norm_ratio=(0.3, 3.0), shapes=SHAPES, dtype=dtype)
    for scope, granularity in ((PerTensor(), "tensor"), (Global(), "model")):
        bug = mutated(TwoSidedPCGrad(), scope)
        audit = theory.audit_synthetic(agree, n=4, claims=["R3b"], implementations={str(bug): bug})
        r3b = gated(audit, "R3b", granularity, str(bug))
        assert audit.bug_detected and r3b.violations == r3b.cases > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["sago", "sago_prefer_retain", "pcgrad", "pcgrad_global", "blur"])
def test_n_unrounded_counts_each_coordinate_off_the_rounded_formula(dtype, name):
    g = torch.Generator().manual_seed(3)
    f = [torch.randn(257, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]
    r = [torch.randn(257, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]
    s = build(name, alpha=0.6, gamma=1.4)
    d = s(f, r)
    eps = torch.finfo(dtype).eps
    d[1][7] = (d[1][7].double() * (1 + 4 * eps) + 4 * eps).to(dtype)  # a few units off
    d[1][9] = math.nan
    counts = field(gstats.sufficient(f, r, d, strategy=s), "n_unrounded")
    assert counts.tolist() == [0.0, 2.0]
    assert field(gstats.sufficient(f, r, d), "n_unrounded").tolist() == [0.0, 0.0]  # no strategy
