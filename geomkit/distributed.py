"""Helpers for data-parallel and sharded runs over ``torch.distributed``.

Data parallel (every process holds whole gradients of its own micro-batches): the engine sums
each task's gradient over processes once per accumulation window (each micro-batch's total
divided by the count over all micro-batches and processes, docs/method.md#normalisation), then
every process combines the same (f, r) and takes the same step; process 0 writes the store.

Sharded gradients (FSDP2 ``fully_shard``, ZeRO-3: every process holds a shard of every tensor):
pass :func:`shard_sum` as ``shard_sum=`` to a strategy, to :mod:`geomkit.statistics` or to the
:class:`~geomkit.recorder.Recorder`. Each process reduces the statistics of its shard and one
all-reduce of the stacked statistics gives the whole-tensor values, so per-tensor PCGrad uses the
whole tensor's dot product (the released SAGO code uses the shard's under ZeRO-3).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist
from torch import Tensor

__all__ = ["init_from_environment", "rank_and_world", "shard_sum"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment() -> bool:
    """Join the process group that ``torchrun`` / accelerate describe in the environment.

    Does nothing (and returns False) when a group already exists or when ``WORLD_SIZE`` is unset
    or 1; otherwise initialises the default group (NCCL with CUDA, else gloo) and returns True.
    """
    import os

    import torch

    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def shard_sum(group: dist.ProcessGroup | None = None) -> Callable[[Tensor], Tensor]:
    """A function summing a stack of shard-local statistics over the processes of ``group``.

    The returned function makes one ``all_reduce`` (sum) of its argument's copy and returns it;
    its input is left unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_sum needs an initialised torch.distributed process group")

    def reduce(stack: Tensor) -> Tensor:
        total = stack.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    return reduce
