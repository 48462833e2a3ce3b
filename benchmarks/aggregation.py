"""Time tolaria's PCGrad against its floor, a loop reference and torchjd, side by side in one run.

Usage::

    .venv/bin/python benchmarks/aggregation.py            # full grid: n in {2,4,8,16}, d in {1e5,1e6,1e7}
    .venv/bin/python benchmarks/aggregation.py --quick    # small grid for a smoke run
    .venv/bin/python benchmarks/aggregation.py --n 4 8 --d 1000000 --repeats 30

Every gradient set is float32 on the CPU, split into four leaves (d/2, d/4, d/8 and the
rest) as a small model's parameters would be. Candidates, each timed on the same data:

* ``floor``: the least work any Gram-based PCGrad must do on a ready ``[n, d]``
  matrix, one ``M @ M.T`` and one ``(1 x n) @ M``.
* ``tolaria stacked``: ``pcgrad(tree, seed=..., stacked=True)`` on one pytree whose
  leaves are ``[n, *shape]``.
* ``floor seq`` and ``tolaria seq``: the same for a sequence of n pytrees, where the
  floor also assembles the ``[n, d]`` matrix once with ``torch.cat``.
* ``rescale``: ``tolaria stacked`` with ``rescale=True`` (exact for extreme norms).
* ``torchjd``: ``torchjd.aggregation.PCGrad()`` on the ready ``[n, d]`` matrix
  (install it with ``pip install torchjd``; the column is skipped without it).
* ``loop``: ``tolaria.testing.pcgrad_reference``, Algorithm 1 as a plain loop on the
  rows, with fewer repeats because it is slow.

Each candidate works on its own copy of the gradients, so that none finds its inputs
in the CPU caches because another candidate just loaded them. Each repeat runs every
candidate once, in a freshly shuffled order, so that background load hits all of them
alike and no candidate always runs right after the same neighbour.
The repeats are spread over ``--rounds`` rounds, each with fresh copies, so that no
candidate keeps a lucky or unlucky placement of its buffers in memory for the whole run.
``--flush-mb`` also evicts everything from the caches before each call. The table
reports medians in milliseconds and their ratios.
"""

from __future__ import annotations

import argparse
import functools
import gc
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from tolaria.functional.aggregation import pcgrad, pcgrad_orders
from tolaria.testing import pcgrad_reference

FULL_COUNTS = (2, 4, 8, 16)
FULL_SIZES = (100_000, 1_000_000, 10_000_000)
QUICK_COUNTS = (2, 8)
QUICK_SIZES = (10_000, 100_000)

Candidate = Callable[[int], Any]


def _leaf_sizes(size: int) -> list[int]:
    half, quarter, eighth = size // 2, size // 4, size // 8
    return [half, quarter, eighth, size - half - quarter - eighth]


def _load_torchjd() -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        from torchjd.aggregation import PCGrad
    except ImportError as error:
        print(
            f"NOTE: torchjd is not installed ({error}); its column is skipped. Install it with `pip install torchjd`."
        )
        return None
    return PCGrad()  # type: ignore[no-any-return]


