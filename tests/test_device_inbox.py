"""How a device process queues what its virtual devices receive (no network: messages are handed to the devices'
receive callbacks as the network thread would): job statuses coalesce, plans never do, order is kept, and each
distinct payload is parsed once for the whole process."""

from __future__ import annotations

import pytest

from fedmqtt.device.agent import DeviceOptions, DeviceRuntime
from fedmqtt.mqtt import BrokerSettings
from fedmqtt.schema import MessageError, Phase, Status, to_json


def runtime_with(devices: int) -> DeviceRuntime:
    runtime = DeviceRuntime(DeviceOptions(broker=BrokerSettings(), job="j"))
    for index in range(devices):
        runtime.add_device(f"d{index}", dataset=[0] * 10)
    return runtime


def status(round_number: int) -> bytes:
    return to_json(Status(job="j", round=round_number, rounds_total=100, phase=Phase.TRAINING, updated_at=1.0))


def test_job_statuses_coalesce_while_they_wait_and_plans_keep_their_place() -> None:
    runtime = runtime_with(1)
    (device,) = runtime.devices
    topics = runtime.topics
    for round_number in range(1, 51):  # fifty statuses while the worker is busy: one item waits, the newest
        device._on_message(topics.status, status(round_number), 1, False, 0)
    assert runtime.inbox.qsize() == 1 and len(device.pending) == 1
    assert device.pending[0].payload == status(50) and device.pending[0].live
    device._on_message(topics.plan, b"a plan", 1, False, 0)
    device._on_message(topics.status, status(51), 1, False, 0)  # after a plan: a new item, in order
    device._on_message(topics.status, status(52), 1, False, 0)
    assert [item.kind for item in device.pending] == ["status", "plan", "status"]
    assert [item.payload for item in device.pending] == [status(50), b"a plan", status(52)]
    assert runtime.inbox.qsize() == 3
    # Once the worker took an item, a newer status does not touch it.
    first = runtime.inbox.get_nowait()
    device.take_pending(first)
    device._on_message(topics.plan, b"another plan", 1, False, 0)
    assert first.payload == status(50)


def test_a_status_received_by_every_device_is_parsed_once() -> None:
    runtime = runtime_with(3)
    payload = status(7)
    copies = [bytes(bytearray(payload)) for _ in runtime.devices]  # each client gets its own copy
    parsed = [runtime.parse(Status, copy) for copy in copies]
    assert all(p is parsed[0] for p in parsed) and parsed[0].round == 7
    hostile = b'{"job": "j", "round": -1}'
    for _ in range(3):  # refused every time (remembered, not re-parsed)
        with pytest.raises(MessageError, match="invalid Status message"):
            runtime.parse(Status, hostile)
