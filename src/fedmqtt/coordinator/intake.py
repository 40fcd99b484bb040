"""The frame-level checks of one device update (pure): what the coordinator and every aggregator worker run.

One update goes through two steps, so that a caller can put its own screening between them:

1. :func:`check_header` — the cheap checks: the payload's size and a readable header (nothing is decoded).
   The coordinator runs its round machine's screen next (round, attempt, selection, sample count, base model).
2. :func:`check_frame` — the rest: no frozen tensor (``--trainable``), a body that decodes against the update
   manifest within the body bound, finite values and ``--max-update-norm``, and under DP the clip bound.

Each returns what passed (a header, a decoded frame) or a :class:`Refusal` (the reason the events topic reports
and a detail a device owner can act on). :func:`update_weight` is the one FedAvg weight rule of an accepted update.
No network, no state: the same bytes and rules always give the same verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedmqtt import arrays as A
from fedmqtt.codecs import DecodedFrame, decode_frame, peek_header
from fedmqtt.codecs import errors as codec_errors
from fedmqtt.coordinator import numeric
from fedmqtt.privacy.mechanism import DP_UPDATE_WEIGHT
from fedmqtt.privacy.policy import check_update_norm
from fedmqtt.schema import CodecSpec, DPPlan, FrameHeader, ManifestEntry, RefusalReason

__all__ = [
    "IntakeRules",
    "Refusal",
    "body_limit",
    "check_frame",
    "check_header",
    "frame_refusal_reason",
    "update_weight",
]

# Map decode failures to the refusal reasons the events topic reports (any other FrameError: malformed).
_FRAME_ERROR_REASONS: dict[type[Exception], RefusalReason] = {
    codec_errors.ManifestMismatch: RefusalReason.MANIFEST_MISMATCH,
    codec_errors.NonFiniteValues: RefusalReason.NON_FINITE,
}


@dataclass(frozen=True)
class Refusal:
    """Why an update is refused: the reported reason and a detail for the device's owner."""

    reason: RefusalReason
    detail: str


@dataclass(frozen=True)
class IntakeRules:
    """What an update is checked against: the job's limits and the tensors an update must carry.

    ``update_manifest``: the tensors an update carries, in order (the ``--trainable`` ones only with
    ``trained``); ``model_numel``: the whole model's value count (bounds the decoded body);
    ``max_update_bytes``: ``--max-update-mb`` in bytes; ``max_update_norm``: ``--max-update-norm``;
    ``codec``: the uplink codec devices were told to use (the DP check's quantisation margin).
    """

    max_update_bytes: int
    update_manifest: tuple[ManifestEntry, ...]
    model_numel: int
    codec: CodecSpec
    trained: tuple[str, ...] | None = None
    max_update_norm: float | None = None

    @property
    def max_body_bytes(self) -> int:
        return body_limit(self.max_update_bytes, self.model_numel)


def body_limit(max_update_bytes: int, numel: int) -> int:
    """The bound on an update's decompressed body and decoded tensors. The decoded tensors alone take 4 bytes per
    entry, whatever the payload's (compressed) size, and the largest body any codec writes takes under 10 (top-k
    of float32 values or int8 values with per-channel scales, plus varint indices). A bound of 4 x
    --max-update-mb alone refused every update of a model larger than that, however small its frame."""
    return max(4 * max_update_bytes, 10 * numel)


def frame_refusal_reason(exc: Exception) -> RefusalReason:
    """The refusal reason of a frame that failed to decode."""
    for cls, reason in _FRAME_ERROR_REASONS.items():
        if isinstance(exc, cls):
            return reason
    return RefusalReason.MALFORMED


def update_weight(header: FrameHeader, *, dp: bool) -> float:
    """An accepted update's FedAvg weight: under DP every update weighs the same (``DP_UPDATE_WEIGHT``);
    otherwise its sample count, bounded by the plan (screened), so the float conversion is exact."""
    return DP_UPDATE_WEIGHT if dp else float(header.num_samples)


def check_header(payload: bytes, rules: IntakeRules) -> FrameHeader | Refusal:
    """The cheap checks: the frame's size and a valid header. Nothing of the body is read."""
    if len(payload) > rules.max_update_bytes:
        return Refusal(RefusalReason.MALFORMED, f"frame of {len(payload)} bytes exceeds the limit")
    try:
        return peek_header(payload)
    except codec_errors.FrameError as exc:
        return Refusal(RefusalReason.MALFORMED, str(exc))


def frozen_in(header: FrameHeader, trained: Sequence[str] | None) -> list[str]:
    """The frozen tensors (not in --trainable) an update frame carries."""
    if trained is None:
        return []
    keep = set(trained)
    return [t.name for t in header.tensors if t.name not in keep]


def check_frame(
    payload: bytes,
    header: FrameHeader,
    rules: IntakeRules,
    *,
    dp: DPPlan | None,
    values_check: Callable[[A.ModelArrays], Refusal | None] | None = None,
) -> DecodedFrame | Refusal:
    """The checks after the header: frozen tensors, decoding against the update manifest within the body bound,
    finite values and the norm limit, then (``dp``: the plan's DP section) the clip bound. ``values_check`` runs
    on the decoded tensors after the value screen passed, before the clip check (the coordinator's "would this
    update alone overflow the aggregate" after a failed attempt)."""
    frozen = frozen_in(header, rules.trained)
    if frozen:
        assert rules.trained is not None
        trained = rules.trained
        shown = ", ".join(frozen[:5]) + (f" (and {len(frozen) - 5} more)" if len(frozen) > 5 else "")
        return Refusal(
            RefusalReason.FROZEN_TENSOR,
            f"the job trains only {', '.join(trained[:8])}{' ...' if len(trained) > 8 else ''} "
            f"(--trainable); the update carries frozen tensor(s) {shown}: send only the trainable tensors",
        )
    try:
        frame = decode_frame(payload, max_body_bytes=rules.max_body_bytes, expected_manifest=rules.update_manifest)
    except codec_errors.FrameError as exc:
        return Refusal(frame_refusal_reason(exc), str(exc))
    numbers = numeric.screen_values(frame.arrays, max_norm=rules.max_update_norm)
    if numbers is not None:
        return Refusal(*numbers)
    if values_check is not None:
        extra = values_check(frame.arrays)
        if extra is not None:
            return extra
    if dp is not None:
        refusal = check_update_norm(dp, frame.arrays, rules.codec)
        if refusal is not None:
            return Refusal(RefusalReason.NORM_EXCEEDS_CLIP, refusal)
    return frame
