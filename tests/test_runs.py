"""geomkit.runs: every kind of source, padding versus recorded NaN, labels, metadata, errors."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from geomkit import theory
from geomkit.layers import locate_all
from geomkit.runs import Run, find, load
from geomkit.store import RunWriter, open_run, open_runs, stack_runs

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "lm_head.weight",
]
NUMEL = {name: 64 + 8 * i for i, name in enumerate(NAMES)}
ATTRS = {"objective": "graddiff", "seed": 0, "alpha": 0.7, "gamma": 1.2, "dtype": "bfloat16"}


def write(
    path: Path,
    *,
    steps: int = 4,
    records: tuple[int, ...] = (0, 2),
    strategies: tuple[str, ...] = ("sago", "pcgrad", "sum"),
    names: list[str] = NAMES,
    evaluations: tuple[int, ...] = (0, 4),
    attrs: dict | None = None,
    seed: int = 0,
) -> Path:
    """A run store with random but valid statistics; ``attrs`` replace :data:`ATTRS`."""
    rng = np.random.default_rng(seed)
    attrs = {**ATTRS, "seed": seed} if attrs is None else attrs
    writer = RunWriter(path, locate_all(names), [NUMEL[n] for n in names], strategies, attrs)
    n, t, s = len(records), len(names), len(strategies)
    step_block = {
        "step": np.arange(steps),
        "forget_loss": rng.normal(size=steps),
        "retain_loss": rng.normal(size=steps),
        "learning_rate": np.full(steps, 1e-3),
        "grad_norm": rng.uniform(1, 2, size=steps),
        "wall_time": np.arange(1.0, steps + 1),
        "skipped": np.zeros(steps, bool),
    }
    record_block = {
        "record": np.asarray(records),
        "ff": rng.uniform(1, 2, size=(n, t)),
        "rr": rng.uniform(1, 2, size=(n, t)),
        "fr": rng.normal(size=(n, t)),
        "n_conflict": rng.integers(0, 10, size=(n, t)),
        "n_both_nonzero": rng.integers(10, 20, size=(n, t)),
        "dd": rng.uniform(1, 2, size=(n, s, t)),
        "df": rng.normal(size=(n, s, t)),
        "dr": rng.normal(size=(n, s, t)),
        "n_opposed": rng.integers(0, 5, size=(n, s, t)),
        "n_projected": rng.integers(0, 2, size=(n, s, t)),
    }
    record_block["dr_abs"] = np.abs(record_block["dr"])  # the fields added by issue 10 (A1)
    record_block["n_unrounded"] = np.zeros((n, s, t), dtype=np.int64)
    k = len(evaluations)
    evaluation_block = {"evaluation": np.asarray(evaluations, dtype=np.int64)}
    for name in ("forget_acc", "retain_acc", "general_acc"):
        evaluation_block[name] = rng.uniform(size=k)
    writer.append(step_block, record_block, evaluation_block if k else None)
    return path


def same_data(a: xr.Dataset, b: xr.Dataset) -> None:
    """Equal values, coordinates (in order) and dtypes; attributes aside."""
    xr.testing.assert_equal(a, b)
    assert set(a.variables) == set(b.variables)
    for name in a.variables:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].dims == b[name].dims, name


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A directory of runs as ``geomkit run`` leaves it: runs of different lengths, strategy
    sets and tensors, beside a figures folder and a summary file."""
    runs = tmp_path / "runs"
    write(runs / "graddiff-sago-seed0" / "geometry.zarr")
    write(
        runs / "graddiff-pcgrad-seed1" / "geometry.zarr",
        steps=6,
        records=(0, 1, 2, 5),
        strategies=("pcgrad", "blur", "sago"),
        names=NAMES[1:],
        evaluations=(0, 3, 6),
        attrs={**ATTRS, "seed": 1, "alpha": 1.0, "gamma": 1.0},
        seed=1,
    )
    (runs / "figures").mkdir()
    (runs / "summary.csv").write_text("objective\n")
    return runs


# ----------------------------------------------------------------------------------------------
# Every kind of source gives the same runs
# ----------------------------------------------------------------------------------------------


def test_every_source_kind_gives_the_same_runs(root: Path) -> None:
    labels = ["graddiff-pcgrad-seed1", "graddiff-sago-seed0"]
    opened = {label: open_run(root / label) for label in labels}
    stacked = open_runs(root)
    sources = {
        "directory of runs": root,
        "directory as str": str(root),
        "list of run directories": [root / label for label in labels],
        "list of stores": [root / label / "geometry.zarr" for label in labels],
        "generator": (root / label for label in labels),
        "stacked Dataset": stacked,
        "opened Datasets": [opened[label] for label in labels],
        "mixed list": [root / labels[0], opened[labels[1]]],
        "picked from a stack": [stacked.sel(run=label) for label in labels],
        "runs": load(root),
    }
    for kind, source in sources.items():
        runs = load(source)
        assert [r.label for r in runs] == labels, kind
        for run in runs:
            assert isinstance(run, Run) and "run" not in run.ds.dims, kind
            same_data(run.ds, opened[run.label])
    (single,) = load(root / labels[1])
    assert single.label == labels[1] and single.ds.attrs["source"].endswith("geometry.zarr")
    assert [p.name for p in find(root)] == labels  # figures/ and summary.csv are no runs
    assert load(sources["runs"])[0] is sources["runs"][0]  # runs pass through


