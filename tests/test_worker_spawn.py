"""AsyncWorker when a worker process cannot be started: the task fails clearly and the worker keeps serving."""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import multiprocessing
import multiprocessing.resource_tracker
import multiprocessing.util
import os
import re

import polling
import pytest
import worker_tasks

from tolaria.telemetry import InMemorySink, Level, Telemetry
from tolaria.worker import AsyncWorker

# Spawning a process takes an estimated 0.1-0.5 s on a busy machine, so this bound leaves ample room.
SPAWN_BUDGET_S = 30.0


# A process starts more slowly than a thread, so these waits allow twice as long.
wait_until = functools.partial(polling.wait_until, timeout_s=10.0, interval_s=0.01)


@pytest.fixture
def telemetry() -> Telemetry:
    return Telemetry([InMemorySink()])


@pytest.fixture
def worker(telemetry: Telemetry):
    worker = AsyncWorker(name="spawn-worker", processes=1, telemetry=telemetry)
    yield worker
    assert worker.shutdown(timeout=5.0)


@dataclasses.dataclass
class FailedSpawn:
    """What a process task got while no worker process could be started."""

    error: RuntimeError
    reason: str
    log_records: list[logging.LogRecord]


@pytest.fixture
def failed_spawn(
    worker: AsyncWorker, telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> FailedSpawn:
    """Submit a process task while fork fails with EAGAIN, then let fork work again."""
    # Spawning also starts the resource tracker through the same call. Starting it now
    # makes the worker processes the only ones that fail.
    multiprocessing.resource_tracker.ensure_running()
    reason = f"[Errno {errno.EAGAIN}] {os.strerror(errno.EAGAIN)}"

    # Fork raises EAGAIN when the user's process limit is reached. Root ignores that
    # limit, so the test makes the call that forks the interpreter raise it.
    def failing_spawnv_passfds(path, args, passfds):
        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(multiprocessing.util, "spawnv_passfds", failing_spawnv_passfds)
    with caplog.at_level(logging.ERROR, logger="tolaria.worker"):
        handle = worker.submit(worker_tasks.add, 2, 3, isolation="process", timeout=SPAWN_BUDGET_S)
        message = f"task 'add': could not start a worker process: {reason}"
        with pytest.raises(RuntimeError, match=re.escape(message)) as caught:
            handle.result(timeout=SPAWN_BUDGET_S)

        # The pool starts one process per slot plus a spare, so two spawns fail.
        assert wait_until(lambda: telemetry.counters.get("tolaria.worker.spawn_failures") == 2)
    monkeypatch.undo()
    return FailedSpawn(caught.value, reason, list(caplog.records))


def test_spawn_failure_fails_queued_task(worker: AsyncWorker, failed_spawn: FailedSpawn) -> None:
    assert str(failed_spawn.error) == f"task 'add': could not start a worker process: {failed_spawn.reason}"
    assert isinstance(failed_spawn.error.__cause__, BlockingIOError)
    assert worker.process_ids() == []


def test_spawn_failure_is_emitted(telemetry: Telemetry, failed_spawn: FailedSpawn) -> None:
    telemetry.flush(0, 0)
    (sink,) = telemetry.sinks
    failures = sink.events("tolaria.worker.spawn_failed")
    assert len(failures) == 2
    for event in failures:
        assert event.level == Level.ERROR
        assert event.attributes == {"worker": "spawn-worker", "error": "BlockingIOError", "reason": failed_spawn.reason}


def test_spawn_failure_is_logged(failed_spawn: FailedSpawn) -> None:
    logged = [
        record for record in failed_spawn.log_records if "could not start a worker process" in record.getMessage()
    ]
    assert len(logged) == 2
    for record in logged:
        assert record.levelno == logging.ERROR
        assert record.exc_info is not None


def test_worker_serves_after_spawn_failure(
    worker: AsyncWorker, telemetry: Telemetry, failed_spawn: FailedSpawn
) -> None:
    # Thread work needs no process. Process work spawns new processes once fork works again.
    assert worker.submit(worker_tasks.add, 4, 5, timeout=SPAWN_BUDGET_S).result() == 9
    assert worker.submit(worker_tasks.add, 20, 22, isolation="process", timeout=SPAWN_BUDGET_S).result() == 42
    assert telemetry.counters["tolaria.worker.spawn_failures"] == 2


def test_pipe_failure_is_reported_like_a_spawn_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipe that cannot be created (EMFILE) fails the task and is reported, not lost on a thread."""
    context = multiprocessing.get_context("spawn")

    def no_pipe(*args: object, **kwargs: object) -> object:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(type(context), "Pipe", no_pipe)
    sink = InMemorySink()
    telemetry = Telemetry([sink])
    with AsyncWorker(name="pipe-failure", telemetry=telemetry) as worker:
        handle = worker.submit(worker_tasks.add, 2, 3, isolation="process", timeout=10.0, name="add")
        with pytest.raises(Exception, match="Too many open files"):
            handle.result()
        assert telemetry.counters["tolaria.worker.spawn_failures"] >= 1
