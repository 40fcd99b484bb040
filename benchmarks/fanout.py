"""Job-status fan-out: what following the coordinator's presence instead of the job status saves a fleet.

A real Mosquitto, a real ``fedmqtt coordinator`` subprocess (model mlp, waiting for more devices than will ever
come, so it republishes its retained status once a second for the whole run), and in THIS process N device
clients on one ``fedmqtt.mqtt.NetworkLoop`` (as a ``simulate`` worker or ``fedmqtt device --parts`` drives its
virtual devices), each an ``MqttConnection`` with the device's client settings and last will, connected
``CONNECT_CONCURRENCY`` at a time. Two variants in the same run, one after the other on the same broker and
coordinator, differing only in one subscription:

* ``status`` (before): plan, job status and the device's own status topic, as devices subscribed until #13 (H7);
* ``presence`` (now): plan, coordinator presence and the device's own status topic (device/agent.py).

Then the device code as shipped: ``DeviceRuntime.connect_all`` with N virtual devices (``runtime``).

Reported per variant: seconds until every client connected (CONNACK and SUBACK), messages delivered to the fleet
meanwhile, and messages a second delivered to the fleet over ``--steady`` seconds after.

    .venv/bin/python benchmarks/fanout.py                      # 2,500 devices
    .venv/bin/python benchmarks/fanout.py --devices 500 --json /tmp/fanout.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from fedmqtt.broker.mosquitto import MosquittoBroker  # noqa: E402
from fedmqtt.device.agent import CONNECT_CONCURRENCY, DeviceOptions, DeviceRuntime  # noqa: E402
from fedmqtt.mqtt import BrokerSettings, MqttConnection, NetworkLoop, Will, raise_fd_limit  # noqa: E402
from fedmqtt.schema import DeviceStatus, to_json  # noqa: E402
from fedmqtt.topics import Topics  # noqa: E402

PREFIX = "fanout"


def broker_settings(url: str) -> BrokerSettings:
    return BrokerSettings.model_validate({"broker": url, "mqtt_version": "5"})  # as simulate's devices


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self._lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        with self._lock:
            self.n += 1


def run_variant(
    variant: str, devices: int, broker: BrokerSettings, topics: Topics, steady: float, limit: float
) -> dict[str, Any]:
    loop = NetworkLoop(name=f"fanout-{variant}")
    counter = Counter()
    job_topic = topics.status if variant == "status" else topics.coordinator
    connections: list[MqttConnection] = []
    run = uuid.uuid4().hex[:6]
    started = time.monotonic()

    def connect(i: int) -> None:
        remaining = started + limit - time.monotonic()
        if remaining <= 0:
            return
        device = f"{variant}-{run}-{i:05d}"
        offline = DeviceStatus(device=device, state="offline")
        settings = broker.client_settings(
            f"fedmqtt-{topics.job}-{device}",
            clean_start=True,
            will=Will(topics.device_status(device), to_json(offline), qos=1, retain=True),
        )
        conn = MqttConnection(
            settings,
            on_message=counter,
            subscriptions=[(topics.plan, 1), (job_topic, 1), (topics.device_status(device), 1)],
            network_loop=loop,
        )
        connections.append(conn)
        conn.connect(timeout=remaining)

    with ThreadPoolExecutor(CONNECT_CONCURRENCY) as pool:
        for future in [pool.submit(connect, i) for i in range(devices)]:
            future.exception()  # a connect that timed out at the limit: counted below
    connect_s = time.monotonic() - started
    connected = sum(1 for conn in connections if conn.is_connected)
    during = counter.n
    time.sleep(steady)
    per_second = (counter.n - during) / steady
    for conn in connections:
        conn.close()
    loop.stop()
    return {"variant": variant, "devices": devices, "connected": connected, "connect_s": round(connect_s, 2),
            "messages_during_connect": during, "messages_per_s_after": round(per_second, 1)}  # fmt: skip


def run_runtime(devices: int, url: str, topics: Topics, steady: float) -> dict[str, Any]:
    options = DeviceOptions(broker=broker_settings(url), job=topics.job, prefix=PREFIX)
    runtime = DeviceRuntime(options, shared_loop=True)
    run = uuid.uuid4().hex[:6]
    for i in range(devices):
        runtime.add_device(f"rt-{run}-{i:05d}", [])  # no data: these devices only connect and listen
    started = time.monotonic()
    runtime.connect_all(timeout=600)
    connect_s = time.monotonic() - started
    during = runtime.inbox.qsize()
    time.sleep(steady)
    per_second = (runtime.inbox.qsize() - during) / steady
    runtime.close()
    return {"variant": "runtime", "devices": devices, "connected": devices, "connect_s": round(connect_s, 2),
            "messages_during_connect": during, "messages_per_s_after": round(per_second, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2500)
    parser.add_argument("--steady", type=float, default=10.0, help="seconds of counting after the fleet connected")
    parser.add_argument("--no-runtime", action="store_true", help="skip the DeviceRuntime row")
    parser.add_argument("--limit", type=float, default=240.0, help="give a variant's connect up after this long")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    raise_fd_limit()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        broker = MosquittoBroker(Path(tmp) / "mosquitto", prefix=PREFIX, max_queued_messages=100_000)
        broker.start()
        job = f"fanout-{uuid.uuid4().hex[:6]}"
        topics = Topics(job=job, prefix=PREFIX)
        argv_c = [sys.executable, "-m", "fedmqtt.cli", "coordinator", "--broker", broker.url, "--job", job,
                  "--prefix", PREFIX, "--model", "mlp", "--rounds", "1", "--min-updates", "1",
                  "--min-devices", str(10 * args.devices + 1), "--quiet"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        log = (Path(tmp) / "coordinator.log").open("wb")
        coordinator = subprocess.Popen(argv_c, stdout=log, stderr=subprocess.STDOUT, env=env)
        settings = broker_settings(broker.url)
        beats = Counter()  # the coordinator's status heartbeat, as a watcher sees it
        watcher = MqttConnection(settings.client_settings("fanout-watcher", clean_start=True), on_message=beats,
                                 subscriptions=[(topics.status, 1)])  # fmt: skip
        watcher.connect(timeout=30)
        try:
            deadline = time.monotonic() + 300
            while beats.n < 3 and coordinator.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)  # until the coordinator is up and beating
            assert beats.n >= 3, (Path(tmp) / "coordinator.log").read_text()
            load = os.getloadavg()[0]
            for variant in ("presence", "status"):
                row = run_variant(variant, args.devices, settings, topics, args.steady, args.limit)
                rows.append({**row, "load": round(load, 1)})
                print(rows[-1], flush=True)
                load = os.getloadavg()[0]
            if not args.no_runtime:
                rows.append({**run_runtime(args.devices, broker.url, topics, args.steady), "load": round(load, 1)})
                print(rows[-1], flush=True)
            time.sleep(1)
            if coordinator.poll() is not None:
                print((Path(tmp) / "coordinator.log").read_text())
        finally:
            watcher.close()
            coordinator.terminate()
            coordinator.wait(timeout=30)
            broker.stop()
    after, before = rows[0], rows[1]
    print(f"\n{'variant':<10} {'connected':>10} {'connect s':>10} {'msgs during':>12} {'msgs/s after':>13} {'load':>6}")
    for r in rows:
        done = f"{r['connected']}/{r['devices']}"
        print(f"{r['variant']:<10} {done:>10} {r['connect_s']:>10} {r['messages_during_connect']:>12} "
              f"{r['messages_per_s_after']:>13} {r['load']:>6.1f}")  # fmt: skip
    ratio = before["connect_s"] / after["connect_s"] if after["connect_s"] else None
    bound = "" if before["connected"] == before["devices"] else " at least (status did not finish connecting)"
    print(f"connect time status/presence: {ratio:.2f}x{bound}" if ratio else "")
    if args.json:
        config = {"devices": args.devices, "steady_s": args.steady, "connect_concurrency": CONNECT_CONCURRENCY,
                  "broker": "mosquitto", "cpu_count": os.cpu_count()}  # fmt: skip
        args.json.write_text(json.dumps({"config": config, "rows": rows, "connect_ratio": ratio}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
