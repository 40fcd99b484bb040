"""Every class of bad frame gets its own error, with a message a user can act on.

Bad frames are built by hand: take a valid frame apart (prefix, JSON header, zstd body), change one
thing, and put it back together (recomputing the body checksum unless the test is about it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import zstandard

from fedmqtt.arrays import manifest_of
from fedmqtt.codecs import (
    HEADER_DICTIONARY,
    MAGIC,
    BadMagic,
    BodyLayoutError,
    ChecksumMismatch,
    CorruptBody,
    FrameError,
    FrameTooLarge,
    IndexOutOfRange,
    IndicesNotIncreasing,
    InvalidHeader,
    ManifestMismatch,
    NonFiniteValues,
    TrailingBytes,
    TruncatedFrame,
    UnsupportedVersion,
    decode_frame,
    encode_frame,
    manifest_key,
    peek_header,
)
from fedmqtt.errors import FedmqttError
from fedmqtt.schema import CodecSpec, FrameKind, ManifestEntry

PREFIX = struct.Struct("<4sBIQ")

ARRAYS = {
    "conv.weight": np.linspace(-1, 1, 2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3),
    "conv.bias": np.array([0.5, -0.25], np.float32),
}


def valid(codec: str = "float32", arrays: dict[str, np.ndarray] | None = None) -> bytes:
    return encode_frame(
        ARRAYS if arrays is None else arrays,
        kind=FrameKind.UPDATE,
        job="job1",
        round=1,
        sender="dev-1",
        codec=CodecSpec.parse(codec),
        rng=np.random.default_rng(0),
    )


def split(frame: bytes) -> tuple[dict[str, Any], bytes]:
    """A frame's header as a JSON dict and its uncompressed body."""
    _, _, header_len, _ = PREFIX.unpack_from(frame)
    header = json.loads(frame[PREFIX.size : PREFIX.size + header_len])
    body = zstandard.ZstdDecompressor().decompress(frame[PREFIX.size + header_len :])
    return header, body


def build(
    header: dict[str, Any] | bytes,
    body: bytes,
    *,
    magic: bytes = MAGIC,
    version: int = 1,
    compressed: bytes | None = None,
    body_len: int | None = None,
    fix_checksum: bool = True,
) -> bytes:
    if isinstance(header, dict):
        header = copy.deepcopy(header)
        if fix_checksum:
            header["body_size"] = len(body)
            header["body_blake2b"] = hashlib.blake2b(body, digest_size=16).hexdigest()
        header = json.dumps(header).encode()
    if compressed is None:
        compressed = zstandard.ZstdCompressor(level=1).compress(body)
    length = len(compressed) if body_len is None else body_len
    return PREFIX.pack(magic, version, len(header), length) + header + compressed


def edit(codec: str, change: Callable[[dict[str, Any], bytearray], None], **kw: Any) -> bytes:
    """A valid frame of ``codec`` with ``change(header, body)`` applied in place."""
    header, body = split(valid(codec))
    mutable = bytearray(body)
    change(header, mutable)
    return build(header, bytes(mutable), **kw)


def refuses(data: bytes, error: type[FrameError], match: str, **kw: Any) -> FrameError:
    with pytest.raises(error, match=match) as info:
        decode_frame(data, **kw)
    assert isinstance(info.value, FedmqttError)
    return info.value


def test_the_valid_frames_used_here_decode() -> None:
    for codec in ("float32", "float16", "int8", "int8c", "topk:0.5+int8c", "topk:0.5+float32"):
        header, body = split(valid(codec))
        decode_frame(build(header, body))  # the rebuild helper itself makes valid frames


# --- prefix --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b'{"job": "x"}', b"\x00" * 40, b"PK\x03\x04", b"", b"FMQX" + b"\x00" * 20])
def test_bad_magic(data: bytes) -> None:
    refuses(data, BadMagic, "not a fedmqtt frame")
    with pytest.raises(BadMagic):
        peek_header(data)


def test_unsupported_version() -> None:
    header, body = split(valid())
    refuses(
        build(header, body, version=3),
        UnsupportedVersion,
        r"version 3 is not supported \(this build reads versions 1, 2\)",
    )


@pytest.mark.parametrize("cut", [2, 4, 10, 16])
def test_truncated_inside_the_prefix(cut: int) -> None:
    refuses(valid()[:cut], TruncatedFrame, "shorter than the 17-byte fixed prefix")


def test_header_length_larger_than_the_data() -> None:
    frame = bytearray(valid())
    struct.pack_into("<I", frame, 5, 1_000_000)
    refuses(bytes(frame), TruncatedFrame, "its header alone needs")
    with pytest.raises(TruncatedFrame):
        peek_header(bytes(frame))


