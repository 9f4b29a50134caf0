"""The step the optimizer takes: ``u`` with ``theta_new = theta_old - u``, per tensor.

The geometry of the combined update d is not that of the parameter change: the optimizer clips
d, then AdamW normalises it per coordinate, adds weight decay and scales by the learning rate.
This module predicts ``u`` for the *next* ``optimizer.step()`` from the optimizer's state, the
parameters and the gradient it will read, on any piece of a tensor (no tensor-sized temporary).
It is the model the step statistics will use (u against f, r and d, taken while the update is
formed, before it overwrites the forget gradient; not recorded yet).

Supported: ``torch.optim.AdamW`` and ``torch.optim.Adam`` (decoupled and L2 weight decay; the
single-tensor, foreach and fused implementations; not ``amsgrad``, not ``maximize``) and
``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay; not ``maximize``). Any other
optimizer raises a ``ValueError`` naming it: its step is not modelled. Nor is mixed precision
with a ``GradScaler``, which unscales the gradient inside the step and may skip it.

The formulas are PyTorch's (``torch/optim/adamw.py``, ``sgd.py``) evaluated in float64; the step
the optimizer then applies in the parameter dtype differs by its rounding (tests/test_step.py).
Mathematics: docs/method.md#the-step-taken.

>>> import torch
>>> p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
>>> opt = torch.optim.SGD([p], lr=0.1)
>>> next_step(opt, p, torch.tensor([0.5, 0.5])).tolist()  # plain SGD: u = lr * grad
[0.05, 0.05]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from geomkit._validation import check_choice

__all__ = ["OPTIMIZERS", "build_optimizer", "next_step"]


def _adamw(params: list[Tensor], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _sgd(params: list[Tensor], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[[list[Tensor], float, float], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "sgd": _sgd,
}
"""The engine's optimizers by name (``EngineConfig.optimizer``, ``--optimizer``): AdamW with
PyTorch's defaults (betas 0.9, 0.999, eps 1e-8, decoupled weight decay), or plain SGD (no
momentum; ``weight_decay`` is then PyTorch's L2 term ``grad + wd theta``). With SGD, no clipping
and no weight decay the step is ``u = lr d`` with the step's scheduled ``lr`` (up to the
rounding of the parameter update), which separates what the combination rule does from what
Adam does."""


def build_optimizer(
    name: str, params: list[Tensor], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The optimizer ``name`` of :data:`OPTIMIZERS` over ``params``.

    >>> p = torch.nn.Parameter(torch.zeros(2))
    >>> type(build_optimizer("sgd", [p], 0.1, 0.0)).__name__
    'SGD'
    """
    check_choice("optimizer", name, OPTIMIZERS)
    return OPTIMIZERS[name](params, lr, weight_decay)


@dataclass(frozen=True)
class _Group:
    """The hyperparameters of a parameter's group, as floats."""

    lr: float
    weight_decay: float
    options: dict


def _group(optimizer: torch.optim.Optimizer, param: Tensor) -> _Group:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            lr = group["lr"]
            lr = float(lr) if not isinstance(lr, Tensor) else float(lr.item())
            return _Group(lr, float(group.get("weight_decay", 0.0)), group)
    raise ValueError(
        f"invalid param of shape {tuple(param.shape)} and dtype {param.dtype}: expected one of "
        f"the {type(optimizer).__name__}'s parameters"
    )


def _piece(t: Tensor, index: slice) -> Tensor:
    return t.reshape(-1)[index].double()


