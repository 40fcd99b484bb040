"""The binary frame: one global model, device update or partial aggregate per MQTT message.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic b"FMQT"
    4       1     format version (1: plain header; 2: compressed header)
    5       4     header length H (uint32)
    9       8     compressed body length B (uint64)
    17      H     header: UTF-8 JSON of fedmqtt.schema.FrameHeader (version 2: one zstd frame of it, content
                  size set, compressed with the fixed dictionary HEADER_DICTIONARY)
    17+H    B     body: one zstd frame (content size set) of the uncompressed body

The uncompressed body is the tensors' bytes back to back, in manifest order, as laid out by
:mod:`fedmqtt.codecs.encodings`; the header's ``tensors`` give each one's shape, encoding, offset and
size, ``body_size`` the total and ``body_blake2b`` its BLAKE2b-128 checksum. Tensor data never passes
through pickle or JSON.

A device update may use the compact header instead (``encode_frame(..., compact=True)``, format version 2):
``layout`` gives per tensor only its kept count (top-k codecs) and size, and the receiver, which holds the
update manifest, expands it (:func:`decode_frame` with ``expected_manifest``); names, shapes and encodings
come from the manifest and the codec, offsets add up. The checksum is then keyed with the manifest
(:func:`manifest_key`), so a body made for other tensors fails it: the manifest check stays. The JSON is
zstd-compressed against :data:`HEADER_DICTIONARY` (the field names and common values; part of the wire
format: never edit it, add a format version instead), its declared size bounded by ``max_header_bytes``.
Only :func:`encode_frame` builds the compact form and only :func:`expand_layout` reads it.

:func:`decode_frame` trusts nothing: every length, size and index is checked before anything is
allocated from it, and any problem raises a :class:`~fedmqtt.codecs.errors.FrameError` subclass.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import zstandard
from pydantic import ValidationError

from fedmqtt.arrays import ModelArrays
from fedmqtt.codecs.encodings import (
    EncodedTensor,
    decode_tensor,
    encode_tensor,
    global_kept_counts,
    max_varint_len,
    sign_layout_bounds,
    tensor_encoding,
    value_bytes,
)
from fedmqtt.codecs.errors import (
    BadMagic,
    BodyLayoutError,
    ChecksumMismatch,
    CorruptBody,
    EncodeError,
    FrameTooLarge,
    InvalidHeader,
    ManifestMismatch,
    NonFiniteInput,
    TrailingBytes,
    TruncatedFrame,
    UnsupportedVersion,
)
from fedmqtt.codecs.feedback import ErrorFeedback
from fedmqtt.schema import (
    CodecSpec,
    DownlinkPath,
    DPAnnouncement,
    FrameHeader,
    FrameKind,
    ManifestEntry,
    MessageError,
    PartialInfo,
    ReleaseInfo,
    TensorSpec,
    ValueEncoding,
)

MAGIC = b"FMQT"
FORMAT_VERSION = 1
# Compact device updates: the header is zstd-compressed with HEADER_DICTIONARY (version 1 readers refuse it,
# saying which version they read; this build reads both).
COMPRESSED_HEADER_VERSION = 2
_VERSIONS = (FORMAT_VERSION, COMPRESSED_HEADER_VERSION)
# A raw-content zstd dictionary: what a compact update header repeats (field names, codec tokens, values). The
# bytes are part of format version 2: changing one makes every version-2 frame unreadable.
HEADER_DICTIONARY = (
    b'{"schema_version":1,"kind":"update","job":"","round":1,"sender":"","num_samples":1,"num_updates":1,'
    b'"weight":0.0,"codec":"gtopk:0.01+topk:0.001+warmup:2+int8cs+float16+float32+sign+zstd:1+ef","tensors":[],'
    b'"layout":[[0,5],[1,1]],"body_size":1,"body_blake2b":"","base_model_hash":"","model_name":"mlp","cnn",'
    b'"dp":{"mode":"device","local","central","clip":1.0,"noise_std":0.0,"unclipped":true,false},'
    b'"downlink":"held","delta","full","delta+full"}'
)
_HEADER_DICT = zstandard.ZstdCompressionDict(HEADER_DICTIONARY, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
_PREFIX = struct.Struct("<4sBIQ")
PREFIX_SIZE = _PREFIX.size

DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_HEADER_BYTES = 4 * 1024 * 1024

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class DecodedFrame:
    """A validated frame: its header and its tensors (dense float32, original shapes, header order)."""

    header: FrameHeader
    arrays: ModelArrays


def model_hash(frame: Buffer) -> str:
    """Hex SHA-256 of a whole frame: the content address used as ``Plan.model_hash``."""
    return hashlib.sha256(frame).hexdigest()


def manifest_key(manifest: Sequence[ManifestEntry]) -> bytes:
    """The 32-byte key of a compact update's body checksum: the SHA-256 of the manifest's names, shapes and
    dtypes in order (canonical JSON)."""
    canonical = json.dumps([[e.name, list(e.shape), e.dtype] for e in manifest], separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).digest()


def body_checksum(body: Buffer, key: bytes = b"") -> str:
    """BLAKE2b-128 of the body; keyed with :func:`manifest_key` for a compact header."""
    return hashlib.blake2b(body, digest_size=16, key=key).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------


def _as_float32(name: object, value: object) -> np.ndarray:
    if not isinstance(name, str):
        raise EncodeError(f"tensor names must be strings, got {name!r}")
    if not isinstance(value, np.ndarray):
        raise EncodeError(f"tensor {name!r} is a {type(value).__name__}, not a numpy array")
    if value.dtype.kind != "f":
        raise EncodeError(f"tensor {name!r} has dtype {value.dtype}; only floating-point tensors can be encoded")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused below
        array = np.asarray(value, dtype=np.float32, order="C")  # (ascontiguousarray makes 0-d 1-d)
    if not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise NonFiniteInput(
            f"tensor {name!r} has {bad} NaN or infinite value(s) (after conversion to float32); "
            "a diverged update cannot be sent — lower the learning rate or clip the update"
        )
    return array


def encode_frame(
    arrays: Mapping[str, np.ndarray],
    *,
    kind: FrameKind,
    job: str,
    round: int,
    sender: str,
    codec: CodecSpec,
    num_samples: int = 0,
    num_updates: int = 1,
    weight: float = 0.0,
    base_model_hash: str | None = None,
    model_name: str | None = None,
    dp: DPAnnouncement | None = None,
    feedback: ErrorFeedback | None = None,
    rng: np.random.Generator | None = None,
    run_id: str | None = None,
    downlink: DownlinkPath | None = None,
    release: ReleaseInfo | None = None,
    partial: PartialInfo | None = None,
    compact: bool = False,
) -> bytes:
    """Encode ``arrays`` (name -> float tensor, in model order) as one frame.

    ``compact`` (updates only): the header gives per tensor only its kept count and size; the receiver expands
    it against its update manifest, which must be exactly ``arrays``' names and shapes in this order.

    With ``feedback`` (required exactly when ``codec.error_feedback``), the stored residual is added to
    ``arrays`` first and the new residual (corrected - what the receiver will decode) is stored after a
    successful encode. ``rng`` drives stochastic rounding (a fresh generator if None).
    """
    if codec.error_feedback and feedback is None:
        raise EncodeError(f"codec {codec} asks for error feedback ('ef'); pass feedback=ErrorFeedback()")
    if feedback is not None and not codec.error_feedback:
        raise EncodeError(f"feedback= was given but codec {codec} has no 'ef'; add '+ef' to the codec")
    checked = {name: _as_float32(name, value) for name, value in arrays.items()}
    if feedback is not None:
        checked = feedback.apply(checked)
        for name, value in checked.items():
            if not np.isfinite(value).all():
                raise NonFiniteInput(f"tensor {name!r} overflows once the error-feedback residual is added")
    generator = rng if rng is not None else np.random.default_rng()
    # Sparsity warm-up: this round's fraction (the header keeps the codec as announced).
    this_round = codec if codec.warmup == 0 else codec.model_copy(update={"topk": codec.topk_at(round), "warmup": 0})

    encoded: list[EncodedTensor] = []
    specs: list[TensorSpec] = []
    offset = 0
    kept: list[int | None] = [None] * len(checked)
    if this_round.topk is not None and this_round.topk_global:
        kept = list(global_kept_counts(list(checked.values()), this_round.topk))
    for (name, array), k in zip(checked.items(), kept, strict=True):
        enc = encode_tensor(name, array, this_round, generator, want_decoded=feedback is not None, keep=k)
        encoded.append(enc)
        try:
            specs.append(
                TensorSpec(
                    name=name,
                    shape=tuple(int(d) for d in array.shape),
                    encoding=enc.encoding,
                    offset=offset,
                    nbytes=enc.nbytes,
                )
            )
        except ValidationError as exc:
            raise EncodeError(f"tensor {name!r}: {_first_error(exc)}") from None
        offset += enc.nbytes

    body = b"".join(part for enc in encoded for part in enc.parts)
    layout = None
    key = b""
    if compact:
        if kind is not FrameKind.UPDATE:
            raise EncodeError(f"only update frames may be compact, not {kind.value} frames")
        layout = tuple(_layout_entry(spec, codec) for spec in specs)
        key = manifest_key(specs)
        specs = []
    try:
        header = FrameHeader(
            kind=kind,
            job=job,
            round=round,
            sender=sender,
            num_samples=num_samples,
            num_updates=num_updates,
            weight=weight,
            codec=str(codec),
            tensors=tuple(specs),
            layout=layout,
            body_size=len(body),
            body_blake2b=body_checksum(body, key),
            base_model_hash=base_model_hash,
            model_name=model_name,
            dp=dp,
            run_id=run_id,
            downlink=downlink,
            release=release,
            partial=partial,
        )
    except ValidationError as exc:
        raise EncodeError(f"cannot build the frame header: {_first_error(exc)}") from None
    # Fields at their defaults are left out (the reader fills them in): ~30 % of a top-k update's header.
    header_bytes = header.model_dump_json(exclude_defaults=True).encode("utf-8")
    version = FORMAT_VERSION
    if compact:
        version = COMPRESSED_HEADER_VERSION
        header_bytes = zstandard.ZstdCompressor(
            level=19, dict_data=_HEADER_DICT, write_content_size=True, write_checksum=False, write_dict_id=False
        ).compress(header_bytes)
    compressed = zstandard.ZstdCompressor(level=codec.zstd_level, write_content_size=True).compress(body)
    frame = _PREFIX.pack(MAGIC, version, len(header_bytes), len(compressed)) + header_bytes + compressed

    if feedback is not None:
        transmitted: ModelArrays = {}
        for name, enc in zip(checked, encoded, strict=True):
            assert enc.decoded is not None  # want_decoded was set
            transmitted[name] = enc.decoded
        feedback.record(checked, transmitted)
    return frame


def _layout_entry(spec: TensorSpec, codec: CodecSpec) -> tuple[int, ...]:
    """A tensor's entry in a compact header; the encoding must be the one the reader will derive."""
    if spec.encoding != tensor_encoding(codec, spec.shape, spec.encoding.nnz):
        raise EncodeError(f"tensor {spec.name!r}: its encoding {spec.encoding} cannot be stated compactly")
    if codec.topk is None:
        return (spec.nbytes,)
    assert spec.encoding.nnz is not None  # a top-k codec keeps a count in every tensor
    return (spec.encoding.nnz, spec.nbytes)