def test_truncated_body() -> None:
    frame = valid()
    refuses(frame[:-1], TruncatedFrame, "the message was cut short")


def test_trailing_bytes() -> None:
    frame = valid()
    refuses(frame + b"\x00", TrailingBytes, "1 unexpected bytes after the end")
    refuses(frame + frame, TrailingBytes, "were two payloads joined")


def test_header_larger_than_the_header_limit() -> None:
    refuses(valid(), FrameTooLarge, "header declares", max_header_bytes=100)


# --- header ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"not json", "invalid"),
        (b"\xff\xfe", "invalid"),
        (b"[]", "header is invalid"),
        (b'{"kind": "update"}', "Field required"),
    ],
)
def test_header_that_is_not_a_valid_json_object(raw: bytes, match: str) -> None:
    _, body = split(valid())
    refuses(build(raw, body), InvalidHeader, match)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda h: h.update(extra_field=1), "extra_field: Extra inputs are not permitted"),
        (lambda h: h.update(job="no/slashes"), "job: String should match pattern"),
        (lambda h: h.update(round=-1), "round: Input should be greater than or equal to 0"),
        (lambda h: h.update(kind="gradient"), "kind: Input should be"),
        (lambda h: h.update(weight=None), "weight"),
        (lambda h: h.update(schema_version=2), "schema_version"),
        (lambda h: h["tensors"][0].update(offset=-4), r"tensors\.0\.offset"),
        (lambda h: h["tensors"][0].update(shape=[-1, 3]), r"tensors\.0\.shape\.0"),
        (lambda h: h["tensors"][0].update(shape=[1] * 33), r"tensors\.0\.shape"),
        (lambda h: h["tensors"][0].update(dtype="float64"), r"tensors\.0\.dtype"),
        (lambda h: h["tensors"][1].update(name=h["tensors"][0]["name"]), "tensor names must be unique"),
        (lambda h: h.update(codec="gzip"), "unusable codec"),
        (lambda h: h.update(codec="int8"), "encoded as float32 but the frame's codec is int8"),
        (lambda h: h.update(codec="topk:0.5+float32"), "must come exactly with a topk codec"),
        (lambda h: h["tensors"][0]["encoding"].update(scale_axis=0), "apply to int8 tensors only"),
    ],
)
def test_header_that_fails_validation(change: Callable[[dict[str, Any]], None], match: str) -> None:
    frame = edit("float32", lambda h, b: change(h))
    refuses(frame, InvalidHeader, match)
    with pytest.raises(InvalidHeader):
        peek_header(frame)


def test_per_channel_scales_without_an_int8c_codec() -> None:
    frame = edit("int8c", lambda h, b: h.update(codec="int8"))
    refuses(frame, InvalidHeader, "per-channel scales need an int8c codec")


# --- sizes and limits ------------------------------------------------------------------------------------


def test_declared_body_size_above_the_limit() -> None:
    frame = valid()
    header, _ = split(frame)
    refuses(frame, FrameTooLarge, f"body declares {header['body_size']} bytes", max_body_bytes=100)


def test_zstd_frame_declaring_more_than_the_limit() -> None:
    header, body = split(valid())
    huge = zstandard.ZstdCompressor(level=1).compress(b"\x00" * 5_000_000)
    frame = build(header, body, compressed=huge)
    refuses(frame, FrameTooLarge, "zstd frame declares 5000000 bytes", max_body_bytes=1_000_000)


def test_zstd_bomb_that_lies_about_its_content_size_is_not_decompressed() -> None:
    header, body = split(valid())
    bomb_data = b"\x00" * 50_000_000
    plain = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bomb_data)
    # Rewrite the zstd frame header to declare len(body) bytes (4-byte content-size field).
    descriptor = (plain[4] & 0x3F) | (2 << 6)
    lying = plain[:4] + bytes([descriptor]) + plain[5:6] + struct.pack("<I", len(body)) + plain[6:]
    assert zstandard.frame_content_size(lying) == len(body)
    started = time.perf_counter()
    refuses(build(header, body, compressed=lying), FrameTooLarge, "decompresses to more than")
    assert time.perf_counter() - started < 1.0


def test_zstd_frame_without_content_size() -> None:
    header, body = split(valid())
    unsized = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(body)
    refuses(build(header, body, compressed=unsized), CorruptBody, "does not declare its content size")


def test_body_that_is_not_zstd() -> None:
    header, body = split(valid())
    refuses(build(header, body, compressed=b"definitely not zstd"), CorruptBody, "not a zstd frame")


def test_corrupt_zstd_data() -> None:
    header, body = split(valid())
    packed = bytearray(zstandard.ZstdCompressor(level=1).compress(body))
    for i in range(8, len(packed)):
        packed[i] ^= 0x55
    with pytest.raises((CorruptBody, FrameTooLarge, BodyLayoutError, ChecksumMismatch)):
        decode_frame(build(header, body, compressed=bytes(packed)))


