"""What the benchmarks that run the real system share (overhead.py, rounds_to_accuracy.py, compression_accuracy.py).

- :class:`Job`: one federated job, as ``fedmqtt simulate`` flags, and the simulation plan simulate itself derives
  from them (:func:`simulation_plan`: device processes and torch threads each, so a baseline can copy them);
- :func:`run_simulate`: ``fedmqtt simulate`` on a Mosquitto this module starts, with an observer subscribed to
  the job's events and device statuses, so that each round's time can be split (:func:`round_phases`);
- pure helpers: :func:`rounds_to`, :func:`ratio`, :func:`per_round`, :func:`table`, :func:`write_json`.

Not a test: the figures depend on the machine and its load, which every result records.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# The job of issue #13's overhead and compression benchmarks (the FedAvg paper's CNN setting with E = 1).
PAPER_JOB = {"devices": 10, "rounds": 5, "model": "cnn", "local_epochs": 1, "batch_size": 10, "lr": 0.05}
_AGGREGATION_DETAIL = re.compile(r"aggregation ([0-9.]+)s")


@dataclass(frozen=True)
class Job:
    """One federated job, spelled as ``fedmqtt simulate`` flags."""

    devices: int
    rounds: int
    model: str = "cnn"
    local_epochs: int = 1
    batch_size: int = 10
    lr: float = 0.05
    partition: str = "iid"
    uplink: str = "float32"
    downlink: str = "float32"
    devices_per_round: int | None = None
    target_accuracy: float | None = None
    seed: int = 0
    # simulate --train-seed: the devices' shuffling orders (None: fresh ones). Seeded, two runs of a script differ
    # only by what the script varies (a codec, a way of running), not by the data order.
    train_seed: int | None = None
    eval_every: int = 1  # simulate --eval-every

    def simulate_args(self) -> list[str]:
        argv = [
            "--devices", str(self.devices),
            "--rounds", str(self.rounds),
            "--model", self.model,
            "--local-epochs", str(self.local_epochs),
            "--batch-size", str(self.batch_size),
            "--lr", str(self.lr),
            "--partition", self.partition,
            "--uplink", self.uplink,
            "--downlink", self.downlink,
            "--seed", str(self.seed),
        ]  # fmt: skip
        if self.devices_per_round is not None:
            argv += ["--devices-per-round", str(self.devices_per_round)]
        if self.target_accuracy is not None:
            argv += ["--target-accuracy", str(self.target_accuracy)]
        if self.train_seed is not None:
            argv += ["--train-seed", str(self.train_seed)]
        if self.eval_every != 1:
            argv += ["--eval-every", str(self.eval_every)]
        return argv

    def label(self) -> str:
        per_round = f", {self.devices_per_round} per round" if self.devices_per_round else ""
        return (
            f"{self.devices} devices{per_round}, {self.rounds} rounds, {self.model}, E={self.local_epochs}, "
            f"B={self.batch_size}, lr {self.lr:g}, {self.partition}, uplink {self.uplink}, downlink {self.downlink}"
            + ("" if self.eval_every == 1 else f", evaluated every {self.eval_every} rounds and the last")
        )


def simulate_parser() -> argparse.ArgumentParser:
    """``fedmqtt simulate``'s own argument parser."""
    from fedmqtt.simulate import register

    parser = argparse.ArgumentParser(prog="fedmqtt")
    register(parser.add_subparsers())
    return parser


def simulation_plan(job: Job, data_dir: Path) -> Any:
    """The :class:`fedmqtt.simulate.SimulationPlan` simulate makes of ``job`` on this machine (processes, threads)."""
    from fedmqtt.mqtt import MAX_CLIENTS_PER_PROCESS
    from fedmqtt.simulate import plan_simulation

    args = simulate_parser().parse_args(["simulate", *job.simulate_args(), "--data-dir", str(data_dir)])
    return plan_simulation(
        args, env={}, max_clients_per_process=MAX_CLIENTS_PER_PROCESS, cpu_count=os.cpu_count() or 1, now=time.time()
    )


def data_dir(flag: str | None) -> Path:
    """MNIST as every command finds it: --data-dir, else $FEDMQTT_DATA, else the user cache."""
    from fedmqtt.data import resolve_data_dir

    return Path(resolve_data_dir(flag, "mnist", env=os.environ))


