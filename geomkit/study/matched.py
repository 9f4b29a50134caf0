"""Matched forgetting: a run's evaluations read at given forget accuracies.

See docs/study.md#matched-forgetting.

Methods are compared at the same amount of forgetting, not at the same step: each run's
evaluation trajectory is linearly interpolated between the last evaluation above a
forget-accuracy target and the first at or below it, and every other metric is read at that
interpolated point. A run that never reaches a target is *censored* there: it is counted and
reported with the lowest forget accuracy it did reach, never silently dropped.

>>> from geomkit.study.matched import match
>>> trajectory = [(0, {"forget_acc": 0.9, "retain_acc": 1.0}),
...               (2, {"forget_acc": 0.5, "retain_acc": 0.9}),
...               (4, {"forget_acc": 0.1, "retain_acc": 0.7})]
>>> m = match(trajectory, [0.3, 0.05])
>>> m[0].step, round(m[0].values["retain_acc"], 6), m[0].reached
(3.0, 0.8, 0.1)
>>> m[1].censored, m[1].reached
(True, 0.1)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from geomkit._validation import check_real, invalid

__all__ = ["FORGET", "TARGETS", "Match", "match"]

TARGETS: tuple[float, ...] = (0.5, 0.25, 0.1)
"""The default forget-accuracy targets of a study."""

FORGET = "forget_acc"
"""The metric the targets are forget accuracies of."""


@dataclass(frozen=True)
class Match:
    """One run read at one forget-accuracy target.

    Attributes
    ----------
    target : float
        The forget accuracy sought.
    censored : bool
        True when no evaluation reached ``target`` (then ``step`` and ``values`` are NaN).
    step : float
        The interpolated step at which forget accuracy crossed ``target`` (0 when the first
        evaluation was already at or below it).
    reached : float
        The forget accuracy actually observed: that of the first evaluation at or below
        ``target`` (matched), or the lowest of the run (censored).
    bracket : tuple of int
        The steps of the two evaluations interpolated between (equal when not interpolated).
    values : dict
        Every metric of the trajectory, interpolated at ``step`` (the forget accuracy there is
        ``target`` by construction).
    """

    target: float
    censored: bool
    step: float
    reached: float
    bracket: tuple[int, int]
    values: dict[str, float] = field(default_factory=dict)


def match(
    trajectory: Sequence[tuple[int, Mapping[str, float]]],
    targets: Sequence[float] = TARGETS,
    metric: str = FORGET,
) -> list[Match]:
    """Read ``trajectory`` at each forget-accuracy target, by linear interpolation.

    Parameters
    ----------
    trajectory : sequence of (step, metrics)
        A run's evaluations in increasing step order, the target model's (step 0) first if
        known (:meth:`geomkit.results.RunResult.trajectory`).
    targets : sequence of float
        Forget accuracies in [0, 1].
    metric : str
        The metric the targets refer to (``forget_acc``).

    Returns
    -------
    list of Match
        One per target, in the order given.

    Raises
    ------
    ValueError
        On a target outside [0, 1], steps not increasing, or an evaluation without ``metric``.
    """
    targets = [check_real("targets", t, 0.0, 1.0, owner="match") for t in targets]
    steps = [int(step) for step, _ in trajectory]
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise invalid("trajectory", steps, "evaluations in increasing step order", owner="match")
    for step, metrics in trajectory:
        value = metrics.get(metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise invalid(
                "trajectory",
                f"step {step}: {metric}={value!r}",
                f"a finite {metric} at every evaluation",
                owner="match",
            )
    return [_one(trajectory, t, metric) for t in targets]


def _one(
    trajectory: Sequence[tuple[int, Mapping[str, float]]], target: float, metric: str
) -> Match:
    names = sorted({k for _, m in trajectory for k in m})
    nan = {k: math.nan for k in names}
    if not trajectory:
        return Match(target, True, math.nan, math.nan, (0, 0), nan)
    for i, (step, metrics) in enumerate(trajectory):
        if metrics[metric] > target:
            continue
        if i == 0:  # already at or below the target when first evaluated
            values = {k: float(metrics.get(k, math.nan)) for k in names}
            return Match(target, False, float(step), float(metrics[metric]), (step, step), values)
        before_step, before = trajectory[i - 1]
        w = (before[metric] - target) / (before[metric] - metrics[metric])
        values = {
            k: (1 - w) * float(before.get(k, math.nan)) + w * float(metrics.get(k, math.nan))
            for k in names
        }
        values[metric] = target
        point = before_step + w * (step - before_step)
        return Match(target, False, point, float(metrics[metric]), (before_step, step), values)
    lowest = min(float(m[metric]) for _, m in trajectory)
    last = int(trajectory[-1][0])
    return Match(target, True, math.nan, lowest, (last, last), nan)
