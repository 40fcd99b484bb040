"""The wire schema: every header field and JSON message that crosses MQTT is defined here, once.

Binary frames (global models, device updates, partial aggregates) carry a :class:`FrameHeader`; the
byte layout around it is ``fedmqtt.codecs.frame``'s business. Every JSON message (plan, status, events,
round summaries, device status, privacy ledger) is a pydantic model with ``schema_version`` so that
``mosquitto_sub -v -t 'fedmqtt/JOB/#'`` is a readable, versioned view of a run.

All models are frozen and forbid extra fields: a message that does not match is refused, not guessed at.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedmqtt.errors import FedmqttError

SCHEMA_VERSION: Literal[1] = 1

# Identifier rule shared with fedmqtt.topics (kept as a pattern so pydantic can enforce it).
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Identifier = Annotated[str, Field(pattern=ID_PATTERN)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
# A run of a job (a fresh start, not a --resume) and a process instance: random hex tokens. Retained messages of
# another run are ignored by devices and watch; two processes with one identity are told apart by instance.
TOKEN_PATTERN = r"^[0-9a-f]{16}$"
Token = Annotated[str, Field(pattern=TOKEN_PATTERN)]
# The largest sample count any update may claim (the weight of FedAvg); a plan may state a lower bound.
MAX_SAMPLES_LIMIT = 1 << 31


def new_token() -> str:
    """A fresh run id or instance id."""
    import secrets

    return secrets.token_hex(8)


class MessageError(FedmqttError):
    """A JSON message from the network does not match its schema."""

    def __init__(self, model: str, detail: str) -> None:
        super().__init__(f"invalid {model} message: {detail}")
        self.model = model
        self.detail = detail


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---------------------------------------------------------------------------------------------------
# Codec specification (announced in the plan, recorded in every frame header)
# ---------------------------------------------------------------------------------------------------


class ValueEncoding(StrEnum):
    """How the (kept) values of a tensor are stored in the body."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT8 = "int8"
    # One bit per kept value (its sign) and one float32 scale per tensor, the mean magnitude of the kept values
    # (scaled sign, as EF-signSGD); sparse indices are Rice-coded (fedmqtt.codecs.encodings).
    SIGN = "sign"


_CODEC_TOKEN = re.compile(
    r"^(float32|float16|int8|int8c|int8s|int8cs|sign|g?topk:[0-9.eE-]+|warmup:[0-9]{1,3}|zstd:-?[0-9]+|ef)$"
)


