"""The ``ds.geom`` accessor: exact derived metrics of a recorded run at any grouping.

``import geomkit`` registers it on xarray (as soon as xarray is imported), so it works on any
Dataset opened from a geomkit store, also with ``xr.open_zarr``.

>>> import tempfile, torch, geomkit
>>> tmp = tempfile.TemporaryDirectory()  # a tiny run: two tensors, three steps, SAGO applied
>>> names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]
>>> rec = geomkit.Recorder(f"{tmp.name}/geometry.zarr", names, [8, 8], "sago")
>>> for step in range(3):
...     rec.record(step, torch.randn(2, 8).unbind(), torch.randn(2, 8).unbind())
>>> rec.close()
>>> ds = geomkit.open_run(tmp.name)
>>> cos = ds.geom.metrics(by="layer").cos_dr.sel(strategy="pcgrad")  # PCGrad as a shadow
>>> cos.dims, cos.sizes["layer"]
(('record', 'layer'), 2)
>>> bool((ds.geom.metrics(by="tensor").cos_dr.sel(strategy="sago") >= 0).all())
True
>>> ds.geom.runs()
[Run('...': sago; 3 steps, 3 records, 0 evaluations)]
>>> ds.geom.audit().bug_detected  # the theorem audit of this run
False
>>> tmp.cleanup()

Grouping sums the additive statistics of the tensors in a group (exact: they are sums), and the
metrics are then derived from the group sums by :func:`geomkit.metrics.derive`, the single
definition used everywhere in geomkit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import xarray as xr

from geomkit._validation import check_choice
from geomkit.fields import (
    FIELD_TABLE,
    FIELDS,
    METRIC_TABLE,
    PAIR_FIELDS,
    SIZE_FIELDS,
    STEP_FIELDS,
    UPDATE_FIELDS,
)
from geomkit.metrics import derive

if TYPE_CHECKING:
    from geomkit.plot import PlotResult
    from geomkit.theory import Audit

__all__ = ["GROUPINGS", "GeometryAccessor", "GeometryPlots"]

GROUPINGS: tuple[str, ...] = ("tensor", "layer", "component", "module", "model")
"""Groupings accepted by ``by=``: per tensor, per layer index, per component, per module, or the
whole model."""

_PAIR_METRICS: tuple[str, ...] = tuple(
    n for n, m in METRIC_TABLE.items() if m.role in ("pair", "step")
)
"""Metrics of the (f, r) pair alone, or of the step taken: they carry no ``strategy``
dimension."""

LONG_NAMES: dict[str, str] = {name: m.long_name for name, m in METRIC_TABLE.items()}
"""Short axis labels (``long_name``) of the derived metrics; the definition is ``description``."""

_REQUIRED: tuple[str, ...] = tuple(
    n for n, f in FIELD_TABLE.items() if f.constant is None and not f.optional
)
"""The statistics a run must hold: every stored field (but the optional ones, NaN when absent)
and the ``numel`` coordinate."""


@xr.register_dataset_accessor("geom")
class GeometryAccessor:
    """Derived gradient-geometry metrics of a geomkit run (``ds.geom``)."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def _require(self) -> None:
        missing = [n for n in _REQUIRED if n not in self._ds]
        if missing:
            raise KeyError(
                f"this Dataset has no geometry statistics (missing {missing}); open a run "
                "with geomkit.open_run"
            )

    def statistics(self, by: str = "model") -> xr.DataArray:
        """The additive statistics summed over ``by`` groups, with a last ``field`` dimension.

        Parameters
        ----------
        by : {"tensor", "layer", "component", "module", "model"}
            The grouping. ``"model"`` sums every tensor.

        Sums do not skip NaN: a NaN (or inf) statistic of one tensor makes the sum of its
        layer, component, module and model non-finite, so a NaN update cannot vanish from a
        group (xarray's default ``skipna`` would drop it and report a clean sum).
        """
        self._require()
        check_choice("by", by, GROUPINGS)
        ds = self._ds
        lazy = any(_is_dask(ds[n].data) for n in FIELD_TABLE if n in ds.data_vars)
        pieces = {}
        for name, spec in FIELD_TABLE.items():
            if spec.optional and name not in ds:  # a store written before the field existed
                like = ds["dr"] if spec.role == "update" else ds["ff"]
                piece = xr.full_like(like, np.nan, dtype=np.float64)
            elif spec.constant is None:  # a stored variable, or the numel coordinate
                piece = ds[name].astype(np.float64)
            else:
                piece = xr.full_like(ds["numel"], spec.constant, dtype=np.float64)
            piece = piece.reset_coords(drop=True)
            if lazy and not _is_dask(piece.data):  # a coordinate: broadcast lazily too
                piece = piece.chunk()
            pieces[name] = piece
        # broadcast by role, so that the dimension order (those of the pair fields, then
        # strategy) does not depend on the order of the fields
        order = (*PAIR_FIELDS, *UPDATE_FIELDS, *STEP_FIELDS, *SIZE_FIELDS)
        broadcast = dict(zip(order, xr.broadcast(*(pieces[n] for n in order)), strict=True))
        arrays = [broadcast[name] for name in FIELDS]
        stacked = xr.concat(arrays, dim=xr.Variable("field", list(FIELDS)), coords="minimal")
        stacked = stacked.assign_coords(
            {c: ds[c] for c in ("layer", "component", "module") if c in ds.coords}
        )
        if by == "tensor":
            grouped = stacked
        elif by == "model" or ds[by].dims == ("tensor",):
            grouped = _group_sum(stacked, None if by == "model" else by)
        else:  # a group coordinate that differs between stacked runs
            grouped = stacked.groupby(by).sum("tensor", skipna=False)
        dims = [d for d in grouped.dims if d != "field"] + ["field"]
        return grouped.transpose(*dims)

    def metrics(self, by: str = "model") -> xr.Dataset:
        """Every metric of :data:`geomkit.metrics.METRICS` at the ``by`` grouping.

        Pair metrics (``cos_fr``, norms of f and r, conflict rates) and step metrics (``cos_ur``,
        ``cos_uf``, ``cos_ud``, ``norm_u``, the rates where u opposes r or f, and the predicted
        loss changes; NaN where the step was not measured) have no ``strategy`` dimension;
        update metrics (``cos_dr``, ``cos_df``, ``norm_d``, ``opposed_rate``,
        ``projected_fraction``) have one entry per applied or shadow strategy. Undefined values
        (zero norms) are NaN.

        The result is in memory. On a lazily opened run (:func:`geomkit.open_run`) the
        statistics are read, grouped and turned into metrics one chunk of records at a time,
        so the memory needed is that of the result, not of the run (docs/schema.md).
        """
        stats = self.statistics(by)
        names = list(METRIC_TABLE)
        if _is_dask(stats.data):  # one chunk of records at a time; every field in the chunk
            data = stats.data.rechunk({stats.ndim - 1: -1})
            table = data.map_blocks(
                _derive_stacked,
                names,
                dtype=np.float64,
                chunks=(*data.chunks[:-1], (len(names),)),
            ).compute()
            values = {name: table[..., i] for i, name in enumerate(names)}
        else:
            values = derive(stats.values)
        template = stats.isel(field=0, drop=True)
        out = {}
        for name in names:
            da = xr.DataArray(values[name], dims=template.dims, coords=template.coords)
            if name in _PAIR_METRICS and "strategy" in da.dims:
                da = da.isel(strategy=0, drop=True)
            da.attrs = METRIC_TABLE[name].attrs
            out[name] = da
        result = xr.Dataset(out)
        result.attrs = dict(self._ds.attrs, grouping=by)
        return result

    def runs(self) -> list:
        """The runs in this Dataset: one, or one per entry of its ``run`` dimension
        (:func:`geomkit.open_runs`), each with its label, its Dataset without the padding
        that stacking adds, and its objective, applied strategy and seed."""
        from geomkit.runs import load

        return load(self._ds)

    def audit(self, claims: Sequence[str] | None = None, **kwargs: Any) -> Audit:
        """Check the alignment claims on this Dataset's runs: :func:`geomkit.theory.audit`."""
        from geomkit.theory import audit

        return audit(self._ds, claims=claims, **kwargs)

    @property
    def plot(self) -> GeometryPlots:
        """Plotting shortcuts: ``ds.geom.plot.alignment()``, ``.by_layer()``, ``.heatmap()``,
        ``.losses()``, ``.tradeoff()``, and of the step taken ``.step_alignment()``,
        ``.attribution()``, ``.predicted_vs_realized()`` (:mod:`geomkit.plot`, imported on first
        use)."""
        return GeometryPlots(self._ds)


