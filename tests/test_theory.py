"""Tests of geomkit.theory: claim checks of docs/theory.md R1-R9 on synthetic and recorded data.

Layout:

1. the claim table and the samplers (determinism, dtypes, exact zeros, counterexamples);
2. proven claims pass on random samplers in several dtypes; false claims are measured and
   never set ``bug_detected``; undefined cases are counted apart;
3. planted violations are found, with the right location: a broken SAGO implementation, and a
   tampered statistics Dataset;
4. recorded runs: a run written by the Recorder from the counterexamples, and a real tiny run
   of the engine; stacked runs; the R4 breakdown;
5. result types: JSON round trip, DataFrame, table; input validation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import geomkit
from geomkit import theory
from geomkit.recorder import Recorder
from geomkit.strategies import build
from geomkit.theory import (
    Audit,
    CheckResult,
    Counterexamples,
    Fixed,
    Gaussian,
    HeavyTailed,
    Sparse,
    Zeros,
)

PROVEN = {
    *(("R0", s) for s in ("sum", "pcgrad", "pcgrad_global", "sago", "sago_prefer_retain", "blur")),
    ("R1", "sago"),
    ("R2", "pcgrad"),
    ("R2b", "pcgrad_global"),
    ("R3", "pcgrad"),
    ("R3", "pcgrad_global"),
    ("R3b", "pcgrad"),
    ("R3b", "pcgrad_global"),
    ("R6", "sago"),
    ("R6", "sago_prefer_retain"),
    ("R9", "sago"),
}
# proven (docs/theory.md#r7 gives a proof) but outside the bug gate, evaluated for the model only
PROVEN_UNGATED = {("R7", "sago_prefer_retain>=pcgrad_global")}
NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "lm_head.weight",
]


def one(audit: Audit, claim: str, granularity: str, strategy: str) -> CheckResult:
    return audit.get(claim, granularity, strategy)


# ----------------------------------------------------------------------------------------------
# 1. Claims and samplers
# ----------------------------------------------------------------------------------------------


def test_claim_table_statuses_follow_theory_md():
    ids = ["R0", "R1", "R2", "R2b", "R3", "R3b", "R4", "R5", "R6", "R7", "R8", "R9", "V1"]
    ids += ["S1", "S2"]  # the step the optimizer took (open; tests/test_step_claims.py)
    assert list(theory.CLAIMS) == ids
    status = {cid: c.status for cid, c in theory.CLAIMS.items()}
    assert status["R0"] == status["R1"] == status["R2"] == status["R9"] == "proven"
    assert status["R3b"] == "proven"
    assert status["R4"] == status["R5"] == "false"
    assert status["R3"] == status["R7"] == status["R8"] == "open"
    assert status["S1"] == status["S2"] == "open"
    r3 = theory.get_claim("R3")  # proven (and gated) only on the vector that was projected
    assert r3.gates("pcgrad", "tensor") and r3.gates("pcgrad_global", "model")
    assert not r3.evaluated_at("pcgrad_global", "tensor")
    r2b, r6 = theory.get_claim("R2b"), theory.get_claim("R6")
    assert r2b.status_at("pcgrad_global", "model") == "proven"
    assert r2b.status_at("pcgrad_global", "tensor") == "false"
    assert r2b.status_at("pcgrad_global", "layer") == "false"
    assert r6.status_at("sago", "coordinate") == "proven"
    assert r6.status_at("sago_prefer_retain", "coordinate") == "proven"
    assert r6.status_at("pcgrad", "coordinate") == "false"
    with pytest.raises(ValueError, match="R10"):
        theory.get_claim("R10")
    with pytest.raises(ValueError, match="'atom'"):
        r6.status_at("sago", "atom")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", [Gaussian, Sparse, HeavyTailed, Zeros])
def test_samplers_are_seeded_typed_and_multi_tensor(kind, dtype):
    sampler = kind(dtype=dtype, norm_ratio=3.0)
    a, b = sampler.sample(4, seed=7), sampler.sample(4, seed=7)
    c = sampler.sample(4, seed=8)
    assert len(a) == 4 and len(a[0].forget) == len(sampler.shapes) > 1
    for pa, pb in zip(a, b, strict=True):
        for x, y in zip(pa.forget + pa.retain, pb.forget + pb.retain, strict=True):
            assert x.dtype == dtype
            assert torch.equal(x, y)
    assert not all(torch.equal(x, y) for x, y in zip(a[0].forget, c[0].forget, strict=True))
    assert sampler.sample(2, seed=7)[1].forget[0].equal(a[1].forget[0])  # prefix-stable
    assert sampler.name.startswith(kind.kind)


def test_sampler_norm_ratio_and_correlation():
    pairs = Gaussian(rho=-0.8, norm_ratio=5.0, dtype=torch.float64).sample(8, seed=1)
    for p in pairs:
        for f, r in zip(p.forget, p.retain, strict=True):
            assert float(f.norm() / r.norm()) == pytest.approx(5.0, rel=1e-9)
            cos = float((f * r).sum() / (f.norm() * r.norm()))
            assert cos < -0.3


def test_zeros_sampler_has_signed_zeros_and_zero_tensors():
    pairs = Zeros(fraction=0.3, dtype=torch.bfloat16).sample(16, seed=0)
    values = torch.cat([t.float().reshape(-1) for p in pairs for t in p.forget + p.retain])
    zeros = values == 0
    assert zeros.any()
    assert torch.signbit(values[zeros]).any() and (~torch.signbit(values[zeros])).any()
    assert any(bool((p.forget[0] == 0).all()) for p in pairs)  # f = 0: SAGO gives d = 0
    assert any(bool((p.retain[-1] == 0).all()) for p in pairs)  # r = 0


def test_sparse_sampler_density():
    pairs = Sparse(density=0.1, dtype=torch.float32).sample(16, seed=0)
    values = torch.cat([t.reshape(-1) for p in pairs for t in p.retain])
    assert 0.05 < float((values != 0).float().mean()) < 0.15


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_counterexample_numbers(dtype):
    """docs/theory.md#r4: SAGO 0.020 vs PCGrad 0.714; 0.707 vs 0.714; 0.708 vs 0.894 (projected)."""
    want = [(0.020, 0.714, False), (0.707, 0.714, False), (0.708, 0.894, True)]
    got = []
    for c, (sago_cos, pcgrad_cos, projects) in zip(theory.counterexamples(), want, strict=True):
        f, r = c.pair(dtype)
        cos = {}
        for name in ("sago", "pcgrad", "pcgrad_global"):
            d = build(name)(f, r)[0].double()
            cos[name] = float(d @ r[0].double() / (d.norm() * r[0].double().norm()))
        assert cos["sago"] == pytest.approx(sago_cos, abs=1e-3)
        assert cos["pcgrad"] == pytest.approx(pcgrad_cos, abs=1e-3)
        assert cos["pcgrad_global"] == pytest.approx(cos["pcgrad"], abs=1e-12)
        assert (float(f[0].double() @ r[0].double()) < 0) == projects
        assert (c.cos_sago, c.cos_pcgrad, c.projects) == (sago_cos, pcgrad_cos, projects)
        got.append(cos["sago"] < cos["pcgrad"])
    assert all(got)


