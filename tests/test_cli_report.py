"""``geomkit check``, ``plot`` and ``figures``, and the report ``geomkit run`` writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from geomkit.cli import main
from geomkit.store import STORE_NAME


def test_run_writes_audit_and_figures(smoke_runs):
    status, out = smoke_runs
    assert status == 0
    report = json.loads((out / "audit.json").read_text())
    claims = {r["claim"] for r in report["results"]}
    assert claims == {f"R{i}" for i in range(10)} | {"R2b", "R3b", "V1", "S1", "S2"}
    # the step claims: measured on every run (the smoke preset records the step), never gated
    s1 = [r for r in report["results"] if r["claim"] == "S1"]
    assert {r["source"] for r in s1} == {f"graddiff-{s}-seed0" for s in ("sum", "pcgrad", "sago")}
    assert all(r["cases"] > 0 and not r["gates"] and r["verdict"] != "BUG" for r in s1)
    s2 = [r for r in report["results"] if r["claim"] == "S2" and r["cases"] > 0]
    assert {(r["strategy"], r["source"]) for r in s2} == {("sago>=pcgrad", "graddiff-sago-seed0")}
    # geomkit run verifies the shadows by default (docs/theory.md#v1)
    v1 = [r for r in report["results"] if r["claim"] == "V1"]
    assert v1 and all(r["cases"] > 0 and r["verdict"] == "ok" for r in v1)
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
    assert (figures / "tradeoff_retain.pdf").read_bytes().startswith(b"%PDF")  # vector too
    from PIL import Image

    with Image.open(figures / "tradeoff_retain.png") as png:
        assert min(png.info["dpi"]) >= 150  # the README's figures: PNG at >= 150 dpi
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
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            *("--nproc_per_node", "2"),
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


# -- damaged input and the error policy -------------------------------------------------------


def _recorded_run(directory: Path) -> Path:
    """A small run directory recorded from random gradients (4 steps, records at 0 and 2)."""
    import torch

    from geomkit.recorder import Recorder

    shapes = [(8, 4), (4, 4)]
    names = ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    recorder = Recorder(
        directory / STORE_NAME,
        names,
        [32, 16],
        "sago",
        shadows=["pcgrad"],
        schedule=2,
        attrs={"objective": "graddiff", "seed": 0},
    )
    generator = torch.Generator().manual_seed(0)
    recorder.log_evaluation(0, {"forget_acc": 1.0, "retain_acc": 1.0, "general_acc": 1.0})
    for step in range(4):
        f = [torch.randn(s, generator=generator) for s in shapes]
        r = [torch.randn(s, generator=generator) for s in shapes]
        recorder.record(step, f, r, forget_loss=1.0 + step, retain_loss=2.0)
    recorder.log_evaluation(4, {"forget_acc": 0.5, "retain_acc": 0.9, "general_acc": 0.9})
    recorder.close()
    return directory


def _damage(run: Path, how: str) -> tuple[str, str]:
    """Damage ``run``'s store; return the variable and the key the message must name."""
    store = run / STORE_NAME
    if how == "deleted chunk":
        (store / "ff" / "c" / "0" / "0").unlink()
        return "ff", "ff/c/0/0 is missing (2 records at steps 0, 2)"
    if how == "truncated chunk":
        chunk = store / "dd" / "c" / "0" / "0" / "0"
        chunk.write_bytes(chunk.read_bytes()[:7])
        return "dd", "dd/c/0/0/0 does not decode"
    if how == "corrupt group metadata":
        (store / "zarr.json").write_text("{not json")
        return "(group)", "zarr.json cannot be read"
    (store / "fr" / "zarr.json").unlink()
    return "fr", "fr/zarr.json is missing (2 records at steps 0, 2)"


COMMANDS = {
    "check": lambda run, tmp: ["check", str(run), "--json", str(tmp / "audit.json")],
    "plot": lambda run, tmp: ["plot", str(run), "--out", str(tmp / "figs"), "--format", "png"],
    "figures": lambda run, tmp: ["figures", "--runs", str(run), "--out", str(tmp / "figs")],
}


