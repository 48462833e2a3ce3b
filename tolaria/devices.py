"""Device selection and seeding for the shell."""

from __future__ import annotations

import logging
import random

import torch

__all__ = ["resolve_device", "seed_everything"]

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """Turn a device setting into a ``torch.device``.

    ``"auto"`` picks ``cuda`` when a CUDA device is available, else ``cpu``.

    Raises:
        ValueError: a CUDA device was requested but CUDA is not available, or the
            index is out of range.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA devices exist"
            )
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy (when installed) and torch on every device."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:
        logger.debug("numpy is not installed; its RNG is not seeded")
    else:
        numpy.random.seed(seed % 2**32)
