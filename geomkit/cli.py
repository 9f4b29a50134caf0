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
    run.add_argument("--config", default=None, help="JSON or TOML file of settings")
    run.add_argument("--preset", default=None, help="one of: " + ", ".join(PRESETS))
    # every other flag's dest is the RunConfig field it sets (given flags become overrides)
    run.add_argument("--objective", help="ga, graddiff, npo, simnpo or rmu")
    run.add_argument("--retain-loss", metavar="KIND", help="nll, kl or none (retain loss kind)")
    run.add_argument(
        "--strategy", dest="strategies", nargs="+", metavar="NAME", help="applied strategies"
    )
    run.add_argument("--lr", type=float, help="peak learning rate")
    run.add_argument("--optimizer", metavar="NAME", help="adamw (default) or sgd")
    run.add_argument("--steps", type=int, help="optimizer steps per run")
    run.add_argument(
        "--epochs", type=int, help="passes over the forget data (sets the steps; RWKU presets)"
    )
    run.add_argument("--seed", dest="seeds", nargs="+", type=int, metavar="N", help="seeds")
    run.add_argument("--record-every", type=int, help="record geometry every N steps (0: never)")
    run.add_argument(
        "--verify-every",
        type=int,
        help="materialise and verify the shadows at the first record and every N-th (0: never)",
    )
    run.add_argument(
        "--no-record-step",
        dest="record_step",
        action="store_false",
        help="do not record the statistics of the optimizer's step u (cos(u, r), attribution)",
    )
    run.add_argument(
        "--record-realized",
        action="store_true",
        help="evaluate both losses again after each recorded step (two forward passes)",
    )
    run.add_argument("--eval-every", type=int, help="evaluate every N steps (embedded only)")
    run.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    run.add_argument("--accumulation", type=int, help="micro-batches per optimizer step")
    run.add_argument("--beta", type=float, help="NPO / SimNPO beta")
    run.add_argument("--delta", type=float, help="SimNPO delta")
    run.add_argument("--alpha", type=float, help="retain weight")
    run.add_argument("--gamma", type=float, help="forget weight")
    run.add_argument("--out", metavar="DIR", help="directory receiving one folder per run")
    run.add_argument("--model", metavar="PATH", help="local Hugging Face model directory")
    run.add_argument("--forget-data", metavar="FILE", help="forget corpus (JSONL 'text' or text)")
    run.add_argument("--retain-data", metavar="FILE", help="retain corpus (JSONL 'text' or text)")
    for old, dest in (("--forget", "forget_data"), ("--retain", "retain_data")):
        new = "--" + dest.replace("_", "-")  # deprecated spellings: warn, then set the field
        run.add_argument(old, dest=dest, action=DeprecatedFlag, new=new, help=argparse.SUPPRESS)
    run.add_argument("--device", metavar="D", help="cpu, cuda, cuda:N or mps")
    run.add_argument("--dtype", metavar="T", help="float32, bfloat16 or float16")
    run.add_argument("--threads", type=int, help="torch CPU threads")
    run.add_argument("--cache-dir", metavar="DIR", help="cache of pretrained benchmark models")
    run.add_argument(
        "--no-report",
        action="store_true",
        help="skip the theorem audit and the figure set written after the runs",
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 success, 1 bug found, 2 bad input)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its message
        return int(exit_.code or 0)
    command = {"run": _run, "check": _check, "plot": _plot, "figures": _figures}[args.command]
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
    config = load_config(args.config, args.preset, overrides)
    run(config, report=not given.get("no_report", False))
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
        runs = [Path(config.out) / r["run"] for r in results]
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