def test_counterexamples_are_reported_as_r4_violations():
    audit = theory.audit_synthetic(Counterexamples(), claims=["R4"])
    assert len(audit) == 4  # two PCGrad scopes x (tensor, model)
    for r in audit:
        assert (r.cases, r.violations, r.undefined) == (3, 3, 0)
        assert r.status == "false" and r.verdict == "fails"
        assert r.worst_margin == pytest.approx(0.020 - 0.714, abs=2e-3)
        assert r.where.startswith("sample 0")
    assert not audit.bug_detected  # a false claim failing is a measurement, not a bug


# ----------------------------------------------------------------------------------------------
# 2. Proven claims hold; false claims are measured; undefined cases
# ----------------------------------------------------------------------------------------------


# V1 (docs/theory.md#v1): every shadow's closed form against its materialised update
PROVEN_V1 = {("V1", s) for s in ("sum", "pcgrad", "pcgrad_global", "sago", "sago_prefer_retain")}
PROVEN = PROVEN | PROVEN_V1 | {("V1", "blur")}


def assert_proven_pass(audit: Audit) -> None:
    assert not audit.bug_detected, audit.failures
    for r in audit:
        if r.status == "proven":
            assert r.violations == 0 and r.non_finite == 0, r
            if r.gates:
                assert (r.claim, r.strategy) in PROVEN
            else:
                assert (r.claim, r.strategy) in PROVEN_UNGATED and r.granularity == "model"
            assert r.tolerance  # stated
        else:
            assert not r.gates


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_proven_claims_pass_in_every_dtype(dtype):
    samplers = [
        Gaussian(rho=-0.7, norm_ratio=(0.01, 100.0), dtype=dtype),
        Sparse(density=0.2, rho=-0.5, dtype=dtype),
        HeavyTailed(df=1, rho=-0.3, dtype=dtype),
        Zeros(fraction=0.4, rho=-0.5, dtype=dtype),
    ]
    audit = theory.audit_synthetic(samplers, n=12, seed=3, alpha=0.7, gamma=1.3)
    assert_proven_pass(audit)
    r1 = audit.select(claim="R1", by="coordinate")
    assert len(r1) == 4 and all(r.cases > 0 for r in r1)
    for granularity in ("coordinate", "tensor", "model"):
        assert audit.select(claim="R9", by=granularity).results
    # the projection's 1e-10 residual and the dtype appear in the stated tolerance
    r2 = audit.select(claim="R2", by="tensor").results[0]
    assert "1e-10" in r2.tolerance and str(dtype).replace("torch.", "") in r2.tolerance


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rho=st.floats(-1.0, 1.0),
    low=st.floats(-3.0, 1.0),
    alpha=st.sampled_from([0.0, 0.1, 1.0, 3.0]),
    gamma=st.sampled_from([0.0, 0.1, 1.0, 3.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
)
def test_proven_claims_pass_on_random_samplers(seed, rho, low, alpha, gamma, dtype):
    sampler = Gaussian(rho=rho, norm_ratio=(10.0**low, 10.0 ** (low + 2)), dtype=dtype)
    audit = theory.audit_synthetic(sampler, n=4, seed=seed, alpha=alpha, gamma=gamma)
    assert_proven_pass(audit)


def test_default_synthetic_audit_measures_false_claims_without_a_bug():
    audit = theory.audit_synthetic()
    assert_proven_pass(audit)
    assert audit.select(claim="R4").results and any(r.violations for r in audit.select("R4"))
    r2b_tensor = audit.select(claim="R2b", by="tensor")
    assert any(r.violations for r in r2b_tensor)  # global PCGrad fails per tensor ...
    assert all(r.status == "false" for r in r2b_tensor)
    assert all(r.violations == 0 for r in audit.select(claim="R2b", by="model"))
    assert any(r.violations for r in audit.select(claim="R5"))
    assert any(r.violations for r in audit.select(claim="R6", strategy="pcgrad"))
    r4 = audit.select(claim="R4", by="tensor", strategy="sago>=pcgrad").results[0]
    assert {"mean_gap", "median_gap", "rate_ratio_below_1"} <= set(r4.details)


def test_undefined_cases_are_their_own_category():
    # tensor 0: f = 0 (SAGO: d = 0); tensor 1: r = 0 (with -0.0); tensor 2: regular
    f = [torch.zeros(3), torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.0, -1.0, 2.0])]
    r = [
        torch.tensor([1.0, -1.0, 0.5]),
        torch.tensor([0.0, -0.0, 0.0]),
        torch.tensor([1.0, 1.0, 1.0]),
    ]
    model_zero = ([torch.zeros(3), torch.zeros(3), torch.zeros(3)], r)
    sampler = Fixed(pairs=((f, r), model_zero), label="edge")
    audit = theory.audit_synthetic(sampler)
    assert_proven_pass(audit)
    r1 = one(audit, "R1", "tensor", "sago")
    # pair 0: tensors 0 (d = 0) and 1 (r = 0) undefined; pair 1: d = 0 in 0 and 2, r = 0 in 1
    assert (r1.cases, r1.undefined, r1.violations) == (1, 5, 0)
    assert "undefined" in r1.note
    model = one(audit, "R1", "model", "sago")
    assert (model.cases, model.undefined) == (1, 1)  # f = 0 everywhere: d = 0
    spr = one(audit, "R4", "tensor", "sago>=pcgrad")
    assert spr.undefined >= 3 and spr.cases + spr.undefined == 6
    # coordinates are always defined: zeros (and -0.0) never oppose
    coord = one(audit, "R6", "coordinate", "sago")
    assert (coord.cases, coord.undefined, coord.violations) == (18, 0, 0)