@pytest.mark.parametrize(
    "how", ["deleted chunk", "truncated chunk", "missing metadata", "corrupt group metadata"]
)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_damaged_store_exits_two_with_one_line_naming_the_damage(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: str, how: str
) -> None:
    run = _recorded_run(tmp_path / "graddiff-sago-seed0")
    assert main(["check", str(run), "--json", str(tmp_path / "ok.json")]) == 0  # intact: fine
    capsys.readouterr()
    variable, needle = _damage(run, how)
    assert main(COMMANDS[command](run, tmp_path)) == 2  # never 1: no claim was checked
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"geomkit {command}: error: damaged geomkit run store {run}")
    assert f"{variable}: {needle}" in lines[0]
    assert not (tmp_path / "audit.json").exists()


def test_damaged_store_in_a_subprocess_prints_no_traceback(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    run = _recorded_run(tmp_path / "run")
    _damage(run, "deleted chunk")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run(
        [sys.executable, "-m", "geomkit", "check", str(run)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "ff/c/0/0 is missing" in result.stderr


def test_a_bug_is_not_reported_as_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import geomkit.cli

    run = _recorded_run(tmp_path / "run")

    def broken(runs):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(geomkit.cli, "audit_runs", broken)
    with pytest.raises(ValueError, match="an internal inconsistency"):
        main(["check", str(run)])


def test_figure_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _recorded_run(tmp_path / "run")
    out = str(tmp_path / "f")
    assert main(["plot", str(run), "--out", out, "--format", "nope"]) == 2
    assert "invalid --format='nope': expected one of " in capsys.readouterr().err
    assert main(["plot", str(run), "--out", out, "--dpi", "0"]) == 2
    assert "invalid --dpi=0: expected an integer > 0" in capsys.readouterr().err
    assert main(["plot", str(run), str(run)]) == 2
    assert "invalid --out=None" in capsys.readouterr().err


def test_group_metadata_lost_does_not_suggest_masking(tmp_path: Path) -> None:
    from geomkit.store import DamagedStoreError, open_run

    run = _recorded_run(tmp_path / "run")
    _damage(run, "corrupt group metadata")
    for on_damage in ("raise", "mask"):
        with pytest.raises(DamagedStoreError, match=r"zarr\.json cannot be read") as info:
            open_run(run, on_damage=on_damage)
        assert "on_damage" not in str(info.value)


def test_audit_of_a_masked_store_leaves_the_damaged_records_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from geomkit import theory
    from geomkit.recorder import Recorder
    from geomkit.store import DamagedStoreWarning, open_run

    store = tmp_path / "run" / STORE_NAME
    monkeypatch.setattr("geomkit.store_schema.RECORD_CHUNK", 16)  # written 16 records a chunk
    recorder = Recorder(
        store,
        ["model.layers.0.mlp.up_proj.weight"],
        [32],
        "sago",
        shadows=["pcgrad"],
        attrs={"objective": "graddiff", "seed": 0},
    )
    generator = torch.Generator().manual_seed(0)
    for step in range(20):  # records 0-15 in the first chunk (16 records a chunk), 16-19 after
        f, r = (torch.randn(32, generator=generator) for _ in range(2))
        recorder.record(step, [f], [r], forget_loss=1.0, retain_loss=2.0)
    recorder.close()
    intact = theory.audit(open_run(store))
    (store / "ff" / "c" / "0" / "0").unlink()
    with pytest.warns(DamagedStoreWarning):
        ds = open_run(store, on_damage="mask")
    assert ds["record_damaged"].values.tolist() == [True] * 16 + [False] * 4
    audit = theory.audit(ds)
    assert not audit.bug_detected and not intact.bug_detected  # lost data is no violation
    r1 = audit.get("R1", "model", "sago")
    assert (r1.cases, intact.get("R1", "model", "sago").cases) == (4, 20)
    assert "16 damaged record(s) left out (steps 0, 1," in r1.note
