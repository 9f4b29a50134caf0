"""A study's tables: every evaluation, matched forgetting, learning-rate choice, comparisons.

See docs/study.md#outputs.

:func:`collect` reads whatever runs a directory holds (a sweep's, or ``geomkit run``'s), and
:func:`write_report` writes, beside them:

``runs.csv``
    Long format, one row per run x evaluation (step 0 is the target model).
``final.csv``
    One row per run: its final scores, recovery and (with ``--relearn``) relearning.
``matched.csv``
    One row per run x forget-accuracy target (:func:`geomkit.study.matched.match`), censored
    runs included.
``selection.csv``
    The cross-fitted learning rate of every objective x strategy x target x seed.
``strategies.csv``, ``comparison.csv`` and ``comparison.md``
    Per strategy at matched forgetting, and every pair's paired difference with its interval,
    p and Holm-adjusted p (:mod:`geomkit.study.compare`); the Markdown file also lists the
    runs that failed or are still pending.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from geomkit.results import METRICS_FILE, RunResult
from geomkit.study.compare import compare, select_lr, strategy_table
from geomkit.study.grid import SWEEP_FILE, Sweep
from geomkit.study.matched import FORGET, TARGETS, match
from geomkit.study.workers import ERROR_FILE

__all__ = ["Collected", "collect", "write_report"]

METRICS: tuple[str, ...] = ("retain_acc", "retain_heldout_acc", "general_acc", "forget_heldout_acc")
"""The metrics compared at matched forgetting, of those the runs evaluated (then any other
``*_acc`` a local model's evaluation files give); the first present also selects the learning
rate. ``forget_heldout_acc`` at matched ``forget_acc``: lower means forgetting that carries over
to a paraphrase."""

OUTPUTS: tuple[str, ...] = (
    "matched.csv",
    "selection.csv",
    "strategies.csv",
    "comparison.csv",
)
"""The tables that need matched forgetting (removed when a report has none to write)."""


@dataclass
class Collected:
    """The runs found in a directory.

    ``results`` are the finished runs (each with its ``steps``); ``failed`` maps the name of
    each run that raised to its error's last line; ``pending`` lists the grid's runs not yet
    started (only known for a sweep directory).
    """

    results: list[tuple[RunResult, int]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)


def collect(out: str | os.PathLike) -> Collected:
    """The finished, failed and pending runs under ``out``."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"no directory {str(out)!r}")
    found = Collected()
    names = None
    if (out / SWEEP_FILE).is_file():
        names = [run.name for run in Sweep.load(out).runs()]
    candidates = names if names is not None else sorted(p.name for p in out.iterdir())
    for name in candidates:
        run_dir = out / name
        if (run_dir / METRICS_FILE).is_file():
            result = RunResult.load(run_dir)
            config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
            found.results.append((result, int(config["steps"])))
        elif (run_dir / ERROR_FILE).is_file():
            lines = (run_dir / ERROR_FILE).read_text(encoding="utf-8").strip().splitlines()
            found.failed[name] = lines[-1] if lines else "failed"
        elif names is not None:
            found.pending.append(name)
    return found


def _keys(result: RunResult, steps: int) -> dict[str, Any]:
    return {
        "run": result.run,
        "objective": result.objective,
        "strategy": result.strategy,
        "lr": result.lr,
        "steps": steps,
        "seed": result.seed,
    }


def runs_frame(collected: Collected) -> pd.DataFrame:
    """``runs.csv``: one row per run x evaluation."""
    rows = []
    for result, steps in collected.results:
        for step, metrics in result.trajectory():
            rows.append({**_keys(result, steps), "step": step, **metrics})
    return pd.DataFrame(rows)


def final_frame(collected: Collected) -> pd.DataFrame:
    """``final.csv``: one row per run, its summary (final scores, recovery, relearning)."""
    return pd.DataFrame([{**_keys(r, steps), **r.summary} for r, steps in collected.results])


def matched_frame(collected: Collected, targets: Sequence[float] = TARGETS) -> pd.DataFrame:
    """``matched.csv``: one row per run x target, censored runs included."""
    rows = []
    for result, steps in collected.results:
        trajectory = result.trajectory()
        if not trajectory or any(FORGET not in metrics for _, metrics in trajectory):
            continue  # a run without forget evaluations (a local model) has nothing to match
        for m in match(trajectory, targets):
            rows.append(
                {
                    **_keys(result, steps),
                    "target": m.target,
                    "censored": m.censored,
                    "matched_step": m.step,
                    "reached": m.reached,
                    **{k: v for k, v in m.values.items() if k != "forget_acc"},
                }
            )
    return pd.DataFrame(rows)


def _markdown(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def write_report(
    out: str | os.PathLike,
    targets: Sequence[float] = TARGETS,
    *,
    folds: int = 2,
    n_resamples: int = 9999,
    figures: bool = True,
    formats: Sequence[str] = ("pdf", "png"),
) -> dict[str, Path]:
    """Write the study's tables (and figures) for the runs under ``out``; their paths."""
    out = Path(out)
    collected = collect(out)
    written = {}
    runs = runs_frame(collected)
    runs.to_csv(out / "runs.csv", index=False)
    written["runs"] = out / "runs.csv"
    final_frame(collected).to_csv(out / "final.csv", index=False)
    written["final"] = out / "final.csv"
    matches = matched_frame(collected, targets)
    for name in OUTPUTS:  # never leave a previous report's tables beside this one
        (out / name).unlink(missing_ok=True)
    lines = [f"# Study of {len(collected.results)} finished runs ({out})", ""]
    metrics = [m for m in METRICS if m in matches.columns]
    metrics += [c for c in matches.columns if c.endswith("_acc") and c not in (*METRICS, FORGET)]
    if collected.failed:
        lines += [f"{len(collected.failed)} runs failed (retried by the next `geomkit sweep`):"]
        lines += [f"- {name}: {error}" for name, error in sorted(collected.failed.items())] + [""]
    if collected.pending:
        lines += [f"{len(collected.pending)} runs of the grid are pending.", ""]
    if matches.empty or not metrics:
        lines += [
            "No matched-forgetting tables: the runs have no forget_acc evaluation (a local "
            "model needs `--eval-data forget=FILE`), or nothing to compare beside it.",
            "",
        ]
    else:
        matches.to_csv(out / "matched.csv", index=False)
        written["matched"] = out / "matched.csv"
        select_on = metrics[0]
        select_lr(matches, select_on, folds).to_csv(out / "selection.csv", index=False)
        written["selection"] = out / "selection.csv"
        options = {"select_on": select_on, "folds": folds, "n_resamples": n_resamples}
        table = strategy_table(matches, metrics, **options)
        table.to_csv(out / "strategies.csv", index=False)
        written["strategies"] = out / "strategies.csv"
        comparison = compare(matches, metrics, **options)
        comparison.to_csv(out / "comparison.csv", index=False)
        written["comparison"] = out / "comparison.csv"
        lines += [
            "## At matched forgetting",
            "",
            f"Learning rate and length chosen on the other seeds by {select_on} (cross-fitting, "
            "`selection.csv`); means over the runs that reached the target, with 95% intervals "
            "(studentized bootstrap from 5 runs, Student t below, none below 3); `censored` "
            "runs never reached it, `missing` ones have not finished; `reached` is the forget "
            "accuracy actually observed at the first evaluation at or below the target.",
            "",
            _markdown(table),
            "",
            "## Paired differences (a - b)",
            "",
            "Over the seeds where both reached the target (n); 95% interval as above (it treats "
            "the seeds as independent, which cross-fitting makes only approximately true); p of "
            "a two-sided randomization test that redoes the selection under every swap of a "
            "and b within seeds; Holm-adjusted over each objective x metric.",
            "",
            _markdown(comparison),
            "",
        ]
        if figures:
            from geomkit.plot.study import matched_forgetting, pareto
            from geomkit.plot.style import detached_figures, paper_style, save

            figures_of = (
                ("pareto", lambda: pareto(runs, select_on)),
                ("matched_forgetting", lambda: matched_forgetting(table, tuple(metrics[:3]))),
            )
            for name, draw in figures_of:
                with paper_style(), detached_figures():
                    result = draw()
                    for path in save(result.figure, out / "figures" / name, formats):
                        written[f"{name}.{path.suffix[1:]}"] = path
    (out / "comparison.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    written["comparison.md"] = out / "comparison.md"
    return written
