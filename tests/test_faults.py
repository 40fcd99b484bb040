"""Fault injection: what fedmqtt must survive (issue 9), each fault against real Mosquitto, a real coordinator and,
where the fault needs a device's own behaviour, real ``fedmqtt device`` processes. Each test is bounded in time.

Only one fault is injected with a mock: an unexpected exception while handling one frame (the poison pill), by
patching the strategy's ``add`` of a coordinator run in this process; everything else is the real thing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmqtt.mqtt import ClientSettings, MqttConnection, Will
from fedmqtt.schema import DeviceStatus, EventType, Phase, Plan, RefusalReason, new_token, to_json
from fedmqtt.topics import Topics
from harness import (
    MODEL,
    WAIT,
    CoordinatorProcess,
    Job,
    JobView,
    expected_average,
    fedmqtt_argv,
    start_device_with_a_last_will,
    subprocess_env,
    with_header_field,
)

pytestmark = [pytest.mark.mosquitto, pytest.mark.service]

F32_MAX = float(np.finfo(np.float32).max)
R = RefusalReason


def no_traceback(*processes: CoordinatorProcess) -> None:
    for process in processes:
        assert "Traceback" not in process.log(), process.log()


def finite(arrays: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in arrays.values())


def model_moved_by(before: dict[str, np.ndarray], after: dict[str, np.ndarray], delta: float) -> None:
    for name, old in before.items():
        np.testing.assert_allclose(after[name], old + np.float32(delta), rtol=0, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------------------------------ 1. numeric poison


def test_numeric_poison_is_refused_and_a_kill_and_resume_does_not_crash_loop(
    mosquitto_broker: Any, make_job: Callable[[str], Job], tmp_path: Path
) -> None:
    job = make_job(mosquitto_broker.url)
    flags = ("--rounds", "2", "--min-updates", "2", "--min-devices", "3", "--round-timeout", "60",
             "--max-update-norm", "1000",
             "--checkpoint-dir", str(tmp_path / "ckpt"))  # fmt: skip
    first = job.start(*flags)
    job.devices.online("d1", "d2", "d3")
    plan = job.view.wait_plan(1)
    assert plan.selected == ("d1", "d2", "d3") and plan.max_samples == 10_000_000
    model_1, _ = job.view.wait_model(1)

    job.devices.send("d1", job.frame(1, "d1", F32_MAX))  # finite in float32, norm ~1e43
    job.devices.send("d1", job.frame(1, "d1", 0.01, num_samples=2**40))
    assert "--max-update-norm 1000" in job.view.wait_refusal("d1", R.NORM_TOO_LARGE).detail
    job.view.wait_refusal("d1", R.BAD_SAMPLE_COUNT)
    job.devices.send("d2", job.frame(1, "d2", 0.01, num_samples=10))
    job.devices.send("d3", job.frame(1, "d3", 0.03, num_samples=30))
    summary = job.view.wait_summary(1)
    assert summary.participants == ("d2", "d3")
    assert summary.refused == {R.NORM_TOO_LARGE: 1, R.BAD_SAMPLE_COUNT: 1}
    model_2, _ = job.view.wait_model(2)
    model_moved_by(model_1, model_2, expected_average([(0.01, 10), (0.03, 30)]))

    # Round 2: an honest update, the poison again, then kill -9 and --resume.
    job.view.wait_plan(2)
    job.devices.send("d2", job.frame(2, "d2", 0.01))
    job.view.wait_event(EventType.UPDATE_ACCEPTED, device="d2", round=2)
    job.devices.send("d1", job.frame(2, "d1", F32_MAX))
    job.view.wait_event(EventType.UPDATE_REFUSED, device="d1", round=2, reason=R.NORM_TOO_LARGE)
    assert first.running()
    first.kill()
    second = job.start(*flags, "--resume")
    job.view.wait_event(EventType.MODEL_PUBLISHED, detail="resumed from checkpoint at round 2")
    job.devices.send("d3", job.frame(2, "d3", 0.01))
    summary_2 = job.view.wait_summary(2)
    assert summary_2.participants == ("d2", "d3")  # d2 counted once, from the spool
    job.view.wait_event(EventType.JOB_FINISHED)
    assert second.wait(timeout=WAIT) == 0
    no_traceback(first, second)


# ------------------------------------------------------------------------------------------ 2. aggregate overflow


def test_a_non_finite_aggregate_fails_the_attempt_and_the_round_is_retried(
    mosquitto_broker: Any, make_job: Callable[[str], Job], tmp_path: Path
) -> None:
    """Two updates near float32 max, each within every per-update check, with FedAvg's server_lr 2: the step
    (2 x 0.75 x max) overflows float32. The attempt fails, the retry closes with honest updates."""
    job = make_job(mosquitto_broker.url)
    config = tmp_path / "job.toml"
    config.write_text("[coordinator]\nstrategy_params = { server_lr = 2.0 }\n")
    process = job.start("--config", str(config), "--rounds", "1", "--min-updates", "2", "--round-timeout", "60")
    job.devices.online("d1", "d2")
    job.view.wait_plan(1)
    model_1, _ = job.view.wait_model(1)
    for device in ("d1", "d2"):
        job.devices.send(device, job.frame(1, device, 0.75 * F32_MAX))
    failed = job.view.wait_event(EventType.ROUND_FAILED, round=1, attempt=0)
    assert "aggregation failed" in failed.detail and "NaN or infinity" in failed.detail
    job.view.wait_plan(1, attempt=1)
    # The retry goes on without the offending update: the same update again is refused on its own.
    job.devices.send("d1", job.frame(1, "d1", 0.75 * F32_MAX))
    refused = job.view.wait_event(EventType.UPDATE_REFUSED, device="d1", reason=RefusalReason.NORM_TOO_LARGE)
    assert "applied alone" in refused.detail
    for device in ("d1", "d2"):
        job.devices.send(device, job.frame(1, device, 0.01))
    summary = job.view.wait_summary(1)
    assert summary.attempts == 2 and summary.participants == ("d1", "d2")
    model_2, _ = job.view.wait_model(2)
    assert finite(model_2)
    model_moved_by(model_1, model_2, 2 * 0.01)  # server_lr 2; the failed step left no trace
    assert all(finite(arrays) for _, arrays, _ in job.view.models)
    job.view.wait_event(EventType.JOB_FINISHED)
    assert process.wait(timeout=WAIT) == 0
    no_traceback(process)


def test_one_device_with_huge_finite_values_cannot_stop_the_job(
    mosquitto_broker: Any, make_job: Callable[[str], Job]
) -> None:
    """Without --max-update-norm: a selected device sends values of 0.75 x float32 max in every attempt. FedAvg
    weights them by num_samples (10) and the product overflows, so the aggregate is not finite. The offending
    update can be identified (it alone overflows); the issue asks that the retry go on without it, so the honest
    device's updates close the round and the job finishes."""
    job = make_job(mosquitto_broker.url)
    process = job.start("--rounds", "1", "--min-updates", "2", "--min-updates-at-deadline", "1", "--round-timeout", "4",
                        "--max-attempts", "3")  # fmt: skip
    job.devices.online("d1", "d2")
    job.view.coordinator = None  # the job may stop after its last attempt: its end is read below

    def closed_or_failed(attempt: int) -> object | None:
        failed = (e for e in job.view.events if e.type is EventType.ROUND_FAILED and e.attempt == attempt)
        return job.view.summaries.get(1) or next(failed, None)

    for attempt in range(3):
        plan = job.view.wait_plan(1, attempt=attempt)
        if "d1" in plan.selected:
            job.devices.send("d1", job.frame(1, "d1", 0.75 * F32_MAX))
        job.devices.send("d2", job.frame(1, "d2", 0.01))
        job.view.wait_until(f"attempt {attempt} to close or fail", lambda a=attempt: closed_or_failed(a))
        if 1 in job.view.summaries:
            break
    code = process.wait(timeout=WAIT)
    failures = [e.detail for e in job.view.events if e.type is EventType.ROUND_FAILED]
    assert code == 0 and 1 in job.view.summaries, f"exit {code}; round failures: {failures}\n{process.log()}"
    assert "d2" in job.view.summaries[1].participants
    no_traceback(process)


