"""Round trips, error bounds and error feedback of fedmqtt.codecs (real encoder, real decoder)."""

from __future__ import annotations

import hashlib
import json
import math
import struct

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmqtt.arrays import manifest_of
from fedmqtt.codecs import (
    COMPRESSED_HEADER_VERSION,
    HEADER_DICTIONARY,
    MAGIC,
    DecodedFrame,
    EncodeError,
    ErrorFeedback,
    FeedbackError,
    NonFiniteInput,
    decode_frame,
    encode_frame,
    manifest_key,
    model_hash,
    peek_header,
)
from fedmqtt.codecs.encodings import best_rice_parameter, kept_count, rice_bits
from fedmqtt.errors import FedmqttError
from fedmqtt.schema import CodecSpec, DPAnnouncement, FrameKind, ValueEncoding

HASH = "ab" * 32
PREFIX = struct.Struct("<4sBIQ")


def encode(arrays: dict[str, np.ndarray], codec: str | CodecSpec, **kw: object) -> bytes:
    spec = codec if isinstance(codec, CodecSpec) else CodecSpec.parse(codec)
    fields: dict[str, object] = {"kind": FrameKind.UPDATE, "job": "job1", "round": 3, "sender": "dev-1"}
    fields.update(kw)
    return encode_frame(arrays, codec=spec, **fields)  # type: ignore[arg-type]


def roundtrip(arrays: dict[str, np.ndarray], codec: str, **kw: object) -> DecodedFrame:
    return decode_frame(encode(arrays, codec, **kw))


# --- strategies -------------------------------------------------------------------------------------

