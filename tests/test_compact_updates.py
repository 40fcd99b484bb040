"""Compact update headers through the update intake (fedmqtt.coordinator.intake), as the coordinator and every
aggregator worker run it: a device's compact update is accepted with the same tensors as its full form, and a
hostile compact header is refused with a reason and a detail (never raised), after which the same rules still
accept a good update. The layout rules themselves are in tests/test_codec_errors.py and tests/test_codec_fuzz.py.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import zstandard

from fedmqtt.codecs import HEADER_DICTIONARY, DecodedFrame, ErrorFeedback, encode_frame, manifest_key
from fedmqtt.coordinator import intake
from fedmqtt.schema import CodecSpec, FrameHeader, FrameKind, ManifestEntry, RefusalReason

PREFIX = struct.Struct("<4sBIQ")
MANIFEST = (
    ManifestEntry(name="fc1.weight", shape=(20, 30)),
    ManifestEntry(name="fc1.bias", shape=(20,)),
    ManifestEntry(name="fc2.weight", shape=(5, 20)),
)
CODEC = CodecSpec.parse("gtopk:0.05+sign+ef")
_DICT = zstandard.ZstdCompressionDict(HEADER_DICTIONARY, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def rules(manifest: tuple[ManifestEntry, ...] = MANIFEST, **kw: object) -> intake.IntakeRules:
    return intake.IntakeRules(
        max_update_bytes=1_000_000,
        update_manifest=manifest,
        model_numel=sum(e.numel for e in MANIFEST),
        codec=CODEC,
        **kw,  # type: ignore[arg-type]
    )


def update(seed: int = 0, manifest: tuple[ManifestEntry, ...] = MANIFEST, *, compact: bool = True) -> bytes:
    rng = np.random.default_rng(seed)
    arrays = {e.name: (rng.standard_normal(e.shape) * 0.01).astype(np.float32) for e in manifest}
    return encode_frame(
        arrays,
        kind=FrameKind.UPDATE,
        job="job",
        round=1,
        sender="d1",
        codec=CODEC,
        num_samples=60,
        feedback=ErrorFeedback(),
        compact=compact,
    )


def run(payload: bytes, r: intake.IntakeRules) -> DecodedFrame | intake.Refusal:
    header = intake.check_header(payload, r)
    if isinstance(header, intake.Refusal):
        return header
    return intake.check_frame(payload, header, r, dp=None)


def refusal(result: object) -> intake.Refusal:
    assert isinstance(result, intake.Refusal), f"expected a refusal, got {result!r}"
    return result


def rebuilt(payload: bytes, change: dict[str, object], *, raw: bytes | None = None) -> bytes:
    """``payload`` with its compact header changed (checksum keyed with MANIFEST, recompressed)."""
    header_len = PREFIX.unpack_from(payload)[2]
    text = zstandard.ZstdDecompressor(dict_data=_DICT).decompress(payload[PREFIX.size : PREFIX.size + header_len])
    body = zstandard.ZstdDecompressor().decompress(payload[PREFIX.size + header_len :])
    header = {**json.loads(text), **change}
    header["body_blake2b"] = hashlib.blake2b(body, digest_size=16, key=manifest_key(MANIFEST)).hexdigest()
    if raw is None:
        raw = zstandard.ZstdCompressor(dict_data=_DICT, write_content_size=True).compress(json.dumps(header).encode())
    rest = payload[PREFIX.size + header_len :]
    return PREFIX.pack(b"FMQT", 2, len(raw), len(rest)) + raw + rest


def test_a_compact_update_is_accepted_with_the_tensors_of_its_full_form() -> None:
    full = run(update(compact=False), rules())
    result = run(update(), rules())
    assert isinstance(full, DecodedFrame) and isinstance(result, DecodedFrame)
    assert [t.name for t in result.header.tensors] == [e.name for e in MANIFEST]
    assert result.header.num_samples == 60 and intake.update_weight(result.header, dp=False) == 60.0
    for name, value in full.arrays.items():
        assert np.array_equal(result.arrays[name], value)
    assert len(update()) < len(update(compact=False)) - 250


def test_a_trainable_job_expands_the_compact_update_against_the_trained_tensors() -> None:
    trained = (MANIFEST[2],)
    r = rules(trained, trained=("fc2.weight",))
    result = run(update(manifest=trained), r)
    assert isinstance(result, DecodedFrame) and list(result.arrays) == ["fc2.weight"]
    # An update of every tensor against a job that trains one: its layout does not match the update manifest.
    wrong = refusal(run(update(), r))
    assert wrong.reason is RefusalReason.MANIFEST_MISMATCH
    assert "lists 3 tensor(s) but the expected model has 1 (fc2.weight)" in wrong.detail


HOSTILE = {
    "fewer tensors": ({"layout": [[30, 40]]}, RefusalReason.MANIFEST_MISMATCH, "lists 1 tensor(s)"),
    "too many kept": ({"layout": [[601, 100], [0, 5], [0, 5]]}, RefusalReason.MALFORMED, "keeps 601 entries"),
    "dense arity": ({"layout": [[100], [5], [5]]}, RefusalReason.MALFORMED, r"is [nnz, nbytes], got [100]"),
    "sizes": ({"layout": [[30, 10**9], [0, 5], [0, 5]]}, RefusalReason.MALFORMED, "declares 1000000000 bytes"),
    "both forms": (
        {"tensors": [{"name": "fc1.bias", "shape": [20], "encoding": {"values": "sign"}, "offset": 0, "nbytes": 5}]},
        RefusalReason.MALFORMED,
        "either in full",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_a_hostile_compact_header_is_refused_and_the_next_update_still_passes(case: str) -> None:
    change, reason, detail = HOSTILE[case]
    r = refusal(run(rebuilt(update(), change), rules()))
    assert r.reason is reason and detail in r.detail, r
    assert isinstance(run(update(seed=1), rules()), DecodedFrame)


def test_a_compact_update_made_for_another_model_is_refused_by_its_keyed_checksum() -> None:
    other = (MANIFEST[0], ManifestEntry(name="fc1.b", shape=(20,)), MANIFEST[2])  # one name differs, same sizes
    r = refusal(run(update(manifest=other), rules()))
    assert r.reason is RefusalReason.MALFORMED and "made for other tensors than the job's model" in r.detail


def test_a_compressed_header_bomb_or_truncation_is_refused_at_the_header_step() -> None:
    payload = update()
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(b" " * 50_000_000)
    r = refusal(intake.check_header(rebuilt(payload, {}, raw=bomb), rules()))
    assert r.reason is RefusalReason.MALFORMED and "compressed header declares 50000000 bytes" in r.detail
    header_len = PREFIX.unpack_from(payload)[2]
    cut = rebuilt(payload, {}, raw=payload[PREFIX.size : PREFIX.size + header_len - 5])
    r = refusal(intake.check_header(cut, rules()))
    assert r.reason is RefusalReason.MALFORMED and "compressed frame header" in r.detail
    assert isinstance(intake.check_header(payload, rules()), FrameHeader)
