"""The worker's engine: slots and queues per kind of work, outcomes, and cancellation.

``Scheduler`` owns the event loop and its daemon thread, the thread pool and the process
pool. Methods that touch asyncio objects run on the loop thread; ``post`` gets them
there from any other thread. Counters, queues and job records are guarded by one lock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import inspect
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from tolaria.telemetry import Level, Telemetry
from tolaria.worker._errors import ProcessDied, TaskCancelled, WorkerClosed, WorkerSaturated
from tolaria.worker._handle import Outcome, TaskHandle
from tolaria.worker._job import CancelState, Job
from tolaria.worker._process import ProcessPool, unpack_reply
from tolaria.worker._reports import report_abandoned, report_cancelled, report_late_failure
from tolaria.worker._stats import Counters, WorkerStats
from tolaria.worker._threads import ThreadPool

__all__ = ["Scheduler"]


@dataclasses.dataclass
class _Lane:
    """The slots and the queue of one kind of work."""

    kind: str
    capacity: int
    queue: deque[Job] = dataclasses.field(default_factory=deque)
    active: int = 0


class Scheduler:
    """Runs jobs within their slots and decides each task's outcome exactly once."""

    def __init__(
        self,
        name: str,
        *,
        max_concurrency: int,
        max_queue: int,
        processes: int,
        kill_grace_s: float,
        telemetry: Telemetry,
    ) -> None:
        self.name = name
        self.max_queue = max_queue
        self.telemetry = telemetry
        self.lock = threading.Lock()
        self.work_ended_condition = threading.Condition(self.lock)
        self.counters = Counters()
        self.lanes = {
            "coroutine": _Lane("coroutine", max_concurrency),
            "thread": _Lane("thread", max_concurrency),
            "process": _Lane("process", processes),
        }
        self.jobs: dict[TaskHandle[Any], Job] = {}
        self.closed = False
        self._loop_stopped = False

        self.loop = asyncio.new_event_loop()
        self.threads = ThreadPool(name, max_concurrency)
        self.processes = ProcessPool(name, processes, kill_grace_s, self.loop, self)
        self.loop_thread = threading.Thread(target=self._run_loop, name=f"{name}-loop", daemon=True)
        self.loop_thread.start()

    # Event loop and cross-thread posting.

    def post(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop thread, or here once the loop has stopped."""
        with self.lock:
            stopped = self._loop_stopped
            if not stopped:
                self.loop.call_soon_threadsafe(callback, *args)
        if stopped:
            callback(*args)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            with self.lock:
                self._loop_stopped = True
            # Callbacks posted just before the flag was set still run, so no bookkeeping is lost.
            self.loop.call_soon(self.loop.stop)
            self.loop.run_forever()
            self.loop.close()

    # Admission.

    def check_open(self) -> None:
        """Raise ``WorkerClosed`` after shutdown."""
        if self.closed:
            raise WorkerClosed(f"worker {self.name!r} is shut down; create a new AsyncWorker")

    def admit(self, job: Job) -> None:
        """Queue ``job`` and arm its deadline.

        Raises:
            WorkerClosed: after shutdown.
            WorkerSaturated: all slots of the job's kind are busy and its queue is full.
        """
        with self.lock:
            self.check_open()
            lane = self.lanes[job.kind]
            free_slots = max(0, lane.capacity - lane.active)
            if len(lane.queue) >= self.max_queue + free_slots:
                self.counters.rejected += 1
                lingering = sum(1 for other in self.jobs.values() if other.kind == job.kind and other.lingering)
                # Tasks about to take the free slots are not waiting, so they are not reported as queued.
                waiting = len(lane.queue) - free_slots
                raise WorkerSaturated(self.name, job.kind, lane.capacity, waiting, lingering)
            lane.queue.append(job)
            self.jobs[job.handle] = job
            self.counters.submitted += 1
        self.post(self._on_admitted, job)

    def _on_admitted(self, job: Job) -> None:
        deadline = job.handle.deadline
        if job.handle.outcome is None and math.isfinite(deadline):
            job.timer = self.loop.call_later(max(0.0, deadline - time.monotonic()), self._on_deadline, job)
        if job.kind == "process":
            self.processes.ensure_started()
        self.pump(job.kind)

    # Starting work.

    def pump(self, kind: str) -> None:
        """Start queued tasks of ``kind`` while slots are free."""
        lane = self.lanes[kind]
        while (job := self._next_job(lane)) is not None:
            if job.handle._try_start():
                self._start(job)
            else:
                # Decided while queued, between the check above and now: give the slot back.
                with self.lock:
                    lane.active -= 1
                    self.jobs.pop(job.handle, None)

    def _next_job(self, lane: _Lane) -> Job | None:
        with self.lock:
            if self.closed or not lane.queue or lane.active >= lane.capacity:
                return None
            if lane.kind == "process" and self.processes.idle_count() == 0:
                return None
            lane.active += 1
            return lane.queue.popleft()

    def _start(self, job: Job) -> None:
        if job.kind == "coroutine":
            job.task = self.loop.create_task(self._drive(job), name=job.handle.name)
        elif job.kind == "thread":
            self.threads.run(functools.partial(self._run_in_thread, job))
        else:
            self.processes.dispatch(job)

    async def _drive(self, job: Job) -> None:
        try:
            value = await job.fn(*job.args, **job.kwargs)
        except asyncio.CancelledError:
            error = TaskCancelled(f"task {job.handle.name!r} was cancelled")
            self.finish(job, Outcome.CANCELLED, error=error, cause="cancel")
        except GeneratorExit:
            # The coroutine is being closed (a pending task collected after shutdown): let it close.
            raise
        except BaseException as error:  # noqa: BLE001 - re-raised to the caller by result()
            self.finish(job, Outcome.FAILED, error=error)
        else:
            self.finish(job, Outcome.COMPLETED, value=value)
        finally:
            self.work_ended(job)
            # A failure's traceback keeps this frame; dropping the job avoids a reference cycle.
            del job

    def _run_in_thread(self, job: Job) -> None:
        job.thread = threading.current_thread()
        try:
            # A task decided between its start and this thread picking it up is skipped.
            if job.handle.outcome is None:
                value = job.fn(*job.args, **job.kwargs)
                if inspect.iscoroutine(value):
                    value.close()
                    raise TypeError(f"task {job.handle.name!r} returned a coroutine; submit the async function itself")
                self.finish(job, Outcome.COMPLETED, value=value)
        except BaseException as error:  # noqa: BLE001 - re-raised to the caller by result()
            self.finish(job, Outcome.FAILED, error=error)
        finally:
            self.post(self.work_ended, job)
            # A failure's traceback keeps this frame; dropping the job avoids a reference cycle.
            del job

    # Outcomes.

    def finish(
        self,
        job: Job,
        outcome: Outcome,
        *,
        value: Any = None,
        error: BaseException | None = None,
        cause: str = "deadline",
    ) -> bool:
        """Decide the task's outcome unless another outcome won; return whether this one won.

        ``cause`` (``"deadline"``, ``"cancel"``, ``"shutdown"``) becomes the token's reason.
        """
        handle = job.handle
        if outcome in (Outcome.COMPLETED, Outcome.FAILED) and time.monotonic() > handle.deadline:
            # The work ended after its deadline, but a pause that stopped every thread (a long
            # garbage collection) kept the timer and the caller from acting first: the deadline wins.
            self.finish(job, Outcome.TIMED_OUT)
            if error is not None:
                self._report_late_failure(job, error)
            return False
        if not handle._resolve(outcome, value, error, cause):
            if outcome is Outcome.FAILED and error is not None:
                self._report_late_failure(job, error)
            return False

        with self.lock:
            self.counters.count(outcome.value, handle.lateness_s)
            if not handle.started:
                self._dequeue(job)
        return True

    def _dequeue(self, job: Job) -> None:
        """Drop a job decided before it started; the caller holds the lock."""
        queue = self.lanes[job.kind].queue
        if job in queue:
            queue.remove(job)
            self.jobs.pop(job.handle, None)

    def _report_late_failure(self, job: Job, error: BaseException) -> None:
        if isinstance(error, (asyncio.CancelledError, concurrent.futures.CancelledError)):
            return
        with self.lock:
            self.counters.late_failures += 1
            count = self.counters.late_failures
        report_late_failure(self.telemetry, job, error, count)

    def _job_of(self, handle: TaskHandle[Any]) -> Job | None:
        with self.lock:
            return self.jobs.get(handle)

    def _expire(self, handle: TaskHandle[Any]) -> None:
        """Decide ``handle`` as timed out from the caller's thread, then cancel its work on the loop."""
        job = self._job_of(handle)
        if job is None:
            # The work already ended, so the outcome is decided and this changes nothing.
            handle._resolve(Outcome.TIMED_OUT)
        elif self.finish(job, Outcome.TIMED_OUT):
            self.post(self.cancel_work, job, "deadline")

    def _cancel(self, handle: TaskHandle[Any], cause: str) -> bool:
        job = self._job_of(handle)
        if job is None:
            return False
        error = TaskCancelled(f"task {handle.name!r} was cancelled by its caller")
        if not self.finish(job, Outcome.CANCELLED, error=error, cause=cause):
            return False
        self.post(self.cancel_work, job, cause)
        return True

    def _on_deadline(self, job: Job) -> None:
        job.timer = None
        if self.finish(job, Outcome.TIMED_OUT):
            self.cancel_work(job, "deadline")

    # Stopping work whose outcome is decided.

    def cancel_work(self, job: Job, cause: str) -> None:
        """Stop the work of a timed-out or cancelled task; runs on the loop thread."""
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        if job.cancel_state is not None:
            # Already cancelled once; a shutdown cancels a coroutine that swallowed it again.
            if job.task is not None and not job.work_ended:
                job.task.cancel()
            return

        if not job.handle.started:
            state = CancelState.DEQUEUED
        elif job.work_ended:
            state = CancelState.FINISHED
        else:
            state = self._stop_running(job, cause)
        with self.lock:
            job.cancel_state = state
        report_cancelled(self.telemetry, job, cause, state)

    def _stop_running(self, job: Job, cause: str) -> str:
        job.handle.token.cancel(cause)
        if job.kind == "coroutine":
            assert job.task is not None
            job.task.cancel()
            return CancelState.STILL_CANCELLING
        if job.kind == "process":
            self.processes.kill(job.child)
            self.work_ended(job)
            return CancelState.KILLED
        if job.cooperative:
            return CancelState.STILL_CANCELLING

        with self.lock:
            self.counters.abandoned += 1
            count = self.counters.abandoned
        report_abandoned(self.telemetry, job, cause, count)
        return CancelState.ABANDONED

    def work_ended(self, job: Job) -> None:
        """Release the slot of work that really ended; on the loop, or anywhere once it stopped."""
        with self.lock:
            if job.work_ended:
                return
            job.work_ended = True
            self.lanes[job.kind].active -= 1
            self.jobs.pop(job.handle, None)
            self.work_ended_condition.notify_all()
            closed = self.closed

        if threading.current_thread() is self.loop_thread:
            if job.timer is not None:
                job.timer.cancel()
                job.timer = None
            if not closed:
                self.pump(job.kind)

    def stats(self) -> WorkerStats:
        """Return a snapshot of the counters and gauges."""
        with self.lock:
            jobs = list(self.jobs.values())
            lingering = [job.cancel_state for job in jobs if job.lingering]
            return self.counters.snapshot(
                in_flight=sum(1 for job in jobs if job.handle.started and job.handle.outcome is None),
                queue_depth=sum(len(lane.queue) for lane in self.lanes.values()),
                abandoned_running=lingering.count(CancelState.ABANDONED),
                still_cancelling=lingering.count(CancelState.STILL_CANCELLING),
                threads=len(self.threads.threads()),
            )

    # Callbacks of the process pool, on the loop thread.

    def on_process_ready(self) -> None:
        """Start queued process tasks now that a process is idle."""
        self.pump("process")

    def on_process_reply(self, job: Job, reply: bytes) -> None:
        """Decide a process task from its reply."""
        ok, value = unpack_reply(reply, job.handle.name)
        if ok:
            self.finish(job, Outcome.COMPLETED, value=value)
        else:
            self.finish(job, Outcome.FAILED, error=value)
        self.work_ended(job)

    def on_process_lost(self, job: Job, exitcode: int | None) -> None:
        """Fail a process task whose process exited while running it."""
        error = ProcessDied(f"the worker process running task {job.handle.name!r} exited with code {exitcode}")
        self.finish(job, Outcome.FAILED, error=error)
        self.work_ended(job)

    def on_process_restart(self) -> None:
        """Count a worker process that was replaced."""
        with self.lock:
            self.counters.process_restarts += 1
        self.telemetry.count("tolaria.worker.process_restarts")

    def on_spawn_failed(self, error: BaseException) -> None:
        """Fail the queued process tasks: no process could be started for them."""
        with self.lock:
            queued = list(self.lanes["process"].queue)
        for job in queued:
            failure = RuntimeError(f"task {job.handle.name!r}: could not start a worker process: {error}")
            failure.__cause__ = error
            self.finish(job, Outcome.FAILED, error=failure)
        self.telemetry.count("tolaria.worker.spawn_failures")
        self.telemetry.event(
            "tolaria.worker.spawn_failed", Level.ERROR, worker=self.name, error=type(error).__name__, reason=str(error)
        )
