"""Start from a pretrained model and train a subset of it (issue #11, part K1).

Pure parts: ``--trainable`` glob expansion (:func:`fedmqtt.models.expand_trainable`), the public slice of
``fedmqtt pretrain`` (:func:`fedmqtt.pretrain.public_slice`), trainable-only downlink deltas, the config's checks of
``--init-checkpoint``. Then the real system on Mosquitto: ``fedmqtt pretrain`` writes a model file, an in-process
coordinator starts from it with ``--trainable 'fc3.*'``, a real device runtime (two devices) trains, a hand-played
device sends hostile updates; frozen tensors stay bit-identical, updates and deltas carry only the trainable tensors.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmqtt.codecs import FrameError, decode_frame, encode_frame, peek_header
from fedmqtt.codecs.downlink import DownlinkTracker, apply_delta, apply_delta_frame, arrays_digest
from fedmqtt.errors import ConfigError
from fedmqtt.models import expand_trainable, model_manifest
from fedmqtt.schema import CodecSpec, DownlinkPath, EventType, FrameKind, ManifestEntry, RefusalReason

# --------------------------------------------------------------------------------------------- glob expansion


@pytest.mark.parametrize(
    ("model", "globs", "expected"),
    [
        ("cnn", ["fc2.*"], ("fc2.weight", "fc2.bias")),
        ("cnn", ["fc2.bias", "fc2.weight"], ("fc2.weight", "fc2.bias")),  # the model's order, not the flag's
        ("cnn", ["*.bias"], ("conv1.bias", "conv2.bias", "fc1.bias", "fc2.bias")),
        ("cnn", ["fc?.weight", " fc2.bias "], ("fc1.weight", "fc2.weight", "fc2.bias")),
        ("mlp", ["fc3.*", "fc3.weight"], ("fc3.weight", "fc3.bias")),
    ],
)
def test_trainable_globs_expand_to_the_model_tensor_names_in_model_order(
    model: str, globs: list[str], expected: tuple[str, ...]
) -> None:
    assert expand_trainable(model, globs) == expected


@pytest.mark.parametrize(
    ("globs", "message"),
    [
        (["fc9.*"], r"'fc9\.\*' matches no tensor of cnn; its tensors are: conv1\.weight, conv1\.bias, .*fc2\.bias"),
        (["fc2.*", "head.*", "x"], r"'head\.\*', 'x' match no tensor of cnn"),
        ([], r"names no tensor; cnn's tensors are: conv1\.weight"),
        ([" ", ""], r"names no tensor"),
    ],
)
def test_a_glob_that_matches_nothing_is_refused_naming_the_model_tensors(globs: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        expand_trainable("cnn", globs)
    assert info.value.field == "trainable"


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["cnn", "mlp", "seed-cnn"]), st.data())
def test_exact_names_expand_to_themselves_and_a_prefix_glob_to_its_layer(model: str, data: st.DataObject) -> None:
    names = [e.name for e in model_manifest(model)]
    chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    expanded = expand_trainable(model, chosen)
    assert set(expanded) == set(chosen) and list(expanded) == [n for n in names if n in chosen]
    layer = data.draw(st.sampled_from(sorted({n.rpartition(".")[0] for n in names})))
    assert expand_trainable(model, [layer + ".*"]) == tuple(n for n in names if n.startswith(layer + "."))
    assert expand_trainable(model, ["*"]) == tuple(names)


def test_a_trained_norm_layer_brings_its_running_statistics() -> None:
    expanded = expand_trainable("mobilenet-v3-small", ["features.12.1.weight"])
    assert expanded == ("features.12.1.weight", "features.12.1.running_mean", "features.12.1.running_var")
    with pytest.raises(ConfigError, match="matches only buffers"):
        expand_trainable("mobilenet-v3-small", ["*.running_mean"])


# --------------------------------------------------------------------------------------------- public slice


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 3000), st.data(), st.sampled_from(["first", "random"]), st.integers(0, 2**31))
def test_the_public_slice_and_the_rest_split_the_indices(size: int, data: st.DataObject, pick: Any, seed: int) -> None:
    from fedmqtt.pretrain import public_slice

    count = data.draw(st.integers(1, size - 1))
    public, rest = public_slice(size, count, pick=pick, seed=seed)
    assert len(public) == count and len(rest) == size - count
    assert np.array_equal(np.sort(np.concatenate([public, rest])), np.arange(size))
    assert np.all(np.diff(public) > 0) and np.all(np.diff(rest) > 0)
    if pick == "first":
        assert np.array_equal(public, np.arange(count))
    again, _ = public_slice(size, count, pick=pick, seed=seed)
    assert np.array_equal(public, again)


@pytest.mark.parametrize("count", [0, 100, -1])
def test_a_public_slice_that_leaves_nothing_out_is_refused(count: int) -> None:
    from fedmqtt.pretrain import public_slice

    with pytest.raises(ConfigError, match=r"--public-slice: must be between 1 and 99"):
        public_slice(100, count)


# --------------------------------------------------------------------------------------------- downlink deltas


def _mlp(seed: int) -> dict[str, np.ndarray]:
    from fedmqtt.models import build_model, get_arrays

    return get_arrays(build_model("mlp", seed=seed))


@pytest.mark.parametrize("codec", ["float32", "int8", "topk:0.2+int8"])
def test_a_trainable_only_delta_carries_only_those_tensors_and_leaves_the_frozen_ones_bit_identical(
    codec: str,
) -> None:
    base = _mlp(0)
    trained = ("fc3.weight", "fc3.bias")
    tracker = DownlinkTracker(CodecSpec.parse(codec), base, trained)
    target = {k: (v + np.float32(0.01) if k in trained else v) for k, v in base.items()}
    frame = tracker.delta_frame(target, job="j", round=2, sender="coordinator", base_model_hash="a" * 64)
    assert [t.name for t in peek_header(frame).tensors] == list(trained)
    manifest = tuple(e for e in model_manifest("mlp") if e.name in trained)
    held = apply_delta_frame(frame, held=base, held_hash="a" * 64, job="j", round=2, run_id=None,
                             digest=arrays_digest(tracker.held), manifest=manifest)  # fmt: skip
    assert list(held) == list(base)
    for name in base:
        assert np.array_equal(held[name], tracker.held[name])
        if name not in trained:
            assert held[name].tobytes() == base[name].tobytes()
    if codec == "float32":
        assert np.allclose(held["fc3.bias"], target["fc3.bias"], atol=1e-6)


def test_a_model_part_completes_any_model_of_the_job_however_many_rounds_the_device_missed() -> None:
    from fedmqtt.codecs import DeltaBaseMismatch, DeltaMismatch
    from fedmqtt.codecs.downlink import apply_model_part_frame, encode_model_part

    trained = ("fc3.weight", "fc3.bias")
    manifest = tuple(e for e in model_manifest("mlp") if e.name in trained)
    rng = np.random.default_rng(1)
    models = [_mlp(0)]
    for _ in range(4):  # four rounds move the head only
        models.append({k: (v + rng.standard_normal(v.shape).astype(np.float32) if k in trained else v)
                       for k, v in models[-1].items()})  # fmt: skip
    latest = models[-1]
    frame = encode_model_part(latest, trained, codec=CodecSpec(), job="j", round=5, sender="coordinator", run_id=None)
    assert [t.name for t in peek_header(frame).tensors] == list(trained) and len(frame) < 9_000
    want = {"job": "j", "round": 5, "run_id": None, "digest": arrays_digest(latest), "manifest": manifest}
    for held in models:  # the base or any later model: the same bits
        rebuilt = apply_model_part_frame(frame, held=held, **want)
        assert all(rebuilt[k].tobytes() == latest[k].tobytes() for k in latest)
    other_base = {k: (v if k in trained else v + np.float32(1)) for k, v in latest.items()}
    with pytest.raises(DeltaBaseMismatch):
        apply_model_part_frame(frame, held=other_base, **want)
    with pytest.raises(DeltaMismatch, match="the plan names"):
        apply_model_part_frame(frame, held=models[0], **(want | {"digest": arrays_digest(models[0])}))
    with pytest.raises(DeltaMismatch, match="round 5, the plan is for round 6"):
        apply_model_part_frame(frame, held=models[0], **(want | {"round": 6}))
    with pytest.raises(ValueError, match="lossy"):
        encode_model_part(latest, trained, codec=CodecSpec.parse("int8"), job="j", round=5, sender="coordinator")


def test_a_delta_with_tensors_out_of_order_or_unknown_does_not_apply() -> None:
    from fedmqtt.codecs import DeltaMismatch

    base = _mlp(0)
    with pytest.raises(DeltaMismatch):
        apply_delta(base, {"fc3.bias": base["fc3.bias"], "fc3.weight": base["fc3.weight"]})
    with pytest.raises(DeltaMismatch):
        apply_delta(base, {"fc9.bias": base["fc3.bias"]})


# --------------------------------------------------------------------------------------------- config checks


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("idx"), num_train=400, num_test=200, seed=3)


@pytest.fixture(scope="module")
def pretrained(idx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An mlp pretrained by `fedmqtt pretrain` (the CLI) on a public slice of the synthetic test split."""
    from fedmqtt.cli import main

    out = tmp_path_factory.mktemp("ckpt") / "mlp.fedmodel"
    code = main(["pretrain", "--model", "mlp", "--data-dir", str(idx_dir), "--public-slice", "100",
                 "--epochs", "2", "--lr", "0.02", "--out", str(out)])  # fmt: skip
    assert code == 0
    return out


