"""Names for the CLI and configuration files, each mapped onto a rule x scope composition."""

from __future__ import annotations

from collections.abc import Callable

from geomkit.strategies.base import Global, PerTensor, Rule, Scope, Strategy
from geomkit.strategies.rules import BLUR, SAGO, PCGrad, SAGOPreferRetain, Sum

__all__ = ["build", "names", "register"]

_REGISTRY: dict[str, tuple[Callable[[], Rule], Callable[[], Scope] | None]] = {}


def register(name: str, rule: Callable[[], Rule], scope: Callable[[], Scope] | None) -> None:
    """Register ``name`` as the composition of ``rule()`` with ``scope()`` (or no scope)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"strategy names must be identifiers, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"strategy {name!r} is already registered")
    _REGISTRY[name] = (rule, scope)


def names() -> list[str]:
    """Return the registered strategy names, in registration order."""
    return list(_REGISTRY)


def build(name: str, alpha: float = 1.0, gamma: float = 1.0) -> Strategy:
    """Build a registered strategy.

    Parameters
    ----------
    name : str
        One of :func:`names`: ``sum``, ``pcgrad``, ``pcgrad_global``, ``sago``,
        ``sago_prefer_retain``, ``blur``.
    alpha : float
        Weight of the retain gradient (>= 0).
    gamma : float
        Weight of the forget gradient (>= 0).

    Examples
    --------
    >>> import torch
    >>> from geomkit.strategies import build
    >>> pcgrad = build("pcgrad", alpha=0.5)
    >>> pcgrad.rule, pcgrad.scope, pcgrad.alpha, pcgrad.gamma
    (PCGrad(), PerTensor(), 0.5, 1.0)
    >>> f, r = torch.tensor([-1.0, 1.0]), torch.tensor([1.0, 0.0])  # <f, r> < 0: f is projected
    >>> pcgrad([f], [r])  # f - <f,r>/|r|^2 r = (0, 1), plus 0.5 r
    [tensor([0.5000, 1.0000])]
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; valid names are: {', '.join(names())}")
    rule, scope = _REGISTRY[name]
    return Strategy(rule(), scope() if scope else None, alpha=alpha, gamma=gamma, name=name)


register("sum", Sum, None)
register("pcgrad", PCGrad, PerTensor)
register("pcgrad_global", PCGrad, Global)
register("sago", SAGO, None)
register("sago_prefer_retain", SAGOPreferRetain, None)
register("blur", BLUR, Global)
