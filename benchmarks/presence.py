"""Presence at fleet scale: how long after the last of N devices connects does the coordinator open round 1?

A real Mosquitto, a real ``fedmqtt coordinator`` subprocess (``--min-devices N --devices-per-round 100``, model
mlp), and a fleet of N lightweight MQTT clients on ONE selector loop in this process (paho's external-loop API):
each connects with its last will (``offline``), publishes its retained ``online`` status and, like a device agent,
subscribes to the job's plan and status. A watcher counts what the coordinator publishes on the status and events
topics until the plan of round 1 arrives.

    .venv/bin/python benchmarks/presence.py [--devices 1000] [--profile coordinator.prof] [--json out.json]
    .venv/bin/python benchmarks/presence.py --quick          # 200 devices

Reported: connect time of the fleet (until an outside client has seen every device's online status), seconds from
the last of those to the first plan (negative: the plan reached that client first), devices online in that plan's
status, and how many status and event messages the coordinator published meanwhile (the cost that used to grow
with N, fanned out by the broker to every device that subscribes to the status). Latest figures:
benchmarks/results/presence.json.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from fedmqtt.broker.mosquitto import MosquittoBroker
from fedmqtt.mqtt import ClientSettings, MqttConnection
from fedmqtt.schema import DeviceStatus, Event, Plan, Status, from_json, to_json
from fedmqtt.topics import Topics

REPO = Path(__file__).resolve().parents[1]


class Fleet:
    """N MQTT clients driven by one thread and one selector: a fleet of devices that only announce presence."""

    def __init__(self, host: str, port: int, topics: Topics, devices: list[str], *, subscribe: bool = True) -> None:
        self.host, self.port, self.topics, self.devices = host, port, topics, devices
        self.subscribe = subscribe
        self.selector = selectors.DefaultSelector()
        self.clients: list[paho.Client] = []
        self.acked: dict[str, float] = {}  # device -> when the broker acknowledged its online status
        self.received = 0  # messages delivered to the fleet (the coordinator's status fan-out)
        self.plan_at: float | None = None  # when the first device got a plan
        self._pending: dict[tuple[int, int], str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="fleet")

    def _client(self, index: int, device: str) -> paho.Client:
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"fleet-{uuid.uuid4().hex[:8]}-{device}",
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=True,
        )
        offline = DeviceStatus(device=device, state="offline", ts=time.time())
        c.will_set(self.topics.device_status(device), to_json(offline), qos=1, retain=True)
        sel = self.selector
        c.on_socket_open = lambda cl, ud, sock: sel.register(sock, selectors.EVENT_READ, cl)
        c.on_socket_close = lambda cl, ud, sock: sel.unregister(sock)
        c.on_socket_register_write = lambda cl, ud, sock: sel.modify(
            sock, selectors.EVENT_READ | selectors.EVENT_WRITE, cl
        )
        c.on_socket_unregister_write = lambda cl, ud, sock: sel.modify(sock, selectors.EVENT_READ, cl)

        def on_connect(cl: paho.Client, ud: Any, flags: Any, rc: Any, props: Any) -> None:
            if self.subscribe:
                cl.subscribe([(self.topics.plan, 1), (self.topics.status, 1)])
            online = DeviceStatus(device=device, state="online", ts=time.time())
            info = cl.publish(self.topics.device_status(device), to_json(online), qos=1, retain=True)
            self._pending[(index, info.mid)] = device

        def on_publish(cl: paho.Client, ud: Any, mid: int, rc: Any, props: Any) -> None:
            found = self._pending.pop((index, mid), None)
            if found is not None:
                self.acked[found] = time.monotonic()

        def on_message(cl: paho.Client, ud: Any, msg: paho.MQTTMessage) -> None:
            self.received += 1
            if self.plan_at is None and msg.topic == self.topics.plan and msg.payload:
                self.plan_at = time.monotonic()

        c.on_connect, c.on_publish, c.on_message = on_connect, on_publish, on_message
        return c

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        last_misc = 0.0
        for i, device in enumerate(self.devices):
            c = self._client(i, device)
            self.clients.append(c)
            c.connect(self.host, self.port, keepalive=60)  # sends CONNECT; the loop below reads the CONNACK
            if i % 50 == 0:
                self._pump(0.0)
        while not self._stop.is_set():
            self._pump(0.05)
            now = time.monotonic()
            if now - last_misc > 1.0:
                last_misc = now
                for c in self.clients:
                    c.loop_misc()

    def _pump(self, timeout: float) -> None:
        for key, mask in self.selector.select(timeout):
            c = key.data
            if mask & selectors.EVENT_READ:
                c.loop_read()
            if mask & selectors.EVENT_WRITE:
                c.loop_write()

    def wait_connected(self, timeout: float) -> bool:
        """Every device's online status acknowledged by the broker (False after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while len(self.acked) < len(self.devices) and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(self.acked) == len(self.devices)

    def drop(self, indices: list[int]) -> None:
        """Cut these devices' connections without a DISCONNECT: the broker publishes their last wills."""
        for i in indices:
            sock = self.clients[i].socket()
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for c in self.clients:
            c.disconnect()  # a normal DISCONNECT: no will
            c.loop_write()