def _is_dask(data: Any) -> bool:
    """Whether ``data`` is a dask array (without importing dask)."""
    return type(data).__module__.startswith("dask.")


def _group_sum(stacked: xr.DataArray, by: str | None) -> xr.DataArray:
    """Sum ``stacked`` over ``tensor`` within each group of the 1-D coordinate ``by`` (every
    tensor when None), groups in sorted order (tensors of a missing label are left out).

    A lazy array is summed one chunk at a time, with every tensor in the chunk, by the very
    function that sums an array in memory: both give the same values, bit for bit.
    """
    axis = stacked.get_axis_num("tensor")
    n_tensors = stacked.sizes["tensor"]
    if by is None:
        labels, members = None, [np.arange(n_tensors)]
    else:
        values = stacked[by].values
        known = ~pd.isnull(values)
        labels, codes = np.unique(values[known], return_inverse=True)
        where = np.flatnonzero(known)
        members = [where[codes == g] for g in range(len(labels))]
    data = stacked.data
    if _is_dask(data):
        data = data.rechunk({axis: -1})
        chunks = list(data.chunks)
        if by is None:
            chunks.pop(axis)
        else:
            chunks[axis] = (len(members),)
        summed = data.map_blocks(
            _sum_members,
            members,
            axis,
            by is None,
            dtype=np.float64,
            chunks=tuple(chunks),
            drop_axis=[axis] if by is None else [],
        )
    else:
        summed = _sum_members(data, members, axis, by is None)
    dims = list(stacked.dims)
    if by is None:
        dims.pop(axis)
    else:
        dims[axis] = by
    coords = {
        name: coord
        for name, coord in stacked.coords.items()
        if "tensor" not in coord.dims and name != by
    }
    if labels is not None:
        coords[by] = xr.Variable((by,), labels, attrs=stacked[by].attrs)
    return xr.DataArray(xr.Variable(dims, summed), coords=coords)


