"""Releases on a real Mosquitto, with real processes: a job whose devices include a camera training on an
ImageFolder of PNGs (real MNIST test images) ends, the coordinator releases its final model (retained, with the
digest and the accuracy of the last round), a ``fedmqtt device --serve-only`` process keeps it as a model file (and
the camera, serving beside training, exits holding it); a
second run's release replaces it; broken, foreign and older releases are refused and the file stays as it was;
``fedmqtt release`` publishes a model file by hand."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import fedmqtt_argv
from fedmqtt.codecs import decode_frame, encode_frame, peek_header
from fedmqtt.codecs.downlink import arrays_digest
from fedmqtt.model_file import ModelFile, ModelFileError, load_model_file, save_model_file
from fedmqtt.models import build_model, get_arrays
from fedmqtt.mqtt import MqttConnection, PublishRefused
from fedmqtt.release import encode_release, serve_path
from fedmqtt.schema import CodecSpec, FrameHeader, FrameKind, ReleaseInfo
from fedmqtt.topics import Topics
from test_e2e import Job, participants
from test_imagefolder import write_imagefolder

pytestmark = [pytest.mark.e2e, pytest.mark.mosquitto]

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


class Releases:
    """Every release frame published on the job's release topic, in order."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self._lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        if payload:
            with self._lock:
                self.frames.append(payload)

    def wait(self, what: str, predicate: Callable[[FrameHeader], bool], timeout: float = 60.0) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                frames = list(self.frames)
            for frame in reversed(frames):
                header = peek_header(frame)
                if header.kind is FrameKind.RELEASE and predicate(header):
                    return frame
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}")


