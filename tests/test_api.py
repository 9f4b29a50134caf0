"""The notebook-first API: what a new user meets in a fresh kernel.

Fresh-process tests (``subprocess`` with ``sys.executable``): ``import geomkit`` registers the
``ds.geom`` accessor in either import order without importing xarray itself, and ``dir(geomkit)``
lists the lazily loaded functions and subpackages. In-process tests: ``ds.geom.runs()``,
``ds.geom.audit()`` and the ``ds.geom.plot`` shortcuts on a recorded run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

import geomkit
from geomkit.recorder import Recorder
from geomkit.strategies import BLUR, PerTensor, Strategy

ROOT = Path(__file__).resolve().parents[1]
TENSORS = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
]
SHAPES = [(4, 3), (5,), (2, 2)]


def fresh(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter that imports this checkout's geomkit."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recorded run of 6 steps: random gradients, SAGO applied, every registered shadow."""
    path = tmp_path_factory.mktemp("api") / "geometry.zarr"
    g = torch.Generator().manual_seed(0)
    rec = Recorder(
        path,
        TENSORS,
        [int(np.prod(s)) for s in SHAPES],
        "sago",
        flush_every=2,
        attrs={"objective": "graddiff", "seed": 0, "run": "api-run", "dtype": "float64"},
    )
    for step in range(6):
        f = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
        r = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
        rec.record(step, f, r, forget_loss=-1.0 - step, retain_loss=1.0 + 0.1 * step)
    rec.close()
    return path


# ----------------------------------------------------------------------------------------------
# Fresh processes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["geomkit-first", "xarray-first"])
def test_open_zarr_has_geom_after_import_geomkit(run: Path, order: str) -> None:
    imports = (
        "import geomkit; import xarray as xr"
        if order == "geomkit-first"
        else ("import xarray as xr; import geomkit")
    )
    result = fresh(
        f"""
        import json, sys
        {imports}
        ds = xr.open_zarr({str(run)!r})
        cos = ds.geom.metrics(by="layer")["cos_dr"].sel(strategy="pcgrad")
        print(json.dumps(cos.values.tolist()))
        """
    )
    assert result.returncode == 0, result.stderr
    got = np.array(json.loads(result.stdout))
    want = geomkit.open_run(run).geom.metrics(by="layer")["cos_dr"].sel(strategy="pcgrad")
    np.testing.assert_allclose(got, want.values, rtol=0, atol=0)
    assert got.shape == (6, 2) and np.isfinite(got).all()


