"""Protocol-level scale: 10, 100, 1,000 and 10,000 devices of a small model through the real system on one machine.

Each scale is one ``fedmqtt simulate`` run (a coordinator process and device processes whose virtual devices share
one network thread per process, ``fedmqtt.mqtt.NetworkLoop``) on a fresh Mosquitto started here, watched from
outside by an MQTT observer (device statuses, plans, round summaries) and by sampling the processes (psutil, else
/proc). Measured per scale:

* connect: from the device processes' start to the first and to the last device's retained ``online`` status (the
  span includes loading the data, torch's import and the per-device status publish);
* last connect -> first plan: how long the coordinator takes to see the fleet and open round 1;
* round latency: from each round's plan to its summary (median and max over the rounds);
* coordinator CPU seconds and RSS per round; Mosquitto's CPU and RSS;
* RSS per device process, and per virtual device: ``(RSS(N) - RSS(baseline)) / (devices per process - baseline
  devices per process)``, the baseline being the smallest scale of the same run;
* where it broke: the stage (connect, first plan, rounds) that did not finish within ``--stage-timeout``, and what
  was seen by then.

The job: mlp, ``--samples`` samples per device (synthetic MNIST-shaped IDX), 1 local epoch, batch 10, ``--rounds``
rounds with ``--fraction`` of the devices per round (quorum: all of them), int8 uplink (simulate's default).

    .venv/bin/python benchmarks/scale.py --quick          # 10, 100, 1,000 devices: a few minutes
    .venv/bin/python benchmarks/scale.py                  # also 10,000
    .venv/bin/python benchmarks/scale.py --scales 10 1000 --devices-per-process 1000 --json /tmp/scale.json

Scale-out aggregation (#14): the largest scale (1,000 devices with ``--quick``, 10,000 in the full run; or
``--scale-out-devices``) runs again with ``--aggregators`` 2 and 4 workers (``fedmqtt aggregator`` processes started by
simulate): round latency, coordinator CPU seconds per round and the workers' CPU seconds per round, beside the same
figures with no worker (the coordinator takes every update itself).

    .venv/bin/python benchmarks/scale.py --quick --scales 1000 --json benchmarks/results/scale-aggregators-quick.json

The machine's load average before and after each scale is recorded beside its figures: on a shared machine they
are only comparable within one run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import _runner as R  # noqa: E402
from fedmqtt.broker.mosquitto import MosquittoBroker  # noqa: E402
from fedmqtt.data import write_idx_dataset  # noqa: E402
from fedmqtt.mqtt import ClientSettings, MqttConnection, raise_fd_limit  # noqa: E402
from fedmqtt.schema import DeviceStatus, MessageError, Plan, from_json  # noqa: E402
from fedmqtt.topics import Topics  # noqa: E402

DEFAULT_JSON = REPO / "benchmarks" / "results" / "scale.json"
FULL_SCALES = (10, 100, 1000, 10000)
QUICK_SCALES = (10, 100, 1000)
PREFIX = "fedmqtt"

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is in the test extra; /proc does the same on Linux
    psutil = None


# --- process sampling ----------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[float, int] | None:
    """(CPU seconds user+system, RSS bytes) of ``pid`` from psutil or /proc; None once it is gone."""
    try:
        if psutil is not None:
            p = psutil.Process(pid)
            times = p.cpu_times()
            return times.user + times.system, p.memory_info().rss
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        return cpu, rss
    except (OSError, ValueError, IndexError):
        return None
    except Exception as exc:  # psutil.NoSuchProcess and friends
        if psutil is not None and isinstance(exc, psutil.Error):
            return None
        raise


def _children(pid: int) -> dict[int, str]:
    """Descendants of ``pid`` with their command lines."""
    found: dict[int, str] = {}
    if psutil is not None:
        try:
            for child in psutil.Process(pid).children(recursive=True):
                try:
                    found[child.pid] = " ".join(child.cmdline())
                except psutil.Error:
                    continue
        except psutil.Error:
            pass
        return found
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    wanted = {pid}
    changed = True
    while changed:
        changed = False
        for child, parent in parents.items():
            if parent in wanted and child not in wanted:
                wanted.add(child)
                changed = True
    for child in wanted - {pid}:
        try:
            found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
    return found


@dataclass
class Sampler:
    """Samples the simulate process tree every ``period`` seconds: peak RSS per device process, the coordinator's
    CPU time and RSS (latest), Mosquitto's."""

    root: int
    broker_pid: int | None
    period: float = 0.5
    coordinator: int | None = None
    devices: dict[int, int] = field(default_factory=dict)  # pid -> peak RSS
    coordinator_cpu: float = 0.0
    workers: dict[int, float] = field(default_factory=dict)  # aggregator worker pid -> CPU seconds (latest)
    coordinator_rss: int = 0
    coordinator_peak_rss: int = 0
    broker_cpu: float = 0.0
    broker_peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def sample(self) -> None:
        for pid, cmd in _children(self.root).items():
            if " coordinator " in f" {cmd} ":
                self.coordinator = pid
            elif " aggregator " in f" {cmd} ":
                stat = _proc_stat(pid)
                if stat is not None:
                    self.workers[pid] = stat[0]
            elif " device " in f" {cmd} ":
                stat = _proc_stat(pid)
                if stat is not None:
                    self.devices[pid] = max(self.devices.get(pid, 0), stat[1])
        if self.coordinator is not None:
            stat = _proc_stat(self.coordinator)
            if stat is not None:
                self.coordinator_cpu, self.coordinator_rss = stat
                self.coordinator_peak_rss = max(self.coordinator_peak_rss, stat[1])
        if self.broker_pid is not None:
            stat = _proc_stat(self.broker_pid)
            if stat is not None:
                self.broker_cpu = stat[0]
                self.broker_peak_rss = max(self.broker_peak_rss, stat[1])

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    @property
    def workers_cpu(self) -> float:
        return sum(self.workers.values())


