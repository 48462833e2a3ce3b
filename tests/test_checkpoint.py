"""Tests of ``tolaria.checkpoint``: atomic saves, manifests, rotation, verification, fallback and exact resume."""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from torch import nn
from torch.nn import functional

from tolaria import checkpoint
from tolaria.checkpoint.manifest import FileRecord, Manifest, serialize_manifest
from tolaria.telemetry import InMemorySink, Level, Telemetry


class Run:
    """A small model with Adam, a OneCycle schedule and a CPU GradScaler, on batches from the RNGs."""

    def __init__(self, seed: int = 3) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.1), nn.Linear(12, 1))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.02)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=0.05, total_steps=50)
        self.scaler = torch.amp.GradScaler("cpu")

    def step(self) -> float:
        inputs = torch.randn(16, 6)
        noise = numpy.random.normal(size=(16, 1)).astype("float32")
        targets = inputs[:, :1] * random.uniform(0.5, 2.0) + torch.from_numpy(noise)
        loss = functional.mse_loss(self.model(inputs), targets)
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.item()

    def state(self, step: int, **extra: Any) -> dict[str, Any]:
        return checkpoint.capture_training_state(
            step=step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            extra=extra,
        )

    def restore(self, state: dict[str, Any]) -> checkpoint.RestoredState:
        return checkpoint.restore_training_state(
            state, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler
        )


def _small_state(step: int) -> dict[str, Any]:
    return {"step": step, "weights": torch.full((4,), float(step))}


def _data_path(info: checkpoint.CheckpointInfo) -> Path:
    return info.directory / info.manifest.files[0].name


def _events(sink: InMemorySink, telemetry: Telemetry, name: str) -> list[Any]:
    telemetry.flush(0, 0)
    return list(sink.events(name))


# -- save ------------------------------------------------------------------------------------


def test_save_writes_manifest_with_hash(tmp_path: Path) -> None:
    info = checkpoint.save(tmp_path, _small_state(7), step=7, metadata={"run_id": "r1"})
    assert info.step == 7
    assert info.manifest_path == tmp_path / "checkpoint-000000000007.json"
    body = json.loads(info.manifest_path.read_text())
    assert body["format"] == "tolaria.checkpoint"
    assert body["format_version"] == checkpoint.FORMAT_VERSION
    assert body["step"] == 7
    assert body["metadata"] == {"run_id": "r1"}
    [record] = body["files"]
    data = (tmp_path / record["name"]).read_bytes()
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["size_bytes"] == len(data)
    assert json.loads((tmp_path / checkpoint.LATEST_POINTER).read_text()) == {
        "step": 7,
        "manifest": "checkpoint-000000000007.json",
    }
    assert not [entry for entry in tmp_path.iterdir() if entry.name.endswith(".tmp")]


def test_save_load_round_trip(tmp_path: Path) -> None:
    info = checkpoint.save(tmp_path, _small_state(3), step=3)
    loaded = checkpoint.load(info)
    assert loaded["step"] == 3
    assert torch.equal(loaded["weights"], torch.full((4,), 3.0))
    assert checkpoint.load(info.manifest_path)["step"] == 3


def test_rotation_keeps_last_n(tmp_path: Path) -> None:
    for step in range(1, 6):
        checkpoint.save(tmp_path, _small_state(step), step=step, keep_last=2)
    assert checkpoint.list_checkpoints(tmp_path) == (4, 5)
    data_files = sorted(entry.name for entry in tmp_path.glob("checkpoint-*.pt"))
    assert len(data_files) == 2
    assert all(name.startswith(("checkpoint-000000000004-", "checkpoint-000000000005-")) for name in data_files)


def test_keep_last_none_keeps_all(tmp_path: Path) -> None:
    for step in range(4):
        checkpoint.save(tmp_path, _small_state(step), step=step, keep_last=None)
    assert checkpoint.list_checkpoints(tmp_path) == (0, 1, 2, 3)


