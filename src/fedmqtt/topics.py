"""The topic map: fedmqtt's public MQTT contract. No other module spells a topic string.

    PREFIX/JOB/plan                    retained JSON, QoS 1: the open round's plan
    PREFIX/JOB/model                   retained, QoS 1: the current global-model frame
    PREFIX/JOB/delta                   retained, QoS 1: the compressed delta from the previous global model
    PREFIX/JOB/updates/DEVICE          QoS 1: a device's update frame
    PREFIX/JOB/status                  retained JSON: the coordinator's live snapshot
    PREFIX/JOB/events                  JSON, not retained: one message per event
    PREFIX/JOB/rounds/ROUND            retained JSON summary of a closed round
    PREFIX/JOB/devices/DEVICE/status   retained JSON online/training/offline (offline is the last will)
    PREFIX/JOB/privacy                 retained JSON privacy ledger
    PREFIX/JOB/coordinator             retained JSON presence of the coordinator (offline is its last will)
    PREFIX/JOB/release                 retained, QoS 1: the model the job released when it ended (fedmqtt.release)
    PREFIX/JOB/aggregators/WORKER/status    retained JSON presence of an aggregator worker (offline: last will)
    PREFIX/JOB/aggregators/WORKER/progress  QoS 1 JSON: the updates a worker screened (accepted or refused)
    PREFIX/JOB/collect                 retained JSON, QoS 1: the coordinator asks the workers for their partials
    PREFIX/JOB/partials/WORKER         QoS 1: a worker's partial-aggregate frame for the closed round

Aggregator workers read the updates through an MQTT 5 shared subscription, ``$share/GROUP/PREFIX/JOB/updates/+``.

Identifiers (prefix, job, device) must be safe inside a topic level: no ``/``, ``+``, ``#``, no spaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedmqtt.errors import InvalidIdentifier

DEFAULT_PREFIX = "fedmqtt"

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ID_RULE = "use 1-64 characters from A-Z a-z 0-9 _ . - starting with a letter or digit"

# Relative topic names (below PREFIX/JOB/). Only this module uses them.
_PLAN = "plan"
_MODEL = "model"
_DELTA = "delta"
_UPDATES = "updates"
_STATUS = "status"
_EVENTS = "events"
_ROUNDS = "rounds"
_DEVICES = "devices"
_PRIVACY = "privacy"
_COORDINATOR = "coordinator"
_RELEASE = "release"
_AGGREGATORS = "aggregators"
_PROGRESS = "progress"
_COLLECT = "collect"
_PARTIALS = "partials"
_SHARE = "$share"
_SITES = "sites"
_BRIDGE = "bridge"


def validate_id(kind: str, value: str) -> str:
    """Return ``value`` if it can be used as one topic level, else raise :class:`InvalidIdentifier`."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise InvalidIdentifier(kind, str(value), _ID_RULE)
    return value


def validate_prefix(prefix: str) -> str:
    """A prefix may hold several levels (``acme/fl``); each level follows the identifier rule."""
    if not prefix:
        raise InvalidIdentifier("topic prefix", prefix, "must not be empty")
    for level in prefix.split("/"):
        validate_id("topic prefix level", level)
    return prefix


