"""Edge sites: the bytes that cross the WAN per round, with and without a site aggregator.

Two real Mosquitto brokers on this machine stand for a site's gateway and the cloud: the site broker bridges the
job's topics to the cloud broker (:mod:`fedmqtt.broker.bridge`, the configuration ``fedmqtt broker --bridge-to``
writes). A real ``fedmqtt coordinator`` runs on the cloud broker and N virtual devices (one ``fedmqtt device``
process) on the site broker; with a site aggregator, ``fedmqtt aggregator --site`` runs on the site broker and
the coordinator runs with ``--aggregators 1``.

What crosses the WAN is measured where it arrives: a subscriber on the cloud broker to every topic the bridge
carries up sums topic + payload bytes by kind (updates, partial aggregates, aggregator progress and presence,
device presence), and a subscriber on the site broker does the same for what the bridge carries down (plan,
models, status, events...). MQTT, TCP and TLS framing are not counted (a few dozen bytes a message).

    .venv/bin/python benchmarks/edge.py [--devices 10] [--rounds 3] [--json benchmarks/results/edge.json]
    .venv/bin/python benchmarks/edge.py --quick                  # 4 devices, 2 rounds
    .venv/bin/python benchmarks/edge.py --modes updates          # without a site aggregator only

Latest figures: benchmarks/results/edge.json (10 devices, float32), edge-int8.json, edge-int8-30.json; summed up in
docs/edge-sites.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import _runner as R
from fedmqtt.broker.bridge import BridgeConfig
from fedmqtt.broker.mosquitto import MosquittoBroker
from fedmqtt.mqtt import ClientSettings, MqttConnection
from fedmqtt.schema import RoundSummary, from_json
from fedmqtt.topics import BRIDGE_DOWN, BRIDGE_UP, Topics, bridge_topics

MODES = ("updates", "site-aggregator")
PREFIX = "edge"
SITE = "site1"


class Meter:
    """Messages and bytes (topic + payload) received on some topic filters, by kind."""

    def __init__(self, topics: Topics, *, reads_summaries: bool = False) -> None:
        self.topics = topics
        self.reads_summaries = reads_summaries  # the cloud's round summaries: read, not counted (not WAN traffic)
        self.bytes: Counter[str] = Counter()
        self.messages: Counter[str] = Counter()
        self.summaries: dict[int, RoundSummary] = {}
        self._lock = threading.Lock()

    def kind(self, topic: str) -> str:
        t = self.topics
        if t.device_of_update(topic) is not None:
            return "updates"
        if t.aggregator_of_partial(topic) is not None:
            return "partials"
        if t.aggregator_of_progress(topic) is not None:
            return "aggregator progress"
        if t.aggregator_of_status(topic) is not None:
            return "aggregator presence"
        if t.device_of_status(topic) is not None:
            return "device presence"
        if topic in (t.model, t.delta):
            return "model"
        if topic == t.release:
            return "release"
        return "plan, status, events"

    def on_message(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        round_number = self.topics.round_of_summary(topic)
        if round_number is not None and self.reads_summaries:
            summary = from_json(RoundSummary, payload)
            with self._lock:
                self.summaries[round_number] = summary
            return
        kind = self.kind(topic)
        with self._lock:
            self.bytes[kind] += len(topic.encode()) + len(payload)
            self.messages[kind] += 1


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedmqtt.cli", *args]


def run(mode: str, *, devices: int, rounds: int, uplink: str, data: Path, work: Path, timeout: float) -> dict[str, Any]:
    """One job across a bridged site and cloud broker; the WAN bytes of each direction."""
    site_aggregator = mode == "site-aggregator"
    job = f"edge-{mode}"
    topics = Topics(job=job, prefix=PREFIX)
    logs = work / mode
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, argv: list[str]) -> None:
        with open(logs / f"{name}.log", "ab") as log:
            processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)

    up, down = Meter(topics, reads_summaries=True), Meter(topics)
    pairs = bridge_topics(PREFIX, job, site_aggregator=site_aggregator)
    with MosquittoBroker(work / mode / "cloud", prefix=PREFIX) as cloud:
        bridge = BridgeConfig.create(cloud.url, site=SITE, job=job, prefix=PREFIX, site_aggregator=site_aggregator)
        with MosquittoBroker(work / mode / "site", prefix=PREFIX, bridge=bridge) as site:
            up_client = MqttConnection(
                ClientSettings.from_url(cloud.url, client_id="edge-up-meter", clean_start=True),
                on_message=up.on_message,
                subscriptions=[(p, 1) for d, p in pairs if d == BRIDGE_UP] + [(topics.rounds_filter, 1)],
            )
            down_client = MqttConnection(
                ClientSettings.from_url(site.url, client_id="edge-down-meter", clean_start=True),
                on_message=down.on_message,
                subscriptions=[(p, 1) for d, p in pairs if d == BRIDGE_DOWN],
            )
            up_client.connect(10)
            down_client.connect(10)
            try:
                common = ["--job", job, "--prefix", PREFIX, "--mqtt-version", "5"]
                coordinator = ["coordinator", "--broker", cloud.url, *common, "--model", "mlp", "--rounds",
                               str(rounds), "--min-updates", str(devices), "--round-timeout", "120",
                               "--local-epochs", "1", "--batch-size", "20", "--lr", "0.1", "--uplink", uplink,
                               "--eval-data", str(data), "--quiet"]  # fmt: skip
                if site_aggregator:
                    coordinator += ["--aggregators", "1"]
                    start("aggregator", _argv("aggregator", "--broker", site.url, *common, "--site", SITE,
                                              "--id", f"agg-{SITE}", "--spool", str(logs / "spool")))  # fmt: skip
                started = time.monotonic()
                start("coordinator", _argv(*coordinator))
                start("devices", _argv("device", "--broker", site.url, *common, "--data-dir", str(data),
                                       "--threads", "1", "--exit-on-finish", "--id-prefix", "d", "--partition", "iid",
                                       "--num-parts", str(devices), "--parts", f"0:{devices}"))  # fmt: skip
                code = processes["coordinator"].wait(timeout)
                seconds = time.monotonic() - started
                if code != 0:
                    raise SystemExit(f"the coordinator ({mode}) exited with {code}: see {logs / 'coordinator.log'}")
                for name in ("devices", "aggregator"):
                    if name in processes:
                        processes[name].wait(60)
                time.sleep(1.0)  # the last presence messages cross the bridge
            finally:
                for process in processes.values():
                    if process.poll() is None:
                        process.kill()
                        process.wait()
                up_client.close()
                down_client.close()
    done = sorted(up.summaries)
    data_kinds = ("updates", "partials", "aggregator progress")
    summaries = [up.summaries[r] for r in done]
    return {
        "mode": mode,
        "devices": devices,
        "rounds": len(done),
        "uplink": uplink,
        "seconds": round(seconds, 1),
        "participants_per_round": [len(s.participants) for s in summaries],
        "final_accuracy": summaries[-1].accuracy if summaries else None,
        "up_bytes": dict(up.bytes),
        "up_messages": dict(up.messages),
        "down_bytes": dict(down.bytes),
        "down_messages": dict(down.messages),
        "up_bytes_per_round": round(sum(up.bytes.values()) / max(len(done), 1)),
        "up_data_bytes_per_round": round(sum(up.bytes[k] for k in data_kinds) / max(len(done), 1)),
        "up_messages_per_round": round(sum(up.messages.values()) / max(len(done), 1), 1),
        "down_bytes_per_round": round(sum(down.bytes.values()) / max(len(done), 1)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10, help="virtual devices on the site (default 10)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uplink", default="float32", help="the devices' uplink codec (default float32)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--quick", action="store_true", help="4 devices, 2 rounds")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up on one job after this (seconds)")
    parser.add_argument("--json", type=Path, help="write the results here (e.g. benchmarks/results/edge.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.rounds = 4, 2
    from fedmqtt.data import write_idx_dataset

    with tempfile.TemporaryDirectory(prefix="fedmqtt-edge-") as tmp:
        work = Path(tmp)
        data = write_idx_dataset(work / "data", num_train=100 * args.devices, num_test=200, seed=3)
        rows = [run(mode, devices=args.devices, rounds=args.rounds, uplink=args.uplink, data=data, work=work,
                    timeout=args.timeout) for mode in args.modes]  # fmt: skip
    header = ["mode", "devices", "rounds", "WAN up B/round", "of which data", "up msgs/round", "WAN down B/round",
              "s"]  # fmt: skip
    print(R.table(header, [[r["mode"], str(r["devices"]), str(r["rounds"]), f"{r['up_bytes_per_round']:,}",
                            f"{r['up_data_bytes_per_round']:,}", str(r["up_messages_per_round"]),
                            f"{r['down_bytes_per_round']:,}", str(r["seconds"])] for r in rows]))  # fmt: skip
    if len(rows) == 2 and rows[1]["up_data_bytes_per_round"]:
        print(f"uplink data across the WAN: {rows[0]['up_data_bytes_per_round'] / rows[1]['up_data_bytes_per_round']:.1f}x "
              "less with the site aggregator")  # fmt: skip
    if args.json:
        R.write_json(args.json, {"machine": R.machine(), "config": {k: v for k, v in vars(args).items() if k != "json"},
                                 "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