def test_resave_same_step_replaces(tmp_path: Path) -> None:
    first = checkpoint.save(tmp_path, _small_state(2), step=2)
    second = checkpoint.save(tmp_path, {"step": 2, "weights": torch.zeros(4)}, step=2)
    assert first.manifest.files[0].name != second.manifest.files[0].name
    assert not _data_path(first).exists()
    assert torch.equal(checkpoint.load(second)["weights"], torch.zeros(4))
    assert checkpoint.list_checkpoints(tmp_path) == (2,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step": -1}, "step must be a non-negative int"),
        ({"step": 1, "keep_last": 0}, "keep_last must be an int >= 1 or None"),
    ],
)
def test_save_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        checkpoint.save(tmp_path, _small_state(1), **kwargs)


def test_save_rejects_value_weights_only_cannot_load(tmp_path: Path) -> None:
    state = {"model": {"w": torch.zeros(2)}, "extra": {"sampler": random.Random(0)}}
    with pytest.raises(checkpoint.CheckpointFormatError, match=r"state\['extra'\]\['sampler'\] is a random.Random"):
        checkpoint.save(tmp_path, state, step=1)
    assert checkpoint.list_checkpoints(tmp_path) == ()


def test_everything_saved_loads_weights_only(tmp_path: Path) -> None:
    run = Run()
    run.step()
    state = run.state(1, epoch=0, batch=1, name="digits", shape=torch.Size([2, 3]), dtype=torch.float16)
    info = checkpoint.save(tmp_path, state, step=1)
    raw = torch.load(_data_path(info), weights_only=True)
    assert raw["extra"]["shape"] == torch.Size([2, 3])
    assert set(raw["rng"]) >= {"python", "torch", "numpy"}
    assert raw["rng"]["torch"].dtype == torch.uint8


