"""``DistributedContext``: which rank this process is, and the process group it talks through.

A context is either a no-op single-process context or a view of the default process
group. A single-process context has no ``torch.distributed`` process group, and every
agreement helper returns its local input. ``from_environment`` finds an initialised
default group, or initialises one from the variables ``torchrun`` sets: ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from collections.abc import Mapping
from types import TracebackType

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_TIMEOUT", "TORCHRUN_VARIABLES", "DistributedContext"]

logger = logging.getLogger(__name__)

# torch's own default for gloo groups is 30 minutes (torch.distributed.constants.default_pg_timeout, torch 2.13).
# A shorter default reports a hung rank sooner. It must still exceed the longest section that only rank 0
# runs while the others wait (a checkpoint write, a controller call).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# Any of these set means the process was launched to be one rank of several.
_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """Rank, world size and process group settings of this process; immutable.

    Attributes:
        rank: global rank of this process, ``0 <= rank < world_size``.
        world_size: number of processes in the default process group.
        local_rank: rank of this process on its machine; selects the CUDA device under NCCL.
        backend: ``"nccl"``, ``"gloo"`` or another torch backend name, ``None`` without a process group.
        device: device that collective tensors are placed on (``cuda:<local_rank>`` under NCCL,
            ``cpu`` under gloo) and the rank's default compute device.
        is_initialized: whether a process group backs this context.
        timeout: collective timeout. For a group this context created it is the group's own
            timeout; for a group found already initialised it only bounds ``barrier``.
        owns_group: whether ``close`` destroys the process group, which is true only when
            ``from_environment`` created it.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    is_initialized: bool = False
    timeout: datetime.timedelta = DEFAULT_TIMEOUT
    owns_group: bool = False

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if self.local_rank < 0:
            raise ValueError(f"local_rank must be non-negative, got {self.local_rank}")
        if self.timeout <= datetime.timedelta(0):
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        if self.world_size > 1 and not self.is_initialized:
            raise ValueError(
                f"world_size={self.world_size} needs an initialised process group; "
                "build the context with DistributedContext.from_environment()"
            )
        if self.owns_group and not self.is_initialized:
            raise ValueError("owns_group=True needs is_initialized=True")

    @property
    def is_distributed(self) -> bool:
        """Whether collectives are needed: a process group with more than one rank."""
        return self.is_initialized and self.world_size > 1

    @classmethod
    def single_process(
        cls, *, device: torch.device | str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT
    ) -> DistributedContext:
        """Build the no-op context of a process that is not part of a process group.

        ``device`` defaults to ``cuda`` when CUDA is available, else ``cpu``.
        """
        return cls(device=_default_device(device), timeout=timeout)

    @classmethod
    def from_environment(
        cls,
        *,
        backend: str | None = None,
        timeout: datetime.timedelta = DEFAULT_TIMEOUT,
        device: torch.device | str | None = None,
    ) -> DistributedContext:
        """Find or initialise the default process group, or build a single-process context.

        In order:

        1. A default process group is already initialised (by the caller or a framework):
           the context describes it and ``close`` leaves it alone. ``LOCAL_RANK`` is read
           from the environment when set, else the global rank is used.
        2. Any of ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` is set: all five torchrun
           variables are required, and a process group is initialised with ``init_method="env://"``
           and ``timeout``, even for ``WORLD_SIZE=1``. ``close`` destroys it.
        3. Otherwise: the single-process context (no process group).

        Args:
            backend: ``None`` picks ``"nccl"`` when CUDA and NCCL are available and ``device`` is
                ``None`` or a CUDA device, else ``"gloo"``.
            timeout: collective timeout of a group created here; also bounds ``barrier``.
            device: overrides the collective device (default ``cuda:<LOCAL_RANK>`` under NCCL, else ``cpu``).

        Raises:
            ValueError: a torchrun variable is missing or not an integer, ``RANK`` is out of
                range, ``timeout`` is not positive, or ``backend`` is not available in this torch build.
            RuntimeError: ``torch.distributed`` is not available in this torch build, or
                ``init_process_group`` failed (re-raised from torch with the rendezvous address).
        """
        if timeout <= datetime.timedelta(0):
            raise ValueError(f"timeout must be positive, got {timeout}")
        if dist.is_available() and dist.is_initialized():
            return cls._from_initialized_group(timeout=timeout, device=device)
        if not any(name in os.environ for name in _RANK_VARIABLES):
            return cls.single_process(device=device, timeout=timeout)
        if not dist.is_available():
            raise RuntimeError(
                "RANK/WORLD_SIZE/LOCAL_RANK are set but this torch build has no torch.distributed; "
                "install a torch build with distributed support or unset them"
            )
        return cls._initialize_from_torchrun(os.environ, backend=backend, timeout=timeout, device=device)

    @classmethod
    def _from_initialized_group(
        cls, *, timeout: datetime.timedelta, device: torch.device | str | None
    ) -> DistributedContext:
        rank = dist.get_rank()
        backend = str(dist.get_backend())
        local_rank = _read_int(os.environ, "LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
        context = cls(
            rank=rank,
            world_size=dist.get_world_size(),
            local_rank=local_rank,
            backend=backend,
            device=_group_device(backend, local_rank, device),
            is_initialized=True,
            timeout=timeout,
            owns_group=False,
        )
        logger.info("using the initialised %s process group: rank %d of %d", backend, context.rank, context.world_size)
        return context

    @classmethod
    def _initialize_from_torchrun(
        cls,
        environ: Mapping[str, str],
        *,
        backend: str | None,
        timeout: datetime.timedelta,
        device: torch.device | str | None,
    ) -> DistributedContext:
        missing = [name for name in TORCHRUN_VARIABLES if name not in environ]
        if missing:
            raise ValueError(
                f"distributed launch detected but {', '.join(missing)} is not set; launch with torchrun, "
                f"or set all of {', '.join(TORCHRUN_VARIABLES)}"
            )
        rank = _read_int(environ, "RANK")
        world_size = _read_int(environ, "WORLD_SIZE")
        local_rank = _read_int(environ, "LOCAL_RANK")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"RANK must be in [0, WORLD_SIZE), got RANK={rank} and WORLD_SIZE={world_size}")

        chosen_backend = _choose_backend(backend, device)
        chosen_device = _group_device(chosen_backend, local_rank, device)
        if chosen_device.type == "cuda":
            # NCCL binds each rank to the current CUDA device, so set it before init.
            torch.cuda.set_device(chosen_device)
        address = f"{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}"
        try:
            dist.init_process_group(
                backend=chosen_backend,
                init_method="env://",
                rank=rank,
                world_size=world_size,
                timeout=timeout,
                device_id=chosen_device if chosen_backend == "nccl" else None,
            )
        except RuntimeError as error:
            raise RuntimeError(
                f"init_process_group({chosen_backend!r}) failed on rank {rank} of {world_size} "
                f"with rendezvous at {address} and timeout {timeout}: {error}"
            ) from error

        logger.info(
            "initialised %s process group: rank %d of %d (local rank %d, device %s, timeout %s, rendezvous %s)",
            chosen_backend,
            rank,
            world_size,
            local_rank,
            chosen_device,
            timeout,
            address,
        )
        return cls(
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            backend=chosen_backend,
            device=chosen_device,
            is_initialized=True,
            timeout=timeout,
            owns_group=True,
        )

    def close(self) -> None:
        """Destroy the default process group if this context created it; idempotent.

        A group found already initialised is left to the code that created it. Do not
        call collectives through this context afterwards.
        """
        if not self.owns_group or not dist.is_initialized():
            return
        dist.destroy_process_group()
        logger.info("destroyed %s process group of rank %d of %d", self.backend, self.rank, self.world_size)

    def __enter__(self) -> DistributedContext:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _read_int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _choose_backend(backend: str | None, device: torch.device | str | None) -> str:
    if backend is None:
        # NCCL reduces only CUDA tensors, so a CPU device needs gloo even on a machine with CUDA.
        wants_cuda = device is None or torch.device(device).type == "cuda"
        cuda_ready = wants_cuda and torch.cuda.is_available() and dist.is_nccl_available()
        return "nccl" if cuda_ready else "gloo"
    if not dist.is_backend_available(backend):
        raise ValueError(
            f"backend {backend!r} is not available in this torch build; use 'gloo' on CPU or 'nccl' on CUDA"
        )
    return backend


def _group_device(backend: str, local_rank: int, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if backend == "nccl":
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
