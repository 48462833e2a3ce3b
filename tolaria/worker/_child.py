"""The main loop of a worker process: receive a pickled call, run it, send back the result.

The pool runs this file by path with ``runpy`` instead of importing it, so a new process
does not import the ``tolaria`` package (and torch with it) just to serve calls. It must
therefore import nothing but the standard library. The module of a submitted function is
imported when its call is unpickled.
"""

from __future__ import annotations

import pickle
import signal
import traceback
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["READY", "RUN_NAME", "run_request", "serve"]

READY = b"tolaria-worker-ready"

# ``runpy.run_path`` runs this file under this name, with the connection in its globals.
RUN_NAME = "__tolaria_worker_child__"


def serve(connection: Connection) -> None:
    """Serve requests on ``connection`` until the parent closes it.

    Each request is a pickled ``(fn, args, kwargs)``; each reply a pickled
    ``("ok", value)`` or ``("error", exception, traceback_text)``.
    """
    # Ctrl-C reaches the whole process group; the parent decides when this process ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    connection.send_bytes(READY)
    while True:
        try:
            request = connection.recv_bytes()
        except (EOFError, OSError):
            # The parent closed its end or exited: nothing is left to serve.
            return
        connection.send_bytes(run_request(request))


def run_request(request: bytes) -> bytes:
    """Run one pickled call and return the pickled reply."""
    try:
        fn, args, kwargs = pickle.loads(request)
        value = fn(*args, **kwargs)
    except BaseException as error:  # noqa: BLE001 - the parent re-raises it to the caller
        return _pack_error(error)

    try:
        return pickle.dumps(("ok", value), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:  # noqa: BLE001 - reported to the caller instead of killing the process
        return _pack_error(TypeError(f"the result of type {type(value).__name__} cannot be pickled: {error}"))


def _pack_error(error: BaseException) -> bytes:
    text = "".join(traceback.format_exception(error))
    reply: tuple[Any, ...] = ("error", error, text)
    try:
        return pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - an unpicklable exception still reaches the caller as text
        substitute = RuntimeError(f"{type(error).__name__}: {error}")
        return pickle.dumps(("error", substitute, text), protocol=pickle.HIGHEST_PROTOCOL)


if __name__ == RUN_NAME:
    serve(globals()["connection"])
