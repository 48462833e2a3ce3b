"""Functions that worker tests run in worker processes.

Only the standard library is imported here, so a spawned worker process that unpickles
one of these functions does not import torch or tolaria first.
"""

from __future__ import annotations

import os
import signal
import threading
import time


def add(left: int, right: int) -> int:
    """Return ``left + right``."""
    return left + right


def process_id() -> int:
    """Return the id of the process that runs the call."""
    return os.getpid()


def fail(message: str) -> None:
    """Raise ``ValueError(message)``."""
    raise ValueError(message)


def exit_process(code: int) -> None:
    """End the process at once with exit status ``code``."""
    os._exit(code)


def sleep_then_return(seconds: float) -> int:
    """Sleep ``seconds`` without checking for cancellation, then return the process id."""
    time.sleep(seconds)
    return os.getpid()


def ignore_sigterm_and_sleep(seconds: float) -> None:
    """Ignore SIGTERM, then sleep ``seconds``: only SIGKILL stops this call early."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)


def make_lock() -> threading.Lock:
    """Return a lock, which cannot be pickled."""
    return threading.Lock()
