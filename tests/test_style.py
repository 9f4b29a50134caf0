"""The code base stays ruff clean (lint and format), as part of the README's test command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_clean(args: list[str]) -> None:
    ruff = shutil.which("ruff") or [sys.executable, "-m", "ruff"]
    command = [ruff] if isinstance(ruff, str) else ruff
    result = subprocess.run(
        [*command, *args, "geomkit", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_imports_no_heavy_dependencies() -> None:
    """strategies, statistics, metrics and layers import neither xarray, matplotlib nor
    transformers (docs/method.md#data-flow)."""
    code = (
        "import sys; import geomkit, geomkit.strategies, geomkit.statistics, geomkit.metrics, "
        "geomkit.layers; bad = [m for m in ('xarray', 'matplotlib', 'transformers', 'seaborn') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
