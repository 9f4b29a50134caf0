"""Additive sufficient statistics of (f, r, d) triples, computed on the device.

See docs/method.md#sufficient-statistics.

At a recorded step every parameter tensor is reduced to the vector :data:`FIELDS` (declared in
:mod:`geomkit.fields`; columns are assembled by name from the kernels' layouts). All fields
are sums over coordinates (or over tensors), so any grouping - tensor, layer, component, model,
or a data-parallel shard - is obtained exactly by adding rows; every metric users look at
(cosines, norms, conflict rates) is derived afterwards by :mod:`geomkit.metrics`.

Two entry points:

* :func:`sufficient` - the statistics of the update that was actually formed (reads f, r, d).
* :func:`shadow` - the statistics of several strategies on the same (f, r) without forming any
  of their updates: one pass builds the sign-partitioned Gramian (projection coefficients, and
  the closed forms of the sign rules), a second pass accumulates the moments of all projection
  rules at once.

Both return a float64 tensor on the device of the first gradient; one ``.cpu()`` moves a whole
step to the host (see :func:`to_numpy`). Nothing here synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from geomkit import kernels
from geomkit._validation import check_pair, invalid
from geomkit.fields import FIELD_TABLE, FIELDS, PAIR_FIELDS, SIZE_FIELDS, STEP_FIELDS
from geomkit.strategies import Strategy

__all__ = ["FIELDS", "sufficient", "shadow", "to_numpy"]


_SHARDED_SIZES: tuple[str, ...] = tuple(n for n in SIZE_FIELDS if FIELD_TABLE[n].constant is None)
"""Size fields of which each shard holds a part (summed over processes); the others are
constants per tensor."""


def _sizes(tensors: Sequence[Tensor], device: torch.device) -> dict[str, Tensor]:
    """Every size field of :data:`FIELDS`, one ``[n_tensors]`` float64 column each."""
    numel = [float(t.numel()) for t in tensors]
    columns = [
        numel if FIELD_TABLE[n].constant is None else [FIELD_TABLE[n].constant] * len(numel)
        for n in SIZE_FIELDS
    ]
    table = torch.tensor(columns, dtype=torch.float64, device=device)
    return dict(zip(SIZE_FIELDS, table.unbind(0), strict=True))


def _sum_shards(
    block: Tensor, sizes: dict[str, Tensor], shard_sum: Callable[[Tensor], Tensor] | None
) -> Tensor:
    """Sum ``block`` ``[n_tensors, k]`` and the sharded size columns over processes in one
    all-reduce; ``sizes`` is updated in place, the summed block returned."""
    if shard_sum is None:
        return block
    k = block.shape[1]
    sharded = torch.stack([sizes[n] for n in _SHARDED_SIZES], dim=1)
    summed = shard_sum(torch.cat([block, sharded], dim=1))
    sizes.update(zip(_SHARDED_SIZES, summed[:, k:].unbind(1), strict=True))
    return summed[:, :k]


def _assemble(columns: Mapping[str, Tensor], shape: tuple[int, ...]) -> Tensor:
    """Stack named columns into a statistics tensor ``[*shape, len(FIELDS)]`` (layout
    :data:`FIELDS`), broadcasting each column to ``shape``; the step fields, which only the
    optimizer's step fills (:class:`geomkit.step.StepModel`), are NaN when not given."""
    if any(n not in columns for n in STEP_FIELDS):
        blank = torch.full((), float("nan"), dtype=torch.float64, device=_device(columns))
        columns = {**dict.fromkeys(STEP_FIELDS, blank), **columns}
    missing = [n for n in FIELDS if n not in columns]
    if missing:
        raise RuntimeError(
            f"no kernel computes the statistics fields {missing}: every field of "
            "geomkit.fields.FIELD_TABLE needs a source in geomkit.kernels"
        )
    return torch.stack([columns[n].expand(shape) for n in FIELDS], dim=-1)


