"""What a figure needs of its runs (:mod:`geomkit.runs` turns what users pass into runs)."""

from __future__ import annotations

from collections.abc import Iterable

from geomkit._validation import invalid
from geomkit.fields import OPTIONAL_FIELDS, STORED_FIELDS
from geomkit.plot.style import MissingVariable, PlotSkipped
from geomkit.runs import Run, Source, load
from geomkit.store import EVALUATION_VARIABLES

__all__ = ["EVALUATIONS", "GEOMETRY", "Run", "Source", "require", "single_run"]

GEOMETRY: tuple[str, ...] = tuple(n for n in STORED_FIELDS if n not in OPTIONAL_FIELDS)
"""The recorded statistics every geometry figure needs (the optional audit fields, absent from
older stores, are not among them)."""

EVALUATIONS: tuple[str, ...] = EVALUATION_VARIABLES
"""The evaluation variables (:data:`geomkit.store.EVALUATION_VARIABLES`)."""


def single_run(source: Source, run: str | int | None = None) -> Run:
    """The one run a single-run figure draws; ``run`` (label or index) picks among several."""
    runs = load(source)
    if run is None:
        if len(runs) > 1:
            raise invalid(
                "run",
                run,
                "one of " + ", ".join(r.label for r in runs) + f" (this figure shows one run; "
                f"{len(runs)} were given)",
            )
        return runs[0]
    if isinstance(run, int) and not isinstance(run, bool):
        if not -len(runs) <= run < len(runs):
            raise invalid("run", run, f"an index in [{-len(runs)}, {len(runs) - 1}] or a label")
        return runs[run]
    for candidate in runs:
        if candidate.label == run:
            return candidate
    raise invalid("run", run, "one of " + ", ".join(r.label for r in runs))


def require(run: Run, names: Iterable[str], figure: str) -> None:
    """Raise :class:`MissingVariable` / :class:`PlotSkipped` unless ``run`` has data for
    ``names`` (present, and a non-empty dimension)."""
    for name in names:
        if name not in run.ds.variables:
            raise MissingVariable(
                name, f"{figure} needs variable {name!r}, which run {run.label!r} does not have"
            )
        empty = [d for d in run.ds[name].dims if run.ds.sizes[d] == 0]
        if empty:
            raise PlotSkipped(
                f"{figure}: variable {name!r} of run {run.label!r} has no data "
                f"(empty dimension {empty[0]!r})"
            )


def require_geometry(run: Run, figure: str) -> None:
    """Like :func:`require` for the recorded geometry statistics."""
    require(run, GEOMETRY, figure)


def require_strategies(run: Run, names: Iterable[str], figure: str) -> None:
    """Raise :class:`MissingVariable` unless every strategy in ``names`` was recorded."""
    have = [str(s) for s in run.ds["strategy"].values] if "strategy" in run.ds.dims else []
    for name in names:
        if name not in have:
            raise MissingVariable(
                name,
                f"{figure} needs strategy {name!r}, which run {run.label!r} did not record "
                f"(recorded: {have}); record it as a shadow strategy",
            )
