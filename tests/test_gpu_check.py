"""benchmarks/gpu_check.py on the CPU: the skip path without CUDA, the full report on a tiny model
(``--device cpu --allow-cpu``), the budget guard, the test-timeout path, and the table's ratios
(docs/gpu.md)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
TINY = [
    *("--device", "cpu", "--allow-cpu", "--hidden", "32", "--layers", "2"),
    *("--intermediate", "64", "--vocab", "64", "--heads", "2", "--batch", "2", "--length", "16"),
    *("--steps", "2", "--warmup", "1", "--threads", "1"),
]
SECTIONS = ("schema", "cuda", "device", "skipped", "ok", "machine", "tests", "benchmark", "errors")


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args: list[str]) -> tuple[subprocess.CompletedProcess, dict]:
    """The script in a subprocess with every GPU hidden (these are tests of its CPU paths)."""
    out = Path(args[args.index("--out") + 1])
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.is_file(), done.stdout + done.stderr
    return done, json.loads(out.read_text())


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_skips_cleanly_without_cuda(tmp_path):
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this runs the skip path on every machine.
    done, report = run(["--out", str(tmp_path / "r.json")])
    assert done.returncode == 0, done.stderr
    assert "skipping: no CUDA device" in done.stdout
    assert report["cuda"] is False
    assert "no CUDA device" in report["skipped"]
    assert report["tests"] is None and report["benchmark"] is None and report["ok"] is None
    assert report["machine"]["cuda_available"] is False
    assert set(SECTIONS) <= set(report)


def test_full_report_on_a_tiny_cpu_model(tmp_path):
    """Every section (the benchmark inline, to keep this test short; the fresh-process path is
    tested below). The test section runs a stand-in test file with one passing, one failing and
    one skipped ``cuda``-marked test, so that the counts and the failure are read back from
    pytest's report (and the exit status is 1)."""
    fake = tmp_path / "test_fake_cuda.py"
    fake.write_text(
        textwrap.dedent(
            """
            import pytest

            pytestmark = pytest.mark.cuda

            def test_passes():
                assert 1 + 1 == 2

            def test_fails():
                assert 1 + 1 == 3, "planted failure"

            @pytest.mark.skip(reason="planted skip")
            def test_skipped():
                pass
            """
        )
    )
    out = tmp_path / "report.json"
    done, report = run(["--out", str(out), "--tests", str(fake), "--isolation", "inline", *TINY])
    assert done.returncode == 1, done.stdout + done.stderr  # the planted failure
    assert set(SECTIONS) <= set(report)
    assert report["cuda"] is False and report["skipped"] is None and report["ok"] is False
    assert report["errors"] == []
    assert report["machine"]["geomkit_path"] == str(ROOT / "geomkit")

    tests = report["tests"]
    assert tests["source"] == "junit" and tests["status"] == "failed"
    assert (tests["passed"], tests["failed"], tests["errors"], tests["skipped"]) == (1, 1, 0, 1)
    assert tests["total"] == 3 and tests["returncode"] == 1 and not tests["timed_out"]
    (failure,) = tests["failures"]
    assert failure["test"].endswith("::test_fails") and "planted failure" in failure["message"]

    bench = report["benchmark"]
    assert bench["isolation"] == "inline"
    assert bench["model"]["hidden"] == 32 and bench["tokens"]["per_task_per_step"] == 32
    n = bench["model"]["parameters"]
    assert isinstance(n, int) and n > 0
    rows = {row["config"]: row for row in bench["table"]}
    assert list(rows) == ["plain", "two_pass", "record_every_step", "record_every_10"]
    base = rows["two_pass"]
    for key, row in rows.items():
        assert row["status"] == "ok", row
        result = bench["results"][key]
        assert result["parameters"] == n and result["measured_steps"] == 2
        assert result["dtype"] == "bfloat16" and result["truncated"] is None
        for name in ("mean_ms", "median_ms", "min_ms", "peak_mib", "wall_s", "model_mib"):
            assert finite_positive(result[name]), (key, name, result[name])
        assert result["min_ms"] <= result["median_ms"] <= result["max_ms"]
        assert all(math.isfinite(x) for x in result["final_losses"])
        assert row["mean_ms"] == result["mean_ms"] and row["peak_mib"] == result["peak_mib"]
        # ratios are the measured values divided, in the same run
        assert row["time_vs_two_pass"] == pytest.approx(row["mean_ms"] / base["mean_ms"])
        assert row["peak_vs_two_pass"] == pytest.approx(row["peak_mib"] / base["peak_mib"])
        assert row["peak_vs_plain"] == pytest.approx(row["peak_mib"] / rows["plain"]["peak_mib"])
        assert bench["ratios"]["time_vs_two_pass"][key] == row["time_vs_two_pass"]
    assert base["time_vs_two_pass"] == 1.0
    assert "| record_every_step |" in done.stdout  # the summary table


def test_budget_guard_skips_configurations_with_a_note():
    gpu_check = load_script()
    args = gpu_check.parse_args([*TINY, "--budget-s", "1"])
    report = {"errors": []}
    saved = []
    gpu_check.run_benchmark(args, time.monotonic() + 1.0, report, lambda: saved.append(1))
    bench = report["benchmark"]
    assert report["errors"] == [] and len(saved) == 4  # the report is saved after each one
    assert [row["status"] for row in bench["table"]] == ["skipped"] * 4
    assert all("of --budget-s 1, about 10 s needed" in row["note"] for row in bench["table"])
    assert len(bench["notes"]) == 4 and bench["model"]["parameters"] is None


