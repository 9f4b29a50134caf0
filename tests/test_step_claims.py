"""The step claims S1 and S2 (docs/theory.md#s1, #s2; issue 12 point 4): open, measured from the
step fields of the applied strategy, never gated.

1. SGD without clipping or weight decay moves by u = lr d, so cos(u, r) = cos(d, r) and S1 holds
   for a SAGO run (R1); AdamW need not keep it.
2. A planted cos(u, r) < 0 is reported with its count, worst value and location, and never
   gates (nor ``geomkit check``'s exit status).
3. A store without step statistics: S1 and S2 are not evaluated, with a note.
4. S2 pairs a SAGO run with a PCGrad run of the same objective and seed, step by step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from tiny import VOCAB, tiny_llama

import geomkit
from geomkit import theory
from geomkit.cli import main
from geomkit.engine import EngineConfig, Unlearner
from geomkit.fields import STEP_FIELDS
from geomkit.objectives import build_objective
from geomkit.store import STORE_NAME
from geomkit.theory.steps import FORMATION_SLACK, NOT_RECORDED

SEQ = 12
GRANULARITIES = ("tensor", "layer", "model")


def batches(seed: int, n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (4, SEQ), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def record(out: Path, strategy: str, **config) -> Path:
    """A tiny GradDiff run with ``strategy`` applied, its store written into the run directory
    ``out`` (its label: the directory's name)."""
    settings = dict(
        strategy=strategy, steps=4, lr=1e-2, warmup_ratio=0.0, flush_every=2, verify_every=0
    )
    settings.update(config)
    unlearner = Unlearner(
        tiny_llama(0),
        build_objective("graddiff"),
        batches(1),
        batches(2),
        EngineConfig(**settings),
        out / STORE_NAME,
    )
    unlearner.run()
    return out


SGD = dict(optimizer="sgd", max_grad_norm=None, weight_decay=0.0)


@pytest.fixture(scope="module")
def sgd_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("steps")
    return {s: record(root / f"graddiff-{s}-seed0", s, **SGD) for s in ("sago", "pcgrad")}


def cosines(ds, by: str) -> tuple[np.ndarray, np.ndarray]:
    """cos(u, r) and the applied strategy's cos(d, r) per (record, part), from ds.geom."""
    metrics = ds.geom.metrics(by=by)
    cos_ur = metrics["cos_ur"]
    cos_dr = metrics["cos_dr"].isel(strategy=0)  # the applied strategy comes first
    if by == "model":
        return cos_ur.values.reshape(-1, 1), cos_dr.values.reshape(-1, 1)
    return cos_ur.transpose("record", by).values, cos_dr.transpose("record", by).values


# ----------------------------------------------------------------------------------------------
# the claim table
# ----------------------------------------------------------------------------------------------


def test_step_claims_are_open_and_never_gate():
    for cid in ("S1", "S2"):
        claim = theory.get_claim(cid)
        assert claim.status == "open" and not claim.overrides
        assert claim.granularities == GRANULARITIES
        for subject in claim.strategies:
            for granularity in GRANULARITIES:
                assert claim.status_at(subject, granularity) == "open"
                assert not claim.gates(subject, granularity)
    assert set(theory.get_claim("S2").strategies) == {("sago", "pcgrad"), ("sago", "pcgrad_global")}


# ----------------------------------------------------------------------------------------------
# 1. SGD: u = lr d
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("by", GRANULARITIES)
def test_sgd_step_has_the_cosine_of_d_and_s1_holds_for_sago(sgd_runs, by):
    ds = geomkit.open_run(sgd_runs["sago"])
    cos_ur, cos_dr = cosines(ds, by)
    assert np.isfinite(cos_ur).all()
    np.testing.assert_allclose(cos_ur, cos_dr, rtol=0, atol=1e-9)  # u = lr d, up to float64
    result = theory.audit(ds, claims=["S1"]).get("S1", by, "sago")
    assert result.status == "open" and not result.gates
    assert result.evidence == "measured"
    assert result.cases == cos_ur.size and result.undefined == 0
    assert (result.violations, result.non_finite) == (0, 0)
    assert result.verdict == "holds"
    assert result.worst_margin == pytest.approx(cos_ur.min(), abs=1e-12)
    assert result.details["d_violations"] == 0 and result.details["optimizer_introduced"] == 0
    assert result.details["measured_records"] == ds.sizes["record"]
    assert "proven (R1)" in result.note


def test_s1_tolerance_is_float64_only(sgd_runs):
    ds = geomkit.open_run(sgd_runs["sago"])
    n = float(ds["numel"].sum())
    t = ds.sizes["tensor"]
    want = 4 * (n + t + 8) * 2.0**-53 + FORMATION_SLACK
    assert want < 1e-10
    # a cosine just below -want is a violation, one just above is not (ties hold)
    for value, bad in ((-0.5 * want, 0), (-2.0 * want, 1)):
        result = theory.audit(plant(ds, {(1, 0): value}), claims=["S1"]).get("S1", "tensor")
        assert result.violations == bad
        assert result.worst_margin == pytest.approx(value, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# 2. A planted violation: count, worst value, location; never gating
# ----------------------------------------------------------------------------------------------


def plant(ds, cells: dict[tuple[int, int], float]):
    """``ds`` with ``ur`` set so that cos(u, r) is the given value at (record, tensor) cells."""
    ds = ds.copy(deep=True)
    ur = ds["ur"].transpose("record", "tensor").values.copy()
    uu = ds["uu"].transpose("record", "tensor").values
    rr = ds["rr"].transpose("record", "tensor").values
    for (i, j), cos in cells.items():
        ur[i, j] = cos * np.sqrt(uu[i, j] * rr[i, j])
    ds["ur"] = (("record", "tensor"), ur)
    return ds


def test_planted_violation_is_counted_located_and_never_gates(sgd_runs):
    ds = plant(geomkit.open_run(sgd_runs["sago"]), {(1, 2): -0.5, (2, 5): -0.25, (2, 2): -0.1})
    tensors = [str(t) for t in ds["tensor"].values]
    audit = theory.audit(ds)
    assert not audit.bug_detected and not audit.failures
    s1 = audit.get("S1", "tensor", "sago")
    assert (s1.violations, s1.non_finite, s1.verdict, s1.gates) == (3, 0, "fails", False)
    assert s1.violation_rate == pytest.approx(3 / s1.cases)
    assert s1.worst_margin == pytest.approx(-0.5, abs=1e-12)
    assert s1.where == f"step 1, tensor {tensors[2]}"
    assert "fails at step 1, step 2" in s1.note
    assert f"most often at tensor {tensors[2]} (2), tensor {tensors[5]} (1)" in s1.note
    assert s1.details["failing_steps"] == 2 and s1.details["failing_parts"] == 2
    # the d-level statement held there: the (planted) step broke it
    assert s1.details["d_violations"] == 0 and s1.details["optimizer_introduced"] == 3
    # layer and model: exactly the groups whose summed <u, r> became negative
    for by in ("layer", "model"):
        cos_ur, _ = cosines(ds, by)
        result = audit.get("S1", by, "sago")
        assert result.violations == int((cos_ur < 0).sum())
        assert result.worst_margin == pytest.approx(cos_ur.min(), abs=1e-12)
        assert not result.gates and not result.failed
    # a NaN step statistic at a measured record is a (non-gating) violation, never a pass
    nan = plant(ds, {(3, 0): np.nan})
    result = theory.audit(nan, claims=["S1"]).get("S1", "tensor")
    assert result.non_finite == 1 and result.worst_margin == -np.inf
    assert not theory.audit(nan).bug_detected


def test_check_reports_step_claims_and_exits_zero(sgd_runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "graddiff-sago-seed0"
    shutil.copytree(sgd_runs["sago"], run)
    group = zarr.open_group(run / STORE_NAME, mode="r+")
    ur, uu, rr = group["ur"][:], group["uu"][:], group["rr"][:]
    ur[1, 3] = -0.75 * np.sqrt(uu[1, 3] * rr[1, 3])  # dims (record, tensor)
    group["ur"][:] = ur
    assert main(["check", str(run), "--json", str(tmp_path / "audit.json")]) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line.startswith(("S1 ", "S2 "))]
    s1 = [r for r in rows if r[:2] == ["S1", "tensor"]]
    assert s1 and s1[0][3:5] == ["open", "fails"] and s1[0][6] == "no"
    assert "-0.75" in " ".join(s1[0])
    assert any(r[0] == "S2" and r[4] == "n/a" for r in rows)  # no PCGrad run beside it
    report = theory.Audit.from_json(tmp_path / "audit.json")
    assert report.get("S1", "tensor").violations == 1 and not report.bug_detected


# ----------------------------------------------------------------------------------------------
# 3. No step statistics: not evaluated
# ----------------------------------------------------------------------------------------------


def test_missing_step_fields_are_not_evaluated(sgd_runs, tmp_path):
    old = geomkit.open_run(sgd_runs["sago"]).drop_vars(list(STEP_FIELDS))  # as a version 2 store
    off = geomkit.open_run(record(tmp_path / "graddiff-pcgrad-seed0", "pcgrad", record_step=False))
    assert np.isnan(off["uu"].values).all()
    audit = theory.audit([old, off], claims=["S1", "S2"])
    s1 = audit.select(claim="S1")
    assert len(s1) == 6  # two runs x three granularities
    for result in s1:
        assert (result.cases, result.violations, result.verdict) == (0, 0, "n/a")
        assert result.note == NOT_RECORDED and not result.gates
    s2 = audit.select(claim="S2", strategy=("sago", "pcgrad"))
    assert len(s2) == 1 and s2.results[0].cases == 0
    assert "the step was not recorded" in s2.results[0].note
    assert not audit.bug_detected


# ----------------------------------------------------------------------------------------------
# 4. S2: a SAGO run against a PCGrad run
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("by", GRANULARITIES)
def test_s2_compares_the_runs_steps_record_by_record(sgd_runs, by):
    sago, pcgrad = (geomkit.open_run(sgd_runs[s]) for s in ("sago", "pcgrad"))
    audit = theory.audit([sgd_runs["sago"], sgd_runs["pcgrad"]], claims=["S2"])
    assert not audit.bug_detected
    result = audit.get("S2", by, ("sago", "pcgrad"))
    assert result.source == "graddiff-sago-seed0" and not result.gates
    assert "against run 'graddiff-pcgrad-seed0'" in result.note
    assert "share the gradients only at the first step" in result.note
    gap = cosines(sago, by)[0] - cosines(pcgrad, by)[0]
    assert result.cases == gap.size
    assert result.violations == int((gap < -1e-9).sum())
    assert result.worst_margin == pytest.approx(gap.min(), abs=1e-12)
    # at the first step both runs took the same gradients and SGD moved by lr d: the step gap
    # is the d-level gap (R4) on those gradients, up to the float32 rounding of the applied
    # PCGrad update (the SAGO run's PCGrad shadow is a float64 closed form)
    d_gap = sago.geom.metrics(by=by)["cos_dr"]
    d_gap = (d_gap.sel(strategy="sago") - d_gap.sel(strategy="pcgrad")).isel(record=0)
    np.testing.assert_allclose(gap[0], np.ravel(d_gap.values), rtol=0, atol=1e-6)
    assert not np.allclose(gap[1:], gap[0], atol=1e-3)  # later, the trajectories differ
    assert result.details["d_cases_sago_run"] == gap.size
    # global PCGrad was not applied in any run: not evaluated, with the reason
    other = audit.select(claim="S2", strategy=("sago", "pcgrad_global")).results
    assert len(other) == 1 and other[0].cases == 0
    assert "no run with pcgrad_global applied" in other[0].note


def test_s2_needs_both_runs(sgd_runs):
    audit = theory.audit(sgd_runs["pcgrad"], claims=["S2"])
    results = audit.select(claim="S2", strategy=("sago", "pcgrad")).results
    assert len(results) == 1 and results[0].verdict == "n/a"
    assert "no run with sago applied" in results[0].note
    assert results[0].source == "graddiff-pcgrad-seed0"