def test_two_zstd_frames_in_one_body() -> None:
    header, body = split(valid())
    two = zstandard.ZstdCompressor().compress(body) + zstandard.ZstdCompressor().compress(b"")
    refuses(build(header, body, compressed=two), CorruptBody, "unused data")


def test_huge_shapes_are_refused_before_allocating() -> None:
    def giant(h: dict[str, Any], b: bytearray) -> None:
        h["tensors"][0]["shape"] = [2**40, 2**40, 2**40]

    started = time.perf_counter()
    refuses(edit("float32", giant), FrameTooLarge, "decoded tensors would exceed")
    sparse = edit("topk:0.5+float32", lambda h, b: h["tensors"][0].update(shape=[10**12]))
    refuses(sparse, FrameTooLarge, "decoded tensors would exceed")
    assert time.perf_counter() - started < 1.0


def test_decoded_size_limit_also_applies_to_sparse_frames() -> None:
    frame = valid("topk:0.01+int8", {"w": np.ones(100_000, np.float32)})
    assert len(frame) < 4000
    refuses(frame, FrameTooLarge, "decoded tensors would exceed", max_body_bytes=100_000)
    decode_frame(frame, max_body_bytes=400_000)


# --- checksum and layout ----------------------------------------------------------------------------------


def test_checksum_mismatch() -> None:
    def flip(h: dict[str, Any], b: bytearray) -> None:
        b[0] ^= 1

    refuses(edit("float32", flip, fix_checksum=False), ChecksumMismatch, "corrupted or altered")


def wrong_shape(h: dict[str, Any]) -> None:
    h["tensors"][0]["shape"] = [2, 3, 3, 4]


def wrong_nbytes(h: dict[str, Any]) -> None:
    h["tensors"][0]["nbytes"] = 212


def overlapping(h: dict[str, Any]) -> None:
    h["tensors"][1]["offset"] = 0


def channel_scales_not_in_body(h: dict[str, Any]) -> None:
    h["codec"] = "int8c"
    h["tensors"][0]["encoding"]["scale_axis"] = 0  # needs 2 scales, the body has 1


def more_kept_than_entries(h: dict[str, Any]) -> None:
    h["tensors"][1]["encoding"]["nnz"] = 3


def sparse_nbytes_too_large(h: dict[str, Any]) -> None:
    h["tensors"][0]["nbytes"] += 200


@pytest.mark.parametrize(
    ("codec", "change", "match"),
    [
        ("float32", wrong_shape, r"declares 216 bytes but shape \(2, 3, 3, 4\) as float32 takes 288"),
        ("float32", wrong_nbytes, "declares 212 bytes but shape"),
        ("float32", overlapping, "starts at body offset 0, expected 216"),
        ("int8", channel_scales_not_in_body, "declares 58 bytes but shape .* with per-channel scales takes 62"),
        ("topk:0.5+float32", more_kept_than_entries, "keeps 3 entries but has only 2"),
        (
            "topk:0.5+float32",
            sparse_nbytes_too_large,
            r"declares 335 bytes but shape \(2, 3, 3, 3\) as float32, 27 kept takes 135",
        ),
    ],
)
def test_specs_that_disagree_with_the_body(codec: str, change: Callable[[dict[str, Any]], None], match: str) -> None:
    refuses(edit(codec, lambda h, b: change(h)), BodyLayoutError, match)


def test_body_longer_than_its_tensors() -> None:
    def extend(h: dict[str, Any], b: bytearray) -> None:
        b.extend(b"\x00" * 8)

    refuses(edit("float32", extend), BodyLayoutError, "tensors cover 224 bytes but the header declares a body of 232")


def test_zstd_content_size_that_disagrees_with_the_header() -> None:
    header, body = split(valid())
    other = zstandard.ZstdCompressor().compress(body + b"\x00" * 4)
    refuses(
        build(header, body, compressed=other), BodyLayoutError, "zstd frame declares 228 bytes but the header says 224"
    )


def test_sparse_index_block_shorter_than_nnz() -> None:
    # Every index byte has its continuation bit set: no varint ever ends.
    def endless(h: dict[str, Any], b: bytearray) -> None:
        spec = h["tensors"][0]
        nnz = spec["encoding"]["nnz"]
        b[spec["offset"] : spec["offset"] + nnz] = b"\x80" * nnz

    refuses(edit("topk:0.5+float32", endless), BodyLayoutError, "fewer than the 27 varint gaps")


