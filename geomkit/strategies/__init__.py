"""Combination strategies for two-task unlearning: a rule composed with a scope.

>>> import torch
>>> from geomkit import strategies
>>> sago = strategies.build("sago")
>>> forget_grads, retain_grads = [torch.tensor([1.0, -2.0, 0.0])], [torch.tensor([3.0, 1.0, -1.0])]
>>> sago(forget_grads, retain_grads)  # agree: gamma f; conflict: alpha r; a zero never conflicts
[tensor([1., 1., 0.])]
>>> strategies.names()
['sum', 'pcgrad', 'pcgrad_global', 'sago', 'sago_prefer_retain', 'blur']
>>> str(sago), str(strategies.Strategy(strategies.BLUR(), strategies.PerTensor()))
('sago', 'blur/per_tensor')
"""

from geomkit.strategies.base import EPSILON, Global, PerTensor, Rule, Scope, Strategy, tensor_dots
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
    "tensor_dots",
]
