"""R4 measured: how often, by how much, at which ``|f|/|r|`` and in which layers SAGO's cosine
with the retain gradient falls below PCGrad's (:func:`r4_breakdown`).

docs/theory.md#r4: R4, ``cos(d_SAGO, r) >= cos(d_PCGrad, r)``, is false; it tends to hold when
``|f| >~ |r|``. This module measures that dependence rather than asserting the claim.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import numpy as np
import torch
import xarray as xr

from geomkit._deprecation import renamed
from geomkit._validation import check_choice, invalid
from geomkit.theory.cases import Cases, rtol
from geomkit.theory.checks import cosine_gap
from geomkit.theory.claims import get_claim
from geomkit.theory.samplers import Sampler

__all__ = ["DEFAULT_BINS", "r4_breakdown"]

DEFAULT_BINS: tuple[float, ...] = (0.0, *np.round(10.0 ** np.arange(-2.0, 2.01, 0.5), 6), np.inf)
"""Edges of the ``|f| / |r|`` bins: 0, then log-spaced 0.01 ... 100 (half decades), inf."""


def _cases(
    source: xr.Dataset | str | os.PathLike | Sampler | Sequence,
    granularity: str,
    n: int,
    seed: int,
    alpha: float,
    gamma: float,
) -> list[Cases]:
    samplers: list[Sampler] = []
    if isinstance(source, Sampler):
        samplers = [source]
    elif isinstance(source, Sequence) and source and all(isinstance(s, Sampler) for s in source):
        samplers = list(source)
    if samplers:
        if granularity not in ("tensor", "model"):
            raise ValueError(
                f"granularity {granularity!r} is not available for synthetic samplers (their "
                "pairs have tensors but no layers); use 'tensor' or 'model'"
            )
        from geomkit.theory.coordinates import Flat, flat64
        from geomkit.theory.synthetic import STRATEGIES, _implementations, synthetic_cases

        impl = _implementations(alpha, gamma, None)
        out = []
        for sampler in samplers:
            pairs = sampler.sample(n, seed)
            flat = Flat.of_pairs(pairs)
            updates = {
                name: np.stack([flat64(impl[name](p.forget, p.retain)) for p in pairs])
                for name in STRATEGIES
            }
            out.append(synthetic_cases(sampler, flat, updates, alpha, gamma)[granularity])
        return out
    from geomkit.runs import load
    from geomkit.theory.recorded import run_cases

    return [run_cases(run)[granularity] for run in load(source)]


@renamed(granularity="by")
def r4_breakdown(
    source: xr.Dataset | str | os.PathLike | Sampler | Sequence[Sampler],
    *,
    by: str = "tensor",
    bins: Sequence[float] = DEFAULT_BINS,
    against: Sequence[str] = ("pcgrad", "pcgrad_global"),
    n: int = 64,
    seed: int = 0,
    alpha: float = 1.0,
    gamma: float = 1.0,
) -> xr.Dataset:
    """Measure R4 (false): the gap ``cos(d_SAGO, r) - cos(d_PCGrad, r)`` and its violations,
    overall, by ``|f| / |r|`` bin and by layer.

    Parameters
    ----------
    source : Dataset, path, Sampler or sequence of Sampler
        Recorded runs (one or stacked; cases of all runs are pooled, each at its own alpha,
        gamma) or synthetic samplers (``n`` pairs each, from ``seed``, at ``alpha``, ``gamma``).
    by : {"tensor", "layer", "model"}
        What one case is: a (step, tensor), a (step, layer) or a step. Per-layer rates group
        the cases by their layer (for synthetic data: by tensor index). Synthetic samplers
        have no layers: ``"tensor"`` or ``"model"`` only (ValueError otherwise).
    bins : sequence of float
        Increasing edges of the ``|f| / |r|`` bins (of the case's own f and r), covering
        ``[0, inf]``: the first edge ``<= 0`` and the last ``inf`` (ValueError otherwise), so
        that every finite ratio falls in exactly one bin ``[low, high)``.
    against : sequence of str
        PCGrad scopes to compare with (those present in the source are used).

    Returns
    -------
    xarray.Dataset
        Dimensions ``against``, ``ratio_bin`` (with ``ratio_low``, ``ratio_high``) and
        ``layer``. Variables: ``cases``, ``undefined``, ``violations``, ``non_finite``,
        ``rate``, ``worst_gap``, ``mean_gap``, ``median_gap`` (per ``against``);
        ``cases_by_ratio``, ``violations_by_ratio``, ``rate_by_ratio``, ``mean_gap_by_ratio``;
        ``cases_by_layer``, ``violations_by_layer``, ``rate_by_layer``, ``mean_gap_by_layer``.
        A violation is a gap below ``-tol`` (rounding bounds of both cosines) or a case with
        non-finite statistics (``non_finite``; such a case is never undefined, its ratio may
        fall in no bin, and ``worst_gap`` is then ``-inf``); gaps are averaged over the finite
        cases; rates are NaN for empty bins.
    """
    if by not in ("tensor", "layer", "model"):
        raise ValueError(f"invalid by={by!r}: expected one of tensor, layer, model")
    granularity = by
    edges = np.asarray(bins, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise invalid("bins", list(bins), "at least two increasing edges")
    if not (edges[0] <= 0.0 and edges[-1] == np.inf):
        raise invalid(
            "bins",
            list(bins),
            "edges that cover [0, inf] (first edge <= 0, last edge inf) so that no |f|/|r| "
            "falls outside them",
        )
    if isinstance(against, str):
        against = (against,)
    for name in against:
        check_choice("against", name, ("pcgrad", "pcgrad_global"))
    all_cases = _cases(source, granularity, n, seed, alpha, gamma)
    present = [a for a in against if all("sago" in c.stats and a in c.stats for c in all_cases)]
    if not present:
        raise ValueError(f"the source holds neither SAGO nor any of {list(against)}")

    per = {}
    for name in present:
        parts = [cosine_gap(c, "sago", name) for c in all_cases]
        gap, tol, defined, ratio, finite = (np.concatenate([p[i] for p in parts]) for i in range(5))
        group = np.concatenate([np.asarray(c.group, dtype=object) for c in all_cases])
        per[name] = (gap, tol, defined, ratio, finite, group)
    layers = sorted({g for v in per.values() for g in v[5][v[2]]}, key=_order)
    n_bins = edges.size - 1

    def stats(gap: np.ndarray, bad: np.ndarray) -> tuple[int, int, float, float]:
        count = int(gap.size)
        if not count:
            return 0, 0, np.nan, np.nan
        good = gap[np.isfinite(gap)]
        mean = float(np.mean(good)) if good.size else np.nan
        return count, int(bad.sum()), float(bad.sum() / count), mean

    data: dict[str, list] = {k: [] for k in _VARIABLES}
    for name in present:
        gap, tol, defined, ratio, finite, group = per[name]
        g, t, r, grp = gap[defined], tol[defined], ratio[defined], group[defined]
        nonfin = ~(finite[defined] & np.isfinite(g) & np.isfinite(t))
        g = np.where(nonfin, np.nan, g)  # a non-finite case has no gap to average
        with np.errstate(invalid="ignore"):
            bad = (g < -t) | nonfin
        count, viol, rate, mean = stats(g, bad)
        good = g[~nonfin]
        data["cases"].append(count)
        data["undefined"].append(int((~defined).sum()))
        data["violations"].append(viol)
        data["non_finite"].append(int(nonfin.sum()))
        data["rate"].append(rate)
        worst = float(good.min()) if good.size else np.nan
        data["worst_gap"].append(-np.inf if nonfin.any() else worst)
        data["mean_gap"].append(mean)
        data["median_gap"].append(float(np.median(good)) if good.size else np.nan)
        # [low, high) bins covering [0, inf); a non-finite ratio is in no bin (which = -1)
        which = np.full(r.shape, -1)
        in_range = np.isfinite(r)
        which[in_range] = np.searchsorted(edges, r[in_range], side="right") - 1
        rows = [stats(g[which == b], bad[which == b]) for b in range(n_bins)]
        for key, k in (("cases", 0), ("violations", 1), ("rate", 2), ("mean_gap", 3)):
            data[f"{key}_by_ratio"].append([row[k] for row in rows])
        rows = [stats(g[grp == layer], bad[grp == layer]) for layer in layers]
        for key, k in (("cases", 0), ("violations", 1), ("rate", 2), ("mean_gap", 3)):
            data[f"{key}_by_layer"].append([row[k] for row in rows])

    labels = [f"[{lo:.3g}, {hi:.3g})" for lo, hi in itertools.pairwise(edges)]
    dims = {"": ("against",), "_by_ratio": ("against", "ratio_bin")}
    dims["_by_layer"] = ("against", "layer")
    variables = {}
    for key, values in data.items():
        suffix = next((s for s in ("_by_ratio", "_by_layer") if key.endswith(s)), "")
        variables[key] = (
            dims[suffix],
            np.asarray(values, dtype=np.float64 if "rate" in key or "gap" in key else np.int64),
            {"long_name": _VARIABLES[key]},
        )
    claim = get_claim("R4")
    dtypes = sorted({c.dtype_name for c in all_cases})
    ds = xr.Dataset(
        variables,
        coords={
            "against": list(present),
            "ratio_bin": labels,
            "ratio_low": ("ratio_bin", edges[:-1]),
            "ratio_high": ("ratio_bin", edges[1:]),
            "layer": _layer_labels(layers),
        },
    )
    ds.attrs = {
        "claim": claim.id,
        "statement": claim.statement,
        "status": claim.status,
        "granularity": granularity,
        "sources": [c.source for c in all_cases],
        "alpha": [c.alpha for c in all_cases],
        "gamma": [c.gamma for c in all_cases],
        "gap": "cos(d_sago, r) - cos(d_against, r); a violation is gap < -tol",
        "tolerance": "tol = rounding bounds of both cosines; rtol = "
        + ", ".join(f"{rtol(getattr(torch, d)):.3g} ({d})" for d in dtypes),
    }
    return ds


def _layer_labels(layers: list) -> np.ndarray:
    """Integer layer labels when every label is an integer (recorded layers), else strings."""
    if all(isinstance(x, int | np.integer) for x in layers):
        return np.asarray(layers, dtype=np.int64)
    return np.asarray([str(x) for x in layers], dtype=object)


def _order(label: object) -> tuple[int, object]:
    try:
        return (0, int(label))
    except (TypeError, ValueError):
        return (1, str(label))


_VARIABLES = {
    "cases": "cases with both cosines defined",
    "undefined": "cases with a zero |d| or |r|",
    "violations": "cases with cos(d_SAGO, r) < cos(d_PCGrad, r) beyond tolerance, or non-finite",
    "non_finite": "cases with NaN or infinite statistics (counted as violations)",
    "rate": "violation rate",
    "worst_gap": "most negative cos(d_SAGO, r) - cos(d_PCGrad, r) (-inf if a case is non-finite)",
    "mean_gap": "mean cos(d_SAGO, r) - cos(d_PCGrad, r)",
    "median_gap": "median cos(d_SAGO, r) - cos(d_PCGrad, r)",
    "cases_by_ratio": "cases per |f|/|r| bin",
    "violations_by_ratio": "violations per |f|/|r| bin",
    "rate_by_ratio": "violation rate per |f|/|r| bin",
    "mean_gap_by_ratio": "mean gap per |f|/|r| bin",
    "cases_by_layer": "cases per layer",
    "violations_by_layer": "violations per layer",
    "rate_by_layer": "violation rate per layer",
    "mean_gap_by_layer": "mean gap per layer",
}
