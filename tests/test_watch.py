"""``fedmqtt watch``: the pure reducer and renderer from hand-built messages, then one run on a real broker."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from fedmqtt.schema import (
    DeviceStatus,
    DPMode,
    Event,
    EventType,
    Metrics,
    Phase,
    PrivacyLedger,
    PrivacySpent,
    RefusalReason,
    RoundSummary,
    Status,
    to_json,
)
from fedmqtt.topics import Topics
from fedmqtt.watch import (
    RECENT_EVENTS,
    Narrator,
    WatchState,
    apply_all,
    describe_changes,
    headline,
    render,
    watch_subscriptions,
)

JOB = "job1"
T = Topics(job=JOB, prefix="fl")
NOW = 1_700_000_000.0


def status(**kw: Any) -> Status:
    fields: dict[str, Any] = {
        "job": JOB,
        "round": 2,
        "rounds_total": 5,
        "phase": Phase.TRAINING,
        "received": 1,
        "needed": 3,
        "deadline": NOW + 42.0,
        "devices_online": 4,
        "selected": ("d1", "d2", "d3"),
        "updated_at": NOW,
    }
    fields.update(kw)
    return Status(**fields)


def summary(n: int, **kw: Any) -> RoundSummary:
    fields: dict[str, Any] = {
        "job": JOB,
        "round": n,
        "closed_by": "quorum",
        "participants": ("d1", "d2", "d3"),
        "num_samples": 300,
        "refused": {RefusalReason.STALE_ROUND: 1},
        "bytes_up": 1_500_000,
        "bytes_down": 2_500_000,
        "opened_at": NOW - 10,
        "closed_at": NOW - 5,
        "seconds": 5.0,
        "accuracy": min(1.0, 0.5 + 0.1 * n),
        "loss": 1.0 / (n + 1),
    }
    fields.update(kw)
    return RoundSummary(**fields)


def device(name: str, state: str, **kw: Any) -> DeviceStatus:
    return DeviceStatus(device=name, state=state, ts=NOW, **kw)  # type: ignore[arg-type]


def event(kind: EventType, **kw: Any) -> Event:
    return Event(job=JOB, type=kind, ts=NOW, **kw)


def ledger(epsilon: float = 1.25) -> PrivacyLedger:
    return PrivacyLedger(
        job=JOB,
        mode=DPMode.DEVICE,
        clip=1.0,
        noise_multiplier=1.1,
        sample_rate=0.5,
        rounds=2,
        epsilon=epsilon,
        delta=1e-5,
        target_epsilon=8.0,
        accountant="opacus.accountants.RDPAccountant (rdp)",
        updated_at=NOW,
    )


def text_of(state: WatchState, now: float = NOW) -> str:
    console = Console(file=io.StringIO(), record=True, width=160, no_color=True)
    console.print(render(state, now=now))
    return console.export_text()


def empty() -> WatchState:
    return WatchState.empty(JOB, prefix="fl")


# --- every message type -------------------------------------------------------------------------


def test_an_empty_state_renders_and_says_no_status_yet() -> None:
    state = empty()
    assert "no status yet" in headline(state, NOW)
    assert "no status yet" in text_of(state)
    assert state.rounds_done == 0 and state.rounds_total is None


def test_status_sets_phase_progress_and_deadline_countdown() -> None:
    state = empty().apply(T.status, to_json(status()))
    assert state.status is not None and state.status.round == 2
    assert state.rounds_total == 5
    line = headline(state, NOW)
    assert "phase training" in line
    assert "received 1/3" in line
    assert "deadline in 42 s" in line
    assert "deadline in 12 s" in headline(state, NOW + 30)
    # A past deadline shows 0, not a negative countdown.
    assert "deadline in 0 s" in headline(state, NOW + 100)
    assert "4 online" in line


def test_status_last_metrics_are_shown_before_any_round_summary() -> None:
    state = empty().apply(T.status, to_json(status(last_metrics=Metrics(accuracy=0.8125, loss=0.5))))
    assert state.last_metrics() == (0.8125, 0.5)
    assert "0.8125" in text_of(state)


def test_round_summaries_give_rounds_done_bytes_and_metrics() -> None:
    state = apply_all(
        empty(),
        [
            (T.status, to_json(status(round=3))),
            (T.round_summary(1), to_json(summary(1))),
            (T.round_summary(2), to_json(summary(2, closed_by="deadline"))),
        ],
    )
    assert state.rounds_done == 2
    assert [s.round for s in state.ordered_rounds()] == [1, 2]
    assert state.bytes_up == 3_000_000 and state.bytes_down == 5_000_000
    assert state.last_metrics() == pytest.approx((0.7, 1 / 3))
    text = text_of(state)
    assert "rounds done 2/5" in text
    assert "closed rounds" in text
    assert "deadline" in text and "quorum" in text
    assert "3.00 MB / 5.00 MB over 2 rounds" in text
    assert "0.7000" in text


def test_device_statuses_are_grouped_by_state_and_a_cleared_topic_forgets_the_device() -> None:
    state = apply_all(
        empty(),
        [
            (T.device_status("d1"), to_json(device("d1", "online"))),
            (T.device_status("d2"), to_json(device("d2", "training", round=2))),
            (T.device_status("d3"), to_json(device("d3", "offline"))),
            (T.device_status("d4"), to_json(device("d4", "online"))),
        ],
    )
    assert state.device_counts() == {"online": 2, "training": 1, "offline": 1}
    assert state.devices_in("online") == ["d1", "d4"]
    text = text_of(state)
    assert "training (1)" in text and "offline (1)" in text and "online (2)" in text
    # The last will (offline) replaces the retained online message of the same device.
    state = state.apply(T.device_status("d1"), to_json(device("d1", "offline")))
    assert state.devices_in("offline") == ["d1", "d3"]
    state = state.apply(T.device_status("d3"), b"")
    assert "d3" not in state.devices
    assert state.malformed == 0


def test_many_devices_are_summarised_not_listed() -> None:
    messages = [(T.device_status(f"d{i:04d}"), to_json(device(f"d{i:04d}", "online"))) for i in range(200)]
    state = apply_all(empty(), messages)
    text = text_of(state)
    assert "online (200)" in text
    assert "(+188 more)" in text


def test_refusal_events_count_for_the_open_round_and_the_summary_takes_over_once_closed() -> None:
    refused = event(EventType.UPDATE_REFUSED, round=3, device="d9", reason=RefusalReason.NOT_SELECTED)
    state = apply_all(
        empty(),
        [
            (T.round_summary(2), to_json(summary(2))),  # 1 stale_round refusal
            (T.events, to_json(refused)),
            (T.events, to_json(refused)),
        ],
    )
    assert state.refusals_by_reason() == {"stale_round": 1, "not_selected": 2}
    assert "not_selected 2" in text_of(state)
    # Round 3 closes: its summary counts the refusals; events are not counted twice.
    state = state.apply(T.round_summary(3), to_json(summary(3, refused={RefusalReason.NOT_SELECTED: 2})))
    assert state.refusals_by_reason() == {"stale_round": 1, "not_selected": 2}


def test_events_are_kept_as_a_short_recent_list() -> None:
    state = empty()
    for i in range(RECENT_EVENTS + 5):
        state = state.apply(T.events, to_json(event(EventType.UPDATE_ACCEPTED, round=1, device=f"d{i}")))
    assert len(state.recent_events) == RECENT_EVENTS
    assert state.recent_events[-1].device == f"d{RECENT_EVENTS + 4}"
    assert f"update_accepted round 1 device d{RECENT_EVENTS + 4}" in text_of(state)


def test_privacy_ledger_shows_epsilon_spent_and_budget() -> None:
    state = apply_all(
        empty(),
        [(T.status, to_json(status())), (T.privacy, to_json(ledger(1.25)))],
    )
    assert state.epsilon() == 1.25
    assert state.delta() == 1e-5
    text = text_of(state)
    assert "ε = 1.250 of 8" in text
    state = state.apply(T.privacy, b"")
    assert state.privacy is None and state.epsilon() is None


def test_status_privacy_is_used_without_a_ledger() -> None:
    state = empty().apply(T.status, to_json(status(privacy=PrivacySpent(epsilon=0.5, delta=1e-6))))
    assert state.epsilon() == 0.5 and state.delta() == 1e-6


def test_finished_and_stopped_phases() -> None:
    assert not empty().finished
    assert not empty().apply(T.status, to_json(status())).finished
    assert empty().apply(T.status, to_json(status(phase=Phase.FINISHED))).finished
    assert empty().apply(T.status, to_json(status(phase=Phase.STOPPED))).finished
    assert "phase finished" in headline(empty().apply(T.status, to_json(status(phase=Phase.FINISHED))), NOW)


# --- malformed input never crashes the watcher ---------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "payload", "needle"),
    [
        (T.status, b"{not json", "Status"),
        (T.status, b'{"job": "job1"}', "Status"),
        (T.status, to_json(status(job="other")), "job 'other'"),
        (T.events, b"", "empty payload"),
        (T.events, b"\xff\xfe", "Event"),
        (T.round_summary(7), to_json(summary(6)), "round 6 published on"),
        (T.round_summary(7), to_json(summary(7, job="other")), "job 'other'"),
        (T.device_status("d1"), to_json(device("d2", "online")), "device 'd2' published on"),
        (T.device_status("d1"), b'{"device": "d1", "state": "sleeping"}', "DeviceStatus"),
        (T.privacy, b"[]", "PrivacyLedger"),
        (T.status, b"x" * (1 << 21), "exceeds"),
    ],
)
def test_a_malformed_message_is_counted_and_shown_and_changes_nothing_else(
    topic: str, payload: bytes, needle: str
) -> None:
    before = empty().apply(T.status, to_json(status()))
    after = before.apply(topic, payload)
    assert after.malformed == 1
    assert after.last_malformed is not None and needle in after.last_malformed
    assert after.status == before.status and dict(after.rounds) == dict(before.rounds)
    assert dict(after.devices) == dict(before.devices)
    text = text_of(after)
    assert "malformed messages" in text
    assert describe_changes(before, after) == [f"malformed messages: 1 (last: {after.last_malformed})"]


def test_messages_on_other_topics_are_counted_as_ignored() -> None:
    state = apply_all(empty(), [("fl/job1/model", b"\x00\x01"), ("fl/other/status", b"{}"), ("x", b"")])
    assert state.ignored == 3 and state.malformed == 0 and state.messages == 3


_SUBSCRIBED = [
    T.status, T.events, T.privacy, T.round_summary(1), T.device_status("d1"), T.aggregator_status("a1"), T.release,
    "fl/job1/junk",
]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_SUBSCRIBED), st.binary(max_size=300)), max_size=20))
def test_arbitrary_payloads_never_raise(messages: list[tuple[str, bytes]]) -> None:
    state = apply_all(empty(), messages)
    assert state.messages == len(messages)
    assert state.malformed + state.ignored <= len(messages)
    text_of(state)


# --- purity and late joining --------------------------------------------------------------------


def test_apply_returns_a_new_state_and_leaves_the_old_one_alone() -> None:
    before = empty()
    after = before.apply(T.device_status("d1"), to_json(device("d1", "online")))
    assert before.devices == {} and before.messages == 0
    assert after.messages == 1 and "d1" in after.devices
    with pytest.raises(TypeError):
        after.devices["d2"] = device("d2", "online")  # type: ignore[index]


_RETAINED = [
    (T.status, to_json(status(round=3, phase=Phase.TRAINING))),
    (T.round_summary(1), to_json(summary(1))),
    (T.round_summary(2), to_json(summary(2))),
    (T.device_status("d1"), to_json(device("d1", "training", round=3))),
    (T.device_status("d2"), to_json(device("d2", "offline"))),
    (T.privacy, to_json(ledger(0.75))),
]


@settings(max_examples=100, deadline=None)
@given(st.permutations(_RETAINED))
def test_a_late_joiner_sees_the_same_job_whatever_order_the_retained_messages_arrive_in(
    order: list[tuple[str, bytes]],
) -> None:
    state = apply_all(empty(), order)
    expected = apply_all(empty(), _RETAINED)
    assert state.status == expected.status
    assert dict(state.rounds) == dict(expected.rounds)
    assert dict(state.devices) == dict(expected.devices)
    assert state.privacy == expected.privacy
    assert state.rounds_done == 2 and state.epsilon() == 0.75
    assert text_of(state) == text_of(expected)


# --- runs: a job id run again ------------------------------------------------------------------

OLD_RUN = "0" * 16
NEW_RUN = "1" * 16


def _ledger_of(run_id: str, epsilon: float) -> PrivacyLedger:
    return ledger(epsilon).model_copy(update={"run_id": run_id})


_TWO_RUNS = [
    # The previous 3-round run left rounds/3 and its ledger retained; the new 2-round run is in round 2.
    (T.status, to_json(status(round=2, rounds_total=2, run_id=NEW_RUN))),
    (T.round_summary(1), to_json(summary(1, run_id=NEW_RUN))),
    (T.round_summary(3), to_json(summary(3, run_id=OLD_RUN))),
    (T.round_summary(2), to_json(summary(2, run_id=OLD_RUN))),
    (T.privacy, to_json(_ledger_of(OLD_RUN, 5.0))),
]


@settings(max_examples=100, deadline=None)
@given(st.permutations(_TWO_RUNS))
def test_retained_leftovers_of_another_run_are_dropped_whatever_the_order(order: list[tuple[str, bytes]]) -> None:
    state = apply_all(empty(), order)
    assert state.run_id == NEW_RUN
    assert sorted(state.rounds) == [1] and state.rounds[1].run_id == NEW_RUN
    assert state.privacy is None and state.epsilon() is None
    assert "rounds done 1/2" in headline(state, NOW) and f"run {NEW_RUN[:8]}" in headline(state, NOW)
    assert text_of(state) == text_of(apply_all(empty(), _TWO_RUNS))


def test_a_new_run_resets_the_view_and_later_messages_of_the_old_run_are_counted_not_used() -> None:
    old = apply_all(
        empty(),
        [
            (T.status, to_json(status(round=3, rounds_total=3, run_id=OLD_RUN))),
            *[(T.round_summary(n), to_json(summary(n, run_id=OLD_RUN))) for n in (1, 2)],
            (T.privacy, to_json(_ledger_of(OLD_RUN, 2.0))),
            (T.events, to_json(event(EventType.UPDATE_REFUSED, round=3, reason=RefusalReason.DUPLICATE,
                                     run_id=OLD_RUN))),
        ],
    )  # fmt: skip
    assert old.rounds_done == 2 and old.refusals_by_reason() == {"stale_round": 2, "duplicate": 1}
    new = old.apply(T.status, to_json(status(round=1, rounds_total=2, run_id=NEW_RUN)))
    assert new.rounds_done == 0 and new.privacy is None and new.other_run == 3
    assert new.refusals_by_reason() == {}
    assert "no status yet" not in headline(new, NOW) and "rounds done 0/2" in headline(new, NOW)
    assert describe_changes(old, new)[0] == f"new run {NEW_RUN}: the view starts over"
    late = apply_all(
        new,
        [
            (T.round_summary(3), to_json(summary(3, run_id=OLD_RUN))),
            (T.round_summary(2), to_json(summary(2))),  # no run id: a coordinator that states none
            (T.privacy, to_json(_ledger_of(OLD_RUN, 2.0))),
            (T.events, to_json(event(EventType.ROUND_CLOSED, round=3, run_id=OLD_RUN))),
        ],
    )
    assert late.rounds_done == 0 and late.privacy is None and late.recent_events == new.recent_events
    assert late.other_run == 3 + 4 and late.malformed == 0
    assert "other runs' messages" in text_of(late)
    mine = apply_all(
        late,
        [
            (T.round_summary(1), to_json(summary(1, run_id=NEW_RUN))),
            (T.privacy, to_json(_ledger_of(NEW_RUN, 0.5))),
            (T.events, to_json(event(EventType.ROUND_OPENED, round=2))),  # events without a run id are kept
        ],
    )
    assert sorted(mine.rounds) == [1] and mine.epsilon() == 0.5 and mine.recent_events[-1].round == 2


def test_a_run_started_event_switches_the_run_before_its_status_arrives() -> None:
    old = apply_all(
        empty(),
        [
            (T.status, to_json(status(phase=Phase.FINISHED, run_id=OLD_RUN))),
            (T.round_summary(1), to_json(summary(1, run_id=OLD_RUN))),
        ],
    )
    started = old.apply(T.events, to_json(event(EventType.RUN_STARTED, run_id=NEW_RUN)))
    assert started.run_id == NEW_RUN and started.status is None and started.rounds_done == 0
    assert started.recent_events[-1].type is EventType.RUN_STARTED
    # A status of the old run that is still retained does not take the view back.
    assert started.apply(T.round_summary(1), to_json(summary(1, run_id=OLD_RUN))).rounds_done == 0


def test_a_coordinator_without_run_ids_is_shown_as_before() -> None:
    state = apply_all(
        empty(),
        [
            (T.status, to_json(status())),
            (T.round_summary(1), to_json(summary(1))),
            (T.round_summary(2), to_json(summary(2, run_id=OLD_RUN))),
        ],
    )
    assert state.run_id is None and state.rounds_done == 2 and state.other_run == 0


# --- plain log lines ----------------------------------------------------------------------------


def test_describe_changes_narrates_rounds_devices_and_phases() -> None:
    s0 = empty()
    s1 = s0.apply(T.status, to_json(status(phase=Phase.WAITING, round=1, devices_online=0)))
    assert describe_changes(s0, s1) == ["phase waiting (round 1, 0 devices online)"]
    s2 = s1.apply(T.status, to_json(status(round=1)))
    assert describe_changes(s1, s2) == ["round 1 open: 3 selected, needs 3"]
    s3 = s2.apply(T.status, to_json(status(round=1, attempt=1)))
    assert describe_changes(s2, s3) == ["round 1 (attempt 1) open: 3 selected, needs 3"]
    s4 = s3.apply(T.round_summary(1), to_json(summary(1, epsilon=0.3)))
    (line,) = describe_changes(s3, s4)
    assert line.startswith("round 1 closed by quorum: 3 devices, 1 refused, accuracy 0.6000")
    assert "up 1.50 MB, down 2.50 MB, 5.0 s, ε 0.300" in line and "pruned" not in line
    pruned = s3.apply(T.round_summary(1), to_json(summary(1, sparsity=0.4375)))
    assert describe_changes(s3, pruned)[0].endswith(", 43.8% pruned")  # --prune-schedule: the summary's sparsity
    s5 = s4.apply(T.device_status("d1"), to_json(device("d1", "online")))
    assert describe_changes(s4, s5) == ["devices: 1 connected, 0 offline"]
    s5b = s5.apply(T.device_status("d1"), to_json(device("d1", "training", round=1)))
    assert describe_changes(s5, s5b) == []  # starting to train is not news
    s5c = s5b.apply(T.device_status("d1"), to_json(device("d1", "offline")))
    assert describe_changes(s5b, s5c) == ["devices: 0 connected, 1 offline"]
    # Same status again (e.g. received count changed): no line.
    s6 = s5.apply(T.status, to_json(status(round=1, attempt=1, received=2)))
    assert describe_changes(s5, s6) == []


def test_an_accuracy_that_arrives_after_the_summary_is_told_once_and_kept() -> None:
    """Pipelined rounds: a round's summary comes first without accuracy, then again with it."""
    s0 = empty().apply(T.status, to_json(status(round=2)))
    s1 = s0.apply(T.round_summary(1), to_json(summary(1, accuracy=None, loss=None)))
    (closed,) = describe_changes(s0, s1)
    assert "accuracy -, loss -" in closed and s1.last_metrics() == (None, None)
    s2 = s1.apply(T.round_summary(1), to_json(summary(1, accuracy=0.8125, loss=0.5, evaluated_model="ab" * 32)))
    assert describe_changes(s1, s2) == ["round 1 evaluated: accuracy 0.8125, loss 0.5000"]
    assert s2.rounds_done == 1 and s2.last_metrics() == (0.8125, 0.5) and s2.bytes_up == 1_500_000
    assert describe_changes(s2, s2.apply(T.round_summary(1), to_json(s2.rounds[1]))) == []


