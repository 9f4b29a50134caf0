"""Streaming a run to zarr: :class:`RunWriter` (public home: :mod:`geomkit.store`).

The writer appends blocks while training runs and, after each block, advances the
``committed_steps`` / ``committed_records`` / ``committed_evaluations`` attributes, so that a run
killed at any point leaves a store whose committed part :func:`geomkit.store.open_run` reads back
intact (docs/schema.md).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from geomkit._deprecation import renamed
from geomkit._validation import check_integer
from geomkit.layers import TensorLocation
from geomkit.store_schema import (
    _EVALUATION_VARS,
    _GROWING,
    _RECORD_VARS,
    _STEP_VARS,
    _VERIFY_VARS,
    SCHEMA,
    SCHEMA_VERSION,
    SINCE,
    VARIABLES,
    VERIFICATION_VARIABLES,
    SchemaError,
    _check_schema,
    _coordinate,
    _dims,
    _variable,
    record_chunks,
)


def _clean_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in attrs.items():
        if isinstance(value, (np.integer, np.floating, np.bool_)):
            value = value.item()
        if value is None:
            value = "none"
        elif isinstance(value, (list, tuple)):
            value = [str(v) for v in value]
        elif not isinstance(value, (str, int, float, bool)):
            value = str(value)
        out[key] = value
    return out


class RunWriter:
    """Stream one run's records to a zarr store.

    Parameters
    ----------
    out : str or Path
        The zarr store (a directory), created or overwritten (``mode="w"``) or continued
        (``mode="a"``, see ``resume_step``); ``path`` is a deprecated spelling.
    tensors : sequence of TensorLocation
        The recorded parameter tensors, in order (from :func:`geomkit.layers.locate_all`).
    numel : sequence of int
        Their element counts.
    strategies : sequence of str
        Strategy names: the applied one first, then the shadows.
    attrs : mapping
        Run attributes (model, objective, alpha, gamma, seed, ...); the schema attributes are
        added.
    mode : {"w", "a"}
        Create a new store (schema version :data:`SCHEMA_VERSION`), or append to an existing
        one of that version.
    resume_step : int, optional
        With ``mode="a"``: drop everything recorded at steps >= ``resume_step`` before
        appending (the steps after a checkpoint are recomputed on resume).
    record_chunk, tensor_chunk : int, optional
        Records and tensors per chunk of the per-record variables of a new store (default
        :data:`~geomkit.store_schema.RECORD_CHUNK` and
        :data:`~geomkit.store_schema.TENSOR_CHUNK`; docs/schema.md#chunking-and-lazy-opening).
        A continued store keeps its own chunks.

    Raises
    ------
    SchemaError
        With ``mode="a"``, if the store is no geomkit run or has another schema version (a
        version 1 store is read by :func:`open_run` but not appended to: its chunks of fill
        values are not stored, which version 2 requires).
    """

    @renamed(path="out")
    def __init__(
        self,
        out: str | os.PathLike,
        tensors: Sequence[TensorLocation],
        numel: Sequence[int],
        strategies: Sequence[str],
        attrs: Mapping[str, Any] | None = None,
        *,
        mode: str = "w",
        resume_step: int | None = None,
        record_chunk: int | None = None,
        tensor_chunk: int | None = None,
    ) -> None:
        if mode not in ("w", "a"):
            raise ValueError(f"invalid mode={mode!r}: expected 'w' or 'a'")
        for label, value in (("record_chunk", record_chunk), ("tensor_chunk", tensor_chunk)):
            if value is not None:
                check_integer(label, value, 1, error=ValueError)
        if len(tensors) != len(numel):
            raise ValueError(f"{len(tensors)} tensors but {len(numel)} numel values")
        if not strategies:
            raise ValueError("strategies is empty; expected the applied strategy first")
        self.path = Path(out)
        self.n_tensors = len(tensors)
        self.strategies = list(strategies)
        self.attrs = _clean_attrs(
            {
                **(attrs or {}),
                "geomkit_schema": SCHEMA,
                "schema_version": SCHEMA_VERSION,
                "applied_strategy": self.strategies[0],
            }
        )
        if mode == "a" and (self.path / "zarr.json").exists():
            version = _check_schema(self.path, dict(zarr.open_group(self.path, mode="r").attrs))
            if version != SCHEMA_VERSION:
                raise SchemaError(
                    f"cannot append to {self.path}: it has geomkit schema version {version} and "
                    f"this geomkit writes version {SCHEMA_VERSION} only (see docs/schema.md); "
                    "finish the run with the geomkit that started it, or start a new run "
                    "(open_run still reads it)"
                )
            self._truncate(resume_step)
            return
        written = {**VARIABLES, **VERIFICATION_VARIABLES}
        template = xr.Dataset(
            {name: _variable(name, np.zeros(_empty_shape(name, self))) for name in written},
            coords={
                "step": _coordinate("step", "step", np.zeros(0, dtype=np.int64)),
                "record": _coordinate("record", "record", np.zeros(0, dtype=np.int64)),
                "evaluation": _coordinate("evaluation", "evaluation", np.zeros(0, dtype=np.int64)),
                "strategy": _coordinate("strategy", "strategy", np.array(strategies, object)),
                "measured": _coordinate("measured", "strategy", np.arange(len(strategies)) == 0),
                "tensor": _coordinate(
                    "tensor", "tensor", np.array([t.name for t in tensors], object)
                ),
                "layer": _coordinate("layer", "tensor", np.array([t.layer for t in tensors])),
                "component": _coordinate(
                    "component", "tensor", np.array([t.component for t in tensors], object)
                ),
                "module": _coordinate(
                    "module", "tensor", np.array([t.module for t in tensors], object)
                ),
                "numel": _coordinate("numel", "tensor", np.asarray(numel, dtype=np.int64)),
            },
            attrs={**self.attrs, **dict.fromkeys(_GROWING.values(), 0)},
        )
        chunking = record_chunks(self.n_tensors, record_chunk, tensor_chunk)
        encoding = {name: {"chunks": _chunks(name, self, *chunking)} for name in written}
        encoding["step"] = {"chunks": (1024,)}
        encoding["record"] = {"chunks": (max(chunking[0], 64),)}
        encoding["evaluation"] = {"chunks": (256,)}
        for name in template.variables:  # version 2: every chunk checksummed
            encoding.setdefault(str(name), {})["compressors"] = (_compressor(),)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            template.to_zarr(
                self.path,
                mode="w",
                consolidated=False,
                encoding=encoding,
                write_empty_chunks=True,  # version 2: a missing chunk is damage
            )

    # -- appending ---------------------------------------------------------------------------

    @property
    def committed(self) -> tuple[int, int]:
        """``(steps, records)`` safely on disk."""
        counts = _committed(zarr.open_group(self.path, mode="r").attrs)
        return counts["step"], counts["record"]

    def append(
        self,
        steps: Mapping[str, np.ndarray] | None = None,
        records: Mapping[str, np.ndarray] | None = None,
        evaluations: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Append a block of steps, records and/or evaluations, then mark them committed.

        Parameters
        ----------
        steps : mapping
            ``"step"`` (int array) and every per-step variable (``forget_loss``, ...).
        records : mapping
            ``"record"`` (the step numbers) and every per-record variable, shaped
            ``[n, n_tensors]`` or ``[n, n_strategies, n_tensors]``. The verification
            variables (:data:`~geomkit.store.VERIFICATION_VARIABLES`) are optional: left out,
            the records are written as not verified (NaN).
        evaluations : mapping
            ``"evaluation"`` (steps completed) and the evaluation variables (``forget_acc``,
            ``retain_acc``, ``general_acc``).
        """
        from zarr.core.sync import sync

        group = zarr.open_group(self.path, mode="r+")
        counts = _committed(group.attrs)
        present = set(group.array_keys())
        blocks = {"step": (steps, _STEP_VARS), "record": (records, _RECORD_VARS)}
        blocks["evaluation"] = (evaluations, _EVALUATION_VARS)
        arrays: dict[str, np.ndarray] = {}
        for dim, (block, names) in blocks.items():
            if block is not None and len(block[dim]):
                arrays.update(self._block_arrays(dim, block, names, present))
                counts[dim] += len(block[dim])
        if arrays:  # every array at once: their chunks are written concurrently
            sync(_append_all(group.store_path, arrays))
        group.attrs.update({_GROWING[dim]: n for dim, n in counts.items()})

    def _block_arrays(
        self, dim: str, block: Mapping[str, np.ndarray], names: list[str], present: set[str]
    ) -> dict[str, np.ndarray]:
        """The arrays of one block, checked against the schema, by variable name."""
        n = len(block[dim]) if dim in block else 0
        later = [name for name in names if name in SINCE and name not in block]
        if later:  # variables of a later schema version, which older callers do not pass: NaN
            block = {**block}
            for name in later:
                block[name] = np.full((n, *_empty_shape(name, self)[1:]), np.nan)
        missing = [n for n in [dim, *names] if n not in block]
        if missing:
            raise ValueError(f"append of {dim} block is missing {missing}")
        n = len(block[dim])
        if dim == "record":  # optional; a store begun before verification has none
            block = {**block}
            for name in _VERIFY_VARS:
                if name not in present:
                    block.pop(name, None)
                    continue
                names = [*names, name]
                if name not in block:
                    block[name] = np.full((n, *_empty_shape(name, self)[1:]), np.nan)
        arrays = {dim: np.asarray(block[dim], dtype="int64")}
        for name in names:
            spec = _spec(name)
            data = np.asarray(block[name], dtype=spec["dtype"])
            expected = (n, *_empty_shape(name, self)[1:])
            if data.shape != expected:
                raise ValueError(f"{name} block has shape {data.shape}, expected {expected}")
            arrays[name] = data
        return arrays

    def _truncate(self, resume_step: int | None) -> None:
        """Cut the store back to its committed part, and to steps < ``resume_step``.

        Evaluations taken after more than ``resume_step`` steps are dropped too. The commit
        counters are lowered before the arrays are cut, so a kill in between leaves arrays
        longer than committed (the state of an interrupted append), never shorter.
        """
        group = zarr.open_group(self.path, mode="r+")
        counts = _committed(group.attrs)
        if resume_step is not None:
            for dim in ("step", "record"):
                counts[dim] = int(
                    np.searchsorted(group[dim][: counts[dim]], resume_step, side="left")
                )
            done = group["evaluation"][: counts["evaluation"]]
            counts["evaluation"] = int(np.searchsorted(done, resume_step, side="right"))
        group.attrs.update({_GROWING[dim]: n for dim, n in counts.items()})
        for _, array in group.arrays():
            dims = _dims(array)
            if dims and dims[0] in counts:
                array.resize((counts[dims[0]], *array.shape[1:]))


_WRITE_CONFIG = {"write_empty_chunks": True}


async def _append_all(store_path: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Append each of ``arrays`` to the array of its name along the first axis, all at once
    (zarr appends directly: no Dataset round trip)."""
    import asyncio

    from zarr.api.asynchronous import open_group

    group = await open_group(store=store_path, mode="r+")
    nodes = await asyncio.gather(*(group.getitem(name) for name in arrays))
    await asyncio.gather(
        *(
            node.with_config(_WRITE_CONFIG).append(data, axis=0)
            for node, data in zip(nodes, arrays.values(), strict=True)
        )
    )


def _compressor() -> zarr.codecs.ZstdCodec:
    return zarr.codecs.ZstdCodec(level=0, checksum=True)


def _committed(attrs: Mapping[str, Any]) -> dict[str, int]:
    """How many entries of each growing dimension are committed (0 if never written)."""
    return {dim: int(attrs.get(key, 0)) for dim, key in _GROWING.items()}


def _empty_shape(name: str, writer: RunWriter) -> tuple[int, ...]:
    sizes = {
        "step": 0,
        "record": 0,
        "evaluation": 0,
        "tensor": writer.n_tensors,
        "strategy": len(writer.strategies),
    }
    return tuple(sizes[d] for d in _spec(name)["dims"])


def _spec(name: str) -> dict[str, Any]:
    """The schema entry of a data variable, verification variables included."""
    return VARIABLES[name] if name in VARIABLES else VERIFICATION_VARIABLES[name]


def _chunks(name: str, writer: RunWriter, record_chunk: int, tensor_chunk: int) -> tuple[int, ...]:
    sizes = {
        "step": 1024,
        "record": record_chunk,
        "evaluation": 256,
        "tensor": tensor_chunk,
        "strategy": len(writer.strategies),
    }
    return tuple(sizes[d] for d in _spec(name)["dims"])
