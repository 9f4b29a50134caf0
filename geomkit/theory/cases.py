"""Cases: the additive statistics of every strategy at one granularity, with error bounds.

A claim check at tensor, layer or model granularity only needs, per case (a (step, tensor),
(step, layer) or (step,) of a run, or a (sample, tensor) or (sample,) of a synthetic sampler),
the sufficient statistics :data:`geomkit.metrics.FIELDS` of each strategy. :class:`Cases` holds
them together with two per-case absolute bounds on ``<d, r>`` that the checks turn into
tolerances:

``rounding``
    ``rtol(dtype) * (A |f_j| |r_j| + B |r_j|^2)`` summed over the tensors of the case, where
    ``d = a f + b r`` coordinate-wise and ``A``, ``B`` are the largest ``|a|``, ``|b|`` of the
    strategy's linear form (so ``sum_i |d_i r_i| <= A |f||r| + B |r|^2`` by Cauchy-Schwarz),
    and ``rtol(dtype) = 8 eps(dtype) + 1e-12`` (rounding of d to the gradient dtype, float64
    accumulation of the sums).
``residual``
    the exact effect of the ``1e-10`` in PCGrad's denominator on ``<d, r>``:
    ``gamma |<f,r>| 1e-10 / (|r|^2 + 1e-10)`` per projected tensor (per-tensor PCGrad, summed
    over the tensors of the case) or for the model only (global PCGrad; 0 at smaller groups).

Both are additive over tensors, so they are computed per tensor and summed exactly like the
statistics (docs/theory.md#r2: R2 holds up to the 1e-10 in the denominator).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from geomkit import strategies as gstrategies
from geomkit.fields import FIELDS, INDEX
from geomkit.kernels import DOT_FIELDS
from geomkit.strategies import EPSILON, Global, PCGrad

__all__ = ["Cases", "build_cases", "field_of", "rtol"]


def field_of(stats: np.ndarray, name: str) -> np.ndarray:
    """One field (last axis) of a statistics array."""
    return stats[..., INDEX[name]]


def rtol(dtype: torch.dtype) -> float:
    """The relative rounding tolerance used for ``dtype``: ``8 eps(dtype) + 1e-12``."""
    return 8.0 * torch.finfo(dtype).eps + 1e-12


@dataclass(frozen=True)
class Cases:
    """Statistics of every strategy at one granularity, one row per case.

    Attributes
    ----------
    granularity : str
        ``"tensor"``, ``"layer"`` or ``"model"``.
    source : str
        ``"synthetic:<sampler>"`` or a run name.
    stats : mapping of str to ndarray
        Strategy name -> ``[n_cases, len(FIELDS)]`` float64.
    rounding, residual : mapping of str to ndarray
        Strategy name -> ``[n_cases]`` absolute bounds on ``<d, r>`` (see the module docstring).
    where : tuple of str
        A label per case (``"step 3, tensor model.layers.0.mlp.up_proj.weight"``).
    group : ndarray
        The layer (or tensor index for synthetic data) of each case, for breakdowns.
    evidence : mapping of str to str
        Strategy name -> ``materialised`` / ``measured`` / ``shadow``.
    alpha, gamma : float
        Task weights the statistics were formed with.
    dtype : torch.dtype
        Gradient dtype (sets the rounding tolerance).
    """

    granularity: str
    source: str
    stats: Mapping[str, np.ndarray]
    rounding: Mapping[str, np.ndarray]
    residual: Mapping[str, np.ndarray]
    where: tuple[str, ...]
    group: np.ndarray
    evidence: Mapping[str, str]
    alpha: float
    gamma: float
    dtype: torch.dtype
    notes: Mapping[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.where)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def _bounds(
    name: str, tensor_stats: np.ndarray, alpha: float, gamma: float, tol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-tensor rounding bound ``[B, T]``, per-tensor PCGrad residual ``[B, T]`` and model
    residual ``[B]`` of strategy ``name`` from its tensor statistics ``[B, T, F]``."""
    ff, rr, fr = (field_of(tensor_stats, k) for k in ("ff", "rr", "fr"))
    dots = np.stack([field_of(tensor_stats, k) for k in DOT_FIELDS], axis=-1)  # [B, T, 3]
    try:
        strategy = gstrategies.build(name, alpha=alpha, gamma=gamma)
    except ValueError:
        strategy = None
    zero_b = np.zeros(dots.shape[:-2])
    if strategy is None:  # an unregistered label: bound as the plain sum
        big_a, big_b = np.full(ff.shape, gamma), np.full(ff.shape, alpha)
        return tol * (big_a * np.sqrt(ff * rr) + big_b * rr), np.zeros_like(ff), zero_b
    pooled = dots
    if isinstance(strategy.scope, Global):
        pooled = np.broadcast_to(dots.sum(axis=-2, keepdims=True), dots.shape)
    form = strategy.linear_form(torch.from_numpy(np.array(pooled))).numpy()
    big_a = np.maximum(np.abs(form[..., 0]), np.abs(form[..., 2]))
    big_b = np.maximum(np.abs(form[..., 1]), np.abs(form[..., 3]))
    rounding = tol * (big_a * np.sqrt(ff * rr) + big_b * rr)
    residual, model_residual = np.zeros_like(ff), zero_b
    if isinstance(strategy.rule, PCGrad):
        if isinstance(strategy.scope, Global):
            rr_m, fr_m = rr.sum(-1), fr.sum(-1)
            model_residual = np.where(
                fr_m < 0, gamma * np.abs(fr_m) * (EPSILON / (rr_m + EPSILON)), 0
            )
        else:
            residual = np.where(fr < 0, gamma * np.abs(fr) * (EPSILON / (rr + EPSILON)), 0.0)
    return rounding, residual, model_residual