def expand_layout(header: FrameHeader, codec: CodecSpec, manifest: Sequence[ManifestEntry]) -> FrameHeader:
    """The full form of a compact header: its ``layout`` read against the update ``manifest`` the receiver holds.
    A full header is returned as it is. Raises :class:`ManifestMismatch` or :class:`InvalidHeader`."""
    if header.layout is None:
        return header
    if len(header.layout) != len(manifest):
        names = [e.name for e in manifest[:5]]
        raise ManifestMismatch(
            f"the compact header lists {len(header.layout)} tensor(s) but the expected model has {len(manifest)} "
            f"({', '.join(names)}{', ...' if len(manifest) > 5 else ''})"
        )
    specs: list[TensorSpec] = []
    offset = 0
    want = 1 if codec.topk is None else 2
    for entry, tensor in zip(header.layout, manifest, strict=True):
        if len(entry) != want:
            raise InvalidHeader(
                f"tensor {tensor.name!r}: a compact layout entry of codec {codec} is "
                + ("[nbytes]" if want == 1 else "[nnz, nbytes]")
                + f", got {list(entry)}"
            )
        nnz = entry[0] if want == 2 else None
        nbytes = entry[-1]
        encoding = tensor_encoding(codec, tensor.shape, nnz)
        specs.append(
            TensorSpec(
                name=tensor.name,
                shape=tensor.shape,
                dtype=tensor.dtype,
                encoding=encoding,
                offset=offset,
                nbytes=nbytes,
            )
        )
        offset += nbytes
    return header.model_copy(update={"tensors": tuple(specs), "layout": None})


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "value"
    return f"{where}: {first['msg']}"