def wait_file(path: Path, digest: str, job: Job, timeout: float = 60.0) -> ModelFile:
    """The model file at ``path`` once it holds ``digest``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.fail_if_one_failed(f"{path} to hold {digest[:12]}")
        try:
            model_file = load_model_file(path)
        except ModelFileError:
            model_file = None
        if model_file is not None and model_file.digest == digest:
            return model_file
        time.sleep(0.1)
    pytest.fail(f"{path} never held {digest[:12]}:\n{job.log('serve')}")


def wait_log(job: Job, name: str, text: str, count: int = 1, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while job.log(name).count(text) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"{name} never logged {text!r} {count} time(s):\n{job.log(name)}")
        time.sleep(0.1)


@pytest.fixture
def job(mosquitto_broker: Any, topic_prefix: str, tmp_path: Path) -> Iterator[Job]:
    j = Job(mosquitto_broker.url, "5", topic_prefix, "cam", tmp_path)
    j.watch()
    yield j
    j.close()


def test_a_finished_job_releases_its_model_and_serving_devices_keep_the_newest_valid_one(
    job: Job, tmp_path: Path, mqtt_client: Callable[..., MqttConnection]
) -> None:
    assert MNIST.is_dir(), f"real MNIST files expected in {MNIST} (see shared/data/SOURCES.md)"
    topic = job.holder.state.topics.release
    releases = Releases()
    publisher = mqtt_client(job.broker_url, subscriptions=[(topic, 1)], on_message=releases)
    camera = write_imagefolder(MNIST, tmp_path / "camera", limit=600)  # what a camera collected, 10 class folders
    serve_dir = tmp_path / "served"
    job.start("serve", fedmqtt_argv("-v", "device", *job.connection_flags(), "--id", "viewer", "--serve-only",
                                    "--serve-dir", str(serve_dir), "--serve-model", "mlp"))  # fmt: skip
    path = serve_path(serve_dir)

    # Run 1: an IDX device and the camera (--data-dir of class folders: ImageFolder detected) train two rounds.
    job.coordinator(MNIST, "--rounds", "2", "--min-updates", "2", "--min-devices", "2", "--round-timeout", "120")
    job.devices("idx", MNIST, "--id", "idx", "--partition", "iid", "--num-parts", "100", "--part", "0")
    # The camera also serves (--serve beside training): with --exit-on-finish it exits holding the job's release.
    camera_serves = tmp_path / "camera-served"
    job.devices("camera", camera, "--id", "camera", "--serve", "--serve-dir", str(camera_serves))
    state = job.wait_for("run 1 to finish", lambda s: s.finished and 2 in s.rounds and s.rounds[2].accuracy is not None,
                         timeout=180)  # fmt: skip
    assert job.wait_exit("coordinator") == 0
    assert participants(state, 1) == participants(state, 2) == {"idx", "camera"}
    run1 = state.run_id
    first = releases.wait("run 1's release", lambda h: h.run_id == run1)
    header = peek_header(first)
    assert header.release is not None and header.model_name == "mlp" and header.round == 2
    assert header.release.accuracy == state.rounds[2].accuracy and header.release.accuracy > 0.5
    assert header.release.evaluated_model == state.rounds[2].evaluated_model
    decoded = decode_frame(first)
    assert arrays_digest(decoded.arrays) == header.release.digest
    kept = wait_file(path, header.release.digest, job)
    assert kept.model == "mlp" and kept.meta["run_id"] == run1 and kept.meta["accuracy"] == header.release.accuracy
    assert all(np.array_equal(kept.arrays[k], decoded.arrays[k]) for k in decoded.arrays)
    assert job.wait_exit("camera") == 0
    assert load_model_file(serve_path(camera_serves)).digest == header.release.digest

    # Run 2 of the same job (a fresh coordinator): its release replaces the file.
    job.processes.pop("coordinator")
    job.coordinator(MNIST, "--rounds", "1", "--min-updates", "1", "--round-timeout", "120")
    job.devices("idx2", MNIST, "--id", "idx2", "--partition", "iid", "--num-parts", "100", "--part", "1")
    second = releases.wait("run 2's release", lambda h: h.run_id not in (None, run1), timeout=180)
    assert job.wait_exit("coordinator") == 0
    header2 = peek_header(second)
    assert header2.release is not None and header2.release.digest != header.release.digest
    run2_file = wait_file(path, header2.release.digest, job)
    assert run2_file.meta["run_id"] == header2.run_id
    before = path.read_bytes()

    # Hostile and stale releases: each refused (one log line), the file unchanged.
    forged = encode_frame(decoded.arrays, kind=FrameKind.RELEASE, job=job.job, round=9, sender="coordinator",
                          codec=CodecSpec(), model_name="mlp",
                          release=ReleaseInfo(digest=header.release.digest[::-1], released_at=time.time()))  # fmt: skip
    cnn = encode_release(get_arrays(build_model("cnn", seed=1)), model="cnn", job=job.job, round=9,
                         sender="coordinator", released_at=time.time())  # fmt: skip
    for bad, reason in ((b"\x00garbage", "malformed"), (forged, "digest_mismatch"), (cnn, "other_model"),
                        (first, "older")):  # fmt: skip
        publisher.publish(topic, bad, qos=1, retain=True)
        wait_log(job, "serve", f"release refused ({reason})")
        assert path.read_bytes() == before

    # By hand: `fedmqtt release` of a model file (run 1's model, dated now) is newer, so it is kept.
    save_model_file(tmp_path / "rollback.fedmodel", "mlp", decoded.arrays, meta={"accuracy": 0.5, "round": 2})
    job.start("release", fedmqtt_argv("release", "--broker", job.broker_url, "--job", job.job, "--prefix", job.prefix,
                                      "--model-file", str(tmp_path / "rollback.fedmodel")))  # fmt: skip
    assert job.wait_exit("release") == 0, job.log("release")
    rolled_back = wait_file(path, header.release.digest, job)
    assert rolled_back.meta["release_source"] == "file" and rolled_back.meta["accuracy"] == 0.5

    job.processes["serve"].send_signal(signal.SIGTERM)
    assert job.wait_exit("serve") == 0


def test_on_a_secure_mosquitto_devices_and_watchers_read_the_release_and_only_the_coordinator_writes_it(
    secure_mosquitto: Any, mqtt_client: Callable[..., MqttConnection]
) -> None:
    secure = secure_mosquitto
    topics = Topics(job="rel" + str(int(time.time() * 1000) % 10**8), prefix=secure.prefix)
    frame = encode_release(get_arrays(build_model("mlp", seed=2)), model="mlp", job=topics.job, round=1,
                           sender="coordinator", released_at=time.time())  # fmt: skip
    coordinator = mqtt_client(secure.url_for("coordinator"), tls_ca=secure.ca_file)
    coordinator.publish(topics.release, frame, qos=1, retain=True)
    for user in ("d1", "watcher"):
        got = Releases()
        reader = mqtt_client(secure.url_for(user), subscriptions=[(topics.release, 1)], on_message=got,
                             tls_ca=secure.ca_file)  # fmt: skip
        assert got.wait(f"{user} to read the release", lambda h: h.job == topics.job, timeout=10) == frame
        with pytest.raises(PublishRefused, match="Not authorized"):
            reader.publish(topics.release, b"forged", qos=1)
    coordinator.publish(topics.release, b"", qos=1, retain=True)  # leave no retained release behind
