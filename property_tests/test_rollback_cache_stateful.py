"""Stateful property test of the LRU snapshot cache against a plain reference model.

The reference keeps a dict of step -> size and a list of steps in LRU order and
applies the textbook rules; after every operation the pure cache must agree with it
and keep its invariants: ``size_bytes`` equals the sum of the entries, never exceeds
the capacity, and each step occurs once.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tolaria.functional import rollback as core

CAPACITY = 1_000
steps = st.integers(min_value=0, max_value=30)
sizes = st.integers(min_value=0, max_value=CAPACITY)


class SnapshotCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cache: core.SnapshotCache[object] = core.empty(CAPACITY)
        self.sizes: dict[int, int] = {}
        self.order: list[int] = []

    @initialize(capacity=st.integers(min_value=1, max_value=CAPACITY))
    def start(self, capacity: int) -> None:
        self.cache = core.empty(capacity)

    def _reference_put(self, step: int, size: int) -> tuple[int, ...]:
        if step in self.sizes:
            self.order.remove(step)
            del self.sizes[step]
        evicted = []
        while self.order and sum(self.sizes.values()) + size > self.cache.capacity_bytes:
            oldest = self.order.pop(0)
            del self.sizes[oldest]
            evicted.append(oldest)
        self.sizes[step] = size
        self.order.append(step)
        return tuple(evicted)

    @rule(step=steps, size=sizes)
    def put(self, step: int, size: int) -> None:
        if size > self.cache.capacity_bytes:
            with pytest.raises(ValueError, match="can never fit"):
                core.put(self.cache, step, ("snapshot", step, size), size_bytes=size)
            return
        before = self.cache
        self.cache, evicted = core.put(before, step, ("snapshot", step, size), size_bytes=size)
        assert evicted == self._reference_put(step, size)
        assert step not in evicted

    @precondition(lambda self: bool(self.order))
    @rule(data=st.data(), size=sizes)
    def replace_same_step(self, data: st.DataObject, size: int) -> None:
        step = data.draw(st.sampled_from(sorted(self.sizes)))
        size = min(size, self.cache.capacity_bytes)
        others = sum(value for key, value in self.sizes.items() if key != step)
        self.cache, evicted = core.put(self.cache, step, ("replaced", step, size), size_bytes=size)
        assert evicted == self._reference_put(step, size)
        if others + size <= self.cache.capacity_bytes:
            # Replacing a step must only release its own old size, never evict others.
            assert evicted == ()

    @rule(numel=st.integers(min_value=0, max_value=CAPACITY // 4), step=steps)
    def put_tensor(self, numel: int, step: int) -> None:
        tensor = torch.zeros(numel, dtype=torch.float32)
        size = 4 * numel
        if size > self.cache.capacity_bytes:
            return
        self.cache, evicted = core.put(self.cache, step, tensor)
        assert evicted == self._reference_put(step, size)

    @rule(step=steps)
    def nearest(self, step: int) -> None:
        self.cache, found, snapshot = core.nearest(self.cache, step)
        candidates = [key for key in self.sizes if key <= step]
        expected = max(candidates, default=None)
        assert found == expected
        assert (snapshot is None) == (expected is None)
        if expected is not None:
            self.order.remove(expected)
            self.order.append(expected)

    @rule(step=steps)
    def remove(self, step: int) -> None:
        self.cache = core.remove(self.cache, step)
        if step in self.sizes:
            self.order.remove(step)
            del self.sizes[step]

    @rule(step=steps)
    def discard_newer(self, step: int) -> None:
        self.cache, dropped = core.discard_newer(self.cache, step)
        expected = {key for key in self.sizes if key > step}
        assert set(dropped) == expected
        for key in expected:
            self.order.remove(key)
            del self.sizes[key]

    @invariant()
    def size_is_sum_of_entries(self) -> None:
        assert self.cache.size_bytes == sum(entry.size_bytes for entry in self.cache.entries)

    @invariant()
    def size_within_capacity(self) -> None:
        assert self.cache.size_bytes <= self.cache.capacity_bytes

    @invariant()
    def steps_unique(self) -> None:
        listed = [entry.step for entry in self.cache.entries]
        assert len(listed) == len(set(listed))

    @invariant()
    def matches_reference(self) -> None:
        assert [entry.step for entry in self.cache.entries] == self.order
        assert {entry.step: entry.size_bytes for entry in self.cache.entries} == self.sizes


SnapshotCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestSnapshotCache = SnapshotCacheMachine.TestCase