def _sum_members(
    block: np.ndarray, members: Sequence[np.ndarray], axis: int, drop: bool
) -> np.ndarray:
    """Sums of ``block`` over each index set of ``members`` along ``axis`` (NaN propagates),
    each one over a contiguous copy, so that a sum does not depend on the block's other
    dimensions."""
    moved = np.moveaxis(np.asarray(block, dtype=np.float64), axis, -1)
    out = np.empty((*moved.shape[:-1], len(members)), dtype=np.float64)
    for g, index in enumerate(members):
        out[..., g] = moved[..., index].sum(axis=-1)
    return out[..., 0] if drop else np.moveaxis(out, -1, axis)


def _derive_stacked(block: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """:func:`geomkit.metrics.derive` of one block, the metrics stacked in a last axis."""
    values = derive(block)
    return np.stack([values[name] for name in names], axis=-1)


class GeometryPlots:
    """``ds.geom.plot``: the common :mod:`geomkit.plot` figures of this Dataset.

    Each method passes the Dataset as the figure's ``source`` and forwards the keyword
    arguments; it returns the :class:`~geomkit.plot.PlotResult`.
    """

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def alignment(
        self, metric: str | Sequence[str] = ("cos_dr", "cos_df"), **kwargs: Any
    ) -> PlotResult:
        """cos(d, r) and cos(d, f) over steps: :func:`geomkit.plot.alignment_over_steps`."""
        from geomkit.plot import alignment_over_steps

        return alignment_over_steps(self._ds, metric, **kwargs)

    def by_layer(self, metric: str = "cos_dr", **kwargs: Any) -> PlotResult:
        """One panel per layer: :func:`geomkit.plot.alignment_by_layer`."""
        from geomkit.plot import alignment_by_layer

        return alignment_by_layer(self._ds, metric, **kwargs)

    def heatmap(self, metric: str = "cos_fr", **kwargs: Any) -> PlotResult:
        """A metric over steps and layers: :func:`geomkit.plot.layer_heatmap`."""
        from geomkit.plot import layer_heatmap

        return layer_heatmap(self._ds, metric, **kwargs)

    def losses(self, **kwargs: Any) -> PlotResult:
        """Retain loss and forget NLL over steps, panels per objective:
        :func:`geomkit.plot.loss_dynamics`."""
        from geomkit.plot import loss_dynamics

        return loss_dynamics(self._ds, **kwargs)

    def tradeoff(self, **kwargs: Any) -> PlotResult:
        """Forget against retained accuracy, panels per objective: :func:`geomkit.plot.tradeoff`."""
        from geomkit.plot import tradeoff

        return tradeoff(self._ds, **kwargs)

    def step_alignment(self, **kwargs: Any) -> PlotResult:
        """cos(u, r) of the step taken against cos(d, r) of the update, panels per objective:
        :func:`geomkit.plot.step_alignment`."""
        from geomkit.plot import step_alignment

        return step_alignment(self._ds, **kwargs)

    def attribution(self, **kwargs: Any) -> PlotResult:
        """Each layer's share of the step's predicted loss changes over steps:
        :func:`geomkit.plot.attribution`."""
        from geomkit.plot import attribution

        return attribution(self._ds, **kwargs)

    def predicted_vs_realized(self, **kwargs: Any) -> PlotResult:
        """Realised against predicted change of each loss per recorded step:
        :func:`geomkit.plot.predicted_vs_realized`."""
        from geomkit.plot import predicted_vs_realized

        return predicted_vs_realized(self._ds, **kwargs)

    def __repr__(self) -> str:
        return (
            "<ds.geom.plot: alignment, by_layer, heatmap, losses, tradeoff, step_alignment, "
            "attribution, predicted_vs_realized>"
        )
