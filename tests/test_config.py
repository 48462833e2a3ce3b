"""TrainerConfig validation: every invalid field names itself, the value and the rule."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from tolaria.config import TrainerConfig


def test_defaults_are_valid() -> None:
    config = TrainerConfig()
    assert config.epochs >= 1
    assert config.aggregator == "pcgrad"


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"epochs": 0}, r"TrainerConfig\.epochs: got 0; expected an integer >= 1"),
        ({"epochs": -3}, r"TrainerConfig\.epochs: got -3"),
        ({"epochs": 2.5}, r"TrainerConfig\.epochs: got 2\.5"),
        ({"epochs": True}, r"TrainerConfig\.epochs: got True"),
        ({"lr": 0.0}, r"TrainerConfig\.lr: got 0\.0; expected a finite number > 0"),
        ({"lr": -1e-3}, r"TrainerConfig\.lr: got -0\.001"),
        ({"lr": math.nan}, r"TrainerConfig\.lr: got nan"),
        ({"lr": math.inf}, r"TrainerConfig\.lr: got inf"),
        ({"aggregator": "median"}, r"TrainerConfig\.aggregator: got 'median'; expected one of 'sum', 'mean'"),
        ({"aggregator": "weighted"}, r"TrainerConfig\.weights: got None; expected one weight per objective"),
        ({"weights": (1.0, 2.0)}, r"TrainerConfig\.weights: got \(1\.0, 2\.0\); expected None"),
        ({"aggregator": "weighted", "weights": (1.0, -1.0)}, r"TrainerConfig\.weights: .*finite weights >= 0"),
        ({"aggregator": "weighted", "weights": (1.0, math.nan)}, r"TrainerConfig\.weights: .*finite weights >= 0"),
        ({"aggregator": "weighted", "weights": ("a",)}, r"TrainerConfig\.weights: .*a sequence of numbers"),
        ({"seed": -1}, r"TrainerConfig\.seed: got -1"),
        ({"device": "tpu"}, r"TrainerConfig\.device: got 'tpu'"),
        ({"amp": "fp8"}, r"TrainerConfig\.amp: got 'fp8'"),
        ({"grad_clip_norm": 0}, r"TrainerConfig\.grad_clip_norm: got 0"),
        ({"gradient_mode": "fast"}, r"TrainerConfig\.gradient_mode: got 'fast'"),
    ],
)
def test_invalid_field_rejected(changes: dict[str, object], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        TrainerConfig(**changes)  # type: ignore[arg-type]


def test_weights_length_checked_against_objectives() -> None:
    config = TrainerConfig(aggregator="weighted", weights=(1.0, 2.0))
    config.check_objectives(("a", "b"))
    with pytest.raises(ValueError, match=r"TrainerConfig\.weights: .*expected 3 weights, one for each objective"):
        config.check_objectives(("a", "b", "c"))


def test_out_dir_under_a_file_rejected(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"TrainerConfig\.out_dir: .*is a file"):
        TrainerConfig(out_dir=blocker / "run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_out_dir_unwritable_rejected(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(ValueError, match=r"TrainerConfig\.out_dir: .*not writable"):
        TrainerConfig(out_dir=locked / "run")


def test_out_dir_not_created_by_validation(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    TrainerConfig(out_dir=target)
    assert not (tmp_path / "a").exists()


def test_toml_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('epochs = 3\naggregator = "weighted"\nweights = [1.0, 0.5]\nlr = 0.01\nout_dir = "out"\n')
    config = TrainerConfig.from_toml(path)
    assert config.epochs == 3
    assert config.weights == (1.0, 0.5)
    assert config.out_dir == Path("out")


def test_toml_unknown_key_rejected(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("epoch = 3\n")
    with pytest.raises(ValueError, match=r"unknown fields \['epoch'\]; valid fields are"):
        TrainerConfig.from_toml(path)


def test_toml_invalid_value_rejected(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("epochs = 0\n")
    with pytest.raises(ValueError, match=r"TrainerConfig\.epochs: got 0"):
        TrainerConfig.from_toml(path)


def test_toml_syntax_error_names_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("epochs = = 3\n")
    with pytest.raises(ValueError, match=r"broken\.toml: invalid TOML"):
        TrainerConfig.from_toml(path)


def test_toml_sections_build_typed_settings(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        "epochs = 2\n"
        "[safety]\nsnapshot_every = 20\nskip_batches = 4\n"
        "[checkpoint]\nkeep_last = 5\n"
        "[control]\ntamiyo_timeout_s = 0.5\n[control.breaker]\nfailure_threshold = 2\n"
        "[loss_monitor]\nwarmup = 8\n"
        "[emergency]\ncooldown_steps = 20\n"
    )
    config = TrainerConfig.from_toml(path)
    assert config.safety.snapshot_every == 20
    assert config.safety.skip_batches == 4
    assert config.checkpoint.keep_last == 5
    assert config.control.tamiyo_timeout_s == 0.5
    assert config.control.breaker.failure_threshold == 2
    assert config.loss_monitor.warmup == 8
    assert config.emergency.cooldown_steps == 20


@pytest.mark.parametrize(
    ("toml", "pattern"),
    [
        ("[safety]\nskip_batches = -1\n", r"SafetyConfig\.skip_batches: got -1; expected an integer >= 0"),
        ("[safety]\nsnapshot_evry = 3\n", r"SafetyConfig: unknown fields \['snapshot_evry'\]"),
        ("[checkpoint]\nkeep_last = 0\n", r"CheckpointConfig\.keep_last: got 0"),
        ("[control]\nkasmina_timeout_s = 0\n", r"ControlConfig\.kasmina_timeout_s: got 0"),
        ("[safety]\nrollback_deadline_s = -2.0\n", r"SafetyConfig\.rollback_deadline_s: got -2\.0"),
    ],
)
def test_toml_invalid_section_value_rejected(toml: str, pattern: str, tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(toml)
    with pytest.raises(ValueError, match=pattern):
        TrainerConfig.from_toml(path)


def test_section_of_wrong_type_rejected() -> None:
    with pytest.raises(ValueError, match=r"TrainerConfig\.safety: got 3; expected a SafetyConfig"):
        TrainerConfig(safety=3)  # type: ignore[arg-type]
