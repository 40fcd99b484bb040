"""``fedmqtt aggregator`` workers on a real Mosquitto, as real subprocesses (issue #14).

The test plays the coordinator (retained plan, global model frame, collect request, presence) and the devices
(update frames made with the real encoder) and reads what the workers publish: presence, progress entries and
partial-aggregate frames.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from conftest import MqttClientFactory, ProcessGroup, fedmqtt_argv
from fedmqtt.codecs import DecodedFrame, decode_frame, encode_frame, model_hash
from fedmqtt.schema import (
    AggregatorPresence,
    AggregatorProgress,
    CodecSpec,
    CollectRequest,
    CoordinatorPresence,
    FrameKind,
    ManifestEntry,
    Phase,
    Plan,
    ProgressEntry,
    RefusalReason,
    from_json,
    new_token,
    to_json,
)
from fedmqtt.topics import Topics
from harness import with_nan

pytestmark = pytest.mark.mosquitto

JOB = "agg"
WAIT = 60.0
MANIFEST = (ManifestEntry(name="w", shape=(16, 8)), ManifestEntry(name="b", shape=(8,)))
T = TypeVar("T")


def arrays_for(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {e.name: rng.normal(0.0, 0.1, e.shape).astype(np.float32) for e in MANIFEST}


class Scene:
    """The coordinator and the devices, played by the test over one MQTT connection."""

    def __init__(self, url: str, prefix: str, mqtt_client: MqttClientFactory) -> None:
        self.url = url
        self.prefix = prefix
        self.topics = Topics(job=JOB, prefix=prefix)
        self.run_id = new_token()
        self._cond = threading.Condition()
        self.presences: dict[str, AggregatorPresence] = {}
        self.progress: list[AggregatorProgress] = []
        self.partials: list[tuple[str, DecodedFrame]] = []
        self.errors: list[str] = []
        t = self.topics
        self.conn = mqtt_client(
            url,
            subscriptions=[(t.aggregators_filter, 1), (t.partials_filter, 1)],
            on_message=self._on_message,
        )
        self.model_frame = encode_frame(
            {e.name: np.zeros(e.shape, np.float32) for e in MANIFEST},
            kind=FrameKind.GLOBAL_MODEL,
            job=JOB,
            round=1,
            sender="coordinator",
            codec=CodecSpec(),
            run_id=self.run_id,
        )
        self.model_hash = model_hash(self.model_frame)

    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        t = self.topics
        try:
            with self._cond:
                if (w := t.aggregator_of_status(topic)) is not None and payload:
                    self.presences[w] = from_json(AggregatorPresence, payload)
                elif t.aggregator_of_progress(topic) is not None:
                    self.progress.append(from_json(AggregatorProgress, payload))
                elif (w := t.aggregator_of_partial(topic)) is not None:
                    self.partials.append((w, decode_frame(payload, expected_manifest=MANIFEST)))
                self._cond.notify_all()
        except Exception as exc:
            with self._cond:
                self.errors.append(f"{topic}: {exc}")

    def wait(self, what: str, found: Callable[[], T | None], timeout: float = WAIT, procs: Any = None) -> T:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                assert not self.errors, self.errors
                value = found()
                if value:
                    return value
                if procs is not None:
                    procs.fail_if_one_failed(what)
                left = deadline - time.monotonic()
                if left <= 0:
                    logs = "" if procs is None else "\n".join(procs.log(n) for n in procs.processes)
                    pytest.fail(f"timed out waiting for {what}\n{logs}")
                self._cond.wait(min(left, 0.5))

    # -- what the coordinator publishes --

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.conn.publish(topic, payload, qos=1, retain=retain)

    def open_round(self, selected: list[str], *, round: int = 1, attempt: int = 0) -> Plan:
        plan = Plan(
            job=JOB,
            round=round,
            attempt=attempt,
            selected=tuple(selected),
            deadline=time.time() + 600,
            issued_at=time.time(),
            local_epochs=1,
            batch_size=32,
            learning_rate=0.1,
            uplink=CodecSpec(),
            model_name="mlp",
            model_hash=self.model_hash,
            run_id=self.run_id,
        )
        self.publish(self.topics.model, self.model_frame, retain=True)
        self.publish(self.topics.plan, to_json(plan), retain=True)
        return plan

    def collect(
        self, holdings: dict[str, tuple[str, ...]], *, round: int = 1, attempt: int = 0, run_id: str | None = None
    ) -> None:
        request = CollectRequest(
            job=JOB,
            run_id=run_id or self.run_id,
            round=round,
            attempt=attempt,
            holdings=holdings,
            issued_at=time.time(),
        )
        self.publish(self.topics.collect, to_json(request), retain=True)

    def end_job(self) -> None:
        presence = CoordinatorPresence(
            job=JOB,
            instance=new_token(),
            run_id=self.run_id,
            state="stopped",
            started_at=time.time(),
            phase=Phase.FINISHED,
        )
        self.publish(self.topics.coordinator, to_json(presence), retain=True)

    # -- what devices publish --

    def update(self, device: str, values: dict[str, np.ndarray], num_samples: int, *, round: int = 1) -> bytes:
        frame = encode_frame(
            values,
            kind=FrameKind.UPDATE,
            job=JOB,
            round=round,
            sender=device,
            codec=CodecSpec(),
            num_samples=num_samples,
            base_model_hash=self.model_hash,
            model_name="mlp",
        )
        self.publish(self.topics.update(device), frame)
        return frame

    def send(self, device: str, payload: bytes) -> None:
        self.publish(self.topics.update(device), payload)

    # -- what the workers published --

    def entries(self, worker: str | None = None) -> dict[str, tuple[str, ProgressEntry]]:
        """device -> (worker, its last entry)."""
        out: dict[str, tuple[str, ProgressEntry]] = {}
        with self._cond:
            for message in self.progress:
                if worker is None or message.worker == worker:
                    for entry in message.entries:
                        out[entry.device] = (message.worker, entry)
        return out

    def first_partial(self, procs: Any = None) -> tuple[str, DecodedFrame]:
        """The first partial published (waited for): (worker, frame)."""
        return self.wait("a partial", lambda: self.partials[0] if self.partials else None, procs=procs)

    def entry_count(self) -> int:
        with self._cond:
            return sum(len(m.entries) for m in self.progress)

    def clear(self) -> None:
        """Clear the retained messages of this job (the session broker is shared by the whole test run)."""
        for topic in (self.topics.plan, self.topics.model, self.topics.collect, self.topics.coordinator):
            self.publish(topic, b"", retain=True)


@pytest.fixture
def scene(mosquitto_broker: Any, topic_prefix: str, mqtt_client: MqttClientFactory) -> Iterator[Scene]:
    s = Scene(mosquitto_broker.url, topic_prefix, mqtt_client)
    yield s
    s.clear()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path)
    yield group
    group.close()


def start_worker(
    procs: ProcessGroup, scene: Scene, worker: str, spool: Path, *extra: str, name: str | None = None
) -> Any:
    argv = fedmqtt_argv(
        "-v", "aggregator", "--broker", scene.url, "--job", JOB, "--prefix", scene.prefix,
        "--id", worker, "--spool", str(spool), *extra,
    )  # fmt: skip
    process = procs.start(name or worker, argv)
    scene.wait(f"{worker} online", lambda: scene.presences.get(worker, None) and scene.presences[worker].state == "online" and
               scene.presences[worker], procs=procs)  # fmt: skip
    return process


def weighted_sum(updates: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    out = {e.name: np.zeros(e.shape, np.float64) for e in MANIFEST}
    for values, weight in updates:
        for k, v in values.items():
            out[k] += weight * v.astype(np.float64)
    return out


def assert_partial(frame: DecodedFrame, expected: dict[str, np.ndarray]) -> None:
    for name, value in expected.items():
        np.testing.assert_allclose(frame.arrays[name], value.astype(np.float32), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- tests


def test_a_worker_reports_progress_refuses_bad_frames_and_sums_exactly_the_listed_devices(
    scene: Scene, procs: ProcessGroup, tmp_path: Path
) -> None:
    start_worker(procs, scene, "w1", tmp_path / "spool")
    presence = scene.presences["w1"]
    assert presence.group == "fedmqtt" and presence.job == JOB and presence.site is None

    # Hostile retained state first: none of it ends the worker.
    scene.publish(scene.topics.plan, b"{not json", retain=True)
    scene.publish(scene.topics.model, b"FMQT garbage", retain=True)
    scene.publish(scene.topics.collect, b'{"schema_version": 1, "job": "agg", "holdings": 5}', retain=True)
    scene.publish(scene.topics.coordinator, b"\xff\xfe", retain=True)

    selected = ["d1", "d2", "d3", "d4", "d5"]
    scene.open_round(selected)
    values = {d: arrays_for(i) for i, d in enumerate(selected)}
    samples = {"d1": 10, "d2": 25, "d3": 7, "d4": 3, "d5": 5}
    sizes = {d: len(scene.update(d, values[d], samples[d])) for d in ("d1", "d2", "d3")}
    nan_frame = with_nan(
        encode_frame(values["d4"], kind=FrameKind.UPDATE, job=JOB, round=1, sender="d4", codec=CodecSpec(),
                     num_samples=3, base_model_hash=scene.model_hash)
    )  # fmt: skip
    scene.send("d4", nan_frame)
    scene.send("d5", b"junk that is no frame")
    scene.update("d9", arrays_for(9), 4)  # not selected
    scene.update("d1", arrays_for(99), 10)  # a second, different update of d1

    scene.wait("7 progress entries", lambda: scene.entry_count() >= 7, procs=procs)
    entries = scene.entries()
    accepted = {e.device: e for m in scene.progress for e in m.entries if e.accepted}
    assert sorted(accepted) == ["d1", "d2", "d3"]
    for d, entry in accepted.items():
        assert entry.header is not None
        assert entry.header.num_samples == samples[d] and entry.header.sender == d and entry.bytes == sizes[d]
    refused = {d: e.reason for d, (_, e) in entries.items() if not e.accepted}
    assert refused == {
        "d4": RefusalReason.NON_FINITE,
        "d5": RefusalReason.MALFORMED,
        "d9": RefusalReason.NOT_SELECTED,
        "d1": RefusalReason.DUPLICATE,
    }
    assert all(m.round == 1 and m.attempt == 0 and m.run_id == scene.run_id for m in scene.progress)

    # A collect of another run, round or attempt is ignored; the right one is answered once, with exactly the
    # devices listed (d2 is left out: the coordinator refused it, say), weighted by num_samples.
    scene.collect({"w1": ("d1", "d3")}, run_id=new_token())
    scene.collect({"w1": ("d1", "d3")}, round=2)
    scene.collect({"w1": ("d1", "d3")}, attempt=1)
    time.sleep(1.0)
    assert scene.partials == []
    scene.collect({"w1": ("d1", "d3"), "w2": ("d2",)})
    worker, frame = scene.first_partial(procs)
    assert worker == "w1"
    h = frame.header
    assert h.kind is FrameKind.PARTIAL_AGGREGATE and h.sender == "w1" and h.round == 1 and h.run_id == scene.run_id
    assert h.partial is not None and h.partial.attempt == 0 and h.partial.run_id == scene.run_id
    assert [(e.device, e.num_samples, e.weight) for e in h.partial.devices] == [("d1", 10, 10.0), ("d3", 7, 7.0)]
    assert (h.num_updates, h.num_samples, h.weight) == (2, 17, 17.0)
    assert_partial(frame, weighted_sum([(values["d1"], 10.0), (values["d3"], 7.0)]))

    # The job ends: the worker says offline and exits 0.
    scene.end_job()
    assert procs.wait_exit("w1") == 0
    scene.wait("w1 offline", lambda: scene.presences["w1"].state == "offline")
    assert len(scene.partials) == 1
    log = procs.log("w1")
    assert "Traceback" not in log and "ignored an unreadable plan" in log


def test_two_workers_in_one_group_split_the_updates_and_their_partials_add_up(
    scene: Scene, procs: ProcessGroup, tmp_path: Path
) -> None:
    start_worker(procs, scene, "w1", tmp_path / "s1")
    start_worker(procs, scene, "w2", tmp_path / "s2")
    devices = [f"d{i:02d}" for i in range(24)]
    scene.open_round(devices)
    time.sleep(0.5)  # both have the plan
    values = {d: arrays_for(100 + i) for i, d in enumerate(devices)}
    for i, d in enumerate(devices):
        scene.update(d, values[d], 1 + i)
    scene.wait("24 entries", lambda: scene.entry_count() >= 24, procs=procs)
    time.sleep(0.5)
    assert scene.entry_count() == 24  # each update reported by exactly one worker
    entries = scene.entries()
    assert sorted(entries) == devices and all(e.accepted for _, e in entries.values())
    holdings = {w: tuple(d for d, (ww, _) in sorted(entries.items()) if ww == w) for w in ("w1", "w2")}
    assert holdings["w1"] and holdings["w2"], holdings  # the broker shared them out
    scene.collect(holdings)
    scene.wait("two partials", lambda: len(scene.partials) >= 2, procs=procs)
    by_worker = dict(scene.partials)
    total = {e.name: np.zeros(e.shape, np.float64) for e in MANIFEST}
    for w, frame in by_worker.items():
        assert frame.header.partial is not None
        assert tuple(e.device for e in frame.header.partial.devices) == holdings[w]
        for k in total:
            total[k] += frame.arrays[k]
    expected = weighted_sum([(values[d], float(1 + i)) for i, d in enumerate(devices)])
    for k in total:
        np.testing.assert_allclose(total[k], expected[k], rtol=1e-5, atol=1e-5)
    # A worker stopped cleanly leaves the group: the broker hands every later update to the one still running
    # (an offline persistent member would keep receiving its share, to be handled only when it comes back).
    procs.processes["w2"].send_signal(signal.SIGTERM)
    assert procs.wait_exit("w2") == 0
    scene.wait("w2 offline", lambda: scene.presences["w2"].state == "offline")
    late = [f"e{i}" for i in range(6)]
    scene.open_round(late, round=2)
    time.sleep(0.3)
    for d in late:
        scene.update(d, arrays_for(7), 2, round=2)
    scene.wait("6 more entries", lambda: scene.entry_count() >= 30, procs=procs)
    assert {scene.entries()[d][0] for d in late} == {"w1"}
    procs.processes["w1"].send_signal(signal.SIGTERM)
    assert procs.wait_exit("w1") == 0
    scene.wait("both offline", lambda: all(scene.presences[w].state == "offline" for w in ("w1", "w2")))


def test_a_worker_killed_after_acking_answers_the_collect_once_restarted_with_its_spool(
    scene: Scene, procs: ProcessGroup, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    process = start_worker(procs, scene, "w1", spool)
    devices = ["d1", "d2", "d3"]
    scene.open_round(devices)
    time.sleep(0.3)
    values = {d: arrays_for(200 + i) for i, d in enumerate(devices)}
    for i, d in enumerate(devices):
        scene.update(d, values[d], 5 + i)
    scene.wait("3 accepted", lambda: len(scene.entries()) >= 3, procs=procs)
    os.killpg(process.pid, signal.SIGKILL)  # after the acks: the broker will not deliver these again
    process.wait()
    del procs.processes["w1"]  # killed by the test: not a failure
    scene.wait("w1's last will", lambda: scene.presences["w1"].state == "offline")
    assert sorted(p.name for p in (spool / scene.run_id / "1-0").glob("*.frame")) == [
        "d1.frame",
        "d2.frame",
        "d3.frame",
    ]

    start_worker(procs, scene, "w1", spool, name="w1-again")
    scene.collect({"w1": tuple(devices)})
    _, frame = scene.first_partial(procs)
    assert frame.header.partial is not None
    assert [e.device for e in frame.header.partial.devices] == devices
    assert_partial(frame, weighted_sum([(values[d], float(5 + i)) for i, d in enumerate(devices)]))
    scene.end_job()
    assert procs.wait_exit("w1-again") == 0


def test_hostile_collect_requests_and_plans_do_not_end_a_worker(
    scene: Scene, procs: ProcessGroup, tmp_path: Path
) -> None:
    start_worker(procs, scene, "w1", tmp_path / "spool")
    scene.open_round(["d1", "d2"])
    time.sleep(0.3)
    values = {"d1": arrays_for(301), "d2": arrays_for(302)}
    scene.update("d1", values["d1"], 4)
    scene.update("d2", values["d2"], 6)
    scene.wait("2 accepted", lambda: len(scene.entries()) >= 2, procs=procs)
    t = scene.topics
    hostile: list[tuple[str, bytes]] = [
        (t.collect, b"\x00" * 64),
        (t.collect, b'{"schema_version": 1, "job": "agg", "round": -1, "attempt": 0, "holdings": {}, "issued_at": 1}'),
        (t.collect, to_json(CollectRequest(job="other", round=1, attempt=0, holdings={"w1": ("d1",)}, issued_at=1.0))),
        (t.plan, b'{"schema_version": 1, "job": "agg", "round": 1}'),
        (t.plan, b"[]" * 10_000),
        (t.coordinator, b'{"schema_version": 1, "job": "agg", "state": "stopped", "phase": "finished"}'),
        (t.model, encode_frame({"x": np.ones(3, np.float32)}, kind=FrameKind.UPDATE, job=JOB, round=1, sender="d1",
                               codec=CodecSpec())),
        (t.update("d1"), b""),
    ]  # fmt: skip
    for topic, payload in hostile:
        scene.publish(topic, payload)
    # A collect listing a device the worker never held: it sends nothing (the coordinator fails the attempt).
    scene.collect({"w1": ("d1", "d7")})
    time.sleep(1.5)
    assert procs.processes["w1"].poll() is None, procs.log("w1")
    assert scene.partials == []
    log = procs.log("w1")
    assert "does not hold (d7)" in log and "Traceback" not in log
    # Still at work: the next attempt's collect (same round, new attempt) is answered from what it then holds.
    scene.open_round(["d1", "d2"], attempt=1)
    time.sleep(0.3)
    scene.update("d1", values["d1"], 4)
    scene.wait("d1 accepted again", lambda: sum(e.accepted for m in scene.progress for e in m.entries) >= 3)
    scene.collect({"w1": ("d1",)}, attempt=1)
    _, frame = scene.first_partial(procs)
    assert frame.header.partial is not None and frame.header.partial.attempt == 1
    assert_partial(frame, weighted_sum([(values["d1"], 4.0)]))
    procs.processes["w1"].send_signal(signal.SIGINT)
    assert procs.wait_exit("w1") == 0


def test_an_aggregator_account_works_under_the_acl_and_cannot_write_another_workers_topics(
    secure_mosquitto: Any, mqtt_client: MqttClientFactory, procs: ProcessGroup, tmp_path: Path
) -> None:
    from fedmqtt.mqtt import PublishRefused

    secure = secure_mosquitto
    passwords = {w: secure.broker.add_account("aggregator", w) for w in ("w1", "w2")}
    secure.broker.reload()
    time.sleep(0.5)
    ca = secure.ca_file
    topics = Topics(job=JOB, prefix=secure.prefix)
    w1 = mqtt_client(secure.url_for("w1", passwords["w1"]), tls_ca=ca)
    for topic in (topics.partial("w2"), topics.aggregator_progress("w2"), topics.aggregator_status("w2"),
                  topics.update("w1"), topics.device_status("w1"), topics.plan, topics.collect):  # fmt: skip
        with pytest.raises(PublishRefused, match="Not authorized"):
            w1.publish(topic, b"forged by w1", qos=1)
    w1.publish(topics.partial("w1"), b"its own partial topic", qos=1)
    w1.close()

    # The worker itself, logged in as w1: it reads the updates, writes its presence, progress and partial.
    url = secure.url_for("coordinator")
    scene = Scene(url, secure.prefix, lambda u, **kw: mqtt_client(u, tls_ca=ca, **kw))
    try:
        password_file = tmp_path / "w1.password"
        password_file.write_text(passwords["w1"] + "\n")
        password_file.chmod(0o600)
        plain = secure.url_for(None)
        argv = fedmqtt_argv(
            "aggregator", "--broker", plain, "--username", "w1", "--password-file", str(password_file),
            "--tls-ca", ca, "--job", JOB, "--prefix", secure.prefix, "--id", "w1", "--spool", str(tmp_path / "s"),
        )  # fmt: skip
        procs.start("w1", argv)
        scene.wait(
            "w1 online", lambda: "w1" in scene.presences and scene.presences["w1"].state == "online", procs=procs
        )
        scene.open_round(["d1"])
        time.sleep(0.3)
        values = arrays_for(400)
        d1 = mqtt_client(secure.url_for("d1"), tls_ca=ca)
        frame = encode_frame(values, kind=FrameKind.UPDATE, job=JOB, round=1, sender="d1", codec=CodecSpec(),
                             num_samples=9, base_model_hash=scene.model_hash)  # fmt: skip
        d1.publish(topics.update("d1"), frame, qos=1)
        scene.wait("d1 accepted", lambda: "d1" in scene.entries() and scene.entries()["d1"][1].accepted, procs=procs)
        scene.collect({"w1": ("d1",)})
        _, partial = scene.first_partial(procs)
        assert_partial(partial, weighted_sum([(values, 9.0)]))
        scene.end_job()
        assert procs.wait_exit("w1") == 0
    finally:
        scene.clear()


def test_a_site_aggregator_reads_every_update_of_its_broker_without_a_share_group(
    scene: Scene, procs: ProcessGroup, tmp_path: Path
) -> None:
    start_worker(procs, scene, "site-a", tmp_path / "spool", "--site", "a")
    presence = scene.presences["site-a"]
    assert presence.site == "a" and presence.group is None
    scene.open_round(["d1", "d2"])
    time.sleep(0.3)
    for i, d in enumerate(("d1", "d2")):
        scene.update(d, arrays_for(500 + i), 3)
    scene.wait("both accepted", lambda: len(scene.entries("site-a")) == 2, procs=procs)
    scene.end_job()
    assert procs.wait_exit("site-a") == 0
