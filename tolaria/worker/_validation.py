"""Argument checks of ``AsyncWorker`` and ``submit``, and how a callable is classified."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

__all__ = ["ISOLATIONS", "accepts_cancel", "check_count", "check_seconds", "kind_of"]

ISOLATIONS = ("thread", "process")


def check_count(parameter: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an integer ``>= minimum``.

    Raises:
        ValueError: naming ``parameter`` and echoing the value.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{parameter} must be an integer >= {minimum}, got {value!r}")
    return value


def check_seconds(parameter: str, value: object) -> float:
    """Return ``value`` as float seconds if it is finite and ``> 0``.

    Raises:
        ValueError: naming ``parameter`` and echoing the value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{parameter} must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def accepts_cancel(fn: Callable[..., Any]) -> bool:
    """Return whether ``fn`` declares a ``cancel`` parameter that can be passed by keyword."""
    try:
        parameter = inspect.signature(fn).parameters.get("cancel")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def kind_of(fn: Callable[..., Any], isolation: str) -> str:
    """Return ``"coroutine"``, ``"thread"`` or ``"process"``: how ``fn`` will run.

    Raises:
        TypeError: ``fn`` is a coroutine object (it is closed) or not callable.
        ValueError: unknown ``isolation``, or a coroutine function with ``isolation="process"``.
    """
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if inspect.iscoroutine(fn):
        # Closing it avoids a second, misleading "never awaited" warning.
        fn.close()
        raise TypeError("submit takes a coroutine function and its arguments, not a coroutine: use submit(fn, *args)")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if inspect.iscoroutinefunction(fn):
        if isolation == "process":
            raise ValueError("coroutine functions run on the event loop; isolation='process' needs a plain function")
        return "coroutine"
    return isolation
