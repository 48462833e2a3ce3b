"""Unit tests of AsyncWorker: results, errors, argument checks, cancellation, stats and telemetry."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time

import pytest
from polling import wait_until

from tolaria.telemetry import InMemorySink, Telemetry
from tolaria.worker import (
    AsyncWorker,
    CancelToken,
    Outcome,
    TaskCancelled,
    TaskTimeout,
    WorkerClosed,
)


@pytest.fixture
def worker():
    worker = AsyncWorker(max_concurrency=4, max_queue=8, name="test-worker")
    yield worker
    worker.shutdown(timeout=2.0)




def test_sync_call_returns_value(worker):
    handle = worker.submit(lambda left, right=0: left + right, 2, right=3)
    assert handle.result(timeout=5.0) == 5
    assert handle.done()
    assert handle.outcome is Outcome.COMPLETED
    assert handle.kind == "thread"


def test_coroutine_returns_value(worker):
    async def double(value):
        await asyncio.sleep(0.001)
        return value * 2

    handle = worker.submit(double, 21, timeout=5.0)
    assert handle.result() == 42
    assert handle.kind == "coroutine"


def test_task_name_defaults_to_qualname(worker):
    def named_function():
        return None

    assert worker.submit(named_function).name.endswith("named_function")
    assert worker.submit(named_function, name="custom").name == "custom"


def test_exception_reaches_caller(worker):
    def broken():
        raise KeyError("missing")

    handle = worker.submit(broken, timeout=5.0)
    with pytest.raises(KeyError, match="missing"):
        handle.result()
    assert handle.outcome is Outcome.FAILED
    assert wait_until(lambda: worker.stats().failed == 1)


def test_coroutine_exception_reaches_caller(worker):
    async def broken():
        raise ValueError("bad value")

    with pytest.raises(ValueError, match="bad value"):
        worker.submit(broken, timeout=5.0).result()


@pytest.mark.parametrize("timeout", [0, -1.0, math.nan, math.inf, True, "1"])
def test_submit_rejects_bad_timeout(worker, timeout):
    with pytest.raises(ValueError, match=r"timeout must be a finite number of seconds > 0, got"):
        worker.submit(time.sleep, 0, timeout=timeout)


def test_submit_rejects_bad_isolation(worker):
    with pytest.raises(ValueError, match=r"isolation must be one of \('thread', 'process'\), got 'fiber'"):
        worker.submit(time.sleep, 0, isolation="fiber")


def test_submit_rejects_coroutine_object(worker):
    async def work():
        return 1

    coroutine = work()
    with pytest.raises(TypeError, match=r"not a coroutine: use submit\(fn, \*args\)"):
        worker.submit(coroutine)
    # submit closed it, so no "never awaited" warning follows.
    assert coroutine.cr_frame is None


def test_submit_rejects_non_callable(worker):
    with pytest.raises(TypeError, match="fn must be callable, got int"):
        worker.submit(42)


def test_submit_rejects_cancel_keyword(worker):
    def cooperative(cancel):
        return cancel

    with pytest.raises(ValueError, match="do not pass 'cancel'"):
        worker.submit(cooperative, cancel=CancelToken())


def test_coroutine_rejects_process_isolation(worker):
    async def work():
        return 1

    with pytest.raises(ValueError, match="isolation='process' needs a plain function"):
        worker.submit(work, isolation="process")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"max_concurrency": 0}, r"max_concurrency must be an integer >= 1, got 0"),
        ({"max_queue": -1}, r"max_queue must be an integer >= 0, got -1"),
        ({"processes": 0}, r"processes must be an integer >= 1, got 0"),
        ({"kill_grace_s": 0.0}, r"kill_grace_s must be a finite number of seconds > 0, got 0.0"),
        ({"max_concurrency": True}, r"max_concurrency must be an integer >= 1, got True"),
    ],
)
def test_constructor_rejects_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        AsyncWorker(**arguments)


def test_sync_function_returning_coroutine_fails(worker):
    async def work():
        return 1

    class AsyncCallable:
        def __call__(self):
            return work()

    with pytest.raises(TypeError, match="returned a coroutine; submit the async function itself"):
        worker.submit(AsyncCallable(), timeout=5.0).result()


def test_short_result_wait_leaves_task_running(worker):
    release = threading.Event()
    handle = worker.submit(release.wait, 5.0, timeout=10.0)
    with pytest.raises(TimeoutError, match=r"still running after waiting 0\.05 s") as caught:
        handle.result(timeout=0.05)
    assert not isinstance(caught.value, TaskTimeout)
    assert not handle.done()
    release.set()
    assert handle.result(timeout=5.0) is True


def test_result_rejects_negative_wait(worker):
    handle = worker.submit(time.sleep, 0)
    with pytest.raises(ValueError, match="timeout must be None or a finite number >= 0, got -1"):
        handle.result(timeout=-1)


def test_done_decides_timeout_without_waiter(worker):
    stop = threading.Event()
    handle = worker.submit(stop.wait, 5.0, timeout=0.05)
    assert wait_until(handle.done, timeout_s=2.0)
    assert handle.outcome is Outcome.TIMED_OUT
    stop.set()


def test_cancel_queued_task_never_runs():
    with AsyncWorker(max_concurrency=1, max_queue=4, name="queue-worker") as worker:
        release = threading.Event()
        ran = threading.Event()
        blocker = worker.submit(release.wait, 5.0, timeout=10.0)
        assert wait_until(lambda: blocker.started)
        queued = worker.submit(ran.set, timeout=10.0)
        assert worker.stats().queue_depth == 1

        assert queued.cancel() is True
        assert queued.cancel() is False
        with pytest.raises(TaskCancelled, match="cancelled by its caller"):
            queued.result()
        release.set()
        assert blocker.result() is True
        assert wait_until(lambda: worker.stats().in_flight == 0)
        assert not ran.is_set()
        assert not queued.started
        assert worker.stats().queue_depth == 0


def test_cancel_running_task_sets_token(worker):
    started = threading.Event()
    stopped = threading.Event()

    def cooperative(cancel):
        started.set()
        cancel.wait(10.0)
        stopped.set()
        cancel.raise_if_cancelled()

    handle = worker.submit(cooperative, timeout=10.0)
    assert started.wait(5.0)
    assert handle.cancel() is True
    with pytest.raises(TaskCancelled):
        handle.result()
    assert stopped.wait(2.0)
    assert handle.token.reason == "cancel"
    assert wait_until(lambda: worker.stats().still_cancelling == 0)


def test_submit_after_shutdown_raises(worker):
    assert worker.shutdown(timeout=2.0) is True
    assert worker.closed
    with pytest.raises(WorkerClosed, match="is shut down; create a new AsyncWorker"):
        worker.submit(time.sleep, 0)


def test_shutdown_is_idempotent(worker):
    assert worker.shutdown(timeout=2.0) is True
    assert worker.shutdown(timeout=2.0) is True


def test_shutdown_releases_waiting_caller():
    worker = AsyncWorker(name="release-worker")
    release = threading.Event()
    handle = worker.submit(release.wait, 30.0)
    assert wait_until(lambda: handle.started)
    results = []

    def wait_for_result():
        try:
            handle.result()
        except TaskCancelled as error:
            results.append(error)

    waiter = threading.Thread(target=wait_for_result)
    waiter.start()
    worker.shutdown(timeout=1.0)
    waiter.join(2.0)
    release.set()
    assert len(results) == 1
    assert "shut down" in str(results[0])


def test_context_manager_shuts_down():
    with AsyncWorker(name="context-worker") as worker:
        assert worker.submit(lambda: 7).result(timeout=5.0) == 7
    assert worker.closed
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("context-worker")]


def test_stats_count_outcomes(worker):
    worker.submit(lambda: 1).result(timeout=5.0)
    with pytest.raises(ZeroDivisionError):
        worker.submit(lambda: 1 / 0).result(timeout=5.0)
    stop = threading.Event()
    with pytest.raises(TaskTimeout):
        worker.submit(stop.wait, 5.0, timeout=0.02).result()
    stop.set()

    stats = worker.stats()
    assert stats.submitted == 3
    assert stats.completed == 1
    assert stats.failed == 1
    assert stats.timed_out == 1
    assert stats.lateness_samples == 1
    assert 0.0 <= stats.lateness_p50_ms <= stats.lateness_p99_ms <= stats.lateness_max_ms
    assert stats.threads <= 4


def test_timeout_emits_cancelled_event():
    sink = InMemorySink()
    telemetry = Telemetry([sink])
    with AsyncWorker(name="telemetry-worker", telemetry=telemetry) as worker:
        stop = threading.Event()
        with pytest.raises(TaskTimeout):
            worker.submit(stop.wait, 5.0, timeout=0.02, name="slow-task").result()
        assert wait_until(lambda: telemetry.event_counts.get("tolaria.timeout.cancelled", 0) == 1)
        stop.set()
    telemetry.flush(0, 0)
    (event,) = sink.events("tolaria.timeout.cancelled")
    assert event.attributes["task"] == "slow-task"
    assert event.attributes["cause"] == "deadline"
    assert event.attributes["state"] == "abandoned"
    assert telemetry.counters["tolaria.worker.abandoned"] == 1


def test_late_failure_is_logged_and_counted(caplog):
    telemetry = Telemetry()
    with AsyncWorker(name="late-worker", telemetry=telemetry) as worker:

        def fail_later():
            time.sleep(0.2)
            raise RuntimeError("too late")

        with caplog.at_level(logging.WARNING, logger="tolaria.worker"):
            with pytest.raises(TaskTimeout):
                worker.submit(fail_later, timeout=0.02).result()
            assert wait_until(lambda: worker.stats().late_failures == 1)
    assert telemetry.counters["tolaria.worker.late_failures"] == 1
    assert telemetry.event_counts["tolaria.worker.late_failure"] == 1
    assert any("raised RuntimeError after its outcome was decided" in record.message for record in caplog.records)


def test_cancel_token_direct_use():
    token = CancelToken("direct")
    assert not token.cancelled
    token.raise_if_cancelled()
    assert token.wait(0.001) is False
    token.cancel("first")
    token.cancel("second")
    assert token.cancelled
    assert token.reason == "first"
    with pytest.raises(TaskCancelled, match=r"task 'direct' was cancelled \(first\)"):
        token.raise_if_cancelled()


def test_result_after_deadline_is_a_timeout(worker):
    started = threading.Event()

    def slow():
        started.set()
        time.sleep(0.25)
        return "late"

    async def block_loop():
        # A blocking call stalls the event loop, so the deadline timer of ``slow`` cannot run.
        time.sleep(0.4)

    handle = worker.submit(slow, timeout=0.15)
    assert started.wait(2.0)
    worker.submit(block_loop)
    time.sleep(0.5)

    # ``slow`` returned at 0.25 s, after its deadline, with nobody waiting: the deadline wins.
    assert handle.outcome is Outcome.TIMED_OUT
    assert handle.lateness_s >= 0.05
    with pytest.raises(TaskTimeout):
        handle.result()
