"""The ``geomkit`` command line: ``run``, ``check``, ``plot`` and ``figures``.

``geomkit check RUN...`` audits recorded runs against docs/theory.md (:mod:`geomkit.theory`) and
exits 1 only when a proven claim is violated; ``geomkit plot RUN... --out DIR`` writes the figure
set (:mod:`geomkit.plot`); ``geomkit figures`` regenerates the repository's ``figures/`` from the
embedded benchmark.

Exit status: 0 success; 1 a proven claim violated (``check`` only); 2 bad input, reported as one
line on stderr: an invalid configuration or flag (:class:`geomkit.config.ConfigError`), a store
that is no readable geomkit run (:class:`geomkit.store.SchemaError`), a damaged store
(:class:`geomkit.store.DamagedStoreError`) or a missing file. Any other exception is a bug and
shows its traceback.

``geomkit run`` unlearns with every strategy and seed of one configuration
(:mod:`geomkit.config`) and writes, under ``--out DIR``, one directory per run named
``{objective}-{strategy}-seed{seed}`` holding the geometry store (``geometry.zarr``), the
resolved configuration (``config.json``) and ``metrics.json``, plus ``summary.csv`` and
``summary.md`` comparing the strategies. Without ``--model`` it runs the embedded benchmark
(a tiny Llama pretrained on invented facts and cached); with ``--model``, ``--forget-data``
and ``--retain-data`` it unlearns a local Hugging Face model on JSONL or text corpora cut into
``chunk_length`` chunks (``--forget`` and ``--retain`` are deprecated spellings).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from geomkit._deprecation import DeprecatedFlag
from geomkit.config import PRESETS, ConfigError, RunConfig, load_config
from geomkit.runner import audit_runs, run, write_report

__all__ = ["main"]

FIGURES_DPI = 200
"""Resolution of the PNG files ``geomkit figures`` writes by default (the README shows them;
a double-column figure is then 1380 pixels wide). The PDF files are vector graphics."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geomkit", description="Gradient geometry of two-task LLM unlearning."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="unlearn with each strategy and seed, record the geometry, compare",
        description="Flags given explicitly override the preset and the --config file.",
        argument_default=argparse.SUPPRESS,  # absent flags leave the configuration alone
    )
    _run_flags(run)

    sweep = commands.add_parser(
        "sweep",
        help="a grid of runs on parallel workers, resumable, and its comparison tables",
        description="objective x strategy x learning rate x steps x seed, one run per "
        "combination under --out (finished runs are skipped, half-written ones redone), then "
        "the tables at matched forgetting with bootstrap intervals (docs/study.md). Flags "
        "given explicitly override the preset and the --config file.",
        argument_default=argparse.SUPPRESS,
    )
    _run_flags(sweep, sweep=True)
    sweep.add_argument(
        "--targets", nargs="+", type=float, metavar="F", help="forget accuracies to match at"
    )
    sweep.add_argument("--folds", type=int, help="cross-fitting folds of the seeds (default 2)")
    sweep.add_argument(
        "--dry-run", action="store_true", help="print one `geomkit run` command per pending run"
    )
    sweep.add_argument(
        "--report-only", action="store_true", help="only write the tables of the runs in --out"
    )

    check = commands.add_parser(
        "check",
        help="audit recorded runs against the claims R0-R9, V1, S1 and S2 of docs/theory.md",
        description="Exit status 1 only when a proven claim (R1, R2, R2b globally, R6 for "
        "SAGO, R9, V1: the shadows' closed forms against their materialised updates) is "
        "violated beyond tolerance, which would mean a bug; never because R4 fails, nor "
        "because of the step claims S1 and S2 (open, measured: the optimizer's step against "
        "the retain gradient).",
    )
    check.add_argument(
        "runs", nargs="+", metavar="RUN", help="run directories or directories of runs"
    )
    check.add_argument(
        "--json", metavar="PATH", help="where to write the JSON report (default: beside the runs)"
    )

    plot = commands.add_parser("plot", help="write the figure set of recorded runs")
    plot.add_argument(
        "runs", nargs="+", metavar="RUN", help="run directories or directories of runs"
    )
    plot.add_argument(
        "--out", metavar="DIR", help="figure directory (default: RUN/figures for one RUN)"
    )
    plot.add_argument(
        "--format", nargs="+", default=["pdf", "png"], metavar="EXT", help="file formats"
    )
    plot.add_argument("--dpi", type=int, default=300, help="resolution of raster formats")

    figures = commands.add_parser(
        "figures",
        help="regenerate the repository's figures/ from the embedded benchmark",
        description="Runs the embedded default (or the --preset / --config given) unless --runs "
        "names existing runs, then writes the figure set, the geometry table and the audit.",
    )
    figures.add_argument("--out", default="figures", metavar="DIR", help="figure directory")
    figures.add_argument("--runs", nargs="+", metavar="RUN", help="use these runs instead")
    figures.add_argument("--work", default="runs/figures", metavar="DIR", help="where new runs go")
    figures.add_argument("--config", default=None, help="JSON or TOML file of settings")
    figures.add_argument("--preset", default=None, help="one of: " + ", ".join(PRESETS))
    figures.add_argument("--cache-dir", metavar="DIR", help="cache of pretrained benchmark models")
    figures.add_argument(
        "--dpi", type=int, default=FIGURES_DPI, help="resolution of the PNG files (>= 150)"
    )
    figures.add_argument(
        "--format",
        nargs="+",
        default=["pdf", "png"],
        metavar="EXT",
        help="file formats (default: vector PDF and PNG)",
    )
    return parser


