"""The round machine's typed stops: the privacy budget as a round budget, causes, and their checkpoints."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from conftest import close_round_with_d1, one_device_machine
from fedmqtt.coordinator.machine import (
    JobFinished,
    JobStopped,
    OpenRound,
    RoundFailed,
    RoundMachine,
    StatusChanged,
    StopCause,
)
from fedmqtt.schema import Phase

REASON = "privacy budget: one more round would exceed target epsilon 8 (spent 7.900 at delta 1.00e-05)"


machine = one_device_machine
close_round = close_round_with_d1


def test_no_round_fits_stops_before_round_one() -> None:
    m = machine()
    m.set_round_budget(0, REASON)
    assert m.start(0.0) == [JobStopped(REASON, StopCause.PRIVACY_BUDGET), StatusChanged()]
    assert m.phase is Phase.STOPPED and m.round == 0 and m.end_cause is StopCause.PRIVACY_BUDGET


def test_the_budget_stops_after_the_round_just_aggregated() -> None:
    m = machine()
    m.set_round_budget(1, REASON)
    assert any(isinstance(a, OpenRound) for a in m.start(0.0))
    close_round(m, 1.0)
    m.set_round_budget(0, REASON)  # the adapter accounted round 1: nothing left
    actions = m.aggregation_done(1, 2.0)
    assert [type(a) for a in actions] == [JobStopped, StatusChanged]
    assert actions[0] == JobStopped(REASON, StopCause.PRIVACY_BUDGET)
    assert m.round == 1 and m.end_reason == REASON


def test_the_last_round_finishes_whatever_the_budget() -> None:
    m = machine(rounds=1)
    m.start(0.0)
    close_round(m, 1.0)
    m.set_round_budget(0, REASON)
    assert [type(a) for a in m.aggregation_done(1, 2.0)] == [JobFinished, StatusChanged]
    assert m.end_cause is None


@given(budget=st.integers(0, 8), rounds=st.integers(1, 8))
def test_empty_poisson_draws_use_the_budget(budget: int, rounds: int) -> None:
    m = machine(rounds=rounds, sample_rate=1e-9)
    m.set_round_budget(budget, REASON)
    actions = m.start(0.0)
    skipped = [a for a in actions if isinstance(a, RoundFailed)]
    assert all(a.skipped for a in skipped) and len(skipped) == min(budget, rounds)
    end = actions[-2]
    if budget < rounds:
        assert end == JobStopped(REASON, StopCause.PRIVACY_BUDGET) and m.round == (budget + 1 if budget else 0)
    else:
        assert isinstance(end, JobFinished)


def test_max_attempts_is_a_failure_cause_and_causes_survive_a_checkpoint() -> None:
    m = machine(max_attempts=1, min_updates=1)
    m.start(0.0)
    stopped = [a for a in m.tick(100.0) if isinstance(a, JobStopped)]
    assert stopped[0].cause is StopCause.ROUND_FAILURES and not stopped[0].cause.by_rule
    assert StopCause.PRIVACY_BUDGET.by_rule
    restored = RoundMachine.from_state_dict(m.config, m.state_dict())
    assert restored.end_cause is StopCause.ROUND_FAILURES and restored.end_reason == m.end_reason


def test_a_checkpoint_written_before_causes_were_recorded_still_says_why() -> None:
    m = machine()
    m.set_round_budget(0, REASON)
    m.start(0.0)
    state = m.state_dict()
    del state["end_cause"]
    assert RoundMachine.from_state_dict(m.config, state).end_cause is StopCause.PRIVACY_BUDGET
    state["end_reason"] = "round 1 failed 3 time(s)"
    assert RoundMachine.from_state_dict(m.config, state).end_cause is StopCause.ROUND_FAILURES
