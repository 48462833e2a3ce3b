"""Two-tier rollback: in-memory snapshots (fast tier) and checkpoints (full tier).

``RollbackManager`` captures snapshots of the model, optimizer, LR scheduler,
gradient scaler, RNG states and trainer values into preallocated buffers and rolls
the live objects back to the newest state at or before a step within a deadline.
The decisions it follows are pure functions in ``tolaria.functional.rollback``.
"""

from tolaria.functional.rollback import AttemptStatus, Tier
from tolaria.rollback.buffers import BufferPool, HostBuffer
from tolaria.rollback.manager import RollbackManager
from tolaria.rollback.results import CheckpointLoader, DeadlineSignal, RollbackResult
from tolaria.rollback.snapshot import SnapshotMismatch, StateSnapshot

__all__ = [
    "AttemptStatus",
    "BufferPool",
    "CheckpointLoader",
    "DeadlineSignal",
    "HostBuffer",
    "RollbackManager",
    "RollbackResult",
    "SnapshotMismatch",
    "StateSnapshot",
    "Tier",
]
