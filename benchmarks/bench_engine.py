"""Overhead of geomkit's two-pass step and of recording, on a tiny Llama on the CPU.

Each configuration runs in its own fresh process (so that peak memory is its own) and reports
the mean time per optimizer step after warm-up (a mean, not a median, so that the steps that
record or flush every 10 steps count in (d)):

(a) plain GradDiff: one summed backward of ``-NLL(forget) + NLL(retain)``, AdamW, no geomkit;
(b) geomkit two-pass SAGO (``Unlearner``) without recording;
(c) the same, recording every step with all six strategies (applied + five shadows), the closed
    forms verified at the default schedule (the first record and every ``VERIFY_EVERY``-th);
(d) the same, recording every 10 steps;
(e) as (c), verifying every 10th record (the cost of a denser verification schedule).

Peak memory is measured per configuration: the process's peak resident set (``ru_maxrss``) on
the CPU, reported whole and as the growth over the resident set once the model and the data
were built ("step peak": gradients, optimizer state, activations, temporaries), or
``torch.cuda.max_memory_allocated`` on CUDA. geomkit's step holds two gradient-sized buffers
(forget, then the update in place, and retain); plain GradDiff holds one ``.grad`` but the
activations of both batches at once.

Usage::

    python benchmarks/bench_engine.py                 # d=128, 4 layers (~1M parameters)
    python benchmarks/bench_engine.py --params 100M   # d=768, 9 layers, vocab 8192 (~98M)
    python benchmarks/bench_engine.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {
    "1M": {"hidden": 128, "layers": 4, "vocab": 512},
    "100M": {"hidden": 768, "layers": 9, "vocab": 8192},
}
"""``--params`` presets: Llama shapes (intermediate size 4 x hidden, untied embeddings) of about
1.2M and 98M parameters; explicit ``--hidden``/``--layers``/``--vocab`` override them."""

CONFIGS = {
    "a": "plain GradDiff (one summed backward, no geomkit)",
    "b": "geomkit two-pass SAGO, no recording",
    "c": "geomkit SAGO, recording every step, 6 strategies",
    "d": "geomkit SAGO, recording every 10 steps",
    "e": "as (c), verifying every 10th record",
}


PAIRED = {
    "p50": "recording every other step, verifying the default every 50th record",
    "p10": "recording every other step, verifying every 10th record",
}
"""Paired measurements in one process: recorded and unrecorded steps alternate, so that the
drift of a shared machine (often +-10% between processes here) hits both alike; the ratio of
their mean times is the cost of recording a step."""
PAIRED_RECORDS = 50


def _model(args):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.length,
        tie_word_embeddings=False,
    )
    dtype = getattr(torch, args.dtype)
    return transformers.LlamaForCausalLM(config).to(device=args.device, dtype=dtype)


def _batches(args, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(8):
        x = torch.randint(0, args.vocab, (args.batch, args.length), generator=g)
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})
    return out


def _child(args) -> None:
    import torch

    import geomkit

    geomkit.set_backend(args.backend)
    torch.set_num_threads(args.threads)
    model = _model(args)
    forget, retain = _batches(args, 1), _batches(args, 2)
    built_kib = _rss_kib()  # the model and the data, before any step
    steps = args.warmup + args.steps
    times: list[float] = []
    recorded: list[bool] = []
    if args.config == "a":
        params = [p for p in model.parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        device = next(model.parameters()).device
        for step in range(steps):
            start = time.perf_counter()
            fb = {k: v.to(device) for k, v in forget[step % 8].items()}
            rb = {k: v.to(device) for k, v in retain[step % 8].items()}
            loss = -model(**fb).loss + model(**rb).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            _sync(device)
            times.append(time.perf_counter() - start)
    else:
        from geomkit.engine import EngineConfig, Unlearner
        from geomkit.objectives import build_objective

        record_every = {"b": 0, "c": 1, "d": 10, "e": 1}.get(args.config, 2)
        verify = {"e": 10, "p10": 10}.get(args.config, EngineConfig.verify_every)
        if args.config in PAIRED:  # 2 x 50 records: the verified ones in proportion
            steps = args.warmup + 2 * PAIRED_RECORDS
        config = EngineConfig(
            strategy="sago",
            lr=1e-5,
            steps=steps,
            record_every=record_every,
            flush_every=10,
            verify_every=verify,
        )
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run" if record_every else None
            unlearner = Unlearner(model, build_objective("graddiff"), forget, retain, config, out)
            device = next(model.parameters()).device
            for _ in range(steps):
                start = time.perf_counter()
                result = unlearner.step()
                _sync(device)
                times.append(time.perf_counter() - start)
                recorded.append(result.recorded)
            if unlearner.recorder is not None:
                unlearner.recorder.close()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gradient_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    cuda_peak = None
    if args.device == "cuda":
        cuda_peak = torch.cuda.max_memory_allocated() / 2**20
    n_params = sum(p.numel() for p in model.parameters())
    timed = list(zip(times, recorded or [False] * len(times), strict=True))[args.warmup :]
    on = [t for t, r in timed if r]
    off = [t for t, r in timed if not r]
    print(
        json.dumps(
            {
                "mean_ms": statistics.fmean(times[args.warmup :]) * 1e3,
                "recorded_ms": statistics.fmean(on) * 1e3 if on else None,
                "unrecorded_ms": statistics.fmean(off) * 1e3 if off else None,
                "peak_rss_mib": peak_kib / 1024,
                "step_peak_mib": (peak_kib - built_kib) / 1024,
                "gradient_mib": gradient_mib,
                "cuda_peak_mib": cuda_peak,
                "params": n_params,
            }
        )
    )


def _rss_kib() -> int:
    """The current resident set of this process in KiB (Linux ``/proc``; else the peak)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * resource.getpagesize() // 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, data and hardware flags shared with ``bench_step.py``."""
    parser.add_argument(
        "--params", choices=list(PRESETS), default="1M", help="model size preset (Llama shape)"
    )
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--batch", type=int, default=32, help="sequences per task (paper: 32)")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backend", default="eager", choices=["eager", "compiled"])


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the shape flags left unset from the ``--params`` preset."""
    for key, value in PRESETS[args.params].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=[*CONFIGS, *PAIRED], help=argparse.SUPPRESS)
    model_arguments(parser)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per config")
    args = resolve(parser.parse_args())
    if args.config:
        _child(args)
        return
    results: dict[str, dict] = {}
    paired: dict[str, list[float]] = {}
    forwarded = [
        f"--{key}={value}"
        for key, value in vars(args).items()
        if key not in ("config", "repeats", "params") and value is not None
    ]
    for _ in range(args.repeats):  # interleave configs so drift hits them alike
        for key in [*CONFIGS, *PAIRED]:
            output = subprocess.run(
                [sys.executable, __file__, "--config", key, *forwarded],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            run = json.loads(output.strip().splitlines()[-1])
            if key in PAIRED:
                paired.setdefault(key, []).append(run["recorded_ms"] / run["unrecorded_ms"])
                continue
            best = results.get(key)
            if best is None or run["mean_ms"] < best["mean_ms"]:
                results[key] = run
    n = results["a"]["params"]
    print(
        f"# Llama: {n / 1e6:.2f}M parameters (d={args.hidden}, {args.layers} layers, vocab "
        f"{args.vocab}), batch {args.batch}x{args.length} per task, {args.device} {args.dtype}, "
        f"{args.threads} thread(s), {args.backend} backend; best of {args.repeats} processes of "
        f"the mean of "
        f"{args.steps} steps"
    )
    print()
    cuda = results["a"]["cuda_peak_mib"] is not None
    kind = "peak CUDA MiB" if cuda else "peak RSS MiB"
    print(
        f"| config | mean ms / step | ratio to (b) | {kind} | peak vs (a) | step peak MiB | "
        "step peak vs (a) | step peak / gradient |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, label in CONFIGS.items():
        r = results[key]
        peak = r["cuda_peak_mib"] if cuda else r["peak_rss_mib"]
        base = results["a"]["cuda_peak_mib"] if cuda else results["a"]["peak_rss_mib"]
        step, step_base = r["step_peak_mib"], results["a"]["step_peak_mib"]
        print(
            f"| ({key}) {label} | {r['mean_ms']:.1f} | "
            f"{r['mean_ms'] / results['b']['mean_ms']:.3f} | {peak:.0f} | "
            f"{peak / base:.2f} | {step:.0f} | {step / step_base:.2f} | "
            f"{step / r['gradient_mib']:.2f} |"
        )
    print(f"\n# one gradient: {results['a']['gradient_mib']:.0f} MiB")
    print(
        f"\n# paired, in one process ({PAIRED_RECORDS} recorded steps alternating with "
        f"{PAIRED_RECORDS} unrecorded ones, after {args.warmup}): recorded / unrecorded step, "
        "per process"
    )
    for key, label in PAIRED.items():
        ratios = ", ".join(f"{x:.3f}" for x in paired[key])
        print(f"- {label}: median {statistics.median(paired[key]):.3f} ({ratios})")


if __name__ == "__main__":
    main()
