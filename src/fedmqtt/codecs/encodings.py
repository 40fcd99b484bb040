"""Per-tensor encodings: float32, float16, int8 (per-tensor or per-channel scales, optionally stochastic
rounding), each optionally after top-k sparsification.

Byte layout of one tensor inside the uncompressed body (all little-endian, no padding):

- dense:  ``[scales float32 x S][values x N]``
- top-k:  ``[gaps LEB128 varint x nnz][scales float32 x S][values x nnz]``

``values`` are float32, float16 or int8; ``S`` is 0 (float), 1 (int8 per tensor) or ``shape[0]``
(int8 per output channel). Sparse indices are the flat C-order positions of the kept entries, strictly
increasing, stored as gaps (first index, then differences) in unsigned LEB128 varints: most gaps fit
one byte, and zstd compresses the varint stream better than uint32 gaps, byte-shuffled uint32 gaps or a
bitmap on a real MNIST-CNN update (see docs/codecs.md).

Sign values (``ValueEncoding.SIGN``, 1 bit each, one scale) use a tighter layout:

- dense:  ``[scale float32][signs: ceil(N/8) bytes]``
- top-k:  ``[rice parameter b uint8][scale float32][signs: ceil(nnz/8) bytes]``
  ``[remainders: ceil(nnz*b/8) bytes][quotients: the rest]``

``signs`` are packed bits, least significant bit first, 1 = negative; a decoded value is ``+scale`` or
``-scale``; the scale is the mean magnitude of the kept values (so the decoded tensor's L2 norm never exceeds
theirs). The same gaps as above are Rice-coded with parameter ``b``: gap = ``q * 2**b + r``; ``r`` is ``b``
bits (most significant first) in the remainder stream, ``q`` is unary in the quotient stream (``q`` zero bits,
then a one). Splitting the two streams keeps decoding vectorised: the quotient stream's ones are exactly the
terminators. ``b`` is chosen per tensor to minimise the bits; about ``log2(e * numel / nnz)`` bits per kept
entry, near the entropy of the gaps, where varints spend 8 or 16 bits. Every padding bit is zero.

Kept entries of a real update cluster (in an MNIST mlp's first layer half the gaps are 1: neighbouring pixels of
one neuron), which one Rice parameter cannot exploit. So the encoder may set the top bit of the parameter byte
(``0x80 | b``): then ``[flags: ceil(nnz/8) bytes]`` follow the signs, bit i (most significant first) set when
gap i is 1, and only the other gaps are Rice-coded, none of them 1. It takes that form when it is fewer bytes.

Encoder and decoder share :func:`dequantize`, so what the sender believes it sent (used for error
feedback) is bit-for-bit what the receiver decodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedmqtt.codecs.errors import (
    BodyLayoutError,
    EncodeError,
    IndexOutOfRange,
    IndicesNotIncreasing,
    NonFiniteValues,
)
from fedmqtt.schema import CodecSpec, TensorEncoding, TensorSpec, ValueEncoding

F32 = np.dtype("<f4")
F16 = np.dtype("<f2")
I8 = np.dtype("i1")
INT8_MAX = 127
_SMALLEST_SCALE = np.float32(np.finfo(np.float32).smallest_subnormal)

_ITEMSIZE = {ValueEncoding.FLOAT32: 4, ValueEncoding.FLOAT16: 2, ValueEncoding.INT8: 1}

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class EncodedTensor:
    """One encoded tensor: its encoding, its body bytes (in order) and what the receiver will decode."""

    encoding: TensorEncoding
    parts: tuple[bytes | memoryview, ...]
    nbytes: int
    # The dense float32 tensor the receiver will decode (None unless asked for: error feedback).
    decoded: FloatArray | None


# ---------------------------------------------------------------------------------------------------
# Helpers shared by encoder and decoder
# ---------------------------------------------------------------------------------------------------


def kept_count(numel: int, fraction: float) -> int:
    """Top-k keeps ``ceil(fraction * numel)`` entries, at least one (unless the tensor is empty)."""
    if numel == 0:
        return 0
    # The small epsilon stops 0.01 * 1_600_000 = 16000.000000000002 from keeping one extra entry.
    return min(numel, max(1, math.ceil(fraction * numel - 1e-9)))


def uses_channel_scales(shape: Sequence[int], per_channel: bool) -> bool:
    """Per-output-channel scales only make sense for weights (>= 2-D); biases and scalars use one scale."""
    return per_channel and len(shape) >= 2


def tensor_encoding(codec: CodecSpec, shape: Sequence[int], nnz: int | None) -> TensorEncoding:
    """How ``codec`` encodes a tensor of ``shape`` with ``nnz`` kept entries (None = dense): the one rule the
    encoder follows and a compact frame header's reader applies (``FrameHeader.layout``)."""
    int8 = codec.values is ValueEncoding.INT8
    return TensorEncoding(
        values=codec.values,
        scale_axis=0 if int8 and uses_channel_scales(shape, codec.per_channel) else None,
        stochastic=int8 and codec.stochastic,
        nnz=nnz,
    )