SHAPES = st.one_of(
    st.just(()),
    hnp.array_shapes(min_dims=1, max_dims=1, min_side=1, max_side=60),
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
    hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=4),  # conv-like
    hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=3),  # may be empty
)
ELEMENTS = st.floats(min_value=-3e4, max_value=3e4, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def model_arrays(draw: st.DrawFn) -> dict[str, np.ndarray]:
    names = draw(
        st.lists(st.sampled_from(["w", "b", "conv.weight", "fc.bias", "s"]), min_size=1, max_size=4, unique=True)
    )
    return {n: draw(hnp.arrays(np.float32, draw(SHAPES), elements=ELEMENTS)) for n in names}


VALUE_CODECS = ["float32", "float16", "int8", "int8c", "int8s", "int8cs", "sign"]
ALL_CODECS = VALUE_CODECS + [f"topk:{k}+{v}" for k in ("0.5", "0.1", "0.01") for v in VALUE_CODECS]


# --- a reference model of what each codec may return -------------------------------------------------


def int8_scales(x: np.ndarray, kept: np.ndarray, per_channel: bool) -> np.ndarray:
    """The scale that applies to each element: max |kept value| (of the tensor or its channel) / 127."""
    mag = np.where(kept, np.abs(x), 0).astype(np.float64)
    if x.size == 0:
        return mag
    if per_channel and x.ndim >= 2:
        amax = mag.reshape(x.shape[0], -1).max(axis=1, initial=0.0)
        return np.broadcast_to(amax.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape) / 127
    return np.full(x.shape, mag.max(initial=0.0) / 127)


def check_tensor(x: np.ndarray, got: np.ndarray, spec: CodecSpec) -> None:
    assert got.dtype == np.float32 and got.shape == x.shape
    assert np.isfinite(got).all()
    if spec.topk is not None:
        k = kept_count(x.size, spec.topk)
        mag = np.abs(x).ravel()
        kth = np.sort(mag)[x.size - k] if x.size else 0.0
        sure = (np.abs(x) > kth) if k < x.size else np.ones(x.shape, bool)  # certainly kept
        maybe = np.abs(x) >= kth  # ties at the threshold may go either way
        assert np.all(got[~maybe] == 0), "an entry below the k-th magnitude was transmitted"
        assert np.count_nonzero(got) <= k
        kept = maybe if k < x.size else sure
        check = sure | (got != 0)
    else:
        kept = np.ones(x.shape, bool)
        check = kept
    if spec.values is ValueEncoding.FLOAT32:
        assert np.array_equal(got[check], x[check])
    elif spec.values is ValueEncoding.FLOAT16:
        assert np.array_equal(got[check], x[check].astype(np.float16).astype(np.float32))
    elif spec.values is ValueEncoding.SIGN:
        # Every transmitted value is +-scale, scale = the mean magnitude of the kept values, sign = their sign.
        sent = got != 0
        if not sent.any():  # scale 0: the kept values are all 0 (or their mean underflows float32)
            assert np.all(np.abs(x) <= np.finfo(np.float32).smallest_subnormal * max(1, x.size))
            return
        if spec.topk is None:
            assert sent.all()
        if spec.topk is not None:
            assert np.count_nonzero(sent) == kept_count(x.size, spec.topk)
        scale = np.float32(np.abs(x[sent], dtype=np.float64).mean())
        assert np.all(np.abs(got[sent]) == scale)
        assert np.all(np.signbit(got[sent]) == (x[sent] < 0))
    else:
        scale = int8_scales(x, kept, spec.per_channel)
        err = np.abs(got.astype(np.float64) - x.astype(np.float64))
        # Deterministic rounding is off by at most half a step, stochastic by less than a step; the
        # slack covers float32 arithmetic in scale / divide / multiply.
        bound = scale * (1.0 if spec.stochastic else 0.5) * (1 + 1e-4) + 1e-6 * np.abs(x) + 1e-44
        assert np.all(err[check] <= bound[check]), float((err - bound)[check].max())


# --- round trips -------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(arrays=model_arrays(), codec=st.sampled_from(ALL_CODECS), seed=st.integers(0, 2**32 - 1))
def test_every_codec_round_trips_within_its_error_bound(arrays: dict[str, np.ndarray], codec: str, seed: int) -> None:
    spec = CodecSpec.parse(codec)
    decoded = roundtrip(arrays, codec, rng=np.random.default_rng(seed))
    assert list(decoded.arrays) == list(arrays)
    assert decoded.header.manifest() == manifest_of(arrays)
    for name, x in arrays.items():
        check_tensor(x, decoded.arrays[name], spec)


@settings(max_examples=60, deadline=None)
@given(arrays=model_arrays())
def test_float32_is_exact_and_float16_matches_a_cast(arrays: dict[str, np.ndarray]) -> None:
    exact = roundtrip(arrays, "float32").arrays
    half = roundtrip(arrays, "float16").arrays
    for name, x in arrays.items():
        assert np.array_equal(exact[name], x)
        assert np.array_equal(half[name], x.astype(np.float16).astype(np.float32))
        # float16 keeps 11 significant bits: relative error <= 2**-11 for normal numbers.
        normal = np.abs(x) >= 6.2e-5
        assert np.all(np.abs(half[name] - x)[normal] <= np.abs(x)[normal] * 2.0**-11)


@pytest.mark.parametrize("codec", ["int8", "int8c"])
def test_int8_deterministic_error_is_at_most_half_a_step(codec: str) -> None:
    rng = np.random.default_rng(1)
    # Channels of very different magnitude: where per-channel scales pay off.
    w = (rng.standard_normal((16, 8, 3, 3)) * np.logspace(-3, 1, 16)[:, None, None, None]).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    out = roundtrip({"w": w, "b": b}, codec)
    for name, x in (("w", w), ("b", b)):
        if codec == "int8c" and x.ndim >= 2:
            step = np.abs(x).reshape(x.shape[0], -1).max(axis=1) / 127
            step = step.reshape(-1, 1, 1, 1)
        else:
            step = np.abs(x).max() / 127
        err = np.abs(out.arrays[name] - x)
        assert np.all(err <= step / 2 * (1 + 1e-4) + 1e-7 * np.abs(x))
    tensor_err = np.abs(roundtrip({"w": w}, "int8").arrays["w"] - w).sum()
    channel_err = np.abs(roundtrip({"w": w}, "int8c").arrays["w"] - w).sum()
    assert channel_err < tensor_err / 3


def test_per_channel_scales_fall_back_to_one_scale_for_biases_and_scalars() -> None:
    arrays = {
        "w": np.ones((4, 3), np.float32),
        "b": np.ones(4, np.float32),
        "s": np.array(2.5, np.float32),
    }
    header = peek_header(encode(arrays, "int8c"))
    axes = {t.name: t.encoding.scale_axis for t in header.tensors}
    assert axes == {"w": 0, "b": None, "s": None}
    sparse = peek_header(encode(arrays, "topk:0.5+int8c"))
    assert {t.name: t.encoding.scale_axis for t in sparse.tensors} == axes


def test_stochastic_rounding_is_unbiased() -> None:
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, size=64).astype(np.float32)
    x[0] = 1.0  # fixes the scale at 1/127
    step = 1.0 / 127
    runs = 1500
    total = np.zeros_like(x, dtype=np.float64)
    for _ in range(runs):
        total += roundtrip({"x": x}, "int8s", rng=rng).arrays["x"]
    mean = total / runs
    # Each decoded value is within one step and has std <= step/2: 5 sigma of the mean of `runs`.
    assert np.all(np.abs(mean - x) <= 5 * step / 2 / math.sqrt(runs))
    # Deterministic rounding of the same input is biased for most entries by far more than that.
    nearest = roundtrip({"x": x}, "int8").arrays["x"]
    assert np.mean(np.abs(nearest - x)) > 10 * np.mean(np.abs(mean - x))


