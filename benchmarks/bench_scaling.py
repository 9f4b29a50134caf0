"""How the cost of recording scales with model size, on the CPU, and a projection to 8B on a GPU.

For Llama-shaped models of about 1M, 10M, 34M (33.7M, 75 tensors), 50M and 100M parameters (one
torch thread, float32, the eager backend unless ``--backend``), each configuration runs in a
fresh process:

``paired``
    geomkit two-pass SAGO (``Unlearner``) recording every other step with all six strategies
    (applied + five shadows), verification off: the recorded and the unrecorded steps of the
    same process are averaged separately (the drift of a shared machine hits both alike);
``stats``
    no training: on random gradients of the model's parameter shapes, the six-strategy shadow
    statistics (:func:`geomkit.statistics.shadow`), the applied-update statistics
    (:func:`geomkit.statistics.sufficient`) and one verified record (every strategy's update
    formed and measured, :meth:`geomkit.recorder.Recorder.verify`), timed directly.

The overhead of recording every step is ``recorded / unrecorded`` from ``paired``, and with the
default verification (the first record and every 50th) ``(recorded + verify / 50) /
unrecorded``.

Repetitions are interleaved (size by size, config by config) so that drift of a shared machine
hits every configuration alike; each row keeps the fastest process. The table gives the mean
step time of each, their ratio and the statistics' cost per parameter; ``--plot`` writes the
overhead ratio against the parameter count (log x).

The last section is a PROJECTION, not a measurement: the statistics' time for an 8B-parameter
model on one GPU, from the bytes each backend's kernels move per element and an assumed memory
bandwidth (both printed, both options).

Usage::

    python benchmarks/bench_scaling.py --plot scaling.png           # 1M .. 100M, ~10 min
    python benchmarks/bench_scaling.py --sizes 1M 10M --steps 3     # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from geomkit.recorder import VERIFY_EVERY

SIZES: dict[str, dict[str, int]] = {
    # Llama blocks: 16 d^2 per layer (q, k, v, o and a 4d-wide gated MLP) + 2 x vocab x d
    "1M": {"hidden": 128, "layers": 4, "vocab": 512},
    "10M": {"hidden": 256, "layers": 8, "vocab": 4096},
    "34M": {"hidden": 512, "layers": 8, "vocab": 128},  # the 33.7M, 75 tensors
    "50M": {"hidden": 512, "layers": 10, "vocab": 8192},
    "100M": {"hidden": 768, "layers": 10, "vocab": 4096},
}
CONFIGS = ("paired", "stats")

# Projection assumptions (see --help): bytes each backend moves per gradient element at one
# recorded step, counted from the kernels' operations (geomkit.kernels).
FUSED_BYTES_PER_ELEMENT = 2 * 2 * 2 + 7 * 3 * 2 / 50
"""Compiled (fused) backend, bfloat16 gradients: two passes reading f and r (2 bytes each),
plus the verified record every 50th (six updates formed and measured with f, r and d, and one
pass of dot products)."""
EAGER_BYTES_PER_ELEMENT = 700.0
"""Eager backend, bfloat16 gradients: the float64 rows of the packed kernels, each operation
reading and writing device memory (about 230 bytes per element for the Gramian pass, 440 for the
four uniform rules' moments, and 30 for the verified record every 50th)."""


def _model(size: dict[str, int], length: int):
    import torch
    import transformers

    torch.manual_seed(0)
    hidden = size["hidden"]
    config = transformers.LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=size["layers"],
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=length,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


def _batches(vocab: int, batch: int, length: int, seed: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(4):
        x = torch.randint(0, vocab, (batch, length), generator=g)
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})
    return out