# ------------------------------------------------------------------------------------------ 3. poison pills

POISON = 0.0123  # the value of the update whose handling raises


@pytest.fixture
def in_process_coordinator(
    mosquitto_broker: Any, make_job: Callable[[str], Job], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Job, Any, dict[str, Any]]]:
    """A CoordinatorService run in a thread against the real broker, its strategy's ``add`` raising for the
    update of value POISON (the only mock of this module: it injects the fault)."""
    from fedmqtt.coordinator.config import CoordinatorConfig
    from fedmqtt.coordinator.service import CoordinatorService

    job = make_job(mosquitto_broker.url)
    config = CoordinatorConfig(
        broker=mosquitto_broker.url, job=job.name, prefix=job.prefix, model=MODEL, rounds=1, min_updates=2,
        min_devices=3, round_timeout=60, checkpoint_dir=tmp_path / "ckpt", quiet=True,
    )  # fmt: skip
    service = CoordinatorService(config)
    real_add = service.strategy.add

    def add(arrays: Any, weight: float) -> None:
        if next(iter(arrays.values())).flat[0] == np.float32(POISON):
            raise RuntimeError("injected fault in the strategy")
        real_add(arrays, weight)

    monkeypatch.setattr(service.strategy, "add", add)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["code"] = service.run()
        except BaseException as exc:  # reported by the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield job, service, result
    finally:
        if thread.is_alive():
            service.exit_code = 1  # ends the run loop
        thread.join(timeout=15)
    result["thread_alive"] = thread.is_alive()


