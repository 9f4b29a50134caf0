"""Grouping runs into methods (objective x strategy), with seeds as replicates."""

from __future__ import annotations

from geomkit.plot._data import Run
from geomkit.plot.style import STRATEGY_STYLES, strategy_style

__all__ = ["group_methods", "method_label"]


def _order(method: tuple[str, str]) -> tuple:
    objective, strategy = method
    names = list(STRATEGY_STYLES)
    return (objective, names.index(strategy) if strategy in names else len(names), strategy)


def group_methods(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """Runs grouped by ``(objective, applied strategy)`` (``"none"`` for forget-only runs),
    sorted by objective then in the order of :data:`~geomkit.plot.style.STRATEGY_STYLES`.

    Runs of one method (typically different seeds) are treated as replicates.
    """
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault(run.method, []).append(run)
    return {key: groups[key] for key in sorted(groups, key=_order)}


def method_label(method: tuple[str, str], with_objective: bool, n: int = 1) -> str:
    """``"SAGO"``, or ``"graddiff + SAGO"`` with the objective; ``(n=3)`` when several seeds
    are averaged."""
    objective, strategy = method
    label = strategy_style(strategy).label
    if with_objective:
        label = objective if strategy == "none" else f"{objective} + {label}"
    return f"{label} (n={n})" if n > 1 else label
