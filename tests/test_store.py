"""Tests for geomkit.store: the versioned run schema streamed to zarr.

Layout:

1. round trip: blocks appended with :class:`RunWriter` come back exactly through
   :func:`open_run` (values, coordinates, attributes, CF metadata), and plain
   ``xarray.open_zarr`` opens a cleanly written store;
2. kill safety: a writer process killed with SIGKILL after some flushes loses nothing that was
   flushed; a kill in the middle of an append (arrays longer than the committed count, all or
   only some of them) is cut back to the committed part;
3. resume: ``mode="a"`` with ``resume_step`` drops everything at and after that step and
   appending continues with neither duplicates nor gaps;
4. errors: foreign stores, other schema versions, missing paths;
5. :func:`open_runs` stacks runs along ``run``, labelled by directory name;
6. integrity: deleted, truncated or corrupted chunks and lost metadata raise
   :class:`DamagedStoreError` naming the variable, the chunk and the records affected, or are
   masked on request; version 1 stores still open, and are not appended to.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from geomkit.layers import locate_all
from geomkit.recorder import Never
from geomkit.store import (
    COORDINATES,
    EVALUATION_VARIABLES,
    SCHEMA_VERSION,
    SINCE,
    VARIABLES,
    DamagedStoreError,
    DamagedStoreWarning,
    RunWriter,
    SchemaError,
    open_run,
    open_runs,
)

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.1.mlp.gate_proj.weight",
    "lm_head.weight",
]
NUMEL = [2048, 1024, 2048, 32, 2048, 2048]
# What a Llama's names must map to (written out by hand, not taken from geomkit.layers).
LAYER = [-1, 0, 0, 1, 1, -1]
COMPONENT = ["embed", "attn_q", "mlp_down", "norm", "mlp_gate", "lm_head"]
MODULE = ["embed", "attention", "mlp", "norm", "mlp", "lm_head"]
STRATEGIES = ["sago", "pcgrad", "sum"]
STEP_VARS = ["forget_loss", "retain_loss", "learning_rate", "grad_norm", "wall_time", "skipped"]
PAIR_VARS = ["ff", "rr", "fr", "n_conflict", "n_both_nonzero"]
UPDATE_VARS = ["dd", "df", "dr", "n_opposed", "n_projected", "dr_abs", "n_unrounded"]


def make_steps(steps, rng: np.random.Generator) -> dict[str, np.ndarray]:
    steps = np.asarray(list(steps), dtype=np.int64)
    n = len(steps)
    return {
        "step": steps,
        "forget_loss": rng.normal(size=n),
        "retain_loss": rng.normal(size=n),
        "learning_rate": rng.uniform(0, 1e-3, size=n),
        "grad_norm": rng.uniform(0, 5, size=n),
        "wall_time": np.cumsum(rng.uniform(0, 1, size=n)),
        "skipped": rng.uniform(size=n) < 0.3,
    }


def make_records(records, rng: np.random.Generator, n_strategies: int = 3) -> dict:
    records = np.asarray(list(records), dtype=np.int64)
    n, t = len(records), len(NAMES)
    block = {"record": records}
    for name in ("ff", "rr"):
        block[name] = rng.uniform(0, 10, size=(n, t))
    block["fr"] = rng.normal(size=(n, t))
    block["n_conflict"] = rng.integers(0, 1000, size=(n, t))
    block["n_both_nonzero"] = rng.integers(1000, 2000, size=(n, t))
    block["dd"] = rng.uniform(0, 10, size=(n, n_strategies, t))
    for name in ("df", "dr"):
        block[name] = rng.normal(size=(n, n_strategies, t))
    block["n_opposed"] = rng.integers(0, 50, size=(n, n_strategies, t))
    block["n_projected"] = rng.integers(0, 2, size=(n, n_strategies, t))
    block["dr_abs"] = np.abs(block["dr"]) + rng.uniform(0, 1, size=(n, n_strategies, t))
    block["n_unrounded"] = rng.integers(0, 2, size=(n, n_strategies, t))
    return block


def concat(blocks: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def new_writer(path: Path, **kwargs) -> RunWriter:
    attrs = kwargs.pop("attrs", {"model": "TinyLlama", "seed": 7, "alpha": 0.5, "gamma": 1.0})
    return RunWriter(path, locate_all(NAMES), NUMEL, STRATEGIES, attrs, **kwargs)


def assert_matches(ds: xr.Dataset, steps: dict | None, records: dict | None) -> None:
    """``ds`` holds exactly ``steps`` and ``records`` (every variable, exact values)."""
    if steps is None:
        assert ds.sizes["step"] == 0
    else:
        np.testing.assert_array_equal(ds["step"].values, steps["step"])
        for name in STEP_VARS:
            np.testing.assert_array_equal(ds[name].values, steps[name], err_msg=name)
    if records is None:
        assert ds.sizes["record"] == 0
    else:
        np.testing.assert_array_equal(ds["record"].values, records["record"])
        for name in PAIR_VARS + UPDATE_VARS:
            np.testing.assert_array_equal(ds[name].values, records[name], err_msg=name)


def write_blocks(path: Path, pattern, seed: int = 0, **kwargs):
    """Write blocks ``pattern = [(steps, records), ...]``; return the concatenated data."""
    rng = np.random.default_rng(seed)
    writer = new_writer(path, **kwargs)
    step_blocks, record_blocks = [], []
    for steps, records in pattern:
        s = make_steps(steps, rng) if steps is not None else None
        r = make_records(records, rng) if records is not None else None
        writer.append(s, r)
        if s is not None:
            step_blocks.append(s)
        if r is not None:
            record_blocks.append(r)
    return (
        writer,
        concat(step_blocks) if step_blocks else None,
        concat(record_blocks) if record_blocks else None,
    )


# ----------------------------------------------------------------------------------------------
# 1. Round trip
# ----------------------------------------------------------------------------------------------

PATTERN = [(range(0, 3), [0, 2]), (range(3, 5), None), (None, [4]), (range(5, 9), [6, 8])]


def test_round_trip_values_coordinates_and_attributes(tmp_path: Path) -> None:
    path = tmp_path / "run.zarr"
    writer, steps, records = write_blocks(path, PATTERN)
    assert writer.committed == (9, 5)

    ds = open_run(path)
    assert_matches(ds, steps, records)
    assert dict(ds.sizes) == {
        "step": 9,
        "record": 5,
        "evaluation": 0,
        "tensor": len(NAMES),
        "strategy": 3,
    }

    # coordinates
    assert list(ds["tensor"].values) == NAMES
    assert list(ds["layer"].values) == LAYER
    assert list(ds["component"].values) == COMPONENT
    assert list(ds["module"].values) == MODULE
    np.testing.assert_array_equal(ds["numel"].values, NUMEL)
    assert list(ds["strategy"].values) == STRATEGIES
    assert list(ds["measured"].values) == [True, False, False]
    for name in ("layer", "component", "module", "numel"):
        assert ds[name].dims == ("tensor",)

    # attributes: the user's, plus the schema's; the commit counters stay private
    assert ds.attrs["schema_version"] == SCHEMA_VERSION == 4
    assert ds.attrs["geomkit_schema"] == "geomkit.run"
    assert ds.attrs["applied_strategy"] == "sago"
    assert ds.attrs["model"] == "TinyLlama"
    assert ds.attrs["seed"] == 7
    assert ds.attrs["alpha"] == 0.5
    assert not any(k.startswith("committed") for k in ds.attrs)

    # dtypes and CF-style metadata on every variable and coordinate
    assert set(VARIABLES) <= set(ds.data_vars)
    for name, spec in VARIABLES.items():
        assert ds[name].dims == spec["dims"], name
        assert ds[name].dtype == np.dtype(spec["dtype"]), name
    for name in list(ds.data_vars) + list(ds.coords):
        attrs = ds[name].attrs
        for key in ("long_name", "units", "description"):
            assert isinstance(attrs.get(key), str) and attrs[key], (name, key)
    assert set(COORDINATES) <= set(ds.coords)
    assert "zero" in ds["n_conflict"].attrs["description"]


def test_plain_xarray_opens_a_cleanly_written_store(tmp_path: Path) -> None:
    path = tmp_path / "run.zarr"
    _, steps, records = write_blocks(path, PATTERN, seed=1)
    plain = xr.open_zarr(path, consolidated=False)
    assert_matches(plain, steps, records)
    assert list(plain["tensor"].values) == NAMES
    assert list(plain["strategy"].values) == STRATEGIES
    assert plain["ff"].attrs["long_name"] == VARIABLES["ff"]["long_name"]
    assert plain.attrs["schema_version"] == SCHEMA_VERSION
    # same content as geomkit's reader
    ours = open_run(path)
    for name in VARIABLES:
        np.testing.assert_array_equal(plain[name].values, ours[name].values, err_msg=name)


def test_empty_store_opens(tmp_path: Path) -> None:
    path = tmp_path / "run.zarr"
    new_writer(path)
    ds = open_run(path)
    assert ds.sizes["step"] == 0 and ds.sizes["record"] == 0
    assert ds.sizes["tensor"] == len(NAMES)


def test_run_directory_resolves_to_its_store(tmp_path: Path) -> None:
    _, steps, records = write_blocks(tmp_path / "geometry.zarr", PATTERN[:1])
    assert_matches(open_run(tmp_path), steps, records)


# ----------------------------------------------------------------------------------------------
# 2. Kill safety
# ----------------------------------------------------------------------------------------------

KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    from geomkit.recorder import Recorder

    shapes = [(8, 4), (16,), (3, 5)]
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight",
             "lm_head.weight"]

    def grads(step):
        g = torch.Generator().manual_seed(1000 + step)
        f = [torch.randn(s, generator=g) for s in shapes]
        r = [torch.randn(s, generator=g) for s in shapes]
        return f, r

    rec = Recorder(sys.argv[1], names, [32, 16, 15], "sago", shadows=["pcgrad"],
                   schedule=2, flush_every=2)
    for step in range(7):  # steps 0..5 are flushed in three blocks, step 6 stays buffered
        f, r = grads(step)
        rec.record(step, f, r, forget_loss=step + 0.25, retain_loss=-step)
    print("written", flush=True)
    while True:
        time.sleep(0.5)
    """
)