def _run_flags(parser: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    """The flags of ``geomkit run``; for ``sweep`` the grid axes take several values and the
    single-run flags (``--name``, ``--no-report``) are left out."""
    parser.add_argument("--config", default=None, help="JSON or TOML file of settings")
    parser.add_argument("--preset", default=None, help="one of: " + ", ".join(PRESETS))
    # every other flag's dest is the RunConfig field it sets (given flags become overrides)
    many = {"nargs": "+"} if sweep else {}  # the grid's axes
    parser.add_argument("--objective", **many, help="ga, graddiff, npo, simnpo or rmu")
    parser.add_argument("--retain-loss", metavar="KIND", help="nll, kl or none (retain loss kind)")
    parser.add_argument(
        "--strategy", dest="strategies", nargs="+", metavar="NAME", help="applied strategies"
    )
    parser.add_argument("--lr", type=float, **many, help="peak learning rate")
    parser.add_argument("--optimizer", metavar="NAME", help="adamw (default) or sgd")
    parser.add_argument("--steps", type=int, **many, help="optimizer steps per run")
    parser.add_argument(
        "--epochs", type=int, help="passes over the forget data (sets the steps; RWKU presets)"
    )
    parser.add_argument("--seed", dest="seeds", nargs="+", type=int, metavar="N", help="seeds")
    parser.add_argument(
        "--vary",
        action="store_true",
        help="a seed also redraws the benchmark's data and target model (data_seed + seed)",
    )
    parser.add_argument("--record-every", type=int, help="record geometry every N steps (0: never)")
    parser.add_argument(
        "--verify-every",
        type=int,
        help="materialise and verify the shadows at the first record and every N-th (0: never)",
    )
    parser.add_argument(
        "--no-record-step",
        dest="record_step",
        action="store_false",
        help="do not record the statistics of the optimizer's step u (cos(u, r), attribution)",
    )
    parser.add_argument(
        "--record-realized",
        action="store_true",
        help="evaluate both losses again after each recorded step (two forward passes)",
    )
    parser.add_argument("--eval-every", type=int, help="evaluate every N steps (embedded only)")
    parser.add_argument(
        "--relearn",
        type=int,
        metavar="K",
        help="after unlearning, K fine-tuning steps on half the forget entities; then the "
        "forget accuracy of the other half (embedded only)",
    )
    parser.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    parser.add_argument("--accumulation", type=int, help="micro-batches per optimizer step")
    parser.add_argument("--beta", type=float, help="NPO / SimNPO beta")
    parser.add_argument("--delta", type=float, help="SimNPO delta")
    parser.add_argument("--alpha", type=float, help="retain weight")
    parser.add_argument("--gamma", type=float, help="forget weight")
    parser.add_argument("--out", metavar="DIR", help="directory receiving one folder per run")
    if not sweep:  # a single run's flags (a sweep names its runs and writes its own report)
        parser.add_argument(
            "--name",
            metavar="NAME",
            help="the run directory's name (one strategy and one seed; no summary table)",
        )
        parser.add_argument(
            "--no-report",
            action="store_true",
            help="skip the theorem audit and the figure set written after the runs",
        )
    parser.add_argument("--model", metavar="PATH", help="local Hugging Face model directory")
    parser.add_argument(
        "--forget-data", metavar="FILE", help="forget corpus (JSONL 'text' or text)"
    )
    parser.add_argument(
        "--retain-data", metavar="FILE", help="retain corpus (JSONL 'text' or text)"
    )
    parser.add_argument(
        "--chunk-length", type=int, help="tokens per training chunk of the corpora (default 512)"
    )
    parser.add_argument(
        "--eval-data",
        nargs="+",
        type=_name_and_file,
        metavar="NAME=FILE",
        help="multiple-choice JSONL files scored at every evaluation as NAME_acc (local model)",
    )
    for old, dest in (("--forget", "forget_data"), ("--retain", "retain_data")):
        new = "--" + dest.replace("_", "-")  # deprecated spellings: warn, then set the field
        parser.add_argument(old, dest=dest, action=DeprecatedFlag, new=new, help=argparse.SUPPRESS)
    parser.add_argument("--device", metavar="D", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", metavar="T", help="float32, bfloat16 or float16")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--jobs",
        type=int,
        help="worker processes for the runs, one torch thread each (default: the cores)",
    )
    parser.add_argument("--cache-dir", metavar="DIR", help="cache of pretrained benchmark models")


def _name_and_file(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"invalid --eval-data {text!r}: expected NAME=FILE")
    return name, path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 success, 1 bug found, 2 bad input)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its message
        return int(exit_.code or 0)
    commands = {"run": _run, "sweep": _sweep, "check": _check, "plot": _plot, "figures": _figures}
    command = commands[args.command]
    try:
        return command(args)
    except _known_errors() as error:  # evaluated only when an exception is raised
        message = " ".join(str(error).split())  # one line
        print(f"geomkit {args.command}: error: {message}", file=sys.stderr)
        return 2