def test_pretrain_writes_a_model_file_with_its_recipe_slice_and_held_out_accuracy(pretrained: Path) -> None:
    from fedmqtt.model_file import load_model_file

    file = load_model_file(pretrained)
    assert file.model == "mlp" and file.num_classes == 10
    meta = file.meta
    assert meta["public_indices"] == list(range(100)) and meta["public_from"] == "test"
    assert meta["train_images"] == 100 and meta["eval_images"] == 100  # the other half of the 200 test images
    assert meta["epochs"] == 2 and meta["dataset"] == "mnist"
    assert meta["accuracy"] > 0.5  # the synthetic classes are easy: well above chance (0.1)


def test_pretrain_on_the_whole_training_split_reports_the_test_split(idx_dir: Path, tmp_path: Path) -> None:
    from fedmqtt.pretrain import pretrain

    result = pretrain(model="mlp", dataset="mnist", data_dir=idx_dir, out=tmp_path / "m", epochs=1)
    assert (result.train_images, result.eval_images) == (400, 200) and "public_indices" not in result.meta


def _config(**values: Any) -> Any:
    from fedmqtt.coordinator.config import load_config

    return load_config(None, {"job": "j", "rounds": 1, "min_updates": 1, **values}, env={})


def test_config_expands_trainable_globs_and_refuses_one_matching_nothing() -> None:
    from fedmqtt.settings import SettingsError

    assert _config(model="mlp", trainable=("fc3.*",)).trainable == ("fc3.weight", "fc3.bias")
    with pytest.raises(SettingsError, match=r"--trainable: 'fc2\.\*x' matches no tensor of mlp; its tensors are: fc1"):
        _config(model="mlp", trainable=("fc2.*x",))


