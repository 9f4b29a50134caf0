"""Metrics derived exactly from the additive sufficient statistics, at any grouping.

The statistics arrays of :mod:`geomkit.statistics` carry :data:`FIELDS` in their last axis (the
statistics and metrics are declared in :mod:`geomkit.fields`). Because every field is a sum, the
statistics of a layer, a component or the whole model are the sums of the rows of its tensors
(:func:`aggregate`), and every metric follows from them (:func:`derive`) with no approximation.
Undefined values (a cosine with a zero-norm vector, a rate over zero coordinates) are NaN, never 0.

This module needs only NumPy.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from geomkit._validation import check_choice, invalid
from geomkit.fields import FIELDS, INDEX, METRIC_TABLE

__all__ = ["FIELDS", "METRICS", "aggregate", "derive", "field"]

METRICS: dict[str, str] = {name: m.description for name, m in METRIC_TABLE.items()}
"""Every metric :func:`derive` returns, with its definition (from
:data:`geomkit.fields.METRIC_TABLE`)."""


def field(statistics: np.ndarray, name: str) -> np.ndarray:
    """Return one field of a statistics array (last axis)."""
    check_choice("field", name, FIELDS, error=KeyError)
    return np.asarray(statistics)[..., INDEX[name]]


def derive(statistics: np.ndarray) -> dict[str, np.ndarray]:
    """Derive every metric of :data:`METRICS` from a statistics array.

    Parameters
    ----------
    statistics : ndarray
        ``[..., len(FIELDS)]``; any leading shape (strategy, step, tensor or group).

    Returns
    -------
    dict of str to ndarray
        Each metric with the leading shape of ``statistics``; NaN where undefined.

    Examples
    --------
    >>> import numpy as np
    >>> stats = np.zeros(len(FIELDS))
    >>> for name, value in {"ff": 4, "rr": 1, "fr": -1, "dd": 1, "dr": 1, "numel": 10,
    ...                     "n_conflict": 3}.items():
    ...     stats[FIELDS.index(name)] = value
    >>> m = derive(stats)
    >>> [float(m[k]) for k in ("cos_fr", "cos_dr", "norm_ratio", "conflict_rate")]
    [-0.5, 1.0, 2.0, 0.3]
    >>> float(derive(np.zeros(len(FIELDS)))["cos_fr"])  # undefined: NaN, never 0
    nan
    """
    s = np.asarray(statistics, dtype=np.float64)
    if s.shape[-1] != len(FIELDS):
        raise ValueError(
            f"invalid statistics of shape {s.shape}: expected {len(FIELDS)} fields in the last "
            f"axis ({', '.join(FIELDS)})"
        )
    named = {name: s[..., i] for name, i in INDEX.items()}
    return {name: metric(named) for name, metric in METRIC_TABLE.items()}


def aggregate(
    statistics: np.ndarray, groups: Sequence[Hashable], axis: int = -2
) -> tuple[list[Hashable], np.ndarray]:
    """Sum tensor rows into groups (layers, components, the model).

    Parameters
    ----------
    statistics : ndarray
        Statistics with the tensor axis at ``axis`` (default: second to last).
    groups : sequence
        One label per tensor (e.g. layer indices from :func:`geomkit.layers.locate_all`); use
        the same label for every tensor to get the model total.
    axis : int
        The tensor axis.

    Returns
    -------
    labels : list
        The distinct labels, in order of first appearance.
    grouped : ndarray
        ``statistics`` with the tensor axis replaced by one entry per label.

    Examples
    --------
    >>> import numpy as np
    >>> rows = np.zeros((3, len(FIELDS)))  # three tensors
    >>> rows[:, FIELDS.index("n_conflict")] = [1, 2, 3]
    >>> rows[:, FIELDS.index("numel")] = [10, 10, 10]
    >>> labels, grouped = aggregate(rows, ["layer 0", "layer 0", "layer 1"])
    >>> labels, derive(grouped)["conflict_rate"].tolist()  # rates of the sums, not mean rates
    (['layer 0', 'layer 1'], [0.15, 0.3])
    """
    s = np.asarray(statistics, dtype=np.float64)
    axis = axis % s.ndim
    if axis == s.ndim - 1:
        raise invalid("axis", axis, "the tensor axis, not the fields axis (the last)")
    groups = list(groups)
    if len(groups) != s.shape[axis]:
        raise ValueError(
            f"groups has {len(groups)} labels but the statistics have {s.shape[axis]} tensors "
            f"along axis {axis}"
        )
    labels = list(dict.fromkeys(groups))
    index = {label: i for i, label in enumerate(labels)}
    codes = np.array([index[g] for g in groups])
    moved = np.moveaxis(s, axis, 0)
    out = np.zeros((len(labels), *moved.shape[1:]), dtype=np.float64)
    np.add.at(out, codes, moved)
    return labels, np.moveaxis(out, 0, axis)
