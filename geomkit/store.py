"""The on-disk record of a run: a versioned xarray schema streamed to zarr (docs/schema.md).

One run is one zarr store holding one :class:`xarray.Dataset` with two growing dimensions:

``step``
    every optimizer step: losses, learning rate, gradient norm, wall time, skipped flag;
``record``
    the optimizer steps at which gradient geometry was recorded (a schedule may skip steps);
    the coordinate holds the step numbers.

plus the fixed dimensions ``tensor`` (parameter tensors, with layer / component / module /
numel coordinates) and ``strategy`` (the applied strategy first, then shadow strategies).
Geometry variables are the additive sufficient statistics of :mod:`geomkit.statistics`.

:class:`RunWriter` appends blocks while training runs and, after each block, advances the
``committed_steps`` / ``committed_records`` attributes. A run killed at any point therefore
leaves a store whose committed part :func:`open_run` reads back intact; a store written to the
end opens with plain ``xarray.open_zarr`` too.

:func:`open_run` verifies the store: every chunk inside the committed range of every array must
exist and decode (schema version 2 stores every chunk and checksums it), else it raises
:class:`DamagedStoreError`, or with ``on_damage="mask"`` returns the rest with the damaged
records set to NaN.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from geomkit._deprecation import renamed
from geomkit.fields import FIELD_TABLE, STORED_FIELDS
from geomkit.layers import TensorLocation

__all__ = [
    "EVALUATION_VARIABLES",
    "READABLE_VERSIONS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "VARIABLES",
    "DamagedStoreError",
    "DamagedStoreWarning",
    "RunWriter",
    "SchemaError",
    "StoreDamage",
    "open_run",
    "open_runs",
    "stack_runs",
]

SCHEMA = "geomkit.run"
SCHEMA_VERSION = 2
"""The layout written. Version 2 added the ``evaluation`` dimension, stores every chunk (also one
holding only fill values) and checksums each (zstd), so that a missing or altered chunk is
detectable."""
READABLE_VERSIONS = (1, 2)
"""Versions :func:`open_run` reads. A version 1 store may lack the evaluation arrays (they open
empty) and legitimately omits chunks holding only fill values, so a missing chunk of it cannot be
told from damage and reads as the fill value; chunks that exist must still decode."""

VARIABLES: dict[str, dict[str, Any]] = {
    # per optimizer step
    "forget_loss": dict(
        dims=("step",),
        dtype="float64",
        long_name="forget loss",
        units="1",
        description="forget objective L_f (to be minimised) averaged over the accumulation "
        "window and data-parallel ranks",
    ),
    "retain_loss": dict(
        dims=("step",),
        dtype="float64",
        long_name="retain loss",
        units="1",
        description="retain objective L_r averaged over the accumulation window and ranks; NaN "
        "for forget-only objectives",
    ),
    "learning_rate": dict(
        dims=("step",),
        dtype="float64",
        long_name="learning rate",
        units="1",
        description="learning rate used by the optimizer at this step",
    ),
    "grad_norm": dict(
        dims=("step",),
        dtype="float64",
        long_name="update norm before clipping",
        units="1",
        description="Euclidean norm of the combined update d over all trainable tensors, "
        "before gradient clipping",
    ),
    "wall_time": dict(
        dims=("step",),
        dtype="float64",
        long_name="wall time",
        units="s",
        description="seconds since the run started, at the end of the step",
    ),
    "skipped": dict(
        dims=("step",),
        dtype="bool",
        long_name="step skipped",
        units="1",
        description="true when the step was skipped because a gradient was not finite",
    ),
    # per evaluation (embedded benchmark; absent evaluations leave the dimension empty)
    "forget_acc": dict(
        dims=("evaluation",),
        dtype="float64",
        long_name="forget QA accuracy",
        units="1",
        description="exact-match accuracy on the forget split's QA pairs (lower is better)",
    ),
    "retain_acc": dict(
        dims=("evaluation",),
        dtype="float64",
        long_name="retain QA accuracy",
        units="1",
        description="exact-match accuracy on the retain split's QA pairs",
    ),
    "general_acc": dict(
        dims=("evaluation",),
        dtype="float64",
        long_name="general-probe accuracy",
        units="1",
        description="exact-match accuracy on the general-capability probe (never in the "
        "retain loss; stands in for MMLU)",
    ),
    # per recorded step and tensor (role "pair": statistics of the (f, r) pair), or per
    # recorded step, strategy and tensor (role "update": statistics of the update d)
    **{name: FIELD_TABLE[name].spec() for name in STORED_FIELDS},
}
"""Every data variable of schema version 2, with its dims, dtype and CF-style attributes."""

COORDINATES: dict[str, dict[str, Any]] = {
    "step": dict(long_name="optimizer step", units="1", description="0-based optimizer step"),
    "record": dict(
        long_name="recorded optimizer step",
        units="1",
        description="optimizer step at which the geometry statistics were recorded",
    ),
    "evaluation": dict(
        long_name="optimizer steps completed",
        units="1",
        description="number of optimizer steps completed when the model was evaluated; 0 is "
        "the target model before unlearning",
    ),
    "strategy": dict(
        long_name="combination strategy",
        units="1",
        description="the applied strategy first, then shadow strategies evaluated on the same "
        "(f, r) without being applied",
    ),
    "measured": dict(
        long_name="measured on the applied update",
        units="1",
        description="true for the applied strategy (statistics of the update actually formed), "
        "false for shadow strategies (statistics derived from the sign-partitioned Gramian)",
    ),
    "tensor": dict(long_name="parameter tensor", units="1", description="parameter name"),
    "layer": dict(
        long_name="layer",
        units="1",
        description="transformer block index; -1 outside the blocks (embeddings, final norm, "
        "output head)",
    ),
    "component": dict(
        long_name="component", units="1", description="functional component (geomkit.layers)"
    ),
    "module": dict(
        long_name="module", units="1", description="coarse group: attention, mlp, norm, ..."
    ),
    "numel": FIELD_TABLE["numel"].attrs,
}

_STEP_VARS = [n for n, v in VARIABLES.items() if v["dims"] == ("step",)]
_RECORD_VARS = [n for n, v in VARIABLES.items() if v["dims"][0] == "record"]
_EVALUATION_VARS = [n for n, v in VARIABLES.items() if v["dims"] == ("evaluation",)]
EVALUATION_VARIABLES: tuple[str, ...] = tuple(_EVALUATION_VARS)
"""The evaluation variables (``Recorder.log_evaluation`` takes these names)."""
_GROWING = {
    "step": "committed_steps",
    "record": "committed_records",
    "evaluation": "committed_evaluations",
}


class SchemaError(ValueError):
    """A store that is not a geomkit run, or of another schema version."""


@dataclass(frozen=True)
class StoreDamage:
    """One damaged part of a store, as found by :func:`open_run`.

    Attributes
    ----------
    variable : str
        The array (data variable or coordinate), or ``"(group)"`` for the group's metadata.
    key : str
        The store key of the damaged object: a chunk (``"ff/c/0/0"``) or a metadata document
        (``"ff/zarr.json"``, ``"zarr.json"``).
    problem : str
        What is wrong (``"is missing"``, ``"does not decode (...)"``, ...).
    affected : str
        The steps, records or evaluations affected, as coordinate values when the coordinate is
        readable there (``"records at steps 0, 2, 4"``), else as index ranges.
    dim : str or None
        The dimension along which ``start:stop`` runs (None for the group's metadata).
    start, stop : int
        The affected index range along ``dim``.
    """

    variable: str
    key: str
    problem: str
    affected: str
    dim: str | None = None
    start: int = 0
    stop: int = 0

    def __str__(self) -> str:
        return f"{self.variable}: {self.key} {self.problem} ({self.affected})"


class DamagedStoreError(SchemaError):
    """A geomkit run store with missing or undecodable chunks or metadata.

    A subclass of :class:`SchemaError` (a damaged store does not satisfy the schema), hence of
    ``ValueError``. The message is one line naming every damaged variable, its chunk or
    metadata key and the steps or records affected; :attr:`damage` lists them.
    ``open_run(path, on_damage="mask")`` reads the rest, unless the group's own metadata is
    lost (then nothing can be read, and the message does not suggest it).
    """

    def __init__(self, store: str | os.PathLike, damage: Sequence[StoreDamage]) -> None:
        self.store = Path(store)
        self.damage = tuple(damage)
        shown = "; ".join(str(d) for d in self.damage[:_SHOWN])
        more = len(self.damage) - _SHOWN
        if more > 0:
            shown += f"; and {more} more"
        group_lost = any(d.affected.startswith("everything") for d in self.damage)
        hint = "" if group_lost else "; open_run(path, on_damage='mask') reads the rest"
        super().__init__(f"damaged geomkit run store {self.store}: {shown}{hint}")


class DamagedStoreWarning(UserWarning):
    """Issued by ``open_run(path, on_damage="mask")`` when it masks damaged records."""


_SHOWN = 6  # damaged parts named in a DamagedStoreError message


def _variable(name: str, data: np.ndarray) -> xr.Variable:
    spec = VARIABLES[name]
    attrs = {k: spec[k] for k in ("long_name", "units", "description")}
    return xr.Variable(spec["dims"], np.asarray(data, dtype=spec["dtype"]), attrs=attrs)


def _coordinate(name: str, dims: str, data: Any) -> xr.Variable:
    return xr.Variable((dims,), data, attrs=dict(COORDINATES[name]))


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
        record_chunk: int = 16,
    ) -> None:
        if mode not in ("w", "a"):
            raise ValueError(f"mode must be 'w' or 'a', got {mode!r}")
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
        template = xr.Dataset(
            {name: _variable(name, np.zeros(_empty_shape(name, self))) for name in VARIABLES},
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
        encoding = {name: {"chunks": _chunks(name, self, record_chunk)} for name in VARIABLES}
        encoding["step"] = {"chunks": (1024,)}
        encoding["record"] = {"chunks": (max(record_chunk, 64),)}
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
            ``[n, n_tensors]`` or ``[n, n_strategies, n_tensors]``.
        evaluations : mapping
            ``"evaluation"`` (steps completed) and the evaluation variables (``forget_acc``,
            ``retain_acc``, ``general_acc``).
        """
        counts = _committed(zarr.open_group(self.path, mode="r").attrs)
        blocks = {"step": (steps, _STEP_VARS), "record": (records, _RECORD_VARS)}
        blocks["evaluation"] = (evaluations, _EVALUATION_VARS)
        for dim, (block, names) in blocks.items():
            if block is not None and len(block[dim]):
                counts[dim] += self._append_block(dim, block, names)
        group = zarr.open_group(self.path, mode="r+")
        group.attrs.update({_GROWING[dim]: n for dim, n in counts.items()})

    def _append_block(self, dim: str, block: Mapping[str, np.ndarray], names: list[str]) -> int:
        missing = [n for n in [dim, *names] if n not in block]
        if missing:
            raise ValueError(f"append of {dim} block is missing {missing}")
        n = len(block[dim])
        arrays = {dim: np.asarray(block[dim], dtype="int64")}
        for name in names:
            spec = VARIABLES[name]
            data = np.asarray(block[name], dtype=spec["dtype"])
            expected = (n, *_empty_shape(name, self)[1:])
            if data.shape != expected:
                raise ValueError(f"{name} block has shape {data.shape}, expected {expected}")
            arrays[name] = data
        group = zarr.open_group(self.path, mode="r+")
        for name, data in arrays.items():  # zarr appends directly: no Dataset round trip
            group[name].with_config(_WRITE_CONFIG).append(data, axis=0)
        return n

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
    return tuple(sizes[d] for d in VARIABLES[name]["dims"])


def _chunks(name: str, writer: RunWriter, record_chunk: int) -> tuple[int, ...]:
    sizes = {
        "step": 1024,
        "record": record_chunk,
        "evaluation": 256,
        "tensor": max(writer.n_tensors, 1),
        "strategy": len(writer.strategies),
    }
    return tuple(sizes[d] for d in VARIABLES[name]["dims"])


def _dims(array: zarr.Array) -> tuple[str, ...]:
    names = getattr(array.metadata, "dimension_names", None)
    if names:
        return tuple(names)
    return tuple(array.attrs.get("_ARRAY_DIMENSIONS", ()))


def _check_schema(path: Path, attrs: Mapping[str, Any]) -> int:
    """The store's schema version; SchemaError if it is no geomkit run or not readable."""
    if attrs.get("geomkit_schema") != SCHEMA:
        raise SchemaError(
            f"{path} is not a geomkit run store (attribute geomkit_schema is "
            f"{attrs.get('geomkit_schema')!r}, expected {SCHEMA!r})"
        )
    if "schema_version" not in attrs:
        raise DamagedStoreError(
            path,
            [StoreDamage("(group)", "zarr.json", "lacks attribute 'schema_version'", "everything")],
        )
    version = attrs["schema_version"]
    if version not in READABLE_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_VERSIONS)
        raise SchemaError(
            f"{path} has geomkit schema version {version!r}; this geomkit "
            f"reads versions {readable} (see docs/schema.md)"
        )
    return int(version)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