def _adam_step(
    optimizer: torch.optim.Optimizer, param: Tensor, grad: Tensor, index: slice
) -> Tensor:
    g = _group(optimizer, param)
    options = g.options
    for flag in ("amsgrad", "maximize"):
        if options.get(flag, False):
            raise ValueError(
                f"invalid {type(optimizer).__name__}({flag}=True): the step statistics model "
                f"Adam/AdamW with {flag}=False only"
            )
    beta1, beta2 = (float(b) for b in options["betas"])
    eps = float(options["eps"])
    state = optimizer.state.get(param, {})
    theta = _piece(param.detach(), index)
    d = grad.reshape(-1).double()
    decoupled = isinstance(optimizer, torch.optim.AdamW) or options.get(
        "decoupled_weight_decay", False
    )
    if g.weight_decay and not decoupled:  # Adam's L2 term enters the moments
        d = d + g.weight_decay * theta
    if "exp_avg" in state:
        m, v = _piece(state["exp_avg"], index), _piece(state["exp_avg_sq"], index)
        done = float(state["step"])
    else:  # before the first step the state is created as zeros
        m, v, done = torch.zeros_like(d), torch.zeros_like(d), 0.0
    t = done + 1.0
    m = m + (1.0 - beta1) * (d - m)
    v = beta2 * v + (1.0 - beta2) * d * d
    step_size = g.lr / (1.0 - beta1**t)
    denom = v.sqrt() / math.sqrt(1.0 - beta2**t) + eps
    u = step_size * m / denom
    if g.weight_decay and decoupled:
        u = u + g.lr * g.weight_decay * theta
    return u


def _sgd_step(
    optimizer: torch.optim.Optimizer, param: Tensor, grad: Tensor, index: slice
) -> Tensor:
    g = _group(optimizer, param)
    options = g.options
    if options.get("maximize", False):
        raise ValueError(
            "invalid SGD(maximize=True): the step statistics model SGD with maximize=False only"
        )
    d = grad.reshape(-1).double()
    if g.weight_decay:
        d = d + g.weight_decay * _piece(param.detach(), index)
    momentum = float(options.get("momentum", 0.0))
    if momentum:
        buffer = optimizer.state.get(param, {}).get("momentum_buffer")
        if buffer is None:  # the first step copies the gradient
            b = d
        else:
            b = momentum * _piece(buffer, index) + (1.0 - float(options["dampening"])) * d
        d = d + momentum * b if options.get("nesterov", False) else b
    return g.lr * d


_STEPS: dict[type, Callable[[torch.optim.Optimizer, Tensor, Tensor, slice], Tensor]] = {
    torch.optim.AdamW: _adam_step,
    torch.optim.Adam: _adam_step,
    torch.optim.SGD: _sgd_step,
}
"""How each supported optimizer class steps (one entry per optimizer)."""


def next_step(
    optimizer: torch.optim.Optimizer,
    param: Tensor,
    grad: Tensor,
    index: slice = slice(None),
) -> Tensor:
    """``u`` (float64, flat) of the next ``optimizer.step()`` on ``param`` if its gradient is
    ``grad``: ``theta_new = theta_old - u``.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        AdamW, Adam or SGD (see the module docstring); its state is read, never written.
    param : Tensor
        One of the optimizer's parameters.
    grad : Tensor
        The gradient the step will read (after clipping), for the elements ``index`` of the
        flattened parameter.
    index : slice
        A piece of the flattened parameter (default: all of it), so that a large tensor can be
        taken in pieces.

    Returns
    -------
    Tensor
        ``u`` for those elements, float64 on the parameter's device, computed with the
        learning rate the step will use (the group's current ``lr``).

    Examples
    --------
    >>> p = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    >>> opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.0)
    >>> u = next_step(opt, p, torch.tensor([3.0, -0.5]))
    >>> [round(x, 6) for x in u.tolist()]  # Adam's first step: lr * sign(grad)
    [0.1, -0.1]
    """
    step = _STEPS.get(type(optimizer))
    if step is None:
        raise ValueError(
            f"invalid optimizer {type(optimizer).__name__}: the step statistics model "
            f"{', '.join(sorted(c.__name__ for c in _STEPS))} only"
        )
    n = param.numel()
    if not isinstance(index, slice):
        raise TypeError(f"invalid index={index!r}: expected a slice of the flattened parameter")
    start, stop, stride = index.indices(n)
    if stride != 1 or stop < start:
        raise ValueError(
            f"invalid index={index!r}: expected a contiguous, increasing slice of the "
            f"{n} elements of the flattened parameter"
        )
    if grad.numel() != stop - start:
        raise ValueError(
            f"invalid grad of {grad.numel()} elements: expected {stop - start}, the elements "
            f"{start}:{stop} of the parameter"
        )
    return step(optimizer, param, grad, slice(start, stop))
