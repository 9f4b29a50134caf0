"""Verified reading of one run store: :func:`open_run` (public home: :mod:`geomkit.store`).

:func:`open_run` reads every chunk inside the committed range of every array once; a chunk that is
missing (schema version 2) or does not decode, a lost array metadata document or commit counter
raises :class:`~geomkit.store.DamagedStoreError`, or with ``on_damage="mask"`` is masked with NaN
and reported by a :class:`~geomkit.store.DamagedStoreWarning` (docs/schema.md).
"""

from __future__ import annotations

import itertools
import math
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from geomkit.fields import FIELD_TABLE, OPTIONAL_FIELDS
from geomkit.store_schema import (
    _GROWING,
    COORDINATES,
    EVALUATION_VARIABLES,
    SINCE,
    VARIABLES,
    VERIFICATION_VARIABLES,
    DamagedStoreError,
    DamagedStoreWarning,
    StoreDamage,
    _check_schema,
    _coordinate,
    _dims,
    _store_path,
    _variable,
)

# dimension of each coordinate, for coordinates the store lacks
_COORDINATE_DIMS = {
    "step": "step",
    "record": "record",
    "evaluation": "evaluation",
    "strategy": "strategy",
    "measured": "strategy",
    "tensor": "tensor",
    "layer": "tensor",
    "component": "tensor",
    "module": "tensor",
    "numel": "tensor",
}
_PLURAL = {"step": "steps", "record": "records", "evaluation": "evaluations"}


def open_run(
    path: str | os.PathLike, *, on_damage: Literal["raise", "mask"] = "raise"
) -> xr.Dataset:
    """Open one run as an :class:`xarray.Dataset` (its committed part), verified.

    Every chunk inside the committed range of every array is read once: it must exist (schema
    version 2; version 1 omits chunks holding only fill values, see :data:`READABLE_VERSIONS`)
    and decode, and every array and commit counter of the schema must be there. Chunks beyond
    the committed range (an append interrupted by a kill) are not looked at. The verification
    reads the store once, a slab of whole chunks at a time, in bounded memory whatever the
    run's size. The Dataset is lazy: coordinates are in memory, data variables are dask arrays
    chunked as stored (docs/schema.md#chunking-and-lazy-opening) that read their chunks again
    when computed (``.values``, ``.compute()``, ``.load()``); a chunk that no longer reads then
    raises :class:`DamagedStoreError`.

    Parameters
    ----------
    path : str or Path
        A run's zarr store, or a run directory that holds one (``geometry.zarr``).
    on_damage : {"raise", "mask"}
        ``"raise"``: raise :class:`DamagedStoreError` on damage. ``"mask"``: return the
        readable part, with the values of every damaged chunk set to NaN (integer and boolean
        variables holding such values become float64; string coordinates ``None``), a variable
        whose metadata is lost all NaN, a coordinate whose metadata is lost left out; the
        damage is listed in ``ds.attrs["damaged"]`` (one string per damaged part), marked by
        boolean coordinates ``step_damaged`` / ``record_damaged`` / ``evaluation_damaged``
        (present only where something was masked; :func:`geomkit.theory.audit` leaves those
        records out), and reported by a :class:`DamagedStoreWarning`.

    Raises
    ------
    FileNotFoundError
        If there is no store at ``path``.
    SchemaError
        If the store is not a geomkit run or has a schema version this geomkit cannot read.
    DamagedStoreError
        If a chunk, an array's metadata or a commit counter is missing or unreadable (with
        ``on_damage="raise"``; with either option when the group's own metadata is lost).

    Examples
    --------
    >>> import tempfile, torch
    >>> from geomkit.recorder import Recorder
    >>> tmp = tempfile.TemporaryDirectory()
    >>> rec = Recorder(f"{tmp.name}/geometry.zarr", ["layers.0.w"], [4], "sago")
    >>> rec.record(0, [torch.ones(4)], [-torch.ones(4)], forget_loss=2.0, retain_loss=1.0)
    >>> rec.close()
    >>> ds = open_run(tmp.name)  # the run directory, or the store inside it
    >>> ds.attrs["applied_strategy"], ds.sizes["record"], float(ds["forget_loss"][0])
    ('sago', 1, 2.0)
    >>> tmp.cleanup()
    """
    if on_damage not in ("raise", "mask"):
        raise ValueError(f"invalid on_damage={on_damage!r}: expected 'raise' or 'mask'")
    store = _store_path(path)
    try:
        group = zarr.open_group(store, mode="r")
        attrs = dict(group.attrs)
    except Exception as error:  # zarr raises JSON, key and value errors for broken metadata
        problem = f"cannot be read ({_short(error)})"
        raise DamagedStoreError(
            store, [StoreDamage("(group)", "zarr.json", problem, "everything")]
        ) from error
    version = _check_schema(store, attrs)
    ds, damage = _Reader(store, group, attrs, version, mask=on_damage == "mask").read()
    if damage:
        if on_damage == "raise":
            raise DamagedStoreError(store, damage)
        ds.attrs["damaged"] = [str(d) for d in damage]
        warnings.warn(
            f"{store} is damaged; masked with NaN: " + "; ".join(ds.attrs["damaged"]),
            DamagedStoreWarning,
            stacklevel=2,
        )
    ds.attrs["source"] = str(store)
    return ds