# ---------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------


def _read_prefix(view: memoryview, max_header_bytes: int) -> tuple[int, int, int]:
    head = bytes(view[: len(MAGIC)])
    if head != MAGIC[: len(head)] or not head:
        raise BadMagic(
            f"not a fedmqtt frame: it starts with {head!r}, expected {MAGIC!r} "
            "(was a JSON message or another tool's payload published on a model/update topic?)"
        )
    if len(view) < PREFIX_SIZE:
        raise TruncatedFrame(f"frame is {len(view)} bytes, shorter than the {PREFIX_SIZE}-byte fixed prefix")
    _, version, header_len, body_len = _PREFIX.unpack_from(view)
    if version not in _VERSIONS:
        raise UnsupportedVersion(
            f"frame format version {version} is not supported (this build reads versions "
            f"{', '.join(map(str, _VERSIONS))}); run the same fedmqtt version on the coordinator and the devices"
        )
    if header_len > max_header_bytes:
        raise FrameTooLarge(f"header declares {header_len} bytes, above the limit of {max_header_bytes}")
    if len(view) < PREFIX_SIZE + header_len:
        raise TruncatedFrame(
            f"frame is {len(view)} bytes but its header alone needs {PREFIX_SIZE + header_len}; "
            "the message was cut short"
        )
    return version, header_len, body_len