def _build_matrix(count: int, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(count * 7919 + size)
    matrix = torch.randn(count, size, generator=generator)
    # Make objective 1 conflict with objective 0, as in multi-task training with competing losses.
    matrix[1] = -0.7 * matrix[0] + 0.3 * matrix[1]
    return matrix


def _stacked_leaves(matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split ``matrix`` column-wise into four contiguous leaves ``[n, *shape]`` (copies)."""
    count, size = matrix.shape
    # Even-numbered leaves are 2-D, like weight matrices, where the size allows it.
    shapes = [
        (leaf_size // 4, 4) if index % 2 == 0 and leaf_size % 4 == 0 else (leaf_size,)
        for index, leaf_size in enumerate(_leaf_sizes(size))
    ]
    leaves, start = {}, 0
    for index, shape in enumerate(shapes):
        width = torch.Size(shape).numel()
        leaves[f"leaf{index}"] = matrix[:, start : start + width].reshape(count, *shape).contiguous()
        start += width
    return leaves


def _sequence(stacked: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Return the n gradient pytrees of a stacked tree: row k of each leaf (contiguous views)."""
    count = next(iter(stacked.values())).shape[0]
    return [{name: leaf[k] for name, leaf in stacked.items()} for k in range(count)]


def _candidates(matrix: torch.Tensor, torchjd: Callable[[torch.Tensor], torch.Tensor] | None) -> dict[str, Candidate]:
    """Build the candidates, each with its own copy of the gradients.

    Separate copies keep a candidate from finding the inputs in the CPU caches just
    because the previous candidate loaded them.
    """
    count = matrix.shape[0]
    weights = torch.ones(count)
    floor_matrix = matrix.clone()
    floor_sequence_trees = _sequence(_stacked_leaves(matrix))
    stacked = _stacked_leaves(matrix)
    sequence = _sequence(_stacked_leaves(matrix))
    rescale_stacked = _stacked_leaves(matrix)

    def floor(_: int) -> Any:
        gram = floor_matrix @ floor_matrix.T
        return gram, weights @ floor_matrix

    def floor_sequence(_: int) -> Any:
        leaves = [leaf.reshape(-1) for tree in floor_sequence_trees for leaf in tree.values()]
        assembled = torch.cat(leaves).view(count, -1)
        gram = assembled @ assembled.T
        return gram, weights @ assembled

    candidates: dict[str, Candidate] = {
        "floor": floor,
        "tolaria stacked": lambda step: pcgrad(stacked, seed=step, stacked=True),
        "floor seq": floor_sequence,
        "tolaria seq": lambda step: pcgrad(sequence, seed=step),
        "rescale": lambda step: pcgrad(rescale_stacked, seed=step, stacked=True, rescale=True),
    }
    if torchjd is not None:
        torchjd_matrix = matrix.clone()
        candidates["torchjd"] = lambda _: torchjd(torchjd_matrix)
    return candidates


def _time_once(candidate: Candidate, step: int, scratch: torch.Tensor | None) -> float:
    if scratch is not None:
        # Candidates share their inputs, so whichever runs second would find them in the
        # last-level cache; rewriting a buffer larger than that cache evicts them first.
        scratch.add_(1.0)
    start = time.perf_counter()
    candidate(step)
    return time.perf_counter() - start


def _measure(
    build: Callable[[], dict[str, Candidate]], repeats: int, rounds: int, scratch: torch.Tensor | None
) -> dict[str, float]:
    """Return the median seconds of each candidate over ``rounds`` rounds of fresh copies of the data.

    Within a round every repeat runs each candidate once, in an order shuffled with a
    fixed seed. A rotated order would keep each candidate right after the same
    neighbour, whose reads and allocations set the state of the caches it starts
    from. That shifted near-identical candidates by up to 8% against each other. Each
    round allocates new copies, because the placement of a buffer in memory (which
    pages, and whether huge pages back it) also moved a candidate's time by up to 10%.
    Pooling several orders and placements averages both out.
    """
    samples: dict[str, list[float]] = {}
    shuffler = random.Random(0)
    per_round = max(1, -(-repeats // rounds))
    for round_index in range(rounds):
        candidates = build()
        names = list(candidates)
        for name in names:  # warm-up: allocator pools, thread pools, lazy imports
            candidates[name](0)
        for repeat in range(per_round):
            step = round_index * per_round + repeat + 1
            order = list(names)
            shuffler.shuffle(order)
            for name in order:
                samples.setdefault(name, []).append(_time_once(candidates[name], step, scratch))
        del candidates
        gc.collect()
    return {name: statistics.median(values) for name, values in samples.items()}


def _measure_loop(matrix: torch.Tensor, repeats: int) -> float:
    rows = list(matrix)
    samples = []
    for repeat in range(repeats):
        orders = pcgrad_orders(len(rows), repeat)
        start = time.perf_counter()
        pcgrad_reference(rows, orders)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _check_agreement(matrix: torch.Tensor) -> float:
    """Return the relative difference between tolaria's stacked PCGrad and the loop reference run in float64."""
    # The reference runs in float64: a float32 loop over 1e7-element dot products is itself about 1e-4 off.
    orders = pcgrad_orders(matrix.shape[0], 0)
    reference = pcgrad_reference(list(matrix.double()), orders)
    result = pcgrad(_stacked_leaves(matrix), orders=orders, stacked=True).grad
    flat = torch.cat([leaf.reshape(-1) for leaf in result.values()]).double()
    return float((flat - reference).norm() / reference.norm())


def _repeats_for(size: int, base: int) -> int:
    if size <= 100_000:
        return max(3, base)
    if size <= 1_000_000:
        return max(3, base // 3)
    return max(3, base // 10)


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None:
        return "-"
    return f"{numerator / denominator:.2f}x"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.2f}"


HEADER = (
    "| n | d | floor ms | tolaria stacked ms | stacked/floor | floor seq ms | tolaria seq ms | seq/floor seq "
    "| torchjd ms | torchjd/floor | stacked/torchjd | rescale ms | rescale/floor | loop ms | loop/floor |"
)


def _row(count: int, size: int, medians: dict[str, float], loop: float | None) -> str:
    floor = medians["floor"]
    torchjd = medians.get("torchjd")
    cells = [
        str(count),
        f"{size:.0e}",
        _ms(floor),
        _ms(medians["tolaria stacked"]),
        _ratio(medians["tolaria stacked"], floor),
        _ms(medians["floor seq"]),
        _ms(medians["tolaria seq"]),
        _ratio(medians["tolaria seq"], medians["floor seq"]),
        _ms(torchjd),
        _ratio(torchjd, floor),
        _ratio(medians["tolaria stacked"], torchjd),
        _ms(medians["rescale"]),
        _ratio(medians["rescale"], floor),
        _ms(loop),
        _ratio(loop, floor),
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", help="numbers of objectives (default 2 4 8 16)")
    parser.add_argument("--d", type=int, nargs="+", help="gradient sizes in elements (default 1e5 1e6 1e7)")
    parser.add_argument("--quick", action="store_true", help="small grid: n in {2, 8}, d in {1e4, 1e5}")
    parser.add_argument(
        "--repeats", type=int, default=60, help="timed repeats at d <= 1e5 (a third at 1e6, a tenth above)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="rounds with fresh copies of the data; the repeats are spread over them (default 5)",
    )
    parser.add_argument("--loop-repeats", type=int, default=3, help="timed repeats of the slow loop reference")
    parser.add_argument("--no-loop", action="store_true", help="skip the loop reference")
    parser.add_argument(
        "--flush-mb",
        type=int,
        default=0,
        help="MiB of scratch memory rewritten before each timed call to evict everything from the CPU caches "
        "(default 0: no flush; 64 covers twice a 32 MiB last-level cache)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: steadier timings on a shared machine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    counts = args.n or (QUICK_COUNTS if args.quick else FULL_COUNTS)
    sizes = args.d or (QUICK_SIZES if args.quick else FULL_SIZES)
    torchjd = _load_torchjd()
    scratch = torch.zeros(args.flush_mb * 2**18) if args.flush_mb > 0 else None
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32 on CPU, "
        f"caches flushed with {args.flush_mb} MiB before each call; medians of interleaved runs"
    )
    print()
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for size in sizes:
        for count in counts:
            matrix = _build_matrix(count, size)
            difference = _check_agreement(matrix)
            if difference > 1e-4:
                raise SystemExit(f"tolaria and the loop reference disagree at n={count}, d={size}: {difference:.2e}")
            medians = _measure(
                functools.partial(_candidates, matrix, torchjd),
                _repeats_for(size, args.repeats),
                args.rounds,
                scratch,
            )
            loop = None if args.no_loop else _measure_loop(matrix, args.loop_repeats)
            print(_row(count, size, medians, loop), flush=True)
            del matrix
            gc.collect()


if __name__ == "__main__":
    main()
