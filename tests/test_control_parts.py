"""Tests of the control loop's parts: commands, epoch state, the reference policy and executor, and faults."""

from __future__ import annotations

import math
import pickle
import threading
import time

import pytest
import torch

from tolaria.control import (
    AdaptationCommand,
    CommandKind,
    CommandRejected,
    EpochState,
    FaultPlan,
    InjectedFault,
    KasminaClient,
    OptimizerExecutor,
    PlateauPolicy,
    TamiyoClient,
    parse_fault,
    parse_faults,
)
from tolaria.control.faults import Fault, FaultyKasmina, FaultyTamiyo
from tolaria.worker import CancelToken, TaskCancelled


def make_optimizer(*learning_rates: float) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in learning_rates]
    return torch.optim.SGD(groups)


def lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [group["lr"] for group in optimizer.param_groups]


def epoch_state(epoch: int, val_loss: float | None = None, **fields) -> EpochState:
    losses = {} if val_loss is None else {"digit": val_loss}
    return EpochState(epoch, epoch * 10, val_loss=losses, **fields)


# Commands.


def test_command_parameters_are_read_only():
    source = {"factor": 0.5}
    command = AdaptationCommand("c1", CommandKind.ADJUST_LR, source, "why", 3)
    source["factor"] = 2.0
    assert command.parameters["factor"] == 0.5
    with pytest.raises(TypeError):
        command.parameters["factor"] = 3.0  # type: ignore[index]
    with pytest.raises(AttributeError):
        command.kind = "noop"  # type: ignore[misc]


def test_command_pickles():
    command = AdaptationCommand.adjust_lr(factor=0.5, epoch=4, reason="plateau")
    assert pickle.loads(pickle.dumps(command)) == command
    assert command.id == "adjust-lr-e4"
    assert command.kind == "adjust_lr"


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (("", "noop"), ValueError, "id must be a non-empty string, got ''"),
        (("c", ""), ValueError, "kind must be a non-empty string, got ''"),
        (("c", "noop", [("factor", 1.0)]), TypeError, "parameters must be a mapping, got list"),
    ],
)
def test_command_rejects_bad_fields(arguments, error, message):
    with pytest.raises(error, match=message):
        AdaptationCommand(*arguments)


def test_command_rejected_pickles():
    error = CommandRejected(AdaptationCommand.noop(epoch=1), "because")
    copy = pickle.loads(pickle.dumps(error))
    assert copy.reason == "because"
    assert str(copy) == "command 'noop-e1' (noop) rejected: because"


# Epoch state.


def test_epoch_state_freezes_mappings():
    losses = {"digit": 1.0}
    state = EpochState(2, 20, train_loss=losses, aggregation={"conflict_ratio": 0.25}, learning_rates=[0.1])
    losses["digit"] = 9.0
    assert state.train_loss["digit"] == 1.0
    assert state.learning_rates == (0.1,)
    with pytest.raises(TypeError):
        state.train_loss["digit"] = 2.0  # type: ignore[index]
    assert pickle.loads(pickle.dumps(state)) == state


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"epoch": -1, "global_step": 0}, ValueError, "epoch must be an integer >= 0, got -1"),
        ({"epoch": 0, "global_step": 1.5}, ValueError, "global_step must be an integer >= 0, got 1.5"),
        ({"epoch": 0, "global_step": 0, "emergency_level": -2}, ValueError, "emergency_level must be an integer"),
        ({"epoch": 0, "global_step": 0, "val_loss": {1: 0.5}}, TypeError, "val_loss keys must be strings, got 1"),
        (
            {"epoch": 0, "global_step": 0, "val_loss": {"a": torch.tensor(1.0)}},
            TypeError,
            r"val_loss\['a'\] must be a Python float \(call .item\(\) on tensors\)",
        ),
        ({"epoch": 0, "global_step": 0, "aggregation": [1.0]}, TypeError, "aggregation must be a mapping"),
    ],
)
def test_epoch_state_rejects_bad_fields(fields, error, message):
    with pytest.raises(error, match=message):
        EpochState(**fields)


def test_monitored_loss_choices():
    state = EpochState(0, 0, train_loss={"a": 4.0, "b": 2.0}, val_loss={"a": 1.0, "b": 3.0})
    assert state.monitored_loss() == 2.0
    assert state.monitored_loss("b") == 3.0
    assert EpochState(0, 0, train_loss={"a": 4.0}).monitored_loss() == 4.0
    assert math.isnan(EpochState(0, 0).monitored_loss())
    with pytest.raises(KeyError, match=r"objective 'c' not among the losses \['a', 'b'\]"):
        state.monitored_loss("c")


# The reference executor.