def _inflate_header(raw: memoryview, max_header_bytes: int) -> bytes:
    """A version-2 header's JSON: at most ``max_header_bytes``, declared before anything is allocated."""
    try:
        declared = zstandard.frame_content_size(raw)
    except zstandard.ZstdError as exc:
        raise InvalidHeader(f"the compressed frame header is not a zstd frame: {exc}") from None
    if declared == -1:
        raise InvalidHeader("the compressed frame header does not declare its size; fedmqtt frames always do")
    if declared > max_header_bytes:
        raise FrameTooLarge(f"the compressed header declares {declared} bytes, above the limit of {max_header_bytes}")
    try:
        text = zstandard.ZstdDecompressor(dict_data=_HEADER_DICT).decompress(
            raw, read_across_frames=False, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise InvalidHeader(f"the compressed frame header is corrupt: {exc}") from None
    if len(text) != declared:
        raise InvalidHeader(f"the compressed header decompresses to {len(text)} bytes, it declares {declared}")
    return text


def _parse_header(raw: memoryview, version: int, max_header_bytes: int) -> tuple[FrameHeader, CodecSpec]:
    text = _inflate_header(raw, max_header_bytes) if version == COMPRESSED_HEADER_VERSION else bytes(raw)
    try:
        header = FrameHeader.model_validate_json(text)
    except ValidationError as exc:
        raise InvalidHeader(f"frame header is invalid: {_first_error(exc)}") from None
    try:
        codec = CodecSpec.parse(header.codec)
    except MessageError as exc:
        raise InvalidHeader(f"frame header has an unusable codec: {exc.detail}") from None
    _check_encodings(header, codec)
    return header, codec


def peek_header(data: Buffer, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> FrameHeader:
    """Validate the magic, version and header of a frame and return the header (the body is not read)."""
    view = memoryview(data).cast("B")
    version, header_len, _ = _read_prefix(view, max_header_bytes)
    header, _ = _parse_header(view[PREFIX_SIZE : PREFIX_SIZE + header_len], version, max_header_bytes)
    return header


def _capped_numel(shape: Sequence[int], cap: int) -> int | None:
    """Product of ``shape``, or None as soon as it exceeds ``cap`` (huge shapes cost nothing)."""
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > cap:
            return None
    return n


def _check_encodings(header: FrameHeader, codec: CodecSpec) -> None:
    """Every tensor's encoding must be one the frame's codec produces."""
    for spec in header.tensors:
        enc = spec.encoding
        where = f"tensor {spec.name!r}"
        if enc.values is not codec.values:
            raise InvalidHeader(f"{where} is encoded as {enc.values.value} but the frame's codec is {codec}")
        if (enc.nnz is not None) != (codec.topk is not None):
            raise InvalidHeader(f"{where}: sparse (nnz) tensors must come exactly with a topk codec (codec is {codec})")
        if enc.values is not ValueEncoding.INT8 and (enc.scale_axis is not None or enc.stochastic):
            raise InvalidHeader(f"{where}: scale_axis and stochastic apply to int8 tensors only")
        if enc.scale_axis == 0 and (not codec.per_channel or not spec.shape):
            raise InvalidHeader(f"{where}: per-channel scales need an int8c codec and a tensor of >= 1 dim")


def _describe(spec: TensorSpec) -> str:
    enc = spec.encoding
    text = f"shape {spec.shape} as {enc.values.value}"
    if enc.values in (ValueEncoding.INT8, ValueEncoding.SIGN):
        text += " with per-channel scales" if enc.scale_axis == 0 else " with one scale"
    if enc.nnz is not None:
        text += f", {enc.nnz} kept"
    return text


def _check_layout(header: FrameHeader, max_body_bytes: int) -> list[int]:
    """Check every tensor's size and place against the body and the limits; return each one's numel."""
    if header.body_size > max_body_bytes:
        raise FrameTooLarge(
            f"body declares {header.body_size} bytes uncompressed, above the limit of {max_body_bytes} "
            "(raise max_body_bytes if this model is really that large)"
        )
    output_cap = max_body_bytes // 4  # the decoded float32 tensors obey the same limit
    total = 0
    offset = 0
    numels: list[int] = []
    for spec in header.tensors:
        enc = spec.encoding
        where = f"tensor {spec.name!r}"
        numel = _capped_numel(spec.shape, output_cap - total)
        if numel is None:
            raise FrameTooLarge(
                f"{where} has shape {spec.shape}: the decoded tensors would exceed the limit of {max_body_bytes} bytes"
            )
        total += numel
        numels.append(numel)
        if enc.nnz is not None and enc.nnz > numel:
            raise BodyLayoutError(f"{where} keeps {enc.nnz} entries but has only {numel}")
        if spec.offset != offset:
            raise BodyLayoutError(
                f"{where} starts at body offset {spec.offset}, expected {offset} (tensors are back to back)"
            )
        fixed = value_bytes(spec, numel)
        if enc.values is ValueEncoding.SIGN:
            low, high = sign_layout_bounds(numel, enc.nnz)
        elif enc.nnz is None:
            low = high = fixed
        else:
            low, high = fixed + enc.nnz, fixed + enc.nnz * max_varint_len(numel)
        if not low <= spec.nbytes <= high:
            expect = str(low) if low == high else f"{low}..{high}"
            raise BodyLayoutError(f"{where} declares {spec.nbytes} bytes but {_describe(spec)} takes {expect}")
        offset += spec.nbytes
    if offset != header.body_size:
        raise BodyLayoutError(f"tensors cover {offset} bytes but the header declares a body of {header.body_size}")
    return numels


def _check_manifest(header: FrameHeader, expected: Sequence[ManifestEntry]) -> None:
    got = header.manifest()
    want = tuple(expected)
    if got == want:
        return
    got_names = [e.name for e in got]
    want_names = [e.name for e in want]
    if got_names != want_names:
        got_set, want_set = set(got_names), set(want_names)
        missing = [n for n in want_names if n not in got_set]
        extra = [n for n in got_names if n not in want_set]
        detail = f"missing {missing[:5]}, unexpected {extra[:5]}" if missing or extra else "in another order"
        raise ManifestMismatch(f"frame tensors differ from the expected model: {detail}")
    for g, w in zip(got, want, strict=True):
        if g != w:
            raise ManifestMismatch(
                f"tensor {g.name!r} has shape {g.shape} ({g.dtype}) but the model expects {w.shape} ({w.dtype})"
            )


def _decompress(compressed: memoryview, body_size: int, max_body_bytes: int) -> bytes:
    """Decompress the body into exactly ``body_size`` bytes, never more (zstd bombs allocate nothing)."""
    try:
        declared = zstandard.frame_content_size(compressed)
    except zstandard.ZstdError as exc:
        raise CorruptBody(f"the body is not a zstd frame: {exc}") from None
    if declared == -1:
        raise CorruptBody("the body's zstd frame does not declare its content size; fedmqtt frames always do")
    if declared > max_body_bytes:
        raise FrameTooLarge(f"the body's zstd frame declares {declared} bytes, above the limit of {max_body_bytes}")
    if declared != body_size:
        raise BodyLayoutError(f"the body's zstd frame declares {declared} bytes but the header says {body_size}")
    try:
        # With the content size declared, zstandard allocates exactly that and fails if the data would
        # decompress to more.
        body = zstandard.ZstdDecompressor().decompress(compressed, read_across_frames=False, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        if "too small" in str(exc):
            raise FrameTooLarge(
                f"the body decompresses to more than the {body_size} bytes it declares (a zstd bomb?); "
                "refused without allocating more"
            ) from None
        raise CorruptBody(f"the zstd body is corrupt: {exc}") from None
    if len(body) != body_size:
        raise BodyLayoutError(f"the body decompresses to {len(body)} bytes, the header declares {body_size}")
    return body


def decode_frame(
    data: Buffer,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    expected_manifest: Sequence[ManifestEntry] | None = None,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> DecodedFrame:
    """Validate and decode a frame. Raises only :class:`~fedmqtt.codecs.errors.FrameError` subclasses.

    ``max_body_bytes`` bounds both the decompressed body and the decoded float32 tensors.
    ``expected_manifest`` (names, shapes, dtypes in order) is checked before the body is touched.
    """
    view = memoryview(data).cast("B")
    version, header_len, body_len = _read_prefix(view, max_header_bytes)
    header, codec = _parse_header(view[PREFIX_SIZE : PREFIX_SIZE + header_len], version, max_header_bytes)
    key = b""
    if header.layout is not None:
        if expected_manifest is None:
            raise InvalidHeader(
                "the frame has a compact header (no tensor names or shapes): it can only be decoded against "
                "the update manifest (expected_manifest)"
            )
        header = expand_layout(header, codec, expected_manifest)
        _check_encodings(header, codec)
        key = manifest_key(expected_manifest)
    available = len(view) - PREFIX_SIZE - header_len
    if available < body_len:
        raise TruncatedFrame(
            f"frame body is {available} bytes but the prefix declares {body_len}; the message was cut short"
        )
    if available > body_len:
        raise TrailingBytes(
            f"{available - body_len} unexpected bytes after the end of the frame (were two payloads joined?)"
        )
    if expected_manifest is not None:
        _check_manifest(header, expected_manifest)
    numels = _check_layout(header, max_body_bytes)

    body = _decompress(view[PREFIX_SIZE + header_len :], header.body_size, max_body_bytes)
    checksum = body_checksum(body, key)
    if checksum != header.body_blake2b:
        raise ChecksumMismatch(
            f"body checksum {checksum} differs from the header's {header.body_blake2b}: "
            + (
                "the update was made for other tensors than the job's model (names or shapes differ; "
                "its header is compact, the checksum covers the manifest), or it was corrupted or altered"
                if key
                else "the frame was corrupted or altered"
            )
        )
    raw = np.frombuffer(body, dtype=np.uint8)
    arrays: ModelArrays = {}
    for spec, numel in zip(header.tensors, numels, strict=True):
        arrays[spec.name] = decode_tensor(spec, raw[spec.offset : spec.offset + spec.nbytes], numel)
    return DecodedFrame(header=header, arrays=arrays)


__all__ = [
    "COMPRESSED_HEADER_VERSION",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_HEADER_BYTES",
    "FORMAT_VERSION",
    "HEADER_DICTIONARY",
    "MAGIC",
    "DecodedFrame",
    "decode_frame",
    "encode_frame",
    "expand_layout",
    "manifest_key",
    "model_hash",
    "peek_header",
]
