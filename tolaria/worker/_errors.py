"""Exceptions raised by the worker to the code that submits work and waits for it."""

from __future__ import annotations

import concurrent.futures

__all__ = ["ProcessDied", "TaskCancelled", "TaskTimeout", "WorkerClosed", "WorkerSaturated"]


class TaskTimeout(TimeoutError):
    """The task's deadline passed before it finished; the worker cancelled or abandoned it.

    Attributes:
        task: name of the task.
        timeout_s: the timeout given to ``submit``, in seconds.
        elapsed_s: seconds from ``submit`` until the caller was released.
    """

    def __init__(self, task: str, timeout_s: float, elapsed_s: float) -> None:
        super().__init__(
            f"task {task!r} timed out: no result within {timeout_s:.3f} s "
            f"(released after {elapsed_s:.3f} s); the worker cancelled it"
        )
        self.task = task
        self.timeout_s = timeout_s
        self.elapsed_s = elapsed_s

    def __reduce__(self) -> tuple[type[TaskTimeout], tuple[str, float, float]]:
        return (type(self), (self.task, self.timeout_s, self.elapsed_s))


class TaskCancelled(concurrent.futures.CancelledError):
    """The task was cancelled by ``TaskHandle.cancel()`` or by ``AsyncWorker.shutdown()``.

    ``CancelToken.raise_if_cancelled()`` raises it too, so cooperative work can stop
    with the same exception that its caller gets.
    """


class WorkerSaturated(RuntimeError):
    """Every slot of a kind of work is busy and its queue is full, so the task was not accepted.

    Attributes:
        kind: ``"thread"``, ``"coroutine"`` or ``"process"``.
        capacity: concurrent tasks allowed for that kind.
        queued: tasks already waiting for a slot.
        abandoned: slots held by timed-out or cancelled tasks whose work has not returned.
    """

    def __init__(self, worker: str, kind: str, capacity: int, queued: int, abandoned: int) -> None:
        super().__init__(
            f"worker {worker!r} is saturated: all {capacity} {kind} slots are busy "
            f"({abandoned} held by timed-out or cancelled tasks that have not returned) and {queued} tasks "
            f"are already queued; retry later, raise max_concurrency or max_queue, "
            f"or make the work accept a 'cancel' token so timed-out tasks free their slot"
        )
        self.kind = kind
        self.capacity = capacity
        self.queued = queued
        self.abandoned = abandoned


class WorkerClosed(RuntimeError):
    """Work was submitted to a worker after ``shutdown()``."""


class ProcessDied(RuntimeError):
    """The worker process running the task exited before returning a result."""
