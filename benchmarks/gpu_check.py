"""One-shot GPU check of geomkit: the CUDA tests, an engine benchmark, one JSON report.

On a CUDA machine, within ``--budget-s`` seconds (default 450) and without network, it

1. runs ``pytest -m cuda tests/test_cuda.py`` in a subprocess with a timeout and records the
   pass/fail counts and the failures;
2. benchmarks the engine on a Llama-shaped model initialised locally at random (default: hidden
   2048, 16 layers, intermediate 5632, vocab 32000, 16 heads: 953,223,168 parameters, bfloat16),
   timing a CUDA-synchronised optimizer step after warm-up and the peak CUDA memory of each of

   ``plain``              plain GradDiff: one summed backward of -NLL(forget) + NLL(retain), AdamW;
   ``two_pass``           geomkit's two-pass step (``Unlearner``, SAGO), no recording;
   ``record_every_step``  the same, recording every step with all six strategies;
   ``record_every_10``    the same, recording every 10 steps;

   each in a fresh process (``--isolation process``), ratios to ``two_pass`` from the same run;
3. writes one JSON report (``--out``): machine, tests, benchmark table, ratios, errors. A failure
   in one section is recorded and the others still run; configurations that would overrun the
   budget are skipped with a note. The report is rewritten after every section.

Without CUDA it prints why it skips, writes ``{"cuda": false, "skipped": ...}`` and exits 0.
``--device cpu --allow-cpu`` with a small model (``--hidden 32 --layers 2 ...``) runs every
section on the CPU, to test the script itself (tests/test_gpu_check.py). The exit status is 1
when a test failed or a section or configuration errored, else 0. See docs/gpu.md.

Usage::

    python benchmarks/gpu_check.py --out gpu_check.json
    python benchmarks/gpu_check.py --device cpu --allow-cpu --hidden 32 --layers 2 \\
        --intermediate 64 --vocab 64 --heads 2 --batch 2 --length 16 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: geomkit is imported from here (it need not be installed)."""
SCHEMA = "geomkit.gpu_check/1"
RESULT_MARKER = "GPU_CHECK_RESULT "
"""Prefix of the one line a benchmark child prints its JSON result on."""
CONFIGS: dict[str, str] = {
    "plain": "plain GradDiff (one summed backward, AdamW, no geomkit)",
    "two_pass": "geomkit two-pass SAGO (Unlearner), no recording",
    "record_every_step": "geomkit SAGO, recording every step, all 6 strategies",
    "record_every_10": "geomkit SAGO, recording every 10 steps, all 6 strategies",
}
"""Benchmark configurations, in the report's order."""
RUN_ORDER: tuple[str, ...] = ("two_pass", "record_every_step", "plain", "record_every_10")
"""Order of the runs: the ratios' reference first, the dearest next (so that the budget guard
estimates from it), then the rest."""
RECORD_EVERY = {"plain": None, "two_pass": 0, "record_every_step": 1, "record_every_10": 10}
MODEL_OPTIONS = ("hidden", "layers", "intermediate", "vocab", "heads", "kv_heads")
FORWARDED = (
    *MODEL_OPTIONS,
    *("batch", "length", "steps", "warmup", "dtype", "device", "backend", "threads", "seed"),
)
"""Options a benchmark child receives from its parent."""