def test_a_closed_round_is_told_before_the_next_round_opens() -> None:
    before = empty().apply(T.status, to_json(status(round=1)))
    after = apply_all(before, [(T.round_summary(1), to_json(summary(1))), (T.status, to_json(status(round=2)))])
    lines = describe_changes(before, after)
    assert [line.split(":")[0] for line in lines] == ["round 1 closed by quorum", "round 2 open"]


def test_the_narrator_summarises_device_counts_at_most_every_interval() -> None:
    narrator = Narrator(T, device_interval_s=5.0)
    state = empty()
    told: list[tuple[float, str]] = []
    for i in range(100):  # a hundred devices connect over ten seconds
        state = state.apply(T.device_status(f"d{i}"), to_json(device(f"d{i}", "online")))
        told += [(i * 0.1, line) for line in narrator.lines(state, now=i * 0.1)]
    assert told == [(0.0, "devices: 1 connected, 0 offline"), (5.0, "devices: 51 connected, 0 offline")]
    # Nothing new: nothing told. A change after the interval: told at once.
    assert narrator.lines(state, now=10.0) == ["devices: 100 connected, 0 offline"]
    assert narrator.lines(state, now=11.0) == []
    # Rounds and phases are never held back; the job's end flushes the device counts.
    state = state.apply(T.device_status("d0"), to_json(device("d0", "offline")))
    state = state.apply(T.round_summary(1), to_json(summary(1)))
    lines = narrator.lines(state, now=12.0)
    assert len(lines) == 1 and lines[0].startswith("round 1 closed")
    state = state.apply(T.status, to_json(status(phase=Phase.FINISHED)))
    assert narrator.lines(state, now=12.1) == ["phase finished (round 2, 4 devices online)",
                                                "devices: 99 connected, 1 offline"]  # fmt: skip


