"""The shared MQTT client helper: every fedmqtt process talks to the broker through :class:`MqttConnection`.

It wraps paho-mqtt 2.x (``CallbackAPIVersion.VERSION2``) and adds what fedmqtt relies on:

* ``connect()`` blocks until the broker answered CONNECT and the initial subscriptions were acknowledged,
  and tells an unreachable broker (:class:`BrokerUnreachable`) from refused credentials
  (:class:`AuthenticationRefused`);
* ``publish()`` blocks until the broker acknowledged the message and, on MQTT 5, turns a failure reason code
  in the PUBACK (an ACL refusal is 0x87 "Not authorized") into :class:`PublishRefused`. MQTT 3.1.1 has no such
  signal: a broker drops a refused publish silently and the client sees success;
* strict routing: a message reaches ``on_message`` only if its topic matches one of the connection's *current*
  subscriptions. Brokers do send other messages (a persistent session keeps subscriptions an earlier process
  made; plain amqtt 0.12 sends a connecting client the retained messages of every session's filters), so those
  are dropped and counted in ``ignored_messages``;
* a process-wide guard on the number of live connections that run their own network thread (paho's loop uses
  ``select()``, which cannot watch file descriptors above 1023) and a refusal to publish packets larger than the broker accepts (Mosquitto disconnects
  a client that sends one, and paho would resend it after every reconnect, forever).

With ``protocol="auto"`` the MQTT version is detected once per process and broker (host, port, TLS) and
remembered in :data:`PROTOCOLS`: a thousand devices in one process make one probe, not a thousand.

Each connection runs paho's network thread (``loop_start()``) unless it is given a shared
:class:`~fedmqtt.mqtt.netloop.NetworkLoop` (``network_loop=``): then one thread drives all of the process's
connections on an epoll selector, with no per-process cap but the open-file limit (a process with many virtual
devices; a real device keeps its own thread).

Callbacks run on the network thread: they only deliver. Hand messages to another thread (a queue) and never
call ``publish()``/``subscribe()`` from inside a callback.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedmqtt.mqtt.errors import (
    AuthenticationRefused,
    BrokerUnreachable,
    ConnectionRefused,
    MqttError,
    NotConnected,
    PayloadTooLarge,
    ProtocolUnsupported,
    PublishRefused,
    PublishTimeout,
    SubscriptionRefused,
    TlsError,
    TooManyClients,
)
from fedmqtt.mqtt.netloop import NetworkLoop
from fedmqtt.mqtt.settings import ClientSettings
from fedmqtt.mqtt.topic_names import topic_matches, validate_topic_filter, validate_topic_name
from fedmqtt.mqtt.url import BrokerURL

logger = logging.getLogger("fedmqtt.mqtt")

#: The most live :class:`MqttConnection` objects with their own network thread one process may hold (connections
#: on a shared :class:`~fedmqtt.mqtt.netloop.NetworkLoop` do not count). paho's network loop watches its sockets
#: with ``select()``, which cannot watch file descriptors above 1023; each connection uses three (its socket and
#: a wake-up socket pair). Measured: 300 clients in one process worked, 400 silently received nothing.
MAX_CLIENTS_PER_PROCESS = 250

#: ``select()`` cannot watch a file descriptor at or above this number (FD_SETSIZE on Linux).
SELECT_FD_LIMIT = 1024

#: Both fedmqtt brokers refuse packets above this by default (``fedmqtt broker --max-packet-mb``). An MQTT 5
#: broker announces its own limit in CONNACK; on MQTT 3.1.1 it cannot, so the client assumes this one.
DEFAULT_MAX_PACKET_SIZE = 32_000_000  # 32 MB (10^6 bytes: the unit of --max-packet-mb and --max-update-mb)

# Worst-case bytes a PUBLISH packet adds around its payload besides the topic: fixed header (1 + up to 4 length
# bytes), topic length (2), packet id (2) and a small MQTT 5 property block.
_PUBLISH_OVERHEAD = 16
_MQTT_MAX_PAYLOAD = 268_435_455


# --- the process-wide connection budget -------------------------------------------------------------------------


class ConnectionBudget:
    """Counts live connections in this process and refuses one more than ``limit`` (thread-safe)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the connection limit must be >= 1")
        self.limit = limit
        self._live = 0
        self._lock = threading.Lock()

    @property
    def live(self) -> int:
        with self._lock:
            return self._live

    def acquire(self) -> None:
        with self._lock:
            if self._live >= self.limit:
                raise TooManyClients(
                    f"this process already holds {self._live} MQTT connections, the most one process can run "
                    f"(paho's network loop uses select(), which cannot watch file descriptors above "
                    f"{SELECT_FD_LIMIT - 1}); drive many clients from one fedmqtt.mqtt.NetworkLoop "
                    "(MqttConnection(network_loop=...)) or run them in several processes"
                )
            self._live += 1

    def release(self) -> None:
        with self._lock:
            if self._live == 0:
                raise RuntimeError("ConnectionBudget.release() without acquire()")
            self._live -= 1


