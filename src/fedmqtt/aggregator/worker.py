"""An aggregator worker (``fedmqtt aggregator``): reads a share of a job's updates, sums them, answers collects.

The protocol (issue #14; the coordinator's side runs with ``--aggregators N``):

1. The worker connects with a persistent session, its last will the retained ``offline``
   :class:`~fedmqtt.schema.AggregatorPresence`, announces itself ``online`` and subscribes to
   ``$share/GROUP/PREFIX/JOB/updates/+`` (a site aggregator, ``--site`` without ``--group``: to ``updates/+``) and to
   the retained plan, global model (for the tensor manifest), coordinator presence and collect request.
2. Each update goes through the coordinator's own frame checks (:mod:`fedmqtt.coordinator.intake`) and the plan's
   cheap checks (kind, job, sender, round, selection, base model, sample count). Accepted: written to the spool
   (:mod:`fedmqtt.aggregator.spool`), THEN acknowledged to the broker, THEN reported in an
   :class:`~fedmqtt.schema.AggregatorProgress` entry with its header and size; refused: reported with the reason
   (the coordinator counts and reports refusals). Entries are batched (<= 256, flushed within ~50 ms).
3. On a :class:`~fedmqtt.schema.CollectRequest` for the plan's run, round and attempt the worker sums exactly the
   devices listed for it, with the coordinator's weight rule (:func:`fedmqtt.coordinator.intake.update_weight`),
   and publishes one ``partial_aggregate`` frame (float32, lossless) on ``PREFIX/JOB/partials/WORKER``; nothing
   when nothing is listed for it, or when it lacks a listed update (the coordinator then fails the attempt).

:class:`WorkerCore` is the synchronous core (no network: messages in, publishes and acknowledgements out);
:class:`AggregatorWorker` is the MQTT adapter. Any message may be hostile: it is refused or ignored, counted and
logged, and never ends the process.
"""

from __future__ import annotations

import logging
import queue
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError

from fedmqtt.aggregator.spool import MANIFEST_FILE, PLAN_FILE, BucketKey, WorkerSpool
from fedmqtt.codecs import EncodeError, FrameError, decode_frame, encode_frame, peek_header
from fedmqtt.coordinator import intake
from fedmqtt.mqtt import MqttConnection, MqttError, NotConnected, PublishTimeout, Will
from fedmqtt.mqtt.settings import BrokerSettings
from fedmqtt.schema import (
    MAX_JSON_BYTES,
    PROGRESS_ENTRIES_MAX,
    AggregatorPresence,
    AggregatorProgress,
    CodecSpec,
    CollectRequest,
    CoordinatorPresence,
    FrameHeader,
    FrameKind,
    ManifestEntry,
    MessageError,
    PartialEntry,
    PartialInfo,
    Phase,
    Plan,
    ProgressEntry,
    RefusalReason,
    from_json,
    new_token,
    to_json,
)
from fedmqtt.topics import Topics

log = logging.getLogger("fedmqtt.aggregator")

__all__ = ["DEFER_SECONDS", "FLUSH_SECONDS", "AggregatorWorker", "Publish", "Step", "WorkerCore", "WorkerOptions"]

FLUSH_SECONDS = 0.05  # progress entries wait at most this long for company
# A progress message stays under the JSON limit every reader applies (schema.MAX_JSON_BYTES), whatever its entry
# count: an accepted entry carries its update's header, which grows with the model's tensors (about 38 kB for
# mobilenet-v3-small, so 256 of them would make 9.9 MB). The margin covers the message's own fields.
PROGRESS_BYTES_MAX = MAX_JSON_BYTES - 16 * 1024
DEFER_SECONDS = 10.0  # an update ahead of the worker's plan (or before any plan) waits this long for it
DEFER_MAX = 1000  # updates held back (unacknowledged) at most; beyond, refused at once
SETTLE_SECONDS = (
    1.0  # after connecting: the retained plan, model and collect arrive before spooled updates are re-reported
)
_DETAIL_MAX = 2000  # schema.ProgressEntry.detail's max_length
_MANIFEST: TypeAdapter[tuple[ManifestEntry, ...]] = TypeAdapter(tuple[ManifestEntry, ...])
PARTIAL_CODEC = CodecSpec()  # float32 values, zstd: a partial is summed again by the coordinator, never lossy