def _wait_for_steps(path: Path, n: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            if open_run(path).sizes["step"] >= n:
                return
        except Exception:  # not created yet, or caught in the middle of a write
            pass
        time.sleep(0.05)
    raise AssertionError(f"the writer did not commit {n} steps within {timeout} s")


def test_sigkill_after_flushes_keeps_every_flushed_step(tmp_path: Path) -> None:
    path = tmp_path / "killed.zarr"
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    process = subprocess.Popen(
        [sys.executable, str(script), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_steps(path, 6, process, timeout=60)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL

    ds = open_run(path)
    np.testing.assert_array_equal(ds["step"].values, np.arange(6))
    np.testing.assert_array_equal(ds["forget_loss"].values, np.arange(6) + 0.25)
    np.testing.assert_array_equal(ds["retain_loss"].values, -np.arange(6.0))
    np.testing.assert_array_equal(ds["record"].values, [0, 2, 4])
    assert list(ds["strategy"].values) == ["sago", "pcgrad"]
    assert not ds["skipped"].values.any()
    # the statistics are those of the gradients the writer saw
    import torch

    shapes = [(8, 4), (16,), (3, 5)]
    for i, step in enumerate([0, 2, 4]):
        g = torch.Generator().manual_seed(1000 + step)
        f = [torch.randn(s, generator=g).double().numpy() for s in shapes]
        r = [torch.randn(s, generator=g).double().numpy() for s in shapes]
        want_fr = [float(np.sum(a * b)) for a, b in zip(f, r, strict=True)]
        want_ff = [float(np.sum(a * a)) for a in f]
        np.testing.assert_allclose(ds["fr"].values[i], want_fr, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ds["ff"].values[i], want_ff, rtol=1e-12)
    # a writer continuing the killed run appends right after the committed part
    writer = RunWriter(path, locate_all(["x"]), [1], ["sago"], mode="a")
    more = make_steps([6, 7], np.random.default_rng(0))
    writer.append(more)
    np.testing.assert_array_equal(open_run(path)["step"].values, np.arange(8))


def _array_dims(array: zarr.Array) -> tuple[str, ...]:
    names = getattr(array.metadata, "dimension_names", None)
    return tuple(names) if names else tuple(array.attrs.get("_ARRAY_DIMENSIONS", ()))


KILL_POINTS = {
    # every array of the block grown: a kill after the data, before the commit counters
    "all": None,
    # a kill part-way through writing the arrays of a step block and of a record block
    "some": {"step", "forget_loss", "skipped", "record", "ff", "dd", "n_opposed"},
    # data grown, dimension coordinates not yet
    "data-only": {"forget_loss", "grad_norm", "ff", "dr"},
    # dimension coordinates grown, data not yet
    "coords-only": {"step", "record"},
}


def _simulate_kill_mid_append(path: Path, extra: int, which: str) -> list[str]:
    """Grow arrays along step/record by ``extra`` rows of garbage, as an interrupted append
    would, without touching the commit counters (``which``: a key of KILL_POINTS)."""
    group = zarr.open_group(path, mode="r+")
    chosen = KILL_POINTS[which]
    grown = []
    for name, array in sorted(group.arrays()):
        dims = _array_dims(array)
        if not dims or dims[0] not in ("step", "record"):
            continue
        if chosen is not None and name not in chosen:
            continue
        n = array.shape[0]
        array.resize((n + extra, *array.shape[1:]))
        if array.dtype == np.bool_:
            fill = np.ones((extra, *array.shape[1:]), dtype=bool)
        elif name in ("step", "record"):
            fill = np.arange(n, n + extra, dtype=array.dtype)[:, None][:, 0]
        else:
            fill = np.full((extra, *array.shape[1:]), 999, dtype=array.dtype)
        array[n:] = fill
        grown.append(name)
    return grown


@pytest.mark.parametrize("which", list(KILL_POINTS))
def test_kill_mid_append_reads_back_committed_part(tmp_path: Path, which: str) -> None:
    path = tmp_path / "run.zarr"
    _, steps, records = write_blocks(path, PATTERN[:2])  # 5 steps, 2 records
    grown = _simulate_kill_mid_append(path, extra=3, which=which)
    assert grown and (KILL_POINTS[which] is None or set(grown) == KILL_POINTS[which])

    ds = open_run(path)
    assert_matches(ds, steps, records)
    assert list(ds["tensor"].values) == NAMES
    assert list(ds["strategy"].values) == STRATEGIES
    assert ds.attrs["schema_version"] == SCHEMA_VERSION
    for name in ("ff", "dd", "forget_loss", "step"):
        assert (
            ds[name].attrs["long_name"] == (VARIABLES.get(name) or COORDINATES[name])["long_name"]
        )
    # derived metrics work on the repaired dataset
    assert ds.geom.metrics(by="layer")["cos_fr"].sizes["record"] == 2

    # a writer reopening the store drops the uncommitted rows and continues cleanly
    rng = np.random.default_rng(5)
    writer = new_writer(path, mode="a")
    assert writer.committed == (5, 2)
    s2, r2 = make_steps(range(5, 7), rng), make_records([6], rng)
    writer.append(s2, r2)
    assert_matches(open_run(path), concat([steps, s2]), concat([records, r2]))
    # and the store is clean again for plain xarray
    assert xr.open_zarr(path, consolidated=False).sizes["step"] == 7


# ----------------------------------------------------------------------------------------------
# 3. Resume
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resume_step", [0, 3, 4, 9, 20])
def test_resume_drops_steps_from_resume_step_and_continues(
    tmp_path: Path, resume_step: int
) -> None:
    path = tmp_path / "run.zarr"
    _, steps, records = write_blocks(path, [(range(0, 5), [0, 2, 4]), (range(5, 9), [6, 8])])
    writer = new_writer(path, mode="a", resume_step=resume_step)
    keep_s = steps["step"] < resume_step
    keep_r = records["record"] < resume_step
    assert writer.committed == (int(keep_s.sum()), int(keep_r.sum()))

    # the steps after the checkpoint are recomputed and written again, up to step 11
    start = min(resume_step, 9)
    rng = np.random.default_rng(123)
    s2 = make_steps(range(start, 12), rng)
    r2 = make_records([k for k in range(start, 12) if k % 2 == 0], rng)
    writer.append(s2, r2)

    ds = open_run(path)
    np.testing.assert_array_equal(ds["step"].values, np.arange(12))  # no duplicates, no gaps
    np.testing.assert_array_equal(ds["record"].values, np.arange(0, 12, 2))
    want_s = concat([{k: v[keep_s] for k, v in steps.items()}, s2])
    want_r = concat([{k: v[keep_r] for k, v in records.items()}, r2])
    assert_matches(ds, want_s, want_r)
    assert ds.attrs["model"] == "TinyLlama"


def test_reopening_without_resume_step_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "run.zarr"
    _, steps, records = write_blocks(path, PATTERN)
    writer = new_writer(path, mode="a")
    assert writer.committed == (9, 5)
    rng = np.random.default_rng(9)
    s2, r2 = make_steps([9, 10], rng), make_records([10], rng)
    writer.append(s2, r2)
    assert_matches(open_run(path), concat([steps, s2]), concat([records, r2]))


def test_mode_w_overwrites_an_existing_store(tmp_path: Path) -> None:
    path = tmp_path / "run.zarr"
    write_blocks(path, PATTERN)
    _, steps, records = write_blocks(path, PATTERN[:1], seed=3)
    assert_matches(open_run(path), steps, records)


# ----------------------------------------------------------------------------------------------
# 4. Errors
# ----------------------------------------------------------------------------------------------


def test_foreign_zarr_store_raises_schema_error_naming_the_attribute(tmp_path: Path) -> None:
    path = tmp_path / "plain.zarr"
    xr.Dataset({"x": ("a", np.arange(3.0))}, attrs={"title": "not a run"}).to_zarr(
        path, consolidated=False
    )
    with pytest.raises(SchemaError, match="geomkit_schema") as info:
        open_run(path)
    assert isinstance(info.value, ValueError)
    assert "not a geomkit run" in str(info.value)
    # nor may a writer append to it
    with pytest.raises(SchemaError, match="geomkit_schema"):
        new_writer(path, mode="a")


def test_other_schema_version_raises_schema_error_naming_the_version(tmp_path: Path) -> None:
    path = tmp_path / "run.zarr"
    write_blocks(path, PATTERN[:1])
    zarr.open_group(path, mode="r+").attrs["schema_version"] = 999
    with pytest.raises(SchemaError, match="999"):
        open_run(path)


def test_missing_path_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        open_run(tmp_path / "nothing-here")
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        open_run(empty)


def test_writer_argument_errors(tmp_path: Path) -> None:
    locs = locate_all(NAMES)
    with pytest.raises(ValueError, match="mode"):
        RunWriter(tmp_path / "a", locs, NUMEL, STRATEGIES, mode="x")
    with pytest.raises(ValueError, match="numel"):
        RunWriter(tmp_path / "b", locs, NUMEL[:-1], STRATEGIES)
    with pytest.raises(ValueError, match="strategies"):
        RunWriter(tmp_path / "c", locs, NUMEL, [])
    writer = RunWriter(tmp_path / "d", locs, NUMEL, STRATEGIES)
    block = make_steps([0], np.random.default_rng(0))
    del block["grad_norm"]
    with pytest.raises(ValueError, match="grad_norm"):
        writer.append(block)


# ----------------------------------------------------------------------------------------------
# 5. Several runs
# ----------------------------------------------------------------------------------------------


def test_open_runs_stacks_runs_along_run_labelled_by_directory(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    _, s_a, r_a = write_blocks(
        root / "graddiff-sago" / "geometry.zarr",
        PATTERN,
        attrs={"model": "TinyLlama", "seed": 0},
    )
    _, s_b, r_b = write_blocks(
        root / "graddiff-sago-seed1" / "geometry.zarr",
        PATTERN[:2],
        seed=1,
        attrs={"model": "TinyLlama", "seed": 1},
    )
    # a bare store as a run directory of its own, and a directory that is no run
    _, s_c, r_c = write_blocks(
        root / "bare", PATTERN[:1], seed=2, attrs={"model": "TinyLlama", "seed": 2}
    )
    (root / "notes").mkdir()

    ds = open_runs(root)
    assert list(ds["run"].values) == ["bare", "graddiff-sago", "graddiff-sago-seed1"]
    assert ds.sizes["run"] == 3
    assert ds.sizes["step"] == 9 and ds.sizes["record"] == 5
    assert list(ds["seed"].values) == [2, 0, 1]  # differing attributes become coords (numeric)
    assert ds.attrs["model"] == "TinyLlama"

    got_a = ds.sel(run="graddiff-sago")
    np.testing.assert_array_equal(got_a["forget_loss"].values, s_a["forget_loss"])
    np.testing.assert_array_equal(got_a["ff"].values, r_a["ff"])
    got_b = ds.sel(run="graddiff-sago-seed1")
    np.testing.assert_array_equal(got_b["forget_loss"].values[:5], s_b["forget_loss"])
    assert np.isnan(got_b["forget_loss"].values[5:]).all()  # steps only run a has: NaN
    np.testing.assert_array_equal(got_b["dd"].values[:2], r_b["dd"])
    assert np.isnan(got_b["dd"].values[2:]).all()
    got_c = ds.sel(run="bare")
    np.testing.assert_array_equal(got_c["grad_norm"].values[:3], s_c["grad_norm"])
    np.testing.assert_array_equal(got_c["fr"].values[:2], r_c["fr"])

    # the same from an explicit list of run paths, in the given order
    listed = open_runs([root / "graddiff-sago-seed1", root / "graddiff-sago"])
    assert list(listed["run"].values) == ["graddiff-sago-seed1", "graddiff-sago"]


def test_open_runs_without_runs_raises(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError):
        open_runs(tmp_path)


# ----------------------------------------------------------------------------------------------
# Evaluations
# ----------------------------------------------------------------------------------------------


def _evaluations(done: list[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    block = {"evaluation": np.asarray(done, dtype=np.int64)}
    for name in EVALUATION_VARIABLES:
        block[name] = rng.random(len(done))
    return block


def test_evaluations_round_trip_and_resume_drops_later_ones(tmp_path: Path) -> None:
    path = tmp_path / "run.zarr"
    rng = np.random.default_rng(0)
    writer = new_writer(path)
    first, second = _evaluations([0, 2], rng), _evaluations([4, 6], rng)
    writer.append(make_steps(range(0, 4), rng), None, first)
    writer.append(make_steps(range(4, 7), rng), None, second)
    ds = open_run(path)
    np.testing.assert_array_equal(ds["evaluation"].values, [0, 2, 4, 6])
    for name in EVALUATION_VARIABLES:
        np.testing.assert_array_equal(ds[name].values, np.r_[first[name], second[name]])
        assert ds[name].attrs["long_name"] == VARIABLES[name]["long_name"]
    # resuming at step 4 recomputes steps 4.. : evaluations after more than 4 steps go
    new_writer(path, mode="a", resume_step=4)
    ds = open_run(path)
    np.testing.assert_array_equal(ds["evaluation"].values, [0, 2, 4])
    assert ds.sizes["step"] == 4


def test_recorder_logs_evaluations_and_rejects_unknown_metrics(tmp_path: Path) -> None:
    from geomkit.recorder import Recorder

    path = tmp_path / "run.zarr"
    recorder = Recorder(path, NAMES, NUMEL, "sago", schedule=Never())
    with pytest.raises(ValueError, match="invalid metrics=\\['mmlu'\\]"):
        recorder.log_evaluation(0, {"mmlu": 0.5})
    with pytest.raises(ValueError, match="invalid steps_done=-1: expected an integer >= 0"):
        recorder.log_evaluation(-1, {"forget_acc": 0.5})
    recorder.log_evaluation(0, {"forget_acc": 1.0, "retain_acc": 0.9})
    recorder.record(0, forget_loss=1.0)
    recorder.log_evaluation(1, {"forget_acc": 0.0, "retain_acc": 0.8, "general_acc": 0.7})
    recorder.close()
    ds = open_run(path)
    np.testing.assert_array_equal(ds["evaluation"].values, [0, 1])
    np.testing.assert_array_equal(ds["forget_acc"].values, [1.0, 0.0])
    assert np.isnan(ds["general_acc"].values[0])


# ----------------------------------------------------------------------------------------------
# 6. Integrity: damaged stores, schema versions
# ----------------------------------------------------------------------------------------------

# 40 steps and 20 records (record_chunk=8: record chunks 0, 1, 2 hold records 0-7, 8-15, 16-19)
DAMAGE_PATTERN = [(range(0, 20), range(0, 20, 2)), (range(20, 40), range(20, 40, 2))]


def _damaged_store(tmp_path: Path) -> tuple[Path, dict, dict]:
    path = tmp_path / "run.zarr"
    _, steps, records = write_blocks(path, DAMAGE_PATTERN, record_chunk=8)
    return path, steps, records


def test_every_committed_chunk_is_stored_even_when_it_holds_fill_values(tmp_path: Path) -> None:
    path = tmp_path / "run.zarr"
    rng = np.random.default_rng(0)
    writer = new_writer(path)
    s, r = make_steps(range(3), rng), make_records([0], rng)
    s["skipped"][:] = False  # the fill value of a bool array
    s["retain_loss"][:] = np.nan  # that of a float array
    r["n_projected"][:] = 0  # that of an integer array
    writer.append(s, r)
    for name in ("skipped", "retain_loss", "n_projected", "ff"):
        assert list((path / name / "c").rglob("*")), name
    assert open_run(path)["skipped"].values.tolist() == [False] * 3


def test_deleted_chunk_raises_naming_variable_chunk_and_records(tmp_path: Path) -> None:
    path, _, records = _damaged_store(tmp_path)
    (path / "ff" / "c" / "1" / "0").unlink()  # records 8-15: steps 16, 18, ..., 30
    with pytest.raises(DamagedStoreError) as info:
        open_run(path)
    message = str(info.value)
    assert "\n" not in message
    assert "ff: ff/c/1/0 is missing (8 records at steps 16, 18, 20, 22, 24, 26, 28, 30)" in message
    assert str(path) in message and "on_damage='mask'" in message
    (damage,) = info.value.damage
    assert (damage.variable, damage.key, damage.dim) == ("ff", "ff/c/1/0", "record")
    assert (damage.start, damage.stop) == (8, 16)
    assert isinstance(info.value, SchemaError) and isinstance(info.value, ValueError)

    with pytest.warns(DamagedStoreWarning, match="ff/c/1/0 is missing"):
        ds = open_run(path, on_damage="mask")
    assert ds.attrs["damaged"] == [str(damage)]
    assert np.isnan(ds["ff"].values[8:16]).all()
    np.testing.assert_array_equal(ds["ff"].values[:8], records["ff"][:8])
    np.testing.assert_array_equal(ds["ff"].values[16:], records["ff"][16:])
    np.testing.assert_array_equal(ds["fr"].values, records["fr"])  # other variables intact
    np.testing.assert_array_equal(ds["record"].values, records["record"])


def test_deleted_integer_chunk_is_masked_as_float_nan(tmp_path: Path) -> None:
    path, _, records = _damaged_store(tmp_path)
    (path / "n_opposed" / "c" / "2" / "0" / "0").unlink()  # records 16-19, the last chunk
    with pytest.raises(DamagedStoreError, match=r"n_opposed/c/2/0/0 is missing \(4 records"):
        open_run(path)
    with pytest.warns(DamagedStoreWarning):
        ds = open_run(path, on_damage="mask")
    assert ds["n_opposed"].dtype == np.float64
    assert np.isnan(ds["n_opposed"].values[16:]).all()
    np.testing.assert_array_equal(ds["n_opposed"].values[:16], records["n_opposed"][:16])
    assert ds["n_conflict"].dtype == np.int64


@pytest.mark.parametrize("how", ["truncated", "corrupted"])
def test_truncated_or_corrupted_chunk_raises_instead_of_a_zstd_traceback(
    tmp_path: Path, how: str
) -> None:
    path, steps, _ = _damaged_store(tmp_path)
    chunk = path / "forget_loss" / "c" / "0"  # steps 0-39, one chunk
    data = bytearray(chunk.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # one flipped bit in the payload: only the version 2 checksum sees it
        data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(DamagedStoreError) as info:
        open_run(path)
    message = str(info.value)
    assert "forget_loss: forget_loss/c/0 does not decode (" in message
    assert "(steps 0..39)" in message
    assert "\n" not in message
    with pytest.warns(DamagedStoreWarning):
        ds = open_run(path, on_damage="mask")
    assert np.isnan(ds["forget_loss"].values).all()
    np.testing.assert_array_equal(ds["grad_norm"].values, steps["grad_norm"])


def test_damaged_coordinate_chunk_reports_index_ranges(tmp_path: Path) -> None:
    path, _, _ = _damaged_store(tmp_path)
    (path / "step" / "c" / "0").unlink()
    (path / "wall_time" / "c" / "0").unlink()
    with pytest.raises(DamagedStoreError) as info:
        open_run(path)
    message = str(info.value)
    assert "step: step/c/0 is missing (step indices 0..39)" in message
    assert "wall_time: wall_time/c/0 is missing (step indices 0..39)" in message
    assert len(info.value.damage) == 2


def test_lost_array_metadata_raises_and_masks_the_whole_variable(tmp_path: Path) -> None:
    path, steps, records = _damaged_store(tmp_path)
    (path / "dr" / "zarr.json").unlink()
    with pytest.raises(DamagedStoreError) as info:
        open_run(path)
    assert "dr: dr/zarr.json is missing (20 records at steps 0, 2, ..., 38)" in str(info.value)
    with pytest.warns(DamagedStoreWarning):
        ds = open_run(path, on_damage="mask")
    assert ds["dr"].dims == ("record", "strategy", "tensor")
    assert ds["dr"].attrs["long_name"] == VARIABLES["dr"]["long_name"]
    assert np.isnan(ds["dr"].values).all()
    np.testing.assert_array_equal(ds["df"].values, records["df"])
    np.testing.assert_array_equal(ds["step"].values, steps["step"])


def test_unreadable_array_metadata_raises(tmp_path: Path) -> None:
    path, _, _ = _damaged_store(tmp_path)
    (path / "grad_norm" / "zarr.json").write_text("{ not json")
    with pytest.raises(DamagedStoreError, match=r"grad_norm/zarr.json cannot be read \("):
        open_run(path)


def test_missing_commit_counter_raises_and_mask_reads_the_arrays(tmp_path: Path) -> None:
    path, steps, _ = _damaged_store(tmp_path)
    group = zarr.open_group(path, mode="r+")
    del group.attrs["committed_steps"]
    with pytest.raises(DamagedStoreError, match="lacks attribute 'committed_steps'"):
        open_run(path)
    with pytest.warns(DamagedStoreWarning):
        ds = open_run(path, on_damage="mask")
    np.testing.assert_array_equal(ds["forget_loss"].values, steps["forget_loss"])


def test_missing_schema_version_or_group_metadata_raise_even_with_mask(tmp_path: Path) -> None:
    path, _, _ = _damaged_store(tmp_path)
    del zarr.open_group(path, mode="r+").attrs["schema_version"]
    for on_damage in ("raise", "mask"):
        with pytest.raises(DamagedStoreError, match="lacks attribute 'schema_version'"):
            open_run(path, on_damage=on_damage)
    run = tmp_path / "a-run"
    write_blocks(run / "geometry.zarr", PATTERN[:1])
    (run / "geometry.zarr" / "zarr.json").unlink()
    for target in (run, run / "geometry.zarr"):
        with pytest.raises(DamagedStoreError, match=r"zarr.json is missing"):
            open_run(target, on_damage="mask")


def test_chunks_beyond_the_committed_range_are_not_verified(tmp_path: Path) -> None:
    """A kill in the middle of an append may leave chunks past the committed part unwritten
    or half written; they are not read, and a chunk straddling the boundary only counts for
    its committed rows."""
    path, steps, records = _damaged_store(tmp_path)
    _simulate_kill_mid_append(path, extra=12, which="all")  # records 20-31: chunks 2 and 3
    (path / "ff" / "c" / "3" / "0").unlink()  # beyond the committed records
    (path / "dd" / "c" / "3" / "0" / "0").write_bytes(b"garbage")
    ds = open_run(path)
    assert_matches(ds, steps, records)


def test_on_damage_is_checked(tmp_path: Path) -> None:
    path, _, _ = _damaged_store(tmp_path)
    with pytest.raises(ValueError, match="invalid on_damage='ignore': expected 'raise' or 'mask'"):
        open_run(path, on_damage="ignore")  # type: ignore[arg-type]


def _as_version_1(path: Path, *, without_evaluations: bool) -> None:
    """Rewrite a store as an older geomkit left it: version 1, chunks of fill values not
    stored, and (the first version 1 stores) no evaluation arrays."""
    group = zarr.open_group(path, mode="r+")
    group.attrs["schema_version"] = 1
    if without_evaluations:
        del group.attrs["committed_evaluations"]
        for name in ("evaluation", *EVALUATION_VARIABLES):
            del group[name]


@pytest.mark.parametrize("without_evaluations", [True, False])
def test_version_1_store_opens_with_evaluation_dimension_empty(
    tmp_path: Path, without_evaluations: bool
) -> None:
    path = tmp_path / "run.zarr"
    _, steps, records = write_blocks(path, PATTERN)
    _as_version_1(path, without_evaluations=without_evaluations)
    shutil.rmtree(path / "n_projected" / "c")  # all zeros: version 1 need not store it
    ds = open_run(path)
    assert ds.attrs["schema_version"] == 1
    assert ds.sizes["evaluation"] == 0
    for name in EVALUATION_VARIABLES:
        assert ds[name].dims == ("evaluation",)
        assert ds[name].attrs["long_name"] == VARIABLES[name]["long_name"]
    assert (ds["n_projected"].values == 0).all()
    np.testing.assert_array_equal(ds["ff"].values, records["ff"])
    np.testing.assert_array_equal(ds["forget_loss"].values, steps["forget_loss"])
    # a chunk that is there must still decode
    (path / "ff" / "c" / "0" / "0").write_bytes(b"garbage")
    with pytest.raises(DamagedStoreError, match="ff/c/0/0 does not decode"):
        open_run(path)


def test_appending_to_a_version_1_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.zarr"
    write_blocks(path, PATTERN)
    _as_version_1(path, without_evaluations=True)
    with pytest.raises(SchemaError, match="schema version 1 and this geomkit writes version 4"):
        new_writer(path, mode="a", resume_step=3)
    assert open_run(path).sizes["step"] == 9  # untouched


def test_open_run_matches_plain_xarray_and_reads_each_chunk_once(tmp_path: Path) -> None:
    path, _, _ = _damaged_store(tmp_path)
    ours = open_run(path)
    plain = xr.open_zarr(path, consolidated=False).load()
    for name in plain.variables:
        plain[name].attrs.pop("coordinates", None)
    plain.attrs = {k: v for k, v in plain.attrs.items() if not k.startswith("committed_")}
    assert ours.attrs.pop("source") == str(path)
    xr.testing.assert_identical(ours, plain)

    reads: list[str] = []
    original = zarr.storage.LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        if "/c/" in key:
            reads.append(key)
        return await original(self, key, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zarr.storage.LocalStore, "get", counting_get)
        open_run(path)
    assert len(reads) == len(set(reads))  # no chunk read twice
    assert "ff/c/2/0" in reads and "forget_loss/c/0" in reads


def test_run_layer_passes_on_damage_through(tmp_path: Path) -> None:
    from geomkit.runs import load

    path, _, records = _damaged_store(tmp_path)
    (path / "ff" / "c" / "1" / "0").unlink()
    with pytest.raises(DamagedStoreError, match="ff/c/1/0 is missing"):
        load(path)
    with pytest.warns(DamagedStoreWarning):
        (run,) = load(path, on_damage="mask")
    assert run.ds.attrs["damaged"] and np.isnan(run.ds["ff"].values[8:16]).all()
    assert run.ds.sizes["record"] == len(records["record"])  # masked records are not padding


def _as_version_2(path: Path) -> None:
    """Rewrite a store as geomkit left it before version 3: no step statistics, no losses
    after the step."""
    group = zarr.open_group(path, mode="r+")
    group.attrs["schema_version"] = 2
    for name in SINCE:
        del group[name]


def test_version_2_store_opens_without_the_step_variables(tmp_path: Path) -> None:
    path = tmp_path / "run.zarr"
    _, _, records = write_blocks(path, PATTERN)
    _as_version_2(path)
    ds = open_run(path)
    assert ds.attrs["schema_version"] == 2
    assert not set(SINCE) & set(ds.data_vars)
    np.testing.assert_array_equal(ds["ff"].values, records["ff"])
    metrics = ds.geom.metrics(by="layer")
    assert metrics["cos_ur"].dims == ("record", "layer")  # no strategy dimension
    assert np.isnan(metrics["cos_ur"].values).all() and np.isfinite(metrics["cos_fr"].values).all()
    # a version 3 store must hold them: one lost is damage
    path3 = tmp_path / "run3.zarr"
    write_blocks(path3, PATTERN)
    del zarr.open_group(path3, mode="r+")["uu"]
    with pytest.raises(DamagedStoreError, match="uu"):
        open_run(path3)
