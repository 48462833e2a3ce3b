"""Validation and TOML-style construction of ``EmergencyPolicy``."""

from __future__ import annotations

import tomllib

import pytest

from tolaria.functional.emergency import EmergencyPolicy, Level, Threshold, level_for_count


def test_default_policy_is_documented_ladder():
    policy = EmergencyPolicy()

    assert policy.cooldown_steps == 100
    assert policy.on_nonfinite == (
        Threshold(1, Level.ELEVATED),
        Threshold(3, Level.CONSERVATIVE),
        Threshold(10, Level.HALT),
    )
    assert policy.on_spike == (
        Threshold(1, Level.NOTICE),
        Threshold(3, Level.ELEVATED),
        Threshold(6, Level.CONSERVATIVE),
    )
    assert policy.on_timeout == (Threshold(1, Level.NOTICE), Threshold(3, Level.ELEVATED))
    assert policy.on_rollback_failure == (Threshold(1, Level.HALT),)


def test_ladders_are_normalised_to_thresholds():
    policy = EmergencyPolicy(on_spike=[[2, "notice"], (5, 3)], on_timeout={"4": "ELEVATED"})

    assert policy.on_spike == (Threshold(2, Level.NOTICE), Threshold(5, Level.CONSERVATIVE))
    assert policy.on_timeout == (Threshold(4, Level.ELEVATED),)
    assert isinstance(policy.on_spike[1].level, Level)


def test_policy_is_frozen():
    policy = EmergencyPolicy()

    with pytest.raises(AttributeError):
        policy.cooldown_steps = 5


def test_from_toml_table():
    text = """
    [emergency]
    cooldown_steps = 20
    on_spike = [[1, "NOTICE"], [4, "CONSERVATIVE"]]
    on_nonfinite = { 1 = "ELEVATED", 2 = "HALT" }
    on_timeout = []
    """
    policy = EmergencyPolicy.from_mapping(tomllib.loads(text)["emergency"])

    assert policy == EmergencyPolicy(
        cooldown_steps=20,
        on_spike=(Threshold(1, Level.NOTICE), Threshold(4, Level.CONSERVATIVE)),
        on_nonfinite=(Threshold(1, Level.ELEVATED), Threshold(2, Level.HALT)),
        on_timeout=(),
    )


def test_to_mapping_round_trip():
    policy = EmergencyPolicy(cooldown_steps=7, on_spike=((2, Level.ELEVATED),))

    data = policy.to_mapping()

    assert data["on_spike"] == [[2, "ELEVATED"]]
    assert data["cooldown_steps"] == 7
    assert EmergencyPolicy.from_mapping(data) == policy


def test_from_mapping_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown emergency policy keys \['cooldown'\]; allowed keys are \["):
        EmergencyPolicy.from_mapping({"cooldown": 3})


def test_from_mapping_rejects_non_mapping():
    with pytest.raises(ValueError, match=r"emergency policy=\[1\] is invalid; expected a mapping"):
        EmergencyPolicy.from_mapping([1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cooldown_steps": 0}, r"cooldown_steps=0 is invalid; expected an integer >= 1"),
        ({"cooldown_steps": True}, r"cooldown_steps=True is invalid"),
        ({"cooldown_steps": 2.5}, r"cooldown_steps=2.5 is invalid"),
        ({"on_spike": "NOTICE"}, r"on_spike='NOTICE' is invalid; expected a sequence of \(count, level\) pairs"),
        ({"on_spike": [(1, 2, 3)]}, r"on_spike\[0\]=\(1, 2, 3\) is invalid; expected a \(count, level\) pair"),
        ({"on_spike": [(0, "NOTICE")]}, r"on_spike\[0\].min_count=0 is invalid; expected an integer >= 1"),
        ({"on_spike": [(1, "LOUD")]}, r"on_spike\[0\].level='LOUD' is not an emergency level"),
        ({"on_spike": [(1, "NOMINAL")]}, r"on_spike\[0\].level=NOMINAL is invalid; to ignore a signal"),
        (
            {"on_timeout": [(3, "NOTICE"), (3, "HALT")]},
            r"on_timeout\[1\].min_count=3 is invalid; counts must increase strictly \(previous count 3\)",
        ),
        (
            {"on_nonfinite": [(1, "HALT"), (2, "ELEVATED")]},
            r"on_nonfinite\[1\].level=ELEVATED is invalid; levels must increase strictly \(previous level HALT\)",
        ),
        ({"on_rollback_failure": {"x": "HALT"}}, r"on_rollback_failure\[0\].min_count='x' is invalid"),
    ],
)
def test_invalid_policy_fields_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EmergencyPolicy(**kwargs)


@pytest.mark.parametrize(
    ("count", "expected"),
    [(0, Level.NOMINAL), (1, Level.NOTICE), (2, Level.NOTICE), (3, Level.ELEVATED), (99, Level.HALT)],
)
def test_level_for_count(count, expected):
    ladder = (Threshold(1, Level.NOTICE), Threshold(3, Level.ELEVATED), Threshold(10, Level.HALT))

    assert level_for_count(ladder, count) is expected
