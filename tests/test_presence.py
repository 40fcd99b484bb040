"""The pure presence rules: is another coordinator alive on the job; does a device id have two processes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fedmqtt.coordinator.presence import HEARTBEAT_STALE_SECONDS, InstanceTracker, live_rival
from fedmqtt.schema import CoordinatorPresence, Phase, Status

ME, OTHER = "a" * 16, "b" * 16
NOW = 1_000_000.0


def status(instance: str | None = OTHER, phase: Phase = Phase.TRAINING, age: float = 1.0) -> Status:
    return Status(job="j", round=3, rounds_total=5, phase=phase, updated_at=NOW - age, instance=instance)


def presence(instance: str = OTHER, state: str = "online") -> CoordinatorPresence:
    return CoordinatorPresence(job="j", instance=instance, state=state, started_at=NOW - 100)  # type: ignore[arg-type]


def test_a_fresh_heartbeat_of_another_instance_is_a_live_rival() -> None:
    rival = live_rival(status(), presence(), ME, NOW)
    assert rival is not None and OTHER in rival and "round 3" in rival


def test_no_status_our_own_or_an_anonymous_one_is_no_rival() -> None:
    assert live_rival(None, None, ME, NOW) is None
    assert live_rival(status(ME), None, ME, NOW) is None
    assert live_rival(status(None), None, ME, NOW) is None


def test_a_finished_or_stopped_job_has_no_live_coordinator() -> None:
    assert live_rival(status(phase=Phase.FINISHED), None, ME, NOW) is None
    assert live_rival(status(phase=Phase.STOPPED), None, ME, NOW) is None


def test_a_stale_heartbeat_is_a_coordinator_that_died_unseen() -> None:
    assert live_rival(status(age=HEARTBEAT_STALE_SECONDS + 0.1), presence(), ME, NOW) is None
    assert live_rival(status(age=HEARTBEAT_STALE_SECONDS - 0.1), presence(), ME, NOW) is not None


def test_its_last_will_or_its_own_stop_says_it_is_gone() -> None:
    """kill -9 then an immediate --resume: the heartbeat is still fresh, but the will (offline) was published."""
    assert live_rival(status(), presence(state="offline"), ME, NOW) is None
    assert live_rival(status(), presence(state="stopped"), ME, NOW) is None
    # a will of some other instance says nothing about this one
    assert live_rival(status(), presence(instance="c" * 16, state="offline"), ME, NOW) is not None


def test_a_restarted_device_is_not_a_duplicate() -> None:
    tracker = InstanceTracker(window=60)
    assert tracker.observe("d1", "1" * 16, 0.0) is False
    assert tracker.observe("d1", "1" * 16, 1.0) is False
    assert tracker.observe("d1", "2" * 16, 2.0) is False  # a new process: A then B, once
    assert tracker.observe("d1", "2" * 16, 3.0) is False


def test_two_instances_alternating_are_reported_once_per_window() -> None:
    tracker = InstanceTracker(window=60)
    a, b = "1" * 16, "2" * 16
    assert [tracker.observe("d1", i, t) for t, i in enumerate([a, b, a])] == [False, False, True]
    assert tracker.observe("d1", b, 3.0) is False  # already reported in this window
    assert tracker.observe("d1", a, 4.0) is False
    assert tracker.observe("d1", b, 70.0) is False  # outside the window the old switches no longer count
    assert tracker.observe("d1", a, 71.0) is False
    assert tracker.observe("d1", b, 72.0) is True  # a new window, alternating again: reported again
    assert tracker.instances("d1") == sorted({a, b})


def test_statuses_without_an_instance_are_ignored() -> None:
    tracker = InstanceTracker()
    assert not any(tracker.observe("d1", None, float(t)) for t in range(10))


@given(st.lists(st.sampled_from(["1" * 16, "2" * 16, "3" * 16]), max_size=40))
def test_one_instance_per_device_is_never_a_duplicate(instances: list[str]) -> None:
    tracker = InstanceTracker(window=1e9)
    for t, instance in enumerate(instances):
        # each device only ever shows one instance
        assert tracker.observe(f"d-{instance[0]}", instance, float(t)) is False
