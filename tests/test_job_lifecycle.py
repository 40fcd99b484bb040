"""The job's lifecycle on the coordinator's retained presence (``PREFIX/JOB/coordinator``), the topic devices follow
to learn that the run they serve ended (``--exit-on-finish``) instead of the once-a-second job status.

A real ``fedmqtt coordinator`` process on a real Mosquitto (tests/harness.py): the presence changes on start,
resume and end only, never with the status heartbeat; its end carries the job's phase; a crash leaves the will
(``offline``, no phase). What a device does with each presence: tests/test_device_screening.py (pure) and
tests/test_device_runs.py (a real device process).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedmqtt.schema import CoordinatorPresence, EventType, Phase, from_json
from harness import WAIT, Job

pytestmark = [pytest.mark.e2e, pytest.mark.mosquitto]


class Presences:
    """Every message on the job's presence topic, parsed, in arrival order (``retained``: replayed on subscribing)."""

    def __init__(self, job: Job, mqtt_client: Callable[..., Any]) -> None:
        self.job = job
        self.seen: list[tuple[CoordinatorPresence, bool]] = []
        self._lock = threading.Lock()

        def on_message(topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
            if payload:
                with self._lock:
                    self.seen.append((from_json(CoordinatorPresence, payload), retain))

        mqtt_client(job.broker_url, subscriptions=[(job.topics.coordinator, 1)], on_message=on_message)

    def live(self) -> list[CoordinatorPresence]:
        with self._lock:
            return [p for p, retained in self.seen if not retained]

    def wait(self, what: str, predicate: Callable[[CoordinatorPresence], bool]) -> CoordinatorPresence:
        return self.job.view.wait_until(what, lambda: next((p for p in self.live() if predicate(p)), None))


def statuses(job: Job) -> int:
    with job.view._cond:
        return len(job.view.statuses)


def test_the_presence_changes_on_start_and_end_only_and_its_end_carries_the_phase(
    mosquitto_broker: Any, make_job: Callable[[str], Job], mqtt_client: Callable[..., Any]
) -> None:
    job = make_job(mosquitto_broker.url)
    presences = Presences(job, mqtt_client)
    process = job.start("--rounds", "1", "--min-updates", "1", "--min-devices", "2", "--round-timeout", "60")
    started = presences.wait("the coordinator online", lambda p: p.state == "online")
    assert started.phase is None and started.job == job.name and started.run_id is not None
    # Waiting for a second device: the status heartbeat goes on (once a second), the presence does not move.
    before = statuses(job)
    job.view.wait_until("four status heartbeats", lambda: True if statuses(job) >= before + 4 else None)
    assert presences.live() == [started]

    job.devices.online("d1", "d2")
    plan = job.view.wait_plan(1)
    for device in plan.selected:
        job.devices.send(device, job.frame(1, device))
    job.view.wait_event(EventType.JOB_FINISHED)
    assert process.wait(timeout=WAIT) == 0
    ended = presences.wait("the coordinator's end", lambda p: p.state == "stopped")
    assert ended.phase is Phase.FINISHED and ended.run_id == started.run_id and ended.instance == started.instance
    assert presences.live() == [started, ended]
    finals = [s for s in job.view.statuses if s.phase is Phase.FINISHED]
    assert finals and finals[-1].run_id == started.run_id
    assert statuses(job) >= 6  # heartbeats and round changes on the status; two presences in all


def test_a_paused_run_ends_stopped_a_resumed_one_is_online_again_and_a_crash_leaves_no_end(
    mosquitto_broker: Any, make_job: Callable[[str], Job], mqtt_client: Callable[..., Any], tmp_path: Path
) -> None:
    job = make_job(mosquitto_broker.url)
    presences = Presences(job, mqtt_client)
    flags = ("--rounds", "3", "--min-updates", "1", "--round-timeout", "60", "--checkpoint-dir", str(tmp_path / "c"))
    first = job.start(*flags)
    started = presences.wait("the coordinator online", lambda p: p.state == "online")
    job.devices.online("d1")
    job.view.wait_plan(1)
    first.process.send_signal(signal.SIGTERM)
    assert first.wait(timeout=WAIT) == 128 + signal.SIGTERM
    paused = presences.wait("the paused run's end", lambda p: p.state == "stopped")
    assert paused.phase is Phase.STOPPED and paused.run_id == started.run_id

    second = job.start(*flags, "--resume")
    resumed = presences.wait(
        "the resumed coordinator", lambda p: p.state == "online" and p.instance != started.instance
    )
    assert resumed.phase is None and resumed.run_id == started.run_id  # --resume keeps the run id: it goes on
    job.view.wait_until("a plan of the resumed run", lambda: True if len(job.view.plans) >= 2 else None)
    second.kill()  # SIGKILL: the broker publishes the last will
    job.view.coordinator = None  # its exit is expected: wait on
    will = presences.wait("the coordinator's will", lambda p: p.state == "offline")
    assert will.phase is None and will.run_id == started.run_id and will.instance == resumed.instance
    assert [p.state for p in presences.live()] == ["online", "stopped", "online", "offline"]
