"""The compressed downlink: model-delta frames with server-side error feedback (pure, no network).

The coordinator keeps two models: the true global model ``x`` (what aggregation updates) and ``x_hat``, the
model the devices actually hold. Each round it sends ``q = C(x - x_hat)`` encoded with the downlink codec
(float16, int8, top-k + int8, ...) as a :attr:`~fedmqtt.schema.FrameKind.MODEL_DELTA` frame and sets
``x_hat <- x_hat + decode(q)``. What compression dropped stays in ``x - x_hat`` and goes out with the next
delta: error feedback on the server (DoubleSqueeze, Tang et al. 2019; EF21-P, Gruntkowska et al. 2023), so the
devices' copy never drifts from what the coordinator believes they hold. Devices train from ``x_hat``.

Sender and receiver run the same two steps on the same bytes: :func:`~fedmqtt.codecs.decode_frame` of the
delta frame, then :func:`apply_delta` (one float32 addition per entry, in the same order), so both hold the
same bits. :func:`arrays_digest` names those bits; the plan carries it (``Plan.model_digest``) and a device
that applied a delta checks it before training. The retained full model is ``x_hat`` itself, encoded
losslessly (float32), so a device that lacks the base (a late joiner) holds exactly the same model.

The first model of a run is the exception: no delta leads to it, so its frame itself defines ``x_hat`` (both
sides decode it, :meth:`DownlinkTracker.start`) and it can go out in the codec's own float16 or int8 values
(:func:`first_model_codec`): round 1 then costs a quarter of float32 with int8, not a whole float32 model to
every device. What that rounding dropped stays in ``x - x_hat`` and goes out with the next deltas.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmqtt.arrays import ModelArrays
from fedmqtt.codecs.errors import DeltaBaseMismatch, DeltaMismatch
from fedmqtt.codecs.frame import DEFAULT_MAX_BODY_BYTES, Buffer, decode_frame, encode_frame, peek_header
from fedmqtt.schema import CodecSpec, FrameHeader, FrameKind, ManifestEntry, ValueEncoding

__all__ = [
    "DownlinkTracker",
    "apply_delta",
    "apply_delta_frame",
    "apply_model_part_frame",
    "arrays_digest",
    "encode_model_part",
    "first_model_codec",
    "frozen_digest",
    "full_model_codec",
    "sends_deltas",
]

_LE_F32 = np.dtype("<f4")


def sends_deltas(codec: CodecSpec) -> bool:
    """Whether ``--downlink codec`` means delta frames: any lossy codec (float16, int8*, top-k). A lossless one
    (float32, at any zstd level) sends the whole model each round, as fedmqtt always did."""
    return codec.values is not ValueEncoding.FLOAT32 or codec.topk is not None


def full_model_codec(codec: CodecSpec) -> CodecSpec:
    """The codec of the retained full model: ``codec`` itself when it is lossless, else float32 at its zstd level
    (the full model must be ``x_hat`` bit for bit)."""
    if not sends_deltas(codec):
        return codec
    return CodecSpec(zstd_level=codec.zstd_level)


def first_model_codec(codec: CodecSpec, *, whole_model_tracked: bool = True) -> CodecSpec:
    """The codec of a run's first model (sent whole; no delta leads to it) on a downlink that sends deltas: the
    codec's float16 or int8 values (its per-channel scales, deterministic rounding, no top-k), else float32.

    Float32 when the values are 1-bit signs (a sign per weight is no model) and when ``whole_model_tracked`` is
    false: a ``--trainable`` job's deltas never carry its frozen tensors, so the first model is the only time
    they are sent and they must arrive exact."""
    lossy_values = codec.values in (ValueEncoding.FLOAT16, ValueEncoding.INT8)
    if not (whole_model_tracked and lossy_values):
        return full_model_codec(codec)
    return CodecSpec(values=codec.values, per_channel=codec.per_channel, zstd_level=codec.zstd_level)


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """Hex SHA-256 of a model's tensors in order: each one's name, shape and little-endian float32 bytes."""
    digest = hashlib.sha256()
    for name, value in arrays.items():
        array = np.ascontiguousarray(value, dtype=_LE_F32)
        encoded = name.encode("utf-8")
        digest.update(len(encoded).to_bytes(4, "little") + encoded)
        digest.update(len(array.shape).to_bytes(4, "little"))
        digest.update(np.asarray(array.shape, dtype="<i8").tobytes())
        digest.update(array.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def apply_delta(held: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> ModelArrays:
    """``held + delta`` in float32, tensor by tensor (the one addition both sides perform). The delta may carry
    only some of the held tensors, in the model's order (a ``--trainable`` job's delta leaves the frozen ones
    out: their delta is zero); the others are kept as held."""
    if [name for name in held if name in delta] != list(delta):
        raise DeltaMismatch("the delta's tensors are not those of the held model")
    out: ModelArrays = {}
    for name, base in held.items():
        if name not in delta:
            out[name] = np.asarray(base, dtype=np.float32)
            continue
        step = delta[name]
        if np.shape(base) != np.shape(step):
            raise DeltaMismatch(f"tensor {name!r}: the delta has shape {np.shape(step)}, the model {np.shape(base)}")
        # np.asarray again: arithmetic on 0-d arrays returns numpy scalars.
        out[name] = np.asarray(np.add(np.asarray(base, dtype=np.float32), np.asarray(step, dtype=np.float32)))
    return out


def _check_served(header: FrameHeader, what: str, relation: str, *, job: str, run_id: str | None, round: int) -> None:
    """A downlink frame must be for the job, run and round of the plan being served (:class:`DeltaMismatch`)."""
    if header.job != job or header.run_id != run_id:
        raise DeltaMismatch(
            f"{what} is for job {header.job!r} run {header.run_id}, the plan for job {job!r} run {run_id}"
        )
    if header.round != round:
        raise DeltaMismatch(f"{what} {relation} round {header.round}, the plan is for round {round}")


def apply_delta_frame(
    frame: Buffer,
    *,
    held: Mapping[str, np.ndarray],
    held_hash: str,
    job: str,
    round: int,
    run_id: str | None,
    digest: str,
    manifest: Sequence[ManifestEntry] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> ModelArrays:
    """The model a device obtains from a delta frame (device side).

    ``held``/``held_hash``: the model the device holds and the plan hash it was known by; ``job``, ``round``,
    ``run_id`` and ``digest``: from the plan being served. Raises :class:`~fedmqtt.codecs.errors.FrameError`
    (a :class:`~fedmqtt.codecs.errors.DeltaMismatch` when the frame is valid but not the one wanted, a
    :class:`~fedmqtt.codecs.errors.DeltaBaseMismatch` when the device lacks its base), after which the device
    fetches the full model.
    """
    header = peek_header(frame)  # everything but the body is checked before the body is decoded
    if header.kind is not FrameKind.MODEL_DELTA:
        raise DeltaMismatch(f"a {header.kind.value} frame on the delta topic; expected model_delta")
    _check_served(header, "the delta", "leads to the model of", job=job, run_id=run_id, round=round)
    if header.base_model_hash != held_hash:
        raise DeltaBaseMismatch(
            f"the delta applies to model {str(header.base_model_hash)[:12]}, this device holds {held_hash[:12]}"
        )
    decoded = decode_frame(frame, expected_manifest=manifest, max_body_bytes=max_body_bytes)
    result = apply_delta(held, decoded.arrays)
    got = arrays_digest(result)
    if got != digest:
        raise DeltaMismatch(
            f"held model + delta has digest {got[:12]}, the plan names {digest[:12]} (a corrupt or forged delta)"
        )
    return result


def frozen_digest(arrays: Mapping[str, np.ndarray], trainable: Sequence[str]) -> str:
    """:func:`arrays_digest` of the tensors not in ``trainable``: the frozen part every model of a ``--trainable``
    job shares (what a device must hold to rebuild a model from a :data:`~FrameKind.MODEL_PART` frame)."""
    skip = set(trainable)
    return arrays_digest({name: value for name, value in arrays.items() if name not in skip})


def encode_model_part(
    model: Mapping[str, np.ndarray],
    trainable: Sequence[str],
    *,
    codec: CodecSpec,
    job: str,
    round: int,
    sender: str,
    model_name: str | None = None,
    run_id: str | None = None,
) -> bytes:
    """A ``--trainable`` job's downlink with a lossless codec: the trainable tensors of ``model`` whole, keyed by
    the digest of its frozen tensors (``base_model_hash``). A device holding *any* model with that frozen part (the
    base, or the model of any earlier round of the job) rebuilds ``model`` bit for bit, however many rounds it
    missed; a device with none fetches the retained full model once."""
    if sends_deltas(codec):
        raise ValueError(f"a model part is sent whole and lossless; {codec} is lossy")
    keep = set(trainable)
    return encode_frame(
        {name: value for name, value in model.items() if name in keep},
        kind=FrameKind.MODEL_PART,
        job=job,
        round=round,
        sender=sender,
        codec=codec,
        base_model_hash=frozen_digest(model, trainable),
        model_name=model_name,
        run_id=run_id,
    )


def apply_model_part_frame(
    frame: Buffer,
    *,
    held: Mapping[str, np.ndarray],
    job: str,
    round: int,
    run_id: str | None,
    digest: str,
    manifest: Sequence[ManifestEntry] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> ModelArrays:
    """The model a device obtains from a model-part frame (device side): ``held`` with the frame's tensors put in.
    Raises :class:`~fedmqtt.codecs.errors.DeltaBaseMismatch` when the held model's frozen tensors are not the
    frame's, :class:`~fedmqtt.codecs.errors.DeltaMismatch` (or another FrameError) when the frame is not the one the
    plan wants or the result is not the model the plan names (``digest``)."""
    header = peek_header(frame)
    if header.kind is not FrameKind.MODEL_PART:
        raise DeltaMismatch(f"a {header.kind.value} frame where a model_part frame was expected")
    _check_served(header, "the model part", "is of", job=job, run_id=run_id, round=round)
    names = [t.name for t in header.tensors]
    if not names or [name for name in held if name in set(names)] != names:
        raise DeltaMismatch("the model part's tensors are not some of the held model's, in its order")
    if header.base_model_hash != frozen_digest(held, names):
        raise DeltaBaseMismatch("the held model's frozen tensors are not those the model part completes")
    decoded = decode_frame(frame, expected_manifest=manifest, max_body_bytes=max_body_bytes)
    result: ModelArrays = {
        name: decoded.arrays[name] if name in decoded.arrays else np.asarray(value, dtype=np.float32)
        for name, value in held.items()
    }
    got = arrays_digest(result)
    if got != digest:
        raise DeltaMismatch(f"held model + part has digest {got[:12]}, the plan names {digest[:12]}")
    return result


def _first_model_frame(
    codec: CodecSpec, model: Mapping[str, np.ndarray], *, whole_model_tracked: bool, **frame_fields: Any
) -> tuple[bytes, ModelArrays]:
    """The first model's global-model frame and what a device decodes from it."""
    frame = encode_frame(
        model,
        kind=FrameKind.GLOBAL_MODEL,
        codec=first_model_codec(codec, whole_model_tracked=whole_model_tracked),
        **frame_fields,
    )
    return frame, _decode_sent(frame, model)