@dataclass(frozen=True)
class WorkerOptions:
    """One worker's settings (the command line's, checked)."""

    broker: BrokerSettings
    job: str
    worker: str
    spool: Path
    prefix: str = "fedmqtt"
    group: str | None = "fedmqtt"  # None: read every update (a site aggregator alone on its broker)
    site: str | None = None
    max_update_bytes: int = 64_000_000
    max_update_norm: float | None = None
    exit_on_finish: bool = True


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass
class Step:
    """What handling a message leads to: acknowledgements first (an accepted update is on disk by then), then
    publishes; ``ended``: the job this worker serves is over."""

    acks: list[Any] = field(default_factory=list)
    publishes: list[Publish] = field(default_factory=list)
    ended: Phase | None = None

    def extend(self, other: Step) -> None:
        self.acks += other.acks
        self.publishes += other.publishes
        self.ended = self.ended or other.ended


@dataclass
class _Held:
    header: FrameHeader
    size: int
    weight: float


@dataclass
class _Bucket:
    """The accepted updates of one attempt: what is spooled, and a running sum of some of them."""

    key: BucketKey
    dp: bool
    held: dict[str, _Held] = field(default_factory=dict)
    total: dict[str, np.ndarray] | None = None  # float64 Σ wᵢuᵢ of ``summed``
    summed: set[str] = field(default_factory=set)
    reported: bool = False  # spooled updates of an earlier process were re-reported
    answered: bool = False


@dataclass
class _Deferred:
    device: str
    payload: bytes
    token: Any
    since: float


def _clip(detail: str) -> str:
    return detail if len(detail) <= _DETAIL_MAX else detail[: _DETAIL_MAX - 30] + f" ... ({len(detail)} characters)"


def _identity_refusal(device: str, header: FrameHeader, job: str) -> intake.Refusal | None:
    """What an update frame must be whatever the plan: an update, of this job, from the device of its topic."""
    if header.kind is not FrameKind.UPDATE:
        return intake.Refusal(
            RefusalReason.WRONG_KIND, f"a {header.kind.value} frame on an update topic; expected update"
        )
    if header.job != job:
        return intake.Refusal(RefusalReason.WRONG_JOB, f"frame is for job {header.job!r}, this is job {job!r}")
    if header.sender != device:
        return intake.Refusal(
            RefusalReason.SENDER_MISMATCH, f"header sender {header.sender!r} arrived on the update topic of {device!r}"
        )
    return None


def _plan_refusal(device: str, header: FrameHeader, plan: Plan) -> intake.Refusal | None:
    """The plan's cheap checks the worker can make without the coordinator's round machine (which repeats them
    on the progress entry, with the duplicates across workers and the round's state)."""
    if header.round < plan.round:
        return intake.Refusal(
            RefusalReason.STALE_ROUND, f"update for round {header.round}, current round is {plan.round}"
        )
    if device not in plan.selected:
        return intake.Refusal(
            RefusalReason.NOT_SELECTED, f"{device} is not selected in round {plan.round} (attempt {plan.attempt})"
        )
    if header.base_model_hash != plan.model_hash:
        return intake.Refusal(
            RefusalReason.WRONG_BASE_MODEL,
            f"update computed against model {str(header.base_model_hash)[:12]}, round {plan.round} published "
            f"{plan.model_hash[:12]}",
        )
    if not 1 <= header.num_samples <= plan.max_samples:
        return intake.Refusal(
            RefusalReason.BAD_SAMPLE_COUNT,
            f"num_samples {header.num_samples} is outside 1..{plan.max_samples} (the plan's bound)",
        )
    return None