# ----------------------------------------------------------------------------------------------
# 3. Planted violations
# ----------------------------------------------------------------------------------------------


class BrokenSAGO:
    """SAGO, except that on the ``bad``-th call tensor 2 of the update is replaced by ``-r``."""

    def __init__(self, bad: int) -> None:
        self.calls, self.bad = 0, bad
        self.sago = build("sago")

    def __call__(self, forget, retain):
        d = self.sago(forget, retain)
        if self.calls == self.bad:
            d[2] = -retain[2].clone()
        self.calls += 1
        return d


def test_broken_sago_is_caught_at_every_granularity():
    sampler = Gaussian(rho=0.2, dtype=torch.float32)
    pairs = sampler.sample(8, seed=0)
    audit = theory.audit_synthetic(sampler, n=8, implementations={"sago": BrokenSAGO(bad=3)})
    assert audit.bug_detected and audit.failed
    r2 = pairs[3].retain[2].reshape(-1)
    n_nonzero = int((r2 != 0).sum())
    coord = one(audit, "R1", "coordinate", "sago")
    assert coord.failed and coord.violations == n_nonzero
    k = int(torch.argmax(r2.abs()))
    assert coord.where == f"sample 3, tensor 2, coordinate {k}"
    assert one(audit, "R6", "coordinate", "sago").violations == n_nonzero
    tensor = one(audit, "R1", "tensor", "sago")
    assert tensor.violations == 1 and tensor.where == "sample 3, tensor 2"
    assert tensor.worst_margin == pytest.approx(-1.0)  # cos(-r, r)
    r9 = one(audit, "R9", "coordinate", "sago")
    assert r9.failed and r9.where.startswith("sample 3, tensor 2,")
    assert one(audit, "R9", "tensor", "sago").where == "sample 3, tensor 2"
    # the other strategies are untouched
    assert one(audit, "R6", "coordinate", "sago_prefer_retain").violations == 0
    assert one(audit, "R2", "tensor", "pcgrad").violations == 0
    assert {r.claim for r in audit.failures} >= {"R1", "R6", "R9"}


def test_sum_posing_as_pcgrad_breaks_r2():
    sampler = Gaussian(rho=-0.9, norm_ratio=5.0, dtype=torch.float64)  # <f + r, r> < 0
    audit = theory.audit_synthetic(sampler, n=6, implementations={"pcgrad": build("sum")})
    r2 = one(audit, "R2", "tensor", "pcgrad")
    assert r2.failed and r2.violations > 0 and r2.worst_margin < -0.1
    assert audit.bug_detected


