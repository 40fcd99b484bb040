"""The embedded amqtt broker: lifecycle, packet-size limit, and the framing that enforces it."""

from __future__ import annotations

import gc
import itertools
import os
import socket
import struct
import threading
import time
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import MqttClientFactory, raw_oversize_publish_is_dropped, unique_client_id
from fedmqtt.broker.embedded import EmbeddedBroker, PacketFramer, amqtt_config
from fedmqtt.broker.errors import BrokerError, BrokerStartError
from fedmqtt.broker.net import find_free_port, mqtt_probe
from fedmqtt.mqtt import ClientSettings, MqttConnection, PayloadTooLarge, SubscriptionRefused
from fedmqtt.topics import Topics
from inbox import Inbox, wait_until


def open_fds() -> set[tuple[str, str]]:
    """(descriptor, what it points to) for every open descriptor, after collecting garbage."""
    gc.collect()
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:  # the descriptor listdir itself used
            continue
    return found


def test_start_and_stop_leave_no_threads_or_sockets() -> None:
    threads, fds = set(threading.enumerate()), open_fds()
    with EmbeddedBroker() as broker:
        assert broker.running and broker.url == f"mqtt://127.0.0.1:{broker.port}"
        with MqttConnection(ClientSettings.from_url(broker.url, "c-" + uuid.uuid4().hex[:8])) as client:
            client.publish("a/b", b"x")
        port = broker.port
    assert not broker.running
    assert not mqtt_probe("127.0.0.1", port, timeout=0.5)
    assert set(threading.enumerate()) - threads == set()
    assert open_fds() - fds == set()  # nothing new is left open
    broker.stop()  # stopping twice is harmless


def test_stop_closes_connected_clients() -> None:
    broker = EmbeddedBroker()
    broker.start()
    client = MqttConnection(
        ClientSettings.from_url(
            broker.url, "c-" + uuid.uuid4().hex[:8], reconnect_min_delay=5.0, reconnect_max_delay=5.0
        )
    )
    client.connect()
    try:
        broker.stop()
        deadline = threading.Event()
        for _ in range(100):
            if not client.is_connected:
                break
            deadline.wait(0.05)
        assert not client.is_connected
    finally:
        client.close()


def test_listens_on_loopback_unless_told() -> None:
    config = amqtt_config("127.0.0.1", 1234, session_expiry=None)
    assert config["listeners"]["default"]["bind"] == "127.0.0.1:1234"
    assert amqtt_config("::1", 1234, session_expiry=None)["listeners"]["default"]["bind"] == "[::1]:1234"
    assert EmbeddedBroker().host == "127.0.0.1"


def test_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BrokerStartError, match=f"could not listen on 127.0.0.1:{port}"):
            EmbeddedBroker(port=port).start()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(BrokerError, match="invalid port"):
        EmbeddedBroker(port=70000)
    with pytest.raises(BrokerError, match="max_packet_size"):
        EmbeddedBroker(max_packet_size=10)


def test_fixed_port_and_double_start(topic_prefix: str) -> None:
    port = find_free_port()
    with EmbeddedBroker(port=port) as broker:
        assert broker.port == port
        with pytest.raises(BrokerError, match="already running"):
            broker.start()


def test_a_packet_over_max_packet_size_is_refused_and_the_broker_keeps_serving(
    mqtt_client: MqttClientFactory,
) -> None:
    topics = Topics(job="j", prefix="p" + uuid.uuid4().hex[:8])
    with EmbeddedBroker(max_packet_size=64 * 1024) as broker:
        assert raw_oversize_publish_is_dropped(broker.port, topics.model)

        inbox = Inbox()
        receiver = mqtt_client(broker.url, subscriptions=[(topics.model, 1)], on_message=inbox)
        # MQTT 3.1.1 cannot carry the broker's limit: the client is told it.
        sender = mqtt_client(broker.url, max_packet_size=64 * 1024)
        with pytest.raises(PayloadTooLarge):
            sender.publish(topics.model, b"x" * 100_000)
        sender.publish(topics.model, b"y" * 60_000)
        assert inbox.wait_for(1)[0].payload == b"y" * 60_000
        assert broker.running
        sender.close()
        receiver.close()


# --- the framing behind the limit (pure) -----------------------------------------------------------------------


