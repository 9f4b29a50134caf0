"""R4 measured: how often, by how much, at which ``|f|/|r|`` and in which layers SAGO's cosine
with the retain gradient falls below PCGrad's (:func:`r4_breakdown`), which case violates it
(:func:`comparison_cases`, the audit's predicate, for figures that count), and why a model-level
gap can have the opposite sign of every per-tensor gap (:func:`r4_decomposition`).

docs/theory.md#r4: R4, ``cos(d_SAGO, r) >= cos(d_PCGrad, r)``, is false; it tends to hold when
``|f| >~ |r|``. This module measures that dependence rather than asserting the claim.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import xarray as xr

from geomkit._deprecation import renamed
from geomkit._validation import check_choice, invalid
from geomkit.theory.cases import Cases, field_of, rtol
from geomkit.theory.checks import cosine_gap
from geomkit.theory.claims import get_claim
from geomkit.theory.samplers import Sampler

__all__ = [
    "DEFAULT_BINS",
    "ComparisonCases",
    "comparison_cases",
    "r4_breakdown",
    "r4_decomposition",
]

DEFAULT_BINS: tuple[float, ...] = (0.0, *np.round(10.0 ** np.arange(-2.0, 2.01, 0.5), 6), np.inf)
"""Edges of the ``|f| / |r|`` bins: 0, then log-spaced 0.01 ... 100 (half decades), inf."""


class ComparisonCases(NamedTuple):
    """Per case, the comparison ``cos(d_first, r) >= cos(d_second, r)`` as the audit counts it
    (docs/theory.md#r4, #r7, #r8; :func:`comparison_cases`)."""

    gap: np.ndarray
    """``cos(d_first, r) - cos(d_second, r)`` (NaN where undefined)."""
    tol: np.ndarray
    """The rounding tolerance of the gap (:func:`geomkit.theory.checks.cosine_gap`)."""
    defined: np.ndarray
    """No zero norm makes a cosine undefined (True for non-finite data: a NaN never hides)."""
    ratio: np.ndarray
    """``|f| / |r|`` of the case."""
    finite: np.ndarray
    """The statistics of both strategies are finite."""
    non_finite: np.ndarray
    """Defined, with a non-finite statistic, gap or tolerance: counted as a violation."""
    violated: np.ndarray
    """The audit's violation: defined and (``gap < -tol`` or non-finite)."""


def comparison_cases(cases: Cases, first: str = "sago", second: str = "pcgrad") -> ComparisonCases:
    """Which case violates ``cos(d_first, r) >= cos(d_second, r)``, exactly as the audit counts
    it (gap and tolerance from :func:`geomkit.theory.checks.cosine_gap`, the non-finite and
    undefined conventions of docs/theory.md#ties-undefined-and-non-finite-cases).

    A figure or table that counts R4 (R7, R8) violations takes them from here, so that its count
    equals ``audit.txt``'s: ``violated.sum()`` violations in ``defined.sum()`` cases (cases
    of a recorded run: :func:`geomkit.theory.recorded.run_cases`).
    """
    gap, tol, defined, ratio, finite = cosine_gap(cases, first, second)
    non_finite = defined & ~(finite & np.isfinite(gap) & np.isfinite(tol))
    with np.errstate(invalid="ignore"):
        violated = defined & ((gap < -tol) | non_finite)
    return ComparisonCases(gap, tol, defined, ratio, finite, non_finite, violated)


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
        parts = [comparison_cases(c, "sago", name) for c in all_cases]
        joined = ComparisonCases(*(np.concatenate(p) for p in zip(*parts, strict=True)))
        group = np.concatenate([np.asarray(c.group, dtype=object) for c in all_cases])
        per[name] = (joined, group)
    layers = sorted({g for c, grp in per.values() for g in grp[c.defined]}, key=_order)
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
        c, group = per[name]
        defined = c.defined
        r, grp = c.ratio[defined], group[defined]
        nonfin, bad = c.non_finite[defined], c.violated[defined]
        g = np.where(nonfin, np.nan, c.gap[defined])  # a non-finite case has no gap to average
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


_DECOMPOSITION_PER = ("part", "step", "run")


def r4_decomposition(
    source: xr.Dataset | str | os.PathLike | Sequence,
    *,
    by: str = "tensor",
    against: str = "pcgrad",
    per: str = "step",
) -> pd.DataFrame:
    """Split the model-level gap ``cos(d_SAGO, r) - cos(d_PCGrad, r)`` of each recorded step,
    exactly, into a per-part term (the gaps of the tensors or layers) and a pooling term.

    Both updates are formed on the same gradients (the run's applied strategy and its shadows).
    With parts ``j`` (tensors or layers) of the model,

    ``cos(d, r) = <d, r> / (|d| |r|) = sum_j w_j c_j``, ``w_j = |d_j| |r_j| / (|d| |r|)``,
    ``c_j = cos(d_j, r_j)``

    (``w_j c_j = 0`` for a part with ``|d_j| = 0`` or ``|r_j| = 0``, where ``c_j := 0``). With
    ``S`` = SAGO, ``P`` = PCGrad, the means ``w̄_j = (w_j^S + w_j^P) / 2``,
    ``c̄_j = (c_j^S + c_j^P) / 2`` and the identity ``w^S c^S - w^P c^P = w̄ (c^S - c^P) +
    (w^S - w^P) c̄``, the model gap is exactly

    ``gap = sum_j w̄_j (c_j^S - c_j^P)   [per_part_term]
          + sum_j (w_j^S - w_j^P) c̄_j   [pooling_term]``.

    The per-part term is a weighted sum of the per-part gaps with weights ``w̄_j >= 0``, whose
    sum ``W = weight_sum <= 1`` (Cauchy-Schwarz); it is positive when SAGO is ahead in every
    part. It splits further, exactly, over the ``n`` parts, into

    ``per_part_term = (W / n) sum_j (c_j^S - c_j^P)          [uniform_term]
                    + sum_j (w̄_j - W / n) (c_j^S - c_j^P)   [weighting_term]``:

    the gap if every part weighed the same, and what the parts' unequal weights add (negative
    when the parts that carry most of ``|d| |r|``, e.g. the embedding matrix, are those where
    SAGO trails). As ``|r|`` is common, ``w_j^S - w_j^P = (|r_j| / |r|) (|d_j^S| / |d^S| -
    |d_j^P| / |d^P|)``: the pooling term is the effect of the two updates spreading their norm
    differently over the parts, weighted by the parts' mean cosines. Every term is a float64
    sum of the recorded statistics; ``residual = gap - per_part_term - pooling_term`` is
    rounding only (docs/theory.md#r4-decomposed).

    Parameters
    ----------
    source : Dataset, path, Run or list of these
        Recorded runs (:func:`geomkit.runs.load`) that hold SAGO and ``against`` (applied or
        shadow). Records that ``open_run(..., on_damage="mask")`` masked are left out, as in the
        audit.
    by : {"tensor", "layer"}
        The parts.
    against : {"pcgrad", "pcgrad_global"}
        The PCGrad scope compared with.
    per : {"step", "part", "run"}
        One row per (run, recorded step); per (run, step, part); or per run (summaries over the
        steps where the model gap is defined).

    Returns
    -------
    pandas.DataFrame
        Every row has ``run``, ``objective``, ``strategy`` (the applied one), ``seed``, ``by``,
        ``against``. ``per="step"``: ``step``, ``norm_ratio`` (model ``|f| / |r|``),
        ``cos_sago``, ``cos_against`` (model), ``gap`` (:func:`comparison_cases`' gap),
        ``per_part_term`` (``= uniform_term + weighting_term``), ``pooling_term``,
        ``residual``, ``weight_sum``,
        ``part_gap_weighted`` (``per_part_term / weight_sum``), ``part_gap_mean`` (unweighted
        mean over the defined parts), ``parts`` (defined parts), ``part_violations`` and
        ``violated`` (the audit's R4 predicate, at the parts and at the model). Undefined steps
        (a zero model norm) have NaN terms. ``per="part"``: ``step``, ``part``,
        ``norm_ratio``, ``weight_sago``, ``weight_against``, ``cos_sago``, ``cos_against``,
        ``gap``, ``per_part_term``, ``uniform_term``, ``weighting_term``, ``pooling_term``
        (per part; they sum over the parts to the step's). ``per="run"``: ``steps``
        (defined), ``frac_ratio_ge_1`` (steps with model ``|f| / |r| >= 1``), ``violations``
        (model), ``mean_*`` and ``median_*`` over the steps of ``gap``, ``per_part_term``,
        ``uniform_term``, ``weighting_term``, ``pooling_term``, ``part_gap_weighted``,
        ``part_gap_mean``, and ``median_norm_ratio``; the means add up (``mean_gap =
        mean_per_part_term + mean_pooling_term`` up to rounding), the medians need not.

    Examples
    --------
    >>> import tempfile, torch, geomkit
    >>> from geomkit import theory
    >>> tmp = tempfile.TemporaryDirectory()
    >>> rec = geomkit.Recorder(f"{tmp.name}/geometry.zarr", ["layers.0.w", "layers.1.w"],
    ...                        [8, 8], "sago")
    >>> for step in range(3):
    ...     rec.record(step, torch.randn(2, 8).unbind(), torch.randn(2, 8).unbind())
    >>> rec.close()
    >>> d = theory.r4_decomposition(geomkit.open_run(tmp.name))
    >>> bool(abs(d["gap"] - d["per_part_term"] - d["pooling_term"]).max() < 1e-12)
    True
    >>> tmp.cleanup()
    """
    check_choice("by", by, ("tensor", "layer"))
    check_choice("against", against, ("pcgrad", "pcgrad_global"))
    check_choice("per", per, _DECOMPOSITION_PER)
    from geomkit.runs import load
    from geomkit.theory.recorded import _without_damaged, run_cases

    frames = []
    for run in load(source):
        run = _without_damaged(run)
        cases = run_cases(run)
        for name in ("sago", against):
            if name not in cases["model"].stats:
                raise ValueError(
                    f"r4_decomposition: run {run.label!r} did not record strategy {name!r} "
                    f"(recorded: {list(cases['model'].stats)}); record it as a shadow strategy"
                )
        steps = np.asarray(run.ds["record"].values)
        names = (
            [str(t) for t in run.ds["tensor"].values]
            if by == "tensor"
            else [str(g) for g in cases["layer"].group[: len(cases["layer"]) // max(1, steps.size)]]
        )
        frame = _decompose(cases[by], cases["model"], against, steps, names, per)
        meta = {
            "run": run.label,
            "objective": run.objective,
            "strategy": run.strategy,
            "seed": run.seed,
            "by": by,
            "against": against,
        }
        frames.append(frame.assign(**meta)[[*meta, *frame.columns]])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _decompose(
    parts: Cases, model: Cases, against: str, steps: np.ndarray, names: list[str], per: str
) -> pd.DataFrame:
    """The decomposition of :func:`r4_decomposition` for one run's cases."""
    n_b = steps.size
    n_p = len(parts) // max(1, n_b)
    weight, cos = {}, {}
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for name in ("sago", against):
            p, m = parts.stats[name], model.stats[name]
            norm_p = np.sqrt(field_of(p, "dd")) * np.sqrt(field_of(p, "rr"))
            norm_m = np.sqrt(field_of(m, "dd")) * np.sqrt(field_of(m, "rr"))
            norm_p, dr = norm_p.reshape(n_b, n_p), field_of(p, "dr").reshape(n_b, n_p)
            weight[name] = norm_p / norm_m[:, None]  # NaN/inf where the model norm is zero
            cos[name] = np.where(norm_p > 0, dr / np.where(norm_p > 0, norm_p, 1.0), 0.0)
            # a non-finite statistic must not vanish into a zero weight
            cos[name] = np.where(np.isfinite(dr) & np.isfinite(norm_p), cos[name], np.nan)
        w_s, w_p, c_s, c_p = weight["sago"], weight[against], cos["sago"], cos[against]
        w_bar, d_c = 0.5 * (w_s + w_p), c_s - c_p
        part_terms = w_bar * d_c
        pool_terms = (w_s - w_p) * 0.5 * (c_s + c_p)
        # the per-part term = equal weights (their total W spread evenly) + the deviation
        share = w_bar.sum(axis=1, keepdims=True) / n_p
        uniform_terms = share * d_c
        weighting_terms = (w_bar - share) * d_c
    model_cmp = comparison_cases(model, "sago", against)
    part_cmp = comparison_cases(parts, "sago", against)
    model_defined = model_cmp.defined & model_cmp.finite & np.isfinite(model_cmp.gap)
    gap = np.where(model_defined, model_cmp.gap, np.nan)
    part_defined = (part_cmp.defined & ~part_cmp.non_finite).reshape(n_b, n_p)
    part_gap = np.where(part_defined, part_cmp.gap.reshape(n_b, n_p), np.nan)
    if per == "part":
        keep = model_defined[:, None] & np.ones((1, n_p), dtype=bool)
        return pd.DataFrame(
            {
                "step": np.repeat(steps, n_p),
                "part": np.tile(np.asarray(names, dtype=object), n_b),
                "norm_ratio": part_cmp.ratio,
                "weight_sago": np.where(keep, w_s, np.nan).ravel(),
                "weight_against": np.where(keep, w_p, np.nan).ravel(),
                "cos_sago": np.where(part_defined, c_s, np.nan).ravel(),
                "cos_against": np.where(part_defined, c_p, np.nan).ravel(),
                "gap": part_gap.ravel(),
                "per_part_term": np.where(keep, part_terms, np.nan).ravel(),
                "uniform_term": np.where(keep, uniform_terms, np.nan).ravel(),
                "weighting_term": np.where(keep, weighting_terms, np.nan).ravel(),
                "pooling_term": np.where(keep, pool_terms, np.nan).ravel(),
            }
        )
    per_part = np.where(model_defined, part_terms.sum(axis=1), np.nan)
    uniform = np.where(model_defined, uniform_terms.sum(axis=1), np.nan)
    weighting = np.where(model_defined, weighting_terms.sum(axis=1), np.nan)
    pooling = np.where(model_defined, pool_terms.sum(axis=1), np.nan)
    weight_sum = np.where(model_defined, (0.5 * (w_s + w_p)).sum(axis=1), np.nan)
    defined_parts = part_defined.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_part = np.where(
            defined_parts > 0, np.nansum(part_gap, axis=1) / np.maximum(defined_parts, 1), np.nan
        )
        weighted = np.where(weight_sum > 0, per_part / weight_sum, np.nan)
    cos_model = {}
    for name in ("sago", against):
        m = model.stats[name]
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = np.sqrt(field_of(m, "dd")) * np.sqrt(field_of(m, "rr"))
            cos_model[name] = np.where(model_defined, field_of(m, "dr") / norm, np.nan)
    frame = pd.DataFrame(
        {
            "step": steps,
            "norm_ratio": model_cmp.ratio,
            "cos_sago": cos_model["sago"],
            "cos_against": cos_model[against],
            "gap": gap,
            "per_part_term": per_part,
            "uniform_term": uniform,
            "weighting_term": weighting,
            "pooling_term": pooling,
            "residual": gap - per_part - pooling,
            "weight_sum": weight_sum,
            "part_gap_weighted": weighted,
            "part_gap_mean": mean_part,
            "parts": defined_parts,
            "part_violations": part_cmp.violated.reshape(n_b, n_p).sum(axis=1),
            "violated": model_cmp.violated,
        }
    )
    if per == "step":
        return frame
    ok = frame[model_defined]
    row: dict[str, float] = {
        "steps": len(ok),
        "frac_ratio_ge_1": float((ok["norm_ratio"] >= 1).mean()) if len(ok) else np.nan,
        "violations": int(frame["violated"].sum()),
        "median_norm_ratio": float(ok["norm_ratio"].median()) if len(ok) else np.nan,
    }
    terms = ("gap", "per_part_term", "uniform_term", "weighting_term", "pooling_term")
    for column in (*terms, "part_gap_weighted", "part_gap_mean"):
        row[f"mean_{column}"] = float(ok[column].mean()) if len(ok) else np.nan
        row[f"median_{column}"] = float(ok[column].median()) if len(ok) else np.nan
    return pd.DataFrame([row])


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
