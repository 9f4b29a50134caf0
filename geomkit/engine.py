"""The two-pass unlearning loop (paper Algorithm 1, the released trainer's semantics).

Per optimizer step, for each of ``accumulation`` micro-batches: one forward + backward of the
forget loss and one of the retain loss, each task's gradient accumulated separately. Each task's
gradient is that of its global loss over the step: every micro-batch's total divided by the count
summed over the window and the data-parallel ranks (docs/method.md#normalisation). At the
accumulation boundary the two gradients are summed across ranks (one bucketed all-reduce per
task, not one per backward), recorded (statistics from the two gradients, before any update is
formed), combined once by the strategy in place into the forget buffer, which is what the
parameters' ``.grad`` are (two gradient-sized buffers in all), clipped, and AdamW takes the step
under a linear schedule with warm-up. This module keeps that loop short and readable; everything
else lives in the modules it calls.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from geomkit._validation import ConfigError, check_choice, check_integer, check_real, invalid
from geomkit.distributed import init_from_environment, rank_and_world, shard_sum
from geomkit.objectives import Objective, _Loss, check_count
from geomkit.recorder import VERIFY_EVERY, Every, Never, Recorder, Schedule
from geomkit.step import OPTIMIZERS, StepModel, build_optimizer
from geomkit.strategies import Strategy, as_strategy

__all__ = [
    "EngineConfig",
    "NonFiniteGradientError",
    "StepResult",
    "Unlearner",
    "load_model",
    "seed_everything",
]


class NonFiniteGradientError(FloatingPointError):
    """A forget or retain gradient held NaN or inf."""


@dataclass
class EngineConfig:
    """Settings of the unlearning loop (docs/method.md#engine-loop).

    Attributes
    ----------
    strategy : str or Strategy
        The applied combination strategy: a name of :func:`geomkit.strategies.names` or a
        :class:`~geomkit.strategies.Strategy` (e.g. ``Strategy(BLUR(), PerTensor())``).
    shadows : list of str or Strategy, or None
        Strategies recorded on the same gradients without being applied (None: all
        registered).
    alpha, gamma : float
        Weights of the retain and forget gradients for a strategy given by name. A Strategy
        object carries its own weights; these must then be left at 1.0 or equal them.
    lr : float
        Peak learning rate.
    optimizer : {"adamw", "sgd"}
        AdamW (PyTorch's defaults) or plain SGD (:data:`geomkit.step.OPTIMIZERS`). With SGD,
        no clipping and no weight decay the parameters move by the step's scheduled learning
        rate times d (up to the rounding of the parameter update).
    steps : int
        Optimizer steps.
    accumulation : int
        Micro-batches per optimizer step (per task).
    warmup_ratio : float
        Fraction of ``steps`` with a linear warm-up; then linear decay to 0.
    max_grad_norm : float or None
        Clip the combined update to this norm (None: no clipping).
    weight_decay : float
        Weight decay (AdamW: decoupled; SGD: PyTorch's L2 term).
    trainable : str or None
        Regex: only parameters whose name matches train (None: the objective's default, else
        every parameter).
    record_every : int
        Record geometry every this many steps (0: never).
    verify_every : int
        Verify the closed forms at the first geometry record and every this many records
        after it (0: never): each strategy's update, the applied one's included, is
        materialised with its own code one tensor at a time and measured
        (:meth:`geomkit.recorder.Recorder.verify`, claims V1 and R0); the applied one is then
        the update applied.
    record_step : bool
        At each geometry record, also record the statistics of the step the optimizer takes
        (u against f, r and d, after clipping and AdamW; :class:`geomkit.step.StepModel`,
        docs/method.md#the-step-taken).
    record_realized : bool
        At each geometry record, evaluate both objectives again on the step's own batches
        after the step (two forward passes, no backward): the realised loss changes beside the
        first-order predictions ``pred_forget_change`` and ``pred_retain_change``.
    flush_every : int
        Append to the store every this many steps.
    nonfinite : {"error", "skip"}
        On a NaN/inf gradient, stop with an error naming the step and tensors, or skip the
        step and record that it was skipped.
    seed : int
        Seeds Python, NumPy and torch.
    """

    strategy: str | Strategy = "sago"
    shadows: list[str | Strategy] | None = None
    alpha: float = 1.0
    gamma: float = 1.0
    lr: float = 1e-5
    optimizer: str = "adamw"
    steps: int = 100
    accumulation: int = 1
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    trainable: str | None = None
    record_every: int = 1
    verify_every: int = VERIFY_EVERY
    record_step: bool = True
    record_realized: bool = False
    flush_every: int = 10
    nonfinite: str = "error"
    seed: int = 0

    def build_strategy(self) -> Strategy:
        """The applied :class:`~geomkit.strategies.Strategy` (a name is built with ``alpha``
        and ``gamma``); checks the shadows too. Raises ``ValueError`` / ``TypeError``."""
        strategy = as_strategy(self.strategy, alpha=self.alpha, gamma=self.gamma)
        if self.shadows is not None and (
            isinstance(self.shadows, (str, Strategy)) or not hasattr(self.shadows, "__iter__")
        ):
            raise TypeError(
                f"invalid shadows={self.shadows!r}: expected a list of strategy names or "
                "Strategy objects, or None"
            )
        for shadow in self.shadows or []:
            as_strategy(shadow)
        return strategy

    def validate(self) -> None:
        """Raise :class:`~geomkit.config.ConfigError` (a ``ValueError``) naming the first
        invalid field."""
        try:  # the strategy, its weights and the shadows
            self.build_strategy()
        except ValueError as error:
            raise ConfigError(str(error)) from None
        for name in ("steps", "accumulation", "flush_every"):
            check_integer(name, getattr(self, name), 1, error=ConfigError)
        check_integer("record_every", self.record_every, 0, error=ConfigError)
        check_integer("verify_every", self.verify_every, 0, error=ConfigError)
        check_integer("seed", self.seed, 0, error=ConfigError)
        check_real("lr", self.lr, 0.0, strict=True, error=ConfigError)
        check_real("warmup_ratio", self.warmup_ratio, 0.0, 1.0, strict_high=True, error=ConfigError)
        check_real(
            "max_grad_norm", self.max_grad_norm, 0.0, strict=True, optional=True, error=ConfigError
        )
        check_real("weight_decay", self.weight_decay, 0.0, error=ConfigError)
        check_choice("nonfinite", self.nonfinite, ("error", "skip"), error=ConfigError)
        check_choice("optimizer", self.optimizer, tuple(OPTIMIZERS), error=ConfigError)
        for name in ("record_step", "record_realized"):
            if not isinstance(getattr(self, name), bool):
                raise invalid(name, getattr(self, name), "True or False", error=ConfigError)
        if self.trainable is not None:
            try:
                re.compile(self.trainable)
            except re.error as error:
                raise invalid(
                    "trainable", self.trainable, f"a valid regex ({error})", error=ConfigError
                ) from None


@dataclass
class StepResult:
    """What one optimizer step did."""

    step: int
    forget_loss: float
    retain_loss: float
    learning_rate: float
    grad_norm: float
    skipped: bool
    recorded: bool


class _Stream:
    """Cycle over an iterable of batches forever, counting the batches served."""

    def __init__(self, batches: Iterable[Mapping[str, Tensor]], name: str) -> None:
        self.batches = batches
        self.name = name
        self.position = 0
        self._it: Iterator | None = None

    def next(self) -> Mapping[str, Tensor]:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.batches)
            try:
                batch = next(self._it)
                self.position += 1
                return batch
            except StopIteration:
                self._it = None
        raise ValueError(f"the {self.name} data is empty; expected at least one batch")

    def skip(self, n: int) -> None:
        for _ in range(n):
            self.next()


def _all_reduce_sum(tensors: Sequence[Tensor], world: int, bucket_bytes: int = 32 << 20) -> None:
    """Sum ``tensors`` over ranks in place, in buckets of at most ``bucket_bytes``."""
    if world == 1:
        return
    bucket: list[Tensor] = []
    size = 0

    def reduce(bucket: list[Tensor]) -> None:
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    for t in tensors:
        bucket.append(t)
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            reduce(bucket)
            bucket, size = [], 0
    if bucket:
        reduce(bucket)


def _global_count(
    loss: _Loss, batches: Sequence[Mapping[str, Tensor]], device: torch.device, world: int
) -> Tensor:
    """The normaliser of a step: ``loss.count`` summed over ``batches`` and over ranks (int64,
    one small all-reduce when ``world > 1``)."""
    count = torch.stack([loss.count(batch).cpu() for batch in batches]).sum()
    if world > 1:
        count = count.to(device)
        dist.all_reduce(count)
    return count


def _local(t: Tensor) -> Tensor:
    """The process-local part of a tensor: the shard of a DTensor, else the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The CPU random state, and the device's when it is a GPU."""
    return torch.get_rng_state(), (
        torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    )


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _move(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def load_model(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
) -> torch.nn.Module:
    """Load a causal LM from a local Hugging Face directory (never from a hub).

    Parameters
    ----------
    path : str or PathLike
        A directory written by ``save_pretrained`` (``config.json`` + weights).
    device : str or torch.device
        Where to put it (``"cpu"``, ``"cuda"``, ...).
    dtype : str or torch.dtype
        ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype.
    """
    import transformers

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a local Hugging Face model directory (no config.json); geomkit "
            "never downloads models"
        )
    if isinstance(dtype, str):
        check_choice("dtype", dtype, ("float32", "bfloat16", "float16"))
        dtype = getattr(torch, dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=dtype
    )
    return model.to(device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds legacy global-state users too
    torch.manual_seed(seed)


@dataclass
class Unlearner:
    """Run two-task unlearning on a Hugging Face causal LM and record its geometry.

    Parameters
    ----------
    model : torch.nn.Module or path
        The model to unlearn (any ``transformers`` causal LM, on its device and dtype), or a
        local Hugging Face directory, loaded with :func:`load_model` (float32, CPU; load it
        yourself for another device or dtype).
    objective : Objective
        Forget and retain losses (:func:`geomkit.objectives.build_objective`).
    forget, retain : iterable of batches
        Re-iterable sources of micro-batches (dicts with ``input_ids``, ``attention_mask``,
        ``labels``); cycled as needed.
    config : EngineConfig
        Loop settings, validated before any work starts.
    out : path or None
        Where the geometry store is written (None: nothing is written).
    reference : torch.nn.Module or None
        Frozen reference model for NPO / KL / RMU; a frozen copy of ``model`` is made when the
        objective needs one and none is given.
    attrs : mapping
        Extra run attributes for the store.
    """

    model: torch.nn.Module | str | os.PathLike
    objective: Objective
    forget: Iterable[Mapping[str, Tensor]]
    retain: Iterable[Mapping[str, Tensor]] | None
    config: EngineConfig = field(default_factory=EngineConfig)
    out: str | os.PathLike | None = None
    reference: torch.nn.Module | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)
    resume_step: int | None = None

    def __post_init__(self) -> None:
        self.config.validate()
        if isinstance(self.model, (str, os.PathLike)):
            self.model = load_model(self.model)
        init_from_environment()  # under torchrun / accelerate: join the process group
        if self.objective.retain is not None and self.retain is None:
            raise invalid(
                "retain",
                None,
                f"retain data (objective {self.objective.name!r} has a retain loss)",
            )
        n_layers = getattr(getattr(self.model, "config", None), "num_hidden_layers", None)
        pattern = self.config.trainable or (
            self.objective.trainable_for(n_layers) if n_layers else self.objective.trainable
        )
        named = list(self.model.named_parameters())
        if pattern is not None:
            regex = re.compile(pattern)
            selected = {n for n, _ in named if regex.search(n)}
        else:
            selected = {n for n, p in named if p.requires_grad}
        if not selected:  # checked before anything about the model changes
            raise invalid(
                "trainable",
                pattern,
                "a pattern selecting at least one parameter of the model "
                f"(first names: {[n for n, _ in named[:3]]})",
            )
        for source, name in ((self.forget, "forget"), (self.retain, "retain")):
            if source is not None and hasattr(source, "__len__") and len(source) == 0:
                raise ValueError(f"the {name} data is empty; expected at least one batch")
        for name, p in named:
            p.requires_grad_(name in selected)
        self.names = [n for n, _ in named if n in selected]
        self.params = [p for n, p in named if n in selected]
        if self.objective.needs_reference and self.reference is None:
            import copy

            self.reference = copy.deepcopy(self.model)
        if self.reference is not None:
            self.reference.eval()
            self.reference.requires_grad_(False)
        self.rank, self.world = rank_and_world()
        seed_everything(self.config.seed)
        self.strategy: Strategy = self.config.build_strategy()
        self.optimizer = build_optimizer(
            self.config.optimizer, self.params, self.config.lr, self.config.weight_decay
        )
        warmup = int(self.config.warmup_ratio * self.config.steps)
        total = self.config.steps

        def linear(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear)
        self.step_index = 0
        self._forget = _Stream(self.forget, "forget")
        self._retain = _Stream(self.retain, "retain") if self.retain is not None else None
        # FSDP2 (fully_shard): parameters and gradients are DTensor shards; each task's
        # gradient is reduce-scattered once per window and every statistic is summed over ranks.
        self.sharded = any(isinstance(p, DTensor) for p in self.params)
        self._shard_sum = shard_sum() if self.sharded else None
        # Two gradient-sized buffers: the forget and retain gradients. The strategy writes the
        # combined update into the forget buffer, which is what every parameter's ``.grad`` is
        # (its local shard under FSDP2), so AdamW reads the update without a third copy.
        # ``_accumulate`` points ``.grad`` at the buffer of the task it differentiates, and
        # ``_grads`` points it back at the forget buffer before the update is formed.
        self._f = [torch.zeros_like(_local(p)) for p in self.params]
        self._r = [torch.zeros_like(_local(p)) for p in self.params]
        self._grads()
        self.recorder = self._make_recorder()
        self._step_model = (
            StepModel(self.optimizer, self.params, self.config.max_grad_norm)
            if self.recorder is not None and self.config.record_step
            else None
        )
        self._windows: dict[str, tuple[list[Mapping[str, Tensor]], int, Any]] = {}

    def _make_recorder(self) -> Recorder | None:
        if self.out is None:
            return None
        shadows = self.config.shadows
        attrs = {
            "model": type(self.model).__name__,
            "objective": self.objective.name,
            "seed": self.config.seed,
            "world_size": self.world,
            "accumulation_steps": self.config.accumulation,
            "dtype": str(self.params[0].dtype).replace("torch.", ""),
            "device": self.params[0].device.type,
            "learning_rate_peak": self.config.lr,
            "steps": self.config.steps,
            **self.attrs,
        }
        schedule: Schedule = (
            Every(self.config.record_every) if self.config.record_every else Never()
        )
        return Recorder(
            Path(self.out),
            self.names,
            [p.numel() for p in self.params],
            self.strategy,
            shadows,
            schedule=schedule,
            verify_every=self.config.verify_every,
            flush_every=self.config.flush_every,
            attrs=attrs,
            shard_sum=self._shard_sum,
            write=self.rank == 0,
            mode="a" if self.resume_step is not None else "w",
            resume_step=self.resume_step,
        )

    # -- one optimizer step -----------------------------------------------------------------

    def _accumulate(self, loss_fn: _Loss, stream: _Stream, into: list[Tensor]) -> Tensor:
        """Forward + backward of one task over the accumulation window, into ``into``.

        ``into`` receives the gradient of the step's global loss: the totals of every
        micro-batch of the window on every rank, divided by their summed count
        (docs/method.md#normalisation). Returns that loss (float64, the same on every rank).
        """
        for buffer in into:
            buffer.zero_()
        device = _local(self.params[0]).device
        window = self.config.accumulation
        batches = [stream.next() for _ in range(window)]
        # counted on the host (the batches are moved to the device below); with several
        # processes one small all-reduce per task and step
        count = check_count(
            int(_global_count(loss_fn, batches, device, self.world)),
            loss_fn,
            f"the {stream.name} data of step {self.step_index} ({window} micro-batch(es) on "
            f"{self.world} process(es))",
        )
        if self.config.record_realized:  # kept for the losses after the step, with the random
            # state the forwards start from (the same dropout masks after the step)
            self._windows[stream.name] = (batches, count, _rng_state(device))
        # FSDP2 divides the reduce-scattered gradient by the world size: scale it back
        scale = self.world if self.sharded else 1
        total = torch.zeros((), device=device, dtype=torch.float64)
        for p, buffer in zip(self.params, into, strict=True):
            # FSDP2 makes its own reduce-scattered gradient; otherwise ``.grad`` is the task's
            # buffer while this task runs, so that no third gradient-sized copy is ever made
            p.grad = None if self.sharded else buffer
        for i, batch in enumerate(batches):
            part = loss_fn.total(self.model, _move(batch, device), self.reference)
            loss = (part * scale if scale != 1 else part) / count
            if self.sharded:  # FSDP2 reduce-scatters at the window's last backward only
                self.model.set_requires_gradient_sync(i == window - 1)
                loss.backward()
            else:  # autograd adds each tensor's gradient into ``into`` in place
                loss.backward()
            total += part.detach().double()
        if self.sharded:
            for buffer, p in zip(into, self.params, strict=True):
                if p.grad is not None:
                    buffer.copy_(_local(p.grad))
        else:
            _all_reduce_sum(into, self.world)
        if self.world > 1:
            dist.all_reduce(total)
        return total / count

    def _non_finite(self) -> dict[str, list[str]]:
        """Names of the tensors with a NaN or inf gradient, per task (one host sync)."""
        finite = torch.stack([torch.isfinite(g).all() for g in (*self._f, *self._r)]).to(
            torch.int32
        )
        if self.sharded:  # a shard anywhere decides for everyone
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if bool(finite.all()):
            return {}
        flags = finite.view(2, -1).tolist()
        bad = {
            task: [n for n, ok in zip(self.names, row, strict=True) if not ok]
            for task, row in zip(("forget", "retain"), flags, strict=True)
        }
        return {task: names for task, names in bad.items() if names}

    def _grads(self) -> list[Tensor]:
        """Point every parameter's ``.grad`` at its forget buffer and return the buffers.

        The update is formed in place there. Under FSDP2, ``.grad`` becomes a DTensor whose
        local shard is the buffer (same mesh, placements and global shape as the parameter),
        which also frees the gradient FSDP reduce-scattered last.
        """
        for p, f in zip(self.params, self._f, strict=True):
            if isinstance(p, DTensor):
                grad = p.grad
                if grad is None or grad.to_local().data_ptr() != f.data_ptr():
                    p.grad = DTensor.from_local(
                        f,
                        p.device_mesh,
                        p.placements,
                        run_check=False,
                        shape=p.shape,
                        stride=p.stride(),
                    )
            elif p.grad is not f:
                p.grad = f
        return self._f

    def _norm(self, grads: list[Tensor]) -> Tensor:
        """Euclidean norm of the whole update (over every shard under FSDP2)."""
        if not self.sharded:
            return torch.nn.utils.get_total_norm(grads)
        square = torch.stack([g.double().pow(2).sum() for g in grads]).sum()
        dist.all_reduce(square)
        return square.sqrt()

    def _clip(self, grads: list[Tensor], norm: Tensor) -> None:
        """Scale the update in place to at most ``max_grad_norm`` (no host synchronisation)."""
        if self.config.max_grad_norm is not None:
            scale = (self.config.max_grad_norm / (norm.double() + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, scale.to(grads[0].dtype))

    def step(self) -> StepResult:
        """Take one optimizer step and return what happened."""
        step = self.step_index
        self.model.train()
        forget_loss = self._accumulate(self.objective.forget, self._forget, self._f)
        if self._retain is not None:
            retain_loss = self._accumulate(self.objective.retain, self._retain, self._r)
        else:
            retain_loss = torch.full((), math.nan, dtype=torch.float64)
        bad = self._non_finite()
        learning_rate = self.scheduler.get_last_lr()[0]
        if bad:
            detail = "; ".join(f"{task}: {', '.join(names)}" for task, names in bad.items())
            if self.config.nonfinite == "error":
                if self.recorder is not None:
                    self.recorder.close()
                raise NonFiniteGradientError(
                    f"non-finite gradient at step {step} in {detail}; set nonfinite='skip' to "
                    "skip such steps"
                )
            result = StepResult(
                step, float(forget_loss), float(retain_loss), learning_rate, math.nan, True, False
            )
            if self.recorder is not None:
                self.recorder.record(
                    step,
                    forget_loss=result.forget_loss,
                    retain_loss=result.retain_loss,
                    learning_rate=learning_rate,
                    skipped=True,
                )
            self.scheduler.step()
            self.step_index += 1
            return result

        grads = self._grads()  # the forget buffers, aliased by .grad
        recorded = self.recorder is not None and self.recorder.wants(step)
        observation = None
        if recorded:  # statistics from (f, r) first, then the update is formed into f
            observation = self.recorder.observe(
                self._f, self._r, into=grads, step_model=self._step_model
            )
        else:
            self.strategy(self._f, self._r, out=grads, shard_sum=self._shard_sum)
        norm = self._norm(grads)
        result = StepResult(
            step,
            float(forget_loss),
            float(retain_loss),
            learning_rate,
            float(norm),
            False,
            recorded,
        )
        self._clip(grads, norm)
        self.optimizer.step()  # no zero_grad: the next accumulation overwrites both buffers
        after = (math.nan, math.nan)
        if recorded and self.config.record_realized:
            after = self._losses_after()
        if self.recorder is not None:  # the update as formed, before clipping rescales it
            self.recorder.record(
                step,
                observation=observation,
                forget_loss=result.forget_loss,
                retain_loss=result.retain_loss,
                learning_rate=learning_rate,
                grad_norm=result.grad_norm,
                forget_loss_after=after[0],
                retain_loss_after=after[1],
            )
        self.scheduler.step()
        self.step_index += 1
        return result

    @torch.no_grad()
    def _losses_after(self) -> tuple[float, float]:
        """Both objectives on this step's own batches, with the parameters after the step
        (the same global normalisation as :meth:`_accumulate`; no backward). Each pass starts
        from the random state its task's forwards started from, so that dropout draws the same
        masks, and the random state of training is left as it was (recording never changes the
        trajectory)."""
        device = _local(self.params[0]).device
        losses = []
        for loss_fn, stream in (
            (self.objective.forget, self._forget),
            (self.objective.retain, self._retain),
        ):
            if loss_fn is None or stream is None:
                losses.append(math.nan)
                continue
            batches, count, state = self._windows[stream.name]
            total = torch.zeros((), device=device, dtype=torch.float64)
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                _set_rng_state(state, device)
                for batch in batches:
                    part = loss_fn.total(self.model, _move(batch, device), self.reference)
                    total += part.double()
            if self.world > 1:
                dist.all_reduce(total)
            losses.append(float(total / count))
        return losses[0], losses[1]

    def run(self, callback: Callable[[StepResult], None] | None = None) -> list[StepResult]:
        """Run the remaining steps; ``callback`` sees each step's result (e.g. a progress bar)."""
        results = []
        try:
            while self.step_index < self.config.steps:
                result = self.step()
                results.append(result)
                if callback is not None:
                    callback(result)
        finally:
            if self.recorder is not None:
                self.recorder.close()
        return results

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: model, optimizer, schedule, data positions, RNG."""
        return {
            "step": self.step_index,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "forget_position": self._forget.position,
            "retain_position": self._retain.position if self._retain is not None else 0,
            "torch_rng": torch.get_rng_state(),
            "config": asdict(self.config),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write a checkpoint (flushes the recorder first, so the store matches it)."""
        if self.recorder is not None:
            self.recorder.flush(wait=True)
        torch.save(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save` (construct with ``resume_step``)."""
        state = torch.load(path, weights_only=False)
        if self.resume_step is not None and int(state["step"]) != self.resume_step:
            raise invalid(
                "resume_step",
                self.resume_step,
                f"{state['step']}, the step of checkpoint {path}",
            )
        saved = state.get("config", {}).get("optimizer", "adamw")  # older checkpoints: AdamW
        if saved != self.config.optimizer:
            raise invalid(
                "optimizer",
                self.config.optimizer,
                f"{saved!r}, the optimizer of checkpoint {path} (its state cannot be resumed "
                "by another optimizer)",
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_index = int(state["step"])
        self._forget.skip(int(state["forget_position"]))
        if self._retain is not None:
            self._retain.skip(int(state["retain_position"]))
        torch.set_rng_state(state["torch_rng"])
