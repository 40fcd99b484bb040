"""--target-accuracy: the round machine's TARGET_ACCURACY stop, the coordinator's exit code and its refusal
without an evaluation set."""

from __future__ import annotations

import pytest

from conftest import close_round_with_d1, one_device_machine
from fedmqtt.coordinator.config import CoordinatorConfig
from fedmqtt.coordinator.machine import (
    JobFinished,
    JobStopped,
    OpenRound,
    RoundMachine,
    StatusChanged,
    StopCause,
)
from fedmqtt.coordinator.service import EXIT_CODES, CoordinatorService
from fedmqtt.errors import ConfigError
from fedmqtt.schema import Phase

REASON = "target accuracy 0.97 reached: 0.9712 after round 1"


machine = one_device_machine
close_round = close_round_with_d1


def test_reaching_the_target_stops_the_job_instead_of_opening_the_next_round() -> None:
    m = machine()
    m.start(0.0)
    close_round(m, 1.0)
    actions = m.aggregation_done(1, 2.0, target_reached=REASON)
    assert actions == [JobStopped(REASON, StopCause.TARGET_ACCURACY), StatusChanged()]
    assert not any(isinstance(a, OpenRound) for a in actions)
    assert m.phase is Phase.STOPPED and m.round == 1 and m.end_reason == REASON
    assert m.end_cause is StopCause.TARGET_ACCURACY and m.end_cause.by_rule and not m.end_cause.resumable


def test_without_the_target_the_next_round_opens() -> None:
    m = machine()
    m.start(0.0)
    close_round(m, 1.0)
    assert any(isinstance(a, OpenRound) for a in m.aggregation_done(1, 2.0, target_reached=None))
    assert m.round == 2 and m.end_cause is None


def test_the_last_round_finishes_even_when_it_reaches_the_target() -> None:
    m = machine(rounds=1)
    m.start(0.0)
    close_round(m, 1.0)
    assert [type(a) for a in m.aggregation_done(1, 2.0, target_reached=REASON)] == [JobFinished, StatusChanged]
    assert m.phase is Phase.FINISHED and m.end_cause is None


def test_the_target_comes_before_the_privacy_budget() -> None:
    m = machine()
    m.set_round_budget(1, "privacy budget: none left")
    m.start(0.0)
    close_round(m, 1.0)
    m.set_round_budget(0, "privacy budget: none left")
    (stopped, _) = m.aggregation_done(1, 2.0, target_reached=REASON)
    assert stopped == JobStopped(REASON, StopCause.TARGET_ACCURACY)


def test_the_cause_survives_a_checkpoint() -> None:
    m = machine()
    m.start(0.0)
    close_round(m, 1.0)
    m.aggregation_done(1, 2.0, target_reached=REASON)
    restored = RoundMachine.from_state_dict(m.config, m.state_dict())
    assert restored.end_cause is StopCause.TARGET_ACCURACY and restored.end_reason == REASON


def test_a_job_that_reached_its_target_exits_0() -> None:
    assert EXIT_CODES[StopCause.TARGET_ACCURACY] == 0


@pytest.mark.parametrize("value", [0.0, 1.5, float("nan")])
def test_a_target_outside_0_1_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match="target_accuracy"):
        CoordinatorConfig.model_validate({"job": "j", "rounds": 2, "min_updates": 1, "target_accuracy": value})


def test_a_target_without_an_evaluation_set_is_refused_naming_the_flag() -> None:
    config = CoordinatorConfig.model_validate(
        {"job": "j", "rounds": 2, "min_updates": 1, "model": "mlp", "target_accuracy": 0.9}
    )
    with pytest.raises(ConfigError, match=r"--target-accuracy.*--eval-data"):
        CoordinatorService(config)
