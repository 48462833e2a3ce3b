"""Limits of the telemetry pipeline: buffer and queue sizes, time-outs and retry back-off."""

from __future__ import annotations

import dataclasses

__all__ = ["DeliveryPolicy"]


@dataclasses.dataclass(frozen=True)
class DeliveryPolicy:
    """Limits of the telemetry pipeline.

    Attributes:
        max_pending: DEBUG and INFO events (and, separately, metrics) buffered for the next
            packet; more are dropped and counted. WARNING events beyond it leave at once
            in a packet of their own.
        max_queue: packets waiting per sink before the drop and back-pressure rules apply.
        backpressure_timeout_s: maximum wait, in seconds, for room in a full queue, and
            then again for a busy sink, before a WARNING+ packet is queued beyond the bound.
        close_timeout_s: default time budget of ``Telemetry.close`` in seconds.
        retry_initial_s: first wait, in seconds, before a failed write is retried.
        retry_max_s: maximum wait between retries, in seconds.

    Raises:
        ValueError: a count is below 1, or a duration is not finite and positive, or
            ``retry_max_s`` is below ``retry_initial_s``.
    """

    max_pending: int = 10_000
    max_queue: int = 256
    backpressure_timeout_s: float = 0.5
    close_timeout_s: float = 5.0
    retry_initial_s: float = 0.05
    retry_max_s: float = 5.0

    def __post_init__(self) -> None:
        for field in ("max_pending", "max_queue"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DeliveryPolicy.{field} must be an integer >= 1, got {value!r}")
        for field in ("backpressure_timeout_s", "close_timeout_s", "retry_initial_s", "retry_max_s"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"DeliveryPolicy.{field} must be a finite number of seconds > 0, got {value!r}")
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError(
                f"DeliveryPolicy.retry_max_s ({self.retry_max_s!r}) must be >= retry_initial_s "
                f"({self.retry_initial_s!r})"
            )
