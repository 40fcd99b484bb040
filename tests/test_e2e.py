"""End to end: a real coordinator and real device processes on a real broker (Mosquitto and the embedded one).

Tiny synthetic data and the ``mlp`` model keep each round to seconds. The test process watches the job with the
same reducer as ``fedmqtt watch`` (:class:`fedmqtt.watch.WatchState`) over its own MQTT connection.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ProcessGroup, fedmqtt_argv
from fedmqtt.mqtt import BrokerSettings
from fedmqtt.topics import Topics
from fedmqtt.watch import StateHolder, WatchState, client_settings, open_watch, random_client_id

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist"
CHANCE = 0.1


def mqtt_version_for(request: pytest.FixtureRequest) -> str:
    """The embedded broker speaks MQTT 3.1.1 only; Mosquitto gets MQTT 5."""
    params = getattr(request.node, "callspec", None)
    return "3.1.1" if params is not None and params.params.get("broker_url") == "embedded" else "5"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("small"), num_train=600, num_test=300, seed=11)


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough samples that one round of local training takes seconds: a window to kill a device in."""
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("slow"), num_train=8000, num_test=10, seed=11)


class Job(ProcessGroup):
    """One job's processes (each in its own process group, killed at teardown) and a live view of it."""

    def __init__(self, broker_url: str, version: str, prefix: str, job: str, logs: Path) -> None:
        super().__init__(logs)
        self.broker_url = broker_url
        self.version = version
        self.prefix = prefix
        self.job = job
        self.holder = StateHolder(WatchState(topics=Topics(job=job, prefix=prefix)))
        self.watcher: Any = None

    def connection_flags(self) -> list[str]:
        return ["--broker", self.broker_url, "--job", self.job, "--prefix", self.prefix,
                "--mqtt-version", self.version]  # fmt: skip

    def coordinator(self, data: Path, *flags: str) -> subprocess.Popen[bytes]:
        return self.start(
            "coordinator",
            fedmqtt_argv("coordinator", *self.connection_flags(), "--model", "mlp", "--eval-data", str(data),
                    "--local-epochs", "1", "--batch-size", "20", "--lr", "0.1", "--uplink", "int8", "--quiet",
                    *flags),
        )  # fmt: skip

    def devices(self, name: str, data: Path, *flags: str) -> subprocess.Popen[bytes]:
        return self.start(
            name,
            fedmqtt_argv("device", *self.connection_flags(), "--data-dir", str(data), "--threads", "1",
                    "--exit-on-finish", *flags),
        )  # fmt: skip

    def watch(self) -> None:
        broker = BrokerSettings.model_validate({"broker": self.broker_url, "mqtt_version": self.version})
        settings = client_settings(broker, client_id=random_client_id("e2e"))
        self.watcher = open_watch(settings, self.holder)

    @property
    def state(self) -> WatchState:
        return self.holder.state

    def wait_for(self, what: str, predicate: Callable[[WatchState], bool], timeout: float = 90.0) -> WatchState:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state
            if predicate(state):
                return state
            self.fail_if_one_failed(what)
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; state: {state.status}\n{self.log('coordinator')}")
            time.sleep(0.05)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        super().close()


@pytest.fixture
def make_job(tmp_path: Path, topic_prefix: str) -> Iterator[Callable[..., Job]]:
    jobs: list[Job] = []

    def make(broker_url: str, version: str, job: str = "e2e") -> Job:
        j = Job(broker_url, version, topic_prefix, job, tmp_path)
        jobs.append(j)
        j.watch()
        return j

    yield make
    for j in jobs:
        j.close()


def participants(state: WatchState, round_number: int) -> set[str]:
    return set(state.rounds[round_number].participants)


# --- the tests ----------------------------------------------------------------------------------


def test_four_devices_learn_in_three_rounds(
    broker_url: str, request: pytest.FixtureRequest, make_job: Callable[..., Job], small_data: Path
) -> None:
    job = make_job(broker_url, mqtt_version_for(request))
    job.coordinator(small_data, "--rounds", "3", "--min-updates", "4", "--round-timeout", "60")
    partition = ["--id-prefix", "d", "--partition", "iid", "--num-parts", "4"]
    job.devices("devices-0", small_data, *partition, "--parts", "0:2")
    job.devices("devices-1", small_data, *partition, "--parts", "2:4")
    state = job.wait_for("the job to finish", lambda s: s.finished and s.rounds_done == 3, timeout=120)
    assert job.wait_exit("coordinator") == 0
    assert state.status is not None and state.status.phase.value == "finished"
    assert sorted(state.rounds) == [1, 2, 3]
    for summary in state.ordered_rounds():
        assert set(summary.participants) == {"d0000", "d0001", "d0002", "d0003"}
        assert summary.closed_by == "quorum" and summary.bytes_up > 0 and summary.bytes_down > 0
    accuracies = [s.accuracy for s in state.ordered_rounds()]
    assert all(a is not None for a in accuracies)
    assert accuracies[-1] is not None and accuracies[-1] > 0.5 > CHANCE
    # --exit-on-finish: the device processes leave by themselves, saying so on their status topics.
    assert job.wait_exit("devices-0") == 0 and job.wait_exit("devices-1") == 0
    job.wait_for("the devices' offline status", lambda s: s.device_counts() == {"offline": 4}, timeout=10)


