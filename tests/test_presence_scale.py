"""Presence at fleet scale (#13): a batch of arrivals costs O(1) publishes, and round 1 opens once they are in.

The pure core (:class:`fedmqtt.coordinator.presence.PresenceBatch`, the round machine) is tested without a broker;
then a real ``fedmqtt coordinator`` on real Mosquitto registers a fleet of 300 MQTT clients (each with its last
will, subscribed to the plan and the status as device agents are; all on one selector loop,
benchmarks/presence.py's ``Fleet``), and a watcher counts what the coordinator published meanwhile.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmqtt.coordinator.machine import DeviceOffline, DeviceOnline, OpenRound, RoundConfig, RoundMachine
from fedmqtt.coordinator.presence import LISTED_DEVICES, PRESENCE_BATCH_SECONDS, PresenceBatch
from fedmqtt.schema import EVENT_DEVICES_MAX, DeviceStatus, Event, EventType, Phase, to_json

# --------------------------------------------------------------------------------------------- the pure core


def test_a_thousand_arrivals_in_one_batch_make_one_report() -> None:
    batch = PresenceBatch()
    devices = [f"d{i:04d}" for i in range(1000)]
    for d in devices:
        batch.add(d, online=True)
    assert batch.pending == 1000 and batch.due(0.0)
    report = batch.take(0.0)
    assert report.online_count == 1000 and report.offline_count == 0
    assert report.online == tuple(devices[:LISTED_DEVICES])  # in order of arrival, cut to what an event holds
    assert LISTED_DEVICES <= EVENT_DEVICES_MAX
    assert batch.pending == 0 and not batch.due(10.0)


def test_reports_go_out_at_once_after_a_quiet_spell_then_at_most_once_per_interval() -> None:
    batch = PresenceBatch(interval=1.0)
    batch.add("d1", online=True)
    assert batch.due(100.0)  # the first change after a quiet spell: published at once
    batch.take(100.0)
    batch.add("d2", online=True)
    assert not batch.due(100.5)  # within the interval: held back
    batch.add("d3", online=True)
    assert batch.due(101.0)
    assert batch.take(101.0).online == ("d2", "d3")
    assert PRESENCE_BATCH_SECONDS <= 1.0  # the status heartbeat's period: devices_online is never staler


def test_a_flap_within_a_batch_is_no_change_and_a_will_after_one_is_an_offline() -> None:
    batch = PresenceBatch()
    batch.add("d1", online=True)
    batch.add("d2", online=True)
    batch.add("d2", online=False)  # came and went
    report = batch.take(0.0)
    assert report.online == ("d1",) and report.offline == () and report.transitions == 3
    batch.add("d1", online=False)  # its will
    batch.add("d1", online=True)  # and back (a reconnect)
    batch.add("d1", online=False)
    report = batch.take(5.0)
    assert report.offline == ("d1",) and report.offline_count == 1 and report.online_count == 0


def test_refused_statuses_are_counted_and_reported_in_the_batch() -> None:
    batch = PresenceBatch(listed=3)
    for i in range(1000):  # a flood of junk on many devices' topics
        batch.refuse(f"x{i % 5}", f"junk {i}")
    batch.add("d1", online=True)
    report = batch.take(0.0)
    assert report.refused_count == 1000 and report.refused == ("x0", "x1", "x2") and report.refused_first == "junk 0"
    assert report.online == ("d1",)
    assert not batch.pending and not batch.take(1.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 19), st.booleans()), max_size=200))
def test_the_reports_add_up_to_the_online_set(flips: list[tuple[int, bool]]) -> None:
    """Whatever the transitions and wherever the batches end, replaying the reports gives the true online set, and
    each report costs at most two events."""
    batch = PresenceBatch(listed=1000)
    truth: set[str] = set()
    replayed: set[str] = set()
    for i, (device, take_after) in enumerate(flips):
        name = f"d{device}"
        online = name not in truth  # the machine reports transitions only: each one flips the device
        (truth.add if online else truth.discard)(name)
        batch.add(name, online=online)
        if take_after or i == len(flips) - 1:
            report = batch.take(float(i))
            assert set(report.online).isdisjoint(replayed) and set(report.offline) <= replayed
            replayed |= set(report.online)
            replayed -= set(report.offline)
    assert replayed == truth


def test_the_machine_opens_round_one_on_the_last_arrival_with_constant_work_per_arrival() -> None:
    m = RoundMachine(RoundConfig(job="j", rounds=1, min_updates=10, min_devices=1000, devices_per_round=100,
                                 round_timeout=60.0))  # fmt: skip
    m.start(0.0)
    sizes = []
    for i in range(999):
        actions = m.device_status(f"d{i:04d}", "online", 1.0)
        assert isinstance(actions[0], DeviceOnline)
        sizes.append(len(actions))
    assert set(sizes) == {2} and m.phase is Phase.WAITING  # DeviceOnline and StatusChanged, nothing else
    actions = m.device_status("d0999", "online", 2.0)
    (opened,) = [a for a in actions if isinstance(a, OpenRound)]
    assert opened.round == 1 and len(opened.selected) == 100 and m.phase is Phase.TRAINING
    # A device that is not selected going offline changes presence only.
    spare = next(f"d{i:04d}" for i in range(1000) if f"d{i:04d}" not in opened.selected)
    assert [type(a) for a in m.device_status(spare, "offline", 3.0)] == [DeviceOffline, type(actions[-1])]


# --------------------------------------------------------------------------------------------- real Mosquitto


def _load_fleet() -> ModuleType:
    name = "presence_benchmark"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "presence.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _presence_events(events: list[Event], type_: EventType) -> list[Event]:
    return [e for e in events if e.type is type_]


def _wait_total(view: Any, type_: EventType, total: int) -> list[Event]:
    """The batched events of ``type_``, once their counts add up to ``total``."""

    def found() -> list[Event] | None:
        events = _presence_events(view.events, type_)
        return events if sum(e.count or 0 for e in events) == total else None

    return view.wait_until(f"{type_.value} events counting {total}", found)


@pytest.mark.e2e  # a coordinator process and 300 clients (~20 s): like the coordinator's process tests, not in test-fast
@pytest.mark.mosquitto
def test_a_fleet_of_300_is_registered_with_batched_publishes_and_round_one_opens(
    mosquitto_broker: Any, make_job: Callable[[str], Any]
) -> None:
    n, selected, dropped, hostile = 300, 30, 100, 40
    job = make_job(mosquitto_broker.url)
    job.start("--rounds", "1", "--min-devices", str(n), "--devices-per-round", str(selected), "--min-updates", "3",
              "--round-timeout", "600")  # fmt: skip
    view = job.view
    view.wait_status("the coordinator waiting", lambda s: s.phase is Phase.WAITING)
    devices = [f"fleet{i:04d}" for i in range(n)]
    fleet = _load_fleet().Fleet(mosquitto_broker.host, mosquitto_broker.port, job.topics, devices)
    with view._cond:
        statuses_before, events_before = len(view.statuses), len(view.events)
    started = time.monotonic()
    fleet.start()
    try:
        # Meanwhile hostile statuses (the test broker has no ACLs): unreadable ones, and ones naming another device.
        publish = job.devices.connection.publish
        for i in range(hostile):
            junk = b"online" if i % 2 else to_json(DeviceStatus(device=devices[0], state="offline"))
            publish(job.topics.device_status(f"evil{i:03d}"), junk, qos=1, retain=True)
        plan = view.wait_plan(1)  # hang guard only (60 s): no timing is asserted
        elapsed = time.monotonic() - started
        assert len(plan.selected) == selected and set(plan.selected) <= set(devices)
        assert fleet.wait_connected(60)
        view.wait_status(f"{n} devices online", lambda s: s.devices_online == n)
        opened = view.wait_event(EventType.ROUND_OPENED, round=1)
        with view._cond:
            statuses = view.statuses[statuses_before:]
            events = view.events[events_before:]
        online = _presence_events(events, EventType.DEVICES_ONLINE)
        budget = int(elapsed / PRESENCE_BATCH_SECONDS) + 3  # events of one kind, or statuses, in that time
        # Every arrival is reported exactly once, in events that each name at most EVENT_DEVICES_MAX devices.
        assert sum(e.count or 0 for e in online) == n
        assert all(len(e.devices) == min(e.count or 0, EVENT_DEVICES_MAX) for e in online)
        assert len({d for e in online for d in e.devices}) == sum(len(e.devices) for e in online)
        assert not _presence_events(events, EventType.DEVICE_ONLINE)  # no event per device any more
        # The hostile statuses are refused, counted and reported, batched too; none brought anybody online or off.
        refused = _wait_total(view, EventType.DEVICE_STATUSES_REFUSED, hostile)
        assert len(refused) <= budget and all(d.startswith("evil") for e in refused for d in e.devices)
        # The arrivals before the plan came first; then the round's event.
        assert events.index(opened) > events.index(online[-1])
        # O(1) publishes per batch: one presence event and one status heartbeat per second, not one per device.
        until_plan = [s for s in statuses if s.round == 0 or s.phase is Phase.WAITING]
        assert len(online) <= budget < n, (len(online), elapsed)
        assert len(until_plan) <= budget, (len(until_plan), elapsed)

        # 100 devices that were not selected lose their connections: their last wills, batched the same way.
        spare = [i for i, d in enumerate(devices) if d not in plan.selected][:dropped]
        fleet.drop(spare)
        view.wait_status(f"{n - dropped} devices online", lambda s: s.devices_online == n - dropped)
        offline = _wait_total(view, EventType.DEVICES_OFFLINE, dropped)
        assert {d for e in offline for d in e.devices} <= {devices[i] for i in spare}
        assert len(offline) < dropped / 4  # batched (a handful of events), not one per will
        status = view.statuses[-1]
        assert status.phase is Phase.TRAINING and status.round == 1  # the round is untouched: none was selected
    finally:
        fleet.close()
