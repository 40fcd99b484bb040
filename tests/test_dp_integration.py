"""Differential privacy end to end: a real coordinator and real device processes on a real Mosquitto.

What is checked, from the outside (the MQTT topics and the files a device leaves), against independent
computations made here:

* the retained privacy ledger after every round, its ε recomputed with opacus's ``RDPAccountant``, and the stop
  *before* a round would pass ``--target-epsilon`` (a ``job_stopped`` event, exit status 0);
* a device's own ``--privacy-budget``: it declines the round that would exceed it, says so on its retained status,
  sends nothing, and remembers what it spent in ``--state-dir`` across a restart of its process;
* every DP mode runs a round, and the update frames on the wire carry the announced clip and noise: their norms lie
  inside two-sided bounds derived from the clip ``C``, the announced per-coordinate noise std ``s`` and the
  number of parameters ``d``.

Tiny synthetic data and the ``mlp`` model (199,210 parameters) keep each round to well under a second.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import ProcessGroup, fedmqtt_argv
from fedmqtt.broker.mosquitto import MosquittoBroker
from fedmqtt.codecs import decode_frame
from fedmqtt.mqtt import MqttConnection
from fedmqtt.schema import DeviceStatus, DPMode, Event, EventType, PrivacyLedger, RoundSummary, from_json
from fedmqtt.topics import Topics
from inbox import Inbox

pytestmark = [pytest.mark.e2e, pytest.mark.mosquitto]

MODEL = "mlp"
DELTA = 1e-5
# The RDP orders fedmqtt's accountant searches (docs/privacy.md): opacus's defaults plus the large orders TF
# Privacy also uses. The reference values below are computed with opacus's own RDPAccountant over these orders.
EXTRA_ORDERS = [80.0, 96.0, 128.0, 256.0, 512.0]


def opacus_epsilon(steps: list[tuple[float, float]], delta: float = DELTA) -> float:
    """ε of a sequence of (noise multiplier, sample rate) rounds, straight from opacus's RDPAccountant."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for sigma, q in steps:
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    alphas = [float(a) for a in RDPAccountant.DEFAULT_ALPHAS] + EXTRA_ORDERS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the smallest alpha": valid all the same
        return float(accountant.get_epsilon(delta=delta, alphas=alphas))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("dp-data"), num_train=200, num_test=50, seed=7)


