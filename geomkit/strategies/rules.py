"""The combination rules (docs/method.md#strategies; semantics of the released SAGO code).

Notation: forget gradient ``f``, retain gradient ``r``, update ``d``; ``alpha`` weighs the retain
gradient, ``gamma`` the forget gradient; C is the set of coordinates with
``sign(f_i) sign(r_i) < 0`` (zeros never conflict), A the rest.
"""

from __future__ import annotations

import torch
from torch import Tensor

from geomkit import kernels
from geomkit.strategies.base import EPSILON, Rule

__all__ = ["Sum", "PCGrad", "BLUR", "SAGO", "SAGOPreferRetain"]


def _false(like: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.bool, device=like.device)


def _zero(like: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.float64, device=like.device)


def _form(a_c: Tensor, b_c: Tensor, a_a: Tensor, b_a: Tensor) -> Tensor:
    return torch.stack(torch.broadcast_tensors(a_c, b_c, a_a, b_a), dim=-1)


class Sum(Rule):
    """Plain weighted sum, ``d = gamma f + alpha r`` (GradDiff's combined gradient)."""

    label = "sum"

    def linear_form(self, dots: Tensor, alpha: float, gamma: float) -> Tensor:
        a = torch.full(dots.shape[:-1], gamma, dtype=torch.float64, device=dots.device)
        b = torch.full_like(a, alpha)
        return _form(a, b, a, b)

    def apply(self, f, r, out, dots, alpha, gamma):
        zero, no = _zero(f), _false(f)
        return kernels.combine_linear(
            f, r, out, alpha=alpha, gamma=gamma, c=zero, fire_c=no, k=zero, fire_k=no
        )


class PCGrad(Rule):
    """One-sided PCGrad as released with SAGO: only the forget gradient is ever projected.

    If ``<f, r> < 0``: ``f <- f - <f,r> / (||r||^2 + 1e-10) r``; then ``d = gamma f + alpha r``.
    This is the one-sided variant used by the SAGO paper (Xiao et al., ACL 2026), not the
    symmetric multi-task PCGrad of Yu et al. (NeurIPS 2020), which projects every task.
    The dot products are pooled by the strategy's scope (per tensor or global).
    """

    label = "pcgrad"

    reduces = True

    @staticmethod
    def coefficient(dots: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(c, fired)``: ``c = <f,r>/(||r||^2 + 1e-10)`` where ``<f,r> < 0``, else 0."""
        rr, fr = dots[..., 1], dots[..., 2]
        fired = fr < 0
        c = torch.where(fired, fr / (rr + EPSILON), torch.zeros_like(fr))
        return c, fired

    def linear_form(self, dots: Tensor, alpha: float, gamma: float) -> Tensor:
        c, _ = self.coefficient(dots)
        a = torch.full_like(c, gamma)
        b = alpha - gamma * c
        return _form(a, b, a, b)

    def projected(self, dots: Tensor) -> Tensor:
        return self.coefficient(dots)[1].to(torch.float64)

    def apply(self, f, r, out, dots, alpha, gamma):
        c, fired = self.coefficient(dots)
        zero, no = _zero(f), _false(f)
        return kernels.combine_linear(
            f, r, out, alpha=alpha, gamma=gamma, c=c, fire_c=fired, k=zero, fire_k=no
        )


class BLUR(Rule):
    """Forget-prioritised projection of the retain gradient (after Reisizadeh et al., EACL 2026).

    Unconditionally ``r <- r - <r,f> / (||f||^2 + 1e-10) f``; then ``d = gamma f + alpha r``.
    Used at global scope in the SAGO paper's comparison (Table 2).
    """

    label = "blur"

    reduces = True

    @staticmethod
    def coefficient(dots: Tensor) -> Tensor:
        """Return ``k = <r,f> / (||f||^2 + 1e-10)``."""
        return dots[..., 2] / (dots[..., 0] + EPSILON)

    def linear_form(self, dots: Tensor, alpha: float, gamma: float) -> Tensor:
        k = self.coefficient(dots)
        a = gamma - alpha * k
        b = torch.full_like(k, alpha)
        return _form(a, b, a, b)

    def projected(self, dots: Tensor) -> Tensor:
        return torch.ones(dots.shape[:-1], dtype=torch.float64, device=dots.device)

    def apply(self, f, r, out, dots, alpha, gamma):
        k = self.coefficient(dots)
        zero, no = _zero(f), _false(f)
        yes = torch.ones((), dtype=torch.bool, device=f.device)
        return kernels.combine_linear(
            f, r, out, alpha=alpha, gamma=gamma, c=zero, fire_c=no, k=k, fire_k=yes
        )


class SAGO(Rule):
    """Sign-aligned selection of SAGO (Xiao et al., ACL 2026), coordinate-wise.

    On conflicting coordinates (``sign(f_i) sign(r_i) < 0``) ``d_i = alpha r_i``; elsewhere
    ``d_i = gamma f_i`` (the retain gradient is dropped there). Zeros never conflict.
    """

    label = "sago"

    prefer_retain = False
    uniform = False
    # R6: d_i r_i = alpha r_i^2 on C, gamma f_i r_i (+ alpha r_i^2) >= 0 on A.
    never_opposes = True

    def linear_form(self, dots: Tensor, alpha: float, gamma: float) -> Tensor:
        zero = torch.zeros(dots.shape[:-1], dtype=torch.float64, device=dots.device)
        b_a = zero + (alpha if self.prefer_retain else 0.0)
        return _form(zero, zero + alpha, zero + gamma, b_a)

    def apply(self, f, r, out, dots, alpha, gamma):
        return kernels.combine_select(
            f, r, out, alpha=alpha, gamma=gamma, prefer_retain=self.prefer_retain
        )


class SAGOPreferRetain(SAGO):
    """SAGO variant that keeps the retain gradient on agreeing coordinates.

    Conflict -> ``alpha r_i``; otherwise ``gamma f_i + alpha r_i`` (released code's
    ``sago_prefer_retain``).
    """

    label = "sago_prefer_retain"

    prefer_retain = True