def test_import_geomkit_alone_does_not_import_xarray_but_registers_later() -> None:
    result = fresh(
        """
        import sys
        import geomkit
        assert "xarray" not in sys.modules, "import geomkit imported xarray"
        assert "geomkit.analysis" not in sys.modules
        import xarray as xr
        assert "geomkit.analysis" in sys.modules
        assert isinstance(xr.Dataset().geom, geomkit.analysis.GeometryAccessor)
        # the hook removed itself; a second import changes nothing
        assert not any(type(f).__name__ == "_AccessorHook" for f in sys.meta_path)
        import importlib; importlib.reload(geomkit)
        assert not any(type(f).__name__ == "_AccessorHook" for f in sys.meta_path)
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "Warning" not in result.stderr, result.stderr


def test_dir_lists_lazy_functions_and_subpackages() -> None:
    result = fresh(
        """
        import json, sys
        import geomkit
        listed = dir(geomkit)
        before = sorted(m for m in ("geomkit.plot", "geomkit.theory", "geomkit.store")
                        if m in sys.modules)
        tradeoff = geomkit.plot.tradeoff          # no `import geomkit.plot` needed
        audit = geomkit.theory.audit
        print(json.dumps({
            "dir": listed,
            "before": before,
            "plot": tradeoff.__module__,
            "audit": audit is geomkit.audit,
            "open_run": geomkit.open_run is sys.modules["geomkit.store"].open_run,
            "recorder": geomkit.Recorder is geomkit.recorder.Recorder,
            "unlearner": geomkit.Unlearner is geomkit.engine.Unlearner,
        }))
        try:
            geomkit.no_such_thing
        except AttributeError as error:
            print(error)
        """
    )
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.strip().splitlines()
    data = json.loads(first)
    want = {
        "open_run",
        "open_runs",
        "Recorder",
        "Unlearner",
        "EngineConfig",
        "audit",
        "plot",
        "theory",
        "store",
        "recorder",
        "engine",
        "analysis",
        "strategies",
        "statistics",
        "metrics",
        "layers",
    }
    assert want <= set(data["dir"]), want - set(data["dir"])
    assert not [n for n in data["dir"] if n in ("sys", "importlib", "warnings", "Any")]
    assert data["before"] == []  # nothing loaded before first access
    assert data["plot"] == "geomkit.plot.tradeoff"
    assert data["audit"] and data["recorder"] and data["unlearner"]
    assert data["open_run"]  # the store's public open_run
    assert second == "module 'geomkit' has no attribute 'no_such_thing'"


def test_rerunning_a_registration_cell_is_a_no_op() -> None:
    cell = "strategies.register('blur_per_tensor', strategies.BLUR, strategies.PerTensor)"
    result = fresh(
        f"""
        from geomkit import strategies
        {cell}
        {cell}
        print(strategies.names()[-1], strategies.build("blur_per_tensor"))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["blur_per_tensor", "blur_per_tensor"]


# ----------------------------------------------------------------------------------------------
# ds.geom: runs, audit, plot
# ----------------------------------------------------------------------------------------------


def test_geom_runs(run: Path) -> None:
    ds = geomkit.open_run(run)
    (one,) = ds.geom.runs()
    assert (one.label, one.objective, one.strategy, one.seed) == ("api-run", "graddiff", "sago", 0)
    assert one.ds.sizes["record"] == 6 and "run" not in one.ds.dims


def test_geom_audit_is_theory_audit(run: Path) -> None:
    ds = geomkit.open_run(run)
    audit = ds.geom.audit(claims=["R1", "R4"])
    direct = geomkit.theory.audit(ds, claims=["R1", "R4"])
    assert audit.results == direct.results
    assert {r.claim for r in audit} == {"R1", "R4"} and not audit.bug_detected
    r1 = audit.get("R1", "model", "sago")
    assert r1.cases == 6 and r1.violations == 0
    assert audit.get("R4", "model", ("sago", "pcgrad")).strategy == "sago>=pcgrad"


@pytest.mark.parametrize(
    "method, function, key",
    [
        ("alignment", "alignment_over_steps", ("cos_dr", "sago")),
        ("by_layer", "alignment_by_layer", None),
        ("heatmap", "layer_heatmap", "heatmap"),
        ("losses", "loss_dynamics", None),
    ],
)
def test_geom_plot_shortcuts(run: Path, method: str, function: str, key: object) -> None:
    """Each shortcut draws what the geomkit.plot function draws for this Dataset."""
    import matplotlib.pyplot as plt

    import geomkit.plot as gp

    ds = geomkit.open_run(run)
    result = getattr(ds.geom.plot, method)()
    direct = getattr(gp, function)(ds)
    assert isinstance(result, gp.PlotResult) and result.artists
    assert list(result.artists) == list(direct.artists)
    assert key is None or key in result.artists, list(result.artists)
    plt.close("all")
    assert "alignment" in repr(ds.geom.plot)


def test_composed_strategy_label_is_the_store_coordinate(tmp_path: Path) -> None:
    blur = Strategy(BLUR(), PerTensor())
    rec = Recorder(tmp_path / "g.zarr", TENSORS, [12, 5, 4], blur, shadows=["sago", "blur"])
    g = torch.Generator().manual_seed(1)
    f = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    r = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    rec.record(0, f, r)
    rec.close()
    ds = geomkit.open_run(tmp_path / "g.zarr")
    assert [str(s) for s in ds["strategy"].values] == ["blur/per_tensor", "sago", "blur"]
    assert ds.attrs["applied_strategy"] == "blur/per_tensor"
    metrics = ds.geom.metrics()
    assert np.isfinite(metrics["cos_dr"].sel(strategy="blur/per_tensor").values).all()


def test_recorder_labels_are_unique(tmp_path: Path) -> None:
    from geomkit.strategies import SAGO, SAGOPreferRetain, Sum

    # equal strategies are recorded once; a shadow with other weights carries them in its label
    rec = Recorder(
        tmp_path / "a.zarr",
        TENSORS,
        [12, 5, 4],
        Strategy(SAGO(), alpha=2.0),
        shadows=["sago", "sum", Strategy(Sum(), alpha=2.0), Strategy(SAGO(), gamma=0.5)],
        write=False,
    )
    assert rec.strategy_labels == ["sago", "sum", "sago[alpha=1.0,gamma=0.5]"]
    with pytest.raises(ValueError, match=r"invalid shadows: the strategy labels .* repeat"):
        Recorder(
            tmp_path / "b.zarr",
            TENSORS,
            [12, 5, 4],
            "sago",
            shadows=[Strategy(Sum(), name="mine"), Strategy(SAGOPreferRetain(), name="mine")],
            write=False,
        )
