"""The caller's side of a task: ``TaskHandle`` and the ``CancelToken`` given to cooperative work."""

from __future__ import annotations

import enum
import math
import threading
import time
from typing import Any, Generic, Protocol, TypeVar

from tolaria.worker._errors import TaskCancelled, TaskTimeout

__all__ = ["CancelToken", "Outcome", "TaskHandle"]

T = TypeVar("T")


class CancelToken:
    """A flag that cooperative work checks to stop early.

    The worker passes a token to every callable that declares a ``cancel`` parameter and
    sets it at the task's deadline, on ``TaskHandle.cancel()`` and on shutdown. Work
    should check ``cancelled`` (or call ``raise_if_cancelled()``) between steps, or block
    on ``wait()`` instead of ``time.sleep()``.
    """

    def __init__(self, task: str = "") -> None:
        self._task = task
        self._event = threading.Event()
        self._reason: str | None = None

    @property
    def cancelled(self) -> bool:
        """Whether cancellation was requested."""
        return self._event.is_set()

    @property
    def reason(self) -> str | None:
        """Why the task was cancelled (``"deadline"``, ``"cancel"``, ``"shutdown"``), or ``None``."""
        return self._reason

    def cancel(self, reason: str = "cancel") -> None:
        """Request cancellation; later calls keep the first reason."""
        if self._reason is None:
            self._reason = reason
        self._event.set()

    def raise_if_cancelled(self) -> None:
        """Raise ``TaskCancelled`` if cancellation was requested, else return ``None``."""
        if self._event.is_set():
            raise TaskCancelled(f"task {self._task!r} was cancelled ({self._reason})")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until cancellation is requested or ``timeout`` seconds pass; return ``cancelled``."""
        return self._event.wait(timeout)


class Outcome(enum.Enum):
    """Final state of a task, from the caller's point of view."""

    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


class _Owner(Protocol):
    """The worker operations a handle triggers from the caller's thread."""

    def _expire(self, handle: TaskHandle[Any]) -> None: ...

    def _cancel(self, handle: TaskHandle[Any], cause: str) -> bool: ...


class TaskHandle(Generic[T]):
    """The caller's view of one submitted task.

    Exactly one outcome wins: the work's result or exception, the deadline, or a
    cancellation. The caller is released when the outcome is decided, never later
    because the work is still running.

    Attributes:
        name: task name used in errors, logs and telemetry.
        kind: ``"coroutine"``, ``"thread"`` or ``"process"``.
        timeout_s: the timeout given to ``submit`` in seconds, or ``None``.
        deadline: absolute ``time.monotonic()`` value of the deadline (``inf`` without timeout).
        token: the cancellation token of the task.
    """

    def __init__(
        self,
        owner: _Owner,
        *,
        name: str,
        kind: str,
        timeout_s: float | None,
        submitted_at: float,
    ) -> None:
        self._owner = owner
        self.name = name
        self.kind = kind
        self.timeout_s = timeout_s
        self.submitted_at = submitted_at
        self.deadline = math.inf if timeout_s is None else submitted_at + timeout_s
        self.token = CancelToken(name)
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._started = False
        self._outcome: Outcome | None = None
        self._value: Any = None
        self._error: BaseException | None = None
        self._released_at: float | None = None

    def __repr__(self) -> str:
        if self._outcome is not None:
            state = self._outcome.value
        elif self._started:
            state = "running"
        else:
            state = "queued"
        return f"<TaskHandle {self.name!r} {self.kind} {state}>"

    @property
    def started(self) -> bool:
        """Whether the work began running (a task can time out while still queued)."""
        return self._started

    @property
    def outcome(self) -> Outcome | None:
        """How the task ended, or ``None`` while it is undecided."""
        return self._outcome

    @property
    def lateness_s(self) -> float | None:
        """Seconds between the deadline and the moment a timed-out task released its caller."""
        if self._outcome is not Outcome.TIMED_OUT or self._released_at is None:
            return None
        return max(0.0, self._released_at - self.deadline)

    def done(self) -> bool:
        """Return whether the outcome is decided; a passed deadline decides it as a timeout."""
        if not self._event.is_set() and time.monotonic() >= self.deadline:
            self._owner._expire(self)
        return self._event.is_set()

    def cancel(self) -> bool:
        """Cancel the task; return ``True`` if this call decided its outcome.

        Queued work never starts. Running work is cancelled like a timed-out task:
        coroutines get ``CancelledError``, tokens are set, processes are killed and
        threads that ignore their token are abandoned.
        """
        return self._owner._cancel(self, "cancel")

    def result(self, timeout: float | None = None) -> T:
        """Wait for the task and return its value.

        Args:
            timeout: maximum wait in seconds; ``None`` waits until the task's deadline
                (forever when it has none).

        Raises:
            TaskTimeout: the task's deadline passed; the work was cancelled.
            TaskCancelled: the task was cancelled or the worker shut down.
            TimeoutError: ``timeout`` ended before the task's deadline; it keeps running.
            ValueError: ``timeout`` is negative or not finite.
            BaseException: whatever the work raised.
        """
        wait_until = self.deadline
        if timeout is not None:
            if not math.isfinite(timeout) or timeout < 0:
                raise ValueError(f"timeout must be None or a finite number >= 0, got {timeout!r}")
            wait_until = min(wait_until, time.monotonic() + timeout)

        self._wait_until(wait_until)

        if not self._event.is_set():
            if time.monotonic() < self.deadline:
                raise TimeoutError(
                    f"task {self.name!r} is still running after waiting {timeout} s; "
                    f"its own deadline is {self.deadline - time.monotonic():.3f} s away"
                )
            self._owner._expire(self)

        if self._outcome is Outcome.COMPLETED:
            return self._value  # type: ignore[no-any-return]
        error = self._error
        assert error is not None
        try:
            raise error
        finally:
            # The traceback keeps this frame; without its locals it cannot lead back to the
            # handle, so no handle -> error -> frame -> handle cycle waits for the collector.
            del self, error

    def _wait_until(self, wait_until: float) -> None:
        if math.isinf(wait_until):
            self._event.wait()
            return
        while not self._event.is_set():
            remaining = wait_until - time.monotonic()
            if remaining <= 0:
                return
            self._event.wait(remaining)

    def _try_start(self) -> bool:
        """Mark the task running unless its outcome is already decided."""
        with self._lock:
            if self._outcome is not None:
                return False
            self._started = True
            return True

    def _resolve(
        self, outcome: Outcome, value: Any = None, error: BaseException | None = None, cause: str = "deadline"
    ) -> bool:
        """Decide the outcome and release waiters; return ``False`` if another outcome won.

        A timeout or cancellation also sets the token at once, with ``cause`` as its
        reason, so cooperative work stops without waiting for the event loop.
        """
        now = time.monotonic()
        with self._lock:
            if self._outcome is not None:
                return False
            if outcome is Outcome.TIMED_OUT:
                assert self.timeout_s is not None
                error = TaskTimeout(self.name, self.timeout_s, now - self.submitted_at)
            self._outcome = outcome
            self._value = value
            self._error = error
            self._released_at = now
        if outcome in (Outcome.TIMED_OUT, Outcome.CANCELLED):
            self.token.cancel(cause)
        self._event.set()
        return True
