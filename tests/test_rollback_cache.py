"""Unit tests of the pure rollback core: the LRU snapshot cache, the tier decision and restore attempts."""

from __future__ import annotations

import optree
import pytest
import torch

from tolaria.functional import rollback as core
from tolaria.functional.rollback import AttemptStatus, Tier


def _assert_consistent(cache: core.SnapshotCache[object]) -> None:
    assert cache.size_bytes == sum(entry.size_bytes for entry in cache.entries)
    assert cache.size_bytes <= cache.capacity_bytes
    assert len({entry.step for entry in cache.entries}) == len(cache.entries)


def _filled(*sizes: tuple[int, int], capacity: int = 100) -> core.SnapshotCache[object]:
    cache: core.SnapshotCache[object] = core.empty(capacity)
    for step, size in sizes:
        cache, _ = core.put(cache, step, f"snapshot-{step}", size_bytes=size)
    return cache


# -- cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -5, 1.5, True, "10"])
def test_empty_rejects_bad_capacity(capacity: object) -> None:
    with pytest.raises(ValueError, match="capacity_bytes must be a positive int"):
        core.empty(capacity)  # type: ignore[arg-type]


def test_empty_cache_state() -> None:
    cache = core.empty(64)
    assert cache == core.SnapshotCache(capacity_bytes=64, entries=(), size_bytes=0)
    assert core.steps(cache) == ()


def test_nbytes_counts_tensor_data() -> None:
    tree = {
        "weight": torch.zeros(3, 4, dtype=torch.float32),
        "nested": [torch.zeros(5, dtype=torch.float64), (torch.zeros(2, dtype=torch.int8), 7)],
        "label": "x",
        "none": None,
        "raw": b"abcd",
    }
    assert core.nbytes(tree) == 3 * 4 * 4 + 5 * 8 + 2 * 1 + 4


def test_nbytes_ignores_strides() -> None:
    base = torch.zeros(10, 10)
    assert core.nbytes(base[:, 0]) == 10 * 4


def test_put_and_nearest_round_trip() -> None:
    cache, evicted = core.put(core.empty(1000), 5, {"w": torch.ones(10)})
    assert evicted == ()
    assert cache.size_bytes == 40
    cache, found, snapshot = core.nearest(cache, 7)
    assert found == 5
    assert snapshot is not None
    assert torch.equal(snapshot["w"], torch.ones(10))


def test_nearest_picks_newest_at_or_before() -> None:
    cache = _filled((2, 10), (8, 10), (5, 10))
    assert core.nearest(cache, 7)[1] == 5
    assert core.nearest(cache, 8)[1] == 8
    assert core.nearest(cache, 100)[1] == 8
    assert core.nearest(cache, 2)[1] == 2


def test_nearest_before_every_entry_misses() -> None:
    cache = _filled((5, 10), (9, 10))
    same, found, snapshot = core.nearest(cache, 4)
    assert same is cache
    assert found is None
    assert snapshot is None


def test_nearest_marks_most_recently_used() -> None:
    cache = _filled((1, 30), (2, 30), (3, 30))
    cache, _, _ = core.nearest(cache, 1)
    assert [entry.step for entry in cache.entries] == [2, 3, 1]
    cache, evicted = core.put(cache, 4, "new", size_bytes=30)
    assert evicted == (2,)
    assert core.steps(cache) == (1, 3, 4)


def test_put_evicts_least_recently_used_by_bytes() -> None:
    cache = _filled((1, 40), (2, 40))
    cache, evicted = core.put(cache, 3, "big", size_bytes=70)
    assert evicted == (1, 2)
    assert core.steps(cache) == (3,)
    assert cache.size_bytes == 70
    _assert_consistent(cache)


def test_put_replacing_step_releases_old_size() -> None:
    cache = _filled((1, 30), (2, 30))
    cache, evicted = core.put(cache, 1, "replacement", size_bytes=50)
    assert evicted == ()
    assert cache.size_bytes == 80
    assert core.peek(cache, 1) == "replacement"
    assert [entry.step for entry in cache.entries] == [2, 1]
    _assert_consistent(cache)


