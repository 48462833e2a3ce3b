"""Collectives the trainer runs at each step and epoch under ``torch.distributed``."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import torch

from tolaria.distributed.agreement import broadcast_command
from tolaria.distributed.context import DistributedContext
from tolaria.distributed.coordination import is_main_process
from tolaria.distributed.errors import collective_guard

__all__ = ["agreed_flags", "rank_sum", "shared_run_id"]


def rank_sum(context: DistributedContext) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return a function that sums a tensor over all ranks (for the epoch sums)."""

    def reduce_sum(values: torch.Tensor) -> torch.Tensor:
        reduced = values.to(context.device)
        with collective_guard("all_reduce(epoch sums)", context):
            torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
        return reduced

    return reduce_sum


def agreed_flags(context: DistributedContext) -> Callable[[torch.Tensor], list[float]]:
    """Return a reader of the step flags that takes each flag's maximum over all ranks.

    The flags are ``[skip, non-finite loss, spike, score]``, so one rank's non-finite
    value or spike makes every rank skip the step or react to the spike.
    """

    def agree(flags: torch.Tensor) -> list[float]:
        reduced = flags.to(context.device)
        with collective_guard("all_reduce(step flags)", context):
            torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
        values: list[float] = reduced.tolist()
        return values

    return agree


def shared_run_id(context: DistributedContext) -> str | None:
    """Return rank 0's new run id on every rank, so all ranks' telemetry files share it.

    Returns ``None`` outside distributed training, where the publisher draws its own.
    """
    if not context.is_distributed:
        return None
    run_id = uuid.uuid4().hex[:12] if is_main_process(context) else None
    shared: str = broadcast_command(run_id, context)
    return shared