def test_init_checkpoint_of_another_model_or_a_damaged_file_is_refused_with_a_clear_message(
    pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedmqtt.cli import main
    from fedmqtt.model_file import save_model_file
    from fedmqtt.settings import SettingsError

    assert _config(model="mlp", init_checkpoint=pretrained).init_checkpoint == pretrained
    with pytest.raises(SettingsError, match=r"--init-checkpoint: model file .*mlp\.fedmodel: holds a 'mlp' model, "
                                            r"not 'cnn': use --model mlp"):  # fmt: skip
        _config(model="cnn", init_checkpoint=pretrained)
    wrong_shape = {k: (v[:, :5] if k == "fc1.weight" else v) for k, v in _mlp(0).items()}
    save_model_file(tmp_path / "narrow", "mlp", wrong_shape)
    with pytest.raises(SettingsError, match=r"does not fit mlp: fc1\.weight has shape \(200, 5\), the model wants"):
        _config(model="mlp", init_checkpoint=tmp_path / "narrow")
    damaged = tmp_path / "damaged"
    damaged.write_bytes(pretrained.read_bytes()[:-100])
    with pytest.raises(SettingsError, match=r"--init-checkpoint: model file .*damaged"):
        _config(model="mlp", init_checkpoint=damaged)
    # The command refuses it before dialling any broker (port 9 is closed: it would fail differently).
    code = main(["coordinator", "--broker", "mqtt://127.0.0.1:9", "--job", "j", "--rounds", "1", "--min-updates", "1",
                 "--model", "cnn", "--init-checkpoint", str(pretrained), "--quiet"])  # fmt: skip
    assert code != 0
    assert "holds a 'mlp' model, not 'cnn': use --model mlp" in capsys.readouterr().err


def test_uplink_bytes_of_a_head_only_cnn_update_against_the_full_model() -> None:
    """The frames a device sends: float32 and the default int8 uplink, full CNN vs fc2 only."""
    from fedmqtt.models import build_model, get_arrays

    arrays = get_arrays(build_model("cnn", seed=1))
    head = {k: arrays[k] for k in expand_trainable("cnn", ["fc2.*"])}
    sizes = {}
    for codec in ("float32", "int8"):
        for name, update in (("full", arrays), ("head", head)):
            frame = encode_frame(update, kind=FrameKind.UPDATE, job="j", round=1, sender="d",
                                 codec=CodecSpec.parse(codec), num_samples=1)  # fmt: skip
            sizes[codec, name] = len(frame)
    assert sizes["float32", "full"] > 6_000_000 and sizes["float32", "head"] < 22_000
    assert sizes["int8", "head"] < 7_000
    print(sizes)


# --------------------------------------------------------------------------------------------- the real system


class Frames:
    """Every update and delta frame published on the job: (topic, size, tensor names, round). An update's compact
    header names no tensors: it is decoded against ``update_manifest`` (its checksum is keyed with that manifest,
    so a frame made for other tensors fails) and named by it; one that does not decode is named ``("?",)``."""

    def __init__(self, update_manifest: tuple[ManifestEntry, ...]) -> None:
        self.update_manifest = update_manifest
        self.seen: list[tuple[str, int, tuple[str, ...], int]] = []
        self.lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        if payload:
            header = peek_header(payload)
            names = tuple(t.name for t in header.tensors)
            if header.layout is not None:
                try:
                    names = tuple(decode_frame(payload, expected_manifest=self.update_manifest).arrays)
                except FrameError:
                    names = ("?",)
            with self.lock:
                self.seen.append((topic, len(payload), names, header.round))

    def on(self, topic: str) -> list[tuple[int, tuple[str, ...], int]]:
        with self.lock:
            return [(size, names, r) for t, size, names, r in self.seen if t == topic]


@pytest.mark.e2e
@pytest.mark.mosquitto
def test_a_job_from_a_pretrained_file_trains_only_the_head_through_a_real_broker(
    mosquitto_broker: Any,
    make_job: Callable[[str], Any],
    mqtt_client: Callable[..., Any],
    pretrained: Path,
    idx_dir: Path,
) -> None:
    from fedmqtt.data import load_dataset
    from fedmqtt.device.agent import DeviceOptions, DeviceRuntime
    from fedmqtt.model_file import load_model_file
    from fedmqtt.mqtt.settings import BrokerSettings
    from harness import constant_update
    from test_pipelined_rounds import exit_code, make_config, running

    trained = ("fc3.weight", "fc3.bias")
    start = load_model_file(pretrained).arrays
    job = make_job(mosquitto_broker.url)
    frames = Frames(tuple(ManifestEntry(name=n, shape=start[n].shape) for n in trained))
    mqtt_client(job.broker_url, subscriptions=[(job.topics.updates_filter, 1), (job.topics.delta, 1)],
                on_message=frames)  # fmt: skip
    config = make_config(job, idx_dir, rounds=3, min_updates=3, min_devices=3, init_checkpoint=pretrained,
                         trainable=("fc3.*",), downlink="float32", uplink="float32", lr=0.05)  # fmt: skip
    assert config.trainable == trained

    train = load_dataset("mnist", idx_dir, train=True)
    runtime = DeviceRuntime(DeviceOptions(broker=BrokerSettings(broker=job.broker_url), job=job.name,
                                          prefix=job.prefix), train_seed=1)  # fmt: skip
    runtime.add_device("d1", train.subset(np.arange(0, 200)))
    runtime.add_device("d2", train.subset(np.arange(200, 400)))
    with running(config) as (service, result):
        job.devices.online("h")
        runtime.connect_all(timeout=30)
        worker = threading.Thread(target=runtime.run, daemon=True)
        worker.start()
        try:
            plan = job.view.wait_plan(1)
            assert plan.trainable == trained and plan.model_digest is not None
            model_1, _ = job.view.wait_model(1)
            assert all(model_1[k].tobytes() == start[k].tobytes() for k in start)  # round 1 is the file's model
            # h, a selected device, sends an update carrying frozen tensors, then one missing a trainable tensor:
            # both refused; then a proper one (accepted: h keeps working, the job goes on).
            job.devices.send("h", job.frame(1, "h", 0.01))
            refusal = job.view.wait_refusal("h", RefusalReason.FROZEN_TENSOR)
            assert "trains only fc3.weight, fc3.bias (--trainable)" in refusal.detail
            assert "frozen tensor(s) fc1.weight, fc1.bias, fc2.weight, fc2.bias" in refusal.detail
            only_weight = {"fc3.weight": constant_update(0.0)["fc3.weight"]}
            job.devices.send("h", job.frame(1, "h", arrays=only_weight))
            missing = job.view.wait_refusal("h", RefusalReason.MANIFEST_MISMATCH)
            assert "fc3.bias" in missing.detail
            head_only = {k: v for k, v in constant_update(0.0).items() if k in trained}
            for round_number in (1, 2, 3):
                plan = job.view.wait_plan(round_number)
                path = DownlinkPath.FULL if round_number == 1 else DownlinkPath.DELTA  # as a device says it
                job.devices.send("h", encode_frame(head_only, kind=FrameKind.UPDATE, job=job.name, round=round_number,
                                                   sender="h", codec=CodecSpec(), num_samples=10, model_name="mlp",
                                                   base_model_hash=plan.model_hash, downlink=path))  # fmt: skip
            job.view.wait_event(EventType.JOB_FINISHED, timeout=120)
            assert exit_code(result) == 0
        finally:
            runtime.stop()
            worker.join(timeout=30)
            runtime.close()

    summaries = [job.view.wait_summary(n) for n in (1, 2, 3)]
    assert all(set(s.participants) == {"d1", "d2", "h"} for s in summaries)
    assert summaries[0].refused == {RefusalReason.FROZEN_TENSOR: 1, RefusalReason.MANIFEST_MISMATCH: 1}
    # Frozen tensors: bit-identical to the file after three rounds; the head moved.
    final = service.global_arrays
    final_frame, _ = job.view.wait_model(4)
    for name in start:
        if name in trained:
            assert not np.array_equal(final[name], start[name])
        else:
            assert final[name].tobytes() == start[name].tobytes() == final_frame[name].tobytes()
    # Updates carry only the trainable tensors: 200x10 + 10 float32 = 8,040 bytes of values.
    device_updates = [(size, names) for size, names, _ in frames.on(job.topics.update("d1"))]
    device_updates += [(size, names) for size, names, _ in frames.on(job.topics.update("d2"))]
    assert len(device_updates) == 6 and all(names == trained for _, names in device_updates)
    full_size = len(
        encode_frame(
            _mlp(5), kind=FrameKind.UPDATE, job=job.name, round=1, sender="d1", codec=CodecSpec(), num_samples=200
        )
    )  # the same device's update of every tensor
    assert all(size < 9_000 for size, _ in device_updates) and full_size > 700_000
    # Downlink: every model also goes out as a model part (the head alone, float32); from round 2 on the devices
    # hold a model of the job and take only that.
    deltas = frames.on(job.topics.delta)
    assert {r for _, _, r in deltas} == {1, 2, 3, 4} and all(names == trained for _, names, _ in deltas)
    assert summaries[0].bytes_down_full and not summaries[0].bytes_down_delta
    delta_size = {r: size for size, _, r in deltas}
    assert all(size < 9_000 for size in delta_size.values())
    for s in summaries[1:]:  # h and the runtime's process (its second device holds the model) took the delta
        assert (s.bytes_down_delta, s.bytes_down_full) == (2 * delta_size[s.round], 0)
    print({"update_bytes": sorted({size for size, _ in device_updates}), "full_update_bytes": full_size,
           "delta_bytes": [size for size, _, _ in deltas],
           "summaries": [(s.bytes_up, s.bytes_down_delta, s.bytes_down_full) for s in summaries]})  # fmt: skip


@pytest.mark.e2e
@pytest.mark.mosquitto
def test_a_device_declines_a_plan_whose_trainable_set_is_not_its_model_and_serves_a_good_one(
    mosquitto_broker: Any, topic_prefix: str, tmp_path: Path, mqtt_client: Callable[..., Any], idx_dir: Path
) -> None:
    """A real `fedmqtt device` process; plans published by the test. A hostile plan's trainable set (an unknown
    tensor, a glob) is declined with a status saying why, and the process goes on to train a head-only plan."""
    from fedmqtt.schema import new_token
    from test_device_runs import Scene

    scene = Scene(mosquitto_broker.url, topic_prefix, tmp_path, mqtt_client)
    try:
        run = new_token()
        digest = scene.publish_model(run)
        scene.publish_plan(1, 0, run, model_hash=digest, trainable=("fc3.weight", "fc9.bias"))
        scene.device("dev", idx_dir, "--id", "dev")
        for attempt, bad in ((0, "fc3.weight, fc9.bias"), (1, "fc3.*")):
            if attempt:
                scene.publish_plan(1, attempt, run, model_hash=digest, trainable=(bad,))
            scene.wait(
                f"the trainable set {bad} to be declined",
                scene.status_where(
                    "dev",
                    lambda s, b=bad: f"trainable tensors ({b}) are not a trainable set of mlp" in (s.detail or ""),
                ),
                alive=("dev",),
            )
        scene.publish_plan(1, 2, run, model_hash=digest, trainable=("fc3.weight", "fc3.bias"))
        update = scene.wait("a head-only update", lambda: scene.updates("dev"), alive=("dev",))[0]
        head = tuple(e for e in model_manifest("mlp") if e.name in ("fc3.weight", "fc3.bias"))
        assert peek_header(update.payload).round == 1  # a compact header: decodes against the head alone
        assert list(decode_frame(update.payload, expected_manifest=head).arrays) == ["fc3.weight", "fc3.bias"]
    finally:
        scene.close()


@pytest.mark.e2e
@pytest.mark.mosquitto
def test_resume_wins_over_init_checkpoint_and_keeps_the_frozen_tensors(
    mosquitto_broker: Any, make_job: Callable[[str], Any], pretrained: Path, idx_dir: Path, tmp_path: Path
) -> None:
    """A head-only job from file A pauses after round 1 (SIGTERM); resumed with --init-checkpoint naming another
    file B, it continues from its checkpoint: the frozen tensors are still A's, bit for bit, after round 2."""
    import signal

    from fedmqtt.model_file import load_model_file, save_model_file
    from harness import constant_update
    from test_pipelined_rounds import exit_code, make_config, running

    other = save_model_file(tmp_path / "other.fedmodel", "mlp", _mlp(7)).arrays
    start = load_model_file(pretrained).arrays
    job = make_job(mosquitto_broker.url)
    config = make_config(job, idx_dir, rounds=2, init_checkpoint=pretrained, trainable=("fc3.*",),
                         checkpoint_dir=tmp_path / "ckpt", uplink="float32")  # fmt: skip
    head = {k: v for k, v in constant_update(0.01).items() if k.startswith("fc3.")}

    def send(round_number: int) -> None:
        plan = job.view.wait_plan(round_number)
        job.devices.send("d1", encode_frame(head, kind=FrameKind.UPDATE, job=job.name, round=round_number,
                                            sender="d1", codec=CodecSpec(), num_samples=10, model_name="mlp",
                                            base_model_hash=plan.model_hash))  # fmt: skip

    with running(config) as (service, result):
        job.devices.online("d1")
        send(1)
        job.view.wait_summary(1)
        job.view.wait_plan(2)
        service.request_stop(signal.SIGTERM)
        assert exit_code(result) == 128 + signal.SIGTERM
    resumed = config.model_copy(update={"resume": True, "init_checkpoint": tmp_path / "other.fedmodel"})
    with running(resumed) as (service, result):
        send(2)
        job.view.wait_event(EventType.JOB_FINISHED)
        assert exit_code(result) == 0
    final = service.global_arrays
    for name, value in start.items():
        if name.startswith("fc3."):
            assert np.allclose(final[name], value + np.float32(0.02), atol=1e-5)  # two rounds of +0.01
        else:
            assert final[name].tobytes() == value.tobytes() != other[name].tobytes()