def _device(columns: Mapping[str, Tensor]) -> torch.device:
    return next(iter(columns.values())).device


@torch.no_grad()
def sufficient(
    forget: Sequence[Tensor],
    retain: Sequence[Tensor],
    combined: Sequence[Tensor],
    *,
    strategy: Strategy | None = None,
    shard_sum: Callable[[Tensor], Tensor] | None = None,
    pooled: Sequence[Tensor] | None = None,
) -> Tensor:
    """Sufficient statistics of the applied update, one row per tensor.

    Parameters
    ----------
    forget, retain, combined : sequence of Tensor
        ``f``, ``r`` and the update ``d`` actually formed, one tensor per parameter.
    strategy : Strategy, optional
        The strategy that formed ``d``. It fills ``n_projected`` (from the dot products the
        strategy pools) and ``n_unrounded``, the coordinates where ``d_i`` is not the rounding
        to the gradient dtype of the strategy's float64 linear form ``a f_i + b r_i``
        (docs/theory.md#r0). Both are 0 if it is omitted.
    shard_sum : callable, optional
        For sharded gradients (each process holds a shard of every tensor): sums a stack of
        shard-local statistics over processes (one all-reduce). The result is then the
        whole-tensor statistics, identical on every process.
    pooled : sequence of Tensor, optional
        Per tensor the pooled dot products ``strategy`` formed ``d`` with
        (:meth:`~geomkit.strategies.Strategy.pooled_dots`), when they were computed over more
        tensors than those passed here (one tensor of a global-scope strategy at a time);
        default: computed from ``forget`` and ``retain``.

    Returns
    -------
    Tensor
        ``[n_tensors, len(FIELDS)]`` float64, on the first tensor's device.

    Examples
    --------
    >>> import torch
    >>> from geomkit.metrics import field
    >>> from geomkit.strategies import build
    >>> f, r = [torch.tensor([1.0, -2.0, 0.0])], [torch.tensor([3.0, 1.0, -1.0])]
    >>> sago = build("sago")
    >>> stats = sufficient(f, r, sago(f, r), strategy=sago)  # one row per tensor
    >>> [float(field(stats, k)[0]) for k in ("ff", "rr", "fr", "dd", "dr", "n_opposed")]
    [5.0, 11.0, 1.0, 2.0, 4.0, 0.0]
    """
    forget, retain = check_pair(forget, retain)
    _, combined = check_pair(forget, combined, names=("forget", "combined"))
    home = forget[0].device
    checks, projected = None, None
    if pooled is not None and len(pooled) != len(forget):
        raise invalid("pooled", f"{len(pooled)} vectors", f"{len(forget)}, one per tensor")
    if strategy is not None:
        checks, projected = _formula_checks(strategy, forget, retain, shard_sum, pooled)
    rows = kernels.triple_batch(forget, retain, combined, None if strategy is None else checks)
    sizes = _sizes(forget, home)
    rows = _sum_shards(rows, sizes, shard_sum)
    columns = dict(zip(kernels.TRIPLE_FIELDS, rows.unbind(1), strict=True))
    if projected is None:
        projected = torch.zeros(len(forget), dtype=torch.float64, device=home)
    return _assemble({**columns, "n_projected": projected, **sizes}, (len(forget),))


