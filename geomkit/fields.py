"""The field table: every recorded statistic and every derived metric, declared once.

A statistic is a sum over coordinates (or over tensors) of one parameter tensor; its
:class:`Field` names it, gives its ``role`` and its store attributes. The role fixes where it
lives:

``"pair"``
    a statistic of the (f, r) pair alone, stored per ``(record, tensor)``;
``"update"``
    a statistic of a strategy's update d, stored per ``(record, strategy, tensor)``;
``"step"``
    a statistic of the step the optimizer took, ``u = theta_old - theta_new``, against f, r
    and the applied update d (:mod:`geomkit.step`), stored per ``(record, tensor)``;
``"size"``
    the size of a tensor: the ``numel`` coordinate of the ``tensor`` dimension, or a constant
    per tensor that is not stored (``n_tensors``, 1 each).

A :class:`Metric` is a function of named fields; :func:`geomkit.metrics.derive` evaluates every
metric of :data:`METRIC_TABLE` on any grouping's sums. Everything else - the kernels' output
layouts, :mod:`geomkit.statistics`, the recorder, the store variables, ``ds.geom`` and
``docs/schema.md`` - is derived from these two tables and indexes fields by name
(:data:`INDEX`), never by position. Adding a statistic means adding its :class:`Field` here and
computing it in the kernel that produces it.

This module needs only NumPy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "FIELDS",
    "FIELD_TABLE",
    "INDEX",
    "METRIC_TABLE",
    "OPTIONAL_FIELDS",
    "PAIR_FIELDS",
    "ROLES",
    "SIZE_FIELDS",
    "STEP_FIELDS",
    "STORED_FIELDS",
    "UPDATE_FIELDS",
    "Field",
    "Metric",
]

ROLES: dict[str, tuple[str, ...]] = {
    "pair": ("record", "tensor"),
    "update": ("record", "strategy", "tensor"),
    "step": ("record", "tensor"),
    "size": ("tensor",),
}
"""Role of a statistic -> the store dimensions it has."""


@dataclass(frozen=True)
class Field:
    """One additive statistic of a parameter tensor.

    Attributes
    ----------
    name : str
        The store variable (or coordinate) name and the ``field`` label of ``ds.geom``.
    role : {"pair", "update", "step", "size"}
        What it describes (see the module docstring); fixes :attr:`dims`.
    dtype : str
        Its dtype in the store (statistics arrays are float64 throughout).
    long_name, units, description : str
        CF-style attributes of the store variable.
    constant : float, optional
        Size fields only: the value of every tensor, when the field is not stored.
    optional : bool
        Added after stores of this schema version were first written: a store without it
        still opens (the variable is left out) and ``ds.geom.statistics`` reads it as NaN;
        the audit then falls back to a weaker bound and says so.
    since : int
        The store schema version that first writes it: a store of an older version lacks it
        (and opens without it); one of this version or later must hold it.
    """

    name: str
    role: str
    dtype: str
    long_name: str
    units: str
    description: str
    constant: float | None = None
    optional: bool = False
    since: int = 1

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"invalid role={self.role!r} of field {self.name!r}: expected {ROLES}")
        if self.constant is not None and self.role != "size":
            raise ValueError(f"invalid constant for field {self.name!r}: only size fields have one")
        if self.since > 1 and not self.optional:
            raise ValueError(
                f"invalid since={self.since} of field {self.name!r}: a field added in a later "
                "schema version is optional (older stores lack it)"
            )

    @property
    def dims(self) -> tuple[str, ...]:
        """Store dimensions; ``()`` for a constant that is not stored."""
        return () if self.constant is not None else ROLES[self.role]

    @property
    def attrs(self) -> dict[str, str]:
        """``long_name``, ``units`` and ``description``."""
        return {"long_name": self.long_name, "units": self.units, "description": self.description}

    def spec(self) -> dict[str, Any]:
        """The store variable entry (:data:`geomkit.store.VARIABLES` format)."""
        return {"dims": self.dims, "dtype": self.dtype, **self.attrs}


_ZERO = "zeros never conflict: a coordinate conflicts when sign(f_i)*sign(r_i) < 0 with sign(0)=0"


def _table(*items: Any) -> dict[str, Any]:
    table = {item.name: item for item in items}
    if len(table) != len(items):
        raise ValueError(f"duplicate names in {[item.name for item in items]}")
    return table


FIELD_TABLE: dict[str, Field] = _table(
    Field(
        "ff",
        "pair",
        "float64",
        "<f, f>",
        "gradient^2",
        "squared Euclidean norm of the forget gradient, float64 sum",
    ),
    Field(
        "rr",
        "pair",
        "float64",
        "<r, r>",
        "gradient^2",
        "squared Euclidean norm of the retain gradient, float64 sum",
    ),
    Field(
        "fr",
        "pair",
        "float64",
        "<f, r>",
        "gradient^2",
        "inner product of forget and retain gradients, float64 sum",
    ),
    Field(
        "dd",
        "update",
        "float64",
        "<d, d>",
        "gradient^2",
        "squared Euclidean norm of the combined update, float64",
    ),
    Field(
        "df",
        "update",
        "float64",
        "<d, f>",
        "gradient^2",
        "inner product of the update with the forget gradient, float64",
    ),
    Field(
        "dr",
        "update",
        "float64",
        "<d, r>",
        "gradient^2",
        "inner product of the update with the retain gradient, float64",
    ),
    Field(
        "n_conflict",
        "pair",
        "int64",
        "conflicting coordinates",
        "count",
        f"number of coordinates with sign(f_i)*sign(r_i) < 0; {_ZERO}",
    ),
    Field(
        "n_both_nonzero",
        "pair",
        "int64",
        "coordinates where both are non-zero",
        "count",
        "number of coordinates with f_i != 0 and r_i != 0 (-0.0 is zero)",
    ),
    Field(
        "n_opposed",
        "update",
        "int64",
        "coordinates where d opposes r",
        "count",
        "number of coordinates with d_i*r_i < 0; measured on the applied update; "
        "for shadow sign rules (SAGO variants) 0 by construction (docs/theory.md#r6)",
    ),
    Field("numel", "size", "int64", "coordinates", "count", "number of elements"),
    Field(
        "n_projected",
        "update",
        "int64",
        "projection fired",
        "count",
        "1 if the strategy's projection fired for this tensor (per-tensor test for "
        "pcgrad, model-level test for pcgrad_global, always for blur), else 0",
    ),
    Field("n_tensors", "size", "int64", "tensors", "count", "1 per tensor", constant=1.0),
    Field(
        "dr_abs",
        "update",
        "float64",
        "sum of abs(d_i r_i)",
        "gradient^2",
        "sum over coordinates of abs(d_i*r_i), float64; bounds the effect of rounding d on "
        "<d, r> (docs/theory.md#tolerances); equal to <d, r> for shadow sign rules",
        optional=True,
    ),
    Field(
        "n_unrounded",
        "update",
        "int64",
        "coordinates off the rounded formula",
        "count",
        "number of coordinates where the applied d_i differs from the strategy's float64 linear "
        "form a*f_i + b*r_i by more than one rounding to the gradient dtype "
        "(docs/theory.md#r0); 0 for shadow strategies, whose d is never formed",
        optional=True,
    ),
    *(
        Field(name, "step", dtype, long_name, units, description, optional=True, since=3)
        for name, dtype, long_name, units, description in (
            (
                "uu",
                "float64",
                "<u, u>",
                "parameter^2",
                "squared Euclidean norm of the step u = theta_old - theta_new the optimizer "
                "took (after clipping, AdamW's normalisation, weight decay and the learning "
                "rate), float64; NaN where the step was not measured "
                "(docs/method.md#the-step-taken)",
            ),
            (
                "uf",
                "float64",
                "<u, f>",
                "parameter gradient",
                "inner product of the step with the forget gradient; -<u, f> is the step's "
                "first-order change of the forget loss",
            ),
            (
                "ur",
                "float64",
                "<u, r>",
                "parameter gradient",
                "inner product of the step with the retain gradient; -<u, r> is the step's "
                "first-order change of the retain loss",
            ),
            (
                "ud",
                "float64",
                "<u, d>",
                "parameter gradient",
                "inner product of the step with the applied update d as formed (before clipping)",
            ),
            (
                "dd_step",
                "float64",
                "<d, d> of the applied update",
                "gradient^2",
                "squared norm of the applied update d as formed (before clipping), measured in "
                "the same pass as <u, d>",
            ),
            (
                "n_u_opposed_r",
                "float64",  # NaN where the step was not measured
                "coordinates where u opposes r",
                "count",
                "number of coordinates with u_i*r_i < 0 (the step raises the retain loss there, "
                "to first order)",
            ),
            (
                "n_u_opposed_f",
                "float64",  # NaN where the step was not measured
                "coordinates where u opposes f",
                "count",
                "number of coordinates with u_i*f_i < 0 (the step raises the forget loss there, "
                "to first order)",
            ),
        )
    ),
)
"""Every additive statistic of one tensor, in the order of the last axis of statistics arrays."""

FIELDS: tuple[str, ...] = tuple(FIELD_TABLE)
"""Field names in the order of the last axis of every statistics array."""
INDEX: dict[str, int] = {name: i for i, name in enumerate(FIELDS)}
"""Field name -> its index in the last axis of a statistics array."""
PAIR_FIELDS: tuple[str, ...] = tuple(n for n, f in FIELD_TABLE.items() if f.role == "pair")
UPDATE_FIELDS: tuple[str, ...] = tuple(n for n, f in FIELD_TABLE.items() if f.role == "update")
STEP_FIELDS: tuple[str, ...] = tuple(n for n, f in FIELD_TABLE.items() if f.role == "step")
SIZE_FIELDS: tuple[str, ...] = tuple(n for n, f in FIELD_TABLE.items() if f.role == "size")
STORED_FIELDS: tuple[str, ...] = PAIR_FIELDS + UPDATE_FIELDS + STEP_FIELDS
"""The fields stored as data variables (pair, update, then step), in store order."""
OPTIONAL_FIELDS: tuple[str, ...] = tuple(n for n, f in FIELD_TABLE.items() if f.optional)
"""Stored fields that stores written before they existed lack (read as NaN)."""


# ----------------------------------------------------------------------------------------------
# Derived metrics
# ----------------------------------------------------------------------------------------------


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` where ``den > 0``, else NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _cosine(dot: np.ndarray, aa: np.ndarray, bb: np.ndarray) -> np.ndarray:
    """``<a,b> / (|a||b|)`` clipped to [-1, 1]; NaN when a norm is 0."""
    # sqrt of each squared norm separately: aa * bb can overflow or underflow in float64.
    return np.clip(_ratio(dot, np.sqrt(aa) * np.sqrt(bb)), -1.0, 1.0)


def _norm_ratio(aa: np.ndarray, bb: np.ndarray) -> np.ndarray:
    """``|a| / |b|``: inf when only b is zero, NaN when both are."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(aa) / np.sqrt(bb)


