"""Cost of telemetry calls on the training thread, next to a plain ``list.append`` floor.

Each operation is timed in batches of ``--batch`` calls; the table gives the median and
the 90th percentile of the per-call time over ``--batches`` batches. A ``JsonlSink`` in
a temporary folder is attached. After every batch, outside the timed region, the
publisher is flushed and, unless ``--overlap`` is given, drained. So the default measures
the cost of enqueueing alone. With ``--overlap`` the sink's writer thread serialises the
previous batch (1,000 events in one packet) while the next one is timed, which shows the
cost of sharing the interpreter lock with it.

Operations:

- ``list.append``: append a tuple of the same payload to a list (the floor).
- ``Telemetry.event INFO``: buffered for the next packet.
- ``Telemetry.metric``: buffered for the next packet.
- ``Telemetry.count``: adds to a running total.
- ``Telemetry.event ERROR``: builds a packet of its own and queues it for the sink.

Run: ``python benchmarks/telemetry.py`` (add ``--batches 50`` for a quick look).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tolaria.telemetry import JsonlSink, Level, Telemetry

Operation = Callable[[int], None]


def time_batches(operation: Operation, *, batch: int, batches: int, between: Callable[[], None]) -> list[float]:
    """Return the mean nanoseconds per call of each batch of ``batch`` calls to ``operation``."""
    samples = []
    for _ in range(batches):
        start = time.perf_counter_ns()
        for index in range(batch):
            operation(index)
        samples.append((time.perf_counter_ns() - start) / batch)
        between()
    return samples


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def operations(telemetry: Telemetry, floor: list[object]) -> dict[str, Operation]:
    """Return the timed operations by name, each taking the call index."""

    def append(index: int) -> None:
        floor.append(("tolaria.bench.event", Level.INFO, {"step": index}))

    def event(index: int) -> None:
        telemetry.event("tolaria.bench.event", Level.INFO, step=index)

    def metric(index: int) -> None:
        telemetry.metric("tolaria.bench.latency_ms", 1.5, "ms", step=index)

    def count(index: int) -> None:
        del index
        telemetry.count("tolaria.bench.calls")

    def urgent(index: int) -> None:
        telemetry.event("tolaria.bench.failure", Level.ERROR, step=index)

    return {
        "list.append (floor)": append,
        "Telemetry.event INFO": event,
        "Telemetry.metric": metric,
        "Telemetry.count": count,
        "Telemetry.event ERROR": urgent,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1000, help="calls per timed batch (default 1000)")
    parser.add_argument("--batches", type=int, default=200, help="timed batches per operation (default 200)")
    parser.add_argument("--overlap", action="store_true", help="do not wait for the writer thread between batches")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        telemetry = Telemetry([JsonlSink(Path(folder) / "telemetry.jsonl")])
        floor: list[object] = []
        step = 0

        def between() -> None:
            nonlocal step
            step += 1
            telemetry.flush(0, step)
            floor.clear()
            if not args.overlap:
                telemetry.drain(60.0)

        results = {}
        for name, operation in operations(telemetry, floor).items():
            gc.collect()
            # ERROR events each queue a packet, so fewer of them keep the file small.
            batch = args.batch if "ERROR" not in name else max(1, args.batch // 10)
            results[name] = time_batches(operation, batch=batch, batches=args.batches, between=between)
            telemetry.drain(60.0)
        telemetry.close()

    floor_median = statistics.median(results["list.append (floor)"])
    mode = "writer overlapping" if args.overlap else "writer drained between batches"
    print(f"python {sys.version.split()[0]}, {args.batches} batches of {args.batch} calls, JsonlSink, {mode}")
    print()
    print("| operation | median ns/call | p90 ns/call | ratio to floor |")
    print("|---|---:|---:|---:|")
    for name, samples in results.items():
        median = statistics.median(samples)
        print(f"| {name} | {median:.0f} | {percentile(samples, 0.9):.0f} | {median / floor_median:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