@dataclass(frozen=True)
class Topics:
    """Topic names of one job. ``Topics(job="mnist").plan`` -> ``"fedmqtt/mnist/plan"``."""

    job: str
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)
        validate_id("job id", self.job)

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.job}"

    @property
    def plan(self) -> str:
        return f"{self.base}/{_PLAN}"

    @property
    def model(self) -> str:
        return f"{self.base}/{_MODEL}"

    @property
    def delta(self) -> str:
        """The retained model-delta frame (a compressed downlink, ``--downlink`` other than float32)."""
        return f"{self.base}/{_DELTA}"

    @property
    def status(self) -> str:
        return f"{self.base}/{_STATUS}"

    @property
    def events(self) -> str:
        return f"{self.base}/{_EVENTS}"

    @property
    def privacy(self) -> str:
        return f"{self.base}/{_PRIVACY}"

    @property
    def coordinator(self) -> str:
        return f"{self.base}/{_COORDINATOR}"

    @property
    def release(self) -> str:
        """The retained release frame: the final model of the job's last run (``fedmqtt device --serve``)."""
        return f"{self.base}/{_RELEASE}"

    def update(self, device: str) -> str:
        return f"{self.base}/{_UPDATES}/{validate_id('device id', device)}"

    @property
    def updates_filter(self) -> str:
        """Subscription filter matching every device's update topic."""
        return f"{self.base}/{_UPDATES}/+"

    def round_summary(self, round_number: int) -> str:
        if round_number < 0:
            raise ValueError("round number must be >= 0")
        return f"{self.base}/{_ROUNDS}/{round_number}"

    @property
    def rounds_filter(self) -> str:
        return f"{self.base}/{_ROUNDS}/+"

    def device_status(self, device: str) -> str:
        return f"{self.base}/{_DEVICES}/{validate_id('device id', device)}/{_STATUS}"

    @property
    def device_status_filter(self) -> str:
        return f"{self.base}/{_DEVICES}/+/{_STATUS}"

    # --- scale-out aggregation (fedmqtt.aggregator) -------------------------------------------------

    def shared_updates_filter(self, group: str) -> str:
        """``$share/GROUP/PREFIX/JOB/updates/+``: the broker hands each update to one member of ``group``."""
        return f"{_SHARE}/{validate_id('shared-subscription group', group)}/{self.updates_filter}"

    def aggregator_status(self, worker: str) -> str:
        return f"{self.base}/{_AGGREGATORS}/{validate_id('aggregator id', worker)}/{_STATUS}"

    def aggregator_progress(self, worker: str) -> str:
        return f"{self.base}/{_AGGREGATORS}/{validate_id('aggregator id', worker)}/{_PROGRESS}"

    @property
    def aggregators_filter(self) -> str:
        """Every worker's status and progress topics."""
        return f"{self.base}/{_AGGREGATORS}/+/+"

    @property
    def aggregator_statuses_filter(self) -> str:
        """Every worker's status topic (what ``fedmqtt watch`` shows), without their progress messages."""
        return f"{self.base}/{_AGGREGATORS}/+/{_STATUS}"

    @property
    def collect(self) -> str:
        return f"{self.base}/{_COLLECT}"

    def partial(self, worker: str) -> str:
        return f"{self.base}/{_PARTIALS}/{validate_id('aggregator id', worker)}"

    @property
    def partials_filter(self) -> str:
        return f"{self.base}/{_PARTIALS}/+"

    def aggregator_of_status(self, topic: str) -> str | None:
        """The WORKER of ``PREFIX/JOB/aggregators/WORKER/status``, or None."""
        return self._aggregator_topic(topic, _STATUS)

    def aggregator_of_progress(self, topic: str) -> str | None:
        """The WORKER of ``PREFIX/JOB/aggregators/WORKER/progress``, or None."""
        return self._aggregator_topic(topic, _PROGRESS)

    def _aggregator_topic(self, topic: str, leaf: str) -> str | None:
        levels = self._levels_below_base(topic)
        if levels is None or len(levels) != 3 or levels[0] != _AGGREGATORS or levels[2] != leaf:
            return None
        return levels[1] if _ID_RE.match(levels[1]) else None

    def aggregator_of_partial(self, topic: str) -> str | None:
        """The WORKER of ``PREFIX/JOB/partials/WORKER``, or None."""
        levels = self._levels_below_base(topic)
        if levels is None or len(levels) != 2 or levels[0] != _PARTIALS:
            return None
        return levels[1] if _ID_RE.match(levels[1]) else None

    def site_bridge(self, site: str) -> str:
        """``PREFIX/JOB/sites/SITE/bridge``: retained ``1`` while SITE's bridge is connected, ``0`` (its last
        will) when it is not; published by Mosquitto's bridge on the site and the cloud broker."""
        return f"{self.base}/{_SITES}/{validate_id('site name', site)}/{_BRIDGE}"

    @property
    def everything_filter(self) -> str:
        """``PREFIX/JOB/#``: a readable view of a whole run with ``mosquitto_sub -v``."""
        return f"{self.base}/#"

    # --- parsing incoming topics: strict, so a client ignores what it did not ask for -------------

    def _levels_below_base(self, topic: str) -> list[str] | None:
        head = self.base + "/"
        if not topic.startswith(head):
            return None
        return topic[len(head) :].split("/")

    def device_of_update(self, topic: str) -> str | None:
        """The DEVICE of ``PREFIX/JOB/updates/DEVICE``, or None if ``topic`` is not such a topic."""
        levels = self._levels_below_base(topic)
        if levels is None or len(levels) != 2 or levels[0] != _UPDATES:
            return None
        return levels[1] if _ID_RE.match(levels[1]) else None

    def device_of_status(self, topic: str) -> str | None:
        """The DEVICE of ``PREFIX/JOB/devices/DEVICE/status``, or None."""
        levels = self._levels_below_base(topic)
        if levels is None or len(levels) != 3 or levels[0] != _DEVICES or levels[2] != _STATUS:
            return None
        return levels[1] if _ID_RE.match(levels[1]) else None

    def round_of_summary(self, topic: str) -> int | None:
        levels = self._levels_below_base(topic)
        if levels is None or len(levels) != 2 or levels[0] != _ROUNDS or not levels[1].isdigit():
            return None
        return int(levels[1])


