"""One rank of a distributed ``Trainer`` test job, started with torchrun's environment variables.

Usage: ``trainer_rank_worker.py JOB OUT_DIR --timeout-s SECONDS``. Each scenario of the
job trains with ``tolaria.Trainer`` on this rank's shards and saves a dict to
``OUT_DIR/<scenario>.rank<r>.pt``: what ``distributed_trainer_cases.train`` returned, or the error
it raised. Jobs:

* ``agreement``: the one-process comparison runs, NaN, spike and HALT on rank 1, a
  controller timeout on rank 0, and the first half of a run to resume plus its
  uninterrupted reference;
* ``resume``: the second half, resumed from the first half's checkpoints (run after
  ``agreement`` with the same ``OUT_DIR``);
* ``rank1_exits`` and ``rank1_hangs``: rank 1 exits or hangs at a training step, and
  rank 0 records the error its trainer raised.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import distributed_trainer_cases as cases
from rank_worker import describe_error, exit_now, run_scenarios

from tolaria.demo import digits_objectives
from tolaria.distributed import DistributedContext, RankFailure

Scenario = Callable[[DistributedContext, Path], dict[str, Any]]


def match_run(aggregator: str) -> Scenario:
    def scenario(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
        return cases.train(ctx, cases.match_config(aggregator))

    return scenario


def nan_on_rank1(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
    objectives = cases.RankFaults(digits_objectives, rank=ctx.rank, faulty_rank=1, nan_call=cases.NAN_CALL)
    return cases.train(ctx, cases.spike_config(), objectives=objectives)


def spike_on_rank1(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
    objectives = cases.RankFaults(digits_objectives, rank=ctx.rank, faulty_rank=1, spike_call=cases.SPIKE_CALL)
    return cases.train(ctx, cases.spike_config(), objectives=objectives)


def halt_on_rank1(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
    objectives = cases.RankFaults(digits_objectives, rank=ctx.rank, faulty_rank=1, nan_call=cases.NAN_CALL)
    return cases.train(ctx, cases.halt_config(out_dir / "halted_run"), objectives=objectives)


def tamiyo_hangs_on_rank0(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
    # Every rank passes a controller, but only rank 0 calls it.
    return cases.train(ctx, cases.control_config(), tamiyo=cases.hanging_tamiyo())


def resume_first_half(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
    return cases.train(ctx, cases.resume_config(out_dir / "resumed", cases.RESUME_FIRST_EPOCHS))


def resume_reference(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
    return cases.train(ctx, cases.resume_config(out_dir / "uninterrupted", cases.RESUME_TOTAL_EPOCHS))


def resume_second_half(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
    run_dir = out_dir / "resumed"
    return cases.train(ctx, cases.resume_config(run_dir, cases.RESUME_TOTAL_EPOCHS), resume_from=run_dir)


def lose_rank1(mode: str) -> Scenario:
    """Build a scenario in which rank 1 exits or hangs at training call ``LOST_RANK_CALL``."""

    calls = itertools.count()

    def objectives(model: torch.nn.Module, batch: Any) -> Mapping[str, torch.Tensor]:
        if next(calls) == cases.LOST_RANK_CALL:
            if mode == "hang":
                time.sleep(300)
            exit_now()
        return digits_objectives(model, batch)

    def scenario(ctx: DistributedContext, out_dir: Path) -> dict[str, Any]:
        rank_objectives = objectives if ctx.rank == 1 else digits_objectives
        started = time.monotonic()
        try:
            cases.train(ctx, cases.match_config("pcgrad"), objectives=rank_objectives)
        except RankFailure as error:
            return {**describe_error(error, started), "collective_elapsed_s": error.elapsed_s}
        return {"error_type": None, "elapsed_s": time.monotonic() - started}

    return scenario


JOBS: dict[str, dict[str, Scenario]] = {
    "agreement": {
        "match_pcgrad": match_run("pcgrad"),
        "match_mean": match_run("mean"),
        "nan_on_rank1": nan_on_rank1,
        "spike_on_rank1": spike_on_rank1,
        "halt_on_rank1": halt_on_rank1,
        "tamiyo_hangs_on_rank0": tamiyo_hangs_on_rank0,
        "resume_first_half": resume_first_half,
        "resume_reference": resume_reference,
    },
    "resume": {"resume_second_half": resume_second_half},
    "rank1_exits": {"rank1_exits": lose_rank1("exit")},
    "rank1_hangs": {"rank1_hangs": lose_rank1("hang")},
}


def run_job(job: str, out_dir: Path, timeout_s: float) -> None:
    run_scenarios(JOBS[job], out_dir, timeout_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--timeout-s", type=float, required=True, help="collective timeout in seconds")
    args = parser.parse_args()
    run_job(args.job, args.out_dir, args.timeout_s)


if __name__ == "__main__":
    main()
