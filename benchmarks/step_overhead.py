"""Time per optimizer step of ``tolaria.Trainer`` next to a plain PyTorch loop on the same work.

Both loops train the digits network of ``tolaria.demo`` (a shared MLP trunk with three
heads and three cross-entropy objectives) with Adam on the same pre-built batches of
synthetic digits-shaped data, on the CPU:

- ``plain loop`` (the floor): forward, sum of the three losses, one ``backward``,
  ``optimizer.step()``, ``optimizer.zero_grad()``.
- ``Trainer``: ``TrainerConfig(aggregator="sum", device="cpu", epochs=1)`` with the
  default telemetry (``telemetry=None`` and ``out_dir`` in a temporary folder, so the
  JSONL sink is attached as in a real run) and the default safety settings. Each step
  computes one gradient row per objective (a batched backward), sums the rows of the
  shared parameters, checks that losses and gradients are finite, updates the loss
  monitor and the emergency level, and steps the optimizer.

Method: one pass over the batches is one epoch. The loops run one epoch each, in an
order that rotates between repeats, after one warm-up epoch each. The batch iterable
records ``time.perf_counter()`` each time the loop requests the next batch, so the gap
between two requests is the time of one step. A repeat's value is the median gap of its
epoch, and the table gives the median over repeats. ``ratio`` is the median over
repeats of the Trainer's step time divided by the plain loop's step time in the same
repeat. ``fastest`` is the repeat with the smallest median, which is the one least
disturbed by other processes on a shared machine. The load average is printed before
and after. ``whole run ms/step`` divides the whole ``Trainer.fit`` and ``Trainer.close``
calls by the number of steps. Besides the steps, it covers the set-up and the first
step's extra backward passes that find which objectives use which parameters. It also
covers the rollback snapshot before the first step, the checkpoint at the end of the
epoch, and closing the telemetry file and the worker.

With ``--breakdown`` two more loops run in the same rotation:

- ``plain, per-objective grads``: the plain loop, but gradients come from
  ``tolaria.gradients.per_objective_gradients`` (one batched backward with three
  rows) and the rows are summed into ``.grad``. Its gap to the plain loop is the cost
  of per-objective gradients alone.
- ``Trainer, no out_dir``: the Trainer without ``out_dir``, so without a telemetry file
  and without checkpoints.

With ``--profile`` one more Trainer epoch of each setup runs under ``cProfile``, and
the table splits its time between the parts of a step.

Run from the repository root::

    python benchmarks/step_overhead.py                            # under 1 minute
    python benchmarks/step_overhead.py --breakdown --profile      # about 2 minutes

Both times were measured on a shared machine with 2 CPUs.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import dataclasses
import gc
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from tolaria import Trainer, TrainerConfig
from tolaria.demo import DigitsNet, digits_objectives
from tolaria.gradients import per_objective_gradients

Batch = tuple[torch.Tensor, torch.Tensor]

FEATURES = 64
CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Setup:
    """One model size and batch size to measure.

    Attributes:
        name: row label.
        hidden: width of the trunk's two hidden layers.
        batch_size: samples per step.
        steps: batches per epoch.
        lr: Adam learning rate.
    """

    name: str
    hidden: int
    batch_size: int
    steps: int
    lr: float


SETUPS = {
    "wide": Setup("wide: hidden 1024, batch 256", hidden=1024, batch_size=256, steps=40, lr=1e-3),
    "demo": Setup("demo default: hidden 128, batch 32", hidden=128, batch_size=32, steps=60, lr=2e-3),
}


class TimedBatches:
    """Yield the same batches every pass and record when each one was requested.

    ``stamps`` receives ``time.perf_counter()`` before every batch and once more when
    the loop requests a batch after the last one, so ``len(batches)`` gaps are recorded.
    """

    def __init__(self, batches: Sequence[Batch]) -> None:
        self.batches = batches
        self.stamps: list[float] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        self.stamps = []
        for batch in self.batches:
            self.stamps.append(time.perf_counter())
            yield batch
        self.stamps.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        """Return the seconds between consecutive requests of the last pass."""
        return [later - earlier for earlier, later in zip(self.stamps, self.stamps[1:], strict=False)]


def make_batches(setup: Setup, seed: int) -> list[Batch]:
    """Return ``setup.steps`` batches of ``[B, 64]`` float32 features and ``[B]`` int64 digit labels."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(setup.steps, setup.batch_size, FEATURES, generator=generator)
    labels = torch.randint(0, CLASSES, (setup.steps, setup.batch_size), generator=generator)
    return [(features[index], labels[index]) for index in range(setup.steps)]


@dataclasses.dataclass
class EpochTiming:
    """Timing of one epoch of one loop: the median step time and the whole call, in seconds."""

    median_step_s: float
    call_s: float
    steps: int