def test_sparse_varint_longer_than_any_gap_can_be() -> None:
    # The 2-entry bias: a gap needs 1 byte at most; give the first one 2 (nbytes grows to match).
    header, body = split(valid("topk:1.0+float32"))
    bias = header["tensors"][1]
    start = bias["offset"]
    region = b"\x80\x00\x01" + body[start + 2 : start + bias["nbytes"]]
    bias["nbytes"] = len(region)
    refuses(build(header, body[:start] + region), BodyLayoutError, "declares 11 bytes")


def test_sparse_values_that_do_not_fit_after_the_indices() -> None:
    # 200 entries: gaps may take 2 bytes. Spend one more byte on indices, one less on values.
    header, body = split(valid("topk:1.0+float32", {"w": np.arange(1, 201, dtype=np.float32)}))
    assert header["tensors"][0]["nbytes"] == 200 + 800
    region = b"\x80\x00" + body[1:-1]
    refuses(build(header, region), BodyLayoutError, "after 201 bytes of indices, 799 bytes remain but 200 float32")


def test_over_long_varint_within_the_allowed_bytes() -> None:
    header, body = split(valid("topk:1.0+float32", {"w": np.arange(1, 201, dtype=np.float32)}))
    region = b"\x80\x80\x00" + body[1:-2]
    refuses(build(header, region), IndexOutOfRange, "a varint gap is 3 bytes long; .* need at most 2")


# --- manifest ---------------------------------------------------------------------------------------------


def test_manifest_mismatch_on_shape() -> None:
    expected = list(manifest_of(ARRAYS))
    expected[0] = ManifestEntry(name="conv.weight", shape=(2, 3, 5, 5))
    refuses(
        valid(),
        ManifestMismatch,
        r"'conv.weight' has shape \(2, 3, 3, 3\) .* expects \(2, 3, 5, 5\)",
        expected_manifest=expected,
    )


def test_manifest_mismatch_on_names_and_order() -> None:
    expected = [*manifest_of(ARRAYS), ManifestEntry(name="fc.weight", shape=(10, 4))]
    refuses(valid(), ManifestMismatch, r"missing \['fc.weight'\]", expected_manifest=expected)
    reordered = list(reversed(manifest_of(ARRAYS)))
    refuses(valid(), ManifestMismatch, "in another order", expected_manifest=reordered)


def test_manifest_is_checked_before_the_body_is_touched() -> None:
    header, body = split(valid())
    corrupt = build(header, body, compressed=b"garbage")
    refuses(corrupt, ManifestMismatch, "missing", expected_manifest=[ManifestEntry(name="x", shape=(1,))])


# --- values -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_float32_value(bad: float) -> None:
    def poison(h: dict[str, Any], b: bytearray) -> None:
        struct.pack_into("<f", b, 8, bad)

    refuses(edit("float32", poison), NonFiniteValues, "'conv.weight': 1 value")


def test_non_finite_float16_value() -> None:
    def poison(h: dict[str, Any], b: bytearray) -> None:
        b[0:2] = np.array([np.inf], "<f2").tobytes()

    refuses(edit("float16", poison), NonFiniteValues, "NaN or infinite")


@pytest.mark.parametrize("codec", ["int8", "int8c"])
def test_non_finite_scale(codec: str) -> None:
    def poison(h: dict[str, Any], b: bytearray) -> None:
        struct.pack_into("<f", b, 0, np.nan)  # the first tensor's (first) scale

    refuses(edit(codec, poison), NonFiniteValues, "'conv.weight': a quantisation scale is NaN")


def test_non_finite_scale_in_a_sparse_tensor() -> None:
    header, body = split(valid("topk:0.5+int8c"))
    spec = header["tensors"][0]
    nnz = spec["encoding"]["nnz"]
    scales_at = spec["offset"] + spec["nbytes"] - nnz - 4 * 2  # [indices][2 scales][nnz int8]
    poisoned = bytearray(body)
    struct.pack_into("<f", poisoned, scales_at, np.inf)
    refuses(build(header, bytes(poisoned)), NonFiniteValues, "scale is NaN or infinite")


def test_negative_scale() -> None:
    def negate(h: dict[str, Any], b: bytearray) -> None:
        struct.pack_into("<f", b, 0, -1.0)

    refuses(edit("int8", negate), BodyLayoutError, "scale is negative")


def test_scale_that_overflows_once_multiplied() -> None:
    def huge(h: dict[str, Any], b: bytearray) -> None:
        struct.pack_into("<f", b, 0, 3e38)

    refuses(edit("int8", huge), NonFiniteValues, "overflow float32 once scaled")


# --- sparse indices ---------------------------------------------------------------------------------------


def sparse_bias_with_gaps(gaps: bytes) -> bytes:
    header, body = split(valid("topk:1.0+float32"))
    bias = header["tensors"][1]
    start = bias["offset"]
    mutable = bytearray(body)
    mutable[start : start + 2] = gaps
    return build(header, bytes(mutable))