def test_one_configuration_in_a_fresh_process(tmp_path):
    """The default isolation: the child gets the options, its result comes back; without a
    two_pass result the table says that the time ratios are missing."""
    out = tmp_path / "r.json"
    args = ["--out", str(out), "--skip-tests", "--configs", "record_every_step", *TINY]
    done, report = run([*args, "--steps", "3"])
    assert done.returncode == 0, done.stdout + done.stderr
    bench = report["benchmark"]
    assert bench["isolation"] == "process" and report["errors"] == []
    result = bench["results"]["record_every_step"]
    assert result["returncode"] == 0 and result["measured_steps"] == 3
    assert result["parameters"] == bench["model"]["parameters"] > 0
    assert finite_positive(result["mean_ms"]) and finite_positive(result["peak_mib"])
    rows = {row["config"]: row for row in bench["table"]}
    assert rows["record_every_step"]["status"] == "ok"
    assert "time_vs_two_pass" not in rows["record_every_step"]
    assert [rows[k]["status"] for k in ("plain", "two_pass", "record_every_10")] == ["not run"] * 3
    assert "no two_pass result: time ratios are missing" in bench["table_notes"]


def test_tests_timeout_kills_pytest(tmp_path):
    gpu_check = load_script()
    fake = tmp_path / "test_slow_cuda.py"
    fake.write_text(
        "import time\n\nimport pytest\n\npytestmark = pytest.mark.cuda\n\n\n"
        "def test_hangs():\n    time.sleep(600)\n"
    )
    args = gpu_check.parse_args(["--tests", str(fake), *TINY])
    start = time.monotonic()
    result = gpu_check.run_tests(args, timeout=3.0)
    assert time.monotonic() - start < 30  # terminated, not waited for
    assert result["status"] == "timed_out" and result["timed_out"] and result["returncode"] is None
    assert result["source"] == "verbose output (no JUnit report)"
    assert result["failed"] == 0 and result["errors"] == 0
    if "test_hangs" in result["output_tail"]:  # pytest got that far (not under heavy load)
        assert "test_hangs" in result["running_at_timeout"]


def test_counts_from_verbose_output():
    gpu_check = load_script()
    output = textwrap.dedent(
        """
        tests/test_cuda.py::test_a[sum-torch.bfloat16] PASSED                    [  2%]
        tests/test_cuda.py::test_a[sago-torch.float16] FAILED                    [  4%]
        tests/test_cuda.py::test_b SKIPPED (needs a CUDA device)                 [  6%]
        tests/test_cuda.py::test_c ERROR                                         [  8%]
        tests/test_cuda.py::test_d PASSED                                        [ 10%]
        FAILED tests/test_cuda.py::test_a[sago-torch.float16] - AssertionError: x
        """
    )
    counts = gpu_check._output_counts(output)
    assert {k: counts[k] for k in ("total", "passed", "failed", "errors", "skipped")} == {
        "total": 5,
        "passed": 2,
        "failed": 1,
        "errors": 1,
        "skipped": 1,
    }
    assert [f["test"] for f in counts["failures"]] == [
        "tests/test_cuda.py::test_a[sago-torch.float16]",
        "tests/test_cuda.py::test_c",
    ]


def test_measure_stops_at_the_deadline():
    gpu_check = load_script()
    args = gpu_check.parse_args([*TINY, "--steps", "50", "--threads", "0"])  # keep torch's
    result = gpu_check.measure("two_pass", args, deadline=time.monotonic())
    assert result["measured_steps"] == 1  # warm-up, one measured step, then the deadline
    assert "stopped after 1 of 50 measured steps" in result["truncated"]


def test_table_ratios_errors_and_json_cleaning():
    gpu_check = load_script()
    results = {
        "two_pass": {"mean_ms": 100.0, "median_ms": 99.0, "min_ms": 98.0, "measured_steps": 3},
        "record_every_step": {
            **{"mean_ms": 103.0, "median_ms": 103.0, "min_ms": 102.0, "measured_steps": 3},
            "truncated": "stopped after 3 of 20 measured steps",
        },
        "plain": {"config": "plain", "error": "RuntimeError: CUDA out of memory"},
        "record_every_10": {"config": "record_every_10", "skipped": "skipped: 3 s left"},
    }
    results["two_pass"]["peak_mib"] = 1000.0
    results["record_every_step"]["peak_mib"] = 1100.0
    rows, ratios, notes = gpu_check.benchmark_table(results)
    by = {row["config"]: row for row in rows}
    assert by["record_every_step"]["time_vs_two_pass"] == pytest.approx(1.03)
    assert by["record_every_step"]["peak_vs_two_pass"] == pytest.approx(1.1)
    assert by["record_every_step"]["status"] == "truncated"
    assert by["plain"]["status"] == "error" and "out of memory" in by["plain"]["note"]
    assert by["record_every_10"]["status"] == "skipped"
    assert "peak_vs_plain" not in by["two_pass"] and ratios["peak_vs_plain"] == {}
    assert notes == ["no plain result: peak ratios to plain GradDiff are missing"]
    cleaned = gpu_check._clean({"a": float("nan"), "b": [float("inf"), 1.5], "c": Path("x")})
    assert cleaned == {"a": None, "b": [None, 1.5], "c": "x"}


def test_invalid_options_are_named():
    gpu_check = load_script()
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cpu"])  # without --allow-cpu
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--configs", "plain,fast"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--hidden", "30", "--heads", "4"])


def test_docs_describe_every_report_field():
    doc = (ROOT / "docs" / "gpu.md").read_text()
    gpu_check = load_script()
    for name in (*SECTIONS, *gpu_check.CONFIGS, "time_vs_two_pass", "peak_vs_plain"):
        assert f"`{name}`" in doc, name
