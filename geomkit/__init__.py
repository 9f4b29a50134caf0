"""geomkit: gradient geometry of two-task LLM unlearning (SAGO, PCGrad and friends).

The core (:mod:`geomkit.strategies`, :mod:`geomkit.statistics`, :mod:`geomkit.metrics`,
:mod:`geomkit.layers`) needs only torch and numpy.
"""

__version__ = "0.1.0"

from geomkit import layers, metrics, statistics, strategies
from geomkit.kernels import get_backend, set_backend, use_backend

__all__ = [
    "__version__",
    "get_backend",
    "layers",
    "metrics",
    "set_backend",
    "statistics",
    "strategies",
    "use_backend",
]