@dataclass
class Watch:
    topics: Topics
    statuses: list[tuple[float, Status]] = field(default_factory=list)
    events: list[tuple[float, Event]] = field(default_factory=list)
    plan_at: float | None = None
    plan: Plan | None = None
    online: dict[str, float] = field(default_factory=dict)  # device -> when its online status reached the watcher

    def on_message(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        now = time.monotonic()
        if not payload or retain:
            return
        device = self.topics.device_of_status(topic)
        if device is not None:
            if b'"online"' in payload:
                self.online.setdefault(device, now)
        elif topic == self.topics.status:
            self.statuses.append((now, from_json(Status, payload)))
        elif topic == self.topics.events:
            self.events.append((now, from_json(Event, payload)))
        elif topic == self.topics.plan and self.plan is None:
            self.plan, self.plan_at = from_json(Plan, payload), now


def run(devices: int, *, subscribe: bool, profile: Path | None, timeout: float) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        MosquittoBroker(Path(tmp) / "broker", max_queued_messages=1_000_000, max_queued_bytes=1 << 30) as b,
    ):
        topics = Topics(job=f"scale-{uuid.uuid4().hex[:6]}", prefix="bench")
        watch = Watch(topics)
        settings = ClientSettings.from_url(b.url, client_id=f"watch-{uuid.uuid4().hex[:8]}", clean_start=True)
        subs = [(topics.status, 1), (topics.events, 1), (topics.plan, 1), (topics.device_status_filter, 1)]
        view = MqttConnection(settings, on_message=watch.on_message, subscriptions=subs)
        view.connect(timeout=10)
        head = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else [])
        argv = [*head, "-m", "fedmqtt.cli", "coordinator", "--broker", b.url, "--job", topics.job, "--prefix",
                topics.prefix, "--model", "mlp", "--quiet", "--rounds", "1", "--min-devices", str(devices),
                "--devices-per-round", str(min(100, devices)), "--min-updates", str(min(10, devices)),
                "--round-timeout", "600"]  # fmt: skip
        log = Path(tmp) / "coordinator.log"
        with open(log, "wb") as out:
            coordinator = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            deadline = time.monotonic() + 60
            while not watch.statuses and time.monotonic() < deadline:  # the coordinator is up
                time.sleep(0.05)
            fleet = Fleet(b.host, b.port, topics, [f"d{i:05d}" for i in range(devices)], subscribe=subscribe)
            started = time.monotonic()
            fleet.start()
            deadline = started + timeout
            while (
                watch.plan_at is None
                and fleet.plan_at is None
                and time.monotonic() < deadline
                and coordinator.poll() is None
            ):
                time.sleep(0.05)
            settle = time.monotonic() + 10  # the broker's last acknowledgements may come after the plan
            while len(fleet.acked) < devices and time.monotonic() < settle:
                time.sleep(0.05)
            time.sleep(0.5)  # let the watcher catch up
            while len(watch.online) < devices and time.monotonic() < settle:
                time.sleep(0.05)
            # The last connect: when the last device's online status reached an outside client (as scale.py).
            last = max(watch.online.values()) if len(watch.online) == devices else None
            acked = max(fleet.acked.values()) if fleet.acked else None
            plan_at = (
                min(t for t in (watch.plan_at, fleet.plan_at) if t is not None) if watch.plan or fleet.plan_at else None
            )
            online_seen = max((s.devices_online for _, s in watch.statuses), default=0)
            row = {
                "devices": devices,
                "fleet_subscribes_status": subscribe,
                "statuses_acked": len(fleet.acked),
                "connect_seconds": round(last - started, 2) if last else None,
                "fleet_acks_seconds": round(acked - started, 2) if acked else None,
                "last_connect_to_plan_seconds": round(plan_at - last, 2) if plan_at and last else None,
                "fleet_start_to_plan_seconds": round(plan_at - started, 2) if plan_at else None,
                "plan_selected": len(watch.plan.selected) if watch.plan else 0,
                "max_devices_online_in_status": online_seen,
                "status_publishes_until_plan": sum(1 for t, _ in watch.statuses if t <= (watch.plan_at or 1e18)),
                "event_publishes_until_plan": sum(1 for t, _ in watch.events if t <= (watch.plan_at or 1e18)),
                "presence_events": sum(1 for _, e in watch.events if "device" in e.type.value),
                "fleet_messages_received": fleet.received,
            }
            if plan_at is None:
                row["gave_up_after_seconds"] = round(time.monotonic() - started, 1)
                row["coordinator_exit"] = coordinator.poll()
                print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            dropped = [line for line in b.log_text().splitlines() if "drop" in line.lower()]
            row["broker_drop_warnings"] = len(dropped)
            coordinator.terminate()  # SIGTERM: a pause (cProfile still writes its stats)
            coordinator.wait(timeout=60)
            fleet.close()
            return row
        finally:
            if coordinator.poll() is None:
                coordinator.kill()
                coordinator.wait()
            view.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1000])
    parser.add_argument("--quick", action="store_true", help="200 devices")
    parser.add_argument("--no-subscribe", action="store_true", help="the fleet does not subscribe to plan/status")
    parser.add_argument("--profile", type=Path, help="run the coordinator under cProfile, stats to this file")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up waiting for the plan after this")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    sizes = [200] if args.quick else args.devices
    rows = [run(n, subscribe=not args.no_subscribe, profile=args.profile, timeout=args.timeout) for n in sizes]
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row.get(k)) for k in keys))
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1,
                                        default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
