"""A real ``fedmqtt device`` process on a real Mosquitto, driven by a scripted coordinator (plain MQTT publishes of
real plans, model frames, job statuses and coordinator presences): stale retained messages of other runs, plans it cannot serve, and two
processes sharing one device id."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedmqtt.codecs import encode_frame, model_hash, peek_header
from fedmqtt.mqtt import MqttConnection
from fedmqtt.schema import (
    TOKEN_PATTERN,
    CodecSpec,
    CoordinatorPresence,
    DeviceStatus,
    FrameKind,
    Phase,
    Plan,
    Status,
    from_json,
    new_token,
    to_json,
)
from fedmqtt.topics import Topics
from inbox import Inbox, ReceivedMessage

pytestmark = [pytest.mark.e2e, pytest.mark.mosquitto]

JOB = "runs"
OLD_RUN = new_token()
NEW_RUN = new_token()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("tiny"), num_train=300, num_test=10, seed=5)


class Scene:
    """A scripted coordinator (one MQTT connection publishing) and an observer of the device topics."""

    def __init__(self, url: str, prefix: str, logs: Path, mqtt_client: Callable[..., MqttConnection]) -> None:
        self.url = url
        self.topics = Topics(job=JOB, prefix=prefix)
        self.logs = logs
        self.inbox = Inbox()
        self.observer = mqtt_client(
            url,
            subscriptions=[(self.topics.updates_filter, 1), (self.topics.device_status_filter, 1)],
            on_message=self.inbox,
        )
        self.coordinator = mqtt_client(url)
        self.instance = new_token()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    # --- the scripted coordinator ---

    def publish_plan(self, round: int, attempt: int, run_id: str | None, **kw: Any) -> Plan:
        fields: dict[str, Any] = {
            "job": JOB,
            "round": round,
            "attempt": attempt,
            "selected": ("dev",),
            "deadline": time.time() + 60,
            "issued_at": time.time(),
            "local_epochs": 1,
            "batch_size": 20,
            "learning_rate": 0.1,
            "uplink": CodecSpec.parse("int8"),
            "model_name": "mlp",
            "model_hash": "f" * 64,
            "run_id": run_id,
        }
        fields.update(kw)
        plan = Plan(**fields)
        self.coordinator.publish(self.topics.plan, to_json(plan), qos=1, retain=True)
        return plan

    def publish_model(self, run_id: str) -> str:
        from fedmqtt.models import build_model, get_arrays

        frame = encode_frame(
            get_arrays(build_model("mlp", seed=0)),
            kind=FrameKind.GLOBAL_MODEL,
            job=JOB,
            round=1,
            sender="coordinator",
            codec=CodecSpec(),
            model_name="mlp",
        )
        self.coordinator.publish(self.topics.model, frame, qos=1, retain=True)
        return model_hash(frame)

    def publish_status(self, phase: Phase, run_id: str) -> None:
        """The job status (a heartbeat devices no longer follow: watchers read it)."""
        status = Status(job=JOB, round=1, rounds_total=1, phase=phase, updated_at=time.time(), run_id=run_id)
        self.coordinator.publish(self.topics.status, to_json(status), qos=1, retain=True)

    def publish_presence(self, state: str, run_id: str, phase: Phase | None = None) -> None:
        """The coordinator's retained presence; ``stopped`` with ``phase`` is how a run's end reaches devices."""
        presence = CoordinatorPresence(job=JOB, instance=self.instance, run_id=run_id, state=state,  # type: ignore[arg-type]
                                       started_at=time.time(), ts=time.time(), phase=phase)  # fmt: skip
        self.coordinator.publish(self.topics.coordinator, to_json(presence), qos=1, retain=True)

    # --- device processes ---

    def device(self, name: str, data: Path, *flags: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "fedmqtt.cli", "-v", "device", "--broker", self.url, "--job", JOB,
                "--prefix", self.topics.prefix, "--mqtt-version", "5", "--data-dir", str(data), "--threads", "1",
                *flags]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        with open(self.logs / f"{name}.log", "wb") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else "(no log)"

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    # --- waiting ---

    def wait(self, what: str, find: Callable[[], Any], timeout: float = 60.0, *, alive: tuple[str, ...] = ()) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            found = find()
            if found:
                return found
            for name in alive:
                if self.processes[name].poll() is not None:
                    pytest.fail(
                        f"{name} exited ({self.processes[name].returncode}) waiting for {what}:\n{self.log(name)}"
                    )
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}:\n{self.log(n)[-3000:]}" for n in self.processes)
                pytest.fail(f"timed out after {timeout} s waiting for {what}\n{logs}")
            time.sleep(0.1)

    def statuses(self, device: str) -> list[DeviceStatus]:
        topic = self.topics.device_status(device)
        return [from_json(DeviceStatus, m.payload) for m in self.inbox.messages if m.topic == topic and m.payload]

    def status_where(self, device: str, predicate: Callable[[DeviceStatus], bool]) -> Callable[[], Any]:
        return lambda: next((s for s in self.statuses(device) if predicate(s)), None)

    def updates(self, device: str) -> list[ReceivedMessage]:
        return [m for m in self.inbox.messages if m.topic == self.topics.update(device)]


@pytest.fixture
def scene(
    mosquitto_broker: Any, topic_prefix: str, tmp_path: Path, mqtt_client: Callable[..., MqttConnection]
) -> Iterator[Scene]:
    s = Scene(mosquitto_broker.url, topic_prefix, tmp_path, mqtt_client)
    yield s
    s.close()


def test_stale_retained_messages_of_other_runs_neither_wedge_nor_end_a_device(scene: Scene, tiny_data: Path) -> None:
    # Before the device starts: an attacker's retained plan naming an unknown model (no run id), and the finished
    # presence the previous run of this job id left retained.
    scene.publish_plan(1, 0, None, model_name="resnet-9000")
    scene.publish_presence("stopped", OLD_RUN, Phase.FINISHED)
    scene.device("dev", tiny_data, "--id", "dev", "--exit-on-finish")

    # (a) The rogue plan is declined, with a retained status that says why ...
    declined = scene.wait(
        "the unknown model to be declined",
        scene.status_where("dev", lambda s: "unknown model 'resnet-9000'" in (s.detail or "")),
        alive=("dev",),
    )
    assert declined.state == "online" and declined.round == 1 and declined.detail.startswith("declined round 1:")
    assert declined.instance is not None and declined.run_id is None
    assert re.match(TOKEN_PATTERN, declined.instance)
    # (b) ... and the old run's finished presence did not make the --exit-on-finish device leave.
    scene.wait("the device to pass over the old run's status",
               lambda: f"run {OLD_RUN} is finished; not the run this device serves" in scene.log("dev"),
               alive=("dev",))  # fmt: skip

    # A plan of the new run whose model frame never arrives: declined at its deadline, the device keeps listening.
    scene.publish_plan(1, 0, NEW_RUN, deadline=time.time() + 4)
    scene.wait(
        "the missing model to be declined",
        scene.status_where("dev", lambda s: "did not arrive before the deadline" in (s.detail or "")),
        alive=("dev",),
    )
    # The new run's next attempt of the same round, with its model: served, sample count capped by the plan.
    digest = scene.publish_model(NEW_RUN)
    scene.publish_plan(1, 1, NEW_RUN, model_hash=digest, max_samples=50)
    update = scene.wait("an update frame", lambda: scene.updates("dev"), alive=("dev",))[0]
    header = peek_header(update.payload)
    assert header.kind is FrameKind.UPDATE and header.sender == "dev" and header.round == 1
    assert header.base_model_hash == digest and header.num_samples == 50
    served = scene.wait("the status after serving", scene.status_where(
        "dev", lambda s: s.state == "online" and s.run_id == NEW_RUN and not s.detail), alive=("dev",))  # fmt: skip
    assert served.instance == declined.instance  # one process, one instance token
    assert len(scene.updates("dev")) == 1  # the rogue and the failed plans got no update

    # Neither the job status saying the run finished (devices no longer subscribe to that heartbeat) nor the
    # coordinator's last will (it crashed: the job is not over) ends the device.
    scene.publish_status(Phase.FINISHED, NEW_RUN)
    scene.publish_presence("offline", NEW_RUN)
    scene.wait("the device to read the coordinator's will",
               lambda: f"the coordinator of run {NEW_RUN} went offline" in scene.log("dev"), alive=("dev",))  # fmt: skip
    time.sleep(0.5)
    assert scene.processes["dev"].poll() is None, scene.log("dev")
    assert "job status" not in scene.log("dev") and f"run {NEW_RUN} is finished" not in scene.log("dev")
    # The coordinator's presence saying the run the device served finished ends it.
    scene.publish_presence("stopped", NEW_RUN, Phase.FINISHED)
    assert scene.processes["dev"].wait(timeout=30) == 0, scene.log("dev")
    scene.wait("the offline status", scene.status_where("dev", lambda s: s.state == "offline"))


def test_two_processes_with_one_device_id_are_told_apart_and_told_about(scene: Scene, tiny_data: Path) -> None:
    scene.device("twin-1", tiny_data, "--id", "twin")
    scene.device("twin-2", tiny_data, "--id", "twin")
    message = "another process uses device id twin: both keep kicking each other off the broker"
    scene.wait("the duplicate-id error in a log",
               lambda: any(message in scene.log(n) for n in ("twin-1", "twin-2")),
               alive=("twin-1", "twin-2"))  # fmt: skip
    # The kicked process says so in its next status, where the coordinator and watchers see it.
    flagged = scene.wait(
        "a status that names the duplicate id",
        scene.status_where("twin", lambda s: (s.detail or "").startswith("another process uses device id twin")),
        alive=("twin-1", "twin-2"),
    )
    instances = {s.instance for s in scene.statuses("twin") if s.instance is not None}
    assert flagged.instance in instances and len(instances) == 2  # both processes published under the one id
    assert "ERROR" in next(scene.log(n) for n in ("twin-1", "twin-2") if message in scene.log(n))
