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
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from geomkit._deprecation import renamed
from geomkit.layers import TensorLocation

__all__ = [
    "EVALUATION_VARIABLES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "VARIABLES",
    "RunWriter",
    "SchemaError",
    "open_run",
    "open_runs",
    "stack_runs",
]

SCHEMA = "geomkit.run"
SCHEMA_VERSION = 1

_ZERO = "zeros never conflict: a coordinate conflicts when sign(f_i)*sign(r_i) < 0 with sign(0)=0"

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
    # per recorded step and tensor: statistics of the (f, r) pair
    "ff": dict(
        dims=("record", "tensor"),
        dtype="float64",
        long_name="<f, f>",
        units="gradient^2",
        description="squared Euclidean norm of the forget gradient, float64 sum",
    ),
    "rr": dict(
        dims=("record", "tensor"),
        dtype="float64",
        long_name="<r, r>",
        units="gradient^2",
        description="squared Euclidean norm of the retain gradient, float64 sum",
    ),
    "fr": dict(
        dims=("record", "tensor"),
        dtype="float64",
        long_name="<f, r>",
        units="gradient^2",
        description="inner product of forget and retain gradients, float64 sum",
    ),
    "n_conflict": dict(
        dims=("record", "tensor"),
        dtype="int64",
        long_name="conflicting coordinates",
        units="count",
        description=f"number of coordinates with sign(f_i)*sign(r_i) < 0; {_ZERO}",
    ),
    "n_both_nonzero": dict(
        dims=("record", "tensor"),
        dtype="int64",
        long_name="coordinates where both are non-zero",
        units="count",
        description="number of coordinates with f_i != 0 and r_i != 0 (-0.0 is zero)",
    ),
    # per recorded step, strategy and tensor: statistics of the update d
    "dd": dict(
        dims=("record", "strategy", "tensor"),
        dtype="float64",
        long_name="<d, d>",
        units="gradient^2",
        description="squared Euclidean norm of the combined update, float64",
    ),
    "df": dict(
        dims=("record", "strategy", "tensor"),
        dtype="float64",
        long_name="<d, f>",
        units="gradient^2",
        description="inner product of the update with the forget gradient, float64",
    ),
    "dr": dict(
        dims=("record", "strategy", "tensor"),
        dtype="float64",
        long_name="<d, r>",
        units="gradient^2",
        description="inner product of the update with the retain gradient, float64",
    ),
    "n_opposed": dict(
        dims=("record", "strategy", "tensor"),
        dtype="int64",
        long_name="coordinates where d opposes r",
        units="count",
        description="number of coordinates with d_i*r_i < 0; measured on the applied update; "
        "for shadow sign rules (SAGO variants) 0 by construction (THEORY.md R6)",
    ),
    "n_projected": dict(
        dims=("record", "strategy", "tensor"),
        dtype="int64",
        long_name="projection fired",
        units="count",
        description="1 if the strategy's projection fired for this tensor (per-tensor test for "
        "pcgrad, model-level test for pcgrad_global, always for blur), else 0",
    ),
}
"""Every data variable of schema version 1, with its dims, dtype and CF-style attributes."""

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
    "numel": dict(long_name="coordinates", units="count", description="number of elements"),
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
        Create a new store, or append to an existing one.
    resume_step : int, optional
        With ``mode="a"``: drop everything recorded at steps >= ``resume_step`` before
        appending (the steps after a checkpoint are recomputed on resume).
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
            _check_schema(self.path, dict(zarr.open_group(self.path, mode="r").attrs))
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            template.to_zarr(self.path, mode="w", consolidated=False, encoding=encoding)

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
        if dim not in group:  # a store written before evaluations were part of the schema
            return 0
        for name, data in arrays.items():  # zarr appends directly: no Dataset round trip
            group[name].append(data, axis=0)
        return n

    def _truncate(self, resume_step: int | None) -> None:
        """Cut the store back to its committed part, and to steps < ``resume_step``.

        Evaluations taken after more than ``resume_step`` steps are dropped too.
        """
        group = zarr.open_group(self.path, mode="r+")
        counts = _committed(group.attrs)
        if resume_step is not None:
            for dim in ("step", "record"):
                counts[dim] = int(
                    np.searchsorted(group[dim][: counts[dim]], resume_step, side="left")
                )
            if "evaluation" in group:
                done = group["evaluation"][: counts["evaluation"]]
                counts["evaluation"] = int(np.searchsorted(done, resume_step, side="right"))
        for _, array in group.arrays():
            dims = _dims(array)
            if dims and dims[0] in counts:
                array.resize((counts[dims[0]], *array.shape[1:]))
        group.attrs.update({_GROWING[dim]: n for dim, n in counts.items()})


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


