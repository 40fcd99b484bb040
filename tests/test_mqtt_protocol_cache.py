"""``--mqtt-version auto`` asks each broker once per process: counted as TCP connections through a real proxy in
front of a real broker (Mosquitto speaks 5, the embedded broker 3.1.1 only)."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, suppress

import pytest

from fedmqtt.broker.embedded import EmbeddedBroker
from fedmqtt.broker.mosquitto import MosquittoBroker
from fedmqtt.mqtt import PROTOCOLS, ClientSettings, MqttConnection, parse_broker_url


class CountingProxy:
    """A TCP proxy on 127.0.0.1 that forwards every connection to ``upstream`` and counts them."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._connections = 0
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._connections += 1
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        self._server.close()
        with self._lock:
            for sock in self._sockets:
                with suppress(OSError):
                    sock.close()


@pytest.fixture
def proxy_to(request: pytest.FixtureRequest) -> Iterator[CountingProxy]:
    broker: MosquittoBroker | EmbeddedBroker = request.getfixturevalue(request.param)
    target = parse_broker_url(broker.url)
    proxy = CountingProxy(target.host, target.port)
    yield proxy
    proxy.close()


def _connect_many(url: str, count: int) -> list[MqttConnection]:
    connections = []
    with ExitStack() as stack:
        for _ in range(count):
            connection = MqttConnection(ClientSettings.from_url(url, f"c-{uuid.uuid4().hex[:10]}", clean_start=True))
            connection.connect(timeout=10)
            stack.callback(connection.close)
            connections.append(connection)
        stack.pop_all()
    return connections


@pytest.mark.parametrize(
    ("proxy_to", "version"), [("mosquitto_broker", "5"), ("embedded_broker", "3.1.1")], indirect=["proxy_to"]
)
def test_auto_detection_probes_each_broker_once_per_process(proxy_to: CountingProxy, version: str) -> None:
    connections = _connect_many(proxy_to.url, 5)
    try:
        assert {c.protocol for c in connections} == {version}
        # One probe and five real connections (it was ten before the cache: a probe before every connection).
        assert proxy_to.connections == 6
        assert PROTOCOLS.probes == 1
    finally:
        for connection in connections:
            connection.close()


@pytest.mark.parametrize("proxy_to", ["embedded_broker"], indirect=True)
def test_concurrent_connections_wait_for_one_probe(proxy_to: CountingProxy) -> None:
    connections: list[MqttConnection] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def connect() -> None:
        try:
            made = _connect_many(proxy_to.url, 1)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
            return
        with lock:
            connections.extend(made)

    threads = [threading.Thread(target=connect) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert errors == []
        assert len(connections) == 8 and {c.protocol for c in connections} == {"3.1.1"}
        assert proxy_to.connections == 9
    finally:
        for connection in connections:
            connection.close()


def test_an_explicit_version_never_probes(embedded_broker: EmbeddedBroker) -> None:
    target = parse_broker_url(embedded_broker.url)
    proxy = CountingProxy(target.host, target.port)
    try:
        settings = ClientSettings.from_url(proxy.url, f"c-{uuid.uuid4().hex[:10]}", protocol="3.1.1")
        with MqttConnection(settings) as connection:
            assert connection.protocol == "3.1.1"
        assert proxy.connections == 1 and PROTOCOLS.probes == 0
    finally:
        proxy.close()