def test_executor_applies_factor_to_every_group():
    optimizer = make_optimizer(0.1, 0.02)
    OptimizerExecutor(optimizer).apply_command(AdaptationCommand.adjust_lr(factor=0.5))
    assert lrs(optimizer) == pytest.approx([0.05, 0.01])


def test_executor_sets_learning_rate():
    optimizer = make_optimizer(0.1, 0.02)
    OptimizerExecutor(optimizer).apply_command(AdaptationCommand("set", "adjust_lr", {"lr": 0.3}))
    assert lrs(optimizer) == [0.3, 0.3]


def test_executor_noop_changes_nothing():
    optimizer = make_optimizer(0.1)
    OptimizerExecutor(optimizer).apply_command(AdaptationCommand.noop())
    assert lrs(optimizer) == [0.1]


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (AdaptationCommand("x", "prune_heads"), "unknown command kind 'prune_heads'; expected one of noop, adjust_lr"),
        (AdaptationCommand("x", "noop", {"factor": 1.0}), r"noop takes no parameters, got \['factor'\]"),
        (AdaptationCommand("x", "adjust_lr", {"scale": 0.5}), r"unknown adjust_lr parameters \['scale'\]"),
        (AdaptationCommand("x", "adjust_lr", {}), r"adjust_lr needs exactly one of factor, lr; got \[\]"),
        (AdaptationCommand("x", "adjust_lr", {"factor": 0.5, "lr": 0.1}), "needs exactly one of factor, lr"),
        (AdaptationCommand("x", "adjust_lr", {"factor": math.nan}), "factor=nan must be a finite number > 0"),
        (AdaptationCommand("x", "adjust_lr", {"factor": 0.0}), "factor=0.0 must be a finite number > 0"),
        (AdaptationCommand("x", "adjust_lr", {"lr": -0.1}), r"lr=-0.1 must be a finite number > 0"),
        (AdaptationCommand("x", "adjust_lr", {"lr": math.inf}), "lr=inf must be a finite number > 0"),
        (AdaptationCommand("x", "adjust_lr", {"factor": True}), "factor=True must be a finite number > 0"),
        (AdaptationCommand("x", "adjust_lr", {"factor": "0.5"}), "factor='0.5' must be a finite number > 0"),
        (
            AdaptationCommand("x", "adjust_lr", {"factor": 1e300}),
            "parameter group 1 would get learning rate inf; it must be finite and > 0",
        ),
    ],
)
def test_executor_rejects_and_changes_nothing(command, reason):
    optimizer = make_optimizer(0.1, 1e10)
    with pytest.raises(CommandRejected, match=reason) as caught:
        OptimizerExecutor(optimizer).apply_command(command)
    assert caught.value.command is command
    assert lrs(optimizer) == [0.1, 1e10]


def test_executor_checks_token_before_applying():
    optimizer = make_optimizer(0.1)
    token = CancelToken("apply")
    token.cancel("deadline")
    with pytest.raises(TaskCancelled):
        OptimizerExecutor(optimizer).apply_command(AdaptationCommand.adjust_lr(factor=0.5), cancel=token)
    assert lrs(optimizer) == [0.1]


def test_reference_clients_match_protocols():
    assert isinstance(PlateauPolicy(), TamiyoClient)
    assert isinstance(OptimizerExecutor(make_optimizer(0.1)), KasminaClient)


# The reference policy.


def test_plateau_policy_halves_after_patience():
    policy = PlateauPolicy(patience=2)
    kinds = [policy.evaluate_epoch(epoch_state(epoch, loss)).kind for epoch, loss in enumerate([1.0, 0.8, 0.8, 0.9])]
    assert kinds == ["noop", "noop", "noop", "adjust_lr"]

    command = policy.evaluate_epoch(epoch_state(4, 0.9))
    assert command.kind == "noop"
    command = policy.evaluate_epoch(epoch_state(5, 0.85))
    assert command.kind == "adjust_lr"
    assert command.parameters == {"factor": 0.5}
    assert command.id == "plateau-e5"
    assert command.epoch == 5
    assert "best 0.8 at epoch 1" in command.reason


def test_plateau_policy_min_delta_and_nan():
    policy = PlateauPolicy(patience=1, min_delta=0.1)
    assert policy.evaluate_epoch(epoch_state(0, 1.0)).kind == "noop"
    # Better by less than min_delta: no improvement.
    assert policy.evaluate_epoch(epoch_state(1, 0.95)).kind == "adjust_lr"
    assert policy.evaluate_epoch(epoch_state(2, math.nan)).kind == "adjust_lr"
    assert policy.evaluate_epoch(epoch_state(3, 0.5)).kind == "noop"


