"""The compressed downlink's pure core (fedmqtt.codecs.downlink): the coordinator's tracker of the model devices
hold, and a device applying delta frames, with every refusal that sends a device to the full model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmqtt import arrays as A
from fedmqtt.codecs import (
    DeltaBaseMismatch,
    DeltaMismatch,
    FrameError,
    TruncatedFrame,
    decode_frame,
    encode_frame,
    model_hash,
)
from fedmqtt.codecs.downlink import (
    DownlinkTracker,
    apply_delta,
    apply_delta_frame,
    arrays_digest,
    first_model_codec,
    full_model_codec,
    sends_deltas,
)
from fedmqtt.schema import CodecSpec, FrameKind, ManifestEntry

JOB = "j"
RUN = "0123456789abcdef"
CODECS = ["float16", "int8", "int8c", "int8s", "topk:0.1+int8", "topk:0.01+int8c", "topk:0.05+float32"]


def model(seed: int, scale: float = 1.0) -> A.ModelArrays:
    rng = np.random.default_rng(seed)
    return {
        "w": (rng.standard_normal((16, 8)) * scale).astype(np.float32),
        "b": (rng.standard_normal(8) * scale).astype(np.float32),
        "s": np.asarray(rng.standard_normal() * scale, dtype=np.float32),
    }


def full_frame(arrays: A.ModelArrays, round_number: int) -> bytes:
    return encode_frame(
        arrays, kind=FrameKind.GLOBAL_MODEL, job=JOB, round=round_number, sender="coordinator", codec=CodecSpec(),
        run_id=RUN,
    )  # fmt: skip


class Server:
    """The coordinator's side as service.py runs it: x moves by training steps, x_hat by delta frames."""

    def __init__(self, codec: str, x: A.ModelArrays) -> None:
        # The first model goes out whole in the codec's values (DownlinkTracker.start): its frame defines x_hat.
        self.tracker, self.first = DownlinkTracker.start(
            CodecSpec.parse(codec), x, job=JOB, round=1, sender="coordinator", run_id=RUN
        )
        self.x = x
        self.round = 1
        self.hash = model_hash(self.first)

    def step(self, x: A.ModelArrays) -> tuple[bytes, str, str]:
        """The next round's delta frame, and the plan's model hash and digest."""
        self.x, self.round = x, self.round + 1
        frame = self.tracker.delta_frame(
            x, job=JOB, round=self.round, sender="coordinator", base_model_hash=self.hash, run_id=RUN,
            rng=np.random.default_rng(self.round),
        )  # fmt: skip
        self.hash = model_hash(full_frame(self.tracker.held, self.round))
        return frame, self.hash, arrays_digest(self.tracker.held)


class Device:
    """A device that holds the last model it obtained, by its plan hash."""

    def __init__(self, full: bytes) -> None:
        self.held = decode_frame(full).arrays
        self.hash = model_hash(full)

    def apply(self, frame: bytes, round_number: int, plan_hash: str, digest: str) -> None:
        self.held = apply_delta_frame(
            frame, held=self.held, held_hash=self.hash, job=JOB, round=round_number, run_id=RUN, digest=digest
        )
        self.hash = plan_hash


def training_steps(x0: A.ModelArrays, rounds: int, seed: int = 0) -> list[A.ModelArrays]:
    """A trajectory of global models, each a small random step from the one before."""
    rng = np.random.default_rng(seed)
    out, x = [], x0
    for _ in range(rounds):
        x = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * np.float32(0.05)).astype(np.float32)
             for k, v in x.items()}  # fmt: skip
        out.append(x)
    return out


# --- which codecs send deltas -----------------------------------------------------------------------


