"""Durable file operations: atomic writes with SHA-256, verified reads, stale temp files.

A file is written under a temporary name in its final folder, flushed, ``fsync``-ed
and renamed onto its final name, and then the folder is ``fsync``-ed. After a crash
the final name therefore has the complete old file, the complete new file, or nothing.
Temporary names start with ``.`` and end with ``.<pid>.tmp`` so that a later save can
recognise the leftovers of a process that died.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, NamedTuple, Protocol

from tolaria.checkpoint.errors import CheckpointCorrupted, CheckpointNotFound

__all__ = [
    "Cancellable",
    "HashingWriter",
    "WrittenFile",
    "fsync_directory",
    "read_verified",
    "remove_stale_temp_files",
    "write_atomic",
]

logger = logging.getLogger(__name__)

HASH_CHUNK_BYTES = 8 * 1024 * 1024
_TEMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)\.tmp$")


class Cancellable(Protocol):
    """Anything with ``raise_if_cancelled()``, such as the worker's ``CancelToken``."""

    def raise_if_cancelled(self) -> None:
        """Raise if the work was cancelled."""


class WrittenFile(NamedTuple):
    """A file that was committed: its path, size in bytes and SHA-256 hex digest."""

    path: Path
    size_bytes: int
    sha256: str


class HashingWriter:
    """A binary writer that hashes and counts every byte on its way to ``file``."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._hash = hashlib.sha256()
        self.size_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write ``data``, add it to the digest and return the number of bytes written."""
        self._hash.update(data)
        written = self._file.write(data)
        self.size_bytes += len(data)
        return written

    def flush(self) -> None:
        """Flush the underlying file's buffer to the operating system."""
        self._file.flush()

    def hexdigest(self) -> str:
        """Return the SHA-256 of the bytes written so far."""
        return self._hash.hexdigest()


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable.

    Raises:
        OSError: the folder cannot be opened or synced.
    """
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.{os.getpid()}.tmp")


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        # The write error that brought us here is the one to report; this is secondary.
        logger.exception("could not remove temporary file %s", path)


def write_atomic(path: Path, write: Callable[[HashingWriter], object]) -> WrittenFile:
    """Write a file through ``write`` and commit it atomically at ``path``.

    ``write`` receives a ``HashingWriter``. The temporary file is created exclusively,
    flushed and ``fsync``-ed before the rename, and the folder is ``fsync``-ed after.
    On any error the temporary file is removed and the error propagates; ``path`` is
    left as it was.

    Raises:
        OSError: creating, writing, syncing or renaming failed (``ENOSPC`` included).
    """
    temp = _temp_path(path)
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(descriptor, "wb") as file:
            writer = HashingWriter(file)
            write(writer)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        _discard(temp)
        raise
    fsync_directory(path.parent)
    return WrittenFile(path, writer.size_bytes, writer.hexdigest())


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(directory: Path) -> tuple[Path, ...]:
    """Delete temporary files left in ``directory`` by processes that no longer run.

    Files of this process and of running processes are kept: they may be saves in
    progress. Returns the removed paths.
    """
    removed: list[Path] = []
    for entry in directory.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match is None or not entry.is_file():
            continue
        pid = int(match.group("pid"))
        if pid == os.getpid() or _process_alive(pid):
            continue
        entry.unlink(missing_ok=True)
        removed.append(entry)
    return tuple(removed)


def read_verified(path: Path, *, size_bytes: int, sha256: str, cancel: Cancellable | None = None) -> bytes:
    """Read ``path`` whole and check its size and SHA-256 against the expected ones.

    The hash is computed in chunks of 8 MiB and ``cancel`` is checked between them,
    so a cancelled load stops within one chunk.

    Raises:
        CheckpointNotFound: the file does not exist.
        CheckpointCorrupted: the size or the hash differs (truncated or changed file).
        OSError: the file cannot be read.
    """
    try:
        actual_size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointNotFound(path, "file listed in the manifest is missing") from None
    if actual_size != size_bytes:
        raise CheckpointCorrupted(path, f"size is {actual_size} bytes but the manifest records {size_bytes}")

    data = path.read_bytes()
    digest = hashlib.sha256()
    view = memoryview(data)
    for offset in range(0, len(data), HASH_CHUNK_BYTES):
        if cancel is not None:
            cancel.raise_if_cancelled()
        digest.update(view[offset : offset + HASH_CHUNK_BYTES])
    if digest.hexdigest() != sha256:
        raise CheckpointCorrupted(path, f"SHA-256 is {digest.hexdigest()} but the manifest records {sha256}")
    return data