def test_a_killed_device_fires_its_will_the_round_closes_and_a_late_joiner_takes_part(
    broker_url: str, request: pytest.FixtureRequest, make_job: Callable[..., Job], small_data: Path, slow_data: Path
) -> None:
    """Round 1 waits for all three selected devices; the slow one is SIGKILLed while training. Its last will
    (offline) reaches the coordinator, which closes round 1 with the other two. Round 2 needs three devices
    online, so it waits until a new device joins; that device gets the round-2 model as a retained message
    (published before it connected) and takes part."""
    job = make_job(broker_url, mqtt_version_for(request))
    job.coordinator(small_data, "--rounds", "2", "--min-updates", "3", "--min-devices", "3", "--round-timeout", "60")
    job.devices("pair", small_data, "--id-prefix", "a", "--parts", "0:2", "--partition", "iid", "--num-parts", "3")
    job.devices("slow", slow_data, "--id", "slow")

    job.wait_for("the slow device to train in round 1", lambda s: "slow" in s.devices and
                 s.devices["slow"].state == "training" and s.devices["slow"].round == 1)  # fmt: skip
    slow = job.processes.pop("slow")
    os.killpg(slow.pid, signal.SIGKILL)
    assert slow.wait() == -signal.SIGKILL
    state = job.wait_for("the last will", lambda s: s.devices["slow"].state == "offline", timeout=30)
    assert state.devices["slow"].detail is None  # the will, not the clean-exit status ("device agent stopped")

    state = job.wait_for("round 1 to close", lambda s: 1 in s.rounds)
    assert participants(state, 1) == {"a0000", "a0001"}
    assert state.rounds[1].seconds < 60  # closed because the device left, not by the deadline
    assert 2 not in state.rounds

    job.devices("late", small_data, "--id", "late", "--partition", "iid", "--num-parts", "3", "--part", "2")
    state = job.wait_for("the job to finish", lambda s: s.finished and 2 in s.rounds, timeout=120)
    assert participants(state, 2) == {"a0000", "a0001", "late"}
    assert job.wait_exit("coordinator") == 0


@pytest.mark.mosquitto
def test_the_run_survives_a_mosquitto_restart_between_rounds(
    mosquitto_factory: Callable[..., Any], make_job: Callable[..., Job], small_data: Path, slow_data: Path
) -> None:
    broker = mosquitto_factory(persistence=True)
    job = make_job(broker.url, "5")
    job.coordinator(small_data, "--rounds", "3", "--min-updates", "2", "--round-timeout", "120")
    job.devices("devices", slow_data, "--id-prefix", "d", "--parts", "0:2", "--partition", "iid", "--num-parts", "4")
    state = job.wait_for("round 1 to close", lambda s: 1 in s.rounds)
    assert 3 not in state.rounds  # the restart happens mid-job
    restarted_at = time.time()
    broker.restart()
    state = job.wait_for("the job to finish", lambda s: s.finished and s.rounds_done == 3, timeout=180)
    assert job.wait_exit("coordinator") == 0
    assert sorted(state.rounds) == [1, 2, 3]
    assert state.rounds[3].closed_at > restarted_at  # the job went on after the restart
    assert job.watcher.reconnects >= 1


@pytest.mark.slow
def test_mnist_ten_devices_five_rounds_reach_95_percent(tmp_path: Path) -> None:
    """10 devices reach >= 95 % on the MNIST test set within 5 federated rounds. The job ends at the first round
    that does (--target-accuracy), so the rounds after it are not trained: the claim is "within 5 rounds".
    The mlp (2 local epochs, lr 0.1): 92.9, 95.0, 95.9, 96.5, 96.9 % in rounds 1-5 when all 5 run; about 30 s.
    The cnn (1 epoch, lr 0.05) reached the bar too but took 106 s; its learning on real MNIST is test_training's."""
    out = tmp_path / "run"
    result = subprocess.run(
        fedmqtt_argv("simulate", "--devices", "10", "--rounds", "5", "--data-dir", str(MNIST), "--out", str(out),
                "--partition", "iid", "--model", "mlp", "--local-epochs", "2", "--batch-size", "50", "--lr", "0.1",
                "--target-accuracy", "0.95", "--timeout", "1500"),
        capture_output=True, text=True, timeout=1600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    rounds = report["rounds"]
    reached = [r["round"] for r in rounds if r["accuracy"] is not None and r["accuracy"] >= 0.95]
    assert reached and reached[0] <= 5, rounds
    assert report["totals"]["final_accuracy"] >= 0.95, rounds  # the job ended on the target (exit 0, above)
    assert all(r["participants"] == 10 for r in rounds if r["round"] <= reached[0]), rounds  # all 10 devices
