"""The control loop: a controller (Tamiyo) proposes a command each epoch, an executor (Kasmina) applies it.

Both calls run on the shared ``tolaria.worker.AsyncWorker`` with deadlines and behind
circuit breakers (``tolaria.functional.breaker``). ``PlateauPolicy`` and
``OptimizerExecutor`` are the reference controller and executor; ``tolaria.control.faults``
makes them hang or fail on chosen epochs.
"""

from tolaria.control.clients import KasminaClient, TamiyoClient
from tolaria.control.commands import AdaptationCommand, CommandKind, CommandRejected
from tolaria.control.executor import OptimizerExecutor
from tolaria.control.faults import FAULT_KINDS, Fault, FaultPlan, InjectedFault, parse_fault, parse_faults
from tolaria.control.loop import KASMINA, TAMIYO, ControlLoop
from tolaria.control.outcome import ControlOutcome, ControlStatus
from tolaria.control.plateau import PlateauPolicy
from tolaria.control.state import EpochState

__all__ = [
    "FAULT_KINDS",
    "KASMINA",
    "TAMIYO",
    "AdaptationCommand",
    "CommandKind",
    "CommandRejected",
    "ControlLoop",
    "ControlOutcome",
    "ControlStatus",
    "EpochState",
    "Fault",
    "FaultPlan",
    "InjectedFault",
    "KasminaClient",
    "OptimizerExecutor",
    "PlateauPolicy",
    "TamiyoClient",
    "parse_fault",
    "parse_faults",
]
