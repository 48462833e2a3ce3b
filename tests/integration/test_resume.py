"""Exact resume: a run resumed from a checkpoint takes bit-identical steps to an uninterrupted run.

The model has dropout (so the RNG state matters), the optimizer is Adam (moments and
step counts) and a ``StepLR`` scheduler changes the learning rate every epoch. The
uninterrupted run writes a checkpoint every 3 steps and at every epoch end. Each
split point copies the checkpoints up to that step into a fresh run folder and a
new Trainer, model and optimizer continue from there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_cases import BATCHES_PER_EPOCH, StepLog, make_trainer

from tolaria import TrainerConfig, checkpoint
from tolaria.checkpoint.reader import manifest_paths, read_info
from tolaria.control import PlateauPolicy
from tolaria.settings import CheckpointConfig

EPOCHS = 3
TOTAL_STEPS = EPOCHS * BATCHES_PER_EPOCH
# Checkpoints every 3 steps, and at the epoch ends 8, 16 and 24.
EVERY_STEPS = 3
# Splits after epoch 0 and 1, and in the middle of each epoch.
SPLITS = (3, 8, 12, 16, 21)


def resume_config(out_dir: Path, checkpoints: CheckpointConfig | None = None) -> TrainerConfig:
    return TrainerConfig(
        epochs=EPOCHS,
        device="cpu",
        aggregator="pcgrad",
        out_dir=out_dir,
        checkpoint=checkpoints or CheckpointConfig(every_epochs=1, every_steps=EVERY_STEPS, keep_last=100),
    )


def run(config: TrainerConfig, resume_from: Path | None = None, **kwargs: Any) -> tuple[StepLog, list[torch.Tensor]]:
    log = StepLog()
    trainer = make_trainer(config, dropout=0.2, scheduler=True, step_callbacks=[log], **kwargs)
    with trainer:
        trainer.fit(resume_from=resume_from)
        parameters = [parameter.detach().clone() for parameter in trainer.model.parameters()]
    return log, parameters


def copy_run_until(source: Path, target: Path, step: int) -> None:
    """Copy ``source``'s checkpoints of steps ``<= step`` into a new run folder ``target``."""
    folder = target / "checkpoints"
    folder.mkdir(parents=True)
    for saved, manifest in manifest_paths(source / "checkpoints"):
        if saved > step:
            continue
        shutil.copy2(manifest, folder / manifest.name)
        for record in read_info(manifest).manifest.files:
            shutil.copy2(source / "checkpoints" / record.name, folder / record.name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StepLog, list[torch.Tensor]]:
    torch.use_deterministic_algorithms(True)
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    log, parameters = run(resume_config(out))
    return out, log, parameters


def test_uninterrupted_run_has_split_checkpoints(uninterrupted: tuple[Path, StepLog, list[torch.Tensor]]) -> None:
    out, log, _ = uninterrupted
    steps = checkpoint.list_checkpoints(out / "checkpoints")
    assert set(SPLITS) <= set(steps)
    assert [record.global_step for record in log.records] == list(range(TOTAL_STEPS))
    assert all(record.applied for record in log.records)


@pytest.mark.parametrize("split", SPLITS)
def test_resume_is_bit_identical(
    split: int, uninterrupted: tuple[Path, StepLog, list[torch.Tensor]], tmp_path: Path
) -> None:
    source, full_log, full_parameters = uninterrupted
    resumed_dir = tmp_path / "resumed"
    copy_run_until(source, resumed_dir, split)

    log, parameters = run(resume_config(resumed_dir), resume_from=resumed_dir)

    assert [record.global_step for record in log.records] == list(range(split, TOTAL_STEPS))
    expected = full_log.records[split:]
    assert [(record.epoch, record.batch) for record in log.records] == [
        (record.epoch, record.batch) for record in expected
    ]
    for resumed, original in zip(log.records, expected, strict=True):
        assert torch.equal(resumed.losses, original.losses), (split, original.global_step)
    for resumed_parameter, original_parameter in zip(parameters, full_parameters, strict=True):
        assert torch.equal(resumed_parameter, original_parameter)