class NaNSAGO:
    """SAGO, except that on the ``bad``-th call coordinate ``k`` of tensor 1 is NaN."""

    def __init__(self, bad: int, k: int, value: float = math.nan) -> None:
        self.calls, self.bad, self.k, self.value = 0, bad, k, value
        self.sago = build("sago")

    def __call__(self, forget, retain):
        d = self.sago(forget, retain)
        if self.calls == self.bad:
            d[1] = d[1].clone().reshape(-1)
            d[1][self.k] = self.value
            d[1] = d[1].reshape(forget[1].shape)
        self.calls += 1
        return d


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_sago_update_is_a_violation_not_a_pass(value):
    sampler = Gaussian(rho=0.2, dtype=torch.float32)
    audit = theory.audit_synthetic(
        sampler, n=6, implementations={"sago": NaNSAGO(bad=2, k=5, value=value)}
    )
    assert audit.bug_detected
    for claim in ("R1", "R6", "R9"):
        coord = one(audit, claim, "coordinate", "sago")
        assert coord.failed and coord.non_finite == 1 and coord.violations >= 1, coord
        assert coord.where == "sample 2, tensor 1, coordinate 5"
        assert coord.worst_margin == -math.inf and "non-finite" in coord.note
        assert math.isfinite(coord.details["worst_finite_margin"])
    for granularity, where in (("tensor", "sample 2, tensor 1"), ("model", "sample 2")):
        for claim in ("R1", "R9"):
            r = one(audit, claim, granularity, "sago")
            assert r.failed and r.non_finite == 1 and r.undefined == 0, r
            assert r.where == where and r.worst_margin == -math.inf
    # the comparisons see it too (measured claims: counted, not a bug by themselves)
    r4 = one(audit, "R4", "model", "sago>=pcgrad")
    assert r4.non_finite == 1 and r4.violations >= 1 and not r4.failed
    assert one(audit, "R6", "coordinate", "sago_prefer_retain").non_finite == 0
    # R0 too: a NaN coordinate is not the rounding of the formula
    assert {r.claim for r in audit.failures} == {"R0", "R1", "R6", "R9"}
    # renders: the non-finite count is a column; strict JSON keeps -inf
    assert "nonfin" in audit.table()
    again = Audit.from_json(audit.to_json())
    assert again.get("R1", "tensor", "sago").worst_margin == -math.inf
    assert again.get("R1", "tensor", "sago").non_finite == 1
    assert again.to_frame()["non_finite"].sum() == audit.to_frame()["non_finite"].sum() > 0


def write_run(path: Path, pairs, strategy: str = "sago", **weights) -> Path:
    """A real store written through the public Recorder hook (no model needed), the applied
    update measured at every record (``applied_statistics = "measured"``)."""
    shapes = [tuple(t.shape) for t in pairs[0].forget]
    names = NAMES[: len(shapes)] if len(shapes) > 1 else ["model.layers.0.mlp.up_proj.weight"]
    rec = Recorder(
        path,
        names,
        [math.prod(s) for s in shapes],
        strategy,
        flush_every=100,
        attrs={"dtype": str(pairs[0].forget[0].dtype).replace("torch.", ""), "run": path.name},
        **weights,
    )
    for step, p in enumerate(pairs):
        update = rec.applied(p.forget, p.retain)
        rec.record(step, p.forget, p.retain, update, forget_loss=0.0, retain_loss=0.0)
    rec.close()
    return path


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("theory_runs")
    pairs = Gaussian(rho=-0.3, norm_ratio=(0.1, 10.0), shapes=((6, 4), (16,), (4, 8), (12,), (8,)))
    write_run(root / "synthetic-sago", pairs.sample(5, seed=1), "sago", alpha=0.7, gamma=1.2)
    write_run(root / "synthetic-pcgrad", pairs.sample(3, seed=2), "pcgrad")
    return root


def tamper(ds, name: str, strategy: str, record: int, tensor: str, value: float):
    ds = ds.load().copy(deep=True)
    index = {"strategy": strategy, "tensor": tensor}
    ds[name].loc[{**index, "record": ds["record"].values[record]}] = value
    return ds


