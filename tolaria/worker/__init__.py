"""One long-lived worker with real deadlines, shared by the whole shell.

``AsyncWorker`` runs coroutines, synchronous callables and process-isolated callables
with absolute deadlines; ``TaskHandle`` is the caller's side of one task; cooperative
work receives a ``CancelToken``.
"""

from tolaria.worker._errors import ProcessDied, TaskCancelled, TaskTimeout, WorkerClosed, WorkerSaturated
from tolaria.worker._handle import CancelToken, Outcome, TaskHandle
from tolaria.worker._stats import LATENESS_WINDOW, WorkerStats
from tolaria.worker._worker import AsyncWorker

__all__ = [
    "LATENESS_WINDOW",
    "AsyncWorker",
    "CancelToken",
    "Outcome",
    "ProcessDied",
    "TaskCancelled",
    "TaskHandle",
    "TaskTimeout",
    "WorkerClosed",
    "WorkerSaturated",
    "WorkerStats",
]
