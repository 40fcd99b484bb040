"""The embedded broker: amqtt (pure Python, asyncio) on its own event loop in a background thread.

It needs no system package, only the ``broker`` extra (``pip install 'fedmqtt[broker]'``), which makes it the
default for ``make demo`` and a laptop. Its limits (see docs/broker.md for measured figures): MQTT 3.1.1 only
(clients must use protocol "3.1.1" or "auto"), several times slower than Mosquitto for large payloads, no
authentication or ACL in fedmqtt's set-up (use Mosquitto for that).

Three amqtt 0.12 defects are mended here (:class:`_LimitedBroker`): on every connect amqtt sent the client the
retained messages matching *every* session's filters (another job's models included); it iterated its
subscription table across awaits, so a client subscribing to a new filter while another connected ended that
connection ("dictionary changed size during iteration"; seen in a CI run as a lost connection); and it published
the will of a client that disconnected cleanly soon after connecting.

amqtt has no packet-size limit of its own; :class:`PacketFramer` adds one by following the MQTT framing of the
bytes the broker reads, and the connection whose next packet is announced larger than the limit is closed before
its body is read (what Mosquitto does with ``max_packet_size``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import ItemsView, Iterator, Mapping
from types import FrameType
from typing import Any

from fedmqtt.extras import require

require("broker", "amqtt", "the embedded broker")  # a one-line MissingExtra, not a traceback, without amqtt

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter, WriterAdapter  # noqa: E402
from amqtt.broker import Broker  # noqa: E402
from amqtt.mqtt.disconnect import DisconnectPacket  # noqa: E402
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler  # noqa: E402
from amqtt.plugins.base import BaseAuthPlugin  # noqa: E402
from amqtt.session import Session  # noqa: E402

from fedmqtt.broker.errors import BrokerError, BrokerStartError  # noqa: E402
from fedmqtt.broker.net import find_free_port, mqtt_probe, probe_host  # noqa: E402
from fedmqtt.mqtt import DEFAULT_MAX_PACKET_SIZE  # noqa: E402

logger = logging.getLogger(__name__)

_PORT_ATTEMPTS = 5


class PacketFramer:
    """Follows MQTT framing (type byte, variable-length "remaining length", body) over a byte stream fed in
    arbitrary chunks, and reports the first packet whose total size exceeds ``limit`` as soon as its length
    field is complete, before any of its body is read (pure; no I/O)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._expect = "type"  # "type" -> "length" -> "body" -> "type"
        self._length = 0
        self._length_bytes = 0
        self._body_left = 0
        self.oversize: int | None = None  # the total size of the offending packet, once seen

    def feed(self, data: bytes) -> int | None:
        """Consume ``data``; return the size of an oversize packet if one was announced (then stop)."""
        i = 0
        while i < len(data) and self.oversize is None:
            if self._expect == "body":
                step = min(self._body_left, len(data) - i)
                self._body_left -= step
                i += step
                if self._body_left == 0:
                    self._expect = "type"
            elif self._expect == "type":
                self._expect, self._length, self._length_bytes = "length", 0, 0
                i += 1
            else:
                byte = data[i]
                i += 1
                self._length += (byte & 0x7F) << (7 * self._length_bytes)
                self._length_bytes += 1
                if byte & 0x80:
                    continue
                total = 1 + self._length_bytes + self._length
                if total > self.limit:
                    self.oversize = total
                elif self._length:
                    self._expect, self._body_left = "body", self._length
                else:
                    self._expect = "type"
        return self.oversize


