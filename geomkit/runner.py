"""Running ``geomkit run``: every strategy x seed of one configuration.

See docs/method.md#embedded-benchmark.

Writes, under the configuration's ``out`` directory, one directory per run named
``{objective}-{strategy}-seed{seed}`` holding the geometry store (``geometry.zarr``), the
resolved configuration (``config.json``) and ``metrics.json``, plus ``summary.csv`` and
``summary.md`` comparing the strategies. Without ``model`` it runs the embedded benchmark (a
tiny Llama pretrained on invented facts and cached); with ``model/forget_data/retain_data`` it
unlearns a local Hugging Face model on JSONL or text corpora cut into ``chunk_length`` chunks.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from geomkit.config import RunConfig
from geomkit.corpora import chunks, lm_batch, step_batches
from geomkit.results import RunResult

__all__ = ["audit_runs", "audit_summary", "run", "write_report"]


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def run(config: RunConfig, report: bool = True) -> list[RunResult]:
    """Every strategy x seed of ``config`` (validated); returns the runs' results.

    With ``report``, the runs are then audited against docs/theory.md (``audit.json`` and
    ``audit.txt`` in ``config.out``) and their figure set is written to ``config.out/figures``.

    Under ``torchrun`` every process runs this with the same configuration: each takes its own
    share of every seed's batches, the engine sums the normalised gradients, and only rank 0 writes
    (stores, metrics, tables, report) and prints.
    """
    import torch

    from geomkit.distributed import init_from_environment

    config.validate()
    torch.set_num_threads(config.threads)
    init_from_environment()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    from geomkit.study.workers import worker_count

    jobs = worker_count(config, len(config.strategies) * len(config.seeds))
    if jobs > 1:
        results = _run_pool(config, jobs)
    elif config.real:
        results = _run_real(config, out)
    elif config.vary:  # a target model per seed
        results = [r for seed in config.seeds for r in _run_embedded(config.for_seed(seed), out)]
    else:
        results = _run_embedded(config, out)
    if _is_main():
        if config.name is None:  # a named run is one of a study's, which writes the tables
            _write_summary(results, out)
        if report and results:
            runs = [out / r.run for r in results]
            write_report(runs, out / "figures", audit_dir=out, dpi=150)
    return results


def _run_pool(config: RunConfig, jobs: int) -> list[RunResult]:
    """Every strategy x seed run of ``config`` as a named run on ``jobs`` worker processes (one
    torch thread each; the target model pretrained first with every core). Runs already in
    ``config.out`` under those names are redone. Raises RuntimeError when a run failed."""
    import shutil

    from geomkit.study.workers import execute

    configs = []
    for seed in config.seeds:
        for strategy in config.strategies:
            name = _run_name(config, strategy, seed)
            single = dataclasses.replace(
                config.for_seed(seed), strategies=[strategy], name=name, jobs=1
            )
            configs.append(single)
            if (Path(config.out) / name).exists():
                shutil.rmtree(Path(config.out) / name)
    outcomes = execute(configs, jobs, desc=f"{len(configs)} runs on {jobs} workers")
    failed = [o for o in outcomes if not o.ok]
    if failed:
        names = ", ".join(f"{o.name} ({o.error})" for o in failed)
        raise RuntimeError(f"runs failed: {names}; tracebacks in their error.txt")
    return [RunResult.load(Path(c.out) / str(c.name)) for c in configs]


def _is_main() -> bool:
    from geomkit.distributed import rank_and_world

    return rank_and_world()[0] == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# -- audit and figures ------------------------------------------------------------------------


def audit_runs(source: Any) -> Any:
    """The docs/theory.md audit (:func:`geomkit.theory.audit`) of every run in ``source`` (anything
    :func:`geomkit.runs.load` takes), each on its own."""
    from geomkit import theory

    return theory.audit(source)


def audit_summary(audit: Any) -> str:
    """A few lines for the terminal: the verdict, R4 measured and the step claims S1 (per
    applied strategy) and S2 (open, never gated), pooled over the runs."""
    verdict = (
        "a proven claim is VIOLATED (a bug)" if audit.bug_detected else "no proven claim violated"
    )
    lines = [f"theorem audit: {verdict}"]
    frame = audit.to_frame()
    r4 = frame[frame["claim"] == "R4"].groupby(["strategy", "granularity"], sort=False)
    for (strategy, granularity), rows in r4:
        cases, violations = int(rows["cases"].sum()), int(rows["violations"].sum())
        if cases:
            lines.append(
                f"  R4 (false as stated) {strategy} at {granularity} level: "
                f"fails in {violations} of {cases} cases ({violations / cases:.0%})"
            )
    labels = {"S1": "cos(u, r) >= 0, the step of", "S2": "step ordering"}
    for claim in ("S1", "S2"):
        rows = frame[frame["claim"] == claim]
        for (strategy, granularity), group in rows.groupby(["strategy", "granularity"], sort=False):
            cases, violations = int(group["cases"].sum()), int(group["violations"].sum())
            if cases:
                worst = float(group["worst_margin"].min())
                rate = f"{violations} of {cases} cases ({violations / cases:.0%})"
                lines.append(
                    f"  {claim} (open) {labels[claim]} {strategy} at {granularity} level: fails "
                    f"in {rate}, worst {worst:.3g}"
                )
    return "\n".join(lines)


def write_report(
    source: Any,
    out: Path,
    formats: Sequence[str] = ("pdf", "png"),
    audit_dir: Path | None = None,
    *,
    dpi: int = 300,
    first_seed_only: bool = False,
) -> dict[str, Any]:
    """Audit the runs in ``source`` and write their figure set (with the violation-rate
    figure) to ``out``.

    ``source`` is anything :func:`geomkit.runs.load` takes (run directories, a directory of
    runs, Datasets, runs). The audit goes to ``audit_dir`` (default ``out``) as ``audit.json``
    and ``audit.txt``. With ``first_seed_only``, per-run figures are drawn for the lowest seed
    of each objective and strategy (the set figures still use every run). Returns
    :func:`geomkit.plot.write_figures`' map of figure name to paths or skip reason.
    """
    from geomkit import theory
    from geomkit.plot import write_figures
    from geomkit.runs import load

    runs = load(source)  # opened once for the audit and the figures
    audit = theory.audit(runs)
    audit_dir = out if audit_dir is None else audit_dir
    audit_dir.mkdir(parents=True, exist_ok=True)
    audit.to_json(audit_dir / "audit.json")
    (audit_dir / "audit.txt").write_text(str(audit) + "\n", encoding="utf-8")
    print(audit_summary(audit) + f"\nfull table: {audit_dir / 'audit.txt'}", file=sys.stderr)
    per_run = None
    if first_seed_only:
        first: dict[tuple[str | None, str | None], str] = {}
        for run in sorted(runs, key=lambda r: (r.seed is None, r.seed or 0, r.label)):
            first.setdefault((run.objective, run.strategy), run.label)
        per_run = list(first.values())
    return write_figures(runs, out, formats, audit=audit.to_frame(), dpi=dpi, per_run=per_run)


def _run_name(config: RunConfig, strategy: str, seed: int) -> str:
    if config.name is not None:
        return config.name
    return f"{config.objective}-{strategy}-seed{seed}"


def _unlearn(
    config: RunConfig,
    model: Any,
    forget: list[dict],
    retain: list[dict],
    strategy: str,
    seed: int,
    run_dir: Path,
    evaluate: Callable[[Any], dict[str, float]] | None,
    before: dict[str, float] | None = None,
) -> RunResult:
    """One run: the Unlearner loop with a progress bar and periodic evaluation."""
    from tqdm.auto import tqdm

    from geomkit.engine import Unlearner

    objective = config.build_objective(seed)
    engine = config.engine_config(strategy, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    if _is_main():
        config.save(run_dir / "config.json")
    unlearner = Unlearner(
        model,
        objective,
        forget,
        retain if objective.retain is not None else None,
        engine,
        out=run_dir / "geometry.zarr",
        attrs={"run": run_dir.name},
    )
    losses: list[dict[str, float]] = []
    history: list[tuple[int, dict[str, float]]] = []
    recorder = unlearner.recorder

    def log(steps_done: int, metrics: dict[str, float]) -> None:
        """Into the store: the metrics it has variables for (others stay in metrics.json)."""
        from geomkit.store import EVALUATION_VARIABLES

        known = {k: v for k, v in metrics.items() if k in EVALUATION_VARIABLES}
        if recorder is not None and known:
            recorder.log_evaluation(steps_done, known)

    if before is not None:
        log(0, before)
    bar = tqdm(
        total=config.steps,
        desc=run_dir.name,
        leave=False,
        file=sys.stderr,
        disable=not _is_main() or bool(os.environ.get("TQDM_DISABLE")),  # a worker's log
    )

    def after_step(result: Any) -> None:
        done = result.step + 1
        losses.append(
            {
                "step": done,
                "forget_loss": result.forget_loss,
                "retain_loss": result.retain_loss,
                "grad_norm": result.grad_norm,
            }
        )
        bar.set_postfix(forget=f"{result.forget_loss:.3f}", retain=f"{result.retain_loss:.3f}")
        bar.update()
        if evaluate is not None and (done % config.eval_every == 0 or done == config.steps):
            history.append((done, evaluate(model)))
            log(done, history[-1][1])

    start = time.perf_counter()
    try:
        unlearner.run(after_step)
    finally:
        bar.close()
    return RunResult(
        run=run_dir.name,
        objective=config.objective,
        strategy=strategy,
        seed=seed,
        lr=config.lr,
        seconds=time.perf_counter() - start,
        losses=losses,
        history=[{"step": step, **metrics} for step, metrics in history],
        before=before,
    )


def _save(result: RunResult, run_dir: Path) -> None:
    """``metrics.json``, written last: a run directory with one holds a finished run."""
    if _is_main():
        result.save(run_dir)


def _grid(
    config: RunConfig, forget_items: list, retain_items: list, make: Callable
) -> Iterator[tuple[RunConfig, int, str, list[dict], list[dict]]]:
    """Every (seed, strategy) run: its configuration and this process's share of its seed's
    shuffled micro-batches (:func:`geomkit.corpora.step_batches`)."""
    from geomkit.distributed import rank_and_world

    rank, world = rank_and_world()
    for seed in config.seeds:
        forget, retain = (
            step_batches(items, config.batch_size, config.accumulation, seed, make, rank, world)
            for items in (forget_items, retain_items)
        )
        seeded = _with_epochs(config, len(forget))
        for strategy in config.strategies:
            yield seeded, seed, strategy, forget, retain


def _with_epochs(config: RunConfig, n_batches: int) -> RunConfig:
    """``config`` with ``steps`` from ``epochs`` (passes over the forget batches), if set."""
    if config.epochs is None:
        return config
    steps = max(1, math.ceil(config.epochs * n_batches / config.accumulation))
    return dataclasses.replace(config, steps=steps)


# -- the embedded benchmark -----------------------------------------------------------------


def _run_embedded(config: RunConfig, out: Path) -> list[RunResult]:
    import torch

    from geomkit.bench.evaluate import evaluate, matched_forgetting, recovery
    from geomkit.bench.model import unlearning_texts

    main = _is_main()
    if not main:
        _barrier()  # the other processes wait for rank 0 to pretrain (or find) the target
    target, tokenizer, data, info = load_target(config, _pretrain_progress if main else None)
    if main:
        _barrier()
    target = target.to(device=config.device, dtype=getattr(torch, config.dtype))
    max_length = target.config.max_position_embeddings

    def score(model: Any) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            return evaluate(model, tokenizer, data)

    before = score(target)
    if main:
        print(
            f"target model ({'cached' if info['cached'] else 'pretrained'}, {info['path']}): "
            + ", ".join(f"{k}={v:.3f}" for k, v in before.items()),
            file=sys.stderr,
        )
    forget_texts, retain_texts = (list(texts) for texts in unlearning_texts(data))

    def make(texts: list[str]) -> dict:
        return tokenizer.batch(texts, max_length=max_length)

    results = []
    for run_config, seed, strategy, forget, retain in _grid(
        config, forget_texts, retain_texts, make
    ):
        run_dir = out / _run_name(run_config, strategy, seed)
        model = copy.deepcopy(target)
        result = _unlearn(run_config, model, forget, retain, strategy, seed, run_dir, score, before)
        evaluations = result.trajectory()[1:]
        final = evaluations[-1][1]
        matched = matched_forgetting(evaluations, run_config.threshold)
        result.final = final
        result.recovery = recovery(final, before)
        result.matched_forgetting = matched
        result.pretrain = {k: info.get(k) for k in ("key", "cached", "path", "final")}
        result.summary = {
            **final,
            **result.recovery,
            "matched_step": float(matched["step"]) if matched else math.nan,
            "matched_retain_acc": matched["retain_acc"] if matched else math.nan,
            "matched_general_acc": matched["general_acc"] if matched else math.nan,
        }
        if run_config.relearn:
            from geomkit.bench.relearn import relearn

            result.relearn = relearn(
                model, tokenizer, data, run_config.relearn, batch_size=config.batch_size, seed=seed
            )
            result.summary.update(result.relearn)
        _save(result, run_dir)
        results.append(result)
        del model
    return results


def load_target(config: RunConfig, progress: Callable | None = None) -> tuple:
    """The embedded benchmark's target model of ``config``, its tokenizer, data and provenance
    (:func:`geomkit.bench.model.load_or_pretrain`): from the cache, or pretrained there with
    every core of this process (``progress`` is called after each pretraining evaluation)."""
    import torch

    from geomkit.bench.model import load_or_pretrain
    from geomkit.study.workers import cores

    threads = torch.get_num_threads()
    torch.set_num_threads(cores())
    try:
        return load_or_pretrain(
            config.cache_dir,
            config.n_entities,
            config.forget_fraction,
            config.data_seed,
            config.model_config(),
            config.train_config(),
            progress=progress,
        )
    finally:
        torch.set_num_threads(threads)


def _pretrain_progress(entry: dict[str, float]) -> None:
    print(
        f"pretraining the target model: epoch {entry['epoch']}, loss {entry['loss']:.3f}, "
        f"forget_acc={entry['forget_acc']:.3f} retain_acc={entry['retain_acc']:.3f} "
        f"({entry['seconds']:.0f} s)",
        file=sys.stderr,
        flush=True,
    )


# -- a local model on corpora ---------------------------------------------------------------


def _run_real(config: RunConfig, out: Path) -> list[RunResult]:
    import transformers

    from geomkit.engine import load_model

    target = load_model(config.model, device=config.device, dtype=config.dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(config.model, local_files_only=True)
    forget_chunks = chunks(tokenizer, Path(config.forget_data), config.chunk_length)
    retain_chunks = chunks(tokenizer, Path(config.retain_data), config.chunk_length)
    evaluate, before = None, None
    if config.eval_data:
        from geomkit.choice import accuracy, read_questions

        questions = {name: read_questions(path) for name, path in config.eval_data.items()}

        def evaluate(model: Any) -> dict[str, float]:
            return {f"{name}_acc": accuracy(model, tokenizer, qs) for name, qs in questions.items()}

        before = evaluate(target)
    results = []
    grid = _grid(config, forget_chunks, retain_chunks, lm_batch)
    for run_config, seed, strategy, forget, retain in grid:
        run_dir = out / _run_name(run_config, strategy, seed)
        model = copy.deepcopy(target) if len(config.seeds) * len(config.strategies) > 1 else target
        result = _unlearn(
            run_config, model, forget, retain, strategy, seed, run_dir, evaluate, before
        )
        last = result.losses[-1]
        result.summary = {"forget_loss": last["forget_loss"], "retain_loss": last["retain_loss"]}
        if result.history:
            result.final = {k: v for k, v in result.history[-1].items() if k != "step"}
            result.summary.update(result.final)
        _save(result, run_dir)
        results.append(result)
        del model
    return results


# -- the comparison table -------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def _write_summary(results: list[RunResult], out: Path) -> None:
    """Mean and std over seeds per objective x strategy: print, summary.csv, summary.md."""
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.objective, result.strategy), []).append(result)
    columns = list(results[0].summary) if results else []
    rows = []
    for (objective, strategy), runs in groups.items():
        row: dict[str, Any] = {"objective": objective, "strategy": strategy, "seeds": len(runs)}
        # runs whose forget accuracy reached the threshold (those the matched_* columns average)
        row["forgotten"] = sum(math.isfinite(r.summary.get("matched_step", math.nan)) for r in runs)
        for column in columns:
            row[column] = _mean_std([float(r.summary[column]) for r in runs])
        rows.append(row)
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        header = ["objective", "strategy", "seeds", "forgotten"]
        for column in columns:
            header += [f"{column}_mean", f"{column}_std"]
        writer.writerow(header)
        for row in rows:
            cells = [row["objective"], row["strategy"], row["seeds"], row["forgotten"]]
            for column in columns:
                cells += ["" if math.isnan(x) else f"{x:.6g}" for x in row[column]]
            writer.writerow(cells)

    def cell(pair: tuple[float, float]) -> str:
        mean, std = pair
        if math.isnan(mean):
            return "-"
        return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"

    lines = [
        "| objective | strategy | seeds | forgotten | " + " | ".join(columns) + " |",
        "|" + "---|" * (4 + len(columns)),
    ]
    for row in rows:
        cells = [row["objective"], row["strategy"], str(row["seeds"]), str(row["forgotten"])]
        lines.append("| " + " | ".join(cells + [cell(row[c]) for c in columns]) + " |")
    table = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(table, encoding="utf-8")
    print(table)
