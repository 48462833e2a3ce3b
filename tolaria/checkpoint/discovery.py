"""Finding the newest good checkpoint, falling back past bad ones with a WARNING event."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from tolaria.checkpoint.errors import CheckpointError, CheckpointNotFound
from tolaria.checkpoint.files import Cancellable
from tolaria.checkpoint.reader import CheckpointInfo, load, manifest_paths, read_info, verify
from tolaria.telemetry import Level, Telemetry

__all__ = ["find_latest", "load_latest"]

logger = logging.getLogger(__name__)


def _telemetry(telemetry: Telemetry | None) -> Telemetry:
    return Telemetry() if telemetry is None else telemetry


def _report_fallback(telemetry: Telemetry, manifest_path: Path, error: CheckpointError) -> None:
    logger.warning("skipping bad checkpoint %s and falling back to an older one: %s", manifest_path, error)
    telemetry.count("tolaria.checkpoint.bad")
    telemetry.event(
        "tolaria.checkpoint.fallback",
        Level.WARNING,
        path=str(error.path),
        manifest=str(manifest_path),
        error=type(error).__name__,
        reason=error.problem,
    )


def _candidates(directory: Path, at_or_before: int | None) -> list[Path]:
    if at_or_before is not None and (isinstance(at_or_before, bool) or not isinstance(at_or_before, int)):
        raise ValueError(f"at_or_before must be an int step or None, got {at_or_before!r}")
    return [path for step, path in manifest_paths(directory) if at_or_before is None or step <= at_or_before]


def _not_found(directory: Path, at_or_before: int | None, skipped: list[str]) -> CheckpointNotFound:
    where = "" if at_or_before is None else f" at or before step {at_or_before}"
    detail = f"; skipped bad ones: {'; '.join(skipped)}" if skipped else ""
    return CheckpointNotFound(directory, f"no valid checkpoint{where}{detail}")


def find_latest(
    directory: str | os.PathLike[str],
    *,
    at_or_before: int | None = None,
    telemetry: Telemetry | None = None,
    cancel: Cancellable | None = None,
) -> CheckpointInfo:
    """Return the newest checkpoint at or before ``at_or_before`` whose files verify.

    Each bad checkpoint on the way (corrupted, truncated, missing file, wrong format)
    is skipped with a WARNING log, the WARNING event ``tolaria.checkpoint.fallback``
    and the counter ``tolaria.checkpoint.bad``. Files are hashed but not unpickled.

    Raises:
        CheckpointNotFound: no checkpoint qualifies; the message lists those skipped.
        ValueError: ``at_or_before`` is not an int or ``None``.
    """
    folder = Path(directory)
    sink = _telemetry(telemetry)
    skipped: list[str] = []
    for manifest_path in _candidates(folder, at_or_before):
        try:
            return verify(manifest_path, cancel=cancel)
        except CheckpointError as error:
            _report_fallback(sink, manifest_path, error)
            skipped.append(str(error))
    raise _not_found(folder, at_or_before, skipped)


def load_latest(
    directory: str | os.PathLike[str],
    *,
    at_or_before: int | None = None,
    map_location: Any = "cpu",
    telemetry: Telemetry | None = None,
    cancel: Cancellable | None = None,
) -> tuple[CheckpointInfo, dict[str, Any]]:
    """Load the newest good checkpoint at or before ``at_or_before``, falling back past bad ones.

    Like ``find_latest``, but each candidate is read once, verified and unpickled, so a
    file that hashes correctly yet is rejected by the weights-only loader is skipped too.

    Raises:
        CheckpointNotFound: no checkpoint qualifies; the message lists those skipped.
        ValueError: ``at_or_before`` is not an int or ``None``.
    """
    folder = Path(directory)
    sink = _telemetry(telemetry)
    skipped: list[str] = []
    for manifest_path in _candidates(folder, at_or_before):
        try:
            info = read_info(manifest_path)
            return info, load(info, map_location=map_location, cancel=cancel)
        except CheckpointError as error:
            _report_fallback(sink, manifest_path, error)
            skipped.append(str(error))
    raise _not_found(folder, at_or_before, skipped)
