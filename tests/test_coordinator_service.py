"""The coordinator's MQTT adapter against real brokers: a real ``fedmqtt coordinator`` subprocess, devices played
by the test with hand-made frames, everything observed on the job's public topics.

The harness (CoordinatorProcess, JobView, Devices, Job, frame builders) is in tests/harness.py; the ``make_job``
fixture in tests/conftest.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmqtt import arrays as A
from fedmqtt.cli import main as fedmqtt_main
from fedmqtt.codecs import decode_frame, peek_header
from fedmqtt.mqtt import MqttConnection
from fedmqtt.schema import (
    DeviceStatus,
    DPAnnouncement,
    EventType,
    FrameKind,
    Phase,
    RefusalReason,
    RoundSummary,
    from_json,
    to_json,
)
from harness import (
    EXIT_STOPPED,
    MANIFEST,
    MODEL,
    NUMEL,
    WAIT,
    CoordinatorProcess,
    Job,
    assert_model_moved_by,
    closed_port_url,
    expected_average,
    fedmqtt_argv,
    start_device_with_a_last_will,
    subprocess_env,
    update_frame,
    with_header_field,
    with_nan,
)

pytestmark = pytest.mark.service


def test_the_hand_made_frames_are_what_the_tests_claim() -> None:
    from fedmqtt.codecs import FrameError, ManifestMismatch, NonFiniteValues

    good = update_frame("j", 1, "d1", 0.5)
    decoded = decode_frame(good, expected_manifest=MANIFEST)
    assert decoded.header.sender == "d1" and decoded.header.round == 1
    assert A.l2_norm(decoded.arrays) == pytest.approx(0.5 * np.sqrt(NUMEL), rel=1e-5)
    with pytest.raises(NonFiniteValues):
        decode_frame(with_nan(good), expected_manifest=MANIFEST)
    wrong_shapes = {"fc1.weight": np.zeros((3, 3), np.float32)}
    with pytest.raises(ManifestMismatch):
        decode_frame(update_frame("j", 1, "d1", arrays=wrong_shapes), expected_manifest=MANIFEST)
    with pytest.raises(FrameError, match="x" * 3000):  # an error message longer than an event's detail
        peek_header(with_header_field(good, "x" * 3000, 1))


# --------------------------------------------------------------------------------------------- closing rounds


def test_quorum_closes_the_round_and_round_two_follows(
    mosquitto_broker: Any, make_job: Callable[[str], Job], mqtt_client: Callable[..., MqttConnection]
) -> None:
    job = make_job(mosquitto_broker.url)
    job.start("--rounds", "2", "--min-updates", "2", "--min-devices", "3", "--round-timeout", "60")
    # Statuses that bring nobody online: not JSON, and a status naming another device than its topic.
    publish = job.devices.connection.publish
    publish(job.topics.device_status("d8"), b"online", qos=1, retain=True)
    publish(job.topics.device_status("d9"), to_json(DeviceStatus(device="d1", state="online")), qos=1, retain=True)
    job.devices.online("d1", "d2", "d3")
    plan = job.view.wait_plan(1)
    assert plan.selected == ("d1", "d2", "d3") and plan.model_name == MODEL
    model_1, hash_1 = job.view.wait_model(1)
    assert plan.model_hash == hash_1

    job.devices.send("d2", job.frame(1, "d2", 0.02, num_samples=30))
    job.devices.send("d1", job.frame(1, "d1", 0.01, num_samples=10))
    closed = job.view.wait_event(EventType.ROUND_CLOSED, round=1)
    assert "closed by quorum with 2 updates" in closed.detail

    summary = job.view.wait_summary(1)
    assert summary.closed_by == "quorum" and summary.attempts == 1
    assert summary.participants == ("d2", "d1")  # in order of acceptance; d3 was not waited for
    assert summary.num_samples == 40 and summary.refused == {}
    assert summary.seconds < 30  # long before the 60 s deadline

    # The summary is retained: a late watcher still gets it.
    late: list[tuple[bytes, bool]] = []
    mqtt_client(mosquitto_broker.url, subscriptions=[(job.topics.round_summary(1), 1)],
                on_message=lambda t, p, q, r, m: late.append((p, r)))  # fmt: skip
    deadline = time.monotonic() + WAIT
    while not late and time.monotonic() < deadline:
        time.sleep(0.05)
    assert late and late[0][1], "no retained round summary"
    assert from_json(RoundSummary, late[0][0]) == summary

    # A new model (the FedAvg of the two updates) and the plan of round 2, which names it.
    model_2, hash_2 = job.view.wait_model(2)
    assert_model_moved_by(model_1, model_2, expected_average([(0.02, 30), (0.01, 10)]))
    plan_2 = job.view.wait_plan(2)
    assert plan_2.model_hash == hash_2 != hash_1
    assert plan_2.selected == ("d1", "d2", "d3")
    status = job.view.wait_status("round 2 training", lambda s: s.round == 2 and s.phase is Phase.TRAINING)
    assert status.received == 0 and status.needed == 2 and status.rounds_total == 2


def test_deadline_closes_below_quorum_with_a_toml_config_and_flags_overriding_it(
    mosquitto_broker: Any, make_job: Callable[[str], Job], tmp_path: Path
) -> None:
    job = make_job(mosquitto_broker.url)
    config = tmp_path / "job.toml"
    config.write_text(
        f"""
        [coordinator]
        broker = "{mosquitto_broker.url}"
        job = "{job.name}"
        prefix = "{job.prefix}"
        model = "{MODEL}"
        quiet = true
        rounds = 5
        min-updates = 3
        round_timeout = 600
        min-updates-at-deadline = 3
        """
    )
    # The file names broker, job, prefix and model; the flags override the round settings.
    process = job.start("--config", str(config), "--rounds", "1", "--min-updates", "2", "--round-timeout", "3",
                        "--min-updates-at-deadline", "1", with_job_flags=False)  # fmt: skip
    job.devices.online("d1", "d2")
    plan = job.view.wait_plan(1)
    assert plan.deadline - plan.issued_at == pytest.approx(3.0, abs=0.5)
    status = job.view.wait_status("round 1 open", lambda s: s.phase is Phase.TRAINING)
    assert status.rounds_total == 1 and status.needed == 2

    job.devices.send("d1", job.frame(1, "d1"))
    job.view.wait_event(EventType.UPDATE_ACCEPTED, device="d1", round=1)
    summary = job.view.wait_summary(1)
    assert summary.closed_by == "deadline" and summary.participants == ("d1",)
    assert 3.0 <= summary.seconds < 10
    job.view.wait_event(EventType.JOB_FINISHED)
    assert process.wait(timeout=WAIT) == 0


def test_a_selected_device_that_dies_stops_being_waited_for(
    mosquitto_broker: Any, make_job: Callable[[str], Job]
) -> None:
    job = make_job(mosquitto_broker.url)
    job.start("--rounds", "1", "--min-updates", "2", "--round-timeout", "60")
    doomed = start_device_with_a_last_will(mosquitto_broker.url, job.topics, "d2")
    try:
        job.devices.online("d1", "d2")
        assert doomed.stdout is not None
        assert b'"online"' in doomed.stdout.readline()  # the doomed connection is up (it sees its own status)
        plan = job.view.wait_plan(1)
        assert plan.selected == ("d1", "d2")
        job.devices.send("d1", job.frame(1, "d1"))
        job.view.wait_event(EventType.UPDATE_ACCEPTED, device="d1")
        doomed.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker publishes the last will
        job.view.wait_event(EventType.DEVICES_OFFLINE, devices=("d2",))  # presence events are batched
        summary = job.view.wait_summary(1)
    finally:
        if doomed.poll() is None:
            doomed.kill()
        doomed.wait()
    assert summary.closed_by == "deadline" and summary.participants == ("d1",)
    assert summary.seconds < 20  # closed at once, not at the 60 s deadline


def test_a_round_nobody_answers_is_retried_then_the_job_stops(
    mosquitto_broker: Any, make_job: Callable[[str], Job], tmp_path: Path
) -> None:
    job = make_job(mosquitto_broker.url)
    flags = ("--rounds", "1", "--min-updates", "1", "--round-timeout", "1.5", "--max-attempts", "3",
             "--checkpoint-dir", str(tmp_path / "ckpt"))  # fmt: skip
    process = job.start(*flags)
    job.devices.online("d1")  # online, selected, silent
    stopped = job.view.wait_event(EventType.JOB_STOPPED)
    assert "failed 3 time(s)" in stopped.detail
    assert process.wait(timeout=WAIT) == EXIT_STOPPED

    round_events = [e for e in job.view.events if e.type in (EventType.ROUND_OPENED, EventType.ROUND_FAILED)]
    assert [(e.type, e.round, e.attempt) for e in round_events] == [
        (t, 1, attempt) for attempt in range(3) for t in (EventType.ROUND_OPENED, EventType.ROUND_FAILED)
    ]
    assert all("deadline passed with 0 update(s)" in e.detail for e in round_events if e.type is EventType.ROUND_FAILED)
    assert [p.attempt for p in job.view.plans] == [0, 1, 2]
    status = job.view.wait_status("phase stopped", lambda s: s.phase is Phase.STOPPED)
    assert status.round == 1 and status.attempt == 2
    assert not job.view.summaries

    # Resuming the stopped job ends at once, with the same exit code (it used to wait forever).
    again = job.start(*flags, "--resume")
    assert again.wait(timeout=WAIT) == EXIT_STOPPED
    job.view.wait_event(EventType.JOB_STOPPED, detail=f"already stopped: {stopped.detail}")


# --------------------------------------------------------------------------------------------- refusals


def test_every_refusal_is_reported_and_leaves_the_accepted_updates_alone(
    broker_url: str, make_job: Callable[[str], Job]
) -> None:
    job = make_job(broker_url)
    # --max-update-mb 0.1: update payloads above 100 kB are refused, although the model's dense float32 tensors
    # take 0.8 MB once decoded (the frames here are ~1.4 kB: constant values compress well).
    process = job.start("--rounds", "2", "--min-updates", "2", "--devices-per-round", "2", "--min-devices", "3",
                        "--round-timeout", "60", "--max-update-mb", "0.1")  # fmt: skip
    job.view.wait_status("the job waiting", lambda s: s.phase is Phase.WAITING)
    send, refused = job.devices.send, job.view.wait_refusal
    R = RefusalReason

    send("d1", job.frame(1, "d1", 5.0))  # before any round opened
    refused("d1", R.NO_OPEN_ROUND)

    job.devices.online("d1", "d2", "d3")
    plan = job.view.wait_plan(1)
    model_1, _ = job.view.wait_model(1)
    s1, s2 = plan.selected
    (outsider,) = {"d1", "d2", "d3"} - set(plan.selected)

    bad: list[tuple[str, bytes, RefusalReason]] = [
        (s1, b"\x00garbage, not a frame" * 3, R.MALFORMED),
        (s1, update_frame("another-job", 1, s1, 5.0), R.WRONG_JOB),
        (s1, job.frame(2, s1, 5.0), R.FUTURE_ROUND),
        (s1, job.frame(1, s1, 5.0, kind=FrameKind.GLOBAL_MODEL), R.WRONG_KIND),
        (outsider, job.frame(1, outsider, 5.0), R.NOT_SELECTED),
        (s1, job.frame(1, s2, 5.0), R.SENDER_MISMATCH),  # s2's update on s1's topic
        (s1, job.frame(1, s1, arrays={"fc1.weight": np.full((3, 3), 5.0, np.float32)}), R.MANIFEST_MISMATCH),
        (s1, with_nan(job.frame(1, s1, 5.0)), R.NON_FINITE),
        (s2, b"\x00" * 150_000, R.MALFORMED),  # above --max-update-mb
        (outsider, with_header_field(job.frame(1, outsider, 5.0), "x" * 5000, 1), R.MALFORMED),  # a long error
    ]
    for device, frame, _ in bad:
        send(device, frame)
    for device, frame, reason in bad:
        event = refused(device, reason)
        assert event.detail and event.round == (None if reason is R.MALFORMED else peek_header(frame).round)
    assert "150000 bytes exceeds the limit" in refused(s2, R.MALFORMED).detail
    assert refused(outsider, R.MALFORMED).detail.startswith("frame header is invalid: xxx")

    first = job.frame(1, s1, 0.01, num_samples=10)
    send(s1, first)
    job.view.wait_event(EventType.UPDATE_ACCEPTED, device=s1, round=1)
    send(s1, first)  # an identical re-send (a QoS 1 re-delivery): ignored without an event
    send(s1, job.frame(1, s1, 5.0, num_samples=10))  # a different second update: refused
    refused(s1, R.DUPLICATE)
    assert [(e.type, e.reason) for e in job.view.update_events(s1)][-2:] == [
        (EventType.UPDATE_ACCEPTED, None),
        (EventType.UPDATE_REFUSED, R.DUPLICATE),
    ]

    send(s2, job.frame(1, s2, 0.03, num_samples=30))
    summary = job.view.wait_summary(1)
    assert summary.closed_by == "quorum" and summary.participants == (s1, s2)
    assert summary.num_samples == 40
    assert summary.refused == Counter(reason for _, _, reason in bad) + Counter([R.DUPLICATE])
    # None of the refused frames (all of value 5.0) reached the aggregate.
    model_2, _ = job.view.wait_model(2)
    assert_model_moved_by(model_1, model_2, expected_average([(0.01, 10), (0.03, 30)]))

    plan_2 = job.view.wait_plan(2)
    send(s1, job.frame(1, s1, 5.0))  # round 1 is closed
    refused(s1, R.STALE_ROUND)
    for device in plan_2.selected:
        send(device, job.frame(2, device, 0.0))
    job.view.wait_event(EventType.JOB_FINISHED)
    assert process.wait(timeout=WAIT) == 0
    final = job.view.wait_status("phase finished", lambda s: s.phase is Phase.FINISHED)
    assert final.refused_total == len(bad) + 3  # + no_open_round, duplicate, stale_round
    assert job.view.wait_summary(2).refused == {R.STALE_ROUND: 1}  # refused while round 2 was open


def test_with_dp_an_update_above_the_clip_bound_is_refused(
    mosquitto_broker: Any, make_job: Callable[[str], Job]
) -> None:
    job = make_job(mosquitto_broker.url)
    process = job.start("--rounds", "1", "--min-updates", "2", "--round-timeout", "60", "--dp-mode", "device",
                        "--dp-clip", "1", "--dp-noise-multiplier", "0.01", "--dp-sample-rate", "1.0")  # fmt: skip
    job.devices.online("d1", "d2")
    plan = job.view.wait_plan(1)
    assert plan.dp is not None and plan.dp.clip == 1.0 and plan.selected == ("d1", "d2")
    per_entry = 1.0 / np.sqrt(NUMEL)  # a constant update of L2 norm 1 (the clip bound)

    job.devices.send("d1", job.frame(1, "d1", 100 * per_entry))  # norm 100
    event = job.view.wait_refusal("d1", RefusalReason.NORM_EXCEEDS_CLIP)
    assert "update norm 100 exceeds the clip bound 1" in event.detail
    job.devices.send("d1", job.frame(1, "d1", 0.5 * per_entry))  # norm 0.5: within the bound
    job.devices.send("d2", job.frame(1, "d2", 1.0 * per_entry))
    summary = job.view.wait_summary(1)
    assert summary.participants == ("d1", "d2") and summary.closed_by == "quorum"
    assert summary.refused == {RefusalReason.NORM_EXCEEDS_CLIP: 1}
    assert summary.epsilon is not None and summary.epsilon > 0
    assert process.wait(timeout=WAIT) == 0


def test_adaptive_clipping_moves_the_clip_towards_the_target_quantile(
    mosquitto_broker: Any, make_job: Callable[[str], Job]
) -> None:
    """Central mode with --dp-adaptive-clip: updates that all fit under the clip shrink it for the next round,
    updates that were all clipped grow it (Andrew et al. 2021); the plan carries the new clip."""
    job = make_job(mosquitto_broker.url)
    process = job.start("--rounds", "3", "--min-updates", "4", "--round-timeout", "60", "--dp-mode", "central",
                        "--dp-clip", "1", "--dp-noise-multiplier", "0.05", "--dp-sample-rate", "1.0",
                        "--dp-adaptive-clip", "0.5")  # fmt: skip
    devices = ("d1", "d2", "d3", "d4")
    job.devices.online(*devices)
    per_entry = 1.0 / np.sqrt(NUMEL)

    def send_round(round_number: int, clip: float, unclipped: bool) -> None:
        dp = DPAnnouncement(mode="central", clip=clip, noise_std=0.0, unclipped=unclipped)
        for device in devices:
            job.devices.send(device, job.frame(round_number, device, 0.5 * clip * per_entry, dp=dp))

    first = job.view.wait_plan(1)
    assert first.dp is not None and first.dp.clip == 1.0
    send_round(1, first.dp.clip, unclipped=True)  # every norm under the clip: fraction 1 > 0.5 -> shrink
    second = job.view.wait_plan(2)
    assert second.dp is not None and second.dp.clip < first.dp.clip * 0.95
    send_round(2, second.dp.clip, unclipped=False)  # every update clipped: fraction 0 < 0.5 -> grow
    third = job.view.wait_plan(3)
    assert third.dp is not None and third.dp.clip > second.dp.clip * 1.05
    send_round(3, third.dp.clip, unclipped=False)
    assert process.wait(timeout=WAIT) == 0


def test_adaptive_clipping_is_refused_outside_central_mode() -> None:
    result = subprocess.run(
        fedmqtt_argv(
            "coordinator",
            "--broker",
            closed_port_url(),
            "--job",
            "j",
            "--rounds",
            "1",
            "--min-updates",
            "2",
            "--dp-mode",
            "device",
            "--dp-clip",
            "1",
            "--dp-noise-multiplier",
            "1",
            "--dp-sample-rate",
            "1",
            "--dp-adaptive-clip",
            "0.5",
        ),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=WAIT,
    )
    assert result.returncode != 0
    assert "--dp-adaptive-clip: needs --dp-mode central" in result.stderr


def test_a_flood_of_malformed_frames_does_not_stop_a_round(
    mosquitto_broker: Any, make_job: Callable[[str], Job], mqtt_client: Callable[..., MqttConnection]
) -> None:
    job = make_job(mosquitto_broker.url)
    job.start("--rounds", "2", "--min-updates", "2", "--round-timeout", "60")
    job.devices.online("d1", "d2")
    job.view.wait_plan(1)
    flood_size = 1000
    flooder = mqtt_client(mosquitto_broker.url)
    sent = threading.Semaphore(0)

    def flood() -> None:
        for i in range(flood_size):
            flooder.publish(job.topics.update("d1"), b"junk %d" % i, qos=1)  # on a selected device's topic
            sent.release()

    started = time.monotonic()
    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    for _ in range(flood_size // 4):
        assert sent.acquire(timeout=30)
    job.devices.send("d1", job.frame(1, "d1"))  # the real updates arrive in the middle of the flood
    job.devices.send("d2", job.frame(1, "d2"))
    summary = job.view.wait_summary(1)
    thread.join(timeout=WAIT)
    assert not thread.is_alive()
    assert summary.participants == ("d1", "d2") and summary.closed_by == "quorum"
    assert 0 < summary.refused[RefusalReason.MALFORMED] <= flood_size
    assert set(summary.refused) == {RefusalReason.MALFORMED}
    status = job.view.wait_status(f"refused_total {flood_size}", lambda s: s.refused_total == flood_size)
    elapsed = time.monotonic() - started
    assert status.round == 2 and status.phase is Phase.TRAINING
    # Measured: ~1.5 s. Before the fix, each refusal also forced a retained QoS 1 status publish, ~40 ms each
    # (Nagle's algorithm behind the QoS 0 event), so the flood took ~40 s.
    assert elapsed < 25, f"{flood_size} refusals took {elapsed:.1f} s"


# --------------------------------------------------------------------------------------------- durability


def test_a_killed_coordinator_resumes_without_losing_an_accepted_update(
    mosquitto_broker: Any, make_job: Callable[[str], Job], tmp_path: Path
) -> None:
    job = make_job(mosquitto_broker.url)
    flags = ("--rounds", "1", "--min-updates", "2", "--round-timeout", "120",
             "--checkpoint-dir", str(tmp_path / "ckpt"))  # fmt: skip
    first = job.start(*flags)
    job.devices.online("d1", "d2")
    plan = job.view.wait_plan(1)
    job.devices.send("d1", job.frame(1, "d1", 0.01, num_samples=10))
    job.view.wait_event(EventType.UPDATE_ACCEPTED, device="d1")
    first.kill()
    # While no coordinator runs, d2's update waits in the coordinator's persistent session at the broker.
    job.devices.send("d2", job.frame(1, "d2", 0.03, num_samples=30))
    model_1, _ = job.view.wait_model(1)

    job.start(*flags, "--resume")
    summary = job.view.wait_summary(1)
    assert summary.participants == ("d1", "d2") and summary.closed_by == "quorum"
    assert summary.num_samples == 40 and summary.opened_at == pytest.approx(plan.issued_at, abs=1)
    model_2, _ = job.view.wait_model(2)
    assert_model_moved_by(model_1, model_2, expected_average([(0.01, 10), (0.03, 30)]))
    job.view.wait_event(EventType.JOB_FINISHED)
    assert job.processes[-1].wait(timeout=WAIT) == 0

    # Resuming the finished job again ends at once (it used to wait forever: nothing re-opens a finished job).
    third = job.start(*flags, "--resume")
    assert third.wait(timeout=WAIT) == 0
    job.view.wait_event(EventType.JOB_FINISHED, detail="already finished: completed all 1 rounds")
    assert "the job already ended" in third.log()


# --------------------------------------------------------------------------------------------- configuration


def test_a_bad_configuration_is_refused_before_connecting() -> None:
    started = time.monotonic()
    result = subprocess.run(
        fedmqtt_argv("coordinator", "--broker", closed_port_url(), "--job", "j", "--rounds", "1",
                     "--min-updates", "2", "--devices-per-round", "1", "--quiet"),
        capture_output=True, env=subprocess_env(), timeout=60,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "fedmqtt coordinator: error: --devices-per-round: must be >= --min-updates" in stderr
    assert "Traceback" not in stderr
    assert elapsed < 20  # connecting to the closed port would take the 30 s connect timeout


BAD_CONFIGS = [
    (["--min-updates", "2", "--min-updates-at-deadline", "3"], "--min-updates-at-deadline: must be <= --min-updates"),
    (["--min-updates", "1", "--rounds", "0"], "--rounds: must be > 0"),
    (["--min-updates", "1", "--round-timeout", "-1"], "--round-timeout: must be > 0"),
    (["--min-updates", "1", "--resume"], "--resume: needs --checkpoint-dir"),
    (["--min-updates", "1", "--dp-mode", "device"], "--dp-clip: required with --dp-mode"),
    (["--min-updates", "1", "--dp-mode", "device", "--dp-clip", "1", "--dp-noise-multiplier", "1"],
     "--dp-sample-rate: required with --dp-mode device unless --dp-population"),
    (["--min-updates", "1", "--uplink", "int9"], "--uplink: unknown token 'int9'"),
    (["--min-updates", "1", "--job", "bad/job"], "--job: invalid job id 'bad/job'"),
    (["--min-updates", "1", "--broker", "http://127.0.0.1:1883"], "unsupported scheme 'http'"),
    ([], "--min-updates: required"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "message"), BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_each_bad_setting_is_named(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    job = [] if "--job" in flags else ["--job", "j"]
    started = time.monotonic()
    code = fedmqtt_main(["coordinator", "--broker", closed_port_url(), *job, "--rounds", "1", "--quiet", *flags])
    assert code == 1
    assert message in capsys.readouterr().err
    assert time.monotonic() - started < 10  # refused before any connection attempt


def test_an_unknown_model_is_refused_listing_every_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fedmqtt_main(["coordinator", "--broker", closed_port_url(), "--job", "j", "--rounds", "1",
                      "--min-updates", "1", "--model", "no-such-model"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and all(m in err for m in ("cnn", "seed-cnn", "mlp", "mobilenet-v3-small"))


def test_bad_toml_files_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        "missing.toml": (None, "does not exist"),
        "broken.toml": ("rounds = [", "is not valid TOML"),
        "unknown.toml": ("[coordinator]\njob = 'j'\nrounds = 1\nmin-updates = 1\nround_timeot = 3\n",
                         "round_timeot: is not a setting"),
        "typed.toml": ("job = 'j'\nrounds = 'many'\nmin_updates = 1\n", "--rounds: Input should be a valid integer"),
    }  # fmt: skip
    for name, (text, message) in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        assert fedmqtt_main(["coordinator", "--config", str(path), "--broker", closed_port_url()]) == 1
        assert message in capsys.readouterr().err, name


@pytest.fixture(scope="module", autouse=True)
def unreachable_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CoordinatorProcess, str]]:
    """A coordinator pointed at a closed port, started with the module's first test: it takes the 30 s connect
    timeout to give up, which the other tests' run time hides."""
    url = closed_port_url()
    log = tmp_path_factory.mktemp("unreachable") / "coordinator.log"
    process = CoordinatorProcess(
        fedmqtt_argv("coordinator", "--broker", url, "--job", "j", "--rounds", "1", "--min-updates", "1",
                     "--model", MODEL, "--quiet"),
        log,
    )  # fmt: skip
    yield process, url
    process.stop()