def test_an_exception_handling_one_frame_refuses_and_quarantines_it(
    in_process_coordinator: tuple[Job, Any, dict[str, Any]], tmp_path: Path
) -> None:
    job, _, result = in_process_coordinator
    job.devices.online("d1", "d2", "d3")
    job.view.wait_plan(1)
    poisoned = job.frame(1, "d1", POISON)
    job.devices.send("d1", poisoned)
    event = job.view.wait_refusal("d1", R.INTERNAL_ERROR)
    assert "RuntimeError: injected fault in the strategy" in event.detail and "quarantined in" in event.detail
    quarantine = tmp_path / "ckpt" / "quarantine"
    (frame_file,) = quarantine.glob("*.frame")
    assert frame_file.read_bytes() == poisoned
    assert "RuntimeError: injected fault" in frame_file.with_suffix(".txt").read_text()
    job.devices.send("d2", job.frame(1, "d2", 0.01))
    job.devices.send("d3", job.frame(1, "d3", 0.02))
    summary = job.view.wait_summary(1)
    assert summary.participants == ("d2", "d3") and summary.refused == {R.INTERNAL_ERROR: 1}
    job.view.wait_event(EventType.JOB_FINISHED)
    deadline = time.monotonic() + WAIT
    while "code" not in result and "error" not in result and time.monotonic() < deadline:
        time.sleep(0.05)
    assert result.get("code") == 0, result