#: The budget every :class:`MqttConnection` draws from.
CONNECTION_BUDGET = ConnectionBudget(MAX_CLIENTS_PER_PROCESS)


# --- the protocol each broker speaks ----------------------------------------------------------------------------

Endpoint = tuple[str, int, bool]


class ProtocolCache:
    """The MQTT version each broker (host, port, TLS) answered, detected once per process (thread-safe).

    Concurrent connections to one broker wait for a single probe instead of each sending their own; ``probes``
    counts the answers learnt. An answer holds for the life of the process, as paho's reconnects keep the version
    they started with: a broker replaced by one of another MQTT version on the same address needs a restart of
    its clients (or :meth:`forget`)."""

    def __init__(self) -> None:
        self._known: dict[Endpoint, MQTTProtocolVersion] = {}
        self._probing: dict[Endpoint, threading.Lock] = {}
        self._lock = threading.Lock()
        self.probes = 0

    def get(self, endpoint: Endpoint) -> MQTTProtocolVersion | None:
        with self._lock:
            return self._known.get(endpoint)

    def detect(
        self, endpoint: Endpoint, deadline: float, probe: Callable[[], MQTTProtocolVersion]
    ) -> MQTTProtocolVersion:
        """The remembered version, else ``probe()``'s answer (remembered). One probe per endpoint at a time."""
        with self._lock:
            known = self._known.get(endpoint)
            if known is not None:
                return known
            gate = self._probing.setdefault(endpoint, threading.Lock())
        # Wait for another thread's probe until our own deadline; past it, probe ourselves.
        acquired = gate.acquire(timeout=max(deadline - time.monotonic(), 0.0))
        try:
            known = self.get(endpoint)
            if known is not None:
                return known
            version = probe()
            with self._lock:
                self.probes += 1
                self._known[endpoint] = version
            return version
        finally:
            if acquired:
                gate.release()

    def forget(self, endpoint: Endpoint | None = None) -> None:
        """Forget one broker's version, or (None) every broker's and the count of probes."""
        with self._lock:
            if endpoint is None:
                self._known.clear()
                self.probes = 0
            else:
                self._known.pop(endpoint, None)


#: The versions this process has detected (``protocol="auto"``).
PROTOCOLS = ProtocolCache()


# --- message callbacks -------------------------------------------------------------------------------------------


MessageCallback = Callable[[str, bytes, int, bool, int], None]


# --- the connection ----------------------------------------------------------------------------------------------

_AUTH_REASONS = {0x86, 0x87, 0x8A, 0x8C}  # bad user/password, not authorised, banned, bad auth method
_UNSUPPORTED_PROTOCOL = 0x84


_SESSION_TAKEN_OVER = 0x8E
SHORT_LIVED_SECONDS = 10.0


def _reason(packet_type: int, name: str) -> ReasonCode:
    return ReasonCode(packet_type, name)


