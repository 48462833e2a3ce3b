"""Decisions every rank must take identically: skip, emergency level, rollback step, commands.

Each helper makes all ranks return the same value, with one collective (two for
``agree_rollback_step``). With one rank they return the local value without a
collective. Every rank must call the same helpers in the same order, or the
collectives pair up wrongly and fail or time out.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import TypeVar, cast

import torch
import torch.distributed as dist

from tolaria.distributed.context import DistributedContext
from tolaria.distributed.errors import collective_guard, require_live_group

__all__ = ["agree_any", "agree_level", "agree_max", "agree_rollback_step", "barrier", "broadcast_command"]

CommandT = TypeVar("CommandT")


def agree_max(values: Sequence[int], ctx: DistributedContext, *, step: int | None = None) -> tuple[int, ...]:
    """Return the element-wise maximum of ``values`` over all ranks, in one all-reduce.

    Lets a step agree on several verdicts at once, for example
    ``skip, level = agree_max([int(nonfinite), level], ctx)``.

    Args:
        values: integers that fit in int64; every rank passes the same number of them.
        ctx: the distributed context.
        step: training step, quoted in errors.

    Raises:
        TypeError: a value is not an ``int`` (``bool`` and ``IntEnum`` values are ints).
        RankFailure: another rank died or failed during the all-reduce.
        DistributedTimeout: the all-reduce did not complete within the timeout.
    """
    for index, value in enumerate(values):
        if not isinstance(value, int):
            raise TypeError(f"values[{index}] must be an int, got {type(value).__name__} {value!r}")
    if not ctx.is_distributed:
        return tuple(int(value) for value in values)

    require_live_group(ctx, "agree_max")
    tensor = torch.tensor([int(value) for value in values], dtype=torch.int64, device=ctx.device)
    with collective_guard("all_reduce(MAX) of agreed values", ctx, step=step):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tuple(int(value) for value in tensor.tolist())


def agree_level(level: int, ctx: DistributedContext, *, step: int | None = None) -> int:
    """Return the highest emergency ``level`` of all ranks (all-reduce MAX).

    Levels are ordered so that higher is more severe; a HALT on one rank halts all.
    Pass an ``IntEnum`` member and convert the result back with the enum.

    Raises:
        TypeError: ``level`` is not an ``int``.
        RankFailure, DistributedTimeout: as for ``agree_max``.
    """
    if not isinstance(level, int):
        raise TypeError(f"level must be an int, got {type(level).__name__} {level!r}")
    (agreed,) = agree_max([level], ctx, step=step)
    return agreed


def agree_any(flag: bool | torch.Tensor, ctx: DistributedContext, *, step: int | None = None) -> bool:
    """Return whether ``flag`` is true on any rank, in one all-reduce.

    Use it for the anomaly verdict: a non-finite loss or gradient on one rank makes
    every rank skip the step. A tensor flag may live on any device and have any
    shape (``flag.any()`` is taken). The reduction stays on the device, and the
    result is read to the host once, after the collective.

    Raises:
        TypeError: ``flag`` is neither a ``bool`` nor a ``torch.bool`` tensor.
        RankFailure, DistributedTimeout: as for ``agree_max``.
    """
    if isinstance(flag, torch.Tensor):
        if flag.dtype != torch.bool:
            raise TypeError(f"flag must be a bool or a torch.bool tensor, got a tensor of dtype {flag.dtype}")
        local = flag.any().to(device=ctx.device, dtype=torch.int64).reshape(1)
    elif isinstance(flag, bool):
        local = torch.tensor([int(flag)], dtype=torch.int64, device=ctx.device)
    else:
        raise TypeError(f"flag must be a bool or a torch.bool tensor, got {type(flag).__name__} {flag!r}")

    if ctx.is_distributed:
        require_live_group(ctx, "agree_any")
        with collective_guard("all_reduce(MAX) of the anomaly flag", ctx, step=step):
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return bool(local.item())


def agree_rollback_step(
    available_steps: Sequence[int], ctx: DistributedContext, *, step: int | None = None
) -> int | None:
    """Return the newest step that every rank has a snapshot for, or ``None`` if there is none.

    Two collectives: an all-reduce MAX of the number of snapshots, then an all-gather
    of each rank's steps padded with -1 to that number. Every rank computes the same
    intersection from the gathered steps.

    Args:
        available_steps: steps this rank can restore; non-negative ints, any order, may repeat.
        ctx: the distributed context.
        step: current training step, quoted in errors.

    Raises:
        TypeError: a step is not an ``int``.
        ValueError: a step is negative.
        RankFailure, DistributedTimeout: as for ``agree_max``.
    """
    steps = _validate_steps(available_steps)
    if not ctx.is_distributed:
        return max(steps) if steps else None

    (longest,) = agree_max([len(steps)], ctx, step=step)
    if longest == 0:
        return None
    padded = torch.full((longest,), -1, dtype=torch.int64, device=ctx.device)
    if steps:
        padded[: len(steps)] = torch.tensor(steps, dtype=torch.int64)
    gathered = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    with collective_guard("all_gather of rollback snapshot steps", ctx, step=step):
        dist.all_gather(gathered, padded)

    per_rank = [set(tensor.tolist()) - {-1} for tensor in gathered]
    common = set.intersection(*per_rank)
    return max(common) if common else None


def _validate_steps(available_steps: Sequence[int]) -> list[int]:
    for index, value in enumerate(available_steps):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"available_steps[{index}] must be an int, got {type(value).__name__} {value!r}")
        if value < 0:
            raise ValueError(f"available_steps[{index}] must be non-negative, got {value}")
    return sorted(set(available_steps))


def broadcast_command(
    command: CommandT | None, ctx: DistributedContext, *, src: int = 0, step: int | None = None
) -> CommandT:
    """Send ``command`` from rank ``src`` to every rank and return it on all of them.

    The controller decides on ``src`` (rank 0) and the other ranks pass ``None``;
    their argument is ignored. The command is pickled (``broadcast_object_list``),
    so it must be a small picklable object such as a dataclass, and the peers
    must be trusted, because unpickling runs code.

    Raises:
        ValueError: ``src`` is not a rank of the group.
        ValueError: ``command`` is ``None`` on rank ``src``.
        RankFailure, DistributedTimeout: rank ``src`` or another rank died, failed or hung.
    """
    if not 0 <= src < ctx.world_size:
        raise ValueError(f"src must be a rank in [0, {ctx.world_size}), got {src}")
    if ctx.rank == src and command is None:
        raise ValueError(f"command must not be None on the sending rank {src}")
    if not ctx.is_distributed:
        # The checks above make command non-None here, because the only rank is src.
        return cast(CommandT, command)

    require_live_group(ctx, "broadcast_command")
    holder: list[object] = [command if ctx.rank == src else None]
    device = ctx.device if ctx.backend == "nccl" else None
    with collective_guard(f"broadcast_object_list from rank {src}", ctx, step=step):
        dist.broadcast_object_list(holder, src=src, device=device)
    received: CommandT = holder[0]  # type: ignore[assignment]
    return received


def barrier(ctx: DistributedContext, *, timeout: datetime.timedelta | None = None, step: int | None = None) -> None:
    """Wait until every rank reaches this barrier, or fail naming the missing ranks.

    On gloo this is ``monitored_barrier(wait_all_ranks=True)``. Rank 0 waits at most
    ``timeout`` (default ``ctx.timeout``) for the other ranks, and its error lists every
    rank that died or did not arrive. The other ranks name rank 0 if it fails. Other
    backends use ``dist.barrier``, bounded by the group's own timeout.

    Raises:
        ValueError: ``timeout`` is not positive.
        RankFailure: a rank died before reaching the barrier.
        DistributedTimeout: a rank did not reach the barrier within the timeout.
    """
    if timeout is not None and timeout <= datetime.timedelta(0):
        raise ValueError(f"timeout must be positive, got {timeout}")
    if not ctx.is_distributed:
        return

    require_live_group(ctx, "barrier")
    limit = timeout or ctx.timeout
    if ctx.backend == "gloo":
        with collective_guard("monitored_barrier", ctx, step=step, timeout=limit):
            dist.monitored_barrier(timeout=limit, wait_all_ranks=True)
        return
    # NOTE: NCCL cannot name a missing rank; its watchdog aborts the process after the group timeout.
    device_ids = [ctx.local_rank] if ctx.backend == "nccl" else None
    with collective_guard("barrier", ctx, step=step, timeout=limit):
        dist.barrier(device_ids=device_ids)
