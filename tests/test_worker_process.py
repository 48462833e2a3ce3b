"""AsyncWorker with isolation="process": spawn worker processes, kill at the deadline, replace.

The functions run in worker processes come from ``worker_tasks``, which imports only the
standard library, so each spawned process starts quickly.
"""

from __future__ import annotations

import functools
import gc
import os
import time

import polling
import pytest
import worker_tasks

from tolaria.worker import AsyncWorker, ProcessDied, TaskTimeout

# Spawning a process takes 0.1-0.5 s on a busy machine; these bounds leave room for that.
SPAWN_BUDGET_S = 30.0


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


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# A process starts more slowly than a thread, so these waits allow twice as long.
wait_until = functools.partial(polling.wait_until, timeout_s=10.0, interval_s=0.01)


@pytest.fixture(scope="module")
def worker():
    worker = AsyncWorker(name="process-worker", processes=1)
    worker.warm_up(timeout=SPAWN_BUDGET_S)
    yield worker
    worker.shutdown(timeout=2.0)


def test_call_runs_in_another_process(worker):
    assert worker.submit(worker_tasks.add, 2, 3, isolation="process", timeout=SPAWN_BUDGET_S).result() == 5
    pid = worker.submit(worker_tasks.process_id, isolation="process", timeout=SPAWN_BUDGET_S).result()
    assert pid != os.getpid()
    assert pid in worker.process_ids()


def test_exception_carries_child_traceback(worker):
    handle = worker.submit(worker_tasks.fail, "child failed", isolation="process", timeout=SPAWN_BUDGET_S)
    with pytest.raises(ValueError, match="child failed") as caught:
        handle.result()
    assert any("traceback in the worker process" in note for note in caught.value.__notes__)


def test_unpicklable_argument_is_rejected(worker):
    with pytest.raises(TypeError, match="cannot run with isolation='process' because its function or arguments"):
        worker.submit(worker_tasks.add, 1, lambda: 2, isolation="process")


def test_unpicklable_function_is_rejected(worker):
    with pytest.raises(TypeError, match="pass a module-level function and picklable arguments"):
        worker.submit(lambda: 1, isolation="process")


def test_unpicklable_result_fails_clearly(worker):
    handle = worker.submit(worker_tasks.make_lock, isolation="process", timeout=SPAWN_BUDGET_S)
    with pytest.raises(TypeError, match="the result of type lock cannot be pickled"):
        handle.result()


def test_timeout_kills_the_process(worker):
    worker.warm_up(timeout=SPAWN_BUDGET_S)
    before = worker.stats().process_restarts
    handle = worker.submit(worker_tasks.sleep_then_return, 30, isolation="process", timeout=0.2)
    assert wait_until(lambda: handle.started)
    busy = set(worker.process_ids())
    started = time.monotonic()
    with pytest.raises(TaskTimeout):
        handle.result()
    assert time.monotonic() - started < 0.3
    assert wait_until(lambda: worker.stats().process_restarts == before + 1)
    killed = busy - set(worker.process_ids())
    assert len(killed) == 1
    assert wait_until(lambda: not process_alive(next(iter(killed))), timeout_s=2.0)


def test_process_ignoring_sigterm_is_killed(worker):
    worker.warm_up(timeout=SPAWN_BUDGET_S)
    handle = worker.submit(worker_tasks.ignore_sigterm_and_sleep, 30, isolation="process", timeout=0.3)
    assert wait_until(lambda: handle.started)
    pids = set(worker.process_ids())
    with pytest.raises(TaskTimeout):
        handle.result()
    assert wait_until(lambda: len(pids - set(worker.process_ids())) == 1)
    (killed,) = pids - set(worker.process_ids())
    # Terminated at the deadline, killed after the 0.2 s grace period.
    assert wait_until(lambda: not process_alive(killed), timeout_s=2.0)


def test_process_exit_fails_task_and_is_replaced(worker):
    worker.warm_up(timeout=SPAWN_BUDGET_S)
    handle = worker.submit(worker_tasks.exit_process, 3, isolation="process", timeout=SPAWN_BUDGET_S)
    with pytest.raises(ProcessDied, match="exited with code 3"):
        handle.result()
    assert worker.submit(worker_tasks.add, 1, 1, isolation="process", timeout=SPAWN_BUDGET_S).result() == 2


def replace_repeatedly(worker: AsyncWorker, count: int) -> None:
    """Kill and replace the worker process ``count`` times, then check that it still serves calls."""
    before = worker.stats().process_restarts
    for _ in range(count):
        # Each task must start in a process before its deadline, so wait for the replacement first.
        worker.warm_up(timeout=SPAWN_BUDGET_S)
        handle = worker.submit(worker_tasks.sleep_then_return, 30, isolation="process", timeout=0.05)
        with pytest.raises(TaskTimeout):
            handle.result()
        assert handle.started
    # The last kill happens on the worker's loop just after the caller was released.
    assert wait_until(lambda: worker.stats().process_restarts - before == count)
    assert worker.submit(worker_tasks.add, 20, 22, isolation="process", timeout=SPAWN_BUDGET_S).result() == 42
    assert len(worker.process_ids()) <= 2


def test_process_replaced_ten_times_then_serves(worker):
    replace_repeatedly(worker, 10)


@pytest.mark.soak
def test_process_replaced_hundred_times_then_serves(worker):
    replace_repeatedly(worker, 100)


def test_shutdown_kills_every_process():
    worker = AsyncWorker(name="process-shutdown", start_processes=True)
    assert wait_until(lambda: len(worker.process_ids()) == 2, timeout_s=SPAWN_BUDGET_S)
    worker.warm_up(timeout=SPAWN_BUDGET_S)
    handle = worker.submit(worker_tasks.sleep_then_return, 30, isolation="process")
    assert wait_until(lambda: handle.started)
    pids = worker.process_ids()
    assert len(pids) == 2

    started = time.monotonic()
    assert worker.shutdown(timeout=2.0) is True
    assert time.monotonic() - started < 1.0
    assert not [pid for pid in pids if process_alive(pid)]
