"""Exceptions raised when a checkpoint cannot be written, found or read."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "CheckpointCorrupted",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointNotFound",
    "CheckpointWriteError",
]


class CheckpointError(Exception):
    """A checkpoint operation failed.

    Attributes:
        path: the file or folder the problem concerns.
        problem: what is wrong, in words.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[type[CheckpointError], tuple[Path, str]]:
        return (type(self), (self.path, self.problem))


class CheckpointNotFound(CheckpointError):
    """No committed checkpoint exists at the requested place or step."""


class CheckpointCorrupted(CheckpointError):
    """A file differs from its manifest: truncated, changed or missing."""


class CheckpointFormatError(CheckpointError):
    """A file is not a tolaria checkpoint, has an unsupported version, or contains objects
    that ``torch.load(weights_only=True)`` rejects."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (for example a full disk); earlier checkpoints are untouched."""
