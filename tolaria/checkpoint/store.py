"""Saving checkpoints atomically, and rotating old ones.

Layout of a checkpoint folder::

    checkpoint-000000000120-1f2e3d4c.pt   # the state, written by torch.save
    checkpoint-000000000120.json          # the manifest: its presence commits step 120
    latest.json                           # {"step": 120, "manifest": "checkpoint-000000000120.json"}

``save`` writes the data file, then the manifest, then ``latest.json``, each
atomically (see ``tolaria.checkpoint.files``), and only then deletes checkpoints
beyond ``keep_last``. A crash at any point leaves every committed checkpoint
loadable. Discovery reads the manifests, and ``latest.json`` is a convenience for
people and tools that is never trusted over them. One process writes a folder at a
time (on several ranks, rank 0 only).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tolaria.checkpoint.errors import CheckpointError, CheckpointFormatError, CheckpointWriteError
from tolaria.checkpoint.files import fsync_directory, remove_stale_temp_files, write_atomic
from tolaria.checkpoint.manifest import FileRecord, Manifest, serialize_manifest
from tolaria.checkpoint.reader import CheckpointInfo, manifest_name, manifest_paths, read_info
from tolaria.checkpoint.state import check_weights_only_safe
from tolaria.telemetry import Level, Telemetry

__all__ = ["LATEST_POINTER", "save"]

logger = logging.getLogger(__name__)

LATEST_POINTER = "latest.json"
_DATA_NAME = re.compile(r"^checkpoint-(?P<step>\d{12})-[0-9a-f]+\.pt$")


def _telemetry(telemetry: Telemetry | None) -> Telemetry:
    return Telemetry() if telemetry is None else telemetry


def _check_arguments(step: int, keep_last: int | None) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be an int >= 1 or None to keep every checkpoint, got {keep_last!r}")


def _serialize(state: Mapping[str, Any]) -> Any:
    def write(writer: Any) -> None:
        torch.save(dict(state), writer)

    return write


def _write_checkpoint(
    directory: Path, step: int, state: Mapping[str, Any], metadata: Mapping[str, Any]
) -> CheckpointInfo:
    data_name = f"checkpoint-{step:012d}-{uuid.uuid4().hex[:8]}.pt"
    data_path = directory / data_name
    written = write_atomic(data_path, _serialize(state))
    try:
        record = FileRecord(data_name, "state", written.size_bytes, written.sha256)
        manifest = Manifest(step=step, files=(record,), created_unix_s=time.time(), metadata=dict(metadata))
        encoded = serialize_manifest(manifest)
        manifest_path = directory / manifest_name(step)
        write_atomic(manifest_path, lambda writer: writer.write(encoded))
    except BaseException:
        # Without its manifest the data file is an orphan that nothing would ever load,
        # unless the manifest was renamed into place and only the folder sync failed.
        if data_name not in _previous_files(directory, step):
            data_path.unlink(missing_ok=True)
        raise
    return CheckpointInfo(step, manifest_path, manifest)


def _write_pointer(info: CheckpointInfo) -> None:
    pointer = json.dumps({"step": info.step, "manifest": info.manifest_path.name}).encode() + b"\n"
    write_atomic(info.directory / LATEST_POINTER, lambda writer: writer.write(pointer))


def _report_save_failure(telemetry: Telemetry, directory: Path, step: int, error: BaseException) -> None:
    logger.error("saving checkpoint of step %d in %s failed: %s", step, directory, error, exc_info=error)
    telemetry.count("tolaria.checkpoint.save_failures")
    telemetry.event(
        "tolaria.checkpoint.save_failed",
        Level.ERROR,
        path=str(directory),
        step=step,
        error=type(error).__name__,
        reason=str(error),
    )


def _previous_files(directory: Path, step: int) -> tuple[str, ...]:
    """Return the data files of an earlier save of the same step, which the new one replaces."""
    try:
        return tuple(record.name for record in read_info(directory / manifest_name(step)).manifest.files)
    except CheckpointError:
        return ()


def save(
    directory: str | os.PathLike[str],
    state: Mapping[str, Any],
    *,
    step: int,
    keep_last: int | None = 3,
    metadata: Mapping[str, Any] | None = None,
    telemetry: Telemetry | None = None,
) -> CheckpointInfo:
    """Write ``state`` as the checkpoint of ``step`` in ``directory`` and commit it atomically.

    ``state`` is usually ``capture_training_state(...)``; it must contain only what
    ``torch.load(weights_only=True)`` accepts. Saving a step that already exists
    replaces it atomically. After the commit, checkpoints beyond the newest
    ``keep_last`` are deleted (``None`` keeps all) together with leftovers of
    crashed saves.

    Telemetry: counter ``tolaria.checkpoint.saved``, metrics ``tolaria.checkpoint.save_ms``
    and ``tolaria.checkpoint.bytes``; on failure counter ``tolaria.checkpoint.save_failures``
    and the ERROR event ``tolaria.checkpoint.save_failed``.

    Raises:
        ValueError: ``step`` or ``keep_last`` is invalid.
        CheckpointFormatError: ``state`` contains a value that ``weights_only`` loading rejects.
        CheckpointWriteError: writing failed (full disk, I/O error); committed checkpoints,
            the one of ``step`` included, are untouched.
    """
    folder = Path(directory)
    sink = _telemetry(telemetry)
    _check_arguments(step, keep_last)
    try:
        check_weights_only_safe(state)
    except TypeError as error:
        raise CheckpointFormatError(folder, str(error)) from error

    started = time.perf_counter()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        replaced = _previous_files(folder, step)
        info = _write_checkpoint(folder, step, state, metadata or {})
        _write_pointer(info)
    except OSError as error:
        _report_save_failure(sink, folder, step, error)
        raise CheckpointWriteError(folder, f"saving the checkpoint of step {step} failed: {error}") from error

    elapsed_ms = (time.perf_counter() - started) * 1000.0
    sink.count("tolaria.checkpoint.saved")
    sink.metric("tolaria.checkpoint.save_ms", elapsed_ms, "ms")
    sink.metric("tolaria.checkpoint.bytes", float(info.manifest.files[0].size_bytes), "B")
    logger.info("saved checkpoint of step %d to %s in %.1f ms", step, info.manifest_path, elapsed_ms)
    _clean_up(folder, keep_last, info, replaced, sink)
    return info


def _delete_checkpoint(directory: Path, step: int, manifest_path: Path) -> None:
    """Delete the manifest first, so the checkpoint stops counting before its data goes."""
    try:
        names = [record.name for record in read_info(manifest_path).manifest.files]
    except CheckpointError:
        names = []
    manifest_path.unlink(missing_ok=True)
    for name in names:
        (directory / name).unlink(missing_ok=True)
    logger.info("deleted checkpoint of step %d from %s", step, directory)


def _orphan_data_files(directory: Path, newest_step: int) -> list[Path]:
    """Data files no manifest names, left by a save that crashed before its commit."""
    referenced: set[str] = set()
    for _, manifest_path in manifest_paths(directory):
        try:
            referenced.update(record.name for record in read_info(manifest_path).manifest.files)
        except CheckpointError:
            continue
    orphans = []
    for entry in directory.iterdir():
        match = _DATA_NAME.match(entry.name)
        if match is not None and entry.name not in referenced and int(match.group("step")) <= newest_step:
            orphans.append(entry)
    return orphans


def _clean_up(
    directory: Path, keep_last: int | None, committed: CheckpointInfo, replaced: tuple[str, ...], sink: Telemetry
) -> None:
    """Rotate old checkpoints and remove leftovers; an ``OSError`` is reported, not raised."""
    try:
        for name in replaced:
            if name not in {record.name for record in committed.manifest.files}:
                (directory / name).unlink(missing_ok=True)
        if keep_last is not None:
            for step, manifest_path in manifest_paths(directory)[keep_last:]:
                _delete_checkpoint(directory, step, manifest_path)
        for orphan in _orphan_data_files(directory, committed.step):
            orphan.unlink(missing_ok=True)
        remove_stale_temp_files(directory)
        fsync_directory(directory)
    except OSError as error:
        logger.warning("cleaning up old checkpoints in %s failed: %s", directory, error)
        sink.count("tolaria.checkpoint.cleanup_failures")
        sink.event("tolaria.checkpoint.cleanup_failed", Level.WARNING, path=str(directory), reason=str(error))