@dataclass(frozen=True)
class Metric:
    """One metric derived exactly from the sums of named fields.

    Attributes
    ----------
    name : str
        Variable name in ``ds.geom.metrics()``.
    role : {"pair", "update", "step"}
        ``"pair"`` metrics describe (f, r) alone and ``"step"`` metrics the step the optimizer
        took (against f, r and the applied d): neither carries a ``strategy`` dimension.
    long_name, units, description : str
        Axis label, units and definition.
    inputs : tuple of str
        The fields :attr:`formula` takes, in order.
    formula : callable
        ``formula(*arrays)`` with one array per input; NaN where undefined.
    """

    name: str
    role: str
    long_name: str
    units: str
    description: str
    inputs: tuple[str, ...]
    formula: Callable[..., np.ndarray]

    def __post_init__(self) -> None:
        if self.role not in ("pair", "update", "step"):
            raise ValueError(f"invalid role={self.role!r} of metric {self.name!r}")
        unknown = [n for n in self.inputs if n not in FIELD_TABLE]
        if unknown:
            raise ValueError(f"invalid inputs of metric {self.name!r}: unknown fields {unknown}")
        roles = {FIELD_TABLE[n].role for n in self.inputs}
        for role in ("update", "step"):  # a metric reads the fields of its own role only
            if role in roles and self.role != role:
                raise ValueError(
                    f"invalid role={self.role!r} of metric {self.name!r}: it reads {role} fields"
                )
            if self.role == role and role not in roles:
                raise ValueError(f"invalid role={role!r} of metric {self.name!r}: no {role} field")

    @property
    def attrs(self) -> dict[str, str]:
        """``long_name``, ``units`` and ``description``."""
        return {"long_name": self.long_name, "units": self.units, "description": self.description}

    def __call__(self, fields: Mapping[str, np.ndarray]) -> np.ndarray:
        """Evaluate the metric on a mapping of field name -> array."""
        return self.formula(*(fields[n] for n in self.inputs))


