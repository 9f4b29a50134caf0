"""Executing a sweep: pending runs on a pool of worker processes, resumable.

See docs/study.md#sweep.

A run is finished when its directory holds ``metrics.json`` (written last and atomically,
:mod:`geomkit.results`); :func:`execute` skips finished runs and redoes any other directory
under a run's name (a half-written run of a killed sweep). Each worker is a fresh process
(``spawn``) with one torch thread; a run's terminal output goes to ``log.txt`` in its
directory, and a run that raises leaves its traceback in ``error.txt`` and is reported as
failed (a later call retries it). The embedded benchmark's target model is pretrained (or
found in the cache) once, with every core, before the workers start.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from geomkit.config import RunConfig
from geomkit.results import is_finished

__all__ = ["Outcome", "cores", "execute", "pending", "prepare"]

ERROR_FILE = "error.txt"
LOG_FILE = "log.txt"


@dataclass(frozen=True)
class Outcome:
    """What became of one run: ``ok`` or the error's last line, and its wall time."""

    name: str
    ok: bool
    seconds: float
    error: str = ""


def cores() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _directory(config: RunConfig) -> Path:
    return Path(config.out) / str(config.name)


def pending(configs: list[RunConfig]) -> list[RunConfig]:
    """The runs of ``configs`` (each named, :attr:`RunConfig.name`) not finished yet."""
    return [c for c in configs if not is_finished(_directory(c))]


def _run_one(values: dict) -> Outcome:
    """One named run (``RunConfig`` fields) in this process, its output to ``log.txt``; never
    raises."""
    import torch

    from geomkit import runner

    start = time.perf_counter()
    config = RunConfig(**values)
    run_dir = _directory(config)
    if run_dir.exists():  # a half-written run (no metrics.json): redo it from scratch
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    previous_threads, previous_tqdm = torch.get_num_threads(), os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        with (
            open(run_dir / LOG_FILE, "w", encoding="utf-8") as log,
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
        ):
            runner.run(config, report=False)
        return Outcome(run_dir.name, True, time.perf_counter() - start)
    except Exception as error:  # reported as a failed run, retried by the next call
        (run_dir / ERROR_FILE).write_text(traceback.format_exc(), encoding="utf-8")
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        return Outcome(run_dir.name, False, time.perf_counter() - start, message)
    finally:
        torch.set_num_threads(previous_threads)
        if previous_tqdm is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous_tqdm


def prepare(config: RunConfig) -> None:
    """Pretrain (or find in the cache) the embedded target model of ``config`` once, with every
    core (:func:`geomkit.runner.load_target`); nothing for a local model."""
    if not config.real:
        from geomkit.runner import _pretrain_progress, load_target

        load_target(config, _pretrain_progress)


def _target(config: RunConfig) -> tuple:
    """What determines a configuration's target model (the cache entry :func:`prepare` makes)."""
    return (
        config.model,
        config.cache_dir,
        config.n_entities,
        config.forget_fraction,
        config.data_seed,
        repr(config.model_config()),
        repr(config.train_config()),
    )


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def execute(
    configs: list[RunConfig], jobs: int, *, progress: bool = True, desc: str = "sweep"
) -> list[Outcome]:
    """Every pending run of ``configs`` (each one strategy, one seed and a ``name``) on ``jobs``
    processes, each with one torch thread; their outcomes, in the order they finished.

    With ``jobs == 1`` the runs execute in this process, one after another (the same results
    as any number of workers: each run is seeded and single-threaded).
    """
    from tqdm.auto import tqdm

    todo = pending(configs)
    if not todo:
        return []
    for config in {_target(c): c for c in todo}.values():  # each target model once
        prepare(config)
    tasks = [{**c.to_dict(), "threads": 1} for c in todo]
    bar = tqdm(total=len(todo), desc=desc, unit="run", file=sys.stderr, disable=not progress)
    outcomes = []

    def done(outcome: Outcome) -> None:
        outcomes.append(outcome)
        bar.update()
        failed = sum(not o.ok for o in outcomes)
        bar.set_postfix_str(f"last {outcome.name}" + (f", {failed} failed" if failed else ""))

    try:
        if jobs == 1:
            for task in tasks:
                done(_run_one(task))
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(
                jobs, mp_context=context, initializer=_worker_init
            ) as pool:
                futures = [pool.submit(_run_one, task) for task in tasks]
                for future in concurrent.futures.as_completed(futures):
                    done(future.result())
    finally:
        bar.close()
    return outcomes