def test_index_out_of_range() -> None:
    refuses(sparse_bias_with_gaps(b"\x01\x01"), IndexOutOfRange, "sparse index #1 is 2, outside a tensor of 2")


def test_indices_not_strictly_increasing() -> None:
    refuses(sparse_bias_with_gaps(b"\x00\x00"), IndicesNotIncreasing, "#1 repeats the one before it")


def test_the_unmodified_sparse_bias_decodes() -> None:
    out = decode_frame(sparse_bias_with_gaps(b"\x00\x01"))
    np.testing.assert_array_equal(out.arrays["conv.bias"], ARRAYS["conv.bias"])


def test_peek_header_does_not_read_the_body() -> None:
    header, body = split(valid())
    garbage = build(header, body, compressed=b"not zstd at all")
    assert peek_header(garbage).tensors[0].name == "conv.weight"
    with pytest.raises(CorruptBody):
        decode_frame(garbage)


# --- sign values with Rice-coded indices ------------------------------------------------------------------

EIGHT = {"w": np.array([1, -2, 3, -4, 5, -6, 7, -8], np.float32)}


def sign_region(b: int, scale: float, signs: int, *streams: str) -> bytes:
    """A sparse sign tensor's bytes: Rice parameter, scale, one sign byte, then bit strings packed MSB first."""
    out = bytes([b]) + struct.pack("<f", scale) + bytes([signs])
    for bits in streams:
        out += np.packbits(np.array([int(c) for c in bits], np.uint8)).tobytes() if bits else b""
    return out


def hand_sign(region: bytes, nnz: int = 2) -> bytes:
    """The 8-entry tensor of EIGHT as topk:0.25+sign (nnz 2) with ``region`` as its bytes."""
    header, _ = split(valid("topk:0.25+sign", EIGHT))
    header["tensors"][0]["nbytes"] = len(region)
    header["tensors"][0]["encoding"]["nnz"] = nnz
    return build(header, region)


def test_a_hand_made_sign_tensor_decodes() -> None:
    # gaps 1 and 5 (indices 1 and 6) with b = 1: remainders 1, 1; quotients 0, 2 -> "1" "001"
    out = decode_frame(hand_sign(sign_region(1, 2.0, 0b01, "11", "1001")))
    np.testing.assert_array_equal(out.arrays["w"], [0, -2, 0, 0, 0, 0, 2, 0])
    # and the encoder's own frame of the same tensor (kept: -8 and 7)
    np.testing.assert_array_equal(decode_frame(valid("topk:0.25+sign", EIGHT)).arrays["w"], [0] * 6 + [7.5, -7.5])


@pytest.mark.parametrize(
    "region, error, match",
    [
        (sign_region(41, 1.0, 0, "1"), BodyLayoutError, "Rice parameter 41 is above 40"),
        (sign_region(0, -1.0, 0, "11"), BodyLayoutError, "sign scale is negative"),
        (sign_region(0, float("nan"), 0, "11"), NonFiniteValues, "sign scale is NaN"),
        (sign_region(0, float("inf"), 0, "11"), NonFiniteValues, "sign scale is NaN or infinite"),
        (sign_region(0, 1.0, 0b100, "11"), BodyLayoutError, "padding bits after its signs are not zero"),
        (sign_region(1, 1.0, 0, "0001", "11"), BodyLayoutError, "padding bits after its Rice remainders"),
        (sign_region(0, 1.0, 0, "111"), BodyLayoutError, "holds 3 terminators, but its nnz declares 2"),
        (sign_region(0, 1.0, 0, "1"), BodyLayoutError, "holds 1 terminators, but its nnz declares 2"),
        (sign_region(0, 1.0, 0, "11", "00000000"), BodyLayoutError, r"1 byte\(s\) of zeros follow"),
        (sign_region(0, 1.0, 0, "1" + "0" * 9 + "1"), IndexOutOfRange, "Rice gap #1 is at least 9, outside"),
        (sign_region(0, 1.0, 0, "11"), IndicesNotIncreasing, "#1 repeats the one before it"),
        (sign_region(2, 1.0, 0, "1111", "011"), IndexOutOfRange, "sparse index #1 is 10, outside a tensor of 8"),
        (sign_region(0, 1.0, 0, "00000100000001"), IndexOutOfRange, "sparse index #1 is 12, outside a tensor of 8"),
        (sign_region(40, 1.0, 0, "11"), BodyLayoutError, "1 bytes remain for the Rice-coded indices"),
    ],
)
def test_hostile_sign_tensors_are_refused(region: bytes, error: type[FrameError], match: str) -> None:
    refuses(hand_sign(region), error, match)


