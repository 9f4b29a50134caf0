"""Tests for lazy opening: :func:`geomkit.open_run` returns dask-backed data, ``ds.geom``
groups it chunk by chunk, and the store is still verified (docs/schema.md).

Layout:

1. chunking: per-record variables are chunked by records and tensors (defaults and given
   sizes), and read back exactly;
2. laziness: data variables are dask arrays, opening reads no chunk twice and computing
   ``metrics(by="layer")`` reads every chunk once, one chunk at a time (counted, not timed);
3. equality: statistics and metrics at every grouping equal those of the same run in memory,
   bit for bit, and an independent NumPy reference; also for runs stacked along ``run``;
4. integrity on the lazy path: a missing chunk and a flipped bit raise, or are masked (the
   damaged chunk is never read), and a chunk damaged after opening raises naming it.
"""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

import geomkit.store_reader as store_reader
from geomkit.analysis import GROUPINGS
from geomkit.fields import FIELDS, INDEX
from geomkit.layers import locate_all
from geomkit.metrics import aggregate, derive
from geomkit.store import DamagedStoreError, DamagedStoreWarning, RunWriter, open_run, open_runs
from geomkit.store_schema import RECORD_CHUNK, TENSOR_CHUNK, VARIABLES, record_chunks

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.1.input_layernorm.weight",
    "lm_head.weight",
]
NUMEL = [512, 256, 1024, 16, 256, 1024, 16, 512]
STRATEGIES = ["sago", "pcgrad", "sum"]
RECORD_VARS = [n for n, v in VARIABLES.items() if v["dims"][0] == "record"]
STEP_VARS = [n for n, v in VARIABLES.items() if v["dims"] == ("step",)]


def _records(at: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    block: dict[str, np.ndarray] = {"record": at}
    for name in RECORD_VARS:
        dims = VARIABLES[name]["dims"]
        shape = (len(at), len(NAMES)) if len(dims) == 2 else (len(at), 3, len(NAMES))
        if VARIABLES[name]["dtype"] == "int64":
            block[name] = rng.integers(0, 100, size=shape)
        else:
            block[name] = (
                rng.normal(size=shape) if name in ("fr", "df", "dr") else rng.random(shape)
            )
    return block


def _steps(at: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    block: dict[str, np.ndarray] = {"step": at}
    for name in STEP_VARS:
        block[name] = rng.random(len(at)) < 0.5 if name == "skipped" else rng.random(len(at))
    return block


def write_run(path: Path, n: int = 20, seed: int = 0, **chunks: int) -> dict[str, np.ndarray]:
    """``n`` records (steps 0..n-1) in blocks of 3 with record_chunk 4, tensor_chunk 3 unless
    given: 5 record chunks x 3 tensor chunks. Returns the records written."""
    rng = np.random.default_rng(seed)
    chunks = {"record_chunk": 4, "tensor_chunk": 3, **chunks}
    writer = RunWriter(path, locate_all(NAMES), NUMEL, STRATEGIES, {"seed": seed}, **chunks)
    blocks = []
    for start in range(0, n, 3):
        at = np.arange(start, min(start + 3, n))
        blocks.append(_records(at, rng))
        writer.append(_steps(at, rng), blocks[-1])
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[slice, ...], int]]:
    """Every read of a lazily opened variable: (name, region, elements)."""
    reads: list[tuple[str, tuple[slice, ...], int]] = []
    original = store_reader._Chunks.__getitem__

    def getitem(self, key):  # type: ignore[no-untyped-def]
        out = original(self, key)
        reads.append((self.name, key, out.size))
        return out

    monkeypatch.setattr(store_reader._Chunks, "__getitem__", getitem)
    return reads


# ----------------------------------------------------------------------------------------------
# 1. Chunking


def test_default_chunks_and_given_chunks(tmp_path: Path) -> None:
    assert record_chunks(291) == (RECORD_CHUNK, TENSOR_CHUNK)
    assert record_chunks(5) == (RECORD_CHUNK, 5)  # every tensor in one chunk when fewer
    assert record_chunks(291, 8, 100) == (8, 100)
    write_run(tmp_path / "run.zarr")
    ds = open_run(tmp_path / "run.zarr")
    assert ds["dr"].data.chunks == ((4,) * 5, (3,), (3, 3, 2))
    assert ds["ff"].data.chunks == ((4,) * 5, (3, 3, 2))
    assert (tmp_path / "run.zarr" / "ff" / "c" / "4" / "2").is_file()  # records 16-19, tensors 6-7
    with pytest.raises(ValueError, match="tensor_chunk"):
        RunWriter(tmp_path / "bad", locate_all(NAMES), NUMEL, STRATEGIES, tensor_chunk=0)


