"""Scaling of the stacked-gradient all-reduce and one aggregation from 1 to 2 processes on CPU.

Runs the same measurement in one process (no process group: averaging returns its
input) and in two gloo processes on loopback started with torchrun's environment
variables, then prints both side by side. Each process uses one torch thread, so
two processes on a two-core machine do not compete for threads.

Per size ``d`` (parameters) with ``n`` objectives, float32, the columns are medians over
``--repeats`` runs, in milliseconds:

- ``average``: ``average_stacked_gradients`` of one ``[n, d]`` leaf (buckets of ``--bucket-mib``).
- ``pcgrad``: ``tolaria.functional.aggregation.pcgrad(stacked=True)`` on the averaged gradients.
- ``step``: both, the per-step cost of agreeing on an update.

The ranks meet at a barrier before every repetition, so one rank's lag is not timed
as the other's all-reduce.

Usage:
    python benchmarks/distributed.py [--sizes 10000,100000,1000000,4000000] [--objectives 4]
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[1]


def median_ms(run: Callable[[], object], repeats: int, synchronize: Callable[[], None]) -> float:
    """Return the median wall time of ``run`` in milliseconds, after two warm-up calls."""
    for _ in range(2):
        run()
    times = []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


def measure(sizes: list[int], objectives: int, repeats: int, bucket_bytes: int) -> list[dict[str, Any]]:
    """Time averaging, aggregation and both for each size in this process's group."""
    from tolaria.distributed import DistributedContext, average_stacked_gradients
    from tolaria.functional.aggregation import pcgrad

    torch.set_num_threads(1)
    ctx = DistributedContext.from_environment()

    def synchronize() -> None:
        if ctx.is_distributed:
            dist.barrier()

    rows = []
    for size in sizes:
        generator = torch.Generator().manual_seed(ctx.rank)
        stacked = torch.randn(objectives, size, generator=generator)
        averaged = average_stacked_gradients(stacked, ctx, bucket_bytes=bucket_bytes)

        def average(stacked: torch.Tensor = stacked) -> object:
            return average_stacked_gradients(stacked, ctx, bucket_bytes=bucket_bytes)

        def aggregate(averaged: torch.Tensor = averaged) -> object:
            return pcgrad(averaged, stacked=True, seed=0)

        def step(stacked: torch.Tensor = stacked) -> object:
            return pcgrad(average_stacked_gradients(stacked, ctx, bucket_bytes=bucket_bytes), stacked=True, seed=0)

        rows.append(
            {
                "size": size,
                "average": median_ms(average, repeats, synchronize),
                "pcgrad": median_ms(aggregate, repeats, synchronize),
                "step": median_ms(step, repeats, synchronize),
            }
        )
    ctx.close()
    return rows


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_world(world_size: int, args: argparse.Namespace, out_dir: Path) -> list[dict[str, Any]]:
    """Run the worker in ``world_size`` processes and return rank 0's rows."""
    environment = {name: value for name, value in os.environ.items() if name not in ("RANK", "WORLD_SIZE")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH", "")]))
    environment["OMP_NUM_THREADS"] = "1"
    if world_size > 1:
        environment.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo")

    output = out_dir / f"world{world_size}.json"
    command = [sys.executable, __file__, "--worker", str(output), "--sizes", args.sizes]
    command += [
        "--objectives",
        str(args.objectives),
        "--repeats",
        str(args.repeats),
        "--bucket-mib",
        str(args.bucket_mib),
    ]
    processes = []
    for rank in range(world_size):
        rank_environment = dict(environment)
        if world_size > 1:
            rank_environment.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        processes.append(subprocess.Popen(command, env=rank_environment))
    codes = [process.wait() for process in processes]
    if any(codes):
        raise RuntimeError(f"benchmark worker processes of world size {world_size} exited with codes {codes}")
    rows: list[dict[str, Any]] = json.loads(output.read_text())
    return rows


def print_table(one: list[dict[str, Any]], two: list[dict[str, Any]], objectives: int) -> None:
    header = (
        "| d | n | MiB | average 1p | average 2p | pcgrad 1p | pcgrad 2p | step 1p | step 2p | step 2p/1p "
        "| all-reduce GB/s |"
    )
    print(header)
    print("|" + "---:|" * 11)
    for row_1, row_2 in zip(one, two, strict=True):
        size = row_1["size"]
        mebibytes = objectives * size * 4 / 2**20
        bandwidth = objectives * size * 4 / (row_2["average"] / 1000.0) / 1e9
        cells = [
            f"{size:.0e}",
            str(objectives),
            f"{mebibytes:.2f}",
            f"{row_1['average']:.3f}",
            f"{row_2['average']:.3f}",
            f"{row_1['pcgrad']:.3f}",
            f"{row_2['pcgrad']:.3f}",
            f"{row_1['step']:.3f}",
            f"{row_2['step']:.3f}",
            f"{row_2['step'] / row_1['step']:.2f}",
            f"{bandwidth:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000,4000000", help="comma-separated parameter counts d")
    parser.add_argument("--objectives", type=int, default=4, help="number of objectives n")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per measurement")
    parser.add_argument("--bucket-mib", type=float, default=25.0, help="all-reduce bucket size in MiB")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    sizes = [int(float(size)) for size in args.sizes.split(",")]
    if args.worker is not None:
        rows = measure(sizes, args.objectives, args.repeats, int(args.bucket_mib * 2**20))
        if int(os.environ.get("RANK", "0")) == 0:
            args.worker.write_text(json.dumps(rows))
        return

    with tempfile.TemporaryDirectory() as scratch:
        one = run_world(1, args, Path(scratch))
        two = run_world(2, args, Path(scratch))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, float32, 1 torch thread per process, gloo on loopback")
    print_table(one, two, args.objectives)


if __name__ == "__main__":
    main()
