"""The outcome of one unlearning run: :class:`RunResult`, saved as the run's ``metrics.json``.

See docs/method.md#embedded-benchmark. ``geomkit run`` writes it last, in one atomic step, so
a run directory holds a ``metrics.json`` exactly when the run finished (``geomkit sweep``
resumes on that basis: a directory without one is a half-written run and is redone).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["METRICS_FILE", "RunResult", "is_finished"]

METRICS_FILE = "metrics.json"
"""The file of a run directory holding its :class:`RunResult`."""


@dataclass
class RunResult:
    """What one run measured, besides its geometry store.

    Attributes
    ----------
    run : str
        The run directory's name.
    objective, strategy : str
        The unlearning objective and the applied strategy.
    seed : int
        The run's seed (batch order, and any randomness of the objective).
    lr : float
        The peak learning rate.
    seconds : float
        Wall time of the unlearning loop (evaluations included, pretraining not).
    losses : list of dict
        One entry per optimizer step: ``step`` (1-based), ``forget_loss``, ``retain_loss``,
        ``grad_norm``.
    history : list of dict
        One entry per evaluation after step 0: ``step`` and the evaluation's metrics.
    before : dict or None
        The target model's evaluation (step 0); None without an evaluation.
    final, recovery, matched_forgetting, pretrain : dict or None
        The last evaluation, its ratio to ``before``, the first evaluation at or below the
        configuration's forget-accuracy threshold (None if never), and the target model's
        provenance (embedded benchmark only).
    relearn : dict or None
        With ``relearn`` steps configured: :data:`geomkit.bench.relearn.RELEARN_METRICS`.
    summary : dict
        The flat numbers ``summary.csv`` compares (NaN where undefined).

    Examples
    --------
    >>> r = RunResult("graddiff-sago-seed0", "graddiff", "sago", 0, 3e-3, 1.0, [],
    ...               [{"step": 5, "forget_acc": 0.2}], before={"forget_acc": 1.0})
    >>> r.trajectory()
    [(0, {'forget_acc': 1.0}), (5, {'forget_acc': 0.2})]
    """

    run: str
    objective: str
    strategy: str
    seed: int
    lr: float
    seconds: float
    losses: list[dict[str, float]]
    history: list[dict[str, float]]
    before: dict[str, float] | None = None
    final: dict[str, float] | None = None
    recovery: dict[str, float] | None = None
    matched_forgetting: dict[str, float] | None = None
    pretrain: dict[str, Any] | None = None
    relearn: dict[str, float] | None = None
    summary: dict[str, float] = field(default_factory=dict)

    def trajectory(self) -> list[tuple[int, dict[str, float]]]:
        """The evaluations as ``(step, metrics)``, the target's (step 0) first when known."""
        points = [(0, _floats(self.before))] if self.before is not None else []
        for entry in self.history:
            metrics = _floats({k: v for k, v in entry.items() if k != "step"})
            points.append((int(entry["step"]), metrics))
        return points

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write ``metrics.json`` into ``run_dir`` atomically (NaN and inf as null); its path."""
        path = Path(run_dir) / METRICS_FILE
        partial = path.with_name(path.name + ".partial")
        text = json.dumps(_finite(dataclasses.asdict(self)), indent=1) + "\n"
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename makes it count as finished
        os.replace(partial, path)
        return path

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> RunResult:
        """The result saved in ``run_dir``; ``lr`` from its ``config.json`` for results saved
        before it was recorded. Raises ValueError naming the file when it is damaged."""
        path = Path(run_dir) / METRICS_FILE
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ValueError(f"{path} is damaged: not JSON ({error})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} is damaged: expected a JSON object")
        if "lr" not in values:
            config = Path(run_dir) / "config.json"
            values["lr"] = json.loads(config.read_text(encoding="utf-8"))["lr"]
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and f.name not in values
        ]
        if missing:
            raise ValueError(f"{path} is damaged: it lacks {', '.join(missing)}")
        result = cls(**{k: v for k, v in values.items() if k in names})
        result.summary = {k: math.nan if v is None else v for k, v in result.summary.items()}
        return result


def is_finished(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds a finished run: a readable ``metrics.json`` (one a machine
    crash left empty or cut short does not count, so the run is redone)."""
    path = Path(run_dir) / METRICS_FILE
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Metric values as floats, null (a NaN saved as JSON) as NaN."""
    return {k: math.nan if v is None else float(v) for k, v in metrics.items()}


def _finite(value: Any) -> Any:
    """``value`` with NaN and inf replaced by None (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
