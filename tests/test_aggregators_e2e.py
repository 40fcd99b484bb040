"""Scale-out aggregation end to end (#14) on a real Mosquitto: ``fedmqtt coordinator --aggregators N`` with N real
``fedmqtt aggregator`` processes, devices played by the test with hand-made update frames (tests/harness.py).

* With 2 and 3 workers, the global model after a round equals the one a coordinator without workers makes of the
  very same updates (to float32 tolerance), with the same participants, sample count and bytes.
* A worker SIGKILLed after it acknowledged updates: restarted with its spool before the round closes, the round
  closes with them; still dead when it closes, the attempt fails naming it and is retried once it is back, and the
  job completes. Never an update counted twice, never one lost.
* A robust strategy with --aggregators is refused before anything connects.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import ProcessGroup, fedmqtt_argv, subprocess_env
from fedmqtt.arrays import ModelArrays
from fedmqtt.codecs import encode_frame, peek_header
from fedmqtt.mqtt import MqttConnection
from fedmqtt.schema import (
    AggregatorPresence,
    AggregatorProgress,
    CodecSpec,
    CollectRequest,
    DPAnnouncement,
    EventType,
    FrameKind,
    PartialEntry,
    PartialInfo,
    Phase,
    Plan,
    ProgressEntry,
    RefusalReason,
    from_json,
    new_token,
    to_json,
)
from harness import MANIFEST, WAIT, Job, closed_port_url

SAMPLES = [12, 30, 7, 21, 16, 9]

# Real coordinator and worker processes on Mosquitto (make test-fast leaves them out).
pytestmark = [pytest.mark.e2e, pytest.mark.mosquitto]


def arrays_for(seed: int) -> ModelArrays:
    rng = np.random.default_rng(seed)
    return {e.name: (rng.normal(size=e.shape) * 0.01).astype(np.float32) for e in MANIFEST}


def fedavg(updates: list[tuple[ModelArrays, int]]) -> ModelArrays:
    total = float(sum(n for _, n in updates))
    out = {e.name: np.zeros(e.shape, np.float64) for e in MANIFEST}
    for u, n in updates:
        for k in out:
            out[k] += u[k].astype(np.float64) * n
    return {k: (v / total).astype(np.float32) for k, v in out.items()}


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path)
    yield group
    for name in group.processes:  # shown when the test failed
        print(f"--- {name}\n{group.log(name)}")
    group.close()


class Wire:
    """What the workers say on the job's topics: progress entries (who holds which device) and collect requests."""

    def __init__(self, job: Job, mqtt_client: Callable[..., MqttConnection]) -> None:
        self.lock = threading.Lock()
        self.holder: dict[str, str] = {}  # device -> the worker that reported it accepted (first report)
        self.collects: list[CollectRequest] = []
        topics = job.topics
        self.topics = topics
        mqtt_client(
            job.broker_url,
            subscriptions=[(topics.aggregators_filter, 1), (topics.collect, 1)],
            on_message=self._on_message,
        )

    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        if not payload:
            return
        with self.lock:
            if topic == self.topics.collect:
                self.collects.append(from_json(CollectRequest, payload))
            elif self.topics.aggregator_of_progress(topic) is not None:
                progress = from_json(AggregatorProgress, payload)
                for entry in progress.entries:
                    if entry.accepted:
                        self.holder.setdefault(entry.device, progress.worker)

    def wait_collect(self, job: Job, attempt: int) -> CollectRequest:
        def found() -> CollectRequest | None:
            with self.lock:
                return next((c for c in self.collects if c.attempt == attempt), None)

        return job.view.wait_until(f"the collect request of attempt {attempt}", found)

    def wait_holder(self, device: str, timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if device in self.holder:
                    return self.holder[device]
            time.sleep(0.05)
        pytest.fail(f"no worker reported {device}'s update within {timeout} s")


def start_worker(procs: ProcessGroup, job: Job, worker: str, spool: Path, *, name: str | None = None) -> Any:
    argv = fedmqtt_argv(
        "-v", "aggregator", "--broker", job.broker_url, "--job", job.name, "--prefix", job.prefix,
        "--id", worker, "--spool", str(spool),
    )  # fmt: skip
    return procs.start(name or worker, argv)


def kill(procs: ProcessGroup, name: str) -> None:
    """SIGKILL: no DISCONNECT, no clean-up; the broker publishes the worker's last will."""
    process = procs.processes.pop(name)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def wait_online(job: Job, workers: int) -> None:
    job.view.wait_status(f"{workers} aggregators online", lambda s: (s.aggregators_online or 0) >= workers)


def wait_back(job: Job, worker: str) -> None:
    """The coordinator saw ``worker`` come online a second time."""

    def back() -> bool | None:
        seen = [
            e for e in job.view.events if e.type is EventType.AGGREGATOR_ONLINE and f"aggregator {worker} " in e.detail
        ]
        return True if len(seen) >= 2 else None

    job.view.wait_until(f"{worker} online again", back)


def job_flags(*extra: str) -> list[str]:
    return ["--rounds", "2", "--min-updates", "6", "--round-timeout", "120", "--seed", "7", *extra]


def finish(job: Job, procs: ProcessGroup, workers: list[str]) -> None:
    """The job ends after its last round: the coordinator exits 0 and so does every worker (--exit-on-finish)."""
    process = job.processes[-1]
    job.view.coordinator = None  # its exit is expected now
    assert process.wait(WAIT) == 0, process.log()
    for w in workers:
        assert procs.wait_exit(w) == 0, procs.log(w)


# ------------------------------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("workers", [2, 3])
def test_n_workers_aggregate_exactly_what_one_coordinator_does(
    workers: int,
    mosquitto_broker: Any,
    make_job: Callable[[str], Job],
    mqtt_client: Callable[..., MqttConnection],
    procs: ProcessGroup,
    tmp_path: Path,
) -> None:
    devices = [f"d{i}" for i in range(len(SAMPLES))]
    single = make_job(mosquitto_broker.url)
    scaled = make_job(mosquitto_broker.url)
    wire = Wire(scaled, mqtt_client)
    single.start(*job_flags())
    scaled.start(*job_flags("--aggregators", str(workers), "--partial-timeout", "30"), verbose=True)
    for job in (single, scaled):
        job.devices.online(*devices)

    # No round opens before the workers are online, and the coordinator says so.
    waiting = scaled.view.wait_event(EventType.AGGREGATORS_WAITING)
    assert f"waiting for aggregators: 0 of {workers} online" in waiting.detail
    single.view.wait_plan(1)
    status = scaled.view.wait_status("aggregators needed", lambda s: s.aggregators_needed == workers)
    assert status.phase is Phase.WAITING and status.aggregators_online == 0 and not scaled.view.plans

    names = [f"w{k}" for k in range(1, workers + 1)]
    for w in names:
        start_worker(procs, scaled, w, tmp_path / f"spool-{w}")
    wait_online(scaled, workers)
    scaled.view.wait_plan(1)

    for round_number, seed in ((1, 100), (2, 200)):
        updates = {d: (arrays_for(seed + i), SAMPLES[i]) for i, d in enumerate(devices)}
        for job in (single, scaled):
            job.view.wait_plan(round_number)
            for d, (arrays, n) in updates.items():
                job.devices.send(d, job.frame(round_number, d, arrays=arrays, num_samples=n))
        if round_number == 2:
            single.view.coordinator = scaled.view.coordinator = None  # both exit after this round
        one, many = single.view.wait_summary(round_number), scaled.view.wait_summary(round_number)
        assert sorted(many.participants) == sorted(one.participants) == devices
        assert many.num_samples == one.num_samples == sum(SAMPLES)
        assert many.bytes_up == one.bytes_up > 0 and many.refused == one.refused == {}
        assert many.closed_by == "quorum" and many.attempts == 1
        model_one, _ = single.view.wait_model(round_number + 1)
        model_many, _ = scaled.view.wait_model(round_number + 1)
        for name in model_one:
            np.testing.assert_allclose(model_many[name], model_one[name], rtol=1e-6, atol=1e-7, err_msg=name)

    with wire.lock:
        collects = list(wire.collects)
    assert [(c.round, c.attempt) for c in collects] == [(1, 0), (2, 0)]
    for c in collects:
        listed = [d for held in c.holdings.values() for d in held]
        assert sorted(listed) == devices  # each update summed by exactly one worker
        assert len(c.holdings) >= 2, c.holdings  # the broker shared the updates out
    finish(single, procs, [])
    finish(scaled, procs, names)


def test_central_dp_with_workers_noises_once_and_accounts_as_one_coordinator_does(
    mosquitto_broker: Any,
    make_job: Callable[[str], Job],
    mqtt_client: Callable[..., MqttConnection],
    procs: ProcessGroup,
    tmp_path: Path,
) -> None:
    """Central DP with adaptive clipping: uniform weights, the clip bits of the workers' updates, the server's noise and
    the accountant. The noise differs run to run, so the models are compared to the noise's scale, the privacy spent
    exactly."""
    devices = ["d1", "d2", "d3", "d4"]
    flags = ["--rounds", "1", "--min-updates", "4", "--round-timeout", "120", "--dp-mode", "central", "--dp-clip", "1",
             "--dp-noise-multiplier", "0.3", "--dp-sample-rate", "1.0", "--dp-adaptive-clip", "0.5"]  # fmt: skip
    single, scaled = make_job(mosquitto_broker.url), make_job(mosquitto_broker.url)
    wire = Wire(scaled, mqtt_client)
    single.start(*flags)
    scaled.start(*flags, "--aggregators", "2", verbose=True)
    for w in ("w1", "w2"):
        start_worker(procs, scaled, w, tmp_path / f"spool-{w}")
    per_entry = 1.0 / np.sqrt(float(sum(e.numel for e in MANIFEST)))
    for job in (single, scaled):
        job.devices.online(*devices)
        plan = job.view.wait_plan(1)
        assert plan.dp is not None
        for i, d in enumerate(devices):
            dp = DPAnnouncement(mode="central", clip=plan.dp.clip, noise_std=0.0, unclipped=i < 3)
            job.devices.send(d, job.frame(1, d, 0.5 * per_entry, num_samples=SAMPLES[i], dp=dp))
        job.view.coordinator = None
    one, many = single.view.wait_summary(1), scaled.view.wait_summary(1)
    assert sorted(many.participants) == sorted(one.participants) == devices
    assert many.epsilon is not None and many.epsilon == one.epsilon
    with wire.lock:
        (collect,) = wire.collects
    assert sorted(d for held in collect.holdings.values() for d in held) == devices
    # Uniform weights (not the sample counts) and the fixed denominator: the mean moved every entry by 0.5/sqrt(n),
    # plus the server's Gaussian noise, of the same scale in both jobs (added once, for 4 updates).
    spread = []
    for job in (single, scaled):
        before, _ = job.view.wait_model(1)
        after, _ = job.view.wait_model(2)
        moved = np.concatenate([(after[k] - before[k]).ravel() for k in before])
        spread.append(float(moved.std()))
        assert abs(float(moved.mean()) - 0.5 * per_entry) < 6 * spread[-1] / np.sqrt(moved.size)
    assert spread[0] > 0.05 and abs(spread[1] / spread[0] - 1) < 0.05, spread
    finish(single, procs, [])
    finish(scaled, procs, ["w1", "w2"])


# ------------------------------------------------------------------------------------------------ a worker dies


def start_job_with_two_workers(
    job: Job, procs: ProcessGroup, tmp_path: Path, *flags: str
) -> tuple[list[str], dict[str, Path]]:
    devices = ["d1", "d2", "d3", "d4"]
    spools = {w: tmp_path / f"spool-{w}" for w in ("w1", "w2")}
    job.start(
        "--rounds", "1", "--min-updates", "4", "--aggregators", "2", "--partial-timeout", "20", *flags, verbose=True
    )
    job.devices.online(*devices)
    for w, spool in spools.items():
        start_worker(procs, job, w, spool)
    wait_online(job, 2)
    job.view.wait_plan(1)
    return devices, spools


def test_a_worker_killed_after_acking_and_restarted_with_its_spool_loses_nothing(
    mosquitto_broker: Any,
    make_job: Callable[[str], Job],
    mqtt_client: Callable[..., MqttConnection],
    procs: ProcessGroup,
    tmp_path: Path,
) -> None:
    job = make_job(mosquitto_broker.url)
    wire = Wire(job, mqtt_client)
    devices, spools = start_job_with_two_workers(job, procs, tmp_path)
    updates = {d: (arrays_for(300 + i), SAMPLES[i]) for i, d in enumerate(devices)}
    for d in devices[:2]:
        job.devices.send(d, job.frame(1, d, arrays=updates[d][0], num_samples=updates[d][1]))
    for d in devices[:2]:
        job.view.wait_event(EventType.UPDATE_ACCEPTED, device=d)  # counted: its worker acked and reported it
    victim = wire.wait_holder("d1")
    kill(procs, victim)
    offline = job.view.wait_event(EventType.AGGREGATOR_OFFLINE)
    assert f"aggregator {victim} offline, holding" in offline.detail and "d1" in offline.detail
    start_worker(procs, job, victim, spools[victim], name=f"{victim}-again")
    wait_back(job, victim)
    for d in devices[2:]:
        job.devices.send(d, job.frame(1, d, arrays=updates[d][0], num_samples=updates[d][1]))

    job.view.coordinator = None  # a 1-round job: it exits once the round is aggregated
    summary = job.view.wait_summary(1)
    assert sorted(summary.participants) == devices and summary.attempts == 1
    assert summary.num_samples == sum(n for _, n in updates.values())
    before, _ = job.view.wait_model(1)
    after, _ = job.view.wait_model(2)
    expected = fedavg(list(updates.values()))
    for name in before:
        np.testing.assert_allclose(after[name] - before[name], expected[name], rtol=1e-4, atol=1e-6, err_msg=name)
    with wire.lock:
        (collect,) = wire.collects
    assert victim in collect.holdings and "d1" in collect.holdings[victim]
    finish(job, procs, [f"{victim}-again", "w2" if victim == "w1" else "w1"])


def test_a_worker_dead_at_the_close_fails_the_attempt_which_is_retried_and_the_job_completes(
    mosquitto_broker: Any,
    make_job: Callable[[str], Job],
    mqtt_client: Callable[..., MqttConnection],
    procs: ProcessGroup,
    tmp_path: Path,
) -> None:
    job = make_job(mosquitto_broker.url)
    wire = Wire(job, mqtt_client)
    devices, spools = start_job_with_two_workers(job, procs, tmp_path, "--round-timeout", "15")
    updates = {d: (arrays_for(400 + i), SAMPLES[i]) for i, d in enumerate(devices)}

    def send(d: str) -> None:
        job.devices.send(d, job.frame(1, d, arrays=updates[d][0], num_samples=updates[d][1]))

    for d in devices[:2]:
        send(d)
    for d in devices[:2]:
        job.view.wait_event(EventType.UPDATE_ACCEPTED, device=d)
    victim = wire.wait_holder("d1")
    survivor = "w2" if victim == "w1" else "w1"
    kill(procs, victim)
    job.view.wait_event(EventType.AGGREGATOR_OFFLINE)
    for d in devices[2:]:
        send(d)  # the round closes (quorum, or its deadline if the broker queued one for the dead worker)

    failed = job.view.wait_event(EventType.ROUND_FAILED, round=1, attempt=0)
    assert f"aggregator {victim} went offline holding" in failed.detail and "acknowledged update(s)" in failed.detail
    waiting = job.view.wait_event(EventType.AGGREGATORS_WAITING, timeout=WAIT)
    assert "of 2 online" in waiting.detail
    time.sleep(1.0)
    assert not [p for p in job.view.plans if p.attempt == 1]  # the retry waits for the worker

    start_worker(procs, job, victim, spools[victim], name=f"{victim}-again")
    wait_back(job, victim)
    job.view.wait_plan(1, attempt=1)
    for d in devices:
        send(d)  # the devices answer the new attempt (the same update: a re-delivery where a worker still had it)
    job.view.coordinator = None
    summary = job.view.wait_summary(1)
    assert summary.attempts == 2 and sorted(summary.participants) == devices
    assert summary.num_samples == sum(n for _, n in updates.values())  # nothing of attempt 0 counted again
    before, _ = job.view.wait_model(1)
    after, _ = job.view.wait_model(2)
    expected = fedavg(list(updates.values()))
    for name in before:
        np.testing.assert_allclose(after[name] - before[name], expected[name], rtol=1e-4, atol=1e-6, err_msg=name)
    finish(job, procs, [f"{victim}-again", survivor])


# ------------------------------------------------------------------------------------------------ a hand-played worker


class FakeWorker:
    """A worker played by the test, to send the coordinator exactly the progress and partials a test needs."""

    def __init__(self, job: Job, connection: MqttConnection, name: str = "fake") -> None:
        self.job, self.connection, self.name = job, connection, name
        presence = AggregatorPresence(
            job=job.name, worker=name, instance=new_token(), state="online", since=time.time()
        )
        connection.publish(job.topics.aggregator_status(name), to_json(presence), qos=1, retain=True)

    def report(self, plan: Plan, frames: dict[str, bytes], refused: dict[str, RefusalReason] | None = None) -> None:
        # The refusals first: once both updates are in, the quorum closes the attempt.
        entries = [ProgressEntry(device=d, accepted=False, reason=r, detail="bad") for d, r in (refused or {}).items()]
        entries += [
            ProgressEntry(device=d, accepted=True, header=peek_header(f), bytes=len(f)) for d, f in frames.items()
        ]
        progress = AggregatorProgress(
            job=self.job.name, worker=self.name, run_id=plan.run_id, round=plan.round, attempt=plan.attempt,
            entries=tuple(entries),
        )  # fmt: skip
        self.connection.publish(self.job.topics.aggregator_progress(self.name), to_json(progress), qos=1)

    def partial(self, plan: Plan, updates: dict[str, tuple[ModelArrays, int]]) -> None:
        total = {e.name: np.zeros(e.shape, np.float64) for e in MANIFEST}
        for arrays, n in updates.values():
            for k in total:
                total[k] += arrays[k].astype(np.float64) * n
        info = PartialInfo(
            attempt=plan.attempt,
            run_id=plan.run_id,
            devices=tuple(PartialEntry(device=d, num_samples=n, weight=float(n)) for d, (_, n) in updates.items()),
        )
        frame = encode_frame(
            {k: v.astype(np.float32) for k, v in total.items()},
            kind=FrameKind.PARTIAL_AGGREGATE, job=self.job.name, round=plan.round, sender=self.name, codec=CodecSpec(),
            num_samples=sum(n for _, n in updates.values()), num_updates=len(updates),
            weight=float(sum(n for _, n in updates.values())), run_id=plan.run_id, partial=info,
        )  # fmt: skip
        self.connection.publish(self.job.topics.partial(self.name), frame, qos=1)


def test_the_coordinator_checks_each_partial_and_fails_the_attempt_of_a_silent_or_wrong_worker(
    mosquitto_broker: Any, make_job: Callable[[str], Job], mqtt_client: Callable[..., MqttConnection]
) -> None:
    job = make_job(mosquitto_broker.url)
    wire = Wire(job, mqtt_client)
    job.start("--rounds", "1", "--min-updates", "2", "--aggregators", "1", "--partial-timeout", "3", verbose=True)
    fake = FakeWorker(job, mqtt_client(mosquitto_broker.url))
    job.devices.online("d1", "d2")
    updates = {d: (arrays_for(500 + i), SAMPLES[i]) for i, d in enumerate(("d1", "d2"))}

    def frames() -> dict[str, bytes]:
        return {d: job.frame(1, d, arrays=a, num_samples=n) for d, (a, n) in updates.items()}

    def wait_collect(attempt: int) -> CollectRequest:
        return wire.wait_collect(job, attempt)

    # A progress message on another worker's topic is refused; the worker's own refusals are counted once, here.
    plan = job.view.wait_plan(1)
    bad = AggregatorProgress(job=job.name, worker="fake", round=1, attempt=0,
                             entries=(ProgressEntry(device="d1", accepted=False, reason=RefusalReason.MALFORMED),))  # fmt: skip
    fake.connection.publish(job.topics.aggregator_progress("other"), to_json(bad), qos=1)
    refused = job.view.wait_event(EventType.AGGREGATOR_REFUSED)
    assert "a progress message of aggregator other: it names worker 'fake'" in refused.detail

    # Attempt 0: the worker reports both updates (and refuses a third) but never sends its partial.
    fake.report(plan, frames(), refused={"d3": RefusalReason.NON_FINITE})
    refusal = job.view.wait_refusal("d3", RefusalReason.NON_FINITE)
    assert "(screened by aggregator fake)" in refusal.detail
    assert wait_collect(0).holdings == {"fake": ("d1", "d2")}
    failed = job.view.wait_event(EventType.ROUND_FAILED, attempt=0)
    assert (
        "aggregator fake sent no partial within --partial-timeout 3 s; it held 2 acknowledged update(s) (d1, d2)"
        in (failed.detail)
    )

    # Attempt 1: a partial that sums only d1 is refused, and fails the attempt.
    plan = job.view.wait_plan(1, attempt=1)
    fake.report(plan, frames())
    wait_collect(1)
    fake.partial(plan, {"d1": updates["d1"]})
    refused = job.view.wait_event(EventType.AGGREGATOR_REFUSED, round=1, timeout=WAIT)
    failed = job.view.wait_event(EventType.ROUND_FAILED, attempt=1)
    assert "aggregator fake's partial was refused (devices_mismatch" in failed.detail and "lacking d2" in failed.detail

    # Attempt 2: the right partial; the model moves by exactly the FedAvg of the two updates.
    plan = job.view.wait_plan(1, attempt=2)
    fake.report(plan, frames())
    wait_collect(2)
    fake.partial(plan, updates)
    job.view.coordinator = None
    summary = job.view.wait_summary(1)
    assert summary.attempts == 3 and summary.participants == ("d1", "d2")
    assert summary.num_samples == sum(n for _, n in updates.values())
    assert summary.bytes_up == sum(len(f) for f in frames().values())
    assert summary.refused == {RefusalReason.NON_FINITE: 1}  # the worker's refusal, counted once, by the coordinator
    before, _ = job.view.wait_model(1)
    after, _ = job.view.wait_model(2)
    expected = fedavg(list(updates.values()))
    for name in before:
        np.testing.assert_allclose(after[name] - before[name], expected[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert job.processes[-1].wait(WAIT) == 0


def test_a_coordinator_resumed_in_the_middle_of_an_attempt_abandons_it_and_counts_nothing_twice(
    mosquitto_broker: Any, make_job: Callable[[str], Job], mqtt_client: Callable[..., MqttConnection], tmp_path: Path
) -> None:
    job = make_job(mosquitto_broker.url)
    wire = Wire(job, mqtt_client)
    flags = ["--rounds", "1", "--min-updates", "2", "--aggregators", "1", "--checkpoint-dir", str(tmp_path / "ckpt")]
    first = job.start(*flags, verbose=True)
    fake = FakeWorker(job, mqtt_client(mosquitto_broker.url))
    job.devices.online("d1", "d2")
    updates = {d: (arrays_for(600 + i), SAMPLES[i]) for i, d in enumerate(("d1", "d2"))}
    plan = job.view.wait_plan(1)
    fake.report(plan, {"d1": job.frame(1, "d1", arrays=updates["d1"][0], num_samples=updates["d1"][1])})
    job.view.wait_event(EventType.UPDATE_ACCEPTED, device="d1")
    job.view.coordinator = None
    first.kill()  # SIGKILL: the holdings of attempt 0 (d1, held by the worker) are in no checkpoint

    job.start(*flags, "--resume", verbose=True)
    failed = job.view.wait_event(EventType.ROUND_FAILED, attempt=0)
    assert "resumed in the middle of round 1 attempt 0" in failed.detail
    plan = job.view.wait_plan(1, attempt=1)
    frames = {d: job.frame(1, d, arrays=a, num_samples=n) for d, (a, n) in updates.items()}
    fake.report(plan, frames)
    assert wire.wait_collect(job, 1).holdings == {"fake": ("d1", "d2")}
    fake.partial(plan, updates)
    job.view.coordinator = None
    summary = job.view.wait_summary(1)
    assert summary.attempts == 2 and summary.participants == ("d1", "d2")
    assert summary.num_samples == sum(n for _, n in updates.values())  # d1 once
    assert job.processes[-1].wait(WAIT) == 0


# ------------------------------------------------------------------------------------------------ refused


def test_a_robust_strategy_with_aggregators_is_refused_with_the_reason() -> None:
    started = time.monotonic()
    result = subprocess.run(
        fedmqtt_argv("coordinator", "--broker", closed_port_url(), "--job", "j", "--rounds", "1",
                     "--min-updates", "5", "--strategy", "krum", "--aggregators", "2", "--quiet"),
        capture_output=True, env=subprocess_env(), timeout=60,
    )  # fmt: skip
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "--aggregators: krum cannot combine partial aggregates: it must see every update" in stderr
    assert "fedavg, fedavgm, fedadam, fedyogi" in stderr and "Traceback" not in stderr
    assert time.monotonic() - started < 20  # refused before any connection attempt


# ------------------------------------------------------------------------------------------------ simulate


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("idx"), num_train=400, num_test=200, seed=3)


def _simulate_plan(*argv: str) -> Any:
    from fedmqtt.cli import build_parser
    from fedmqtt.simulate import plan_simulation

    args = build_parser().parse_args(["simulate", *argv])
    return plan_simulation(args, env={}, max_clients_per_process=100, cpu_count=2, now=0.0)


def test_simulate_starts_aggregator_workers_with_the_jobs_limits_and_refuses_them_without_mqtt_5(
    tiny_data: Path, tmp_path: Path
) -> None:
    from fedmqtt.aggregator.cli import options_from_args
    from fedmqtt.cli import build_parser
    from fedmqtt.errors import ConfigError
    from fedmqtt.simulate import aggregator_command, aggregator_ids

    plan = _simulate_plan("--devices", "4", "--rounds", "1", "--data-dir", str(tiny_data), "--aggregators", "2",
                          "--max-update-mb", "3", "--max-update-norm", "50")  # fmt: skip
    assert plan.aggregators == 2 and aggregator_ids(plan) == ["agg-1", "agg-2"]
    assert plan.report_config()["coordinator"]["aggregators"] == 2
    argv = aggregator_command(plan, "mqtt://127.0.0.1:1883", "agg-1", tmp_path / "spool")
    options = options_from_args(build_parser().parse_args(argv[3:]))  # the real worker's parser and checks
    assert (options.job, options.worker, options.spool, options.group) == (
        plan.job,
        "agg-1",
        tmp_path / "spool",
        "fedmqtt",
    )
    assert (options.max_update_bytes, options.max_update_norm, options.exit_on_finish) == (3_000_000, 50.0, True)
    for flags in (["--embedded"], ["--broker", "mqtt://127.0.0.1:1883", "--mqtt-version", "3.1.1"]):
        with pytest.raises(ConfigError, match="--aggregators: aggregator workers share the updates through MQTT 5"):
            _simulate_plan(
                "--devices", "4", "--rounds", "1", "--data-dir", str(tiny_data), "--aggregators", "2", *flags
            )


def test_simulate_with_two_aggregator_workers_trains_the_job(tmp_path: Path, tiny_data: Path) -> None:
    import json

    from fedmqtt.report import REPORT_JSON

    out = tmp_path / "run"
    process = subprocess.run(
        fedmqtt_argv("simulate", "--devices", "4", "--rounds", "3", "--model", "mlp", "--data-dir", str(tiny_data),
                     "--out", str(out), "--lr", "0.1", "--batch-size", "20", "--round-timeout", "60",
                     "--aggregators", "2", "--partial-timeout", "30", "--timeout", "240"),
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )  # fmt: skip
    assert process.returncode == 0, f"{process.stdout}\n{process.stderr}"
    assert "2 aggregator workers" in process.stdout
    # Workers leave when the job ends: that is no failure to report.
    assert "exited with status" not in process.stdout + process.stderr, process.stdout
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["config"]["aggregators"] == 2
    assert [r["participants"] for r in report["rounds"]] == [4, 4, 4]
    assert report["totals"]["phase"] == "finished" and report["totals"]["final_accuracy"] > 0.3
    for worker in ("agg-1", "agg-2"):
        log = (out / f"{worker}.log").read_text()
        assert "partial of" in log, log  # each worker summed a share of some round
