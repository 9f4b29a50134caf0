"""The two axes of a combination strategy: the *rule* and the *scope*, and their composition.

A rule turns a forget gradient ``f`` and a retain gradient ``r`` into one update ``d``. Every rule
in geomkit forms ``d`` coordinate-wise as ``a f + b r``, with ``(a, b)`` constant on the
conflicting coordinates C (``sign(f_i) sign(r_i) < 0``) and constant on the rest A; rules that
project need dot products to find their coefficient. The scope decides over which set of
coordinates those dot products are pooled: one parameter tensor (:class:`PerTensor`) or the whole
model (:class:`Global`). A :class:`Strategy` composes one rule with one scope and the task
weights ``alpha`` (retain) and ``gamma`` (forget).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from geomkit import kernels
from geomkit._validation import check_out, check_pair, check_weight, invalid, zero_d

__all__ = ["Rule", "Scope", "PerTensor", "Global", "Strategy", "EPSILON", "tensor_dots"]

EPSILON: float = 1e-10
"""The constant added to squared norms in projection denominators (as in the released code)."""


def _snake(name: str) -> str:
    """``PerTensor`` -> ``per_tensor``, ``MyRule2`` -> ``my_rule2`` (the default labels)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class _Labelled:
    """A class-level ``label``: the snake-case class name unless the class sets one."""

    label: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "label" not in cls.__dict__:
            cls.label = _snake(cls.__name__)


# --------------------------------------------------------------------------------------------
# Scope
# --------------------------------------------------------------------------------------------


