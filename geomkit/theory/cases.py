"""Cases: the additive statistics of every strategy at one granularity, with error bounds.

A claim check at tensor, layer or model granularity only needs, per case (a (step, tensor),
(step, layer) or (step,) of a run, or a (sample, tensor) or (sample,) of a synthetic sampler),
the sufficient statistics :data:`geomkit.metrics.FIELDS` of each strategy. :class:`Cases` holds
them together with two per-case absolute bounds on ``<d, r>`` that the checks turn into
tolerances (docs/theory.md#tolerances); each follows from how the number was computed:

``rounding``
    the arithmetic error of the recorded ``<d, r>`` against the exact ``<d*, r>`` of the
    strategy's formula ``d* = a f + b r``, summed over the tensors of the case:

    * float64 accumulation, for every strategy: ``float64_bound = 2 (N + T + 8) u64 (A |f_j|
      |r_j| + B |r_j|^2)`` per tensor, ``u64 = 2**-53``, ``N`` the coordinates and ``T`` the
      tensors of the model (a float64 sum of ``n`` terms in any order errs by at most
      ``(n - 1) u64`` of the sum of their absolute values; the terms are bounded by Cauchy-Schwarz,
      ``A``, ``B`` the largest ``|a|``, ``|b|`` of the linear form; the pooled dot products behind
      a projection coefficient and the sums over tensors add ``N`` and ``T`` more). Shadow
      statistics are float64 sums over the exactly representable f, r and carry only this;
    * rounding of an update that was formed (applied, or materialised by a sampler) to the
      gradient dtype: ``u / (1 - u) * sum_i |d_i r_i| + eta sqrt(n_j) |r_j|`` with ``u`` of
      :func:`geomkit.kernels.update_rounding` (``|d_i - d*_i| <= u |d*_i| + eta`` is what
      ``n_unrounded = 0`` certifies, R0), ``eta`` of :func:`geomkit.kernels.subnormal_rounding`
      (gradual underflow), ``sum |d_i r_i|`` the recorded ``dr_abs``. Not for the
      sign rules (SAGO variants): rounding never flips the sign of ``d_i``, so every
      ``d_i r_i >= 0`` survives it (R1, R6). A source without ``dr_abs`` (a store written before
      it existed) uses its Cauchy-Schwarz bound ``(1 + u)(A |f||r| + B |r|^2)``, with a note.
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
from geomkit.kernels import DOT_FIELDS, UNIT_ROUNDOFF_64, subnormal_rounding, update_rounding
from geomkit.strategies import EPSILON, Global, PCGrad

__all__ = ["Cases", "build_cases", "field_of", "float64_factor", "rtol"]

FORMED = ("materialised", "measured")
"""Evidence of statistics measured on an update that was formed (and so rounded)."""


def field_of(stats: np.ndarray, name: str) -> np.ndarray:
    """One field (last axis) of a statistics array."""
    return stats[..., INDEX[name]]


def rtol(dtype: torch.dtype) -> float:
    """A relative rounding tolerance for ``dtype``: ``8 eps(dtype) + 1e-12``.

    Kept for comparisons that are not gated (R4, R5, R7, R8 and the breakdowns); the gated
    checks use the bounds of this module's docstring."""
    return 8.0 * torch.finfo(dtype).eps + 1e-12