def test_watch_subscribes_to_exactly_the_read_only_topics() -> None:
    filters = [f for f, _ in watch_subscriptions(T)]
    assert filters == [
        T.status, T.events, T.rounds_filter, T.device_status_filter, T.privacy, T.aggregator_statuses_filter,
        T.release,
    ]  # fmt: skip
    assert T.model not in filters and T.updates_filter not in filters and T.partials_filter not in filters
    # Not the workers' progress messages (one per batch of updates): only their retained presence.
    assert T.aggregators_filter not in filters


# --- aggregator workers and the released model ---------------------------------------------------------


def _presence(worker: str, state: str, job: str = JOB) -> bytes:
    from fedmqtt.schema import AggregatorPresence, new_token, to_json

    return to_json(
        AggregatorPresence(job=job, worker=worker, instance=new_token(), state=state, group="fedmqtt", since=NOW)
    )


def _release_frame(job: str = JOB, accuracy: float | None = 0.9312, round_number: int = 3) -> bytes:
    import numpy as np

    from fedmqtt.release import encode_release

    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(2, dtype=np.float32)}
    return encode_release(
        arrays, model="mlp", job=job, round=round_number, sender="coordinator", released_at=NOW,
        run_id=None, accuracy=accuracy, loss=0.2 if accuracy is not None else None, evaluated_model=None,
    )  # fmt: skip


