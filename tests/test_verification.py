"""Shadow verification (issue 10, A3): the recorder materialises each shadow's update with the
strategy's own code on a schedule, and claim V1 compares it with the stored closed forms
(docs/theory.md#v1)."""

from __future__ import annotations

import math
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import geomkit
from geomkit import theory
from geomkit.cli import main
from geomkit.config import ConfigError, RunConfig
from geomkit.engine import EngineConfig
from geomkit.recorder import VERIFY_EVERY, Recorder
from geomkit.store import VERIFICATION_VARIABLES, VERIFIED_FIELDS
from geomkit.strategies import Strategy

NAMES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight")
SHAPES = ((24, 16), (40,))
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def record(
    path: Path,
    dtype: torch.dtype = torch.float32,
    steps: int = 3,
    scale: float = 1.0,
    applied: str = "sago",
    **kwargs,
) -> Path:
    """A run of random tensors (one correlation sign per step) through the public hook."""
    g = torch.Generator().manual_seed(3)
    rec = Recorder(
        path / "geometry.zarr",
        NAMES,
        [math.prod(s) for s in SHAPES],
        applied,
        attrs={"dtype": str(dtype).replace("torch.", "")},
        **kwargs,
    )
    for step in range(steps):
        rho = -0.4 if step % 2 == 0 else 0.4
        z = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
        w = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
        f = [(x * scale).to(dtype) for x in z]
        r = [
            ((rho * x + math.sqrt(1 - rho**2) * y) * scale).to(dtype)
            for x, y in zip(z, w, strict=True)
        ]
        rec.record(step, f, r, forget_loss=1.0, retain_loss=1.0)
    rec.close()
    return path


def v1(source) -> list[theory.CheckResult]:
    return list(theory.audit(source, claims=["V1"]))


# ----------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------


def test_first_record_and_every_kth_after_are_verified(tmp_path: Path) -> None:
    run = record(tmp_path, steps=14, schedule=2, verify_every=3)  # records at steps 0, 2, ...
    ds = geomkit.open_run(run)
    verified = np.isin(ds["record"].values, [0, 6, 12])
    assert ds.attrs["applied_statistics"] == "closed_form"  # record() without combined
    for name in VERIFICATION_VARIABLES:
        values = ds[name].values
        assert np.isfinite(values[verified]).all(), name  # the applied strategy's too
        assert np.isnan(values[~verified]).all(), name


def test_default_verifies_the_first_record(tmp_path: Path) -> None:
    assert VERIFY_EVERY == RunConfig().verify_every == EngineConfig().verify_every == 50
    ds = geomkit.open_run(record(tmp_path, steps=52))
    verified = np.isfinite(ds["verified_n_opposed"].values).any(axis=(1, 2))
    assert np.flatnonzero(verified).tolist() == [0, 50]


def test_verified_statistics_are_the_strategies_own(tmp_path: Path) -> None:
    ds = geomkit.open_run(record(tmp_path, steps=1))
    g = torch.Generator().manual_seed(3)  # the recorded tensors, regenerated
    z = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    w = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    forget = [x.float() for x in z]
    retain = [(-0.4 * x + math.sqrt(1 - 0.16) * y).float() for x, y in zip(z, w, strict=True)]
    for k, label in enumerate(ds["strategy"].values[1:], start=1):
        strategy = geomkit.strategies.build(str(label))
        own = geomkit.statistics.sufficient(
            forget, retain, strategy(forget, retain), strategy=strategy
        )
        for name in VERIFIED_FIELDS:
            expected = own[:, geomkit.fields.INDEX[name]].numpy()
            np.testing.assert_array_equal(ds[f"verified_{name}"].values[0, k], expected)