def _decode_sent(frame: bytes, model: Mapping[str, np.ndarray]) -> ModelArrays:
    """Decode a frame the coordinator itself just encoded for ``model``, as a device will: the body bound is the
    model's own size, which may exceed the default bound for untrusted frames."""
    numel = sum(int(np.size(v)) for v in model.values())
    return decode_frame(frame, max_body_bytes=max(DEFAULT_MAX_BODY_BYTES, 10 * numel)).arrays


class DownlinkTracker:
    """The coordinator's side: ``x_hat`` (the model devices hold) and the delta frames that move it towards ``x``.

    Starts with ``x_hat = held`` (the first model, sent whole). :meth:`delta_frame` encodes ``x - x_hat`` with
    ``codec``, advances ``x_hat`` by exactly what a device decodes, and returns the frame. ``tensors`` (a
    ``--trainable`` job's set) limits the deltas to those tensors: the others never change, so their delta is zero
    and stays out of the frame.
    """

    def __init__(self, codec: CodecSpec, held: Mapping[str, np.ndarray], tensors: Sequence[str] | None = None) -> None:
        if codec.error_feedback:
            raise ValueError("the downlink's error feedback is the tracker itself: pass the codec without 'ef'")
        self.codec = codec
        self.held: ModelArrays = {k: np.array(v, dtype=np.float32, copy=True) for k, v in held.items()}
        if tensors is not None and (not tensors or not set(tensors) <= set(self.held)):
            raise ValueError("the delta's tensors must be some of the tracked model's")
        self.tensors: tuple[str, ...] = tuple(k for k in self.held if tensors is None or k in set(tensors))
        self.whole = tensors is None

    @classmethod
    def start(
        cls,
        codec: CodecSpec,
        model: Mapping[str, np.ndarray],
        tensors: Sequence[str] | None = None,
        **frame_fields: Any,
    ) -> tuple[DownlinkTracker, bytes]:
        """A run's first model: its global-model frame in :func:`first_model_codec` and the tracker whose
        ``x_hat`` is what a device decodes from that very frame (``model`` itself when the codec is lossless).
        ``frame_fields``: the frame's ``job``, ``round``, ``sender``, ``model_name`` and ``run_id``."""
        frame, held = _first_model_frame(codec, model, whole_model_tracked=tensors is None, **frame_fields)
        return cls(codec, held, tensors), frame

    def first_frame_again(self, model: Mapping[str, np.ndarray], **frame_fields: Any) -> bytes | None:
        """After a restart at a run's first model ``model``: the frame :meth:`start` sent (its encoding is
        deterministic), so the model hash the plan names and the next delta's base stay those devices hold. None
        when that frame would not decode to ``x_hat`` (a tracker begun from a model sent losslessly)."""
        frame, held = _first_model_frame(self.codec, model, whole_model_tracked=self.whole, **frame_fields)
        return frame if arrays_digest(held) == arrays_digest(self.held) else None

    def residual(self, target: Mapping[str, np.ndarray]) -> ModelArrays:
        """``target - x_hat`` over the delta's tensors: what the devices still lack."""
        return {k: np.asarray(np.subtract(np.asarray(target[k], dtype=np.float32), self.held[k])) for k in self.tensors}

    def delta_frame(
        self,
        target: Mapping[str, np.ndarray],
        *,
        job: str,
        round: int,
        sender: str,
        base_model_hash: str,
        model_name: str | None = None,
        run_id: str | None = None,
        rng: np.random.Generator | None = None,
    ) -> bytes:
        """Encode ``target - x_hat`` as a delta frame on ``base_model_hash`` (the plan hash of the current
        ``x_hat``) leading to the model of ``round``; then ``x_hat <- x_hat + decode(frame)``."""
        if list(target) != list(self.held):
            raise ValueError("the target model's tensors are not those of the tracked model")
        frame = encode_frame(
            self.residual(target),
            kind=FrameKind.MODEL_DELTA,
            job=job,
            round=round,
            sender=sender,
            codec=self.codec,
            base_model_hash=base_model_hash,
            model_name=model_name,
            run_id=run_id,
            rng=rng,
        )
        # Decode what was sent, as a device does: x_hat then holds the very bits the devices will.
        self.held = apply_delta(self.held, _decode_sent(frame, self.held))
        return frame

    def state_dict(self) -> dict[str, object]:
        return {"held": {k: v.copy() for k, v in self.held.items()}}

    @classmethod
    def from_state_dict(
        cls, codec: CodecSpec, state: Mapping[str, object], tensors: Sequence[str] | None = None
    ) -> DownlinkTracker:
        held = state.get("held")
        if not isinstance(held, Mapping):
            raise ValueError("a downlink state needs 'held': the model the devices hold")
        return cls(codec, held, tensors)
