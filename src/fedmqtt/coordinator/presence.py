"""Who is on the job: a live rival coordinator, and device ids used by two processes at once (pure).

The coordinator's retained ``Status`` is republished every second with its ``instance`` and ``updated_at``: a
heartbeat. A status from another instance that is fresh and not finished means another coordinator runs the job.
Its presence message (``PREFIX/JOB/coordinator``) alone cannot say so: a broker restart or a session take-over
publishes last wills of coordinators that never died.

Devices publish their retained status with a per-process ``instance``. One process restarting shows two instances
once (A, then B); two processes sharing one device id keep kicking each other off the broker, so their instances
alternate (A, B, A, ...). That alternation within a window is what :class:`InstanceTracker` reports.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from fedmqtt.schema import CoordinatorPresence, Phase, Status

HEARTBEAT_STALE_SECONDS = 10.0
DUPLICATE_WINDOW_SECONDS = 120.0


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