def scale_count(shape: Sequence[int], encoding: TensorEncoding) -> int:
    if encoding.values is ValueEncoding.SIGN:
        return 1
    if encoding.values is not ValueEncoding.INT8:
        return 0
    return int(shape[0]) if encoding.scale_axis == 0 else 1


def max_varint_len(numel: int) -> int:
    """The longest varint a gap inside a tensor of ``numel`` entries needs (gaps are < numel)."""
    return max(1, math.ceil((numel - 1).bit_length() / 7)) if numel > 1 else 1


# Rice parameters above this are never useful: a gap inside a tensor of fewer than 2**40 entries fits in b bits.
MAX_RICE_PARAMETER = 40
_SIGN_HEADER = 1 + 4  # sparse sign tensors: rice parameter + scale


def sign_layout_bounds(numel: int, nnz: int | None) -> tuple[int, int]:
    """The least and most bytes a sign tensor of ``numel`` entries (``nnz`` kept, None = dense) can take."""
    if nnz is None:
        return 4 + (numel + 7) // 8, 4 + (numel + 7) // 8
    signs = (nnz + 7) // 8
    if nnz == 0:
        return _SIGN_HEADER, _SIGN_HEADER
    # At least one terminator bit per gap; at most every remainder bit plus quotients summing to < numel.
    low = _SIGN_HEADER + signs + (nnz + 7) // 8
    b = min(MAX_RICE_PARAMETER, max(1, (numel - 1).bit_length()))
    # + the flags of gaps of 1 (RUN_FLAGS)
    high = _SIGN_HEADER + signs + (nnz + 7) // 8 + (nnz * b + 7) // 8 + (nnz + numel + 7) // 8
    return low, high


# The top bit of a sparse sign tensor's parameter byte: gaps of 1 are flagged, the others Rice-coded.
RUN_FLAGS = 0x80


def rice_bytes(gaps: npt.NDArray[np.uint64], b: int) -> int:
    """Bytes of the two Rice streams (each padded to whole bytes)."""
    if gaps.size == 0:
        return 0
    return (gaps.size * b + 7) // 8 + (int((gaps >> np.uint64(b)).sum()) + gaps.size + 7) // 8


def index_code(gaps: npt.NDArray[np.uint64]) -> tuple[int, bytes, npt.NDArray[np.uint64]]:
    """The parameter byte, the flags (b"" unless RUN_FLAGS) and the gaps to Rice-code: the fewer bytes."""
    b = best_rice_parameter(gaps)
    ones = gaps == 1
    rest = gaps[~ones]
    b_rest = best_rice_parameter(rest)
    if (gaps.size + 7) // 8 + rice_bytes(rest, b_rest) < rice_bytes(gaps, b):
        return RUN_FLAGS | b_rest, np.packbits(ones).tobytes(), rest
    return b, b"", gaps


def rice_bits(gaps: npt.NDArray[np.uint64], b: int) -> int:
    """Bits Rice coding ``gaps`` with parameter ``b`` takes (quotients + terminators + remainders)."""
    return int((gaps >> np.uint64(b)).sum()) + gaps.size * (1 + b)


def best_rice_parameter(gaps: npt.NDArray[np.uint64]) -> int:
    if gaps.size == 0:
        return 0
    top = min(MAX_RICE_PARAMETER, int(gaps.max()).bit_length())
    return min(range(top + 1), key=lambda b: rice_bits(gaps, b))


