"""Wait in tests for something that another thread or process does."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], timeout_s: float = 5.0, interval_s: float = 0.005) -> bool:
    """Poll ``predicate`` every ``interval_s`` seconds until it is true or ``timeout_s`` passes; return the result."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval_s)
    return True
