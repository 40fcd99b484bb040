"""The compressed downlink on a real Mosquitto: a real coordinator with ``--downlink topk:0.1+int8`` and real device
processes (devices that hold the last model take the delta, a late joiner the full model, bytes counted per path),
and a real device fed hostile delta frames by a scripted coordinator (each refused, the full model used instead)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmqtt import arrays as A
from fedmqtt.codecs import encode_frame, model_hash, peek_header
from fedmqtt.codecs.downlink import DownlinkTracker, arrays_digest
from fedmqtt.mqtt import MqttConnection
from fedmqtt.schema import CodecSpec, DownlinkPath, FrameKind, new_token
from test_device_runs import JOB, Scene
from test_e2e import Job, participants

pytestmark = [pytest.mark.e2e, pytest.mark.mosquitto]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("small"), num_train=600, num_test=300, seed=11)


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("slow"), num_train=8000, num_test=10, seed=11)


class FrameSizes:
    """The size of every model and delta frame the coordinator publishes, by (kind, round)."""

    def __init__(self) -> None:
        self.sizes: dict[tuple[FrameKind, int], int] = {}
        self.codecs: dict[tuple[FrameKind, int], str] = {}
        self._lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        if payload:
            header = peek_header(payload)
            with self._lock:
                self.sizes[(header.kind, header.round)] = len(payload)
                self.codecs[(header.kind, header.round)] = header.codec

    def full(self, round_number: int) -> int:
        with self._lock:
            return self.sizes[(FrameKind.GLOBAL_MODEL, round_number)]

    def delta(self, round_number: int) -> int:
        with self._lock:
            return self.sizes[(FrameKind.MODEL_DELTA, round_number)]


@pytest.fixture
def job(mosquitto_broker: Any, topic_prefix: str, tmp_path: Path) -> Iterator[Job]:
    j = Job(mosquitto_broker.url, "5", topic_prefix, "down", tmp_path)
    j.watch()
    yield j
    j.close()


def test_devices_holding_the_model_take_the_delta_a_late_joiner_the_full_model_bytes_counted_per_path(
    job: Job, small_data: Path, slow_data: Path, mqtt_client: Callable[..., MqttConnection]
) -> None:
    """Round 1: the pair's process fetches the full model once (its second device holds it); the slow device is
    killed while training. Round 2 waits for a third device: the late joiner fetches the full model, the pair's
    process the delta. Round 3: both processes take the delta. Each summary counts exactly those frames."""
    frames = FrameSizes()
    mqtt_client(job.broker_url, subscriptions=[(job.holder.state.topics.model, 1), (job.holder.state.topics.delta, 1)],
                on_message=frames)  # fmt: skip
    job.coordinator(small_data, "--rounds", "3", "--min-updates", "3", "--min-devices", "3", "--round-timeout", "60",
                    "--downlink", "topk:0.1+int8")  # fmt: skip
    job.devices("pair", small_data, "--id-prefix", "a", "--parts", "0:2", "--partition", "iid", "--num-parts", "3")
    job.devices("slow", slow_data, "--id", "slow")
    job.wait_for("the slow device to train in round 1", lambda s: "slow" in s.devices and
                 s.devices["slow"].state == "training" and s.devices["slow"].round == 1)  # fmt: skip
    slow = job.processes.pop("slow")
    os.killpg(slow.pid, signal.SIGKILL)
    slow.wait()
    state = job.wait_for("round 1 to close", lambda s: 1 in s.rounds)
    assert participants(state, 1) == {"a0000", "a0001"}
    job.devices("late", small_data, "--id", "late", "--partition", "iid", "--num-parts", "3", "--part", "2")
    state = job.wait_for("the job to finish", lambda s: s.finished and 3 in s.rounds, timeout=150)
    assert job.wait_exit("coordinator") == 0
    assert participants(state, 2) == participants(state, 3) == {"a0000", "a0001", "late"}

    r1, r2, r3 = (state.rounds[n] for n in (1, 2, 3))
    assert (r1.bytes_down_delta, r1.bytes_down_full) == (0, frames.full(1))  # no delta leads to the first model
    assert (r2.bytes_down_delta, r2.bytes_down_full) == (frames.delta(2), frames.full(2))
    assert (r3.bytes_down_delta, r3.bytes_down_full) == (2 * frames.delta(3), 0)
    for r in (r1, r2, r3):
        assert r.bytes_down == (r.bytes_down_delta or 0) + (r.bytes_down_full or 0)
    assert frames.delta(3) * 4 < frames.full(3)  # top-k 10 % + int8 against float32
    # The first model goes out whole in the codec's int8 values (no delta leads to it); the later full models for
    # late joiners are x_hat in float32, which no int8 frame could carry exactly.
    assert [frames.codecs[(FrameKind.GLOBAL_MODEL, n)] for n in (1, 2, 3)] == [
        "int8+zstd:1",
        "float32+zstd:1",
        "float32+zstd:1",
    ]
    assert frames.full(1) * 2.5 < frames.full(2)
    assert r3.accuracy is not None and r3.accuracy > 0.5


# --- a real device fed hostile deltas by a scripted coordinator ----------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("tiny"), num_train=300, num_test=10, seed=5)


@pytest.fixture
def scene(
    mosquitto_broker: Any, topic_prefix: str, tmp_path: Path, mqtt_client: Callable[..., MqttConnection]
) -> Iterator[Scene]:
    s = Scene(mosquitto_broker.url, topic_prefix, tmp_path, mqtt_client)
    yield s
    s.close()


class ScriptedDownlink:
    """The coordinator's downlink, played by the test: x moves by a random step each round."""

    def __init__(self, scene: Scene, run_id: str) -> None:
        from fedmqtt.models import build_model, get_arrays

        self.scene, self.run_id = scene, run_id
        self.codec = CodecSpec.parse("int8")
        self.x = get_arrays(build_model("mlp", seed=0))
        self.tracker = DownlinkTracker(self.codec, self.x)
        self.round = 1
        self.hash = model_hash(self.full())
        self.rng = np.random.default_rng(0)

    def full(self) -> bytes:
        return encode_frame(self.tracker.held, kind=FrameKind.GLOBAL_MODEL, job=JOB, round=self.round,
                            sender="coordinator", codec=CodecSpec(), model_name="mlp", run_id=self.run_id)  # fmt: skip

    def step(self) -> A.ModelArrays:
        self.x = {k: (v + self.rng.standard_normal(v.shape).astype(np.float32) * np.float32(0.01)).astype(np.float32)
                  for k, v in self.x.items()}  # fmt: skip
        return self.x

    def delta(self, target: A.ModelArrays, tracker: DownlinkTracker | None = None, **kw: Any) -> bytes:
        fields: dict[str, Any] = {"job": JOB, "round": self.round, "sender": "coordinator",
                                  "base_model_hash": self.hash, "model_name": "mlp", "run_id": self.run_id}  # fmt: skip
        fields.update(kw)
        return (tracker or self.tracker).delta_frame(target, **fields)

    def next_round(self, bad: Callable[[ScriptedDownlink, A.ModelArrays], bytes] | None = None) -> None:
        """Advance x_hat by a delta; publish the full model, the delta (or ``bad``'s instead) and the plan."""
        self.round += 1
        target = self.step()
        good = self.delta(target)
        self.hash = model_hash(self.full())
        delta = good if bad is None else bad(self, target)
        client, topics = self.scene.coordinator, self.scene.topics
        client.publish(topics.model, self.full(), qos=1, retain=True)
        client.publish(topics.delta, delta, qos=1, retain=True)
        self.scene.publish_plan(self.round, 0, self.run_id, selected=("dev",), model_hash=self.hash,
                                model_digest=arrays_digest(self.tracker.held))  # fmt: skip

    def skip_round(self) -> None:
        """A round this device is not told about: x_hat moves on without it."""
        self.round += 1
        self.delta(self.step())
        self.hash = model_hash(self.full())