def _set_tcp_nodelay(client: paho.Client, userdata: Any, sock: Any) -> None:
    # paho leaves Nagle on: a small write behind an unacknowledged one (a QoS 1 publish after a QoS 0 event or
    # a manual ack) waits ~40 ms for the peer's delayed ACK. Measured: 40 accepted updates 1.9 s -> 0.19 s.
    with contextlib.suppress(OSError, AttributeError):  # not a TCP socket (e.g. a unix socket transport)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttConnection:
    """One client connection. Use as a context manager or call ``connect()`` and ``close()``.

    ``on_message(topic, payload, qos, retain, mid)`` runs on paho's network thread for messages whose topic
    matches a current subscription. With ``manual_ack=True`` QoS 1/2 messages are acknowledged only when the
    caller calls ``ack(mid, qos)`` (after storing the message, say). ``on_connected(session_present)`` runs after
    every successful (re)connect. ``network_loop``: drive this connection from that shared loop's thread instead
    of a thread of its own.
    """

    def __init__(
        self,
        settings: ClientSettings,
        on_message: MessageCallback | None = None,
        subscriptions: Iterable[tuple[str, int]] = (),
        manual_ack: bool = False,
        on_connected: Callable[[bool], None] | None = None,
        on_disconnected: Callable[[str, bool], None] | None = None,
        network_loop: NetworkLoop | None = None,
    ) -> None:
        self.settings = settings
        self._network_loop = network_loop
        self._on_disconnected = on_disconnected
        self.taken_over = 0
        # Connections lost soon after they were made (another process with our client id, a broker that drops
        # us at once): each one doubles the reconnect delay, so two clients on one id do not fight every second.
        self._connected_at: float | None = None
        self._short_lived = 0
        self._broker = settings.broker
        self._on_message = on_message
        self._manual_ack = manual_ack
        self._on_connected = on_connected
        self._subscriptions: dict[str, int] = {}
        for topic_filter, qos in subscriptions:
            self._subscriptions[validate_topic_filter(topic_filter)] = _check_qos(qos)

        self._cond = threading.Condition()
        self._client: paho.Client | None = None
        self._protocol: MQTTProtocolVersion = paho.MQTTv5 if settings.protocol in ("5", "auto") else paho.MQTTv311
        self._started = False
        self._closed = False
        self._holds_budget = False
        self._connected = False
        self._connack: ReasonCode | None = None
        self._connects = 0
        self._disconnects = 0
        self._broker_max_packet: int | None = None
        self._initial_sub_mid: int | None = None
        self._initial_filters: list[str] = []
        self._network_thread: threading.Thread | None = None
        self._in_flight: set[int] = set()
        self._acks: dict[int, ReasonCode] = {}
        self._abandoned: set[int] = set()
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._resubscribe_mids: dict[int, list[str]] = {}
        self._unsubacks: set[int] = set()
        self.ignored_messages = 0
        self.oversize_messages = 0
        self.callback_errors = 0

    # -- public state --

    @property
    def is_connected(self) -> bool:
        with self._cond:
            return self._connected

    @property
    def protocol(self) -> str:
        """The MQTT version in use ("5" or "3.1.1"); with "auto" it is known after ``connect()``."""
        return "5" if self._protocol == paho.MQTTv5 else "3.1.1"

    @property
    def subscriptions(self) -> dict[str, int]:
        with self._cond:
            return dict(self._subscriptions)

    @property
    def max_packet_size(self) -> int | None:
        """The largest packet this client will send: the smaller of its setting and the broker's CONNACK limit.
        An MQTT 3.1.1 broker cannot tell its limit, so without a setting the client assumes
        :data:`DEFAULT_MAX_PACKET_SIZE`; sending more would make the broker drop the connection, and paho would
        resend the message after every reconnect."""
        limits = [x for x in (self.settings.max_packet_size, self._broker_max_packet) if x is not None]
        if not limits and self._protocol == paho.MQTTv311:
            return DEFAULT_MAX_PACKET_SIZE
        return min(limits) if limits else None

    @property
    def reconnects(self) -> int:
        """How many times the connection was re-established after the first CONNACK."""
        with self._cond:
            return max(self._connects - 1, 0)

    def __enter__(self) -> MqttConnection:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connecting --

    def connect(self, timeout: float = 10.0) -> None:
        """Connect, retrying until ``timeout``; return once CONNACK and the initial SUBACK arrived."""
        if self._closed:
            raise MqttError("this connection was closed; create a new MqttConnection")
        if self._started:
            raise MqttError("connect() was already called")
        if self._network_loop is None:  # a shared loop has its own limit (open files), checked by attach()
            CONNECTION_BUDGET.acquire()
            self._holds_budget = True
        self._started = True
        deadline = time.monotonic() + timeout
        try:
            if self.settings.protocol == "auto" and self.settings.tls_cert is not None:
                # A client certificate is an identity (the broker may make it the user name and client id):
                # an anonymous probe cannot be made, and a probe with the certificate would take over this
                # client's own session. Brokers that ask for client certificates speak MQTT 5 (Mosquitto 2);
                # --mqtt-version 3.1.1 is the way to reach one that does not.
                self._protocol = paho.MQTTv5
            elif self.settings.protocol == "auto":
                endpoint = self._broker.endpoint
                self._protocol = PROTOCOLS.detect(endpoint, deadline, lambda: self._detect_protocol(deadline))
            self._attempt(deadline)
        except BaseException as exc:
            self._dispose_client()
            self._release_budget()
            self._closed = True
            if isinstance(exc, BrokerUnreachable) and self._broker.tls:
                refusal = self._client_certificate_refusal()
                if refusal is not None:
                    raise refusal from None
            raise

    # TLS alerts by which a broker refuses a missing client certificate, and one it does not trust.
    _NO_CERTIFICATE = frozenset({"SSLV3_ALERT_HANDSHAKE_FAILURE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"})
    _BAD_CERTIFICATE = frozenset({
        "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV1_ALERT_DECRYPT_ERROR",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "TLSV1_ALERT_ACCESS_DENIED",
    })  # fmt: skip

    def _client_certificate_refusal(self) -> TlsError | None:
        """Why a TLS broker closed the connection before CONNACK, when it is the client certificate: with TLS 1.3
        the refusal comes after the handshake looked complete, so paho sees only a closed socket. One TLS 1.2
        handshake, where the broker asks for the certificate inside the handshake, tells which it was."""
        s = self.settings
        try:
            context = ssl.create_default_context(cafile=s.tls_ca)
            context.check_hostname = False  # the first connection checked the name; here only the alert counts
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            if s.tls_cert is not None:
                context.load_cert_chain(s.tls_cert, s.tls_key)
            address = (self._broker.host, self._broker.port)
            with socket.create_connection(address, timeout=3.0) as sock, context.wrap_socket(sock):
                return None
        except ssl.SSLError as exc:
            reason = exc.reason or ""
        except (OSError, ValueError):
            return None
        if s.tls_cert is None and reason in self._NO_CERTIFICATE:
            return TlsError(
                f"the broker at {self._broker} requires a client certificate: give this client its own with "
                "--tls-cert FILE --tls-key FILE (`fedmqtt broker gen-certs --device ID` issues one from the "
                "broker's CA)"
            )
        if s.tls_cert is not None and reason in self._BAD_CERTIFICATE | self._NO_CERTIFICATE:
            return TlsError(
                f"the broker at {self._broker} refused the client certificate --tls-cert {s.tls_cert} "
                f"(TLS alert {reason}): it must be issued by the CA the broker trusts and be valid now"
            )
        return None

    def _detect_protocol(self, deadline: float) -> MQTTProtocolVersion:
        """MQTT 5 if the broker speaks it, else 3.1.1. Asked with a throw-away connection (random client id,
        clean start, no CONNECT properties): amqtt misreads an MQTT 5 CONNECT that carries properties and never
        answers it, but answers a bare one with "unsupported protocol version".

        The probe sends no credentials: a broker that makes the username the client id (fedmqtt's Mosquitto
        with auth) would otherwise let its clean start take over and wipe the very session this connection
        is about to resume. A broker with auth refuses it as anonymous, which still proves MQTT 5; bad
        credentials are then reported by the real CONNECT."""
        probe = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"fedmqtt-probe-{uuid.uuid4().hex[:12]}", protocol=paho.MQTTv5
        )
        answer: list[ReasonCode] = []
        probe.on_connect = lambda _c, _u, _f, reason, _p: answer.append(reason)
        self._configure_transport(probe)
        probe.username_pw_set(None)  # anonymous: see above
        try:
            self._connect_socket(probe, deadline, lambda: probe.connect(self._broker.host, self._broker.port))
            while not answer and time.monotonic() < deadline:
                if probe.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
        finally:
            probe.disconnect()
            sock = probe.socket()
            if sock is not None:
                sock.close()
        if not answer:
            raise BrokerUnreachable(
                f"the MQTT broker at {self._broker} closed the connection without answering CONNECT"
                + ("" if self._broker.tls else " (is this a TLS port? then use mqtts://)")
            )
        if answer[0].value == _UNSUPPORTED_PROTOCOL:
            logger.info("broker %s does not support MQTT 5; using MQTT 3.1.1", self._broker)
            return paho.MQTTv311
        if answer[0].is_failure and answer[0].value not in _AUTH_REASONS:  # the real CONNECT would fail alike
            raise _connack_error(self._broker, answer[0], "5")
        return paho.MQTTv5

    def _connect_socket(self, client: paho.Client, deadline: float, connect: Callable[[], object]) -> None:
        """TCP (and TLS) connect and send CONNECT, retrying refused/unreachable sockets until ``deadline``."""
        last_error: BaseException | None = None
        # paho refuses to change this after a failed attempt, so it is set once.
        client.connect_timeout = min(max(deadline - time.monotonic(), 0.1), 5.0)
        while True:
            if time.monotonic() >= deadline:
                raise BrokerUnreachable(
                    f"cannot reach the MQTT broker at {self._broker}: {last_error or 'timed out'}; "
                    "is it running, and are the host and port right?"
                )
            try:
                connect()
                return
            except ssl.SSLError as exc:
                raise TlsError(
                    f"TLS handshake with {self._broker} failed: {exc}; check the CA file "
                    f"({self.settings.tls_ca or 'system CAs'}), the host name in the URL, and that the port is a "
                    "TLS port"
                ) from exc
            except OSError as exc:
                last_error = exc
                time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))

    def _attempt(self, deadline: float) -> None:
        with self._cond:
            self._connack = None
            self._connected = False
            self._connects = 0
            self._disconnects = 0
            self._initial_sub_mid = None
            self._initial_filters = []
        client = self._build_client()
        self._client = client
        if self._network_loop is not None:
            # The loop registers the socket when paho opens it (on_socket_open) and reconnects with paho's backoff.
            self._network_loop.attach(client, lambda: not self._closed and self._client is client)
            self._connect_socket(client, deadline, lambda: self._send_connect(client))
        else:
            self._connect_socket(client, deadline, lambda: self._send_connect(client))
            self._check_fds(client)
            client.loop_start()
            self._check_fds(client)

        with self._cond:
            while self._connack is None and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            connack = self._connack
            drops = self._disconnects
        if connack is None:
            hint = ""
            if drops:
                hint = f"; the broker closed the connection {drops} time(s) before answering" + (
                    " (is this a TLS port? then use mqtts://)" if not self._broker.tls else ""
                )
            if self._protocol == paho.MQTTv5 and not drops:
                hint = "; if it is the embedded (amqtt) broker, it speaks MQTT 3.1.1 only: use protocol 'auto'"
            raise BrokerUnreachable(f"no CONNACK from the MQTT broker at {self._broker} in time{hint}")
        if connack.is_failure:
            raise _connack_error(self._broker, connack, self.protocol)

        with self._cond:
            while (
                self._initial_sub_mid is not None
                and self._initial_sub_mid not in self._subacks
                and time.monotonic() < deadline
            ):
                self._cond.wait(deadline - time.monotonic())
            mid = self._initial_sub_mid
            granted = self._subacks.pop(mid, None) if mid is not None else []
            subscribed = list(self._initial_filters)
        if granted is None:
            raise BrokerUnreachable(f"the MQTT broker at {self._broker} did not acknowledge the subscriptions in time")
        for topic_filter, reason in zip(subscribed, granted, strict=False):
            if reason.is_failure:
                raise SubscriptionRefused(topic_filter, reason)

    def _send_connect(self, client: paho.Client) -> None:
        if self._protocol == paho.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if self.settings.clean_start else self.settings.session_expiry
            client.connect(
                self._broker.host,
                self._broker.port,
                keepalive=self.settings.keepalive,
                clean_start=self.settings.clean_start,
                properties=props,
            )
        else:
            client.connect(self._broker.host, self._broker.port, keepalive=self.settings.keepalive)

    def _build_client(self) -> paho.Client:
        s = self.settings
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=self._protocol,
            clean_session=None if self._protocol == paho.MQTTv5 else s.clean_start,
            manual_ack=self._manual_ack,
        )
        paho_logger = logging.getLogger("fedmqtt.mqtt.paho")
        if paho_logger.isEnabledFor(logging.DEBUG):  # paho logs every dropped connection as an ERROR as well
            client.enable_logger(paho_logger)
        self._configure_transport(client)
        if s.will is not None:
            client.will_set(s.will.topic, s.will.payload, qos=s.will.qos, retain=s.will.retain)
        # paho sleeps for these as float seconds, although its signature says int.
        client.reconnect_delay_set(min_delay=s.reconnect_min_delay, max_delay=s.reconnect_max_delay)  # type: ignore[arg-type]
        client.max_inflight_messages_set(s.max_inflight)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        client.on_unsubscribe = self._handle_unsubscribe
        client.on_socket_open = _set_tcp_nodelay
        return client

    def _configure_transport(self, client: paho.Client) -> None:
        if self._broker.username is not None:
            client.username_pw_set(self._broker.username, self._broker.password)
        if self._broker.tls:
            s = self.settings
            try:
                client.tls_set(ca_certs=s.tls_ca, certfile=s.tls_cert, keyfile=s.tls_key)
            except (ssl.SSLError, OSError, ValueError) as exc:  # a file changed since ClientSettings checked it
                where = f"--tls-ca: {s.tls_ca}" if s.tls_ca else "the system CA certificates"
                if s.tls_cert is not None:
                    where += f" or --tls-cert: {s.tls_cert}" + (f" with --tls-key: {s.tls_key}" if s.tls_key else "")
                raise TlsError(f"{where} cannot be loaded ({exc})") from None

    def _check_fds(self, client: paho.Client) -> None:
        sockets = [client.socket(), getattr(client, "_sockpairR", None), getattr(client, "_sockpairW", None)]
        highest = max((s.fileno() for s in sockets if s is not None and s.fileno() >= 0), default=-1)
        if highest >= SELECT_FD_LIMIT:
            raise TooManyClients(
                f"the MQTT socket got file descriptor {highest}, which select() cannot watch (limit "
                f"{SELECT_FD_LIMIT - 1}); this process has too many open files or connections"
            )

    # -- paho callbacks (network thread: deliver and return) --

    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        self._network_thread = threading.current_thread()
        if reason.is_failure:
            with self._cond:
                self._connack = reason
                self._connected = False
                reconnect = self._connects > 0
                self._cond.notify_all()
            if reconnect:  # paho keeps retrying with backoff
                logger.error("broker %s refused the reconnect: %s", self._broker, reason)
            return
        with self._cond:
            first = self._connects == 0
            subs = list(self._subscriptions.items())
        # Subscribe before announcing the CONNACK so connect() knows which SUBACK to wait for. The SUBACK is
        # read by this same thread, so it cannot arrive before we recorded the mid.
        mid: int | None = None
        if subs:
            rc, mid = client.subscribe(subs)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                mid = None
        with self._cond:
            self._connack = reason
            self._connected = True
            self._connects += 1
            self._connected_at = time.monotonic()
            self._broker_max_packet = getattr(properties, "MaximumPacketSize", None)
            if first:
                self._initial_sub_mid = mid
                self._initial_filters = [f for f, _ in subs]
            elif mid is not None:
                self._resubscribe_mids[mid] = [f for f, _ in subs]
            self._cond.notify_all()
        if not first:
            logger.info("reconnected to %s (session present: %s)", self._broker, flags.session_present)
        if self._on_connected is not None:
            try:
                self._on_connected(bool(flags.session_present))
            except Exception:
                self.callback_errors += 1
                logger.exception("on_connected callback failed")

    def _handle_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        with self._cond:
            was_connected = self._connected
            self._connected = False
            self._disconnects += 1
            self._cond.notify_all()
        # MQTT 5 reason 0x8E: another connection with our client id took the session over (a duplicate id).
        taken_over = getattr(reason, "value", None) == _SESSION_TAKEN_OVER
        if taken_over:
            self.taken_over += 1
        self._adapt_reconnect_delay(client)
        if was_connected and not self._closed:
            logger.warning("lost the connection to %s: %s; reconnecting", self._broker, reason)
            if self._on_disconnected is not None:
                try:
                    self._on_disconnected(str(reason), taken_over)
                except Exception:
                    self.callback_errors += 1
                    logger.exception("on_disconnected callback failed")

    def _adapt_reconnect_delay(self, client: paho.Client) -> None:
        s = self.settings
        lived = None if self._connected_at is None else time.monotonic() - self._connected_at
        if lived is None:
            return
        self._short_lived = self._short_lived + 1 if lived < SHORT_LIVED_SECONDS else 0
        delay = min(s.reconnect_max_delay, s.reconnect_min_delay * 2 ** min(self._short_lived, 16))
        if self._short_lived == 0:
            delay = s.reconnect_min_delay
        client.reconnect_delay_set(min_delay=delay, max_delay=max(delay, s.reconnect_max_delay))

    def _handle_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        topic = message.topic
        with self._cond:
            filters = list(self._subscriptions)
        deliver = any(topic_matches(f, topic) for f in filters)
        limit = self.settings.max_message_bytes
        if not deliver:
            self.ignored_messages += 1
            logger.debug("ignored a message on %r: no current subscription matches it", topic)
        elif limit is not None and len(message.payload) > limit:
            deliver = False
            self.oversize_messages += 1
            logger.warning("dropped a %d-byte message on %r (limit %d)", len(message.payload), topic, limit)
        if not deliver:
            if self._manual_ack and message.qos > 0:
                client.ack(message.mid, message.qos)  # else the broker would redeliver it forever
            return
        if self._on_message is None:
            if self._manual_ack and message.qos > 0:
                client.ack(message.mid, message.qos)
            return
        try:
            self._on_message(topic, bytes(message.payload), message.qos, bool(message.retain), message.mid)
        except Exception:
            self.callback_errors += 1
            logger.exception("on_message callback failed for a message on %r", topic)

    @property
    def pending_publishes(self) -> int:
        """Publishes still waiting for the broker's acknowledgement."""
        with self._cond:
            return len(self._in_flight)

    def _handle_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any
    ) -> None:
        with self._cond:
            self._in_flight.discard(mid)
            if mid in self._abandoned:
                self._abandoned.discard(mid)
                if reason.is_failure:
                    logger.warning("the broker refused a publish (mid %d): %s", mid, reason)
                self._cond.notify_all()
            else:
                self._acks[mid] = reason
                self._cond.notify_all()

    def _handle_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Any
    ) -> None:
        with self._cond:
            resubscribed = self._resubscribe_mids.pop(mid, None)
            if resubscribed is None:  # connect() or subscribe() waits for it
                self._subacks[mid] = list(reasons)
                self._cond.notify_all()
        for topic_filter, reason in zip(resubscribed or [], reasons, strict=False):
            if reason.is_failure:
                logger.error(
                    "after a reconnect, %s refused the subscription to %r: %s", self._broker, topic_filter, reason
                )

    def _handle_unsubscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Any
    ) -> None:
        with self._cond:
            self._unsubacks.add(mid)
            self._cond.notify_all()

    # -- operations --

    def _live_client(self) -> paho.Client:
        if self._closed:
            raise NotConnected("this connection was closed")
        if self._client is None or not self._started:
            raise NotConnected("call connect() first")
        client = self._client
        if threading.current_thread() is self._network_thread:
            raise MqttError(
                "called from inside an MQTT callback, which would deadlock; hand the message to another thread"
            )
        return client

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 30.0,
        *,
        wait: bool = True,
    ) -> None:
        """Publish and wait for the broker's acknowledgement (PUBACK/PUBCOMP; for QoS 0, until it was written).

        Raises :class:`PublishRefused` (MQTT 5 failure reason code), :class:`PayloadTooLarge`,
        :class:`PublishTimeout`, or :class:`NotConnected` (QoS 0 while disconnected; QoS 1/2 messages wait for
        the reconnect instead). ``wait=False`` only queues the message (paho resends QoS 1/2 after a reconnect)
        and returns at once: for a thread that must never block on the broker; ``pending_publishes`` counts the
        messages not yet acknowledged, and ``close()`` still waits for them.
        """
        client = self._live_client()
        validate_topic_name(topic)
        _check_qos(qos)
        payload = bytes(payload)
        limit = self.max_packet_size
        size = len(payload) + len(topic.encode("utf-8")) + _PUBLISH_OVERHEAD
        if limit is not None and size > limit:
            raise PayloadTooLarge(topic, size, limit)
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError:  # topic and QoS were checked: paho refuses payloads above the MQTT maximum
            raise PayloadTooLarge(topic, size, _MQTT_MAX_PAYLOAD) from None
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise MqttError("the client's outgoing queue is full; slow down")
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            raise NotConnected(f"not connected to {self._broker}; a QoS 0 message to {topic!r} was dropped")
        mid = info.mid
        if not wait:
            with self._cond:
                if self._acks.pop(mid, None) is None and qos > 0:
                    self._in_flight.add(mid)
                    self._abandoned.add(mid)
            return
        deadline = time.monotonic() + timeout
        with self._cond:
            if mid not in self._acks:
                self._in_flight.add(mid)
            while mid not in self._acks and time.monotonic() < deadline and not self._closed:
                self._cond.wait(min(deadline - time.monotonic(), 1.0))
            reason = self._acks.pop(mid, None)
            if reason is None:
                self._abandoned.add(mid)
        if reason is None and self._closed:
            raise NotConnected(f"the connection was closed while waiting for the acknowledgement of {topic!r}")
        if reason is None:
            state = "connected" if self.is_connected else "disconnected"
            raise PublishTimeout(
                f"no acknowledgement for the publish to {topic!r} within {timeout} s ({state}); "
                "QoS 1/2 messages stay queued and are resent after a reconnect"
            )
        if reason.is_failure:
            raise PublishRefused(topic, reason)

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 10.0) -> int:
        """Add a subscription (kept across reconnects); wait for the SUBACK and return the granted QoS."""
        validate_topic_filter(topic_filter)
        _check_qos(qos)
        client = self._live_client()
        with self._cond:
            self._subscriptions[topic_filter] = qos
        rc, mid = client.subscribe(topic_filter, qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            with self._cond:
                self._subscriptions.pop(topic_filter, None)
            raise NotConnected(f"cannot subscribe to {topic_filter!r}: not connected to {self._broker}")
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._subacks and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            reasons = self._subacks.pop(mid, None)
            if reasons is None or reasons[0].is_failure:
                self._subscriptions.pop(topic_filter, None)
        if reasons is None:
            raise MqttError(f"no SUBACK for {topic_filter!r} within {timeout} s; the subscription was dropped")
        if reasons[0].is_failure:
            raise SubscriptionRefused(topic_filter, reasons[0])
        return int(reasons[0].value)

    def unsubscribe(self, topic_filter: str, timeout: float = 10.0) -> None:
        """Stop routing ``topic_filter`` at once and tell the broker (waits for the UNSUBACK if connected)."""
        client = self._live_client()
        with self._cond:
            if self._subscriptions.pop(topic_filter, None) is None:
                raise MqttError(f"not subscribed to {topic_filter!r}")
        rc, mid = client.unsubscribe(topic_filter)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # not connected: the filter is gone from the resubscribe list and from routing already
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._unsubacks and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            self._unsubacks.discard(mid)

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a message delivered with ``manual_ack=True`` (also allowed inside ``on_message``: it only
        queues the PUBACK)."""
        if not self._manual_ack:
            raise MqttError("ack() is only for connections made with manual_ack=True")
        client = self._client
        if self._closed or client is None:
            raise NotConnected("this connection is not open")
        client.ack(mid, qos)

    def close(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout``) for unacknowledged publishes, send a normal DISCONNECT (the broker then does
        not publish the last will), and stop the network thread. Safe to call twice."""
        if self._closed:
            return
        client = self._client
        if client is not None and self._started:
            deadline = time.monotonic() + timeout
            # Publishes that timed out (or are being waited for in other threads) may still be acknowledged.
            with self._cond:
                while self._in_flight and self._connected and time.monotonic() < deadline:
                    self._cond.wait(deadline - time.monotonic())
        self._closed = True
        with self._cond:
            self._cond.notify_all()
        self._dispose_client()
        self._release_budget()

    def _dispose_client(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if self._protocol == paho.MQTTv5:
            client.disconnect(reasoncode=_reason(PacketTypes.DISCONNECT, "Normal disconnection"))
        else:
            client.disconnect()
        # Let the network thread write DISCONNECT before stopping it: stopping first can close the socket with
        # the packet unsent, and the broker then treats the close as a crash and publishes the last will.
        deadline = time.monotonic() + 2.0
        with self._cond:
            while self._connected and self._started and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
        if self._network_loop is not None:
            self._network_loop.detach(client)
        else:
            # RuntimeError: the network thread never started (an exception, e.g. a signal handler's raised inside
            # loop_start, interrupted connect()); the exception that did so is the one to report, not this one.
            with contextlib.suppress(RuntimeError):
                client.loop_stop()
        sock = client.socket()
        if sock is not None:  # loop_stop() before the loop wrote DISCONNECT leaves the socket open
            sock.close()
        with self._cond:
            self._connected = False

    def _release_budget(self) -> None:
        if self._holds_budget:
            self._holds_budget = False
            CONNECTION_BUDGET.release()


def _check_qos(qos: int) -> int:
    if qos not in (0, 1, 2):
        raise MqttError(f"invalid QoS {qos!r}: use 0, 1 or 2")
    return qos


def _connack_error(broker: BrokerURL, reason: ReasonCode, protocol: str) -> ConnectionRefused:
    if reason.value in _AUTH_REASONS:
        who = f"user {broker.username!r}" if broker.username else "an anonymous client"
        return AuthenticationRefused(
            f"the MQTT broker at {broker} refused {who}: {reason}; check the username and password "
            "(fedmqtt broker add-device / add-coordinator create accounts)",
            reason,
        )
    if reason.value == _UNSUPPORTED_PROTOCOL:
        return ProtocolUnsupported(
            f"the MQTT broker at {broker} does not support MQTT {protocol}: {reason}; the embedded broker speaks "
            "3.1.1 only, so use protocol '3.1.1' or 'auto'",
            reason,
        )
    return ConnectionRefused(f"the MQTT broker at {broker} refused the connection: {reason}", reason)
