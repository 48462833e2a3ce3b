"""The main job: a multi-task network on scikit-learn's bundled handwritten digits.

The data set (1,797 grayscale 8×8 images, labels 0–9) ships inside scikit-learn, so
nothing is downloaded. One shared MLP trunk feeds three heads, one per objective:

* ``digit``: which digit (10 classes);
* ``parity``: odd or even (2 classes);
* ``high``: digit >= 5 (2 classes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional

from tolaria.data import EpochBatches

__all__ = ["OBJECTIVES", "DigitsData", "DigitsNet", "digits_accuracy", "digits_objectives", "load_digits"]

OBJECTIVES = ("digit", "parity", "high")


@dataclasses.dataclass(frozen=True)
class DigitsData:
    """Standardised digits split into training and validation sets.

    Attributes:
        train_x: ``[N_train, 64]`` float32 pixel features, standardised with the
            training set's per-pixel mean and standard deviation.
        train_y: ``[N_train]`` int64 digit labels.
        val_x: ``[N_val, 64]`` float32, standardised with the training statistics.
        val_y: ``[N_val]`` int64.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


def load_digits(*, seed: int, val_fraction: float = 0.2) -> DigitsData:
    """Load the bundled digits and split them with a permutation drawn from ``seed``.

    Raises:
        ImportError: scikit-learn is not installed (``pip install 'tolaria[demo]'``).
        ValueError: ``val_fraction`` is not in (0, 1).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:
        raise ImportError("the digits demo needs scikit-learn; install it with: pip install 'tolaria[demo]'") from error
    bunch = sklearn_load_digits()
    # Pixels are intensities 0-16; dividing first keeps every feature in a small range.
    features = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))
    val_count = round(features.shape[0] * val_fraction)
    val_index, train_index = order[:val_count], order[val_count:]
    mean = features[train_index].mean(dim=0)
    # Some border pixels are (nearly) constant in the training set. They are only centred,
    # not scaled, so a validation image with ink there stays within [-1, 1] there.
    std = features[train_index].std(dim=0)
    std = torch.where(std < 0.05, torch.ones_like(std), std)
    standardised = (features - mean) / std
    return DigitsData(standardised[train_index], labels[train_index], standardised[val_index], labels[val_index])


class DigitsNet(nn.Module):
    """A shared MLP trunk with one linear head per objective.

    Input ``[B, 64]`` float32; output a dict of logits ``digit: [B, 10]``,
    ``parity: [B, 2]``, ``high: [B, 2]``.
    """

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleDict(
            {"digit": nn.Linear(hidden, 10), "parity": nn.Linear(hidden, 2), "high": nn.Linear(hidden, 2)}
        )

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the logits of every head."""
        shared = self.trunk(features)
        return {name: head(shared) for name, head in self.heads.items()}


def _targets(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"digit": labels, "parity": labels % 2, "high": (labels >= 5).long()}


def digits_objectives(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Cross-entropy loss of each head on a ``(features, labels)`` batch."""
    features, labels = batch
    logits = model(features)
    targets = _targets(labels)
    return {name: functional.cross_entropy(logits[name].float(), targets[name]) for name in OBJECTIVES}


def digits_accuracy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Per-sample correctness ``[B]`` bool of each head on a ``(features, labels)`` batch."""
    features, labels = batch
    logits = model(features)
    targets = _targets(labels)
    return {name: logits[name].argmax(dim=1) == targets[name] for name in OBJECTIVES}


def digits_batches(
    data: DigitsData, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> tuple[EpochBatches, EpochBatches]:
    """Return shuffled training batches (this rank's shard of each) and fixed-order validation batches."""
    train = EpochBatches(
        data.train_x, data.train_y, batch_size=batch_size, shuffle=True, seed=seed, rank=rank, world_size=world_size
    )
    val = EpochBatches(data.val_x, data.val_y, batch_size=512, shuffle=False)
    return train, val