def _log(message: str) -> None:
    print(f"[gpu_check] {message}", flush=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy scalars, 0-d tensors
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            return _clean(value.item())
    return str(value)


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` to ``path`` atomically (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(report), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def _error(report: dict[str, Any], section: str, error: BaseException | str) -> None:
    entry: dict[str, Any] = {"section": section}
    if isinstance(error, BaseException):
        entry["error"] = f"{type(error).__name__}: {error}"
        entry["traceback"] = "".join(traceback.format_exception(error))[-4000:]
    else:
        entry["error"] = error
    report["errors"].append(entry)
    _log(f"error in {section}: {entry['error']}")


# ----------------------------------------------------------------------------------------------
# Machine
# ----------------------------------------------------------------------------------------------


def _command(args: Sequence[str], timeout: float = 10.0) -> str | None:
    try:
        done = subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine_info(device: str, commit: str | None) -> dict[str, Any]:
    """GPU, memory, versions and the geomkit commit; a missing item is None, never an error."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
    }
    import torch

    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    for package in ("transformers", "triton", "numpy", "pytest", "hypothesis"):  # not imported
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    try:
        import geomkit  # this checkout's (ROOT is first on sys.path)

        info["geomkit"] = geomkit.__version__
        info["geomkit_path"] = str(Path(geomkit.__file__).parent)
    except Exception as error:
        info["geomkit"] = f"not importable: {type(error).__name__}: {error}"
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        info["gpu"] = props.name
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_gib"] = props.total_memory / 2**30
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_multiprocessors"] = props.multi_processor_count
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpu_memory_free_gib_at_start"] = torch.cuda.mem_get_info(index)[0] / 2**30
        smi = _command(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        )
        info["nvidia_smi"] = smi
    info["geomkit_commit"] = commit or _command(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    status = _command(["git", "-C", str(ROOT), "status", "--porcelain"])
    info["geomkit_dirty"] = None if status is None else bool(status)
    return info


# ----------------------------------------------------------------------------------------------
# Subprocesses (output to a file, so that a killed process group never blocks a pipe)
# ----------------------------------------------------------------------------------------------


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def run_process(args: Sequence[str], timeout: float) -> tuple[int | None, str, float]:
    """Run ``args`` in its own process group; returns (exit status or None on timeout, output,
    seconds). On timeout the whole group is terminated, then killed."""
    start = time.monotonic()
    with tempfile.TemporaryFile(mode="w+") as output:
        proc = subprocess.Popen(
            list(args),
            cwd=ROOT,
            env=_environment(),
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            status: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            status = None
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        output.seek(0)
        text = output.read()
    return status, text, time.monotonic() - start


# ----------------------------------------------------------------------------------------------
# 1. Tests
# ----------------------------------------------------------------------------------------------

_VERBOSE_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)


def _junit_counts(path: Path) -> dict[str, Any] | None:
    """Counts and failures from a JUnit XML file written by pytest (None if unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"total": 0, "failed": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        counts["total"] += int(suite.get("tests", 0))
        counts["failed"] += int(suite.get("failures", 0))
        counts["errors"] += int(suite.get("errors", 0))
        counts["skipped"] += int(suite.get("skipped", 0))
    counts["passed"] = counts["total"] - counts["failed"] - counts["errors"] - counts["skipped"]
    failures = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            element = case.find(kind)
            if element is not None:
                name = f"{case.get('classname', '')}::{case.get('name', '')}"
                message = (element.get("message") or "") + "\n" + (element.text or "")
                failures.append({"test": name, "kind": kind, "message": message.strip()[-3000:]})
    counts["failures"] = failures
    return counts


def _output_counts(text: str) -> dict[str, Any]:
    """Counts from pytest's verbose lines (works on the output of a killed run)."""
    statuses = dict(_VERBOSE_LINE.findall(text))  # one status per test id
    tally = {k: 0 for k in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")}
    for status in statuses.values():
        tally[status] += 1
    failures = [
        {"test": test, "kind": status.lower(), "message": ""}
        for test, status in statuses.items()
        if status in ("FAILED", "ERROR")
    ]
    return {
        "total": len(statuses),
        "passed": tally["PASSED"] + tally["XPASS"],
        "failed": tally["FAILED"],
        "errors": tally["ERROR"],
        "skipped": tally["SKIPPED"] + tally["XFAIL"],
        "failures": failures,
    }


def run_tests(args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """``pytest -m cuda`` on the CUDA tests in a subprocess; counts, failures, output tail."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [
            sys.executable,
            *("-m", "pytest", "-m", "cuda", args.tests, "-v", "-p", "no:cacheprovider"),
            *("--junitxml", str(junit), "--basetemp", str(Path(tmp) / "basetemp")),
        ]
        _log(f"tests: {' '.join(command[1:])} (timeout {timeout:.0f} s)")
        status, output, seconds = run_process(command, timeout)
        counts = _junit_counts(junit) if status is not None else None
    result: dict[str, Any] = {
        "command": " ".join(["python", *command[1:]]),
        "returncode": status,
        "timed_out": status is None,
        "timeout_s": timeout,
        "duration_s": seconds,
    }
    if counts is None:  # killed, or pytest never wrote its report: count the verbose lines
        counts = _output_counts(output)
        counts["source"] = "verbose output (no JUnit report)"
    else:
        counts["source"] = "junit"
    result.update(counts)
    if status is None:
        result["status"] = "timed_out"
        lines = [line for line in output.splitlines() if line.strip()]
        # pytest -v prints a test's id before running it: the last line names the one cut off
        result["running_at_timeout"] = lines[-1][:300] if lines else None
    elif status in (0, 5) and not counts["failed"] and not counts["errors"]:
        # 5: nothing collected/selected (only when no test is marked cuda)
        result["status"] = "passed" if counts["passed"] else "skipped"
    else:
        result["status"] = "failed"
    result["output_tail"] = output[-6000:]
    return result


# ----------------------------------------------------------------------------------------------
# 2. Benchmark: one configuration (in a child process, or inline)
# ----------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace):
    """A randomly initialised Llama of the requested shape on ``args.device`` and dtype."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.length, 64),
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = transformers.LlamaForCausalLM(config)
    return model.to(dtype=getattr(torch, args.dtype))


def make_batches(args: argparse.Namespace, seed: int, count: int = 4) -> list[dict]:
    """``count`` micro-batches of random tokens (CPU tensors; moved to the device per step)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, args.vocab, (args.batch, args.length), generator=g)
        out.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        )
    return out


def measure(key: str, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """Time ``args.warmup + args.steps`` optimizer steps of configuration ``key``.

    Measurement stops early (at least one measured step) when the next step would pass
    ``deadline`` (a ``time.monotonic()`` value); the result then says so.
    """
    begin = time.monotonic()
    import torch

    import geomkit
    from geomkit import EngineConfig, Unlearner
    from geomkit.objectives import build_objective

    geomkit.set_backend(args.backend)
    device = torch.device(args.device)
    is_cuda = device.type == "cuda"
    if not is_cuda and args.threads:
        torch.set_num_threads(args.threads)
    if is_cuda and device.index is not None:
        torch.cuda.set_device(device)
    model = build_model(args)
    parameters = sum(p.numel() for p in model.parameters())
    forget, retain = make_batches(args, 1), make_batches(args, 2)

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize(device)

    sync()
    gc.collect()
    if is_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        model_bytes = torch.cuda.memory_allocated(device)
    else:
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    losses: list[tuple[float, float]] = []
    close: Callable[[], None] = lambda: None  # noqa: E731
    tmp = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
    try:
        if key == "plain":
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)  # as the engine
            model.train()

            def step(i: int) -> None:
                fb = {k: v.to(device) for k, v in forget[i % len(forget)].items()}
                rb = {k: v.to(device) for k, v in retain[i % len(retain)].items()}
                forget_loss = -model(**fb).loss
                retain_loss = model(**rb).loss
                (forget_loss + retain_loss).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=False)
                losses.append((float(forget_loss.detach()), float(retain_loss.detach())))

        else:
            every = RECORD_EVERY[key]
            config = EngineConfig(
                strategy="sago",
                lr=1e-5,
                steps=args.warmup + args.steps,
                record_every=every,
                flush_every=10,
            )
            out = Path(tmp.name) / "run" if every else None
            unlearner = Unlearner(model, build_objective("graddiff"), forget, retain, config, out)

            def step(i: int) -> None:
                result = unlearner.step()
                losses.append((result.forget_loss, result.retain_loss))

            def close() -> None:
                if unlearner.recorder is not None:
                    unlearner.recorder.close()

        times: list[float] = []
        truncated = None
        total = args.warmup + args.steps
        for i in range(total):
            if len(times) > args.warmup and time.monotonic() + max(times[args.warmup :]) > deadline:
                truncated = (
                    f"stopped after {len(times) - args.warmup} of {args.steps} measured steps: "
                    "the next step would pass the time budget"
                )
                break
            sync()
            start = time.perf_counter()
            step(i)
            sync()
            times.append(time.perf_counter() - start)
        close()
    finally:
        tmp.cleanup()
    measured = [t * 1e3 for t in times[args.warmup :]]
    result: dict[str, Any] = {
        "config": key,
        "label": CONFIGS[key],
        "parameters": parameters,
        "device": str(device),
        "dtype": args.dtype,
        "backend": args.backend,
        "measured_steps": len(measured),
        "warmup_steps": min(args.warmup, len(times)),
        "mean_ms": statistics.fmean(measured),
        "median_ms": statistics.median(measured),
        "min_ms": min(measured),
        "max_ms": max(measured),
        "stdev_ms": statistics.stdev(measured) if len(measured) > 1 else 0.0,
        "warmup_ms": [t * 1e3 for t in times[: args.warmup]],
        "model_mib": model_bytes / 2**20,
        "final_losses": list(losses[-1]) if losses else None,
        "setup_s": None,
        "truncated": truncated,
    }
    if is_cuda:
        result["peak_kind"] = "cuda max_memory_allocated during the steps"
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["peak_kind"] = "process peak RSS (ru_maxrss)"
        result["peak_mib"] = peak / 2**20
        result["rss_before_steps_mib"] = rss_before / 2**20
    result["seconds"] = time.monotonic() - begin
    result["setup_s"] = result["seconds"] - sum(times)
    return result


def _child(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.child_time_s
    try:
        result = measure(args.child, args, deadline)
    except BaseException as error:  # report it to the parent, whatever it is
        result = {
            "config": args.child,
            "error": f"{type(error).__name__}: {error}",
            "traceback": "".join(traceback.format_exception(error))[-4000:],
        }
    print(RESULT_MARKER + json.dumps(_clean(result), allow_nan=False), flush=True)
    return 0


def _free_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def run_config(key: str, args: argparse.Namespace, time_left: float) -> dict[str, Any]:
    """One configuration in a fresh process (or inline); errors come back in the result."""
    if args.isolation == "inline":
        start = time.monotonic()
        try:
            result = measure(key, args, start + time_left)
        except Exception as error:
            result = {
                "config": key,
                "error": f"{type(error).__name__}: {error}",
                "traceback": "".join(traceback.format_exception(error))[-4000:],
            }
        finally:
            _free_memory()
        result["wall_s"] = time.monotonic() - start
        return result
    command = [sys.executable, str(Path(__file__).resolve()), "--child", key]
    for name in FORWARDED:
        command.append(f"--{name.replace('_', '-')}={getattr(args, name)}")
    command.append(f"--child-time-s={max(1.0, time_left - 10.0)}")
    status, output, seconds = run_process(command, time_left)
    lines = [line for line in output.splitlines() if line.startswith(RESULT_MARKER)]
    if lines:
        result = json.loads(lines[-1][len(RESULT_MARKER) :])
    else:
        why = "timed out (time budget)" if status is None else f"exited with status {status}"
        result = {"config": key, "error": f"the benchmark process {why} without a result"}
    if "error" in result:
        result["output_tail"] = output[-3000:]
    result["wall_s"] = seconds
    result["returncode"] = status
    return result


# ----------------------------------------------------------------------------------------------
# 2. Benchmark: all configurations, the table and the ratios
# ----------------------------------------------------------------------------------------------


def _estimate(done: list[dict[str, Any]], warmup: int) -> float:
    """Seconds a further configuration needs at least: its start-up plus warm-up and two
    measured steps, as long as the slowest finished one took."""
    estimates = []
    for r in done:
        step_ms = [*r.get("warmup_ms", []), r.get("max_ms", 0.0)]
        overhead = r["wall_s"] - (r["mean_ms"] * r["measured_steps"] + sum(r["warmup_ms"])) / 1e3
        estimates.append(max(0.0, overhead) + (warmup + 2) * max(step_ms) / 1e3)
    return max(estimates, default=0.0)


def benchmark_table(results: dict[str, dict[str, Any]]) -> tuple[list[dict], dict, list[str]]:
    """Rows in :data:`CONFIGS` order with ratios to ``two_pass`` (time, peak) and to ``plain``
    (peak), the ratios themselves, and notes on what could not be compared."""
    ok = {k: r for k, r in results.items() if "mean_ms" in r}
    notes = []
    base, plain = ok.get("two_pass"), ok.get("plain")
    if base is None:
        notes.append("no two_pass result: time ratios are missing")
    if plain is None:
        notes.append("no plain result: peak ratios to plain GradDiff are missing")
    rows, ratios = [], {"time_vs_two_pass": {}, "peak_vs_two_pass": {}, "peak_vs_plain": {}}
    for key, label in CONFIGS.items():
        r = results.get(key)
        row: dict[str, Any] = {"config": key, "label": label}
        if r is None:
            row["status"] = "not run"
        elif "mean_ms" not in r:
            row["status"] = "skipped" if r.get("skipped") else "error"
            row["note"] = r.get("skipped") or r.get("error")
        else:
            row["status"] = "truncated" if r.get("truncated") else "ok"
            for name in ("mean_ms", "median_ms", "min_ms", "measured_steps", "peak_mib"):
                row[name] = r[name]
            if base is not None:
                row["time_vs_two_pass"] = r["mean_ms"] / base["mean_ms"]
                row["peak_vs_two_pass"] = r["peak_mib"] / base["peak_mib"]
                ratios["time_vs_two_pass"][key] = row["time_vs_two_pass"]
                ratios["peak_vs_two_pass"][key] = row["peak_vs_two_pass"]
            if plain is not None:
                row["peak_vs_plain"] = r["peak_mib"] / plain["peak_mib"]
                ratios["peak_vs_plain"][key] = row["peak_vs_plain"]
        rows.append(row)
    return rows, ratios, notes


def run_benchmark(
    args: argparse.Namespace, deadline: float, report: dict[str, Any], save: Callable[[], None]
) -> None:
    """Every selected configuration, guarded by the budget; fills ``report["benchmark"]``."""
    bench: dict[str, Any] = {
        "model": {name: getattr(args, name) for name in MODEL_OPTIONS},
        "tokens": {"batch": args.batch, "length": args.length, "per_task_per_step": None},
        "dtype": args.dtype,
        "device": args.device,
        "backend": args.backend,
        "warmup": args.warmup,
        "steps": args.steps,
        "isolation": args.isolation,
        "timing": "mean wall time of an optimizer step, synchronised before and after, after "
        "warm-up (a mean, so that the steps that record, verify or flush count in)",
        "results": {},
        "notes": [],
    }
    bench["tokens"]["per_task_per_step"] = args.batch * args.length
    bench["model"]["architecture"] = "LlamaForCausalLM (random init, untied embeddings)"
    report["benchmark"] = bench
    selected = [key for key in RUN_ORDER if key in args.configs]
    done: list[dict[str, Any]] = []
    for key in selected:
        left = deadline - time.monotonic()
        need = max(10.0, _estimate(done, args.warmup))
        if left < need:
            note = (
                f"skipped: {max(0.0, left):.0f} s left of --budget-s {args.budget_s:g}, about "
                f"{need:.0f} s needed"
            )
            bench["results"][key] = {"config": key, "skipped": note}
            bench["notes"].append(f"{key} {note}")
            _log(f"benchmark {key}: {note}")
        else:
            _log(f"benchmark {key}: {CONFIGS[key]} ({left:.0f} s left)")
            result = run_config(key, args, left)
            bench["results"][key] = result
            if "error" in result:
                _error(report, f"benchmark/{key}", result["error"])
            else:
                done.append(result)
                if result.get("truncated"):
                    bench["notes"].append(f"{key}: {result['truncated']}")
                _log(
                    f"benchmark {key}: {result['mean_ms']:.1f} ms/step, peak "
                    f"{result['peak_mib']:.0f} MiB ({result['wall_s']:.0f} s)"
                )
        parameters = [r["parameters"] for r in done]
        bench["model"]["parameters"] = parameters[0] if parameters else None
        bench["table"], bench["ratios"], notes = benchmark_table(bench["results"])
        bench["table_notes"] = notes
        save()


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _configs(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CONFIGS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(
            f"invalid --configs={text!r}: expected a comma-separated subset of "
            + ", ".join(CONFIGS)
        )
    return keys


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See docs/gpu.md for the report's fields.",
    )
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON report")
    parser.add_argument("--budget-s", type=float, default=450.0, help="seconds for everything")
    parser.add_argument("--tests-timeout-s", type=float, default=240.0, help="pytest timeout")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (--allow-cpu)")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="run on --device cpu (to test this script)"
    )
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-benchmark", action="store_true")
    parser.add_argument("--tests", default="tests/test_cuda.py", help="test file (from the root)")
    parser.add_argument("--configs", type=_configs, default=list(CONFIGS), help=",".join(CONFIGS))
    parser.add_argument("--isolation", choices=["process", "inline"], default="process")
    parser.add_argument("--commit", help="geomkit commit to report (default: git rev-parse)")
    model = parser.add_argument_group("benchmark model and data")
    model.add_argument("--hidden", type=int, default=2048)
    model.add_argument("--layers", type=int, default=16)
    model.add_argument("--intermediate", type=int, default=5632)
    model.add_argument("--vocab", type=int, default=32000)
    model.add_argument("--heads", type=int, default=16)
    model.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    model.add_argument("--batch", type=int, default=8, help="sequences per task per step")
    model.add_argument("--length", type=int, default=512, help="tokens per sequence")
    model.add_argument("--steps", type=int, default=20, help="measured steps per configuration")
    model.add_argument("--warmup", type=int, default=3)
    model.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    model.add_argument("--backend", default="eager", choices=["eager", "compiled"])
    model.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    model.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--child-time-s", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.kv_heads is None:
        args.kv_heads = args.heads
    for name in ("hidden", "layers", "intermediate", "vocab", "heads", "batch", "length", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"invalid --{name}={getattr(args, name)}: expected an integer >= 1")
    if args.warmup < 0 or args.threads < 0:
        parser.error("invalid --warmup or --threads: expected integers >= 0")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        parser.error(
            f"invalid --heads={args.heads} / --kv-heads={args.kv_heads}: expected --hidden "
            f"({args.hidden}) divisible by --heads, and --heads by --kv-heads"
        )
    if args.budget_s <= 0 or args.tests_timeout_s <= 0:
        parser.error("invalid --budget-s or --tests-timeout-s: expected positive seconds")
    if not args.device.startswith("cuda") and args.device != "cpu":
        parser.error(f"invalid --device={args.device!r}: expected cuda, cuda:N or cpu")
    if args.device == "cpu" and not args.allow_cpu and args.child is None:
        parser.error("--device cpu runs only with --allow-cpu (a test of this script)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    if str(ROOT) not in sys.path:  # this checkout's geomkit, installed or not
        sys.path.insert(0, str(ROOT))
    args = parse_args(argv)
    if args.child is not None:
        return _child(args)
    start = time.monotonic()
    deadline = start + args.budget_s
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "started": _now(),
        "cuda": False,
        "device": args.device,
        "skipped": None,
        "ok": None,
        "budget_s": args.budget_s,
        "arguments": {k: v for k, v in vars(args).items() if not k.startswith("child")},
        "machine": {},
        "tests": None,
        "benchmark": None,
        "errors": [],
        "notes": [],
    }

    def save() -> None:
        report["elapsed_s"] = time.monotonic() - start
        write_report(args.out, report)

    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception as error:  # no torch at all: nothing can run
        report["skipped"] = f"torch cannot be imported ({type(error).__name__}: {error})"
        _log(f"skipping: {report['skipped']}")
        save()
        return 0
    report["cuda"] = bool(cuda)
    if args.device.startswith("cuda") and not cuda:
        report["skipped"] = (
            "no CUDA device (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}, built with CUDA {torch.version.cuda}); nothing was run"
        )
        with contextlib.suppress(Exception):
            report["machine"] = machine_info("cpu", args.commit)
        _log(f"skipping: {report['skipped']}")
        save()
        _log(f"report: {args.out}")
        return 0
    try:
        report["machine"] = machine_info(args.device, args.commit)
    except Exception as error:
        _error(report, "machine", error)
    if not cuda or args.device == "cpu":
        report["notes"].append("run on the CPU with --allow-cpu: a test of this script only")
    save()

    if args.skip_tests:
        report["notes"].append("tests skipped (--skip-tests)")
    else:
        try:
            timeout = min(args.tests_timeout_s, max(1.0, deadline - time.monotonic()))
            report["tests"] = run_tests(args, timeout)
            t = report["tests"]
            _log(
                f"tests: {t['status']}: {t['passed']} passed, {t['failed']} failed, "
                f"{t['errors']} errors, {t['skipped']} skipped ({t['duration_s']:.0f} s)"
            )
        except Exception as error:
            _error(report, "tests", error)
        save()

    if args.skip_benchmark:
        report["notes"].append("benchmark skipped (--skip-benchmark)")
    else:
        try:
            run_benchmark(args, deadline, report, save)
        except Exception as error:
            _error(report, "benchmark", error)
    tests = report["tests"] or {}
    fine = {None, "passed"} if cuda else {None, "passed", "skipped"}
    if cuda and tests.get("status") == "skipped":
        report["notes"].append("every CUDA test was skipped on a CUDA machine: not a pass")
    report["ok"] = not report["errors"] and tests.get("status") in fine
    report["finished"] = _now()
    save()
    _print_summary(report)
    _log(f"report: {args.out}")
    return 0 if report["ok"] else 1


def _print_summary(report: dict[str, Any]) -> None:
    bench = report.get("benchmark") or {}
    rows = bench.get("table") or []
    if rows:
        n = (bench.get("model") or {}).get("parameters")
        print(f"\n{n:,} parameters" if n else "")
        print("| config | mean ms / step | vs two_pass | peak MiB | peak vs plain |")
        print("|---|---:|---:|---:|---:|")
        for row in rows:
            if "mean_ms" not in row:
                print(f"| {row['config']} | {row['status']} | | | |")
                continue
            print(
                f"| {row['config']} | {row['mean_ms']:.1f} | "
                f"{row.get('time_vs_two_pass', math.nan):.3f} | {row['peak_mib']:.0f} | "
                f"{row.get('peak_vs_plain', math.nan):.3f} |"
            )
    for error in report["errors"]:
        print(f"error in {error['section']}: {error['error']}")


if __name__ == "__main__":
    sys.exit(main())
