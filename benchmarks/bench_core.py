"""Benchmark geomkit's strategies and statistics against the bandwidth floor and a baseline.

Times, on one synthetic model gradient of about 50M float32 elements split into the tensor sizes
of a small Llama-style transformer, the median over repeats of:

* the floor: ``torch.add(f, r)`` per tensor (same output allocation as a strategy) and
  ``torch.add(f, r, out=buf)`` (the floor for ``out=``);
* baseline (a): the released SAGO code's approach, re-implemented here - boolean-index
  assignment with a sign-product mask for SAGO, and per-tensor PCGrad with ``.item()``;
* geomkit ``sago``, ``pcgrad``, ``sum`` on the eager and the compiled backend, allocating and
  with ``out=``;
* geomkit statistics: the six-strategy shadow statistics and the applied-update statistics.

Every row prints its ratio to the matching floor measured in the same run.

Usage::

    python benchmarks/bench_core.py                 # 50M elements, 7 repeats
    python benchmarks/bench_core.py --elements 5e6  # quicker
"""

from __future__ import annotations

import argparse
import platform
import statistics as pystats
import time
from collections.abc import Callable

import torch

import geomkit
from geomkit import statistics as gstats
from geomkit import strategies


def model_shapes(target: int) -> list[tuple[int, ...]]:
    """Shapes of a Llama-style model (d=640, ffn=1728, vocab <= 16000) with ``target`` elements."""
    d, ffn = 640, 1728
    vocab = max(256, min(16000, target // (5 * d)))
    block = [(d, d)] * 4 + [(ffn, d), (ffn, d), (d, ffn), (d,), (d,)]
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    total = vocab * d + d
    while True:
        size = sum(torch.Size(s).numel() for s in block)
        if total + size > target:
            break
        shapes += block
        total += size
    remaining = target - total
    if remaining > 0:  # one extra projection-sized tensor tops the count up
        shapes.append((remaining,))
    shapes.append((d,))
    return shapes


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return pystats.median(times) * 1e3


# ------------------------------------------------------------------------------------------
# Baseline (a): the released code's approach, written out here for comparison only.
# ------------------------------------------------------------------------------------------


def baseline_sago(forget, retain, alpha=1.0, gamma=1.0):
    out = []
    for f, r in zip(forget, retain, strict=True):
        d = gamma * f.clone()
        mask = (torch.sign(f) * torch.sign(r)) < 0
        d[mask] = alpha * r[mask]
        out.append(d)
    return out


def baseline_pcgrad(forget, retain, alpha=1.0, gamma=1.0):
    out = []
    for f, r in zip(forget, retain, strict=True):
        dot = torch.dot(f.flatten(), r.flatten()).item()
        if dot < 0:
            f = f - dot / (r.norm() ** 2 + 1e-10) * r
        out.append(gamma * f + alpha * r)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=float, default=50e6)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backends", nargs="+", default=["eager", "compiled"])
    args = parser.parse_args()

    torch.manual_seed(0)
    shapes = model_shapes(int(args.elements))
    forget = [torch.randn(s) for s in shapes]
    retain = [torch.randn(s) * 0.5 - 0.1 * f for s, f in zip(shapes, forget, strict=True)]
    bufs = [torch.empty_like(f) for f in forget]
    n = sum(f.numel() for f in forget)
    print(
        f"# geomkit {geomkit.__version__} core benchmark: {n / 1e6:.1f}M float32 elements in "
        f"{len(shapes)} tensors; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()} ({platform.processor() or 'cpu'}); median of {args.repeats}"
    )

    def floor():
        return [torch.add(f, r) for f, r in zip(forget, retain, strict=True)]

    def floor_out():
        return [torch.add(f, r, out=b) for f, r, b in zip(forget, retain, bufs, strict=True)]

    rows: list[tuple[str, float, str]] = []
    add_ms = median_ms(floor, args.repeats)
    add_out_ms = median_ms(floor_out, args.repeats)
    rows.append(("floor: torch.add(f, r)", add_ms, "add"))
    rows.append(("floor: torch.add(f, r, out=buf)", add_out_ms, "add_out"))
    rows.append(
        (
            "baseline (a) SAGO: boolean-index assignment",
            median_ms(lambda: baseline_sago(forget, retain), args.repeats),
            "add",
        )
    )
    rows.append(
        (
            "baseline (a) PCGrad per tensor with .item()",
            median_ms(lambda: baseline_pcgrad(forget, retain), args.repeats),
            "add",
        )
    )

    shadows = [strategies.build(name) for name in strategies.names()]
    sago = strategies.build("sago")
    for backend in args.backends:
        with geomkit.use_backend(backend):
            compile_start = time.perf_counter()
            for name in ("sago", "pcgrad", "sum"):
                strategy = strategies.build(name)
                strategy(forget, retain)
                strategy(forget, retain, out=bufs)
            gstats.shadow(forget, retain, shadows)
            gstats.sufficient(forget, retain, sago(forget, retain), strategy=sago)
            warmup = time.perf_counter() - compile_start
            print(f"# {backend}: first call of every kernel (incl. compilation) {warmup:.1f} s")
            for name in ("sago", "pcgrad", "sum"):
                strategy = strategies.build(name)
                rows.append(
                    (
                        f"geomkit {name} [{backend}]",
                        median_ms(lambda s=strategy: s(forget, retain), args.repeats),
                        "add",
                    )
                )
                rows.append(
                    (
                        f"geomkit {name} out= [{backend}]",
                        median_ms(lambda s=strategy: s(forget, retain, out=bufs), args.repeats),
                        "add_out",
                    )
                )
            rows.append(
                (
                    f"geomkit statistics, 6 shadow strategies [{backend}]",
                    median_ms(
                        lambda: gstats.to_numpy(gstats.shadow(forget, retain, shadows)),
                        args.repeats,
                    ),
                    "add",
                )
            )
            rows.append(
                (
                    f"geomkit statistics of applied (f, r, d) [{backend}]",
                    median_ms(
                        lambda: gstats.to_numpy(gstats.sufficient(forget, retain, bufs)),
                        args.repeats,
                    ),
                    "add",
                )
            )

    floors = {"add": add_ms, "add_out": add_out_ms}
    baselines = {
        "sago": rows[2][1],
        "pcgrad": rows[3][1],
    }
    print()
    print("| what | median ms | x floor | speed-up vs baseline (a) |")
    print("|---|---:|---:|---:|")
    for name, ms, kind in rows:
        rule = name.split()[1] if name.startswith("geomkit") else ""
        speedup = f"{baselines[rule] / ms:.1f}x" if rule in baselines else ""
        floor_name = "add" if kind == "add" else "add out="
        print(f"| {name} | {ms:.1f} | {ms / floors[kind]:.2f} ({floor_name}) | {speedup} |")


if __name__ == "__main__":
    main()