def encode_packet(body_length: int, packet_type: int = 0x30) -> bytes:
    length = bytearray()
    value = body_length
    while True:
        byte, value = value % 128, value // 128
        length.append(byte | (0x80 if value else 0))
        if not value:
            break
    return bytes([packet_type]) + bytes(length) + b"\xab" * body_length


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 20_000), min_size=1, max_size=8),
    limit=st.integers(64, 20_010),
    cuts=st.lists(st.integers(0, 200_000), max_size=12),
)
def test_framer_finds_the_first_oversize_packet_in_any_chunking(sizes: list[int], limit: int, cuts: list[int]) -> None:
    packets = [encode_packet(size) for size in sizes]
    stream = b"".join(packets)
    framer = PacketFramer(limit)
    found = None
    for chunk in chunked(stream, cuts):
        found = framer.feed(chunk)
        if found is not None:
            break
    oversize = [len(p) for p in packets if len(p) > limit]
    assert found == (oversize[0] if oversize else None)


def test_framer_reports_before_the_body_arrives() -> None:
    framer = PacketFramer(1000)
    header = encode_packet(5000)[:3]  # type byte + two length bytes, no body yet
    assert framer.feed(header[:2]) is None
    assert framer.feed(header[2:]) == 5003
    assert framer.feed(b"more") == 5003  # stays tripped


def test_refused_subscriptions_raise(mqtt_client: MqttClientFactory) -> None:
    """amqtt's own taboo-topic plugin refuses subscriptions to 'prohibited': SUBACK 0x80 becomes an error,
    whether the subscription came with connect() or later."""
    taboo: dict[str, dict[str, object]] = {"amqtt.plugins.topic_checking.TopicTabooPlugin": {}}
    with EmbeddedBroker(extra_plugins=taboo) as broker:
        connection = mqtt_client(broker.url, subscriptions=[("allowed/topic", 1)])
        with pytest.raises(SubscriptionRefused, match="'prohibited'") as info:
            connection.subscribe("prohibited", 1)
        assert info.value.reason.is_failure
        assert "prohibited" not in connection.subscriptions
        assert connection.subscribe("allowed/other", 0) == 0
        refused_at_connect = MqttConnection(
            ClientSettings.from_url(broker.url, "c-" + uuid.uuid4().hex[:8]), subscriptions=[("prohibited", 1)]
        )
        with pytest.raises(SubscriptionRefused):
            refused_at_connect.connect()
        assert not refused_at_connect.is_connected
        connection.close()


# --- amqtt defects mended by fedmqtt's subclass ------------------------------------------------------------------


def _raw_client(url: str, client_id: str, *, clean_session: bool = True) -> Any:
    """A bare paho client (no fedmqtt helper: no reconnects, no strict routing) that records what reaches it."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                         protocol=mqtt.MQTTv311)  # fmt: skip
    client.user_data_set({"topics": [], "payloads": [], "failures": []})

    def on_message(client: Any, data: dict[str, list[Any]], message: Any) -> None:
        data["topics"].append(message.topic)
        data["payloads"].append(message.payload)

    client.on_message = on_message
    client.on_disconnect = lambda c, data, flags, reason, props: reason.is_failure and data["failures"].append(reason)
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    client.connect(host, int(port))
    client.loop_start()
    return client


def _close(client: Any) -> None:
    client.disconnect()
    client.loop_stop()


def test_a_connecting_client_gets_no_retained_message_of_another_sessions_filter(
    embedded_broker: EmbeddedBroker, topic_prefix: str
) -> None:
    """amqtt 0.12 sent every connecting client the retained messages matching *every* session's filters (another
    job's models, say); a client now gets retained messages only for filters it holds."""
    url = embedded_broker.url
    holder = _raw_client(url, unique_client_id("holder"))
    holder.subscribe(f"{topic_prefix}/secret/#", 1)
    publisher = _raw_client(url, unique_client_id("pub"))
    publisher.publish(f"{topic_prefix}/secret/model", b"not yours", qos=1, retain=True).wait_for_publish(5)
    publisher.publish(f"{topic_prefix}/mine", b"yours", qos=1, retain=True).wait_for_publish(5)
    assert wait_until(lambda: holder.user_data_get()["topics"] == [f"{topic_prefix}/secret/model"])

    newcomer = _raw_client(url, unique_client_id("new"))
    newcomer.subscribe(f"{topic_prefix}/mine", 1)
    # The broker sends connect-time messages before it reads the SUBSCRIBE, so anything leaked comes first.
    assert wait_until(lambda: len(newcomer.user_data_get()["topics"]) >= 1)
    time.sleep(0.2)
    assert newcomer.user_data_get()["topics"] == [f"{topic_prefix}/mine"]
    for client in (holder, publisher, newcomer):
        _close(client)


