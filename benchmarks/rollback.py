"""Benchmark of rollback snapshots and checkpoint saves against their baselines.

For model + Adam states of about 100 MB and 1 GB it measures, as medians in ms:

- snapshot and restore through ``RollbackManager`` (fast tier);
- the memcpy floor: ``copy_`` of the same tensors into preallocated tensors and back;
- the pickling path: ``torch.save`` of the state dicts into ``BytesIO``, and
  ``torch.load(weights_only=True)`` + ``load_state_dict`` back;
- ``tolaria.checkpoint.save`` (SHA-256, ``fsync`` of file and folder, manifest) against a
  plain ``torch.save`` to a file.

Targets: snapshot and restore at most 1.3x the floor and at least 10x faster than the
``torch.save`` path. Run from the repository root::

    python benchmarks/rollback.py            # 100 MB and 1 GB
    python benchmarks/rollback.py --quick    # 100 MB only, fewer repeats
"""

from __future__ import annotations

import argparse
import gc
import io
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from tolaria import checkpoint
from tolaria.rollback import RollbackManager

WIDTH = 2048
BYTES_PER_PARAMETER = 12  # float32 parameter plus Adam's two float32 moments


def build(target_bytes: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Return a stack of ``WIDTH x WIDTH`` linear layers with Adam state, about ``target_bytes`` in all."""
    layers = max(1, math.ceil(target_bytes / BYTES_PER_PARAMETER / (WIDTH * WIDTH)))
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(layers)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    for parameter in model.parameters():
        parameter.grad = None
    return model, optimizer


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [tensor.detach() for tensor in model.state_dict().values()]
    for state in optimizer.state.values():
        tensors.extend(value for value in state.values() if isinstance(value, torch.Tensor))
    return tensors


class Timing(NamedTuple):
    """Median and fastest of the timed runs, in ms; the fastest is less disturbed on a shared machine."""

    median: float
    best: float

    def __format__(self, spec: str) -> str:
        return f"{self.median:{spec}} ({self.best:{spec}})"

    def __truediv__(self, other: object) -> Timing:
        assert isinstance(other, Timing)
        return Timing(self.median / other.median, self.best / other.best)


def median_ms(function: Callable[[], Any], repeats: int) -> Timing:
    """Run ``function`` once to warm up, then ``repeats`` times; return the median and best in ms."""
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000.0)
    return Timing(statistics.median(times), min(times))


def measure_floor(tensors: list[torch.Tensor], repeats: int) -> tuple[Timing, Timing]:
    copies = [torch.empty_like(tensor) for tensor in tensors]

    def snapshot() -> None:
        for copy, tensor in zip(copies, tensors, strict=True):
            copy.copy_(tensor)

    def restore() -> None:
        for copy, tensor in zip(copies, tensors, strict=True):
            tensor.copy_(copy)

    return median_ms(snapshot, repeats), median_ms(restore, repeats)


def measure_manager(model: nn.Module, optimizer: torch.optim.Optimizer, size: int, repeats: int) -> dict[str, Any]:
    manager = RollbackManager(model, optimizer, capacity_bytes=int(size * 1.2))
    started = time.perf_counter()
    manager.snapshot(0)
    cold_ms = (time.perf_counter() - started) * 1000.0
    steps = iter(range(1, 10_000))

    def snapshot() -> None:
        # A new step each time evicts the previous snapshot and reuses its buffer.
        manager.snapshot(next(steps))

    def restore() -> None:
        result = manager.rollback(10_000, reason="benchmark")
        assert result.hit

    snapshot_ms = median_ms(snapshot, repeats)
    restore_ms = median_ms(restore, repeats)
    allocations = manager.pool.allocations
    manager.close()
    return {"cold": cold_ms, "snapshot": snapshot_ms, "restore": restore_ms, "allocations": allocations}


def measure_pickle(model: nn.Module, optimizer: torch.optim.Optimizer, repeats: int) -> tuple[Timing, Timing]:
    holder: dict[str, bytes] = {}

    def save() -> None:
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
        holder["data"] = buffer.getvalue()

    def load() -> None:
        state = torch.load(io.BytesIO(holder["data"]), weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    save_ms = median_ms(save, repeats)
    load_ms = median_ms(load, repeats)
    holder.clear()
    return save_ms, load_ms


def measure_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, repeats: int) -> tuple[Timing, Timing]:
    state = checkpoint.capture_training_state(step=0, model=model, optimizer=optimizer)
    with tempfile.TemporaryDirectory(prefix="tolaria-bench-") as folder:
        steps = iter(range(10_000))
        plain = Path(folder) / "plain.pt"

        def tolaria_save() -> None:
            checkpoint.save(Path(folder) / "checkpoints", state, step=next(steps), keep_last=1)

        def plain_save() -> None:
            torch.save(state, plain)

        return median_ms(tolaria_save, repeats), median_ms(plain_save, repeats)


def run_case(megabytes: int, repeats: int, checkpoint_repeats: int) -> dict[str, Any]:
    model, optimizer = build(megabytes * 1_000_000)
    tensors = state_tensors(model, optimizer)
    size = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    row: dict[str, Any] = {"megabytes": size / 1e6}
    row["floor_snapshot"], row["floor_restore"] = measure_floor(tensors, repeats)
    gc.collect()
    manager = measure_manager(model, optimizer, size, repeats)
    row.update({f"tolaria_{key}": value for key, value in manager.items()})
    gc.collect()
    row["pickle_save"], row["pickle_load"] = measure_pickle(model, optimizer, max(1, repeats // 2))
    gc.collect()
    row["checkpoint_save"], row["plain_save"] = measure_checkpoint(model, optimizer, checkpoint_repeats)
    del tensors, model, optimizer
    gc.collect()
    return row


def print_tables(rows: list[dict[str, Any]]) -> None:
    print("\nfast tier vs memcpy floor and torch.save/torch.load through BytesIO; median (best) ms")
    print("| state MB | op | floor | tolaria | x floor | torch.save/load | speed-up |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        for op, floor, ours, pickled in (
            ("snapshot", row["floor_snapshot"], row["tolaria_snapshot"], row["pickle_save"]),
            ("restore", row["floor_restore"], row["tolaria_restore"], row["pickle_load"]),
        ):
            print(
                f"| {row['megabytes']:.0f} | {op} | {floor:.1f} | {ours:.1f} | {ours / floor:.2f} "
                f"| {pickled:.1f} | {pickled / ours:.1f} |"
            )

    print("\nfirst snapshot (allocates its buffer) and buffer allocations over all snapshots")
    for row in rows:
        cold, allocations = row["tolaria_cold"], row["tolaria_allocations"]
        print(f"  {row['megabytes']:.0f} MB: first {cold:.1f} ms, allocations {allocations}")

    print("\ncheckpoint save: tolaria.checkpoint.save (SHA-256, fsync, manifest) vs plain torch.save; median (best) ms")
    print("| state MB | tolaria.checkpoint.save | torch.save | ratio |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        ours, plain = row["checkpoint_save"], row["plain_save"]
        print(f"| {row['megabytes']:.0f} | {ours:.1f} | {plain:.1f} | {ours / plain:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the 100 MB case, with fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 10, quick 5)")
    arguments = parser.parse_args()

    repeats = arguments.repeats or (5 if arguments.quick else 10)
    cases = [(100, repeats, 3)] if arguments.quick else [(100, repeats, 3), (1000, max(3, repeats // 2), 2)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = [
        run_case(megabytes, case_repeats, checkpoint_repeats) for megabytes, case_repeats, checkpoint_repeats in cases
    ]
    print_tables(rows)


if __name__ == "__main__":
    main()