def test_only_lossy_codecs_send_deltas_and_the_full_model_is_always_lossless() -> None:
    assert not sends_deltas(CodecSpec.parse("float32"))
    assert not sends_deltas(CodecSpec.parse("float32+zstd:9"))
    for text in CODECS:
        codec = CodecSpec.parse(text)
        assert sends_deltas(codec), text
        full = full_model_codec(codec)
        assert full.values.value == "float32" and full.topk is None and full.zstd_level == codec.zstd_level
    assert str(full_model_codec(CodecSpec.parse("float32+zstd:5"))) == "float32+zstd:5"
    with pytest.raises(ValueError, match="without 'ef'"):
        DownlinkTracker(CodecSpec.parse("int8+ef"), model(0))


@pytest.mark.parametrize(
    ("downlink", "first"),
    [
        ("float32", "float32"),
        ("float32+zstd:7", "float32+zstd:7"),
        ("float16", "float16"),
        ("int8", "int8"),
        ("int8c", "int8c"),
        ("int8s", "int8"),  # the first model is rounded deterministically
        ("topk:0.1+int8", "int8"),  # whole: no top-k
        ("gtopk:0.01+int8c+zstd:3", "int8c+zstd:3"),
        ("topk:0.05+float32", "float32"),
        ("topk:0.01+sign", "float32"),  # a sign per weight is no model
    ],
)
def test_the_first_model_goes_out_in_the_codecs_own_values(downlink: str, first: str) -> None:
    codec = CodecSpec.parse(downlink)
    assert str(first_model_codec(codec)) == str(CodecSpec.parse(first))
    # A --trainable job's frozen tensors are never sent again: its first model is exact.
    assert first_model_codec(codec, whole_model_tracked=False) == full_model_codec(codec)


@pytest.mark.parametrize("codec", ["float16", "int8", "topk:0.1+int8"])
def test_the_first_frame_is_what_defines_x_hat_and_costs_a_fraction_of_float32(codec: str) -> None:
    x0 = {"w": np.random.default_rng(5).standard_normal((64, 64)).astype(np.float32)}
    tracker, frame = DownlinkTracker.start(CodecSpec.parse(codec), x0, job=JOB, round=1, sender="c", run_id=RUN)
    decoded = decode_frame(frame)
    assert decoded.header.kind is FrameKind.GLOBAL_MODEL and decoded.header.round == 1
    assert arrays_digest(decoded.arrays) == arrays_digest(tracker.held)
    lossless = len(full_frame(x0, 1))
    assert len(frame) < lossless / (1.8 if codec == "float16" else 3.5)
    # x_hat is x rounded, and the rounding error is what the next delta carries (error feedback on the server).
    assert not np.array_equal(tracker.held["w"], x0["w"])
    error = float(np.max(np.abs(tracker.residual(x0)["w"])))
    assert 0 < error <= float(np.max(np.abs(x0["w"]))) / (1000 if codec == "float16" else 100)


def test_a_restart_at_the_first_model_sends_the_very_same_frame() -> None:
    x0, codec = model(6), CodecSpec.parse("topk:0.1+int8c")
    fields = {"job": JOB, "round": 1, "sender": "c", "run_id": RUN}
    tracker, frame = DownlinkTracker.start(codec, x0, **fields)
    restored = DownlinkTracker.from_state_dict(codec, tracker.state_dict())
    assert restored.first_frame_again(x0, **fields) == frame
    # A tracker begun from a model the devices got losslessly (a checkpoint of a job that sent whole models): the
    # int8 frame would not decode to what they hold, so the caller sends x_hat in float32 instead.
    assert DownlinkTracker(codec, x0).first_frame_again(x0, **fields) is None


def test_a_trainable_jobs_first_model_is_exact() -> None:
    x0 = model(4)
    tracker, frame = DownlinkTracker.start(CodecSpec.parse("int8"), x0, ["w"], job=JOB, round=1, sender="c", run_id=RUN)
    assert all(np.array_equal(tracker.held[k], x0[k]) for k in x0)
    assert decode_frame(frame).header.codec == str(full_model_codec(CodecSpec.parse("int8")))


