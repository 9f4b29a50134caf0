"""``geomkit check``, ``plot`` and ``figures``, and the report ``geomkit run`` writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import zarr

from geomkit.cli import main
from geomkit.store import STORE_NAME


def test_run_writes_audit_and_figures(smoke_runs):
    status, out = smoke_runs
    assert status == 0
    report = json.loads((out / "audit.json").read_text())
    claims = {r["claim"] for r in report["results"]}
    assert claims == {f"R{i}" for i in range(1, 10)} | {"R2b"}
    assert "R4" in (out / "audit.txt").read_text()
    for name in ("loss_dynamics", "tradeoff_retain"):
        for ext in ("pdf", "png"):
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 0


def test_check_prints_table_writes_json_and_exits_zero(smoke_runs, tmp_path, capsys):
    _, out = smoke_runs
    path = tmp_path / "audit.json"
    assert main(["check", str(out), "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "R4" in printed and "sago" in printed
    report = json.loads(path.read_text())
    runs = {r["source"] for r in report["results"]}
    assert runs == {"graddiff-sum-seed0", "graddiff-pcgrad-seed0", "graddiff-sago-seed0"}


def test_check_single_run_writes_beside_it(smoke_runs, tmp_path):
    _, out = smoke_runs
    run = tmp_path / "graddiff-sago-seed0"
    shutil.copytree(out / "graddiff-sago-seed0", run)
    assert main(["check", str(run)]) == 0
    assert json.loads((run / "audit.json").read_text())["results"]


def test_check_exits_one_when_a_proven_claim_is_violated(smoke_runs, tmp_path, capsys):
    _, out = smoke_runs
    run = tmp_path / "graddiff-sago-seed0"
    shutil.copytree(out / "graddiff-sago-seed0", run)
    group = zarr.open_group(run / STORE_NAME, mode="r+")
    dr = group["dr"][:]
    dr[1, 0, 2] = -abs(dr[1, 0, 2]) - 1.0  # the applied SAGO update opposing r: impossible
    group["dr"][:] = dr
    assert main(["check", str(run)]) == 1
    captured = capsys.readouterr()
    assert "proven claim is violated" in captured.err
    report = json.loads((run / "audit.json").read_text())
    failed = [r for r in report["results"] if r["claim"] == "R1" and r["violations"]]
    assert failed and "step 1" in failed[0]["where"]


def test_check_and_plot_name_a_missing_path(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["check", str(missing)]) == 2
    assert f"{missing} does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", str(empty), "--out", str(tmp_path / "f")]) == 2
    assert "holds no geomkit run" in capsys.readouterr().err


def test_plot_writes_the_figure_set(smoke_runs, tmp_path, capsys):
    _, out = smoke_runs
    figures = tmp_path / "figs"
    assert main(["plot", str(out), "--out", str(figures), "--format", "png"]) == 0
    names = {p.name for p in figures.glob("*.png")}
    assert {"loss_dynamics.png", "sago_vs_pcgrad.png", "violation_rates.png"} <= names
    assert not list(figures.glob("*.pdf"))
    assert (figures / "geometry_table.md").read_text().startswith("|")
    assert "figures and tables written" in capsys.readouterr().err


def test_figures_from_existing_runs(smoke_runs, tmp_path):
    _, out = smoke_runs
    figures = tmp_path / "figures"
    runs = [str(p) for p in sorted(out.iterdir()) if (p / STORE_NAME).exists()]
    assert main(["figures", "--out", str(figures), "--runs", *runs]) == 0
    assert (figures / "tradeoff_retain.png").exists()
    assert np.isfinite(json.loads((figures / "audit.json").read_text())["results"][0]["cases"])


def test_audit_summary_reports_r4_measured():
    from geomkit import theory
    from geomkit.runner import audit_summary

    audit = theory.audit_synthetic([theory.Counterexamples()], claims=["R4"])
    text = audit_summary(audit)
    assert text.startswith("theorem audit: no proven claim violated")
    assert "sago>=pcgrad at tensor level: fails in 3 of 3 cases (100%)" in text


def test_torchrun_runs_the_same_job_data_parallel(smoke_runs, tmp_path):
    """``torchrun --nproc_per_node 2 -m geomkit run``: one set of outputs, written by rank 0."""
    import os
    import subprocess
    import sys

    import geomkit

    _, out = smoke_runs
    cache = out.parent / "cache"  # the session's smoke target model: no pretraining here
    runs = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
            *("-m", "geomkit", "run", "--preset", "smoke", "--strategy", "sago"),
            *("--out", str(runs), "--cache-dir", str(cache), "--no-report"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("target model (cached") == 1  # only rank 0 prints
    assert result.stdout.count("| graddiff | sago |") == 1
    ds = geomkit.open_run(runs / "graddiff-sago-seed0")
    assert ds.attrs["world_size"] == 2
    assert ds.sizes["step"] == 4 and ds["evaluation"].values.tolist() == [0, 2, 4]
