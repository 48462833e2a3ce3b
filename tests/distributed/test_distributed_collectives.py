"""Two gloo ranks under torchrun on loopback: averaging, agreements, commands and rank-0 saves.

One torchrun job runs every scenario of ``rank_worker.py`` in order; each test checks
the results one scenario saved on both ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optree
import pytest
import torch
import torch.distributed as dist
from distributed_cases import (
    LEVEL_CASES,
    PCGRAD_EXAMPLE,
    ROLLBACK_CASES,
    ControlCommand,
    stacked_gradients,
    unstacked_gradients,
)
from spawn_ranks import JobResult, load_result, run_torchrun

GLOO_AVAILABLE = dist.is_available() and dist.is_gloo_available()

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not GLOO_AVAILABLE, reason="torch.distributed with the gloo backend is not available"),
]

RANKS = (0, 1)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, JobResult]:
    out_dir = tmp_path_factory.mktemp("collectives")
    result = run_torchrun("collectives", out_dir, timeout_s=60, deadline_s=180)
    return out_dir, result


def scenario_results(job: tuple[Path, JobResult], scenario: str) -> list[dict[str, Any]]:
    """Load the scenario's result on each rank, failing with the job's logs if it is missing or raised."""
    out_dir, result = job
    outcomes = []
    for rank in RANKS:
        path = out_dir / f"{scenario}.rank{rank}.pt"
        if not path.exists():
            pytest.fail(f"rank {rank} saved no result for {scenario!r}; job logs:\n{result.describe()}")
        outcome = load_result(out_dir, scenario, rank)
        if "unexpected" in outcome:
            pytest.fail(f"rank {rank} raised in {scenario!r}:\n{outcome['unexpected']['traceback']}")
        outcomes.append(outcome)
    return outcomes


def reference_pcgrad(grads: torch.Tensor) -> torch.Tensor:
    """Sum of PCGrad-projected gradients for [n, d] ``grads``, projecting in index order.

    Each g_i is projected onto the normal plane of every original g_j it conflicts with
    (negative inner product). For n = 2 the order does not matter.
    """
    projected = []
    for i in range(grads.shape[0]):
        g = grads[i].clone()
        for j in range(grads.shape[0]):
            if j != i and torch.dot(g, grads[j]) < 0:
                g = g - torch.dot(g, grads[j]) / torch.dot(grads[j], grads[j]) * grads[j]
        projected.append(g)
    return torch.stack(projected).sum(dim=0)


def expected_mean(tree_0: Any, tree_1: Any, *, upcast: bool) -> Any:
    def mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dtype in (torch.float16, torch.bfloat16):
            if upcast:
                return ((a.float() + b.float()) / 2).to(a.dtype)
            return a / 2 + b / 2
        return (a + b) / 2

    return optree.tree_map(mean, tree_0, tree_1)


def assert_same_mean(averaged: Any, expected: Any) -> None:
    """Check structure, dtypes and shapes, and values: exact in float32/float64, to rounding in half precision."""
    leaves, spec = optree.tree_flatten(averaged)
    expected_leaves, expected_spec = optree.tree_flatten(expected)
    assert spec == expected_spec
    for leaf, want in zip(leaves, expected_leaves, strict=True):
        assert leaf.dtype == want.dtype
        assert leaf.shape == want.shape
        if want.dtype in (torch.float16, torch.bfloat16):
            torch.testing.assert_close(leaf, want)
        else:
            assert torch.equal(leaf, want)


def test_job_exits_cleanly(job: tuple[Path, JobResult]) -> None:
    _, result = job
    assert result.returncodes == {"torchrun": 0}, result.describe()


def test_context_from_torchrun_environment(job: tuple[Path, JobResult]) -> None:
    for rank, fields in zip(RANKS, scenario_results(job, "barrier_and_context"), strict=True):
        assert fields["rank"] == rank
        assert fields["world_size"] == 2
        assert fields["local_rank"] == rank
        assert fields["backend"] == "gloo"
        assert fields["device"] == "cpu"
        assert fields["is_initialized"] is True
        assert fields["owns_group"] is True
        assert fields["initialized_after_close"] is False


def test_rank_path_distinct_per_rank(job: tuple[Path, JobResult]) -> None:
    names = [fields["telemetry_path"] for fields in scenario_results(job, "barrier_and_context")]
    assert names == ["telemetry.jsonl", "telemetry.rank1.jsonl"]


@pytest.mark.parametrize(
    ("variant", "upcast"),
    [("small_buckets", True), ("default_buckets", True), ("native_low_precision", False), ("checked_layout", True)],
)
def test_average_equals_mean_of_ranks(job: tuple[Path, JobResult], variant: str, upcast: bool) -> None:
    expected = expected_mean(stacked_gradients(0), stacked_gradients(1), upcast=upcast)
    for outcome in scenario_results(job, "average"):
        assert_same_mean(outcome["results"][variant], expected)


def test_average_gradients_mixed_tree(job: tuple[Path, JobResult]) -> None:
    expected = expected_mean(
        {"shared": stacked_gradients(0), "exclusive": unstacked_gradients(0)},
        {"shared": stacked_gradients(1), "exclusive": unstacked_gradients(1)},
        upcast=True,
    )
    for outcome in scenario_results(job, "average"):
        assert_same_mean(outcome["results"]["mixed"], expected)


def test_average_identical_on_both_ranks(job: tuple[Path, JobResult]) -> None:
    rank_0, rank_1 = scenario_results(job, "average")
    for variant, tree in rank_0["results"].items():
        for leaf_0, leaf_1 in zip(
            optree.tree_leaves(tree), optree.tree_leaves(rank_1["results"][variant]), strict=True
        ):
            assert torch.equal(leaf_0, leaf_1), variant


def test_average_keeps_none_leaves(job: tuple[Path, JobResult]) -> None:
    for outcome in scenario_results(job, "average"):
        averaged = outcome["results"]["small_buckets"]
        assert averaged["encoder"]["frozen"] is None
        assert averaged["heads"][1] is None


def test_average_leaves_input_unchanged(job: tuple[Path, JobResult]) -> None:
    for outcome in scenario_results(job, "average"):
        assert outcome["input_unchanged"] is True


def test_pcgrad_after_average_example(job: tuple[Path, JobResult]) -> None:
    local = {rank: torch.tensor(PCGRAD_EXAMPLE[rank]) for rank in RANKS}
    per_rank_then_mean = (reference_pcgrad(local[0]) + reference_pcgrad(local[1])) / 2
    assert torch.equal(per_rank_then_mean, torch.tensor([1.25, 1.25]))

    for outcome in scenario_results(job, "pcgrad_example"):
        averaged = outcome["averaged"]
        assert torch.equal(averaged, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        assert torch.equal(reference_pcgrad(averaged), torch.tensor([1.0, 1.0]))


def test_library_pcgrad_after_average_example(job: tuple[Path, JobResult]) -> None:
    aggregation = pytest.importorskip("tolaria.functional.aggregation", reason="tolaria's PCGrad is not built yet")
    for outcome in scenario_results(job, "pcgrad_example"):
        from_sequence = aggregation.pcgrad(list(outcome["averaged"].unbind(0)), seed=0)
        from_stacked = aggregation.pcgrad(outcome["averaged"], stacked=True, seed=0)
        assert torch.equal(from_sequence.grad, torch.tensor([1.0, 1.0]))
        assert torch.equal(from_stacked.grad, torch.tensor([1.0, 1.0]))


def test_agree_any_nan_on_one_rank(job: tuple[Path, JobResult]) -> None:
    for outcome in scenario_results(job, "anomaly"):
        assert outcome["nan_on_rank1"] is True
        assert outcome["all_finite"] is False
        assert outcome["vector_flag"] is True
        assert outcome["python_false"] is False
        assert outcome["python_true_on_rank0"] is True


def test_agree_level_takes_max(job: tuple[Path, JobResult]) -> None:
    expected = {name: max(case.values()) for name, case in LEVEL_CASES.items()}
    for outcome in scenario_results(job, "levels"):
        assert outcome["agreed"] == expected
        assert outcome["halt"] == "HALT"
        assert outcome["combined"] == [1, 5]


@pytest.mark.parametrize("case", sorted(ROLLBACK_CASES))
def test_agree_rollback_step(job: tuple[Path, JobResult], case: str) -> None:
    common = set(ROLLBACK_CASES[case][0]) & set(ROLLBACK_CASES[case][1])
    expected = max(common) if common else None
    for outcome in scenario_results(job, "rollback"):
        assert outcome[case] == expected


def test_broadcast_command_reaches_all(job: tuple[Path, JobResult]) -> None:
    sent_by_rank_0 = ControlCommand(action="rollback", step=12, lr_scale=0.5, targets=("encoder",))
    sent_by_rank_1 = ControlCommand("halt", 13, 0.0)
    for outcome in scenario_results(job, "commands"):
        assert outcome["from_rank0"] == repr(sent_by_rank_0)
        assert outcome["from_rank1"] == repr(sent_by_rank_1)


def test_save_on_main_commits_before_return(job: tuple[Path, JobResult]) -> None:
    out_dir, _ = job
    for outcome in scenario_results(job, "checkpoint"):
        assert outcome["returned"] == str(out_dir / "checkpoint.pt")
        assert outcome["exists_on_return"] is True
        assert outcome["loaded"]["step"] == 99
        assert torch.equal(outcome["loaded"]["weight"], torch.arange(4.0))


def test_save_on_main_failure_reaches_all(job: tuple[Path, JobResult]) -> None:
    rank_0, rank_1 = scenario_results(job, "failed_checkpoint")
    assert rank_0["error_type"] == "OSError"
    assert rank_0["message"] == "disk full while writing checkpoint.pt"
    assert rank_1["error_type"] == "RankFailure"
    assert rank_1["failed_ranks"] == [0]
    assert "save_on_main failed on rank 0 at step 100" in rank_1["message"]
    assert "OSError: disk full" in rank_1["message"]


def test_layout_mismatch_raises_on_every_rank(job: tuple[Path, JobResult]) -> None:
    for outcome in scenario_results(job, "layout_mismatch"):
        assert outcome["error_type"] == "ValueError"
        assert "ranks [1] do not match rank 0" in outcome["message"]