def rice_encode(gaps: npt.NDArray[np.uint64], b: int) -> tuple[bytes, bytes]:
    """(remainder stream, quotient stream), each packed and zero-padded to whole bytes."""
    n = gaps.size
    if b:
        shifts = np.arange(b - 1, -1, -1, dtype=np.uint64)
        rem_bits = ((gaps[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8).reshape(-1)
        remainders = np.packbits(rem_bits).tobytes()
    else:
        remainders = b""
    q = (gaps >> np.uint64(b)).astype(np.int64)
    ends = np.cumsum(q + 1) - 1  # the terminator of gap i sits after its q zeros
    unary = np.zeros(int(ends[-1]) + 1 if n else 0, dtype=np.uint8)
    unary[ends] = 1
    return remainders, np.packbits(unary).tobytes()


def _check_padding(stream: npt.NDArray[np.uint8], bits: int, name: str, what: str, *, little: bool = False) -> None:
    """The bits of a packed ``stream`` beyond its first ``bits`` must be zero (one encoding per tensor)."""
    spare = stream.size * 8 - bits
    mask = (1 << spare) - 1
    if little:  # filled from the least significant bit: the padding is the top bits
        mask <<= 8 - spare
    if spare and int(stream[-1]) & mask:
        raise BodyLayoutError(f"tensor {name!r}: the padding bits after its {what} are not zero")


def _rice_decode(block: npt.NDArray[np.uint8], b: int, nnz: int, numel: int, name: str) -> npt.NDArray[np.int64]:
    """The ``nnz`` Rice-coded gaps; ``block`` is the remainder stream and then the quotient stream, to its end.
    Anything but exactly the canonical streams is refused; each gap is below ``numel``."""
    rem_bytes = (nnz * b + 7) // 8
    if block.size < rem_bytes + 1:
        raise BodyLayoutError(
            f"tensor {name!r}: {block.size} bytes remain for the Rice-coded indices but {nnz} gaps with "
            f"parameter {b} need {rem_bytes} bytes of remainders and at least one of quotients"
        )
    remainders = np.zeros(nnz, dtype=np.int64)
    if b:
        stream = block[:rem_bytes]
        _check_padding(stream, nnz * b, name, "Rice remainders")
        # One bit column at a time: memory stays at one bit per byte plus one int64 per gap, whatever b is.
        bits = np.unpackbits(stream)[: nnz * b].reshape(nnz, b)
        for j in range(b):
            remainders <<= 1
            remainders |= bits[:, j]
    quotients = block[rem_bytes:]
    terminators = int(np.bitwise_count(quotients).sum(dtype=np.int64))
    if terminators != nnz:  # counted before any per-terminator array is made
        raise BodyLayoutError(
            f"tensor {name!r}: the Rice quotient stream holds {terminators} terminators, but its nnz declares {nnz} gaps"
        )
    ends = np.flatnonzero(np.unpackbits(quotients))
    if int(ends[-1]) // 8 != quotients.size - 1:
        raise BodyLayoutError(f"tensor {name!r}: {quotients.size - 1 - int(ends[-1]) // 8} byte(s) of zeros "
                              "follow the Rice quotient stream")  # fmt: skip
    q = np.diff(ends, prepend=-1) - 1
    if int(q.max()) > (numel - 1) >> b:
        at = int(np.argmax(q))
        raise IndexOutOfRange(
            f"tensor {name!r}: Rice gap #{at} is at least {int(q[at]) << b}, outside a tensor of {numel} entries"
        )
    return (q << b) | remainders


def dequantize(
    q: npt.NDArray[np.int8], scales: FloatArray, channel: npt.NDArray[np.intp] | None, rows: int
) -> FloatArray:
    """int8 codes times their scale, as float32.

    ``scales`` has one entry (per tensor) or one per output channel; for per-channel scales either
    ``channel`` gives each (sparse) entry's channel, or the codes are dense and ``rows`` channels long.
    """
    if q.size == 0:
        return np.zeros(0, dtype=np.float32)
    if scales.size == 1:
        return q.astype(np.float32) * scales[0]
    if channel is not None:
        return q.astype(np.float32) * scales[channel]
    # One pass, casting inside the multiply: 10-40× faster than astype-then-broadcast on the CNN's fc1 (same values).
    return np.multiply(q.reshape(rows, -1), scales[:, None], dtype=np.float32).reshape(-1)


# ---------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------


def _byte_view(array: np.ndarray) -> memoryview:
    """The bytes of a contiguous array, without copying."""
    return array.reshape(-1).view(np.uint8).data


def _varint_encode(gaps: npt.NDArray[np.uint64]) -> bytes:
    """Unsigned LEB128 of every gap, vectorised: byte ``b`` of each value is written in one pass."""
    lengths = np.ones(gaps.size, dtype=np.int64)
    shift = 7
    while gaps.size and shift < 64 and (gaps >> np.uint64(shift)).any():
        lengths += (gaps >> np.uint64(shift)) > 0
        shift += 7
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    starts = np.cumsum(lengths) - lengths
    for b in range(int(lengths.max()) if gaps.size else 0):
        has = lengths > b
        seven = ((gaps[has] >> np.uint64(7 * b)) & np.uint64(0x7F)).astype(np.uint8)
        more = (lengths[has] > b + 1).astype(np.uint8) << 7
        out[starts[has] + b] = seven | more
    return out.tobytes()


def _top_k(flat: FloatArray, k: int) -> npt.NDArray[np.intp]:
    """Sorted flat positions of the ``k`` largest magnitudes."""
    if k <= 0:
        return np.zeros(0, dtype=np.intp)
    if k >= flat.size:
        return np.arange(flat.size, dtype=np.intp)
    part = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]
    part.sort()
    return part


def global_kept_counts(arrays: Sequence[FloatArray], fraction: float) -> list[int]:
    """How many entries of each tensor the model-wide top-k keeps: ``kept_count`` of all entries together,
    the largest magnitudes wherever they are (ties at the threshold go to the earlier tensors)."""
    sizes = [a.size for a in arrays]
    total = sum(sizes)
    k = kept_count(total, fraction)
    if k >= total:
        return sizes
    magnitude = np.concatenate([np.abs(a.reshape(-1)) for a in arrays])
    threshold = np.partition(magnitude, total - k)[total - k]
    above = [int(np.count_nonzero(np.abs(a) > threshold)) for a in arrays]
    ties = k - sum(above)
    counts = []
    for a, n in zip(arrays, above, strict=True):
        take = min(ties, int(np.count_nonzero(np.abs(a) == threshold)))
        ties -= take
        counts.append(n + take)
    return counts


def _channel_amax(magnitude: FloatArray, channel: npt.NDArray[np.intp], rows: int) -> FloatArray:
    """Per-channel max of sparse magnitudes; ``channel`` is sorted (indices are). Empty channels get 0."""
    amax = np.zeros(rows, dtype=np.float32)
    if magnitude.size:
        starts = np.flatnonzero(np.diff(channel, prepend=-1))
        amax[channel[starts]] = np.maximum.reduceat(magnitude, starts)
    return amax


def _quantize(
    values: FloatArray,
    amax: FloatArray,
    channel: npt.NDArray[np.intp] | None,
    rows: int,
    stochastic: bool,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.int8], FloatArray]:
    scales = (amax / np.float32(INT8_MAX)).astype(np.float32)
    # A tiny non-zero max whose scale underflows to 0 still needs a usable (subnormal) scale.
    scales = np.where((amax > 0) & (scales == 0), _SMALLEST_SCALE, scales).astype(np.float32)
    # Subnormal scales are coarse: round up where 127 * scale falls short of the max, so the largest
    # value is never clipped by more than half a step.
    short = scales.astype(np.float64) * INT8_MAX < amax
    if short.any():
        scales = np.where(short, np.nextafter(scales, np.float32(np.inf)), scales).astype(np.float32)
    divisor = np.where(scales > 0, scales, np.float32(1))
    if values.size == 0:
        return np.zeros(0, dtype=np.int8), scales
    if scales.size == 1:
        ratio = values / divisor[0]
    elif channel is not None:
        ratio = values / divisor[channel]
    else:
        ratio = (values.reshape(rows, -1) / divisor[:, None]).reshape(-1)
    if stochastic:
        # floor(r + u), u ~ U[0, 1): E[q] = r exactly, so the decoded value is unbiased.
        ratio += rng.random(ratio.size, dtype=np.float32)
        np.floor(ratio, out=ratio)
    else:
        np.rint(ratio, out=ratio)
    np.clip(ratio, -INT8_MAX, INT8_MAX, out=ratio)
    return ratio.astype(np.int8), scales


