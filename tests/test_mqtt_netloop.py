"""Many MQTT clients in one process on one network thread (:class:`fedmqtt.mqtt.NetworkLoop`), on real Mosquitto
brokers: a thousand clients connect and exchange messages, all come back after a broker restart, one broken or
hostile connection leaves the others alone, keepalive, TLS with auth, the last will and the open-file limit."""

from __future__ import annotations

import resource
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from conftest import SecureBroker, unique_client_id
from fedmqtt.broker.mosquitto import MosquittoBroker
from fedmqtt.mqtt import (
    BrokerUnreachable,
    ClientSettings,
    MqttConnection,
    NetworkLoop,
    TooManyClients,
    Will,
    max_clients_per_process,
)
from fedmqtt.mqtt.netloop import SPARE_FDS, clients_fd_limit
from inbox import Inbox, wait_until

pytestmark = pytest.mark.mosquitto

FAST_RECONNECT = {"reconnect_min_delay": 0.2, "reconnect_max_delay": 1.0}


@pytest.fixture
def loop() -> Iterator[NetworkLoop]:
    with NetworkLoop(name="test-netloop") as network_loop:
        yield network_loop


def break_socket(connection: MqttConnection) -> None:
    """Shut the connection's real socket down from outside (as a dying network would)."""
    client = connection._client
    assert client is not None
    raw = client.socket()
    assert isinstance(raw, socket.socket)
    raw.shutdown(socket.SHUT_RDWR)


