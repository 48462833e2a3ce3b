"""``Trainer`` on two gloo ranks on loopback: one update for all ranks, agreed skips and rollbacks, resume.

Each job starts two ``trainer_rank_worker.py`` processes with torchrun's environment
variables. The ``agreement`` job runs several training scenarios in one process group.
The tests compare its ranks with each other and with a one-process run in this process.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import distributed_trainer_cases as cases
import pytest
import torch
import torch.distributed as dist
from spawn_ranks import TORCHRUN, JobResult, base_environment, free_port, load_result, run_ranks

from tolaria.demo import digits_objectives
from tolaria.distributed import DistributedContext
from tolaria.functional.emergency import Level
from tolaria.trainer import Trainer

GLOO_AVAILABLE = dist.is_available() and dist.is_gloo_available()

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not GLOO_AVAILABLE, reason="torch.distributed with the gloo backend is not available"),
]

WORKER = Path(__file__).resolve().with_name("trainer_rank_worker.py")
RANKS = (0, 1)
# Collective timeout of the jobs that should not fail, generous because a 2-core machine may be loaded.
JOB_TIMEOUT_S = 60.0
JOB_DEADLINE_S = 240.0
# A hung rank is detected only when the timeout runs out, so that job uses a shorter one.
HANG_TIMEOUT_S = 5.0
# Slack for a loaded 2-core machine on top of a collective timeout.
MARGIN_S = 15.0


def run_trainer_ranks(
    job: str, out_dir: Path, *, timeout_s: float, wait_for: tuple[int, ...] = RANKS, deadline_s: float = JOB_DEADLINE_S
) -> JobResult:
    """Start both ranks of ``job``, wait for the ranks in ``wait_for``, then kill any rank still running."""
    return run_ranks(
        job,
        out_dir,
        timeout_s=timeout_s,
        wait_for=wait_for,
        deadline_s=deadline_s,
        worker=WORKER,
        log_prefix=f"{job}.",
    )


def rank_outcomes(out_dir: Path, result: JobResult, scenario: str) -> list[dict[str, Any]]:
    """Load ``scenario``'s outcome on each rank, failing with the job's logs if one is missing or raised."""
    outcomes = []
    for rank in RANKS:
        if not (out_dir / f"{scenario}.rank{rank}.pt").exists():
            pytest.fail(f"rank {rank} saved no result for {scenario!r}; job logs:\n{result.describe()}")
        outcome = load_result(out_dir, scenario, rank)
        if "unexpected" in outcome:
            pytest.fail(f"rank {rank} raised in {scenario!r}:\n{outcome['unexpected']['traceback']}")
        outcomes.append(outcome)
    return outcomes


def positions(outcome: dict[str, Any]) -> list[tuple[int, int, int]]:
    return [(step["epoch"], step["batch"], step["global_step"]) for step in outcome["steps"]]


def stacked_losses(outcome: dict[str, Any]) -> torch.Tensor:
    """Return the ``[steps, objectives]`` losses of every executed step."""
    return torch.stack([step["losses"] for step in outcome["steps"]])


def assert_same_parameters(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name, value in first.items():
        assert torch.equal(value, second[name]), f"parameter {name} differs"


@pytest.fixture(scope="module")
def agreement(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, JobResult]:
    out_dir = tmp_path_factory.mktemp("trainer_agreement")
    return out_dir, run_trainer_ranks("agreement", out_dir, timeout_s=JOB_TIMEOUT_S)


@pytest.fixture(scope="module")
def resumed(agreement: tuple[Path, JobResult]) -> tuple[Path, JobResult]:
    """Resume, in a new pair of processes, the run whose first half the agreement job wrote."""
    out_dir, _ = agreement
    return out_dir, run_trainer_ranks("resume", out_dir, timeout_s=JOB_TIMEOUT_S)


# Two ranks against one process


@pytest.mark.parametrize("aggregator", cases.MATCH_AGGREGATORS)
def test_two_ranks_match_one_process(agreement: tuple[Path, JobResult], aggregator: str) -> None:
    rank_0, rank_1 = rank_outcomes(*agreement, f"match_{aggregator}")
    reference = cases.train(DistributedContext.single_process(device="cpu"), cases.match_config(aggregator))

    steps_per_epoch = cases.SAMPLES // cases.BATCH_SIZE
    assert len(reference["steps"]) == cases.MATCH_EPOCHS * steps_per_epoch
    assert positions(rank_0) == positions(reference)
    assert positions(rank_1) == positions(reference)
    assert all(step["applied"] for step in rank_0["steps"] + rank_1["steps"])

    # The ranks see different halves of each global batch ...
    assert not torch.allclose(stacked_losses(rank_0), stacked_losses(rank_1))
    # ... whose mean losses average to the loss of the whole batch in one process.
    two_rank_losses = (stacked_losses(rank_0) + stacked_losses(rank_1)) / 2
    torch.testing.assert_close(two_rank_losses, stacked_losses(reference), rtol=1e-5, atol=1e-5)

    assert_same_parameters(rank_0["parameters"], rank_1["parameters"])
    for name, value in reference["parameters"].items():
        torch.testing.assert_close(rank_0["parameters"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_epoch_train_loss_covers_every_rank(agreement: tuple[Path, JobResult]) -> None:
    rank_0, rank_1 = rank_outcomes(*agreement, "match_mean")
    reference = cases.train(DistributedContext.single_process(device="cpu"), cases.match_config("mean"))

    # Rank 0's epoch metrics feed the controller, the telemetry packet and the run
    # summary, so they should describe the whole global batch, as in one process.
    for epoch, expected in enumerate(reference["epoch_train_loss"]):
        for name, value in expected.items():
            assert rank_0["epoch_train_loss"][epoch][name] == pytest.approx(value, rel=1e-5), (epoch, name)
            assert rank_1["epoch_train_loss"][epoch][name] == pytest.approx(value, rel=1e-5), (epoch, name)


# Anomalies on one rank


def skipped_steps(outcome: dict[str, Any]) -> list[int]:
    """Return the indices of the executed steps whose update was skipped."""
    return [index for index, step in enumerate(outcome["steps"]) if not step["applied"]]


def test_nan_on_one_rank_skips_same_step(agreement: tuple[Path, JobResult]) -> None:
    rank_0, rank_1 = rank_outcomes(*agreement, "nan_on_rank1")

    assert torch.isnan(rank_1["steps"][cases.NAN_CALL]["losses"]).all()
    assert torch.isfinite(rank_0["steps"][cases.NAN_CALL]["losses"]).all()
    assert skipped_steps(rank_0) == [cases.NAN_CALL]
    assert skipped_steps(rank_1) == [cases.NAN_CALL]
    assert positions(rank_0) == positions(rank_1)


def test_nan_on_one_rank_keeps_ranks_equal(agreement: tuple[Path, JobResult]) -> None:
    rank_0, rank_1 = rank_outcomes(*agreement, "nan_on_rank1")

    # The skipped step did not advance the global step on either rank.
    nan_step, next_step = rank_0["steps"][cases.NAN_CALL : cases.NAN_CALL + 2]
    assert next_step["global_step"] == nan_step["global_step"]
    assert rank_0["global_step"] == rank_1["global_step"] == len(rank_0["steps"]) - 1
    assert rank_0["rollbacks"] == rank_1["rollbacks"] == 0
    assert_same_parameters(rank_0["parameters"], rank_1["parameters"])


def test_spike_on_one_rank_rolls_back_everywhere(agreement: tuple[Path, JobResult]) -> None:
    rank_0, rank_1 = rank_outcomes(*agreement, "spike_on_rank1")

    spike_0, spike_1 = rank_0["steps"][cases.SPIKE_CALL], rank_1["steps"][cases.SPIKE_CALL]
    assert (spike_1["losses"] > 100 * spike_0["losses"]).all()

    assert rank_0["spikes"] == rank_1["spikes"] == 1
    assert rank_0["rollbacks"] == rank_1["rollbacks"] == 1
    assert positions(rank_0) == positions(rank_1)

    # Snapshots are taken every SPIKE_SNAPSHOT_EVERY steps before a step runs, so the
    # newest clean one is the last multiple at or before the spike's step. After the
    # rollback the loop skips SPIKE_SKIP_BATCHES batches and every batch up to the one
    # that spiked, so training goes on with the batch after the spike.
    steps_per_epoch = cases.SAMPLES // cases.BATCH_SIZE
    restored_step = cases.SPIKE_CALL // cases.SPIKE_SNAPSHOT_EVERY * cases.SPIKE_SNAPSHOT_EVERY
    skipped = max(cases.SPIKE_SKIP_BATCHES, cases.SPIKE_CALL - restored_step + 1)
    next_epoch, next_batch = divmod(restored_step + skipped, steps_per_epoch)
    after_spike = positions(rank_0)[cases.SPIKE_CALL + 1]
    assert after_spike == (next_epoch, next_batch, restored_step)

    assert rank_0["global_step"] == rank_1["global_step"]
    assert rank_0["halted"] is False
    assert_same_parameters(rank_0["parameters"], rank_1["parameters"])


def test_halt_on_one_rank_stops_every_rank(agreement: tuple[Path, JobResult]) -> None:
    out_dir, _ = agreement
    rank_0, rank_1 = rank_outcomes(*agreement, "halt_on_rank1")

    assert rank_0["halted"] is True
    assert rank_1["halted"] is True
    assert rank_0["halt_reason"] == rank_1["halt_reason"]
    # The NaN step is the last one on both ranks, and its update was not applied.
    assert positions(rank_0) == positions(rank_1)
    assert len(rank_0["steps"]) == cases.NAN_CALL + 1
    assert rank_0["global_step"] == rank_1["global_step"] == cases.NAN_CALL
    assert_same_parameters(rank_0["parameters"], rank_1["parameters"])
    # Rank 0 wrote the halted state while rank 1 waited for it.
    assert (out_dir / "halted_run" / "halted" / "latest.json").is_file()


def test_controller_timeout_on_rank0_reaches_every_rank(agreement: tuple[Path, JobResult]) -> None:
    rank_0, rank_1 = rank_outcomes(*agreement, "tamiyo_hangs_on_rank0")

    # The controller halves the learning rate at every epoch end but the one where it hung.
    applied = cases.CONTROL_EPOCHS - 1
    expected_lr = cases.LEARNING_RATE * cases.CONTROL_FACTOR**applied
    assert rank_0["learning_rates"] == pytest.approx([expected_lr])
    assert rank_1["learning_rates"] == rank_0["learning_rates"]
    assert rank_0["conservative_epochs"] == rank_1["conservative_epochs"] == 1
    assert rank_0["emergency_level"] == rank_1["emergency_level"] == int(Level.NOTICE)
    assert_same_parameters(rank_0["parameters"], rank_1["parameters"])


# A lost rank


@pytest.mark.parametrize(
    ("job", "timeout_s", "error_type", "collective_s"),
    [
        # A closed connection is detected at once, well before the timeout.
        pytest.param(
            "rank1_exits", cases.LOST_RANK_TIMEOUT_S, "RankFailure", (0.0, cases.LOST_RANK_TIMEOUT_S), id="exits"
        ),
        # A hung rank is detected when the timeout runs out.
        pytest.param(
            "rank1_hangs",
            HANG_TIMEOUT_S,
            "DistributedTimeout",
            (HANG_TIMEOUT_S * 0.9, HANG_TIMEOUT_S + MARGIN_S),
            id="hangs",
        ),
    ],
)
def test_lost_rank_stops_trainer(
    tmp_path: Path, job: str, timeout_s: float, error_type: str, collective_s: tuple[float, float]
) -> None:
    result = run_trainer_ranks(job, tmp_path, timeout_s=timeout_s, wait_for=(0,), deadline_s=timeout_s + 90)
    assert result.returncodes["rank0"] == 0, result.describe()

    outcome = load_result(tmp_path, job, 0)
    assert outcome.get("error_type") == error_type, outcome
    assert outcome["failed_ranks"] == [1]
    assert f"on rank 0 of 2 at step {cases.LOST_RANK_CALL}" in outcome["message"]
    assert "rank 1 failed or stopped responding" in outcome["message"]
    assert collective_s[0] <= outcome["collective_elapsed_s"] < collective_s[1]
    # The whole fit, including the steps before the loss, ends within the timeout plus slack.
    assert outcome["elapsed_s"] < timeout_s + MARGIN_S


# Checkpoints and resume


def test_resume_matches_uninterrupted_run(resumed: tuple[Path, JobResult]) -> None:
    out_dir, result = resumed
    second_halves = rank_outcomes(out_dir, result, "resume_second_half")
    references = rank_outcomes(out_dir, result, "resume_reference")

    for rank, (second_half, reference) in enumerate(zip(second_halves, references, strict=True)):
        later = [step for step in reference["steps"] if step["epoch"] >= cases.RESUME_FIRST_EPOCHS]
        assert positions(second_half) == positions({"steps": later}), f"rank {rank}"
        assert torch.equal(stacked_losses(second_half), stacked_losses({"steps": later})), f"rank {rank}"
        assert second_half["global_step"] == reference["global_step"]
        assert_same_parameters(second_half["parameters"], reference["parameters"])
    assert_same_parameters(second_halves[0]["parameters"], second_halves[1]["parameters"])


def test_resumed_run_files(resumed: tuple[Path, JobResult]) -> None:
    out_dir, result = resumed
    rank_outcomes(out_dir, result, "resume_second_half")
    run_dir = out_dir / "resumed"

    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert "latest.json" in checkpoints
    assert not [name for name in checkpoints if "rank" in name], checkpoints
    for name, rank in (("telemetry.jsonl", 0), ("telemetry.rank1.jsonl", 1)):
        packets = [json.loads(line) for line in (run_dir / name).read_text().splitlines()]
        assert {packet["rank"] for packet in packets} == {rank}
        assert packets[-1]["step"] == cases.RESUME_TOTAL_EPOCHS * cases.SAMPLES // cases.BATCH_SIZE


def test_resume_restores_each_rank_loss_monitor(resumed: tuple[Path, JobResult]) -> None:
    out_dir, result = resumed
    second_halves = rank_outcomes(out_dir, result, "resume_second_half")
    references = rank_outcomes(out_dir, result, "resume_reference")

    for rank, (second_half, reference) in enumerate(zip(second_halves, references, strict=True)):
        later = [step for step in reference["steps"] if step["epoch"] >= cases.RESUME_FIRST_EPOCHS]
        for resumed_step, reference_step in zip(second_half["steps"], later, strict=True):
            # Unfilled slots of the monitor's window are NaN, hence equal_nan.
            same = torch.allclose(
                resumed_step["monitor_history"], reference_step["monitor_history"], rtol=0, atol=0, equal_nan=True
            )
            assert same, f"rank {rank} resumed with another loss history at step {resumed_step['global_step']}"


def test_resume_keeps_each_rank_counters(resumed: tuple[Path, JobResult]) -> None:
    out_dir, result = resumed
    second_half = rank_outcomes(out_dir, result, "resume_second_half")[1]
    reference = rank_outcomes(out_dir, result, "resume_reference")[1]

    # Only rank 0 writes checkpoints, so rank 1 never counts a saved one.
    assert reference["counters"].get("tolaria.checkpoint.saved", 0) == 0
    assert second_half["counters"].get("tolaria.checkpoint.saved", 0) == 0


# The command-line entry point


def test_torchrun_demo(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [
        str(TORCHRUN),
        "--nproc_per_node=2",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "tolaria",
        "demo",
        "--epochs",
        "2",
        "--out",
        str(run_dir),
        "--no-progress",
        "--device",
        "cpu",
    ]
    completed = subprocess.run(
        command, env=base_environment(), capture_output=True, text=True, timeout=JOB_DEADLINE_S, check=False
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2
    assert summary["halted"] is False
    assert not (run_dir / "summary.rank1.json").exists()
    run_ids = set()
    for name, rank in (("telemetry.jsonl", 0), ("telemetry.rank1.jsonl", 1)):
        packets = [json.loads(line) for line in (run_dir / name).read_text().splitlines()]
        assert {packet["rank"] for packet in packets} == {rank}
        assert {packet["attributes"]["world_size"] for packet in packets} == {2}
        assert packets[-1]["step"] == summary["global_step"]
        run_ids |= {packet["run_id"] for packet in packets}
    # Rank 0 draws the run id and broadcasts it, so both files name the same run.
    assert len(run_ids) == 1


# Backend detection


def test_cpu_trainer_picks_gloo_where_cuda_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend to be a CUDA machine with NCCL, because only there does the choice of backend matter.
    # The process group itself is a real one-rank gloo group on loopback.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    for name, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "GLOO_SOCKET_IFNAME": "lo",
    }.items():
        monkeypatch.setenv(name, value)

    model = cases.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=cases.LEARNING_RATE)
    config = cases.match_config("mean").replace(epochs=1)
    with Trainer(model, optimizer, digits_objectives, cases.build_batches(0, 1), config=config) as trainer:
        assert dist.is_initialized()
        assert trainer.context.backend == "gloo"
        assert trainer.context.device == torch.device("cpu")
        result = trainer.fit()
    assert result.global_step == cases.SAMPLES // cases.BATCH_SIZE
    assert not dist.is_initialized()