def test_aggregator_workers_are_shown_online_and_offline_and_a_cleared_presence_forgets_one() -> None:
    before = empty()
    state = apply_all(before, [(T.aggregator_status("agg-1"), _presence("agg-1", "online")),
                               (T.aggregator_status("agg-2"), _presence("agg-2", "online"))])  # fmt: skip
    assert state.aggregators_in("online") == ["agg-1", "agg-2"]
    assert describe_changes(before, state) == ["aggregators online: agg-1 agg-2"]
    later = state.apply(T.aggregator_status("agg-2"), _presence("agg-2", "offline"))
    assert describe_changes(state, later) == ["aggregators online: agg-1; offline: agg-2"]
    assert "aggregators (1 online)" in text_of(later)
    gone = later.apply(T.aggregator_status("agg-2"), b"")
    assert list(gone.aggregators) == ["agg-1"]
    # A presence naming another worker than its topic, or another job, is refused and counted.
    forged = apply_all(empty(), [(T.aggregator_status("agg-1"), _presence("agg-9", "online")),
                                 (T.aggregator_status("agg-1"), _presence("agg-1", "online", job="other"))])  # fmt: skip
    assert forged.malformed == 2 and not forged.aggregators


def test_the_released_model_is_shown_with_its_round_accuracy_and_digest() -> None:
    before = empty()
    frame = _release_frame()
    state = before.apply(T.release, frame)
    assert state.release is not None and state.release.round == 3 and state.release_bytes == len(frame)
    (line,) = describe_changes(before, state)
    assert line.startswith("released the model of round 3, accuracy 0.9312, digest ")
    assert f"on {T.release}" in line
    assert "released" in text_of(state)
    assert describe_changes(state, state.apply(T.release, frame)) == []  # the same release again: no news
    assert before.apply(T.release, _release_frame(accuracy=None)).release is not None
    assert "not evaluated" in describe_changes(before, before.apply(T.release, _release_frame(accuracy=None)))[0]
    assert state.apply(T.release, b"").release is None