def test_chunked_store_reads_back_exactly(tmp_path: Path) -> None:
    written = write_run(tmp_path / "run.zarr", n=20)
    ds = open_run(tmp_path / "run.zarr")
    np.testing.assert_array_equal(ds["record"].values, written["record"])
    for name in RECORD_VARS:
        np.testing.assert_array_equal(ds[name].values, written[name], err_msg=name)
        assert ds[name].dtype == np.dtype(VARIABLES[name]["dtype"])
    one = ds.isel(record=13, tensor=7)  # a record and a tensor in partial chunks
    np.testing.assert_array_equal(one["dd"].values, written["dd"][13, :, 7])


# ----------------------------------------------------------------------------------------------
# 2. Laziness


def test_open_run_returns_dask_backed_data_and_coordinates_in_memory(tmp_path: Path) -> None:
    write_run(tmp_path / "run.zarr")
    ds = open_run(tmp_path / "run.zarr")
    for name, variable in ds.data_vars.items():
        assert isinstance(variable.data, da.Array), name
    for name in ("record", "step", "tensor", "layer", "numel", "strategy", "measured"):
        assert isinstance(ds[name].variable.data, np.ndarray), name
    assert ds.geom.statistics("layer").chunks is not None  # statistics stay lazy too


def test_opening_reads_no_data_and_metrics_read_each_chunk_once(
    tmp_path: Path, counted: list
) -> None:
    write_run(tmp_path / "run.zarr", n=20)
    ds = open_run(tmp_path / "run.zarr")
    assert counted == []  # the verification's reads are not kept: nothing read lazily yet
    ds.geom.metrics(by="layer")
    record_reads = [(name, key, size) for name, key, size in counted if name in RECORD_VARS]
    chunk = 4 * 3 * 3  # the largest chunk: 4 records x 3 strategies x 3 tensors
    assert max(size for _, _, size in record_reads) <= chunk
    whole = 20 * 3 * len(NAMES)
    assert all(size < whole for _, _, size in record_reads)  # never a whole variable
    read_vars = {name for name, _, _ in record_reads}
    assert read_vars == set(RECORD_VARS) - {n for n in RECORD_VARS if n.startswith("verified_")}
    regions = [(name, tuple((k.start, k.stop) for k in key)) for name, key, _ in record_reads]
    assert len(regions) == len(set(regions))  # no chunk read twice
    assert len(regions) == len(read_vars) * 5 * 3  # 5 record chunks x 3 tensor chunks each


def test_reading_one_record_or_one_tensor_reads_only_their_chunks(
    tmp_path: Path, counted: list
) -> None:
    write_run(tmp_path / "run.zarr", n=20)
    ds = open_run(tmp_path / "run.zarr")
    _ = ds["dr"].isel(record=9).values  # record chunk 2, every tensor chunk
    assert len(counted) == 3 and all(key[0] == slice(8, 12) for _, key, _ in counted)
    counted.clear()
    _ = ds["dr"].isel(tensor=4).values  # tensor chunk 1, every record chunk
    assert len(counted) == 5 and all(key[2] == slice(3, 6) for _, key, _ in counted)


# ----------------------------------------------------------------------------------------------
# 3. Equality with the computation in memory


def _reference(written: dict[str, np.ndarray], by: str, ds: xr.Dataset) -> np.ndarray:
    """Statistics [record, group, strategy, field] from the written arrays by NumPy alone."""
    n, s, t = written["dd"].shape
    stats = np.zeros((n, s, t, len(FIELDS)))
    for name in FIELDS:
        if name == "numel":
            value = np.asarray(NUMEL, dtype=float)
        elif name == "n_tensors":
            value = np.ones(t)
        else:
            value = written[name]
        value = value[:, None, :] if np.ndim(value) == 2 else value
        stats[..., INDEX[name]] = value
    if by == "tensor":
        return stats.transpose(0, 2, 1, 3)
    labels = ["all"] * t if by == "model" else [str(v) for v in ds[by].values]
    order, grouped = aggregate(stats, labels, axis=2)
    if by == "model":
        return grouped[:, :, 0]
    ranked = [order.index(str(g)) for g in ds.geom.statistics(by)[by].values]
    return grouped[:, :, ranked].transpose(0, 2, 1, 3)


