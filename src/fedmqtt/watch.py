"""``fedmqtt watch``: a live, read-only view of a job, built from its MQTT topics.

Three layers, so that the interesting part is testable without a broker:

* :class:`WatchState` is a pure reducer: ``state.apply(topic, payload) -> new state``. It never does I/O
  and never raises on bad input: a message that does not match its schema is counted as malformed.
* :func:`render` turns a state into a rich renderable; :func:`describe_changes` turns two states into
  plain log lines (for logs and non-terminal output).
* :func:`run_watch` / :func:`collect_snapshot` are the thin MQTT part.

A watcher that joins late still sees the job: the status, round summaries, device statuses and privacy
ledger are retained; only the (non-retained) events that happened before it joined are missing.

A job id can be run again (each fresh start is a new *run* with its own run id). The view shows one run: the
one named by the newest job status (or ``run_started`` event). Round summaries, privacy ledgers and events of
another run (retained leftovers of a previous run) are dropped and counted in ``other_run``; when the run id
changes, the view keeps only what belongs to the new run.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from fedmqtt.errors import FedmqttError
from fedmqtt.extras import require
from fedmqtt.schema import (
    AggregatorPresence,
    DeviceStatus,
    Event,
    EventType,
    FrameHeader,
    FrameKind,
    MessageError,
    PrivacyLedger,
    RefusalReason,
    RoundSummary,
    Status,
    from_json,
)
from fedmqtt.topics import DEFAULT_PREFIX, Topics

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from fedmqtt.mqtt import BrokerSettings, ClientSettings, MqttConnection

_VIEW = "the table view (--once, or on a terminal)"  # what needs rich (the sim extra)
RECENT_EVENTS = 8
_MB = 1_000_000.0
_EMPTY: Mapping[Any, Any] = MappingProxyType({})


class WatchError(FedmqttError):
    """``fedmqtt watch`` could not show the job (no broker, nothing published for it, ...)."""


# ---------------------------------------------------------------------------------------------------
# The pure reducer
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WatchState:
    """Everything a watcher knows about one job. Immutable: :meth:`apply` returns a new state."""

    topics: Topics
    status: Status | None = None
    rounds: Mapping[int, RoundSummary] = field(default_factory=lambda: _EMPTY)
    devices: Mapping[str, DeviceStatus] = field(default_factory=lambda: _EMPTY)
    privacy: PrivacyLedger | None = None
    recent_events: tuple[Event, ...] = ()
    # Refusals seen as events, by (round, reason): they cover the open round, before its summary exists.
    event_refusals: Mapping[tuple[int, RefusalReason], int] = field(default_factory=lambda: _EMPTY)
    messages: int = 0
    malformed: int = 0
    last_malformed: str | None = None
    # Messages on topics the watcher did not ask for (a broker that routes loosely); counted, not used.
    ignored: int = 0
    # The run shown (None: not known yet, or a coordinator that states no run id: then nothing is filtered).
    run_id: str | None = None
    # Messages of another run than the one shown; counted, not used.
    other_run: int = 0
    # Aggregator workers (--aggregators N) by id, from their retained presence.
    aggregators: Mapping[str, AggregatorPresence] = field(default_factory=lambda: _EMPTY)
    # The header of the retained release frame (the model the job ended with) and the frame's size in bytes.
    release: FrameHeader | None = None
    release_bytes: int = 0

    @classmethod
    def empty(cls, job: str, prefix: str = DEFAULT_PREFIX) -> WatchState:
        return cls(topics=Topics(job=job, prefix=prefix))

    # --- the reducer ---------------------------------------------------------------------------

    def apply(self, topic: str, payload: bytes | str) -> WatchState:
        """The state after receiving ``payload`` on ``topic``. Never raises for a bad message."""
        counted = replace(self, messages=self.messages + 1)
        try:
            return counted._apply(topic, payload)
        except MessageError as exc:
            return replace(counted, malformed=counted.malformed + 1, last_malformed=f"{topic}: {exc}")

    def _apply(self, topic: str, payload: bytes | str) -> WatchState:
        t = self.topics
        # An empty retained payload clears that topic's retained message: forget what it said.
        cleared = len(payload) == 0
        if topic == t.status:
            return replace(self, status=None) if cleared else self._with_status(from_json(Status, payload))
        if topic == t.events:
            if cleared:
                raise MessageError("Event", "empty payload")
            return self._with_event(from_json(Event, payload))
        if topic == t.privacy:
            if cleared:
                return replace(self, privacy=None)
            ledger = from_json(PrivacyLedger, payload)
            self._check_job("PrivacyLedger", ledger.job)
            if self._other_run(ledger.run_id):
                return replace(self, other_run=self.other_run + 1)
            return replace(self, privacy=ledger)
        round_number = t.round_of_summary(topic)
        if round_number is not None:
            if cleared:
                return replace(self, rounds=_without(self.rounds, round_number))
            summary = from_json(RoundSummary, payload)
            self._check_job("RoundSummary", summary.job)
            if summary.round != round_number:
                raise MessageError("RoundSummary", f"round {summary.round} published on {topic}")
            if self._other_run(summary.run_id):
                return replace(self, other_run=self.other_run + 1)
            return replace(self, rounds=_with(self.rounds, round_number, summary))
        if topic == t.release:
            return replace(self, release=None, release_bytes=0) if cleared else self._with_release(payload)
        worker = t.aggregator_of_status(topic)
        if worker is not None:
            if cleared:
                return replace(self, aggregators=_without(self.aggregators, worker))
            presence = from_json(AggregatorPresence, payload)
            self._check_job("AggregatorPresence", presence.job)
            if presence.worker != worker:
                raise MessageError("AggregatorPresence", f"worker {presence.worker!r} published on {topic}")
            return replace(self, aggregators=_with(self.aggregators, worker, presence))
        device = t.device_of_status(topic)
        if device is not None:
            if cleared:
                return replace(self, devices=_without(self.devices, device))
            device_status = from_json(DeviceStatus, payload)
            if device_status.device != device:
                raise MessageError("DeviceStatus", f"device {device_status.device!r} published on {topic}")
            return replace(self, devices=_with(self.devices, device, device_status))
        return replace(self, ignored=self.ignored + 1)

    def _with_release(self, payload: bytes | str) -> WatchState:
        # Only the header is read (what was released, its accuracy and digest); devices check the tensors.
        from fedmqtt.codecs.errors import FrameError
        from fedmqtt.codecs.frame import peek_header

        frame = payload.encode() if isinstance(payload, str) else payload
        try:
            header = peek_header(frame)
        except FrameError as exc:
            raise MessageError("release frame", str(exc)) from None
        if header.kind is not FrameKind.RELEASE or header.release is None:
            raise MessageError("release frame", f"a {header.kind.value} frame on the release topic")
        self._check_job("release frame", header.job)
        return replace(self, release=header, release_bytes=len(frame))

    def _check_job(self, model: str, job: str) -> None:
        if job != self.topics.job:
            raise MessageError(model, f"job {job!r} published under job {self.topics.job!r}")

    def _other_run(self, run_id: str | None) -> bool:
        """Whether a retained record (round summary, ledger) stating ``run_id`` belongs to another run than the
        one shown. While the run is not known everything counts as the shown run's; once it is, a record without
        a run id is a leftover of a coordinator that stated none."""
        return self.run_id is not None and run_id != self.run_id

    def _switch_run(self, run_id: str | None) -> WatchState:
        """Show run ``run_id`` from now on: keep only the round summaries and ledger of that run."""
        if run_id is None or run_id == self.run_id:
            return self
        rounds = MappingProxyType({n: r for n, r in self.rounds.items() if r.run_id == run_id})
        privacy = self.privacy if self.privacy is not None and self.privacy.run_id == run_id else None
        dropped = len(self.rounds) - len(rounds) + (self.privacy is not None and privacy is None)
        # Refusal events name no run in their key: those counted so far belong to the previous run.
        return replace(
            self,
            run_id=run_id,
            rounds=rounds,
            privacy=privacy,
            event_refusals=_EMPTY,
            other_run=self.other_run + dropped,
        )

    def _with_status(self, status: Status) -> WatchState:
        self._check_job("Status", status.job)
        # The newest status names the current run (a job id run again replaces the retained status).
        return replace(self._switch_run(status.run_id), status=status)

    def _with_event(self, event: Event) -> WatchState:
        self._check_job("Event", event.job)
        state = self
        if event.type is EventType.RUN_STARTED:
            state = self._switch_run(event.run_id)
            if state is not self and state.status is not None and state.status.run_id != event.run_id:
                state = replace(state, status=None)  # the previous run's status: the new run's follows
        elif event.run_id is not None and self._other_run(event.run_id):  # events are live news: lenient
            return replace(self, other_run=self.other_run + 1)
        return state._with_run_event(event)

    def _with_run_event(self, event: Event) -> WatchState:
        refusals = self.event_refusals
        if event.type is EventType.UPDATE_REFUSED and event.reason is not None and event.round is not None:
            key = (event.round, event.reason)
            refusals = _with(refusals, key, refusals.get(key, 0) + 1)
        recent = (*self.recent_events, event)[-RECENT_EVENTS:]
        return replace(self, recent_events=recent, event_refusals=refusals)

    # --- derived views -------------------------------------------------------------------------

    @property
    def rounds_done(self) -> int:
        return len(self.rounds)

    @property
    def rounds_total(self) -> int | None:
        return self.status.rounds_total if self.status else None

    def ordered_rounds(self) -> list[RoundSummary]:
        return [self.rounds[n] for n in sorted(self.rounds)]

    def device_counts(self) -> Counter[str]:
        return Counter(d.state for d in self.devices.values())

    def aggregators_in(self, state: str) -> list[str]:
        return sorted(w for w, p in self.aggregators.items() if p.state == state)

    def devices_in(self, state: str) -> list[str]:
        return sorted(name for name, d in self.devices.items() if d.state == state)

    def refusals_by_reason(self) -> Counter[str]:
        """Closed rounds' refusals (from their summaries) plus open rounds' (from events)."""
        totals: Counter[str] = Counter()
        for summary in self.rounds.values():
            for reason, count in summary.refused.items():
                totals[reason.value] += count
        for (round_number, reason), count in self.event_refusals.items():
            if round_number not in self.rounds:
                totals[reason.value] += count
        return totals

    @property
    def bytes_up(self) -> int:
        return sum(s.bytes_up for s in self.rounds.values())

    @property
    def bytes_down(self) -> int:
        return sum(s.bytes_down for s in self.rounds.values())

    def last_metrics(self) -> tuple[float | None, float | None]:
        """(accuracy, loss) of the latest evaluated round, else of the status snapshot."""
        for summary in reversed(self.ordered_rounds()):
            if summary.accuracy is not None or summary.loss is not None:
                return summary.accuracy, summary.loss
        if self.status and self.status.last_metrics:
            return self.status.last_metrics.accuracy, self.status.last_metrics.loss
        return None, None

    def epsilon(self) -> float | None:
        if self.privacy is not None:
            return self.privacy.epsilon
        if self.status and self.status.privacy:
            return self.status.privacy.epsilon
        return None

    def delta(self) -> float | None:
        if self.privacy is not None:
            return self.privacy.delta
        if self.status and self.status.privacy:
            return self.status.privacy.delta
        return None

    @property
    def finished(self) -> bool:
        return self.status is not None and self.status.phase.value in ("finished", "stopped")


def _with(mapping: Mapping[Any, Any], key: Any, value: Any) -> Mapping[Any, Any]:
    new = dict(mapping)
    new[key] = value
    return MappingProxyType(new)


def _without(mapping: Mapping[Any, Any], key: Any) -> Mapping[Any, Any]:
    if key not in mapping:
        return mapping
    new = dict(mapping)
    del new[key]
    return MappingProxyType(new)


def apply_all(state: WatchState, messages: Iterable[tuple[str, bytes | str]]) -> WatchState:
    for topic, payload in messages:
        state = state.apply(topic, payload)
    return state


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------


def _fmt_opt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mb(n: int) -> str:
    return f"{n / _MB:.2f}"


def _names(names: list[str], limit: int = 12) -> str:
    if len(names) <= limit:
        return " ".join(names) or "-"
    return " ".join(names[:limit]) + f" (+{len(names) - limit} more)"


def headline(state: WatchState, now: float) -> str:
    """One line: where the job is. Used as the panel title and as a log line."""
    s = state.status
    if s is None:
        return f"job {state.topics.job}: no status yet"
    total = s.rounds_total
    parts = [f"job {s.job}", f"phase {s.phase.value}", f"rounds done {state.rounds_done}/{total}"]
    if s.run_id is not None:
        parts.insert(1, f"run {s.run_id[:8]}")
    if s.phase.value in ("training", "aggregating"):
        attempt = f" (attempt {s.attempt})" if s.attempt else ""
        parts.append(f"round {s.round}{attempt}: received {s.received}/{s.needed}")
        if s.deadline is not None:
            parts.append(f"deadline in {max(0.0, s.deadline - now):.0f} s")
    # The devices' own retained statuses are fresher than the coordinator's count (which stops at its
    # last status, e.g. when the job finished before the devices left).
    online = connected_and_offline(state)[0] if state.devices else s.devices_online
    parts.append(f"{online} online")
    return " | ".join(parts)


def render(state: WatchState, now: float | None = None, max_rounds: int = 12) -> RenderableType:
    """A rich renderable of ``state``; ``now`` (epoch seconds) drives the deadline countdown (the ``sim`` extra)."""
    Group = require("sim", "rich.console", _VIEW).Group
    Panel = require("sim", "rich.panel", _VIEW).Panel
    Table = require("sim", "rich.table", _VIEW).Table
    Text = require("sim", "rich.text", _VIEW).Text
    now = time.time() if now is None else now
    parts: list[RenderableType] = []

    accuracy, loss = state.last_metrics()
    epsilon = state.epsilon()
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("last accuracy / loss", f"{_fmt_opt(accuracy, '.4f')} / {_fmt_opt(loss, '.4f')}")
    summary.add_row(
        "bytes up / down (total)",
        f"{_mb(state.bytes_up)} MB / {_mb(state.bytes_down)} MB over {state.rounds_done} rounds",
    )
    if epsilon is not None:
        target = state.privacy.target_epsilon if state.privacy else None
        delta = state.delta()
        budget = f" of {target:g}" if target is not None else ""
        summary.add_row("privacy spent", f"ε = {epsilon:.3f}{budget} (δ = {_fmt_opt(delta, 'g')})")
    counts = state.device_counts()
    for device_state in ("training", "online", "offline"):
        names = state.devices_in(device_state)
        summary.add_row(f"{device_state} ({counts.get(device_state, 0)})", _names(names))
    if state.aggregators:
        online = state.aggregators_in("online")
        summary.add_row(f"aggregators ({len(online)} online)", describe_aggregators(state))
    if state.release is not None:
        summary.add_row("released", describe_release(state))
    refusals = state.refusals_by_reason()
    if refusals:
        summary.add_row("refused", ", ".join(f"{reason} {n}" for reason, n in sorted(refusals.items())))
    if state.malformed:
        summary.add_row(Text("malformed messages", style="red"), f"{state.malformed} (last: {state.last_malformed})")
    if state.other_run:
        summary.add_row("other runs' messages", f"{state.other_run} (dropped: not of the run shown)")
    parts.append(summary)

    if state.rounds:
        # No vertical rules and short headers: the table fits an 80-column terminal.
        table = Table(
            title="closed rounds",
            title_justify="left",
            expand=False,
            box=None,
            padding=(0, 0, 0, 2),
            pad_edge=False,
            header_style="bold underline",
        )
        for name in ("round", "closed", "devs", "refused", "acc", "loss", "MB up", "MB down", "s"):
            table.add_column(name, justify="right", no_wrap=True)
        if epsilon is not None:
            table.add_column("ε", justify="right", no_wrap=True)
        rounds = state.ordered_rounds()
        shown = rounds[-max_rounds:]
        if len(rounds) > len(shown):
            table.add_row(f"… {len(rounds) - len(shown)} earlier", *[""] * (len(table.columns) - 1))
        for r in shown:
            row = [
                str(r.round),
                r.closed_by,
                str(len(r.participants)),
                str(sum(r.refused.values())),
                _fmt_opt(r.accuracy, ".4f"),
                _fmt_opt(r.loss, ".4f"),
                _mb(r.bytes_up),
                _mb(r.bytes_down),
                f"{r.seconds:.1f}",
            ]
            if epsilon is not None:
                row.append(_fmt_opt(r.epsilon, ".3f"))
            table.add_row(*row)
        parts.append(table)

    if state.recent_events:
        events = Table(title="recent events", title_justify="left", show_header=False, box=None)
        events.add_column()
        for event in state.recent_events:
            events.add_row(describe_event(event))
        parts.append(events)

    # The headline is the first line (it wraps on a narrow terminal; a panel title would be cut).
    return Panel(
        Group(Text(headline(state, now), style="bold"), *parts),
        title=f"fedmqtt watch: job {state.topics.job}",
        title_align="left",
    )


def describe_event(event: Event) -> str:
    bits = [event.type.value]
    if event.round is not None:
        bits.append(f"round {event.round}")
    if event.device:
        bits.append(f"device {event.device}")
    if event.reason:
        bits.append(f"reason {event.reason.value}")
    if event.detail:
        bits.append(event.detail)
    return " ".join(bits)


def describe_aggregators(state: WatchState) -> str:
    online, offline = state.aggregators_in("online"), state.aggregators_in("offline")
    text = f"aggregators online: {_names(online)}" if online else "no aggregator online"
    return text + (f"; offline: {_names(offline)}" if offline else "")


def describe_release(state: WatchState) -> str:
    header = state.release
    assert header is not None and header.release is not None
    info = header.release
    accuracy = f"accuracy {info.accuracy:.4f}" if info.accuracy is not None else "not evaluated"
    return (
        f"the model of round {header.round}, {accuracy}, digest {info.digest[:12]}, "
        f"{_mb(state.release_bytes)} MB on {state.topics.release}"
    )


def describe_round(summary: RoundSummary) -> str:
    refused = sum(summary.refused.values())
    text = (
        f"round {summary.round} closed by {summary.closed_by}: {len(summary.participants)} devices, "
        f"{refused} refused, accuracy {_fmt_opt(summary.accuracy, '.4f')}, "
        f"loss {_fmt_opt(summary.loss, '.4f')}, "
        f"up {_mb(summary.bytes_up)} MB, down {_mb(summary.bytes_down)} MB, {summary.seconds:.1f} s"
    )
    if summary.epsilon is not None:
        text += f", ε {summary.epsilon:.3f}"
    if summary.sparsity is not None:
        text += f", {summary.sparsity:.1%} pruned"
    return text


def describe_changes(old: WatchState, new: WatchState, *, devices: bool = True) -> list[str]:
    """Plain log lines for what changed between two states (for logs and non-terminal output)."""
    lines = []
    if new.run_id is not None and old.run_id is not None and new.run_id != old.run_id:
        lines.append(f"new run {new.run_id}: the view starts over")
    lines += [describe_round(new.rounds[n]) for n in sorted(set(new.rounds) - set(old.rounds))]
    # Pipelined rounds: a closed round's accuracy arrives later, in its summary published again.
    lines += [
        f"round {n} evaluated: accuracy {_fmt_opt(new.rounds[n].accuracy, '.4f')}, "
        f"loss {_fmt_opt(new.rounds[n].loss, '.4f')}"
        for n in sorted(set(new.rounds) & set(old.rounds))
        if new.rounds[n].evaluated_model is not None and old.rounds[n].evaluated_model is None
    ]
    o, n = old.status, new.status
    if n is not None and (o is None or (o.phase, o.round, o.attempt) != (n.phase, n.round, n.attempt)):
        if n.phase.value == "training":
            attempt = f" (attempt {n.attempt})" if n.attempt else ""
            lines.append(f"round {n.round}{attempt} open: {len(n.selected)} selected, needs {n.needed}")
        else:
            lines.append(f"phase {n.phase.value} (round {n.round}, {n.devices_online} devices online)")
    if [old.aggregators_in(s) for s in ("online", "offline")] != [new.aggregators_in(s) for s in ("online", "offline")]:
        lines.append(describe_aggregators(new))
    if new.release is not None and new.release != old.release:
        lines.append(f"released {describe_release(new)}")
    # Devices going on and off line are news; online <-> training flips happen every round and are not.
    if devices and connected_and_offline(old) != connected_and_offline(new):
        lines.append(describe_devices(new))
    if new.malformed > old.malformed:
        lines.append(f"malformed messages: {new.malformed} (last: {new.last_malformed})")
    return lines


def connected_and_offline(state: WatchState) -> tuple[int, int]:
    counts = state.device_counts()
    return counts.get("online", 0) + counts.get("training", 0), counts.get("offline", 0)


def describe_devices(state: WatchState) -> str:
    connected, offline = connected_and_offline(state)
    return f"devices: {connected} connected, {offline} offline"


class Narrator:
    """Plain log lines for a stream of states (``watch`` or ``simulate`` writing to a pipe or a file).

    Everything is told as it happens, except the device counts: they are told at most every
    ``device_interval_s`` seconds (a thousand devices connecting would otherwise be a thousand lines),
    and always once the job has ended. Time is passed in.
    """

    def __init__(self, topics: Topics, device_interval_s: float = 5.0) -> None:
        self.device_interval_s = device_interval_s
        self._shown = WatchState(topics=topics)
        self._devices_told = (0, 0)
        self._devices_told_at = -math.inf

    def lines(self, state: WatchState, now: float) -> list[str]:
        lines = describe_changes(self._shown, state, devices=False)
        counts = connected_and_offline(state)
        due = now - self._devices_told_at >= self.device_interval_s or state.finished
        if counts != self._devices_told and due:
            lines.append(describe_devices(state))
            self._devices_told, self._devices_told_at = counts, now
        self._shown = state
        return lines


# ---------------------------------------------------------------------------------------------------
# The thin MQTT part
# ---------------------------------------------------------------------------------------------------


def watch_subscriptions(topics: Topics) -> list[tuple[str, int]]:
    return [
        (topics.status, 1),
        (topics.events, 1),
        (topics.rounds_filter, 1),
        (topics.device_status_filter, 1),
        (topics.privacy, 1),
        (topics.aggregator_statuses_filter, 1),
        (topics.release, 1),
    ]


class StateHolder:
    """The current state behind a lock: the MQTT network thread writes, the display thread reads."""

    def __init__(self, state: WatchState) -> None:
        self._state = state
        self._lock = threading.Lock()
        self.last_message_at: float | None = None

    def on_message(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        with self._lock:
            self._state = self._state.apply(topic, payload)
            self.last_message_at = time.monotonic()

    @property
    def state(self) -> WatchState:
        with self._lock:
            return self._state


def client_settings(broker: BrokerSettings, *, client_id: str) -> ClientSettings:
    """Settings for a read-only observer: a clean session that the broker forgets on disconnect."""
    return broker.client_settings(client_id, clean_start=True, session_expiry=0)


def random_client_id(kind: str) -> str:
    # Short: MQTT 3.1.1 only guarantees client ids of up to 23 characters.
    return f"{kind}-{secrets.token_hex(5)}"


def open_watch(settings: ClientSettings, holder: StateHolder, connect_timeout: float = 10.0) -> MqttConnection:
    """Connect and subscribe; every message is applied to ``holder``. Returns the connection."""
    from fedmqtt.mqtt import MqttConnection

    connection = MqttConnection(
        settings, on_message=holder.on_message, subscriptions=watch_subscriptions(holder.state.topics)
    )
    connection.connect(connect_timeout)
    return connection


def collect_snapshot(
    settings: ClientSettings,
    topics: Topics,
    *,
    wait_s: float = 5.0,
    quiet_s: float = 0.5,
    connect_timeout: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
) -> WatchState:
    """The state made of the retained messages: wait up to ``wait_s`` for the job's status, then until no
    message has arrived for ``quiet_s`` (MQTT has no "end of retained messages" marker)."""
    holder = StateHolder(WatchState(topics=topics))
    connection = open_watch(settings, holder, connect_timeout)
    try:
        started = time.monotonic()
        while True:
            now = time.monotonic()
            if now - started >= wait_s:
                break
            last = holder.last_message_at
            if holder.state.status is not None and last is not None and now - last >= quiet_s:
                break
            sleep(0.05)
    finally:
        connection.close()
    return holder.state


def _console_for_stdout() -> Console:
    # When piped, rich would assume 80 columns; use a wider fixed width unless $COLUMNS says otherwise.
    Console = require("sim", "rich.console", _VIEW).Console
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=140, no_color=True)


def run_watch(args: argparse.Namespace) -> int:
    from fedmqtt.mqtt.settings import broker_settings_from_args

    broker = broker_settings_from_args(args)  # refused here, before any connection
    topics = Topics(job=args.job, prefix=args.prefix)
    settings = client_settings(broker, client_id=random_client_id("watch"))
    # The view (--once, a terminal) needs rich (the sim extra); piped, the plain lines need nothing more.
    console = _console_for_stdout() if args.once or sys.stdout.isatty() else None
    if console is not None and args.once:
        state = collect_snapshot(settings, topics, wait_s=args.wait, connect_timeout=args.connect_timeout)
        console.print(render(state))
        if state.status is None:
            raise WatchError(
                f"no retained status on {topics.status} within {args.wait:g} s: the job has not started, "
                "or --job/--prefix do not match the coordinator's"
            )
        return 0
    holder = StateHolder(WatchState(topics=topics))
    connection = open_watch(settings, holder, args.connect_timeout)
    try:
        if console is not None and console.is_terminal:
            Live = require("sim", "rich.live", "the live view").Live
            with Live(render(holder.state), console=console, refresh_per_second=4) as live:
                while True:
                    live.update(render(holder.state))
                    time.sleep(0.25)
        else:
            narrator = Narrator(topics)
            while True:
                for line in narrator.lines(holder.state, time.monotonic()):
                    print(line, flush=True)
                time.sleep(0.25)
    except KeyboardInterrupt:
        return 0
    finally:
        connection.close()


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "watch",
        help="live view of a job: rounds, devices, refusals, bytes, accuracy, privacy spent",
        description="Subscribe to a job's status, events, round summaries, device statuses and privacy "
        "ledger and show them live. Works on a run started elsewhere, and when joining late.",
    )
    from fedmqtt.mqtt.settings import add_broker_flags

    add_broker_flags(parser.add_argument_group("broker"), broker_required=True)
    parser.add_argument("--job", required=True, help="job id (required)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix (default: %(default)s)")
    parser.add_argument(
        "--once",
        action="store_true",
        help="print one snapshot of the retained state and exit (1 if the job has no status)",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=5.0,
        help="with --once: seconds to wait for the job's status (default: %(default)s)",
    )
    parser.add_argument(
        "--connect-timeout", type=float, default=10.0, help="seconds to wait for the broker (default: %(default)s)"
    )
    parser.set_defaults(func=run_watch)