def test_resumed_run_counts_every_saved_checkpoint(tmp_path: Path) -> None:
    first = tmp_path / "first"
    config = resume_config(first)
    with make_trainer(config) as trainer:
        trainer.fit()
        uninterrupted_saves = trainer.telemetry.counters["tolaria.checkpoint.saved"]
    resumed_dir = tmp_path / "resumed"
    copy_run_until(first, resumed_dir, 12)

    with make_trainer(config.replace(out_dir=resumed_dir)) as trainer:
        trainer.fit(resume_from=resumed_dir)
        resumed_saves = trainer.telemetry.counters["tolaria.checkpoint.saved"]

    # Every 3 steps (3, 6, ..., 24) and at each epoch end (8, 16, 24): step 24 is saved twice.
    assert uninterrupted_saves == 11
    assert resumed_saves == uninterrupted_saves


def test_resume_from_step_checkpoint_at_epoch_end(
    uninterrupted: tuple[Path, StepLog, list[torch.Tensor]], tmp_path: Path
) -> None:
    # Without epoch checkpoints, the step checkpoint of step 8 records the position after the
    # last batch of epoch 0: the epoch's end (scheduler, validation, control) has not run yet.
    checkpoints = CheckpointConfig(every_epochs=None, every_steps=4, keep_last=100)
    first = tmp_path / "first"
    full_log, full_parameters = run(resume_config(first, checkpoints))
    resumed_dir = tmp_path / "resumed"
    copy_run_until(first, resumed_dir, 8)

    log, parameters = run(resume_config(resumed_dir, checkpoints), resume_from=resumed_dir)

    assert [record.global_step for record in log.records] == list(range(8, TOTAL_STEPS))
    for resumed, original in zip(log.records, full_log.records[8:], strict=True):
        assert torch.equal(resumed.losses, original.losses), original.global_step
    for resumed_parameter, original_parameter in zip(parameters, full_parameters, strict=True):
        assert torch.equal(resumed_parameter, original_parameter)


def test_resume_keeps_controller_state(tmp_path: Path) -> None:
    # With min_delta far above any loss only epoch 0 improves, so the policy halves the learning
    # rate at the end of epochs 1, 2 and 3. Resumed after epoch 1, a new policy must continue
    # from the saved progress, or it takes epoch 2 for an improvement and skips a halving.
    config = resume_config(tmp_path / "first").replace(epochs=4)
    full_log, full_parameters = run(config, tamiyo=PlateauPolicy(patience=1, min_delta=1e9))
    resumed_dir = tmp_path / "resumed"
    copy_run_until(tmp_path / "first", resumed_dir, 2 * BATCHES_PER_EPOCH)

    log, parameters = run(
        config.replace(out_dir=resumed_dir), resume_from=resumed_dir, tamiyo=PlateauPolicy(patience=1, min_delta=1e9)
    )

    expected = full_log.records[2 * BATCHES_PER_EPOCH :]
    assert len(log.records) == len(expected) == 2 * BATCHES_PER_EPOCH
    for resumed, original in zip(log.records, expected, strict=True):
        assert torch.equal(resumed.losses, original.losses), original.global_step
    for resumed_parameter, original_parameter in zip(parameters, full_parameters, strict=True):
        assert torch.equal(resumed_parameter, original_parameter)


def demo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # One thread per process: on a shared 2-core machine, OpenMP threads that wait for
    # each other make these small steps many times slower. Results do not depend on it,
    # because every run of a comparison uses the same setting.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tolaria", "--log-level", "WARNING", "demo", "--device", "cpu", "--no-progress"]
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def training_numbers(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The summary fields that training determines (not the wall time)."""
    return {key: value for key, value in summary.items() if key != "wall_time_s"}


def test_demo_resume_matches_uninterrupted(tmp_path: Path) -> None:
    split, full = tmp_path / "split", tmp_path / "full"
    common = ("--batch-size", "128")

    first = demo("--epochs", "2", "--out", str(split), *common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    resumed = demo("--resume", str(split), "--epochs", "4", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    uninterrupted = demo("--epochs", "4", "--out", str(full), *common, cwd=tmp_path)
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    resumed_summary = json.loads((split / "summary.json").read_text())
    full_summary = json.loads((full / "summary.json").read_text())
    for key in ("global_step", "val_accuracy", "val_loss", "train_loss", "skipped_steps", "rollbacks"):
        assert resumed_summary[key] == full_summary[key], key
    assert full_summary["epochs"] == 4
    # The summary of a resumed run describes the whole run, not only the epochs of the last invocation.
    assert training_numbers(resumed_summary) == training_numbers(full_summary)
