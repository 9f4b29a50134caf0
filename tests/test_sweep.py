"""``geomkit sweep``: the grid, resumption, parallel workers, dry run and report (smoke)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geomkit.cli import main
from geomkit.config import RunConfig
from geomkit.results import RunResult
from geomkit.study.grid import Sweep

GRID = ("--strategy", "sum", "sago", "--lr", "1e-3", "3e-3", "--seed", "0", "1")


@pytest.fixture(scope="module")
def cache(smoke_runs) -> str:
    """The smoke target model's cache (pretrained once per session by ``smoke_runs``)."""
    return str(smoke_runs[1].parent / "cache")


def _sweep(out: Path, cache: str, *extra: str) -> int:
    return main(
        ["sweep", "--preset", "smoke", *GRID, "--out", str(out), "--cache-dir", cache, *extra]
    )


def _results(out: Path) -> dict[str, tuple]:
    found = {}
    for run_dir in sorted(out.iterdir()):
        if (run_dir / "metrics.json").exists():
            r = RunResult.load(run_dir)
            found[r.run] = (r.losses, r.history, r.before)
    return found


def test_sweep_grid_names_and_validation():
    sweep = Sweep(RunConfig(), ["graddiff"], ["sum", "sago"], [1e-3, 3e-3], [60], [0, 1, 2])
    names = [r.name for r in sweep.runs()]
    assert len(names) == len(set(names)) == 12
    assert Sweep.from_dict(json.loads(json.dumps(sweep.to_dict()))).runs() == sweep.runs()
    with pytest.raises(ValueError, match="lr"):
        Sweep(RunConfig(), ["graddiff"], ["sum"], [-1.0], [60], [0])
    with pytest.raises(ValueError, match="distinct"):
        Sweep(RunConfig(), ["graddiff"], ["sum"], [1e-3], [60], [0, 0])
    with pytest.raises(ValueError, match="strategies"):
        Sweep(RunConfig(), ["graddiff"], ["nope"], [1e-3], [60], [0])


def test_parallel_workers_give_the_serial_results(tmp_path, cache):
    assert _sweep(tmp_path / "serial", cache, "--jobs", "1") == 0
    assert _sweep(tmp_path / "parallel", cache, "--jobs", "2") == 0
    serial, parallel = _results(tmp_path / "serial"), _results(tmp_path / "parallel")
    assert len(serial) == 8
    assert serial == parallel  # bit for bit: every run seeded and single-threaded
    for name in ("runs.csv", "matched.csv", "comparison.csv", "comparison.md"):
        assert (tmp_path / "parallel" / name).read_text() == (
            tmp_path / "serial" / name
        ).read_text().replace(str(tmp_path / "serial"), str(tmp_path / "parallel"))
    assert (tmp_path / "serial" / "figures" / "pareto.png").exists()


def test_a_killed_sweep_resumes_without_losing_or_repeating_runs(tmp_path, cache):
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "geomkit", "sweep", "--preset", "smoke", *GRID]
    command += ["--out", str(out), "--cache-dir", cache, "--jobs", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if len(list(out.glob("*/metrics.json"))) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
    assert 2 <= len(finished) < 8, finished
    assert _sweep(out, cache, "--jobs", "1") == 0
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
    assert len(after) == 8
    assert all(after[name] == mtime for name, mtime in finished.items())  # not run again
    grid = {r.name for r in Sweep.load(out).runs()}
    assert {p.name for p in out.iterdir() if p.is_dir() and p.name != "figures"} == grid
    for name in grid:  # every store complete: 4 records, no leftovers of a killed attempt
        import geomkit

        ds = geomkit.open_run(out / name)
        assert ds.sizes["record"] == 4
    # the same results as an uninterrupted sweep
    assert _sweep(tmp_path / "whole", cache, "--jobs", "1") == 0
    assert _results(out) == _results(tmp_path / "whole")


def test_dry_run_prints_one_command_per_pending_run(tmp_path, cache, capsys):
    out = tmp_path / "sweep"
    assert _sweep(out, cache, "--dry-run") == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 8 and all(c.startswith("geomkit run --config ") for c in commands)
    # one of them, executed as printed, writes its run where the sweep expects it
    argv = commands[0].split()[1:]
    assert main(argv) == 0
    name = argv[argv.index("--name") + 1]
    assert (out / name / "metrics.json").exists()
    assert not (out / "summary.csv").exists()  # a named run leaves the tables to the study
    assert _sweep(out, cache, "--dry-run") == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 7
    assert main(["sweep", "--report-only", "--out", str(out)]) == 0
    assert "7 runs of the grid are pending" in (out / "comparison.md").read_text()


def test_a_different_sweep_in_the_same_directory_is_refused(tmp_path, cache, capsys):
    out = tmp_path / "sweep"
    assert _sweep(out, cache, "--dry-run") == 0
    changed = [a if a != "3e-3" else "1e-2" for a in GRID]
    argv = ["sweep", "--preset", "smoke", *changed, "--out", str(out), "--dry-run"]
    capsys.readouterr()
    assert main([*argv, "--cache-dir", cache]) == 2
    assert "differs in lrs; resume or extend it" in capsys.readouterr().err
    # an axis may grow: a third learning rate and a third seed extend the sweep
    grown = [*GRID[:6], "1e-2", *GRID[6:], "2"]
    argv = ["sweep", "--preset", "smoke", *grown, "--out", str(out), "--dry-run"]
    assert main([*argv, "--cache-dir", cache]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2 * 3 * 3
    assert len(Sweep.load(out).runs()) == 18


def test_a_sweep_of_a_local_model_with_evaluation_files(tmp_path):
    from test_choice import local_model

    directory, forget, retain, questions = local_model(tmp_path, [i % 2 for i in range(10)])
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", str(directory), "--forget-data", str(forget)]
    argv += ["--retain-data", str(retain), "--chunk-length", "16", "--batch-size", "2"]
    argv += ["--strategy", "sum", "sago", "--lr", "1e-3", "1e-2", "--steps", "4", "--seed", "0"]
    argv += ["--eval-data", f"forget={questions}", f"retain={questions}", "--out", str(out)]
    assert main([*argv, "--jobs", "1"]) == 0
    assert len(list(out.glob("*/metrics.json"))) == 4
    matched = (out / "matched.csv").read_text().splitlines()
    assert len(matched) == 1 + 4 * 3  # runs x targets, censored ones included
    assert "retain_acc" in matched[0]
