"""Mixed precision: autocast contexts and the gradient scaler for fp16."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

__all__ = ["MixedPrecision"]

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """Autocast and loss scaling for one of the ``TrainerConfig.amp`` modes.

    ``"fp16"`` needs CUDA: on other devices fp16 gradients underflow without a
    scaler that torch supports there, so it is rejected. ``"bf16"`` needs no scaler
    because bfloat16 has float32's exponent range.

    Raises:
        ValueError: ``mode`` is unknown, or ``"fp16"`` on a non-CUDA device.
    """

    def __init__(self, mode: str, device: torch.device) -> None:
        if mode not in ("off", *_DTYPES):
            raise ValueError(f"amp mode {mode!r} is not one of 'off', 'bf16', 'fp16'")
        if mode == "fp16" and device.type != "cuda":
            raise ValueError(f"amp 'fp16' needs a CUDA device, got {device}; use amp 'bf16' or 'off' on {device.type}")
        self.mode = mode
        self.device = device
        self.scaler: torch.amp.GradScaler | None = None
        if mode == "fp16":
            self.scaler = torch.amp.GradScaler(device.type)

    @property
    def enabled(self) -> bool:
        """Whether autocast is on."""
        return self.mode != "off"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Run the enclosed forward pass under autocast when enabled."""
        if not self.enabled:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.mode]):
            yield
