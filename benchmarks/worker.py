"""Lateness of control after a deadline: AsyncWorker against a per-call ``ThreadPoolExecutor``.

For each kind of work, every repeat submits a call that would run far past its timeout
and measures how long after the deadline the caller gets control back:

- ``coroutine``: ``await asyncio.sleep(...)``; the worker cancels the task.
- ``cooperative sync``: waits on the ``CancelToken``; the worker sets it.
- ``uncooperative sync``: ``time.sleep(...)``; the worker abandons the thread.
- ``process``: ``time.sleep(...)`` in a worker process; the worker kills and replaces it
  (the replacement is awaited between repeats and not timed).

The baseline is the pattern the worker replaces: ``with ThreadPoolExecutor(1) as ex:
ex.submit(...).result(timeout)`` (``ProcessPoolExecutor`` for processes). Its
``result`` raises at the deadline, but leaving the ``with`` block waits for the work, so
control returns only when the work ends: its lateness is the work's remaining time.

Lateness is ``time.monotonic()`` when ``result()`` raised (baseline: when the ``with``
block was left) minus the deadline, in milliseconds: p50, p99 and max. With torch
imported, one full garbage collection pauses every thread for 100-250 ms on a 2-core
machine. The benchmark therefore calls ``gc.freeze()`` after the imports, which makes
collections cheap; ``--no-gc-freeze`` measures without it.

Usage (from the repository root; about 2 minutes with the defaults)::

    .venv/bin/python benchmarks/worker.py
    .venv/bin/python benchmarks/worker.py --repeats 200 --baseline-repeats 50 --process-repeats 20

Only the standard library is imported at module level: worker processes start with the
spawn method, which runs this file again in each new process.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import logging
import multiprocessing
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any


def cooperative_wait(seconds: float, cancel: Any) -> None:
    """Wait ``seconds`` or until ``cancel`` is set."""
    cancel.wait(seconds)


def never_set_wait(seconds: float) -> None:
    """Wait ``seconds``: the baseline has no token to set, so the wait always runs to its end."""
    threading.Event().wait(seconds)


async def coroutine_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def summarize(lateness_s: list[float]) -> tuple[float, float, float]:
    """Return p50, p99 and max of ``lateness_s`` in milliseconds (nearest rank)."""
    ordered = sorted(value * 1e3 for value in lateness_s)
    p99 = ordered[max(0, -(-99 * len(ordered) // 100) - 1)]
    return statistics.median(ordered), p99, ordered[-1]


def measure_worker(worker: Any, submit: Callable[[], Any], repeats: int, before: Callable[[], None]) -> list[float]:
    """Time ``repeats`` timeouts of ``submit()`` handles; call ``before`` ahead of each."""
    from tolaria.worker import TaskTimeout

    lateness = []
    for _ in range(repeats):
        before()
        handle = submit()
        try:
            handle.result()
        except TaskTimeout:
            lateness.append(time.monotonic() - handle.deadline)
        else:
            raise RuntimeError("the benchmark call finished before its timeout; raise --work-ms")
    return lateness


def measure_baseline(
    executor_type: Callable[[], concurrent.futures.Executor], call: Callable[[Any], Any], timeout_s: float, repeats: int
) -> list[float]:
    """Time ``repeats`` timeouts of the per-call executor pattern."""
    lateness = []
    for _ in range(repeats):
        deadline = time.monotonic() + timeout_s
        try:
            with executor_type() as executor:
                call(executor).result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            pass
        lateness.append(time.monotonic() - deadline)
    return lateness


def run(arguments: argparse.Namespace) -> list[tuple[str, list[float], list[float]]]:
    from tolaria.worker import AsyncWorker

    if not arguments.no_gc_freeze:
        gc.collect()
        gc.freeze()
    timeout_s = arguments.timeout_ms / 1e3
    work_s = arguments.work_ms / 1e3
    spawn = multiprocessing.get_context("spawn")

    def thread_pool() -> concurrent.futures.Executor:
        return concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def process_pool() -> concurrent.futures.Executor:
        return concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn)

    rows = []
    with AsyncWorker(max_concurrency=16, max_queue=16, name="benchmark") as worker:
        kinds = [
            (
                "coroutine",
                lambda: worker.submit(coroutine_sleep, work_s, timeout=timeout_s),
                lambda executor: executor.submit(asyncio.run, coroutine_sleep(work_s)),
                thread_pool,
            ),
            (
                "cooperative sync",
                lambda: worker.submit(cooperative_wait, work_s, timeout=timeout_s),
                lambda executor: executor.submit(never_set_wait, work_s),
                thread_pool,
            ),
            (
                "uncooperative sync",
                lambda: worker.submit(time.sleep, work_s, timeout=timeout_s),
                lambda executor: executor.submit(time.sleep, work_s),
                thread_pool,
            ),
        ]
        for name, submit, baseline_call, pool in kinds:
            worker_lateness = measure_worker(worker, submit, arguments.repeats, lambda: None)
            baseline = measure_baseline(pool, baseline_call, timeout_s, arguments.baseline_repeats)
            rows.append((name, worker_lateness, baseline))
            print_row(*rows[-1])

        worker.warm_up(timeout=60.0)
        process_lateness = measure_worker(
            worker,
            lambda: worker.submit(time.sleep, work_s, timeout=timeout_s, isolation="process"),
            arguments.process_repeats,
            lambda: worker.warm_up(timeout=60.0),
        )
        baseline = measure_baseline(
            process_pool,
            lambda executor: executor.submit(time.sleep, work_s),
            timeout_s,
            arguments.process_baseline_repeats,
        )
        rows.append(("process", process_lateness, baseline))
        print_row(*rows[-1])
    return rows


def print_header(arguments: argparse.Namespace) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average {load:.2f}, "
        f"timeout {arguments.timeout_ms} ms, work {arguments.work_ms} ms, "
        f"gc {'not frozen' if arguments.no_gc_freeze else 'frozen after imports'}"
    )
    print()
    print(
        "| kind | worker n | worker p50 ms | worker p99 ms | worker max ms "
        "| per-call executor n | executor p50 ms | executor p99 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")


def print_row(name: str, worker_lateness: list[float], baseline: list[float]) -> None:
    p50, p99, maximum = summarize(worker_lateness)
    base_p50, base_p99, _ = summarize(baseline)
    print(
        f"| {name} | {len(worker_lateness)} | {p50:.2f} | {p99:.2f} | {maximum:.2f} "
        f"| {len(baseline)} | {base_p50:.1f} | {base_p99:.1f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=1000, help="timeouts per coroutine and thread kind")
    parser.add_argument(
        "--baseline-repeats",
        type=int,
        default=300,
        help="timeouts per kind for the per-call ThreadPoolExecutor baseline",
    )
    parser.add_argument(
        "--process-repeats",
        type=int,
        default=100,
        help="timeouts of process work; each one waits for a replacement process",
    )
    parser.add_argument(
        "--process-baseline-repeats",
        type=int,
        default=20,
        help="timeouts for the per-call ProcessPoolExecutor baseline, which spawns a process each",
    )
    parser.add_argument("--timeout-ms", type=float, default=10.0, help="timeout of each call, in milliseconds")
    parser.add_argument(
        "--work-ms", type=float, default=30.0, help="how long each call would run without a timeout, in milliseconds"
    )
    parser.add_argument("--no-gc-freeze", action="store_true", help="measure with full garbage collections")
    arguments = parser.parse_args()
    if arguments.work_ms <= arguments.timeout_ms:
        parser.error(f"--work-ms ({arguments.work_ms}) must exceed --timeout-ms ({arguments.timeout_ms})")

    # Every uncooperative call here is abandoned on purpose; keep its warnings out of the table.
    logging.getLogger("tolaria.worker").setLevel(logging.ERROR)
    print_header(arguments)
    run(arguments)


if __name__ == "__main__":
    main()
