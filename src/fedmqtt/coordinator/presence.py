"""Who is on the job: a live rival coordinator, and device ids used by two processes at once (pure).

The coordinator's retained ``Status`` is republished every second with its ``instance`` and ``updated_at``: a
heartbeat. A status from another instance that is fresh and not finished means another coordinator runs the job.
Its presence message (``PREFIX/JOB/coordinator``) alone cannot say so: a broker restart or a session take-over
publishes last wills of coordinators that never died.

Devices publish their retained status with a per-process ``instance``. One process restarting shows two instances
once (A, then B); two processes sharing one device id keep kicking each other off the broker, so their instances
alternate (A, B, A, ...). That alternation within a window is what :class:`InstanceTracker` reports.

A fleet arrives at once: a thousand devices connect within seconds, each publishing its retained status. The round
machine takes every transition as it comes (its state stays exact); what the coordinator *publishes* about them is
batched by :class:`PresenceBatch`: at most one ``devices_online`` and one ``devices_offline`` event per
:data:`PRESENCE_BATCH_SECONDS`, each with a count and the first :data:`LISTED_DEVICES` ids, and no status publish
of its own (the status heartbeat, once a second, carries ``devices_online``). One status publish per arrival was
O(n) retained QoS 1 messages, each fanned out by the broker to every device that subscribes to the status: O(n^2)
deliveries, and a plan queued behind them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from fedmqtt.schema import EVENT_DEVICES_MAX, CoordinatorPresence, Phase, Status

HEARTBEAT_STALE_SECONDS = 10.0
DUPLICATE_WINDOW_SECONDS = 120.0
PRESENCE_BATCH_SECONDS = 1.0  # presence events go out at most this often (the status heartbeat's period)
LISTED_DEVICES = EVENT_DEVICES_MAX  # device ids a batched presence event names (its count covers the rest)


def live_rival(status: Status | None, presence: CoordinatorPresence | None, me: str, now: float) -> str | None:
    """A description of another coordinator that is alive on the job, or None.

    Alive: its last status (not ours) is fresh (``updated_at`` within :data:`HEARTBEAT_STALE_SECONDS` of
    ``now``) and its job has neither finished nor stopped. A presence that says ``online`` with a stale heartbeat
    is a coordinator that died while the broker could not publish its will: not alive.
    """
    if status is None or status.instance is None or status.instance == me:
        return None
    if status.phase in (Phase.FINISHED, Phase.STOPPED):
        return None
    age = now - status.updated_at
    if age > HEARTBEAT_STALE_SECONDS:
        return None
    if presence is not None and presence.instance == status.instance and presence.state != "online":
        return None  # its last will (it died: kill -9, power loss) or its own "stopped"
    return f"instance {status.instance}, round {status.round}, last heartbeat {max(age, 0.0):.1f} s ago"


@dataclass
class _Seen:
    events: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=8))
    reported_at: float | None = None


class InstanceTracker:
    """Counts which process instances publish each device's status; reports duplicates once per window."""

    def __init__(self, window: float = DUPLICATE_WINDOW_SECONDS, max_devices: int = 1_000_000) -> None:
        self.window = window
        self.max_devices = max_devices
        self._seen: dict[str, _Seen] = {}

    def observe(self, device: str, instance: str | None, now: float) -> bool:
        """Record a status of ``device`` from ``instance``; True when this shows a duplicate id (first time in a
        window): within ``window`` seconds the instances changed at least twice with one of them coming back."""
        if instance is None:
            return False
        seen = self._seen.get(device)
        if seen is None:
            if len(self._seen) >= self.max_devices:
                return False
            seen = self._seen[device] = _Seen()
        if seen.events and seen.events[-1][1] == instance:
            return False
        seen.events.append((now, instance))
        recent = [i for t, i in seen.events if now - t <= self.window]
        returned = any(recent[k] in recent[: k - 1] for k in range(2, len(recent)))
        if not returned:
            return False
        if seen.reported_at is not None and now - seen.reported_at < self.window:
            return False
        seen.reported_at = now
        return True

    def instances(self, device: str) -> list[str]:
        seen = self._seen.get(device)
        return sorted({i for _, i in seen.events}) if seen else []


@dataclass(frozen=True)
class PresenceReport:
    """What one batch of presence transitions changed: devices that came online and went offline (net: a device
    that went offline and came back within the batch is in neither), each list in order of first transition and
    cut to ``listed`` ids; the counts are complete."""

    online: tuple[str, ...] = ()
    online_count: int = 0
    offline: tuple[str, ...] = ()
    offline_count: int = 0
    transitions: int = 0  # every transition the batch took, flaps included
    # Statuses refused (unreadable, or naming another device than their topic): the devices whose topics they came
    # on (first ``listed``, each once), how many, and why the first one was refused.
    refused: tuple[str, ...] = ()
    refused_count: int = 0
    refused_first: str = ""

    def __bool__(self) -> bool:
        return bool(self.online_count or self.offline_count or self.refused_count)


class PresenceBatch:
    """Collects a device's online/offline transitions (as the round machine reports them) between two reports.

    ``add`` and ``refuse`` are O(1); :meth:`take` is O(devices in the batch) and returns one
    :class:`PresenceReport`, so whatever the number of arrivals (or of hostile statuses), a batch costs the adapter
    at most three events. :meth:`due` says when to take it: at once
    for the first change after a quiet period, then at most once per ``interval`` seconds.
    """

    def __init__(self, interval: float = PRESENCE_BATCH_SECONDS, listed: int = LISTED_DEVICES) -> None:
        self.interval = interval
        self.listed = listed
        self._was_online: dict[str, bool] = {}  # device -> its state before the batch (insertion: first change)
        self._now_online: dict[str, bool] = {}
        self._transitions = 0
        self._refused: dict[str, None] = {}  # devices whose topics carried a refused status (first ``listed``)
        self._refused_count = 0
        self._refused_first = ""
        self._last_report: float | None = None

    def add(self, device: str, online: bool) -> None:
        """A transition of ``device`` to ``online`` (True) or offline (False)."""
        if device not in self._was_online:
            self._was_online[device] = not online  # the machine reports transitions: it was in the other state
        self._now_online[device] = online
        self._transitions += 1

    def refuse(self, device: str, why: str) -> None:
        """A status on ``device``'s topic was refused (``why``: what was wrong with it)."""
        if self._refused_count == 0:
            self._refused_first = why
        self._refused_count += 1
        if len(self._refused) < self.listed:
            self._refused[device] = None

    @property
    def pending(self) -> int:
        """Transitions and refusals taken since the last report."""
        return self._transitions + self._refused_count

    def due(self, now: float) -> bool:
        if not self.pending:
            return False
        return self._last_report is None or now - self._last_report >= self.interval or now < self._last_report

    def take(self, now: float) -> PresenceReport:
        """The batch's net changes; starts a new batch."""
        online = [d for d, before in self._was_online.items() if self._now_online[d] and not before]
        offline = [d for d, before in self._was_online.items() if before and not self._now_online[d]]
        report = PresenceReport(
            online=tuple(online[: self.listed]),
            online_count=len(online),
            offline=tuple(offline[: self.listed]),
            offline_count=len(offline),
            transitions=self._transitions,
            refused=tuple(self._refused),
            refused_count=self._refused_count,
            refused_first=self._refused_first,
        )
        self._was_online, self._now_online, self._transitions = {}, {}, 0
        self._refused, self._refused_count, self._refused_first = {}, 0, ""
        self._last_report = now
        return report
