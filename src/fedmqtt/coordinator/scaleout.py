"""Scale-out aggregation (``--aggregators N``), the coordinator's MQTT adapter for it.

The coordinator then sees no update: it subscribes to the workers' presence and progress (``aggregators/+/+``)
and to their partial aggregates (``partials/+``). Rounds open only while N workers are online (the machine's open
gate). A progress entry goes through the round machine as the update would have (screen, accept or refuse), and the
attempt's :class:`~fedmqtt.coordinator.partials.HoldingsBook` records which worker holds it. At close
:class:`ScaleOut` publishes the retained collect request, waits for the partials (at most ``--partial-timeout``; the
driver keeps handling other messages meanwhile), checks and folds each one (``Strategy.add_partial``) and has the
service aggregate as usual; a worker offline, silent or refused fails the attempt, which the machine retries.

The decisions are the pure core's (:mod:`fedmqtt.coordinator.partials`); the service
(:mod:`fedmqtt.coordinator.service`) creates one :class:`ScaleOut` when ``--aggregators`` ≥ 1, routes the workers'
messages to it, and lends it what it needs through :class:`Host`. Everything runs on the service's driver thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedmqtt.codecs import decode_frame, peek_header
from fedmqtt.codecs import errors as codec_errors
from fedmqtt.coordinator import intake
from fedmqtt.coordinator import machine as M
from fedmqtt.coordinator.aggregation import Strategy
from fedmqtt.coordinator.config import CoordinatorConfig
from fedmqtt.coordinator.errors import AggregationError
from fedmqtt.coordinator.partials import (
    HoldingsBook,
    PartialRefusal,
    PartialVerdict,
    WorkerRoster,
    entry_attempt_problem,
    gate_reason,
    partial_refusal_of,
    presence_problem,
    progress_problem,
    worker_offline_detail,
    worker_online_detail,
)
from fedmqtt.schema import (
    AggregatorPresence,
    AggregatorProgress,
    EventType,
    FrameHeader,
    ManifestEntry,
    MessageError,
    ProgressEntry,
    RefusalReason,
    from_json,
    new_token,
    to_json,
)
from fedmqtt.topics import Topics

log = logging.getLogger("fedmqtt.coordinator")

__all__ = ["Host", "ScaleOut"]


@dataclass(frozen=True)
class Host:
    """What :class:`ScaleOut` uses of the coordinator service (its driver thread's state and actions)."""

    clock: Callable[[], float]
    machine: Callable[[], M.RoundMachine]  # the service's machine (a resume replaces it)
    run_id: Callable[[], str | None]
    model_hash: Callable[[], str | None]  # the open plan's, which an accepted update must be based on
    ended: Callable[[], bool]  # the job ended: publish nothing more
    publish: Callable[..., None]  # (topic, payload, *, retain=False)
    event: Callable[..., None]  # (EventType, **Event fields)
    execute: Callable[[list[M.Action]], None]  # carry out the machine's actions
    refuse: Callable[[str, int | None, RefusalReason, str], None]  # an update refused (the machine counts it)
    weight: Callable[[FrameHeader], float]  # an accepted update's FedAvg weight
    count_accepted: Callable[[int, FrameHeader], None]  # an accepted update's bytes up/down and DP clip bit
    grace_until: Callable[[float], float | None]  # when a last will received then may take effect
    link_in_doubt: Callable[[], bool]  # our own broker link is (or was just) down
    status_changed: Callable[[], None]  # publish the status now
    aggregate: Callable[[M.CloseRound], None]  # every partial is folded: aggregate the closed round


class ScaleOut:
    """The workers' presence, the open attempt's holdings and the collection of its partials."""

    def __init__(
        self,
        config: CoordinatorConfig,
        topics: Topics,
        host: Host,
        *,
        strategy: Strategy,
        update_manifest: tuple[ManifestEntry, ...],
        max_body_bytes: int,
    ) -> None:
        self.config = config
        self.topics = topics
        self.host = host
        self.strategy = strategy
        self.update_manifest = update_manifest
        self.max_body_bytes = max_body_bytes
        self.roster = WorkerRoster()
        self.holdings: HoldingsBook | None = None  # the open attempt's
        self.collecting: M.CloseRound | None = None  # the close whose partials are awaited
        self.refusals = 0  # workers' messages refused (progress, partials, statuses)

    # ------------------------------------------------------------------------------------ presence

    def online(self) -> set[str]:
        return self.roster.online(self.host.clock())

    def update_gate(self) -> None:
        """Rounds open only while ``--aggregators`` workers are online: set the machine's gate, say so."""
        machine = self.host.machine()
        reason = gate_reason(self.online(), self.config.aggregators)
        before = machine.gate
        machine.set_open_gate(reason)
        if reason is not None and reason != before:
            log.info("%s", reason)
            self.host.event(EventType.AGGREGATORS_WAITING, round=machine.round, detail=reason)
        if reason != before:
            self.host.status_changed()

    def handle(self, topic: str, payload: bytes, received_at: float) -> bool:
        """A worker's presence, progress or partial aggregate. True if the topic was one of them."""
        worker = self.topics.aggregator_of_status(topic)
        if worker is not None:
            self._handle_status(worker, payload, received_at)
            return True
        worker = self.topics.aggregator_of_progress(topic)
        if worker is not None:
            self._handle_progress(worker, payload, received_at)
            return True
        worker = self.topics.aggregator_of_partial(topic)
        if worker is not None:
            self._handle_partial(worker, payload)
            return True
        return False

    def _refused(self, worker: str, what: str, detail: str) -> None:
        """A worker's message that cannot be used: counted, logged and reported (updates it names are counted as
        refused updates by the machine, never here)."""
        self.refusals += 1
        log.warning("refused %s of aggregator %s: %s", what, worker, detail)
        self.host.event(
            EventType.AGGREGATOR_REFUSED,
            round=self.host.machine().round,
            detail=f"{what} of aggregator {worker}: {detail}",
        )

    def _handle_status(self, worker: str, payload: bytes, received_at: float) -> None:
        host = self.host
        if payload:
            try:
                presence = from_json(AggregatorPresence, payload)
            except MessageError as exc:
                self._refused(worker, "a status", str(exc))
                return
            problem = presence_problem(worker, self.config.job, presence)
            if problem is not None:
                self._refused(worker, "a status", problem)
                return
        else:  # a cleared retained status: the worker is gone
            presence = AggregatorPresence(
                job=self.config.job, worker=worker, instance=new_token(), state="offline", since=host.clock()
            )
        grace = host.grace_until(received_at) if presence.state == "offline" else None
        if self.roster.observe(worker, presence.state, now=host.clock(), grace_until=grace):
            self._announce(worker, presence)
        self.update_gate()
        self.check_collection()

    def _announce(self, worker: str, presence: AggregatorPresence) -> None:
        if presence.state == "online":
            self.host.event(EventType.AGGREGATOR_ONLINE, detail=worker_online_detail(worker, presence))
            return
        detail = worker_offline_detail(worker, self.holdings)
        log.warning("%s", detail)
        self.host.event(EventType.AGGREGATOR_OFFLINE, detail=detail)

    # ------------------------------------------------------------------------------------ progress

    def _handle_progress(self, worker: str, payload: bytes, received_at: float) -> None:
        try:
            progress = from_json(AggregatorProgress, payload)
        except MessageError as exc:
            self._refused(worker, "a progress message", str(exc))
            return
        problem = progress_problem(worker, self.config.job, self.host.run_id(), progress)
        if problem is not None:
            self._refused(worker, "a progress message", problem)
            return
        for entry in progress.entries:
            try:
                self._handle_entry(worker, progress, entry, received_at)
            except Exception as exc:  # one entry never ends the coordinator, nor the others of its message
                summary = f"{type(exc).__name__}: {exc}"
                log.error(
                    "internal error on %s's entry from aggregator %s: %s", entry.device, worker, summary, exc_info=exc
                )
                if self.host.machine().accepted.get(entry.device) is None:
                    self.host.refuse(entry.device, progress.round, RefusalReason.INTERNAL_ERROR, summary)

    def _handle_entry(
        self, worker: str, progress: AggregatorProgress, entry: ProgressEntry, received_at: float
    ) -> None:
        """One update a worker screened, as if it had arrived here: the machine screens the accepted ones
        (round, selection, duplicates across workers, base model, sample count) and the holdings record who has it."""
        host, machine = self.host, self.host.machine()
        device = entry.device
        where = f" (screened by aggregator {worker})"
        if not entry.accepted or entry.header is None:
            assert entry.reason is not None  # ProgressEntry's rule
            host.refuse(device, progress.round, entry.reason, entry.detail + where)
            return
        header = entry.header
        screening = machine.screen_update(device, header, model_hash=host.model_hash())
        if screening.redelivery:
            log.debug("ignored a second report of %s's update (aggregator %s)", device, worker)
            return
        if screening.refused:
            assert screening.reason is not None
            host.refuse(device, header.round, screening.reason, screening.detail + where)
            return
        book = self.holdings
        stale = entry_attempt_problem(book, worker, progress.round, progress.attempt, machine.attempt)
        if stale is not None or book is None:
            host.refuse(device, header.round, RefusalReason.STALE_ROUND, stale or "")
            return
        unclipped = header.dp is not None and bool(header.dp.unclipped)
        actions = machine.accept_update(device, header, received_at)  # counted: now the holdings record it
        book.hold(device, worker, num_samples=header.num_samples, weight=host.weight(header), bytes=entry.bytes,
                  unclipped=unclipped)  # fmt: skip
        host.count_accepted(entry.bytes, header)
        host.execute(actions)

    # ------------------------------------------------------------------------------------ the close

    def open_attempt(self, a: M.OpenRound) -> None:
        """A new attempt opened: its holdings start empty."""
        self.holdings = HoldingsBook(self.config.job, a.round, a.attempt, self.host.run_id())
        self.collecting = None

    def collect(self, a: M.CloseRound) -> None:
        """Ask the workers for the partials of exactly the devices this attempt accepted from each one."""
        book = self.holdings
        assert book is not None and (book.round, book.attempt) == (a.round, a.attempt)
        request = book.collect(self.host.clock(), self.config.partial_timeout)
        self.collecting = a
        self.host.publish(self.topics.collect, to_json(request), retain=True)
        shown = ", ".join(f"{w}: {len(d)}" for w, d in request.holdings.items())
        log.info("round %d attempt %d closed: collecting partials (%s)", a.round, a.attempt, shown)
        self.check_collection()

    def end_collection(self) -> None:
        """The collection is over (aggregated or failed): clear the retained collect request."""
        if self.collecting is not None:
            self.collecting = None
            self.host.publish(self.topics.collect, b"", retain=True)

    def check_collection(self) -> None:
        """Aggregate once every partial is in; fail the attempt once one cannot come."""
        host = self.host
        a, book = self.collecting, self.holdings
        if a is None or book is None or host.ended():
            return
        if book.complete:
            self.end_collection()
            host.aggregate(a)
            return
        now = host.clock()
        if host.link_in_doubt():  # partials may still be on their way
            book.extend(now + 1.0)
        problem = book.failure(now, online=self.online())
        if problem is None:
            return
        log.error("round %d attempt %d: %s", a.round, a.attempt, problem)
        self.end_collection()
        self.update_gate()  # the retry waits for the workers
        host.execute(host.machine().aggregation_failed(a.round, problem, now))

    def _handle_partial(self, worker: str, payload: bytes) -> None:
        book = self.holdings
        if book is None or self.collecting is None:
            # A late partial of an attempt already aggregated or failed (or a stray one): never folded.
            log.info("ignored a partial aggregate of aggregator %s: no collect request is open", worker)
            return
        try:
            header = peek_header(payload)
        except codec_errors.FrameError as exc:
            self._partial_refused(book.blocking(worker, PartialRefusal.MALFORMED, str(exc)))
            return
        verdict = book.check(worker, header)
        if verdict.redelivery:
            return
        if not verdict.accepted:
            self._partial_refused(verdict)
            return
        try:
            frame = decode_frame(payload, max_body_bytes=self.max_body_bytes, expected_manifest=self.update_manifest)
        except codec_errors.FrameError as exc:
            refusal = partial_refusal_of(intake.frame_refusal_reason(exc))
            self._partial_refused(book.blocking(worker, refusal, str(exc)))
            return
        devices = book.devices_of(worker)
        weight = book.weight_of(worker)  # the coordinator's own weights (checked equal)
        try:
            self.strategy.add_partial(frame.arrays, weight, len(devices))
        except AggregationError as exc:
            self._partial_refused(book.blocking(worker, PartialRefusal.MALFORMED, str(exc)))
            return
        book.accept(worker, header)
        log.info("partial of aggregator %s: %d update(s), weight %g", worker, len(devices), weight)
        self.check_collection()

    def _partial_refused(self, verdict: PartialVerdict) -> None:
        assert verdict.refusal is not None
        if self.holdings is not None:
            self.holdings.refuse(verdict)
        what = "the awaited partial aggregate" if verdict.blocking else "a partial aggregate"
        self._refused(verdict.worker, what, f"{verdict.refusal.value}: {verdict.detail}")
        self.check_collection()

    def abandon_resumed_attempt(self) -> None:
        """A coordinator resumed in the middle of an attempt: the workers' holdings of it are not checkpointed
        (nor is what they reported since the checkpoint), so the attempt is abandoned and a new one opens: no
        update is counted twice, and the devices train again for the new attempt."""
        m = self.host.machine()
        held = len(m.accepted)
        reason = (
            f"the coordinator resumed in the middle of round {m.round} attempt {m.attempt} ({held} update(s) "
            "counted); with --aggregators the workers' holdings are not checkpointed, so the attempt is abandoned "
            "and opened again"
        )
        log.warning("%s", reason)
        self.host.execute(m.abandon_attempt(reason, self.host.clock()))

    def status_fields(self) -> dict[str, Any]:
        """What the coordinator's status says of the workers."""
        return {"aggregators_online": len(self.online()), "aggregators_needed": self.config.aggregators}