@pytest.mark.parametrize("values", ["float32", "float16", "int8", "int8c"])
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1, 0.5, 1.0])
def test_top_k_keeps_exactly_the_k_largest_magnitudes(values: str, fraction: float) -> None:
    rng = np.random.default_rng(3)
    shape = (20, 5, 3, 3)
    n = math.prod(shape)
    # Distinct magnitudes in [0.5, 1] (none rounds to int8 zero), random signs, shuffled positions.
    magnitude = 0.5 + rng.permutation(np.arange(1, n + 1)) / (2 * n)
    x = (magnitude * rng.choice([-1, 1], n)).astype(np.float32).reshape(shape)
    bias = np.array([0.5, -0.25], np.float32)
    out = roundtrip({"w": x, "b": bias}, f"topk:{fraction}+{values}")
    k = max(1, math.ceil(fraction * n - 1e-9))
    expected = np.zeros(n, bool)
    expected[np.argsort(-np.abs(x.ravel()))[:k]] = True
    assert np.array_equal(out.arrays["w"].ravel() != 0, expected)
    header = out.header
    assert header.tensors[0].encoding.nnz == k
    kept_bias = max(1, math.ceil(fraction * 2))  # at least one per tensor
    assert header.tensors[1].encoding.nnz == kept_bias
    assert np.count_nonzero(out.arrays["b"]) == kept_bias and out.arrays["b"][0] != 0


