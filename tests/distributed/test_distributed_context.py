"""In-process checks: the single-process context, input validation, and one-rank process groups."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from spawn_ranks import free_port

from tolaria.distributed import (
    TORCHRUN_VARIABLES,
    DistributedContext,
    DistributedTimeout,
    RankFailure,
    agree_any,
    agree_level,
    agree_max,
    agree_rollback_step,
    average_gradients,
    average_stacked_gradients,
    barrier,
    broadcast_command,
    is_main_process,
    rank_path,
    save_on_main,
)
from tolaria.distributed.errors import collective_guard, find_failed_ranks

GLOO_AVAILABLE = dist.is_available() and dist.is_gloo_available()
needs_gloo = pytest.mark.skipif(not GLOO_AVAILABLE, reason="torch.distributed with the gloo backend is not available")

SINGLE = DistributedContext.single_process(device="cpu")


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def torchrun_environment(clean_environment: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Set the variables torchrun sets for a one-process job on loopback."""
    values = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for name, value in values.items():
        clean_environment.setenv(name, value)
    clean_environment.setenv("MASTER_PORT", str(free_port()))
    clean_environment.setenv("GLOO_SOCKET_IFNAME", "lo")
    yield clean_environment
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def caller_group() -> Iterator[None]:
    """Initialise a one-rank gloo group the way a caller would, without any network."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def stacked_tree() -> dict[str, object]:
    return {"weight": torch.ones(2, 3), "bias": None, "head": [torch.zeros(2, 1, dtype=torch.float16)]}


# Context construction


def test_single_process_context_defaults() -> None:
    assert SINGLE.rank == 0
    assert SINGLE.world_size == 1
    assert SINGLE.backend is None
    assert SINGLE.is_initialized is False
    assert SINGLE.is_distributed is False
    assert SINGLE.owns_group is False
    assert is_main_process(SINGLE)


def test_from_environment_without_variables(clean_environment: pytest.MonkeyPatch) -> None:
    ctx = DistributedContext.from_environment(device="cpu")
    assert ctx == DistributedContext.single_process(device="cpu")
    assert not dist.is_initialized()


def test_from_environment_missing_variables(clean_environment: pytest.MonkeyPatch) -> None:
    clean_environment.setenv("RANK", "0")
    with pytest.raises(ValueError, match="WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT is not set"):
        DistributedContext.from_environment()


def test_from_environment_non_integer_world_size(torchrun_environment: pytest.MonkeyPatch) -> None:
    torchrun_environment.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'two'"):
        DistributedContext.from_environment()


def test_from_environment_rank_out_of_range(torchrun_environment: pytest.MonkeyPatch) -> None:
    torchrun_environment.setenv("RANK", "3")
    with pytest.raises(ValueError, match=r"RANK must be in \[0, WORLD_SIZE\), got RANK=3 and WORLD_SIZE=1"):
        DistributedContext.from_environment()


def test_from_environment_unknown_backend(torchrun_environment: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="backend 'carrier-pigeon' is not available"):
        DistributedContext.from_environment(backend="carrier-pigeon")


def test_from_environment_non_positive_timeout() -> None:
    with pytest.raises(ValueError, match="timeout must be positive, got 0:00:00"):
        DistributedContext.from_environment(timeout=datetime.timedelta(0))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"world_size": 0}, "world_size must be at least 1, got 0"),
        ({"rank": 2, "world_size": 2, "is_initialized": True}, r"rank must be in \[0, 2\), got 2"),
        ({"local_rank": -1}, "local_rank must be non-negative, got -1"),
        ({"world_size": 2, "rank": 1}, "world_size=2 needs an initialised process group"),
        ({"owns_group": True}, "owns_group=True needs is_initialized=True"),
        ({"timeout": datetime.timedelta(seconds=-1)}, "timeout must be positive"),
    ],
)
def test_context_rejects_invalid_fields(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistributedContext(**fields)  # type: ignore[arg-type]


def test_context_is_immutable() -> None:
    with pytest.raises(AttributeError, match="cannot assign to field 'rank'"):
        SINGLE.rank = 1  # type: ignore[misc]


@needs_gloo
def test_from_environment_initialises_and_closes(torchrun_environment: pytest.MonkeyPatch) -> None:
    timeout = datetime.timedelta(seconds=30)
    with DistributedContext.from_environment(timeout=timeout) as ctx:
        assert dist.is_initialized()
        assert ctx.backend == "gloo"
        assert ctx.device == torch.device("cpu")
        assert ctx.owns_group is True
        assert ctx.timeout == timeout
        assert ctx.world_size == 1
        assert ctx.is_distributed is False
    assert not dist.is_initialized()
    ctx.close()


@needs_gloo
def test_from_environment_detects_caller_group(clean_environment: pytest.MonkeyPatch, caller_group: None) -> None:
    ctx = DistributedContext.from_environment()
    assert ctx.is_initialized is True
    assert ctx.owns_group is False
    assert ctx.backend == "gloo"
    ctx.close()
    assert dist.is_initialized()


@needs_gloo
def test_one_rank_group_skips_collectives(clean_environment: pytest.MonkeyPatch, caller_group: None) -> None:
    ctx = DistributedContext.from_environment()
    tree = stacked_tree()
    assert average_stacked_gradients(tree, ctx) is tree
    assert agree_level(3, ctx) == 3
    assert agree_rollback_step([4, 9], ctx) == 9
    barrier(ctx)


# Gradient averaging


def test_average_single_process_returns_input() -> None:
    tree = stacked_tree()
    assert average_stacked_gradients(tree, SINGLE) is tree


def test_average_gradients_single_process() -> None:
    tree = {"temperature": torch.tensor(0.5), "head": torch.ones(4, 3), "unused": None}
    assert average_gradients(tree, SINGLE) is tree


def test_average_gradients_rejects_integer_leaf() -> None:
    with pytest.raises(TypeError, match=r"tree leaf at root\['count'\] must be floating point"):
        average_gradients({"count": torch.tensor(3)}, SINGLE)


def test_average_rejects_non_tensor_leaf() -> None:
    with pytest.raises(TypeError, match=r"leaf at root\['head'\]\[1\] must be a torch.Tensor or None, got float"):
        average_stacked_gradients({"weight": torch.ones(2, 1), "head": [torch.ones(2), 1.5]}, SINGLE)


def test_average_rejects_integer_leaf() -> None:
    with pytest.raises(TypeError, match=r"leaf at root\['steps'\] must be floating point, got dtype torch.int64"):
        average_stacked_gradients({"steps": torch.ones(2, 3, dtype=torch.int64)}, SINGLE)


def test_average_rejects_scalar_leaf() -> None:
    with pytest.raises(ValueError, match=r"leaf at root\['scale'\] has shape \[\] but needs a leading objective"):
        average_stacked_gradients({"scale": torch.tensor(1.0)}, SINGLE)


def test_average_rejects_mixed_objective_counts() -> None:
    tree = {"a": torch.ones(2, 3), "b": torch.ones(3, 3)}
    with pytest.raises(ValueError, match=r"leaf at root\['b'\] has leading size 3 \(shape \[3, 3\]\) but earlier"):
        average_stacked_gradients(tree, SINGLE)


def test_average_rejects_non_positive_bucket_bytes() -> None:
    with pytest.raises(ValueError, match="bucket_bytes must be positive, got 0"):
        average_stacked_gradients(stacked_tree(), SINGLE, bucket_bytes=0)


def test_average_rejects_cpu_leaf_under_nccl() -> None:
    ctx = DistributedContext(rank=0, world_size=2, backend="nccl", device="cuda:0", is_initialized=True)
    with pytest.raises(ValueError, match=r"leaf at root\['head'\]\[0\] is on cpu, but the nccl backend reduces CUDA"):
        average_stacked_gradients(stacked_tree(), ctx)


def test_average_after_group_destroyed() -> None:
    # A context whose group is gone, as after close() or destroy_process_group().
    stale = DistributedContext(rank=0, world_size=2, is_initialized=True)
    with pytest.raises(RuntimeError, match="process group of this context was destroyed"):
        average_stacked_gradients(stacked_tree(), stale)


# Agreement helpers in a single process


def test_agreements_single_process() -> None:
    assert agree_level(2, SINGLE) == 2
    assert agree_max([1, 0, 7], SINGLE) == (1, 0, 7)
    assert agree_any(True, SINGLE) is True
    assert agree_any(torch.tensor([False, False]), SINGLE) is False
    assert agree_rollback_step([3, 8, 5], SINGLE) == 8
    assert agree_rollback_step([], SINGLE) is None


def test_agree_level_rejects_float() -> None:
    with pytest.raises(TypeError, match=r"level must be an int, got float 2\.0"):
        agree_level(2.0, SINGLE)  # type: ignore[arg-type]


def test_agree_max_rejects_string() -> None:
    with pytest.raises(TypeError, match=r"values\[1\] must be an int, got str '3'"):
        agree_max([1, "3"], SINGLE)  # type: ignore[list-item]


def test_agree_any_rejects_float_tensor() -> None:
    with pytest.raises(TypeError, match=r"got a tensor of dtype torch\.float32"):
        agree_any(torch.tensor([0.0]), SINGLE)


def test_agree_any_rejects_int() -> None:
    with pytest.raises(TypeError, match=r"flag must be a bool or a torch\.bool tensor, got int 1"):
        agree_any(1, SINGLE)  # type: ignore[arg-type]


def test_agree_rollback_step_rejects_negative() -> None:
    with pytest.raises(ValueError, match=r"available_steps\[1\] must be non-negative, got -4"):
        agree_rollback_step([3, -4], SINGLE)


def test_agree_rollback_step_rejects_bool() -> None:
    with pytest.raises(TypeError, match=r"available_steps\[0\] must be an int, got bool True"):
        agree_rollback_step([True], SINGLE)


def test_broadcast_command_single_process() -> None:
    command = {"action": "continue"}
    assert broadcast_command(command, SINGLE) is command


def test_broadcast_command_rejects_missing_command() -> None:
    with pytest.raises(ValueError, match="command must not be None on the sending rank 0"):
        broadcast_command(None, SINGLE)


def test_broadcast_command_rejects_bad_source() -> None:
    with pytest.raises(ValueError, match=r"src must be a rank in \[0, 1\), got 1"):
        broadcast_command("stop", SINGLE, src=1)


def test_barrier_rejects_non_positive_timeout() -> None:
    with pytest.raises(ValueError, match="timeout must be positive"):
        barrier(SINGLE, timeout=datetime.timedelta(seconds=0))


# Files and rank-0 work


def test_rank_path_names(tmp_path: Path) -> None:
    rank_1 = DistributedContext(rank=1, world_size=2, is_initialized=True)
    rank_0 = DistributedContext(rank=0, world_size=2, is_initialized=True)
    assert rank_path(tmp_path, "telemetry.jsonl", SINGLE) == tmp_path / "telemetry.jsonl"
    assert rank_path(tmp_path, "telemetry.jsonl", rank_0) == tmp_path / "telemetry.jsonl"
    assert rank_path(tmp_path, "telemetry.jsonl", rank_1) == tmp_path / "telemetry.rank1.jsonl"
    assert rank_path(str(tmp_path), "summary", rank_1) == tmp_path / "summary.rank1"
    assert not is_main_process(rank_1)


@pytest.mark.parametrize("filename", ["", ".", "..", "logs/telemetry.jsonl", "/tmp/x", "a\\b"])
def test_rank_path_rejects_directories(tmp_path: Path, filename: str) -> None:
    with pytest.raises(ValueError, match="filename must be a bare file name without directories"):
        rank_path(tmp_path, filename, SINGLE)


def test_save_on_main_single_process(tmp_path: Path) -> None:
    calls = []

    def write() -> Path:
        calls.append(1)
        target = tmp_path / "checkpoint.pt"
        torch.save({"step": 1}, target)
        return target

    assert save_on_main(write, SINGLE) == tmp_path / "checkpoint.pt"
    assert calls == [1]


def test_save_on_main_single_process_raises() -> None:
    def write() -> None:
        raise OSError("read-only file system")

    with pytest.raises(OSError, match="read-only file system"):
        save_on_main(write, SINGLE)


# Translation of torch's errors


def test_find_failed_ranks_from_monitored_barrier() -> None:
    ctx = DistributedContext(rank=0, world_size=4, is_initialized=True)
    assert find_failed_ranks("[Rank 0]: Ranks 1, 3 failed to pass monitoredBarrier in 5000 ms", ctx) == (1, 3)
    assert find_failed_ranks("[Rank 0]: Rank 2 failed to pass monitoredBarrier in 5000 ms", ctx) == (2,)
    assert find_failed_ranks("received errors while waiting for send/recv from rank 0. Please", ctx) == (0,)
    assert find_failed_ranks("Connection reset by peer", ctx) == ()


def test_find_failed_ranks_two_rank_peer() -> None:
    ctx = DistributedContext(rank=1, world_size=2, is_initialized=True)
    assert find_failed_ranks("Connection reset by peer", ctx) == (0,)


def test_collective_guard_wraps_runtime_error() -> None:
    ctx = DistributedContext(rank=0, world_size=3, is_initialized=True)
    expected = r"all_reduce failed on rank 0 of 3 at step 8 .*torch did not say which"
    with pytest.raises(RankFailure, match=expected) as info, collective_guard("all_reduce", ctx, step=8):
        raise RuntimeError("Connection reset by peer")
    assert not isinstance(info.value, DistributedTimeout)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert info.value.step == 8
    assert info.value.failed_ranks == ()


def test_collective_guard_detects_timeout() -> None:
    ctx = DistributedContext(rank=0, world_size=3, is_initialized=True)
    with (
        pytest.raises(DistributedTimeout, match="broadcast timed out on rank 0 of 3"),
        collective_guard("broadcast", ctx),
    ):
        raise RuntimeError("Timed out waiting 5000ms for recv operation to complete")


def test_collective_guard_leaves_other_errors() -> None:
    with pytest.raises(KeyError, match="missing"), collective_guard("all_reduce", SINGLE):
        raise KeyError("missing")
