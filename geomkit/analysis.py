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
import xarray as xr

from geomkit._validation import check_choice
from geomkit.fields import (
    FIELD_TABLE,
    FIELDS,
    METRIC_TABLE,
    PAIR_FIELDS,
    SIZE_FIELDS,
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

_PAIR_METRICS: tuple[str, ...] = tuple(n for n, m in METRIC_TABLE.items() if m.role == "pair")
"""Metrics of the (f, r) pair alone: they carry no ``strategy`` dimension."""

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
        pieces = {}
        for name, spec in FIELD_TABLE.items():
            if spec.optional and name not in ds:  # a store written before the field existed
                piece = xr.full_like(ds["dr"], np.nan, dtype=np.float64)
            elif spec.constant is None:  # a stored variable, or the numel coordinate
                piece = ds[name].astype(np.float64)
            else:
                piece = xr.full_like(ds["numel"], spec.constant, dtype=np.float64)
            pieces[name] = piece.reset_coords(drop=True)
        # broadcast by role, so that the dimension order (those of the pair fields, then
        # strategy) does not depend on the order of the fields
        order = (*PAIR_FIELDS, *UPDATE_FIELDS, *SIZE_FIELDS)
        broadcast = dict(zip(order, xr.broadcast(*(pieces[n] for n in order)), strict=True))
        arrays = [broadcast[name] for name in FIELDS]
        stacked = xr.concat(arrays, dim=xr.Variable("field", list(FIELDS)), coords="minimal")
        stacked = stacked.assign_coords(
            {c: ds[c] for c in ("layer", "component", "module") if c in ds.coords}
        )
        if by == "model":
            grouped = stacked.sum("tensor", skipna=False)
        elif by == "tensor":
            grouped = stacked
        else:
            grouped = stacked.groupby(by).sum("tensor", skipna=False)
        dims = [d for d in grouped.dims if d != "field"] + ["field"]
        return grouped.transpose(*dims)

    def metrics(self, by: str = "model") -> xr.Dataset:
        """Every metric of :data:`geomkit.metrics.METRICS` at the ``by`` grouping.

        Pair metrics (``cos_fr``, norms of f and r, conflict rates) have no ``strategy``
        dimension; update metrics (``cos_dr``, ``cos_df``, ``norm_d``, ``opposed_rate``,
        ``projected_fraction``) have one entry per applied or shadow strategy. Undefined values
        (zero norms) are NaN.
        """
        stats = self.statistics(by)
        values = derive(stats.values)
        template = stats.isel(field=0, drop=True)
        out = {}
        for name, array in values.items():
            da = template.copy(data=array)
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
        ``.losses()``, ``.tradeoff()`` (:mod:`geomkit.plot`, imported on first use)."""
        return GeometryPlots(self._ds)


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
        """Retain and forget loss over steps: :func:`geomkit.plot.loss_dynamics`."""
        from geomkit.plot import loss_dynamics

        return loss_dynamics(self._ds, **kwargs)

    def tradeoff(self, **kwargs: Any) -> PlotResult:
        """Final forget against retained accuracy: :func:`geomkit.plot.tradeoff`."""
        from geomkit.plot import tradeoff

        return tradeoff(self._ds, **kwargs)

    def __repr__(self) -> str:
        return "<ds.geom.plot: alignment, by_layer, heatmap, losses, tradeoff>"