def _child(args: argparse.Namespace) -> dict:
    import torch

    import geomkit
    from geomkit import statistics as gstats
    from geomkit import strategies

    torch.set_num_threads(1)
    geomkit.set_backend(args.backend)
    size = SIZES[args.size]
    model = _model(size, args.length)
    params = [p for p in model.parameters() if p.requires_grad]
    result = {"params": sum(p.numel() for p in params), "tensors": len(params)}
    if args.config == "stats":
        g = torch.Generator().manual_seed(0)
        forget = [torch.randn(p.shape, generator=g) for p in params]
        retain = [
            torch.randn(p.shape, generator=g) - 0.1 * f for p, f in zip(params, forget, strict=True)
        ]
        shadows = [strategies.build(name) for name in strategies.names()]
        sago = strategies.build("sago")
        update = sago(forget, retain)

        def timed(fn) -> float:
            fn()  # warm-up (and compilation)
            best = float("inf")
            for _ in range(max(1, args.steps)):
                start = time.perf_counter()
                value = fn()
                if isinstance(value, torch.Tensor):
                    gstats.to_numpy(value)  # waits for the device
                best = min(best, time.perf_counter() - start)
            return best * 1e3

        result["shadow_ms"] = timed(lambda: gstats.shadow(forget, retain, shadows))
        result["sufficient_ms"] = timed(
            lambda: gstats.sufficient(forget, retain, update, strategy=sago)
        )
        from geomkit.recorder import Recorder

        with tempfile.TemporaryDirectory() as tmp:
            names = [f"t{j}" for j in range(len(params))]
            numel = [p.numel() for p in params]
            recorder = Recorder(Path(tmp) / "g.zarr", names, numel, "sago", verify_every=1)
            measured = recorder.measure(forget, retain)
            result["verify_ms"] = timed(lambda: recorder.verify(forget, retain, measured))
            recorder.close()
        return result
    from geomkit.engine import EngineConfig, Unlearner
    from geomkit.objectives import build_objective

    forget = _batches(size["vocab"], args.batch, args.length, 1)
    retain = _batches(size["vocab"], args.batch, args.length, 2)
    steps = args.warmup + 2 * args.steps
    config = EngineConfig(
        strategy="sago", lr=1e-5, steps=steps, record_every=2, flush_every=10, verify_every=0
    )
    times, recorded = [], []
    with tempfile.TemporaryDirectory() as tmp:
        unlearner = Unlearner(
            model, build_objective("graddiff"), forget, retain, config, Path(tmp) / "run"
        )
        for _ in range(steps):
            start = time.perf_counter()
            done = unlearner.step()
            times.append(time.perf_counter() - start)
            recorded.append(done.recorded)
        unlearner.recorder.close()
    timed_steps = list(zip(times, recorded, strict=True))[args.warmup :]
    result["recorded_ms"] = statistics.fmean(t for t, r in timed_steps if r) * 1e3
    result["plain_ms"] = statistics.fmean(t for t, r in timed_steps if not r) * 1e3
    return result


