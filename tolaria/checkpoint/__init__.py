"""Atomic, verified checkpoints and the full training state they hold.

``save`` commits a checkpoint atomically with a manifest of SHA-256 digests and
rotates old ones. ``load`` verifies a checkpoint and reads it with
``torch.load(weights_only=True)``. ``find_latest`` and ``load_latest`` fall back past
bad checkpoints with a WARNING event. ``capture_training_state`` and ``restore_training_state`` build and apply the
state dict (model, optimizer, scheduler, scaler, RNG, trainer counters) that makes a
resumed run match an uninterrupted one.
"""

from tolaria.checkpoint.discovery import find_latest, load_latest
from tolaria.checkpoint.errors import (
    CheckpointCorrupted,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFound,
    CheckpointWriteError,
)
from tolaria.checkpoint.manifest import FORMAT_VERSION, FileRecord, Manifest
from tolaria.checkpoint.reader import CheckpointInfo, list_checkpoints, load, read_info, verify
from tolaria.checkpoint.rng import capture_rng_state, restore_rng_state
from tolaria.checkpoint.state import (
    RestoredState,
    capture_training_state,
    check_weights_only_safe,
    restore_training_state,
)
from tolaria.checkpoint.store import LATEST_POINTER, save

__all__ = [
    "FORMAT_VERSION",
    "LATEST_POINTER",
    "CheckpointCorrupted",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointInfo",
    "CheckpointNotFound",
    "CheckpointWriteError",
    "FileRecord",
    "Manifest",
    "RestoredState",
    "capture_rng_state",
    "capture_training_state",
    "check_weights_only_safe",
    "find_latest",
    "list_checkpoints",
    "load",
    "load_latest",
    "read_info",
    "restore_rng_state",
    "restore_training_state",
    "save",
    "verify",
]
