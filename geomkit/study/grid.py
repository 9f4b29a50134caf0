"""The run grid of a study: objective x strategy x learning rate x steps x seed.

See docs/study.md#sweep.

A :class:`Sweep` is a base :class:`~geomkit.config.RunConfig` (every setting the runs share)
and the values each grid axis takes; :meth:`Sweep.runs` lists one :class:`SweepRun` per
combination, each a ``geomkit run`` of one strategy and one seed, written to
``out/<name>``. Within a seed every strategy and learning rate sees the same batches, so
comparisons across strategies are paired.

>>> from geomkit.config import RunConfig
>>> sweep = Sweep(RunConfig(), objectives=["graddiff"], strategies=["sum", "sago"],
...               lrs=[1e-3, 3e-3], steps=[60], seeds=[0, 1])
>>> len(sweep.runs()), sweep.runs()[0].name
(8, 'graddiff-sum-lr0.001-steps60-seed0')
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geomkit._validation import ConfigError
from geomkit.config import RunConfig

__all__ = ["SWEEP_FILE", "Sweep", "SweepRun"]

SWEEP_FILE = "sweep.json"
"""The file in a sweep's directory holding its :class:`Sweep` (base configuration and axes)."""

AXES: tuple[str, ...] = ("objectives", "strategies", "lrs", "steps", "seeds")
"""The grid's axes (:meth:`Sweep.runs` nests objectives, seeds, lrs, steps, strategies)."""


@dataclass(frozen=True)
class SweepRun:
    """One point of the grid: a run of one objective, strategy, learning rate, length, seed."""

    objective: str
    strategy: str
    lr: float
    steps: int
    seed: int

    @property
    def name(self) -> str:
        """The run directory's name, e.g. ``graddiff-sago-lr0.003-steps60-seed0``."""
        return f"{self.objective}-{self.strategy}-lr{self.lr!r}-steps{self.steps}-seed{self.seed}"

    def config(self, base: RunConfig, out: str | os.PathLike) -> RunConfig:
        """``base`` narrowed to this run (:meth:`RunConfig.for_seed`), written to
        ``out/<name>``."""
        return dataclasses.replace(
            base.for_seed(self.seed),
            objective=self.objective,
            strategies=[self.strategy],
            lr=self.lr,
            steps=self.steps,
            out=str(out),
            name=self.name,
        )

    def flags(self) -> list[str]:
        """The ``geomkit run`` flags that select this run."""
        return [
            *("--objective", self.objective, "--strategy", self.strategy),
            *("--lr", repr(self.lr), "--steps", str(self.steps), "--seed", str(self.seed)),
            *("--name", self.name),
        ]


@dataclass
class Sweep:
    """A base configuration and the values of each grid axis.

    Parameters
    ----------
    base : RunConfig
        The settings every run shares (its own objective, strategies, lr, steps and seeds are
        replaced by the axes).
    objectives, strategies, lrs, steps, seeds : list
        The axes; each non-empty and without repeats.
    """

    base: RunConfig
    objectives: list[str]
    strategies: list[str]
    lrs: list[float]
    steps: list[int]
    seeds: list[int]

    def __post_init__(self) -> None:
        for axis in AXES:
            values = list(getattr(self, axis))
            if not values:
                raise ConfigError(f"invalid {axis}=[]: expected at least one value")
            if len(set(values)) != len(values):
                raise ConfigError(f"invalid {axis}={values!r}: expected distinct values")
            setattr(self, axis, values)
        self.lrs = [float(lr) for lr in self.lrs]
        for objective in self.objectives:
            dataclasses.replace(self.base, objective=objective).validate()
        for strategy in self.strategies:
            dataclasses.replace(self.base, strategies=[strategy]).validate()
        for lr in self.lrs:
            dataclasses.replace(self.base, lr=lr).validate()
        for steps in self.steps:
            dataclasses.replace(self.base, steps=steps).validate()
        dataclasses.replace(self.base, seeds=self.seeds).validate()

    def runs(self) -> list[SweepRun]:
        """Every run of the grid: objectives, then seeds, learning rates, steps, strategies."""
        grid = itertools.product(self.objectives, self.seeds, self.lrs, self.steps, self.strategies)
        return [SweepRun(o, s, lr, n, seed) for o, seed, lr, n, s in grid]

    def to_dict(self) -> dict[str, Any]:
        """The sweep as JSON-serialisable data (what :data:`SWEEP_FILE` holds)."""
        return {"base": self.base.to_dict(), **{axis: getattr(self, axis) for axis in AXES}}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Sweep:
        """The inverse of :meth:`to_dict`."""
        return cls(RunConfig(**values["base"]), **{axis: values[axis] for axis in AXES})

    def save(self, out: str | os.PathLike) -> Path:
        """Write :data:`SWEEP_FILE` into ``out``; its path."""
        path = Path(out) / SWEEP_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, out: str | os.PathLike) -> Sweep:
        """The sweep saved in ``out``; ConfigError when there is none or it is damaged."""
        path = Path(out) / SWEEP_FILE
        if not path.is_file():
            raise ConfigError(f"invalid out={str(out)!r}: expected a sweep directory ({path})")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{path} is damaged: {error}") from None

    def differences(self, other: Sweep) -> list[str]:
        """What keeps ``other`` from continuing this sweep: the shared settings it changes, and
        the axes from which it drops a value (an axis may grow: more seeds, more learning rates
        extend a sweep; the runs already made stay valid)."""
        mine, theirs = self.to_dict(), other.to_dict()
        base = [k for k in mine["base"] if mine["base"][k] != theirs["base"].get(k)]
        base = [k for k in base if k not in ("out", "threads", "jobs", "cache_dir")]
        return base + [axis for axis in AXES if not set(mine[axis]) <= set(theirs[axis])]
