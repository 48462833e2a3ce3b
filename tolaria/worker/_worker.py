"""``AsyncWorker``: one event loop on one daemon thread, shared by the whole shell for background work.

Three kinds of work run on it. Coroutine functions run on the loop. Synchronous callables
run on a bounded pool of daemon threads. With ``isolation="process"``, a callable runs in
a pre-started spawn process. Every task has an absolute ``time.monotonic()`` deadline. At
the deadline the caller gets ``TaskTimeout`` whatever the work does, because a waiting
caller enforces the deadline itself while the loop's timer cancels the work:

- a coroutine is cancelled, and the caller does not wait for its ``finally`` blocks;
- a callable that declares a ``cancel`` parameter gets a ``CancelToken``, which is set;
- a callable that ignores cancellation is abandoned: its thread keeps its slot until it
  really ends, and nothing joins it;
- a worker process is terminated, killed after a grace period, and replaced.

NOTE: a coroutine that blocks (``time.sleep`` instead of ``await asyncio.sleep``) stalls
the loop: waiting callers are still released at their deadlines, but no other work starts
or is cancelled until it yields.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tolaria.telemetry import Telemetry
from tolaria.worker._errors import TaskCancelled
from tolaria.worker._handle import Outcome, TaskHandle
from tolaria.worker._job import CancelState, Job
from tolaria.worker._process import pack_call
from tolaria.worker._scheduler import Scheduler
from tolaria.worker._stats import WorkerStats
from tolaria.worker._validation import accepts_cancel, check_count, check_seconds, kind_of

__all__ = ["AsyncWorker"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class AsyncWorker:
    """A long-lived worker with real deadlines, shared by every shell component.

    Args:
        max_concurrency: concurrent coroutines, and concurrent threads, at most. A thread
            abandoned after its deadline keeps its slot until it really ends.
        max_queue: tasks of each kind that may wait for a slot; more raise ``WorkerSaturated``.
        name: prefix of the worker's thread and process names, used in logs and errors.
        processes: concurrent ``isolation="process"`` tasks; one spare process is kept too.
        kill_grace_s: seconds between terminating a timed-out process and killing it.
        start_processes: spawn the worker processes now, in the background; otherwise the
            first ``isolation="process"`` task (or ``warm_up``) spawns them.
        telemetry: receives ``tolaria.timeout.cancelled`` events and the worker's counters;
            a telemetry object without sinks is created when ``None``.

    Raises:
        ValueError: a count or duration is out of range.
    """

    def __init__(
        self,
        max_concurrency: int = 8,
        max_queue: int = 64,
        name: str = "tolaria-worker",
        *,
        processes: int = 1,
        kill_grace_s: float = 0.2,
        start_processes: bool = False,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.name = name
        self.max_concurrency = check_count("max_concurrency", max_concurrency, 1)
        self.max_queue = check_count("max_queue", max_queue, 0)
        self._scheduler = Scheduler(
            name,
            max_concurrency=max_concurrency,
            max_queue=max_queue,
            processes=check_count("processes", processes, 1),
            kill_grace_s=check_seconds("kill_grace_s", kill_grace_s),
            telemetry=telemetry if telemetry is not None else Telemetry(),
        )
        self._shutdown_clean: bool | None = None
        if start_processes:
            self._scheduler.post(self._scheduler.processes.ensure_started)
        logger.info("worker %r started (max_concurrency=%d, max_queue=%d)", name, max_concurrency, max_queue)

    def __enter__(self) -> AsyncWorker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"<AsyncWorker {self.name!r} {'closed' if self.closed else 'open'}>"

    @property
    def telemetry(self) -> Telemetry:
        """The telemetry object the worker reports to."""
        return self._scheduler.telemetry

    @property
    def closed(self) -> bool:
        """Whether ``shutdown()`` was called."""
        return self._scheduler.closed

    def submit(
        self,
        fn: Callable[..., T],
        /,
        *args: Any,
        timeout: float | None = None,
        name: str | None = None,
        isolation: str = "thread",
        **kwargs: Any,
    ) -> TaskHandle[T]:
        """Queue ``fn(*args, **kwargs)`` and return its handle at once.

        Args:
            fn: a coroutine function, or a callable. A callable that declares a ``cancel``
                parameter gets the task's ``CancelToken`` (not in process isolation).
            timeout: seconds from now until the deadline, or ``None`` for no deadline.
            name: task name for errors, logs and telemetry (default: ``fn.__qualname__``).
            isolation: ``"thread"``, or ``"process"`` to run ``fn`` in a worker process.

        Raises:
            WorkerClosed: the worker was shut down.
            WorkerSaturated: every slot of this kind of work is busy and its queue is full.
            TypeError: ``fn`` is not callable, is a coroutine object, or (process isolation)
                cannot be pickled with its arguments.
            ValueError: bad ``timeout`` or ``isolation``, or ``cancel`` passed in ``kwargs``.
        """
        kind = kind_of(fn, isolation)
        timeout_s = None if timeout is None else check_seconds("timeout", timeout)
        task = name if name is not None else getattr(fn, "__qualname__", repr(fn))
        handle: TaskHandle[T] = TaskHandle(
            self._scheduler, name=task, kind=kind, timeout_s=timeout_s, submitted_at=time.monotonic()
        )
        job = Job(handle, kind, fn, args, dict(kwargs))

        if kind == "process":
            job.payload = pack_call(fn, args, kwargs, task)
        elif accepts_cancel(fn):
            if "cancel" in kwargs:
                raise ValueError(f"task {task!r}: do not pass 'cancel'; the worker passes the task's CancelToken")
            job.kwargs["cancel"] = handle.token
            job.cooperative = True

        self._scheduler.admit(job)
        return handle

    def stats(self) -> WorkerStats:
        """Return a snapshot of the counters, gauges and deadline lateness."""
        return self._scheduler.stats()

    def process_ids(self) -> list[int]:
        """Return the process ids of the live worker processes."""
        return [process.pid for process in self._scheduler.processes.processes() if process.pid is not None]

    def warm_up(self, timeout: float = 30.0) -> None:
        """Start the worker processes now and wait until each has finished importing.

        Raises:
            TimeoutError: the processes were not ready within ``timeout`` seconds.
            WorkerClosed: the worker was shut down.
        """
        deadline = time.monotonic() + check_seconds("timeout", timeout)
        scheduler = self._scheduler
        scheduler.check_open()
        scheduler.post(scheduler.processes.ensure_started)
        while scheduler.processes.ready_count() < scheduler.processes.target:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"worker {self.name!r}: {scheduler.processes.ready_count()} of {scheduler.processes.target} "
                    f"processes ready after {timeout} s; raise the timeout on a slow or busy machine"
                )
            time.sleep(0.005)

    def shutdown(self, timeout: float = 2.0) -> bool:
        """Cancel all work, stop the loop and the processes; return whether all stopped in time.

        Idempotent and bounded by ``timeout`` seconds. Queued and running tasks are
        cancelled and their callers released at once. Coroutines and cooperative threads
        get until the timeout to finish, and worker processes are killed. Threads abandoned
        because they ignored cancellation are never joined; they are daemons, so they do
        not keep the process alive. A second call returns at once.

        Raises:
            RuntimeError: called from a coroutine running on this worker's loop.
            ValueError: ``timeout`` is not a finite number of seconds > 0.
        """
        budget = check_seconds("timeout", timeout)
        scheduler = self._scheduler
        if threading.current_thread() is scheduler.loop_thread:
            raise RuntimeError(f"worker {self.name!r}: shutdown() cannot run on the worker's own event loop")
        deadline = time.monotonic() + budget
        with scheduler.lock:
            if scheduler.closed:
                return bool(self._shutdown_clean)
            scheduler.closed = True
            jobs = list(scheduler.jobs.values())

        for job in jobs:
            error = TaskCancelled(f"task {job.handle.name!r} was cancelled because worker {self.name!r} shut down")
            scheduler.finish(job, Outcome.CANCELLED, error=error, cause="shutdown")
        self._cancel_on_loop(jobs, deadline)
        # Leave a tenth of the budget for stopping the loop and killing processes.
        work_stopped = self._wait_for_cooperative_work(deadline - budget / 10)

        loop_stopped = self._stop_loop(deadline)
        threads_stopped = self._stop_threads(deadline)
        processes_stopped = scheduler.processes.close(deadline)
        self._shutdown_clean = work_stopped and loop_stopped and threads_stopped and processes_stopped
        self._log_shutdown()
        return self._shutdown_clean

    def _cancel_on_loop(self, jobs: list[Job], deadline: float) -> None:
        scheduler = self._scheduler
        cancelled = threading.Event()

        def cancel_all() -> None:
            for job in jobs:
                if not job.work_ended:
                    scheduler.cancel_work(job, "shutdown")
            cancelled.set()

        scheduler.post(cancel_all)
        cancelled.wait(max(0.0, deadline - time.monotonic()))

    def _wait_for_cooperative_work(self, deadline: float) -> bool:
        scheduler = self._scheduler

        def cooperative_work_ended() -> bool:
            return not any(
                job.handle.started and not job.work_ended and job.cancel_state != CancelState.ABANDONED
                for job in scheduler.jobs.values()
            )

        with scheduler.work_ended_condition:
            return scheduler.work_ended_condition.wait_for(
                cooperative_work_ended, max(0.0, deadline - time.monotonic())
            )

    def _stop_loop(self, deadline: float) -> bool:
        scheduler = self._scheduler
        scheduler.post(scheduler.loop.stop)
        scheduler.loop_thread.join(max(0.0, deadline - time.monotonic()))
        if scheduler.loop_thread.is_alive():
            logger.error("worker %r: the event loop did not stop in time; a coroutine is blocking it", self.name)
            return False
        return True

    def _stop_threads(self, deadline: float) -> bool:
        scheduler = self._scheduler
        scheduler.threads.close()
        with scheduler.lock:
            abandoned = {job.thread for job in scheduler.jobs.values() if job.cancel_state == CancelState.ABANDONED}
        joinable = [
            thread
            for thread in scheduler.threads.threads()
            if thread not in abandoned and thread is not threading.current_thread()
        ]
        for thread in joinable:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [thread.name for thread in joinable if thread.is_alive()]
        if alive:
            logger.error("worker %r: threads %s did not stop within the shutdown timeout", self.name, alive)
        return not alive

    def _log_shutdown(self) -> None:
        stats = self.stats()
        if stats.abandoned_running or stats.still_cancelling:
            logger.warning(
                "worker %r shut down leaving %d abandoned threads and %d tasks still cancelling",
                self.name,
                stats.abandoned_running,
                stats.still_cancelling,
            )
        else:
            logger.info("worker %r shut down (clean=%s)", self.name, self._shutdown_clean)
