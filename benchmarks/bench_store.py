"""Benchmark the run store at the size of an 8B model: append, open, read, group.

A full run of a Llama-3-8B-shaped model records 291 tensors (32 blocks of 9, plus embedding,
final norm and output head) x 6 strategies at every recorded step. This script writes a
synthetic store of that shape with :class:`geomkit.store.RunWriter` (the writer the recorder's
background thread calls), then reports, all measured in this one run:

- append throughput: records/s and MB/s of statistics (``--flush-every`` records per append,
  as the recorder flushes), and the store's size on disk;
- ``open_run`` time (it reads and verifies every chunk once);
- reading one record (every tensor, every per-record variable) and one tensor's history (every
  record), median of several;
- ``ds.geom.metrics(by="layer")``: time and peak resident memory, in a fresh process;
- with ``--baseline R,T``: the same reads on a second store chunked ``R`` records x ``T``
  tensors (``16,291`` is the layout before lazy opening), as ratios.

    python benchmarks/bench_store.py                  # 10,000 records: ~1 GB of disk, minutes
    python benchmarks/bench_store.py --records 500    # a quick look

The statistics are random (float and count fields alike), so they barely compress: sizes are
an upper bound. The store is written under ``--dir`` (default: a temporary directory, removed
at the end unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from geomkit.layers import locate_all
from geomkit.store import RunWriter, open_run
from geomkit.store_schema import _RECORD_VARS, _STEP_VARS, _VERIFY_VARS, VARIABLES

STRATEGIES = ["sago", "sum", "pcgrad", "pcgrad_global", "sago_prefer_retain", "blur"]
HIDDEN, KV, FFN, VOCAB = 4096, 1024, 14336, 128256  # Llama-3-8B


def llama_tensors(layers: int) -> tuple[list[str], list[int]]:
    """Names and sizes of a Llama-3-8B-shaped model's parameter tensors."""
    names, numel = ["model.embed_tokens.weight"], [VOCAB * HIDDEN]
    block = {
        "self_attn.q_proj.weight": HIDDEN * HIDDEN,
        "self_attn.k_proj.weight": KV * HIDDEN,
        "self_attn.v_proj.weight": KV * HIDDEN,
        "self_attn.o_proj.weight": HIDDEN * HIDDEN,
        "mlp.gate_proj.weight": FFN * HIDDEN,
        "mlp.up_proj.weight": FFN * HIDDEN,
        "mlp.down_proj.weight": FFN * HIDDEN,
        "input_layernorm.weight": HIDDEN,
        "post_attention_layernorm.weight": HIDDEN,
    }
    for i in range(layers):
        for name, n in block.items():
            names.append(f"model.layers.{i}.{name}")
            numel.append(n)
    names += ["model.norm.weight", "lm_head.weight"]
    numel += [HIDDEN, VOCAB * HIDDEN]
    return names, numel


def record_block(n: int, tensors: int, strategies: int, rng: np.random.Generator) -> dict:
    """``n`` records of random statistics (no verification variables: written as NaN)."""
    block: dict[str, np.ndarray] = {}
    for name in _RECORD_VARS:
        spec = VARIABLES[name]
        shape = (n, tensors) if len(spec["dims"]) == 2 else (n, strategies, tensors)
        if spec["dtype"] == "int64":
            block[name] = rng.integers(0, 1 << 30, size=shape)
        else:
            block[name] = rng.normal(size=shape)
    return block


def step_block(steps: np.ndarray, rng: np.random.Generator) -> dict:
    block = {"step": steps}
    for name in _STEP_VARS:
        block[name] = rng.random(len(steps)) < 0.01 if name == "skipped" else rng.random(len(steps))
    return block


def write(
    path: Path, args: argparse.Namespace, chunks: tuple[int | None, int | None]
) -> dict[str, float]:
    names, numel = llama_tensors(args.layers)
    strategies = STRATEGIES[: args.strategies]
    writer = RunWriter(
        path,
        locate_all(names),
        numel,
        strategies,
        {"model": "synthetic Llama-3-8B", "objective": "graddiff"},
        record_chunk=chunks[0],
        tensor_chunk=chunks[1],
    )
    rng = np.random.default_rng(0)
    records = record_block(args.flush_every, len(names), len(strategies), rng)
    per_record = sum(a[0].nbytes for a in records.values())
    per_record += 8 * len(strategies) * len(names) * len(_VERIFY_VARS)  # written as NaN
    elapsed, cpu, done = 0.0, 0.0, 0
    while done < args.records:
        n = min(args.flush_every, args.records - done)
        steps = np.arange(done, done + n)
        block = record_block(n, len(names), len(strategies), rng)  # fresh values each time
        block["record"] = steps
        steps_block = step_block(steps, rng)
        start, start_cpu = time.perf_counter(), time.process_time()
        writer.append(steps_block, block)
        elapsed += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        done += n
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {
        "records": done,
        "append_s": elapsed,
        "append_cpu_s": cpu,
        "records_per_s": done / elapsed,
        "mb_per_s": done * per_record / elapsed / 1e6,
        "record_mb": per_record / 1e6,
        "disk_gb": disk / 1e9,
    }


