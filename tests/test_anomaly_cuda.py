"""The loss monitor on a CUDA device: same verdicts as on the CPU, no host synchronisation."""

from __future__ import annotations

import math

import pytest
import torch

from tolaria.functional import anomaly
from tolaria.functional.anomaly import LossMonitorConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LOSSES = [[1.0, 2.0], [1.1, 2.1], [0.9, math.nan], [1.0, 2.0], [1.05, 1.9], [100.0, 2.0], [1.0, math.inf], [1.0, 200.0]]


def test_cuda_matches_cpu_without_sync():
    config = LossMonitorConfig(window=4, warmup=3)
    cpu = anomaly.init(2, config)
    cuda = anomaly.init(2, config, device="cuda")
    cuda_verdicts = []
    # Copied before the check starts, because a copy from pageable host memory synchronises.
    cuda_losses = [torch.tensor(row, device="cuda") for row in LOSSES]

    # "error" turns every synchronising CUDA call (.item(), bool(tensor), nonzero) into an exception.
    torch.cuda.set_sync_debug_mode("error")
    try:
        for loss in cuda_losses:
            cuda, verdict = anomaly.update(cuda, loss)
            cuda_verdicts.append(anomaly.summarize(verdict))
    finally:
        torch.cuda.set_sync_debug_mode("default")

    for row, summary in zip(LOSSES, cuda_verdicts, strict=True):
        cpu, verdict = anomaly.update(cpu, torch.tensor(row))
        torch.testing.assert_close(summary.cpu(), anomaly.summarize(verdict))
    assert torch.equal(cuda.count.cpu(), cpu.count)
