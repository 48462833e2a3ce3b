"""Reading checkpoints: manifests, listing, verification and weights-only loading.

``load`` verifies the size and SHA-256 of each file before unpickling and always
calls ``torch.load(weights_only=True)``. There is no fall-back to full unpickling.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch

from tolaria.checkpoint.errors import CheckpointFormatError, CheckpointNotFound
from tolaria.checkpoint.files import Cancellable, read_verified
from tolaria.checkpoint.manifest import FileRecord, Manifest, parse_manifest

__all__ = [
    "MANIFEST_NAME",
    "CheckpointInfo",
    "list_checkpoints",
    "load",
    "manifest_name",
    "manifest_paths",
    "read_info",
    "verify",
]

MANIFEST_NAME = re.compile(r"^checkpoint-(?P<step>\d{12})\.json$")


class CheckpointInfo(NamedTuple):
    """A committed checkpoint: its step, manifest path and parsed manifest."""

    step: int
    manifest_path: Path
    manifest: Manifest

    @property
    def directory(self) -> Path:
        """The folder holding the checkpoint's files."""
        return self.manifest_path.parent


def manifest_name(step: int) -> str:
    return f"checkpoint-{step:012d}.json"


def read_info(manifest_path: str | os.PathLike[str]) -> CheckpointInfo:
    """Read and check one manifest; the data files are not read.

    Raises:
        CheckpointNotFound: the manifest does not exist.
        CheckpointCorrupted: the manifest is unreadable JSON or fails its checksum.
        CheckpointFormatError: it is not a tolaria manifest, or its step differs from its name.
    """
    path = Path(manifest_path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointNotFound(path, "manifest does not exist") from None
    manifest = parse_manifest(path, data)
    named = MANIFEST_NAME.match(path.name)
    if named is not None and int(named.group("step")) != manifest.step:
        raise CheckpointFormatError(
            path, f"manifest records step {manifest.step} but its name says {named.group('step')}"
        )
    return CheckpointInfo(manifest.step, path, manifest)


def manifest_paths(directory: Path) -> list[tuple[int, Path]]:
    """Return ``(step, path)`` of every manifest in ``directory``, newest step first."""
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = MANIFEST_NAME.match(entry.name)
        if match is not None:
            found.append((int(match.group("step")), entry))
    return sorted(found, reverse=True)


def list_checkpoints(directory: str | os.PathLike[str]) -> tuple[int, ...]:
    """Return the steps of the committed manifests in ``directory``, oldest first (not verified)."""
    return tuple(step for step, _ in reversed(manifest_paths(Path(directory))))


def _unpickle(path: Path, data: bytes, map_location: Any) -> dict[str, Any]:
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointFormatError(
            path,
            "rejected by torch.load(weights_only=True) and not unpickled; tolaria never loads checkpoints "
            f"with weights_only=False, so re-save it with tolaria.checkpoint.save. Loader message: {error}",
        ) from error
    except (RuntimeError, EOFError, ValueError) as error:
        raise CheckpointFormatError(path, f"not a readable torch.save file: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointFormatError(path, f"contains a {type(state).__name__}, expected a dict")
    return state


def _state_record(info: CheckpointInfo) -> FileRecord:
    for record in info.manifest.files:
        if record.role == "state":
            return record
    raise CheckpointFormatError(info.manifest_path, "manifest lists no file with role 'state'")


def load(
    checkpoint: CheckpointInfo | str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    cancel: Cancellable | None = None,
) -> dict[str, Any]:
    """Verify and load one checkpoint, given its ``CheckpointInfo`` or manifest path.

    Every file is checked against the manifest's size and SHA-256 first. The state
    file is then read with ``torch.load(weights_only=True)``, so a file whose pickle
    would import or call arbitrary code is rejected without running it. The file is
    read into memory once, so peak memory is about twice its size.

    Args:
        checkpoint: the checkpoint, or the path of its manifest.
        map_location: passed to ``torch.load``; ``"cpu"`` by default.
        cancel: checked between 8 MiB chunks while hashing.

    Raises:
        CheckpointNotFound: the manifest or a data file is missing.
        CheckpointCorrupted: a file is truncated or changed.
        CheckpointFormatError: not a tolaria checkpoint, or rejected by the weights-only loader.
    """
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else read_info(checkpoint)
    state_record = _state_record(info)
    state_data = b""
    for record in info.manifest.files:
        data = read_verified(
            info.directory / record.name, size_bytes=record.size_bytes, sha256=record.sha256, cancel=cancel
        )
        if record is state_record:
            state_data = data
    if cancel is not None:
        cancel.raise_if_cancelled()
    return _unpickle(info.directory / state_record.name, state_data, map_location)


def verify(checkpoint: CheckpointInfo | str | os.PathLike[str], *, cancel: Cancellable | None = None) -> CheckpointInfo:
    """Check every file of a checkpoint against its manifest without unpickling; return its info.

    Raises:
        CheckpointNotFound, CheckpointCorrupted, CheckpointFormatError: as ``load``.
    """
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else read_info(checkpoint)
    for record in info.manifest.files:
        read_verified(info.directory / record.name, size_bytes=record.size_bytes, sha256=record.sha256, cancel=cancel)
    return info