def encode_tensor(
    name: str,
    array: FloatArray,
    codec: CodecSpec,
    rng: np.random.Generator,
    *,
    want_decoded: bool,
    keep: int | None = None,
) -> EncodedTensor:
    """Encode one finite float32 tensor according to ``codec``; ``keep`` overrides the top-k count (gtopk)."""
    shape = array.shape
    flat = array.reshape(-1)
    numel = flat.size
    rows = int(shape[0]) if shape else 1
    per_channel = codec.values is ValueEncoding.INT8 and uses_channel_scales(shape, codec.per_channel)

    if codec.topk is not None and keep is None:
        keep = kept_count(numel, codec.topk)
    if codec.values is ValueEncoding.SIGN:
        return _encode_sign(array, keep, codec, want_decoded=want_decoded)
    parts: list[bytes | memoryview] = []
    index: npt.NDArray[np.intp] | None = None
    nnz: int | None = None
    if codec.topk is not None:
        index = _top_k(flat, keep or 0)
        nnz = int(index.size)
        gaps = np.diff(index, prepend=0).astype(np.uint64)
        parts.append(_varint_encode(gaps))
        values = flat[index]
    else:
        values = flat
    channel = index // (numel // rows) if (per_channel and index is not None and numel) else None

    encoding = tensor_encoding(codec, shape, nnz)
    kept: FloatArray
    if codec.values is ValueEncoding.FLOAT32:
        stored32 = np.ascontiguousarray(values, dtype=F32)
        parts.append(_byte_view(stored32))
        kept = values
    elif codec.values is ValueEncoding.FLOAT16:
        with np.errstate(over="ignore"):
            stored16 = np.ascontiguousarray(values, dtype=F16)
        if not np.isfinite(stored16).all():
            biggest = float(np.abs(values).max())
            raise EncodeError(
                f"tensor {name!r} has a value of magnitude {biggest:g}, beyond float16's range (65504); "
                "encode it with float32 or int8 instead"
            )
        parts.append(_byte_view(stored16))
        kept = stored16.astype(np.float32) if want_decoded else values
    else:
        magnitude = np.abs(values)
        if per_channel:
            if channel is not None:
                amax = _channel_amax(magnitude, channel, rows)
            elif numel:
                amax = magnitude.reshape(rows, -1).max(axis=1, initial=0.0).astype(np.float32)
            else:
                amax = np.zeros(rows, dtype=np.float32)
        else:
            amax = np.array([magnitude.max(initial=0.0)], dtype=np.float32)
        q, scales = _quantize(values, amax, channel, rows, codec.stochastic, rng)
        parts.append(_byte_view(np.ascontiguousarray(scales, dtype=F32)))
        parts.append(_byte_view(q))
        kept = dequantize(q, scales, channel, rows) if want_decoded else values

    decoded: FloatArray | None = None
    if want_decoded:
        if index is None:
            decoded = np.ascontiguousarray(kept, dtype=np.float32).reshape(shape)
        else:
            dense = np.zeros(numel, dtype=np.float32)
            dense[index] = kept
            decoded = dense.reshape(shape)
    nbytes = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    return EncodedTensor(encoding=encoding, parts=tuple(parts), nbytes=nbytes, decoded=decoded)


