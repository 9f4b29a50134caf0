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

This module is the public home of the store's names; each job lives in its own module, and
none of them imports this one (so importing any of them first is safe):

- :mod:`geomkit.store_schema`: the schema tables, the errors, where a store lies;
- :mod:`geomkit.store_writer`: :class:`RunWriter`;
- :mod:`geomkit.store_reader`: :func:`open_run`, the verified reader;
- :mod:`geomkit.store_stacking`: :func:`open_runs` and :func:`stack_runs`.
"""

from __future__ import annotations

from geomkit.store_reader import open_run
from geomkit.store_schema import COORDINATES as COORDINATES
from geomkit.store_schema import (
    EVALUATION_VARIABLES,
    READABLE_VERSIONS,
    SCHEMA,
    SCHEMA_VERSION,
    SINCE,
    VARIABLES,
    VERIFICATION_VARIABLES,
    VERIFIED_FIELDS,
    DamagedStoreError,
    DamagedStoreWarning,
    SchemaError,
    StoreDamage,
)
from geomkit.store_schema import STORE_NAME as STORE_NAME
from geomkit.store_schema import _check_schema as _check_schema
from geomkit.store_schema import _store_path as _store_path
from geomkit.store_stacking import open_runs, stack_runs
from geomkit.store_writer import RunWriter

# COORDINATES, STORE_NAME, _check_schema and _store_path are re-exported (``as``) outside
# __all__, as before the split: the run layer and older code import them from here.
__all__ = [
    "EVALUATION_VARIABLES",
    "READABLE_VERSIONS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SINCE",
    "VARIABLES",
    "VERIFICATION_VARIABLES",
    "VERIFIED_FIELDS",
    "DamagedStoreError",
    "DamagedStoreWarning",
    "RunWriter",
    "SchemaError",
    "StoreDamage",
    "open_run",
    "open_runs",
    "stack_runs",
]