def reads(path: Path, repeats: int) -> dict[str, float]:
    start = time.perf_counter()
    ds = open_run(path)
    opened = time.perf_counter() - start
    variables = ds[[n for n in ds.data_vars if "record" in ds[n].dims]]
    rng = np.random.default_rng(1)

    def median(select: dict) -> float:
        times = []
        for value in select["at"]:
            start = time.perf_counter()
            variables.isel({select["dim"]: int(value)}).compute()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    step = median({"dim": "record", "at": rng.integers(0, ds.sizes["record"], repeats)})
    tensor = median({"dim": "tensor", "at": rng.integers(0, ds.sizes["tensor"], repeats)})
    chunks = ds["dr"].data.chunksize
    return {"open_s": opened, "read_step_s": step, "read_tensor_s": tensor, "chunks": chunks}


_GROUPED = """
import json, resource, sys, time
import geomkit
start = time.perf_counter()
ds = geomkit.open_run(sys.argv[1])
opened = time.perf_counter() - start
rss_open = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
m = ds.geom.metrics(by="layer")
print(json.dumps({
    "open_s": opened, "metrics_s": time.perf_counter() - start,
    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "peak_rss_open_gb": rss_open / 2**20, "result_gb": m.nbytes / 1e9,
    "sizes": dict(m.sizes),
}))
"""


def grouped(path: Path) -> dict:
    """``metrics(by="layer")`` in a fresh process: its time and peak RSS (Linux)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run(
        [sys.executable, "-c", _GROUPED, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--layers", type=int, default=32, help="blocks (32: 291 tensors)")
    parser.add_argument("--strategies", type=int, default=6, choices=range(1, 7))
    parser.add_argument("--flush-every", type=int, default=10, help="records per append")
    parser.add_argument("--record-chunk", type=int, default=None)
    parser.add_argument("--tensor-chunk", type=int, default=None)
    parser.add_argument("--baseline", default=None, help="R,T: also read a store chunked so")
    parser.add_argument("--repeats", type=int, default=5, help="reads per median")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.dir))
    report: dict = {"shape": None}
    try:
        names, _ = llama_tensors(args.layers)
        report["shape"] = dict(records=args.records, tensors=len(names), strategies=args.strategies)
        print(
            f"shape: {args.records} records x {len(names)} tensors x {args.strategies} strategies"
        )
        layouts = {"default": (args.record_chunk, args.tensor_chunk)}
        if args.baseline:
            r, t = (int(v) for v in args.baseline.split(","))
            layouts[f"baseline {r}x{t}"] = (r, t)
        for label, chunks in layouts.items():
            path = root / label.replace(" ", "_") / "geometry.zarr"
            w = write(path, args, chunks)
            r = reads(path, args.repeats)
            report[label] = {**w, **r}
            print(
                f"[{label}] chunks {r['chunks']}: append {w['records_per_s']:.1f} records/s "
                f"({w['mb_per_s']:.1f} MB/s, {w['record_mb'] * 1e3:.0f} kB a record; "
                f"CPU {w['append_cpu_s'] / w['records'] * 1e3:.0f} ms a record), "
                f"{w['disk_gb']:.2f} GB on disk; open_run {r['open_s']:.2f} s; "
                f"read one record {r['read_step_s'] * 1e3:.1f} ms, "
                f"one tensor's history {r['read_tensor_s'] * 1e3:.1f} ms",
                flush=True,
            )
            if label == "default":
                g = grouped(path)
                report[label]["metrics_by_layer"] = g
                print(
                    f"[{label}] metrics(by='layer') in a fresh process: {g['metrics_s']:.1f} s, "
                    f"peak RSS {g['peak_rss_gb']:.2f} GB (after open_run "
                    f"{g['peak_rss_open_gb']:.2f} GB; result {g['result_gb']:.2f} GB)",
                    flush=True,
                )
            if label != "default" and not args.keep:
                shutil.rmtree(path.parent)
        if args.baseline:
            base, new = report[f"baseline {args.baseline.replace(',', 'x')}"], report["default"]
            print(
                "ratios baseline/default: "
                + ", ".join(
                    f"{k} {base[k] / new[k]:.2f}x"
                    for k in ("append_s", "open_s", "read_step_s", "read_tensor_s")
                )
            )
    finally:
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")


if __name__ == "__main__":
    main()
