"""Record gradient geometry while unlearning runs: schedules, buffering and the per-step hook.

:class:`Recorder` is the public hook for any training loop, geomkit's own or yours. Call
:meth:`Recorder.record` once per optimizer step with the forget and retain gradients (and the
combined update, if you formed it): on scheduled steps it reduces them on the device to the
sufficient statistics of the applied strategy and of every shadow strategy, moves them to the
host in one transfer, buffers them, and appends them to the run's zarr store every
``flush_every`` steps. Without the combined update, every strategy's statistics are closed forms
from (f, r) (store attribute ``applied_statistics = "closed_form"``) and the updates are formed
and measured, one tensor at a time, at the verified records only; :meth:`Recorder.observe`
also writes the applied update where you ask (e.g. into the forget gradient: two gradient
buffers in all, as in :class:`geomkit.engine.Unlearner`). Per-step scalars (losses, learning
rate, gradient norm, wall time) are kept for every step.

Instrumenting a hand-written two-pass loop::

    rec = Recorder.for_model("run/geometry.zarr", model, strategy="sago")
    for step, (xf, xr) in enumerate(batches):
        f = torch.autograd.grad(forget_loss(model, xf), params)
        r = torch.autograd.grad(retain_loss(model, xr), params)
        d = sago(f, r, out=[p.grad for p in params])
        rec.record(step, f, r, d, forget_loss=..., retain_loss=...)
        optimizer.step()
    rec.close()
"""

from __future__ import annotations

import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from torch import Tensor

from geomkit import kernels
from geomkit import statistics as gstats
from geomkit import step as gstep
from geomkit import strategies as gstrategies
from geomkit._deprecation import renamed
from geomkit._validation import check_integer, check_out, invalid
from geomkit.fields import (
    FIELD_TABLE,
    FIELDS,
    INDEX,
    PAIR_FIELDS,
    SIZE_FIELDS,
    STEP_FIELDS,
    UPDATE_FIELDS,
)
from geomkit.kernels import DOT_FIELDS
from geomkit.layers import TensorLocation, locate_all
from geomkit.step import STEP_STATISTICS, StepModel
from geomkit.store import EVALUATION_VARIABLES, VERIFIED_FIELDS, RunWriter
from geomkit.strategies import Strategy, as_strategy, names

__all__ = [
    "APPLIED_STATISTICS",
    "VERIFY_EVERY",
    "Schedule",
    "Every",
    "Never",
    "LogSpaced",
    "Observation",
    "Recorder",
]

VERIFY_EVERY: int = 50
"""Default of ``verify_every``: the shadows are verified at the first geometry record and at
every 50th after it (docs/theory.md#v1). A verified record forms and measures every strategy's
update (about as long as one training step on a small model), so a denser schedule costs
``1 / verify_every`` of that per record (README, engine benchmark (e))."""

# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------


class Schedule(ABC):
    """Decides at which optimizer steps geometry is recorded."""

    @abstractmethod
    def __call__(self, step: int) -> bool: ...


@dataclass(frozen=True)
class Every(Schedule):
    """Record every ``k``-th step (steps 0, k, 2k, ...)."""

    k: int = 1

    def __post_init__(self) -> None:
        check_integer("k", self.k, 1, owner="Every", error=ValueError)

    def __call__(self, step: int) -> bool:
        return step % self.k == 0


@dataclass(frozen=True)
class Never(Schedule):
    """Record no geometry (per-step scalars are still kept)."""

    def __call__(self, step: int) -> bool:
        return False


@dataclass(frozen=True)
class LogSpaced(Schedule):
    """Record about ``per_decade`` steps per decade: dense early, sparse late (0, 1, 2, ...)."""

    per_decade: int = 10

    def __post_init__(self) -> None:
        check_integer("per_decade", self.per_decade, 1, owner="LogSpaced", error=ValueError)

    def __call__(self, step: int) -> bool:
        if step < self.per_decade:
            return True
        position = self.per_decade * math.log10(step + 1)
        previous = self.per_decade * math.log10(step)
        return math.floor(position) > math.floor(previous)


# ----------------------------------------------------------------------------------------------
# Recorder
# ----------------------------------------------------------------------------------------------


def _label(strategy: Strategy, applied: Strategy) -> str:
    """``str(strategy)``; a shadow whose weights differ from the applied strategy's (the run's
    ``alpha`` and ``gamma`` attributes) gets them appended, e.g. ``"sago[alpha=0.5]"``."""
    weights = [
        f"{name}={value!r}"
        for name, value, run in (
            ("alpha", strategy.alpha, applied.alpha),
            ("gamma", strategy.gamma, applied.gamma),
        )
        if value != run
    ]
    return f"{strategy}[{','.join(weights)}]" if weights else str(strategy)