def test_zero_dim_and_empty_tensors_round_trip_in_every_codec() -> None:
    arrays = {
        "scalar": np.array(-1.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "empty_rows": np.zeros((4, 0), np.float32),
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
    }
    for codec in ALL_CODECS:
        out = roundtrip(arrays, codec, rng=np.random.default_rng(0))
        for name, x in arrays.items():
            assert out.arrays[name].shape == x.shape
        assert out.arrays["scalar"] == pytest.approx(-1.5, abs=1.5 / 127)


def test_float64_input_is_encoded_as_float32() -> None:
    x = np.linspace(-1, 1, 10)
    out = roundtrip({"x": x}, "float32")
    assert np.array_equal(out.arrays["x"], x.astype(np.float32))


def test_all_zero_tensor_quantises_to_zero() -> None:
    for codec in ("int8", "int8c", "int8s", "topk:0.1+int8c"):
        out = roundtrip({"w": np.zeros((3, 4), np.float32)}, codec)
        assert not out.arrays["w"].any()


def test_tiny_values_keep_a_usable_scale() -> None:
    x = np.array([1e-44, -3e-45, 0.0], np.float32)  # max/127 underflows float32
    out = roundtrip({"x": x}, "int8").arrays["x"]
    assert np.array_equal(out, x)


# --- header, hashing, determinism ----------------------------------------------------------------------


def test_header_fields_round_trip_and_peek_matches_decode() -> None:
    dp = DPAnnouncement(mode="device", clip=1.0, noise_std=0.1)
    arrays = {"w": np.ones((2, 2), np.float32)}
    frame = encode(
        arrays,
        "topk:0.5+int8c+zstd:3",
        kind=FrameKind.PARTIAL_AGGREGATE,
        round=9,
        num_samples=600,
        num_updates=4,
        weight=2400.0,
        base_model_hash=HASH,
        model_name="cnn",
        dp=dp,
    )
    header = decode_frame(frame).header
    assert peek_header(frame) == header
    assert (header.kind, header.job, header.round, header.sender) == (FrameKind.PARTIAL_AGGREGATE, "job1", 9, "dev-1")
    assert (header.num_samples, header.num_updates, header.weight) == (600, 4, 2400.0)
    assert header.base_model_hash == HASH and header.model_name == "cnn" and header.dp == dp
    assert header.codec == "topk:0.5+int8c+zstd:3"
    assert CodecSpec.parse(header.codec) == CodecSpec.parse("topk:0.5+int8c+zstd:3")


def test_frame_layout_magic_lengths_content_size_and_checksum() -> None:
    arrays = {"w": np.arange(100, dtype=np.float32)}
    frame = encode(arrays, "float32")
    magic, version, header_len, body_len = PREFIX.unpack_from(frame)
    assert (magic, version) == (MAGIC, 1)
    assert PREFIX.size + header_len + body_len == len(frame)
    header = json.loads(frame[PREFIX.size : PREFIX.size + header_len])
    body = frame[PREFIX.size + header_len :]
    assert zstandard.frame_content_size(body) == header["body_size"] == 400
    raw = zstandard.ZstdDecompressor().decompress(body)
    assert hashlib.blake2b(raw, digest_size=16).hexdigest() == header["body_blake2b"]
    assert np.array_equal(np.frombuffer(raw, "<f4"), arrays["w"])  # raw little-endian, no pickle


def test_model_hash_is_sha256_of_the_frame_and_encoding_is_deterministic() -> None:
    arrays = {"w": np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)}
    for codec in ("float32", "int8c", "topk:0.1+float16"):
        a, b = encode(arrays, codec), encode(arrays, codec)
        assert a == b
        assert model_hash(a) == hashlib.sha256(a).hexdigest()
    assert model_hash(encode(arrays, "float32")) != model_hash(encode(arrays, "float16"))


def test_zstd_level_is_honoured() -> None:
    x = {"w": np.round(np.random.default_rng(0).standard_normal(20000), 1).astype(np.float32)}
    fast, strong = encode(x, "float32+zstd:-5"), encode(x, "float32+zstd:19")
    assert len(strong) < len(fast)
    assert np.array_equal(decode_frame(strong).arrays["w"], decode_frame(fast).arrays["w"])


def test_expected_manifest_that_matches_is_accepted() -> None:
    arrays = {"w": np.ones((2, 3), np.float32), "b": np.ones(2, np.float32)}
    out = decode_frame(encode(arrays, "int8"), expected_manifest=manifest_of(arrays))
    assert list(out.arrays) == ["w", "b"]


def test_decode_accepts_bytearray_and_memoryview() -> None:
    frame = encode({"w": np.ones(3, np.float32)}, "float16")
    for data in (bytearray(frame), memoryview(frame)):
        assert np.array_equal(decode_frame(data).arrays["w"], np.ones(3, np.float32))


def test_decoded_arrays_are_writable_copies() -> None:
    out = roundtrip({"w": np.ones((2, 2), np.float32)}, "float32")
    out.arrays["w"] += 1
    assert out.arrays["w"].flags.writeable and out.arrays["w"][0, 0] == 2


# --- encoder refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_refuses_non_finite_input(bad: float) -> None:
    x = np.ones(5, np.float32)
    x[2] = bad
    with pytest.raises(NonFiniteInput, match=r"'w' has 1 NaN or infinite"):
        encode({"w": x}, "int8")


def test_encode_refuses_float64_that_overflows_float32() -> None:
    with pytest.raises(NonFiniteInput):
        encode({"w": np.array([1e300])}, "float32")


def test_encode_refuses_values_beyond_float16_range() -> None:
    with pytest.raises(EncodeError, match="beyond float16's range"):
        encode({"w": np.array([1.0, 70000.0], np.float32)}, "float16")
    encode({"w": np.array([1.0, 70000.0], np.float32)}, "topk:0.5+int8")  # fine with int8