def test_a_frame_that_ended_a_replay_is_quarantined_on_resume(
    mosquitto_broker: Any, make_job: Callable[[str], Job], tmp_path: Path
) -> None:
    """The crash loop: a spooled frame named by the replay marker (what a process that died while replaying it
    leaves) is quarantined by --resume instead of replayed again; the job finishes."""
    from fedmqtt.coordinator.durability import QUARANTINE_DIR, REPLAY_MARKER, SPOOL_DIR

    ckpt = tmp_path / "ckpt"
    job = make_job(mosquitto_broker.url)
    flags = ("--rounds", "1", "--min-updates", "2", "--min-devices", "3", "--round-timeout", "60",
             "--checkpoint-dir", str(ckpt))  # fmt: skip
    first = job.start(*flags)
    job.devices.online("d1", "d2", "d3")
    job.view.wait_plan(1)
    culprit = job.frame(1, "d1", 0.01)
    job.devices.send("d1", culprit)
    job.view.wait_event(EventType.UPDATE_ACCEPTED, device="d1")
    time.sleep(0.5)  # the coordinator acknowledges a frame once handled: no redelivery of it after the kill
    first.kill()
    spooled = ckpt / SPOOL_DIR / "1-0" / "d1.frame"
    assert spooled.read_bytes() == culprit
    (ckpt / SPOOL_DIR / REPLAY_MARKER).write_text("d1.frame")  # as a replay that ended the process leaves it

    second = job.start(*flags, "--resume")
    event = job.view.wait_refusal("d1", R.INTERNAL_ERROR)
    assert "ended while replaying" in event.detail
    assert [p.read_bytes() for p in (ckpt / QUARANTINE_DIR).glob("*.frame")] == [culprit]
    assert not spooled.exists() and not (ckpt / SPOOL_DIR / REPLAY_MARKER).exists()
    job.devices.send("d2", job.frame(1, "d2", 0.01))
    job.devices.send("d3", job.frame(1, "d3", 0.01))
    assert job.view.wait_summary(1).participants == ("d2", "d3")
    job.view.wait_event(EventType.JOB_FINISHED)
    assert second.wait(timeout=WAIT) == 0
    no_traceback(second)


def test_an_update_that_ended_the_process_live_is_quarantined_when_the_broker_delivers_it_again(
    mosquitto_broker: Any, make_job: Callable[[str], Job], tmp_path: Path
) -> None:
    """The live crash loop: the coordinator dies while handling an update it has not acknowledged, so the broker
    delivers it again to every restart. The digest it left in CHECKPOINT/in-hand makes --resume refuse and
    quarantine that update instead of handling it; the round closes with the others."""
    import hashlib

    from fedmqtt.coordinator.durability import IN_HAND_MARKER, QUARANTINE_DIR

    ckpt = tmp_path / "ckpt"
    job = make_job(mosquitto_broker.url)
    flags = ("--rounds", "1", "--min-updates", "2", "--min-devices", "3", "--round-timeout", "60",
             "--checkpoint-dir", str(ckpt))  # fmt: skip
    first = job.start(*flags)
    job.devices.online("d1", "d2", "d3")
    job.view.wait_plan(1)
    deadline = time.monotonic() + 30
    while not (ckpt / "coordinator.npz").exists():  # the open round is checkpointed: --resume resumes it
        assert time.monotonic() < deadline, "no checkpoint of the open round"
        time.sleep(0.05)
    first.kill()
    culprit = job.frame(1, "d1", 0.01)
    # What a process that died handling this frame leaves behind; the frame itself waits, unacknowledged, in the
    # coordinator's persistent session at the broker.
    (ckpt / IN_HAND_MARKER).write_text(hashlib.blake2b(culprit, digest_size=16).hexdigest())
    job.devices.send("d1", culprit)

    second = job.start(*flags, "--resume")
    event = job.view.wait_refusal("d1", R.INTERNAL_ERROR)
    assert "ended while handling this very update" in event.detail
    assert [p.read_bytes() for p in (ckpt / QUARANTINE_DIR).glob("*.frame")] == [culprit]
    assert not (ckpt / IN_HAND_MARKER).exists()
    job.devices.send("d2", job.frame(1, "d2", 0.01))
    job.devices.send("d3", job.frame(1, "d3", 0.01))
    assert job.view.wait_summary(1).participants == ("d2", "d3")
    job.view.wait_event(EventType.JOB_FINISHED)
    assert second.wait(timeout=WAIT) == 0
    no_traceback(second)


# ------------------------------------------------------------------------------------------ 4. base model


def test_an_update_on_another_base_model_is_refused(mosquitto_broker: Any, make_job: Callable[[str], Job]) -> None:
    job = make_job(mosquitto_broker.url)
    process = job.start("--rounds", "1", "--min-updates", "1", "--round-timeout", "60")
    job.devices.online("d1")
    plan = job.view.wait_plan(1)
    job.devices.send("d1", job.frame(1, "d1", 0.01, base_model_hash="0" * 64))
    event = job.view.wait_refusal("d1", R.WRONG_BASE_MODEL)
    assert event.round == 1 and event.detail
    job.devices.send("d1", job.frame(1, "d1", 0.01, base_model_hash=plan.model_hash))
    assert job.view.wait_summary(1).refused == {R.WRONG_BASE_MODEL: 1}
    assert process.wait(timeout=WAIT) == 0