def test_plateau_policy_watches_one_objective():
    policy = PlateauPolicy(patience=1, objective="b")
    state = EpochState(0, 0, val_loss={"a": 5.0, "b": 1.0})
    assert policy.evaluate_epoch(state).kind == "noop"
    worse_a = EpochState(1, 1, val_loss={"a": 9.0, "b": 0.5})
    assert policy.evaluate_epoch(worse_a).kind == "noop"
    with pytest.raises(KeyError, match="objective 'b' not among the losses"):
        policy.evaluate_epoch(EpochState(2, 2, val_loss={"a": 1.0}))


def test_plateau_policy_state_dict_round_trip():
    policy = PlateauPolicy(patience=3)
    policy.evaluate_epoch(epoch_state(0, 1.0))
    policy.evaluate_epoch(epoch_state(1, 2.0))
    restored = PlateauPolicy(patience=3)
    restored.load_state_dict(policy.state_dict())
    assert restored.state_dict() == {"best": 1.0, "best_epoch": 0, "stale_epochs": 1}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"patience": 0}, "patience must be an integer >= 1, got 0"),
        ({"factor": 1.0}, r"factor must be a number in \(0, 1\), got 1.0"),
        ({"min_delta": -1.0}, "min_delta must be a finite number >= 0, got -1.0"),
    ],
)
def test_plateau_policy_rejects_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        PlateauPolicy(**arguments)


# Fault injection.


def test_parse_faults_reads_tokens():
    assert parse_faults(["tamiyo-hang@3", " kasmina-error@0 "]) == (
        Fault("tamiyo-hang", 3),
        Fault("kasmina-error", 0),
    )
    assert str(parse_fault("tamiyo-error@2")) == "tamiyo-error@2"


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("tamiyo-hang", r"invalid fault 'tamiyo-hang': expected NAME@N with N an integer >= 0"),
        ("tamiyo-hang@x", r"invalid fault 'tamiyo-hang@x'"),
        ("tamiyo-hang@-1", r"invalid fault 'tamiyo-hang@-1'"),
        ("nan@3", r"unknown fault 'nan' in 'nan@3'; valid names: tamiyo-hang, tamiyo-error, kasmina-hang"),
    ],
)
def test_parse_fault_rejects_bad_tokens(token, message):
    with pytest.raises(ValueError, match=message):
        parse_fault(token)


def test_parse_fault_accepts_extra_kinds():
    plan = FaultPlan.parse(["nan@12", "tamiyo-hang@1", "spike@30"], extra_kinds={"nan", "spike"})
    assert plan.extra() == (Fault("nan", 12), Fault("spike", 30))
    assert plan.at("tamiyo-hang") == {1}
    assert plan.at("nan") == {12}
    with pytest.raises(ValueError, match="valid names: tamiyo-hang, tamiyo-error, kasmina-hang, kasmina-error, nan"):
        parse_fault("boom@1", extra_kinds={"nan"})


def test_faulty_tamiyo_raises_and_passes_through():
    tamiyo = FaultPlan.parse(["tamiyo-error@1"]).wrap_tamiyo(PlateauPolicy())
    assert tamiyo.evaluate_epoch(epoch_state(0, 1.0)).kind == "noop"
    with pytest.raises(InjectedFault, match="injected tamiyo-error at epoch 1"):
        tamiyo.evaluate_epoch(epoch_state(1, 1.0))


def test_faulty_tamiyo_hang_ends_when_cancelled():
    tamiyo = FaultyTamiyo(PlateauPolicy(), hang_epochs={2})
    token = CancelToken("hang")
    threading.Timer(0.05, token.cancel, args=("deadline",)).start()
    started = time.monotonic()
    with pytest.raises(TaskCancelled):
        tamiyo.evaluate_epoch(epoch_state(2, 1.0), cancel=token)
    assert time.monotonic() - started < 2.0


def test_faulty_tamiyo_hang_without_token_sleeps_hang_s():
    tamiyo = FaultyTamiyo(PlateauPolicy(), hang_epochs={0}, hang_s=0.05)
    started = time.monotonic()
    assert tamiyo.evaluate_epoch(epoch_state(0, 1.0)).kind == "noop"
    assert time.monotonic() - started >= 0.05


def test_faulty_kasmina_uses_command_epoch():
    optimizer = make_optimizer(0.1)
    kasmina = FaultyKasmina(OptimizerExecutor(optimizer), error_epochs={3}, hang_epochs={4})
    with pytest.raises(InjectedFault, match="injected kasmina-error at epoch 3"):
        kasmina.apply_command(AdaptationCommand.adjust_lr(factor=0.5, epoch=3))
    token = CancelToken("hang")
    token.cancel("deadline")
    with pytest.raises(TaskCancelled):
        kasmina.apply_command(AdaptationCommand.adjust_lr(factor=0.5, epoch=4), cancel=token)
    assert lrs(optimizer) == [0.1]
    kasmina.apply_command(AdaptationCommand.adjust_lr(factor=0.5, epoch=5))
    assert lrs(optimizer) == [0.05]
