"""One rank of a distributed test job, run as a script by torchrun or ``spawn_ranks``.

Usage: ``rank_worker.py JOB OUT_DIR --timeout-s SECONDS``. The rank comes from the
torchrun environment variables. Each scenario of the job saves a dict to
``OUT_DIR/<scenario>.rank<r>.pt``: its observations, or the error it raised.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_cases import (
    LEVEL_CASES,
    PCGRAD_EXAMPLE,
    ROLLBACK_CASES,
    SMALL_BUCKET_BYTES,
    ControlCommand,
    EmergencyLevel,
    mismatched_gradients,
    stacked_gradients,
    unstacked_gradients,
)

from tolaria.distributed import (
    DistributedContext,
    RankFailure,
    agree_any,
    agree_level,
    agree_max,
    agree_rollback_step,
    average_gradients,
    average_stacked_gradients,
    barrier,
    broadcast_command,
    rank_path,
    save_on_main,
)

Scenario = Callable[[DistributedContext, Path], dict[str, Any]]


def describe_error(error: BaseException, started: float) -> dict[str, Any]:
    """Return the fields of an error that the tests check."""
    return {
        "error_type": type(error).__name__,
        "message": str(error),
        "failed_ranks": list(getattr(error, "failed_ranks", ())),
        "elapsed_s": time.monotonic() - started,
        "traceback": traceback.format_exc(),
    }


def context_fields(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
    return {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "local_rank": ctx.local_rank,
        "backend": ctx.backend,
        "device": str(ctx.device),
        "is_initialized": ctx.is_initialized,
        "owns_group": ctx.owns_group,
        "telemetry_path": rank_path(out_dir, "telemetry.jsonl", ctx).name,
    }


def average(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
    tree = stacked_gradients(ctx.rank)
    before = optree.tree_map(torch.clone, tree)
    results = {
        "small_buckets": average_stacked_gradients(tree, ctx, bucket_bytes=SMALL_BUCKET_BYTES, step=1),
        "default_buckets": average_stacked_gradients(tree, ctx, step=2),
        "native_low_precision": average_stacked_gradients(tree, ctx, upcast_low_precision=False, step=3),
        "checked_layout": average_stacked_gradients(tree, ctx, check_layout=True, step=4),
    }
    mixed = {"shared": tree, "exclusive": unstacked_gradients(ctx.rank)}
    results["mixed"] = average_gradients(mixed, ctx, bucket_bytes=SMALL_BUCKET_BYTES, check_layout=True, step=6)
    unchanged = all(
        torch.equal(old, new) for old, new in zip(optree.tree_leaves(before), optree.tree_leaves(tree), strict=True)
    )
    return {"results": results, "input_unchanged": unchanged}


def pcgrad_example(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
    local = torch.tensor(PCGRAD_EXAMPLE[ctx.rank])
    return {"averaged": average_stacked_gradients(local, ctx, step=7)}


def anomaly(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
    loss = torch.tensor(float("nan") if ctx.rank == 1 else 0.5)
    gradient = torch.ones(4)
    return {
        "nan_on_rank1": agree_any(~torch.isfinite(loss), ctx, step=10),
        "all_finite": agree_any(~torch.isfinite(gradient), ctx, step=11),
        "vector_flag": agree_any(torch.tensor([False, ctx.rank == 0, False]), ctx, step=12),
        "python_false": agree_any(False, ctx, step=13),
        "python_true_on_rank0": agree_any(ctx.rank == 0, ctx, step=14),
    }


def levels(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
    agreed = {name: agree_level(case[ctx.rank], ctx) for name, case in LEVEL_CASES.items()}
    halt = EmergencyLevel(agree_level(EmergencyLevel.HALT if ctx.rank == 1 else EmergencyLevel.NORMAL, ctx))
    combined = agree_max([int(ctx.rank == 0), 5 if ctx.rank == 0 else 2], ctx)
    return {"agreed": agreed, "halt": halt.name, "combined": list(combined)}


def rollback(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
    return {name: agree_rollback_step(case[ctx.rank], ctx, step=50) for name, case in ROLLBACK_CASES.items()}


def commands(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
    sent = ControlCommand(action="rollback", step=12, lr_scale=0.5, targets=("encoder",))
    from_rank0 = broadcast_command(sent if ctx.rank == 0 else None, ctx, step=12)
    from_rank1 = broadcast_command(ControlCommand("halt", 13, 0.0) if ctx.rank == 1 else None, ctx, src=1)
    return {"from_rank0": repr(from_rank0), "from_rank1": repr(from_rank1), "sent": repr(sent)}


def checkpoint(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
    target = out_dir / "checkpoint.pt"

    def write() -> str:
        # The delay makes a rank that does not wait for the commit look before the file exists.
        time.sleep(1.0)
        partial = target.with_suffix(".tmp")
        torch.save({"step": 99, "weight": torch.arange(4.0)}, partial)
        os.replace(partial, target)
        return str(target)

    returned = save_on_main(write, ctx, step=99)
    exists_on_return = target.exists()
    loaded = torch.load(target, weights_only=True) if exists_on_return else None
    return {"returned": returned, "exists_on_return": exists_on_return, "loaded": loaded}


def failed_checkpoint(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
    def write() -> None:
        raise OSError("disk full while writing checkpoint.pt")

    started = time.monotonic()
    try:
        save_on_main(write, ctx, step=100)
    except (OSError, RankFailure) as error:
        outcome = describe_error(error, started)
    else:
        outcome = {"error_type": None}
    # The group must still work after the reported failure.
    barrier(ctx, timeout=datetime.timedelta(seconds=30), step=100)
    return outcome


def layout_mismatch(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
    started = time.monotonic()
    try:
        average_stacked_gradients(mismatched_gradients(ctx.rank), ctx, check_layout=True, step=5)
    except ValueError as error:
        return describe_error(error, started)
    return {"error_type": None}


def barrier_and_context(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
    barrier(ctx, timeout=datetime.timedelta(seconds=30), step=1)
    fields = context_fields(ctx, out_dir)
    ctx.close()
    fields["initialized_after_close"] = dist.is_initialized()
    return fields


COLLECTIVES: dict[str, Scenario] = {
    "average": average,
    "pcgrad_example": pcgrad_example,
    "anomaly": anomaly,
    "levels": levels,
    "rollback": rollback,
    "commands": commands,
    "checkpoint": checkpoint,
    "failed_checkpoint": failed_checkpoint,
    "layout_mismatch": layout_mismatch,
    "barrier_and_context": barrier_and_context,
}


def exit_now() -> None:
    """Leave without any cleanup, as a crashed rank does."""
    sys.stdout.flush()
    os._exit(0)


def fail_at(victim: int, action: Callable[[DistributedContext], object]) -> Scenario:
    """Build a scenario in which rank ``victim`` exits or hangs and the others call ``action``."""

    def scenario(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
        if ctx.rank == victim:
            if os.environ.get("FAILURE_MODE") == "hang":
                time.sleep(300)
            exit_now()
        started = time.monotonic()
        try:
            action(ctx)
        except RankFailure as error:
            return describe_error(error, started)
        return {"error_type": None, "elapsed_s": time.monotonic() - started}

    return scenario


FAILURES: dict[str, Scenario] = {
    "rank1_gone_at_barrier": fail_at(1, lambda ctx: barrier(ctx, step=3)),
    "rank0_gone_at_barrier": fail_at(0, lambda ctx: barrier(ctx, step=3)),
    "rank1_gone_at_average": fail_at(1, lambda ctx: average_stacked_gradients(stacked_gradients(0), ctx, step=4)),
}


def run_scenarios(scenarios: dict[str, Scenario], out_dir: Path, timeout_s: float) -> None:
    """Run each scenario on this rank and save what it returned, or the error it raised, to ``out_dir``."""
    ctx = DistributedContext.from_environment(timeout=datetime.timedelta(seconds=timeout_s))
    for name, scenario in scenarios.items():
        started = time.monotonic()
        try:
            outcome = scenario(ctx, out_dir)
        except Exception as error:
            outcome = {"unexpected": describe_error(error, started)}
        torch.save(outcome, out_dir / f"{name}.rank{ctx.rank}.pt")
    ctx.close()


def run_job(job: str, out_dir: Path, timeout_s: float) -> None:
    run_scenarios(COLLECTIVES if job == "collectives" else {job: FAILURES[job]}, out_dir, timeout_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("job", choices=["collectives", *FAILURES])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--timeout-s", type=float, required=True, help="collective timeout in seconds")
    args = parser.parse_args()
    run_job(args.job, args.out_dir, args.timeout_s)


if __name__ == "__main__":
    main()
