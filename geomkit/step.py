"""The step the optimizer takes: ``u`` with ``theta_new = theta_old - u``, per tensor.

The geometry of the combined update d is not that of the parameter change: the optimizer clips
d, then AdamW normalises it per coordinate, adds weight decay and scales by the learning rate.
This module predicts ``u`` for the *next* ``optimizer.step()`` from the optimizer's state, the
parameters and the gradient it will read, on any piece of a tensor (no tensor-sized temporary).
:class:`StepModel` reduces u against f, r and the applied update d to the step statistics (the
``"step"`` fields of :data:`geomkit.fields.FIELD_TABLE`) while the update is formed, before it
overwrites the forget gradient, one piece of :data:`STEP_CHUNK` elements at a time
(:meth:`geomkit.recorder.Recorder.observe`, ``step_model=``).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from geomkit._validation import check_choice

__all__ = ["OPTIMIZERS", "STEP_CHUNK", "StepModel", "build_optimizer", "next_step"]


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
    """What one parameter's step reads besides its tensors, as floats: its group's
    hyperparameters and the number of steps its state has taken."""

    lr: float
    weight_decay: float
    options: dict
    done: float


def _host(value: object) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _group(optimizer: torch.optim.Optimizer, param: Tensor) -> _Group:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            done = optimizer.state.get(param, {}).get("step", 0.0)
            return _Group(
                _host(group["lr"]), float(group.get("weight_decay", 0.0)), group, _host(done)
            )
    raise ValueError(
        f"invalid param of shape {tuple(param.shape)} and dtype {param.dtype}: expected one of "
        f"the {type(optimizer).__name__}'s parameters"
    )


def _flat(t: Tensor) -> Tensor:
    """``t`` flattened, the process-local shard of a DTensor."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.reshape(-1)


def _piece(t: Tensor, index: slice) -> Tensor:
    return _flat(t)[index].double()


def _adam_step(
    optimizer: torch.optim.Optimizer, param: Tensor, grad: Tensor, index: slice, g: _Group
) -> Tensor:
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
    else:  # before the first step the state is created as zeros
        m, v = torch.zeros_like(d), torch.zeros_like(d)
    t = g.done + 1.0
    m = m + (1.0 - beta1) * (d - m)
    v = beta2 * v + (1.0 - beta2) * d * d
    step_size = g.lr / (1.0 - beta1**t)
    denom = v.sqrt() / math.sqrt(1.0 - beta2**t) + eps
    u = step_size * m / denom
    if g.weight_decay and decoupled:
        u = u + g.lr * g.weight_decay * theta
    return u


def _sgd_step(
    optimizer: torch.optim.Optimizer, param: Tensor, grad: Tensor, index: slice, g: _Group
) -> Tensor:
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


_STEPS: dict[type, Callable[[torch.optim.Optimizer, Tensor, Tensor, slice, _Group], Tensor]] = {
    torch.optim.AdamW: _adam_step,
    torch.optim.Adam: _adam_step,
    torch.optim.SGD: _sgd_step,
}
"""How each supported optimizer class steps (one entry per optimizer)."""


def _stepper(
    optimizer: torch.optim.Optimizer,
) -> Callable[[torch.optim.Optimizer, Tensor, Tensor, slice, _Group], Tensor]:
    step = _STEPS.get(type(optimizer))
    if step is None:
        raise ValueError(
            f"invalid optimizer {type(optimizer).__name__}: the step statistics model "
            f"{', '.join(sorted(c.__name__ for c in _STEPS))} only"
        )
    return step


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
    step = _stepper(optimizer)
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
    return step(optimizer, param, grad, slice(start, stop), _group(optimizer, param))


_ADAM_FLAGS = ("amsgrad", "maximize")