def test_disk_full_during_save_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = InMemorySink()
    telemetry = Telemetry(sinks=[sink])
    checkpoint.save(tmp_path, _small_state(1), step=1, telemetry=telemetry)
    before = sorted(entry.name for entry in tmp_path.iterdir())

    def full_disk(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left on device") as raised:
        checkpoint.save(tmp_path, _small_state(2), step=2, telemetry=telemetry)
    monkeypatch.undo()

    assert isinstance(raised.value.__cause__, OSError)
    assert raised.value.__cause__.errno == errno.ENOSPC
    assert sorted(entry.name for entry in tmp_path.iterdir()) == before
    info, state = checkpoint.load_latest(tmp_path)
    assert info.step == 1
    assert torch.equal(state["weights"], torch.full((4,), 1.0))
    assert telemetry.counters["tolaria.checkpoint.save_failures"] == 1
    [event] = sink.events("tolaria.checkpoint.save_failed")
    assert event.level is Level.ERROR
    assert event.attributes["step"] == 2
    assert "No space left" in event.attributes["reason"]


def test_write_failure_in_data_file_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint.save(tmp_path, _small_state(1), step=1)
    real_save = torch.save

    def failing_save(obj: object, file: Any, *args: Any, **kwargs: Any) -> None:
        file.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(checkpoint.CheckpointWriteError, match="step 2"):
        checkpoint.save(tmp_path, _small_state(2), step=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.list_checkpoints(tmp_path) == (1,)
    assert not [entry for entry in tmp_path.iterdir() if "000000000002" in entry.name]


# -- verification and fallback ------------------------------------------------------------------


def test_truncated_file_detected_and_skipped(tmp_path: Path) -> None:
    sink = InMemorySink()
    telemetry = Telemetry(sinks=[sink])
    checkpoint.save(tmp_path, _small_state(1), step=1)
    newest = checkpoint.save(tmp_path, _small_state(2), step=2)
    data = _data_path(newest)
    data.write_bytes(data.read_bytes()[:-100])

    with pytest.raises(
        checkpoint.CheckpointCorrupted, match=r"size is \d+ bytes but the manifest records \d+"
    ) as raised:
        checkpoint.load(newest)
    assert raised.value.path == data

    found = checkpoint.find_latest(tmp_path, telemetry=telemetry)
    assert found.step == 1
    [event] = _events(sink, telemetry, "tolaria.checkpoint.fallback")
    assert event.level is Level.WARNING
    assert event.attributes["path"] == str(data)
    assert telemetry.counters["tolaria.checkpoint.bad"] == 1


def test_flipped_byte_detected_and_skipped(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, _small_state(1), step=1)
    newest = checkpoint.save(tmp_path, _small_state(2), step=2)
    data = _data_path(newest)
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0x01
    data.write_bytes(bytes(content))

    with pytest.raises(checkpoint.CheckpointCorrupted, match=r"SHA-256 is [0-9a-f]+ but the manifest records"):
        checkpoint.load(newest)
    info, state = checkpoint.load_latest(tmp_path)
    assert info.step == 1
    assert state["step"] == 1


def test_flipped_byte_in_manifest_detected(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, _small_state(1), step=1)
    newest = checkpoint.save(tmp_path, _small_state(2), step=2)
    digest = newest.manifest.files[0].sha256
    changed = ("0" if digest[0] != "0" else "1") + digest[1:]
    text = newest.manifest_path.read_text()
    newest.manifest_path.write_text(text.replace(digest, changed))
    with pytest.raises(checkpoint.CheckpointCorrupted, match="manifest checksum does not match"):
        checkpoint.read_info(newest.manifest_path)
    assert checkpoint.find_latest(tmp_path).step == 1


def test_missing_data_file_skipped(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, _small_state(1), step=1)
    newest = checkpoint.save(tmp_path, _small_state(2), step=2)
    _data_path(newest).unlink()
    with pytest.raises(checkpoint.CheckpointNotFound, match="file listed in the manifest is missing"):
        checkpoint.load(newest)
    assert checkpoint.find_latest(tmp_path).step == 1


def test_find_latest_respects_at_or_before(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        checkpoint.save(tmp_path, _small_state(step), step=step, keep_last=None)
    assert checkpoint.find_latest(tmp_path, at_or_before=25).step == 20
    assert checkpoint.find_latest(tmp_path, at_or_before=30).step == 30
    with pytest.raises(checkpoint.CheckpointNotFound, match="no valid checkpoint at or before step 5"):
        checkpoint.find_latest(tmp_path, at_or_before=5)


def test_nothing_good_lists_skipped(tmp_path: Path) -> None:
    only = checkpoint.save(tmp_path, _small_state(1), step=1)
    _data_path(only).write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointNotFound, match=r"skipped bad ones: .*size is 7 bytes"):
        checkpoint.load_latest(tmp_path)


def test_empty_folder_not_found(tmp_path: Path) -> None:
    with pytest.raises(checkpoint.CheckpointNotFound, match="no valid checkpoint"):
        checkpoint.find_latest(tmp_path / "missing")


class _Exploit:
    """Pickles into a call of ``open(marker, "w")``: loading it with full unpickling creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (builtins.open, (str(self.marker), "w"))


def _commit_foreign(directory: Path, step: int, data: bytes) -> Path:
    """Commit ``data`` as a checkpoint with a valid manifest, as a foreign writer could."""
    name = f"checkpoint-{step:012d}-deadbeef.pt"
    (directory / name).write_bytes(data)
    record = FileRecord(name, "state", len(data), hashlib.sha256(data).hexdigest())
    manifest = Manifest(step=step, files=(record,), created_unix_s=0.0, metadata={})
    path = directory / f"checkpoint-{step:012d}.json"
    path.write_bytes(serialize_manifest(manifest))
    return path


def test_code_in_pickle_rejected_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    control = tmp_path / "control.pt"
    torch.save({"payload": _Exploit(tmp_path / "control-marker")}, control)
    opened = torch.load(control, weights_only=False)
    opened["payload"].close()
    assert (tmp_path / "control-marker").exists(), "the exploit must really run under full unpickling"

    checkpoint.save(tmp_path, _small_state(1), step=1)
    torch.save({"step": 2, "payload": _Exploit(marker)}, tmp_path / "exploit.pt")
    manifest = _commit_foreign(tmp_path, 2, (tmp_path / "exploit.pt").read_bytes())
    with pytest.raises(checkpoint.CheckpointFormatError, match=r"rejected by torch.load\(weights_only=True\)"):
        checkpoint.load(manifest)
    assert not marker.exists()

    info, _ = checkpoint.load_latest(tmp_path)
    assert info.step == 1
    assert not marker.exists()


def test_foreign_file_rejected(tmp_path: Path) -> None:
    pickled = _commit_foreign(tmp_path, 3, b"not a zip archive")
    with pytest.raises(checkpoint.CheckpointFormatError, match=r"deadbeef\.pt: rejected by torch\.load"):
        checkpoint.load(pickled)

    truncated_zip = _commit_foreign(tmp_path, 4, b"PK\x03\x04" + b"\x00" * 40)
    with pytest.raises(checkpoint.CheckpointFormatError, match=r"deadbeef\.pt: not a readable torch\.save file"):
        checkpoint.load(truncated_zip)

    torch.save([1, 2, 3], tmp_path / "list.pt")
    not_dict = _commit_foreign(tmp_path, 5, (tmp_path / "list.pt").read_bytes())
    with pytest.raises(checkpoint.CheckpointFormatError, match="contains a list, expected a dict"):
        checkpoint.load(not_dict)


def test_unsupported_manifest_version_rejected(tmp_path: Path) -> None:
    info = checkpoint.save(tmp_path, _small_state(1), step=1)
    info.manifest_path.write_bytes(serialize_manifest(info.manifest._replace(format_version=99)))
    with pytest.raises(checkpoint.CheckpointFormatError, match="format_version 99 is not supported"):
        checkpoint.read_info(info.manifest_path)


# -- training state and exact resume ---------------------------------------------------------


def test_rng_state_round_trip() -> None:
    state = checkpoint.capture_rng_state()
    expected = (random.random(), torch.rand(4), numpy.random.rand(3), random.gauss(0.0, 1.0))
    checkpoint.restore_rng_state(state)
    actual = (random.random(), torch.rand(4), numpy.random.rand(3), random.gauss(0.0, 1.0))
    assert actual[0] == expected[0]
    assert torch.equal(actual[1], expected[1])
    assert numpy.array_equal(actual[2], expected[2])
    assert actual[3] == expected[3]


def test_rng_state_rejects_incomplete() -> None:
    with pytest.raises(ValueError, match=r"RNG state is missing \['torch'\]"):
        checkpoint.restore_rng_state({"python": {}})


@pytest.mark.parametrize("split", [1, 4, 9])
def test_resume_reproduces_losses(tmp_path: Path, split: int) -> None:
    total = 12
    reference = Run()
    random.seed(11)
    numpy.random.seed(11)
    torch.manual_seed(11)
    expected = [reference.step() for _ in range(total)]

    first = Run()
    random.seed(11)
    numpy.random.seed(11)
    torch.manual_seed(11)
    losses = [first.step() for _ in range(split)]
    checkpoint.save(tmp_path, first.state(split, batch=split), step=split)

    random.seed(999)
    torch.manual_seed(999)
    numpy.random.seed(999)
    resumed = Run(seed=42)
    info, state = checkpoint.load_latest(tmp_path)
    assert info.step == split
    restored = resumed.restore(state)
    assert restored.step == split
    assert restored.extra == {"batch": split}
    losses += [resumed.step() for _ in range(total - split)]
    assert losses == expected


def test_restore_requires_given_component_state() -> None:
    run = Run()
    state = checkpoint.capture_training_state(step=0, model=run.model)
    with pytest.raises(ValueError, match="optimizer was given but the training state has no optimizer state"):
        checkpoint.restore_training_state(state, model=run.model, optimizer=run.optimizer)


def test_restore_rejects_non_training_state() -> None:
    with pytest.raises(ValueError, match=r"training state is missing \['version', 'model', 'extra'\]"):
        checkpoint.restore_training_state({"step": 1}, model=nn.Linear(1, 1))