class CodecSpec(_Strict):
    """An uplink/downlink codec chain: optional top-k, then a value encoding, then zstd.

    String form (CLI flags, logs, frame headers): tokens joined by ``+``, e.g. ``int8``,
    ``topk:0.01+int8c+ef``, ``float16+zstd:3``. ``int8c`` = per-output-channel scales, ``int8s`` =
    stochastic rounding, ``int8cs`` = both; ``sign`` = 1-bit signs with one scale per tensor (use it with
    ``ef``); ``ef`` = error feedback on the sender. ``topk:F`` keeps the fraction F of each tensor's entries,
    ``gtopk:F`` the fraction F of all the model's entries, the largest magnitudes wherever they are.
    ``warmup:N`` (with top-k; sparsity warm-up as in DGC): round r <= N keeps 2**(N + 1 - r) times the fraction.
    """

    values: ValueEncoding = ValueEncoding.FLOAT32
    per_channel: bool = False
    stochastic: bool = False
    topk: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    # gtopk: the top-k fraction is of the whole model (one magnitude threshold), not of each tensor.
    topk_global: bool = False
    # Sparsity warm-up: the first rounds keep more (topk_at).
    warmup: Annotated[int, Field(ge=0, le=100)] = 0
    error_feedback: bool = False
    zstd_level: Annotated[int, Field(ge=-7, le=22)] = 1

    @model_validator(mode="after")
    def _int8_options(self) -> CodecSpec:
        if (self.per_channel or self.stochastic) and self.values is not ValueEncoding.INT8:
            raise ValueError("per_channel and stochastic apply to int8 values only")
        if self.topk_global and self.topk is None:
            raise ValueError("topk_global needs a topk fraction")
        if self.warmup and self.topk is None:
            raise ValueError("warmup needs a topk fraction")
        return self

    def topk_at(self, round_number: int) -> float | None:
        """The top-k fraction an update of round ``round_number`` (1 = the first) keeps."""
        if self.topk is None or round_number > self.warmup:
            return self.topk
        return min(1.0, self.topk * 2.0 ** (self.warmup + 1 - max(1, round_number)))

    @classmethod
    def parse(cls, text: str) -> CodecSpec:
        """Parse the ``+``-joined string form; raise :class:`MessageError` naming the bad token."""
        fields: dict[str, object] = {}
        for token in (t.strip() for t in text.split("+")):
            if not _CODEC_TOKEN.match(token):
                raise MessageError(
                    "codec",
                    f"unknown token {token!r} in {text!r}; use float32|float16|int8|int8c|int8s|int8cs|sign, "
                    "topk:FRACTION, gtopk:FRACTION, warmup:ROUNDS, zstd:LEVEL, ef",
                )
            if token.startswith(("topk:", "gtopk:")):
                fields["topk"] = float(token.split(":", 1)[1])
                fields["topk_global"] = token.startswith("g")
            elif token.startswith("zstd:"):
                fields["zstd_level"] = int(token[5:])
            elif token.startswith("warmup:"):
                fields["warmup"] = int(token[7:])
            elif token == "ef":
                fields["error_feedback"] = True
            elif token.startswith("int8"):
                fields["values"] = ValueEncoding.INT8
                fields["per_channel"] = "c" in token[4:]
                fields["stochastic"] = "s" in token[4:]
            else:
                fields["values"] = ValueEncoding(token)
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise MessageError("codec", f"{text!r}: {exc.errors()[0]['msg']}") from None

    def __str__(self) -> str:
        parts: list[str] = []
        if self.topk is not None:
            parts.append(f"{'gtopk' if self.topk_global else 'topk'}:{self.topk:g}")
        if self.warmup:
            parts.append(f"warmup:{self.warmup}")
        if self.values is ValueEncoding.INT8:
            suffix = ("c" if self.per_channel else "") + ("s" if self.stochastic else "")
            parts.append("int8" + suffix)
        else:
            parts.append(self.values.value)
        parts.append(f"zstd:{self.zstd_level}")
        if self.error_feedback:
            parts.append("ef")
        return "+".join(parts)


# ---------------------------------------------------------------------------------------------------
# Binary frame header
# ---------------------------------------------------------------------------------------------------


class FrameKind(StrEnum):
    GLOBAL_MODEL = "global_model"
    UPDATE = "update"
    PARTIAL_AGGREGATE = "partial_aggregate"
    # The compressed difference between two global models (``PREFIX/JOB/delta``; fedmqtt.codecs.downlink).
    MODEL_DELTA = "model_delta"
    # A --trainable job's global model without its frozen tensors (``PREFIX/JOB/delta``, lossless downlink): the
    # trainable tensors whole; base_model_hash is the digest of the frozen ones (fedmqtt.codecs.downlink).
    MODEL_PART = "model_part"
    # The model a job released when it ended (``PREFIX/JOB/release``; fedmqtt.release): header.release says more.
    RELEASE = "release"


class DownlinkPath(StrEnum):
    """How a device obtained the global model of the round it answers (said in its update's header)."""

    HELD = "held"  # its process already held the model (trained on it, or another virtual device fetched it)
    DELTA = "delta"  # the delta frame applied to the model it held
    FULL = "full"  # the retained full model
    DELTA_THEN_FULL = "delta+full"  # the delta did not apply (logged), then the full model


class TensorEncoding(_Strict):
    """How one tensor is laid out in the (uncompressed) body."""

    values: ValueEncoding
    # int8: scale layout. None = one scale for the tensor; 0 = one scale per output channel (axis 0).
    scale_axis: Literal[0] | None = None
    stochastic: bool = False
    # top-k: number of kept entries; their flat indices are delta-coded (LEB128 varint gaps) before the
    # scales and values. None = dense.
    nnz: NonNegInt | None = None