def test_one_materialised_tensor_at_a_time(tmp_path: Path, monkeypatch) -> None:
    # every update is formed one tensor at a time into one reused temporary, never whole
    storages: set[int] = set()
    calls = []
    original = Strategy.combine_tensor

    def combine_tensor(self, f, r, out, dots):
        storages.add(out.untyped_storage().data_ptr())
        calls.append(weakref.ref(out))
        return original(self, f, r, out, dots)

    def whole(*args, **kwargs):
        raise AssertionError("a whole update was formed")

    rec = Recorder(tmp_path / "g.zarr", NAMES, [math.prod(s) for s in SHAPES], "sago")
    forget = [torch.randn(s) for s in SHAPES]
    retain = [torch.randn(s) for s in SHAPES]
    measured = rec.measure(forget, retain)
    monkeypatch.setattr(Strategy, "combine_tensor", combine_tensor)
    monkeypatch.setattr(Strategy, "__call__", whole)
    rec.verify(forget, retain, measured, applied=True)
    assert len(calls) == len(SHAPES) * len(rec.strategies)
    assert len(storages) <= len(rec.strategies)  # one temporary per strategy, reused
    assert not any(ref() is not None for ref in calls)  # freed once measured
    rec.close()


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_verify_every_is_validated(value, tmp_path: Path) -> None:
    with pytest.raises((ValueError, TypeError), match="verify_every"):
        Recorder(tmp_path / "g.zarr", ["w"], [4], "sago", verify_every=value)
    with pytest.raises(ConfigError, match="verify_every"):
        EngineConfig(verify_every=value).validate()
    with pytest.raises(ConfigError, match="verify_every"):
        RunConfig(verify_every=value).validate()


def test_verify_every_zero_records_nothing_verified(tmp_path: Path) -> None:
    run = record(tmp_path, verify_every=0)
    assert np.isnan(geomkit.open_run(run)["verified_dd"].values).all()
    results = v1(run)
    assert all(r.cases == 0 and "not verified" in r.note and not r.failed for r in results)


# ----------------------------------------------------------------------------------------------
# Older stores
# ----------------------------------------------------------------------------------------------


def _strip_verification(run: Path) -> None:
    """The store as a geomkit before verification wrote it."""
    for name in VERIFICATION_VARIABLES:
        shutil.rmtree(run / "geometry.zarr" / name)


def test_store_without_verification_opens_and_audits_as_not_verified(tmp_path: Path) -> None:
    run = record(tmp_path)
    _strip_verification(run)
    ds = geomkit.open_run(run)
    assert not set(VERIFICATION_VARIABLES) & set(ds.data_vars)
    audit = theory.audit(run)
    assert not audit.bug_detected
    results = audit.select(claim="V1")  # the closed-form applied strategy's included
    assert len(results) == 6 and all(r.cases == 0 and r.verdict == "n/a" for r in results)
    assert all("not verified" in r.note for r in results)
    shadow = audit.get("R6", "coordinate", "sago_prefer_retain")
    assert shadow.evidence == "by construction" and shadow.cases == 0


def test_appending_to_a_store_without_verification(tmp_path: Path) -> None:
    run = record(tmp_path, steps=2)
    _strip_verification(run)
    rec = Recorder(
        run / "geometry.zarr",
        NAMES,
        [math.prod(s) for s in SHAPES],
        "sago",
        mode="a",
        resume_step=2,
    )
    rec.record(2, [torch.randn(s) for s in SHAPES], [torch.randn(s) for s in SHAPES])
    rec.close()
    ds = geomkit.open_run(run)
    assert ds["record"].values.tolist() == [0, 1, 2] and "verified_dd" not in ds


def test_a_lost_verification_array_is_damage(tmp_path: Path) -> None:
    run = record(tmp_path)
    (run / "geometry.zarr" / "verified_dr" / "zarr.json").unlink()
    with pytest.raises(geomkit.store.DamagedStoreError, match="verified_dr"):
        geomkit.open_run(run)


# ----------------------------------------------------------------------------------------------
# V1: honest runs pass, planted differences are caught, per dtype
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 1e-6])
@pytest.mark.parametrize("dtype", DTYPES)
def test_honest_runs_pass_v1(dtype: torch.dtype, scale: float, tmp_path: Path) -> None:
    # scale 1e-6: float16 coordinates in the subnormal range, updates rounding to zero
    run = record(tmp_path, dtype, steps=4, scale=scale, verify_every=1)
    results = v1(run)
    assert {r.strategy for r in results} == set(geomkit.strategies.names())  # applied too
    for r in results:
        assert r.cases == 4 * len(SHAPES) and r.violations == 0, r
        assert r.worst_margin < 1 and r.evidence == "materialised"
    assert main(["check", str(run), "--json", str(tmp_path / "a.json")]) == 0