def sample_data(source: Path, out: Path, train_samples: int | None) -> Path:
    """``source`` itself, or (``train_samples``) a copy in ``out`` of its first ``train_samples`` training
    images with the whole test split: the --quick runs train on less, and are measured on the same test set."""
    if train_samples is None:
        return source
    from fedmqtt.data import IDX_FILES, TRAIN_FILES, read_idx_file, write_idx_file

    out.mkdir(parents=True, exist_ok=True)
    for stem in IDX_FILES:
        path = next(p for p in (source / stem, source / f"{stem}.gz") if p.exists())
        array = read_idx_file(path, 3 if "images" in stem else 1)
        write_idx_file(out / stem, array[:train_samples] if stem in TRAIN_FILES else array)
    return out


# ---------------------------------------------------------------------------------------------------
# fedmqtt simulate, observed
# ---------------------------------------------------------------------------------------------------


@dataclass
class SimRun:
    job: Job
    report: dict[str, Any]  # simulate's report.json
    phases: list[dict[str, Any]]  # per round: see round_phases
    wall_seconds: float  # the whole simulate command: start-up, rounds, shut-down
    out_dir: str

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return list(self.report["rounds"])

    @property
    def totals(self) -> dict[str, Any]:
        return dict(self.report["totals"])


@dataclass
class _Observer:
    """(arrival time, topic, payload) of every message on the job's events and device status topics."""

    messages: list[tuple[float, str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_message(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        with self.lock:
            self.messages.append((time.time(), topic, bytes(payload)))


def run_simulate(job: Job, *, data: Path, out_dir: Path, timeout: float) -> SimRun:
    """Run ``fedmqtt simulate`` for ``job`` on a Mosquitto started here; raise SystemExit with its log if it fails."""
    from fedmqtt.broker.mosquitto import MosquittoBroker
    from fedmqtt.mqtt import BrokerSettings, MqttConnection
    from fedmqtt.topics import Topics
    from fedmqtt.watch import client_settings, random_client_id

    job_id = f"bench-{secrets.token_hex(3)}"
    topics = Topics(job=job_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    observer = _Observer()
    with tempfile.TemporaryDirectory(prefix="fedmqtt-bench-") as config_dir, MosquittoBroker(config_dir) as broker:
        settings = BrokerSettings.model_validate({"broker": broker.url, "mqtt_version": "5"}, context={"env": {}})
        watch = MqttConnection(
            client_settings(settings, client_id=random_client_id("bench")),
            on_message=observer.on_message,
            subscriptions=[(topics.events, 1), (topics.device_status_filter, 1)],
        )
        watch.connect(10.0)
        argv = [sys.executable, "-m", "fedmqtt.cli", "simulate", *job.simulate_args()]
        argv += ["--broker", broker.url, "--job", job_id, "--out", str(out_dir), "--data-dir", str(data)]
        argv += ["--timeout", str(timeout), "--round-timeout", str(max(120.0, timeout))]
        started = time.monotonic()
        try:
            with open(out_dir / "simulate.log", "wb") as log:
                code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        finally:
            wall = time.monotonic() - started
            watch.close()
    if code != 0:
        tail = (out_dir / "simulate.log").read_text(errors="replace").splitlines()[-25:]
        raise SystemExit(f"fedmqtt simulate failed (exit {code}) for {job.label()}:\n" + "\n".join(tail))
    report = json.loads((out_dir / "report.json").read_text())
    with observer.lock:
        messages = list(observer.messages)
    return SimRun(
        job=job, report=report, phases=round_phases(messages, topics), wall_seconds=wall, out_dir=str(out_dir)
    )


def round_phases(messages: Sequence[tuple[float, str, bytes]], topics: Any) -> list[dict[str, Any]]:
    """Split each round's time by what the job's events and device statuses say (publishers' clocks: one machine).

    Per round: ``download_s`` (round opened until the last device process starts training: plan, model transfer
    and decoding; a process fetches the model once for its devices), ``devices_s`` (from then until the last
    update is sent: local training of the process's devices one after another, encoding, upload), ``close_s``
    (last update sent until the round closed: delivery, aggregation, evaluation when it is on the critical path,
    publishing the next model), ``aggregation_s`` (the coordinator's own figure for the close), ``evaluated_s``
    (round closed until its ``round_evaluated`` event, when the coordinator evaluates off the critical path).
    """
    from fedmqtt.schema import DeviceStatus, Event, EventType, MessageError, from_json

    opened: dict[int, float] = {}
    closed: dict[int, float] = {}
    evaluated: dict[int, float] = {}
    aggregation: dict[int, float] = {}
    first_training: dict[tuple[int, str], float] = {}  # (round, process instance) -> first "training" status
    last_sent: dict[int, float] = {}
    for _, topic, payload in messages:
        try:
            if topic == topics.events:
                event = from_json(Event, payload)
                if event.round is None:
                    continue
                if event.type is EventType.ROUND_OPENED:
                    opened.setdefault(event.round, event.ts)
                elif event.type is EventType.ROUND_CLOSED:
                    closed[event.round] = event.ts
                    found = _AGGREGATION_DETAIL.search(event.detail)
                    if found:
                        aggregation[event.round] = float(found.group(1))
                elif event.type is EventType.ROUND_EVALUATED:
                    evaluated[event.round] = event.ts
            elif payload:
                status = from_json(DeviceStatus, payload)
                if status.round is None or status.ts is None or status.detail:
                    continue  # declines carry a detail
                if status.state == "training":
                    key = (status.round, status.instance or status.device)
                    first_training[key] = min(first_training.get(key, status.ts), status.ts)
                elif status.state == "online":
                    last_sent[status.round] = max(last_sent.get(status.round, status.ts), status.ts)
        except MessageError:
            continue
    phases: list[dict[str, Any]] = []
    for r in sorted(set(opened) & set(closed)):
        starts = [ts for (rr, _), ts in first_training.items() if rr == r]
        ready = max(starts) if starts else None
        sent = last_sent.get(r)
        phases.append(
            {
                "round": r,
                "seconds": closed[r] - opened[r],
                "download_s": None if ready is None else ready - opened[r],
                "devices_s": None if ready is None or sent is None else sent - ready,
                "close_s": None if sent is None else closed[r] - sent,
                "aggregation_s": aggregation.get(r),
                "evaluated_s": evaluated[r] - closed[r] if r in evaluated else None,
            }
        )
    return phases


# ---------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------


def rounds_to(curve: Sequence[tuple[int, float | None]], target: float) -> int | None:
    """The first round whose accuracy reaches ``target`` (``curve``: (round, accuracy) in round order), or None."""
    for r, accuracy in curve:
        if accuracy is not None and accuracy >= target:
            return r
    return None


def ratio(value: float | None, baseline: float | None, digits: int = 3) -> float | None:
    """``value / baseline`` rounded, None when either is missing or the baseline is 0."""
    if value is None or baseline is None or baseline == 0:
        return None
    return round(value / baseline, digits)


def per_round(total: float, rounds: int) -> float:
    return total / max(rounds, 1)


def mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Right-aligned columns (the first left-aligned), one line per row."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = []
    for row in (header, *rows):
        cells = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """Where and when the figures were taken; the 1-minute load average says how busy the machine was."""
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(path: Path, result: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def finish(path: Path, result: Mapping[str, Any], missed: Sequence[str]) -> int:
    """Write the result, name each missed target on stderr; the exit code says whether any was missed."""
    write_json(path, result)
    for line in missed:
        print(f"TARGET MISSED: {line}", file=sys.stderr)
    return 1 if missed else 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, Job):
        return asdict(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def common_flags(parser: argparse.ArgumentParser, name: str) -> None:
    """--data-dir, --json, --out, --quick and --timeout, as every script here spells them."""
    parser.add_argument("--data-dir", help="MNIST IDX files (default: $FEDMQTT_DATA, else the user cache)")
    parser.add_argument("--json", type=Path, default=RESULTS / f"{name}.json", help="write the results here")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / name, help="simulate's run folders")
    parser.add_argument("--quick", action="store_true", help="a small configuration that runs in a few minutes")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up on one simulate run after this")
    parser.add_argument(
        "--train-samples", type=int, help="train on the first N training images only (--quick: 6000; default: all)"
    )


QUICK_TRAIN_SAMPLES = 6000


def train_seed_flag(parser: argparse.ArgumentParser) -> None:
    """--train-seed, for the scripts that compare runs of one job: every run trains in the same data orders."""
    parser.add_argument(
        "--train-seed",
        type=int,
        default=0,
        help="the devices' shuffling seed in every run (simulate --train-seed; default %(default)s); -1: unseeded",
    )


def train_seed_of(args: argparse.Namespace) -> int | None:
    return None if args.train_seed == -1 else int(args.train_seed)


def quick_json(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``--quick`` without ``--json`` writes NAME-quick.json beside the default NAME.json: a quick check never
    replaces a full run's recorded figures."""
    if args.quick and args.json == parser.get_default("json"):
        args.json = args.json.with_name(f"{args.json.stem}-quick.json")


def prepared_data(args: argparse.Namespace) -> Path:
    """The data the runs train on: MNIST as found, or its first --train-samples training images (--quick: 6000)."""
    if args.quick and args.train_samples is None:
        args.train_samples = QUICK_TRAIN_SAMPLES
    return sample_data(data_dir(args.data_dir), args.out / "data", args.train_samples)