STORE_NAME = "geometry.zarr"
"""Name of the store inside a run directory."""


def _store_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if (path / STORE_NAME / "zarr.json").exists():
        return path / STORE_NAME
    if (path / "zarr.json").exists() or (path / ".zgroup").exists():
        return path
    for candidate in (path / STORE_NAME, path):
        if _holds_arrays(candidate):  # a store that lost its group metadata
            raise DamagedStoreError(
                candidate,
                [
                    StoreDamage(
                        "(group)",
                        "zarr.json",
                        "is missing",
                        "everything: the run's attributes and commit counters are lost",
                    )
                ],
            )
    raise FileNotFoundError(
        f"{path} is neither a zarr store nor a run directory holding {STORE_NAME}"
    )


def _holds_arrays(path: Path) -> bool:
    """Whether ``path`` is a directory with zarr arrays directly inside it."""
    if not path.is_dir():
        return False
    for child in path.iterdir():
        meta = child / "zarr.json"
        try:
            if json.loads(meta.read_text()).get("node_type") == "array":
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


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
    the committed range (an append interrupted by a kill) are not looked at. The Dataset holds
    numpy arrays (the store is read completely).

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
    """One array being read: its dims and attributes, the buffer, the damaged regions."""

    array: Any  # zarr.AsyncArray
    dims: tuple[str, ...]
    attrs: dict[str, Any]
    data: np.ndarray
    extent: tuple[int, ...]
    bad: list[tuple[slice, ...]]


