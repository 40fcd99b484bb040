"""The frame-level checks of one update (fedmqtt.coordinator.intake): each refusal reason, and what passes.

The coordinator and every aggregator worker run these very functions; tests/test_coordinator_service.py shows the
coordinator's refusals end to end, tests/test_aggregator_worker.py the worker's.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmqtt.codecs import DecodedFrame, encode_frame
from fedmqtt.coordinator import intake
from fedmqtt.privacy.mechanism import DP_UPDATE_WEIGHT
from fedmqtt.schema import CodecSpec, DPMode, DPPlan, FrameHeader, FrameKind, ManifestEntry, RefusalReason
from harness import with_header_field, with_nan

MANIFEST = (ManifestEntry(name="w", shape=(4, 3)), ManifestEntry(name="b", shape=(3,)))
NUMEL = 15


def rules(**overrides: object) -> intake.IntakeRules:
    fields: dict[str, object] = {
        "max_update_bytes": 1_000_000,
        "update_manifest": MANIFEST,
        "model_numel": NUMEL,
        "codec": CodecSpec(),
    }
    fields.update(overrides)
    return intake.IntakeRules(**fields)  # type: ignore[arg-type]


def arrays(value: float = 0.01, manifest: tuple[ManifestEntry, ...] = MANIFEST) -> dict[str, np.ndarray]:
    return {e.name: np.full(e.shape, value, dtype=np.float32) for e in manifest}


def frame(value: float = 0.01, *, tensors: dict[str, np.ndarray] | None = None, num_samples: int = 7) -> bytes:
    return encode_frame(
        arrays(value) if tensors is None else tensors,
        kind=FrameKind.UPDATE,
        job="job",
        round=1,
        sender="d1",
        codec=CodecSpec(),
        num_samples=num_samples,
    )


def run(payload: bytes, r: intake.IntakeRules, dp: DPPlan | None = None, **kw: object) -> DecodedFrame | intake.Refusal:
    header = intake.check_header(payload, r)
    if isinstance(header, intake.Refusal):
        return header
    return intake.check_frame(payload, header, r, dp=dp, **kw)  # type: ignore[arg-type]


def refusal(result: object) -> intake.Refusal:
    assert isinstance(result, intake.Refusal), f"expected a refusal, got {result!r}"
    return result


def test_a_good_update_passes_both_steps_with_its_values() -> None:
    result = run(frame(0.25), rules())
    assert isinstance(result, DecodedFrame)
    assert result.header.num_samples == 7
    for name, value in arrays(0.25).items():
        np.testing.assert_array_equal(result.arrays[name], value)


def test_a_frame_over_the_size_limit_is_refused_before_its_header_is_read() -> None:
    payload = frame()
    r = refusal(intake.check_header(payload, rules(max_update_bytes=len(payload) - 1)))
    assert r.reason is RefusalReason.MALFORMED
    assert f"frame of {len(payload)} bytes exceeds the limit" in r.detail
    assert isinstance(intake.check_header(payload, rules(max_update_bytes=len(payload))), FrameHeader)


@pytest.mark.parametrize(
    "payload", [b"", b"not a frame at all", b"FMQT" + bytes(20), frame()[:30]], ids=["empty", "text", "zeros", "cut"]
)
def test_an_unreadable_header_is_malformed(payload: bytes) -> None:
    assert refusal(intake.check_header(payload, rules())).reason is RefusalReason.MALFORMED


def test_a_header_with_an_unknown_field_is_malformed() -> None:
    r = refusal(intake.check_header(with_header_field(frame(), "surprise", 1), rules()))
    assert r.reason is RefusalReason.MALFORMED


def test_a_frozen_tensor_is_refused_by_name_before_decoding() -> None:
    trained = rules(update_manifest=(MANIFEST[1],), trained=("b",))
    r = refusal(run(frame(), trained))  # carries w, which the job does not train
    assert r.reason is RefusalReason.FROZEN_TENSOR
    assert "frozen tensor(s) w" in r.detail and "trains only b" in r.detail
    ok = run(frame(tensors=arrays(manifest=(MANIFEST[1],))), trained)
    assert isinstance(ok, DecodedFrame) and list(ok.arrays) == ["b"]


def test_a_frame_of_another_model_is_a_manifest_mismatch() -> None:
    other = {"w": np.zeros((4, 4), np.float32), "b": np.zeros(3, np.float32)}
    r = refusal(run(frame(tensors=other), rules()))
    assert r.reason is RefusalReason.MANIFEST_MISMATCH


def test_nan_values_are_non_finite() -> None:
    assert refusal(run(with_nan(frame()), rules())).reason is RefusalReason.NON_FINITE


def test_a_corrupted_body_is_malformed() -> None:
    payload = bytearray(frame(0.5))
    payload[-3] ^= 0xFF
    assert refusal(run(bytes(payload), rules())).reason is RefusalReason.MALFORMED


def test_the_body_bound_refuses_a_body_larger_than_the_model_allows() -> None:
    # The bound is max(4 x the frame limit, 10 x the model's values).
    assert intake.body_limit(10, 3) == 40 and intake.body_limit(10, 100) == 1000
    big = (ManifestEntry(name="w", shape=(1000,)),)
    payload = frame(tensors=arrays(0.0, big))  # 4,000 bytes of zeros compress to a few hundred
    tight = rules(update_manifest=big, model_numel=1, max_update_bytes=len(payload))
    assert tight.max_body_bytes < 4000
    r = refusal(run(payload, tight))
    assert r.reason is RefusalReason.MALFORMED
    assert isinstance(run(payload, rules(update_manifest=big, model_numel=1000, max_update_bytes=len(payload))),
                      DecodedFrame)  # fmt: skip


def test_max_update_norm_refuses_a_large_update() -> None:
    norm = float(np.sqrt(NUMEL)) * 1.0  # every entry 1.0
    r = refusal(run(frame(1.0), rules(max_update_norm=norm * 0.99)))
    assert r.reason is RefusalReason.NORM_TOO_LARGE and "--max-update-norm" in r.detail
    assert isinstance(run(frame(1.0), rules(max_update_norm=norm * 1.01)), DecodedFrame)


def test_under_dp_an_update_above_the_clip_bound_is_refused() -> None:
    dp = DPPlan(
        mode=DPMode.CENTRAL,
        clip=1.0,
        noise_multiplier=1.0,
        device_noise_std=0.0,
        expected_updates=2,
        sample_rate=1.0,
        delta=1e-5,
    )
    r = refusal(run(frame(1.0), rules(), dp=dp))  # norm sqrt(15) > 1
    assert r.reason is RefusalReason.NORM_EXCEEDS_CLIP and "clip bound" in r.detail
    assert isinstance(run(frame(0.1), rules(), dp=dp), DecodedFrame)  # norm 0.39
    assert isinstance(run(frame(1.0), rules(), dp=None), DecodedFrame)


def test_the_values_check_runs_after_the_value_screen_and_can_refuse() -> None:
    seen: list[float] = []

    def check(values: dict[str, np.ndarray]) -> intake.Refusal | None:
        seen.append(float(values["b"][0]))
        return intake.Refusal(RefusalReason.NORM_TOO_LARGE, "alone it overflows")

    assert refusal(run(frame(0.5), rules(), values_check=check)).detail == "alone it overflows"
    assert refusal(run(with_nan(frame(0.5)), rules(), values_check=check)).reason is RefusalReason.NON_FINITE
    assert seen == [0.5]  # not called for the NaN frame


def test_the_weight_rule() -> None:
    header = intake.check_header(frame(num_samples=42), rules())
    assert isinstance(header, FrameHeader)
    assert intake.update_weight(header, dp=False) == 42.0
    assert intake.update_weight(header, dp=True) == DP_UPDATE_WEIGHT


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_are_refused_never_raised(junk: bytes) -> None:
    r = run(junk, rules())
    assert isinstance(r, intake.Refusal)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=2000), st.integers(min_value=0, max_value=255))
def test_a_flipped_byte_anywhere_never_raises(position: int, flip: int) -> None:
    payload = bytearray(frame(0.3))
    payload[position % len(payload)] ^= flip
    result = run(bytes(payload), rules())
    assert isinstance(result, (intake.Refusal, DecodedFrame))
    if isinstance(result, DecodedFrame):  # a flip the header still parses (a letter of a name): the body's checksum
        for name, value in arrays(0.3).items():  # guarantees the values are the ones sent
            np.testing.assert_array_equal(result.arrays[name], value)