class _PacketSizeLimiter(StreamReaderAdapter):
    """amqtt's stream reader, cutting the connection as soon as a packet announces a size above the limit."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int) -> None:
        super().__init__(reader)
        self._writer = writer
        self._framer = PacketFramer(limit)

    async def read(self, n: int = -1) -> bytes:
        if self._framer.oversize is not None:
            raise ConnectionResetError("connection closed: packet too large")
        data = await super().read(n)
        oversize = self._framer.feed(data)
        if oversize is not None:
            logger.warning(
                "embedded broker: closed a connection that sent a %d-byte packet (max_packet_size %d)",
                oversize,
                self._framer.limit,
            )
            self._writer.transport.abort()
            # amqtt's reader turns this into "no more data" and ends the session (the will is published).
            raise ConnectionResetError("connection closed: packet too large")
        return data


class SnapshotSubscriptions(dict[str, list[tuple[Session, int]]]):
    """amqtt's subscription table (filter → sessions), iterated over a copy.

    amqtt walks the table with awaits inside the loop (retained messages on connect, broadcasts to offline
    sessions); another client's SUBSCRIBE or DISCONNECT adds or deletes a filter meanwhile, and a live dict
    iterator raises. A copy sees the table as it was when the walk began, which is what each walk needs."""

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))

    def items(self) -> ItemsView[str, list[tuple[Session, int]]]:  # type: ignore[override]
        return dict(super().items()).items()


class _CleanDisconnectHandler(BrokerProtocolHandler):
    """amqtt's per-connection protocol handler, remembering a DISCONNECT that came before anyone waited for it.

    amqtt hands a received DISCONNECT to a future that it then drops; if the broker's message loop had not begun
    waiting yet (a client that disconnects right after connecting, or while its retained messages go out), it
    found no future, took the end for an abnormal one and published the client's will (every time, in the test
    that sends CONNECT and DISCONNECT together while a persistent session's retained messages go out)."""

    _disconnect_packet: DisconnectPacket | None = None

    async def start(self) -> None:
        self._disconnect_packet = None
        await super().start()

    async def handle_disconnect(self, disconnect: DisconnectPacket | None) -> None:
        if disconnect is not None:
            self._disconnect_packet = disconnect
        await super().handle_disconnect(disconnect)

    async def wait_disconnect(self) -> DisconnectPacket | None:
        ended = await super().wait_disconnect()
        return ended if ended is not None else self._disconnect_packet


