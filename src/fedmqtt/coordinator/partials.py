"""Scale-out aggregation, the coordinator's side (pure): who holds which update, what to collect, what came back.

With ``--aggregators N`` the coordinator sees no update frame. Aggregator workers (:mod:`fedmqtt.aggregator`) screen
the updates, keep them on disk and report each one in a progress entry; the coordinator's round machine accepts an
entry as if the update had arrived, and the :class:`HoldingsBook` of the open attempt records which worker holds
that device's update, with its sample count, FedAvg weight, size and DP clip bit. At close the book makes the
:class:`~fedmqtt.schema.CollectRequest` (worker -> exactly the devices the coordinator accepted from it), checks
each partial-aggregate frame's header against it (:meth:`HoldingsBook.check`: sender, job, run, round, attempt,
the exact device list, each device's sample count and weight, the totals, a lossless float32 codec) and says what
is still missing, and why the attempt must fail (:meth:`HoldingsBook.failure`: a worker offline, silent past
``--partial-timeout``, or whose partial was refused) — an acknowledged update is never counted twice nor dropped
without the attempt failing.

The :class:`WorkerRoster` keeps the workers' presence (who counts as online, for the round gate and the collection)
and the functions below say what the adapter refuses or reports about a worker's messages.

No network, no clock (time is an argument), no tensors: the adapter (``coordinator/scaleout.py``) decodes the frame
and folds it (``Strategy.add_partial``). The book is checkpointable (:meth:`HoldingsBook.state_dict`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fedmqtt.schema import (
    AggregatorPresence,
    AggregatorProgress,
    CodecSpec,
    CollectRequest,
    FrameHeader,
    FrameKind,
    MessageError,
    RefusalReason,
    ValueEncoding,
)

__all__ = [
    "Holding",
    "HoldingsBook",
    "PartialRefusal",
    "PartialVerdict",
    "WorkerRoster",
    "entry_attempt_problem",
    "gate_reason",
    "holdings_summary",
    "partial_refusal_of",
    "presence_problem",
    "progress_problem",
    "worker_offline_detail",
    "worker_online_detail",
]

_SHOWN = 5  # device ids a message names before "..."


class PartialRefusal(StrEnum):
    """Why a partial-aggregate frame was refused (reported on the events topic, never folded)."""

    MALFORMED = "malformed"  # unreadable frame, header or body
    WRONG_KIND = "wrong_kind"  # not a partial_aggregate frame
    WRONG_JOB = "wrong_job"
    WRONG_RUN = "wrong_run"
    STALE = "stale"  # for another round or attempt than the one being collected
    NOT_COLLECTING = "not_collecting"  # no collect request is open
    SENDER_MISMATCH = "sender_mismatch"  # header sender is not the worker of the partials topic
    NOT_ASKED = "not_asked"  # the worker holds no update of this attempt
    DUPLICATE = "duplicate"  # a second, different partial of the same worker: the first one counts
    LOSSY_CODEC = "lossy_codec"  # a partial is float32 without top-k or error feedback
    DEVICES_MISMATCH = "devices_mismatch"  # not exactly the devices the collect request listed for the worker
    SAMPLES_MISMATCH = "samples_mismatch"
    WEIGHTS_MISMATCH = "weights_mismatch"
    TOTALS_MISMATCH = "totals_mismatch"  # header num_updates / num_samples / weight vs the listed devices
    UNCLIPPED_MISMATCH = "unclipped_mismatch"
    MANIFEST_MISMATCH = "manifest_mismatch"  # the tensors are not the job's trained tensors
    NON_FINITE = "non_finite"


# Refusals of the very partial an open collection waits for: the attempt cannot close without it, so it fails.
# The others (another round, run or job; a worker not asked; a repeat) leave the collection as it was.
_BLOCKING = frozenset(
    {
        PartialRefusal.MALFORMED,
        PartialRefusal.SENDER_MISMATCH,
        PartialRefusal.LOSSY_CODEC,
        PartialRefusal.DEVICES_MISMATCH,
        PartialRefusal.SAMPLES_MISMATCH,
        PartialRefusal.WEIGHTS_MISMATCH,
        PartialRefusal.TOTALS_MISMATCH,
        PartialRefusal.UNCLIPPED_MISMATCH,
        PartialRefusal.MANIFEST_MISMATCH,
        PartialRefusal.NON_FINITE,
    }
)


@dataclass(frozen=True)
class Holding:
    """One accepted update, held on ``worker``'s disk."""

    worker: str
    num_samples: int
    weight: float
    bytes: int = 0
    unclipped: bool = False