def _formula_checks(
    strategy: Strategy,
    forget: Sequence[Tensor],
    retain: Sequence[Tensor],
    shard_sum: Callable[[Tensor], Tensor] | None,
    pooled: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per tensor the ``check`` vector of :func:`geomkit.kernels.triple` (``[n_tensors, 8]``:
    the strategy's float64 linear form from the same pooled dot products the strategy used, and
    the rounding bound of :func:`geomkit.kernels.update_rounding`), and ``n_projected`` from
    those dot products."""
    home = forget[0].device
    if not strategy.rule.reduces:
        stacked = torch.zeros(len(forget), 3, dtype=torch.float64, device=home)
    else:
        if pooled is None:
            pooled = strategy.pooled_dots(forget, retain, shard_sum)
        stacked = torch.stack([d.to(home) for d in pooled])  # [T, 3]
    u, eta = kernels.update_rounding(forget[0].dtype)
    weights = strategy.alpha + strategy.gamma
    form = strategy.linear_form(stacked)  # [T, 4] (a_C, b_C, a_A, b_A)
    m_f = kernels.FORMULA_SLACK * (torch.maximum(form[:, 0].abs(), form[:, 2].abs()) + weights)
    m_r = kernels.FORMULA_SLACK * (torch.maximum(form[:, 1].abs(), form[:, 3].abs()) + weights)
    u_col, eta_col = torch.full_like(m_f, u), torch.full_like(m_f, eta)
    checks = torch.stack([*form.unbind(1), u_col, m_f, m_r, eta_col], dim=1)  # [T, 8]
    if strategy.rule.reduces:
        projected = strategy.projected(stacked)
    else:
        projected = torch.zeros(len(forget), dtype=torch.float64, device=home)
    return checks, projected


@torch.no_grad()
def shadow(
    forget: Sequence[Tensor],
    retain: Sequence[Tensor],
    strategies: Sequence[Strategy],
    *,
    shard_sum: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Statistics of several strategies on the same (f, r), without forming their updates.

    Every geomkit rule forms ``d = a f + b r`` coordinate-wise, and two passes over (f, r)
    serve all strategies at once:

    1. the sign-partitioned Gramian ``S_X(ff), S_X(rr), S_X(fr)`` (X = C, the conflicting
       coordinates, or A, the rest), from which the projection coefficients follow (pooled by
       each strategy's scope) and, for the sign rules (SAGO, ``(a, b)`` constant on C and on A),
       ``<d,f> = sum_X a_X S_X(ff) + b_X S_X(fr)``, ``<d,r> = sum_X a_X S_X(fr) + b_X S_X(rr)``
       and ``<d,d> = sum_X a_X^2 S_X(ff) + 2 a_X b_X S_X(fr) + b_X^2 S_X(rr)``, where every
       term of ``<d,d>`` and ``<d,r>`` is non-negative (no cancellation); their ``n_opposed`` is
       0 by construction (``Rule.never_opposes``, docs/theory.md#r6, proved);
    2. for the uniform rules (sum, PCGrad, BLUR: one ``(a, b)`` per tensor), ``<d,d>``,
       ``<d,f>``, ``<d,r>``, ``sum |d_i r_i|`` and ``n_opposed`` accumulated directly over
       coordinates, so a projected update that nearly cancels is still measured exactly.

    Sign rules record ``sum |d_i r_i| = <d, r>`` (every term is non-negative) and every shadow
    records ``n_unrounded = 0``: its update is never formed, so never rounded.

    Parameters
    ----------
    forget, retain : sequence of Tensor
        One tensor per parameter.
    strategies : sequence of Strategy
        The strategies to evaluate (e.g. ``[build(n) for n in names()]``).
    shard_sum : callable, optional
        As for :func:`sufficient`: the Gramian is summed over processes before projection
        coefficients are formed (whole-tensor dot products, not the shard's), and so are the
        moments; two all-reduces in all.

    Returns
    -------
    Tensor
        ``[n_strategies, n_tensors, len(FIELDS)]`` float64 on the first tensor's device.

    Examples
    --------
    >>> import torch
    >>> from geomkit.strategies import build
    >>> f, r = [torch.tensor([1.0, -2.0, 0.0])], [torch.tensor([3.0, 1.0, -1.0])]
    >>> rows = shadow(f, r, [build("sago"), build("pcgrad"), build("sum")])
    >>> tuple(rows.shape[:2])  # strategies x tensors
    (3, 1)
    >>> sago = build("sago")  # the same numbers as measuring the update SAGO forms
    >>> torch.allclose(rows[0], sufficient(f, r, sago(f, r), strategy=sago), equal_nan=True)
    True
    """
    forget, retain = check_pair(forget, retain)
    if isinstance(strategies, Strategy):
        raise invalid(
            "strategies",
            strategies,
            "a sequence of Strategy objects (wrap one in a list)",
            error=TypeError,
        )
    strategies = list(strategies)
    if not strategies:
        raise ValueError("strategies is empty; expected at least one Strategy")
    for s in strategies:
        if not isinstance(s, Strategy):
            raise invalid(
                "strategies",
                s,
                f"geomkit Strategy objects, got {type(s).__name__}",
                error=TypeError,
            )
        if not (s.rule.uniform or s.rule.never_opposes):
            raise ValueError(
                f"shadow statistics need a uniform rule or one that never opposes r; {s!r} "
                "is neither"
            )
    home = forget[0].device
    g = kernels.gram_batch(forget, retain)
    sizes = _sizes(forget, home)
    gram = dict(zip(kernels.GRAM_FIELDS, _sum_shards(g, sizes, shard_sum).unbind(1), strict=True))
    pair = {}  # each pair field: in the Gramian, or the sum of its C and A parts
    for name in PAIR_FIELDS:
        if name in gram:
            pair[name] = gram[name]
        elif f"{name}_conflict" in gram:
            pair[name] = gram[f"{name}_conflict"] + gram[f"{name}_agree"]
    dots = torch.stack([pair[n] for n in kernels.DOT_FIELDS], dim=1)  # [T, 3]

    forms, projected = [], []
    for s in strategies:
        pooled = torch.stack(s.scope.pool(list(dots))) if s.rule.reduces else dots
        forms.append(s.linear_form(pooled))  # [T, 4]
        projected.append(s.projected(pooled))  # [T]
    form = torch.stack(forms)  # [S, T, 4]
    a_c, b_c, a_a, b_a = form.unbind(-1)  # each [S, T]
    ff_c, ff_a = gram["ff_conflict"], gram["ff_agree"]
    rr_c, rr_a = gram["rr_conflict"], gram["rr_agree"]
    fr_c, fr_a = gram["fr_conflict"], gram["fr_agree"]
    closed = {
        "n_opposed": torch.zeros_like(a_c),
        "dd": (a_c * a_c * ff_c + 2 * a_c * b_c * fr_c + b_c * b_c * rr_c)
        + (a_a * a_a * ff_a + 2 * a_a * b_a * fr_a + b_a * b_a * rr_a),
        "df": a_c * ff_c + b_c * fr_c + a_a * ff_a + b_a * fr_a,
        "dr": a_c * fr_c + b_c * rr_c + a_a * fr_a + b_a * rr_a,
    }
    closed["dr_abs"] = closed["dr"]  # sign rules: every d_i r_i >= 0 (R6)
    moments = torch.stack([closed[n] for n in kernels.MOMENT_FIELDS], dim=-1)  # [S, T, 4]
    uniform = [i for i, s in enumerate(strategies) if s.rule.uniform]
    if uniform:
        coefficients = form[uniform, :, :2].transpose(0, 1)  # [T, U, 2]
        direct = kernels.linear_moments_batch(forget, retain, coefficients)  # [T, U, 5]
        direct = direct.transpose(0, 1)  # [U, T, 5]
        if shard_sum is not None:
            direct = shard_sum(direct)
        moments[uniform] = direct
    update = dict(zip(kernels.MOMENT_FIELDS, moments.unbind(-1), strict=True))
    update["n_projected"] = torch.stack(projected)
    update["n_unrounded"] = torch.zeros_like(update["n_projected"])  # d is never formed
    return _assemble({**pair, **update, **sizes}, tuple(form.shape[:2]))


def to_numpy(statistics: Tensor) -> np.ndarray:
    """Move a statistics tensor to the host in one transfer, as a float64 NumPy array."""
    return statistics.detach().to("cpu", torch.float64).numpy()