class Loop:
    """One way of training: a model, its optimizer and a function that runs one epoch."""

    def __init__(self, name: str, model: torch.nn.Module, lr: float) -> None:
        self.name = name
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def run_epoch(self, data: TimedBatches) -> None:
        raise NotImplementedError

    def timed_epoch(self, data: TimedBatches) -> EpochTiming:
        """Run one epoch and return its timing."""
        started = time.perf_counter()
        self.run_epoch(data)
        call_s = time.perf_counter() - started
        gaps = data.step_seconds()
        return EpochTiming(statistics.median(gaps), call_s, len(gaps))


class PlainLoop(Loop):
    """Forward, summed loss, one backward, optimizer step, zero_grad."""

    def run_epoch(self, data: TimedBatches) -> None:
        for batch in data:
            losses = digits_objectives(self.model, batch)
            total = torch.stack(list(losses.values())).sum()
            total.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()


class PerObjectiveLoop(Loop):
    """The plain loop with per-objective gradient rows summed into ``.grad``."""

    def run_epoch(self, data: TimedBatches) -> None:
        parameters = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        for batch in data:
            losses = torch.stack(list(digits_objectives(self.model, batch).values()))
            rows = per_objective_gradients(losses, parameters, batched=True)
            for parameter, grad in zip(parameters, rows, strict=True):
                parameter.grad = None if grad is None else grad.sum(dim=0)
            self.optimizer.step()
            self.optimizer.zero_grad()


class TrainerLoop(Loop):
    """A new ``Trainer`` with ``epochs=1`` for every epoch, over the same model and optimizer."""

    def __init__(self, name: str, model: torch.nn.Module, lr: float, *, folder: Path | None) -> None:
        super().__init__(name, model, lr)
        self.folder = folder
        self.runs = 0

    def make_trainer(self, data: TimedBatches) -> Trainer:
        out_dir = None if self.folder is None else self.folder / f"run-{self.runs}"
        self.runs += 1
        config = TrainerConfig(aggregator="sum", device="cpu", epochs=1, out_dir=out_dir)
        return Trainer(self.model, self.optimizer, digits_objectives, data, config=config, telemetry=None)

    def run_epoch(self, data: TimedBatches) -> None:
        with self.make_trainer(data) as trainer:
            trainer.fit()

    def timed_epoch(self, data: TimedBatches) -> EpochTiming:
        """Build the Trainer outside the timed region, then time ``fit`` and ``close``."""
        trainer = self.make_trainer(data)
        started = time.perf_counter()
        try:
            result = trainer.fit()
        finally:
            trainer.close()
        call_s = time.perf_counter() - started
        if result.global_step != len(data):
            raise RuntimeError(f"{self.name}: expected {len(data)} applied steps, got {result.global_step}")
        gaps = data.step_seconds()
        return EpochTiming(statistics.median(gaps), call_s, len(gaps))


def build_loops(setup: Setup, folder: Path, *, breakdown: bool) -> list[Loop]:
    """Return the loops to compare, each with its own copy of one initial model."""
    torch.manual_seed(0)
    initial = DigitsNet(hidden=setup.hidden)
    loops: list[Loop] = [
        PlainLoop("plain loop", copy.deepcopy(initial), setup.lr),
        TrainerLoop("Trainer", copy.deepcopy(initial), setup.lr, folder=folder / "trainer"),
    ]
    if breakdown:
        loops.append(PerObjectiveLoop("plain, per-objective grads", copy.deepcopy(initial), setup.lr))
        loops.append(TrainerLoop("Trainer, no out_dir", copy.deepcopy(initial), setup.lr, folder=None))
    return loops


def measure(loops: Sequence[Loop], data: TimedBatches, repeats: int) -> dict[str, list[EpochTiming]]:
    """Run one warm-up epoch per loop, then ``repeats`` rounds in a rotating order."""
    for loop in loops:
        loop.timed_epoch(data)
    timings: dict[str, list[EpochTiming]] = {loop.name: [] for loop in loops}
    for repeat in range(repeats):
        shift = repeat % len(loops)
        for loop in (*loops[shift:], *loops[:shift]):
            gc.collect()
            timings[loop.name].append(loop.timed_epoch(data))
    return timings