# a change of cos(d, x) (of |d|^2 relative, for dd) in one stored closed form that V1 must
# catch in each dtype: a few times the rounding of the materialised update, rho = u + 6 u_c
# with u = 2^-9, 2^-11, 2^-24 (bfloat16, float16, float32) and u_c = 2^-24
PLANTED = {torch.bfloat16: 0.01, torch.float16: 3e-3, torch.float32: 3e-6}


@pytest.mark.parametrize("field", ["dd", "df", "dr"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_planted_difference_in_a_closed_form_is_a_bug(
    dtype: torch.dtype, field: str, tmp_path: Path
) -> None:
    run = record(tmp_path, dtype, steps=2)
    ds = geomkit.open_run(run).load()
    k = list(ds["strategy"].values).index("pcgrad")
    other = {"dd": ds["dd"].values[0, k, 1], "df": ds["ff"].values[0, 1]}  # cos(d, x) + delta
    scale = math.sqrt(ds["dd"].values[0, k, 1] * other.get(field, ds["rr"].values[0, 1]))
    ds[field].values[0, k, 1] += PLANTED[dtype] * scale  # one tensor of a verified record
    audit = theory.audit(ds, claims=["V1"])
    bad = audit.get("V1", "tensor", "pcgrad")
    assert bad.failed and bad.violations == 1 and bad.where == f"step 0, tensor {NAMES[1]}"
    assert bad.details[f"max_ratio_{field}"] > 1
    assert not any(r.failed for r in audit if r.strategy != "pcgrad")


def test_prefer_retain_statistics_replaced_by_the_sums_are_caught(tmp_path: Path) -> None:
    # the review's example: before verification this passed (R6 accepted by construction)
    run = record(tmp_path, torch.bfloat16, steps=2)
    group = zarr.open_group(run / "geometry.zarr", mode="r+")
    names = list(geomkit.open_run(run)["strategy"].values)
    k, s = names.index("sago_prefer_retain"), names.index("sum")
    for field in ("dd", "df", "dr"):
        values = group[field][:]
        values[:, k] = values[:, s]
        group[field][:] = values
    assert main(["check", str(run), "--json", str(tmp_path / "a.json")]) == 1
    bad = theory.audit(run).get("V1", "tensor", "sago_prefer_retain")
    assert bad.failed and bad.violations == len(SHAPES)  # the verified record, every tensor


def test_count_mismatches_are_caught(tmp_path: Path) -> None:
    ds = geomkit.open_run(record(tmp_path, steps=1)).load()
    names = list(ds["strategy"].values)
    ds["n_opposed"].values[0, names.index("pcgrad"), 0] += 1  # beyond the ambiguous count 0
    ds["n_projected"].values[0, names.index("pcgrad_global"), 0] = 0  # fired at step 0
    audit = theory.audit(ds, claims=["V1"])
    opposed = audit.get("V1", "tensor", "pcgrad")
    assert opposed.failed and opposed.details["n_opposed_mismatches"] == 1
    projected = audit.get("V1", "tensor", "pcgrad_global")
    assert projected.failed and projected.details["n_projected_mismatches"] == 1


def test_shadow_sago_r6_is_measured_at_verified_records(tmp_path: Path) -> None:
    run = record(tmp_path, steps=3, applied="pcgrad", verify_every=2)
    audit = theory.audit(run, claims=["R1", "R6"])
    for claim, strategy in (("R1", "sago"), ("R6", "sago"), ("R6", "sago_prefer_retain")):
        r = audit.get(claim, "coordinate", strategy)
        numel = sum(math.prod(s) for s in SHAPES)
        assert r.evidence == "materialised" and r.cases == 2 * numel and r.verdict == "ok"
    ds = geomkit.open_run(run).load()
    k = list(ds["strategy"].values).index("sago_prefer_retain")
    ds["verified_n_opposed"].values[2, k, 0] = 3  # the materialised update opposes r
    bad = theory.audit(ds, claims=["R6"]).get("R6", "coordinate", "sago_prefer_retain")
    assert bad.failed and bad.violations == 3
