"""One pass over the training data, and evaluation on the validation data.

Per-step values stay on the device in ``EpochAccumulator`` and are read on the host
once, when the epoch ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from tolaria.functional.aggregation import AggregationStats
from tolaria.step import StepOutcome, StepRunner, batch_size_of, move_to_device

__all__ = ["Accuracy", "EpochAccumulator", "evaluate", "progress"]

Accuracy = Callable[[torch.nn.Module, Any], Mapping[str, torch.Tensor]]
"""``accuracy(model, batch) -> {name: [batch] bool tensor}``: which samples each objective got right."""


class EpochAccumulator:
    """Sums of one epoch's step outcomes, kept on the device until ``summary``.

    Args:
        count: number of objectives n.
        device: where the sums live.
    """

    def __init__(self, count: int, device: torch.device) -> None:
        self._loss_sum = torch.zeros(count, dtype=torch.float64, device=device)
        self._conflict_ratio_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._conflicts_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._cosine_min = torch.full((), math.inf, dtype=torch.float64, device=device)
        self._stats_steps = 0
        self._aggregation_ms = 0.0
        self.applied_steps = 0
        self.skipped_steps = 0
        self.samples = 0

    def add(self, outcome: StepOutcome) -> None:
        """Add one step; skipped steps count only in ``skipped_steps``."""
        if not outcome.applied:
            self.skipped_steps += 1
            return
        self.applied_steps += 1
        self.samples += outcome.batch_size
        self._loss_sum += outcome.losses.to(torch.float64)
        self._aggregation_ms += outcome.aggregation_ms
        if outcome.stats is not None:
            self._add_stats(outcome.stats)

    def _add_stats(self, stats: AggregationStats) -> None:
        self._stats_steps += 1
        self._conflict_ratio_sum += stats.conflict_ratio.to(torch.float64)
        self._conflicts_sum += stats.conflicts.to(torch.float64)
        cosine = stats.cosine.to(torch.float64)
        if cosine.numel() > 1:
            off_diagonal = cosine[~torch.eye(cosine.shape[0], dtype=torch.bool, device=cosine.device)]
            self._cosine_min = torch.minimum(self._cosine_min, off_diagonal.min())

    def combine_ranks(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor], world_size: int) -> None:
        """Turn this rank's sums into sums over all ranks, in one collective.

        Each rank's losses are means over its shard of the global batch, so the global
        mean is the average of the ranks' means. Samples add up. Applied and skipped
        steps are already equal on every rank because skip decisions are agreed.
        """
        packed = torch.cat(
            [self._loss_sum, torch.tensor([float(self.samples)], dtype=torch.float64, device=self._loss_sum.device)]
        )
        reduced = all_reduce_sum(packed)
        self._loss_sum = reduced[:-1] / world_size
        self.samples = int(reduced[-1].item())

    def train_loss(self, names: tuple[str, ...]) -> dict[str, float]:
        """Mean loss per objective over applied steps (NaN when none was applied)."""
        steps = max(self.applied_steps, 1)
        values = (self._loss_sum / steps).tolist() if self.applied_steps else [math.nan] * len(names)
        return dict(zip(names, values, strict=True))

    def aggregation(self) -> dict[str, float]:
        """Epoch means of the aggregation statistics, read from the device in one transfer."""
        steps = max(self._stats_steps, 1)
        ratio, conflicts, cosine_min = torch.stack(
            [self._conflict_ratio_sum / steps, self._conflicts_sum / steps, self._cosine_min]
        ).tolist()
        return {
            "conflict_ratio": ratio if self._stats_steps else math.nan,
            "conflicts": conflicts if self._stats_steps else math.nan,
            "cosine_min": cosine_min if math.isfinite(cosine_min) else math.nan,
            "latency_ms": self._aggregation_ms / max(self.applied_steps, 1),
        }


@torch.no_grad()
def evaluate(
    runner: StepRunner, data: Iterable[Any], accuracy: Accuracy | None
) -> tuple[dict[str, float], dict[str, float]]:
    """Compute mean validation loss and accuracy per objective.

    The model is put in eval mode for the pass and its previous mode is restored.
    Losses are averaged over batches weighted by batch size.

    Returns:
        ``(val_loss, val_accuracy)``; ``val_accuracy`` is empty when ``accuracy`` is None.
    """
    model = runner.model
    was_training = model.training
    model.eval()
    loss_sum: torch.Tensor | None = None
    correct: dict[str, torch.Tensor] = {}
    seen = 0
    try:
        for batch in data:
            device_batch = move_to_device(batch, runner.device)
            losses = runner.forward(device_batch)
            size = batch_size_of(device_batch) or 1
            weighted = losses.to(torch.float64) * size
            loss_sum = weighted if loss_sum is None else loss_sum + weighted
            seen += size
            if accuracy is not None:
                for name, hits in accuracy(model, device_batch).items():
                    correct[name] = correct.get(name, torch.zeros((), device=hits.device)) + hits.sum()
    finally:
        model.train(was_training)
    names = runner.objective_names or ()
    if loss_sum is None or seen == 0:
        return {}, {}
    val_loss = dict(zip(names, (loss_sum / seen).tolist(), strict=True))
    val_accuracy: dict[str, float] = {}
    if correct:
        totals = torch.stack([total.to(torch.float64) for total in correct.values()]).tolist()
        val_accuracy = {name: total / seen for name, total in zip(correct, totals, strict=True)}
    return val_loss, val_accuracy


def progress(iterable: Iterable[Any], *, enabled: bool, epoch: int, total: int | None) -> Iterable[Any]:
    """Wrap ``iterable`` in a tqdm progress bar on standard error when ``enabled``."""
    if not enabled:
        return iterable
    bar: Iterable[Any] = tqdm(
        iterable, total=total, desc=f"epoch {epoch}", leave=False, unit="batch", dynamic_ncols=True
    )
    return bar
