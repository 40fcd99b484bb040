"""How a device process queues what its virtual devices receive (no network: messages are handed to the devices'
receive callbacks as the network thread would): the job status heartbeat is not followed, coordinator presence and
plans keep their order, and each distinct payload is parsed once for the whole process."""

from __future__ import annotations

import pytest

from fedmqtt.device.agent import DeviceOptions, DeviceRuntime
from fedmqtt.mqtt import BrokerSettings
from fedmqtt.schema import CoordinatorPresence, MessageError, Phase, Status, to_json


def runtime_with(devices: int) -> DeviceRuntime:
    runtime = DeviceRuntime(DeviceOptions(broker=BrokerSettings(), job="j"))
    for index in range(devices):
        runtime.add_device(f"d{index}", dataset=[0] * 10)
    return runtime


def status(round_number: int) -> bytes:
    return to_json(Status(job="j", round=round_number, rounds_total=100, phase=Phase.TRAINING, updated_at=1.0))


def presence(state: str = "online", phase: Phase | None = None) -> bytes:
    return to_json(
        CoordinatorPresence(job="j", instance="00000000000000a1", run_id="00000000000000b2", state=state,  # type: ignore[arg-type]
                            started_at=1.0, phase=phase)
    )  # fmt: skip


def test_the_job_status_heartbeat_never_reaches_a_device_and_presence_and_plans_keep_their_order() -> None:
    runtime = runtime_with(1)
    (device,) = runtime.devices
    topics = runtime.topics
    for round_number in range(1, 51):  # the coordinator's 1 Hz status: devices follow its presence instead
        device._on_message(topics.status, status(round_number), 1, False, 0)
    assert runtime.inbox.qsize() == 0 and not device.pending
    device._on_message(topics.coordinator, presence(), 1, True, 0)  # retained, on subscribing
    device._on_message(topics.plan, b"a plan", 1, False, 0)
    device._on_message(topics.coordinator, presence("stopped", Phase.FINISHED), 1, False, 0)
    assert [item.kind for item in device.pending] == ["presence", "plan", "presence"]
    assert [item.live for item in device.pending] == [False, True, True]
    assert runtime.inbox.qsize() == 3
    # Once the worker took an item, a newer message does not touch it.
    first = runtime.inbox.get_nowait()
    device.take_pending(first)
    device._on_message(topics.plan, b"another plan", 1, False, 0)
    assert first.payload == presence() and not first.live


def test_a_message_received_by_every_device_is_parsed_once() -> None:
    runtime = runtime_with(3)
    payload = presence("stopped", Phase.FINISHED)
    copies = [bytes(bytearray(payload)) for _ in runtime.devices]  # each client gets its own copy
    parsed = [runtime.parse(CoordinatorPresence, copy) for copy in copies]
    assert all(p is parsed[0] for p in parsed) and parsed[0].phase == Phase.FINISHED
    hostile = b'{"job": "j", "state": "online"}'
    for _ in range(3):  # refused every time (remembered, not re-parsed)
        with pytest.raises(MessageError, match="invalid CoordinatorPresence message"):
            runtime.parse(CoordinatorPresence, hostile)