@pytest.mark.parametrize(
    ("arrays", "kw", "match"),
    [
        ({"w": np.arange(3)}, {}, "dtype int64"),
        ({"w": [1.0, 2.0]}, {}, "not a numpy array"),
        ({"": np.ones(2, np.float32)}, {}, "at least 1 character"),
        ({"w": np.ones(2, np.float32)}, {"job": "bad/job"}, "job"),
        ({"w": np.ones(2, np.float32)}, {"sender": "+"}, "sender"),
        ({"w": np.ones(2, np.float32)}, {"round": -1}, "round"),
        ({"w": np.ones(2, np.float32)}, {"base_model_hash": "xyz"}, "base_model_hash"),
        ({"w": np.ones(2, np.float32)}, {"weight": float("nan")}, "weight"),
    ],
)
def test_encode_refuses_bad_arrays_and_fields(arrays: dict[str, object], kw: dict[str, object], match: str) -> None:
    with pytest.raises(EncodeError, match=match):
        encode(arrays, "float32", **kw)  # type: ignore[arg-type]


def test_encode_requires_feedback_exactly_with_ef() -> None:
    x = {"w": np.ones(4, np.float32)}
    with pytest.raises(EncodeError, match=r"pass feedback=ErrorFeedback\(\)"):
        encode(x, "topk:0.5+int8+ef")
    with pytest.raises(EncodeError, match=r"add '\+ef'"):
        encode(x, "topk:0.5+int8", feedback=ErrorFeedback())


# --- error feedback ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "codec",
    ["topk:0.05+int8+ef", "topk:0.2+float16+ef", "int8s+ef", "topk:0.01+int8c+ef", "topk:0.05+sign+ef", "sign+ef"],
)
def test_error_feedback_conserves_the_sum_of_updates(codec: str) -> None:
    rng = np.random.default_rng(11)
    ef = ErrorFeedback()
    shapes = {"conv": (8, 3, 3, 3), "bias": (8,), "fc": (10, 40)}
    raw_sum = {k: np.zeros(s, np.float64) for k, s in shapes.items()}
    sent_sum = {k: np.zeros(s, np.float64) for k, s in shapes.items()}
    for step in range(12):
        update = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}
        before = ef.residual
        frame = encode(update, codec, feedback=ef, round=step, rng=rng)
        decoded = decode_frame(frame).arrays
        after = ef.residual
        assert after is not None
        for k in shapes:
            raw_sum[k] += update[k]
            sent_sum[k] += decoded[k]
            # The stored residual is exactly (update + old residual) - what the receiver decoded.
            corrected = update[k] + (before[k] if before is not None else 0)
            assert np.array_equal(after[k], corrected - decoded[k])
    final = ef.residual
    assert final is not None
    for k in shapes:
        np.testing.assert_allclose(sent_sum[k] + final[k], raw_sum[k], rtol=0, atol=1e-5)


def test_error_feedback_transmits_small_entries_eventually() -> None:
    ef = ErrorFeedback()
    update = {"w": np.array([1.0, 0.1, 0.1, 0.1], np.float32)}
    seen = np.zeros(4)
    for step in range(40):
        seen += decode_frame(encode(update, "topk:0.25+float32+ef", feedback=ef, round=step)).arrays["w"] != 0
    assert np.all(seen > 0)  # without feedback, entries 1-3 would never be sent