def test_open_runs_delegates_and_stack_runs_keeps_the_given_labels(root: Path) -> None:
    stacked = open_runs([root / "graddiff-sago-seed0", root / "graddiff-pcgrad-seed1"])
    assert list(stacked["run"].values) == ["graddiff-sago-seed0", "graddiff-pcgrad-seed1"]
    assert list(stacked["alpha"].values) == [0.7, 1.0]  # differing attributes: coordinates
    # tensors and strategies in the runs' own order, the coordinates of every tensor
    assert list(stacked["tensor"].values) == NAMES
    assert list(stacked["strategy"].values) == ["sago", "pcgrad", "blur", "sum"]
    np.testing.assert_array_equal(stacked["numel"].values, [NUMEL[n] for n in NAMES])
    np.testing.assert_array_equal(stacked["layer"].values, [-1, 0, 0, 1, -1])
    a, b = (open_run(root / n).assign_attrs(run="same") for n in ("graddiff-sago-seed0",) * 2)
    assert list(stack_runs([a, b], ["x", "y"])["run"].values) == ["x", "y"]


def test_conflicting_tensor_coordinates_stay_per_run(root: Path) -> None:
    a = open_run(root / "graddiff-sago-seed0")
    b = a.assign_coords(numel=a["numel"] * 2).isel(tensor=[0, 1])
    stacked = stack_runs([a, b], ["a", "b"])
    assert stacked["numel"].dims == ("run", "tensor")
    run_a, run_b = load(stacked)
    np.testing.assert_array_equal(run_a.ds["numel"], a["numel"])
    np.testing.assert_array_equal(run_b.ds["numel"], b["numel"])
    assert run_b.ds["numel"].dtype == np.int64 and run_b.ds.sizes["tensor"] == 2


# ----------------------------------------------------------------------------------------------
# Padding versus NaN a run recorded
# ----------------------------------------------------------------------------------------------


def test_padding_is_dropped_and_the_run_is_as_written(root: Path) -> None:
    stacked = open_runs(root)
    assert stacked.sizes["step"] == 6 and stacked.sizes["record"] == 4
    short = load(stacked)[1]
    assert short.label == "graddiff-sago-seed0"
    assert short.ds.sizes == {"step": 4, "record": 2, "evaluation": 2, "tensor": 5, "strategy": 3}
    assert list(short.ds["strategy"].values) == ["sago", "pcgrad", "sum"]
    assert list(short.ds["measured"].values) == [True, False, False]
    assert short.ds["skipped"].dtype == bool and short.ds["n_opposed"].dtype == np.int64
    assert short.dropped == ()  # padding of a stack is dropped silently
    assert short.ds.attrs["seed"] == 0 and short.ds.attrs["alpha"] == 0.7


def _with_nan(ds: xr.Dataset, names: tuple[str, ...], record: int) -> xr.Dataset:
    ds = ds.load().copy(deep=True)
    for name in names:
        ds[name] = ds[name].astype(np.float64)
        ds[name].loc[{"record": record}] = math.nan
    return ds


FLOATS = ("ff", "rr", "fr", "dd", "df", "dr", "dr_abs")
COUNTS = ("n_conflict", "n_both_nonzero", "n_opposed", "n_projected", "n_unrounded")


def test_recorded_nan_is_never_padding(root: Path) -> None:
    # a non-finite gradient: every float statistic of record 2 NaN, the counts still written
    bad = _with_nan(open_run(root / "graddiff-sago-seed0"), FLOATS, 2)
    bad["grad_norm"][:] = math.nan
    bad["forget_loss"][:] = math.nan
    for name in ("dd", "df", "dr"):
        bad[name].loc[{"strategy": "sum"}] = math.nan
    other = open_run(root / "graddiff-pcgrad-seed1")
    for source in (bad, stack_runs([other, bad], ["other", "bad"])):
        run = load(source)[-1]
        assert list(run.ds["record"].values) == [0, 2] and run.ds.sizes["step"] == 4
        assert np.isnan(run.ds["dd"].sel(record=2)).all() and run.dropped == ()
        # a shadow strategy whose statistics are all NaN is recorded, not padding
        assert list(run.ds["strategy"].values) == ["sago", "pcgrad", "sum"]
    audit = theory.audit(stack_runs([other, bad], ["other", "bad"]))
    r1 = next(r for r in audit.select(source="bad") if (r.claim, r.granularity) == ("R1", "model"))
    assert r1.cases == 2 and r1.non_finite == 1 and r1.failed and r1.where == "step 2"
    assert audit.bug_detected  # the theory audit counts recorded NaN as violations
    assert all(r.non_finite == 0 for r in audit.select(source="other"))