@pytest.mark.parametrize(
    "payload",
    [b"not a frame", b"\x00" * 40, "text"],
    ids=["junk", "zeros", "str"],
)
def test_a_bad_release_payload_is_counted_as_malformed(payload: bytes | str) -> None:
    state = empty().apply(T.release, payload)
    assert state.malformed == 1 and state.release is None and "release frame" in (state.last_malformed or "")


def test_a_release_of_another_job_or_another_frame_kind_is_refused() -> None:
    other = empty().apply(T.release, _release_frame(job="other"))
    assert other.malformed == 1 and other.release is None
    import numpy as np

    from fedmqtt.codecs.frame import encode_frame
    from fedmqtt.schema import CodecSpec, FrameKind

    model = encode_frame({"w": np.zeros(3, dtype=np.float32)}, kind=FrameKind.GLOBAL_MODEL, job=JOB, round=1,
                         sender="coordinator", codec=CodecSpec.parse("float32"))  # fmt: skip
    wrong = empty().apply(T.release, model)
    assert wrong.malformed == 1 and "global_model frame on the release topic" in (wrong.last_malformed or "")


# --- a real broker ------------------------------------------------------------------------------


def mqtt_version_for(request: pytest.FixtureRequest) -> str:
    """The embedded broker speaks MQTT 3.1.1 only; Mosquitto gets MQTT 5."""
    return "3.1.1" if request.node.callspec.params.get("broker_url") == "embedded" else "5"