# --- the tracker and a device hold the same bits --------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_a_device_tracks_the_coordinators_model_bit_for_bit_over_many_rounds(codec: str) -> None:
    x0 = model(1)
    server = Server(codec, x0)
    device = Device(server.first)
    assert device.hash == server.hash
    for x in training_steps(x0, 30):
        frame, plan_hash, digest = server.step(x)
        device.apply(frame, server.round, plan_hash, digest)
        for name, value in server.tracker.held.items():
            assert value.dtype == np.float32
            assert np.array_equal(device.held[name], value), (codec, name)
        # A late joiner takes the full model of x_hat: the very same bits, under the plan's hash.
        late = Device(full_frame(server.tracker.held, server.round))
        assert late.hash == plan_hash and arrays_digest(late.held) == digest


@settings(max_examples=40, deadline=None)
@given(
    codec=st.sampled_from(CODECS),
    seed=st.integers(0, 2**31),
    scale=st.floats(1e-4, 1e3),
    rounds=st.integers(1, 6),
)
def test_property_device_and_coordinator_copies_agree(codec: str, seed: int, scale: float, rounds: int) -> None:
    x0 = model(seed, scale)
    server = Server(codec, x0)
    device = Device(server.first)
    assert arrays_digest(device.held) == arrays_digest(server.tracker.held)
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        x = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * np.float32(scale)).astype(np.float32)
             for k, v in server.x.items()}  # fmt: skip
        frame, plan_hash, digest = server.step(x)
        device.apply(frame, server.round, plan_hash, digest)
        assert arrays_digest(device.held) == arrays_digest(server.tracker.held) == digest


@pytest.mark.parametrize("codec", ["int8", "topk:0.1+int8", "topk:0.01+int8"])
def test_the_residual_shrinks_and_top_k_with_error_feedback_converges_to_the_model(codec: str) -> None:
    """With x fixed, each delta carries what the last ones dropped: x_hat reaches x (top-k 1 % too, in about
    1/k rounds plus the int8 error, which shrinks with the residual)."""
    x_hat = model(2)
    x = A.add(x_hat, model(3))
    tracker = DownlinkTracker(CodecSpec.parse(codec), x_hat)
    norms = [A.l2_norm(tracker.residual(x))]
    for r in range(300):
        tracker.delta_frame(x, job=JOB, round=r + 2, sender="coordinator", base_model_hash="0" * 64)
        norms.append(A.l2_norm(tracker.residual(x)))
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(norms[:-100], norms[100:], strict=True))
    assert norms[-1] < 1e-3 * norms[0], norms[::30]


def test_without_error_feedback_top_k_would_stall_where_the_tracker_does_not() -> None:
    """The same top-k 10 % delta sent from a stale base every round (no tracking) never gets past the entries it
    keeps; the tracker's residual goes to zero."""
    x_hat, x = model(4), model(5)
    codec = CodecSpec.parse("topk:0.1+int8")
    naive = DownlinkTracker(codec, x_hat)
    naive.delta_frame(x, job=JOB, round=2, sender="c", base_model_hash="0" * 64)
    once = A.l2_norm(naive.residual(x))
    tracked = DownlinkTracker(codec, x_hat)
    for r in range(60):
        tracked.delta_frame(x, job=JOB, round=r + 2, sender="c", base_model_hash="0" * 64)
    assert A.l2_norm(tracked.residual(x)) < 0.05 * once


# --- the digest ----------------------------------------------------------------------------------------


def test_the_digest_names_names_shapes_and_every_bit() -> None:
    base = model(6)
    digest = arrays_digest(base)
    assert arrays_digest({k: v.copy() for k, v in base.items()}) == digest
    assert arrays_digest({k: v.astype(">f4") for k, v in base.items()}) == digest  # byte order is canonical
    renamed = {("W" if k == "w" else k): v for k, v in base.items()}
    reshaped = {**base, "w": base["w"].reshape(8, 16)}
    flipped = {**base, "b": base["b"].copy()}
    flipped["b"][0] = np.nextafter(flipped["b"][0], np.float32(np.inf))
    zero, negative_zero = {"z": np.zeros(2, np.float32)}, {"z": np.array([0.0, -0.0], np.float32)}
    assert len({digest, arrays_digest(renamed), arrays_digest(reshaped), arrays_digest(flipped)}) == 4
    assert arrays_digest(zero) != arrays_digest(negative_zero)