@dataclass
class _Found:
    """A damaged part before its affected records are described."""

    variable: str
    key: str
    problem: str
    dim: str | None
    start: int
    stop: int
    lost: bool = False  # the whole variable is unreadable


@dataclass
class _Plan:
    """One array being read: its dims and attributes, the damaged regions and (coordinates
    only) the buffer it is read into."""

    array: Any  # zarr.AsyncArray
    dims: tuple[str, ...]
    attrs: dict[str, Any]
    want: tuple[int, ...]
    dtype: np.dtype
    extent: tuple[int, ...]
    bad: list[tuple[slice, ...]]
    bad_chunks: set[tuple[int, ...]]
    data: np.ndarray | None = None  # coordinates: read in full


_VERIFY_BYTES = 64 * 2**20
"""Bytes of one array read at a time while verifying (bounded memory, whatever the run's size)."""


class _Reader:
    """Reads and verifies one store (see :func:`open_run`).

    One listing of the store's keys, the metadata of every array opened concurrently, then every
    array's committed part read once in slabs of whole chunks along its first dimension (at most
    :data:`_VERIFY_BYTES` at a time), and thrown away: coordinates are kept in memory, data
    variables come back as dask arrays that read their chunks again when computed. Chunks are
    read one by one only to locate a chunk that does not decode.
    """

    def __init__(
        self,
        store: Path,
        group: zarr.Group,
        attrs: Mapping[str, Any],
        version: int,
        *,
        mask: bool,
    ) -> None:
        self.store, self.group, self.attrs, self.version = store, group, attrs, version
        self.mask = mask
        self.found: list[_Found] = []
        self.meta = "zarr.json" if group.metadata.zarr_format == 3 else ".zarray"
        self.keys: set[str] = set()

    def read(self) -> tuple[xr.Dataset, list[StoreDamage]]:
        from zarr.core.sync import sync

        self.keys = _list_keys(self.group.store, self.group.store_path.path)
        present = {k.split("/", 1)[0] for k in self.keys if "/" in k}
        # the verification variables are optional (older stores lack them); once written,
        # they are verified like the rest
        required = [
            *COORDINATES,
            *(n for n in VARIABLES if SINCE.get(n, 1) <= self.version),  # older: without them
            *(n for n in VERIFICATION_VARIABLES if n in present),
        ]
        names = sorted(present | set(required), key=_schema_order)
        opened = sync(_open_all(self.group.store_path, names))
        arrays: dict[str, Any] = {}
        for name, node in zip(names, opened, strict=True):
            if isinstance(node, zarr.AsyncArray):
                arrays[name] = node
            elif isinstance(node, BaseException) and name in required:  # metadata lost
                key = f"{name}/{self.meta}"
                problem = (
                    "is missing" if key not in self.keys else f"cannot be read ({_short(node)})"
                )
                self.found.append(_Found(name, key, problem, None, 0, 0, lost=True))
        optional: set[str] = set()
        if self.version == 1 and "evaluation" not in arrays:  # written before evaluations
            optional = {"evaluation", *EVALUATION_VARIABLES}
            self.found = [f for f in self.found if f.variable not in optional]
        # the optional fields of version 2 were added within it: a version 2 store that lacks
        # all of them was written before they existed (one that lacks some is damaged)
        legacy = [n for n in OPTIONAL_FIELDS if FIELD_TABLE[n].since <= 2]
        if self.version <= 2 and not any(name in arrays for name in legacy):
            self.found = [f for f in self.found if f.variable not in legacy]

        sizes = self._sizes(arrays)
        plans = {name: self._plan(name, array, sizes) for name, array in arrays.items()}
        plans = {name: plan for name, plan in plans.items() if plan is not None}
        for found in self.found:  # lost metadata: everything along the first dimension
            dims = _schema_dims(found.variable)
            if found.lost and dims:
                found.dim, found.stop = dims[0], sizes.get(dims[0], 0)
        for name, plan in plans.items():
            if name in COORDINATES:
                plan.data = np.full(plan.want, _blank(plan.dtype), dtype=plan.dtype)
            if all(plan.extent):
                self._check_chunks(name, plan)
        variables = {name: self._variable(name, plan) for name, plan in plans.items()}
        for found in self.found:  # only reached with mask=True
            spec = VARIABLES.get(found.variable, VERIFICATION_VARIABLES.get(found.variable))
            if found.lost and spec and all(d in sizes for d in spec["dims"]):
                shape = [sizes[d] for d in spec["dims"]]
                attrs = {k: spec[k] for k in ("long_name", "units", "description")}
                variables[found.variable] = xr.Variable(
                    spec["dims"], da.full(shape, np.nan), attrs=attrs
                )
        for name in sorted(optional):
            if name in VARIABLES:
                variables[name] = _variable(name, np.zeros(0)).chunk()
            else:
                variables[name] = _coordinate(name, name, np.zeros(0, dtype=np.int64))
        coords = {n: v for n, v in variables.items() if n in COORDINATES}
        data_vars = {n: v for n, v in variables.items() if n not in COORDINATES}
        ds = xr.Dataset(data_vars, coords=coords)
        ds.attrs = {k: v for k, v in self.attrs.items() if not k.startswith("committed_")}
        if self.mask:
            ds = ds.assign_coords(self._damaged_coordinates(sizes))
        return ds, self._describe(variables)

    def _damaged_coordinates(self, sizes: Mapping[str, int]) -> dict[str, xr.Variable]:
        """``<dim>_damaged``: True at the steps, records or evaluations whose values were
        masked (only for the dimensions that have any), so that analyses can leave them out."""
        out = {}
        for dim in _GROWING:
            mark = np.zeros(sizes.get(dim, 0), dtype=bool)
            for found in self.found:
                if found.dim == dim:
                    mark[found.start : found.stop] = True
            if mark.any():
                out[f"{dim}_damaged"] = xr.Variable(
                    (dim,),
                    mark,
                    attrs={
                        "long_name": f"{dim} damaged",
                        "units": "1",
                        "description": f"true where a damaged chunk was masked with NaN "
                        f"(open_run(path, on_damage='mask')); the {dim}'s values there are "
                        "not the recorded ones",
                    },
                )
        return out

    def _sizes(self, arrays: Mapping[str, Any]) -> dict[str, int]:
        """Length of each dimension: committed counts, fixed sizes from the arrays."""
        sizes: dict[str, int] = {}
        required = ("step", "record") if self.version == 1 else tuple(_GROWING)
        for dim, key in _GROWING.items():
            value = self.attrs.get(key, None if dim in required else 0)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                sizes[dim] = value
                continue
            problem = "lacks attribute" if value is None else f"has an invalid {value!r} as"
            self.found.append(_Found("(group)", "zarr.json", f"{problem} {key!r}", None, 0, 0))
            lengths = [a.shape[0] for a in arrays.values() if _dims(a)[:1] == (dim,)]
            sizes[dim] = min(lengths, default=0)  # read what every array holds
        for array in arrays.values():
            for dim, n in zip(_dims(array), array.shape, strict=False):
                sizes.setdefault(dim, n)
        return sizes

    def _plan(self, name: str, array: Any, sizes: Mapping[str, int]) -> _Plan | None:
        dims = _dims(array)
        if len(dims) != len(array.shape):
            key = f"{name}/{self.meta}"
            self.found.append(_Found(name, key, "lacks dimension names", None, 0, 0, lost=True))
            return None
        attrs = {
            k: v for k, v in array.attrs.items() if not k.startswith("_") and k != "coordinates"
        }
        want = tuple(sizes[d] for d in dims)
        extent = tuple(min(w, n) for w, n in zip(want, array.shape, strict=True))
        dtype = np.dtype(object) if array.dtype.kind in "OTSU" else np.dtype(array.dtype)
        plan = _Plan(array, dims, attrs, want, dtype, extent, [], set())
        for i, (w, n) in enumerate(zip(want, array.shape, strict=True)):
            if n < w:  # an array shorter than the committed count, or than its dimension
                rows = (n, w) if i == 0 else (0, want[0])
                problem = f"holds {n} of {w} {dims[i]} entries"
                region = [slice(None)] * len(want)
                region[i] = slice(n, w)
            elif n > w and dims[i] not in _GROWING:  # sizes disagree: trust none of it
                rows = (0, want[0])
                problem = f"holds {n} {dims[i]} entries where the store has {w}"
                region = [slice(None)] * len(want)
            else:
                continue
            self.found.append(_Found(name, f"{name}/{self.meta}", problem, dims[0], *rows))
            plan.bad.append(tuple(region))
        return plan

    def _check_chunks(self, name: str, plan: _Plan) -> None:
        """Read the committed part of one array, slab by slab (into ``plan.data`` for a
        coordinate, else thrown away); record every chunk of it that is missing (version 2) or
        does not decode."""
        from zarr.core.sync import sync

        array, extent = plan.array, plan.extent
        chunks = array.chunks
        counts = [math.ceil(e / c) for e, c in zip(extent, chunks, strict=True)]
        prefix = f"{array.path}/"
        problems: dict[tuple[int, ...], str] = {}
        if self.version >= 2:  # version 1 omits chunks of fill values: absence is no damage
            for index in itertools.product(*(range(n) for n in counts)):
                if prefix + array.metadata.encode_chunk_key(index) not in self.keys:
                    problems[index] = "is missing"
        row_bytes = plan.dtype.itemsize * math.prod(extent[1:]) * chunks[0]
        step = max(1, _VERIFY_BYTES // max(row_bytes, 1))  # chunk rows per slab
        for first in range(0, counts[0], step):
            rows = slice(first * chunks[0], min((first + step) * chunks[0], extent[0]))
            region = (rows, *(slice(0, e) for e in extent[1:]))
            try:
                result = sync(array.getitem(region))
            except Exception:  # locate the chunks that do not decode, one by one
                result = None
            if result is not None:
                if plan.data is not None:
                    plan.data[region] = result
                continue
            sync_array = zarr.Array(array)
            grid = itertools.product(
                range(first, min(first + step, counts[0])), *(range(n) for n in counts[1:])
            )
            for index in grid:
                if index in problems:
                    continue
                chunk = _chunk_region(index, chunks, extent)
                try:
                    values = sync_array[chunk]
                except Exception as error:
                    problems[index] = f"does not decode ({_short(error)})"
                    continue
                if plan.data is not None:
                    plan.data[chunk] = values
        for index, problem in sorted(problems.items()):
            rows = _chunk_region(index, chunks, extent)[0]
            key = prefix + array.metadata.encode_chunk_key(index)
            self.found.append(_Found(name, key, problem, plan.dims[0], rows.start, rows.stop))
            plan.bad.append(_chunk_region(index, chunks, extent))
            plan.bad_chunks.add(index)

    def _variable(self, name: str, plan: _Plan) -> xr.Variable:
        masked = bool(plan.bad) and self.mask
        dtype = plan.dtype
        if masked and dtype.kind in "iub":
            dtype = np.dtype(np.float64)
        if plan.data is not None:  # a coordinate, in memory
            data = plan.data.astype(dtype) if dtype != plan.dtype else plan.data
            if masked:
                for region in plan.bad:
                    data[region] = _blank(dtype)
            return xr.Variable(plan.dims, data, attrs=plan.attrs)
        # dask chunks are the stored chunks: a selection reads only the chunks it needs
        chunks = tuple(
            min(c, w) if w else c for c, w in zip(plan.array.chunks, plan.want, strict=True)
        )
        source = _Chunks(
            self.store, name, zarr.Array(plan.array), plan, dtype, masked, self.version
        )
        lazy = da.from_array(
            source,
            chunks=chunks,
            asarray=False,
            fancy=False,
            lock=False,
            name=f"open_run-{name}-{uuid.uuid4().hex}",
            meta=np.empty((0,) * len(plan.want), dtype=dtype),
        )
        return xr.Variable(plan.dims, lazy, attrs=plan.attrs)

    def _describe(self, variables: Mapping[str, xr.Variable]) -> list[StoreDamage]:
        """The damage found, with the affected records as coordinate values where known."""
        rows: dict[str, list[tuple[int, int]]] = {}
        for f in self.found:
            rows.setdefault(f.variable, []).append((f.start, f.stop))
        out = []
        for f in self.found:
            if f.dim is None:
                affected = (
                    "the commit counter; read up to the shortest array"
                    if f.variable == "(group)"
                    else "the whole variable"
                )
                out.append(StoreDamage(f.variable, f.key, f.problem, affected))
                continue
            coordinate = variables.get(f.dim)
            clean = not any(a < f.stop and f.start < b for a, b in rows.get(f.dim, []))
            values = coordinate.values if coordinate is not None and clean else None
            affected = _affected(f.dim, f.start, f.stop, values)
            out.append(StoreDamage(f.variable, f.key, f.problem, affected, f.dim, f.start, f.stop))
        return out


def _chunk_region(
    index: Sequence[int], chunks: Sequence[int], extent: Sequence[int]
) -> tuple[slice, ...]:
    """The region of chunk ``index`` inside ``extent``."""
    return tuple(
        slice(i * c, min((i + 1) * c, e)) for i, c, e in zip(index, chunks, extent, strict=True)
    )


class _Chunks:
    """The lazy source of one data variable opened by :func:`open_run` (what dask reads).

    Indexing it reads the chunks of the committed part that the region touches; the region
    outside the array's stored part and every damaged part are the blank value (NaN in a
    variable masked by ``on_damage="mask"``), and a damaged chunk is never read. A chunk that
    fails to read now although it was verified when the run was opened raises
    :class:`~geomkit.store.DamagedStoreError` naming it.
    """

    def __init__(
        self,
        store: Path,
        name: str,
        array: zarr.Array,
        plan: _Plan,
        dtype: np.dtype,
        masked: bool,
        version: int,
    ) -> None:
        self.store, self.name, self.array = store, name, array
        self.shape, self.dtype, self.ndim = plan.want, dtype, len(plan.want)
        self.extent, self.bad_chunks = plan.extent, frozenset(plan.bad_chunks)
        # a region of damage not made of whole chunks spans the array (sizes disagree) or
        # lies outside what it stores (read as blank anyway)
        self.everything_bad = masked and any(
            all(r == slice(None) for r in region) for region in plan.bad
        )
        self.version = version

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        ranges, picks, squeeze = [], [], []
        for axis, (k, n) in enumerate(zip(key, self.shape, strict=True)):
            if isinstance(k, slice):
                index = np.arange(*k.indices(n))
            else:  # an integer
                index = np.array([int(k) % n if n else int(k)])
                squeeze.append(axis)
            low, high = (int(index.min()), int(index.max()) + 1) if index.size else (0, 0)
            ranges.append((low, high))
            picks.append(index - low)
        out = np.full(tuple(b - a for a, b in ranges), _blank(self.dtype), dtype=self.dtype)
        if not self.everything_bad:
            self._fill(out, ranges)
        if any(len(p) != b - a for p, (a, b) in zip(picks, ranges, strict=True)) or any(
            p.size and p[0] != 0 for p in picks
        ):  # a step other than 1
            out = out[np.ix_(*picks)]
        return out.squeeze(axis=tuple(squeeze)) if squeeze else out

    def _fill(self, out: np.ndarray, ranges: list[tuple[int, int]]) -> None:
        inner = [(a, min(b, e)) for (a, b), e in zip(ranges, self.extent, strict=True)]
        if any(b <= a for a, b in inner):
            return
        chunks = self.array.chunks
        touched = [range(a // c, (b - 1) // c + 1) for (a, b), c in zip(inner, chunks, strict=True)]
        if self.bad_chunks and any(
            index in self.bad_chunks for index in itertools.product(*touched)
        ):
            parts = [  # read chunk by chunk, skipping the damaged ones
                tuple(
                    (max(a, i * c), min(b, (i + 1) * c))
                    for (a, b), i, c in zip(inner, index, chunks, strict=True)
                )
                for index in itertools.product(*touched)
                if index not in self.bad_chunks
            ]
        else:
            parts = [tuple(inner)]
        for part in parts:
            source = tuple(slice(a, b) for a, b in part)
            target = tuple(
                slice(a - r[0], b - r[0]) for (a, b), r in zip(part, ranges, strict=True)
            )
            try:
                out[target] = self.array[source]
            except Exception as error:
                raise self._damage(part, error) from error

    def _damage(self, part: tuple[tuple[int, int], ...], error: Exception) -> DamagedStoreError:
        """The error for a read that failed after :func:`open_run` verified the store: the
        first chunk of ``part`` that fails to read alone, or the whole part."""
        chunks = self.array.chunks
        key, rows = f"{self.name} chunks", part[0]
        touched = [range(a // c, (b - 1) // c + 1) for (a, b), c in zip(part, chunks, strict=True)]
        for index in itertools.product(*touched):
            region = _chunk_region(index, chunks, self.extent)
            try:
                self.array[region]
            except Exception as chunk_error:
                key = f"{self.array.path}/{self.array.metadata.encode_chunk_key(index)}"
                rows, error = (region[0].start, region[0].stop), chunk_error
                break
        problem = (
            f"cannot be read ({_short(error)}) although open_run verified it: the store "
            "changed after it was opened"
        )
        affected = f"{self.name} index {rows[0]}..{rows[1] - 1} along its first dimension"
        return DamagedStoreError(self.store, [StoreDamage(self.name, key, problem, affected)])


async def _open_all(store_path: Any, names: Sequence[str]) -> list[Any]:
    """The nodes ``names`` of the group at ``store_path`` (an exception where one fails)."""
    from zarr.api.asynchronous import open_group

    group = await open_group(store=store_path, mode="r")
    return await _gather([group.getitem(name) for name in names])


async def _gather(tasks: list[Any]) -> list[Any]:
    """Await ``tasks`` concurrently; an exception is returned in place of its result."""
    import asyncio

    return await asyncio.gather(*tasks, return_exceptions=True)


def _list_keys(store: Any, prefix: str) -> set[str]:
    """Every key of ``store`` under ``prefix``, relative to it (one listing per store)."""
    from zarr.core.sync import sync

    root = f"{prefix.rstrip('/')}/" if prefix else ""

    async def collect() -> set[str]:
        return {k[len(root) :] async for k in store.list_prefix(root)}

    return sync(collect())


def _schema_order(name: str) -> tuple[int, str]:
    """Coordinates first, then the data variables in schema order, then anything else."""
    order = [*COORDINATES, *VARIABLES, *VERIFICATION_VARIABLES]
    return (order.index(name), name) if name in order else (len(order), name)


def _schema_dims(name: str) -> tuple[str, ...]:
    if name in VARIABLES:
        return tuple(VARIABLES[name]["dims"])
    if name in VERIFICATION_VARIABLES:
        return tuple(VERIFICATION_VARIABLES[name]["dims"])
    if name in _COORDINATE_DIMS:
        return (_COORDINATE_DIMS[name],)
    return ()


def _blank(dtype: np.dtype) -> Any:
    """The value standing for 'damaged' in an array of ``dtype`` (NaN, None, or 0/False for
    integer and boolean arrays until they are converted to float)."""
    if dtype.kind == "f":
        return np.nan
    if dtype.kind == "O":
        return None
    return np.zeros((), dtype=dtype)[()]


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def _span(values: np.ndarray) -> str:
    v = [int(x) if float(x).is_integer() else float(x) for x in np.asarray(values).ravel()]
    if len(v) == 1:
        return str(v[0])
    if len(v) > 2 and all(b - a == 1 for a, b in itertools.pairwise(v)):
        return f"{v[0]}..{v[-1]}"
    if len(v) <= 8:
        return ", ".join(str(x) for x in v)
    return f"{v[0]}, {v[1]}, ..., {v[-1]}"


def _affected(dim: str, start: int, stop: int, coordinate: np.ndarray | None) -> str:
    """``"records at steps 0, 2, 4"``, or index ranges when the coordinate is unknown."""
    n = stop - start
    plural = _PLURAL.get(dim, dim)
    if n <= 0:
        return f"no committed {plural}"
    if coordinate is not None and dim in _PLURAL:
        span = _span(coordinate[start:stop])
        if dim == "step":
            return f"step{'s' if n > 1 else ''} {span}"
        noun = plural if n > 1 else dim
        if dim == "record":
            return f"{n} {noun} at step{'s' if n > 1 else ''} {span}"
        return f"{n} {noun} after {span} steps"
    return f"{dim} index {start}" if n == 1 else f"{dim} indices {start}..{stop - 1}"
