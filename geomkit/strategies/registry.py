"""Names for the CLI and configuration files, each mapped onto a rule x scope composition."""

from __future__ import annotations

from collections.abc import Callable

from geomkit._validation import check_choice
from geomkit.strategies.base import Global, PerTensor, Rule, Scope, Strategy
from geomkit.strategies.rules import BLUR, SAGO, PCGrad, SAGOPreferRetain, Sum

__all__ = ["as_strategy", "build", "names", "register", "registered_name"]

_REGISTRY: dict[str, tuple[Callable[[], Rule], Callable[[], Scope] | None]] = {}


def _same_factory(old: Callable | None, new: Callable | None) -> bool:
    """Whether two rule (or scope) factories mean the same thing.

    The same object, or a re-definition of it (same module and qualified name, as when a
    notebook cell defining the class runs again) that builds an object of the same class
    (module and qualified name) with the same attributes. Lambdas and ``functools.partial``
    objects share no distinguishing name, so for them the built objects decide.
    """
    if old is new:
        return True
    if old is None or new is None:
        return False
    key = ("__module__", "__qualname__")
    if any(getattr(old, k, None) != getattr(new, k, None) for k in key):
        return False
    built_old, built_new = old(), new()
    kind = lambda obj: (type(obj).__module__, type(obj).__qualname__)  # noqa: E731
    return kind(built_old) == kind(built_new) and vars(built_old) == vars(built_new)


def register(name: str, rule: Callable[[], Rule], scope: Callable[[], Scope] | None) -> None:
    """Register ``name`` as the composition of ``rule()`` with ``scope()`` (or no scope).

    Registering a name again with the same rule and scope is a no-op (a re-run notebook cell;
    a class re-defined under the same qualified name replaces the old one). A name that would
    change meaning (another rule or scope) raises ``ValueError``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"invalid strategy name={name!r}: expected a Python identifier")
    if not callable(rule):
        raise TypeError(f"invalid rule={rule!r}: expected a Rule class (or factory)")
    if scope is not None and not callable(scope):
        raise TypeError(f"invalid scope={scope!r}: expected a Scope class (or factory) or None")
    if name in _REGISTRY:
        old_rule, old_scope = _REGISTRY[name]
        if not (_same_factory(old_rule, rule) and _same_factory(old_scope, scope)):
            raise ValueError(
                f"strategy {name!r} is already registered as "
                f"{_describe(old_rule, old_scope)}; registering it as "
                f"{_describe(rule, scope)} would change its meaning (choose another name)"
            )
    _REGISTRY[name] = (rule, scope)


def _describe(rule: Callable, scope: Callable | None) -> str:
    def named(f: Callable) -> str:
        return getattr(f, "__qualname__", repr(f))

    return named(rule) + (f" x {named(scope)}" if scope is not None else "")


def names() -> list[str]:
    """Return the registered strategy names, in registration order."""
    return list(_REGISTRY)


def registered_name(rule: Rule, scope: Scope | None) -> str | None:
    """The first registered name composing an equal ``rule`` and ``scope``, else ``None``."""
    for name, (rule_factory, scope_factory) in _REGISTRY.items():
        if (scope_factory is None) != (scope is None):
            continue
        if rule_factory() == rule and (scope_factory is None or scope_factory() == scope):
            return name
    return None


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
    check_choice("strategy", name, names())
    rule, scope = _REGISTRY[name]
    return Strategy(rule(), scope() if scope else None, alpha=alpha, gamma=gamma, name=name)


def as_strategy(value: Strategy | str, alpha: float = 1.0, gamma: float = 1.0) -> Strategy:
    """A :class:`Strategy` from a registered name (weighted by ``alpha`` and ``gamma``) or a
    :class:`Strategy` itself (returned as is: it carries its own weights, and ``alpha`` and
    ``gamma`` must then be left at 1.0 or equal them).

    The one place where the API accepts "a strategy": names come from the CLI and
    configuration files, objects from Python.
    """
    if isinstance(value, Strategy):
        for name, given, own in (("alpha", alpha, value.alpha), ("gamma", gamma, value.gamma)):
            if given != 1.0 and given != own:
                raise ValueError(
                    f"invalid {name}={given!r}: the strategy {value} carries {name}={own!r}; "
                    f"set the weights on the Strategy (or leave {name}=1.0)"
                )
        return value
    if isinstance(value, str):
        return build(value, alpha=alpha, gamma=gamma)
    raise TypeError(
        f"invalid strategy={value!r}: expected a Strategy or one of the names {names()}"
    )


register("sum", Sum, None)
register("pcgrad", PCGrad, PerTensor)
register("pcgrad_global", PCGrad, Global)
register("sago", SAGO, None)
register("sago_prefer_retain", SAGOPreferRetain, None)
register("blur", BLUR, Global)