def test_a_tracker_restored_from_its_state_continues_identically() -> None:
    codec = CodecSpec.parse("topk:0.1+int8")
    a = DownlinkTracker(codec, model(7))
    x1, x2 = training_steps(model(7), 2)
    a.delta_frame(x1, job=JOB, round=2, sender="c", base_model_hash="0" * 64)
    b = DownlinkTracker.from_state_dict(codec, a.state_dict())
    fa = a.delta_frame(x2, job=JOB, round=3, sender="c", base_model_hash="1" * 64)
    fb = b.delta_frame(x2, job=JOB, round=3, sender="c", base_model_hash="1" * 64)
    assert fa == fb and arrays_digest(a.held) == arrays_digest(b.held)
    with pytest.raises(ValueError, match="'held'"):
        DownlinkTracker.from_state_dict(codec, {})


# --- hostile or unwanted delta frames: refused, the device fetches the full model ---------------------


@pytest.fixture
def scene() -> tuple[Server, Device, bytes, str, str]:
    x0 = model(8)
    server = Server("int8", x0)
    device = Device(server.first)
    (x1,) = training_steps(x0, 1)
    frame, plan_hash, digest = server.step(x1)
    return server, device, frame, plan_hash, digest


def _apply(device: Device, frame: bytes, **overrides: object) -> A.ModelArrays:
    fields: dict[str, object] = {"held": device.held, "held_hash": device.hash, "job": JOB, "round": 2,
                                 "run_id": RUN}  # fmt: skip
    fields.update(overrides)
    return apply_delta_frame(frame, **fields)  # type: ignore[arg-type]


def test_the_good_delta_applies(scene: tuple[Server, Device, bytes, str, str]) -> None:
    server, device, frame, _, digest = scene
    manifest = tuple(ManifestEntry(name=k, shape=v.shape) for k, v in device.held.items())
    result = _apply(device, frame, digest=digest, manifest=manifest)
    assert arrays_digest(result) == arrays_digest(server.tracker.held)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"held_hash": "f" * 64}, DeltaBaseMismatch, "this device holds"),
        ({"digest": "e" * 64}, DeltaMismatch, "corrupt or forged"),
        ({"job": "other"}, DeltaMismatch, "for job 'j'"),
        ({"run_id": "fedcba9876543210"}, DeltaMismatch, "run 0123456789abcdef"),
        ({"round": 3}, DeltaMismatch, "model of round 2, the plan is for round 3"),
    ],
)
def test_a_delta_for_another_base_model_result_job_run_or_round_is_refused(
    scene: tuple[Server, Device, bytes, str, str], overrides: dict[str, object], error: type, message: str
) -> None:
    _, device, frame, _, digest = scene
    with pytest.raises(error, match=message):
        _apply(device, frame, **{"digest": digest, **overrides})


def test_a_truncated_or_misfiled_frame_is_refused(scene: tuple[Server, Device, bytes, str, str]) -> None:
    server, device, frame, _, digest = scene
    with pytest.raises(TruncatedFrame):
        _apply(device, frame[: len(frame) // 2], digest=digest)
    with pytest.raises(DeltaMismatch, match="a global_model frame on the delta topic"):
        _apply(device, full_frame(server.tracker.held, 2), digest=digest)
    with pytest.raises(FrameError):
        _apply(device, b"not a frame", digest=digest)
    wrong_shape = {**device.held, "w": device.held["w"][:4]}
    with pytest.raises(DeltaMismatch, match="tensor 'w'"):
        apply_delta(wrong_shape, device.held)
    with pytest.raises(DeltaMismatch, match="tensors"):
        apply_delta({"b": device.held["b"]}, device.held)