@dataclass(frozen=True)
class PartialVerdict:
    """The answer of :meth:`HoldingsBook.check` for one partial frame from ``worker``."""

    worker: str
    refusal: PartialRefusal | None = None
    detail: str = ""
    redelivery: bool = False  # the very partial already received (a QoS 1 re-delivery): ignore it
    blocking: bool = False  # the refused partial is the one the collection waits for: the attempt fails

    @property
    def accepted(self) -> bool:
        return self.refusal is None and not self.redelivery


@dataclass
class _Collection:
    issued_at: float
    deadline: float
    timeout: float
    received: dict[str, str] = field(default_factory=dict)  # worker -> body_blake2b of its partial
    refused: dict[str, str] = field(default_factory=dict)  # worker -> why its awaited partial was refused


def holdings_summary(devices: tuple[str, ...] | list[str]) -> str:
    """``3 acknowledged update(s) (dev-1, dev-2, dev-3)``: how failure messages name what a worker held."""
    shown = ", ".join(devices[:_SHOWN]) + (" ..." if len(devices) > _SHOWN else "")
    return f"{len(devices)} acknowledged update(s)" + (f" ({shown})" if devices else "")


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _names(devices: Collection[str]) -> str:
    listed = sorted(devices)
    return ", ".join(listed[:_SHOWN]) + (f" (and {len(listed) - _SHOWN} more)" if len(listed) > _SHOWN else "")


