"""Fuzzing decode_frame: mutated frames either decode to something self-consistent or raise FrameError.

Blind mutations (bit flips, truncation, splices, inserted bytes) mostly die at the prefix, the header
or the checksum, so the structured mutations also edit the JSON header or the body *and recompute the
checksum*: that is what reaches the layout, value and index checks behind it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from typing import Any

import numpy as np
import zstandard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedmqtt.arrays import manifest_of
from fedmqtt.codecs import (
    HEADER_DICTIONARY,
    DecodedFrame,
    FrameError,
    decode_frame,
    encode_frame,
    manifest_key,
    peek_header,
)
from fedmqtt.schema import CodecSpec, FrameKind

PREFIX = struct.Struct("<4sBIQ")
LIMIT = 1 << 20  # small limits keep every accepted mutation cheap

_rng = np.random.default_rng(42)
_ARRAYS = {
    "conv.weight": _rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
    "conv.bias": _rng.standard_normal(4).astype(np.float32),
    "fc.weight": _rng.standard_normal((3, 300)).astype(np.float32),  # > 128 entries: 2-byte varints
    "scale": np.array(0.5, np.float32),
}
CODECS = [
    "float32", "float16", "int8", "int8cs", "topk:0.3+float32", "topk:0.1+float16", "topk:0.05+int8c", "sign",
    "topk:0.1+sign", "topk:0.01+sign",
]  # fmt: skip
FRAMES = [
    encode_frame(
        _ARRAYS,
        kind=FrameKind.UPDATE,
        job="job1",
        round=2,
        sender="dev-1",
        codec=CodecSpec.parse(c),
        rng=np.random.default_rng(0),
    )
    for c in CODECS
]
DECODED = [decode_frame(f) for f in FRAMES]


def split(frame: bytes) -> tuple[dict[str, Any], bytes]:
    _, _, header_len, _ = PREFIX.unpack_from(frame)
    header = json.loads(frame[PREFIX.size : PREFIX.size + header_len])
    return header, zstandard.ZstdDecompressor().decompress(frame[PREFIX.size + header_len :])


def join(header: dict[str, Any], body: bytes) -> bytes:
    header = dict(header, body_size=len(body), body_blake2b=hashlib.blake2b(body, digest_size=16).hexdigest())
    raw = json.dumps(header).encode()
    packed = zstandard.ZstdCompressor(level=1).compress(body)
    return PREFIX.pack(b"FMQT", 1, len(raw), len(packed)) + raw + packed


def assert_consistent(out: DecodedFrame) -> None:
    """What decode returns always matches its own header: names, shapes, dtype, finite values."""
    assert [t.name for t in out.header.tensors] == list(out.arrays)
    for spec in out.header.tensors:
        array = out.arrays[spec.name]
        assert array.dtype == np.float32 and array.shape == spec.shape
        assert np.isfinite(array).all()


def check(data: bytes, original: int) -> None:
    try:
        out = decode_frame(data, max_body_bytes=LIMIT)
    except FrameError as exc:
        event(type(exc).__name__)  # --hypothesis-show-statistics shows which checks the fuzz reaches
    else:
        event("decoded")
        assert_consistent(out)
        if data == FRAMES[original]:
            reference = DECODED[original]
            assert out.header == reference.header
            assert all(np.array_equal(out.arrays[k], v) for k, v in reference.arrays.items())
    with contextlib.suppress(FrameError):
        peek_header(data)


# --- blind byte-level mutations -------------------------------------------------------------------------

frame_index = st.integers(0, len(FRAMES) - 1)


@st.composite
def byte_mutation(draw: st.DrawFn) -> tuple[bytes, int]:
    i = draw(frame_index)
    frame = bytearray(FRAMES[i])
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice", "overwrite"]))
    at = draw(st.integers(0, len(frame) - 1))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(frame) - 1))
            frame[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del frame[at:]
    elif kind == "insert":
        frame[at:at] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "delete":
        del frame[at : at + draw(st.integers(1, 64))]
    elif kind == "overwrite":
        blob = draw(st.binary(min_size=1, max_size=8))
        frame[at : at + len(blob)] = blob
    else:
        other = FRAMES[draw(frame_index)]
        frame = frame[:at] + other[draw(st.integers(0, len(other))) :]
    return bytes(frame), i


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(byte_mutation())
def test_byte_mutations_never_crash_decode(case: tuple[bytes, int]) -> None:
    check(*case)


# --- structured header and body edits (checksum recomputed) ------------------------------------------------

INTERESTING_INTS = st.one_of(
    st.integers(-2, 300),
    st.sampled_from([2**31 - 1, 2**32, 2**63, 2**64 + 1, 10**30]),
)


@st.composite
def structured_mutation(draw: st.DrawFn) -> tuple[bytes, int]:
    i = draw(frame_index)
    header, body = split(FRAMES[i])
    tensors = header["tensors"]
    for _ in range(draw(st.integers(1, 3))):
        t = tensors[draw(st.integers(0, len(tensors) - 1))]
        enc = t["encoding"]
        field = draw(
            st.sampled_from(
                ["shape", "dim", "offset", "nbytes", "nnz", "scale_axis", "values", "swap", "drop", "body", "codec"]
            )
        )
        if field == "shape":
            t["shape"] = draw(st.lists(INTERESTING_INTS, max_size=5))
        elif field == "dim" and t["shape"]:
            t["shape"][draw(st.integers(0, len(t["shape"]) - 1))] = draw(INTERESTING_INTS)
        elif field in ("offset", "nbytes"):
            nudged = t[field] + draw(st.integers(-8, 8))
            t[field] = draw(st.one_of(INTERESTING_INTS, st.just(nudged)))
        elif field == "nnz":
            enc["nnz"] = draw(st.one_of(st.none(), INTERESTING_INTS))
        elif field == "scale_axis":
            enc["scale_axis"] = draw(st.sampled_from([None, 0, 1]))
        elif field == "values":
            enc["values"] = draw(st.sampled_from(["float32", "float16", "int8", "int4", "sign"]))
        elif field == "swap" and len(tensors) > 1:
            tensors.reverse()
        elif field == "drop" and len(tensors) > 1:
            tensors.pop()
        elif field == "codec":
            header["codec"] = draw(st.sampled_from([*CODECS, "int8c", "topk:1+int8", "nonsense"]))
        elif field == "body":
            mutable = bytearray(body)
            if mutable:
                for _ in range(draw(st.integers(1, 8))):
                    mutable[draw(st.integers(0, len(mutable) - 1))] = draw(st.integers(0, 255))
            body = bytes(mutable)
    return join(header, body), i


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structured_mutation())
def test_structured_mutations_never_crash_decode(case: tuple[bytes, int]) -> None:
    check(*case)


SPECIAL_BYTES = [
    struct.pack("<f", float("nan")),
    struct.pack("<f", float("inf")),
    struct.pack("<f", 3e38),
    struct.pack("<f", -1.0),
    struct.pack("<e", float("inf")),
    b"\x00",
    b"\x80",
    b"\xff",
    b"\x7f",
]


@st.composite
def body_mutation(draw: st.DrawFn) -> tuple[bytes, int]:
    """Overwrite bytes inside one tensor's region (scales, indices, values) and fix the checksum."""
    i = draw(frame_index)
    header, body = split(FRAMES[i])
    mutable = bytearray(body)
    for _ in range(draw(st.integers(1, 3))):
        spec = header["tensors"][draw(st.integers(0, len(header["tensors"]) - 1))]
        if spec["nbytes"] == 0:
            continue
        # anywhere in the first 40 bytes (parameters, scales, first indices and values) or in the last 8
        # (a sign tensor's Rice quotients end there)
        near = draw(st.integers(0, min(spec["nbytes"] - 1, 40)))
        at = spec["offset"] + draw(st.sampled_from([near, max(0, spec["nbytes"] - 1 - near % 8)]))
        blob = draw(st.one_of(st.sampled_from(SPECIAL_BYTES), st.binary(min_size=1, max_size=4)))
        mutable[at : at + len(blob)] = blob[: spec["offset"] + spec["nbytes"] - at]
    return join(header, bytes(mutable)), i


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body_mutation())
def test_body_mutations_with_a_valid_checksum_never_crash_decode(case: tuple[bytes, int]) -> None:
    check(*case)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_after_a_valid_prefix_never_crash_decode(tail: bytes) -> None:
    check(b"FMQT\x01" + tail, 0)