def test_put_replacing_step_many_times_keeps_accounting() -> None:
    cache = core.empty(100)
    for size in (90, 10, 100, 1, 60):
        cache, evicted = core.put(cache, 7, f"size-{size}", size_bytes=size)
        assert evicted == ()
        assert cache.size_bytes == size
        assert len(cache.entries) == 1


def test_put_replacing_step_to_full_capacity_evicts_others() -> None:
    cache = _filled((1, 20), (2, 20))
    cache, evicted = core.put(cache, 2, "whole", size_bytes=100)
    assert evicted == (1,)
    assert core.steps(cache) == (2,)
    assert cache.size_bytes == 100


def test_put_rejects_snapshot_larger_than_capacity() -> None:
    cache = _filled((1, 10))
    with pytest.raises(ValueError, match=r"101 bytes can never fit a cache of capacity_bytes=100"):
        core.put(cache, 2, "huge", size_bytes=101)
    assert core.steps(cache) == (1,)


@pytest.mark.parametrize("step", [-1, 1.0, True, "3"])
def test_put_rejects_bad_step(step: object) -> None:
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        core.put(core.empty(10), step, "x", size_bytes=1)  # type: ignore[arg-type]


def test_put_leaves_input_cache_unchanged() -> None:
    cache = _filled((1, 40), (2, 40))
    before = (cache.entries, cache.size_bytes)
    core.put(cache, 3, "x", size_bytes=50)
    core.nearest(cache, 1)
    assert (cache.entries, cache.size_bytes) == before


def test_zero_size_snapshot_is_stored() -> None:
    cache, evicted = core.put(_filled((1, 100)), 2, "empty", size_bytes=0)
    assert evicted == ()
    assert core.steps(cache) == (1, 2)


def test_make_room_evicts_until_fit() -> None:
    cache = _filled((1, 30), (2, 30), (3, 30))
    room, evicted = core.make_room(cache, 50)
    assert evicted == (1, 2)
    assert room.size_bytes == 30
    with pytest.raises(ValueError, match="size_bytes must be a non-negative int"):
        core.make_room(cache, -1)


def test_remove_and_discard_newer() -> None:
    cache = _filled((1, 10), (4, 10), (6, 10), (9, 10))
    assert core.steps(core.remove(cache, 6)) == (1, 4, 9)
    assert core.remove(cache, 5).entries == cache.entries
    kept, dropped = core.discard_newer(cache, 5)
    assert core.steps(kept) == (1, 4)
    assert sorted(dropped) == [6, 9]
    assert kept.size_bytes == 20


def test_cache_round_trips_through_optree() -> None:
    cache, _ = core.put(core.empty(1000), 3, {"w": torch.arange(4.0)})
    leaves, spec = optree.tree_flatten(cache, namespace="tolaria")
    rebuilt = optree.tree_unflatten(spec, leaves)
    assert rebuilt.capacity_bytes == cache.capacity_bytes
    assert rebuilt.size_bytes == cache.size_bytes
    assert rebuilt.entries[0].step == 3
    assert torch.equal(rebuilt.entries[0].snapshot["w"], torch.arange(4.0))


# -- decision ----------------------------------------------------------------------------


def test_decide_prefers_snapshot() -> None:
    cache = _filled((10, 5), (20, 5))
    decision = core.decide(cache, 15, now_s=1.0, deadline_s=2.0, checkpoint_step=14)
    assert decision == core.RollbackDecision(Tier.FAST, 15, 10, 2.0, "snapshot_available")


def test_decide_uses_checkpoint_without_snapshot() -> None:
    cache = _filled((20, 5))
    decision = core.decide(cache, 15, now_s=1.0, deadline_s=2.0, checkpoint_step=12)
    assert decision.tier is Tier.FULL
    assert decision.source_step == 12


def test_decide_none_without_sources() -> None:
    decision = core.decide(_filled((20, 5)), 15, now_s=1.0, deadline_s=2.0, checkpoint_step=None)
    assert decision.tier is Tier.NONE
    assert decision.source_step is None
    assert decision.reason == "no_snapshot_or_checkpoint"


def test_decide_none_after_deadline() -> None:
    decision = core.decide(_filled((10, 5)), 15, now_s=3.0, deadline_s=2.0, checkpoint_step=None)
    assert decision.tier is Tier.NONE
    assert decision.reason == "deadline_already_passed"