METRIC_TABLE: dict[str, Metric] = _table(
    Metric(
        "cos_fr",
        "pair",
        "cos(f, r)",
        "1",
        "cosine between forget and retain gradients, <f,r>/(|f||r|)",
        ("fr", "ff", "rr"),
        _cosine,
    ),
    Metric(
        "cos_dr",
        "update",
        "cos(d, r)",
        "1",
        "cosine between the update and the retain gradient, <d,r>/(|d||r|)",
        ("dr", "dd", "rr"),
        _cosine,
    ),
    Metric(
        "cos_df",
        "update",
        "cos(d, f)",
        "1",
        "cosine between the update and the forget gradient, <d,f>/(|d||f|)",
        ("df", "dd", "ff"),
        _cosine,
    ),
    Metric("norm_f", "pair", "|f|", "1", "Euclidean norm of the forget gradient", ("ff",), np.sqrt),
    Metric("norm_r", "pair", "|r|", "1", "Euclidean norm of the retain gradient", ("rr",), np.sqrt),
    Metric("norm_d", "update", "|d|", "1", "Euclidean norm of the update", ("dd",), np.sqrt),
    Metric(
        "norm_ratio",
        "pair",
        "|f| / |r|",
        "1",
        "|f| / |r| (inf when only r is zero)",
        ("ff", "rr"),
        _norm_ratio,
    ),
    Metric(
        "conflict_rate",
        "pair",
        "sign-conflict rate",
        "1",
        "fraction of all coordinates with sign(f_i) sign(r_i) < 0",
        ("n_conflict", "numel"),
        _ratio,
    ),
    Metric(
        "conflict_rate_nonzero",
        "pair",
        "sign-conflict rate (both non-zero)",
        "1",
        "fraction of coordinates with f_i != 0 and r_i != 0 that conflict",
        ("n_conflict", "n_both_nonzero"),
        _ratio,
    ),
    Metric(
        "opposed_rate",
        "update",
        "rate of coordinates where d opposes r",
        "1",
        "fraction of coordinates with d_i r_i < 0",
        ("n_opposed", "numel"),
        _ratio,
    ),
    Metric(
        "projected_fraction",
        "update",
        "fraction of tensors projected",
        "1",
        "fraction of tensors whose projection fired",
        ("n_projected", "n_tensors"),
        _ratio,
    ),
    Metric(
        "cos_ur",
        "step",
        "cos(u, r)",
        "1",
        "cosine between the step the optimizer took and the retain gradient, <u,r>/(|u||r|)",
        ("ur", "uu", "rr"),
        _cosine,
    ),
    Metric(
        "cos_uf",
        "step",
        "cos(u, f)",
        "1",
        "cosine between the step the optimizer took and the forget gradient, <u,f>/(|u||f|)",
        ("uf", "uu", "ff"),
        _cosine,
    ),
    Metric(
        "cos_ud",
        "step",
        "cos(u, d)",
        "1",
        "cosine between the step and the applied update d: 1 for plain SGD without weight "
        "decay, below 1 where clipping per group, AdamW or weight decay turn it",
        ("ud", "uu", "dd_step"),
        _cosine,
    ),
    Metric("norm_u", "step", "|u|", "1", "Euclidean norm of the step", ("uu",), np.sqrt),
    Metric(
        "u_opposes_r_rate",
        "step",
        "rate of coordinates where u opposes r",
        "1",
        "fraction of coordinates with u_i r_i < 0",
        ("n_u_opposed_r", "numel"),
        _ratio,
    ),
    Metric(
        "u_opposes_f_rate",
        "step",
        "rate of coordinates where u opposes f",
        "1",
        "fraction of coordinates with u_i f_i < 0",
        ("n_u_opposed_f", "numel"),
        _ratio,
    ),
    Metric(
        "pred_forget_change",
        "step",
        "predicted change of the forget loss",
        "loss",
        "first-order change of the forget loss caused by the step, -<u, f>; additive: the "
        "shares of tensors, layers and components sum to the model's",
        ("uf",),
        np.negative,
    ),
    Metric(
        "pred_retain_change",
        "step",
        "predicted change of the retain loss",
        "loss",
        "first-order change of the retain loss caused by the step, -<u, r>; additive like "
        "pred_forget_change",
        ("ur",),
        np.negative,
    ),
)
"""Every metric :func:`geomkit.metrics.derive` returns."""