def _group_sum(values: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum the last axis of ``values`` ``[B, T]`` into ``n_groups`` groups by ``codes``."""
    out = np.zeros((*values.shape[:-1], n_groups))
    np.add.at(out, (..., codes), values)
    return out


def build_cases(
    tensor_stats: Mapping[str, np.ndarray],
    *,
    batch_labels: Sequence[str],
    tensor_labels: Sequence[str],
    groupings: Mapping[str, tuple[np.ndarray, Sequence]],
    alpha: float,
    gamma: float,
    dtype: torch.dtype,
    source: str,
    evidence: Mapping[str, str],
    grouped_stats: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    notes: Mapping[str, str] | None = None,
    tensor_groups: Sequence | None = None,
) -> dict[str, Cases]:
    """Build :class:`Cases` at tensor granularity and at every grouping in ``groupings``.

    Parameters
    ----------
    tensor_stats : mapping of str to ndarray
        Strategy -> ``[B, T, F]`` (B steps or samples, T tensors).
    batch_labels : sequence of str
        B labels (``"step 3"``, ``"sample 5"``).
    tensor_labels : sequence of str
        T tensor labels.
    groupings : mapping
        Granularity (``"layer"``, ``"model"``) -> ``(codes, labels)``: the group index of each
        tensor and the group labels (``""`` for the model).
    grouped_stats : mapping, optional
        Granularity -> strategy -> ``[B, G, F]`` already summed (e.g. by ``ds.geom``); summed
        here with ``codes`` when omitted.
    tensor_groups : sequence, optional
        The group (layer) of each tensor, stored as ``Cases.group`` of the tensor cases
        (default: the tensor index).
    Other parameters are stored on the result (see :class:`Cases`).
    """
    tol = rtol(dtype)
    names = list(tensor_stats)
    first = tensor_stats[names[0]]
    n_b, n_t = first.shape[0], first.shape[1]
    if len(batch_labels) != n_b or len(tensor_labels) != n_t:
        raise ValueError(
            f"{len(batch_labels)} batch and {len(tensor_labels)} tensor labels for statistics "
            f"of shape {first.shape}"
        )
    bounds = {n: _bounds(n, tensor_stats[n], alpha, gamma, tol) for n in names}
    common = {
        "source": source,
        "evidence": dict(evidence),
        "alpha": alpha,
        "gamma": gamma,
        "dtype": dtype,
        "notes": dict(notes or {}),
    }

    def flat(a: np.ndarray) -> np.ndarray:
        return a.reshape(n_b * a.shape[1], *a.shape[2:])

    out = {
        "tensor": Cases(
            granularity="tensor",
            stats={n: flat(tensor_stats[n]) for n in names},
            rounding={n: flat(bounds[n][0]) for n in names},
            residual={n: flat(bounds[n][1]) for n in names},
            where=tuple(f"{b}, tensor {t}" for b in batch_labels for t in tensor_labels),
            group=np.tile(
                np.arange(n_t) if tensor_groups is None else np.asarray(tensor_groups), n_b
            ),
            **common,
        )
    }
    for granularity, (codes, labels) in groupings.items():
        codes = np.asarray(codes)
        n_g = len(labels)
        stats = {}
        for n in names:
            given = (grouped_stats or {}).get(granularity, {}).get(n)
            if given is None:
                given = np.zeros((n_b, n_g, len(FIELDS)))
                np.add.at(given, (slice(None), codes), tensor_stats[n])
            stats[n] = flat(given)
        residual = {}
        for n in names:
            res = _group_sum(bounds[n][1], codes, n_g)
            if granularity == "model":
                res = res + bounds[n][2][:, None]
            residual[n] = flat(res)
        if granularity == "model":
            where = tuple(batch_labels)
        else:
            where = tuple(f"{b}, {granularity} {g}" for b in batch_labels for g in labels)
        out[granularity] = Cases(
            granularity=granularity,
            stats=stats,
            rounding={n: flat(_group_sum(bounds[n][0], codes, n_g)) for n in names},
            residual=residual,
            where=where,
            group=np.tile(np.asarray(labels, dtype=object), n_b),
            **common,
        )
    return out
