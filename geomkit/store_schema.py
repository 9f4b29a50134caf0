"""The run schema of :mod:`geomkit.store`: its tables, its errors and where a store lies.

The public home of every name here is :mod:`geomkit.store` (import them from there); this module
holds what the writer (:mod:`geomkit.store_writer`) and the verified reader
(:mod:`geomkit.store_reader`) share, and imports neither (docs/schema.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from geomkit.fields import FIELD_TABLE, STORED_FIELDS

SCHEMA = "geomkit.run"
SCHEMA_VERSION = 4
"""The layout written. Version 2 added the ``evaluation`` dimension, stores every chunk (also one
holding only fill values) and checksums each (zstd), so that a missing or altered chunk is
detectable. Version 3 added the statistics of the step the optimizer took (the ``"step"`` fields
of :data:`geomkit.fields.FIELD_TABLE`) and the losses after the step (``forget_loss_after``,
``retain_loss_after``). Version 4 added the held-out-phrasing evaluations
(``forget_heldout_acc``, ``retain_heldout_acc``). Older stores open without what later versions
added (:data:`SINCE`)."""
READABLE_VERSIONS = (1, 2, 3, 4)
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
    "forget_loss_after": dict(
        dims=("step",),
        dtype="float64",
        long_name="forget loss after the step",
        units="1",
        description="forget objective on the step's own batches, evaluated after the step "
        "(record_realized); minus forget_loss it is the realised change that pred_forget_change "
        "predicts to first order; NaN where not evaluated",
    ),
    "retain_loss_after": dict(
        dims=("step",),
        dtype="float64",
        long_name="retain loss after the step",
        units="1",
        description="retain objective on the step's own batches, evaluated after the step "
        "(record_realized); NaN where not evaluated",
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
    "forget_heldout_acc": dict(
        dims=("evaluation",),
        dtype="float64",
        long_name="forget QA accuracy, held-out phrasing",
        units="1",
        description="exact-match accuracy on the forget split's questions in a phrasing no "
        "training sees (does forgetting carry over to a paraphrase? lower is better)",
    ),
    "retain_heldout_acc": dict(
        dims=("evaluation",),
        dtype="float64",
        long_name="retain QA accuracy, held-out phrasing",
        units="1",
        description="exact-match accuracy on the retain split's questions in a phrasing the "
        "retain loss never trains on",
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
"""Every data variable of the schema version written, with its dims, dtype and CF-style
attributes."""

SINCE: dict[str, int] = {
    **{name: FIELD_TABLE[name].since for name in STORED_FIELDS if FIELD_TABLE[name].since > 1},
    "forget_loss_after": 3,
    "retain_loss_after": 3,
    "forget_heldout_acc": 4,
    "retain_heldout_acc": 4,
}
"""Variables added after version 1 -> the schema version that first writes them: a store of an
older version opens without them, a store of that version or later must hold them."""

VERIFIED_FIELDS: tuple[str, ...] = (
    "dd",
    "df",
    "dr",
    "n_opposed",
    "n_projected",
    "n_unrounded",
    "dr_abs",
)
"""The update statistics measured, at verified records, on each strategy's update materialised
with the strategy's own code; stored as ``verified_<field>``. The applied strategy's row is
filled where the record's statistics are closed forms (store attribute ``applied_statistics =
"closed_form"``): its materialised update is the one applied."""

VERIFICATION_VARIABLES: dict[str, dict[str, Any]] = {
    **{
        f"verified_{name}": dict(
            dims=("record", "strategy", "tensor"),
            dtype="float64",
            long_name=f"{FIELD_TABLE[name].long_name}, materialised update",
            units=FIELD_TABLE[name].units,
            description=f"{name} measured on the strategy's update materialised with its own "
            "code in the gradient dtype; NaN where not verified, and for the applied strategy "
            "when its statistics are measured at every record",
        )
        for name in VERIFIED_FIELDS
    },
    "verified_n_ambiguous": dict(
        dims=("record", "strategy", "tensor"),
        dtype="float64",
        long_name="coordinates whose opposition test rounding can flip",
        units="count",
        description="coordinates with r_i != 0 where |a f_i + b r_i| is within the float64 "
        "arithmetic and dot-product order error, or the dtype's underflow, of zero (uniform "
        "rules; 0 for sign rules); NaN where not verified",
    ),
}
"""Optional data variables of the shadow verification (docs/schema.md#verification-variables):
written by this geomkit, absent from stores written before it (those open and audit as 'not
verified'). Not part of :data:`VARIABLES`, whose record variables are the field table's. A
record is verified where they are finite (a count is never NaN where it was taken)."""

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
_VERIFY_VARS = list(VERIFICATION_VARIABLES)
EVALUATION_VARIABLES: tuple[str, ...] = tuple(_EVALUATION_VARS)
"""The evaluation variables (``Recorder.log_evaluation`` takes these names)."""
_GROWING = {
    "step": "committed_steps",
    "record": "committed_records",
    "evaluation": "committed_evaluations",
}


RECORD_CHUNK = 256
"""Records per chunk of the per-record variables written by default
(docs/schema.md#chunking-and-lazy-opening)."""
TENSOR_CHUNK = 32
"""Tensors per chunk of the per-record variables written by default: with
:data:`RECORD_CHUNK`, reading one record (every tensor) and reading one tensor's history (every
record) each touch a small fraction of a large run's chunks."""


def record_chunks(
    n_tensors: int, record_chunk: int | None = None, tensor_chunk: int | None = None
) -> tuple[int, int]:
    """``(records, tensors)`` per chunk of the per-record variables of a store of
    ``n_tensors`` tensors: the given sizes, else :data:`RECORD_CHUNK` and
    :data:`TENSOR_CHUNK` (every tensor in one chunk when there are fewer)."""
    records = RECORD_CHUNK if record_chunk is None else record_chunk
    tensors = TENSOR_CHUNK if tensor_chunk is None else tensor_chunk
    return records, max(1, min(tensors, n_tensors))


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
    spec = VARIABLES[name] if name in VARIABLES else VERIFICATION_VARIABLES[name]
    attrs = {k: spec[k] for k in ("long_name", "units", "description")}
    return xr.Variable(spec["dims"], np.asarray(data, dtype=spec["dtype"]), attrs=attrs)


def _coordinate(name: str, dims: str, data: Any) -> xr.Variable:
    return xr.Variable((dims,), data, attrs=dict(COORDINATES[name]))


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