def test_a_hand_made_sign_tensor_with_run_flags_decodes() -> None:
    # indices 3, 4: gaps 3 and 1; flags "01" (gap 1 flagged); the one other gap, 3, Rice-coded with b = 1:
    # remainder "1", quotient "01"
    out = decode_frame(hand_sign(sign_region(0x81, 2.0, 0b10, "01", "1", "01")))
    np.testing.assert_array_equal(out.arrays["w"], [0, 0, 0, 2, -2, 0, 0, 0])
    # both gaps 1 (indices 0 and 1 would need a first gap of 0): first index 1, then 2 -> gaps 1, 1: flags only
    out = decode_frame(hand_sign(sign_region(0x80, 1.0, 0, "11")))
    np.testing.assert_array_equal(out.arrays["w"], [0, 1, 1, 0, 0, 0, 0, 0])


@pytest.mark.parametrize(
    "region, error, match",
    [
        (sign_region(0x81, 1.0, 0, "00", "11", "11"), BodyLayoutError, "a Rice-coded gap is 1, which its run flags"),
        (sign_region(0x81, 1.0, 0, "11", "1"), BodyLayoutError, "every gap is flagged but Rice bytes or a parameter"),
        (sign_region(0x80, 1.0, 0, "111"), BodyLayoutError, "padding bits after its run flags are not zero"),
        (sign_region(0x80, 1.0, 0), BodyLayoutError, "declares 6 bytes but .* takes 7..10"),  # flags cut off
        (sign_region(0xA9, 1.0, 0, "01", "1"), BodyLayoutError, "Rice parameter 41 is above 40"),
        (sign_region(0x80, 1.0, 0, "10", "1"), IndicesNotIncreasing, "#1 repeats the one before it"),
        (sign_region(0x80, 1.0, 0, "10", "00000001"), IndexOutOfRange, "sparse index #1 is 8, outside a tensor of 8"),
    ],
)
def test_hostile_run_flags_are_refused(region: bytes, error: type[FrameError], match: str) -> None:
    refuses(hand_sign(region), error, match)


def test_the_encoder_flags_runs_only_when_that_is_fewer_bytes() -> None:
    runs = np.zeros(4000, np.float32)
    runs[1000:1040] = np.linspace(1, 2, 40)  # one run: 39 gaps of 1
    spread = np.zeros(4000, np.float32)
    spread[::100] = np.linspace(1, 2, 40)  # no gap of 1
    for arrays, flagged in ((runs, True), (spread, False)):
        frame = valid("topk:0.01+sign", {"w": arrays})
        _, body = split(frame)
        assert bool(body[0] & 0x80) is flagged
        np.testing.assert_array_equal(decode_frame(frame).arrays["w"] != 0, arrays != 0)


def test_sign_tensor_outside_its_size_bounds_is_refused_before_decompressing() -> None:
    refuses(
        hand_sign(sign_region(0, 1.0, 0, "11", "0" * 32)),
        BodyLayoutError,
        r"as sign with one scale, 2 kept takes 7\.\.10",  # 10: with run flags (one byte for 2 gaps)
    )
    refuses(hand_sign(b"\x00" * 6), BodyLayoutError, r"declares 6 bytes but .* takes 7\.\.10")


def test_sign_tensor_keeping_nothing_has_no_index_bytes_and_parameter_zero() -> None:
    ok = sign_region(0, 0.0, 0)[:5]
    np.testing.assert_array_equal(decode_frame(hand_sign(ok, nnz=0)).arrays["w"], np.zeros(8))
    refuses(hand_sign(sign_region(3, 0.0, 0)[:5], nnz=0), BodyLayoutError, "keeps no entries but has")


def test_dense_sign_tensor_must_be_exactly_scale_and_signs() -> None:
    header, body = split(valid("sign", EIGHT))
    assert len(body) == 5 and decode_frame(build(header, body)).arrays["w"].tolist() == [4.5, -4.5] * 4
    header["tensors"][0]["nbytes"] = 6
    refuses(build(header, body + b"\x00"), BodyLayoutError, "declares 6 bytes but .* takes 5")


def test_sign_tensor_with_per_channel_scales_or_stochastic_rounding_is_refused() -> None:
    for field, value in (("scale_axis", 0), ("stochastic", True)):
        header, body = split(valid("topk:0.25+sign", EIGHT))
        header["tensors"][0]["encoding"][field] = value
        refuses(build(header, body), InvalidHeader, "apply to int8 tensors only")


