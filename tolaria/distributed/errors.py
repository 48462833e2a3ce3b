"""Errors of failed collectives, and the guard that turns torch's errors into them.

torch reports a peer that died or hung as a plain ``RuntimeError`` (or a
``torch.distributed.DistError``) whose text depends on the backend. The guard
re-raises it as ``RankFailure`` or ``DistributedTimeout`` with the collective, the
step, the elapsed time and, where it can be known, the rank at fault.

NOTE: only gloo failures are tested. torchrun (torch 2.13) starts its workers with
``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``. NCCL's watchdog then aborts a process whose
collective outlives the group timeout. So under NCCL a hung rank usually ends the
process instead of raising these errors, and no rank is named.
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

from tolaria.distributed.context import DistributedContext

__all__ = ["DistributedTimeout", "RankFailure", "collective_guard", "require_live_group"]

# gloo's monitored_barrier on rank 0: "Ranks 1, 3 failed to pass monitoredBarrier in 5000 ms".
_BARRIER_FAILED_RANKS = re.compile(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier")
# gloo's monitored_barrier on other ranks: "... waiting for send/recv from rank 0".
_BARRIER_PEER_RANK = re.compile(r"waiting for send/recv from rank (\d+)")


class RankFailure(RuntimeError):
    """A collective failed because another rank died, hung, or failed first.

    Attributes:
        collective: name of the operation that failed, for example ``"all_reduce"``.
        rank: rank that raised this error.
        failed_ranks: ranks at fault, empty when they cannot be determined.
        step: training step the caller passed, or ``None``.
        elapsed_s: seconds between the start of the collective and the failure.
    """

    def __init__(
        self,
        message: str,
        *,
        collective: str,
        rank: int,
        failed_ranks: tuple[int, ...] = (),
        step: int | None = None,
        elapsed_s: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.collective = collective
        self.rank = rank
        self.failed_ranks = failed_ranks
        self.step = step
        self.elapsed_s = elapsed_s


class DistributedTimeout(RankFailure):
    """A collective did not complete within the timeout: a rank hung or is too slow."""


def require_live_group(ctx: DistributedContext, collective: str) -> None:
    """Raise ``RuntimeError`` when ``ctx`` needs a process group that no longer exists."""
    if not dist.is_initialized():
        raise RuntimeError(
            f"{collective} on rank {ctx.rank} of {ctx.world_size}: the process group of this context was "
            "destroyed (close() or destroy_process_group()); build a new one with "
            "DistributedContext.from_environment()"
        )


def find_failed_ranks(message: str, ctx: DistributedContext) -> tuple[int, ...]:
    """Return the ranks torch names in ``message``; in a 2-rank group, the only peer.

    With two ranks every collective involves exactly one peer, so a failure this
    rank did not cause is the peer's. With more ranks and no rank in the message,
    the result is empty: ``barrier`` (``monitored_barrier`` on gloo) can then find them.
    """
    match = _BARRIER_FAILED_RANKS.search(message)
    if match is not None:
        return tuple(int(part) for part in match.group(1).replace(" ", "").split(",") if part)
    match = _BARRIER_PEER_RANK.search(message)
    if match is not None:
        return (int(match.group(1)),)
    if ctx.world_size == 2:
        return (1 - ctx.rank,)
    return ()


@contextmanager
def collective_guard(
    collective: str,
    ctx: DistributedContext,
    *,
    step: int | None = None,
    timeout: datetime.timedelta | None = None,
) -> Iterator[None]:
    """Re-raise a ``RuntimeError`` from the enclosed torch collective as ``RankFailure``.

    The error is a ``DistributedTimeout`` when torch's message reports a timeout or
    the collective ran for at least ``timeout`` (default ``ctx.timeout``). Torch's
    error is kept as ``__cause__`` and its text is part of the message. Keep the
    block to the torch call only, so unrelated errors are not relabelled.

    Raises:
        RankFailure: the enclosed call raised ``RuntimeError``.
        DistributedTimeout: the same, when it timed out.
    """
    started = time.monotonic()
    try:
        yield
    except RankFailure:
        raise
    except RuntimeError as error:
        elapsed = time.monotonic() - started
        limit = (timeout or ctx.timeout).total_seconds()
        raise _translate(error, collective, ctx, step=step, elapsed=elapsed, limit=limit) from error


def _translate(
    error: RuntimeError, collective: str, ctx: DistributedContext, *, step: int | None, elapsed: float, limit: float
) -> RankFailure:
    text = str(error)
    failed_ranks = find_failed_ranks(text, ctx)
    timed_out = "timed out" in text.lower() or elapsed >= limit
    error_type = DistributedTimeout if timed_out else RankFailure

    at_step = "" if step is None else f" at step {step}"
    what = "timed out" if timed_out else "failed"
    if failed_ranks:
        culprit = f"rank {', '.join(map(str, failed_ranks))} failed or stopped responding"
    else:
        culprit = "another rank failed or stopped responding, and torch did not say which"
    message = (
        f"{collective} {what} on rank {ctx.rank} of {ctx.world_size}{at_step} after {elapsed:.1f} s "
        f"(timeout {limit:.1f} s): {culprit}. Check that rank's log for its own error, then stop this "
        f"process: the process group cannot be used after a failed collective. torch reported: {text}"
    )
    return error_type(
        message, collective=collective, rank=ctx.rank, failed_ranks=failed_ranks, step=step, elapsed_s=elapsed
    )
