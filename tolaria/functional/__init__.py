"""The pure functional core: functions over pytrees of tensors and immutable states.

Nothing here does I/O, reads a clock, starts a thread, uses the global RNG or
mutates its inputs. Modules:

* ``aggregation``: multi-objective gradient aggregation (sum, mean, weighted, PCGrad);
* ``anomaly``: loss anomaly detection (non-finite values, spikes);
* ``emergency``: emergency levels and their transitions;
* ``breaker``: the circuit breaker state machine;
* ``rollback``: the snapshot cache and the two-tier rollback decision.
"""

from tolaria.functional import aggregation, anomaly, breaker, emergency, rollback

__all__ = ["aggregation", "anomaly", "breaker", "emergency", "rollback"]