def test_recorded_run_has_no_bug_and_states_its_evidence(recorded):
    ds = geomkit.open_run(recorded / "synthetic-sago")
    audit = theory.audit(ds)
    assert_proven_pass(audit)
    assert {r.source for r in audit} == {"synthetic-sago"}
    assert {r.granularity for r in audit} == {"coordinate", "tensor", "layer", "model"}
    r1 = one(audit, "R1", "coordinate", "sago")
    assert r1.evidence == "measured" and r1.cases == 5 * 92 and r1.violations == 0
    shadow = one(audit, "R6", "coordinate", "sago_prefer_retain")  # verified at step 0 only
    assert shadow.evidence == "materialised" and shadow.cases == 92 and "verified" in shadow.note
    assert shadow.verdict == "ok" and not shadow.failed
    assert one(audit, "R6", "coordinate", "pcgrad").evidence == "shadow"
    r9 = one(audit, "R9", "coordinate", "sago")
    assert r9.cases == 0 and r9.evidence == "none" and r9.note
    assert one(audit, "R9", "layer", "sago").cases == 5 * 3
    for granularity, cases in (("tensor", 25), ("layer", 15), ("model", 5)):
        r4 = one(audit, "R4", granularity, "sago>=pcgrad")
        assert r4.cases == cases and r4.status == "false"
        assert "alpha=0.7, gamma=1.2" in r4.note and "alpha = gamma = 1" in r4.note
    assert one(audit, "R3", "tensor", "pcgrad").violations == 0


def test_counterexamples_recorded_as_a_run_are_r4_violations(tmp_path):
    pairs = Counterexamples().sample()
    ds = geomkit.open_run(write_run(tmp_path / "counter", pairs, "sago"))
    audit = theory.audit(ds, claims=["R4", "R1"])
    for strategy in ("sago>=pcgrad", "sago>=pcgrad_global"):
        r4 = one(audit, "R4", "model", strategy)
        assert (r4.cases, r4.violations) == (3, 3) and r4.where == "step 0"
    assert not audit.bug_detected


def test_tampered_statistics_are_caught_and_located(recorded):
    ds = geomkit.open_run(recorded / "synthetic-sago")
    target = NAMES[2]
    bad = tamper(ds, "dr", "sago", 1, target, -5.0)
    audit = theory.audit(bad)
    assert audit.bug_detected
    tensor = one(audit, "R1", "tensor", "sago")
    assert tensor.violations == 1 and tensor.failed
    assert tensor.where == f"step 1, tensor {target}"
    assert tensor.worst_margin < 0
    assert one(audit, "R9", "tensor", "sago").where == f"step 1, tensor {target}"
    # n_opposed of the applied (measured) SAGO: a coordinate-level violation
    bad = tamper(ds, "n_opposed", "sago", 2, NAMES[4], 7)
    audit = theory.audit(bad)
    coord = one(audit, "R1", "coordinate", "sago")
    assert coord.violations == 7 and coord.where == f"step 2, tensor {NAMES[4]} (7 coordinates)"
    assert math.isnan(coord.worst_margin) and audit.bug_detected
    # a shadow PCGrad with a negative <d, r>: R2 (proven per tensor)
    bad = tamper(ds, "dr", "pcgrad", 0, NAMES[0], -1.0)
    r2 = one(theory.audit(bad), "R2", "tensor", "pcgrad")
    assert r2.failed and r2.where == f"step 0, tensor {NAMES[0]}"


@pytest.mark.parametrize("name", ["dr", "dd"])
def test_nan_statistic_of_the_applied_update_is_caught_at_every_granularity(recorded, name):
    ds = geomkit.open_run(recorded / "synthetic-sago")
    target = NAMES[2]  # layer 0
    audit = theory.audit(tamper(ds, name, "sago", 1, target, math.nan))
    assert audit.bug_detected
    for granularity, where in (
        ("tensor", f"step 1, tensor {target}"),
        ("layer", "step 1, layer 0"),
        ("model", "step 1"),
    ):
        for claim in ("R1", "R9"):
            r = one(audit, claim, granularity, "sago")
            assert r.failed and r.violations == 1 and r.non_finite == 1, r
            assert r.undefined == 0 and r.where == where and r.worst_margin == -math.inf
            assert math.isfinite(r.details["worst_finite_margin"])
    # the record is kept (not dropped as padding): every record is still a case
    assert one(audit, "R1", "model", "sago").cases == 5
    # a shadow strategy's statistics are untouched
    assert one(audit, "R2", "model", "pcgrad").violations == 0


def test_inf_in_ff_is_not_silently_dropped(recorded):
    ds = geomkit.open_run(recorded / "synthetic-sago").load().copy(deep=True)
    ds["ff"].loc[{"record": ds["record"].values[3], "tensor": NAMES[1]}] = math.inf
    audit = theory.audit(ds)
    assert audit.bug_detected
    model = one(audit, "R1", "model", "sago")
    assert model.cases == 5 and model.non_finite == 1 and model.where == "step 3"
    tensor = one(audit, "R1", "tensor", "sago")
    assert tensor.cases == 25 and tensor.where == f"step 3, tensor {NAMES[1]}"
    assert one(audit, "R2", "tensor", "pcgrad").non_finite == 1  # ff sets every tolerance
    assert "dropped" not in model.note


