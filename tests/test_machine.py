"""The round state machine, without a broker: every transition, every edge, checkpoints."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import update_header as header
from fedmqtt.coordinator.errors import IllegalEvent, StateDictError
from fedmqtt.coordinator.machine import (
    TRANSITIONS,
    Action,
    CloseRound,
    DeviceOffline,
    DeviceOnline,
    EventName,
    JobFinished,
    JobStopped,
    OpenRound,
    RoundConfig,
    RoundFailed,
    RoundMachine,
    Screening,
    Stage,
    StatusChanged,
    StopCause,
    UpdateAccepted,
    UpdateRefused,
    Verdict,
)
from fedmqtt.errors import ConfigError
from fedmqtt.schema import FrameHeader, FrameKind, Phase, RefusalReason

JOB = "job"


def config(**overrides: Any) -> RoundConfig:
    values: dict[str, Any] = {"job": JOB, "rounds": 3, "min_updates": 2, "round_timeout": 10.0}
    values.update(overrides)
    return RoundConfig(**values)


def of_type(actions: list[Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def one(actions: list[Action], kind: type) -> Any:
    found = of_type(actions, kind)
    assert len(found) == 1, f"expected one {kind.__name__} in {actions}"
    return found[0]


def bring_online(machine: RoundMachine, *devices: str, now: float = 0.0) -> list[Action]:
    actions: list[Action] = []
    for d in devices:
        actions += machine.device_status(d, "online", now)
    return actions


def accept(machine: RoundMachine, device: str, now: float, body: str = "body", samples: int = 10) -> list[Action]:
    h = header(device, machine.round, body, num_samples=samples)
    assert machine.screen_update(device, h) is Screening.ACCEPTABLE
    return machine.accept_update(device, h, now)


def training_machine(devices: int = 3, **overrides: Any) -> RoundMachine:
    machine = RoundMachine(config(**overrides))
    bring_online(machine, *[f"d{i}" for i in range(devices)])
    machine.start(0.0)
    assert machine.stage is Stage.TRAINING
    return machine


# ---------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------


def test_config_defaults() -> None:
    c = config()
    assert c.min_devices == 2 and c.devices_needed == 2
    assert c.min_updates_at_deadline == 1 and c.max_attempts == 3 and c.seed == 0
    assert c.devices_per_round is None and c.sample_rate is None


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"job": "bad/job"}, "job"),
        ({"job": ""}, "job"),
        ({"rounds": 0}, "rounds"),
        ({"rounds": True}, "rounds"),
        ({"rounds": 2.0}, "rounds"),
        ({"min_updates": 0}, "min_updates"),
        ({"round_timeout": 0}, "round_timeout"),
        ({"round_timeout": -1.0}, "round_timeout"),
        ({"round_timeout": float("inf")}, "round_timeout"),
        ({"round_timeout": float("nan")}, "round_timeout"),
        ({"round_timeout": "10"}, "round_timeout"),
        ({"min_devices": 0}, "min_devices"),
        ({"devices_per_round": 1}, "devices_per_round"),
        ({"devices_per_round": 0}, "devices_per_round"),
        ({"min_updates_at_deadline": 0}, "min_updates_at_deadline"),
        ({"min_updates_at_deadline": 3}, "min_updates_at_deadline"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"seed": -1}, "seed"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sample_rate": True}, "sample_rate"),
        ({"sample_rate": 0.5, "devices_per_round": 3}, "sample_rate"),
    ],
)
def test_config_rejects_bad_values(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(**overrides)
    assert err.value.field == field
    assert field in str(err.value)


# ---------------------------------------------------------------------------------------------------
# waiting, opening, closing
# ---------------------------------------------------------------------------------------------------


def test_waits_for_min_devices_then_opens_on_status() -> None:
    machine = RoundMachine(config(min_devices=3))
    assert machine.phase is Phase.WAITING and machine.stage is Stage.NEW
    # Retained statuses arrive before start: tracked, no round.
    actions = bring_online(machine, "a")
    assert actions == [DeviceOnline("a"), StatusChanged()]
    actions = machine.start(1.0)
    assert of_type(actions, OpenRound) == [] and machine.stage is Stage.WAITING
    assert machine.round == 1 and machine.attempt == 0
    assert machine.tick(2.0) == []  # nothing changes: no StatusChanged either
    assert of_type(bring_online(machine, "b", now=3.0), OpenRound) == []
    actions = machine.device_status("c", "training", 4.0)  # training counts as online
    opened = one(actions, OpenRound)
    assert opened == OpenRound(round=1, attempt=0, selected=("a", "b", "c"), deadline=14.0, opened_at=4.0)
    assert actions[0] == DeviceOnline("c") and actions[-1] == StatusChanged()
    assert machine.stage is Stage.TRAINING and machine.deadline == 14.0


def test_tick_opens_a_waiting_round_after_resume() -> None:
    # Live status changes open rounds at once; a checkpoint restored with devices online opens on tick.
    machine = RoundMachine(config())
    machine.start(0.0)
    state = machine.state_dict()
    state["online"] = ["a", "b"]
    machine.load_state_dict(state)
    opened = one(machine.tick(5.0), OpenRound)
    assert opened.selected == ("a", "b") and opened.deadline == 15.0


def test_quorum_close_then_next_round_then_finish() -> None:
    machine = training_machine(devices=3, rounds=2)
    assert machine.selected == ("d0", "d1", "d2") and machine.needed == 2
    actions = accept(machine, "d2", 1.0, samples=7)
    assert actions == [UpdateAccepted("d2", 1, 7), StatusChanged()]
    machine.refuse_update("d1", 1, RefusalReason.NON_FINITE, "NaN in fc.weight", 1.5)
    actions = accept(machine, "d0", 2.0, samples=5)
    close = one(actions, CloseRound)
    assert close == CloseRound(
        round=1,
        attempt=0,
        participants=("d2", "d0"),
        closed_by="quorum",
        opened_at=0.0,
        closed_at=2.0,
        num_samples=12,
        refused={RefusalReason.NON_FINITE: 1},
    )
    assert machine.phase is Phase.AGGREGATING and machine.deadline is None
    assert machine.tick(100.0) == []  # no deadline while aggregating
    actions = machine.aggregation_done(1, 3.0)
    opened = one(actions, OpenRound)
    assert (opened.round, opened.attempt, opened.opened_at) == (2, 0, 3.0)
    assert machine.refused_this_round == {} and machine.refused_total == {RefusalReason.NON_FINITE: 1}
    accept(machine, "d0", 4.0)
    accept(machine, "d1", 4.0)
    actions = machine.aggregation_done(2, 5.0)
    assert of_type(actions, JobFinished) == [JobFinished("completed all 2 rounds")]
    assert machine.phase is Phase.FINISHED and machine.done
    assert machine.tick(6.0) == [] and of_type(machine.device_status("d0", "offline", 7.0), DeviceOffline)


def test_next_round_waits_when_devices_left() -> None:
    machine = training_machine(devices=2)
    accept(machine, "d0", 1.0)
    accept(machine, "d1", 1.0)
    machine.device_status("d1", "offline", 2.0)
    actions = machine.aggregation_done(1, 3.0)
    assert of_type(actions, OpenRound) == [] and machine.phase is Phase.WAITING and machine.round == 2
    opened = one(machine.device_status("d1", "online", 4.0), OpenRound)
    assert (opened.round, opened.attempt) == (2, 0)


def test_deadline_close_with_enough_updates() -> None:
    machine = training_machine(devices=3, min_updates=3)
    accept(machine, "d1", 1.0)
    assert machine.tick(9.99) == []
    close = one(machine.tick(10.0), CloseRound)
    assert close.closed_by == "deadline" and close.participants == ("d1",) and close.closed_at == 10.0


def test_deadline_with_too_few_fails_and_retries_with_new_selection() -> None:
    machine = training_machine(devices=6, min_updates=2, devices_per_round=3, min_updates_at_deadline=2)
    first = machine.selected
    accept(machine, first[0], 1.0)
    actions = machine.tick(10.0)
    failed = one(actions, RoundFailed)
    assert (failed.round, failed.attempt, failed.skipped) == (1, 0, False)
    assert "1 update(s)" in failed.reason
    opened = one(actions, OpenRound)
    assert (opened.round, opened.attempt, opened.opened_at, opened.deadline) == (1, 1, 10.0, 20.0)
    assert set(opened.selected) <= {f"d{i}" for i in range(6)} and len(opened.selected) == 3
    assert machine.accepted == {}  # the failed attempt's updates are dropped
    assert machine.snapshot(10.0).attempt == 1
    # Each retry is a fresh draw, not a re-use of the first selection.
    selections = {first, opened.selected}
    machine2 = training_machine(devices=6, devices_per_round=3, max_attempts=6)
    for t in (10.0, 20.0, 30.0, 40.0, 50.0):
        selections.add(one(machine2.tick(t), OpenRound).selected)
    assert len(selections) > 1


def test_max_attempts_stops_the_job() -> None:
    machine = training_machine(devices=2, max_attempts=2)
    actions = machine.tick(10.0)
    assert [type(a) for a in actions] == [RoundFailed, OpenRound, StatusChanged]
    actions = machine.tick(20.0)
    assert [type(a) for a in actions] == [RoundFailed, JobStopped, StatusChanged]
    stopped = one(actions, JobStopped)
    assert "max_attempts=2" in stopped.reason and "round 1 failed 2 time(s)" in stopped.reason
    assert machine.phase is Phase.STOPPED and machine.end_reason == stopped.reason


def test_retry_waits_for_devices() -> None:
    machine = training_machine(devices=2, min_updates_at_deadline=1)
    machine.device_status("d0", "offline", 1.0)
    actions = machine.device_status("d1", "offline", 2.0)  # nobody can answer: fail now
    failed = one(actions, RoundFailed)
    assert "no selected device left online" in failed.reason
    assert machine.phase is Phase.WAITING and machine.round == 1
    bring_online(machine, "d0", now=3.0)
    opened = one(machine.device_status("d1", "online", 4.0), OpenRound)
    assert (opened.round, opened.attempt) == (1, 1)


def test_last_will_shrinks_the_expected_set_and_closes_early() -> None:
    machine = training_machine(devices=4, min_updates=3, devices_per_round=3)
    a, b, c = machine.selected
    unselected = ({"d0", "d1", "d2", "d3"} - {a, b, c}).pop()
    assert of_type(machine.device_status(unselected, "offline", 0.5), CloseRound) == []
    accept(machine, a, 1.0)
    actions = machine.device_status(c, "offline", 2.0)
    assert actions[0] == DeviceOffline(c) and of_type(actions, CloseRound) == []
    close = one(machine.device_status(b, "offline", 3.0), CloseRound)
    assert close.closed_by == "deadline" and close.participants == (a,) and close.closed_at == 3.0


def test_offline_then_back_online_is_expected_again() -> None:
    machine = training_machine(devices=2, min_updates=2)
    machine.device_status("d0", "offline", 1.0)
    machine.device_status("d0", "online", 2.0)
    assert of_type(accept(machine, "d1", 3.0), CloseRound) == []  # d0 can still answer
    assert one(accept(machine, "d0", 4.0), CloseRound).closed_by == "quorum"


def test_accepting_the_last_possible_update_below_the_deadline_minimum_fails() -> None:
    machine = training_machine(devices=3, min_updates=3, min_updates_at_deadline=2)
    machine.device_status("d0", "offline", 1.0)
    machine.device_status("d1", "offline", 1.0)
    actions = accept(machine, "d2", 2.0)
    assert one(actions, RoundFailed).attempt == 0
    assert machine.phase is Phase.WAITING  # one device online, two needed


def test_quorum_shrinks_to_the_selection() -> None:
    machine = training_machine(devices=1, min_updates=3, min_devices=1)
    assert machine.selected == ("d0",) and machine.needed == 1
    assert one(accept(machine, "d0", 1.0), CloseRound).closed_by == "quorum"


def test_device_status_edges() -> None:
    machine = RoundMachine(config())
    assert machine.device_status("ghost", "offline", 0.0) == []
    bring_online(machine, "a")
    assert machine.device_status("a", "training", 0.0) == []  # already online
    assert machine.device_status("a", "online", 0.0) == []
    assert machine.online == frozenset({"a"})


def test_snapshot_while_training() -> None:
    machine = training_machine(devices=3)
    accept(machine, "d0", 1.0)
    machine.refuse_update("x", None, RefusalReason.MALFORMED, "garbage", 1.0)
    snap = machine.snapshot(2.0)
    assert snap.job == JOB and snap.round == 1 and snap.rounds_total == 3 and snap.attempt == 0
    assert snap.phase is Phase.TRAINING and snap.received == 1 and snap.needed == 2
    assert snap.deadline == 10.0 and snap.devices_online == 3 and snap.selected == ("d0", "d1", "d2")
    assert snap.refused_total == 1 and snap.updated_at == 2.0
    assert snap.privacy is None and snap.last_metrics is None


def test_stop_from_outside() -> None:
    machine = training_machine()
    actions = machine.stop("privacy budget: epsilon 8 reached", 1.0)
    assert actions == [JobStopped("privacy budget: epsilon 8 reached"), StatusChanged()]
    assert machine.phase is Phase.STOPPED and machine.snapshot(1.0).deadline is None
    assert machine.screen_update("d0", header("d0", 1)).reason is RefusalReason.STALE_ROUND


# ---------------------------------------------------------------------------------------------------
# screening and refusals
# ---------------------------------------------------------------------------------------------------


def test_every_screening_refusal() -> None:
    machine = RoundMachine(config(devices_per_round=2, rounds=5))
    bring_online(machine, "d0", "d1", "d2")

    def reason(device: str, h: FrameHeader) -> RefusalReason | None:
        return machine.screen_update(device, h).reason

    assert reason("d0", header("d0", 1)) is RefusalReason.NO_OPEN_ROUND  # before start
    machine.start(0.0)
    sel = machine.selected
    outsider = ({"d0", "d1", "d2"} - set(sel)).pop()
    assert reason(sel[0], header(sel[0], 1, kind=FrameKind.GLOBAL_MODEL)) is RefusalReason.WRONG_KIND
    assert reason(sel[0], header(sel[0], 1, kind=FrameKind.PARTIAL_AGGREGATE)) is RefusalReason.WRONG_KIND
    assert reason(sel[0], header(sel[0], 1, job="other")) is RefusalReason.WRONG_JOB
    assert reason(sel[0], header(sel[1], 1)) is RefusalReason.SENDER_MISMATCH
    assert reason(sel[0], header(sel[0], 2)) is RefusalReason.FUTURE_ROUND
    assert reason(sel[0], header(sel[0], 0)) is RefusalReason.STALE_ROUND
    assert reason(outsider, header(outsider, 1)) is RefusalReason.NOT_SELECTED
    accept(machine, sel[0], 1.0, body="first")
    assert machine.screen_update(sel[0], header(sel[0], 1, "first")) is Screening.REDELIVERY
    dup = machine.screen_update(sel[0], header(sel[0], 1, "second"))
    assert dup.refused and dup.reason is RefusalReason.DUPLICATE and "first one counts" in dup.detail
    reason_, detail = dup  # a refusal unpacks as (reason, detail)
    assert reason_ is RefusalReason.DUPLICATE and detail == dup.detail
    accept(machine, sel[1], 2.0)  # quorum: closed
    assert machine.screen_update(sel[0], header(sel[0], 1, "first")) is Screening.REDELIVERY
    assert reason(sel[0], header(sel[0], 1, "second")) is RefusalReason.DUPLICATE
    assert reason(outsider, header(outsider, 1)) is RefusalReason.STALE_ROUND  # late
    machine.aggregation_done(1, 3.0)
    assert reason(sel[0], header(sel[0], 1, "first")) is RefusalReason.STALE_ROUND  # previous round


def test_no_open_round_while_waiting_to_retry() -> None:
    machine = training_machine(devices=2)
    machine.device_status("d0", "offline", 1.0)
    machine.device_status("d1", "offline", 1.0)
    assert machine.phase is Phase.WAITING
    assert machine.screen_update("d0", header("d0", 1)).reason is RefusalReason.NO_OPEN_ROUND


def test_screening_is_a_pure_query() -> None:
    machine = training_machine()
    accept(machine, "d0", 1.0)
    before = machine.state_dict()
    for h in (header("d0", 1), header("d0", 1, "other"), header("d1", 1), header("d1", 7), header("zz", 1)):
        machine.screen_update(h.sender, h)
    assert machine.state_dict() == before


@pytest.mark.parametrize("reason", list(RefusalReason))
def test_refuse_update_counts_every_reason(reason: RefusalReason) -> None:
    machine = training_machine(devices=3)
    accept(machine, "d0", 1.0)
    accepted_before = machine.accepted
    actions = machine.refuse_update("d0", 1, reason, "why", 2.0)
    assert actions == [UpdateRefused("d0", 1, reason, "why"), StatusChanged()]
    assert machine.refused_this_round == {reason: 1} and machine.refused_total == {reason: 1}
    assert machine.accepted == accepted_before  # never touches what was accepted
    machine.refuse_update("d1", None, reason.value, "as a string", 3.0)  # type: ignore[arg-type]
    assert machine.refused_total == {reason: 2}


def test_refusals_outside_an_open_round_count_in_total_only() -> None:
    machine = RoundMachine(config())
    machine.refuse_update("d0", 4, RefusalReason.FUTURE_ROUND, "early", 0.0)
    assert machine.refused_total == {RefusalReason.FUTURE_ROUND: 1} and machine.refused_this_round == {}
    bring_online(machine, "d0", "d1")
    machine.start(1.0)
    accept(machine, "d0", 2.0)
    accept(machine, "d1", 2.0)
    machine.refuse_update("d0", 1, RefusalReason.DUPLICATE, "late", 3.0)
    assert machine.refused_this_round == {}
    assert machine.refused_total == {RefusalReason.FUTURE_ROUND: 1, RefusalReason.DUPLICATE: 1}


def test_redelivery_cannot_be_accepted_twice() -> None:
    machine = training_machine()
    accept(machine, "d0", 1.0, body="x")
    before = machine.state_dict()
    with pytest.raises(IllegalEvent, match="re-delivery"):
        machine.accept_update("d0", header("d0", 1, "x"), 2.0)
    with pytest.raises(IllegalEvent, match="first one counts"):
        machine.accept_update("d0", header("d0", 1, "y"), 2.0)
    with pytest.raises(IllegalEvent, match="not selected"):
        machine.accept_update("zz", header("zz", 1), 2.0)
    assert machine.state_dict() == before


# ---------------------------------------------------------------------------------------------------
# the transition table: illegal events raise and change nothing
# ---------------------------------------------------------------------------------------------------


def machine_in(stage: Stage) -> RoundMachine:
    machine = RoundMachine(config(rounds=1))
    if stage is Stage.NEW:
        return machine
    if stage is Stage.WAITING:
        machine.start(0.0)
        return machine
    bring_online(machine, "d0", "d1")
    machine.start(0.0)
    if stage is Stage.TRAINING:
        return machine
    accept(machine, "d0", 1.0)
    accept(machine, "d1", 1.0)
    if stage is Stage.AGGREGATING:
        return machine
    if stage is Stage.FINISHED:
        machine.aggregation_done(1, 2.0)
        return machine
    machine.stop("enough", 2.0)
    return machine


EVENTS: dict[EventName, Callable[[RoundMachine], list[Action]]] = {
    EventName.START: lambda m: m.start(5.0),
    EventName.DEVICE_STATUS: lambda m: m.device_status("d9", "online", 5.0),
    EventName.ACCEPT_UPDATE: lambda m: m.accept_update("d0", header("d0", m.round, "fresh"), 5.0),
    EventName.REFUSE_UPDATE: lambda m: m.refuse_update("d0", 1, RefusalReason.MALFORMED, "bad", 5.0),
    EventName.TICK: lambda m: m.tick(5.0),
    EventName.AGGREGATION_DONE: lambda m: m.aggregation_done(m.round, 5.0),
    EventName.AGGREGATION_FAILED: lambda m: m.aggregation_failed(m.round, "non-finite", 5.0),
    EventName.STOP: lambda m: m.stop("why", 5.0),
    EventName.TARGET_REACHED: lambda m: m.target_reached("target accuracy 0.5 reached: 0.6 after round 1", 5.0),
    EventName.ABANDON_ATTEMPT: lambda m: m.abandon_attempt("the coordinator restarted", 5.0),
}


def test_every_stage_and_event_is_in_the_test_grid() -> None:
    assert {s for s, _ in TRANSITIONS} == set(Stage) and set(EVENTS) == set(EventName)


@pytest.mark.parametrize("stage", list(Stage))
@pytest.mark.parametrize("event", list(EventName))
def test_transition_table(stage: Stage, event: EventName) -> None:
    machine = machine_in(stage)
    assert machine.stage is stage
    before = machine.state_dict()
    allowed = TRANSITIONS.get((stage, event))
    if allowed is None:
        with pytest.raises(IllegalEvent) as err:
            EVENTS[event](machine)
        assert err.value.phase == stage.value and err.value.event == event.value
        assert event.value in str(err.value)
        assert machine.state_dict() == before
    else:
        EVENTS[event](machine)
        assert machine.stage in allowed


def test_bad_event_arguments_are_illegal_and_change_nothing() -> None:
    machine = training_machine()
    before = machine.state_dict()
    with pytest.raises(IllegalEvent, match="not one of"):
        machine.device_status("d0", "asleep", 1.0)
    with pytest.raises(IllegalEvent, match="invalid device id"):
        machine.device_status("a/b", "online", 1.0)
    with pytest.raises(IllegalEvent, match="not a RefusalReason"):
        machine.refuse_update("d0", 1, "bored", "x", 1.0)  # type: ignore[arg-type]
    accept(machine, "d0", 1.0)
    accept(machine, "d1", 1.0)
    before = machine.state_dict()
    with pytest.raises(IllegalEvent, match="round 2 finished aggregating"):
        machine.aggregation_done(2, 2.0)
    assert machine.state_dict() == before


# ---------------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------------


def run_selections(cfg: RoundConfig, devices: int, rounds: int) -> list[tuple[str, ...]]:
    """Drive ``rounds`` rounds, each closed by the first selected device; return every selection."""
    machine = RoundMachine(cfg)
    bring_online(machine, *[f"d{i:02d}" for i in range(devices)])
    actions = machine.start(0.0)
    selections: list[tuple[str, ...]] = []
    t = 0.0
    while True:
        selections += [o.selected for o in of_type(actions, OpenRound)]  # empty Poisson draws too
        if machine.done or len(selections) >= rounds:
            return selections[:rounds]
        t += 1.0
        accept(machine, machine.selected[0], t)
        actions = machine.aggregation_done(machine.round, t)


def test_selection_is_seeded() -> None:
    cfg = config(rounds=20, min_updates=1, devices_per_round=3, seed=7)
    assert run_selections(cfg, 10, 20) == run_selections(cfg, 10, 20)
    other = config(rounds=20, min_updates=1, devices_per_round=3, seed=8)
    assert run_selections(cfg, 10, 20) != run_selections(other, 10, 20)


def test_fixed_size_selection_is_uniform() -> None:
    rounds, devices, k = 2000, 10, 3
    cfg = config(rounds=rounds, min_updates=1, devices_per_round=k, seed=3)
    selections = run_selections(cfg, devices, rounds)
    assert len(selections) == rounds and all(len(s) == k and len(set(s)) == k for s in selections)
    counts = Counter(d for s in selections for d in s)
    expected = rounds * k / devices
    chi2 = sum((counts[f"d{i:02d}"] - expected) ** 2 / expected for i in range(devices))
    assert chi2 < 27.88  # chi-square, 9 degrees of freedom, p = 0.001


def test_poisson_selection_rate() -> None:
    rounds, devices, q = 600, 20, 0.3
    cfg = config(rounds=rounds, min_updates=1, sample_rate=q, seed=11)
    selections = run_selections(cfg, devices, rounds)
    assert len(selections) == rounds
    rate = sum(len(s) for s in selections) / (rounds * devices)
    assert abs(rate - q) < 0.02  # the standard error is 0.004
    assert len({len(s) for s in selections}) > 5  # the size varies, as Poisson sampling does


def test_poisson_round_with_fewer_than_quorum_opens_with_what_it_got() -> None:
    cfg = config(rounds=50, min_updates=3, sample_rate=0.2, seed=5)
    machine = RoundMachine(cfg)
    bring_online(machine, *[f"d{i}" for i in range(5)])
    actions = machine.start(0.0)
    t = 0.0
    while True:  # find a round that drew one or two devices
        opened = of_type(actions, OpenRound)[-1]
        if 0 < len(opened.selected) < 3:
            break
        t += 100.0
        actions = machine.tick(t)
        if machine.stage is Stage.AGGREGATING:
            actions = machine.aggregation_done(machine.round, t)
    assert machine.needed == len(opened.selected)
    for d in opened.selected[:-1]:
        assert of_type(accept(machine, d, t), CloseRound) == []
    assert one(accept(machine, opened.selected[-1], t), CloseRound).closed_by == "quorum"


def test_empty_poisson_draw_counts_as_a_run_round() -> None:
    cfg = config(rounds=3, min_updates=1, min_devices=1, sample_rate=0.001)
    machine = RoundMachine(cfg)
    bring_online(machine, "a", "b")
    actions = machine.start(0.0)
    kinds = [type(a) for a in actions]
    assert kinds == [OpenRound, RoundFailed] * 3 + [JobFinished, StatusChanged]
    fails = of_type(actions, RoundFailed)
    assert [f.round for f in fails] == [1, 2, 3] and all(f.skipped and f.attempt == 0 for f in fails)
    assert "selected none of 2 online devices" in fails[0].reason
    assert [o.selected for o in of_type(actions, OpenRound)] == [(), (), ()]
    assert machine.phase is Phase.FINISHED


# ---------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", list(Stage))
def test_state_dict_round_trip_at_every_stage(stage: Stage) -> None:
    machine = machine_in(stage)
    state = json.loads(json.dumps(machine.state_dict()))
    restored = RoundMachine.from_state_dict(machine.config, state)
    assert restored.state_dict() == machine.state_dict()
    assert restored.snapshot(9.0) == machine.snapshot(9.0)
    for event in EventName:
        results: list[tuple[object, dict[str, Any]]] = []
        for m in (machine_in(stage), RoundMachine.from_state_dict(machine.config, state)):
            try:
                results.append((EVENTS[event](m), m.state_dict()))
            except IllegalEvent as exc:
                results.append((str(exc), m.state_dict()))
        assert results[0] == results[1]


def test_resume_mid_round_keeps_selection_accepted_and_deadline() -> None:
    machine = training_machine(devices=3, min_updates=3, devices_per_round=3)
    accept(machine, "d1", 1.0, body="one")
    restored = RoundMachine.from_state_dict(machine.config, json.loads(json.dumps(machine.state_dict())))
    assert restored.phase is Phase.TRAINING and restored.selected == machine.selected
    assert restored.accepted == {"d1": 10} and restored.deadline == 10.0
    assert restored.screen_update("d1", header("d1", 1, "one")) is Screening.REDELIVERY
    close = one(restored.tick(10.0), CloseRound)
    assert close.participants == ("d1",) and close.opened_at == 0.0


def test_load_state_dict_refuses_bad_checkpoints_and_changes_nothing() -> None:
    machine = training_machine()
    good = machine.state_dict()
    target = training_machine(devices=2)
    before = target.state_dict()

    def broken(**changes: Any) -> dict[str, Any]:
        state = json.loads(json.dumps(good))
        state.update(changes)
        return state

    cases = [
        (broken(job="other"), "job 'other'"),
        (broken(round=99), "beyond rounds=3"),
        (broken(accepted={"zz": {"body_blake2b": "0" * 32, "num_samples": 1}}), "not in the selection"),
        (broken(deadline=None), "opened_at and deadline"),
        (broken(attempts_opened=0), "attempts_opened >= 1"),
        (broken(stage="dancing"), "stage"),
        (broken(version=2), "version"),
        (broken(rng={"bit_generator": "PCG64"}), "rng"),
        ({k: v for k, v in good.items() if k != "online"}, "online"),
    ]
    for state, message in cases:
        with pytest.raises(StateDictError, match=message):
            target.load_state_dict(state)
        assert target.state_dict() == before


# ---------------------------------------------------------------------------------------------------
# property test: random event sequences, checkpoint anywhere, identical behaviour
# ---------------------------------------------------------------------------------------------------

DEVICES = ("a", "b", "c", "d")

_status_op = st.tuples(st.just("status"), st.sampled_from(DEVICES), st.sampled_from(["online", "training", "offline"]))
_update_op = st.tuples(
    st.just("update"), st.sampled_from(DEVICES), st.sampled_from([0, 0, 0, -1, 1]), st.sampled_from(["x", "y"])
)
# An update from the n-th selected device (most of those are acceptable).
_selected_update_op = st.tuples(st.just("selected_update"), st.integers(0, 3), st.sampled_from(["x", "y"]))
# Repeating a branch weights it.
op_strategy = st.one_of(
    *[_status_op] * 4,
    *[_update_op] * 2,
    *[_selected_update_op] * 4,
    *[st.tuples(st.just("tick"), st.floats(min_value=0.0, max_value=4.0))] * 2,
    st.tuples(st.just("refuse"), st.sampled_from(DEVICES), st.sampled_from(list(RefusalReason))),
    *[st.tuples(st.just("done"))] * 3,
)


def apply(machine: RoundMachine, op: tuple[Any, ...], now: float) -> Any:
    """Play one operation the way the adapter would; returns what happened (IllegalEvent -> its text)."""
    before = machine.state_dict()
    try:
        kind = op[0]
        if kind == "status":
            return machine.device_status(op[1], op[2], now)
        if kind == "tick":
            return machine.tick(now)
        if kind in ("update", "selected_update"):
            if kind == "selected_update":
                pool = machine.selected or DEVICES
                op = ("update", pool[op[1] % len(pool)], 0, op[2])
            h = header(op[1], max(machine.round + op[2], 0), op[3])
            screening = machine.screen_update(op[1], h)
            if screening.verdict is Verdict.ACCEPTABLE:
                return machine.accept_update(op[1], h, now)
            if screening.verdict is Verdict.REDELIVERY:
                return "redelivery"
            assert screening.reason is not None
            return machine.refuse_update(op[1], h.round, screening.reason, screening.detail, now)
        if kind == "refuse":
            return machine.refuse_update(op[1], machine.round, op[2], "adapter check", now)
        if kind == "done":
            return machine.aggregation_done(machine.round, now)
        return machine.stop("operator", now)
    except IllegalEvent as exc:
        assert machine.state_dict() == before, "an illegal event changed the state"
        return f"illegal: {exc}"


def check_invariants(machine: RoundMachine) -> None:
    assert set(machine.accepted) <= set(machine.selected)
    assert (machine.deadline is not None) == (machine.stage is Stage.TRAINING)
    assert machine.attempts_opened <= machine.config.max_attempts
    assert 0 <= machine.round <= machine.config.rounds
    if machine.stage is Stage.TRAINING:
        assert len(machine.accepted) < machine.needed
        # The incrementally kept "who can still answer" set matches its definition.
        awaiting = {d for d in machine.selected if d in machine.online and d not in machine.accepted}
        assert machine._awaiting == awaiting
        assert awaiting, "an open round must have someone left to answer"
    machine.snapshot(0.0)  # always a valid Status message


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(op_strategy, min_size=1, max_size=80),
    split=st.integers(min_value=0, max_value=80),
    stop_at=st.one_of(st.none(), st.none(), st.none(), st.integers(min_value=0, max_value=80)),
    initially_online=st.integers(min_value=0, max_value=len(DEVICES)),
    sample_rate=st.sampled_from([None, 0.5]),
    per_round=st.sampled_from([None, 3]),
)
def test_random_sequences_resume_identically(
    ops: list[tuple[Any, ...]],
    split: int,
    stop_at: int | None,
    initially_online: int,
    sample_rate: float | None,
    per_round: int | None,
) -> None:
    cfg = config(
        rounds=3,
        min_updates=2,
        min_devices=2,
        max_attempts=3,
        seed=1,
        sample_rate=sample_rate,
        devices_per_round=None if sample_rate is not None else per_round,
    )
    if stop_at is not None:
        ops = [*ops[:stop_at], ("stop",), *ops[stop_at:]]
    machine = RoundMachine(cfg)
    bring_online(machine, *DEVICES[:initially_online])
    machine.start(0.0)
    now = 0.0
    times = []
    for op in ops:
        if op[0] == "tick":
            now += op[1]
        times.append(now)
    split = min(split, len(ops))
    for op, t in zip(ops[:split], times[:split], strict=True):
        apply(machine, op, t)
        check_invariants(machine)
    restored = RoundMachine.from_state_dict(cfg, json.loads(json.dumps(machine.state_dict())))
    for op, t in zip(ops[split:], times[split:], strict=True):
        assert apply(machine, op, t) == apply(restored, op, t)
        check_invariants(machine)
    assert machine.state_dict() == restored.state_dict()


# ---------------------------------------------------------------------------------------------------
# hostile numbers, wrong base models, broker restarts, failed aggregation
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("samples", [0, 101, 2**40, 10**30])
def test_sample_counts_outside_the_plans_bound_are_refused(samples: int) -> None:
    machine = RoundMachine(config(max_samples=100))
    bring_online(machine, "d0", "d1")
    machine.start(0.0)
    verdict = machine.screen_update("d0", header("d0", 1, num_samples=samples))
    assert verdict.refused and verdict.reason is RefusalReason.BAD_SAMPLE_COUNT
    assert "1..100" in verdict.detail


def test_an_update_against_another_model_is_refused() -> None:
    machine = training_machine()
    h = header("d0", 1).model_copy(update={"base_model_hash": "a" * 64})
    verdict = machine.screen_update("d0", h, model_hash="b" * 64)
    assert verdict.refused and verdict.reason is RefusalReason.WRONG_BASE_MODEL
    assert machine.screen_update("d0", h, model_hash="a" * 64).acceptable


def test_a_will_within_the_grace_period_does_not_shrink_the_round() -> None:
    machine = training_machine()
    assert machine.device_status("d0", "offline", 2.0, grace_until=12.0) == []
    assert "d0" in machine.online
    machine.device_status("d0", "online", 5.0)  # came back: the will is void
    assert machine.tick(20.0, hold_deadline=True) == [] or "d0" in machine.online
    assert "d0" in machine.online


def test_a_will_whose_grace_runs_out_takes_effect_on_tick() -> None:
    machine = training_machine()
    machine.device_status("d0", "offline", 2.0, grace_until=12.0)
    assert "d0" in machine.online
    machine.tick(11.0)
    assert "d0" in machine.online
    machine.tick(12.5, hold_deadline=True)  # our own link is in doubt: no will takes effect yet
    assert "d0" in machine.online
    actions = machine.tick(12.6)
    assert "d0" not in machine.online
    assert any(type(a).__name__ == "DeviceOffline" for a in actions)


def test_a_held_deadline_keeps_the_round_open() -> None:
    machine = training_machine()
    deadline = machine.deadline
    assert deadline is not None
    machine.tick(deadline + 5, hold_deadline=True)
    assert machine.stage is Stage.TRAINING and machine.attempt == 0
    machine.tick(deadline + 6)  # no update arrived: the attempt fails and the round is retried
    assert machine.attempt == 1


def test_failed_aggregation_retries_the_round_then_stops() -> None:
    machine = RoundMachine(config(max_attempts=2))
    bring_online(machine, "d0", "d1")
    machine.start(0.0)
    accept(machine, "d0", 1.0)
    accept(machine, "d1", 1.0)
    assert machine.stage is Stage.AGGREGATING
    actions = machine.aggregation_failed(1, "the aggregate is not finite", 2.0)
    assert [type(a).__name__ for a in actions][:2] == ["RoundFailed", "OpenRound"]
    assert machine.round == 1 and machine.attempt == 1 and machine.stage is Stage.TRAINING
    accept(machine, "d0", 3.0)
    accept(machine, "d1", 3.0)
    actions = machine.aggregation_failed(1, "again", 4.0)
    assert machine.stage is Stage.STOPPED
    assert "aggregation failed: again" in (machine.end_reason or "")


# ---------------------------------------------------------------------------------------------------
# pipelined evaluation: --target-accuracy judged while the next round already runs
# ---------------------------------------------------------------------------------------------------

REACHED = "target accuracy 0.9 reached: 0.9125 after round 1"


def test_target_reached_while_the_next_round_trains_stops_the_job_and_drops_its_updates() -> None:
    machine = training_machine(devices=2, min_updates=2, rounds=3)
    accept(machine, "d0", 1.0)
    accept(machine, "d1", 1.0)
    machine.aggregation_done(1, 2.0)  # round 1's accuracy is not known yet: round 2 opens
    accept(machine, "d0", 3.0)
    assert machine.phase is Phase.TRAINING and machine.round == 2
    actions = machine.target_reached(REACHED, 4.0)
    assert actions == [JobStopped(REACHED, StopCause.TARGET_ACCURACY), StatusChanged()]
    assert machine.phase is Phase.STOPPED and machine.round == 2 and machine.end_reason == REACHED
    assert machine.end_cause is StopCause.TARGET_ACCURACY and machine.deadline is None
    restored = RoundMachine.from_state_dict(machine.config, json.loads(json.dumps(machine.state_dict())))
    assert restored.end_cause is StopCause.TARGET_ACCURACY and restored.done


def test_target_reached_while_waiting_for_devices_stops_the_job() -> None:
    machine = training_machine(devices=2, min_updates=2, rounds=3)
    accept(machine, "d0", 1.0)
    accept(machine, "d1", 1.0)
    machine.device_status("d1", "offline", 1.5)
    machine.aggregation_done(1, 2.0)
    assert machine.phase is Phase.WAITING
    (stopped, _) = machine.target_reached(REACHED, 3.0)
    assert stopped == JobStopped(REACHED, StopCause.TARGET_ACCURACY) and machine.phase is Phase.STOPPED


def test_target_reached_after_the_job_ended_changes_nothing() -> None:
    for stage in (Stage.FINISHED, Stage.STOPPED):
        machine = machine_in(stage)
        before = machine.state_dict()
        assert machine.target_reached(REACHED, 9.0) == []
        assert machine.stage is stage and machine.state_dict() == before


def test_target_reached_during_aggregation_is_illegal_it_goes_to_aggregation_done() -> None:
    machine = machine_in(Stage.AGGREGATING)
    before = machine.state_dict()
    with pytest.raises(IllegalEvent, match="target_reached"):
        machine.target_reached(REACHED, 2.0)
    assert machine.state_dict() == before


# ---------------------------------------------------------------------------------------------------
# scale-out aggregation: the open gate and abandoned attempts
# ---------------------------------------------------------------------------------------------------


def test_a_closed_gate_holds_rounds_until_it_opens() -> None:
    machine = RoundMachine(config(min_updates=2))
    machine.set_open_gate("waiting for aggregators: 0 of 2 online")
    bring_online(machine, "d0", "d1")
    assert not of_type(machine.start(0.0), OpenRound)
    assert machine.stage is Stage.WAITING and machine.gate == "waiting for aggregators: 0 of 2 online"
    assert not of_type(machine.tick(1.0), OpenRound)
    machine.set_open_gate(None)
    opened = one(machine.tick(2.0), OpenRound)
    assert (opened.round, opened.attempt, opened.selected) == (1, 0, ("d0", "d1"))


def test_a_closed_gate_holds_the_next_round_and_the_retry_but_not_an_open_round() -> None:
    machine = training_machine(devices=2, min_updates=2, rounds=3)
    machine.set_open_gate("waiting for aggregators: 1 of 2 online")
    accept(machine, "d0", 1.0)
    one(accept(machine, "d1", 1.0), CloseRound)  # the open round closes as usual
    assert not of_type(machine.aggregation_done(1, 2.0), OpenRound)
    assert (machine.stage, machine.round) == (Stage.WAITING, 2)
    machine.set_open_gate(None)
    one(machine.tick(3.0), OpenRound)
    machine.set_open_gate("waiting")
    accept(machine, "d0", 4.0)
    one(machine.tick(20.0), CloseRound)  # the deadline, with one update
    actions = machine.aggregation_failed(2, "a worker went offline", 21.0)
    assert one(actions, RoundFailed).round == 2 and not of_type(actions, OpenRound)
    assert machine.stage is Stage.WAITING


@pytest.mark.parametrize("closing", [False, True])
def test_an_abandoned_attempt_reopens_and_never_stops_the_job_itself(closing: bool) -> None:
    machine = training_machine(devices=2, min_updates=2, max_attempts=1)
    accept(machine, "d0", 1.0)
    if closing:
        one(accept(machine, "d1", 1.0), CloseRound)
    why = "the coordinator restarted in the middle of the attempt"
    actions = machine.abandon_attempt(why, 2.0)
    failed = one(actions, RoundFailed)
    assert (failed.round, failed.attempt, failed.reason) == (1, 0, why)
    opened = one(actions, OpenRound)
    assert (opened.round, opened.attempt) == (1, 1) and machine.accepted == {}
    assert not of_type(actions, JobStopped)
    # The attempt it opened is the second of max_attempts=1: a real failure now stops the job.
    stopped = machine.tick(100.0)
    assert one(stopped, JobStopped).cause is StopCause.ROUND_FAILURES