class Fleet:
    """``count`` connections on one loop, each subscribed to its own topic and to a broadcast topic; counts what
    each one received."""

    def __init__(self, url: str, loop: NetworkLoop, count: int, **settings: Any) -> None:
        self.prefix = "t" + uuid.uuid4().hex[:10]
        self.broadcast = f"{self.prefix}/all"
        self.received = [0] * count
        self._lock = threading.Lock()
        self.connections: list[MqttConnection] = []
        for index in range(count):
            connection = MqttConnection(
                ClientSettings.from_url(url, client_id=unique_client_id(f"fleet{index}"), **settings),
                on_message=self._receiver(index),
                subscriptions=[(self.own(index), 1), (self.broadcast, 1)],
                network_loop=loop,
            )
            self.connections.append(connection)

    def own(self, index: int) -> str:
        return f"{self.prefix}/c/{index}"

    def _receiver(self, index: int) -> Callable[..., None]:
        def receive(topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
            with self._lock:
                self.received[index] += 1

        return receive

    def total(self) -> int:
        with self._lock:
            return sum(self.received)

    def exchange(self, timeout: float) -> None:
        """Each client sends one message to the next one (QoS 1, not waiting), and client 0 one to all: every
        client must receive two more messages."""
        before = self.total()
        count = len(self.connections)
        for index, connection in enumerate(self.connections):
            connection.publish(self.own((index + 1) % count), b"hello", qos=1, wait=False)
        self.connections[0].publish(self.broadcast, b"to all", qos=1)
        assert wait_until(lambda: self.total() >= before + 2 * count, timeout=timeout), (
            f"{self.total() - before} of {2 * count} messages arrived"
        )

    def close(self) -> None:
        for connection in self.connections:
            connection.close()


def test_a_thousand_clients_on_one_network_thread(mosquitto_broker: MosquittoBroker, loop: NetworkLoop) -> None:
    threads_before = threading.active_count()
    fleet = Fleet(mosquitto_broker.url, loop, 1000, clean_start=True)
    try:
        started = time.monotonic()
        for connection in fleet.connections:
            connection.connect(timeout=20)
        connect_seconds = time.monotonic() - started
        assert loop.clients == 1000 and all(c.is_connected for c in fleet.connections)
        # One network thread for all of them (paho's loop_start would have added a thousand).
        assert threading.active_count() <= threads_before + 1
        assert [t.name for t in threading.enumerate()].count("test-netloop") == 1
        fleet.exchange(timeout=60)
        assert all(n == 2 for n in fleet.received)
        assert loop.errors == 0
        assert connect_seconds < 60
    finally:
        fleet.close()
    assert loop.clients == 0


def test_every_client_reconnects_after_a_broker_restart(
    mosquitto_factory: Callable[..., MosquittoBroker], loop: NetworkLoop
) -> None:
    broker = mosquitto_factory()
    fleet = Fleet(broker.url, loop, 300, clean_start=True, **FAST_RECONNECT)
    try:
        for connection in fleet.connections:
            connection.connect(timeout=20)
        fleet.exchange(timeout=30)
        broker.restart()
        assert wait_until(lambda: all(c.reconnects >= 1 and c.is_connected for c in fleet.connections), timeout=60), (
            f"{sum(c.is_connected for c in fleet.connections)} of 300 reconnected"
        )
        # The subscriptions were made again on each reconnect (clean sessions): messages flow as before.
        fleet.exchange(timeout=30)
        assert loop.reconnect_attempts >= 300
        assert loop.errors == 0
    finally:
        fleet.close()


def test_a_broken_socket_and_a_failing_client_leave_the_others_alone(
    mosquitto_broker: MosquittoBroker, loop: NetworkLoop
) -> None:
    url = mosquitto_broker.url
    fleet = Fleet(url, loop, 50, clean_start=True, **FAST_RECONNECT)
    for connection in fleet.connections:
        connection.connect(timeout=20)
    try:
        # 1. One client's socket is shut down under it: it reconnects, the others never notice.
        victim = fleet.connections[7]
        break_socket(victim)
        assert wait_until(lambda: victim.reconnects == 1 and victim.is_connected, timeout=20)
        assert all(c.reconnects == 0 for i, c in enumerate(fleet.connections) if i != 7)
        fleet.exchange(timeout=30)

        # 2. A client whose callback raises inside the loop (a plain paho client, no MqttConnection to catch it):
        # the loop counts the error, drops that connection (paho reconnects it) and serves the others.
        topic = f"{fleet.prefix}/raw"
        raw_client = paho.Client(CallbackAPIVersion.VERSION2, client_id=unique_client_id("raw"))
        connected = threading.Event()

        def on_connect(client: paho.Client, *_: Any) -> None:
            client.subscribe(topic, 1)
            connected.set()

        def on_message(*_: Any) -> None:
            raise RuntimeError("a callback that fails")

        raw_client.on_connect = on_connect
        raw_client.on_message = on_message
        raw_client.reconnect_delay_set(0.2, 1)  # type: ignore[arg-type]
        loop.attach(raw_client, wants_reconnect=lambda: True)
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        raw_client.connect(host, int(port))
        assert connected.wait(10)
        fleet.connections[0].publish(topic, b"boom", qos=0)
        assert wait_until(lambda: loop.errors == 1, timeout=10)
        fleet.exchange(timeout=30)
        assert wait_until(lambda: raw_client.is_connected(), timeout=10)  # it came back with backoff
        raw_client.disconnect()  # written by the loop, which then closes the socket
        assert wait_until(lambda: raw_client.socket() is None, timeout=10)
        loop.detach(raw_client)

        # 3. A "broker" that answers CONNECT with garbage: that connect fails; the fleet is untouched.
        hostile = socket.create_server(("127.0.0.1", 0))
        stop = threading.Event()

        def answer_garbage() -> None:
            hostile.settimeout(0.2)
            while not stop.is_set():
                try:
                    peer, _ = hostile.accept()
                except TimeoutError:
                    continue
                with peer:
                    peer.recv(1024)
                    peer.sendall(b"\x20\xff\xff\xff\xff\x7f" + b"\xde\xad" * 64)  # a CONNACK of impossible length

        server = threading.Thread(target=answer_garbage, daemon=True)
        server.start()
        try:
            bad = MqttConnection(
                ClientSettings.from_url(
                    f"mqtt://127.0.0.1:{hostile.getsockname()[1]}", client_id="bad", protocol="3.1.1", **FAST_RECONNECT
                ),
                network_loop=loop,
            )
            with pytest.raises(BrokerUnreachable):
                bad.connect(timeout=2)
        finally:
            stop.set()
            server.join(5)
            hostile.close()
        fleet.exchange(timeout=30)
        assert all(c.is_connected for c in fleet.connections)
    finally:
        fleet.close()


def test_keepalive_pings_keep_an_idle_client_connected(mosquitto_broker: MosquittoBroker, loop: NetworkLoop) -> None:
    # Mosquitto drops a client silent for more than 1.5 keepalives, in whole seconds, checked every few seconds:
    # without PINGREQs this one is dropped after about 8 s. The loop's loop_misc() must send them. (Not keepalive 1:
    # Mosquitto's whole-second arithmetic allows it 1 s, and paho pings only once a keepalive has passed.)
    connection = MqttConnection(
        ClientSettings.from_url(mosquitto_broker.url, client_id=unique_client_id("idle"), keepalive=2),
        network_loop=loop,
    )
    with connection:
        time.sleep(10.0)
        assert connection.is_connected and connection.reconnects == 0


def test_tls_auth_will_and_acl_refusals_on_the_shared_loop(secure_mosquitto: SecureBroker, loop: NetworkLoop) -> None:
    from fedmqtt.mqtt import PublishRefused
    from fedmqtt.topics import Topics

    secure = secure_mosquitto
    topics = Topics(job="j" + uuid.uuid4().hex[:8], prefix=secure.prefix)
    inbox = Inbox()
    watcher = MqttConnection(
        ClientSettings.from_url(secure.url_for("coordinator"), client_id="coordinator", tls_ca=secure.ca_file),
        on_message=inbox,
        subscriptions=[(topics.everything_filter, 1)],
        network_loop=loop,
    )
    device = MqttConnection(
        ClientSettings.from_url(
            secure.url_for("d1"),
            client_id="d1",
            tls_ca=secure.ca_file,
            will=Will(topics.device_status("d1"), b"offline", qos=1, retain=False),
            **FAST_RECONNECT,
        ),
        network_loop=loop,
    )
    with watcher, device:
        assert watcher.protocol == "5"
        device.publish(topics.update("d1"), b"x" * 200_000)  # larger than one TLS record
        assert inbox.wait_for(1, topic=topics.update("d1"))[0].payload == b"x" * 200_000
        with pytest.raises(PublishRefused, match="Not authorized"):
            device.publish(topics.update("d2"), b"forged")
        # A crash (the socket dies without DISCONNECT): the broker publishes the will; the client reconnects.
        break_socket(device)
        assert inbox.wait_for(1, topic=topics.device_status("d1"), timeout=15)[0].payload == b"offline"
        assert wait_until(lambda: device.reconnects == 1 and device.is_connected, timeout=20)
        device.publish(topics.update("d1"), b"after the reconnect")
        inbox.wait_for(2, topic=topics.update("d1"))
    assert loop.errors == 0


def test_the_open_file_limit_bounds_a_loop_with_a_clear_error(
    mosquitto_broker: MosquittoBroker, loop: NetworkLoop
) -> None:
    limit = max_clients_per_process()  # raises the soft limit to the hard one
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard or hard == resource.RLIM_INFINITY
    assert limit == clients_fd_limit(soft) == soft - SPARE_FDS
    small = NetworkLoop(max_clients=2)
    made = [
        MqttConnection(
            ClientSettings.from_url(mosquitto_broker.url, client_id=unique_client_id("few")), network_loop=small
        )
        for _ in range(3)
    ]
    try:
        made[0].connect()
        made[1].connect()
        with pytest.raises(TooManyClients, match=r"2 MQTT clients on one network loop.*ulimit -n"):
            made[2].connect()
        made[0].close()
        made[2] = MqttConnection(
            ClientSettings.from_url(mosquitto_broker.url, client_id=unique_client_id("few")), network_loop=small
        )
        made[2].connect()  # a closed connection gave its place back
    finally:
        for connection in made:
            connection.close()
        small.stop()