class ManifestEntry(_Strict):
    """Name, shape and dtype of one model tensor: what a model *is*, independent of encoding."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    # At most 32 dimensions (numpy allows 64): bounds the work of validating an untrusted header.
    shape: Annotated[tuple[NonNegInt, ...], Field(max_length=32)]
    dtype: Literal["float32"] = "float32"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class TensorSpec(ManifestEntry):
    """A manifest entry plus how it is encoded and where its bytes lie in the body."""

    encoding: TensorEncoding
    offset: NonNegInt
    nbytes: NonNegInt


class DPAnnouncement(_Strict):
    """The differential-privacy step that was applied to the tensors of this frame."""

    mode: Literal["device", "local", "central"]
    clip: Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
    noise_std: NonNegFloat
    # Adaptive clipping (central mode): whether the update's norm before clipping was <= clip.
    unclipped: bool | None = None


class ReleaseInfo(_Strict):
    """What a release frame (``FrameKind.RELEASE``) says of the model it carries (fedmqtt.release)."""

    # The canonical digest of the model's float32 arrays (fedmqtt.codecs.downlink.arrays_digest): a device
    # recomputes it from the decoded tensors and keeps the model only when it matches.
    digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    num_classes: Annotated[int, Field(ge=2, le=100_000)] = 10
    # The accuracy and loss the model reached on the coordinator's --eval-data (None: not evaluated).
    accuracy: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    loss: NonNegFloat | None = None
    # The coordinator's clock when it released: a device keeps the newest release and never goes back to an
    # older one (same run: a later round; another run or a release by hand: a later time).
    released_at: FiniteFloat
    # The sha256 of the global model frame that was evaluated (the round summary's evaluated_model), if any.
    evaluated_model: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    # How the release was made: "job" (the coordinator, when the job ended) or "file" (``fedmqtt release``).
    source: Literal["job", "file"] = "job"


class PartialEntry(_Strict):
    """One device update summed into a partial aggregate."""

    device: Identifier
    num_samples: NonNegInt
    # The update's weight as the aggregator computed it (num_samples, or the DP rounds' uniform weight).
    weight: NonNegFloat


class PartialInfo(_Strict):
    """What a partial-aggregate frame (``FrameKind.PARTIAL_AGGREGATE``, ``PREFIX/JOB/partials/WORKER``) holds:
    exactly the updates the coordinator's collect request listed for that aggregator, so the coordinator's
    quorum, refusals and round summary stay exact (fedmqtt.aggregator)."""

    attempt: NonNegInt
    run_id: Token | None = None
    # At most the largest fleet one site aggregator serves in one round.
    devices: Annotated[tuple[PartialEntry, ...], Field(max_length=100_000)]
    # DP (central mode, adaptive clipping): how many of the summed updates were not clipped.
    unclipped: NonNegInt = 0

    @field_validator("devices")
    @classmethod
    def _unique_devices(cls, devices: tuple[PartialEntry, ...]) -> tuple[PartialEntry, ...]:
        names = [d.device for d in devices]
        if len(set(names)) != len(names):
            raise ValueError("a partial aggregate names each device once")
        return devices


class FrameHeader(_Strict):
    """The validated header of a binary frame."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: FrameKind
    job: Identifier
    round: NonNegInt
    sender: Identifier
    num_samples: NonNegInt = 0
    # For partial aggregates: how many device updates were summed into this frame, and their weight.
    num_updates: NonNegInt = 1
    weight: NonNegFloat = 0.0
    codec: Annotated[str, Field(max_length=200)]
    # The full form: every tensor's name, shape, encoding and place in the body.
    tensors: Annotated[tuple[TensorSpec, ...], Field(max_length=4096)] = ()
    # The compact form (device updates only; then ``tensors`` is empty): the update's tensors are exactly the
    # update manifest the receiver holds (the model's, or the --trainable ones), in its order, so per tensor only
    # what the manifest and the codec do not say: ``[nbytes]``, or ``[nnz, nbytes]`` with a top-k codec (offsets
    # are cumulative). fedmqtt.codecs.frame builds it and expands it against the manifest; the body checksum
    # is then keyed with the manifest, so an update made for other tensors fails it.
    layout: (
        Annotated[
            tuple[Annotated[tuple[NonNegInt, ...], Field(min_length=1, max_length=2)], ...], Field(max_length=4096)
        ]
        | None
    ) = None
    body_size: NonNegInt
    body_blake2b: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    # The content hash of the global model an update was computed against (hex sha256 of that frame).
    base_model_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    model_name: Annotated[str, Field(max_length=64)] | None = None
    dp: DPAnnouncement | None = None
    # The run of the job this frame belongs to (global models; updates name their base model's hash instead).
    run_id: Token | None = None
    # Updates: how the device obtained the round's global model (the coordinator counts bytes down per path).
    downlink: DownlinkPath | None = None
    # Release frames: the digest, accuracy and time of the released model.
    release: ReleaseInfo | None = None
    # Partial-aggregate frames: the attempt, run and the devices whose updates were summed.
    partial: PartialInfo | None = None

    @field_validator("tensors")
    @classmethod
    def _unique_names(cls, tensors: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise ValueError("tensor names must be unique")
        return tensors

    @model_validator(mode="after")
    def _one_form(self) -> FrameHeader:
        if self.layout is not None:
            if self.tensors:
                raise ValueError("a header lists its tensors either in full (tensors) or compact (layout), not both")
            if self.kind is not FrameKind.UPDATE:
                raise ValueError(f"only update frames may have a compact layout, not {self.kind.value} frames")
        return self

    def manifest(self) -> tuple[ManifestEntry, ...]:
        return tuple(ManifestEntry(name=t.name, shape=t.shape, dtype=t.dtype) for t in self.tensors)


# ---------------------------------------------------------------------------------------------------
# JSON messages
# ---------------------------------------------------------------------------------------------------


class DPMode(StrEnum):
    OFF = "off"
    DEVICE = "device"
    LOCAL = "local"
    CENTRAL = "central"


class DPPlan(_Strict):
    """The DP step a selected device must apply this round (announced in the plan)."""

    mode: DPMode
    clip: Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
    noise_multiplier: NonNegFloat
    # Standard deviation each device adds to its clipped update (0 in central mode).
    device_noise_std: NonNegFloat
    # m: the number of updates the round needs (the fixed denominator of the DP average).
    expected_updates: PositiveInt
    sample_rate: Annotated[float, Field(gt=0.0, le=1.0)]
    delta: Annotated[float, Field(gt=0.0, lt=1.0)]


class Plan(_Strict):
    """``PREFIX/JOB/plan``: the open round."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job: Identifier
    round: NonNegInt
    attempt: NonNegInt = 0
    selected: tuple[Identifier, ...]
    deadline: FiniteFloat
    issued_at: FiniteFloat
    local_epochs: PositiveInt
    batch_size: PositiveInt
    learning_rate: Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
    prox_mu: NonNegFloat | None = None
    uplink: CodecSpec
    model_name: Annotated[str, Field(min_length=1, max_length=64)]
    model_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    # With a compressed downlink: the canonical digest of the model's float32 arrays
    # (fedmqtt.codecs.downlink.arrays_digest), which a device that applied a delta must reproduce bit for bit.
    model_digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    dp: DPPlan | None = None
    # Freeze every tensor not named here (transfer learning: train only a head). None = train all.
    trainable: tuple[str, ...] | None = None
    run_id: Token | None = None
    # The largest sample count an update may report (its FedAvg weight); larger counts are refused.
    max_samples: Annotated[int, Field(gt=0, le=MAX_SAMPLES_LIMIT)] = MAX_SAMPLES_LIMIT


DeviceState = Literal["online", "training", "offline"]


class DeviceStatus(_Strict):
    """``PREFIX/JOB/devices/DEVICE/status`` (retained; ``offline`` is the last will)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    device: Identifier
    state: DeviceState
    ts: FiniteFloat | None = None
    round: NonNegInt | None = None
    num_samples: NonNegInt | None = None
    detail: Annotated[str, Field(max_length=500)] | None = None
    # The device process that published this status: two different instances alternating on one device id
    # means two processes share that id (they keep kicking each other off the broker).
    instance: Token | None = None
    run_id: Token | None = None


class Phase(StrEnum):
    WAITING = "waiting"  # for enough devices online
    TRAINING = "training"  # a round is open
    AGGREGATING = "aggregating"
    FINISHED = "finished"
    STOPPED = "stopped"  # a stop condition (e.g. privacy budget) ended the job early


class Metrics(_Strict):
    accuracy: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    loss: NonNegFloat | None = None


class PrivacySpent(_Strict):
    epsilon: NonNegFloat
    delta: Annotated[float, Field(gt=0.0, lt=1.0)]


class Status(_Strict):
    """``PREFIX/JOB/status``: the coordinator's live snapshot (retained)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job: Identifier
    round: NonNegInt
    rounds_total: NonNegInt
    attempt: NonNegInt = 0
    phase: Phase
    received: NonNegInt = 0
    needed: NonNegInt = 0
    deadline: FiniteFloat | None = None
    devices_online: NonNegInt = 0
    selected: tuple[Identifier, ...] = ()
    last_metrics: Metrics | None = None
    privacy: PrivacySpent | None = None
    refused_total: NonNegInt = 0
    updated_at: FiniteFloat
    run_id: Token | None = None
    # The coordinator process publishing (see CoordinatorPresence).
    instance: Token | None = None
    # Scale-out aggregation (--aggregators N): the workers online and the number rounds wait for (None without).
    aggregators_online: NonNegInt | None = None
    aggregators_needed: NonNegInt | None = None


CoordinatorState = Literal["online", "offline", "stopped"]

#: The phases in which a job has ended (a job status's and the coordinator presence's ``phase``).
END_PHASES: tuple[Phase, ...] = (Phase.FINISHED, Phase.STOPPED)


class CoordinatorPresence(_Strict):
    """``PREFIX/JOB/coordinator`` (retained; ``offline`` is the last will): which coordinator runs the job.

    A coordinator that finds another instance online with a fresh heartbeat refuses to start; one started
    with ``--take-over`` publishes itself here and the older instance stops when it reads it.

    It changes only on job lifecycle transitions (start, take-over, reconnect, end; the will on a crash), never
    on a heartbeat, so it is the topic devices follow: ``phase`` is the job's end (finished/stopped) in the
    ``stopped`` presence the coordinator publishes when run ``run_id`` ends, and None otherwise (running, or the
    will of a coordinator that died: the job is not over).
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    job: Identifier
    instance: Token
    run_id: Token | None = None
    state: CoordinatorState
    started_at: FiniteFloat
    ts: FiniteFloat | None = None
    take_over: bool = False
    phase: Phase | None = None

    @model_validator(mode="after")
    def _phase_only_when_stopped(self) -> CoordinatorPresence:
        if self.phase is not None and self.phase not in END_PHASES:
            raise ValueError(f"phase {self.phase.value!r} is not an end phase (finished, stopped)")
        if self.phase is not None and self.state != "stopped":
            raise ValueError(f"phase {self.phase.value!r} needs state 'stopped' (the job ended), not {self.state!r}")
        return self


class RefusalReason(StrEnum):
    """Why the coordinator refused an update. Every refusal is counted and reported."""

    MALFORMED = "malformed"
    WRONG_JOB = "wrong_job"
    STALE_ROUND = "stale_round"
    FUTURE_ROUND = "future_round"
    NO_OPEN_ROUND = "no_open_round"
    DUPLICATE = "duplicate"
    NOT_SELECTED = "not_selected"
    SENDER_MISMATCH = "sender_mismatch"
    MANIFEST_MISMATCH = "manifest_mismatch"
    # The job trains only some tensors (--trainable) and the update carries a frozen one.
    FROZEN_TENSOR = "frozen_tensor"
    NON_FINITE = "non_finite"
    NORM_EXCEEDS_CLIP = "norm_exceeds_clip"
    WRONG_KIND = "wrong_kind"
    WRONG_BASE_MODEL = "wrong_base_model"
    BAD_SAMPLE_COUNT = "bad_sample_count"
    NORM_TOO_LARGE = "norm_too_large"
    INTERNAL_ERROR = "internal_error"


class EventType(StrEnum):
    UPDATE_ACCEPTED = "update_accepted"
    UPDATE_REFUSED = "update_refused"
    ROUND_OPENED = "round_opened"
    ROUND_CLOSED = "round_closed"
    ROUND_FAILED = "round_failed"
    MODEL_PUBLISHED = "model_published"
    # Presence, batched (fedmqtt.coordinator.presence.PresenceBatch): devices that came online / went offline since
    # the last such event, at most one of each per second; ``count`` says how many, ``devices`` names the first ones.
    DEVICES_ONLINE = "devices_online"
    DEVICES_OFFLINE = "devices_offline"
    # One event per device: no longer published (a fleet of n devices made n events); kept so that a watcher still
    # reads the events of an older coordinator.
    DEVICE_ONLINE = "device_online"
    DEVICE_OFFLINE = "device_offline"
    # Device statuses refused (unreadable, or naming another device than their topic), batched the same way.
    DEVICE_STATUSES_REFUSED = "device_statuses_refused"
    JOB_FINISHED = "job_finished"
    JOB_STOPPED = "job_stopped"
    DEVICE_DUPLICATE = "device_duplicate"
    DEVICE_DECLINED = "device_declined"
    COORDINATOR_CONFLICT = "coordinator_conflict"
    RUN_STARTED = "run_started"
    ROUND_EVALUATED = "round_evaluated"  # a closed round's model was evaluated (or its evaluation failed)
    # Scale-out aggregation (--aggregators N): rounds wait for the workers; a worker came online / went offline (with
    # the acknowledged updates it held); a message of a worker (progress, partial aggregate, status) was refused.
    AGGREGATORS_WAITING = "aggregators_waiting"
    AGGREGATOR_ONLINE = "aggregator_online"
    AGGREGATOR_OFFLINE = "aggregator_offline"
    AGGREGATOR_REFUSED = "aggregator_refused"


EVENT_DEVICES_MAX = 50  # device ids one batched presence event names


class AggregatorPresence(_Strict):
    """``PREFIX/JOB/aggregators/WORKER/status`` (retained; ``offline`` is the last will): one aggregator worker
    (``fedmqtt aggregator``) of a job run with ``--aggregators N``."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job: Identifier
    worker: Identifier
    instance: Token
    state: Literal["online", "offline"]
    # The MQTT 5 shared-subscription group it reads updates through (None: a site aggregator reading them all).
    group: Identifier | None = None
    site: Identifier | None = None
    since: FiniteFloat


PROGRESS_ENTRIES_MAX = 256  # updates one progress message reports


class ProgressEntry(_Strict):
    """One update an aggregator screened: accepted (held on its disk, header for the coordinator to screen as if
    it had the frame) or refused by the aggregator's own checks (decoding, values, norm)."""

    device: Identifier
    accepted: bool
    header: FrameHeader | None = None
    reason: RefusalReason | None = None
    detail: Annotated[str, Field(max_length=2000)] = ""
    # The update frame's size on the wire (the round summary's bytes_up).
    bytes: NonNegInt = 0

    @model_validator(mode="after")
    def _header_xor_reason(self) -> ProgressEntry:
        if self.accepted and (self.header is None or self.reason is not None):
            raise ValueError("an accepted entry carries the update's header and no refusal reason")
        if not self.accepted and self.reason is None:
            raise ValueError("a refused entry says why (reason)")
        return self


class AggregatorProgress(_Strict):
    """``PREFIX/JOB/aggregators/WORKER/progress`` (QoS 1): the updates an aggregator screened since its last
    progress message, so the coordinator counts the quorum without seeing a single update."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job: Identifier
    worker: Identifier
    run_id: Token | None = None
    round: NonNegInt
    attempt: NonNegInt
    entries: Annotated[tuple[ProgressEntry, ...], Field(min_length=1, max_length=PROGRESS_ENTRIES_MAX)]


class CollectRequest(_Strict):
    """``PREFIX/JOB/collect`` (retained, QoS 1): the coordinator closed round ``round`` (attempt ``attempt``) and
    asks each aggregator for the partial aggregate of exactly the devices listed for it."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job: Identifier
    run_id: Token | None = None
    round: NonNegInt
    attempt: NonNegInt
    holdings: dict[Identifier, tuple[Identifier, ...]]
    issued_at: FiniteFloat


class Event(_Strict):
    """``PREFIX/JOB/events``: one message per event (not retained)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job: Identifier
    type: EventType
    ts: FiniteFloat
    round: NonNegInt | None = None
    attempt: NonNegInt | None = None
    device: Identifier | None = None
    reason: RefusalReason | None = None
    detail: Annotated[str, Field(max_length=2000)] = ""
    run_id: Token | None = None
    # devices_online / devices_offline / device_statuses_refused: how many, and the first devices (at most
    # EVENT_DEVICES_MAX).
    count: NonNegInt | None = None
    devices: Annotated[tuple[Identifier, ...], Field(max_length=EVENT_DEVICES_MAX)] = ()


class RoundSummary(_Strict):
    """``PREFIX/JOB/rounds/ROUND``: a closed round (retained)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job: Identifier
    round: NonNegInt
    attempts: PositiveInt = 1
    closed_by: Literal["quorum", "deadline"]
    participants: tuple[Identifier, ...]
    num_samples: NonNegInt
    refused: dict[RefusalReason, NonNegInt] = Field(default_factory=dict)
    bytes_up: NonNegInt
    bytes_down: NonNegInt
    # Bytes down per path, counted from the accepted updates (each names the path it took): delta frames and
    # full models. bytes_down is their sum; a device whose process already held the model counts nothing.
    bytes_down_delta: NonNegInt | None = None
    bytes_down_full: NonNegInt | None = None
    opened_at: FiniteFloat
    closed_at: FiniteFloat
    seconds: NonNegFloat
    accuracy: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    loss: NonNegFloat | None = None
    epsilon: NonNegFloat | None = None
    run_id: Token | None = None
    # Which model accuracy and loss belong to: the sha256 of the global model frame published when this round
    # closed (the plan of the next round names the same hash; accuracy and loss are those of the round's
    # aggregate). None until the evaluation arrives (it runs while the next round trains, and the summary is
    # published again with it), without --eval-data, and when the evaluation failed.
    evaluated_model: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    # A pruning job (--prune-schedule, --keep-pruned): the fraction of the pruned tensors' weights (conv/linear
    # weights, the trainable ones with --trainable) held at zero in the model this round closed with.
    sparsity: Annotated[float, Field(ge=0.0, le=1.0)] | None = None


class PrivacyLedger(_Strict):
    """``PREFIX/JOB/privacy``: what the job has spent so far (retained)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job: Identifier
    mode: DPMode
    mechanism: str = "subsampled_gaussian"
    clip: Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
    noise_multiplier: NonNegFloat
    sample_rate: Annotated[float, Field(gt=0.0, le=1.0)]
    rounds: NonNegInt
    epsilon: NonNegFloat | None  # None = no finite bound (a round ran without noise)
    # Epsilon without amplification by sampling: what holds against readers of plans and round summaries.
    epsilon_participation_known: NonNegFloat | None = None
    delta: Annotated[float, Field(gt=0.0, lt=1.0)]
    target_epsilon: NonNegFloat | None = None
    accountant: str  # library and method, e.g. "opacus.accountants.RDPAccountant (rdp)"
    updated_at: FiniteFloat
    run_id: Token | None = None


# ---------------------------------------------------------------------------------------------------
# JSON encoding helpers
# ---------------------------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)

MAX_JSON_BYTES = 1 << 20


def to_json(message: BaseModel) -> bytes:
    """Serialise a message for MQTT (compact UTF-8 JSON)."""
    return message.model_dump_json(exclude_none=False).encode("utf-8")


def from_json(model: type[M], payload: bytes | str) -> M:
    """Parse and validate a JSON message; raise :class:`MessageError` with the first problem found."""
    if isinstance(payload, bytes | bytearray) and len(payload) > MAX_JSON_BYTES:
        raise MessageError(model.__name__, f"payload of {len(payload)} bytes exceeds {MAX_JSON_BYTES}")
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "message"
        raise MessageError(model.__name__, f"{where}: {first['msg']}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(model.__name__, str(exc)) from None
