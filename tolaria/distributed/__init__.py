"""Multi-process training on ``torch.distributed``: context, gradient averaging and agreed decisions.

Launch with ``torchrun``; ``DistributedContext.from_environment()`` joins or
initialises the process group (NCCL on CUDA, gloo on CPU) and is a no-op
single-process context otherwise. Every helper returns its local input when
there is one rank, so the same training code runs with or without ``torchrun``.
Collective failures raise ``RankFailure`` or ``DistributedTimeout`` instead of hanging.
"""

from tolaria.distributed.agreement import (
    agree_any,
    agree_level,
    agree_max,
    agree_rollback_step,
    barrier,
    broadcast_command,
)
from tolaria.distributed.context import DEFAULT_TIMEOUT, TORCHRUN_VARIABLES, DistributedContext
from tolaria.distributed.coordination import is_main_process, rank_path, save_on_main
from tolaria.distributed.errors import DistributedTimeout, RankFailure
from tolaria.distributed.gradients import DEFAULT_BUCKET_BYTES, average_gradients, average_stacked_gradients

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "DEFAULT_TIMEOUT",
    "TORCHRUN_VARIABLES",
    "DistributedContext",
    "DistributedTimeout",
    "RankFailure",
    "agree_any",
    "agree_level",
    "agree_max",
    "agree_rollback_step",
    "average_gradients",
    "average_stacked_gradients",
    "barrier",
    "broadcast_command",
    "is_main_process",
    "rank_path",
    "save_on_main",
]
