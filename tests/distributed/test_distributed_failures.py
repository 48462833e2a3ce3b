"""A rank that exits or hangs makes the surviving rank fail with an error naming it, within the timeout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist
from spawn_ranks import load_result, run_ranks

GLOO_AVAILABLE = dist.is_available() and dist.is_gloo_available()

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not GLOO_AVAILABLE, reason="torch.distributed with the gloo backend is not available"),
]

TIMEOUT_S = 5.0
# Slack for a loaded 2-core machine on top of the collective timeout.
MARGIN_S = 15.0


@pytest.mark.parametrize(
    ("job", "mode", "survivor", "victim", "error_type", "collective"),
    [
        pytest.param(
            "rank1_gone_at_barrier", "exit", 0, 1, "RankFailure", "monitored_barrier failed", id="rank1-exits-barrier"
        ),
        pytest.param(
            "rank1_gone_at_barrier",
            "hang",
            0,
            1,
            "DistributedTimeout",
            "monitored_barrier timed out",
            id="rank1-hangs-barrier",
        ),
        pytest.param(
            "rank0_gone_at_barrier", "exit", 1, 0, "RankFailure", "monitored_barrier failed", id="rank0-exits-barrier"
        ),
        pytest.param(
            "rank1_gone_at_average",
            "exit",
            0,
            1,
            "RankFailure",
            "all_reduce of 2 gradient bucket(s) failed",
            id="rank1-exits-average",
        ),
        pytest.param(
            "rank1_gone_at_average",
            "hang",
            0,
            1,
            "DistributedTimeout",
            "all_reduce of 2 gradient bucket(s) timed out",
            id="rank1-hangs-average",
        ),
    ],
)
def test_lost_rank_is_named(
    tmp_path: Path, job: str, mode: str, survivor: int, victim: int, error_type: str, collective: str
) -> None:
    result = run_ranks(
        job,
        tmp_path,
        timeout_s=TIMEOUT_S,
        wait_for=(survivor,),
        deadline_s=TIMEOUT_S + 60,
        environment={"FAILURE_MODE": mode},
    )
    assert result.returncodes[f"rank{survivor}"] == 0, result.describe()

    outcome = load_result(tmp_path, job, survivor)
    assert outcome.get("error_type") == error_type, outcome
    assert outcome["failed_ranks"] == [victim]
    assert f"{collective} on rank {survivor} of 2 at step" in outcome["message"]
    assert f"rank {victim} failed or stopped responding" in outcome["message"]
    if mode == "exit":
        # A closed connection is detected at once, well before the timeout.
        assert outcome["elapsed_s"] < TIMEOUT_S
    else:
        assert outcome["elapsed_s"] >= TIMEOUT_S * 0.9
        assert outcome["elapsed_s"] < TIMEOUT_S + MARGIN_S