def test_decide_rejects_checkpoint_after_target() -> None:
    with pytest.raises(ValueError, match="checkpoint_step=20 is after target_step=15"):
        core.decide(core.empty(10), 15, now_s=0.0, deadline_s=1.0, checkpoint_step=20)


def test_decide_does_not_touch_lru_order() -> None:
    cache = _filled((1, 5), (2, 5))
    core.decide(cache, 1, now_s=0.0, deadline_s=1.0, checkpoint_step=None)
    assert [entry.step for entry in cache.entries] == [1, 2]


# -- restore attempts ---------------------------------------------------------------------


def _decision(tier: Tier, deadline: float = 10.0) -> core.RollbackDecision:
    return core.RollbackDecision(tier, 50, 40, deadline, "test")


def test_start_rejects_tier_none() -> None:
    with pytest.raises(ValueError, match="tier NONE"):
        core.start(_decision(Tier.NONE), now_s=0.0)


def test_attempt_started_then_restored() -> None:
    attempt = core.start(_decision(Tier.FULL), now_s=1.0)
    assert attempt == core.RestoreAttempt(_decision(Tier.FULL), AttemptStatus.STARTED, 1.0, None, None, None)
    assert core.latency_s(attempt) is None
    assert core.remaining_s(attempt, now_s=4.0) == 6.0

    attempt = core.on_tick(attempt, now_s=5.0)
    assert attempt.status is AttemptStatus.STARTED

    attempt = core.on_restored(attempt, step=40, now_s=6.0)
    assert attempt == core.RestoreAttempt(_decision(Tier.FULL), AttemptStatus.RESTORED, 1.0, 6.0, 40, None)
    assert core.latency_s(attempt) == 5.0


def test_attempt_failed() -> None:
    attempt = core.on_failed(core.start(_decision(Tier.FAST), now_s=1.0), error="boom", now_s=2.0)
    assert attempt.status is AttemptStatus.FAILED
    assert attempt.error == "boom"
    assert attempt.finished_s == 2.0
    assert attempt.restored_step is None


def test_attempt_tick_at_deadline_exceeds() -> None:
    attempt = core.on_tick(core.start(_decision(Tier.FULL, deadline=3.0), now_s=1.0), now_s=3.0)
    assert attempt.status is AttemptStatus.DEADLINE_EXCEEDED
    assert attempt.finished_s == 3.0
    assert "2.000 s" in (attempt.error or "")
    assert core.remaining_s(attempt, now_s=3.5) == 0.0


def test_full_load_after_deadline_is_discarded() -> None:
    attempt = core.on_restored(core.start(_decision(Tier.FULL, deadline=3.0), now_s=1.0), step=40, now_s=3.5)
    assert attempt.status is AttemptStatus.DEADLINE_EXCEEDED
    assert attempt.restored_step is None
    assert "0.500 s after the deadline" in (attempt.error or "")


def test_fast_restore_after_deadline_is_kept() -> None:
    attempt = core.on_restored(core.start(_decision(Tier.FAST, deadline=3.0), now_s=1.0), step=40, now_s=3.5)
    assert attempt.status is AttemptStatus.RESTORED
    assert attempt.restored_step == 40


def test_finished_attempt_ignores_late_events() -> None:
    exceeded = core.on_tick(core.start(_decision(Tier.FULL, deadline=3.0), now_s=1.0), now_s=3.0)
    assert core.on_restored(exceeded, step=40, now_s=4.0) is exceeded
    assert core.on_failed(exceeded, error="late", now_s=4.0) is exceeded
    assert core.on_tick(exceeded, now_s=9.0) is exceeded


def test_restored_step_after_target_rejected() -> None:
    attempt = core.start(_decision(Tier.FULL), now_s=1.0)
    with pytest.raises(ValueError, match="restored step 51 is after target_step=50"):
        core.on_restored(attempt, step=51, now_s=2.0)


def test_event_before_start_rejected() -> None:
    attempt = core.start(_decision(Tier.FULL), now_s=5.0)
    with pytest.raises(ValueError, match="before the attempt started"):
        core.on_tick(attempt, now_s=4.0)
    with pytest.raises(ValueError, match="must be a time in seconds"):
        core.on_tick(attempt, now_s=float("nan"))