class _Reader:
    """Reads and verifies one store (see :func:`open_run`).

    Three round trips to the store in all: list its keys, open every array's metadata, read
    every array's committed part (all concurrently); chunks are read one by one only to locate
    a chunk that does not decode.
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
        required = [*COORDINATES, *VARIABLES]
        names = sorted(
            {k.split("/", 1)[0] for k in self.keys if "/" in k} | set(required),
            key=_schema_order,
        )
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

        sizes = self._sizes(arrays)
        plans = {name: self._plan(name, array, sizes) for name, array in arrays.items()}
        plans = {name: plan for name, plan in plans.items() if plan is not None}
        for found in self.found:  # lost metadata: everything along the first dimension
            dims = _schema_dims(found.variable)
            if found.lost and dims:
                found.dim, found.stop = dims[0], sizes.get(dims[0], 0)
        readable = [name for name, plan in plans.items() if all(plan.extent)]
        reads = [
            plans[n].array.getitem(tuple(slice(0, e) for e in plans[n].extent)) for n in readable
        ]
        results = sync(_gather(reads))
        for name, result in zip(readable, results, strict=True):
            self._check_chunks(name, plans[name], result)
        variables = {name: self._variable(plan) for name, plan in plans.items()}
        for found in self.found:  # only reached with mask=True
            spec = VARIABLES.get(found.variable)
            if found.lost and spec and all(d in sizes for d in spec["dims"]):
                shape = [sizes[d] for d in spec["dims"]]
                attrs = {k: spec[k] for k in ("long_name", "units", "description")}
                variables[found.variable] = xr.Variable(
                    spec["dims"], np.full(shape, np.nan), attrs=attrs
                )
        for name in sorted(optional):
            if name in VARIABLES:
                variables[name] = _variable(name, np.zeros(0))
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
        plan = _Plan(array, dims, attrs, np.full(want, _blank(dtype), dtype=dtype), extent, [])
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

    def _check_chunks(self, name: str, plan: _Plan, result: Any) -> None:
        """Store ``result`` (the committed part, or the error reading it) in ``plan.data``;
        record every chunk of it that is missing (version 2) or does not decode."""
        array, extent = plan.array, plan.extent
        chunks = array.chunks
        grid = itertools.product(
            *(range(math.ceil(e / c)) for e, c in zip(extent, chunks, strict=True))
        )
        regions = {
            index: tuple(
                slice(i * c, min((i + 1) * c, e))
                for i, c, e in zip(index, chunks, extent, strict=True)
            )
            for index in grid
        }
        prefix = f"{array.path}/"
        problems = {}
        if self.version >= 2:  # version 1 omits chunks of fill values: absence is no damage
            for index in regions:
                if prefix + array.metadata.encode_chunk_key(index) not in self.keys:
                    problems[index] = "is missing"
        if not isinstance(result, BaseException):
            plan.data[tuple(slice(0, e) for e in extent)] = result
        else:  # locate the chunks that do not decode, one by one
            sync_array = zarr.Array(array)
            for index, region in regions.items():
                if index in problems:
                    continue
                try:
                    plan.data[region] = sync_array[region]
                except Exception as error:
                    problems[index] = f"does not decode ({_short(error)})"
        for index, problem in problems.items():
            rows = regions[index][0]
            key = prefix + array.metadata.encode_chunk_key(index)
            self.found.append(_Found(name, key, problem, plan.dims[0], rows.start, rows.stop))
            plan.bad.append(regions[index])

    def _variable(self, plan: _Plan) -> xr.Variable:
        data = plan.data
        if plan.bad and self.mask:
            if data.dtype.kind in "iub":
                data = data.astype(np.float64)
            for region in plan.bad:
                data[region] = _blank(data.dtype)
        return xr.Variable(plan.dims, data, attrs=plan.attrs)

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
    order = [*COORDINATES, *VARIABLES]
    return (order.index(name), name) if name in order else (len(order), name)


def _schema_dims(name: str) -> tuple[str, ...]:
    if name in VARIABLES:
        return tuple(VARIABLES[name]["dims"])
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


def open_runs(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> xr.Dataset:
    """Open several runs along a new ``run`` dimension.

    Parameters
    ----------
    paths : path or iterable of paths
        A directory whose subdirectories are runs (as written by ``geomkit run --out DIR``), or
        the run paths themselves (:func:`geomkit.runs.find`).

    Returns
    -------
    xarray.Dataset
        Runs stacked along ``run`` (labelled by directory name); steps and records that only
        some runs have are filled with NaN. Per-run attributes become ``run`` coordinates
        where they differ (e.g. ``applied_strategy``, ``seed``). :func:`geomkit.runs.load`
        splits it back into runs without that padding.

    Raises
    ------
    FileNotFoundError
        If a path does not exist or holds no geomkit run.
    """
    from geomkit.runs import load  # the run layer sits above the store: import on use

    runs = load(paths if isinstance(paths, str | os.PathLike) else list(paths))
    return stack_runs([run.ds for run in runs], [run.label for run in runs])


def stack_runs(runs: Sequence[xr.Dataset], labels: Sequence[str]) -> xr.Dataset:
    """Stack opened runs along a new ``run`` dimension labelled ``labels``.

    Steps, records, evaluations, tensors and strategies that only some runs have are filled
    with NaN (tensors and strategies keep the runs' own order where they agree); per-run
    attributes that differ between the runs become ``run`` coordinates.
    """
    if len(runs) != len(labels):
        raise ValueError(f"{len(runs)} runs but {len(labels)} labels")
    varying = sorted(
        key
        for key in set().union(*(ds.attrs for ds in runs))
        if key not in ("source", "run") and len({repr(ds.attrs.get(key)) for ds in runs}) > 1
    )
    # the coordinates along tensor and strategy are put back by _first_seen, from the runs
    aligned = [
        ds.drop_vars([n for n, c in ds.coords.items() if n not in ds.dims and c.dims in _ALIGNED])
        for ds in runs
    ]
    combined = xr.concat(
        aligned,
        dim="run",
        join="outer",
        combine_attrs="drop_conflicts",
        coords="minimal",
        compat="override",
    )
    combined = combined.assign_coords(run=list(labels))
    for dim in ("tensor", "strategy"):
        combined = _first_seen(combined, runs, dim)
    for key in varying:
        values = [ds.attrs.get(key) for ds in runs]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        column = np.asarray(values) if numeric else np.array([str(v) for v in values], object)
        combined = combined.assign_coords({key: ("run", column)})
    return combined


_ALIGNED = (("tensor",), ("strategy",))


def _first_seen(combined: xr.Dataset, runs: Sequence[xr.Dataset], dim: str) -> xr.Dataset:
    """``dim`` of the stacked runs in the runs' own order (merged), with its
    coordinates (``layer``, ``numel``, ...) taken from the runs that have each entry; a
    coordinate the runs disagree on becomes a ``(run, dim)`` coordinate. ``measured`` is left
    out: it differs between runs by design (:func:`geomkit.runs.load` restores it)."""
    if dim not in combined.dims:
        return combined
    order: list[Any] = []
    for ds in runs:  # each new entry right after its predecessor in its own run
        at = 0
        for value in ds[dim].values if dim in ds.dims else ():
            if value in order:
                at = order.index(value) + 1
            else:
                order.insert(at, value)
                at += 1
    if list(combined[dim].values) != order:
        combined = combined.sel({dim: order})
    names = [n for ds in runs for n, c in ds.coords.items() if n != dim and c.dims == (dim,)]
    for name in dict.fromkeys(n for n in names if n != "measured"):
        per_run = [
            ds[name].to_series().reindex(order) if name in ds.coords else None for ds in runs
        ]
        known = pd.concat([s for s in per_run if s is not None], axis=1)
        first = next(ds[name] for ds in runs if name in ds.coords)
        if (known.nunique(axis=1, dropna=True) <= 1).all():
            values = known.bfill(axis=1).iloc[:, 0].to_numpy().astype(first.dtype)
            coord = xr.Variable((dim,), values, attrs=first.attrs)
        else:
            rows = [s if s is not None else pd.Series(np.nan, order) for s in per_run]
            coord = xr.Variable(("run", dim), np.stack(rows), attrs=first.attrs)
        combined = combined.assign_coords({name: coord})
    return combined