class Scope(_Labelled, ABC):
    """How the dot products a projection rule needs are pooled across parameter tensors.

    ``label`` (class attribute) names the scope in composed strategy labels; by default the
    snake-case class name (``per_tensor``, ``global``).
    """

    @abstractmethod
    def pool(self, dots: Sequence[Tensor]) -> list[Tensor]:
        """Map per-tensor ``[<f,f>, <r,r>, <f,r>]`` vectors to the vectors each tensor uses."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


class PerTensor(Scope):
    """Each parameter tensor uses its own dot products (the released code's "module-wise")."""

    def pool(self, dots: Sequence[Tensor]) -> list[Tensor]:
        return list(dots)


class Global(Scope):
    """All tensors share the dot products of the concatenated model gradient.

    The sum is formed from per-tensor partial sums; no flattened copy of the model is made.
    """

    def pool(self, dots: Sequence[Tensor]) -> list[Tensor]:
        home = dots[0].device
        total = torch.stack([d.to(home) for d in dots]).sum(0)
        return [total.to(d.device) for d in dots]


def tensor_dots(
    forget: Sequence[Tensor],
    retain: Sequence[Tensor],
    shard_sum: Callable[[Tensor], Tensor] | None = None,
) -> list[Tensor]:
    """Per-tensor ``[<f,f>, <r,r>, <f,r>]`` (float64, on each tensor's device), summed over
    shards by ``shard_sum`` (see :meth:`Strategy.pooled_dots`), before any scope pools them.

    >>> tensor_dots([torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 0.0])])[0].tolist()
    [5.0, 9.0, 3.0]
    """
    dots = [kernels.dot_products(f, r) for f, r in zip(forget, retain, strict=True)]
    if shard_sum is not None:
        home = dots[0].device
        summed = shard_sum(torch.stack([d.to(home) for d in dots])).unbind(0)
        dots = [d.to(t.device) for d, t in zip(summed, forget, strict=True)]
    return dots


# --------------------------------------------------------------------------------------------
# Rule
# --------------------------------------------------------------------------------------------


class Rule(_Labelled, ABC):
    """A coordinate-wise combination rule ``d = a f + b r`` (constants on C and on A).

    ``label`` (class attribute) names the rule in composed strategy labels; by default the
    snake-case class name.
    """

    reduces: bool = False
    """Whether the rule needs dot products (and therefore a scope)."""

    uniform: bool = True
    """Whether ``d = a f + b r`` with one ``(a, b)`` for every coordinate of a tensor (sum and
    projections); sign rules have one ``(a, b)`` on C and another on A."""

    never_opposes: bool = False
    """Whether ``d_i r_i >= 0`` holds for every coordinate by construction when
    ``alpha, gamma >= 0`` (docs/theory.md#r6, proved for the sign rules). Shadow statistics then
    record ``n_opposed = 0`` without a counting pass; the applied update is always measured."""

    @abstractmethod
    def linear_form(self, dots: Tensor, alpha: float, gamma: float) -> Tensor:
        """Return ``(a_C, b_C, a_A, b_A)`` in float64, shape ``dots.shape[:-1] + (4,)``.

        ``dots`` holds pooled ``[<f,f>, <r,r>, <f,r>]`` in its last dimension (ignored by rules
        that do not reduce).
        """

    def projected(self, dots: Tensor) -> Tensor:
        """Return 1.0 where the rule's projection fired, else 0.0 (float64, ``dots.shape[:-1]``)."""
        return torch.zeros(dots.shape[:-1], dtype=torch.float64, device=dots.device)

    @abstractmethod
    def apply(
        self, f: Tensor, r: Tensor, out: Tensor, dots: Tensor | None, alpha: Tensor, gamma: Tensor
    ) -> Tensor:
        """Write the combined update of one tensor pair into ``out`` and return it.

        ``out`` may be ``f`` itself: the engine writes the update into the forget buffer
        (docs/method.md#engine-loop), so an implementation must read every coordinate of ``f``
        and ``r`` it needs before overwriting it (the kernels of :mod:`geomkit.kernels` do).
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))


# --------------------------------------------------------------------------------------------
# Strategy = rule x scope x weights
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=True)
class Strategy:
    """A combination strategy: one :class:`Rule` composed with one :class:`Scope`.

    Parameters
    ----------
    rule : Rule
        The coordinate-wise rule (e.g. :class:`~geomkit.strategies.SAGO`).
    scope : Scope or None
        Where projection rules pool their dot products; must be ``None`` for rules that need no
        dot products (sum, SAGO).
    alpha : float
        Weight of the retain gradient, >= 0.
    gamma : float
        Weight of the forget gradient, >= 0.
    name : str or None
        Its label: the registry name when built by :func:`geomkit.strategies.build`, or one you
        choose. Not part of equality.

    Calling the strategy on two equal-length sequences of tensors ``(forget, retain)``, one per
    parameter, returns the list of combined tensors, or writes them into ``out``.

    ``str(strategy)`` is its short label, used as the store's ``strategy`` coordinate and in
    legends: ``name`` if set, else the registered name of the same rule and scope (so
    ``str(Strategy(SAGO())) == "sago"``), else ``"<rule>/<scope>"`` from the classes' ``label``
    (``str(Strategy(BLUR(), PerTensor())) == "blur/per_tensor"``). The weights are not part
    of the label: they are run attributes (:class:`~geomkit.recorder.Recorder` adds them to
    the label of a shadow whose weights differ from the applied strategy's).
    """

    rule: Rule
    scope: Scope | None = None
    alpha: float = 1.0
    gamma: float = 1.0
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.rule, Rule):
            raise invalid("rule", self.rule, "a geomkit Rule", owner="Strategy", error=TypeError)
        if self.rule.reduces and not isinstance(self.scope, Scope):
            raise invalid(
                "scope",
                self.scope,
                f"PerTensor() or Global() ({self.rule!r} projects and needs a scope)",
                owner="Strategy",
            )
        if not self.rule.reduces and self.scope is not None:
            raise invalid(
                "scope",
                self.scope,
                f"None ({self.rule!r} is coordinate-wise and takes no scope)",
                owner="Strategy",
            )
        object.__setattr__(self, "alpha", check_weight("alpha", self.alpha))
        object.__setattr__(self, "gamma", check_weight("gamma", self.gamma))
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise ValueError(f"invalid name={self.name!r}: expected a non-empty string or None")

    def __repr__(self) -> str:
        scope = f", scope={self.scope!r}" if self.scope is not None else ""
        return f"Strategy({self.rule!r}{scope}, alpha={self.alpha!r}, gamma={self.gamma!r})"

    def __str__(self) -> str:
        if self.name is not None:
            return self.name
        from geomkit.strategies.registry import registered_name

        registered = registered_name(self.rule, self.scope)
        if registered is not None:
            return registered
        rule = type(self.rule).label
        return rule if self.scope is None else f"{rule}/{type(self.scope).label}"

    # -- the combination ---------------------------------------------------------------------

    def pooled_dots(
        self,
        forget: Sequence[Tensor],
        retain: Sequence[Tensor],
        shard_sum: Callable[[Tensor], Tensor] | None = None,
        *,
        dots: Sequence[Tensor] | None = None,
    ) -> list[Tensor]:
        """Per-tensor ``[<f,f>, <r,r>, <f,r>]`` (float64, on each tensor's device), pooled by
        the scope. Only defined for rules that reduce (projections).

        ``shard_sum`` turns shard-local sums into whole-tensor sums when each process holds a
        shard of every gradient (FSDP / ZeRO-3): it receives the ``[n_tensors, 3]`` stack and
        must return its sum over processes (one all-reduce for all tensors). ``dots``: the
        output of :func:`tensor_dots` for the same arguments, when already computed (several
        strategies on the same gradients).
        """
        if not self.rule.reduces:
            raise ValueError(f"{self.rule!r} is coordinate-wise and pools no dot products")
        if dots is None:
            dots = tensor_dots(forget, retain, shard_sum)
        return self.scope.pool(dots)

    @torch.no_grad()
    def __call__(
        self,
        forget: Sequence[Tensor],
        retain: Sequence[Tensor],
        *,
        out: Sequence[Tensor] | None = None,
        shard_sum: Callable[[Tensor], Tensor] | None = None,
    ) -> list[Tensor]:
        """Combine ``forget`` and ``retain`` (one tensor per parameter) into one update.

        Parameters
        ----------
        forget, retain : sequence of Tensor
            Matching floating-point tensors (same shape, dtype and device pairwise). They are
            never modified (unless also passed as ``out``).
        out : sequence of Tensor, optional
            Tensors to write the result into (e.g. the parameters' ``.grad``); nothing is
            allocated for the result then.
        shard_sum : callable, optional
            For sharded gradients (each process holds a shard of every tensor): sums the
            ``[n_tensors, 3]`` dot products over processes, so that projections use the
            whole tensor's dot products, not the shard's (see :meth:`pooled_dots`).

        Returns
        -------
        list of Tensor
            The combined update, in the inputs' dtype (arithmetic in at least float32).
        """
        forget, retain = check_pair(forget, retain)
        outs = check_out(out, forget) if out is not None else [torch.empty_like(f) for f in forget]
        dots = (
            self.pooled_dots(forget, retain, shard_sum)
            if self.rule.reduces
            else [None] * len(forget)
        )
        weights: dict[torch.device, tuple[Tensor, Tensor]] = {}
        for f, r, o, dot in zip(forget, retain, outs, dots, strict=True):
            if f.device not in weights:
                weights[f.device] = (zero_d(self.alpha, f), zero_d(self.gamma, f))
            alpha, gamma = weights[f.device]
            self.rule.apply(f, r, o, dot, alpha, gamma)
        return outs

    @torch.no_grad()
    def combine_tensor(self, f: Tensor, r: Tensor, out: Tensor, dots: Tensor | None) -> Tensor:
        """Form the update of one tensor pair into ``out``, exactly as :meth:`__call__` does.

        Parameters
        ----------
        f, r : Tensor
            One forget / retain tensor pair.
        out : Tensor
            Receives the update; may be ``f`` itself (every registered rule reads a coordinate
            before writing it).
        dots : Tensor or None
            This tensor's entry of :meth:`pooled_dots` (computed for all tensors first, before
            any ``out`` aliasing ``f`` is written); None for rules that do not reduce.

        Returns
        -------
        Tensor
            ``out``: bit-identical to the same tensor of ``strategy(forget, retain)``.
        """
        if self.rule.reduces and dots is None:
            raise invalid("dots", None, f"the pooled dot products {self.rule!r} projects with")
        alpha, gamma = zero_d(self.alpha, f), zero_d(self.gamma, f)
        return self.rule.apply(f, r, out, dots if self.rule.reduces else None, alpha, gamma)

    # -- for statistics ----------------------------------------------------------------------

    def linear_form(self, dots: Tensor) -> Tensor:
        """``(a_C, b_C, a_A, b_A)`` per tensor from pooled dots ``[..., 3]`` (float64)."""
        return self.rule.linear_form(dots, self.alpha, self.gamma)

    def projected(self, dots: Tensor) -> Tensor:
        """1.0 where this strategy's projection fires, from pooled dots ``[..., 3]``."""
        return self.rule.projected(dots)
