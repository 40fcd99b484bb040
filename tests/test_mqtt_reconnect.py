"""Reconnects and persistent sessions across a Mosquitto restart on the same port (persistence on)."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from conftest import MqttClientFactory
from fedmqtt.broker.mosquitto import MosquittoBroker
from fedmqtt.mqtt import NotConnected
from fedmqtt.topics import Topics
from inbox import Inbox, wait_until

pytestmark = pytest.mark.mosquitto

FAST_RECONNECT = {"reconnect_min_delay": 0.1, "reconnect_max_delay": 0.5}


def test_reconnect_after_restart_and_queued_delivery_to_a_persistent_session(
    mosquitto_factory: Callable[..., MosquittoBroker], mqtt_client: MqttClientFactory
) -> None:
    broker = mosquitto_factory()
    topics = Topics(job="j", prefix="p" + uuid.uuid4().hex[:8])
    device_id = "device-" + uuid.uuid4().hex[:8]
    sessions: list[bool] = []
    inbox = Inbox()
    device = mqtt_client(
        broker.url,
        client_id=device_id,
        subscriptions=[(topics.plan, 1)],
        on_message=inbox,
        on_connected=sessions.append,
        clean_start=False,
        session_expiry=300,
        **FAST_RECONNECT,
    )
    assert sessions == [False]
    # A clean session loses its subscriptions with the broker; the client makes them again on reconnect.
    fresh_inbox = Inbox()
    fresh = mqtt_client(
        broker.url, subscriptions=[(topics.plan, 1)], on_message=fresh_inbox, clean_start=True, **FAST_RECONNECT
    )

    broker.restart()
    assert wait_until(lambda: device.reconnects == 1 and device.is_connected, timeout=10.0)
    assert wait_until(lambda: fresh.reconnects == 1 and fresh.is_connected, timeout=10.0)
    assert sessions == [False, True]  # the broker restored the session from its database

    coordinator = mqtt_client(broker.url)
    coordinator.publish(topics.plan, b"plan for round 1")
    assert inbox.wait_for(1)[0].payload == b"plan for round 1"
    assert fresh_inbox.wait_for(1)[0].payload == b"plan for round 1"

    # Offline: a QoS 1 message is queued for the session and survives another restart.
    device.close()
    coordinator.publish(topics.plan, b"plan for round 2")
    coordinator.close()
    broker.restart()
    inbox_again = Inbox()
    mqtt_client(
        broker.url,
        client_id=device_id,
        subscriptions=[(topics.plan, 1)],
        on_message=inbox_again,
        clean_start=False,
        session_expiry=300,
    )
    assert inbox_again.wait_for(1)[0].payload == b"plan for round 2"


def test_qos1_publish_waits_for_the_reconnect(
    mosquitto_factory: Callable[..., MosquittoBroker], mqtt_client: MqttClientFactory
) -> None:
    broker = mosquitto_factory()
    topics = Topics(job="j", prefix="p" + uuid.uuid4().hex[:8])
    inbox = Inbox()
    mqtt_client(
        broker.url,
        client_id="coord-" + uuid.uuid4().hex[:6],
        subscriptions=[(topics.updates_filter, 1)],
        on_message=inbox,
        clean_start=False,
        **FAST_RECONNECT,
    )
    device = mqtt_client(broker.url, clean_start=False, **FAST_RECONNECT)

    broker.stop()
    assert wait_until(lambda: not device.is_connected, timeout=10.0)
    with pytest.raises(NotConnected, match="QoS 0"):
        device.publish(topics.update("d1"), b"lost", qos=0)
    errors: list[BaseException] = []

    def publish_while_down() -> None:
        try:
            device.publish(topics.update("d1"), b"update sent while the broker was down", qos=1, timeout=20)
        except BaseException as exc:
            errors.append(exc)

    sender = threading.Thread(target=publish_while_down)
    sender.start()
    time.sleep(0.3)
    assert sender.is_alive()  # still waiting for the broker
    broker.start()  # same port
    sender.join(20)
    assert not sender.is_alive() and errors == []
    assert inbox.wait_for(1)[0].payload == b"update sent while the broker was down"


def test_two_clients_on_one_id_back_off_instead_of_fighting_every_second(
    mosquitto_broker: MosquittoBroker, mqtt_client: MqttClientFactory
) -> None:
    """Each connection lost soon after it was made doubles the reconnect delay (min 0.1 s here): two clients that
    keep taking one client id from each other slow down instead of kicking each other ten times a second."""
    client_id = "dup-" + uuid.uuid4().hex[:8]
    settings = {"reconnect_min_delay": 0.1, "reconnect_max_delay": 30.0}
    drops: list[float] = []

    def dropped(reason: str, taken_over: bool) -> None:
        drops.append(time.monotonic())

    first = mqtt_client(mosquitto_broker.url, client_id=client_id, on_disconnected=dropped, **settings)
    second = mqtt_client(mosquitto_broker.url, client_id=client_id, on_disconnected=dropped, **settings)
    time.sleep(6.0)
    # Without the back-off: a kick every ~0.1 s for 6 s (about 60). With it: 0.1, 0.2, 0.4, ... -> about 6 per client.
    assert 1 <= len(drops) <= 20, drops
    gaps = [b - a for a, b in itertools.pairwise(drops)]
    assert gaps and max(gaps) > 0.5
    assert first.reconnects + second.reconnects >= 1
