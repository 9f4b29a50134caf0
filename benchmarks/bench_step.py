"""Cost of the step statistics (issue 12): a recorded step with and without them.

The engine benchmark's model and data (``bench_engine.py``: a Llama of about 1.2M parameters,
32 x 64 tokens per task, one thread), SAGO applied, every step recorded with all six strategies,
verification off (it forms every update and would dominate the records it falls on). In one
process, recorded steps with the step statistics (``EngineConfig.record_step``, the default)
alternate with recorded steps without them, so that the drift of a shared machine hits both
alike; the ratio of their mean times is the cost of the step statistics on a recorded step.
The baseline (recorded, no step statistics) is measured in the same run.

Usage::

    python benchmarks/bench_step.py                     # 3 processes x 2 x 40 recorded steps
    python benchmarks/bench_step.py --params 100M --steps 6 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import _batches, _model, _sync, model_arguments, resolve


def _child(args: argparse.Namespace) -> dict:
    import torch

    import geomkit
    from geomkit.engine import EngineConfig, Unlearner
    from geomkit.objectives import build_objective

    geomkit.set_backend(args.backend)
    torch.set_num_threads(args.threads)
    model = _model(args)
    forget, retain = _batches(args, 1), _batches(args, 2)
    steps = args.warmup + 2 * args.steps
    config = EngineConfig(
        strategy="sago", lr=1e-5, steps=steps, record_every=1, flush_every=10, verify_every=0
    )
    times = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        unlearner = Unlearner(
            model, build_objective("graddiff"), forget, retain, config, Path(tmp) / "run"
        )
        step_model = unlearner._step_model
        device = next(model.parameters()).device
        for i in range(steps):
            on = i % 2 == 1
            unlearner._step_model = step_model if on else None
            start = time.perf_counter()
            unlearner.step()
            _sync(device)
            if i >= args.warmup:
                times[on].append(time.perf_counter() - start)
        unlearner.recorder.close()
    return {
        "with_ms": statistics.fmean(times[True]) * 1e3,
        "without_ms": statistics.fmean(times[False]) * 1e3,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    model_arguments(parser)
    parser.add_argument("--steps", type=int, default=40, help="recorded steps of each kind")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes")
    args = resolve(parser.parse_args())
    if args.child:
        print(json.dumps(_child(args)))
        return
    forwarded = [
        f"--{key}={value}"
        for key, value in vars(args).items()
        if key not in ("child", "repeats", "params") and value is not None
    ]
    runs = []
    for _ in range(args.repeats):
        output = subprocess.run(
            [sys.executable, __file__, "--child", *forwarded],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        runs.append(json.loads(output.strip().splitlines()[-1]))
    n = runs[0]["params"]
    print(
        f"# Llama: {n / 1e6:.2f}M parameters (d={args.hidden}, {args.layers} layers), batch "
        f"{args.batch}x{args.length} per task, {args.device} {args.dtype}, {args.threads} "
        f"thread(s), {args.backend} backend; every step recorded (6 strategies, no "
        f"verification), {args.steps} steps with and {args.steps} without the step statistics "
        "alternating, per process"
    )
    print("\n| process | recorded step, no step statistics (ms) | with them (ms) | ratio |")
    print("|---:|---:|---:|---:|")
    for i, run in enumerate(runs):
        ratio = run["with_ms"] / run["without_ms"]
        print(f"| {i} | {run['without_ms']:.1f} | {run['with_ms']:.1f} | {ratio:.3f} |")
    ratios = [run["with_ms"] / run["without_ms"] for run in runs]
    print(f"\nmedian ratio {statistics.median(ratios):.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
