"""A Python process that abandons a hung call still exits promptly.

Each test runs real child interpreters. A child prints ``time.monotonic()`` once its
imports are done; ``time.monotonic()`` is the system-wide monotonic clock on Linux, so
the parent can compare it with its own clock when the child has exited.

``tolaria.worker`` does not import torch, so the child measures the worker alone: the
0.1 s timeout, the shutdown and the interpreter's exit must take under 1 s. A control
child with the same imports and no worker shows what the interpreter needs anyway.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

WORKER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from tolaria.worker import AsyncWorker, TaskTimeout

    assert "torch" not in sys.modules, "tolaria.worker imported torch"
    print(time.monotonic(), flush=True)
    worker = AsyncWorker(name="exit-test")
    handle = worker.submit(time.sleep, 10, timeout=0.1)
    try:
        handle.result()
    except TaskTimeout:
        print("timed out", flush=True)
    if sys.argv[1] == "shutdown":
        worker.shutdown()
    """
)

CONTROL_SCRIPT = textwrap.dedent(
    """
    import time
    from tolaria.worker import AsyncWorker, TaskTimeout

    print(time.monotonic(), flush=True)
    print("timed out", flush=True)
    """
)


def seconds_from_imports_to_exit(script: str, *arguments: str) -> float:
    """Run ``script`` in a child interpreter; return the seconds from its first output line to its exit."""
    child = subprocess.Popen(
        [sys.executable, "-c", script, *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stdout, stderr = child.communicate(timeout=60)
    ended = time.monotonic()
    assert child.returncode == 0, stderr
    lines = stdout.splitlines()
    assert lines[1] == "timed out"
    return ended - float(lines[0])


@pytest.fixture(scope="module")
def control_s() -> float:
    """Seconds a child with the same imports but no worker needs from its imports to its exit."""
    return seconds_from_imports_to_exit(CONTROL_SCRIPT)


@pytest.mark.parametrize("ending", ["shutdown", "exit"])
def test_process_with_abandoned_sleep_exits_quickly(control_s, ending):
    worker_s = seconds_from_imports_to_exit(WORKER_SCRIPT, ending)

    # Without the worker's daemon threads the child would wait for the whole 10 s sleep.
    assert worker_s < 1.0, f"child took {worker_s:.2f} s (a child without the worker: {control_s:.2f} s)"
