"""``--max-train-seconds``: the train-time estimator (pure), the screening rule, and a real device that declines a
round it would train too long, with a device status that says why."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmqtt.device.screening import DeviceScreen, PlanReason
from fedmqtt.device.train_time import WINDOW, TrainTimeEstimator, time_problem
from fedmqtt.mqtt import MqttConnection
from fedmqtt.schema import CodecSpec, Plan, new_token
from test_device_runs import Scene


def plan(**kw: Any) -> Plan:
    fields: dict[str, Any] = {
        "job": "j",
        "round": 1,
        "attempt": 0,
        "selected": ("dev",),
        "deadline": 1000.0,
        "issued_at": 0.0,
        "local_epochs": 2,
        "batch_size": 20,
        "learning_rate": 0.1,
        "uplink": CodecSpec.parse("int8"),
        "model_name": "mlp",
        "model_hash": "f" * 64,
    }
    return Plan(**(fields | kw))


# --- the estimator --------------------------------------------------------------------------------------


def test_no_estimate_before_the_first_round_of_a_kind() -> None:
    times = TrainTimeEstimator()
    assert times.estimate(plan(), 100) is None
    times.record(plan(), samples=100, seconds=4.0)  # 100 samples x 2 epochs in 4 s: 0.02 s per sample-epoch
    assert times.estimate(plan(), 100) == pytest.approx(4.0)
    assert times.estimate(plan(local_epochs=5), 300) == pytest.approx(0.02 * 300 * 5)
    # Another model, other trained parameters or another batch size run at another speed: tried first.
    assert times.estimate(plan(model_name="cnn"), 100) is None
    assert times.estimate(plan(trainable=("fc3.weight",)), 100) is None
    assert times.estimate(plan(batch_size=10), 100) is None


def test_the_median_of_the_last_rounds_is_used() -> None:
    times = TrainTimeEstimator()
    for seconds in (2.0, 2.0, 60.0):  # one slow round does not move the estimate far
        times.record(plan(), samples=50, seconds=seconds)
    assert times.rate(plan()) == pytest.approx(2.0 / 100)
    for _ in range(WINDOW):  # a board that got slower for good: the old rounds fall out of the window
        times.record(plan(), samples=50, seconds=10.0)
    assert times.rate(plan()) == pytest.approx(10.0 / 100)


@pytest.mark.parametrize("samples, seconds", [(0, 1.0), (10, -1.0), (10, math.nan), (10, math.inf)])
def test_measurements_that_are_no_rate_are_ignored(samples: int, seconds: float) -> None:
    times = TrainTimeEstimator()
    times.record(plan(), samples=samples, seconds=seconds)
    assert times.estimate(plan(), 10) is None


@given(
    rates=st.lists(st.floats(min_value=1e-6, max_value=10.0), min_size=1, max_size=12),
    samples=st.integers(min_value=1, max_value=100_000),
    epochs=st.integers(min_value=1, max_value=20),
)
def test_the_estimate_is_a_recent_rate_times_the_work(rates: list[float], samples: int, epochs: int) -> None:
    times = TrainTimeEstimator()
    for rate in rates:
        times.record(plan(local_epochs=1), samples=1000, seconds=rate * 1000)
    recent = rates[-WINDOW:]
    estimate = times.estimate(plan(local_epochs=epochs), samples)
    assert estimate is not None
    work = samples * epochs
    assert min(recent) * work * (1 - 1e-9) <= estimate <= max(recent) * work * (1 + 1e-9)


# --- the rule ----------------------------------------------------------------------------------------------


def test_time_problem() -> None:
    assert time_problem(None, max_seconds=1.0, now=0.0, deadline=0.5) is None  # the first round is tried
    assert time_problem(5.0, max_seconds=None, now=0.0, deadline=100.0) is None
    assert time_problem(5.0, max_seconds=5.0, now=0.0, deadline=100.0) is None
    too_long = time_problem(5.2, max_seconds=5.0, now=0.0, deadline=100.0)
    assert too_long is not None and "about 5.2 s" in too_long and "--max-train-seconds 5" in too_long
    late = time_problem(30.0, max_seconds=None, now=80.0, deadline=100.0)
    assert late is not None and "the deadline is 20.0 s away" in late


def test_screening_declines_a_round_it_cannot_finish_in_time() -> None:
    screen = DeviceScreen(job="j", device="dev")
    assert screen.screen(plan(), now=0.0, train_estimate=None, max_train_seconds=1.0).take
    slow = screen.screen(plan(), now=0.0, train_estimate=3.0, max_train_seconds=1.0)
    assert slow.declined and slow.reason is PlanReason.TRAINING_TIME and "--max-train-seconds 1" in slow.detail
    late = screen.screen(plan(deadline=10.0), now=8.0, train_estimate=3.0)
    assert late.declined and late.reason is PlanReason.TRAINING_TIME and "deadline" in late.detail
    assert screen.screen(plan(deadline=10.0), now=8.0, train_estimate=1.5).take


# --- a real device -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("tiny"), num_train=200, num_test=10, seed=7)


@pytest.fixture
def scene(
    mosquitto_broker: Any, topic_prefix: str, tmp_path: Path, mqtt_client: Callable[..., MqttConnection]
) -> Iterator[Scene]:
    s = Scene(mosquitto_broker.url, topic_prefix, tmp_path, mqtt_client)
    yield s
    s.close()


@pytest.mark.mosquitto
def test_a_device_tries_the_first_round_then_declines_one_it_would_train_too_long(
    scene: Scene, tiny_data: Path
) -> None:
    # 200 samples for one epoch of the MLP take milliseconds: 0.001 s is always too little, except that the first
    # round has no estimate and is tried.
    scene.device("dev", tiny_data, "--id", "dev", "--max-train-seconds", "0.001")
    run = new_token()
    digest = scene.publish_model(run)
    scene.publish_plan(1, 0, run, model_hash=digest)
    scene.wait("the first round's update", lambda: scene.updates("dev"), alive=("dev",))
    scene.publish_plan(2, 0, run, model_hash=digest)
    declined = scene.wait(
        "round 2 to be declined",
        scene.status_where("dev", lambda s: s.round == 2 and "declined round 2" in (s.detail or "")),
        alive=("dev",),
    )
    assert "training would take about" in declined.detail and "--max-train-seconds 0.001" in declined.detail
    assert declined.state == "online" and declined.run_id == run
    time.sleep(1.0)
    assert len(scene.updates("dev")) == 1  # nothing was sent for round 2
    assert f"declined round 2 (attempt 0) of run {run}: training would take about" in scene.log("dev")


@pytest.mark.parametrize("value", ["0", "-3", "inf", "nan"])
def test_max_train_seconds_must_be_a_positive_time(value: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedmqtt.cli", "device", "--broker", "mqtt://127.0.0.1:1", "--job", "j", "--id", "d",
         "--max-train-seconds", value],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == (
        f"fedmqtt device: error: --max-train-seconds: must be a positive number of seconds, got {float(value)}"
    )
