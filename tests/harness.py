"""The process harness of the coordinator tests (tests/test_coordinator_service.py, tests/test_faults.py).

A real ``fedmqtt coordinator`` subprocess, devices played by the test with hand-made frames, everything observed
on the job's public topics:

* :class:`CoordinatorProcess` runs ``python -m fedmqtt.cli coordinator`` (``--model mlp --quiet``) and always
  kills it at teardown; a test that fails shows its log.
* :class:`JobView` subscribes to the job's events, status, plan, model and round summaries and parses them with
  :func:`fedmqtt.schema.from_json` (model frames with :func:`fedmqtt.codecs.decode_frame`); its ``wait_*``
  helpers fail the test with the coordinator's log when it exits early or a timeout passes.
* :class:`Devices` publishes retained ``DeviceStatus`` messages and update frames for any device id.
* :func:`job_maker` makes :class:`Job` objects (the ``make_job`` fixture of tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import zstandard

from conftest import fedmqtt_argv, subprocess_env
from fedmqtt.arrays import ModelArrays
from fedmqtt.codecs import decode_frame, encode_frame
from fedmqtt.models import model_manifest
from fedmqtt.mqtt import ClientSettings, MqttConnection, parse_broker_url
from fedmqtt.schema import (
    CodecSpec,
    DeviceStatus,
    DPAnnouncement,
    Event,
    EventType,
    FrameKind,
    Plan,
    RefusalReason,
    RoundSummary,
    Status,
    from_json,
    to_json,
)
from fedmqtt.topics import Topics

MODEL = "mlp"
MANIFEST = model_manifest(MODEL)
NUMEL = sum(entry.numel for entry in MANIFEST)
WAIT = 60.0  # seconds any wait_* gives up after: generous, as the 2 cores are shared with other test runs
EXIT_STOPPED = 3  # service.py: the job stopped for a reason that is not a rule (e.g. a round failed too often)

M = TypeVar("M")


# --------------------------------------------------------------------------------------------- frames


def constant_update(value: float) -> ModelArrays:
    """An update of the mlp model with every entry equal to ``value`` (compresses to almost nothing)."""
    return {e.name: np.full(e.shape, value, dtype=np.float32) for e in MANIFEST}


def update_frame(
    job: str,
    round_number: int,
    sender: str,
    value: float = 0.01,
    *,
    num_samples: int = 10,
    kind: FrameKind = FrameKind.UPDATE,
    arrays: ModelArrays | None = None,
    dp: DPAnnouncement | None = None,
    base_model_hash: str | None = None,
) -> bytes:
    return encode_frame(
        constant_update(value) if arrays is None else arrays,
        kind=kind,
        job=job,
        round=round_number,
        sender=sender,
        codec=CodecSpec(),
        num_samples=num_samples,
        model_name=MODEL,
        dp=dp,
        base_model_hash=base_model_hash,
    )


_PREFIX = struct.Struct("<4sBIQ")  # magic, format version, header length, body length (docs/codecs.md)


def with_nan(frame: bytes) -> bytes:
    """``frame`` (float32 values) with its first value replaced by NaN, checksums fixed: ``encode_frame`` refuses
    NaN, so the frame is taken apart and rebuilt (as tests/test_codec_errors.py does)."""
    magic, version, header_len, _ = _PREFIX.unpack_from(frame)
    header = json.loads(frame[_PREFIX.size : _PREFIX.size + header_len])
    body = bytearray(zstandard.ZstdDecompressor().decompress(frame[_PREFIX.size + header_len :]))
    struct.pack_into("<f", body, 0, float("nan"))
    header["body_size"] = len(body)
    header["body_blake2b"] = hashlib.blake2b(bytes(body), digest_size=16).hexdigest()
    header_bytes = json.dumps(header).encode()
    compressed = zstandard.ZstdCompressor(level=1).compress(bytes(body))
    return _PREFIX.pack(magic, version, len(header_bytes), len(compressed)) + header_bytes + compressed


def with_header_field(frame: bytes, key: str, value: Any) -> bytes:
    """``frame`` with one more (or another) JSON header field."""
    magic, version, header_len, body_len = _PREFIX.unpack_from(frame)
    header = json.loads(frame[_PREFIX.size : _PREFIX.size + header_len])
    header[key] = value
    header_bytes = json.dumps(header).encode()
    return _PREFIX.pack(magic, version, len(header_bytes), body_len) + header_bytes + frame[_PREFIX.size + header_len :]


# --------------------------------------------------------------------------------------------- processes


class CoordinatorProcess:
    """One ``fedmqtt coordinator`` subprocess; its stdout and stderr go to a log file."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True
            )
        self.started = time.monotonic()
        self.exited_at: float | None = None  # monotonic time of the exit, for "in bounded time" checks
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        self.process.wait()
        self.exited_at = time.monotonic()

    def running(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else "(no log)"

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the coordinator did not exit within {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no DISCONNECT, no cleanup (the crash the durability tests need)."""
        if self.running():
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.running():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()


class JobView:
    """What a watcher sees of one job: events, statuses, plans, model headers, round summaries."""

    def __init__(self, broker_url: str, topics: Topics) -> None:
        self.topics = topics
        self._cond = threading.Condition()
        self.events: list[Event] = []
        self.statuses: list[Status] = []
        self.plans: list[Plan] = []
        self.models: list[tuple[int, ModelArrays, str]] = []  # (round, arrays, model hash)
        self.summaries: dict[int, RoundSummary] = {}
        self.coordinator: CoordinatorProcess | None = None
        self.parse_errors: list[str] = []
        self.connection = MqttConnection(
            ClientSettings.from_url(broker_url, client_id=f"view-{uuid.uuid4().hex[:10]}", clean_start=True),
            on_message=self._on_message,
            subscriptions=[
                (topics.events, 1),
                (topics.status, 1),
                (topics.plan, 1),
                (topics.model, 1),
                (topics.rounds_filter, 1),
            ],
        )
        self.connection.connect(timeout=10)

    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        try:
            self._record(topic, payload)
        except Exception as exc:  # recorded, and failed on by every wait
            with self._cond:
                self.parse_errors.append(f"{topic}: {exc}")

    def _record(self, topic: str, payload: bytes) -> None:
        t = self.topics
        if not payload or topic == t.coordinator:
            return  # a cleared retained message (a new run clears the last run's), or the coordinator's presence
        if topic == t.model:
            from fedmqtt.codecs import model_hash

            frame = decode_frame(payload, expected_manifest=MANIFEST)
            item: Any = (frame.header.round, frame.arrays, model_hash(payload))
            target: Any = self.models
        elif topic == t.events:
            item, target = from_json(Event, payload), self.events
        elif topic == t.status:
            item, target = from_json(Status, payload), self.statuses
        elif topic == t.plan:
            item, target = from_json(Plan, payload), self.plans
        else:
            round_number = t.round_of_summary(topic)
            assert round_number is not None, topic
            summary = from_json(RoundSummary, payload)
            with self._cond:
                self.summaries[round_number] = summary
                self._cond.notify_all()
            return
        with self._cond:
            target.append(item)
            self._cond.notify_all()

    def close(self) -> None:
        self.connection.close()

    # -- waiting --

    def wait_until(self, what: str, found: Callable[[], M | None], timeout: float = WAIT) -> M:
        """Wait until ``found()`` (called under the lock) returns something other than None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = found()
                if result is not None:
                    return result
                if self.parse_errors:
                    pytest.fail(f"unparseable messages on the job's topics: {self.parse_errors}")
                c = self.coordinator
                if c is not None and not c.running():
                    pytest.fail(f"the coordinator exited ({c.process.returncode}) while waiting for {what}:\n{c.log()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{c.log() if c else ''}")
                self._cond.wait(min(left, 0.2))

    def wait_event(self, type_: EventType, timeout: float = WAIT, **fields: Any) -> Event:
        """The first event of ``type_`` whose attributes equal ``fields``."""

        def find() -> Event | None:
            for event in self.events:
                if event.type is type_ and all(getattr(event, k) == v for k, v in fields.items()):
                    return event
            return None

        return self.wait_until(f"event {type_.value} {fields}", find, timeout)

    def wait_refusal(self, device: str, reason: RefusalReason, timeout: float = WAIT) -> Event:
        return self.wait_event(EventType.UPDATE_REFUSED, timeout, device=device, reason=reason)

    def wait_plan(self, round_number: int, attempt: int = 0, timeout: float = WAIT) -> Plan:
        return self.wait_until(
            f"the plan of round {round_number} attempt {attempt}",
            lambda: next((p for p in self.plans if p.round == round_number and p.attempt == attempt), None),
            timeout,
        )

    def wait_summary(self, round_number: int, timeout: float = WAIT) -> RoundSummary:
        return self.wait_until(
            f"the summary of round {round_number}", lambda: self.summaries.get(round_number), timeout
        )

    def wait_status(self, what: str, predicate: Callable[[Status], bool], timeout: float = WAIT) -> Status:
        return self.wait_until(
            f"a status with {what}", lambda: next((s for s in reversed(self.statuses) if predicate(s)), None), timeout
        )

    def wait_model(self, round_number: int, timeout: float = WAIT) -> tuple[ModelArrays, str]:
        found = self.wait_until(
            f"the model of round {round_number}",
            lambda: next(((a, h) for r, a, h in self.models if r == round_number), None),
            timeout,
        )
        return found

    def update_events(self, device: str) -> list[Event]:
        with self._cond:
            return [
                e
                for e in self.events
                if e.device == device and e.type in (EventType.UPDATE_ACCEPTED, EventType.UPDATE_REFUSED)
            ]


class Devices:
    """Plays any number of devices over one MQTT connection (the test brokers have no ACLs)."""

    def __init__(self, connection: MqttConnection, topics: Topics) -> None:
        self.connection = connection
        self.topics = topics

    def online(self, *devices: str) -> None:
        for device in devices:
            status = DeviceStatus(device=device, state="online", ts=time.time())
            self.connection.publish(self.topics.device_status(device), to_json(status), qos=1, retain=True)

    def send(self, device: str, frame: bytes, qos: int = 1) -> None:
        self.connection.publish(self.topics.update(device), frame, qos=qos)


class Job:
    """One test's job: its topics, the coordinator process(es), a :class:`JobView` and :class:`Devices`."""

    def __init__(self, broker_url: str, prefix: str, tmp_path: Path, devices: Devices, view: JobView) -> None:
        self.broker_url = broker_url
        self.prefix = prefix
        self.name = view.topics.job
        self.tmp_path = tmp_path
        self.devices = devices
        self.view = view
        self.processes: list[CoordinatorProcess] = []

    @property
    def topics(self) -> Topics:
        return self.view.topics

    def start(self, *flags: str, with_job_flags: bool = True, verbose: bool = False) -> CoordinatorProcess:
        """Start a coordinator for this job; ``flags`` add to (and may override) the connection flags;
        ``verbose``: INFO logging in its log."""
        base = ["--broker", self.broker_url, "--job", self.name, "--prefix", self.prefix] if with_job_flags else []
        argv = fedmqtt_argv(*(["-v"] if verbose else []), "coordinator", *base, "--model", MODEL, "--quiet", *flags)
        process = CoordinatorProcess(argv, self.tmp_path / f"coordinator-{len(self.processes)}.log")
        self.processes.append(process)
        self.view.coordinator = process
        return process

    def frame(self, round_number: int, sender: str, value: float = 0.01, **kw: Any) -> bytes:
        """An update for ``round_number``, computed (as a device does) against the model its latest plan names."""
        if "base_model_hash" not in kw:
            with self.view._cond:
                plans = [p for p in self.view.plans if p.round == round_number]
            kw["base_model_hash"] = plans[-1].model_hash if plans else None
        return update_frame(self.name, round_number, sender, value, **kw)

    def close(self) -> None:
        for process in self.processes:
            process.stop()


@contextmanager
def job_maker(
    tmp_path: Path, topic_prefix: str, mqtt_client: Callable[..., MqttConnection]
) -> Iterator[Callable[[str], Job]]:
    """``make(broker_url)`` -> a new :class:`Job`; at exit every coordinator is stopped and its log printed."""
    jobs: list[Job] = []

    def make(broker_url: str) -> Job:
        name = f"job-{uuid.uuid4().hex[:8]}"  # also makes the coordinator's client id (and session) unique
        topics = Topics(job=name, prefix=topic_prefix)
        view = JobView(broker_url, topics)
        job = Job(broker_url, topic_prefix, tmp_path, Devices(mqtt_client(broker_url), topics), view)
        jobs.append(job)
        return job

    try:
        yield make
    finally:
        for job in jobs:
            job.close()
            job.view.close()
            # pytest shows captured teardown output only when the test failed: the coordinator's log then.
            for process in job.processes:
                print(f"--- {' '.join(process.argv)}\n{process.log()}", file=sys.stderr)


def expected_average(updates: list[tuple[float, int]]) -> float:
    """FedAvg of constant updates ``(value, num_samples)``: the sample-weighted mean value."""
    total = sum(n for _, n in updates)
    return sum(v * n for v, n in updates) / total


def assert_model_moved_by(before: ModelArrays, after: ModelArrays, delta: float) -> None:
    for name, old in before.items():
        np.testing.assert_allclose(after[name], old + np.float32(delta), rtol=0, atol=1e-5, err_msg=name)


def start_device_with_a_last_will(broker_url: str, topics: Topics, device: str) -> subprocess.Popen[bytes]:
    """A device connection in another process (``mosquitto_sub``) whose last will is the retained ``offline``
    status. Returns once it is connected (it received its own retained ``online`` status, published here)."""
    broker = parse_broker_url(broker_url)
    topic = topics.device_status(device)
    offline = to_json(DeviceStatus(device=device, state="offline"))
    process = subprocess.Popen(
        ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-V", "mqttv5", "-i", f"{device}-{uuid.uuid4().hex[:6]}",
         "-t", topic, "--will-topic", topic, "--will-payload", offline.decode(), "--will-qos", "1", "--will-retain"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    return process


_REFUSING_SOCKETS: list[socket.socket] = []


def closed_port_url() -> str:
    """A loopback URL that refuses connections for the rest of the test session. A socket bound there that never
    listens keeps the port: a port that was merely free once went to another test's broker while a coordinator
    was still retrying it, and the coordinator met that broker instead of a refusal."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # no SO_REUSEADDR: nobody else may bind the port
    sock.bind(("127.0.0.1", 0))
    _REFUSING_SOCKETS.append(sock)
    return f"mqtt://127.0.0.1:{sock.getsockname()[1]}"