# ------------------------------------------------------------------------------------------ 5. broker restart


class ReconnectingDevice:
    """A device's MQTT connection as a real device has it: persistent session, a last will (retained
    ``offline``), reconnects with backoff and republishes ``online`` on every (re)connect."""

    def __init__(self, url: str, topics: Topics, device: str) -> None:
        self.topics = topics
        self.device = device
        self.instance = new_token()
        offline = to_json(DeviceStatus(device=device, state="offline", instance=self.instance))
        self.connection = MqttConnection(
            ClientSettings.from_url(
                url, client_id=f"{device}-{uuid.uuid4().hex[:6]}", clean_start=False, reconnect_max_delay=1.0,
                will=Will(topics.device_status(device), offline),
            ),
            on_connected=lambda session_present: self._connected.set(),
        )  # fmt: skip
        self._connected = threading.Event()
        self._closed = False
        self.connection.connect(timeout=10)
        threading.Thread(target=self._announce, daemon=True).start()

    def _announce(self) -> None:
        # Not from the callback itself (the client refuses publishes from its network thread).
        while not self._closed:
            if self._connected.wait(0.2):
                self._connected.clear()
                status = DeviceStatus(device=self.device, state="online", ts=time.time(), instance=self.instance)
                topic = self.topics.device_status(self.device)
                self.connection.publish(topic, to_json(status), retain=True, wait=False)

    def close(self) -> None:
        self._closed = True
        self.connection.close()

    def send(self, frame: bytes) -> None:
        self.connection.publish(self.topics.update(self.device), frame, qos=1)

    def wait_connected(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.connection.is_connected:
            assert time.monotonic() < deadline, f"{self.device} did not reconnect within {timeout} s"
            time.sleep(0.05)


def test_a_broker_restart_mid_round_loses_no_acknowledged_update(
    mosquitto_factory: Callable[..., Any], make_job: Callable[[str], Job]
) -> None:
    broker = mosquitto_factory(persistence=True)
    job = make_job(broker.url)
    process = job.start("--rounds", "1", "--min-updates", "4", "--round-timeout", "50", verbose=True)
    names = ("d1", "d2", "d3", "d4")
    devices = {name: ReconnectingDevice(broker.url, job.topics, name) for name in names}
    try:
        plan = job.view.wait_plan(1)
        assert set(plan.selected) == set(names)
        for name in ("d1", "d2"):
            devices[name].send(job.frame(1, name, 0.01))  # returns once the broker acknowledged it
        job.view.wait_event(EventType.UPDATE_ACCEPTED, device="d2")
        job.view.wait_event(EventType.UPDATE_ACCEPTED, device="d1")
        broker.stop()  # SIGTERM: Mosquitto saves its persistence database
        time.sleep(6)
        broker.start()  # same port, same data directory
        assert process.running(), f"the coordinator ended the job while the broker restarted:\n{process.log()}"
        for name in ("d3", "d4"):
            devices[name].wait_connected(timeout=15)
            devices[name].send(job.frame(1, name, 0.01))
        summary = job.view.wait_summary(1)
        assert time.time() < plan.deadline  # sent and counted before the deadline
        assert set(summary.participants) == set(names), summary
        assert summary.refused == {}  # nothing refused as stale
        final = job.view.wait_status("phase finished", lambda s: s.phase is Phase.FINISHED)
        assert final.devices_online == 4  # no device marked offline for good
        assert process.wait(timeout=WAIT) == 0
        no_traceback(process)
    finally:
        for device in devices.values():
            device.close()


# ------------------------------------------------------------------------------------------ 6. two coordinators


def test_a_second_coordinator_refuses_to_run_beside_a_live_one(
    mosquitto_broker: Any, make_job: Callable[[str], Job]
) -> None:
    job = make_job(mosquitto_broker.url)
    first = job.start("--rounds", "2", "--min-updates", "1", "--round-timeout", "60")
    job.devices.online("d1")
    job.view.wait_plan(1)
    time.sleep(1.5)  # a heartbeat or two of the first one's status
    second = job.start("--rounds", "2", "--min-updates", "1", "--round-timeout", "60")
    job.view.coordinator = first
    assert second.wait(timeout=30) != 0
    assert "another coordinator is running job" in second.log()
    assert first.running()
    for round_number in (1, 2):
        job.view.wait_plan(round_number)
        job.devices.send("d1", job.frame(round_number, "d1", 0.01))
        job.view.wait_summary(round_number)
    job.view.wait_event(EventType.JOB_FINISHED)
    assert first.wait(timeout=WAIT) == 0
    assert [p.round for p in job.view.plans] == [1, 2]
    no_traceback(first, second)


def test_take_over_stops_the_old_coordinator_and_rounds_never_go_backwards(
    mosquitto_broker: Any, make_job: Callable[[str], Job], tmp_path: Path
) -> None:
    job = make_job(mosquitto_broker.url)
    flags = ("--rounds", "3", "--min-updates", "1", "--round-timeout", "60", "--checkpoint-dir", str(tmp_path / "c"))
    old = job.start(*flags)
    job.devices.online("d1")
    job.view.wait_plan(1)
    job.devices.send("d1", job.frame(1, "d1", 0.01))
    job.view.wait_summary(1)
    job.view.wait_plan(2)
    time.sleep(1.5)
    new = job.start(*flags, "--resume", "--take-over")
    assert old.wait(timeout=30) == 0  # it stops cleanly
    assert "took over job" in old.log()
    for round_number in (2, 3):
        job.view.wait_plan(round_number)
        job.devices.send("d1", job.frame(round_number, "d1", 0.01))
        job.view.wait_summary(round_number)
    job.view.wait_event(EventType.JOB_FINISHED)
    assert new.wait(timeout=WAIT) == 0
    rounds = [p.round for p in job.view.plans]
    assert rounds == sorted(rounds) and rounds[-1] == 3, rounds
    assert sorted(job.view.summaries) == [1, 2, 3]
    assert len({s.run_id for s in job.view.summaries.values()}) == 1  # one run, taken over
    no_traceback(old, new)


# ------------------------------------------------------------------------------------------ 7. stale retained state


def test_a_stale_retained_plan_for_an_unknown_model_does_not_stop_a_real_job(
    mosquitto_broker: Any, make_job: Callable[[str], Job], tmp_path: Path
) -> None:
    from fedmqtt.data import write_idx_dataset
    from fedmqtt.schema import CodecSpec

    data = write_idx_dataset(tmp_path / "data", num_train=200, num_test=50, seed=3)
    job = make_job(mosquitto_broker.url)
    bogus = Plan(job=job.name, round=1, selected=("d1", "d2"), deadline=time.time() + 3600, issued_at=time.time(),
                 local_epochs=1, batch_size=20, learning_rate=0.1, uplink=CodecSpec(), model_name="no-such-model",
                 model_hash="f" * 64)  # fmt: skip
    job.devices.connection.publish(job.topics.plan, to_json(bogus), qos=1, retain=True)
    devices: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(2):
            with open(tmp_path / f"device-{i}.log", "wb") as log:
                devices.append(subprocess.Popen(
                    fedmqtt_argv("device", "--broker", mosquitto_broker.url, "--job", job.name, "--prefix",
                                 job.prefix, "--id", f"d{i + 1}", "--data-dir", str(data), "--partition", "iid",
                                 "--num-parts", "2", "--part", str(i), "--threads", "1", "--exit-on-finish"),
                    stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True,
                ))  # fmt: skip
        time.sleep(3)  # the devices read the stale plan first
        process = job.start("--rounds", "1", "--min-updates", "2", "--round-timeout", "50", "--uplink", "int8")
        summary = job.view.wait_summary(1)
        assert set(summary.participants) == {"d1", "d2"}
        assert process.wait(timeout=WAIT) == 0
        for device in devices:
            assert device.wait(timeout=WAIT) == 0
    finally:
        for device in devices:
            if device.poll() is None:
                os.killpg(device.pid, signal.SIGKILL)
                device.wait()
        for i in range(len(devices)):
            print(f"--- device {i}\n{(tmp_path / f'device-{i}.log').read_text(errors='replace')[-2000:]}")


def test_a_rerun_of_a_finished_job_clears_the_old_runs_retained_summaries(
    mosquitto_broker: Any, make_job: Callable[[str], Job], mqtt_client: Callable[..., MqttConnection]
) -> None:
    job = make_job(mosquitto_broker.url)
    first = job.start("--rounds", "3", "--min-updates", "1", "--round-timeout", "60")
    job.devices.online("d1")
    for round_number in (1, 2, 3):
        job.view.wait_plan(round_number)
        job.devices.send("d1", job.frame(round_number, "d1", 0.01))
        job.view.wait_summary(round_number)
    assert first.wait(timeout=WAIT) == 0
    old_run = job.view.summaries[3].run_id
    assert old_run is not None

    # A fresh view, so that the second run's messages are told apart from the first's.
    job.view.close()
    job.view = JobView(job.broker_url, job.topics)
    second = job.start("--rounds", "1", "--min-updates", "1", "--round-timeout", "60")
    plan = job.view.wait_until("a plan of a new run", lambda: next(
        (p for p in job.view.plans if p.run_id not in (None, old_run)), None))  # fmt: skip
    retained: list[str] = []
    mqtt_client(job.broker_url, subscriptions=[(job.topics.rounds_filter, 1)],
                on_message=lambda t, p, q, r, m: retained.append(t) if r and p else None)  # fmt: skip
    time.sleep(1.5)
    assert retained == [], "the old run's round summaries are still retained"
    job.devices.send("d1", job.frame(1, "d1", 0.01))
    summary = job.view.wait_until("the new run's summary", lambda: next(
        (s for s in job.view.summaries.values() if s.run_id == plan.run_id), None))  # fmt: skip
    assert summary.round == 1
    assert second.wait(timeout=WAIT) == 0
    # The view subscribed before the new run started, so it also holds the old run's retained summaries.
    assert [r for r, s in job.view.summaries.items() if s.run_id == plan.run_id] == [1]
    assert plan.run_id != old_run and all(p.run_id == plan.run_id for p in job.view.plans if p.run_id != old_run)


# ------------------------------------------------------------------------------------------ 8. duplicate ids


def test_two_processes_with_one_device_id_are_reported(mosquitto_broker: Any, make_job: Callable[[str], Job]) -> None:
    job = make_job(mosquitto_broker.url)
    process = job.start("--rounds", "1", "--min-updates", "2", "--round-timeout", "60")
    job.view.wait_status("the job waiting", lambda s: s.phase is Phase.WAITING)
    a, b = new_token(), new_token()
    for instance in (a, b, a, b):
        status = DeviceStatus(device="d1", state="online", ts=time.time(), instance=instance)
        job.devices.connection.publish(job.topics.device_status("d1"), to_json(status), qos=1, retain=True)
        time.sleep(0.2)
    event = job.view.wait_event(EventType.DEVICE_DUPLICATE, device="d1")
    assert a in event.detail and b in event.detail
    assert process.running()


# ------------------------------------------------------------------------------------------ 9. already held


def test_kill_and_resume_counts_each_accepted_update_once(
    mosquitto_broker: Any, make_job: Callable[[str], Job], tmp_path: Path
) -> None:
    job = make_job(mosquitto_broker.url)
    flags = ("--rounds", "1", "--min-updates", "3", "--min-devices", "3", "--round-timeout", "60",
             "--checkpoint-dir", str(tmp_path / "c"))  # fmt: skip
    first = job.start(*flags)
    job.devices.online("d1", "d2", "d3")
    job.view.wait_plan(1)
    job.devices.send("d1", job.frame(1, "d1", 0.01, num_samples=10))
    job.view.wait_event(EventType.UPDATE_ACCEPTED, device="d1")
    first.kill()
    second = job.start(*flags, "--resume")
    job.view.wait_event(EventType.MODEL_PUBLISHED, detail="resumed from checkpoint at round 1")
    second.kill()  # twice in a row
    job.devices.send("d2", job.frame(1, "d2", 0.02, num_samples=10))  # queued in the coordinator's session
    third = job.start(*flags, "--resume")
    job.view.wait_event(EventType.UPDATE_ACCEPTED, device="d2")
    job.devices.send("d1", job.frame(1, "d1", 0.01, num_samples=10))  # a re-send: a redelivery, not counted
    job.devices.send("d3", job.frame(1, "d3", 0.03, num_samples=10))
    summary = job.view.wait_summary(1)
    assert sorted(summary.participants) == ["d1", "d2", "d3"] and summary.num_samples == 30
    assert third.wait(timeout=WAIT) == 0


def test_a_last_will_shrinks_the_round(mosquitto_broker: Any, make_job: Callable[[str], Job]) -> None:
    job = make_job(mosquitto_broker.url)
    job.start("--rounds", "1", "--min-updates", "2", "--round-timeout", "60")
    doomed = start_device_with_a_last_will(mosquitto_broker.url, job.topics, "d2")
    try:
        job.devices.online("d1", "d2")
        assert doomed.stdout is not None and b'"online"' in doomed.stdout.readline()
        job.view.wait_plan(1)
        job.devices.send("d1", job.frame(1, "d1"))
        job.view.wait_event(EventType.UPDATE_ACCEPTED, device="d1")
        doomed.send_signal(signal.SIGKILL)
        job.view.wait_event(EventType.DEVICES_OFFLINE, devices=("d2",))  # presence events are batched
        summary = job.view.wait_summary(1)
    finally:
        if doomed.poll() is None:
            doomed.kill()
        doomed.wait()
    assert summary.participants == ("d1",) and summary.seconds < 30


def test_malformed_truncated_and_random_payloads_are_refused_with_reasons(
    mosquitto_broker: Any, make_job: Callable[[str], Job]
) -> None:
    job = make_job(mosquitto_broker.url)
    process = job.start("--rounds", "1", "--min-updates", "1", "--round-timeout", "60")
    job.devices.online("d1")
    job.view.wait_plan(1)
    good = job.frame(1, "d1", 0.01)
    rng = np.random.default_rng(9)
    junk = [good[: len(good) // 2], rng.bytes(2000), b'{"round": 1}', b"", with_header_field(good, "round", "x")]
    for payload in junk:
        job.devices.send("d1", payload)
    status = job.view.wait_status(f"{len(junk)} refusals", lambda s: s.refused_total == len(junk))
    assert status.phase is Phase.TRAINING
    refusals = [e for e in job.view.update_events("d1") if e.type is EventType.UPDATE_REFUSED]
    assert len(refusals) == len(junk) and all(e.reason is R.MALFORMED and e.detail for e in refusals)
    job.devices.send("d1", good)
    assert job.view.wait_summary(1).participants == ("d1",)
    assert process.wait(timeout=WAIT) == 0


def test_a_wrong_ca_is_refused_with_a_clear_error(secure_mosquitto: Any, tmp_path: Path) -> None:
    from fedmqtt.broker.certs import generate_test_certificates

    other = generate_test_certificates(tmp_path / "other-ca")
    result = subprocess.run(
        fedmqtt_argv("coordinator", "--broker", secure_mosquitto.url_for("coordinator"), "--tls-ca",
                     str(other.ca_cert), "--job", "j", "--rounds", "1", "--min-updates", "1", "--model", MODEL,
                     "--quiet"),
        capture_output=True, text=True, env=subprocess_env(), timeout=WAIT,
    )  # fmt: skip
    assert result.returncode == 1
    assert "certificate verify failed" in result.stderr and "Traceback" not in result.stderr
    assert "password" not in result.stderr.lower() or secure_mosquitto.passwords["coordinator"] not in result.stderr