@dataclass(frozen=True)
class AclRule:
    """One Mosquitto ACL line: ``pattern ACCESS TOPIC`` (``%u`` = the client's username)."""

    access: str  # "read", "write", "readwrite" or "deny" (deny wins over every grant of the same account)
    pattern: str


def device_acl(prefix: str = DEFAULT_PREFIX) -> tuple[AclRule, ...]:
    """What a device account (username == device id) may do, for every job under ``prefix``.

    A device writes only its own update and status topics and reads the plan, model, delta, status, events,
    round summaries, privacy ledger, coordinator presence and the released model. It can never write the model, and it can
    neither read nor write another device's topics (updates or status).
    """
    validate_prefix(prefix)
    p = prefix
    return (
        AclRule("write", f"{p}/+/{_UPDATES}/%u"),
        AclRule("readwrite", f"{p}/+/{_DEVICES}/%u/{_STATUS}"),
        AclRule("read", f"{p}/+/{_PLAN}"),
        AclRule("read", f"{p}/+/{_MODEL}"),
        AclRule("read", f"{p}/+/{_DELTA}"),
        AclRule("read", f"{p}/+/{_STATUS}"),
        AclRule("read", f"{p}/+/{_EVENTS}"),
        AclRule("read", f"{p}/+/{_ROUNDS}/+"),
        AclRule("read", f"{p}/+/{_PRIVACY}"),
        AclRule("read", f"{p}/+/{_COORDINATOR}"),
        AclRule("read", f"{p}/+/{_RELEASE}"),
    )


def coordinator_acl(prefix: str = DEFAULT_PREFIX) -> tuple[AclRule, ...]:
    """The coordinator reads and writes everything under the prefix."""
    validate_prefix(prefix)
    return (AclRule("readwrite", f"{prefix}/#"),)


def watcher_acl(prefix: str = DEFAULT_PREFIX) -> tuple[AclRule, ...]:
    """A read-only observer (``fedmqtt watch``): reads every topic of every job except the devices' update
    frames (the most private thing on the wire: only the coordinator reads them), and writes nothing.

    The readable topics are listed one by one (a new topic is unreadable until it is added here), and the
    updates are also denied outright, so no grant that applies to every account (Mosquitto's ``pattern``
    lines) can give them back.
    """
    validate_prefix(prefix)
    p = prefix
    return (
        AclRule("read", f"{p}/+/{_PLAN}"),
        AclRule("read", f"{p}/+/{_MODEL}"),
        AclRule("read", f"{p}/+/{_DELTA}"),
        AclRule("read", f"{p}/+/{_STATUS}"),
        AclRule("read", f"{p}/+/{_EVENTS}"),
        AclRule("read", f"{p}/+/{_ROUNDS}/+"),
        AclRule("read", f"{p}/+/{_DEVICES}/+/{_STATUS}"),
        AclRule("read", f"{p}/+/{_PRIVACY}"),
        AclRule("read", f"{p}/+/{_COORDINATOR}"),
        AclRule("read", f"{p}/+/{_RELEASE}"),
        # Scale-out aggregation: the workers' presence and progress (update headers, no values), the collect
        # request; not the partials (a partial of one device is its update): nothing grants them.
        AclRule("read", f"{p}/+/{_AGGREGATORS}/+/{_STATUS}"),
        AclRule("read", f"{p}/+/{_AGGREGATORS}/+/{_PROGRESS}"),
        AclRule("read", f"{p}/+/{_COLLECT}"),
        AclRule("deny", f"{p}/+/{_UPDATES}/#"),
    )