class WorkerCore:
    """The worker's state and rules, without a network: each ``on_*`` takes one message and returns a
    :class:`Step`. ``token`` is whatever the adapter needs to acknowledge an update (MQTT mid and QoS)."""

    def __init__(self, options: WorkerOptions, *, clock: Callable[[], float] = time.time) -> None:
        self.options = options
        self.clock = clock
        self.topics = Topics(job=options.job, prefix=options.prefix)
        self.spool = WorkerSpool(options.spool)
        self.instance = new_token()
        self.started_at = clock()
        self.plan: Plan | None = None
        self.manifest: tuple[ManifestEntry, ...] | None = None
        self.bucket: _Bucket | None = None
        self.collect: CollectRequest | None = None
        self._deferred: list[_Deferred] = []
        self._entries: list[ProgressEntry] = []
        self._entries_bytes = 0
        self._entries_key: BucketKey | None = None
        self._first_entry_at: float | None = None
        self._pending_publishes: list[Publish] = []  # full progress messages not yet handed out
        self._saved_plan: Plan | None = None
        # Counters (logged; a test reads them).
        self.accepted = 0
        self.refused = 0
        self.ignored = 0  # unreadable or foreign plans, models, presences, collects
        self.partials = 0
        self._restore()

    def _restore(self) -> None:
        """The plan and manifest the last process saw (its own files): updates its broker session queued are
        checked at once, not held back until the retained plan and model arrive again behind them."""
        plan, manifest = self.spool.load(PLAN_FILE), self.spool.load(MANIFEST_FILE)
        try:
            if manifest is not None:
                self.manifest = _MANIFEST.validate_json(manifest)
            if plan is not None:
                self._take_plan(from_json(Plan, plan))
        except (MessageError, ValidationError, ValueError) as exc:
            log.warning("ignored the saved plan or manifest in %s: %s", self.spool.root, exc)

    # ------------------------------------------------------------------------------------ presence

    def presence(self, state: str) -> bytes:
        o = self.options
        return to_json(
            AggregatorPresence(
                job=o.job,
                worker=o.worker,
                instance=self.instance,
                state=state,  # type: ignore[arg-type]
                group=o.group,
                site=o.site,
                since=self.started_at,
            )
        )

    @property
    def updates_filter(self) -> str:
        g = self.options.group
        return self.topics.updates_filter if g is None else self.topics.shared_updates_filter(g)

    def _ignore(self, what: str, why: object) -> Step:
        self.ignored += 1
        log.warning("ignored %s: %s", what, why)
        return Step()

    # ------------------------------------------------------------------------------------ retained state

    def on_plan(self, payload: bytes) -> Step:
        if not payload:
            return Step()  # a cleared plan (a new run starts): the next one says what to do
        try:
            plan = from_json(Plan, payload)
        except MessageError as exc:
            return self._ignore("an unreadable plan", exc)
        if plan.job != self.options.job:
            return self._ignore("a plan", f"it is for job {plan.job!r}")
        step = self.flush(force=True) if self._new_bucket(plan) else Step()
        self._take_plan(plan)
        if plan != self._saved_plan:
            self.spool.save(PLAN_FILE, payload)
            self._saved_plan = plan
        step.extend(self._retry_deferred())
        step.extend(self._maybe_answer())
        return step

    def _new_bucket(self, plan: Plan) -> bool:
        return self.bucket is None or self.bucket.key != BucketKey(plan.run_id, plan.round, plan.attempt)

    def _take_plan(self, plan: Plan) -> None:
        new = self._new_bucket(plan)
        self.plan = plan
        if new:
            key = BucketKey(plan.run_id, plan.round, plan.attempt)
            self.bucket = self._load_bucket(key, dp=plan.dp is not None)
            # A later plan: the earlier rounds are done (their partials were collected or their attempt failed).
            self.spool.keep_only(key)
            log.info("plan: %s, %d selected", key, len(plan.selected))

    def _load_bucket(self, key: BucketKey, *, dp: bool) -> _Bucket:
        bucket = _Bucket(key, dp=dp)
        for device in self.spool.devices(key):  # a restart: what the last process accepted
            payload = self.spool.get(key, device)
            try:
                header = peek_header(payload or b"")
            except FrameError as exc:
                log.error("spooled update %s of %s is unreadable (%s); dropped", device, key, exc)
                continue
            bucket.held[device] = _Held(header, len(payload or b""), intake.update_weight(header, dp=dp))
        if bucket.held:
            log.info("%s: %d update(s) spooled by an earlier process", key, len(bucket.held))
        return bucket

    def on_model(self, payload: bytes) -> Step:
        if not payload:
            return Step()
        try:
            header = peek_header(payload)
        except FrameError as exc:
            return self._ignore("an unreadable global model", exc)
        if header.kind is not FrameKind.GLOBAL_MODEL or header.job != self.options.job:
            return self._ignore("a model frame", f"a {header.kind.value} frame of job {header.job!r}")
        manifest = header.manifest()
        if manifest != self.manifest:
            self.manifest = manifest
            self.spool.save(MANIFEST_FILE, _MANIFEST.dump_json(manifest))
        step = self._retry_deferred()
        step.extend(self._maybe_answer())
        return step

    def on_coordinator(self, payload: bytes, *, retained: bool) -> Step:
        """The coordinator's presence: the job ended (``phase``) for the run this worker serves (or, before any
        plan, a live one: a retained one is an earlier run's news)."""
        if not payload:
            return Step()
        try:
            presence = from_json(CoordinatorPresence, payload)
        except MessageError as exc:
            return self._ignore("an unreadable coordinator presence", exc)
        if presence.job != self.options.job or presence.phase is None:
            return Step()
        ours = presence.run_id == self.plan.run_id if self.plan is not None else not retained
        if not ours:
            return Step()
        log.info("job %s is %s (run %s)", self.options.job, presence.phase.value, presence.run_id)
        return Step(ended=presence.phase)

    # ------------------------------------------------------------------------------------ updates

    def rules(self) -> intake.IntakeRules | None:
        plan, manifest = self.plan, self.manifest
        if plan is None or manifest is None:
            return None
        trained = plan.trainable
        return intake.IntakeRules(
            max_update_bytes=self.options.max_update_bytes,
            update_manifest=manifest if trained is None else tuple(e for e in manifest if e.name in trained),
            model_numel=sum(e.numel for e in manifest),
            codec=plan.uplink,
            trained=trained,
            max_update_norm=self.options.max_update_norm,
        )

    def on_update(self, device: str, payload: bytes, token: Any) -> Step:
        """One update from ``device``'s topic. Acknowledged at once unless it waits for the plan it answers."""
        step = Step()
        rules = self.rules()
        header = intake.check_header(
            payload, rules or intake.IntakeRules(self.options.max_update_bytes, (), 0, PARTIAL_CODEC)
        )
        if isinstance(header, intake.Refusal):
            return self._refused(device, header, len(payload), token)
        refusal = _identity_refusal(device, header, self.options.job)
        if refusal is not None:
            return self._refused(device, refusal, len(payload), token, header)
        plan = self.plan
        if rules is None or plan is None or header.round > plan.round:
            if len(self._deferred) < DEFER_MAX:
                self._deferred.append(_Deferred(device, payload, token, self.clock()))
                return step
            why = "no plan yet" if plan is None else f"update for round {header.round}, current round is {plan.round}"
            return self._refused(device, intake.Refusal(RefusalReason.FUTURE_ROUND, why), len(payload), token, header)
        bucket = self.bucket
        assert bucket is not None
        previous = bucket.held.get(device)
        if previous is not None and previous.header.body_blake2b == header.body_blake2b:
            log.debug("ignored a redelivery from %s", device)
            return Step(acks=[token])
        if previous is not None:
            refusal = intake.Refusal(
                RefusalReason.DUPLICATE,
                f"{device} already has an accepted update in round {plan.round}; the first one counts",
            )
            return self._refused(device, refusal, len(payload), token, header)
        refusal = _plan_refusal(device, header, plan)
        if refusal is not None:
            return self._refused(device, refusal, len(payload), token, header)
        frame = intake.check_frame(payload, header, rules, dp=plan.dp)
        if isinstance(frame, intake.Refusal):
            return self._refused(device, frame, len(payload), token, header)
        self.spool.put(bucket.key, device, payload)  # on disk before the broker forgets it
        weight = intake.update_weight(header, dp=bucket.dp)
        bucket.held[device] = _Held(header, len(payload), weight)
        if bucket.total is None:
            bucket.total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in frame.arrays.items()}
        if set(bucket.total) == set(frame.arrays):
            for k, v in frame.arrays.items():
                bucket.total[k] += weight * v.astype(np.float64)
            bucket.summed.add(device)
        self.accepted += 1
        step.acks.append(token)
        self._report(bucket.key, ProgressEntry(device=device, accepted=True, header=header, bytes=len(payload)))
        return step

    def _refused(
        self,
        device: str,
        refusal: intake.Refusal,
        size: int,
        token: Any,
        header: FrameHeader | None = None,
    ) -> Step:
        self.refused += 1
        log.info("refused update from %s: %s (%s)", device, refusal.reason, refusal.detail)
        key = self.bucket.key if self.bucket is not None else BucketKey(None, header.round if header else 0, 0)
        self._report(
            key,
            ProgressEntry(
                device=device, accepted=False, reason=refusal.reason, detail=_clip(refusal.detail), bytes=size
            ),
        )
        return Step(acks=[token])

    def _retry_deferred(self) -> Step:
        step = Step()
        if not self._deferred or self.rules() is None:
            return step
        waiting, self._deferred = self._deferred, []
        for item in waiting:
            step.extend(self.on_update(item.device, item.payload, item.token))
        # Those still ahead of the plan went back to the list with a new time: keep their first one.
        since = {id(i.token): i.since for i in waiting}
        for item in self._deferred:
            item.since = since.get(id(item.token), item.since)
        return step

    def refuse_overdue(self) -> Step:
        """Updates that waited DEFER_SECONDS for a plan that never came: refused (and acknowledged)."""
        now = self.clock()
        step = Step()
        keep: list[_Deferred] = []
        for item in self._deferred:
            if now - item.since < DEFER_SECONDS:
                keep.append(item)
                continue
            plan = self.plan
            why = (
                f"no plan (or global model) reached this aggregator within {DEFER_SECONDS:g} s"
                if plan is None or self.manifest is None
                else f"the update is for a round after {plan.round}, the open one"
            )
            reason = RefusalReason.NO_OPEN_ROUND if plan is None else RefusalReason.FUTURE_ROUND
            step.extend(self._refused(item.device, intake.Refusal(reason, why), len(item.payload), item.token))
        self._deferred = keep
        return step

    def re_report(self) -> Step:
        """After a restart: report the updates spooled by the last process (it may have died before reporting
        them; the coordinator takes a second report of the same frame as a redelivery), unless their attempt was
        collected already."""
        bucket = self.bucket
        if bucket is None or bucket.reported:
            return Step()
        bucket.reported = True
        c = self.collect
        if c is not None and BucketKey(c.run_id, c.round, c.attempt) == bucket.key:
            return Step()
        for device, held in sorted(bucket.held.items()):
            if device not in bucket.summed:
                self._report(
                    bucket.key, ProgressEntry(device=device, accepted=True, header=held.header, bytes=held.size)
                )
        return Step()

    # ------------------------------------------------------------------------------------ progress

    def _report(self, key: BucketKey, entry: ProgressEntry) -> None:
        size = len(entry.model_dump_json()) + 1  # + the separating comma
        if size > PROGRESS_BYTES_MAX:  # a header no progress message can carry: the update cannot be counted
            self.refused += 1
            detail = (
                f"its header takes {size} bytes in a progress message, above the {PROGRESS_BYTES_MAX}-byte limit "
                "(too many or too long tensor names for scale-out aggregation)"
            )
            log.warning("refused update from %s: %s", entry.device, detail)
            entry = ProgressEntry(device=entry.device, accepted=False, reason=RefusalReason.MALFORMED, detail=detail)
            size = len(entry.model_dump_json()) + 1
        if self._entries and (self._entries_key != key or self._entries_bytes + size > PROGRESS_BYTES_MAX):
            self._pending_publishes.append(self._progress_message())
        if not self._entries:
            self._first_entry_at = self.clock()
        self._entries_key = key
        self._entries.append(entry)
        self._entries_bytes += size
        if len(self._entries) >= PROGRESS_ENTRIES_MAX:
            self._pending_publishes.append(self._progress_message())

    def _progress_message(self) -> Publish:
        key = self._entries_key
        assert key is not None and self._entries
        message = AggregatorProgress(
            job=self.options.job,
            worker=self.options.worker,
            run_id=key.run_id,
            round=key.round,
            attempt=key.attempt,
            entries=tuple(self._entries),
        )
        self._entries = []
        self._entries_bytes = 0
        self._entries_key = None
        self._first_entry_at = None
        return Publish(self.topics.aggregator_progress(self.options.worker), to_json(message))

    def flush(self, *, force: bool = False) -> Step:
        """The progress messages due: full ones, and the rest once FLUSH_SECONDS passed (``force``: now)."""
        step = Step(publishes=self._pending_publishes)
        self._pending_publishes = []
        due = self._first_entry_at is not None and self.clock() - self._first_entry_at >= FLUSH_SECONDS
        if self._entries and (force or due):
            step.publishes.append(self._progress_message())
        return step

    # ------------------------------------------------------------------------------------ collect

    def on_collect(self, payload: bytes) -> Step:
        if not payload:
            return Step()
        try:
            collect = from_json(CollectRequest, payload)
        except MessageError as exc:
            return self._ignore("an unreadable collect request", exc)
        if collect.job != self.options.job:
            return self._ignore("a collect request", f"it is for job {collect.job!r}")
        self.collect = collect
        return self._maybe_answer()

    def _maybe_answer(self) -> Step:
        c, bucket, plan = self.collect, self.bucket, self.plan
        if c is None or bucket is None or plan is None or bucket.answered:
            return Step()
        if BucketKey(c.run_id, c.round, c.attempt) != bucket.key:
            log.debug(
                "collect for run %s round %d attempt %d is not for %s: ignored",
                c.run_id,
                c.round,
                c.attempt,
                bucket.key,
            )
            return Step()
        rules = self.rules()
        if rules is None:
            return Step()  # the global model (manifest) is not here yet: answered when it is
        step = self.flush(force=True)  # the progress of every listed update goes out first
        bucket.answered = True
        listed = tuple(c.holdings.get(self.options.worker, ()))
        if not listed:
            log.info("collect for %s lists nothing from this worker", bucket.key)
            return step
        missing = [d for d in listed if d not in bucket.held]
        if missing:
            log.error(
                "collect for %s lists %d update(s) this worker does not hold (%s); no partial is sent, the "
                "coordinator fails the attempt",
                bucket.key, len(missing), ", ".join(missing[:5]),
            )  # fmt: skip
            return step
        frame = self._partial(bucket, listed, plan, rules)
        if frame is not None:
            self.partials += 1
            step.publishes.append(Publish(self.topics.partial(self.options.worker), frame))
            log.info("partial of %d update(s) for %s: %d bytes", len(listed), bucket.key, len(frame))
        return step

    def _partial(self, bucket: _Bucket, listed: tuple[str, ...], plan: Plan, rules: intake.IntakeRules) -> bytes | None:
        total = bucket.total
        if total is None or bucket.summed != set(listed):
            total = self._refold(bucket, listed, rules)  # the coordinator took another set: sum from the spool
            if total is None:
                return None
        held = [bucket.held[d] for d in listed]
        unclipped = sum(1 for h in held if h.header.dp is not None and h.header.dp.unclipped)
        info = PartialInfo(
            attempt=bucket.key.attempt,
            run_id=bucket.key.run_id,
            devices=tuple(
                PartialEntry(device=d, num_samples=h.header.num_samples, weight=h.weight)
                for d, h in zip(listed, held, strict=True)
            ),
            unclipped=unclipped,
        )
        try:
            with np.errstate(over="ignore"):
                arrays = {k: v.astype(np.float32) for k, v in total.items()}
            return encode_frame(
                arrays,
                kind=FrameKind.PARTIAL_AGGREGATE,
                job=self.options.job,
                round=bucket.key.round,
                sender=self.options.worker,
                codec=PARTIAL_CODEC,
                num_samples=sum(h.header.num_samples for h in held),
                num_updates=len(held),
                weight=float(sum(h.weight for h in held)),
                base_model_hash=plan.model_hash,
                model_name=plan.model_name,
                run_id=bucket.key.run_id,
                partial=info,
            )
        except EncodeError as exc:  # e.g. a sum beyond float32: the coordinator fails the attempt
            log.error("cannot encode the partial for %s: %s; none is sent", bucket.key, exc)
            return None

    def _refold(
        self, bucket: _Bucket, listed: tuple[str, ...], rules: intake.IntakeRules
    ) -> dict[str, np.ndarray] | None:
        total: dict[str, np.ndarray] | None = None
        for device in listed:
            payload = self.spool.get(bucket.key, device)
            try:
                frame = decode_frame(
                    payload or b"", max_body_bytes=rules.max_body_bytes, expected_manifest=rules.update_manifest
                )
            except FrameError as exc:
                log.error(
                    "spooled update %s of %s cannot be read again (%s); no partial is sent", device, bucket.key, exc
                )
                return None
            if total is None:
                total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in frame.arrays.items()}
            weight = bucket.held[device].weight
            for k, v in frame.arrays.items():
                total[k] += weight * v.astype(np.float64)
        return total

    def ended(self) -> None:
        """The job is over: its spool is of no further use."""
        self.spool.keep_only(None)