def test_all_nan_entries_of_a_single_run_are_dropped_and_named(root: Path) -> None:
    ds = _with_nan(open_run(root / "graddiff-sago-seed0"), FLOATS + COUNTS, 2)
    (run,) = load(ds)
    assert list(run.ds["record"].values) == [0]
    assert run.dropped == ("1 record(s) with every value NaN dropped (steps 2)",)
    # without the counts, the same record is data
    assert load(_with_nan(open_run(root / "graddiff-sago-seed0"), FLOATS, 2))[0].dropped == ()


def test_a_run_without_records_keeps_its_strategies(tmp_path: Path, root: Path) -> None:
    empty = write(tmp_path / "empty", records=(), evaluations=())
    run = load(stack_runs([open_run(root / "graddiff-sago-seed0"), open_run(empty)], ["a", "b"]))[1]
    assert run.ds.sizes["record"] == 0 and run.ds.sizes["evaluation"] == 0
    assert run.ds.sizes["strategy"] == 3 and run.strategy == "sago"


# ----------------------------------------------------------------------------------------------
# Labels and metadata
# ----------------------------------------------------------------------------------------------


def test_labels(tmp_path: Path) -> None:
    bare = write(tmp_path / "bare.zarr")
    assert load(bare)[0].label == "bare"
    for sweep in ("sweep_a", "sweep_b"):
        write(tmp_path / sweep / "graddiff-sago-seed0" / "geometry.zarr")
    labels = [r.label for r in load([tmp_path / "sweep_a", tmp_path / "sweep_b"])]
    assert labels == ["sweep_a/graddiff-sago-seed0", "sweep_b/graddiff-sago-seed0"]
    ds = open_run(bare)
    ds.attrs.pop("source")
    assert [r.label for r in load([ds, ds])] == ["run0", "run1"]
    named = ds.assign_attrs(run="mine")
    assert [r.label for r in load([named, named, named])] == ["mine", "mine#2", "mine#3"]


def test_metadata_from_the_store_attributes(tmp_path: Path) -> None:
    (run,) = load(write(tmp_path / "a", strategies=("pcgrad", "sago"), seed=3))
    assert (run.objective, run.strategy, run.seed) == ("graddiff", "pcgrad", 3)
    assert (run.alpha, run.gamma, run.dtype) == (0.7, 1.2, "bfloat16")
    assert run.method == ("graddiff", "pcgrad") and not run.forget_only
    text = repr(run)
    assert text == "Run('a': graddiff + pcgrad, seed 3; 4 steps, 2 records, 2 evaluations)"
    (one,) = load(write(tmp_path / "one", steps=1, records=(0,), evaluations=(1,)))
    assert repr(one) == "Run('one': graddiff + sago, seed 0; 1 step, 1 record, 1 evaluation)"
    (bare,) = load(write(tmp_path / "b", attrs={"seed": None}))
    assert (bare.objective, bare.seed, bare.alpha, bare.dtype) == (None, None, None, None)
    assert bare.strategy == "sago" and bare.method == ("unknown", "sago")
    # without the attribute, the applied strategy is the measured one
    ds = open_run(tmp_path / "a")
    ds.attrs.pop("applied_strategy")
    ds = ds.sel(strategy=["sago", "pcgrad"])
    (picked,) = load(ds)
    assert picked.strategy == "pcgrad" and list(picked.ds["strategy"].values) == [
        "pcgrad",
        "sago",
    ]


def test_invalid_metadata_names_the_value(tmp_path: Path) -> None:
    ds = open_run(write(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"invalid seed='x' in the attributes of run 'a'"):
        load(ds.assign_attrs(seed="x"))
    with pytest.raises(ValueError, match=r"invalid alpha=\[1\].*expected a number"):
        load(ds.assign_attrs(alpha=[1]))


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_errors_name_the_input_and_what_was_expected(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(
        FileNotFoundError, match=rf"{re.escape(str(missing))} does not exist; expected"
    ):
        load(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no geomkit run; expected"):
        load([tmp_path / "empty"])
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"file\.txt holds no geomkit run"):
        find(tmp_path / "file.txt")
    with pytest.raises(TypeError, match="invalid run 3 of type int: expected"):
        load([3])
    with pytest.raises(TypeError, match="invalid runs source of type dict"):
        load({"a": 1})
    with pytest.raises(ValueError, match="no runs in"):
        load([])