def test_a_device_refuses_bad_deltas_takes_the_full_model_and_applies_good_ones(scene: Scene, tiny_data: Path) -> None:
    run = new_token()
    down = ScriptedDownlink(scene, run)
    prev: dict[str, Any] = {}

    def another_run(d: ScriptedDownlink, target: A.ModelArrays) -> bytes:
        return d.delta(target, DownlinkTracker(d.codec, prev["held"]), base_model_hash=prev["hash"], run_id=new_token())

    def forged(d: ScriptedDownlink, target: A.ModelArrays) -> bytes:
        wrong = {k: v + np.float32(0.5) for k, v in target.items()}
        return d.delta(wrong, DownlinkTracker(d.codec, prev["held"]), base_model_hash=prev["hash"])

    def truncated(d: ScriptedDownlink, target: A.ModelArrays) -> bytes:
        frame = d.delta(target, DownlinkTracker(d.codec, prev["held"]), base_model_hash=prev["hash"])
        return frame[: len(frame) // 2]

    scene.coordinator.publish(scene.topics.model, down.full(), qos=1, retain=True)
    scene.publish_plan(1, 0, run, selected=("dev",), model_hash=down.hash,
                       model_digest=arrays_digest(down.tracker.held))  # fmt: skip
    scene.device("dev", tiny_data, "--id", "dev")

    def served(round_number: int, path: DownlinkPath, said: str = "") -> None:
        update = scene.wait(
            f"the update of round {round_number}",
            lambda: [m for m in scene.updates("dev") if peek_header(m.payload).round == round_number],
            alive=("dev",),
        )[0]
        header = peek_header(update.payload)
        assert (header.downlink, header.base_model_hash) == (path, down.hash), scene.log("dev")
        if said:
            assert said in scene.log("dev")

    served(1, DownlinkPath.FULL)
    cases: list[tuple[Callable[[ScriptedDownlink, A.ModelArrays], bytes] | None, DownlinkPath, str]] = [
        (None, DownlinkPath.DELTA, ""),
        (truncated, DownlinkPath.DELTA_THEN_FULL, "refused the delta frame for round 3: frame body is"),
        (another_run, DownlinkPath.DELTA_THEN_FULL, "refused the delta frame for round 4: the delta is for job"),
        (forged, DownlinkPath.DELTA_THEN_FULL, "(a corrupt or forged delta); fetching the full model"),
        (None, DownlinkPath.DELTA, ""),
    ]
    for bad, path, said in cases:
        prev.update(held=dict(down.tracker.held), hash=down.hash)
        down.next_round(bad)
        served(down.round, path, said)
    down.skip_round()  # the device never sees this model: the next delta's base is one it lacks
    down.next_round()
    served(down.round, DownlinkPath.DELTA_THEN_FULL, "this device holds")
    down.next_round()
    served(down.round, DownlinkPath.DELTA)
    assert scene.processes["dev"].poll() is None


# --- checkpoint and resume -------------------------------------------------------------------------------------


class Frames:
    """Every model and delta frame published on a job, in order."""

    def __init__(self, topics: Any) -> None:
        self.topics = topics
        self._frames: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        if payload:
            with self._lock:
                self._frames.append((topic, payload))

    def of(self, topic: str, round_number: int) -> list[bytes]:
        with self._lock:
            return [p for t, p in self._frames if t == topic and peek_header(p).round == round_number]


def test_a_resumed_coordinator_republishes_the_same_model_delta_and_digest(
    mosquitto_broker: Any, make_job: Callable[[str], Any], tmp_path: Path, mqtt_client: Callable[..., MqttConnection]
) -> None:
    from fedmqtt.codecs import decode_frame
    from fedmqtt.codecs.downlink import apply_delta_frame
    from fedmqtt.coordinator.durability import CHECKPOINT_FILE
    from harness import WAIT

    job = make_job(mosquitto_broker.url)
    t = job.topics
    frames = Frames(t)
    mqtt_client(mosquitto_broker.url, subscriptions=[(t.model, 1), (t.delta, 1)], on_message=frames)
    flags = ("--rounds", "3", "--min-updates", "1", "--round-timeout", "120", "--downlink", "topk:0.1+int8",
             "--checkpoint-dir", str(tmp_path / "ckpt"))  # fmt: skip
    first = job.start(*flags)
    job.devices.online("d1")
    plan1 = job.view.wait_plan(1)
    assert plan1.model_digest is not None
    # Killed at the run's first model (sent in the codec's int8 values): resumed, it republishes that very frame,
    # so what devices hold keeps the hash the plan and the next delta name.
    job.view.wait_until("the round-1 checkpoint", lambda: (tmp_path / "ckpt" / CHECKPOINT_FILE).exists() or None)
    first.kill()
    (full1,) = frames.of(t.model, 1)
    assert peek_header(full1).codec == "int8+zstd:1" and model_hash(full1) == plan1.model_hash
    first = job.start(*flags, "--resume")
    job.view.wait_until("the round-1 model republished", lambda: len(frames.of(t.model, 1)) >= 2 or None)
    assert set(frames.of(t.model, 1)) == {full1}
    job.devices.send("d1", job.frame(1, "d1", 0.01))
    plan2 = job.view.wait_plan(2)
    first.kill()
    (full2,), (delta2,) = frames.of(t.model, 2), frames.of(t.delta, 2)
    assert model_hash(full2) == plan2.model_hash and peek_header(delta2).base_model_hash == plan1.model_hash
    held = apply_delta_frame(delta2, held=decode_frame(full1).arrays, held_hash=plan1.model_hash, job=t.job, round=2,
                             run_id=plan2.run_id, digest=plan2.model_digest or "")  # fmt: skip
    assert arrays_digest(held) == arrays_digest(decode_frame(full2).arrays) == plan2.model_digest
    summary1 = job.view.wait_summary(1)
    # A hand-made update names no path: counted as a full model.
    assert (summary1.bytes_down_delta, summary1.bytes_down_full, summary1.bytes_down) == (0, len(full1), len(full1))

    job.start(*flags, "--resume")
    job.view.wait_until("the round-2 frames republished", lambda: len(frames.of(t.delta, 2)) >= 2 or None)
    job.view.wait_until("the model republished", lambda: len(frames.of(t.model, 2)) >= 2 or None)
    assert set(frames.of(t.delta, 2)) == {delta2} and set(frames.of(t.model, 2)) == {full2}
    job.devices.send("d1", job.frame(2, "d1", 0.01))
    plan3 = job.view.wait_plan(3)
    (delta3,) = job.view.wait_until("the round-3 delta", lambda: frames.of(t.delta, 3) or None)
    assert peek_header(delta3).base_model_hash == plan2.model_hash and plan3.model_digest != plan2.model_digest
    job.devices.send("d1", job.frame(3, "d1", 0.01))
    job.view.wait_summary(3)
    assert job.processes[-1].wait(timeout=WAIT) == 0