def aggregator_acl(prefix: str = DEFAULT_PREFIX) -> tuple[AclRule, ...]:
    """What an aggregator account (username == worker id) may do, for every job under ``prefix``: read the
    devices' updates (through its shared subscription) and what it needs to screen them (plan, model, delta,
    coordinator presence, collect requests); write only its own status, progress and partial topics."""
    validate_prefix(prefix)
    p = prefix
    return (
        AclRule("read", f"{p}/+/{_UPDATES}/+"),
        AclRule("read", f"{p}/+/{_PLAN}"),
        AclRule("read", f"{p}/+/{_MODEL}"),
        AclRule("read", f"{p}/+/{_DELTA}"),
        AclRule("read", f"{p}/+/{_COORDINATOR}"),
        AclRule("read", f"{p}/+/{_COLLECT}"),
        AclRule("readwrite", f"{p}/+/{_AGGREGATORS}/%u/{_STATUS}"),
        AclRule("write", f"{p}/+/{_AGGREGATORS}/%u/{_PROGRESS}"),
        AclRule("write", f"{p}/+/{_PARTIALS}/%u"),
    )


# --- edge sites: what a site broker's bridge to the cloud broker carries (fedmqtt.broker.bridge) -----------------

BRIDGE_DOWN = "down"  # cloud broker -> site broker
BRIDGE_UP = "up"  # site broker -> cloud broker


def bridge_topics(prefix: str, job: str, *, site_aggregator: bool) -> tuple[tuple[str, str], ...]:
    """The ``(direction, topic filter)`` pairs a site's bridge carries for one job, ``direction`` being
    :data:`BRIDGE_DOWN` or :data:`BRIDGE_UP`.

    Down: what the site's devices and its aggregator read (plan, model, delta, coordinator presence, collect
    requests, the release) and what a watcher at the site reads (status, events, round summaries, privacy
    ledger). Up: the devices' presence, the aggregators' presence and progress, their partial aggregates, and
    the devices' updates only when no site aggregator sums them at the site. No topic goes both ways, so the
    bridge cannot loop.
    """
    t = Topics(job=job, prefix=prefix)
    down = (t.plan, t.model, t.delta, t.coordinator, t.collect, t.release, t.status, t.events, t.rounds_filter,
            t.privacy)  # fmt: skip
    up = [t.device_status_filter, t.aggregators_filter, t.partials_filter]
    if not site_aggregator:
        up.append(t.updates_filter)
    return tuple((BRIDGE_DOWN, topic) for topic in down) + tuple((BRIDGE_UP, topic) for topic in up)


def site_acl(prefix: str = DEFAULT_PREFIX) -> tuple[AclRule, ...]:
    """What a site's bridge account may do on the cloud broker, for every job under ``prefix``: read what
    :func:`bridge_topics` carries down, write what it carries up (its devices' presence and updates, its
    aggregators' presence, progress and partials) and its own bridge-state topic (``%u`` = the site name).
    A site is trusted for the devices and aggregators behind it: the cloud broker cannot tell which are its."""
    validate_prefix(prefix)
    p = prefix
    return (
        AclRule("read", f"{p}/+/{_PLAN}"),
        AclRule("read", f"{p}/+/{_MODEL}"),
        AclRule("read", f"{p}/+/{_DELTA}"),
        AclRule("read", f"{p}/+/{_COORDINATOR}"),
        AclRule("read", f"{p}/+/{_COLLECT}"),
        AclRule("read", f"{p}/+/{_RELEASE}"),
        AclRule("read", f"{p}/+/{_STATUS}"),
        AclRule("read", f"{p}/+/{_EVENTS}"),
        AclRule("read", f"{p}/+/{_ROUNDS}/+"),
        AclRule("read", f"{p}/+/{_PRIVACY}"),
        AclRule("write", f"{p}/+/{_DEVICES}/+/{_STATUS}"),
        AclRule("write", f"{p}/+/{_UPDATES}/+"),
        AclRule("write", f"{p}/+/{_AGGREGATORS}/+/+"),
        AclRule("write", f"{p}/+/{_PARTIALS}/+"),
        AclRule("readwrite", f"{p}/+/{_SITES}/%u/{_BRIDGE}"),
    )
