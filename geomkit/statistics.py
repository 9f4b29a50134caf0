"""Additive sufficient statistics of (f, r, d) triples, computed on the device.

See docs/method.md#sufficient-statistics.

At a recorded step every parameter tensor is reduced to the vector :data:`FIELDS`. All fields
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

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from geomkit import kernels
from geomkit._validation import check_pair
from geomkit.metrics import FIELDS
from geomkit.strategies import Strategy

__all__ = ["FIELDS", "sufficient", "shadow", "to_numpy"]


def _stack_on(vectors: Sequence[Tensor], device: torch.device) -> Tensor:
    return torch.stack([v.to(device) for v in vectors])


def _sizes(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    numel = [float(t.numel()) for t in tensors]
    return torch.tensor([numel, [1.0] * len(numel)], dtype=torch.float64, device=device).T


@torch.no_grad()
def sufficient(
    forget: Sequence[Tensor],
    retain: Sequence[Tensor],
    combined: Sequence[Tensor],
    *,
    strategy: Strategy | None = None,
    shard_sum: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Sufficient statistics of the applied update, one row per tensor.

    Parameters
    ----------
    forget, retain, combined : sequence of Tensor
        ``f``, ``r`` and the update ``d`` actually formed, one tensor per parameter.
    strategy : Strategy, optional
        The strategy that formed ``d``; used only to fill ``n_projected`` (0 if omitted).
    shard_sum : callable, optional
        For sharded gradients (each process holds a shard of every tensor): sums a stack of
        shard-local statistics over processes (one all-reduce). The result is then the
        whole-tensor statistics, identical on every process.

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
    rows = _stack_on(
        [kernels.triple(f, r, d) for f, r, d in zip(forget, retain, combined, strict=True)], home
    )
    sizes = _sizes(forget, home)
    if shard_sum is not None:
        summed = shard_sum(torch.cat([rows, sizes[:, :1]], dim=1))
        rows, sizes = summed[:, :-1], torch.cat([summed[:, -1:], sizes[:, 1:]], dim=1)
    dots = rows[:, [0, 1, 2]]
    if strategy is not None and strategy.rule.reduces:
        projected = strategy.projected(torch.stack(strategy.scope.pool(list(dots))))
    else:
        projected = torch.zeros(len(forget), dtype=torch.float64, device=home)
    return torch.cat([rows, sizes[:, :1], projected[:, None], sizes[:, 1:]], dim=1)


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
       ``<d,f>``, ``<d,r>`` and ``n_opposed`` accumulated directly over coordinates, so a
       projected update that nearly cancels is still measured exactly.

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
    >>> torch.allclose(rows[0], sufficient(f, r, sago(f, r), strategy=sago))
    True
    """
    forget, retain = check_pair(forget, retain)
    if isinstance(strategies, Strategy):
        raise TypeError("strategies must be a sequence of Strategy objects; wrap one in a list")
    strategies = list(strategies)
    if not strategies:
        raise ValueError("strategies is empty; expected at least one Strategy")
    for s in strategies:
        if not isinstance(s, Strategy):
            raise TypeError(f"expected geomkit Strategy objects, got {type(s).__name__}: {s!r}")
        if not (s.rule.uniform or s.rule.never_opposes):
            raise ValueError(
                f"shadow statistics need a uniform rule or one that never opposes r; {s!r} "
                "is neither"
            )
    home = forget[0].device
    g = _stack_on([kernels.gram(f, r) for f, r in zip(forget, retain, strict=True)], home)
    sizes = _sizes(forget, home)
    if shard_sum is not None:
        g = shard_sum(torch.cat([g, sizes[:, :1]], dim=1))
        g, sizes = g[:, :-1], torch.cat([g[:, -1:], sizes[:, 1:]], dim=1)
    ff_c, ff_a, rr_c, rr_a, fr_c, fr_a, n_conflict, n_nonzero = g.unbind(1)
    dots = torch.stack([ff_c + ff_a, rr_c + rr_a, fr_c + fr_a], dim=1)  # [T, 3]

    forms, projected = [], []
    for s in strategies:
        pooled = torch.stack(s.scope.pool(list(dots))) if s.rule.reduces else dots
        forms.append(s.linear_form(pooled))  # [T, 4]
        projected.append(s.projected(pooled))  # [T]
    form = torch.stack(forms)  # [S, T, 4]
    a_c, b_c, a_a, b_a = form.unbind(-1)  # each [S, T]
    moments = torch.stack(
        [
            torch.zeros_like(a_c),  # n_opposed
            (a_c * a_c * ff_c + 2 * a_c * b_c * fr_c + b_c * b_c * rr_c)
            + (a_a * a_a * ff_a + 2 * a_a * b_a * fr_a + b_a * b_a * rr_a),
            a_c * ff_c + b_c * fr_c + a_a * ff_a + b_a * fr_a,
            a_c * fr_c + b_c * rr_c + a_a * fr_a + b_a * rr_a,
        ],
        dim=-1,
    )  # [S, T, 4]: n_opposed, dd, df, dr
    uniform = [i for i, s in enumerate(strategies) if s.rule.uniform]
    if uniform:
        direct = [
            kernels.linear_moments(f, r, form[uniform, j, :2].to(f.device))
            for j, (f, r) in enumerate(zip(forget, retain, strict=True))
        ]  # T x [U, 4]
        direct = _stack_on(direct, home).transpose(0, 1)  # [U, T, 4]
        if shard_sum is not None:
            direct = shard_sum(direct)
        moments[uniform] = direct
    n_opposed, dd, df, dr = moments.unbind(-1)
    n_s, n_t = form.shape[0], form.shape[1]
    counts = torch.stack([n_conflict, n_nonzero], dim=1)  # [T, 2]
    return torch.cat(
        [
            dots.expand(n_s, n_t, 3),
            torch.stack([dd, df, dr], dim=-1),
            counts.expand(n_s, n_t, 2),
            n_opposed[..., None],
            sizes[:, :1].expand(n_s, n_t, 1),
            torch.stack(projected)[..., None],
            sizes[:, 1:].expand(n_s, n_t, 1),
        ],
        dim=-1,
    )


def to_numpy(statistics: Tensor) -> np.ndarray:
    """Move a statistics tensor to the host in one transfer, as a float64 NumPy array."""
    return statistics.detach().to("cpu", torch.float64).numpy()