# --- the observer ------------------------------------------------------------------------------------------------


class Observer:
    """What an outside MQTT client sees of one job: when each device first said ``online``, each plan, each round
    summary (monotonic times)."""

    def __init__(self, url: str, job: str) -> None:
        self.topics = Topics(job=job, prefix=PREFIX)
        self.online: dict[str, float] = {}
        self.plans: dict[tuple[int, int], float] = {}  # (round, attempt) -> first seen
        self.summaries: dict[int, float] = {}
        self.on_summary: Any = None
        self._lock = threading.Lock()
        self.connection = MqttConnection(
            ClientSettings.from_url(url, client_id=f"scale-observer-{job}", clean_start=True, max_inflight=1000),
            on_message=self._on_message,
            subscriptions=[
                (self.topics.device_status_filter, 1),
                (self.topics.plan, 1),
                (self.topics.rounds_filter, 1),
            ],
        )

    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        now = time.monotonic()
        if not payload:
            return
        if topic == self.topics.plan:
            try:
                plan = from_json(Plan, payload)
            except MessageError:
                return
            with self._lock:
                self.plans.setdefault((plan.round, plan.attempt), now)
            return
        summary_round = self.topics.round_of_summary(topic)
        if summary_round is not None:
            with self._lock:
                self.summaries.setdefault(summary_round, now)
            if self.on_summary is not None:
                self.on_summary(summary_round)
            return
        if self.topics.device_of_status(topic) is not None:
            try:
                status = from_json(DeviceStatus, payload)
            except MessageError:
                return
            if status.state != "offline":
                with self._lock:
                    self.online.setdefault(status.device, now)

    def counts(self) -> tuple[int, int, int]:
        with self._lock:
            return len(self.online), len(self.plans), len(self.summaries)


# --- one scale --------------------------------------------------------------------------------------------------