class HoldingsBook:
    """The holdings of one attempt (``round``, ``attempt`` of run ``run_id``) and, once it closes, their
    collection. Devices are kept in the order the coordinator accepted them."""

    def __init__(self, job: str, round: int, attempt: int, run_id: str | None) -> None:
        self.job = job
        self.round = round
        self.attempt = attempt
        self.run_id = run_id
        self._holdings: dict[str, Holding] = {}
        self._collection: _Collection | None = None

    # ------------------------------------------------------------------------------------ holdings

    def hold(
        self, device: str, worker: str, *, num_samples: int, weight: float, bytes: int = 0, unclipped: bool = False
    ) -> None:
        """Record that ``worker`` holds ``device``'s accepted update. The round machine accepts each device once
        per attempt, so a second holder is a bug of the caller (ValueError); so is holding after the close."""
        if device in self._holdings:
            raise ValueError(f"{device} is already held by {self._holdings[device].worker} in this attempt")
        if self._collection is not None:
            raise ValueError(f"round {self.round} attempt {self.attempt} is closed: nothing more is held")
        if num_samples < 0 or not math.isfinite(weight) or weight < 0 or bytes < 0:
            raise ValueError(f"{device}: num_samples, weight and bytes must be finite and >= 0")
        self._holdings[device] = Holding(worker, int(num_samples), float(weight), int(bytes), bool(unclipped))

    def holder_of(self, device: str) -> str | None:
        held = self._holdings.get(device)
        return held.worker if held is not None else None

    @property
    def holdings(self) -> Mapping[str, Holding]:
        return dict(self._holdings)

    @property
    def workers(self) -> tuple[str, ...]:
        """The workers holding at least one update, in the order of their first one."""
        return tuple(dict.fromkeys(h.worker for h in self._holdings.values()))

    def devices_of(self, worker: str) -> tuple[str, ...]:
        return tuple(d for d, h in self._holdings.items() if h.worker == worker)

    def weight_of(self, worker: str) -> float:
        """The sum of the weights the coordinator accepted for ``worker``'s devices (what its partial is folded with)."""
        return sum((h.weight for h in self._holdings.values() if h.worker == worker), 0.0)

    def by_worker(self) -> dict[str, tuple[str, ...]]:
        return {w: self.devices_of(w) for w in self.workers}

    @property
    def bytes_up(self) -> int:
        return sum(h.bytes for h in self._holdings.values())

    @property
    def unclipped(self) -> int:
        return sum(1 for h in self._holdings.values() if h.unclipped)

    # ------------------------------------------------------------------------------------ collection

    @property
    def collecting(self) -> bool:
        return self._collection is not None

    def collect(self, now: float, timeout: float) -> CollectRequest:
        """Close the holdings and return the collect request; partials are awaited until ``now + timeout``."""
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"the partial timeout must be > 0 seconds, got {timeout!r}")
        if self._collection is None:
            self._collection = _Collection(issued_at=now, deadline=now + timeout, timeout=timeout)
        return self.collect_request()

    def collect_request(self) -> CollectRequest:
        assert self._collection is not None, "collect() first"
        return CollectRequest(
            job=self.job,
            run_id=self.run_id,
            round=self.round,
            attempt=self.attempt,
            holdings=self.by_worker(),
            issued_at=self._collection.issued_at,
        )

    @property
    def deadline(self) -> float | None:
        return self._collection.deadline if self._collection is not None else None

    def extend(self, until: float) -> None:
        """Move the collection deadline to ``until`` if later (the adapter's broker link was down meanwhile)."""
        if self._collection is not None and until > self._collection.deadline:
            self._collection.deadline = until

    def received(self) -> tuple[str, ...]:
        return tuple(self._collection.received) if self._collection is not None else ()

    def missing(self) -> dict[str, tuple[str, ...]]:
        """Worker -> the devices whose updates it holds and has not yet sent as an accepted partial."""
        got = self._collection.received if self._collection is not None else {}
        return {w: devices for w, devices in self.by_worker().items() if w not in got}

    @property
    def complete(self) -> bool:
        """Every holding came back in an accepted partial (an attempt with no holdings is complete at once)."""
        return self._collection is not None and not self.missing()

    def failure(self, now: float, online: Collection[str]) -> str | None:
        """Why the open collection cannot complete (the attempt fails), or None while it still may: a worker
        with holdings whose partial was refused, that is offline (its last will), or silent past the deadline.
        Each named with how many acknowledged updates it held."""
        c = self._collection
        if c is None:
            return None
        problems: list[str] = []
        for worker, devices in self.missing().items():
            held = holdings_summary(list(devices))
            if worker in c.refused:
                problems.append(f"aggregator {worker}'s partial was refused ({c.refused[worker]}); it held {held}")
            elif worker not in online:
                problems.append(f"aggregator {worker} went offline holding {held}")
            elif now >= c.deadline:
                problems.append(
                    f"aggregator {worker} sent no partial within --partial-timeout {c.timeout:g} s; it held {held}"
                )
        if not problems:
            return None
        return "; ".join(problems) + ": the attempt fails (no update is counted from it) and is retried"

    def check(self, worker: str, header: FrameHeader) -> PartialVerdict:
        """Check a partial frame's header, which arrived on ``worker``'s partials topic, against the collection.
        The adapter then decodes the body against the trained manifest (:meth:`refuse` if that fails) and, if
        it is accepted, folds it and calls :meth:`accept`."""
        c = self._collection

        def no(refusal: PartialRefusal, detail: str) -> PartialVerdict:
            awaited = c is not None and worker in self.missing() and worker not in c.refused
            return PartialVerdict(worker, refusal, detail, blocking=awaited and refusal in _BLOCKING)

        if header.kind is not FrameKind.PARTIAL_AGGREGATE:
            return no(PartialRefusal.WRONG_KIND, f"a {header.kind.value} frame on a partials topic")
        if header.job != self.job:
            return no(PartialRefusal.WRONG_JOB, f"frame is for job {header.job!r}, this is job {self.job!r}")
        info = header.partial
        if info is None:
            return no(PartialRefusal.MALFORMED, "a partial_aggregate frame without its header.partial section")
        if self.run_id is not None and info.run_id != self.run_id:
            return no(PartialRefusal.WRONG_RUN, f"partial of run {info.run_id}, this is run {self.run_id}")
        if (header.round, info.attempt) != (self.round, self.attempt):
            return no(
                PartialRefusal.STALE,
                f"partial of round {header.round} attempt {info.attempt}; "
                f"round {self.round} attempt {self.attempt} is the one being collected",
            )
        if c is None:
            return no(PartialRefusal.NOT_COLLECTING, f"round {self.round} attempt {self.attempt} is not closed yet")
        if header.sender != worker:
            return no(
                PartialRefusal.SENDER_MISMATCH,
                f"header sender {header.sender!r} arrived on the partials topic of {worker!r}",
            )
        if worker in c.received:
            if c.received[worker] == header.body_blake2b:
                return PartialVerdict(worker, redelivery=True)
            return no(
                PartialRefusal.DUPLICATE, f"{worker} already sent its partial for this attempt; the first one counts"
            )
        expected = self.devices_of(worker)
        if not expected:
            return no(
                PartialRefusal.NOT_ASKED, f"{worker} holds no update of round {self.round} attempt {self.attempt}"
            )
        try:
            codec = CodecSpec.parse(header.codec)
        except MessageError as exc:
            return no(PartialRefusal.MALFORMED, f"unusable codec: {exc.detail}")
        if codec.values is not ValueEncoding.FLOAT32 or codec.topk is not None or codec.error_feedback:
            return no(PartialRefusal.LOSSY_CODEC, f"codec {codec} is lossy; a partial aggregate is float32, lossless")
        entries = {e.device: e for e in info.devices}
        if set(entries) != set(expected):
            lacking, extra = set(expected) - set(entries), set(entries) - set(expected)
            detail = (
                f"the collect request listed {len(expected)} device(s) for {worker}, the partial sums {len(entries)}"
            )
            detail += f"; lacking {_names(lacking)}" if lacking else ""
            detail += f"; not listed {_names(extra)}" if extra else ""
            return no(PartialRefusal.DEVICES_MISMATCH, detail)
        for device in expected:
            held, entry = self._holdings[device], entries[device]
            if entry.num_samples != held.num_samples:
                return no(
                    PartialRefusal.SAMPLES_MISMATCH,
                    f"{device}: {entry.num_samples} samples in the partial, {held.num_samples} accepted",
                )
            if not _close(entry.weight, held.weight):
                return no(
                    PartialRefusal.WEIGHTS_MISMATCH,
                    f"{device}: weight {entry.weight:g} in the partial, {held.weight:g} accepted",
                )
        samples = sum(self._holdings[d].num_samples for d in expected)
        weight = sum(self._holdings[d].weight for d in expected)
        if header.num_updates != len(expected) or header.num_samples != samples or not _close(header.weight, weight):
            return no(
                PartialRefusal.TOTALS_MISMATCH,
                f"header totals {header.num_updates} update(s), {header.num_samples} samples, weight "
                f"{header.weight:g}; the listed devices make {len(expected)}, {samples}, {weight:g}",
            )
        unclipped = sum(1 for d in expected if self._holdings[d].unclipped)
        if info.unclipped != unclipped:
            return no(
                PartialRefusal.UNCLIPPED_MISMATCH,
                f"the partial says {info.unclipped} unclipped update(s), the accepted entries {unclipped}",
            )
        return PartialVerdict(worker)

    def accept(self, worker: str, header: FrameHeader) -> None:
        """Record ``worker``'s partial (checked, decoded and folded by the adapter) as received."""
        assert self._collection is not None, "collect() first"
        self._collection.received[worker] = header.body_blake2b

    def refuse(self, verdict: PartialVerdict) -> None:
        """Record a refused partial; a blocking one makes :meth:`failure` fail the attempt."""
        if self._collection is not None and verdict.blocking and verdict.refusal is not None:
            self._collection.refused[verdict.worker] = f"{verdict.refusal.value}: {verdict.detail}"

    def blocking(self, worker: str, refusal: PartialRefusal, detail: str) -> PartialVerdict:
        """The verdict on an awaited partial whose body failed to decode (manifest, values, corrupt body)."""
        awaited = self._collection is not None and worker in self.missing()
        return PartialVerdict(worker, refusal, detail, blocking=awaited and refusal in _BLOCKING)

    # ------------------------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        c = self._collection
        return {
            "job": self.job,
            "round": self.round,
            "attempt": self.attempt,
            "run_id": self.run_id,
            "holdings": [
                [d, h.worker, h.num_samples, h.weight, h.bytes, h.unclipped] for d, h in self._holdings.items()
            ],
            "collection": None
            if c is None
            else {
                "issued_at": c.issued_at,
                "deadline": c.deadline,
                "timeout": c.timeout,
                "received": dict(c.received),
                "refused": dict(c.refused),
            },
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> HoldingsBook:
        """The book :meth:`state_dict` saved; raises ValueError naming what is wrong."""
        try:
            book = cls(str(state["job"]), int(state["round"]), int(state["attempt"]), state.get("run_id"))
            saved = state.get("collection")
            for device, worker, num_samples, weight, size, unclipped in state["holdings"]:
                book.hold(
                    str(device), str(worker), num_samples=int(num_samples), weight=float(weight), bytes=int(size),
                    unclipped=bool(unclipped),
                )  # fmt: skip
            if saved is not None:
                book._collection = _Collection(
                    issued_at=float(saved["issued_at"]),
                    deadline=float(saved["deadline"]),
                    timeout=float(saved["timeout"]),
                    received={str(k): str(v) for k, v in saved["received"].items()},
                    refused={str(k): str(v) for k, v in saved["refused"].items()},
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"holdings book state: {type(exc).__name__}: {exc}") from None
        return book


# ---------------------------------------------------------------------------------------- the workers


class WorkerRoster:
    """The workers' latest presence state, and when the last will of one received while the coordinator's own
    broker link was in doubt takes effect (a broker restart publishes the wills of live clients)."""

    def __init__(self) -> None:
        self._state: dict[str, str] = {}
        self._will_at: dict[str, float] = {}

    def observe(self, worker: str, state: str, *, now: float, grace_until: float | None) -> bool:
        """Record ``worker``'s presence ``state``; an ``offline`` one counts only from ``grace_until`` on (None or
        past: at once). True if the state changed (or is the worker's first)."""
        before = self._state.get(worker)
        self._state[worker] = state
        self._will_at.pop(worker, None)
        if state == "offline" and grace_until is not None and now < grace_until:
            self._will_at[worker] = grace_until
        return before != state

    def online(self, now: float) -> set[str]:
        """The workers online at ``now``: said so last, or went offline while the link was in doubt and may come
        back (their will takes effect at its grace's end)."""
        return {
            w
            for w, state in self._state.items()
            if state == "online" or (w in self._will_at and now < self._will_at[w])
        }


def gate_reason(online: Collection[str], needed: int) -> str | None:
    """Why rounds may not open (fewer than ``needed`` workers online), or None: they may."""
    if len(online) >= needed:
        return None
    listed = sorted(online)
    return f"waiting for aggregators: {len(listed)} of {needed} online" + (
        f" ({', '.join(listed[:10])})" if listed else ""
    )


def _claims(worker: str, job: str, claimed_worker: str, claimed_job: str) -> str | None:
    if claimed_worker != worker or claimed_job != job:
        return f"it names worker {claimed_worker!r} of job {claimed_job!r}"
    return None


def presence_problem(worker: str, job: str, presence: AggregatorPresence) -> str | None:
    """Why a status on ``worker``'s topic cannot be used (another worker's or job's), or None."""
    return _claims(worker, job, presence.worker, presence.job)


def progress_problem(worker: str, job: str, run_id: str | None, progress: AggregatorProgress) -> str | None:
    """Why a progress message on ``worker``'s topic cannot be used (another worker, job or run), or None."""
    problem = _claims(worker, job, progress.worker, progress.job)
    if problem is None and progress.run_id is not None and run_id is not None and progress.run_id != run_id:
        problem = f"{len(progress.entries)} update(s) of run {progress.run_id}; this is run {run_id}"
    return problem


def entry_attempt_problem(
    book: HoldingsBook | None, worker: str, round: int, attempt: int, open_attempt: int
) -> str | None:
    """Why an update ``worker`` reports under ``round``/``attempt`` cannot count for the open attempt (the worker
    keeps it under another one, so it could not sum it for this one), or None."""
    if book is not None and (round, attempt) == (book.round, book.attempt):
        return None
    return f"aggregator {worker} holds it for round {round} attempt {attempt}; attempt {open_attempt} is open"


def partial_refusal_of(reason: RefusalReason) -> PartialRefusal:
    """The refusal of a partial whose body failed to decode, from the reason the same failure gives an update."""
    if reason is RefusalReason.MANIFEST_MISMATCH:
        return PartialRefusal.MANIFEST_MISMATCH
    if reason is RefusalReason.NON_FINITE:
        return PartialRefusal.NON_FINITE
    return PartialRefusal.MALFORMED


def worker_online_detail(worker: str, presence: AggregatorPresence) -> str:
    where = f"group {presence.group}" if presence.group else f"site {presence.site}" if presence.site else ""
    return f"aggregator {worker} online" + (f" ({where})" if where else "")


def worker_offline_detail(worker: str, book: HoldingsBook | None) -> str:
    """``aggregator W offline``, with what it held of the open attempt."""
    held = book.devices_of(worker) if book is not None else ()
    detail = f"aggregator {worker} offline"
    if held and book is not None:
        detail += f", holding {holdings_summary(list(held))} of round {book.round} attempt {book.attempt}"
    return detail
