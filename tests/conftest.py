"""Shared fixtures: one smoke-preset ``geomkit run`` per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

SMOKE_STRATEGIES = ("sum", "pcgrad", "sago")


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """``geomkit run --preset smoke`` with sum, pcgrad and sago, seed 0: (exit status, out)."""
    from geomkit.cli import main

    root = tmp_path_factory.mktemp("smoke")
    out = root / "runs"
    status = main(
        [
            *("run", "--preset", "smoke", "--out", str(out), "--strategy", *SMOKE_STRATEGIES),
            *("--seed", "0", "--cache-dir", str(root / "cache")),
        ]
    )
    return status, out
