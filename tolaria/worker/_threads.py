"""Daemon threads that run the worker's synchronous tasks.

Unlike ``concurrent.futures.ThreadPoolExecutor``, these threads are daemons that the
interpreter does not join at exit, so a task that ignores cancellation can never keep
the process alive, and closing the pool never waits for such a task.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable

__all__ = ["ThreadPool"]

Job = Callable[[], None]


class ThreadPool:
    """At most ``capacity`` reusable daemon threads.

    The caller guarantees that fewer than ``capacity`` jobs run at once (the worker holds
    a slot per job until the job returns), so a new thread is started only when no idle
    thread is free and the thread count never exceeds ``capacity``. A thread idle for
    ``idle_timeout_s`` seconds exits. Jobs must not raise.
    """

    def __init__(self, name: str, capacity: int, idle_timeout_s: float = 5.0) -> None:
        self._name = name
        self._capacity = capacity
        self._idle_timeout_s = idle_timeout_s
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads: set[threading.Thread] = set()
        # Idle threads not yet promised a job; a submitted job claims one or starts a thread.
        self._idle = 0
        self._closing = False
        self._numbers = itertools.count(1)

    def threads(self) -> list[threading.Thread]:
        """Return the pool's threads that are alive or about to start."""
        with self._lock:
            return list(self._threads)

    def run(self, job: Job) -> None:
        """Run ``job`` on an idle thread, or on a new one when none is idle.

        Raises:
            RuntimeError: the pool is closed.
        """
        with self._lock:
            if self._closing:
                raise RuntimeError(f"thread pool {self._name!r} is closed")
            thread = None
            if self._idle > 0:
                self._idle -= 1
            else:
                thread = threading.Thread(
                    target=self._serve, name=f"{self._name}-thread-{next(self._numbers)}", daemon=True
                )
                self._threads.add(thread)
        self._jobs.put(job)
        if thread is not None:
            thread.start()

    def close(self) -> None:
        """Stop idle threads now and busy ones when their job returns; never waits."""
        with self._lock:
            self._closing = True
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._jobs.put(None)

    def _serve(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self._idle_timeout_s)
            except queue.Empty:
                if self._retire_if_unclaimed():
                    return
                continue

            if job is None:
                self._retire()
                return
            job()
            # Drop the finished job now: an idle thread must not keep its task alive.
            del job

            with self._lock:
                if self._closing:
                    self._threads.discard(threading.current_thread())
                    return
                self._idle += 1

    def _retire_if_unclaimed(self) -> bool:
        # With no unclaimed idle slot left, a job is on its way to this thread.
        with self._lock:
            if self._idle == 0:
                return False
            self._idle -= 1
            self._threads.discard(threading.current_thread())
            return True

    def _retire(self) -> None:
        with self._lock:
            self._threads.discard(threading.current_thread())