# --- compact update headers (format 2): decoded against the manifest -----------------------------------------

MANIFEST = manifest_of(_ARRAYS)
_DICT = zstandard.ZstdCompressionDict(HEADER_DICTIONARY, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
COMPACT = [
    encode_frame(
        _ARRAYS,
        kind=FrameKind.UPDATE,
        job="job1",
        round=2,
        sender="dev-1",
        codec=CodecSpec.parse(c),
        rng=np.random.default_rng(0),
        compact=True,
    )
    for c in [*CODECS, "gtopk:0.05+sign"]
]
# Kept entries in runs: the sign tensors' run flags (gaps of 1 flagged, the rest Rice-coded).
_RUNS = dict(_ARRAYS, **{"fc.weight": np.where(np.arange(900).reshape(3, 300) % 50 < 12, 9.0, 0.1).astype(np.float32)})
COMPACT += [
    encode_frame(
        _RUNS, kind=FrameKind.UPDATE, job="job1", round=2, sender="dev-1", codec=CodecSpec.parse(c), compact=True
    )
    for c in ("gtopk:0.1+sign", "topk:0.05+sign")
]
COMPACT_DECODED = [decode_frame(f, expected_manifest=MANIFEST) for f in COMPACT]
compact_index = st.integers(0, len(COMPACT) - 1)


def check_compact(data: bytes, original: int) -> None:
    try:
        out = decode_frame(data, max_body_bytes=LIMIT, expected_manifest=MANIFEST)
    except FrameError as exc:
        event(type(exc).__name__)
    else:
        event("decoded")
        assert_consistent(out)
        assert out.header.manifest() == MANIFEST
        if data == COMPACT[original]:
            reference = COMPACT_DECODED[original]
            assert all(np.array_equal(out.arrays[k], v) for k, v in reference.arrays.items())
    with contextlib.suppress(FrameError):
        peek_header(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_byte_mutations_of_compact_frames_never_crash_decode(data: st.DataObject) -> None:
    i = data.draw(compact_index)
    frame = bytearray(COMPACT[i])
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "overwrite"]))
        at = data.draw(st.integers(0, max(0, len(frame) - 1)))
        if kind == "flip" and frame:
            frame[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncate":
            del frame[at:]
        else:
            blob = data.draw(st.binary(min_size=1, max_size=8))
            frame[at : at + len(blob)] = blob
    check_compact(bytes(frame), i)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_layout_mutations_of_compact_frames_with_a_valid_keyed_checksum_never_crash_decode(
    data: st.DataObject,
) -> None:
    i = data.draw(compact_index)
    frame = COMPACT[i]
    header_len = PREFIX.unpack_from(frame)[2]
    header = json.loads(
        zstandard.ZstdDecompressor(dict_data=_DICT).decompress(frame[PREFIX.size : PREFIX.size + header_len])
    )
    body = zstandard.ZstdDecompressor().decompress(frame[PREFIX.size + header_len :])
    layout = header["layout"]
    for _ in range(data.draw(st.integers(1, 3))):
        what = data.draw(st.sampled_from(["int", "arity", "drop", "add", "codec", "body"]))
        entry = layout[data.draw(st.integers(0, len(layout) - 1))] if layout else None
        if what == "int" and entry:
            j = data.draw(st.integers(0, len(entry) - 1))
            entry[j] = data.draw(st.one_of(INTERESTING_INTS, st.just(entry[j] + data.draw(st.integers(-8, 8)))))
        elif what == "arity" and entry:
            entry[:] = entry[:1] if len(entry) == 2 else [data.draw(INTERESTING_INTS), *entry]
        elif what == "drop" and layout:
            layout.pop()
        elif what == "add":
            layout.append(data.draw(st.lists(INTERESTING_INTS, min_size=0, max_size=3)))
        elif what == "codec":
            header["codec"] = data.draw(st.sampled_from([*CODECS, "gtopk:0.05+sign", "int8c"]))
        elif what == "body" and body:
            mutable = bytearray(body)
            mutable[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
            body = bytes(mutable)
    header = dict(header, body_size=len(body))
    header["body_blake2b"] = hashlib.blake2b(body, digest_size=16, key=manifest_key(MANIFEST)).hexdigest()
    raw = zstandard.ZstdCompressor(dict_data=_DICT, write_content_size=True).compress(json.dumps(header).encode())
    packed = zstandard.ZstdCompressor(level=1).compress(body)
    check_compact(PREFIX.pack(b"FMQT", 2, len(raw), len(packed)) + raw + packed, i)