class _LimitedBroker(Broker):
    def __init__(self, config: dict[str, Any], max_packet_size: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(config, loop=loop)
        self._max_packet_size = max_packet_size
        self._subscriptions = SnapshotSubscriptions()

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        handler, session = await super()._initialize_client_session(reader, writer, remote_address, remote_port)
        # amqtt builds the handler itself; the subclass only adds methods and a class-level default, so the
        # handler it built becomes one (no state to initialise).
        handler.__class__ = _CleanDisconnectHandler
        return handler, session

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # amqtt calls this on each connect for every filter of every session, and after a SUBSCRIBE even when it
        # refused the filter: only a filter this session holds may bring it retained messages.
        topic_filter = subscription[0]
        if any(held.client_id == session.client_id for held, _ in self._subscriptions.get(topic_filter, ())):
            await super()._publish_retained_messages_for_subscription(subscription, session)

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        try:
            await self.external_connected(
                _PacketSizeLimiter(reader, writer, self._max_packet_size), StreamWriterAdapter(writer), listener_name
            )
        except OSError as exc:
            # amqtt closes a refused client's socket (e.g. an MQTT 5 CONNECT) after the client already left.
            logger.debug("embedded broker: client connection ended: %s", exc)


class OpenAccessAuthPlugin(BaseAuthPlugin):
    """Lets every client in, like amqtt's ``AnonymousAuthPlugin``, without marking its session anonymous:
    amqtt deletes anonymous sessions as soon as they disconnect, which would break persistent sessions (QoS 1
    messages queued for a device while it is offline)."""

    async def authenticate(self, *, session: Session) -> bool:
        return True


def amqtt_config(
    host: str, port: int, *, session_expiry: int | None, extra_plugins: Mapping[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """amqtt 0.12 configuration: one TCP listener, open access, no $SYS or packet-logging plugins.
    ``extra_plugins`` adds amqtt plugins by dotted path (e.g. its topic ACL plugin) with their configuration."""
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    plugins: dict[str, dict[str, Any]] = {f"{__name__}.{OpenAccessAuthPlugin.__name__}": {}}
    plugins.update(extra_plugins or {})
    return {
        "listeners": {"default": {"type": "tcp", "bind": bind}},
        "session_expiry_interval": session_expiry,
        "plugins": plugins,
    }


def _quiet_amqtt_logs() -> None:
    # amqtt logs every refused MQTT 5 connect (the "auto" protocol fallback) and every dropped client as a
    # warning; keep them out of fedmqtt's output unless someone configured the amqtt logger on purpose.
    for name in ("amqtt", "transitions"):  # transitions: amqtt's state-machine library, chatty at INFO
        chatty = logging.getLogger(name)
        if chatty.level == logging.NOTSET:
            chatty.setLevel(logging.ERROR)


class EmbeddedBroker:
    """An amqtt broker in a background thread. ``with EmbeddedBroker() as broker: broker.url``.

    ``port=0`` picks a free port. ``__enter__``/``start()`` return once a real MQTT connect succeeded;
    ``stop()`` shuts the broker down and joins its thread. ``extra_plugins`` adds amqtt plugins (dotted path ->
    configuration), e.g. ``amqtt.plugins.topic_checking.TopicAccessControlListPlugin``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        session_expiry: int | None = 3600,
        startup_timeout: float = 10.0,
        extra_plugins: Mapping[str, dict[str, Any]] | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise BrokerError(f"invalid port {port}: use 1-65535, or 0 for a free one")
        if max_packet_size < 64:
            raise BrokerError("max_packet_size must be at least 64 bytes")
        self.host = host
        self.port = port
        self.max_packet_size = max_packet_size
        self.session_expiry = session_expiry
        self.startup_timeout = startup_timeout
        self.extra_plugins = dict(extra_plugins or {})
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: _LimitedBroker | None = None

    @property
    def url(self) -> str:
        host = probe_host(self.host)
        return f"mqtt://[{host}]:{self.port}" if ":" in host else f"mqtt://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self.running:
            raise BrokerError("the embedded broker is already running")
        _quiet_amqtt_logs()
        chosen = self.port
        for attempt in range(_PORT_ATTEMPTS):
            port = chosen or find_free_port(self.host)
            error = self._start_on(port)
            if error is None:
                self.port = port
                break
            address_taken = "address already in use" in str(error).lower() or "errno 98" in str(error).lower()
            if chosen or not address_taken or attempt == _PORT_ATTEMPTS - 1:
                raise BrokerStartError(f"the embedded broker could not listen on {self.host}:{port}: {error}")
        deadline = time.monotonic() + self.startup_timeout
        while not mqtt_probe(probe_host(self.host), self.port, timeout=1.0):
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerStartError(f"the embedded broker on {self.host}:{self.port} did not answer MQTT")
            time.sleep(0.05)
        logger.info("embedded broker ready at %s", self.url)

    def _start_on(self, port: int) -> BaseException | None:
        started = threading.Event()
        outcome: list[BaseException | None] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                broker = _LimitedBroker(
                    amqtt_config(self.host, port, session_expiry=self.session_expiry, extra_plugins=self.extra_plugins),
                    self.max_packet_size,
                    loop,
                )
                loop.run_until_complete(broker.start())
            except BaseException as exc:
                outcome.append(exc)
                started.set()
                _close_loop(loop)
                return
            self._broker = broker
            outcome.append(None)
            started.set()
            loop.run_forever()
            try:
                loop.run_until_complete(asyncio.wait_for(broker.shutdown(), timeout=10))
            except Exception:
                logger.warning("embedded broker: shutdown was not clean", exc_info=True)
            _close_loop(loop)

        thread = threading.Thread(target=run, name=f"fedmqtt-embedded-broker-{port}", daemon=True)
        thread.start()
        started.wait()
        error = outcome[0]
        if error is None:
            self._loop, self._thread = loop, thread
        else:
            thread.join()
        return error

    def stop(self, timeout: float = 15.0) -> None:
        """Shut the broker down (closing every client connection) and join its thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            if thread.is_alive():
                raise BrokerError(f"the embedded broker thread did not stop within {timeout} s")
        self._loop = self._thread = self._broker = None


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left (client handlers, plugin tasks) and close the loop without noise."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    with contextlib.suppress(Exception):
        loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


def run_embedded(host: str = "127.0.0.1", port: int = 1883, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE) -> None:
    """Run the embedded broker in the foreground until SIGINT or SIGTERM (for ``fedmqtt broker --embedded``)."""
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedBroker(host=host, port=port, max_packet_size=max_packet_size) as broker:
            print(
                f"fedmqtt broker: embedded amqtt broker (MQTT 3.1.1) listening on {broker.url} "
                f"(bound to {host}); Ctrl-C stops it",
                flush=True,
            )
            while not stop.wait(0.5):
                if not broker.running:
                    raise BrokerError("the embedded broker stopped unexpectedly")
        print("fedmqtt broker: stopped", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
