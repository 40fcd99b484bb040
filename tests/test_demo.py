"""What ``make demo`` shows: simulate's closing lines (report, plot, the mosquitto_sub line), a run that ends at
--target-accuracy with exit 0, and a mosquitto_sub line that really shows a job's JSON topics on Mosquitto."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MqttClientFactory, require_mosquitto
from fedmqtt.broker.mosquitto import MosquittoBroker
from fedmqtt.mqtt.settings import BrokerSettings
from fedmqtt.report import REPORT_JSON, REPORT_PNG
from fedmqtt.simulate import mosquitto_sub_line, result_lines
from fedmqtt.topics import Topics

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("idx"), num_train=300, num_test=100, seed=5)


@pytest.mark.e2e
def test_a_run_stops_at_its_target_accuracy_and_says_where_everything_is(tmp_path: Path, tiny_data: Path) -> None:
    out = tmp_path / "run"
    result = subprocess.run(
        [PYTHON, "-m", "fedmqtt.cli", "simulate", "--devices", "2", "--rounds", "5", "--model", "mlp",
         "--data-dir", str(tiny_data), "--out", str(out), "--job", "tiny-demo", "--lr", "0.1", "--batch-size", "20",
         "--round-timeout", "30", "--timeout", "150", "--devices-per-process", "2",
         "--target-accuracy", "0.01"],  # any model reaches 1 %: the job stops after round 1 of 5
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["totals"]["rounds_completed"] == 1 and report["totals"]["phase"] == "stopped"
    assert report["config"]["coordinator"]["target_accuracy"] == 0.01
    lines = result.stdout.splitlines()
    end = lines.index(next(line for line in lines if line.startswith("job tiny-demo stopped: 1 rounds")))
    assert "target accuracy 0.01 reached" in lines[end] and "after round 1" in lines[end]
    assert lines[end + 1] == f"  report: {out / REPORT_JSON}"
    assert lines[end + 2] == f"  plot:   {out / REPORT_PNG}"
    assert (out / REPORT_PNG).read_bytes()[:4] == b"\x89PNG"
    watch = lines[end + 3]
    assert watch.startswith(
        "  watch the topics during a run (this run's broker has stopped): mosquitto_sub -h 127.0.0.1 -p "
    )
    # The same line was shown at the start, while the broker ran; it names the job's topics.
    assert any(line.endswith(watch.split(": ", 1)[1]) and "another terminal" in line for line in lines[:end])
    assert "'fedmqtt/tiny-demo/#'" in watch and "-T fedmqtt/tiny-demo/model" in watch


def test_the_coordinator_refuses_a_target_without_evaluation_data() -> None:
    result = subprocess.run(
        [PYTHON, "-m", "fedmqtt.cli", "coordinator", "--job", "j", "--rounds", "2", "--min-updates", "1",
         "--model", "mlp", "--target-accuracy", "0.9", "--broker", "mqtt://127.0.0.1:1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--target-accuracy" in result.stderr and "--eval-data" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_mosquitto_sub_line_shows_the_json_topics_and_leaves_the_frames_out(
    mosquitto_broker: MosquittoBroker, mqtt_client: MqttClientFactory, topic_prefix: str
) -> None:
    require_mosquitto()
    topics = Topics(job="demo", prefix=topic_prefix)
    publisher = mqtt_client(mosquitto_broker.url)
    publisher.publish(topics.model, b"\x00binary model frame", qos=1, retain=True)
    publisher.publish(topics.update("dev-0001"), b"\x00binary update frame", qos=1, retain=True)
    publisher.publish(topics.status, b'{"phase": "training"}', qos=1, retain=True)
    line = mosquitto_sub_line(BrokerSettings.model_validate({"broker": mosquitto_broker.url}), topics)
    assert "$FEDMQTT_PASSWORD" not in line
    # -W: stop after 3 s; the retained messages arrive at once.
    result = subprocess.run(
        [*shlex.split(line), "-W", "3"], capture_output=True, text=True, timeout=30, cwd=ROOT, check=False
    )
    assert f'{topics.status} {{"phase": "training"}}' in result.stdout.splitlines()
    assert "binary" not in result.stdout


def test_the_line_names_the_user_and_never_the_password() -> None:
    settings = BrokerSettings.model_validate({"broker": "mqtt://watcher:s3cret@broker.lan:1883"}, context={"env": {}})
    line = mosquitto_sub_line(settings, Topics(job="demo"))
    assert "s3cret" not in line
    assert line.startswith("mosquitto_sub -h broker.lan -p 1883 -u watcher ")
    assert line.endswith(' -P "$FEDMQTT_PASSWORD"')


def test_a_private_run_ends_with_its_epsilon_and_delta(tmp_path: Path) -> None:
    totals = {"phase": "finished", "rounds_completed": 10, "final_accuracy": 0.9216, "megabytes": 326.29,
              "wall_seconds": 139.6, "epsilon": 7.2724, "delta": 0.005163}  # fmt: skip
    report = {"config": {"job": "demo-private"}, "totals": totals}
    lines = result_lines(report, tmp_path / "report.json", tmp_path / "report.png", "completed all 10 rounds", "W")
    assert lines[0] == (
        "job demo-private finished: 10 rounds, final accuracy 0.9216, 326.29 MB moved, 140 s, "
        "client-level DP: ε = 7.27 at δ = 5.2e-03 (completed all 10 rounds)"
    )
    assert lines[1:] == [
        f"  report: {tmp_path / 'report.json'}",
        f"  plot:   {tmp_path / 'report.png'}",
        "  watch the topics during a run (this run's broker has stopped): W",
    ]