def paired_ratio(numerator: Sequence[EpochTiming], denominator: Sequence[EpochTiming]) -> tuple[float, float, float]:
    """Return the median, min and max over repeats of the ratio of median step times."""
    ratios = [top.median_step_s / bottom.median_step_s for top, bottom in zip(numerator, denominator, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def print_table(setup: Setup, timings: Mapping[str, list[EpochTiming]]) -> None:
    floor = timings["plain loop"]
    floor_fastest = min(sample.median_step_s for sample in floor)
    print(f"\n{setup.name}, {setup.steps} steps per epoch, {len(floor)} repeats\n")
    print("| loop | median ms/step | ratio to plain (min-max) | fastest ms/step | fastest ratio | whole run ms/step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, samples in timings.items():
        step_ms = statistics.median(sample.median_step_s for sample in samples) * 1e3
        fastest_s = min(sample.median_step_s for sample in samples)
        call_ms = statistics.median(sample.call_s / sample.steps for sample in samples) * 1e3
        ratio, low, high = paired_ratio(samples, floor)
        print(
            f"| {name} | {step_ms:.2f} | {ratio:.2f}x ({low:.2f}-{high:.2f}) | {fastest_s * 1e3:.2f} "
            f"| {fastest_s / floor_fastest:.2f}x | {call_ms:.2f} |"
        )


# cProfile entries to report: label -> (path suffix, function name).
PROFILE_PARTS = {
    "TrainingLoop._run_one (whole step)": ("tolaria/loop.py", "_run_one"),
    "  snapshots (SafetyGuard.before_step)": ("tolaria/safety.py", "before_step"),
    "  StepRunner.run": ("tolaria/step.py", "run"),
    "    move batch to device": ("tolaria/step.py", "move_to_device"),
    "    forward (objectives)": ("tolaria/step.py", "forward"),
    "    per-objective backward": ("tolaria/gradients.py", "__call__"),
    "    split shared/exclusive": ("tolaria/gradients.py", "split_by_usage"),
    "    aggregation (sum)": ("tolaria/step.py", "_combine"),
    "    finite check": ("tolaria/step.py", "_finite"),
    "    loss monitor (anomaly)": ("tolaria/step.py", "_monitor"),
    "    host read of the flags": ("tolaria/step.py", "_read_flags"),
    "    write .grad + optimizer step": ("tolaria/step.py", "_apply"),
    "      of which Adam.step": ("torch/optim/adam.py", "step"),
    "  EpochAccumulator.add": ("tolaria/epoch.py", "add"),
    "  emergency level (SafetyGuard.after_step)": ("tolaria/safety.py", "after_step"),
    "first step: objective_usage": ("tolaria/gradients.py", "objective_usage"),
    "Telemetry (all methods)": ("tolaria/telemetry/publisher.py", "*"),
    "checkpoint at epoch end": ("tolaria/checkpointing.py", "*"),
    "Trainer.fit (everything)": ("tolaria/trainer.py", "fit"),
}


def cumulative_seconds(stats: pstats.Stats, suffix: str, function: str) -> float | None:
    """Return the cumulative seconds of the matching functions, or ``None`` when none was called.

    For ``"*"`` only calls from outside the module are summed, so calls between its own
    functions are not counted twice.
    """
    entries = stats.stats  # type: ignore[attr-defined]
    total = None
    for (path, _, name), (_, _, _, cumulative, callers) in entries.items():
        if not path.endswith(suffix):
            continue
        if function == "*":
            outside = [timing[3] for caller, timing in callers.items() if not caller[0].endswith(suffix)]
            total = (total or 0.0) + sum(outside)
        elif name == function:
            total = (total or 0.0) + cumulative
    return total


def profile_trainer(setup: Setup, data: TimedBatches, folder: Path) -> None:
    """Run one Trainer epoch under cProfile and print where its time went, per step."""
    torch.manual_seed(0)
    loop = TrainerLoop("Trainer", DigitsNet(hidden=setup.hidden), setup.lr, folder=folder / "profile")
    loop.timed_epoch(data)
    with loop.make_trainer(data) as trainer:
        profiler = cProfile.Profile()
        profiler.enable()
        trainer.fit()
        profiler.disable()
    stats = pstats.Stats(profiler)
    steps = len(data)
    print(f"\ncProfile of one Trainer epoch, {setup.name} ({steps} steps; cProfile adds its own overhead)\n")
    print("| part | ms/step (cumulative) |")
    print("|---|---:|")
    for label, (suffix, function) in PROFILE_PARTS.items():
        seconds = cumulative_seconds(stats, suffix, function)
        value = "not called" if seconds is None else f"{seconds / steps * 1e3:.3f}"
        print(f"| {label} | {value} |")
    print("\nTop 12 functions by own time:\n")
    stats.sort_stats("tottime").print_stats(12)


def describe_load() -> str:
    """Return the 1, 5 and 15 minute load averages, which show whether other work shared the CPUs."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed epochs per loop and setup (default 7)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--setups", nargs="+", choices=sorted(SETUPS), default=["wide", "demo"], help="setups to run (default: both)"
    )
    parser.add_argument("--breakdown", action="store_true", help="also run the per-objective and no-sink loops")
    parser.add_argument("--profile", action="store_true", help="profile one Trainer epoch of each setup")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error(f"--repeats and --threads must be >= 1, got {args.repeats} and {args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CPU, {torch.get_num_threads()} thread(s)")
    print(f"load average before: {describe_load()} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        for key in args.setups:
            setup = SETUPS[key]
            data = TimedBatches(make_batches(setup, seed=0))
            loops = build_loops(setup, folder / key, breakdown=args.breakdown)
            print_table(setup, measure(loops, data, args.repeats))
        for key in args.setups if args.profile else ():
            profile_trainer(SETUPS[key], TimedBatches(make_batches(SETUPS[key], seed=0)), folder / key)
    print(f"\nload average after: {describe_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