def test_decoding_rice_remainders_takes_memory_of_the_order_of_the_output() -> None:
    """1,000,000 kept entries of a 4,000,000-entry tensor with the largest Rice parameter its size allows (22):
    the remainders are read one bit column at a time (a (nnz, b) int64 matrix would be 176 MB)."""
    import tracemalloc

    numel, nnz, b = 4_000_000, 1_000_000, 22
    gaps = np.full(nnz, 3, np.uint64)
    rem_bits = ((gaps[:, None] >> np.arange(b - 1, -1, -1, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    region = (
        bytes([b]) + struct.pack("<f", 1.0) + bytes(nnz // 8)
        + np.packbits(rem_bits.reshape(-1)).tobytes() + b"\xff" * (nnz // 8)
    )  # fmt: skip
    header, _ = split(valid("topk:0.25+sign", {"w": np.ones(numel, np.float32)}))
    header["tensors"][0].update(nbytes=len(region))
    header["tensors"][0]["encoding"]["nnz"] = nnz
    frame = build(header, region)
    tracemalloc.start()
    try:
        out = decode_frame(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert int(np.count_nonzero(out.arrays["w"])) == nnz and out.arrays["w"][3] == 1.0
    assert peak < 100 * 2**20, peak / 2**20


# --- compact update headers (format version 2: layout against the manifest, zstd with the dictionary) ------

MANIFEST = manifest_of(ARRAYS)
_DICT = zstandard.ZstdCompressionDict(HEADER_DICTIONARY, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def compact(codec: str = "float32", arrays: dict[str, np.ndarray] | None = None) -> bytes:
    return encode_frame(
        ARRAYS if arrays is None else arrays,
        kind=FrameKind.UPDATE,
        job="job1",
        round=1,
        sender="dev-1",
        codec=CodecSpec.parse(codec),
        rng=np.random.default_rng(0),
        compact=True,
    )


def split_compact(frame: bytes) -> tuple[dict[str, Any], bytes]:
    _, version, header_len, _ = PREFIX.unpack_from(frame)
    assert version == 2
    text = zstandard.ZstdDecompressor(dict_data=_DICT).decompress(frame[PREFIX.size : PREFIX.size + header_len])
    return json.loads(text), zstandard.ZstdDecompressor().decompress(frame[PREFIX.size + header_len :])


def build_compact(
    header: dict[str, Any], body: bytes, *, manifest: tuple[ManifestEntry, ...] = MANIFEST, raw: bytes | None = None
) -> bytes:
    """A version-2 frame of ``header`` (checksum keyed with ``manifest``) or of the given ``raw`` header bytes."""
    header = dict(header, body_size=len(body))
    header["body_blake2b"] = hashlib.blake2b(body, digest_size=16, key=manifest_key(manifest)).hexdigest()
    if raw is None:
        text = json.dumps(header).encode()
        raw = zstandard.ZstdCompressor(dict_data=_DICT, write_content_size=True).compress(text)
    compressed = zstandard.ZstdCompressor(level=1).compress(body)
    return PREFIX.pack(MAGIC, 2, len(raw), len(compressed)) + raw + compressed


def test_the_compact_frames_used_here_decode() -> None:
    for codec in ("float32", "int8c", "topk:0.5+int8c", "topk:0.3+sign", "gtopk:0.2+sign"):
        header, body = split_compact(compact(codec))
        out = decode_frame(build_compact(header, body), expected_manifest=MANIFEST)
        assert [t.name for t in out.header.tensors] == list(ARRAYS)


def test_a_compact_header_cannot_be_decoded_without_the_manifest() -> None:
    refuses(compact(), InvalidHeader, "compact header .* only be decoded against the update manifest")


def test_a_compact_header_listing_another_number_of_tensors() -> None:
    header, body = split_compact(compact())
    header["layout"] = header["layout"][:1]
    refuses(build_compact(header, body), ManifestMismatch, "lists 1 tensor.* expected model has 2 .conv.weight, conv.bias.",
            expected_manifest=MANIFEST)  # fmt: skip
    refuses(
        compact(),
        ManifestMismatch,
        "lists 2 tensor.* has 3",
        expected_manifest=(*MANIFEST, ManifestEntry(name="x", shape=(1,))),
    )


@pytest.mark.parametrize(
    ("codec", "layout", "error", "match"),
    [
        ("float32", [[216], [4, 8]], InvalidHeader, r"conv.bias.*is \[nbytes\], got \[4, 8\]"),
        ("topk:0.5+int8", [[27, 66], [8]], InvalidHeader, r"conv.bias.*is \[nnz, nbytes\], got \[8\]"),
        (
            "float32",
            [[212], [12]],
            BodyLayoutError,
            "conv.weight' declares 212 bytes but shape .2, 3, 3, 3. as float32 takes 216",
        ),
        ("topk:0.5+int8", [[55, 120], [1, 6]], BodyLayoutError, "keeps 55 entries but has only 54"),
        ("float32", [[216], [8], [1]], ManifestMismatch, "lists 3 tensor"),
        ("float32", [[2**70], [8]], BodyLayoutError, "declares 1180591620717411303424 bytes"),
    ],
)
def test_a_compact_layout_that_disagrees_with_the_manifest(
    codec: str, layout: list[list[int]], error: type[FrameError], match: str
) -> None:
    header, body = split_compact(compact(codec))
    header["layout"] = layout
    refuses(build_compact(header, body), error, match, expected_manifest=MANIFEST)


@pytest.mark.parametrize(
    "other",
    [
        (ManifestEntry(name="conv.weight", shape=(3, 2, 3, 3)), ManifestEntry(name="conv.bias", shape=(2,))),
        (ManifestEntry(name="conv.w", shape=(2, 3, 3, 3)), ManifestEntry(name="conv.bias", shape=(2,))),
    ],
    ids=["shape", "name"],
)
def test_a_compact_update_made_for_other_tensors_fails_its_keyed_checksum(other: tuple[ManifestEntry, ...]) -> None:
    # Same sizes, so only the checksum (keyed with the manifest) can tell: the manifest check is not lost.
    refuses(compact(), ChecksumMismatch, "made for other tensors than the job's model", expected_manifest=other)
    assert decode_frame(compact(), expected_manifest=MANIFEST).header.tensors[0].shape == (2, 3, 3, 3)


def test_a_header_with_both_forms_or_a_compact_model_frame_is_refused() -> None:
    header, body = split_compact(compact())
    full, _ = split(valid())
    refuses(build_compact(dict(header, tensors=full["tensors"]), body), InvalidHeader, "either in full .* or compact",
            expected_manifest=MANIFEST)  # fmt: skip
    refuses(build_compact(dict(header, kind="global_model"), body), InvalidHeader,
            "only update frames may have a compact layout", expected_manifest=MANIFEST)  # fmt: skip
    bad = dict(header, layout=[[-1], [8]])
    refuses(build_compact(bad, body), InvalidHeader, "greater than or equal to 0", expected_manifest=MANIFEST)


@pytest.mark.parametrize("cut", [1, 10, 40])
def test_a_truncated_compact_frame(cut: int) -> None:
    frame = compact()
    header_len = PREFIX.unpack_from(frame)[2]
    refuses(frame[: PREFIX.size + header_len - cut], TruncatedFrame, "header alone needs", expected_manifest=MANIFEST)
    # A header cut short but re-framed: not a complete zstd frame.
    short = frame[PREFIX.size : PREFIX.size + header_len - cut]
    header, body = split_compact(frame)
    refuses(
        build_compact(header, body, raw=short), InvalidHeader, "compressed frame header", expected_manifest=MANIFEST
    )


def test_a_compressed_header_that_is_not_zstd_or_hides_its_size() -> None:
    header, body = split_compact(compact())
    text = json.dumps(header).encode()
    refuses(build_compact(header, body, raw=text), InvalidHeader, "not a zstd frame", expected_manifest=MANIFEST)
    sizeless = zstandard.ZstdCompressor(dict_data=_DICT, write_content_size=False).compress(text)
    refuses(build_compact(header, body, raw=sizeless), InvalidHeader, "does not declare its size")
    plain = zstandard.ZstdCompressor(write_content_size=True).compress(text)  # without the dictionary: fine too
    assert decode_frame(build_compact(header, body, raw=plain), expected_manifest=MANIFEST).header.round == 1
    with pytest.raises(InvalidHeader, match="not a zstd frame"):
        peek_header(build_compact(header, body, raw=text))


def test_a_compressed_header_bomb_is_refused_before_anything_is_allocated() -> None:
    header, body = split_compact(compact())
    # 100 MB of JSON whitespace: declared in the zstd frame, refused on the declaration against the limit.
    padded = json.dumps(header).encode() + b" " * 100_000_000
    bomb = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(padded)
    assert len(bomb) < 20_000
    refuses(
        build_compact(header, body, raw=bomb),
        FrameTooLarge,
        "compressed header declares 100000",
        expected_manifest=MANIFEST,
    )
    # A frame that declares less than it holds: zstd stops at the declared size.
    text = json.dumps(header).encode()
    liar = bytearray(
        zstandard.ZstdCompressor(write_content_size=True, write_checksum=False).compress(text + b" " * 300)
    )
    declared = zstandard.get_frame_parameters(bytes(liar)).content_size
    assert liar[4] == 0x60  # single segment, a 2-byte content size (stored minus 256) right after
    liar[5:7] = (declared - 256 - 100).to_bytes(2, "little")
    assert zstandard.frame_content_size(bytes(liar)) == declared - 100
    refuses(
        build_compact(header, body, raw=bytes(liar)),
        InvalidHeader,
        "compressed frame header",
        expected_manifest=MANIFEST,
    )
    refuses(compact(), FrameTooLarge, "compressed header declares", expected_manifest=MANIFEST, max_header_bytes=100)