@dataclass
class _Inbound:
    topic: str
    payload: bytes
    qos: int
    mid: int
    retained: bool


_CONNECTED = "\x00connected"


class AggregatorWorker:
    """The MQTT adapter: paho's network thread only enqueues; the caller of :meth:`run` does everything else."""

    def __init__(self, options: WorkerOptions, *, clock: Callable[[], float] = time.time) -> None:
        self.options = options
        self.core = WorkerCore(options, clock=clock)
        self.topics = self.core.topics
        self._inbox: queue.Queue[_Inbound] = queue.Queue()
        self._conn: MqttConnection | None = None
        self.stop_signal: int | None = None
        self.errors = 0

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop (safe in a signal handler): the loop publishes the offline presence and returns."""
        self.stop_signal = signum

    def run(self, *, connect_timeout: float = 30.0) -> int:
        o, t = self.options, self.topics
        settings = o.broker.client_settings(
            f"fedmqtt-aggregator-{o.job}-{o.worker}",
            clean_start=False,  # the broker keeps our share of updates while we are away
            will=Will(t.aggregator_status(o.worker), self.core.presence("offline"), qos=1, retain=True),
        )
        conn = MqttConnection(
            settings,
            on_message=self._on_message,
            subscriptions=[
                (t.plan, 1),
                (t.model, 1),
                (t.coordinator, 1),
                (t.collect, 1),
                (self.core.updates_filter, 1),
            ],
            manual_ack=True,
            on_connected=lambda present: self._inbox.put(_Inbound(_CONNECTED, b"", 0, 0, False)),
        )
        self._conn = conn
        if self.stop_signal is not None:
            return 0
        conn.connect(timeout=connect_timeout)
        log.info(
            "aggregator %s of job %s on %s (%s)",
            o.worker, o.job, o.broker.url, f"group {o.group}" if o.group else f"site {o.site}, every update",
        )  # fmt: skip
        settle_at: float | None = time.monotonic() + SETTLE_SECONDS
        try:
            while self.stop_signal is None:
                try:
                    item: _Inbound | None = self._inbox.get(timeout=FLUSH_SECONDS / 2)
                except queue.Empty:
                    item = None
                step = Step()
                if item is not None:
                    step = self._handle(item)
                if settle_at is not None and time.monotonic() >= settle_at:
                    settle_at = None
                if settle_at is None:
                    step.extend(self.core.re_report())
                step.extend(self.core.refuse_overdue())
                step.extend(self.core.flush())
                self._carry_out(step)
                if step.ended is not None and o.exit_on_finish:
                    log.info("job %s is %s: aggregator %s exits", o.job, step.ended.value, o.worker)
                    break
            else:
                log.info("%s: aggregator %s stops", signal.Signals(self.stop_signal).name, o.worker)
            self._leave_group()
            if self.stop_signal is None:
                self.core.ended()  # the job is over: so is its spool
            self._publish(Publish(t.aggregator_status(o.worker), self.core.presence("offline"), retain=True))
            return 0
        finally:
            log.info(
                "aggregator %s: %d accepted, %d refused, %d partial(s), %d ignored message(s), %d internal error(s)",
                o.worker, self.core.accepted, self.core.refused, self.core.partials, self.core.ignored, self.errors,
            )  # fmt: skip
            conn.close()
            self._conn = None

    def _leave_group(self) -> None:
        """A clean stop: leave the share group first. Brokers (Mosquitto among them) keep handing a share of the
        updates to a persistent session that is offline, where they wait for this worker to come back; without
        the subscription they go to the workers still running. What had already reached this process is handled
        (spooled, acknowledged, reported), so nothing stays behind unacknowledged."""
        assert self._conn is not None
        try:
            self._conn.unsubscribe(self.core.updates_filter)
        except MqttError as exc:
            log.warning("could not leave the share group: %s", exc)
        step = Step()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if self.topics.device_of_update(item.topic) is not None:
                step.extend(self._handle(item))
        step.extend(self.core.flush(force=True))
        self._carry_out(step)

    def _on_message(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        self._inbox.put(_Inbound(topic, payload, qos, mid, retain))

    def _handle(self, item: _Inbound) -> Step:
        core, t = self.core, self.topics
        try:
            if item.topic == _CONNECTED:
                return Step(
                    publishes=[Publish(t.aggregator_status(self.options.worker), core.presence("online"), retain=True)]
                )
            device = t.device_of_update(item.topic)
            if device is not None:
                return core.on_update(device, item.payload, (item.mid, item.qos))
            if item.topic == t.plan:
                return core.on_plan(item.payload)
            if item.topic == t.model:
                return core.on_model(item.payload)
            if item.topic == t.collect:
                return core.on_collect(item.payload)
            if item.topic == t.coordinator:
                return core.on_coordinator(item.payload, retained=item.retained)
            core.ignored += 1
            return Step(acks=[(item.mid, item.qos)])
        except Exception as exc:  # no poison pills: one message never ends the worker
            self.errors += 1
            log.exception("internal error while handling a message on %s", item.topic)
            step = Step(acks=[(item.mid, item.qos)])
            device = t.device_of_update(item.topic)
            if device is not None:
                try:
                    step.extend(
                        core._refused(
                            device,
                            intake.Refusal(RefusalReason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"),
                            len(item.payload),
                            None,
                        )
                    )
                except Exception:
                    log.exception("could not report the internal error for %s", device)
            return step

    def _carry_out(self, step: Step) -> None:
        conn = self._conn
        assert conn is not None
        for token in step.acks:  # an accepted update is on disk: the broker may forget it
            if token is None:
                continue
            mid, qos = token
            if qos > 0:
                try:
                    conn.ack(mid, qos)
                except NotConnected as exc:  # redelivered after the reconnect: a redelivery, acknowledged then
                    log.warning("%s", exc)
        for p in step.publishes:
            self._publish(p)

    def _publish(self, p: Publish) -> None:
        assert self._conn is not None
        try:
            self._conn.publish(p.topic, p.payload, qos=p.qos, retain=p.retain, wait=False)
        except PublishTimeout as exc:
            log.warning("%s; carrying on", exc)
        except NotConnected as exc:
            log.warning("%s", exc)
