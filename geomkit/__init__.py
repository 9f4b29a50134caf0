"""geomkit: gradient geometry of two-task LLM unlearning (SAGO, PCGrad and friends).

The core (:mod:`geomkit.strategies`, :mod:`geomkit.statistics`, :mod:`geomkit.metrics`,
:mod:`geomkit.layers`) needs only torch and numpy and is imported with the package. Everything
else (the store, the recorder, the engine, :mod:`geomkit.plot`, :mod:`geomkit.theory`, ...)
loads on first attribute access: ``geomkit.plot.tradeoff`` works without ``import
geomkit.plot``, and ``dir(geomkit)`` lists it all.

The ``ds.geom`` accessor (:class:`geomkit.analysis.GeometryAccessor`) is registered on xarray
as soon as both geomkit and xarray are imported, in either order, without ``import geomkit``
importing xarray itself.
"""

import importlib as _importlib
import importlib.abc as _abc
import pkgutil as _pkgutil
import sys as _sys
import warnings as _warnings
from types import ModuleType as _ModuleType
from typing import Any as _Any

__version__ = "0.1.0"

from geomkit import layers, metrics, statistics, strategies
from geomkit.kernels import get_backend, set_backend, use_backend

_LAZY: dict[str, tuple[str, str]] = {
    "open_run": ("geomkit.store", "open_run"),
    "open_runs": ("geomkit.store", "open_runs"),
    "Recorder": ("geomkit.recorder", "Recorder"),
    "StepModel": ("geomkit.step", "StepModel"),
    "EngineConfig": ("geomkit.engine", "EngineConfig"),
    "Unlearner": ("geomkit.engine", "Unlearner"),
    "audit": ("geomkit.theory", "audit"),
}
"""Public functions and classes outside the core: name -> (module, attribute)."""

_SUBMODULES: tuple[str, ...] = tuple(
    sorted(name for _, name, _ in _pkgutil.iter_modules(__path__) if not name.startswith("_"))
)
"""Every public module and subpackage of geomkit (loaded on first access)."""


def __getattr__(name: str) -> _Any:
    # The store, recorder, plot and theory need xarray, zarr or matplotlib; they are imported
    # on first use so that the core stays importable with torch and numpy alone.
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(_importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")  # import binds it on the package
    raise AttributeError(f"module 'geomkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


# ----------------------------------------------------------------------------------------------
# The ds.geom accessor: registered when xarray is (or becomes) imported
# ----------------------------------------------------------------------------------------------


def _register_accessor() -> None:
    """Import :mod:`geomkit.analysis`, whose import registers ``ds.geom`` (once)."""
    try:
        _importlib.import_module("geomkit.analysis")
    except Exception as error:  # never break the user's `import xarray`
        _warnings.warn(
            f"geomkit could not register the ds.geom accessor: {error!r}",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisteringLoader(_abc.Loader):
    """Wraps xarray's loader: executes xarray, then registers ``ds.geom``."""

    def __init__(self, loader: _abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: _Any) -> _ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: _ModuleType) -> None:
        self._loader.exec_module(module)
        _AccessorHook.remove()
        _register_accessor()

    def __getattr__(self, name: str) -> _Any:  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _AccessorHook(_abc.MetaPathFinder):
    """A ``sys.meta_path`` entry that only watches for the import of ``xarray``.

    It asks the other finders for xarray's spec and wraps its loader with
    :class:`_RegisteringLoader`; it removes itself once xarray has been executed.
    """

    def find_spec(self, fullname: str, path: _Any, target: _Any = None) -> _Any:
        if fullname != "xarray":
            return None
        for finder in list(_sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None

    @staticmethod
    def remove() -> None:
        _sys.meta_path[:] = [f for f in _sys.meta_path if not isinstance(f, _AccessorHook)]


def _install_accessor() -> None:
    xarray = _sys.modules.get("xarray")
    if xarray is not None and hasattr(xarray, "register_dataset_accessor"):
        _register_accessor()
    elif not any(isinstance(f, _AccessorHook) for f in _sys.meta_path):
        _sys.meta_path.insert(0, _AccessorHook())


_install_accessor()

__all__ = [
    "__version__",
    "EngineConfig",
    "Recorder",
    "StepModel",
    "Unlearner",
    "audit",
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
"""``from geomkit import *`` binds the core and the public functions; every other module (see
``dir(geomkit)``) stays lazy, since some need optional dependencies (transformers)."""