def test_reconnects_survive_other_clients_subscribing_meanwhile(
    embedded_broker: EmbeddedBroker, topic_prefix: str
) -> None:
    """A persistent session reconnecting walks amqtt's subscription table (its retained messages) while another
    client adds and removes filters; amqtt 0.12 ended such connections ("dictionary changed size during
    iteration") in about one reconnect of eight here. Each reconnect must now stay up and get its messages."""
    url, kept = embedded_broker.url, 40
    publisher = _raw_client(url, unique_client_id("pub"))
    for i in range(kept):
        publisher.publish(f"{topic_prefix}/kept/{i}", b"x" * 20_000, qos=1, retain=True).wait_for_publish(5)
    stop = threading.Event()

    def churn() -> None:
        churner = _raw_client(url, unique_client_id("churn"))
        for n in itertools.count():
            if stop.is_set():
                break
            churner.subscribe(f"{topic_prefix}/new/{n}", 0)
            if n % 50 == 49:
                churner.unsubscribe([f"{topic_prefix}/new/{k}" for k in range(n - 49, n + 1)])
            time.sleep(0.0005)
        _close(churner)

    churning = threading.Thread(target=churn)
    churning.start()
    client_id = unique_client_id("persistent")
    try:
        for attempt in range(20):
            client = _raw_client(url, client_id, clean_session=False)
            if attempt == 0:
                client.subscribe(f"{topic_prefix}/kept/#", 1)
            data: dict[str, list[Any]] = client.user_data_get()

            def all_or_failed(data: dict[str, list[Any]] = data) -> bool:
                return len(data["topics"]) >= kept or bool(data["failures"])

            received = wait_until(all_or_failed)
            _close(client)
            assert data["failures"] == [] and received, (attempt, data["failures"], len(data["topics"]))
    finally:
        stop.set()
        churning.join()
        _close(publisher)
        _close(_raw_client(url, client_id))  # a clean session ends the persistent one on the shared broker


def _raw_connect(client_id: str, will_topic: str, will: bytes, *, clean_session: bool) -> bytes:
    """An MQTT 3.1.1 CONNECT with a QoS 1 will, built by hand so it can share one write with what follows."""

    def field(data: bytes) -> bytes:
        return struct.pack("!H", len(data)) + data

    flags = (0x02 if clean_session else 0) | 0x04 | 0x08  # clean session, will flag, will QoS 1
    body = field(b"MQTT") + bytes([4, flags]) + struct.pack("!H", 60)
    body += field(client_id.encode()) + field(will_topic.encode()) + field(will)
    return bytes([0x10, len(body)]) + body


DISCONNECT = b"\xe0\x00"


def test_a_clean_disconnect_right_after_connect_publishes_no_will(broker_url: str, topic_prefix: str) -> None:
    """amqtt 0.12 dropped a DISCONNECT read before its message loop began waiting (here: while a persistent
    session's retained messages go out) and published the will of a client that ended cleanly: 20 of 20 here.
    An abrupt end still publishes it. Both brokers."""
    wills = _raw_client(broker_url, unique_client_id("watch"))
    wills.subscribe(f"{topic_prefix}/will", 1)
    publisher = _raw_client(broker_url, unique_client_id("pub"))
    for i in range(5):
        publisher.publish(f"{topic_prefix}/kept/{i}", b"x" * 1000, qos=1, retain=True).wait_for_publish(5)
    client_id = unique_client_id("quick")
    holder = _raw_client(broker_url, client_id, clean_session=False)  # the session holds a filter with retained
    holder.subscribe(f"{topic_prefix}/kept/#", 1)
    assert wait_until(lambda: len(holder.user_data_get()["topics"]) == 5)
    _close(holder)
    host, port = broker_url.removeprefix("mqtt://").rsplit(":", 1)
    for _ in range(10):
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            connect = _raw_connect(client_id, f"{topic_prefix}/will", b"ended", clean_session=False)
            raw.sendall(connect + DISCONNECT)
            while raw.recv(65536):  # everything the broker sends until it closes: no reset loses the DISCONNECT
                pass
    with socket.create_connection((host, int(port)), timeout=5) as raw:  # an abrupt end: no DISCONNECT
        raw.sendall(_raw_connect(unique_client_id("abrupt"), f"{topic_prefix}/will", b"abrupt", clean_session=True))
        assert raw.recv(4)[:1] == b"\x20"  # CONNACK
    assert wait_until(lambda: wills.user_data_get()["topics"] != [])
    time.sleep(0.3)
    payloads = wills.user_data_get()["payloads"]
    assert payloads == [b"abrupt"], payloads
    _close(_raw_client(broker_url, client_id))  # a clean session ends the persistent one
    for client in (wills, publisher):
        _close(client)