class Run(ProcessGroup):
    """One job on the shared Mosquitto: its processes (killed at teardown) and everything published under it."""

    exit_timeout = 30.0

    def __init__(self, broker: MosquittoBroker, prefix: str, job: str, logs: Path, observer: MqttConnection,
                 inbox: Inbox) -> None:  # fmt: skip
        super().__init__(logs)
        self.broker = broker
        self.topics = Topics(job=job, prefix=prefix)
        self.observer = observer
        self.inbox = inbox

    # --------------------------------------------------------------------------- processes

    def connection(self) -> list[str]:
        return ["--broker", self.broker.url, "--job", self.topics.job, "--prefix", self.topics.prefix,
                "--mqtt-version", "5"]  # fmt: skip

    def coordinator(self, *flags: str) -> None:
        self.start(
            "coordinator",
            fedmqtt_argv("coordinator", *self.connection(), "--model", MODEL, "--local-epochs", "1",
                    "--batch-size", "50", "--lr", "0.1", "--uplink", "int8", "--quiet", *flags),
        )  # fmt: skip

    def devices(self, name: str, data: Path, *flags: str) -> None:
        self.start(name, fedmqtt_argv("device", *self.connection(), "--data-dir", str(data), "--threads", "1", *flags))

    def terminate(self, name: str, timeout: float = 20.0) -> int:
        """SIGTERM (a clean stop: the device publishes 'offline') and wait for the exit status."""
        process = self.processes[name]
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not stop on SIGTERM within {timeout} s:\n{self.log(name)}")

    # --------------------------------------------------------------------------- what was published

    def payloads(self, topic: str) -> list[bytes]:
        return [m.payload for m in self.inbox.messages if m.topic == topic and m.payload]

    def ledgers(self) -> list[PrivacyLedger]:
        return [from_json(PrivacyLedger, p) for p in self.payloads(self.topics.privacy)]

    def events(self) -> list[Event]:
        return [from_json(Event, p) for p in self.payloads(self.topics.events)]

    def summaries(self) -> dict[int, RoundSummary]:
        found = {}
        for message in self.inbox.messages:
            number = self.topics.round_of_summary(message.topic)
            if number is not None and message.payload:
                found[number] = from_json(RoundSummary, message.payload)
        return found

    def device_statuses(self, device: str) -> list[DeviceStatus]:
        return [from_json(DeviceStatus, p) for p in self.payloads(self.topics.device_status(device))]

    def updates(self) -> list[tuple[str, bytes]]:
        found = []
        for message in self.inbox.messages:
            device = self.topics.device_of_update(message.topic)
            if device is not None:
                found.append((device, message.payload))
        return found

    def wait_for(self, what: str, predicate: Callable[[], Any], timeout: float = 40.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            self.fail_if_one_failed(what)
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {name}\n{self.log(name)}" for name in self.processes)
                pytest.fail(f"timed out after {timeout} s waiting for {what}\n{logs}")
            time.sleep(0.05)


@pytest.fixture
def make_run(
    mosquitto_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path, mqtt_client: Callable[..., MqttConnection]
) -> Iterator[Callable[[str], Run]]:
    runs: list[Run] = []

    def make(job: str) -> Run:
        topics = Topics(job=job, prefix=topic_prefix)
        inbox = Inbox()
        # Subscribed before any process starts: nothing the job publishes (events are not retained) is missed.
        observer = mqtt_client(mosquitto_broker.url, subscriptions=[(topics.everything_filter, 1)], on_message=inbox)
        run = Run(mosquitto_broker, topic_prefix, job, tmp_path, observer, inbox)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.close()


def retained(url: str, topic: str, mqtt_client: Callable[..., MqttConnection]) -> bytes:
    """The retained message on ``topic`` as a newcomer sees it."""
    inbox = Inbox()
    mqtt_client(url, subscriptions=[(topic, 1)], on_message=inbox)
    message = inbox.wait_for(1, topic=topic, timeout=10)[0]
    assert message.retain
    return message.payload


def dp_flags(mode: str, clip: float, sigma: float, *extra: str) -> list[str]:
    return ["--dp-mode", mode, "--dp-clip", str(clip), "--dp-noise-multiplier", str(sigma),
            "--dp-sample-rate", "1.0", "--dp-delta", str(DELTA), *extra]  # fmt: skip


# --- 1. the job's ledger and the stop before the target ------------------------------------------------------


def test_ledger_after_every_round_matches_opacus_and_the_job_stops_before_the_target(
    make_run: Callable[[str], Run], tiny_data: Path, mqtt_client: Callable[..., MqttConnection]
) -> None:
    clip, sigma = 1.0, 3.0
    eps = [opacus_epsilon([(sigma, 1.0)] * n) for n in (1, 2, 3)]
    target = round((eps[1] + eps[2]) / 2, 4)  # two full rounds fit, a third would pass it
    run = make_run("dp-ledger")
    run.coordinator("--rounds", "10", "--min-updates", "2", "--round-timeout", "30",
                    *dp_flags("device", clip, sigma, "--target-epsilon", str(target)))  # fmt: skip
    run.devices("devices", tiny_data, "--id-prefix", "d", "--parts", "0:2", "--partition", "iid",
                "--num-parts", "2", "--exit-on-finish")  # fmt: skip

    run.wait_for("the job_stopped event", lambda: [e for e in run.events() if e.type is EventType.JOB_STOPPED])
    assert run.wait_exit("coordinator") == 0
    assert run.wait_exit("devices") == 0  # --exit-on-finish: the devices saw the job end

    stopped = next(e for e in run.events() if e.type is EventType.JOB_STOPPED)
    assert "privacy budget" in stopped.detail and f"{target:g}" in stopped.detail

    ledgers = run.ledgers()
    assert [ledger.rounds for ledger in ledgers] == [0, 1, 2]  # published at start and after every round
    for ledger in ledgers:
        assert ledger.mode is DPMode.DEVICE
        assert (ledger.clip, ledger.noise_multiplier, ledger.sample_rate) == (clip, sigma, 1.0)
        assert ledger.delta == DELTA and ledger.target_epsilon == pytest.approx(target)
        assert ledger.accountant.startswith("opacus ") and "RDPAccountant" in ledger.accountant
        expected = opacus_epsilon([(sigma, 1.0)] * ledger.rounds) if ledger.rounds else 0.0
        assert ledger.epsilon == pytest.approx(expected, rel=1e-9)
        # q = 1: every device took part in every round, so amplification gives nothing.
        assert ledger.epsilon_participation_known == pytest.approx(expected, rel=1e-9)
    final = ledgers[-1]
    assert final.epsilon is not None and final.epsilon <= target < eps[2]  # stopped BEFORE passing the target

    summaries = run.summaries()
    assert sorted(summaries) == [1, 2]  # no third round ran
    for number, summary in summaries.items():
        assert set(summary.participants) == {"d0000", "d0001"}
        assert summary.epsilon == pytest.approx(eps[number - 1], rel=1e-9)
    # The retained ledger a newcomer gets is the final one.
    assert from_json(PrivacyLedger, retained(run.broker.url, run.topics.privacy, mqtt_client)) == final


# --- 2. a device's own budget, persisted across a restart ----------------------------------------------------


def test_a_device_declines_rounds_past_its_budget_and_remembers_its_spending_across_a_restart(
    make_run: Callable[[str], Run], tiny_data: Path, tmp_path: Path, mqtt_client: Callable[..., MqttConnection]
) -> None:
    """local mode, σ = 2: the device's ledger charges σ per round trained (no amplification). Its budget allows
    one round, not two. Round 1: both devices train. Round 2: 'frugal' declines, the round closes at its deadline
    with 'plenty' alone. 'frugal' is restarted with the same --state-dir. Round 3 waits for it (two devices must be
    online) and it declines again: the spending came back from disk."""
    sigma = 2.0
    one, two = opacus_epsilon([(sigma, 1.0)]), opacus_epsilon([(sigma, 1.0)] * 2)
    budget = (one + two) / 2
    state_dir = tmp_path / "frugal-state"
    run = make_run("dp-budget")
    run.coordinator("--rounds", "3", "--min-updates", "2", "--min-updates-at-deadline", "1",
                    "--round-timeout", "6", *dp_flags("local", 1.0, sigma))  # fmt: skip
    part = ["--partition", "iid", "--num-parts", "2", "--exit-on-finish"]
    run.devices("plenty", tiny_data, "--id", "plenty", "--part", "0", *part)
    frugal = ["--id", "frugal", "--part", "1", *part, "--state-dir", str(state_dir), "--privacy-budget", f"{budget}"]
    run.devices("frugal", tiny_data, *frugal)

    def declined(round_number: int) -> Callable[[], DeviceStatus | None]:
        def find() -> DeviceStatus | None:
            prefix = f"declined round {round_number}: privacy budget"
            return next((s for s in run.device_statuses("frugal") if (s.detail or "").startswith(prefix)), None)

        return find

    run.wait_for("round 1 to close", lambda: 1 in run.summaries())
    status = run.wait_for("frugal to decline round 2", declined(2))
    assert status.state == "online" and status.round == 2 and f"epsilon {budget:g}" in (status.detail or "")
    # Retained: a watcher connecting now is told why the device sits this round out.
    assert from_json(DeviceStatus, retained(run.broker.url, run.topics.device_status("frugal"), mqtt_client)) == status
    # Stop it before round 2's deadline, so round 3 cannot open without it.
    assert run.terminate("frugal") == 0
    ledger_file = state_dir / "frugal" / "privacy.json"
    saved = json.loads(ledger_file.read_text())
    assert saved["accountant"]["history"] == [[sigma, 1.0, 1]] and saved["delta"] == DELTA

    run.wait_for("round 2 to close at its deadline", lambda: 2 in run.summaries())
    assert 3 not in run.summaries()
    restarted_at = time.time()
    run.devices("frugal", tiny_data, *frugal)  # same --state-dir
    status = run.wait_for("the restarted frugal to decline round 3", declined(3))
    assert status.ts is not None and status.ts > restarted_at  # the new process declined, from the ledger on disk
    assert f"spent {one:.3f}" in (status.detail or "")
    assert run.wait_exit("coordinator", timeout=40) == 0

    summaries = run.summaries()
    assert set(summaries[1].participants) == {"plenty", "frugal"}
    assert summaries[2].participants == ("plenty",) and summaries[3].participants == ("plenty",)
    assert summaries[2].closed_by == summaries[3].closed_by == "deadline"
    # The coordinator never got an update from it after round 1 (none was sent, none refused).
    assert [device for device, _ in run.updates()].count("frugal") == 1
    assert not [e for e in run.events() if e.type is EventType.UPDATE_REFUSED]
    # Declining wrote nothing to the ledger: still the one round.
    assert json.loads(ledger_file.read_text())["accountant"]["history"] == [[sigma, 1.0, 1]]


# --- 3. every mode end to end; what a device sends -----------------------------------------------------------


def norm_bounds(
    clip: float, noise_std: float, numel: int, quantisation: float, tail: float = 1e-9
) -> tuple[float, float]:
    """Where ‖u + n‖ lies for ‖u‖ ≤ C and n ~ N(0, s²I_d), except with probability ``tail``, after a lossy codec
    moved it by at most ``quantisation`` (triangle inequality).

    Upper: ‖u+n‖² ≤ C² + 2sC√(2x) + s²(d + 2√(dx) + 2x) (Gaussian tail for u·n, Laurent–Massart for ‖n‖²).
    Lower: ‖u+n‖² ≥ ‖n‖² − 2|u·n| ≥ s²(d − 2√(dx)) − 2sC√(2x). Without noise (s = 0) the update is the clipped
    one, and the test's clip binds (the raw update is about 6 times larger), so its norm is C.
    """
    x = math.log(2 / tail)
    s, d, c = noise_std, numel, clip
    upper = math.sqrt(c * c + 2 * s * c * math.sqrt(2 * x) + s * s * (d + 2 * math.sqrt(d * x) + 2 * x))
    if s == 0:
        return c - quantisation, c + quantisation
    lower = math.sqrt(max(0.0, s * s * (d - 2 * math.sqrt(d * x)) - 2 * s * c * math.sqrt(2 * x)))
    return lower - quantisation, upper + quantisation


def int8_error_bound(arrays: dict[str, np.ndarray]) -> float:
    """Largest L2 distance between an update and its int8 encoding: half a quantisation step per coordinate,
    the step being the tensor's peak / 127 (rounded up to a whole step for stochastic rounding)."""
    return math.sqrt(sum(v.size * (float(np.abs(v).max()) / 127) ** 2 for v in arrays.values() if v.size))


@pytest.mark.parametrize("mode", ["device", "local", "central"])
def test_each_mode_runs_a_round_and_updates_carry_the_clip_and_the_announced_noise(
    mode: str, make_run: Callable[[str], Run], tiny_data: Path
) -> None:
    from fedmqtt.models import model_manifest, parameter_count
    from fedmqtt.privacy import device_noise_std

    # A clip far below the raw update's norm (so it binds), and noise whose norm s·√d is about twice the clip:
    # an unclipped update or a missing noise term would both leave the bounds below.
    clip, devices = 0.05, 2
    d = parameter_count(MODEL)
    sigma = {"device": 2 * math.sqrt(devices), "local": 2.0, "central": 1.0}[mode] / math.sqrt(d)
    sigma = round(sigma, 6)
    run = make_run(f"dp-{mode}")
    run.coordinator("--rounds", "1", "--min-updates", str(devices), "--round-timeout", "30",
                    *dp_flags(mode, clip, sigma))  # fmt: skip
    run.devices("devices", tiny_data, "--id-prefix", "d", "--parts", f"0:{devices}", "--partition", "iid",
                "--num-parts", str(devices), "--exit-on-finish")  # fmt: skip
    run.wait_for("the round to close", lambda: 1 in run.summaries())
    assert run.wait_exit("coordinator") == 0
    summary = run.summaries()[1]
    assert set(summary.participants) == {"d0000", "d0001"} and summary.closed_by == "quorum"

    expected_std = device_noise_std(mode, sigma, clip, devices)
    assert expected_std == {"device": sigma * clip / math.sqrt(devices), "local": sigma * clip, "central": 0.0}[mode]
    frames = run.updates()
    assert sorted(device for device, _ in frames) == ["d0000", "d0001"]
    for device, payload in frames:
        frame = decode_frame(payload, expected_manifest=model_manifest(MODEL))
        announced = frame.header.dp
        assert announced is not None and frame.header.sender == device
        assert (announced.mode, announced.clip) == (mode, clip)
        assert announced.noise_std == pytest.approx(expected_std, rel=1e-12)
        numel = sum(v.size for v in frame.arrays.values())
        assert numel == d
        norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in frame.arrays.values()))
        low, high = norm_bounds(clip, announced.noise_std, numel, int8_error_bound(frame.arrays))
        assert low <= norm <= high, f"{mode}: update norm {norm:.5f} outside [{low:.5f}, {high:.5f}]"
        if mode == "central":
            # No device noise: the clipped update itself, at exactly the clip (it binds) up to int8 rounding.
            assert norm == pytest.approx(clip, abs=int8_error_bound(frame.arrays))

    ledger = run.ledgers()[-1]
    assert ledger.mode is DPMode(mode) and ledger.rounds == 1
    # The noise in the sum: device σ (k = m), local σ·√k, central σ (docs/privacy.md, "The three modes").
    effective = sigma * math.sqrt(devices) if mode == "local" else sigma
    assert ledger.epsilon == pytest.approx(opacus_epsilon([(effective, 1.0)]), rel=1e-9)


def test_a_target_below_one_round_stops_the_job_before_round_1(make_run: Callable[[str], Run], tiny_data: Path) -> None:
    """The stop-before-the-target rule holds for the first round too: with a target that one round would pass,
    no round may run at all."""
    sigma = 3.0
    target = round(opacus_epsilon([(sigma, 1.0)]) / 2, 4)  # not even one round fits
    run = make_run("dp-tiny-target")
    run.coordinator("--rounds", "3", "--min-updates", "2", "--round-timeout", "30",
                    *dp_flags("device", 1.0, sigma, "--target-epsilon", str(target)))  # fmt: skip
    run.devices("devices", tiny_data, "--id-prefix", "d", "--parts", "0:2", "--partition", "iid",
                "--num-parts", "2", "--exit-on-finish")  # fmt: skip
    assert run.wait_exit("coordinator", timeout=40) == 0
    stopped = [e for e in run.events() if e.type is EventType.JOB_STOPPED]
    assert stopped and "privacy budget" in stopped[0].detail
    assert run.summaries() == {} and not run.updates()  # no round ran, no device trained
    assert {ledger.rounds for ledger in run.ledgers()} == {0}
    assert run.wait_exit("devices") == 0