def _known_errors() -> tuple[type[BaseException], ...]:
    """The errors reported as bad input (exit 2); anything else is a bug and propagates."""
    from geomkit.store import DamagedStoreError, SchemaError

    return (ConfigError, SchemaError, DamagedStoreError, FileNotFoundError)


def _run(args: argparse.Namespace) -> int:
    given = vars(args)
    overrides = {f.name: given[f.name] for f in fields(RunConfig) if f.name in given}
    if "eval_data" in overrides:
        overrides["eval_data"] = dict(overrides["eval_data"])
    config = load_config(args.config, args.preset, overrides)
    run(config, report=not given.get("no_report", False))
    return 0


SWEEP_DEFAULTS: dict[str, Any] = {"eval_every": 2, "out": "runs/sweep"}
"""Where ``geomkit sweep``'s base configuration differs from ``geomkit run``'s default (unless
the preset, file or flags set it): evaluations every 2 steps, to locate the crossings."""

AXIS_FLAGS: dict[str, str] = {
    "objectives": "objective",
    "strategies": "strategies",
    "lrs": "lr",
    "steps": "steps",
    "seeds": "seeds",
}
"""The :class:`~geomkit.study.grid.Sweep` axis each sweep flag's destination fills."""


def _sweep(args: argparse.Namespace) -> int:
    from geomkit.study.grid import Sweep
    from geomkit.study.matched import TARGETS
    from geomkit.study.report import write_report as write_study
    from geomkit.study.workers import execute, pending, worker_count

    given = vars(args)
    folds = given.get("folds", 2)
    if isinstance(folds, bool) or folds < 2:
        raise ConfigError(f"invalid --folds={folds!r}: expected an integer >= 2")
    targets = sorted(set(given.get("targets", list(TARGETS))), reverse=True)
    for target in targets:
        if not 0.0 <= target <= 1.0:
            raise ConfigError(f"invalid --targets={target!r}: expected forget accuracies in [0, 1]")
    if given.get("report_only"):
        out = Path(given["out"]) if "out" in given else None
        if out is None:  # the --config or --preset may name it
            preset = load_config(args.config, args.preset)
            out = Path(preset.out if preset.out != RunConfig().out else SWEEP_DEFAULTS["out"])
        written = write_study(out, targets, folds=folds)
        print(written["comparison.md"].read_text(encoding="utf-8"))
        return 0
    axes = {field: given.pop(flag) for field, flag in AXIS_FLAGS.items() if flag in given}
    overrides = {f.name: given[f.name] for f in fields(RunConfig) if f.name in given}
    if "eval_data" in overrides:
        overrides["eval_data"] = dict(overrides["eval_data"])
    preset = load_config(args.config, args.preset)  # what the file and preset set, unvalidated
    base_values = {k: v for k, v in SWEEP_DEFAULTS.items() if k not in overrides}
    base_values = {
        k: v for k, v in base_values.items() if getattr(preset, k) == getattr(RunConfig(), k)
    }
    base = load_config(args.config, args.preset, {**base_values, **overrides})
    sweep = Sweep(
        base,
        objectives=axes.get("objectives", [base.objective]),
        strategies=axes.get("strategies", base.strategies),
        lrs=axes.get("lrs", [base.lr]),
        steps=axes.get("steps", [base.steps]),
        seeds=axes.get("seeds", base.seeds),
    )
    jobs = worker_count(base, len(sweep.runs()))
    out = Path(base.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "sweep.json").exists():
        differences = Sweep.load(out).differences(sweep)
        if differences:
            raise ConfigError(
                f"invalid --out={str(out)!r}: it holds a sweep that differs in "
                f"{', '.join(differences)}; resume or extend it with the same settings (an axis "
                "may gain values, not lose them) or use another --out"
            )
    sweep.save(out)
    base.save(out / "base.json")
    runs = sweep.runs()
    configs = [run.config(base, out) for run in runs]
    todo = pending(configs)
    if given.get("dry_run"):
        for run in [r for r, c in zip(runs, configs, strict=True) if c in todo]:
            flags = ["--config", str(out / "base.json"), *run.flags(), "--out", str(out)]
            print(" ".join(["geomkit", "run", *flags, "--no-report"]))
        print(
            f"{len(todo)} of {len(runs)} runs pending; then: geomkit sweep --report-only "
            f"--out {out}",
            file=sys.stderr,
        )
        return 0
    print(
        f"sweep: {len(runs)} runs, {len(runs) - len(todo)} already finished, "
        f"{len(todo)} to run on {min(jobs, max(1, len(todo)))} workers -> {out}",
        file=sys.stderr,
    )
    outcomes = execute(configs, min(jobs, max(1, len(todo))))
    skipped = [o for o in outcomes if o.ok and o.error]  # finished or claimed elsewhere
    if skipped:
        print(f"{len(skipped)} runs were taken by another process", file=sys.stderr)
    written = write_study(out, targets, folds=folds)
    print(written["comparison.md"].read_text(encoding="utf-8"))
    failed = [o for o in outcomes if not o.ok]
    if failed:
        for outcome in failed:
            print(f"  failed: {outcome.name}: {outcome.error}", file=sys.stderr)
        print(
            f"geomkit sweep: {len(failed)} runs failed (tracebacks in their error.txt); "
            "running the same command again retries them",
            file=sys.stderr,
        )
        return 1
    return 0