def test_padding_of_stacked_runs_is_dropped_silently(recorded):
    ds = geomkit.open_runs(recorded)  # 5 and 3 records: 2 all-NaN padding rows for one run
    assert ds.sizes["record"] == 5
    audit = theory.audit(ds)
    assert not audit.bug_detected
    assert all(r.non_finite == 0 for r in audit)
    short = audit.select(source="synthetic-pcgrad")
    assert one(short, "R2", "model", "pcgrad").cases == 3
    assert one(short, "R2", "tensor", "pcgrad").cases == 3 * 5
    assert not any("dropped" in r.note or "non-finite" in r.note for r in audit)
    # the same padding in a single run (not stacked) is dropped but named in the note
    single = geomkit.open_run(recorded / "synthetic-sago").load()
    for var in ("ff", "rr", "fr", "dd", "df", "dr", "n_conflict", "n_both_nonzero", "dr_abs"):
        single[var] = single[var].astype(np.float64)
        single[var].loc[{"record": 4}] = math.nan
    for var in ("n_opposed", "n_projected", "n_unrounded"):
        single[var] = single[var].astype(np.float64)
        single[var].loc[{"record": 4}] = math.nan
    audit = theory.audit(single)
    r1 = one(audit, "R1", "model", "sago")
    assert r1.cases == 4 and not audit.bug_detected and "steps 4" in r1.note


def test_geometry_sums_propagate_nan(recorded):
    ds = geomkit.open_run(recorded / "synthetic-sago")
    bad = tamper(ds, "dr", "sago", 1, NAMES[2], math.nan)
    dr = {by: bad.geom.statistics(by).sel(field="dr", strategy="sago") for by in ("layer", "model")}
    layer = dr["layer"].sel(layer=0)
    assert np.isnan(layer.isel(record=1)) and np.isfinite(layer.drop_sel(record=1)).all()
    assert np.isfinite(dr["layer"].sel(layer=[-1, 1])).all()
    assert (
        np.isnan(dr["model"].isel(record=1)) and np.isfinite(dr["model"].drop_sel(record=1)).all()
    )
    assert np.isnan(bad.geom.metrics("layer")["cos_dr"].sel(strategy="sago", layer=0)[1])


def test_global_pcgrad_comparisons_are_model_level_only(recorded):
    audit = theory.audit(geomkit.open_run(recorded / "synthetic-sago"), claims=["R7", "R8"])
    assert {r.granularity for r in audit.select(claim="R8")} == {"model"}
    r7_global = audit.select(claim="R7", strategy="sago_prefer_retain>=pcgrad_global")
    assert [r.granularity for r in r7_global] == ["model"]
    model = r7_global.results[0]
    assert model.status == "proven" and model.gates is False and model.verdict == "ok"
    assert model.cases == 5 and model.violations == 0 and "outside the bug gate" in model.note
    r7_tensor = one(audit, "R7", "tensor", "sago_prefer_retain>=pcgrad")
    assert r7_tensor.status == "open" and not r7_tensor.gates
    assert {r.granularity for r in audit.select(claim="R7", strategy=r7_tensor.strategy)} == {
        "tensor",
        "layer",
        "model",
    }
    claim = theory.get_claim("R7")
    assert claim.status_at(("sago_prefer_retain", "pcgrad_global"), "model") == "proven"
    assert not claim.gates(("sago_prefer_retain", "pcgrad_global"), "model")
    assert not claim.evaluated_at(("sago_prefer_retain", "pcgrad_global"), "tensor")
    pair = theory.Comparison("sago_prefer_retain", "pcgrad_global")
    assert audit.select(claim="R7", strategy=pair).results == r7_global.results
    assert theory.get_claim("R1").gates("sago", "tensor")
    assert theory.get_claim("R2b").gates("pcgrad_global", "model")
    assert not theory.get_claim("R2b").gates("pcgrad_global", "tensor")
    frame = audit.to_frame()
    assert {"gates", "non_finite", "status", "verdict"} <= set(frame.columns)
    row = frame[(frame.claim == "R7") & (frame.strategy == model.strategy)].iloc[0]
    assert (row.status, bool(row.gates), row.verdict) == ("proven", False, "ok")


def test_violated_ungated_proven_claim_is_reported_but_not_a_bug(recorded):
    ds = geomkit.open_run(recorded / "synthetic-sago")
    bad = tamper(ds, "dr", "sago_prefer_retain", 2, NAMES[0], -50.0)
    audit = theory.audit(bad, claims=["R7"])
    r7 = one(audit, "R7", "model", "sago_prefer_retain>=pcgrad_global")
    assert r7.violations == 1 and r7.verdict == "violated" and not r7.failed
    assert not audit.bug_detected and audit.failures == ()
    assert "outside the gate violated" in audit.table()
    data = r7.to_dict()
    assert data["gates"] is False and CheckResult.from_dict(data) == r7


def test_r2b_per_tensor_failure_is_not_a_bug(recorded):
    # these gradients (rho = -0.3) already give global PCGrad negative tensors: R2b fails per
    # tensor and per layer (status "false") while the model stays aligned (status "proven")
    audit = theory.audit(geomkit.open_run(recorded / "synthetic-sago"), claims=["R2b"])
    tensor = one(audit, "R2b", "tensor", "pcgrad_global")
    assert tensor.violations > 0 and tensor.worst_margin < 0
    assert tensor.status == "false" and not tensor.failed and tensor.verdict == "fails"
    model = one(audit, "R2b", "model", "pcgrad_global")
    assert model.status == "proven" and model.violations == 0 and model.cases == 5
    assert not audit.bug_detected