def _run(args: argparse.Namespace, size: str, config: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        f"--size={size}",
        f"--config={config}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--batch={args.batch}",
        f"--length={args.length}",
        f"--backend={args.backend}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{size} {config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _plot(rows: list[dict], path: str, tokens: str = "8 x 128") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    x = [r["params"] for r in rows]
    ax.plot(x, [r["ratio"] for r in rows], "o-", label="recording every step (largest)")
    each_x = [r["params"] for r in rows for _ in r["ratios"]]
    each_y = [v for r in rows for v in r["ratios"]]
    ax.plot(each_x, each_y, ".", color="C0", alpha=0.6, label="each process")
    ax.plot(
        x,
        [r["ratio_verified"] for r in rows],
        "s--",
        label=f"+ verified record / {VERIFY_EVERY} (computed)",
    )
    ax.axhline(1.05, color="grey", linestyle="--", linewidth=0.8, label="1.05x target")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("recorded / unrecorded step")
    ax.set_ylim(bottom=1.0)  # 1 = recording costs nothing
    ax.set_title(
        f"Recording every step, 6 strategies (eager, CPU, 1 thread)\n{tokens} tokens per "
        "task; 2 recorded + 2 unrecorded steps per process",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="upper right", ncols=2)
    ax.set_ylim(top=max(r["ratio_verified"] for r in rows) * 1.08)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved processes")
    parser.add_argument("--batch", type=int, default=8, help="sequences per task")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--backend", default="eager", choices=["eager", "compiled"])
    parser.add_argument("--plot", help="write the overhead plot here (png, pdf, svg)")
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument(
        "--gpu-bandwidth", type=float, default=3.0e12, help="projection: bytes/s (3 TB/s)"
    )
    parser.add_argument(
        "--gpu-step-s", type=float, default=1.0, help="projection: 8B step time in seconds"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return

    paired: dict[str, list[dict]] = {}
    stats: dict[str, dict] = {}
    for _ in range(args.repeats):
        for size in args.sizes:
            paired.setdefault(size, []).append(_run(args, size, "paired"))
            run = _run(args, size, "stats")
            if size not in stats or run["shadow_ms"] < stats[size]["shadow_ms"]:
                stats[size] = run
    rows = []
    for size in args.sizes:
        runs = paired[size]
        ratios = [r["recorded_ms"] / r["plain_ms"] for r in runs]
        largest = max(range(len(runs)), key=lambda i: ratios[i])  # the conservative one
        run, st = runs[largest], stats[size]
        verified = (run["recorded_ms"] + st["verify_ms"] / VERIFY_EVERY) / run["plain_ms"]
        rows.append(
            {
                "size": size,
                "params": run["params"],
                "tensors": run["tensors"],
                "plain_ms": run["plain_ms"],
                "recorded_ms": run["recorded_ms"],
                "ratio": ratios[largest],
                "ratios": ratios,
                "ratio_verified": verified,
                "shadow_ms": st["shadow_ms"],
                "sufficient_ms": st["sufficient_ms"],
                "verify_ms": st["verify_ms"],
            }
        )
    print(
        f"# geomkit recording overhead by model size: CPU, 1 thread, float32, {args.backend} "
        f"backend, {args.batch} x {args.length} tokens per task; {args.steps} recorded steps "
        f"alternating with {args.steps} unrecorded ones after {args.warmup}, in one process; "
        f"the process with the largest ratio of {args.repeats} (each process's ratio listed)"
    )
    print()
    print(
        "| size | params | tensors | unrecorded ms | recorded ms | ratio | each process | ratio "
        f"with verification every {VERIFY_EVERY}th | shadow (6) ns/param | sufficient ns/param "
        "| verified record ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        n = r["params"]
        print(
            f"| {r['size']} | {n / 1e6:.1f}M | {r['tensors']} | {r['plain_ms']:.0f} | "
            f"{r['recorded_ms']:.0f} | {r['ratio']:.3f} | "
            f"{', '.join(f'{x:.3f}' for x in r['ratios'])} | {r['ratio_verified']:.3f} | "
            f"{r['shadow_ms'] * 1e6 / n:.1f} | {r['sufficient_ms'] * 1e6 / n:.1f} | "
            f"{r['verify_ms']:.0f} |"
        )
    largest = max(rows, key=lambda r: r["params"])
    per_element = largest["shadow_ms"] * 1e6 / largest["params"]
    n8b = 8.0e9
    print()
    print(
        f"PROJECTION (not a measurement) for an 8B-parameter model on one GPU, bfloat16 "
        f"gradients, recording every step: assumed memory bandwidth "
        f"{args.gpu_bandwidth / 1e12:.1f} TB/s, assumed step time {args.gpu_step_s:.1f} s, "
        "statistics bandwidth-bound (bytes per element counted from the kernels)."
    )
    for label, per in (
        ("compiled (fused)", FUSED_BYTES_PER_ELEMENT),
        ("eager", EAGER_BYTES_PER_ELEMENT),
    ):
        seconds = n8b * per / args.gpu_bandwidth
        print(
            f"- {label}: {per:.1f} bytes/element -> {seconds * 1e3:.0f} ms per record, "
            f"{1 + seconds / args.gpu_step_s:.3f}x the step"
        )
    print(
        f"- for scale, the measured CPU cost ({per_element:.1f} ns/element for the six "
        f"shadows at {largest['size']}, one thread) would be {per_element * n8b / 1e9:.0f} s "
        "per record on one CPU core."
    )
    if args.plot:
        _plot(rows, args.plot, f"{args.batch} x {args.length}")
        print(f"\nplot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