def _encode_sign(array: FloatArray, k: int | None, codec: CodecSpec, *, want_decoded: bool) -> EncodedTensor:
    """Scaled sign: one bit per kept value, one scale (their mean magnitude); Rice-coded indices when sparse."""
    shape = array.shape
    flat = array.reshape(-1)
    parts: list[bytes | memoryview] = []
    index: npt.NDArray[np.intp] | None = None
    nnz: int | None = None
    values = flat
    if k is not None:
        index = _top_k(flat, k)
        nnz = int(index.size)
        values = flat[index]
        gaps = np.diff(index, prepend=0).astype(np.uint64)
        code, flags, coded = index_code(gaps)
        b = code & ~RUN_FLAGS
        parts.append(bytes([code]))
    # float64 mean: the scale is the same on every machine whatever numpy's float32 summation order.
    scale = np.float32(np.abs(values, dtype=np.float64).mean()) if values.size else np.float32(0)
    negative = np.signbit(values) & (values != 0)
    parts.append(np.array([scale], dtype=F32).tobytes())
    parts.append(np.packbits(negative, bitorder="little").tobytes())
    if index is not None:
        parts.append(flags)
        if coded.size:
            parts.extend(rice_encode(coded, b))
    decoded: FloatArray | None = None
    if want_decoded:
        kept = np.where(negative, -scale, scale).astype(np.float32)
        if index is None:
            decoded = kept.reshape(shape)
        else:
            dense = np.zeros(flat.size, dtype=np.float32)
            dense[index] = kept
            decoded = dense.reshape(shape)
    encoding = tensor_encoding(codec, shape, nnz)
    nbytes = sum(len(p) for p in parts)
    return EncodedTensor(encoding=encoding, parts=tuple(parts), nbytes=nbytes, decoded=decoded)