class Recorder:
    """Record per-step geometry of a two-task update into a zarr store.

    Parameters
    ----------
    out : str or PathLike
        The zarr store to write (``path`` is a deprecated spelling).
    tensors : sequence of str or TensorLocation
        The recorded parameter tensors, in the order the gradients will be passed.
    numel : sequence of int
        Element counts of those tensors.
    strategy : Strategy or str
        The applied strategy (its statistics are measured on the update passed to
        :meth:`record`, else closed forms, see :meth:`observe`): a
        :class:`~geomkit.strategies.Strategy` (e.g. ``Strategy(BLUR(), PerTensor())``) or a
        registered name. ``str(strategy)`` is its ``strategy`` coordinate in the store.
    shadows : sequence of Strategy or str, optional
        Strategies evaluated on the same (f, r) without being applied; default all registered
        strategies. The applied one is never duplicated. Names take the applied strategy's
        weights; a shadow object with other weights is labelled with them
        (``"sago[alpha=0.5]"``).
    alpha, gamma : float
        Task weights of an applied strategy given by name (a Strategy carries its own).
    schedule : Schedule or int
        When to record geometry; an int ``k`` means :class:`Every` ``(k)``.
    flush_every : int
        Append buffered steps to the store every this many optimizer steps (a crash loses at
        most the unflushed steps).
    attrs : mapping, optional
        Run attributes stored in the Dataset (model, objective, seed, ...).
    shard_sum : callable, optional
        For sharded gradients (each process passes its shard of every tensor): sums a stack of
        statistics over processes (see :func:`geomkit.distributed.shard_sum`), so that the
        recorded values are the whole-tensor ones.
    write : bool
        Whether this process writes the store (rank 0 in data-parallel runs); other ranks still
        compute and reduce statistics.
    mode, resume_step
        As for :class:`geomkit.store.RunWriter` (``mode="a"`` with ``resume_step`` continues a
        run from a checkpoint without duplicating steps).
    verify_every : int
        Verify the closed forms at the first recorded step and every ``verify_every``-th
        recorded step after it (0: never): each strategy's update (the applied one's too when
        its statistics are closed forms) is then materialised once with the strategy's own code,
        one tensor at a time, measured, and stored beside the closed forms (:meth:`verify`;
        audited by claims V1 and R0, docs/theory.md#v1).
    """

    @renamed(path="out")
    def __init__(
        self,
        out: str | os.PathLike,
        tensors: Sequence[str | TensorLocation],
        numel: Sequence[int],
        strategy: Strategy | str,
        shadows: Sequence[Strategy | str] | None = None,
        *,
        alpha: float = 1.0,
        gamma: float = 1.0,
        schedule: Schedule | int = 1,
        flush_every: int = 10,
        attrs: Mapping[str, Any] | None = None,
        shard_sum: Callable[[Tensor], Tensor] | None = None,
        write: bool = True,
        mode: str = "w",
        resume_step: int | None = None,
        verify_every: int = VERIFY_EVERY,
    ) -> None:
        check_integer("verify_every", verify_every, 0, error=ValueError)
        self.verify_every = verify_every
        self.applied = as_strategy(strategy, alpha, gamma)
        shadows = names() if shadows is None else shadows
        weights = (self.applied.alpha, self.applied.gamma)
        # a name takes the applied weights; a shadow object keeps its own; anything else: TypeError
        shadow_list = [
            as_strategy(s, *weights) if isinstance(s, str) else as_strategy(s) for s in shadows
        ]
        # equal strategies give equal statistics: each is recorded once, the applied one first
        self.shadows = [s for s in dict.fromkeys(shadow_list) if s != self.applied]
        self.schedule = Every(schedule) if isinstance(schedule, int) else schedule
        if not isinstance(self.schedule, Schedule):
            raise invalid("schedule", schedule, "a Schedule or an int", error=TypeError)
        check_integer("flush_every", flush_every, 1, error=ValueError)
        locations = [t if isinstance(t, TensorLocation) else None for t in tensors]
        if any(loc is None for loc in locations):
            locations = locate_all(
                [t.name if isinstance(t, TensorLocation) else t for t in tensors]
            )
        if len(locations) != len(numel):
            raise ValueError(
                f"invalid numel of {len(numel)} values: expected {len(locations)}, one per tensor"
            )
        if not locations:
            raise invalid("tensors", list(tensors), "at least one parameter tensor to record")
        self.tensors = locations
        self.numel = [int(n) for n in numel]
        self.flush_every = flush_every
        self.shard_sum = shard_sum
        self.strategy_labels = [_label(s, self.applied) for s in (self.applied, *self.shadows)]
        if len(set(self.strategy_labels)) < len(self.strategy_labels):
            raise ValueError(
                f"invalid shadows: the strategy labels {self.strategy_labels} repeat; give "
                "different strategies different names, e.g. dataclasses.replace(s, name='mine')"
            )
        self.writer = (
            RunWriter(
                out,
                locations,
                self.numel,
                self.strategy_labels,
                {
                    **(attrs or {}),
                    "alpha": self.applied.alpha,
                    "gamma": self.applied.gamma,
                    "schedule": repr(self.schedule),
                },
                mode=mode,
                resume_step=resume_step,
            )
            if write
            else None
        )
        self._start = time.perf_counter()
        self._last_step: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geomkit")
        self._pending: Future | None = None
        self._steps: list[dict[str, Any]] = []
        self._records: list[tuple[int, np.ndarray, np.ndarray | None]] = []
        self._n_records = 0  # geometry records taken by this recorder (verification schedule)
        self._evaluations: list[dict[str, float]] = []
        self.applied_statistics: str | None = None
        """How the applied strategy's statistics are recorded (:data:`APPLIED_STATISTICS`),
        fixed by the first geometry record (or by the store continued); None before."""
        self._mode_stored = False
        if self.writer is not None and mode == "a":
            stored = zarr.open_group(self.writer.path, mode="r").attrs.get("applied_statistics")
            if stored is not None:
                self.applied_statistics, self._mode_stored = str(stored), True
            elif self.writer.committed[1]:  # records of a geomkit that measured them always
                self.applied_statistics = "measured"

    @classmethod
    @renamed(path="out")
    def for_model(
        cls,
        out: str | os.PathLike,
        model: torch.nn.Module,
        strategy: Strategy | str,
        shadows: Sequence[Strategy | str] | None = None,
        *,
        trainable_only: bool = True,
        **kwargs: Any,
    ) -> Recorder:
        """A recorder for ``model``'s (trainable) parameters, in ``named_parameters`` order."""
        params = [
            (n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only
        ]
        return cls(
            out,
            [n for n, _ in params],
            [p.numel() for _, p in params],
            strategy,
            shadows,
            **kwargs,
        )

    # -- the hook ----------------------------------------------------------------------------

    def wants(self, step: int) -> bool:
        """Whether geometry will be recorded at ``step`` (lets a loop skip extra work)."""
        return self.schedule(step)

    @torch.no_grad()
    def record(
        self,
        step: int,
        forget: Sequence[Tensor] | None = None,
        retain: Sequence[Tensor] | None = None,
        combined: Sequence[Tensor] | None = None,
        *,
        observation: Observation | None = None,
        forget_loss: float = math.nan,
        retain_loss: float = math.nan,
        learning_rate: float = math.nan,
        grad_norm: float = math.nan,
        skipped: bool = False,
        forget_loss_after: float = math.nan,
        retain_loss_after: float = math.nan,
        step_model: StepModel | None = None,
    ) -> None:
        """Record one optimizer step.

        Parameters
        ----------
        step : int
            The optimizer step (0-based, increasing).
        forget, retain : sequence of Tensor, optional
            The forget and retain gradients as the strategy sees them (after accumulation and
            data-parallel averaging), one tensor per recorded parameter. Needed on scheduled
            steps unless ``skipped``.
        combined : sequence of Tensor, optional
            The update actually applied: the applied strategy's statistics are then measured
            on it at every record (store attribute ``applied_statistics = "measured"``).
            Omitted, they are the closed forms of :func:`geomkit.statistics.shadow`, like the
            shadows' (``"closed_form"``), and the applied update is materialised and measured
            at the verified records (:meth:`observe`).
        observation : Observation, optional
            This step's geometry, taken by :meth:`observe` before the update was formed (then
            pass no gradients); how the engine records without a third gradient buffer.
        forget_loss, retain_loss, learning_rate, grad_norm : float
            Step scalars (Python floats; pass ``tensor.item()`` values you already have).
        skipped : bool
            The step was skipped (e.g. a non-finite gradient); no geometry is recorded.
        forget_loss_after, retain_loss_after : float
            Both objectives on this step's own batches evaluated after the step (the realised
            changes beside the predicted ``pred_forget_change``, ``pred_retain_change``); NaN
            when not evaluated.
        step_model : StepModel, optional
            The optimizer about to step (:class:`geomkit.step.StepModel`): the statistics of
            the step it will take are recorded too (:meth:`observe`). Call :meth:`record`
            before ``optimizer.step()``.
        """
        if self._last_step is not None and step <= self._last_step:
            raise invalid(
                "step", step, f"a step after step {self._last_step} (steps must increase)"
            )
        if observation is not None and (forget is not None or combined is not None):
            raise ValueError(
                "record() takes either an observation or the gradients of the step, not both"
            )
        if not skipped and self.schedule(step) and observation is None:
            if forget is None or retain is None:
                raise ValueError(
                    f"step {step} is scheduled for recording; pass the forget and retain gradients"
                )
            observation = self.observe(  # may raise: nothing kept yet
                forget, retain, combined, step_model=step_model
            )
        if observation is not None:
            if skipped or not self.schedule(step):
                raise invalid(
                    "observation",
                    "given",
                    f"None at step {step} (skipped or not scheduled for recording)",
                )
            self._check_mode(observation.applied_statistics)
        self._steps.append(
            {
                "step": step,
                "forget_loss": float(forget_loss),
                "retain_loss": float(retain_loss),
                "learning_rate": float(learning_rate),
                "grad_norm": float(grad_norm),
                "wall_time": time.perf_counter() - self._start,
                "skipped": bool(skipped),
                "forget_loss_after": float(forget_loss_after),
                "retain_loss_after": float(retain_loss_after),
            }
        )
        if observation is not None:
            self._records.append((step, observation.statistics, observation.verified))
            self._n_records += 1
        self._last_step = step
        if len(self._steps) >= self.flush_every:
            self.flush()

    def log_evaluation(self, steps_done: int, metrics: Mapping[str, float]) -> None:
        """Buffer one evaluation of the model; written with the next flush.

        Parameters
        ----------
        steps_done : int
            Optimizer steps completed when the model was evaluated (0: before unlearning).
        metrics : mapping
            Some of ``forget_acc``, ``retain_acc``, ``general_acc``; the others are stored as
            NaN.
        """
        check_integer("steps_done", steps_done, 0, error=ValueError)
        unknown = sorted(set(metrics) - set(EVALUATION_VARIABLES))
        if unknown:
            raise invalid("metrics", unknown, f"some of {', '.join(EVALUATION_VARIABLES)}")
        row = {"evaluation": steps_done}
        row.update({k: float(metrics.get(k, math.nan)) for k in EVALUATION_VARIABLES})
        self._evaluations.append(row)

    def observe(
        self,
        forget: Sequence[Tensor],
        retain: Sequence[Tensor],
        combined: Sequence[Tensor] | None = None,
        *,
        into: Sequence[Tensor] | None = None,
        step_model: StepModel | None = None,
    ) -> Observation:
        """Take the geometry of the next geometry record; optionally form the applied update.

        Without ``combined``, every strategy's statistics, the applied one's included, are the
        closed forms of :func:`geomkit.statistics.shadow` (``applied_statistics =
        "closed_form"``). If this record is verified (:meth:`verifies`), each strategy's update
        is then materialised with its own code one tensor at a time into one reused temporary
        and measured (:meth:`verify`), the applied strategy's last. With ``combined`` (the
        update you formed), the applied strategy's row is measured on it (``"measured"``) and
        only the shadows are verified.

        Parameters
        ----------
        forget, retain : sequence of Tensor
            The gradients, one tensor per recorded parameter; not modified unless passed as
            ``into``.
        combined : sequence of Tensor, optional
            The update you formed and apply.
        into : sequence of Tensor, optional
            Receives the applied strategy's update, bit-identical to ``strategy(forget,
            retain, out=into)``; may be ``forget`` itself (the engine's forget buffer, which
            the optimizer reads): it is written after everything else was measured. Not with
            ``combined``.
        step_model : StepModel, optional
            The optimizer about to take this step (:class:`geomkit.step.StepModel`): the step
            statistics (the ``"step"`` fields: u against f, r and the applied d) are taken from
            each tensor's f, r and applied update while that update is formed (into ``into``,
            else into one reused temporary), before it can overwrite f; else they are NaN.

        Returns
        -------
        Observation
            What :meth:`record` buffers (pass it as ``observation=``).
        """
        forget, retain = list(forget), list(retain)
        if len(forget) != len(self.tensors):
            raise ValueError(
                f"invalid forget of {len(forget)} gradient tensors: expected "
                f"{len(self.tensors)}, one per tracked parameter"
            )
        if combined is not None and into is not None:
            raise ValueError(
                "observe() takes combined (an update you formed) or into (where to form it), "
                "not both"
            )
        if into is not None:
            into = check_out(into, forget)
        closed = combined is None and self.closed_form
        statistics = self.measure(forget, retain, combined)
        mode = "closed_form" if closed else "measured"
        verified = None
        probe = None
        if step_model is not None:
            step_model.begin(float(statistics[0, :, INDEX["dd"]].sum()))
            probe = _StepProbe(step_model, len(forget))
            if combined is not None:  # the update is formed: measure the step on it
                probe(range(len(forget)), forget, retain, list(combined))
        formed = False  # whether the applied update was formed (into ``into``) by verify
        if self.verifies(self._n_records) and (closed or self.shadows):
            verified = self.verify(
                forget,
                retain,
                statistics,
                applied=closed,
                into=into if closed else None,
                on_formed=probe if closed else None,
            )
            formed = closed
        if not formed and combined is None:
            if probe is not None:  # formed piece by piece, the step measured on each piece
                self._form_stepwise(forget, retain, into, probe)
            elif into is not None:  # the strategy forms the update directly
                self.applied(forget, retain, out=into, shard_sum=self.shard_sum)
        if probe is not None:
            step = probe.result(self.shard_sum)
            for name in STEP_FIELDS:
                statistics[:, :, INDEX[name]] = step[name]
        return Observation(statistics, verified, mode)

    @property
    def closed_form(self) -> bool:
        """Whether the applied strategy's statistics have closed forms (every registered rule
        has: uniform, or never opposing r), so that it is recorded without forming its update
        unless the update is passed to :meth:`record`."""
        rule = self.applied.rule
        return rule.uniform or rule.never_opposes

    def measure(
        self,
        forget: Sequence[Tensor],
        retain: Sequence[Tensor],
        combined: Sequence[Tensor] | None = None,
    ) -> np.ndarray:
        """Statistics of the applied and shadow strategies, ``[n_strategies, n_tensors, F]``.

        The applied strategy's row is measured on ``combined`` when given, else it is the
        closed form (a rule without closed forms is formed one tensor at a time and measured).
        Computed on the device; one host transfer.
        """
        forget, retain = list(forget), list(retain)
        if len(forget) != len(self.tensors):
            raise ValueError(
                f"invalid forget of {len(forget)} gradient tensors: expected "
                f"{len(self.tensors)}, one per tracked parameter"
            )
        if combined is None and self.closed_form:
            return gstats.to_numpy(
                gstats.shadow(forget, retain, self.strategies, shard_sum=self.shard_sum)
            )
        if combined is None:
            applied = self._materialise(self.applied, forget, retain)
        else:
            applied = gstats.sufficient(
                forget, retain, combined, strategy=self.applied, shard_sum=self.shard_sum
            )
        parts = [applied[None]]
        if self.shadows:
            parts.append(gstats.shadow(forget, retain, self.shadows, shard_sum=self.shard_sum))
        return gstats.to_numpy(torch.cat(parts))

    def verifies(self, index: int) -> bool:
        """Whether the ``index``-th geometry record (0-based) is verified: the first, then
        every ``verify_every``-th (never with ``verify_every=0``)."""
        return self.verify_every > 0 and index % self.verify_every == 0

    @torch.no_grad()
    def verify(
        self,
        forget: Sequence[Tensor],
        retain: Sequence[Tensor],
        measured: np.ndarray,
        *,
        applied: bool = False,
        into: Sequence[Tensor] | None = None,
        on_formed: Callable[[Sequence[int], list[Tensor], list[Tensor], list[Tensor]], None]
        | None = None,
    ) -> np.ndarray:
        """Materialise each strategy's update with its own code and measure it.

        The closed forms of :func:`geomkit.statistics.shadow` (in ``measured``, the output
        of :meth:`measure`) are what the audit compares these measurements with (claim V1,
        docs/theory.md#v1). Each update is formed as the engine would apply it (the strategy's
        pooled dot products over all tensors first, then
        :meth:`~geomkit.strategies.Strategy.combine_tensor` one tensor at a time, in the
        gradient dtype) into one reused tensor-sized temporary, and reduced with
        :func:`geomkit.statistics.sufficient` before the next tensor.

        Parameters
        ----------
        forget, retain : sequence of Tensor
            The gradients.
        measured : ndarray
            The output of :meth:`measure` for them.
        applied : bool
            Also materialise the applied strategy (row 0; else NaN there), after the shadows.
        into : sequence of Tensor, optional
            With ``applied``: each tensor of the applied update is copied there once measured
            (``into`` may be ``forget``: every other measurement is taken before).
        on_formed : callable, optional
            With ``applied``: called as ``on_formed(indices, forget, retain, updates)`` on each
            group of tensors of the applied update once formed, before it is copied into
            ``into`` (how the step statistics see f, r and d together).

        Returns
        -------
        ndarray
            ``[n_strategies, n_tensors, len(VERIFIED_FIELDS) + 1]`` float64: per strategy and
            tensor the fields :data:`~geomkit.store.VERIFIED_FIELDS` of the materialised
            update, then ``n_ambiguous`` (coordinates whose sign test rounding can flip, see
            :func:`_ambiguous`); NaN for rows not materialised.
        """
        forget, retain = list(forget), list(retain)
        if into is not None and not applied:
            raise ValueError("verify(into=...) writes the applied update: pass applied=True")
        out = np.full((len(self.strategies), len(self.tensors), len(VERIFIED_FIELDS) + 1), np.nan)
        home = forget[0].device
        closed_dots = torch.as_tensor(
            measured[0][:, [INDEX[n] for n in DOT_FIELDS]], dtype=torch.float64, device=home
        )  # [T, 3]: the dot products the closed forms were formed from
        rows = [k for k in range(1, len(self.strategies))] + ([0] if applied else [])
        columns = [INDEX[n] for n in VERIFIED_FIELDS]
        reduce = any(self.strategies[k].rule.reduces for k in rows)
        raw = gstrategies.tensor_dots(forget, retain, self.shard_sum) if reduce else None
        chosen = [self.strategies[k] for k in rows]
        ambiguous = _ambiguous(chosen, forget, retain, closed_dots, raw, self.shard_sum)
        for i, k in enumerate(rows):  # the applied strategy last: it may write into forget
            s = self.strategies[k]
            dots = s.pooled_dots(forget, retain, dots=raw) if s.rule.reduces else None
            stats = self._materialise(
                s,
                forget,
                retain,
                into=into if k == 0 else None,
                dots=dots,
                on_formed=on_formed if k == 0 else None,
            )
            out[k, :, : len(VERIFIED_FIELDS)] = gstats.to_numpy(stats)[:, columns]
            out[k, :, -1] = ambiguous[i]
        return out

    def _materialise(
        self,
        strategy: Strategy,
        forget: list[Tensor],
        retain: list[Tensor],
        into: Sequence[Tensor] | None = None,
        dots: Sequence[Tensor] | None = None,
        on_formed: Callable[[Sequence[int], list[Tensor], list[Tensor], list[Tensor]], None]
        | None = None,
        measure: bool = True,
    ) -> Tensor | None:
        """:func:`geomkit.statistics.sufficient` of ``strategy``'s update, formed into one
        reused temporary (per dtype and device) as large as the largest tensor, and copied into
        ``into`` when given; ``[n_tensors, F]`` on the first tensor's device, summed over shards.

        Consecutive tensors that fit in the temporary together are formed side by side and
        measured in one call; ``dots`` are the strategy's pooled dot products (default:
        computed here, over every tensor, before anything is written). ``on_formed(indices,
        forget, retain, updates)`` sees each group once formed, before it is copied into
        ``into``; with ``measure=False`` nothing else is measured (returns None).
        """
        if dots is None:
            dots = (
                strategy.pooled_dots(forget, retain, self.shard_sum)
                if strategy.rule.reduces
                else [None] * len(forget)
            )
        largest: dict[tuple[torch.dtype, torch.device], int] = {}
        for f in forget:
            key = (f.dtype, f.device)
            largest[key] = max(largest.get(key, 0), f.numel())
        temporary = {k: torch.empty(n, dtype=k[0], device=k[1]) for k, n in largest.items()}
        home = forget[0].device
        rows: list[Tensor] = []
        group: list[int] = []
        used = 0

        def form_group() -> None:
            key = (forget[group[0]].dtype, forget[group[0]].device)
            start, updates = 0, []
            for j in group:
                f = forget[j]
                d = temporary[key][start : start + f.numel()].view(f.shape)
                strategy.combine_tensor(f, retain[j], d, dots[j])
                updates.append(d)
                start += f.numel()
            pooled = None if dots[group[0]] is None else [dots[j] for j in group]
            fs, rs = [forget[j] for j in group], [retain[j] for j in group]
            if measure:
                rows.append(gstats.sufficient(fs, rs, updates, strategy=strategy, pooled=pooled))
            if on_formed is not None:
                on_formed(group, fs, rs, updates)
            if into is not None:
                for j, d in zip(group, updates, strict=True):
                    into[j].copy_(d)

        for j, f in enumerate(forget):
            key = (f.dtype, f.device)
            same = bool(group) and (forget[group[0]].dtype, forget[group[0]].device) == key
            if group and (not same or used + f.numel() > largest[key]):
                form_group()
                group, used = [], 0
            group.append(j)
            used += f.numel()
        form_group()
        if not rows:
            return None
        stats = torch.cat([row.to(home) for row in rows])
        if self.shard_sum is not None:  # the shard-additive fields (n_projected is pooled)
            additive = [i for i, n in enumerate(FIELDS) if n not in _NOT_SHARD_ADDITIVE]
            stats[:, additive] = self.shard_sum(stats[:, additive])
        return stats

    def _form_stepwise(
        self,
        forget: list[Tensor],
        retain: list[Tensor],
        into: Sequence[Tensor] | None,
        probe: _StepProbe,
    ) -> None:
        """Form the applied update one piece of :data:`geomkit.step.STEP_CHUNK` elements at a
        time into a piece-sized temporary, take the step statistics of each piece, and copy it
        into ``into`` (bit-identical to ``strategy(forget, retain, out=into)``: every rule is
        coordinate-wise given its pooled dot products). ``into`` may be ``forget``: a piece is
        written only once its own f was read. No tensor-sized temporary."""
        strategy = self.applied
        dots = (
            strategy.pooled_dots(forget, retain, self.shard_sum)
            if strategy.rule.reduces
            else [None] * len(forget)
        )
        chunk = gstep.STEP_CHUNK
        scratch: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        for j, (f, r) in enumerate(zip(forget, retain, strict=True)):
            flat_f, flat_r, n = f.reshape(-1), r.reshape(-1), f.numel()
            target = None
            if into is not None:
                if not into[j].is_contiguous():  # a view could not write it back
                    raise ValueError(
                        f"invalid into[{j}]: expected a contiguous tensor (the update is "
                        "written into it piece by piece)"
                    )
                target = into[j].view(-1)
            key = (f.dtype, f.device)
            if key not in scratch or scratch[key].numel() < min(n, chunk):
                scratch[key] = torch.empty(min(n, chunk), dtype=f.dtype, device=f.device)
            rows = []
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                d = scratch[key][: stop - start]
                strategy.combine_tensor(flat_f[start:stop], flat_r[start:stop], d, dots[j])
                rows.append(
                    probe.model.statistics(
                        j, flat_f[start:stop], flat_r[start:stop], d, offset=start
                    )
                )
                if target is not None:
                    target[start:stop].copy_(d)
            probe.rows[j] = rows[0] if len(rows) == 1 else torch.stack(rows).sum(0)

    def _check_mode(self, mode: str) -> None:
        """Fix the run's ``applied_statistics`` at its first record; a record of the other
        kind raises (one store holds one kind)."""
        if self.applied_statistics is None:
            self.applied_statistics = mode
        elif mode != self.applied_statistics:
            how = {"measured": "with combined", "closed_form": "without combined"}
            raise ValueError(
                f"invalid record: this run's applied statistics are {self.applied_statistics!r} "
                f"(recorded {how[self.applied_statistics]}); pass combined to record() at every "
                "recorded step or at none, or start a new store"
            )

    # -- buffering ---------------------------------------------------------------------------

    def flush(self, wait: bool = False) -> None:
        """Hand every buffered step to the store writer.

        Appends run on one background thread, in order, so that training does not wait for
        disk; ``wait=True`` (and :meth:`close`) returns only once everything is committed. An
        error of a background append is raised by the next ``flush`` or ``close``.
        """
        if self.writer is not None and (self._steps or self._records or self._evaluations):
            steps = (
                {key: np.array([s[key] for s in self._steps]) for key in self._steps[0]}
                if self._steps
                else None
            )
            records = None
            if self._records:
                stats = np.stack([r for _, r, _ in self._records])  # [n, S, T, F]
                records = {"record": np.array([s for s, _, _ in self._records])}
                for name in PAIR_FIELDS:
                    records[name] = stats[:, 0, :, INDEX[name]]
                for name in UPDATE_FIELDS:
                    records[name] = stats[:, :, :, INDEX[name]]
                for name in STEP_FIELDS:
                    records[name] = stats[:, 0, :, INDEX[name]]
                records.update(_verification_block(self._records, stats.shape[1:3]))
            evaluations = (
                {k: np.array([e[k] for e in self._evaluations]) for k in self._evaluations[0]}
                if self._evaluations
                else None
            )
            attribute = None
            if records is not None and not self._mode_stored:
                attribute, self._mode_stored = self.applied_statistics, True
            self.wait()  # one append in flight at most: bounded memory, ordered commits
            self._pending = self._executor.submit(
                _append, self.writer, attribute, steps, records, evaluations
            )
        self._steps.clear()
        self._records.clear()
        self._evaluations.clear()
        if wait:
            self.wait()

    def wait(self) -> None:
        """Block until the background append in flight (if any) is committed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Flush what is buffered and wait until it is committed to the store."""
        try:
            self.flush(wait=True)
        finally:
            self._executor.shutdown(wait=True)
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geomkit")

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def strategies(self) -> list[Strategy]:
        """The applied strategy followed by the shadows, in store order."""
        return [self.applied, *self.shadows]

    def __repr__(self) -> str:
        shadows = ", ".join(self.strategy_labels[1:])
        return (
            f"Recorder({self.strategy_labels[0]!r}, shadows=[{shadows}], "
            f"schedule={self.schedule!r}, flush_every={self.flush_every}, "
            f"verify_every={self.verify_every})"
        )


@dataclass(frozen=True)
class Observation:
    """The geometry of one recorded step (:meth:`Recorder.observe`), buffered by
    :meth:`Recorder.record`.

    Attributes
    ----------
    statistics : ndarray
        ``[n_strategies, n_tensors, len(FIELDS)]``: the applied strategy first, then the shadows.
    verified : ndarray or None
        The output of :meth:`Recorder.verify` at a verified record, else None.
    applied_statistics : {"closed_form", "measured"}
        Whether the applied strategy's row is a closed form or measured on a formed update.
    """

    statistics: np.ndarray
    verified: np.ndarray | None
    applied_statistics: str


class _StepProbe:
    """Collects :meth:`StepModel.statistics` of each tensor as the applied update is formed."""

    def __init__(self, model: StepModel, n_tensors: int) -> None:
        self.model = model
        self.rows: list[Tensor | None] = [None] * n_tensors

    def __call__(
        self,
        indices: Sequence[int],
        forget: Sequence[Tensor],
        retain: Sequence[Tensor],
        updates: Sequence[Tensor],
    ) -> None:
        for j, f, r, d in zip(indices, forget, retain, updates, strict=True):
            self.rows[j] = self.model.statistics(j, f, r, d)

    def result(self, shard_sum: Callable[[Tensor], Tensor] | None) -> dict[str, np.ndarray]:
        """Each step field, ``[n_tensors]``, summed over shards; one host transfer."""
        missing = [j for j, row in enumerate(self.rows) if row is None]
        if missing:
            raise RuntimeError(f"the step statistics of tensors {missing} were not taken")
        home = self.rows[0].device
        table = torch.stack([row.to(home) for row in self.rows])  # [T, 7]
        if shard_sum is not None:
            table = shard_sum(table)
        values = gstats.to_numpy(table)
        return {name: values[:, i] for i, name in enumerate(STEP_STATISTICS)}


APPLIED_STATISTICS: tuple[str, ...] = ("measured", "closed_form")
"""Values of the store attribute ``applied_statistics`` (docs/schema.md#attributes): the
applied strategy's record statistics measured on the update formed at every record, or closed
forms like the shadows' (the update measured at verified records only)."""

_NOT_SHARD_ADDITIVE = frozenset(
    ["n_projected", *(n for n in SIZE_FIELDS if FIELD_TABLE[n].constant is not None)]
)
"""Statistics every shard holds whole (from pooled dot products, or constants per tensor)."""

# ----------------------------------------------------------------------------------------------
# Shadow verification
# ----------------------------------------------------------------------------------------------

_U64 = 2.0**-53
"""Unit roundoff of float64."""


def _ambiguous(
    strategies: Sequence[Strategy],
    forget: Sequence[Tensor],
    retain: Sequence[Tensor],
    closed_dots: Tensor,
    raw: Sequence[Tensor] | None,
    shard_sum: Callable[[Tensor], Tensor] | None,
) -> np.ndarray:
    """Per strategy and tensor (``[len(strategies), n_tensors]``): coordinates where rounding
    can make the closed form's and the materialised update's test ``d_i r_i < 0`` disagree
    (docs/theory.md#v1).

    A sign rule forms ``d_i`` = ``alpha r_i`` or ``gamma f_i (+ alpha r_i)`` with
    ``f_i r_i >= 0``; rounding preserves signs (or gives 0), so ``d_i r_i < 0`` never holds
    and nothing is ambiguous. A uniform rule ``d = a f + b r`` (closed-form coefficients from
    ``closed_dots``; the strategy's own ``(a', b')`` from its own dot products ``raw``, see
    :func:`geomkit.strategies.tensor_dots`) is computed in float64 and rounded once to the
    gradient dtype: a coordinate is ambiguous where ``r_i != 0`` and ``|a f_i + b r_i| <=
    |a'-a||f_i| + |b'-b||r_i| + 8 u64 ((gamma + |a|)|f_i| + (alpha + |b|)|r_i|) + s``, the
    coefficient difference (summation order of the dot products), the float64 arithmetic of
    both sides, and ``s`` the dtype's smallest subnormal (a value below it may round to 0).
    All uniform strategies are counted in one packed pass
    (:func:`geomkit.kernels.near_zero_batch`).
    """
    n = len(forget)
    out = np.zeros((len(strategies), n))
    uniform = [i for i, s in enumerate(strategies) if s.rule.uniform]
    if not uniform:
        return out
    home = forget[0].device
    subnormal = torch.tensor(
        [torch.finfo(f.dtype).tiny * torch.finfo(f.dtype).eps for f in forget],
        dtype=torch.float64,
        device=home,
    )
    own_dots = None if raw is None else torch.stack([d.to(home) for d in raw])
    params = []
    for i in uniform:
        s = strategies[i]
        if s.rule.reduces:
            closed = s.linear_form(torch.stack(s.scope.pool(list(closed_dots))))
            own = s.linear_form(torch.stack(s.scope.pool(list(own_dots))))
        else:
            closed = own = s.linear_form(closed_dots)
        a, b = closed[:, 0], closed[:, 1]
        da, db = (own[:, 0] - a).abs(), (own[:, 1] - b).abs()
        c_f = da + 8 * _U64 * (s.gamma + a.abs())
        c_r = db + 8 * _U64 * (s.alpha + b.abs())
        params.append(torch.stack([a, b, c_f, c_r, subnormal], dim=1))  # [T, 5]
    counts = kernels.near_zero_batch(forget, retain, torch.stack(params, dim=1))  # [T, U]
    if shard_sum is not None:
        counts = shard_sum(counts)
    out[uniform] = gstats.to_numpy(counts).T
    return out


def _append(
    writer: RunWriter,
    applied_statistics: str | None,
    steps: Mapping[str, np.ndarray] | None,
    records: Mapping[str, np.ndarray] | None,
    evaluations: Mapping[str, np.ndarray] | None,
) -> None:
    """One background append; the ``applied_statistics`` attribute is set before the first
    records it describes are committed."""
    if applied_statistics is not None:
        group = zarr.open_group(writer.path, mode="r+")
        group.attrs["applied_statistics"] = applied_statistics
    writer.append(steps, records, evaluations)


def _verification_block(
    records: Sequence[tuple[int, np.ndarray, np.ndarray | None]], shape: tuple[int, int]
) -> dict[str, np.ndarray]:
    """The store's verification variables of buffered records (NaN where not verified)."""
    n_fields = len(VERIFIED_FIELDS) + 1
    values = np.stack(
        [v if v is not None else np.full((*shape, n_fields), np.nan) for _, _, v in records]
    )  # [n, S, T, n_fields]
    block = {}
    for i, name in enumerate((*VERIFIED_FIELDS, "n_ambiguous")):
        block[f"verified_{name}"] = values[..., i]
    return block