def test_an_unreachable_broker_fails_with_a_clear_message_in_bounded_time(
    unreachable_run: tuple[CoordinatorProcess, str],
) -> None:
    process, url = unreachable_run
    assert process.wait(timeout=120) == 1
    deadline = time.monotonic() + 5
    while process.exited_at is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.exited_at is not None
    assert process.exited_at - process.started < 90  # the 30 s connect timeout, plus start-up
    log = process.log()
    assert f"fedmqtt coordinator: error: cannot reach the MQTT broker at {url}" in log
    assert "Connection refused" in log and "Traceback" not in log


@pytest.mark.slow
def test_the_coordinator_outlives_a_broker_that_stops_answering(
    mosquitto_factory: Callable[..., Any], make_job: Callable[[str], Job]
) -> None:
    """A broker that hangs used to kill the coordinator with PublishTimeout (its driver waited for each
    acknowledgement). The driver never waits on the broker now: messages stay queued in the client and the job
    carries on."""
    broker = mosquitto_factory()
    job = make_job(broker.url)
    process = job.start("--rounds", "1", "--min-updates", "2", "--round-timeout", "120")
    job.devices.online("d1", "d2")
    job.view.wait_plan(1)
    job.devices.send("d1", job.frame(1, "d1"))
    job.view.wait_event(EventType.UPDATE_ACCEPTED, device="d1")
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        time.sleep(12)
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    assert process.running(), process.log()
    job.devices.send("d2", job.frame(1, "d2"))
    summary = job.view.wait_summary(1)
    assert summary.participants == ("d1", "d2")
    assert process.wait(timeout=WAIT) == 0
    assert "Traceback" not in process.log()