@pytest.mark.parametrize("by", GROUPINGS)
def test_statistics_and_metrics_equal_the_computation_in_memory(tmp_path: Path, by: str) -> None:
    written = write_run(tmp_path / "run.zarr", n=14)
    lazy = open_run(tmp_path / "run.zarr")
    eager = lazy.load()  # the same run, in memory
    assert not isinstance(eager["dr"].data, da.Array)
    lazy = open_run(tmp_path / "run.zarr")
    stats = lazy.geom.statistics(by)
    assert isinstance(stats.data, da.Array)
    xr.testing.assert_identical(stats.compute(), eager.geom.statistics(by))
    np.testing.assert_allclose(stats.values, _reference(written, by, lazy), rtol=1e-13)
    metrics = lazy.geom.metrics(by)
    xr.testing.assert_identical(metrics, eager.geom.metrics(by))
    expected = derive(_reference(written, by, lazy))
    np.testing.assert_allclose(
        metrics["cos_dr"].values, expected["cos_dr"], rtol=1e-12, equal_nan=True
    )
    assert not isinstance(metrics["cos_dr"].data, da.Array)  # metrics come back in memory


@pytest.mark.parametrize("by", ["layer", "model"])
def test_stacked_runs_stay_lazy_and_equal_in_memory(tmp_path: Path, by: str) -> None:
    write_run(tmp_path / "a" / "geometry.zarr", n=14, seed=1)
    write_run(tmp_path / "b" / "geometry.zarr", n=8, seed=2, record_chunk=5, tensor_chunk=8)
    stacked = open_runs(tmp_path)
    assert isinstance(stacked["dr"].data, da.Array)
    assert stacked.sizes["run"] == 2
    xr.testing.assert_identical(stacked.geom.metrics(by), stacked.load().geom.metrics(by))


# ----------------------------------------------------------------------------------------------
# 4. Integrity on the lazy path


def test_missing_chunk_raises_and_mask_never_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "run.zarr"
    written = write_run(path, n=20)
    (path / "dr" / "c" / "2" / "0" / "1").unlink()  # records 8-11, tensors 3-5
    with pytest.raises(DamagedStoreError, match=r"dr: dr/c/2/0/1 is missing \(4 records"):
        open_run(path)
    with pytest.warns(DamagedStoreWarning):
        ds = open_run(path, on_damage="mask")
    assert isinstance(ds["dr"].data, da.Array)
    reads: list[str] = []
    original = zarr.storage.LocalStore.get

    async def counting_get(self, key, *args, **kwargs):  # type: ignore[no-untyped-def]
        reads.append(key)
        return await original(self, key, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zarr.storage.LocalStore, "get", counting_get)
        values = ds["dr"].values
    assert "dr/c/2/0/1" not in reads and "dr/c/2/0/0" in reads
    assert np.isnan(values[8:12, :, 3:6]).all()
    np.testing.assert_array_equal(values[:8], written["dr"][:8])
    np.testing.assert_array_equal(values[8:12, :, :3], written["dr"][8:12, :, :3])
    metrics = ds.geom.metrics(by="layer")  # the damaged records are NaN, the others exact
    assert bool(ds["record_damaged"][8:12].all()) and not bool(ds["record_damaged"][:8].any())
    assert np.isnan(metrics["cos_dr"].values[8:12, 1]).all()  # layer 0 holds tensors 1-3
    assert np.isfinite(metrics["cos_dr"].values[:8]).all()


def test_flipped_bit_raises_and_masks_as_nan_integers_become_float(tmp_path: Path) -> None:
    path = tmp_path / "run.zarr"
    write_run(path, n=20)
    chunk = path / "n_opposed" / "c" / "1" / "0" / "2"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(DamagedStoreError, match=r"n_opposed/c/1/0/2 does not decode \("):
        open_run(path)
    with pytest.warns(DamagedStoreWarning):
        ds = open_run(path, on_damage="mask")
    assert ds["n_opposed"].dtype == np.float64
    values = ds["n_opposed"].values
    assert np.isnan(values[4:8, :, 6:]).all() and not np.isnan(values[:4]).any()


def test_chunk_damaged_after_opening_raises_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "run.zarr"
    write_run(path, n=20)
    ds = open_run(path)
    (path / "ff" / "c" / "3" / "1").write_bytes(b"garbage")  # records 12-15, tensors 3-5
    _ = ds["ff"].isel(record=0).values  # other chunks still read
    with pytest.raises(DamagedStoreError, match=r"ff/c/3/1 cannot be read .*changed after"):
        _ = ds["ff"].values


def test_lazy_source_indexes_like_numpy(tmp_path: Path) -> None:
    """What dask may ask of a variable's source: slices with any step, integers, empty."""
    written = write_run(tmp_path / "run.zarr", n=10)
    graph = dict(open_run(tmp_path / "run.zarr")["dr"].data.__dask_graph__())
    (source,) = {id(v): v for v in graph.values() if isinstance(v, store_reader._Chunks)}.values()
    for key in [
        (slice(None),) * 3,
        (3, slice(None), slice(1, 7, 2)),
        (slice(8, 2, -2), 1, 5),
        (slice(0, 0),),
        (-1,),
    ]:
        np.testing.assert_array_equal(source[key], written["dr"][key], err_msg=str(key))