def float64_factor(n_coordinates: np.ndarray, n_tensors: int) -> np.ndarray:
    """``2 (N + T + 8) u64``: the float64 accumulation bound per unit of absolute terms."""
    return 2.0 * (np.asarray(n_coordinates, dtype=np.float64) + n_tensors + 8) * UNIT_ROUNDOFF_64


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
    notes : mapping of str to str
        Strategy name -> a note every result about it carries.
    absent : tuple of str
        Optional fields (:data:`geomkit.fields.OPTIONAL_FIELDS`) the source did not record
        (NaN in ``stats``); checks that need them fall back or report nothing evaluated.
    float64 : ndarray, optional
        ``[n_cases]`` :func:`float64_factor` of each case (see :attr:`float64_bound`).
    formula : mapping, optional
        Tensor cases only, for each formed update of a uniform rule (sum, PCGrad, BLUR: one
        ``(a, b)`` per tensor): ``(dr_formula, tol)``, the float64 ``<d*, r> = a <f,r> + b |r|^2``
        of the strategy's formula and the bound on ``|<d, r> - <d*, r>|`` from rounding ``d``
        once (R0's additive check).
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
    absent: tuple[str, ...] = ()
    float64: np.ndarray | None = None
    formula: Mapping[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def float64_bound(self) -> np.ndarray:
        """``[n_cases]`` :func:`float64_factor` of each case's model (``N``, ``T``): the
        relative float64 accumulation bound of its sums (64 ``u64`` when not given)."""
        if self.float64 is None:
            return np.full(len(self), 64 * UNIT_ROUNDOFF_64)
        return self.float64

    def __len__(self) -> int:
        return len(self.where)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def _bounds(
    name: str,
    tensor_stats: np.ndarray,
    alpha: float,
    gamma: float,
    dtype: torch.dtype,
    formed: bool,
    absent: tuple[str, ...],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """Per-tensor rounding bound ``[B, T]``, per-tensor PCGrad residual ``[B, T]``, model
    residual ``[B]`` and, for a formed update of a uniform rule, ``(dr_formula, tol)`` ``[B, T]``
    (see :attr:`Cases.formula`; else None) of strategy ``name`` from its tensor statistics
    ``[B, T, F]``; ``formed``: the statistics were measured on an update formed in ``dtype``."""
    ff, rr, fr = (field_of(tensor_stats, k) for k in ("ff", "rr", "fr"))
    numel = field_of(tensor_stats, "numel")
    dots = np.stack([field_of(tensor_stats, k) for k in DOT_FIELDS], axis=-1)  # [B, T, 3]
    try:
        strategy = gstrategies.build(name, alpha=alpha, gamma=gamma)
    except ValueError:
        strategy = None
    zero_b = np.zeros(dots.shape[:-2])
    residual, model_residual = np.zeros_like(ff), zero_b
    form = None
    if strategy is None:  # an unregistered label: bound as the plain sum
        big_a, big_b = np.full(ff.shape, gamma), np.full(ff.shape, alpha)
    else:
        pooled = dots
        if isinstance(strategy.scope, Global):
            pooled = np.broadcast_to(dots.sum(axis=-2, keepdims=True), dots.shape)
        form = strategy.linear_form(torch.from_numpy(np.array(pooled))).numpy()
        big_a = np.maximum(np.abs(form[..., 0]), np.abs(form[..., 2]))
        big_b = np.maximum(np.abs(form[..., 1]), np.abs(form[..., 3]))
        if isinstance(strategy.rule, PCGrad):
            if isinstance(strategy.scope, Global):
                rr_m, fr_m = rr.sum(-1), fr.sum(-1)
                model_residual = np.where(
                    fr_m < 0, gamma * np.abs(fr_m) * (EPSILON / (rr_m + EPSILON)), 0
                )
            else:
                residual = np.where(fr < 0, gamma * np.abs(fr) * (EPSILON / (rr + EPSILON)), 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        magnitude = big_a * np.sqrt(ff * rr) + big_b * rr  # >= sum |d*_i r_i| (Cauchy-Schwarz)
        n_total = numel.sum(axis=-1, keepdims=True)
        rounding = float64_factor(n_total, numel.shape[-1]) * magnitude
        keeps_signs = strategy is not None and strategy.rule.never_opposes
        if formed and not keeps_signs:
            u, _ = update_rounding(dtype)
            eta = subnormal_rounding(dtype)
            dr_abs = field_of(tensor_stats, "dr_abs")
            if "dr_abs" in absent:
                dr_abs = (1 + u) * magnitude
            rounding = rounding + u / (1 - u) * dr_abs + eta * np.sqrt(numel * rr)
        formula = None
        if formed and form is not None and strategy.rule.uniform:
            # <d*, r> of the formula in float64 (one more float64 term for its own rounding)
            dr_formula = form[..., 0] * fr + form[..., 1] * rr
            float64_term = float64_factor(n_total, numel.shape[-1]) * magnitude
            formula = (dr_formula, rounding + float64_term)
    return rounding, residual, model_residual, formula


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
    absent: Sequence[str] = (),
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
    absent : sequence of str
        Optional fields the source did not record (see :class:`Cases`).
    Other parameters are stored on the result (see :class:`Cases`).
    """
    names = list(tensor_stats)
    absent = tuple(absent)
    first = tensor_stats[names[0]]
    n_b, n_t = first.shape[0], first.shape[1]
    if len(batch_labels) != n_b or len(tensor_labels) != n_t:
        raise ValueError(
            f"{len(batch_labels)} batch and {len(tensor_labels)} tensor labels for statistics "
            f"of shape {first.shape}"
        )
    numel = field_of(first, "numel")  # [B, T]
    factor = float64_factor(numel.sum(axis=-1), n_t)  # [B]
    bounds = {
        n: _bounds(n, tensor_stats[n], alpha, gamma, dtype, evidence.get(n) in FORMED, absent)
        for n in names
    }
    common = {
        "source": source,
        "evidence": dict(evidence),
        "alpha": alpha,
        "gamma": gamma,
        "dtype": dtype,
        "notes": dict(notes or {}),
        "absent": absent,
    }

    def flat(a: np.ndarray) -> np.ndarray:
        return a.reshape(n_b * a.shape[1], *a.shape[2:])

    out = {
        "tensor": Cases(
            granularity="tensor",
            stats={n: flat(tensor_stats[n]) for n in names},
            rounding={n: flat(bounds[n][0]) for n in names},
            residual={n: flat(bounds[n][1]) for n in names},
            formula={
                n: (flat(bounds[n][3][0]), flat(bounds[n][3][1]))
                for n in names
                if bounds[n][3] is not None
            },
            where=tuple(f"{b}, tensor {t}" for b in batch_labels for t in tensor_labels),
            group=np.tile(
                np.arange(n_t) if tensor_groups is None else np.asarray(tensor_groups), n_b
            ),
            float64=np.repeat(factor, n_t),
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
            float64=np.repeat(factor, n_g),
            **common,
        )
    return out
