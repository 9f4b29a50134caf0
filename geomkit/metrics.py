"""Metrics derived exactly from the additive sufficient statistics, at any grouping.

The statistics arrays of :mod:`geomkit.statistics` carry :data:`~geomkit.statistics.FIELDS` in
their last axis. Because every field is a sum, the statistics of a layer, a component or the whole
model are the sums of the rows of its tensors (:func:`aggregate`), and every metric follows from
them (:func:`derive`) with no approximation. Undefined values (a cosine with a zero-norm vector,
a rate over zero coordinates) are NaN, never 0.

This module needs only NumPy.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

__all__ = ["FIELDS", "METRICS", "aggregate", "derive", "field"]

FIELDS: tuple[str, ...] = (
    "ff",
    "rr",
    "fr",
    "dd",
    "df",
    "dr",
    "n_conflict",
    "n_both_nonzero",
    "n_opposed",
    "numel",
    "n_projected",
    "n_tensors",
)
"""The additive statistics of one tensor (last axis of every statistics array).

``ff, rr, dd`` squared norms; ``fr, df, dr`` inner products (float64 sums); ``n_conflict``
coordinates with ``sign(f_i) sign(r_i) < 0`` (zeros never conflict); ``n_both_nonzero``
coordinates with ``f_i != 0`` and ``r_i != 0``; ``n_opposed`` coordinates with ``d_i r_i < 0``;
``numel`` coordinates; ``n_projected`` 1 if the strategy's projection fired for the tensor
(per-tensor or global test); ``n_tensors`` 1 per tensor.
"""
_INDEX = {name: i for i, name in enumerate(FIELDS)}

METRICS: dict[str, str] = {
    "cos_fr": "cosine between forget and retain gradients, <f,r>/(|f||r|)",
    "cos_dr": "cosine between the update and the retain gradient, <d,r>/(|d||r|)",
    "cos_df": "cosine between the update and the forget gradient, <d,f>/(|d||f|)",
    "norm_f": "Euclidean norm of the forget gradient",
    "norm_r": "Euclidean norm of the retain gradient",
    "norm_d": "Euclidean norm of the update",
    "norm_ratio": "|f| / |r| (inf when only r is zero)",
    "conflict_rate": "fraction of all coordinates with sign(f_i) sign(r_i) < 0",
    "conflict_rate_nonzero": "fraction of coordinates with f_i != 0 and r_i != 0 that conflict",
    "opposed_rate": "fraction of coordinates with d_i r_i < 0",
    "projected_fraction": "fraction of tensors whose projection fired",
}
"""Every metric :func:`derive` returns, with its definition."""


def field(statistics: np.ndarray, name: str) -> np.ndarray:
    """Return one field of a statistics array (last axis)."""
    if name not in _INDEX:
        raise KeyError(f"unknown statistics field {name!r}; fields are {', '.join(FIELDS)}")
    return np.asarray(statistics)[..., _INDEX[name]]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _cosine(dot: np.ndarray, aa: np.ndarray, bb: np.ndarray) -> np.ndarray:
    # sqrt of each squared norm separately: aa * bb can overflow or underflow in float64.
    return np.clip(_ratio(dot, np.sqrt(aa) * np.sqrt(bb)), -1.0, 1.0)


def _norm_ratio(ff: np.ndarray, rr: np.ndarray) -> np.ndarray:
    # |f| / |r|: inf when only r is zero, NaN when both are.
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(ff) / np.sqrt(rr)


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
            f"statistics must have {len(FIELDS)} fields in the last axis ({', '.join(FIELDS)}), "
            f"got shape {s.shape}"
        )
    ff, rr, fr, dd, df, dr = (s[..., i] for i in range(6))
    get = lambda name: s[..., _INDEX[name]]  # noqa: E731
    return {
        "cos_fr": _cosine(fr, ff, rr),
        "cos_dr": _cosine(dr, dd, rr),
        "cos_df": _cosine(df, dd, ff),
        "norm_f": np.sqrt(ff),
        "norm_r": np.sqrt(rr),
        "norm_d": np.sqrt(dd),
        "norm_ratio": _norm_ratio(ff, rr),
        "conflict_rate": _ratio(get("n_conflict"), get("numel")),
        "conflict_rate_nonzero": _ratio(get("n_conflict"), get("n_both_nonzero")),
        "opposed_rate": _ratio(get("n_opposed"), get("numel")),
        "projected_fraction": _ratio(get("n_projected"), get("n_tensors")),
    }


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
        raise ValueError("axis must name the tensor axis, not the fields axis")
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