def _check_schema(path: Path, attrs: Mapping[str, Any]) -> None:
    if attrs.get("geomkit_schema") != SCHEMA:
        raise SchemaError(
            f"{path} is not a geomkit run store (attribute geomkit_schema is "
            f"{attrs.get('geomkit_schema')!r}, expected {SCHEMA!r})"
        )
    version = attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"{path} has geomkit schema version {version!r}; this geomkit "
            f"reads version {SCHEMA_VERSION} (see docs/schema.md)"
        )


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
    raise FileNotFoundError(
        f"{path} is neither a zarr store nor a run directory holding {STORE_NAME}"
    )


def open_run(path: str | os.PathLike) -> xr.Dataset:
    """Open one run as an :class:`xarray.Dataset` (its committed part).

    Parameters
    ----------
    path : str or Path
        A run's zarr store, or a run directory that holds one (``geometry.zarr``).

    Raises
    ------
    FileNotFoundError
        If there is no store at ``path``.
    SchemaError
        If the store is not a geomkit run or has another schema version.
    """
    store = _store_path(path)
    group = zarr.open_group(store, mode="r")
    attrs = dict(group.attrs)
    _check_schema(store, attrs)
    keep = _committed(attrs)
    try:
        ds = xr.open_zarr(store, consolidated=False)
    except ValueError:
        # A kill in the middle of an append: some arrays are longer than others.
        ds = _open_repaired(group, keep)
    ds = ds.isel({dim: slice(0, n) for dim, n in keep.items() if dim in ds.dims})
    ds.attrs = {k: v for k, v in attrs.items() if not k.startswith("committed_")}
    ds.attrs["source"] = str(store)
    return ds


def _open_repaired(group: zarr.Group, keep: Mapping[str, int]) -> xr.Dataset:
    variables = {}
    for name, array in group.arrays():
        dims = _dims(array)
        data = array[:]
        if dims and dims[0] in keep:
            data = data[: keep[dims[0]]]
        attrs = {k: v for k, v in array.attrs.items() if not k.startswith("_")}
        variables[name] = xr.Variable(dims, data, attrs=attrs)
    coords = {n: v for n, v in variables.items() if n in COORDINATES}
    data_vars = {n: v for n, v in variables.items() if n not in COORDINATES}
    return xr.Dataset(data_vars, coords=coords)


def open_runs(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> xr.Dataset:
    """Open several runs along a new ``run`` dimension.

    Parameters
    ----------
    paths : path or iterable of paths
        A directory whose subdirectories are runs (as written by ``geomkit run --out DIR``), or
        the run paths themselves.

    Returns
    -------
    xarray.Dataset
        Runs stacked along ``run`` (labelled by directory name); steps and records that only
        some runs have are filled with NaN. Per-run attributes become ``run`` coordinates
        where they differ (e.g. ``applied_strategy``, ``seed``).
    """
    if isinstance(paths, (str, os.PathLike)):
        root = Path(paths)
        try:
            _store_path(root)
            candidates = [root]
        except FileNotFoundError:
            candidates = sorted(p for p in root.iterdir() if p.is_dir())
    else:
        candidates = [Path(p) for p in paths]
    runs = []
    for candidate in candidates:
        try:
            runs.append(open_run(candidate))
        except FileNotFoundError:
            continue
    if not runs:
        raise FileNotFoundError(f"no geomkit runs found in {paths}")
    labels = [
        Path(ds.attrs["source"]).parent.name
        if Path(ds.attrs["source"]).name == STORE_NAME
        else Path(ds.attrs["source"]).name
        for ds in runs
    ]
    return stack_runs(runs, labels)


def stack_runs(runs: Sequence[xr.Dataset], labels: Sequence[str]) -> xr.Dataset:
    """Stack opened runs along a new ``run`` dimension labelled ``labels``.

    Steps and records that only some runs have are filled with NaN; per-run attributes that
    differ between the runs become ``run`` coordinates.
    """
    if len(runs) != len(labels):
        raise ValueError(f"{len(runs)} runs but {len(labels)} labels")
    varying = sorted(
        key
        for key in set().union(*(ds.attrs for ds in runs))
        if key != "source" and len({repr(ds.attrs.get(key)) for ds in runs}) > 1
    )
    combined = xr.concat(
        [ds.drop_vars("measured", errors="ignore") for ds in runs],
        dim="run",
        join="outer",
        combine_attrs="drop_conflicts",
        coords="minimal",
        compat="override",
    )
    combined = combined.assign_coords(run=labels)
    for key in varying:
        values = [ds.attrs.get(key) for ds in runs]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        column = np.asarray(values) if numeric else np.array([str(v) for v in values], object)
        combined = combined.assign_coords({key: ("run", column)})
    return combined
