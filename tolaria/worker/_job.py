"""The worker's private record of one task: the work, its handle and how it is running."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from tolaria.worker._handle import TaskHandle

__all__ = ["CancelState", "Job"]


class CancelState:
    """State of work that was still running when its outcome was decided."""

    STILL_CANCELLING = "still_cancelling"
    ABANDONED = "abandoned"
    KILLED = "killed"
    DEQUEUED = "dequeued"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Job:
    """One task as the worker tracks it, from ``submit`` until the work really ends.

    ``handle`` may be decided (timed out, cancelled) long before ``work_ended`` becomes
    true: the slot of the job is released only then.
    """

    handle: TaskHandle[Any]
    kind: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    payload: bytes | None = None
    cooperative: bool = False
    timer: asyncio.TimerHandle | None = None
    task: asyncio.Task[None] | None = None
    thread: threading.Thread | None = None
    child: Any = None
    cancel_state: str | None = None
    work_ended: bool = False

    @property
    def lingering(self) -> bool:
        """Whether the outcome is decided but the work has not ended yet."""
        return self.cancel_state in (CancelState.STILL_CANCELLING, CancelState.ABANDONED) and not self.work_ended
