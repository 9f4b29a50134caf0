"""Two-task unlearning inside ``transformers.Trainer``.

A Trainer callback cannot see the two gradients, so :class:`TwoTaskTrainer` overrides
``training_step``: each micro-batch carries a ``"forget"`` and a ``"retain"`` sub-batch; the
forget and retain gradients are accumulated separately over the accumulation window, summed
over data-parallel processes, and at the window's last micro-batch combined by the strategy into
``.grad`` (and recorded); the Trainer then clips, steps and schedules as usual.

As in the engine, each task's gradient is that of its global loss over the optimizer step:
:meth:`TwoTaskTrainer.get_batch_samples` sums each task's count over the window's micro-batches
and the processes, and every micro-batch's total is divided by it (the two-task form of the
Trainer's ``num_items_in_batch`` with ``average_tokens_across_devices``;
docs/method.md#normalisation).

>>> import tempfile, torch, transformers
>>> from geomkit.objectives import build_objective
>>> config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
...                                   num_hidden_layers=1, num_attention_heads=2)
>>> model = transformers.LlamaForCausalLM(config)            # a tiny, untrained Llama
>>> ids = torch.arange(8)
>>> text = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
>>> pairs = [{"forget": text, "retain": text}] * 4           # (forget, retain) items
>>> out = tempfile.TemporaryDirectory()
>>> args = transformers.TrainingArguments(out.name, max_steps=2, per_device_train_batch_size=2,
...                                       remove_unused_columns=False, use_cpu=True,
...                                       report_to=[], disable_tqdm=True)
>>> trainer = TwoTaskTrainer(model=model, args=args, train_dataset=pairs,
...                          data_collator=pair_collator, objective=build_objective("graddiff"),
...                          strategy="sago", out=f"{out.name}/geometry.zarr")
>>> trainer.remove_callback(transformers.PrinterCallback)   # no log lines on stdout
>>> trainer.train().global_step
2
>>> out.cleanup()

Use ``TrainingArguments(remove_unused_columns=False)`` so that the nested sub-batches reach the
step; a collator such as :func:`pair_collator` stacks them.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import transformers
from torch import Tensor

from geomkit._deprecation import renamed
from geomkit._validation import invalid
from geomkit.distributed import rank_and_world
from geomkit.engine import _all_reduce_sum
from geomkit.objectives import Objective, check_count
from geomkit.recorder import Recorder
from geomkit.step import StepModel
from geomkit.strategies import Strategy, as_strategy

__all__ = ["TwoTaskTrainer", "pair_collator"]

_TASKS = ("forget", "retain")


def pair_collator(items: Sequence[Mapping[str, Mapping[str, Tensor]]]) -> dict[str, Any]:
    """Stack a list of ``{"forget": {...}, "retain": {...}}`` items into one such batch."""
    return {
        task: {key: torch.stack([item[task][key] for item in items]) for key in items[0][task]}
        for task in ("forget", "retain")
    }


class TwoTaskTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that unlearns with a two-task combination strategy.

    Parameters
    ----------
    objective : Objective
        Forget and retain losses (:func:`geomkit.objectives.build_objective`).
    strategy : Strategy or str
        The combination strategy (default ``"sago"``): a registered name, which ``alpha`` and
        ``gamma`` weigh, or a :class:`~geomkit.strategies.Strategy` (e.g.
        ``Strategy(BLUR(), PerTensor())``), which carries its own weights.
    shadows : sequence of Strategy or str, optional
        Strategies recorded on the same gradients without being applied (default all).
    out : str or PathLike, optional
        Zarr store for the geometry record (None: no recording; ``record_to`` is a deprecated
        spelling).
    record_every : int
        Record every this many optimizer steps.
    reference : torch.nn.Module, optional
        Frozen reference model for NPO / KL / RMU (a frozen copy is made when needed).
    **kwargs
        Passed to ``transformers.Trainer``.
    """

    @renamed(record_to="out")
    def __init__(
        self,
        *args: Any,
        objective: Objective,
        strategy: Strategy | str = "sago",
        alpha: float = 1.0,
        gamma: float = 1.0,
        shadows: Sequence[Strategy | str] | None = None,
        out: str | os.PathLike | None = None,
        record_every: int = 1,
        reference: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(objective, Objective):
            raise invalid(
                "objective",
                objective,
                f"a geomkit Objective, got {type(objective).__name__}",
                owner="TwoTaskTrainer",
                error=TypeError,
            )
        self.objective = objective
        self.strategy = as_strategy(strategy, alpha=alpha, gamma=gamma)
        if objective.needs_reference and reference is None:
            reference = copy.deepcopy(self.model)
        self.reference = reference
        if reference is not None:
            reference.eval().requires_grad_(False)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameter")
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._f = [torch.zeros_like(p) for p in self._params]
        self._r = [torch.zeros_like(p) for p in self._params]
        self._losses = torch.zeros(2, dtype=torch.float64)  # this process's share, per task
        self._counts: list[int] | None = None  # per task, over the window and the processes
        self._window = 0
        self._micro = 0
        self.rank, self.world = rank_and_world()
        self.recorder = (
            Recorder(
                out,
                self._names,
                [p.numel() for p in self._params],
                self.strategy,
                shadows,
                schedule=record_every,
                attrs={
                    "model": type(self.model).__name__,
                    "objective": objective.name,
                    "seed": self.args.seed,
                    "world_size": self.world,
                    "accumulation_steps": self.args.gradient_accumulation_steps,
                    "trainer": "transformers.Trainer",
                },
                write=self.rank == 0,
            )
            if out is not None
            else None
        )

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, Tensor | int | None]:
        """Draw the window's micro-batches (as ``transformers.Trainer`` does) and sum each
        task's count over them and over the processes (one small all-reduce)."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        counts = torch.zeros(2, dtype=torch.int64)
        tasks = (self.objective.forget, self.objective.retain)
        for batch in batch_samples:
            for i, loss in enumerate(tasks):
                if loss is not None and isinstance(batch, Mapping) and _TASKS[i] in batch:
                    counts[i] += loss.count(batch[_TASKS[i]]).cpu()
        if self.world > 1:
            counts = counts.to(device)
            dist.all_reduce(counts)
        self._counts = counts.tolist()
        self._window = len(batch_samples)
        return batch_samples, num_items

    def _normaliser(self, index: int, batch: Mapping[str, Tensor]) -> int:
        """Task ``index``'s count over the window and the processes (from
        :meth:`get_batch_samples`; outside the Trainer's loop, this micro-batch's count times
        the window and the processes, i.e. a mean of per-micro-batch means)."""
        loss_fn = (self.objective.forget, self.objective.retain)[index]
        if self._counts is not None:
            count = self._counts[index]
        else:
            count = int(loss_fn.count(batch)) * self._window * self.world
        data = (
            f"the {_TASKS[index]} micro-batches of step {self.state.global_step} on "
            f"{self.world} process(es)"
        )
        return check_count(count, loss_fn, data)

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Any = None,
    ) -> Tensor:
        """One micro-batch of both tasks; combine into ``.grad`` at the window's end.

        Returns this micro-batch's share of the step's losses (forget + retain) times the
        number of processes: the Trainer sums it over the window and logs its mean over the
        processes.
        """
        model.train()
        inputs = self._prepare_inputs(inputs)
        if "forget" not in inputs:
            raise ValueError(
                f"TwoTaskTrainer: invalid batch with keys {sorted(inputs)}: expected a 'forget' "
                "(and 'retain') sub-batch; use geomkit.hf.pair_collator and "
                "TrainingArguments(remove_unused_columns=False)"
            )
        if self._micro == 0:
            for buffer in (*self._f, *self._r):
                buffer.zero_()
            self._losses.zero_()
            if self._counts is None:  # the window was not drawn by get_batch_samples
                self._window = max(
                    1,
                    int(getattr(self, "current_gradient_accumulation_steps", 0) or 0)
                    or self.args.gradient_accumulation_steps,
                )
        unwrapped = self.accelerator.unwrap_model(model)  # our own all-reduce, not DDP hooks
        tasks = ((self.objective.forget, self._f), (self.objective.retain, self._r))
        share = torch.zeros((), dtype=torch.float64)
        for index, (loss_fn, into) in enumerate(tasks):
            if loss_fn is None:
                continue
            batch = inputs[_TASKS[index]]
            count = self._normaliser(index, batch)
            loss = loss_fn.total(unwrapped, batch, self.reference) / count
            grads = torch.autograd.grad(loss, self._params, allow_unused=True)
            for buffer, g in zip(into, grads, strict=True):
                if g is not None:
                    buffer.add_(g)
            value = loss.detach().double().cpu()
            self._losses[index] += value
            share += value
        self._micro += 1
        if self._micro >= self._window:
            self._micro = 0
            self._combine()
            self._counts = None
        return (share * self.world).to(device=self.args.device, dtype=torch.float32)

    def _combine(self) -> None:
        """Sum the window's gradients and losses over the processes; combine and record."""
        _all_reduce_sum(self._f, self.world)
        _all_reduce_sum(self._r, self.world)
        losses = self._losses.to(self.args.device)
        if self.world > 1:
            dist.all_reduce(losses)
        forget_loss, retain_loss = losses.tolist()
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self._params]
        self.strategy(self._f, self._r, out=grads)
        if self.recorder is not None:
            self.recorder.record(
                int(self.state.global_step),
                self._f,
                self._r,
                grads,
                step_model=self._step_model(),
                forget_loss=forget_loss,
                retain_loss=retain_loss if self.objective.retain is not None else math.nan,
                learning_rate=float(self._get_learning_rate()) if self.lr_scheduler else math.nan,
                grad_norm=float(torch.nn.utils.get_total_norm(grads)),
            )

    def _step_model(self) -> StepModel | None:
        """The Trainer's optimizer as a :class:`~geomkit.step.StepModel` (the step statistics of
        this record), or None, with one warning, for an optimizer geomkit does not model."""
        if getattr(self, "_step_model_failed", False) or self.optimizer is None:
            return None
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
        clip = self.args.max_grad_norm if self.args.max_grad_norm else None
        try:
            return StepModel(optimizer, self._params, clip)
        except ValueError as error:
            self._step_model_failed = True
            warnings.warn(
                f"the step statistics are not recorded: {error}", RuntimeWarning, stacklevel=2
            )
            return None

    def train(self, *args: Any, **kwargs: Any):
        """Train as ``transformers.Trainer.train`` does, then flush the geometry record."""
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.recorder is not None:
                self.recorder.close()
