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
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from geomkit.config import RunConfig
from geomkit.results import is_finished

__all__ = ["Outcome", "cores", "execute", "pending", "prepare", "worker_count"]

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


def worker_count(config: RunConfig, runs: int) -> int:
    """How many worker processes run ``runs`` runs of ``config``: ``config.jobs`` (default: the
    cores), at most one per run, for the embedded benchmark on the CPU in one process; else 1
    (a local model's runs each hold the model; on a GPU they share it; under torchrun the
    processes share each run)."""
    from geomkit.distributed import rank_and_world

    if config.real or config.device != "cpu" or rank_and_world()[1] > 1 or runs < 2:
        return 1
    return min(runs, config.jobs if config.jobs is not None else cores())


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
    lock = _claim(run_dir)
    if lock is None or is_finished(run_dir):  # another process has it, or has finished it
        if lock is not None:
            lock.unlink(missing_ok=True)
        return Outcome(run_dir.name, True, 0.0, "skipped: finished or running elsewhere")
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
        lock.unlink(missing_ok=True)
        torch.set_num_threads(previous_threads)
        if previous_tqdm is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous_tqdm


def _claim(run_dir: Path) -> Path | None:
    """Create ``<run>.lock`` beside the run (exclusively); None when a live process on this
    machine holds it. A lock left by a process that no longer runs (a killed sweep) is taken
    over; one from another machine is respected (remove it by hand if that machine is gone)."""
    lock = run_dir.with_name(run_dir.name + ".lock")
    owner = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            with open(lock, "x", encoding="utf-8") as handle:
                handle.write(owner)
            return lock
        except FileExistsError:
            host, _, pid = lock.read_text(encoding="utf-8").partition(" ")
            if host != socket.gethostname() or not pid.isdigit() or _alive(int(pid)):
                return None
            lock.unlink(missing_ok=True)  # stale: its process is gone
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
                futures = {pool.submit(_run_one, task): task for task in tasks}
                for future in concurrent.futures.as_completed(futures):
                    try:
                        done(future.result())
                    except concurrent.futures.process.BrokenProcessPool as error:
                        # a worker died (out of memory, a signal): its runs count as failed
                        name = str(futures[future]["name"])
                        done(Outcome(name, False, 0.0, f"worker died: {error}"))
    finally:
        bar.close()
    return outcomes
