"""Combination strategies for two-task unlearning: a rule composed with a scope.

>>> from geomkit import strategies
>>> sago = strategies.build("sago")
>>> update = sago(forget_grads, retain_grads)          # doctest: +SKIP
>>> strategies.names()
['sum', 'pcgrad', 'pcgrad_global', 'sago', 'sago_prefer_retain', 'blur']
>>> str(sago), str(strategies.Strategy(strategies.BLUR(), strategies.PerTensor()))
('sago', 'blur/per_tensor')
"""

from geomkit.strategies.base import EPSILON, Global, PerTensor, Rule, Scope, Strategy
from geomkit.strategies.registry import as_strategy, build, names, register, registered_name
from geomkit.strategies.rules import BLUR, SAGO, PCGrad, SAGOPreferRetain, Sum

__all__ = [
    "EPSILON",
    "BLUR",
    "SAGO",
    "Global",
    "PCGrad",
    "PerTensor",
    "Rule",
    "SAGOPreferRetain",
    "Scope",
    "Strategy",
    "Sum",
    "as_strategy",
    "build",
    "names",
    "register",
    "registered_name",
]