# ---------------------------------------------------------------------------------------------------
# Decoding (the header's specs have already passed :func:`fedmqtt.codecs.frame` layout checks)
# ---------------------------------------------------------------------------------------------------


def value_bytes(spec: TensorSpec, numel: int) -> int:
    """Bytes of the scales and values of a tensor (everything but sparse indices)."""
    count = numel if spec.encoding.nnz is None else spec.encoding.nnz
    if spec.encoding.values is ValueEncoding.SIGN:
        return 4 + (count + 7) // 8
    return 4 * scale_count(spec.shape, spec.encoding) + count * _ITEMSIZE[spec.encoding.values]


def _varint_decode(block: npt.NDArray[np.uint8], nnz: int, numel: int, name: str) -> tuple[int, npt.NDArray[np.int64]]:
    """Decode ``nnz`` gaps from the start of ``block``; return (bytes used, strictly increasing indices)."""
    longest = max_varint_len(numel)
    window = block[: nnz * longest]
    ends = np.flatnonzero(window < 0x80)[:nnz]
    if ends.size < nnz:
        raise BodyLayoutError(
            f"tensor {name!r}: the index block holds fewer than the {nnz} varint gaps its nnz declares, "
            f"or one is longer than {longest} bytes"
        )
    lengths = np.diff(ends, prepend=-1)
    if int(lengths.max()) > longest:
        raise IndexOutOfRange(
            f"tensor {name!r}: a varint gap is {int(lengths.max())} bytes long; gaps inside a tensor of "
            f"{numel} entries need at most {longest}"
        )
    starts = ends - lengths + 1
    gaps = np.zeros(nnz, dtype=np.int64)
    for b in range(int(lengths.max())):
        has = lengths > b
        gaps[has] |= (block[starts[has] + b].astype(np.int64) & 0x7F) << (7 * b)
    return int(ends[-1]) + 1, _indices_from_gaps(gaps, numel, name)


def _indices_from_gaps(gaps: npt.NDArray[np.int64], numel: int, name: str) -> npt.NDArray[np.int64]:
    """Gaps (first index, then differences) to indices; refuse repeats and indices outside the tensor."""
    nnz = gaps.size
    if nnz > 1 and int(gaps[1:].min()) < 1:
        at = int(np.flatnonzero(gaps[1:] < 1)[0]) + 1
        raise IndicesNotIncreasing(
            f"tensor {name!r}: sparse index #{at} repeats the one before it; indices must be strictly increasing"
        )
    # numel is bounded by the output-size limit, so these sums cannot overflow int64.
    indices = np.cumsum(gaps)
    if int(indices[-1]) >= numel:
        at = int(np.flatnonzero(indices >= numel)[0])
        raise IndexOutOfRange(
            f"tensor {name!r}: sparse index #{at} is {int(indices[at])}, outside a tensor of {numel} entries"
        )
    return indices


