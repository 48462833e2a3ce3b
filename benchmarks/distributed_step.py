"""``Trainer`` step time on the digits demo model with one process and with two gloo processes on CPU.

Both runs train ``tolaria.demo.DigitsNet`` on the bundled digits with the same global
batch: one process takes the whole batch, two processes take half each
(``EpochBatches(rank=, world_size=)``) and average their per-objective gradients with
one all-reduce per step before aggregation, then agree on the step's flags with a
second one. Each process uses one torch thread, so the two-process run uses two
cores where the one-process run uses one.

A step's time is the wall time between two consecutive step callbacks within an
epoch: forward, per-objective backward, the collectives, aggregation, optimizer step
and the loop's own work. The first epoch is a warm-up and is not counted; validation
is off. For two processes the slower rank's median is reported. Columns:

- ``step 1p`` / ``step 2p``: median step time in milliseconds;
- ``p90 1p`` / ``p90 2p``: 90th percentile;
- ``2p/1p``: ratio of the medians (below 1 means two processes are faster);
- ``samples/s``: global batch divided by the median step time.

Usage (from the repository root; needs scikit-learn for the digits)::

    .venv/bin/python benchmarks/distributed_step.py [--batch-sizes 32,256] [--aggregators pcgrad,mean] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def step_times_ms(epochs: int, batch_size: int, aggregator: str) -> list[float]:
    """Train in this process's group and return the step times after the first epoch, in milliseconds."""
    from tolaria.config import TrainerConfig
    from tolaria.demo import DigitsNet, digits_batches, digits_objectives, load_digits
    from tolaria.distributed import DistributedContext
    from tolaria.loop import StepRecord
    from tolaria.trainer import Trainer

    torch.set_num_threads(1)
    context = DistributedContext.from_environment(device="cpu")
    data = load_digits(seed=0)
    torch.manual_seed(0)
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    train, _ = digits_batches(data, batch_size=batch_size, seed=0, rank=context.rank, world_size=context.world_size)
    config = TrainerConfig(epochs=epochs, aggregator=aggregator, seed=0, device="cpu")

    times: list[float] = []
    last: list[float] = []

    def record(step: StepRecord) -> None:
        now = time.perf_counter()
        # The interval since the previous batch of the same epoch is one step. Epoch 0 is the warm-up.
        if step.epoch > 0 and step.batch > 0 and last:
            times.append((now - last[0]) * 1000.0)
        last[:] = [now]

    trainer = Trainer(
        model, optimizer, digits_objectives, train, config=config, step_callbacks=[record], distributed=context
    )
    with trainer:
        trainer.fit()
    context.close()
    return times


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_world(world_size: int, batch_size: int, aggregator: str, epochs: int, out_dir: Path) -> list[list[float]]:
    """Run the worker in ``world_size`` processes and return each rank's step times."""
    environment = {name: value for name, value in os.environ.items() if name not in ("RANK", "WORLD_SIZE")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH", "")]))
    environment["OMP_NUM_THREADS"] = "1"
    if world_size > 1:
        environment.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo")

    command = [sys.executable, __file__, "--worker", str(out_dir), "--epochs", str(epochs)]
    command += ["--batch-sizes", str(batch_size), "--aggregators", aggregator]
    processes = []
    for rank in range(world_size):
        rank_environment = dict(environment)
        if world_size > 1:
            rank_environment.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        processes.append(subprocess.Popen(command, env=rank_environment))
    codes = [process.wait() for process in processes]
    if any(codes):
        raise RuntimeError(f"benchmark processes of world size {world_size} exited with codes {codes}")
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world_size)]


def summarize(per_rank: list[list[float]]) -> tuple[float, float]:
    """Return the median and 90th percentile step time of the slowest rank, in milliseconds."""
    medians = [statistics.median(times) for times in per_rank]
    slowest = per_rank[medians.index(max(medians))]
    p90 = statistics.quantiles(slowest, n=10)[-1] if len(slowest) > 1 else slowest[0]
    return max(medians), p90


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "| global batch | aggregator | step 1p ms | step 2p ms | p90 1p ms | p90 2p ms | 2p/1p "
        "| samples/s 1p | samples/s 2p |"
    )
    print("|---:|---|" + "---:|" * 7)
    for row in rows:
        cells = [
            str(row["batch_size"]),
            row["aggregator"],
            f"{row['one'][0]:.2f}",
            f"{row['two'][0]:.2f}",
            f"{row['one'][1]:.2f}",
            f"{row['two'][1]:.2f}",
            f"{row['two'][0] / row['one'][0]:.2f}",
            f"{row['batch_size'] / row['one'][0] * 1000.0:.0f}",
            f"{row['batch_size'] / row['two'][0] * 1000.0:.0f}",
        ]
        print("| " + " | ".join(cells) + " |")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="32,256", help="comma-separated global batch sizes (even numbers)")
    parser.add_argument("--aggregators", default="pcgrad,mean", help="comma-separated aggregators")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run, the first one a warm-up (default: 4)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    if args.epochs < 2:
        raise SystemExit(f"--epochs must be at least 2 (the first is a warm-up), got {args.epochs}")
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    aggregators = args.aggregators.split(",")
    if args.worker is not None:
        times = step_times_ms(args.epochs, batch_sizes[0], aggregators[0])
        (args.worker / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(times))
        return

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for batch_size in batch_sizes:
            for aggregator in aggregators:
                one = run_world(1, batch_size, aggregator, args.epochs, Path(scratch))
                two = run_world(2, batch_size, aggregator, args.epochs, Path(scratch))
                rows.append(
                    {"batch_size": batch_size, "aggregator": aggregator, "one": summarize(one), "two": summarize(two)}
                )
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, DigitsNet (hidden 128, 3 objectives), Adam, "
        f"{args.epochs - 1} timed epochs, 1 torch thread per process, gloo on loopback"
    )
    print_table(rows)


if __name__ == "__main__":
    main()
