"""Errors of the wire-frame codec.

Decoding treats every byte as untrusted: whatever is wrong with a frame, :func:`fedmqtt.codecs.decode_frame`
raises a :class:`FrameError` subclass that names the problem, and nothing else. Encoding refuses bad
input with an :class:`EncodeError`. A coordinator can map these straight to refusal reasons:
:class:`ManifestMismatch` -> ``manifest_mismatch``, :class:`NonFiniteValues` -> ``non_finite``, any other
:class:`FrameError` -> ``malformed``.
"""

from __future__ import annotations

from fedmqtt.errors import FedmqttError


class CodecError(FedmqttError):
    """Base of every error of ``fedmqtt.codecs``."""


# --- decoding untrusted bytes ---------------------------------------------------------------------


class FrameError(CodecError):
    """A received frame cannot be used; the message says what is wrong with it."""


class BadMagic(FrameError):
    """The bytes do not start with the fedmqtt frame magic (not a fedmqtt frame at all)."""


class UnsupportedVersion(FrameError):
    """The frame format version is not one this build can read."""


class InvalidHeader(FrameError):
    """The JSON header is not valid UTF-8 JSON or does not match :class:`fedmqtt.schema.FrameHeader`."""


class TruncatedFrame(FrameError):
    """The frame ends before the lengths it declares."""


class TrailingBytes(FrameError):
    """There are bytes after the end of the frame."""


class FrameTooLarge(FrameError):
    """A declared or actual size exceeds the configured limit."""


class CorruptBody(FrameError):
    """The compressed body is not one valid zstd frame."""


class ChecksumMismatch(FrameError):
    """The decompressed body does not hash to the checksum in the header."""


class BodyLayoutError(FrameError):
    """The header's tensor specs (shape, encoding, offset, nbytes) disagree with each other or the body."""


class ManifestMismatch(FrameError):
    """The frame's tensors are not those of the expected model."""


class NonFiniteValues(FrameError):
    """A tensor value or quantisation scale is NaN or infinite."""


class InvalidIndices(FrameError):
    """Sparse (top-k) indices are unusable."""


class IndexOutOfRange(InvalidIndices):
    """A sparse index points outside its tensor."""


class IndicesNotIncreasing(InvalidIndices):
    """Sparse indices repeat or go backwards (they must be strictly increasing)."""


# --- encoding and error feedback -------------------------------------------------------------------


class EncodeError(CodecError):
    """The arrays or header fields given to :func:`fedmqtt.codecs.encode_frame` cannot be encoded."""


class NonFiniteInput(EncodeError):
    """An array given to the encoder contains NaN or infinity."""


class FeedbackError(CodecError):
    """An error-feedback residual does not fit the update, or a saved state is invalid."""


class DeltaMismatch(FrameError):
    """A model-delta frame is for another job, run, round or base model, or does not yield the model the plan
    names: the device fetches the full model instead."""


class DeltaBaseMismatch(DeltaMismatch):
    """A model-delta frame applies to another model than the one this device holds (it missed a round)."""