def decode_tensor(spec: TensorSpec, region: npt.NDArray[np.uint8], numel: int) -> FloatArray:
    """Decode the ``spec.nbytes`` bytes of one tensor into a dense float32 array of ``spec.shape``."""
    enc = spec.encoding
    if enc.values is ValueEncoding.SIGN:
        return _decode_sign(spec, region, numel)
    rows = int(spec.shape[0]) if spec.shape else 1
    pos = 0
    index: npt.NDArray[np.int64] | None = None
    count = numel
    if enc.nnz is not None:
        count = enc.nnz
        if count:
            pos, index = _varint_decode(region, count, numel, spec.name)
        else:
            index = np.zeros(0, dtype=np.int64)
        if region.size - pos != value_bytes(spec, numel):
            raise BodyLayoutError(
                f"tensor {spec.name!r}: after {pos} bytes of indices, {region.size - pos} bytes remain but "
                f"{count} {enc.values.value} values need {value_bytes(spec, numel)}"
            )

    if enc.values is ValueEncoding.INT8:
        n_scales = scale_count(spec.shape, enc)
        scales = region[pos : pos + 4 * n_scales].view(F32).astype(np.float32)
        pos += 4 * n_scales
        if not np.isfinite(scales).all():
            raise NonFiniteValues(f"tensor {spec.name!r}: a quantisation scale is NaN or infinite")
        if (scales < 0).any():
            raise BodyLayoutError(f"tensor {spec.name!r}: a quantisation scale is negative")
        q = region[pos : pos + count].view(I8)
        channel = None
        if index is not None and n_scales > 1:
            channel = index // (numel // rows)
        with np.errstate(over="ignore"):
            kept = dequantize(q, scales, channel, rows)
    else:
        dtype = F32 if enc.values is ValueEncoding.FLOAT32 else F16
        kept = region[pos : pos + count * dtype.itemsize].view(dtype).astype(np.float32)

    if not np.isfinite(kept).all():
        bad = int(np.count_nonzero(~np.isfinite(kept)))
        raise NonFiniteValues(
            f"tensor {spec.name!r}: {bad} value(s) are NaN or infinite (or overflow float32 once scaled)"
        )
    if index is None:
        return kept.reshape(spec.shape)
    dense = np.zeros(numel, dtype=np.float32)
    dense[index] = kept
    return dense.reshape(spec.shape)


def _decode_sign(spec: TensorSpec, region: npt.NDArray[np.uint8], numel: int) -> FloatArray:
    nnz = spec.encoding.nnz
    count = numel if nnz is None else nnz
    pos = 0
    b = 0
    flagged = False
    if nnz is not None:
        b = int(region[0])
        flagged = bool(b & RUN_FLAGS) and nnz > 0
        b &= ~RUN_FLAGS if flagged else 0xFF
        if b > MAX_RICE_PARAMETER:
            raise BodyLayoutError(f"tensor {spec.name!r}: Rice parameter {b} is above {MAX_RICE_PARAMETER}")
        pos = 1
    scale = region[pos : pos + 4].view(F32)[0]
    pos += 4
    if not np.isfinite(scale):
        raise NonFiniteValues(f"tensor {spec.name!r}: the sign scale is NaN or infinite")
    if scale < 0:
        raise BodyLayoutError(f"tensor {spec.name!r}: the sign scale is negative")
    signs = region[pos : pos + (count + 7) // 8]
    pos += signs.size
    _check_padding(signs, count, spec.name, "signs", little=True)
    negative = np.unpackbits(signs, count=count, bitorder="little").astype(bool)
    kept = np.where(negative, -scale, scale).astype(np.float32)
    if nnz is None:
        if pos != region.size:
            raise BodyLayoutError(f"tensor {spec.name!r}: {region.size - pos} bytes follow its signs")
        return kept.reshape(spec.shape)
    if nnz == 0:
        if pos != region.size or b:
            raise BodyLayoutError(f"tensor {spec.name!r} keeps no entries but has index bytes or a Rice parameter")
        return np.zeros(spec.shape, dtype=np.float32)
    if flagged:
        flags = region[pos : pos + (nnz + 7) // 8]
        pos += flags.size
        if flags.size < (nnz + 7) // 8:
            raise BodyLayoutError(f"tensor {spec.name!r}: its run flags are cut short")
        _check_padding(flags, nnz, spec.name, "run flags")
        ones = np.unpackbits(flags, count=nnz).astype(bool)
        gaps = np.ones(nnz, dtype=np.int64)
        rest = nnz - int(ones.sum())
        if rest == 0:
            if pos != region.size or b:
                raise BodyLayoutError(
                    f"tensor {spec.name!r}: every gap is flagged but Rice bytes or a parameter follow"
                )
        else:
            coded = _rice_decode(region[pos:], b, rest, numel, spec.name)
            if bool((coded == 1).any()):
                raise BodyLayoutError(f"tensor {spec.name!r}: a Rice-coded gap is 1, which its run flags should say")
            gaps[~ones] = coded
    else:
        gaps = _rice_decode(region[pos:], b, nnz, numel, spec.name)
    index = _indices_from_gaps(gaps, numel, spec.name)
    dense = np.zeros(numel, dtype=np.float32)
    dense[index] = kept
    return dense.reshape(spec.shape)
