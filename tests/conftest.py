"""Shared fixtures: real brokers (Mosquitto and the embedded amqtt broker) and connected MQTT clients.

* ``mosquitto_broker`` / ``embedded_broker``: one broker of each kind for the whole session, on free loopback
  ports, anonymous access. Without the ``mosquitto`` binary the Mosquitto tests skip, unless
  ``FEDMQTT_REQUIRE_MOSQUITTO=1`` turns that into a failure (CI sets it).
* ``broker_url``: runs a test once per broker (ids ``mosquitto`` and ``embedded``).
* ``topic_prefix``: a unique topic prefix per test, so tests never see each other's retained messages.
* ``mqtt_client(url, ...)``: a connected :class:`~fedmqtt.mqtt.MqttConnection`, closed at teardown.
* ``secure_mosquitto``: a Mosquitto with auth, ACL and TLS, and accounts for a coordinator, a watcher and the
  devices ``d1`` and ``d2``. ``mosquitto_factory(**options)`` starts more, each in its own directory.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fedmqtt.broker.embedded import EmbeddedBroker
from fedmqtt.broker.errors import MissingTool
from fedmqtt.broker.mosquitto import MosquittoBroker, mosquitto_binary
from fedmqtt.mqtt import PROTOCOLS, ClientSettings, MessageCallback, MqttConnection, parse_broker_url
from fedmqtt.schema import FrameHeader, FrameKind

REQUIRE_MOSQUITTO_ENV = "FEDMQTT_REQUIRE_MOSQUITTO"


def require_mosquitto() -> None:
    """The one allowed skip: no ``mosquitto`` binary (a failure with FEDMQTT_REQUIRE_MOSQUITTO=1)."""
    try:
        mosquitto_binary()
    except MissingTool as exc:
        if os.environ.get(REQUIRE_MOSQUITTO_ENV) == "1":
            pytest.fail(f"{exc} (and {REQUIRE_MOSQUITTO_ENV}=1 requires it)")
        pytest.skip(f"{exc}; set {REQUIRE_MOSQUITTO_ENV}=1 to make this a failure")


@pytest.fixture(autouse=True)
def _fresh_protocol_cache() -> Iterator[None]:
    """Each test detects MQTT versions afresh: a port a test's broker used may be another broker's in the next."""
    PROTOCOLS.forget()
    yield
    PROTOCOLS.forget()


@pytest.fixture(scope="session")
def mosquitto_installed() -> None:
    """For tests that run the mosquitto binaries themselves."""
    require_mosquitto()


@pytest.fixture(scope="session")
def mosquitto_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    require_mosquitto()
    with MosquittoBroker(tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture(
    params=[pytest.param("mosquitto", marks=pytest.mark.mosquitto), "embedded"], ids=["mosquitto", "embedded"]
)
def broker_url(request: pytest.FixtureRequest) -> str:
    fixture = "mosquitto_broker" if request.param == "mosquitto" else "embedded_broker"
    broker: MosquittoBroker | EmbeddedBroker = request.getfixturevalue(fixture)
    return broker.url


@pytest.fixture
def topic_prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


def unique_client_id(label: str = "test") -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


MqttClientFactory = Callable[..., MqttConnection]


@pytest.fixture
def mqtt_client() -> Iterator[MqttClientFactory]:
    """``mqtt_client(url, client_id=None, subscriptions=(), on_message=None, manual_ack=False, on_connected=None,
    connect_timeout=10, **settings)`` -> a connected MqttConnection (closed at teardown). ``settings`` are
    :class:`ClientSettings` fields (protocol, clean_start, tls_ca, will, ...). Unlike ClientSettings, the
    factory defaults to ``clean_start=True``, so sessions of finished tests do not pile up queued messages on
    the shared brokers; pass ``clean_start=False`` to test persistent sessions."""
    made: list[MqttConnection] = []

    def make(
        url: str,
        client_id: str | None = None,
        subscriptions: Iterable[tuple[str, int]] = (),
        on_message: MessageCallback | None = None,
        manual_ack: bool = False,
        on_connected: Callable[[bool], None] | None = None,
        connect_timeout: float = 10.0,
        on_disconnected: Callable[[str, bool], None] | None = None,
        **settings: Any,
    ) -> MqttConnection:
        settings.setdefault("clean_start", True)
        connection = MqttConnection(
            ClientSettings.from_url(url, client_id=client_id or unique_client_id(), **settings),
            on_message=on_message,
            subscriptions=subscriptions,
            manual_ack=manual_ack,
            on_connected=on_connected,
            on_disconnected=on_disconnected,
        )
        made.append(connection)
        connection.connect(timeout=connect_timeout)
        return connection

    yield make
    for connection in made:
        connection.close()


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    """``mosquitto_factory(**MosquittoBroker options)`` -> a started broker in its own directory."""
    require_mosquitto()
    started: list[MosquittoBroker] = []

    def start(**options: Any) -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path / f"mosquitto-{len(started)}", **options)
        started.append(broker)
        broker.start()
        return broker

    yield start
    for broker in started:
        broker.stop()


@dataclass
class SecureBroker:
    """A Mosquitto with auth + ACL + TLS and known accounts (``passwords[username]``)."""

    broker: MosquittoBroker
    passwords: dict[str, str]

    @property
    def ca_file(self) -> str:
        return str(self.broker.ca_file)

    @property
    def prefix(self) -> str:
        return self.broker.prefix

    def url_for(self, username: str | None, password: str | None = None) -> str:
        """The broker's mqtts:// URL logged in as ``username`` (its real password unless one is given)."""
        base = parse_broker_url(self.broker.url)
        if username is None:
            return base.to_url()
        secret = password if password is not None else self.passwords[username]
        return base.with_credentials(username, secret).to_url(include_password=True)


