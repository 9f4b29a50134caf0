"""Shared fixtures: one smoke-preset ``geomkit run`` per test session; ``cuda``-marked tests
are skipped without a CUDA device."""

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``cuda`` when no CUDA device is available."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in cuda_items:
        item.add_marker(skip)
