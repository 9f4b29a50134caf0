"""geomkit: gradient geometry of two-task LLM unlearning (SAGO, PCGrad and friends).

The core (:mod:`geomkit.strategies`, :mod:`geomkit.statistics`, :mod:`geomkit.metrics`,
:mod:`geomkit.layers`) needs only torch and numpy.
"""

__version__ = "0.1.0"

from geomkit import layers, metrics, statistics, strategies
from geomkit.kernels import get_backend, set_backend, use_backend

_LAZY = {
    "open_run": "geomkit.store",
    "open_runs": "geomkit.store",
    "Recorder": "geomkit.recorder",
}


def __getattr__(name: str):
    # The recorder and the store need xarray and zarr; import them on first use so that the
    # core stays importable with torch and numpy alone.
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        if name.startswith("open_"):
            importlib.import_module("geomkit.analysis")  # registers the ds.geom accessor
        return getattr(module, name)
    raise AttributeError(f"module 'geomkit' has no attribute {name!r}")


__all__ = [
    "__version__",
    "Recorder",
    "open_run",
    "open_runs",
    "get_backend",
    "layers",
    "metrics",
    "set_backend",
    "statistics",
    "strategies",
    "use_backend",
]
