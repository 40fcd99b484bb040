"""SIGTERM and SIGINT: the coordinator pauses its job (checkpoint, ``job_stopped`` event and status, exit
128 + signal) so that ``--resume`` continues it; a device publishes its offline status and exits 0.

Containers depend on this: ``docker compose stop`` sends SIGTERM, and a restarted coordinator container runs the
same command (with ``--resume``) again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedmqtt.coordinator.durability import Durability
from fedmqtt.coordinator.machine import (
    JobStopped,
    RoundConfig,
    RoundMachine,
    Stage,
    StatusChanged,
    StopCause,
)
from fedmqtt.schema import DeviceStatus, EventType, Phase, from_json
from harness import WAIT, Job, assert_model_moved_by, expected_average, fedmqtt_argv, subprocess_env

# --------------------------------------------------------------------------------------------- the machine


def _training_machine() -> RoundMachine:
    m = RoundMachine(RoundConfig(job="j", rounds=3, min_updates=2, round_timeout=60.0, min_devices=2, seed=1))
    m.start(0.0)
    m.device_status("d1", "online", 1.0)
    m.device_status("d2", "online", 1.0)
    assert m.stage is Stage.TRAINING and m.round == 1
    return m


def test_a_stop_by_signal_is_a_pause_its_checkpoint_resumes_the_round() -> None:
    m = _training_machine()
    before = m.state_dict()
    actions = m.stop("stopped by SIGTERM", 5.0, cause=StopCause.SIGNAL)
    assert actions == [JobStopped("stopped by SIGTERM", StopCause.SIGNAL), StatusChanged()]
    assert m.done and m.phase is Phase.STOPPED and m.end_cause is StopCause.SIGNAL
    assert StopCause.SIGNAL.resumable and not StopCause.SIGNAL.by_rule
    # The checkpoint is the state it stopped from: loaded again, the same round is open with the same deadline.
    assert m.state_dict() == before
    resumed = RoundMachine.from_state_dict(m.config, m.state_dict())
    assert resumed.stage is Stage.TRAINING and not resumed.done and resumed.end_cause is None
    assert (resumed.round, resumed.deadline, resumed.selected) == (1, m.config.round_timeout + 1.0, ("d1", "d2"))
    m.state_dict()["round"] = 99  # a copy: the pause point cannot be changed through it
    assert m.state_dict() == before


@pytest.mark.parametrize("cause", [c for c in StopCause if not c.resumable])
def test_other_stops_end_the_job_for_good(cause: StopCause) -> None:
    m = _training_machine()
    m.stop("over", 5.0, cause=cause)
    state = m.state_dict()
    assert state["stage"] == Stage.STOPPED.value and state["end_cause"] == cause.value
    assert RoundMachine.from_state_dict(m.config, state).done


# --------------------------------------------------------------------------------------------- the coordinator


@pytest.mark.e2e
def test_sigterm_checkpoints_publishes_job_stopped_and_resume_continues(
    mosquitto_broker: Any, make_job: Callable[[str], Job], tmp_path: Path
) -> None:
    job = make_job(mosquitto_broker.url)
    ckpt = tmp_path / "ckpt"
    flags = ("--rounds", "2", "--min-updates", "2", "--round-timeout", "120", "--checkpoint-dir", str(ckpt))
    first = job.start(*flags)
    job.devices.online("d1", "d2")
    job.view.wait_plan(1)
    job.devices.send("d1", job.frame(1, "d1", 0.01, num_samples=10))
    job.view.wait_event(EventType.UPDATE_ACCEPTED, device="d1")
    job.view.coordinator = None  # its exit is expected now

    started = time.monotonic()
    first.process.send_signal(signal.SIGTERM)
    assert first.wait(timeout=WAIT) == 128 + signal.SIGTERM, first.log()
    assert time.monotonic() - started < 10  # within docker stop's default grace period
    stopped = job.view.wait_event(EventType.JOB_STOPPED)
    assert stopped.detail == "stopped by SIGTERM at round 1; --resume continues the job"
    status = job.view.wait_status("phase stopped", lambda s: s.phase is Phase.STOPPED)
    assert status.round == 1 and status.rounds_total == 2
    assert "Traceback" not in first.log()
    saved = Durability(ckpt).load()
    assert saved["machine"]["stage"] == Stage.TRAINING.value and saved["machine"]["end_reason"] is None

    # While no coordinator runs, d2's update waits for the coordinator's persistent session at the broker.
    job.devices.send("d2", job.frame(1, "d2", 0.03, num_samples=30))
    model_1, _ = job.view.wait_model(1)
    second = job.start(*flags, "--resume")
    summary = job.view.wait_summary(1)
    assert summary.participants == ("d1", "d2") and summary.num_samples == 40  # d1's update came from the spool
    model_2, _ = job.view.wait_model(2)
    assert_model_moved_by(model_1, model_2, expected_average([(0.01, 10), (0.03, 30)]))
    plan_2 = job.view.wait_plan(2)
    assert plan_2.run_id == summary.run_id  # the same run, continued
    for device, value in (("d1", 0.01), ("d2", 0.02)):
        job.devices.send(device, job.frame(2, device, value, num_samples=10))
    job.view.wait_event(EventType.JOB_FINISHED)
    assert second.wait(timeout=WAIT) == 0


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_connecting_stops_at_once_without_a_checkpoint(tmp_path: Path, signum: int) -> None:
    # A broker that accepts the TCP connection and never answers: the connect would wait its whole 30 s.
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        log = tmp_path / "c.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                fedmqtt_argv("coordinator", "--broker", f"mqtt://127.0.0.1:{port}", "--job", "j", "--rounds", "1",
                             "--min-updates", "1", "--model", "mlp", "--quiet", "--mqtt-version", "5",
                             "--checkpoint-dir", str(tmp_path / "ck")),
                stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True,
            )  # fmt: skip
        client = None
        try:
            silent.settimeout(WAIT)
            client, _ = silent.accept()
            client.settimeout(WAIT)
            assert client.recv(1) == b"\x10", log.read_text()  # its CONNECT: it waits for a CONNACK now
            proc.send_signal(signum)
            started = time.monotonic()
            code = proc.wait(timeout=WAIT)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            if client is not None:
                client.close()
    text = log.read_text()
    assert code == 128 + signum, text
    assert time.monotonic() - started < 5, text
    assert f"{signal.Signals(signum).name} while connecting to the broker: stopped" in text
    assert "Traceback" not in text
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())


# --------------------------------------------------------------------------------------------- the device


@pytest.mark.e2e
def test_sigterm_ends_a_device_cleanly_with_its_offline_status(
    mosquitto_broker: Any, mqtt_client: Any, topic_prefix: str, tmp_path: Path
) -> None:
    from fedmqtt.data import write_idx_dataset
    from fedmqtt.topics import Topics

    data = write_idx_dataset(tmp_path / "idx", num_train=60, num_test=20, seed=3)
    topics = Topics(job="sig", prefix=topic_prefix)
    seen: list[DeviceStatus] = []
    mqtt_client(
        mosquitto_broker.url,
        on_message=lambda topic, payload, *rest: seen.append(from_json(DeviceStatus, payload)) if payload else None,
        subscriptions=[(topics.device_status("dev-1"), 1)],
    )
    log = tmp_path / "device.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            fedmqtt_argv("device", "--broker", mosquitto_broker.url, "--job", "sig", "--prefix", topic_prefix,
                         "--id", "dev-1", "--data-dir", str(data), "--state-dir", str(tmp_path / "state")),
            stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT
        while not any(s.state == "online" for s in seen):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not (seen and seen[-1].state == "offline") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen[-1].state == "offline" and seen[-1].detail == "device agent stopped"  # its own, not the will
    assert "Traceback" not in log.read_text()
