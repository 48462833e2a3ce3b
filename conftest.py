"""Shared test set-up: seeded RNGs, deterministic kernels, and the hypothesis profile.

``TOLARIA_TEST_DEVICE`` (default ``cpu``) and ``TOLARIA_TEST_DTYPE`` (default
``float32``) choose where and in which precision device-generic tests run.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seeded_deterministic() -> None:
    random.seed(0)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=False)


@pytest.fixture
def device() -> torch.device:
    """The device that device-generic tests run on."""
    return torch.device(os.environ.get("TOLARIA_TEST_DEVICE", "cpu"))


@pytest.fixture
def dtype() -> torch.dtype:
    """The floating dtype that dtype-generic tests run in."""
    return getattr(torch, os.environ.get("TOLARIA_TEST_DTYPE", "float32"))