def test_error_feedback_state_dict_round_trips_including_through_json() -> None:
    ef = ErrorFeedback()
    assert ef.state_dict() == {"format": 1, "residual": None}
    x = {"w": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), "b": np.ones(3, np.float32)}
    encode(x, "topk:0.1+int8+ef", feedback=ef)
    state = ef.state_dict()
    residual = state["residual"]
    assert isinstance(residual, dict) and residual["w"].dtype == np.float32

    restored = ErrorFeedback()
    restored.load_state_dict(state)
    as_json = json.loads(json.dumps({"format": 1, "residual": {k: v.tolist() for k, v in residual.items()}}))
    from_json = ErrorFeedback()
    from_json.load_state_dict(as_json)
    rng_a, rng_b, rng_c = (np.random.default_rng(5) for _ in range(3))
    frames = [
        encode(x, "topk:0.1+int8+ef", feedback=e, rng=r)
        for e, r in ((ef, rng_a), (restored, rng_b), (from_json, rng_c))
    ]
    assert frames[0] == frames[1] == frames[2]
    restored.load_state_dict({"format": 1, "residual": None})
    assert restored.residual is None


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"residual": None}, "keys 'format' and 'residual'"),
        ({"format": 2, "residual": None}, "unknown error-feedback state format"),
        ({"format": 1, "residual": [1, 2]}, "mapping of tensor name"),
        ({"format": 1, "residual": {"w": [1.0, float("nan")]}}, "NaN"),
        ({"format": 1, "residual": {"w": [[1.0], [2.0, 3.0]]}}, "not a numeric array"),
        ({"format": 1, "residual": {"": [1.0]}}, "non-empty strings"),
    ],
)
def test_error_feedback_refuses_bad_state(state: dict[str, object], match: str) -> None:
    with pytest.raises(FeedbackError, match=match):
        ErrorFeedback().load_state_dict(state)


def test_error_feedback_keeps_scalar_tensors_as_arrays() -> None:
    ef = ErrorFeedback()
    x = {"s": np.array(1.5, np.float32), "w": np.arange(10, dtype=np.float32)}
    for _ in range(2):
        encode(x, "topk:0.2+int8+ef", feedback=ef)
    residual = ef.residual
    assert residual is not None
    assert isinstance(residual["s"], np.ndarray) and residual["s"].shape == () and residual["s"].dtype == np.float32


def test_error_feedback_refuses_a_residual_for_another_model_until_reset() -> None:
    ef = ErrorFeedback()
    encode({"w": np.ones(4, np.float32)}, "topk:0.5+int8+ef", feedback=ef)
    with pytest.raises(FeedbackError, match=r"call reset\(\)"):
        encode({"w": np.ones(5, np.float32)}, "topk:0.5+int8+ef", feedback=ef)
    ef.reset()
    encode({"w": np.ones(5, np.float32)}, "topk:0.5+int8+ef", feedback=ef)


def test_failed_encode_leaves_the_residual_untouched() -> None:
    ef = ErrorFeedback()
    encode({"w": np.array([1.0, 2.0], np.float32)}, "topk:0.5+float16+ef", feedback=ef)
    before = ef.state_dict()
    with pytest.raises(EncodeError):
        encode({"w": np.array([1.0, 1e6], np.float32)}, "topk:0.5+float16+ef", feedback=ef)
    after = ef.state_dict()
    assert isinstance(before["residual"], dict) and isinstance(after["residual"], dict)
    assert np.array_equal(before["residual"]["w"], after["residual"]["w"])


# --- sign values and Rice-coded indices -------------------------------------------------------------------


def test_sign_codec_parses_and_prints() -> None:
    spec = CodecSpec.parse("topk:0.01+sign+ef")
    assert spec.values is ValueEncoding.SIGN and spec.topk == 0.01 and spec.error_feedback
    assert CodecSpec.parse(str(spec)) == spec
    for bad in ("signc", "sign8", "topk:0.01+signs"):
        with pytest.raises(FedmqttError, match="unknown token"):
            CodecSpec.parse(bad)


def test_sparse_sign_tensor_is_the_scaled_sign_of_the_top_k() -> None:
    x = np.array([0.0, -4.0, 1.0, 0.5, 3.0, -0.25, 2.0, 0.0], np.float32)
    got = roundtrip({"w": x}, "topk:0.5+sign").arrays["w"]
    # kept: -4, 3, 2, 1 -> mean magnitude 2.5
    np.testing.assert_array_equal(got, np.array([0, -2.5, 2.5, 0, 2.5, 0, 2.5, 0], np.float32))