def test_stacked_runs_are_checked_per_run(recorded):
    ds = geomkit.open_runs(recorded)
    audit = theory.audit(ds)
    assert {r.source for r in audit} == {"synthetic-sago", "synthetic-pcgrad"}
    assert not audit.bug_detected
    per_run = audit.select(source="synthetic-pcgrad")
    assert one(per_run, "R1", "coordinate", "sago").evidence == "materialised"  # verified
    assert one(per_run, "R6", "coordinate", "pcgrad").evidence == "measured"
    assert one(per_run, "R1", "model", "sago").cases == 3  # its own 3 records, not 5
    assert theory.audit(recorded).to_json() == audit.to_json()  # a directory of runs


def test_real_engine_run(tmp_path):
    """A tiny Llama unlearned for two steps by the engine, then audited."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import VOCAB, tiny_llama

    from geomkit.engine import EngineConfig, Unlearner
    from geomkit.objectives import build_objective

    def batch(seed: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(seed))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    config = EngineConfig(strategy="sago", lr=1e-3, steps=2, max_grad_norm=None)
    unlearner = Unlearner(
        tiny_llama(0), build_objective("graddiff"), [batch(1)], [batch(2)], config, out=tmp_path
    )
    unlearner.run()
    audit = theory.audit(geomkit.open_run(tmp_path))
    assert_proven_pass(audit)
    r4 = one(audit, "R4", "layer", "sago>=pcgrad")
    assert r4.cases > 0 and "measured" in r4.note
    # the engine records closed forms; the applied update is measured at the verified record
    r1 = one(audit, "R1", "coordinate", "sago")
    n = sum(p.numel() for p in unlearner.params)
    assert r1.evidence == "materialised" and r1.cases == n and r1.verdict == "ok"
    r0 = one(audit, "R0", "tensor", "sago")
    assert r0.evidence == "materialised" and r0.cases == len(unlearner.params)
    breakdown = theory.r4_breakdown(geomkit.open_run(tmp_path))
    assert list(breakdown["layer"].values) == [-1, 0, 1]
    np.testing.assert_array_equal(breakdown["cases_by_layer"].sum("layer"), breakdown["cases"])


# ----------------------------------------------------------------------------------------------
# 4. R4 breakdown
# ----------------------------------------------------------------------------------------------


def test_r4_breakdown_synthetic_depends_on_norm_ratio():
    b = theory.r4_breakdown(Gaussian(norm_ratio=(0.01, 100.0)), n=64, seed=0)
    assert list(b["against"].values) == ["pcgrad", "pcgrad_global"]
    rate = b["rate_by_ratio"].sel(against="pcgrad")
    small = rate.where(b["ratio_high"] <= 0.1, drop=True)
    large = rate.where(b["ratio_low"] >= 10.0, drop=True)
    assert float(small.min()) > 0.9 and float(large.max()) < 0.1  # fails at small |f|/|r|
    assert int(b["cases_by_ratio"].sum()) == int(b["cases"].sum()) * 1
    for name in ("cases", "violations", "rate", "mean_gap", "median_gap", "worst_gap"):
        assert name in b
    assert b.attrs["claim"] == "R4"


def test_r4_breakdown_of_counterexamples_and_runs(recorded):
    b = theory.r4_breakdown(Counterexamples(), by="model")
    np.testing.assert_array_equal(b["violations"].values, [3, 3])
    b = theory.r4_breakdown(geomkit.open_runs(recorded), by="layer")
    assert set(b.attrs["sources"]) == {"synthetic-sago", "synthetic-pcgrad"}
    assert int(b["cases"].sel(against="pcgrad")) == (5 + 3) * 3
    np.testing.assert_array_equal(b["cases_by_layer"].sum("layer"), b["cases"])
    with pytest.raises(ValueError, match="'block'"):
        theory.r4_breakdown(Counterexamples(), by="block")
    with pytest.raises(ValueError, match="increasing"):
        theory.r4_breakdown(Counterexamples(), bins=[1.0, 0.5])
    with pytest.raises(ValueError, match=r"invalid bins=\[0\.1, 10\.0\]: .*cover \[0, inf\]"):
        theory.r4_breakdown(Counterexamples(), bins=[0.1, 10.0])
    with pytest.raises(ValueError, match=r"cover \[0, inf\]"):
        theory.r4_breakdown(Counterexamples(), bins=[0.0, 1.0, 100.0])
    b = theory.r4_breakdown(Counterexamples(), bins=[0.0, 1.0, math.inf])
    np.testing.assert_array_equal(b["cases_by_ratio"].sum("ratio_bin"), b["cases"])
    assert list(b["ratio_bin"].values) == ["[0, 1)", "[1, inf)"]
    with pytest.raises(ValueError, match=r"'layer'.*synthetic.*'tensor' or 'model'"):
        theory.r4_breakdown(Counterexamples(), by="layer")


def test_r4_breakdown_counts_non_finite_cases(recorded):
    ds = geomkit.open_run(recorded / "synthetic-sago")
    b = theory.r4_breakdown(tamper(ds, "dr", "sago", 1, NAMES[2], math.nan), by="model")
    clean = theory.r4_breakdown(ds, by="model")
    assert (b["cases"] == 5).all() and (b["non_finite"] == 1).all() and (b["undefined"] == 0).all()
    assert (b["violations"] == clean["violations"] + 1).all()
    assert (b["worst_gap"] == -np.inf).all() and np.isfinite(b["mean_gap"]).all()


# ----------------------------------------------------------------------------------------------
# 5. Result types and validation
# ----------------------------------------------------------------------------------------------


def test_audit_round_trips_through_json_and_renders(tmp_path):
    audit = theory.audit_synthetic([Counterexamples(), Zeros(dtype=torch.float16)], n=4)
    path = tmp_path / "audit.json"
    text = audit.to_json(path)
    data = json.loads(path.read_text())  # strict JSON: NaN written as null
    assert data["bug_detected"] is False and len(data["results"]) == len(audit)
    again = Audit.from_json(path)
    assert again.to_json() == text
    assert Audit.from_json(text).to_json() == text
    assert [r.claim for r in again] == [r.claim for r in audit]
    frame = audit.to_frame()
    for column in (
        "claim",
        "granularity",
        "strategy",
        "status",
        "source",
        "cases",
        "undefined",
        "violations",
        "violation_rate",
        "worst_margin",
        "where",
        "tolerance",
        "note",
    ):
        assert column in frame.columns
    assert len(frame) == len(audit)
    table = str(audit)
    assert "R4" in table and "sago>=pcgrad" in table and "no proven claim violated" in table
    result = audit.results[0]
    assert CheckResult.from_dict(result.to_dict()).to_dict().keys() == result.to_dict().keys()
    empty = Audit(())
    assert not empty.bug_detected and "no proven claim violated" in empty.table()
    nothing = CheckResult.from_dict({**result.to_dict(), "cases": 0, "violations": 0})
    assert math.isnan(nothing.violation_rate) and nothing.verdict == "n/a"


def test_bad_input_raises_with_the_offending_value():
    with pytest.raises(ValueError, match=r"1\.5"):
        Gaussian(rho=1.5)
    with pytest.raises(ValueError, match="-2"):
        Gaussian(norm_ratio=-2.0)
    with pytest.raises(TypeError, match="str"):
        Gaussian(norm_ratio="big")
    with pytest.raises(ValueError, match="int32"):
        Gaussian(dtype=torch.int32)
    with pytest.raises(ValueError, match="0"):
        Gaussian().sample(0)
    with pytest.raises(ValueError, match="R11"):
        theory.audit_synthetic(Counterexamples(), claims=["R11"])
    with pytest.raises(ValueError, match="-1"):
        theory.audit_synthetic(Counterexamples(), alpha=-1.0)
    with pytest.raises(ValueError, match="blur"):
        theory.audit_synthetic(Counterexamples(), implementations={"blur": build("sum")})
    with pytest.raises(TypeError, match="int"):
        theory.audit(42)
    with pytest.raises(ValueError, match="'ff'"):
        import xarray as xr

        theory.audit(xr.Dataset({"x": ("a", [1.0])}))
    with pytest.raises(ValueError, match="status"):
        CheckResult(
            claim="R1",
            statement="",
            status="maybe",
            strategy="sago",
            strategies=("sago",),
            granularity="tensor",
            source="x",
            cases=1,
            undefined=0,
            violations=0,
            worst_margin=0.0,
            where="",
            tolerance="",
        )


def test_claims_compare_strategies_as_pairs_not_strings():
    r7 = theory.get_claim("R7")
    pair = theory.Comparison("sago_prefer_retain", "pcgrad_global")
    # the table holds Comparison pairs; a plain tuple is the same key
    assert pair in r7.strategies and ("sago_prefer_retain", "pcgrad") in r7.strategies
    assert all(isinstance(s, theory.Comparison) for s in r7.strategies)
    assert str(pair) == "sago_prefer_retain>=pcgrad_global"
    assert r7.status_at(pair, "model") == "proven" and r7.status_at(pair, "tensor") == "open"
    assert r7.status_at(("sago_prefer_retain", "pcgrad"), "model") == "open"
    # Strategy objects stand for their label, alone or in a pair
    assert r7.status_at((build("sago_prefer_retain"), build("pcgrad_global")), "model") == (
        "proven"
    )
    r6 = theory.get_claim("R6")
    assert r6.gates(build("sago"), "coordinate") and not r6.gates(build("pcgrad"), "coordinate")
    # the old "a>=b" spelling still works, with geomkit's deprecation warning (a FutureWarning,
    # shown in notebooks, unlike DeprecationWarning)
    from geomkit._deprecation import GeomkitDeprecationWarning

    with pytest.warns(GeomkitDeprecationWarning, match="deprecated"):
        assert r7.status_at("sago_prefer_retain>=pcgrad_global", "model") == "proven"
    with pytest.raises(TypeError, match="pair"):
        r7.status_at(("sago", "pcgrad", "blur"), "model")
    with pytest.raises(TypeError, match="strategy name"):
        r7.status_at(3, "model")