@pytest.fixture(scope="session")
def secure_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    require_mosquitto()
    broker = MosquittoBroker(tmp_path_factory.mktemp("secure-mosquitto"), tls=True, auth=True)
    passwords = {
        "coordinator": broker.add_account("coordinator"),
        "watcher": broker.add_account("watcher"),
        "d1": broker.add_account("device", "d1"),
        "d2": broker.add_account("device", "d2"),
    }
    with broker:
        yield SecureBroker(broker, passwords)


# --- data_mirror: the original IDX files over HTTP on loopback (fedmqtt.data downloads without internet) ---

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class DataMirror:
    """A real HTTP server on a free loopback port serving ``root`` (``<dataset>/<file>.gz``: by default
    ../shared/data, the original gzipped IDX files); ``url`` is a ``$FEDMQTT_DATA_MIRROR`` base URL.

    ``requests`` lists the paths asked for. ``replace[path] = bytes`` serves other bytes for a path;
    ``cut[path] = n`` promises the whole file (Content-Length) but drops the connection after ``n`` bytes.
    """

    def __init__(self, root: Path) -> None:
        import http.server
        import threading

        self.root = root
        self.requests: list[str] = []
        self.replace: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                mirror.requests.append(path)
                body = mirror.replace.get(path)
                if body is None:
                    target = (mirror.root / path.lstrip("/")).resolve()
                    if mirror.root.resolve() not in target.parents or not target.is_file():
                        self.send_error(404, "no such file")
                        return
                    body = target.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if path in mirror.cut:
                    self.wfile.write(body[: mirror.cut[path]])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="data-mirror", daemon=True)
        self._thread.start()

    def file_requests(self) -> list[str]:
        return [path for path in self.requests if path.endswith(".gz")]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def data_mirror(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[DataMirror]:
    """A machine with a network and no data: ``$FEDMQTT_DATA_MIRROR`` points at a :class:`DataMirror` of
    ../shared/data, ``$FEDMQTT_DATA`` is unset and ``$XDG_CACHE_HOME`` is an empty ``tmp_path/cache``
    (so the cache is ``tmp_path/cache/fedmqtt/<dataset>``). Subprocesses inherit all three."""
    assert (SHARED_DATA / "mnist").is_dir(), f"the original IDX files are expected in {SHARED_DATA}/mnist"
    mirror = DataMirror(SHARED_DATA)
    monkeypatch.setenv("FEDMQTT_DATA_MIRROR", mirror.url)
    monkeypatch.delenv("FEDMQTT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    try:
        yield mirror
    finally:
        mirror.close()


# --- a client that ignores the broker's packet limit ------------------------------------------------------------


def raw_oversize_publish_is_dropped(port: int, topic: str, size: int = 100_000) -> bool:
    """A raw paho MQTT 3.1.1 client, which knows nothing of the broker's maximum packet size, publishes ``size``
    bytes to ``topic`` on 127.0.0.1:``port``: True when the broker drops its connection within 5 s."""
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    dropped = threading.Event()
    raw = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw", protocol=paho.MQTTv311)
    raw.on_disconnect = lambda *_args: dropped.set()
    raw.connect("127.0.0.1", port)
    raw.loop_start()
    try:
        raw.publish(topic, b"x" * size, qos=1)
        return dropped.wait(5)
    finally:
        raw.disconnect()
        raw.loop_stop()


# --- processes, read from /proc (no psutil) ---------------------------------------------------------------------


def proc_stats() -> Iterator[tuple[int, list[str]]]:
    """``(pid, fields)`` of every process, ``fields`` being /proc/PID/stat after the command name: state, ppid,
    pgrp, ... A process that ends while it is read is passed over."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            yield int(entry.name), stat[stat.rfind(")") + 2 :].split()


def child_pids(pid: int) -> set[int]:
    """Every process whose parent is ``pid``."""
    return {child for child, fields in proc_stats() if int(fields[1]) == pid}


def live_pids_in_groups(groups: set[int]) -> set[int]:
    """Every process (zombies aside) of the process groups ``groups``."""
    return {pid for pid, fields in proc_stats() if fields[0] != "Z" and int(fields[2]) in groups}


# --- an update's frame header, for the round machine's tests (no frame body: the machine reads headers only) ---


def update_header(
    sender: str,
    round: int,
    body: str = "body",
    *,
    job: str = "job",
    kind: FrameKind = FrameKind.UPDATE,
    num_samples: int = 10,
) -> FrameHeader:
    """The header of an update ``sender`` sends in ``round``; different ``body`` texts give different digests."""
    return FrameHeader(
        kind=kind,
        job=job,
        round=round,
        sender=sender,
        num_samples=num_samples,
        codec="float32+zstd:1",
        tensors=(),
        body_size=0,
        body_blake2b=hashlib.blake2b(body.encode(), digest_size=16).hexdigest(),
    )


# --- fedmqtt subprocesses: argv, environment, a named group of them -----------------------------------------


def fedmqtt_argv(*args: str) -> list[str]:
    """``python -m fedmqtt.cli ARGS`` with this test run's interpreter."""
    return [sys.executable, "-m", "fedmqtt.cli", *args]


def subprocess_env() -> dict[str, str]:
    """The environment of a fedmqtt subprocess: unbuffered output, one BLAS/OpenMP thread (2 shared cores)."""
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


class ProcessGroup:
    """A test's named subprocesses (tests/test_e2e.py, tests/test_dp_integration.py): each runs in its own process
    group with its output in ``logs/NAME.log``; :meth:`close` (at teardown) kills those still running."""

    exit_timeout = 60.0  # seconds wait_exit waits by default

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True
            )
        self.processes[name] = process
        return process

    def fail_if_one_failed(self, what: str) -> None:
        """Fail the test, with its log, if a process exited with an error while the test waited for ``what``."""
        for name, process in self.processes.items():
            if process.poll() not in (None, 0):
                pytest.fail(f"{name} exited with {process.returncode} while waiting for {what}:\n{self.log(name)}")

    def wait_exit(self, name: str, timeout: float | None = None) -> int:
        timeout = self.exit_timeout if timeout is None else timeout
        try:
            return self.processes[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not exit within {timeout} s:\n{self.log(name)}")

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


# --- make_job: a coordinator subprocess, a view of its job and played devices (tests/harness.py) ---


@pytest.fixture
def make_job(tmp_path: Path, topic_prefix: str, mqtt_client: MqttClientFactory) -> Iterator[Callable[[str], Any]]:
    """``make_job(broker_url)`` -> a :class:`harness.Job` (its coordinators stopped at teardown, logs printed)."""
    from harness import job_maker  # imports torch: only for the tests that use it

    with job_maker(tmp_path, topic_prefix, mqtt_client) as make:
        yield make


def one_device_machine(**overrides: Any) -> Any:
    """A round machine (3 rounds, quorum 1) with device d1 online: for the tests of typed stops."""
    from fedmqtt.coordinator.machine import RoundConfig, RoundMachine

    values: dict[str, Any] = {"job": "job", "rounds": 3, "min_updates": 1, "round_timeout": 10.0}
    values.update(overrides)
    m = RoundMachine(RoundConfig(**values))
    m.device_status("d1", "online", 0.0)
    return m


def close_round_with_d1(m: Any, now: float) -> Any:
    """d1's update closes the open round; returns the CloseRound action."""
    from fedmqtt.coordinator.machine import CloseRound

    header = update_header("d1", m.round, str(m.round), num_samples=1)
    (closed,) = [a for a in m.accept_update("d1", header, now) if isinstance(a, CloseRound)]
    return closed