def _check(args: argparse.Namespace) -> int:
    audit = audit_runs(args.runs)
    print(audit)
    path = Path(args.json) if args.json else _beside(args.runs, "audit.json")
    audit.to_json(path)
    print(f"report written to {path}", file=sys.stderr)
    if audit.bug_detected:
        print(
            "geomkit check: a proven claim is violated beyond tolerance (see the FAIL rows): "
            "this indicates a bug in the strategy or the recording",
            file=sys.stderr,
        )
        return 1
    return 0


def _plot(args: argparse.Namespace) -> int:
    if args.out is None and len(args.runs) != 1:
        raise ConfigError(
            "invalid --out=None: expected a figure directory when several RUN are given"
        )
    _check_figure_flags(args)
    out = Path(args.out) if args.out else _beside(args.runs, "figures")
    written = write_report(args.runs, out, formats=args.format, dpi=args.dpi)
    _print_written(written, out)
    return 0


def _figures(args: argparse.Namespace) -> int:
    _check_figure_flags(args)
    if args.runs:
        runs = args.runs
    else:
        overrides = {"out": args.work}
        if args.cache_dir is not None:
            overrides["cache_dir"] = args.cache_dir
        config = load_config(args.config, args.preset, overrides)
        results = run(config, report=False)
        runs = [Path(config.out) / r.run for r in results]
    out = Path(args.out)
    written = write_report(runs, out, args.format, dpi=args.dpi, first_seed_only=True)
    _print_written(written, out)
    return 0


def _check_figure_flags(args: argparse.Namespace) -> None:
    """ConfigError for a file format matplotlib cannot write or a resolution <= 0."""
    from matplotlib.figure import Figure

    supported = Figure().canvas.get_supported_filetypes()
    for ext in args.format:
        if ext not in supported:
            raise ConfigError(f"invalid --format={ext!r}: expected one of {', '.join(supported)}")
    if args.dpi <= 0:
        raise ConfigError(f"invalid --dpi={args.dpi}: expected an integer > 0")


def _beside(paths: Sequence[str], name: str) -> Path:
    """``name`` inside the one path given, or in the common parent of several."""
    if len(paths) == 1:
        return Path(paths[0]) / name
    return Path(os.path.commonpath([str(Path(p).resolve()) for p in paths])) / name


def _print_written(written: dict[str, Any], out: Path) -> None:
    skipped = {k: v for k, v in written.items() if isinstance(v, str)}
    print(f"{len(written) - len(skipped)} figures and tables written to {out}", file=sys.stderr)
    for name, reason in skipped.items():
        print(f"  {name}: {reason}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