def _run_watch(
    broker_url: str, job: str, prefix: str, *extra: str, version: str = "3.1.1"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedmqtt.cli", "watch", "--broker", broker_url, "--job", job, "--prefix", prefix,
         "--mqtt-version", version, "--once", *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


def test_watch_once_shows_a_closed_round_from_retained_messages(
    broker_url: str, topic_prefix: str, mqtt_client: Any, request: pytest.FixtureRequest
) -> None:
    topics = Topics(job=JOB, prefix=topic_prefix)
    publisher = mqtt_client(broker_url)
    now = time.time()
    retained = [
        (topics.status, to_json(status(round=2, deadline=now + 60))),
        (topics.round_summary(1), to_json(summary(1, accuracy=0.9375))),
        (topics.device_status("d1"), to_json(device("d1", "training", round=2))),
        (topics.device_status("d2"), to_json(device("d2", "offline"))),
    ]
    for topic, payload in retained:
        publisher.publish(topic, payload, qos=1, retain=True)
    result = _run_watch(broker_url, JOB, topic_prefix, version=mqtt_version_for(request))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "rounds done 1/5" in out
    assert "0.9375" in out
    assert "training (1)" in out and "offline (1)" in out
    assert "d1" in out


def test_watch_once_fails_clearly_for_a_job_that_has_no_status(
    broker_url: str, topic_prefix: str, request: pytest.FixtureRequest
) -> None:
    result = _run_watch(broker_url, "nosuchjob", topic_prefix, "--wait", "1", version=mqtt_version_for(request))
    assert result.returncode == 1
    assert "no retained status" in result.stderr
    assert "--job/--prefix" in result.stderr


def test_watch_refuses_a_bad_job_id() -> None:
    result = _run_watch("mqtt://127.0.0.1:1", "bad/job", "fl")
    assert result.returncode == 1
    assert "invalid job id 'bad/job'" in result.stderr


def test_watch_says_clearly_when_the_broker_is_unreachable() -> None:
    result = _run_watch("mqtt://127.0.0.1:1", JOB, "fl", "--connect-timeout", "2")
    assert result.returncode == 1
    assert "fedmqtt watch: error:" in result.stderr
    assert "127.0.0.1:1" in result.stderr


def test_watch_with_the_default_protocol_works_on_both_brokers(
    broker_url: str, topic_prefix: str, mqtt_client: Any
) -> None:
    """The README's "A job by hand" runs `fedmqtt watch` with no --mqtt-version against the embedded broker: the
    default (auto) must fall back to 3.1.1 there, as every other command does."""
    topics = Topics(job=JOB, prefix=topic_prefix)
    publisher = mqtt_client(broker_url)
    publisher.publish(topics.status, to_json(status(round=1, deadline=time.time() + 60)), qos=1, retain=True)
    result = subprocess.run(
        [sys.executable, "-m", "fedmqtt.cli", "watch", "--broker", broker_url, "--job", JOB, "--prefix", topic_prefix,
         "--once"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert JOB in result.stdout
