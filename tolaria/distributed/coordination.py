"""Work done by rank 0 only, and file names that do not collide between ranks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

import torch.distributed as dist

from tolaria.distributed.context import DistributedContext
from tolaria.distributed.errors import RankFailure, collective_guard, require_live_group

__all__ = ["is_main_process", "rank_path", "save_on_main"]

ResultT = TypeVar("ResultT")


def is_main_process(ctx: DistributedContext) -> bool:
    """Return whether this is rank 0, the rank that writes summaries and checkpoints."""
    return ctx.rank == 0


def rank_path(run_dir: str | Path, filename: str, ctx: DistributedContext) -> Path:
    """Return this rank's path for ``filename`` in ``run_dir``, unique among ranks.

    Rank 0 keeps the plain name in every run, so a reader of a run directory finds
    the main stream at the same path whatever the world size. Rank ``r > 0`` gets
    ``.rank<r>`` before the last suffix: ``telemetry.jsonl`` becomes
    ``telemetry.rank1.jsonl``, ``summary`` becomes ``summary.rank1``.

    Raises:
        ValueError: ``filename`` is empty, ``"."``/``".."``, or contains a path separator.
    """
    name = Path(filename)
    if filename in ("", ".", "..") or name.name != filename or "/" in filename or "\\" in filename:
        raise ValueError(f"filename must be a bare file name without directories, got {filename!r}")
    if ctx.rank == 0:
        return Path(run_dir) / filename
    return Path(run_dir) / f"{name.stem}.rank{ctx.rank}{name.suffix}"


def save_on_main(fn: Callable[[], ResultT], ctx: DistributedContext, *, step: int | None = None) -> ResultT:
    """Run ``fn`` on rank 0 only, and return its result on every rank once it has returned.

    Use it for checkpoint writes: ``fn`` writes and commits the file atomically on rank 0,
    then rank 0 broadcasts the outcome, and the other ranks wait for that broadcast.
    No rank returns, and so none can read the checkpoint, before the commit. The result
    of ``fn`` is pickled to the other ranks, so keep it small (a path, a step).

    If ``fn`` raises on rank 0, rank 0 re-raises that exception after telling the others,
    which raise ``RankFailure`` quoting it. The other ranks wait for rank 0 up to the
    collective timeout, which must therefore exceed the time a save takes.

    Raises:
        Exception: whatever ``fn`` raised, on rank 0.
        RankFailure: on other ranks, when ``fn`` raised on rank 0 or rank 0 died.
        DistributedTimeout: on other ranks, when rank 0 took longer than the timeout.
    """
    if not ctx.is_distributed:
        return fn()

    require_live_group(ctx, "save_on_main")
    failure: Exception | None = None
    outcome: tuple[bool, object, str] | None = None
    if is_main_process(ctx):
        try:
            outcome = (True, fn(), "")
        except Exception as error:  # noqa: BLE001 - re-raised after the broadcast below
            # Raise only after the broadcast, so the other ranks learn of the failure instead of waiting.
            failure = error
            outcome = (False, None, f"{type(error).__name__}: {error}")

    holder: list[object] = [outcome]
    with collective_guard("broadcast of the rank-0 save outcome", ctx, step=step):
        dist.broadcast_object_list(holder, src=0, device=ctx.device if ctx.backend == "nccl" else None)
    if failure is not None:
        raise failure

    ok, result, error_text = cast(tuple[bool, object, str], holder[0])
    if not ok:
        at_step = "" if step is None else f" at step {step}"
        raise RankFailure(
            f"save_on_main failed on rank 0{at_step}, so rank {ctx.rank} stops too: {error_text}",
            collective="save_on_main",
            rank=ctx.rank,
            failed_ranks=(0,),
            step=step,
        )
    return cast(ResultT, result)