def _positive(value: object) -> float | None:
    """``value`` as a positive finite float (a real number or a 0-d tensor, not a bool), else
    None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) and number > 0 else None


STEP_CHUNK: int = 1 << 18
"""Elements of a tensor whose step is modelled at once by :class:`StepModel` (its float64
temporaries are a few chunks, never a tensor)."""

STEP_STATISTICS: tuple[str, ...] = (
    "uu",
    "uf",
    "ur",
    "ud",
    "dd_step",
    "n_u_opposed_r",
    "n_u_opposed_f",
)
"""The fields :meth:`StepModel.statistics` returns, in its order (the ``"step"`` fields of the
field table)."""


class StepModel:
    """The next optimizer step of some parameters, reduced to the step statistics.

    The optimizer will clip the applied update d to ``max_grad_norm`` (scale ``min(1,
    max_grad_norm / (|d| + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``), then step; the
    step is ``u = theta_old - theta_new`` (:func:`next_step`). Per tensor, :meth:`statistics`
    returns ``<u,u>, <u,f>, <u,r>, <u,d>, <d,d>`` and the counts of coordinates where u opposes
    r and where it opposes f, in float64, from f, r and d, before the step is taken.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        AdamW, Adam or SGD (see the module docstring); read, never written.
    params : sequence of Tensor
        The parameters whose gradients are recorded, in the recorder's tensor order.
    max_grad_norm : float, optional
        The clipping norm of the whole update (None: no clipping).

    Examples
    --------
    >>> p = torch.nn.Parameter(torch.zeros(3))
    >>> model = StepModel(torch.optim.SGD([p], lr=0.5), [p])
    >>> model.begin(dd=14.0)  # |d|^2 of the whole update: fixes the clip scale (none here)
    >>> f, r, d = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, -1]), torch.tensor([1.0, 2, 3])
    >>> stats = model.statistics(0, f, r, d)  # u = 0.5 d
    >>> dict(zip(STEP_STATISTICS, stats.tolist()))["ur"], stats[-2].item()  # <u,r>, u opposes r
    (-0.5, 1.0)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[Tensor],
        max_grad_norm: float | None = None,
    ) -> None:
        self._step = _stepper(optimizer)
        if max_grad_norm is not None:
            value = _positive(max_grad_norm)
            if value is None:
                raise ValueError(
                    f"invalid max_grad_norm={max_grad_norm!r}: expected a positive finite "
                    "number or None"
                )
            max_grad_norm = value
        self.optimizer = optimizer
        self.params = list(params)
        self.max_grad_norm = max_grad_norm
        self._owners()  # raised here, not at the first record
        self._groups: list[_Group] | None = None
        self.scale = 1.0

    def _owners(self) -> list[dict]:
        """The optimizer's group of each parameter, looked up anew (``load_state_dict``
        replaces the groups); raises for a parameter it does not hold or an option it does
        not model."""
        optimizer = self.optimizer
        owner = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        for i, p in enumerate(self.params):
            if id(p) not in owner:
                raise ValueError(
                    f"invalid params[{i}] of shape {tuple(p.shape)}: expected one of the "
                    f"{type(optimizer).__name__}'s parameters"
                )
        flags = ("maximize",) if isinstance(optimizer, torch.optim.SGD) else _ADAM_FLAGS
        for group in optimizer.param_groups:
            for flag in flags:
                if group.get(flag, False):
                    raise ValueError(
                        f"invalid {type(optimizer).__name__}({flag}=True): the step statistics "
                        f"model {type(optimizer).__name__} with {flag}=False only"
                    )
        return [owner[id(p)] for p in self.params]

    def begin(self, dd: float) -> None:
        """Fix the clip scale from ``dd = <d, d>`` of the whole update, and read each group's
        learning rate and each parameter's step count once (host values) for this step."""
        if self.max_grad_norm is not None and math.isfinite(dd):
            self.scale = min(1.0, self.max_grad_norm / (math.sqrt(max(dd, 0.0)) + 1e-6))
        else:
            self.scale = 1.0
        counts = [self.optimizer.state.get(p, {}).get("step", 0.0) for p in self.params]
        on_device = [i for i, c in enumerate(counts) if isinstance(c, Tensor)]
        by_device: dict[torch.device, list[int]] = {}
        for i in on_device:  # one host read per device (fused or capturable AdamW: on the GPU)
            by_device.setdefault(counts[i].device, []).append(i)
        for indices in by_device.values():
            values = torch.stack([counts[i].detach().double() for i in indices]).tolist()
            for i, value in zip(indices, values, strict=True):
                counts[i] = value
        lrs = {id(group): _host(group["lr"]) for group in self.optimizer.param_groups}
        self._groups = [
            _Group(lrs[id(group)], float(group.get("weight_decay", 0.0)), group, float(done))
            for group, done in zip(self._owners(), counts, strict=True)
        ]

    def statistics(
        self, index: int, forget: Tensor, retain: Tensor, update: Tensor, offset: int = 0
    ) -> Tensor:
        """The step statistics of tensor ``index`` (:data:`STEP_STATISTICS`, float64 ``[7]`` on
        its device) from its forget and retain gradients and the applied update (before
        clipping); call :meth:`begin` first.

        The three tensors hold the parameter's (local) elements ``offset`` onwards of its
        flattened form: the whole tensor by default, or a piece of it, whose statistics then
        add up to the tensor's.
        """
        if self._groups is None:
            raise RuntimeError("StepModel.statistics before begin(): the clip scale is unknown")
        if not 0 <= index < len(self.params):
            raise IndexError(
                f"invalid index={index!r}: expected 0 <= index < {len(self.params)}, one of "
                "the StepModel's parameters"
            )
        param, g = self.params[index], self._groups[index]
        f, r, d = forget.reshape(-1), retain.reshape(-1), update.reshape(-1)
        n, size = d.numel(), _flat(param.detach()).numel()
        if not (f.numel() == r.numel() == n and 0 <= offset and offset + n <= size):
            raise ValueError(
                f"invalid tensors for params[{index}] of {size} elements at offset={offset}: "
                f"forget, retain and update have {f.numel()}, {r.numel()}, {n}"
            )
        total = torch.zeros(len(STEP_STATISTICS), dtype=torch.float64, device=d.device)
        for start in range(0, n, STEP_CHUNK):
            piece = slice(start, min(start + STEP_CHUNK, n))
            d_c = d[piece].double()
            where = slice(offset + piece.start, offset + piece.stop)
            u = self._step(self.optimizer, param, d_c * self.scale, where, g)
            f_c, r_c = f[piece].double(), r[piece].double()
            sign_u = u.sign()
            total += torch.stack(
                [
                    torch.linalg.vector_norm(u).square(),
                    torch.dot(u, f_c),
                    torch.dot(u, r_c),
                    torch.dot(u, d_c),
                    torch.linalg.vector_norm(d_c).square(),
                    (sign_u * r_c.sign() < 0).sum(dtype=torch.float64),
                    (sign_u * f_c.sign() < 0).sum(dtype=torch.float64),
                ]
            )
        return total
