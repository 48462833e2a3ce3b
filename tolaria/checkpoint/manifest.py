"""The checkpoint manifest: the JSON record whose presence commits a checkpoint.

A manifest names the format and its version, the training step, the creation time
and, for each data file, its role, size and SHA-256. It also carries the SHA-256 of
its own canonical JSON form (``checksum``), so a flipped byte in the manifest is
detected too. Example::

    {"format": "tolaria.checkpoint", "format_version": 1, "step": 120,
     "created_unix_s": 1733337600.5, "metadata": {},
     "files": [{"name": "checkpoint-000000000120-1f2e3d4c.pt", "role": "state",
                "size_bytes": 5545, "sha256": "…"}],
     "checksum": "…"}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from tolaria.checkpoint.errors import CheckpointCorrupted, CheckpointFormatError

__all__ = ["FORMAT", "FORMAT_VERSION", "FileRecord", "Manifest", "parse_manifest", "serialize_manifest"]

FORMAT = "tolaria.checkpoint"
FORMAT_VERSION = 1


class FileRecord(NamedTuple):
    """One data file of a checkpoint: its name in the checkpoint folder, role, size and SHA-256."""

    name: str
    role: str
    size_bytes: int
    sha256: str


class Manifest(NamedTuple):
    """The parsed manifest of one checkpoint.

    Attributes:
        step: training step the checkpoint was taken at.
        files: the data files; a checkpoint written by ``save`` has one with role ``"state"``.
        created_unix_s: ``time.time()`` at save, in seconds.
        metadata: small JSON values given to ``save`` (run id, epoch).
        format_version: version of this layout.
    """

    step: int
    files: tuple[FileRecord, ...]
    created_unix_s: float
    metadata: Mapping[str, Any]
    format_version: int = FORMAT_VERSION


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def serialize_manifest(manifest: Manifest) -> bytes:
    """Return the JSON bytes of ``manifest`` with its checksum.

    Raises:
        TypeError: ``metadata`` contains a value JSON cannot represent.
        ValueError: ``metadata`` contains NaN or an infinity.
    """
    body: dict[str, Any] = {
        "format": FORMAT,
        "format_version": manifest.format_version,
        "step": manifest.step,
        "created_unix_s": manifest.created_unix_s,
        "metadata": dict(manifest.metadata),
        "files": [record._asdict() for record in manifest.files],
    }
    body["checksum"] = hashlib.sha256(_canonical(body)).hexdigest()
    return json.dumps(body, indent=1, sort_keys=True, allow_nan=False).encode() + b"\n"


def _load_json(path: Path, data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointCorrupted(path, f"manifest is not valid JSON: {error}") from error
    if not isinstance(body, dict):
        raise CheckpointFormatError(path, f"manifest must be a JSON object, got {type(body).__name__}")
    return body


def _check_header(path: Path, body: Mapping[str, Any]) -> None:
    if body.get("format") != FORMAT:
        raise CheckpointFormatError(path, f"format is {body.get('format')!r}, expected {FORMAT!r}")
    version = body.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointFormatError(
            path, f"format_version {version!r} is not supported; this tolaria reads version {FORMAT_VERSION}"
        )
    checksum = body.get("checksum")
    rest = {key: value for key, value in body.items() if key != "checksum"}
    if checksum != hashlib.sha256(_canonical(rest)).hexdigest():
        raise CheckpointCorrupted(path, "manifest checksum does not match its content")


def _file_record(path: Path, item: Any) -> FileRecord:
    try:
        record = FileRecord(str(item["name"]), str(item["role"]), int(item["size_bytes"]), str(item["sha256"]))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointFormatError(path, f"invalid file entry {item!r}: {error}") from error
    if "/" in record.name or record.name in ("", ".", ".."):
        raise CheckpointFormatError(path, f"file name {record.name!r} must name a file in the checkpoint folder")
    return record


def parse_manifest(path: Path, data: bytes) -> Manifest:
    """Parse and check the manifest bytes read from ``path``.

    Raises:
        CheckpointCorrupted: the JSON is invalid or its checksum does not match.
        CheckpointFormatError: it is not a tolaria manifest or has an unsupported version.
    """
    body = _load_json(path, data)
    _check_header(path, body)
    try:
        step = int(body["step"])
        created = float(body["created_unix_s"])
        metadata = dict(body.get("metadata", {}))
        items = list(body["files"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointFormatError(path, f"manifest field missing or invalid: {error}") from error
    files = tuple(_file_record(path, item) for item in items)
    return Manifest(step=step, files=files, created_unix_s=created, metadata=metadata)
