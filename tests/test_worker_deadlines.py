"""Deadline behaviour of AsyncWorker for each kind of work.

The numbers are the worker's contract: the caller is released at the deadline whatever
the work does. Margins are a few tens of milliseconds, enough for a busy 2-core machine.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import tracemalloc
import weakref

import pytest
from polling import wait_until

from tolaria.worker import AsyncWorker, TaskTimeout, WorkerSaturated


@pytest.fixture(autouse=True)
def frozen_gc():
    """Keep full garbage collections out of the deadline measurements.

    With torch imported, one full collection pauses every thread for 100-250 ms on a busy
    2-core machine. Freezing the objects that exist before the test makes collections
    cheap, so the timings measure the worker rather than the collector.
    """
    gc.freeze()
    yield
    gc.unfreeze()




def worker_threads(name: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith(f"{name}-thread")]


def timed_result(handle) -> tuple[BaseException | None, float]:
    """Wait for ``handle``; return the exception raised and the seconds since its submission."""
    try:
        handle.result()
    except BaseException as error:
        return error, time.monotonic() - handle.submitted_at
    return None, time.monotonic() - handle.submitted_at


def test_uncooperative_sleep_released_at_deadline():
    worker = AsyncWorker(name="uncooperative")
    handle = worker.submit(time.sleep, 10, timeout=0.1)
    error, elapsed = timed_result(handle)

    assert isinstance(error, TaskTimeout)
    assert isinstance(error, TimeoutError)
    assert 0.1 <= elapsed < 0.15
    assert error.timeout_s == 0.1
    assert wait_until(lambda: worker.stats().abandoned_running == 1)
    assert worker.stats().abandoned == 1

    started = time.monotonic()
    worker.shutdown()
    assert time.monotonic() - started < 0.5
    # The abandoned thread is the only one left, and it is a daemon.
    leftover = [thread for thread in threading.enumerate() if thread.name.startswith("uncooperative")]
    assert [thread.name for thread in leftover] == ["uncooperative-thread-1"]
    assert leftover[0].daemon


def test_cooperative_sync_gets_token_at_deadline():
    worker = AsyncWorker(name="cooperative")
    stopped_at = []

    def cooperative(cancel):
        cancel.wait(10.0)
        stopped_at.append(time.monotonic())
        cancel.raise_if_cancelled()

    handle = worker.submit(cooperative, timeout=0.1)
    error, elapsed = timed_result(handle)

    assert isinstance(error, TaskTimeout)
    assert 0.1 <= elapsed < 0.15
    assert handle.token.cancelled
    assert handle.token.reason == "deadline"
    assert wait_until(lambda: stopped_at)
    assert stopped_at[0] - handle.deadline < 0.1
    assert wait_until(lambda: worker.stats().still_cancelling == 0)
    assert worker.stats().abandoned == 0
    assert worker.stats().late_failures == 0

    assert worker.shutdown(timeout=1.0) is True
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("cooperative")]


def test_slow_cancel_handler_releases_caller():
    worker = AsyncWorker(name="slow-cancel")
    cleanup_done = threading.Event()

    async def slow_to_cancel():
        try:
            await asyncio.sleep(10)
        finally:
            await asyncio.sleep(2)
            cleanup_done.set()

    handle = worker.submit(slow_to_cancel, timeout=0.1)
    error, elapsed = timed_result(handle)

    assert isinstance(error, TaskTimeout)
    assert 0.1 <= elapsed < 0.15
    assert not cleanup_done.is_set()
    assert wait_until(lambda: worker.stats().still_cancelling == 1, timeout_s=1.0)
    # The finally block still runs to its end on the loop.
    assert cleanup_done.wait(5.0)
    assert wait_until(lambda: worker.stats().still_cancelling == 0)
    assert worker.shutdown(timeout=1.0) is True


def test_swallowed_cancellation_releases_caller():
    worker = AsyncWorker(name="stubborn")
    release = threading.Event()

    async def stubborn():
        while not release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue
        return "finished anyway"

    handle = worker.submit(stubborn, timeout=0.1)
    error, elapsed = timed_result(handle)

    assert isinstance(error, TaskTimeout)
    assert 0.1 <= elapsed < 0.15
    assert wait_until(lambda: worker.stats().still_cancelling == 1)
    time.sleep(0.05)
    assert worker.stats().still_cancelling == 1

    release.set()
    assert wait_until(lambda: worker.stats().still_cancelling == 0)
    assert worker.shutdown(timeout=1.0) is True


def test_shutdown_bounded_with_stubborn_coroutine():
    worker = AsyncWorker(name="stubborn-shutdown")
    release = threading.Event()

    async def stubborn():
        while not release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue

    handle = worker.submit(stubborn)
    assert wait_until(lambda: handle.started)
    started = time.monotonic()
    clean = worker.shutdown(timeout=0.5)
    assert time.monotonic() - started < 0.7
    assert clean is False
    release.set()


def test_forty_stuck_calls_saturate():
    worker = AsyncWorker(max_concurrency=4, max_queue=8, name="stuck")
    accepted, rejected = [], []
    started = time.monotonic()
    for _ in range(40):
        try:
            accepted.append(worker.submit(time.sleep, 3, timeout=0.2))
        except WorkerSaturated as error:
            rejected.append(error)
    submit_s = time.monotonic() - started

    assert len(accepted) == 12
    assert len(rejected) == 28
    assert submit_s < 0.5
    assert "all 4 thread slots are busy" in str(rejected[0])
    assert "8 tasks are already queued" in str(rejected[0])
    assert worker.stats().rejected == 28

    # Other work still runs while every thread slot is stuck.
    async def quick():
        return "coroutine ran"

    assert worker.submit(quick, timeout=1.0).result() == "coroutine ran"
    for handle in accepted:
        with pytest.raises(TaskTimeout):
            handle.result()
    assert len(worker_threads("stuck")) <= 4

    started = time.monotonic()
    worker.shutdown()
    assert time.monotonic() - started < 0.5


def test_timeouts_keep_threads_and_memory_bounded():
    name = "bounded"
    worker = AsyncWorker(max_concurrency=4, max_queue=4, name=name)
    baseline_threads = threading.active_count()
    handles = []

    def run_timeouts(count: int) -> int:
        most_threads = 0
        for _ in range(count):
            handle = worker.submit(time.sleep, 0.05, timeout=0.005)
            with pytest.raises(TaskTimeout):
                handle.result()
            handles.append(weakref.ref(handle))
            most_threads = max(most_threads, len(worker_threads(name)))
            assert threading.active_count() <= baseline_threads + 4
        return most_threads

    tracemalloc.start()
    try:
        assert run_timeouts(200) <= 4
        gc.collect()
        after_first, _ = tracemalloc.get_traced_memory()
        assert run_timeouts(200) <= 4
        gc.collect()
        after_second, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert worker.stats().timed_out == 400
    assert after_second - after_first < 256 * 1024
    # Once the abandoned sleeps end, the worker keeps no reference to any task.
    assert wait_until(lambda: worker.stats().abandoned_running == 0)
    gc.collect()
    assert sum(1 for ref in handles if ref() is not None) == 0
    assert worker.shutdown(timeout=1.0) is True
