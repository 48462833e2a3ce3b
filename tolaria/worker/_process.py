"""Pre-started worker processes for ``isolation="process"`` tasks.

Processes use the spawn start method, which is safe after CUDA initialisation (fork is
not). A process whose task times out or is cancelled is terminated, killed after a grace
period, and replaced. One spare process is kept started, so the next task does not wait
for a spawn. Every method except ``close`` runs on the worker's event-loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing
import pickle
import runpy
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

from tolaria.worker import _child
from tolaria.worker._job import Job

__all__ = ["PoolListener", "ProcessPool", "pack_call", "unpack_reply"]

logger = logging.getLogger(__name__)


def pack_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], task: str) -> bytes:
    """Pickle a call for a worker process.

    Raises:
        TypeError: the function or an argument cannot be pickled.
    """
    try:
        return pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as error:
        raise TypeError(
            f"task {task!r} cannot run with isolation='process' because its function or arguments "
            f"cannot be pickled ({error}); pass a module-level function and picklable arguments, "
            f"or use isolation='thread'"
        ) from error


def unpack_reply(reply: bytes, task: str) -> tuple[bool, Any]:
    """Decode a worker process reply into ``(True, value)`` or ``(False, exception)``."""
    try:
        message = pickle.loads(reply)
    except Exception as error:  # noqa: BLE001 - becomes the task's failure
        return False, RuntimeError(f"task {task!r}: the reply of the worker process cannot be unpickled: {error}")
    if message[0] == "ok":
        return True, message[1]
    exception, text = message[1], message[2]
    if isinstance(exception, BaseException):
        exception.add_note(f"traceback in the worker process:\n{text}")
        return False, exception
    return False, RuntimeError(f"task {task!r} failed in the worker process:\n{text}")


class PoolListener(Protocol):
    """Worker callbacks the pool calls on the event-loop thread."""

    def post(self, callback: Callable[..., None], *args: Any) -> None: ...

    def on_process_ready(self) -> None: ...

    def on_process_reply(self, job: Job, reply: bytes) -> None: ...

    def on_process_lost(self, job: Job, exitcode: int | None) -> None: ...

    def on_process_restart(self) -> None: ...

    def on_spawn_failed(self, error: BaseException) -> None: ...


class _Child:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, process: BaseProcess, connection: Connection) -> None:
        self.process = process
        self.connection = connection
        self.ready = False
        self.job: Job | None = None


class ProcessPool:
    """``size`` process slots plus one spare process, started on demand."""

    def __init__(
        self,
        name: str,
        size: int,
        kill_grace_s: float,
        loop: asyncio.AbstractEventLoop,
        listener: PoolListener,
    ) -> None:
        self._name = name
        self._target = size + 1
        self._kill_grace_s = kill_grace_s
        self._loop = loop
        self._listener = listener
        self._context = multiprocessing.get_context("spawn")
        self._children: set[_Child] = set()
        self._idle: collections.deque[_Child] = collections.deque()
        self._starting = 0
        self._reapers: set[threading.Thread] = set()
        # Guards _reapers so that close() never joins a reaper added but not yet started.
        self._reapers_lock = threading.Lock()
        self._closed = False

    def idle_count(self) -> int:
        """Number of started processes waiting for a task."""
        return len(self._idle)

    def ready_count(self) -> int:
        """Number of started processes that finished importing, busy or idle."""
        # Other threads call this while the loop changes the set: copy it in one step first.
        return sum(1 for child in tuple(self._children) if child.ready)

    @property
    def target(self) -> int:
        """Number of processes the pool keeps alive: the slots plus one spare."""
        return self._target

    def processes(self) -> list[BaseProcess]:
        """Return the live processes, busy, idle or not yet ready."""
        return [child.process for child in tuple(self._children)]

    def ensure_started(self) -> None:
        """Spawn processes until ``size`` plus the spare are alive or starting."""
        while not self._closed and len(self._children) + self._starting < self._target:
            self._starting += 1
            threading.Thread(target=self._spawn, name=f"{self._name}-spawn", daemon=True).start()

    def dispatch(self, job: Job) -> None:
        """Send ``job`` to an idle process; the caller checked ``idle_count() > 0``."""
        child = self._idle.popleft()
        child.job = job
        job.child = child
        assert job.payload is not None
        # NOTE: a payload larger than the pipe buffer blocks the loop until the idle process
        # has read it. Pass large tensors through files or shared memory instead.
        try:
            child.connection.send_bytes(job.payload)
        except OSError:
            logger.warning("worker process %s died before task %r was sent", child.process.pid, job.handle.name)
            self._lose(child)

    def kill(self, child: _Child) -> None:
        """Terminate ``child`` (kill it after the grace period) and start a replacement."""
        if child not in self._children:
            return
        self._forget(child)
        child.job = None
        self._listener.on_process_restart()
        self._reap_in_background(child)
        self.ensure_started()

    def close(self, deadline: float) -> bool:
        """Terminate every process, kill those alive at ``deadline``; return whether all ended.

        Called after the event loop stopped, from the thread that shuts the worker down.
        """
        self._closed = True
        children = list(self._children)
        for child in children:
            self._forget(child)
            child.process.terminate()
        self._kill_after_grace(children, deadline)
        for child in children:
            child.process.join(max(0.0, deadline - time.monotonic()))
            child.connection.close()
        with self._reapers_lock:
            reapers = tuple(self._reapers)
        for reaper in reapers:
            reaper.join(max(0.0, deadline - time.monotonic()))

        alive = [f"pid {child.process.pid}" for child in children if child.process.is_alive()]
        alive += [reaper.name for reaper in reapers if reaper.is_alive()]
        if alive:
            logger.error("worker processes or reapers %s still alive after shutdown", alive)
        return not alive

    def _kill_after_grace(self, children: list[_Child], deadline: float) -> None:
        grace_end = min(deadline, time.monotonic() + self._kill_grace_s)
        for child in children:
            child.process.join(max(0.0, grace_end - time.monotonic()))
            if child.process.is_alive():
                child.process.kill()

    def _spawn(self) -> None:
        # Runs on a short-lived thread: starting a spawn process takes milliseconds of
        # blocking work that would delay every deadline on the event loop.
        try:
            # Creating the pipe can fail too (EMFILE), so it is inside the reported block.
            parent_end, child_end = self._context.Pipe(duplex=True)
        except BaseException as error:  # noqa: BLE001 - reported through on_spawn_failed
            self._listener.post(self._spawn_failed, error)
            return
        try:
            process = self._context.Process(
                target=runpy.run_path,
                args=(_child.__file__,),
                kwargs={"init_globals": {"connection": child_end}, "run_name": _child.RUN_NAME},
                name=f"{self._name}-process",
                daemon=True,
            )
            process.start()
        except BaseException as error:  # noqa: BLE001 - reported through on_spawn_failed
            parent_end.close()
            self._listener.post(self._spawn_failed, error)
            return
        finally:
            child_end.close()
        self._listener.post(self._spawned, _Child(process, parent_end))

    def _spawned(self, child: _Child) -> None:
        # Runs on the loop, or on the spawning thread once the loop has stopped.
        self._starting -= 1
        if not self._closed and not self._loop.is_closed():
            try:
                self._loop.add_reader(child.connection.fileno(), self._on_readable, child)
            except RuntimeError:
                # The loop closed between the check and now: the worker is shutting down.
                self._reap_in_background(child)
                return
            self._children.add(child)
            return
        self._reap_in_background(child)

    def _spawn_failed(self, error: BaseException) -> None:
        self._starting -= 1
        logger.error("could not start a worker process for %r", self._name, exc_info=error)
        self._listener.on_spawn_failed(error)

    def _on_readable(self, child: _Child) -> None:
        try:
            reply = child.connection.recv_bytes()
        except (EOFError, OSError):
            self._lose(child)
            return

        if not child.ready:
            # The first message of a new process announces that it finished importing.
            if reply != _child.READY:
                self._lose(child)
                return
            child.ready = True
            self._idle.append(child)
            self._listener.on_process_ready()
            return

        job, child.job = child.job, None
        self._idle.append(child)
        if job is not None:
            self._listener.on_process_reply(job, reply)
        self._listener.on_process_ready()

    def _lose(self, child: _Child) -> None:
        """Handle a process that exited on its own (crash, ``os._exit``, out-of-memory kill)."""
        if child not in self._children:
            return
        self._forget(child)
        job, child.job = child.job, None
        self._listener.on_process_restart()
        self._reap_in_background(child, job)
        self.ensure_started()

    def _forget(self, child: _Child) -> None:
        self._children.discard(child)
        if child in self._idle:
            self._idle.remove(child)
        if not self._loop.is_closed():
            self._loop.remove_reader(child.connection.fileno())

    def _reap_in_background(self, child: _Child, lost_job: Job | None = None) -> None:
        reaper = threading.Thread(target=self._reap, args=(child, lost_job), name=f"{self._name}-reaper", daemon=True)
        with self._reapers_lock:
            self._reapers.add(reaper)
            reaper.start()

    def _reap(self, child: _Child, lost_job: Job | None) -> None:
        # Joining blocks for up to the grace period, so it happens here and not on the loop.
        child.process.terminate()
        child.process.join(self._kill_grace_s)
        if child.process.is_alive():
            child.process.kill()
            child.process.join()
        child.connection.close()
        if lost_job is not None:
            exitcode = child.process.exitcode
            logger.warning(
                "worker process %s of %r exited with code %s while running task %r",
                child.process.pid,
                self._name,
                exitcode,
                lost_job.handle.name,
            )
            self._listener.post(self._listener.on_process_lost, lost_job, exitcode)
        with self._reapers_lock:
            self._reapers.discard(threading.current_thread())