def _wait(condition: Any, timeout: float, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return bool(condition())
        time.sleep(0.1)
    return bool(condition())


def run_scale(devices: int, args: argparse.Namespace, workdir: Path, aggregators: int = 0) -> dict[str, Any]:
    per_round = max(1, round(devices * args.fraction))
    job = f"scale-{devices}-{aggregators}-{int(time.time())}"
    if aggregators:
        workdir = workdir / f"aggregators-{aggregators}"
        workdir.mkdir(parents=True, exist_ok=True)
    data = write_idx_dataset(workdir / f"data-{devices}", num_train=devices * args.samples, num_test=200, seed=1)
    load_before = os.getloadavg()[0]
    broker = MosquittoBroker(workdir / f"mosquitto-{devices}")
    broker.start()
    row: dict[str, Any] = {
        "devices": devices,
        "aggregators": aggregators,
        "devices_per_round": per_round,
        "load_before": round(load_before, 2),
    }
    observer = Observer(broker.url, job)
    observer.connection.connect()
    out = workdir / f"run-{devices}"
    argv = [
        sys.executable, "-m", "fedmqtt.cli", "simulate", "--devices", str(devices), "--broker", broker.url,
        "--mqtt-version", "5", "--job", job, "--prefix", PREFIX, "--rounds", str(args.rounds),
        "--devices-per-round", str(per_round), "--min-updates", str(per_round), "--model", "mlp",
        "--local-epochs", "1", "--batch-size", "10", "--lr", "0.05", "--data-dir", str(data), "--partition", "iid",
        "--round-timeout", str(args.round_timeout), "--out", str(out),
        "--timeout", str(3 * args.stage_timeout + args.rounds * args.round_timeout),
    ]  # fmt: skip
    if args.devices_per_process:
        argv += ["--devices-per-process", str(min(args.devices_per_process, devices))]
    if aggregators:
        argv += ["--aggregators", str(aggregators), "--partial-timeout", "60"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    started = time.monotonic()
    log = (workdir / f"simulate-{devices}.log").open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    sampler = Sampler(process.pid, broker.pid).start()
    cpu_at_summary: dict[int, tuple[float, int]] = {}
    workers_at_summary: dict[int, float] = {}

    def on_summary(round_number: int) -> None:
        sampler.sample()
        cpu_at_summary.setdefault(round_number, (sampler.coordinator_cpu, sampler.coordinator_rss))
        workers_at_summary.setdefault(round_number, sampler.workers_cpu)

    observer.on_summary = on_summary
    broke: str | None = None
    try:
        if not _wait(lambda: observer.counts()[0] >= devices, args.stage_timeout, process):
            broke = f"connect: {observer.counts()[0]} of {devices} devices online after {args.stage_timeout:.0f} s"
        elif not _wait(lambda: observer.counts()[1] >= 1, args.stage_timeout, process):
            broke = f"first plan: none {args.stage_timeout:.0f} s after the last device came online"
        elif not _wait(lambda: observer.counts()[2] >= args.rounds, args.rounds * args.round_timeout + 60, process):
            broke = f"rounds: {observer.counts()[2]} of {args.rounds} closed"
        if broke is None:
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                broke = "exit: simulate did not finish after the last round"
    finally:
        sampler.sample()
        coordinator_cpu_total = sampler.coordinator_cpu
        workers_cpu_total = sampler.workers_cpu
        if process.poll() is None:
            process.send_signal(2)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        sampler.stop()
        log.close()
        observer.connection.close()
        broker.stop()
    row.update(_figures(devices, started, observer, sampler, cpu_at_summary, coordinator_cpu_total, args))
    workers_cpu = [workers_at_summary[r] for r in sorted(workers_at_summary)]
    row["workers_cpu_s_total"] = _r(workers_cpu_total) if aggregators else None
    row["workers_cpu_s_per_round"] = (
        _r(statistics.median(b - a for a, b in itertools.pairwise(workers_cpu)))
        if aggregators and len(workers_cpu) > 1
        else None
    )
    row["processes"] = len(sampler.devices)
    row["load_after"] = round(os.getloadavg()[0], 2)
    row["broke"] = broke
    row["exit_code"] = process.returncode
    return row


def _figures(
    devices: int,
    started: float,
    observer: Observer,
    sampler: Sampler,
    cpu_at_summary: dict[int, tuple[float, int]],
    coordinator_cpu_total: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    online = sorted(observer.online.values())
    first_plan = min((t for (r, _), t in observer.plans.items() if r == 1), default=None)
    row: dict[str, Any] = {
        "online": len(online),
        "first_online_s": _r(online[0] - started) if online else None,
        "last_online_s": _r(online[-1] - started) if len(online) >= devices else None,
        "connect_span_s": _r(online[-1] - online[0]) if len(online) >= devices else None,
        "last_connect_to_first_plan_s": (
            _r(first_plan - online[-1]) if first_plan is not None and len(online) >= devices else None
        ),
    }
    latencies = []
    for round_number, closed in sorted(observer.summaries.items()):
        opened = min((t for (r, _), t in observer.plans.items() if r == round_number), default=None)
        if opened is not None:
            latencies.append(closed - opened)
    row["rounds_closed"] = len(observer.summaries)
    row["round_latency_median_s"] = _r(statistics.median(latencies)) if latencies else None
    row["round_latency_max_s"] = _r(max(latencies)) if latencies else None
    cpu = [cpu_at_summary[r][0] for r in sorted(cpu_at_summary)]
    row["coordinator_cpu_s_total"] = _r(coordinator_cpu_total)
    row["coordinator_cpu_s_per_round"] = (
        _r(statistics.median(b - a for a, b in itertools.pairwise(cpu))) if len(cpu) > 1 else None
    )
    row["coordinator_rss_mb"] = _mb(max((v[1] for v in cpu_at_summary.values()), default=sampler.coordinator_peak_rss))
    row["coordinator_peak_rss_mb"] = _mb(sampler.coordinator_peak_rss)
    row["broker_cpu_s"] = _r(sampler.broker_cpu)
    row["broker_peak_rss_mb"] = _mb(sampler.broker_peak_rss)
    rss = list(sampler.devices.values())
    row["device_process_rss_mb"] = _mb(max(rss)) if rss else None
    row["devices_per_process"] = -(-devices // max(len(rss), 1))
    return row


def _r(x: float) -> float:
    return round(float(x), 2)


def _mb(x: float) -> float:
    return round(x / 1e6, 1)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per virtual device RSS against the smallest scale, and the other figures as ratios to it."""
    base = rows[0]
    for row in rows:
        extra = row["devices_per_process"] - base["devices_per_process"]
        if row is base or extra <= 0 or row["device_process_rss_mb"] is None or base["device_process_rss_mb"] is None:
            row["rss_per_virtual_device_mb"] = None
        else:
            row["rss_per_virtual_device_mb"] = round(
                (row["device_process_rss_mb"] - base["device_process_rss_mb"]) / extra, 2
            )
        for key in ("coordinator_cpu_s_per_round", "round_latency_median_s", "coordinator_rss_mb"):
            a, b = row.get(key), base.get(key)
            row[f"{key}_vs_{base['devices']}"] = round(a / b, 2) if a and b else None


COLUMNS = [
    ("devices", "devices", "{}"),
    ("processes", "procs", "{}"),
    ("last_online_s", "all online s", "{}"),
    ("connect_span_s", "span s", "{}"),
    ("last_connect_to_first_plan_s", "->plan s", "{}"),
    ("round_latency_median_s", "round s", "{}"),
    ("coordinator_cpu_s_per_round", "coord CPU s/rnd", "{}"),
    ("coordinator_rss_mb", "coord RSS MB", "{}"),
    ("device_process_rss_mb", "dev proc RSS MB", "{}"),
    ("rss_per_virtual_device_mb", "MB/virt dev", "{}"),
    ("broker_peak_rss_mb", "broker MB", "{}"),
    ("load_before", "load", "{}"),
]


SCALE_OUT_COLUMNS = [
    ("aggregators", "workers", "{}"),
    ("devices", "devices", "{}"),
    ("devices_per_round", "per round", "{}"),
    ("round_latency_median_s", "round s", "{}"),
    ("round_latency_max_s", "round max s", "{}"),
    ("coordinator_cpu_s_per_round", "coord CPU s/rnd", "{}"),
    ("workers_cpu_s_per_round", "workers CPU s/rnd", "{}"),
    ("coordinator_rss_mb", "coord RSS MB", "{}"),
    ("broker_cpu_s", "broker CPU s", "{}"),
    ("load_before", "load", "{}"),
]


def _print_rows(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    cells = [[title for _, title, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for index, cells_row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(cells_row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * w for w in widths))
    for row in rows:
        if row["broke"]:
            workers = f" with {row['aggregators']} aggregator workers" if row.get("aggregators") else ""
            print(f"{row['devices']} devices{workers} broke at {row['broke']}")


def print_table(
    rows: list[dict[str, Any]], config: dict[str, Any], scale_out: list[dict[str, Any]] | None = None
) -> None:
    print(f"configuration: {json.dumps(config)}")
    _print_rows(rows, COLUMNS)
    if scale_out:
        print(f"scale-out aggregation at {scale_out[0]['devices']} devices (--aggregators N):")
        _print_rows(scale_out, SCALE_OUT_COLUMNS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"scales {QUICK_SCALES} only (a few minutes)")
    parser.add_argument("--scales", type=int, nargs="+", help=f"device counts (default {FULL_SCALES})")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.1, help="devices per round, as a fraction")
    parser.add_argument("--samples", type=int, default=10, help="training samples per device")
    parser.add_argument("--devices-per-process", type=int, help="default: simulate's (two processes per core)")
    parser.add_argument("--round-timeout", type=float, default=120.0)
    parser.add_argument("--stage-timeout", type=float, default=300.0, help="give up a stage after this long")
    parser.add_argument(
        "--aggregators", type=int, nargs="*", default=[0, 2, 4],
        help="aggregator worker counts the largest scale runs with (default: 0 2 4; none: skip the comparison)",
    )  # fmt: skip
    parser.add_argument(
        "--scale-out-devices", type=int, help="devices of the scale-out runs (default: the largest scale)"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    R.quick_json(args, parser)
    scales = args.scales or (QUICK_SCALES if args.quick else FULL_SCALES)
    soft = raise_fd_limit()  # simulate, its devices and the broker inherit it
    config = {
        "scales": list(scales), "rounds": args.rounds, "fraction_per_round": args.fraction, "model": "mlp",
        "samples_per_device": args.samples, "local_epochs": 1, "batch_size": 10, "uplink": "simulate's default",
        "devices_per_process": args.devices_per_process or "simulate's default", "broker": "mosquitto",
        "open_file_limit": soft, "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
        "scale_out_aggregators": args.aggregators,
    }  # fmt: skip
    rows = []
    scale_out: list[dict[str, Any]] = []
    out_devices = args.scale_out_devices or max(scales)
    with tempfile.TemporaryDirectory(prefix="fedmqtt-scale-") as tmp:
        for devices in scales:
            print(f"--- {devices} devices ...", flush=True)
            row = run_scale(devices, args, Path(tmp))
            print(json.dumps(row), flush=True)
            rows.append(row)
        for workers in args.aggregators:
            same = next((r for r in rows if r["devices"] == out_devices), None) if workers == 0 else None
            if same is None:
                print(f"--- {out_devices} devices, {workers} aggregator workers ...", flush=True)
                same = run_scale(out_devices, args, Path(tmp), aggregators=workers)
                print(json.dumps(same), flush=True)
            scale_out.append(same)
    add_ratios(rows)
    print_table(rows, config, scale_out)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"config": config, "rows": rows, "scale_out": scale_out}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
