"""One network thread for many paho clients: :class:`NetworkLoop`.

paho's ``loop_start()`` gives every client its own thread, blocked in ``select()`` on its socket and a wake-up
socket pair: three file descriptors per client, and ``select()`` cannot watch descriptors above 1023, so a process
topped out at ~250 clients. A :class:`NetworkLoop` drives any number of clients from one thread with paho's
external-loop API (``loop_read()``, ``loop_write()``, ``loop_misc()``, ``want_write()`` and the
``on_socket_open/close/register_write/unregister_write`` callbacks, as paho's ``examples/loop_select.py`` does) on
an epoll selector (:class:`selectors.DefaultSelector`): one descriptor per client, no ``FD_SETSIZE`` limit.

What paho's own thread does and this loop does too:

* keepalive: ``loop_misc()`` for every client at least once a second, and four times per keepalive of the client
  with the shortest one (PINGREQ, and a dead broker detected): a broker allows 1.5 keepalives of silence, and a
  PINGREQ is due one keepalive after the last packet, so it may be late by at most half a keepalive;
* reconnects with paho's backoff (``reconnect_delay_set``: min delay, doubled per failure up to the max, reset by a
  successful CONNACK), in this thread, a bounded number per pass so that the clients still connected keep moving
  bytes while a thousand others reconnect;
* TLS: bytes already decrypted inside the SSL object (``pending()``) are read without waiting for the socket.

Other threads may publish, subscribe, ack and disconnect as with ``loop_start()``: paho queues the packet and
calls ``on_socket_register_write``, which here only records the client and wakes the loop; the loop thread is the
only one that reads, writes or changes the selector's interest in writing. The loop never blocks on anything but
the selector and paho's own socket calls (a reconnect's TCP connect and TLS handshake are blocking in paho,
bounded by the client's ``connect_timeout``). Callbacks (``on_message`` etc.) run on this thread: they only hand
messages over, exactly as on paho's thread.

One client's failure is its own: an exception from a client's read, write or callbacks is logged and counted
(``errors``), that client's socket is closed and it reconnects with backoff; the other clients go on.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import resource
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

from fedmqtt.mqtt.errors import MqttError, TooManyClients

logger = logging.getLogger("fedmqtt.mqtt.netloop")

#: How often every client's ``loop_misc()`` (keepalive) runs at most, in seconds (paho's own loop: once a second),
#: and the share of the shortest keepalive it runs at least (a PINGREQ may be this late; brokers allow half one).
MISC_INTERVAL = 1.0
MISC_PER_KEEPALIVE = 0.25

#: Reconnect attempts one pass of the loop makes at most before it serves the sockets again.
RECONNECTS_PER_PASS = 32

#: The GIL switch interval of a process that runs a loop (Python's default: 5 ms). Every recv()/send() releases the
#: GIL; while another thread computes (training, parsing) the loop thread then waits up to the interval to get it
#: back, several times per message (the convoy effect). Measured here: 250 clients receiving 5,000 messages beside a
#: CPU-bound thread took 8.0 s at 5 ms and 5.3 s at 0.5 ms (3.0 s with no such thread). Only ever lowered.
SWITCH_INTERVAL = 0.0005

#: Descriptors kept free for everything else a process opens (files, pipes, torch's threads).
SPARE_FDS = 64


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit; return the (new) soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):  # a hard limit the kernel refuses (nr_open): keep soft
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def clients_fd_limit(soft_limit: int) -> int:
    """How many clients a loop admits under ``soft_limit`` open files: one descriptor each, minus spares."""
    return max(soft_limit - SPARE_FDS, 1)


def max_clients_per_process() -> int:
    """The most clients one process can drive on a :class:`NetworkLoop`: its open-file limit, raised to the hard
    limit, minus :data:`SPARE_FDS`. ``ulimit -n`` (or systemd's ``LimitNOFILE=``) raises it."""
    return clients_fd_limit(raise_fd_limit())


@dataclass(eq=False)
class _Entry:
    client: paho.Client
    wants_reconnect: Callable[[], bool]
    on_open: Any = None  # the client's own on_socket_open, called first (socket options, say)
    reconnect_at: float | None = None  # monotonic time of the next reconnect attempt (socket closed)
    writing: bool = False  # the selector watches the socket for writability
    sock: Any = None  # the socket registered with the selector


class NetworkLoop:
    """Drives the sockets of many paho clients from one thread. Thread-safe: :meth:`attach`, :meth:`detach` and
    paho operations may come from any thread.

    ``max_clients`` (default: the open-file limit, raised to the hard limit, minus :data:`SPARE_FDS`) bounds the
    clients attached at once; one more raises :class:`TooManyClients` with the limit and how to raise it."""

    def __init__(self, name: str = "fedmqtt-netloop", max_clients: int | None = None) -> None:
        self.name = name
        self.max_clients = max_clients if max_clients is not None else max_clients_per_process()
        self._selector = selectors.DefaultSelector()
        self._lock = threading.RLock()  # the selector's registrations and the table of clients
        self._entries: dict[paho.Client, _Entry] = {}
        self._dirty: collections.deque[paho.Client] = collections.deque()  # clients with new packets to send
        self._pending_tls: set[paho.Client] = set()  # decrypted bytes waiting inside the SSL object
        self._reconnecting: set[_Entry] = set()  # entries with a reconnect_at (a pass looks at these only)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0  # exceptions raised by one client's I/O or callbacks (that client was disconnected)
        self.reconnect_attempts = 0
        self.passes = 0

    # -- life cycle --

    def start(self) -> NetworkLoop:
        with self._lock:
            if self._stop.is_set():
                raise MqttError("this network loop was stopped; create a new NetworkLoop")
            if self._thread is None:
                if sys.getswitchinterval() > SWITCH_INTERVAL:
                    sys.setswitchinterval(SWITCH_INTERVAL)
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (clients still attached are left as they are: close them first). Safe to call twice."""
        self._stop.set()
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._lock:
            with contextlib.suppress(Exception):
                self._selector.close()
            for sock in (self._wake_r, self._wake_w):
                sock.close()

    def __enter__(self) -> NetworkLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- clients --

    def attach(self, client: paho.Client, wants_reconnect: Callable[[], bool]) -> None:
        """Drive ``client`` from now on (call before its ``connect()``). ``wants_reconnect()`` (asked on this
        loop's thread) says whether a lost connection should be re-established; paho's backoff applies."""
        if self._stop.is_set():
            raise MqttError("this network loop was stopped; create a new NetworkLoop")
        with self._lock:
            if client in self._entries:
                raise MqttError("this client is already attached to the network loop")
            if len(self._entries) >= self.max_clients:
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                raise TooManyClients(
                    f"this process already drives {len(self._entries)} MQTT clients on one network loop, the most "
                    f"its open-file limit allows (soft {soft}, hard {hard}: one file descriptor per client plus "
                    f"{SPARE_FDS} spare); raise it (`ulimit -n`, systemd LimitNOFILE=, docker --ulimit nofile=) or "
                    "run the devices in several processes"
                )
            self._entries[client] = _Entry(client, wants_reconnect, on_open=client.on_socket_open)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self.start()

    def detach(self, client: paho.Client) -> None:
        """Stop driving ``client`` (its socket is unregistered, not closed). Safe to call twice."""
        with self._lock:
            entry = self._entries.pop(client, None)
            self._pending_tls.discard(client)
            if entry is not None:
                self._reconnecting.discard(entry)
                if entry.sock is not None:
                    self._unregister(entry)

    # -- paho's socket callbacks (any thread) --

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with self._lock:
            entry = self._entries.get(client)
        if entry is None or self._stop.is_set():
            return
        if entry.on_open is not None:
            entry.on_open(client, userdata, sock)
        with self._lock:
            if entry.sock is not None:
                self._unregister(entry)
            entry.sock = sock
            entry.writing = False
            entry.reconnect_at = None
            self._reconnecting.discard(entry)
            self._selector.register(sock, selectors.EVENT_READ, client)
        self._mark(client)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Called just before paho closes ``sock``: unregister now, while its descriptor is still this socket's.
        with self._lock:
            self._pending_tls.discard(client)
            entry = self._entries.get(client)
            if entry is not None and entry.sock is sock:
                self._unregister(entry)
        self._mark(client)  # the loop schedules the reconnect

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._mark(client)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._mark(client)

    def _mark(self, client: paho.Client) -> None:
        self._dirty.append(client)
        if threading.current_thread() is not self._thread:
            self._wake()

    def _wake(self) -> None:
        if self._woken:
            return
        self._woken = True
        with contextlib.suppress(OSError):  # BlockingIOError: a wake-up is pending already; closed: stopping
            self._wake_w.send(b"\0")

    def _unregister(self, entry: _Entry) -> None:
        sock, entry.sock, entry.writing = entry.sock, None, False
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(sock)

    # -- the loop (its own thread) --

    def _run(self) -> None:
        next_misc = time.monotonic() + MISC_INTERVAL
        while not self._stop.is_set():
            now = time.monotonic()
            timeout = min(max(next_misc - now, 0.0), MISC_INTERVAL)
            if self._dirty or self._pending_tls:
                timeout = 0.0
            else:
                due = self._next_reconnect()
                if due is not None:
                    timeout = min(timeout, max(due - now, 0.0))
            try:
                events = self._selector.select(timeout)
            except (OSError, ValueError):
                if self._stop.is_set():
                    return
                raise
            self.passes += 1
            for key, mask in events:
                if key.data is None:
                    self._drain_wake()
                    continue
                self._serve(key.data, key.fileobj, mask)
            for client in list(self._pending_tls):
                self._pending_tls.discard(client)
                sock = client.socket()
                if sock is not None:
                    self._serve(client, sock, selectors.EVENT_READ)
            self._flush_dirty()
            now = time.monotonic()
            if now >= next_misc:
                next_misc = now + self._misc_all()
            self._reconnect_due(now)

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        self._woken = False  # after reading: a wake-up sent meanwhile stays in the pipe, not lost

    def _serve(self, client: paho.Client, sock: Any, mask: int) -> None:
        if client.socket() is not sock:
            return  # an event for a socket closed since the selector reported it
        try:
            if mask & selectors.EVENT_READ:
                rc = client.loop_read()
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    pending = getattr(client.socket(), "pending", None)
                    if pending is not None and pending() > 0:
                        self._pending_tls.add(client)
            if mask & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()
        except Exception:  # one client's broken socket or failing callback must not stop the others
            self._fail(client, "serving its socket")
        self._sync(client)

    def _fail(self, client: paho.Client, doing: str) -> None:
        self.errors += 1
        logger.exception("MQTT client %r failed while %s; dropping its connection", _client_id(client), doing)
        sock = client.socket()
        with contextlib.suppress(Exception):
            client._sock_close()  # paho's own close: calls on_socket_close, then closes
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        with contextlib.suppress(Exception):
            client._do_on_disconnect(packet_from_broker=False, v1_rc=MQTTErrorCode.MQTT_ERR_CONN_LOST)

    def _flush_dirty(self) -> None:
        seen: set[paho.Client] = set()
        while self._dirty:
            client = self._dirty.popleft()
            if client in seen:
                continue
            seen.add(client)
            sock = client.socket()
            if sock is not None and client.want_write():
                try:
                    client.loop_write()  # most writes complete at once: no round trip through the selector
                except Exception:
                    self._fail(client, "writing")
            self._sync(client)

    def _sync(self, client: paho.Client) -> None:
        """Watch the socket for writability exactly while paho has bytes queued; schedule a reconnect for a
        client that lost its socket."""
        with self._lock:
            entry = self._entries.get(client)
            if entry is None:
                return
            sock = client.socket()
            if sock is None:
                if entry.sock is not None:
                    self._unregister(entry)
                if entry.reconnect_at is None and entry.wants_reconnect():
                    entry.reconnect_at = time.monotonic() + _next_delay(client)
                    self._reconnecting.add(entry)
                return
            if entry.sock is not sock:  # opened without our callback (should not happen): adopt it
                if entry.sock is not None:
                    self._unregister(entry)
                entry.sock = sock
                self._selector.register(sock, selectors.EVENT_READ, client)
            want = client.want_write()
            if want != entry.writing:
                entry.writing = want
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
                self._selector.modify(sock, events, client)

    def _misc_all(self) -> float:
        """``loop_misc()`` for every client; returns the seconds until the next time (see MISC_PER_KEEPALIVE)."""
        with self._lock:
            clients = list(self._entries)
        interval = MISC_INTERVAL
        for client in clients:
            if client.keepalive > 0:
                interval = min(interval, client.keepalive * MISC_PER_KEEPALIVE)
            if client.socket() is not None:
                try:
                    client.loop_misc()
                except Exception:
                    self._fail(client, "checking its keepalive")
            self._sync(client)  # also catches a write that a race left unwatched
        return interval

    def _next_reconnect(self) -> float | None:
        with self._lock:
            times = [e.reconnect_at for e in self._reconnecting if e.reconnect_at is not None]
        return min(times) if times else None

    def _reconnect_due(self, now: float) -> None:
        with self._lock:
            if not self._reconnecting:
                return
            due = [e for e in self._reconnecting if e.reconnect_at is not None and e.reconnect_at <= now]
        due.sort(key=lambda e: e.reconnect_at or 0.0)
        for entry in due[:RECONNECTS_PER_PASS]:
            client = entry.client
            with self._lock:
                entry.reconnect_at = None
                self._reconnecting.discard(entry)
                if self._entries.get(client) is not entry:
                    continue
            if not entry.wants_reconnect() or client.socket() is not None:
                continue
            self.reconnect_attempts += 1
            try:
                client.reconnect()
            except OSError as exc:  # refused, unreachable, TLS handshake: try again after the next delay
                logger.debug("reconnect of %r failed: %s", _client_id(client), exc)
                with contextlib.suppress(Exception):
                    client._sock_close()
            except Exception:
                self._fail(client, "reconnecting")
            self._sync(client)


def _next_delay(client: paho.Client) -> float:
    """paho's reconnect backoff (what ``loop_forever`` waits): the min delay, doubled after each wait up to the
    max, reset by a successful CONNACK or ``reconnect_delay_set()``. Up to 10 % is added so that a fleet that lost
    its broker at once does not come back in one burst."""
    with client._reconnect_delay_mutex:
        delay = client._reconnect_delay
        lo, hi = client._reconnect_min_delay, client._reconnect_max_delay
        delay = lo if delay is None else min(delay * 2, hi)
        client._reconnect_delay = delay
    return float(delay) * (1.0 + 0.1 * random.random())  # jitter, not a secret


def _client_id(client: paho.Client) -> str:
    raw = getattr(client, "_client_id", b"")
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