@pytest.mark.parametrize("numel,fraction", [(200 * 784, 0.01), (200 * 784, 0.003), (40_000, 0.01), (2_000, 0.05)])
def test_sign_with_rice_indices_costs_near_the_entropy_of_the_positions(numel: int, fraction: float) -> None:
    """Bytes per kept entry of topk+sign (before zstd, which cannot shrink Rice codes): within 0.3 bit of
    1 (sign) + the entropy of a geometric gap, log2(e / p) bits; topk+int8's varint body for comparison."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(numel).astype(np.float32)
    header = decode_frame(encode({"w": x}, f"topk:{fraction}+sign")).header
    k = kept_count(numel, fraction)
    bits = 8 * (header.tensors[0].nbytes - 5) / k
    bound = 1 + np.log2(np.e * numel / k)
    assert bits <= bound + 0.3, (bits, bound)
    int8_body = decode_frame(encode({"w": x}, f"topk:{fraction}+int8")).header.tensors[0].nbytes
    assert header.tensors[0].nbytes < 0.75 * int8_body


def test_rice_parameter_is_the_one_with_the_fewest_bits() -> None:
    rng = np.random.default_rng(5)
    for mean in (1, 3, 40, 1000, 100_000):
        gaps = rng.geometric(1 / mean, 500).astype(np.uint64)
        b = best_rice_parameter(gaps)
        assert all(rice_bits(gaps, b) <= rice_bits(gaps, other) for other in range(41))
    assert best_rice_parameter(np.zeros(0, np.uint64)) == 0


def test_header_leaves_out_fields_at_their_defaults_and_decodes_to_the_same_header() -> None:
    frame = encode({"w": np.ones(4, np.float32)}, "topk:0.5+sign", num_samples=7)
    raw = frame[PREFIX.size : PREFIX.size + PREFIX.unpack_from(frame)[2]]
    assert b"null" not in raw and b'"dtype"' not in raw and b"stochastic" not in raw
    header = decode_frame(frame).header
    assert header.schema_version == 1 and header.num_updates == 1 and header.dp is None
    assert header.tensors[0].dtype == "float32" and header.tensors[0].encoding.scale_axis is None


@pytest.mark.parametrize("values", ["sign", "int8", "float32"])
def test_global_top_k_keeps_the_largest_magnitudes_of_the_whole_model(values: str) -> None:
    rng = np.random.default_rng(9)
    arrays = {
        "big": (rng.standard_normal((20, 30)) * 10).astype(np.float32),
        "small": rng.standard_normal(400).astype(np.float32),
        "bias": np.array([100.0, -0.001], np.float32),
    }
    out = roundtrip(arrays, f"gtopk:0.05+{values}")
    assert str(CodecSpec.parse(out.header.codec)) == f"gtopk:0.05+{values}+zstd:1"
    everything = np.concatenate([np.abs(a).ravel() for a in arrays.values()])
    k = kept_count(everything.size, 0.05)
    threshold = np.sort(everything)[everything.size - k]
    sent = {n: out.arrays[n] != 0 for n in arrays}
    assert sum(int(s.sum()) for s in sent.values()) == k
    for name, x in arrays.items():
        assert np.all(np.abs(x)[sent[name]] >= threshold)
        assert np.all(np.abs(x)[~sent[name]] <= threshold)
    assert sent["bias"].tolist() == [True, False]
    assert int(sent["big"].sum()) > int(sent["small"].sum())


def test_global_top_k_splits_ties_at_the_threshold_exactly() -> None:
    arrays = {"a": np.ones(10, np.float32), "b": np.ones(10, np.float32)}
    out = roundtrip(arrays, "gtopk:0.25+float32")
    assert int((out.arrays["a"] != 0).sum()) + int((out.arrays["b"] != 0).sum()) == 5


# --- compact update headers (layout against the receiver's manifest, compressed JSON) ----------------------


@settings(max_examples=120, deadline=None)
@given(arrays=model_arrays(), codec=st.sampled_from([*ALL_CODECS, "gtopk:0.05+sign", "gtopk:0.1+int8c"]))
def test_a_compact_update_decodes_to_the_same_tensors_and_header_as_the_full_form(
    arrays: dict[str, np.ndarray], codec: str
) -> None:
    fields = {"num_samples": 9, "base_model_hash": HASH, "model_name": "mlp", "rng": np.random.default_rng(1)}
    full = decode_frame(encode(arrays, codec, **fields))  # type: ignore[arg-type]
    frame = encode(arrays, codec, compact=True, **{**fields, "rng": np.random.default_rng(1)})  # type: ignore[arg-type]
    assert PREFIX.unpack_from(frame)[1] == COMPRESSED_HEADER_VERSION
    compact = decode_frame(frame, expected_manifest=manifest_of(arrays))
    # Everything but the checksum (keyed with the manifest) is the full form's: names, shapes, encodings, offsets.
    assert compact.header.model_copy(update={"body_blake2b": full.header.body_blake2b}) == full.header
    for name, value in full.arrays.items():
        assert np.array_equal(compact.arrays[name], value)
    peeked = peek_header(frame)  # what the receiver's cheap checks see: no tensor names, one entry per tensor
    assert peeked.tensors == () and peeked.layout is not None and len(peeked.layout) == len(arrays)
    assert peeked.num_samples == 9 and peeked.base_model_hash == HASH


def test_a_compact_header_is_a_fraction_of_the_full_one_for_an_mlp_update() -> None:
    rng = np.random.default_rng(3)
    shapes = {"fc1.weight": (200, 784), "fc1.bias": (200,), "fc2.weight": (200, 200), "fc2.bias": (200,)}
    arrays = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    fields = {"num_samples": 6000, "base_model_hash": hashlib.sha256(b"model").hexdigest(), "model_name": "mlp"}
    sizes = {}
    for compact in (False, True):
        frame = encode(arrays, "gtopk:0.01+sign+ef", feedback=ErrorFeedback(), compact=compact, **fields)  # type: ignore[arg-type]
        sizes[compact] = PREFIX.unpack_from(frame)[2]
    assert sizes[False] > 650 and sizes[True] < 180, sizes  # measured: 698 -> 146 bytes


def test_only_updates_can_be_compact() -> None:
    with pytest.raises(EncodeError, match="only update frames may be compact, not global_model frames"):
        encode({"w": np.ones(3, np.float32)}, "float32", kind=FrameKind.GLOBAL_MODEL, compact=True)


def test_the_header_dictionary_is_frozen() -> None:
    # Part of frame format 2: a changed byte makes every compact update of an older build unreadable. Add a
    # format version instead of editing it.
    assert hashlib.sha256(HEADER_DICTIONARY).hexdigest() == (
        "099390768f71c68fcf15fb696eb3180de0608a35c9b8187af3b4abbefd9291b0"
    )


def test_the_compact_checksum_is_keyed_with_the_manifest() -> None:
    arrays = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    frame = encode(arrays, "float32", compact=True)
    header = peek_header(frame)
    body = zstandard.ZstdDecompressor().decompress(frame[PREFIX.size + PREFIX.unpack_from(frame)[2] :])
    assert (
        header.body_blake2b == hashlib.blake2b(body, digest_size=16, key=manifest_key(manifest_of(arrays))).hexdigest()
    )
    assert header.body_blake2b != hashlib.blake2b(body, digest_size=16).hexdigest()


def test_sparsity_warm_up_keeps_more_in_the_first_rounds() -> None:
    spec = CodecSpec.parse("gtopk:0.01+warmup:2+sign+ef")
    assert str(spec) == "gtopk:0.01+warmup:2+sign+zstd:1+ef"
    assert [spec.topk_at(r) for r in (1, 2, 3, 9)] == [0.04, 0.02, 0.01, 0.01]
    assert CodecSpec.parse("topk:0.4+warmup:3").topk_at(1) == 1.0  # never more than everything
    with pytest.raises(FedmqttError, match="warmup needs a topk fraction"):
        CodecSpec.parse("int8+warmup:2")
    w = np.random.default_rng(5).standard_normal((50, 40)).astype(np.float32)
    for round_number, kept in ((1, 80), (2, 40), (3, 20), (4, 20)):
        frame = encode({"w": w}, spec, round=round_number, feedback=ErrorFeedback(), compact=True)
        out = decode_frame(frame, expected_manifest=manifest_of({"w": w}))
        assert int(np.count_nonzero(out.arrays["w"])) == kept
        assert out.header.codec == "gtopk:0.01+warmup:2+sign+zstd:1+ef" and out.header.round == round_number
