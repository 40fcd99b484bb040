"""Identity on a Mosquitto with auth: client ids are bound to accounts, and each role reads only its topics.

Attacks from the issue, each run against a real Mosquitto started with fedmqtt's generated config and ACL:
a device account reusing the coordinator's client id, the watcher reading update frames, a device reading or
writing another device's topics.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from conftest import MqttClientFactory
from fedmqtt.broker.accounts import COORDINATOR_USER, WATCHER_USER
from fedmqtt.broker.mosquitto import MosquittoBroker
from fedmqtt.mqtt import ClientSettings, MqttConnection, PublishRefused, parse_broker_url
from fedmqtt.topics import Topics
from inbox import Inbox, wait_until

if TYPE_CHECKING:
    from conftest import SecureBroker

pytestmark = pytest.mark.mosquitto


def _job() -> str:
    return "j" + uuid.uuid4().hex[:8]


@dataclass
class AuthBroker:
    """A Mosquitto of its own (auth and ACL, no TLS): these tests leave persistent sessions behind."""

    broker: MosquittoBroker
    passwords: dict[str, str]

    def url_for(self, username: str) -> str:
        url = parse_broker_url(self.broker.url).with_credentials(username, self.passwords[username])
        return url.to_url(include_password=True)


@pytest.fixture
def auth_broker(tmp_path: Path, mosquitto_installed: None) -> Iterator[AuthBroker]:
    broker = MosquittoBroker(tmp_path / "mosquitto", auth=True)
    passwords = {
        COORDINATOR_USER: broker.add_account("coordinator"),
        "d1": broker.add_account("device", "d1"),
        "d2": broker.add_account("device", "d2"),
    }
    with broker:
        yield AuthBroker(broker, passwords)


class _Connections:
    """Connections opened by a test, closed at teardown (also the ones a test expects to fail)."""

    def __init__(self) -> None:
        self.made: list[MqttConnection] = []

    def open(
        self,
        settings: ClientSettings,
        subscriptions: list[tuple[str, int]] | None = None,
        on_message: Inbox | None = None,
        on_connected: Callable[[bool], None] | None = None,
        on_disconnected: Callable[[str, bool], None] | None = None,
    ) -> MqttConnection:
        connection = MqttConnection(
            settings,
            on_message=on_message,
            subscriptions=subscriptions or [],
            on_connected=on_connected,
            on_disconnected=on_disconnected,
        )
        self.made.append(connection)
        connection.connect(timeout=10)
        return connection


@pytest.fixture
def connections() -> Iterator[_Connections]:
    made = _Connections()
    yield made
    for connection in made.made:
        connection.close()


def _coordinator_settings(url: str, topics: Topics, protocol: str = "5") -> ClientSettings:
    # The client id `fedmqtt coordinator` picks (coordinator.service), with its persistent session.
    return ClientSettings.from_url(
        url,
        client_id=f"fedmqtt-coordinator-{topics.job}",
        protocol=protocol,  # type: ignore[arg-type]
        clean_start=False,
        session_expiry=600,
    )


def _queue_an_update_for_the_offline_coordinator(
    auth: AuthBroker, connections: _Connections, topics: Topics, protocol: str
) -> ClientSettings:
    """The coordinator subscribes with a persistent session and goes away; d1 publishes an update then."""
    settings = _coordinator_settings(auth.url_for(COORDINATOR_USER), topics, protocol)
    connections.open(settings, subscriptions=[(topics.updates_filter, 1)]).close()
    device = connections.open(ClientSettings.from_url(auth.url_for("d1"), client_id="d1-sender", clean_start=True))
    device.publish(topics.update("d1"), b"queued update", qos=1)
    device.close()
    return settings


def _coordinator_comes_back(connections: _Connections, settings: ClientSettings, topics: Topics) -> list[bool]:
    inbox = Inbox()
    sessions: list[bool] = []
    connections.open(
        settings, subscriptions=[(topics.updates_filter, 1)], on_message=inbox, on_connected=sessions.append
    )
    received = inbox.wait_for(1, topic=topics.update("d1"), timeout=5)
    assert received[0].payload == b"queued update"
    return sessions


def test_a_device_using_the_coordinators_client_id_neither_disconnects_it_nor_wipes_its_session(
    auth_broker: AuthBroker, connections: _Connections
) -> None:
    auth = auth_broker
    topics = Topics(job=_job())
    settings = _coordinator_settings(auth.url_for(COORDINATOR_USER), topics)
    impostor = ClientSettings.from_url(auth.url_for("d2"), client_id=settings.client_id, protocol="5", clean_start=True)

    # While the coordinator is connected: the impostor's CONNECT does not take its connection over.
    drops: list[str] = []
    coordinator = connections.open(
        settings, subscriptions=[(topics.updates_filter, 1)], on_disconnected=lambda reason, _: drops.append(reason)
    )
    intruder = connections.open(impostor)
    # A PUBACK on the coordinator's socket after the impostor's CONNACK: the broker closes a taken-over
    # connection while it accepts the new one, so a take-over would have happened before this answer.
    coordinator.publish(topics.events, b"still here", qos=1)
    assert coordinator.is_connected and drops == [] and coordinator.reconnects == 0
    # The impostor is just d2 (its client id became its username): it may write d2's update, nothing else.
    intruder.publish(topics.update("d2"), b"d2's own update", qos=1)
    with pytest.raises(PublishRefused):
        intruder.publish(topics.model, b"forged model", qos=1)
    intruder.close()
    coordinator.close()

    # While the coordinator is away: an update is queued in its session; a clean start under its client id by
    # another account does not wipe that session.
    device = connections.open(ClientSettings.from_url(auth.url_for("d1"), client_id="d1-sender", clean_start=True))
    device.publish(topics.update("d1"), b"queued update", qos=1)
    device.close()
    connections.open(impostor).close()

    sessions = _coordinator_comes_back(connections, settings, topics)
    assert sessions == [True]


def test_a_coordinator_restarting_with_protocol_detection_keeps_its_queued_updates(
    auth_broker: AuthBroker, connections: _Connections
) -> None:
    """`fedmqtt coordinator` and `fedmqtt device` default to protocol "auto", which asks the broker with a
    throw-away connection first; under the coordinator's username that probe would be the coordinator's own
    client id, and its clean start would wipe the session it is about to resume."""
    topics = Topics(job=_job())
    settings = _queue_an_update_for_the_offline_coordinator(auth_broker, connections, topics, protocol="auto")
    assert _coordinator_comes_back(connections, settings, topics) == [True]


def test_one_connection_per_account_a_second_one_takes_the_first_over(
    auth_broker: AuthBroker, connections: _Connections
) -> None:
    """The price of binding client ids to accounts: two processes sharing an account cannot both stay
    connected, whatever client ids they pick: the broker closes the older connection (Mosquitto 2.0.11 closes
    the socket; paho reports a lost connection, not reason 0x8E)."""
    url = auth_broker.url_for("d1")
    drops: list[str] = []
    first = connections.open(
        ClientSettings.from_url(url, client_id="fedmqtt-job-a-d1", protocol="5", clean_start=True),
        on_disconnected=lambda reason, _: drops.append(reason),
    )
    second = connections.open(
        ClientSettings.from_url(url, client_id="fedmqtt-job-b-d1", protocol="5", clean_start=True)
    )
    assert second.is_connected
    assert wait_until(lambda: len(drops) == 1), "the first connection of the account was not closed"
    first.close()  # before its reconnect takes the account's connection back


def test_the_watcher_reads_every_topic_of_the_job_but_never_an_update(
    secure_mosquitto: SecureBroker, mqtt_client: MqttClientFactory
) -> None:
    secure = secure_mosquitto
    ca = secure.ca_file
    topics = Topics(job=_job(), prefix=secure.prefix)
    coordinator = mqtt_client(secure.url_for(COORDINATOR_USER), tls_ca=ca)
    coordinator.publish(topics.plan, b"plan", retain=True)
    coordinator.publish(topics.coordinator, b"online", retain=True)
    inbox = Inbox()
    mqtt_client(
        secure.url_for(WATCHER_USER),
        tls_ca=ca,
        on_message=inbox,
        subscriptions=[(topics.everything_filter, 1), (topics.updates_filter, 1)],
    )
    inbox.wait_for(1, topic=topics.plan)
    inbox.wait_for(1, topic=topics.coordinator)
    device = mqtt_client(secure.url_for("d1"), tls_ca=ca)
    device.publish(topics.device_status("d1"), b"online", qos=1)
    device.publish(topics.update("d1"), b"d1's update frame", qos=1)
    coordinator.publish(topics.status, b"status", retain=True)
    coordinator.publish(topics.round_summary(1), b"summary", retain=True)
    coordinator.publish(topics.privacy, b"ledger", retain=True)
    coordinator.publish(topics.model, b"model", retain=True)
    coordinator.publish(topics.events, b"sentinel", qos=1)  # after the update: it would arrive first
    inbox.wait_for(1, topic=topics.events)
    seen = set(inbox.topics())
    assert {
        topics.plan,
        topics.coordinator,
        topics.device_status("d1"),
        topics.status,
        topics.round_summary(1),
        topics.privacy,
        topics.model,
        topics.events,
    } <= seen
    assert topics.update("d1") not in seen
    assert all(m.payload != b"d1's update frame" for m in inbox.messages)


def test_a_device_neither_reads_nor_writes_another_devices_topics(
    secure_mosquitto: SecureBroker, mqtt_client: MqttClientFactory
) -> None:
    secure = secure_mosquitto
    ca = secure.ca_file
    topics = Topics(job=_job(), prefix=secure.prefix)
    coordinator = mqtt_client(secure.url_for(COORDINATOR_USER), tls_ca=ca)
    coordinator.publish(topics.plan, b"plan", retain=True)
    coordinator.publish(topics.coordinator, b"online", retain=True)
    inbox = Inbox()
    d1 = mqtt_client(
        secure.url_for("d1"),
        tls_ca=ca,
        on_message=inbox,
        subscriptions=[(f"{secure.prefix}/#", 1), (topics.updates_filter, 1), (topics.device_status_filter, 1)],
    )
    inbox.wait_for(1, topic=topics.plan)  # the subscription works: shared topics arrive
    inbox.wait_for(1, topic=topics.coordinator)
    d2 = mqtt_client(secure.url_for("d2"), tls_ca=ca)
    d2.publish(topics.device_status("d2"), b"d2 online", qos=1, retain=True)
    d2.publish(topics.update("d2"), b"d2's update frame", qos=1)
    coordinator.publish(topics.events, b"sentinel", qos=1)
    inbox.wait_for(1, topic=topics.events)
    seen = set(inbox.topics())
    assert topics.update("d2") not in seen and topics.device_status("d2") not in seen
    assert all(not m.payload.startswith(b"d2") for m in inbox.messages)

    for topic in (topics.update("d2"), topics.device_status("d2")):
        with pytest.raises(PublishRefused, match="Not authorized") as info:
            d1.publish(topic, b"forged by d1", qos=1)
        assert info.value.reason.value == 0x87 and info.value.topic == topic
    d1.publish(topics.device_status("d1"), b"d1 online", qos=1)  # its own status: allowed
