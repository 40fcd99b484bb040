"""The coordinator's round state machine: events in, actions out, no I/O, no clock.

Like h11's ``_state.py``, the machine knows nothing about sockets or MQTT. The adapter
(``coordinator/service.py``) turns network messages and timer ticks into method calls and carries out the
:class:`Action` values they return (publish a plan, aggregate, publish events and the status snapshot).
Time is always an argument (``now``: seconds, normally ``time.time()``), so every behaviour is replayable
in tests and after a restart.

Lifecycle (one job)::

    NEW --start--> WAITING --online >= min_devices--> TRAINING --quorum, deadline, nobody left--> AGGREGATING
                    ^   ^                              |  |  ^                                         |
                    |   +--- failed; too few online ---+  |  +-- failed; retry (attempt + 1)           |
                    |                                     +----- failed max_attempts times --> STOPPED |
                    +------------------- next round; too few online <------ aggregation_done ----------+
                                         next round; enough online: TRAINING;  after the last: FINISHED
    NEW, WAITING, TRAINING, AGGREGATING --stop(reason)--> STOPPED
    NEW, WAITING, AGGREGATING --the next round would exceed the round budget (privacy)--> STOPPED
    AGGREGATING --aggregation_done(target_reached=...) before the last round (target accuracy)--> STOPPED
    TRAINING, AGGREGATING --abandon_attempt (the adapter lost what the attempt held)--> the next attempt, as a failure
                          does, but it never stops the job itself (even past max_attempts)
    WAITING, TRAINING --target_reached (an earlier round's model, evaluated while this round runs)--> STOPPED

A stop says why (:class:`StopCause`): the privacy budget and the target accuracy are rules of the job, a round
that failed too often is a failure; the adapter derives its exit code from the cause. A stop asked for by a signal (``StopCause.SIGNAL``:
SIGTERM, SIGINT) is a pause: :meth:`RoundMachine.state_dict` then returns the state the machine stopped from, so
a checkpoint written after it resumes the job where it was (a restarted container carries on).

Which events each phase allows, and which phases each may lead to, is the single table
:data:`TRANSITIONS`; anything else raises :class:`~fedmqtt.coordinator.errors.IllegalEvent` and leaves
the state untouched.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedmqtt.coordinator.errors import IllegalEvent, StateDictError
from fedmqtt.errors import ConfigError
from fedmqtt.schema import ID_PATTERN, MAX_SAMPLES_LIMIT, FrameHeader, FrameKind, Phase, RefusalReason, Status

_ID_RE = re.compile(ID_PATTERN)
STATE_VERSION: Literal[1] = 1

# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------


def _require_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(name, f"must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class RoundConfig:
    """How the coordinator runs rounds. Validated on construction (raises :class:`ConfigError`).

    - ``rounds``: how many rounds the job runs (rounds are numbered from 1).
    - ``min_updates``: the quorum K; a round closes as soon as K updates are accepted (or every
      selected device answered, when fewer than K were selected).
    - ``round_timeout``: seconds from opening a round to its deadline.
    - ``min_devices``: devices that must be online before a round opens (default ``min_updates``).
    - ``devices_per_round``: fixed-size selection, uniformly without replacement among online devices
      (``None`` = every online device). Must be >= ``min_updates``.
    - ``sample_rate``: Poisson selection instead (each online device independently with probability q),
      as differential-privacy accounting assumes. Excludes ``devices_per_round``.
    - ``min_updates_at_deadline``: fewest updates a round may close with at its deadline (default 1).
    - ``max_attempts``: how many times one round may be opened; after that many failures the job stops.
    - ``seed``: seeds the selection RNG (numpy PCG64).
    - ``max_samples``: the largest sample count (FedAvg weight) an update may claim; the plan states it.
    """

    job: str
    rounds: int
    min_updates: int
    round_timeout: float
    min_devices: int | None = None
    devices_per_round: int | None = None
    min_updates_at_deadline: int = 1
    max_attempts: int = 3
    seed: int = 0
    sample_rate: float | None = None
    max_samples: int = MAX_SAMPLES_LIMIT

    def __post_init__(self) -> None:
        if not isinstance(self.job, str) or not _ID_RE.match(self.job):
            raise ConfigError("job", f"{self.job!r} is not a valid job id: use 1-64 characters from A-Z a-z 0-9 _ . -")
        _require_int("rounds", self.rounds, 1)
        _require_int("min_updates", self.min_updates, 1)
        timeout = self.round_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not math.isfinite(timeout):
            raise ConfigError("round_timeout", f"must be a finite number of seconds, got {timeout!r}")
        if timeout <= 0:
            raise ConfigError("round_timeout", f"must be > 0 seconds, got {timeout}")
        if self.min_devices is None:
            object.__setattr__(self, "min_devices", self.min_updates)
        _require_int("min_devices", self.min_devices, 1)
        if self.devices_per_round is not None:
            _require_int("devices_per_round", self.devices_per_round, 1)
            if self.devices_per_round < self.min_updates:
                raise ConfigError(
                    "devices_per_round",
                    f"{self.devices_per_round} selected devices can never reach the quorum "
                    f"min_updates={self.min_updates}; raise devices_per_round or lower min_updates",
                )
        _require_int("min_updates_at_deadline", self.min_updates_at_deadline, 1)
        if self.min_updates_at_deadline > self.min_updates:
            raise ConfigError(
                "min_updates_at_deadline",
                f"{self.min_updates_at_deadline} is above the quorum min_updates={self.min_updates}",
            )
        _require_int("max_attempts", self.max_attempts, 1)
        _require_int("seed", self.seed, 0)
        _require_int("max_samples", self.max_samples, 1)
        if self.max_samples > MAX_SAMPLES_LIMIT:
            raise ConfigError("max_samples", f"must be <= {MAX_SAMPLES_LIMIT}, got {self.max_samples}")
        if self.sample_rate is not None:
            q = self.sample_rate
            if isinstance(q, bool) or not isinstance(q, int | float) or not (0.0 < q <= 1.0):
                raise ConfigError("sample_rate", f"must be a probability in (0, 1], got {q!r}")
            if self.devices_per_round is not None:
                raise ConfigError(
                    "sample_rate",
                    "Poisson sampling (sample_rate) and fixed-size selection (devices_per_round) "
                    "exclude each other; set only one",
                )

    @property
    def devices_needed(self) -> int:
        """``min_devices`` after defaulting (always an int)."""
        assert self.min_devices is not None  # set in __post_init__
        return self.min_devices


# ---------------------------------------------------------------------------------------------------
# Actions: what the adapter must do
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenRound:
    """Publish the plan of a new round (or of a new attempt at the same round)."""

    round: int
    attempt: int  # 0 = first try, 1 = first retry, ...
    selected: tuple[str, ...]
    deadline: float
    opened_at: float


@dataclass(frozen=True)
class UpdateAccepted:
    """Keep this device's update for the open round (the adapter folds it into the strategy)."""

    device: str
    round: int
    num_samples: int


@dataclass(frozen=True)
class UpdateRefused:
    device: str
    round: int | None
    reason: RefusalReason
    detail: str


@dataclass(frozen=True)
class CloseRound:
    """The round is closed: aggregate the accepted updates, publish the model, then ``aggregation_done``.

    ``closed_by="quorum"``: enough updates arrived. ``"deadline"``: the round closed below quorum, either
    at its deadline or earlier because no selected device that has not answered is still online.
    """

    round: int
    attempt: int
    participants: tuple[str, ...]  # in order of acceptance
    closed_by: Literal["quorum", "deadline"]
    opened_at: float
    closed_at: float
    num_samples: int
    refused: Mapping[RefusalReason, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundFailed:
    """The round attempt ended without an aggregate: drop whatever was buffered for it.

    ``skipped=False``: the same round is retried with a new selection (a later ``OpenRound`` with
    ``attempt + 1``, possibly after waiting for devices) or, after ``max_attempts``, the job stops (a ``JobStopped`` follows).
    ``skipped=True``: a Poisson draw selected nobody; the round counts as run (the global model stays,
    the accountant has stepped on its ``OpenRound``) and the next round number follows.
    """

    round: int
    attempt: int
    reason: str
    skipped: bool = False


@dataclass(frozen=True)
class JobFinished:
    reason: str


class StopCause(StrEnum):
    """Why a job stopped before its last round: the adapter's exit code comes from this, never from the text."""

    PRIVACY_BUDGET = "privacy_budget"  # the next round would pass --target-epsilon: a rule of the job, exit 0
    TARGET_ACCURACY = "target_accuracy"  # a round reached --target-accuracy: a rule of the job, exit 0
    ROUND_FAILURES = "round_failures"  # a round failed max_attempts times
    EXTERNAL = "external"  # stop() from outside the machine
    SIGNAL = "signal"  # the process was asked to stop (SIGTERM, SIGINT): a pause, --resume continues the job

    @property
    def by_rule(self) -> bool:
        """The job ended as configured (not a failure)."""
        return self in (StopCause.PRIVACY_BUDGET, StopCause.TARGET_ACCURACY)

    @property
    def resumable(self) -> bool:
        """The job did not end: its checkpoint keeps the state it stopped from (see RoundMachine.state_dict)."""
        return self is StopCause.SIGNAL


@dataclass(frozen=True)
class JobStopped:
    reason: str
    cause: StopCause = StopCause.EXTERNAL


@dataclass(frozen=True)
class DeviceOnline:
    device: str


@dataclass(frozen=True)
class DeviceOffline:
    device: str


@dataclass(frozen=True)
class StatusChanged:
    """Something in ``snapshot()`` changed: publish the retained status message."""


Action = (
    OpenRound
    | UpdateAccepted
    | UpdateRefused
    | CloseRound
    | RoundFailed
    | JobFinished
    | JobStopped
    | DeviceOnline
    | DeviceOffline
    | StatusChanged
)

# ---------------------------------------------------------------------------------------------------
# Screening of incoming updates
# ---------------------------------------------------------------------------------------------------


class Verdict(StrEnum):
    ACCEPTABLE = "acceptable"
    REDELIVERY = "redelivery"  # an MQTT QoS 1 re-delivery of an accepted update: ignore silently
    REFUSED = "refused"


@dataclass(frozen=True)
class Screening:
    """The answer of :meth:`RoundMachine.screen_update`.

    ``Screening.ACCEPTABLE`` and ``Screening.REDELIVERY`` are singletons (compare with ``is``); a refusal
    unpacks as ``reason, detail = screening``.
    """

    ACCEPTABLE: ClassVar[Screening]
    REDELIVERY: ClassVar[Screening]

    verdict: Verdict
    reason: RefusalReason | None = None
    detail: str = ""

    def __iter__(self) -> Iterator[Any]:
        return iter((self.reason, self.detail))

    @property
    def acceptable(self) -> bool:
        return self.verdict is Verdict.ACCEPTABLE

    @property
    def redelivery(self) -> bool:
        return self.verdict is Verdict.REDELIVERY

    @property
    def refused(self) -> bool:
        return self.verdict is Verdict.REFUSED

    @classmethod
    def refusal(cls, reason: RefusalReason, detail: str) -> Screening:
        return cls(Verdict.REFUSED, reason, detail)


ACCEPTABLE = Screening.ACCEPTABLE = Screening(Verdict.ACCEPTABLE)
REDELIVERY = Screening.REDELIVERY = Screening(Verdict.REDELIVERY)

# ---------------------------------------------------------------------------------------------------
# The transition table
# ---------------------------------------------------------------------------------------------------


class Stage(StrEnum):
    """The machine's phase; ``NEW`` (before ``start``) is reported as ``Phase.WAITING``."""

    NEW = "new"
    WAITING = Phase.WAITING.value
    TRAINING = Phase.TRAINING.value
    AGGREGATING = Phase.AGGREGATING.value
    FINISHED = Phase.FINISHED.value
    STOPPED = Phase.STOPPED.value


class EventName(StrEnum):
    START = "start"
    DEVICE_STATUS = "device_status"
    ACCEPT_UPDATE = "accept_update"
    REFUSE_UPDATE = "refuse_update"
    TICK = "tick"
    AGGREGATION_DONE = "aggregation_done"
    AGGREGATION_FAILED = "aggregation_failed"
    TARGET_REACHED = "target_reached"
    ABANDON_ATTEMPT = "abandon_attempt"
    STOP = "stop"


_S = Stage
_E = EventName
# Opening a round can chain through empty Poisson draws to the end of the job, and a failure can end in
# a retry (TRAINING), a wait for devices (WAITING) or a stop; hence these result sets.
_OPEN_RESULTS = frozenset({_S.WAITING, _S.TRAINING, _S.FINISHED, _S.STOPPED})  # STOPPED: budget, target reached
_ROUND_RESULTS = frozenset({_S.TRAINING, _S.AGGREGATING, _S.WAITING, _S.STOPPED, _S.FINISHED})
_QUIET = frozenset({_E.DEVICE_STATUS, _E.TICK, _E.REFUSE_UPDATE})

#: (phase, event) -> the phases the event may leave the machine in. Missing pairs are illegal.
TRANSITIONS: dict[tuple[Stage, EventName], frozenset[Stage]] = {
    (_S.NEW, _E.START): _OPEN_RESULTS,
    (_S.NEW, _E.DEVICE_STATUS): frozenset({_S.NEW}),  # retained statuses arrive before start
    (_S.NEW, _E.REFUSE_UPDATE): frozenset({_S.NEW}),
    (_S.NEW, _E.STOP): frozenset({_S.STOPPED}),
    (_S.WAITING, _E.DEVICE_STATUS): _OPEN_RESULTS,
    (_S.WAITING, _E.TICK): _OPEN_RESULTS,
    (_S.WAITING, _E.REFUSE_UPDATE): frozenset({_S.WAITING}),
    (_S.WAITING, _E.STOP): frozenset({_S.STOPPED}),
    (_S.TRAINING, _E.DEVICE_STATUS): _ROUND_RESULTS,  # last selected device offline: close or fail
    (_S.TRAINING, _E.TICK): _ROUND_RESULTS,  # deadline: close or fail
    (_S.TRAINING, _E.ACCEPT_UPDATE): _ROUND_RESULTS,  # quorum, or nobody left to answer
    (_S.TRAINING, _E.REFUSE_UPDATE): frozenset({_S.TRAINING}),
    (_S.TRAINING, _E.STOP): frozenset({_S.STOPPED}),
    (_S.AGGREGATING, _E.AGGREGATION_DONE): _OPEN_RESULTS,
    # A strategy that cannot aggregate what arrived (non-finite result, too few updates for Krum): the attempt
    # fails like a deadline without quorum: retried, or the job stops after max_attempts.
    (_S.AGGREGATING, _E.AGGREGATION_FAILED): frozenset({_S.WAITING, _S.TRAINING, _S.STOPPED, _S.FINISHED}),
    (_S.AGGREGATING, _E.STOP): frozenset({_S.STOPPED}),
    # The adapter cannot account for the open attempt any more (a coordinator restarted in the middle of an attempt
    # whose updates aggregator workers hold): a new attempt opens; this alone never stops the job.
    (_S.TRAINING, _E.ABANDON_ATTEMPT): _OPEN_RESULTS,
    (_S.AGGREGATING, _E.ABANDON_ATTEMPT): _OPEN_RESULTS,
    # Pipelined evaluation: the model of a closed round reached --target-accuracy while the next round waits or
    # trains; the job stops there. In AGGREGATING the adapter passes it to aggregation_done instead; after the
    # end of the job it changes nothing.
    (_S.WAITING, _E.TARGET_REACHED): frozenset({_S.STOPPED}),
    (_S.TRAINING, _E.TARGET_REACHED): frozenset({_S.STOPPED}),
    (_S.FINISHED, _E.TARGET_REACHED): frozenset({_S.FINISHED}),
    (_S.STOPPED, _E.TARGET_REACHED): frozenset({_S.STOPPED}),
    **{(_S.AGGREGATING, e): frozenset({_S.AGGREGATING}) for e in _QUIET},
    **{(_S.FINISHED, e): frozenset({_S.FINISHED}) for e in _QUIET},
    **{(_S.STOPPED, e): frozenset({_S.STOPPED}) for e in _QUIET},
}

# ---------------------------------------------------------------------------------------------------
# Checkpoint format (validated with pydantic on load)
# ---------------------------------------------------------------------------------------------------


class _Accepted(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    body_blake2b: str
    num_samples: int = Field(ge=0)


class _SavedState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    version: Literal[1]
    job: str
    stage: Stage
    round: int = Field(ge=0)
    attempts_opened: int = Field(ge=0)
    online: list[str]
    selected: list[str]
    opened_at: float | None
    deadline: float | None
    accepted: dict[str, _Accepted]  # insertion order = order of acceptance
    refused_round: dict[RefusalReason, int]
    refused_total: dict[RefusalReason, int]
    end_reason: str | None
    # None: running or finished, or a checkpoint written before causes were recorded.
    end_cause: StopCause | None = None
    rng: dict[str, Any]


# ---------------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------------

DeviceStateName = Literal["online", "training", "offline"]
_DEVICE_STATES = ("online", "training", "offline")


@dataclass
class _Accept:
    body_blake2b: str
    num_samples: int


class RoundMachine:
    """Runs the rounds of one job. Every public event method returns the actions to carry out, in order.

    The adapter should call :meth:`tick` periodically (e.g. every second): rounds open on ``tick`` or
    ``device_status`` once enough devices are online, and deadlines are enforced only by ``tick``.
    """

    def __init__(self, config: RoundConfig) -> None:
        self.config = config
        self._stage = Stage.NEW
        self._round = 0
        self._attempts = 0  # attempts opened for the current round; the attempt index is this - 1
        self._online: set[str] = set()
        self._selected: tuple[str, ...] = ()
        self._selected_set: frozenset[str] = frozenset()
        # Selected devices that are online and have not answered: who the round still waits for.
        # Derived from selection, online set and accepted set; kept up to date so events stay O(1).
        self._awaiting: set[str] = set()
        self._opened_at: float | None = None
        self._deadline: float | None = None
        self._accepted: dict[str, _Accept] = {}
        self._refused_round: Counter[RefusalReason] = Counter()
        self._refused_total: Counter[RefusalReason] = Counter()
        self._end_reason: str | None = None
        self._end_cause: StopCause | None = None
        # A resumable stop (signal): the state it stopped from, which state_dict returns from then on.
        self._resume_point: dict[str, Any] | None = None
        # Rounds that may still open before the job stops (None: no limit), and the stop reason then: the
        # privacy budget, set by the adapter from its privacy policy (see set_round_budget).
        self._budget: int | None = None
        self._budget_reason = ""
        self._rng = np.random.Generator(np.random.PCG64(config.seed))
        # Devices whose last will arrived while the broker connection was in doubt (a broker restart publishes
        # the wills of clients that never died): device -> when the will takes effect unless it comes back.
        self._suspect: dict[str, float] = {}
        # Why rounds may not open now although enough devices are online (None: they may), set by the adapter
        # (scale-out aggregation: fewer aggregator workers online than the job needs). See set_open_gate.
        self._gate: str | None = None

    # -- read-only views -------------------------------------------------------------------------

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def phase(self) -> Phase:
        return Phase.WAITING if self._stage is Stage.NEW else Phase(self._stage.value)

    @property
    def round(self) -> int:
        """The round being run (0 before ``start``); in WAITING, the round that opens next."""
        return self._round

    @property
    def attempt(self) -> int:
        """Index of the current (or last) attempt at this round: 0 = first try, 1 = first retry, ..."""
        return max(self._attempts - 1, 0)

    @property
    def attempts_opened(self) -> int:
        """How many times the current round has been opened (0 = not yet)."""
        return self._attempts

    @property
    def online(self) -> frozenset[str]:
        return frozenset(self._online)

    @property
    def selected(self) -> tuple[str, ...]:
        return self._selected

    @property
    def deadline(self) -> float | None:
        return self._deadline

    @property
    def accepted(self) -> dict[str, int]:
        """Devices accepted in the current round -> their ``num_samples`` (in order of acceptance)."""
        return {d: a.num_samples for d, a in self._accepted.items()}

    @property
    def needed(self) -> int:
        """Updates that close the open round by quorum: ``min_updates``, or fewer if fewer were selected."""
        if self._stage in (Stage.TRAINING, Stage.AGGREGATING):
            return min(self.config.min_updates, len(self._selected))
        return self.config.min_updates

    @property
    def refused_total(self) -> dict[RefusalReason, int]:
        return dict(self._refused_total)

    @property
    def refused_this_round(self) -> dict[RefusalReason, int]:
        return dict(self._refused_round)

    @property
    def done(self) -> bool:
        return self._stage in (Stage.FINISHED, Stage.STOPPED)

    @property
    def end_reason(self) -> str | None:
        return self._end_reason

    @property
    def end_cause(self) -> StopCause | None:
        """Why the job stopped (None while it runs and after it finished)."""
        return self._end_cause

    @property
    def round_budget(self) -> int | None:
        return self._budget

    def set_round_budget(self, rounds: int | None, reason: str = "") -> None:
        """Allow only ``rounds`` more rounds to open (None: no limit); when the next would be one too many,
        the job stops with ``JobStopped(reason, StopCause.PRIVACY_BUDGET)`` instead.

        The privacy policy states how many rounds at the planned noise fit under the target ε
        (:meth:`fedmqtt.privacy.policy.RoundPrivacy.budget`). Each empty Poisson draw uses one (the adapter
        charges it at the planned noise); after a round is aggregated and accounted, the adapter sets the
        budget again before :meth:`aggregation_done`. Not an event: it changes nothing until a round opens.
        """
        if rounds is not None:
            _require_int("rounds", rounds, 0)
        self._budget = rounds
        self._budget_reason = reason or "privacy budget: no round left"

    @property
    def gate(self) -> str | None:
        return self._gate

    def set_open_gate(self, reason: str | None) -> None:
        """Hold rounds from opening (``reason``: why, e.g. "waiting for aggregators: 1 of 2 online") or let them
        open again (None). Not an event: a round waiting in WAITING opens on the next ``tick`` or ``device_status``
        once the gate is open; a round already open is not affected."""
        self._gate = reason

    def snapshot(self, now: float) -> Status:
        """The retained status message (without privacy and metrics: the adapter adds those)."""
        in_round = self._stage in (Stage.TRAINING, Stage.AGGREGATING)
        return Status(
            job=self.config.job,
            round=self._round,
            rounds_total=self.config.rounds,
            attempt=self.attempt,
            phase=self.phase,
            received=len(self._accepted) if in_round else 0,
            needed=self.needed,
            deadline=self._deadline if self._stage is Stage.TRAINING else None,
            devices_online=len(self._online),
            selected=self._selected if in_round else (),
            refused_total=sum(self._refused_total.values()),
            updated_at=now,
        )

    def _status_key(self) -> tuple[object, ...]:
        """What ``snapshot`` shows, cheaply (no message validation): compared before/after each event."""
        in_round = self._stage in (Stage.TRAINING, Stage.AGGREGATING)
        return (
            self._round,
            self._attempts,
            self._stage,
            len(self._accepted) if in_round else 0,
            self.needed,
            self._deadline,
            len(self._online),
            self._selected if in_round else (),
            sum(self._refused_total.values()),
        )

    # -- screening (a pure query) ----------------------------------------------------------------

    def screen_update(self, device: str, header: FrameHeader, model_hash: str | None = None) -> Screening:
        """Decide what to do with an update frame that arrived on ``device``'s update topic.

        ``model_hash``: the hash of the global model the open round published; an update computed against
        another model is refused. No state changes. Refusals are reported with :meth:`refuse_update`.
        """
        r = self._round
        if header.kind is not FrameKind.UPDATE:
            return Screening.refusal(
                RefusalReason.WRONG_KIND, f"a {header.kind.value} frame on an update topic; expected update"
            )
        if header.job != self.config.job:
            return Screening.refusal(
                RefusalReason.WRONG_JOB, f"frame is for job {header.job!r}, this is job {self.config.job!r}"
            )
        if header.sender != device:
            return Screening.refusal(
                RefusalReason.SENDER_MISMATCH,
                f"header sender {header.sender!r} arrived on the update topic of {device!r}",
            )
        if self._stage is Stage.NEW or r == 0:
            return Screening.refusal(RefusalReason.NO_OPEN_ROUND, "the job has not opened a round yet")
        if header.round < r:
            return Screening.refusal(
                RefusalReason.STALE_ROUND, f"update for round {header.round}, current round is {r}"
            )
        if header.round > r:
            return Screening.refusal(
                RefusalReason.FUTURE_ROUND, f"update for round {header.round}, current round is {r}"
            )
        previous = self._accepted.get(device)
        if previous is not None:
            if previous.body_blake2b == header.body_blake2b:
                return REDELIVERY
            return Screening.refusal(
                RefusalReason.DUPLICATE,
                f"{device} already has an accepted update in round {r}; the first one counts",
            )
        if self._stage is Stage.WAITING:
            return Screening.refusal(
                RefusalReason.NO_OPEN_ROUND, f"round {r} is not open (waiting for devices to retry it)"
            )
        if self._stage is not Stage.TRAINING:
            return Screening.refusal(RefusalReason.STALE_ROUND, f"round {r} is already closed")
        if device not in self._selected_set:
            return Screening.refusal(
                RefusalReason.NOT_SELECTED, f"{device} is not selected in round {r} (attempt {self.attempt})"
            )
        if model_hash is not None and header.base_model_hash != model_hash:
            return Screening.refusal(
                RefusalReason.WRONG_BASE_MODEL,
                f"update computed against model {str(header.base_model_hash)[:12]}, round {r} published "
                f"{model_hash[:12]}",
            )
        if not 1 <= header.num_samples <= self.config.max_samples:
            return Screening.refusal(
                RefusalReason.BAD_SAMPLE_COUNT,
                f"num_samples {header.num_samples} is outside 1..{self.config.max_samples} (the plan's bound)",
            )
        return ACCEPTABLE

    # -- events ----------------------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Begin the job: wait for ``min_devices`` online devices, or open round 1 at once."""
        return self._run(EventName.START, lambda actions: self._on_start(now, actions))

    def device_status(self, device: str, state: str, now: float, *, grace_until: float | None = None) -> list[Action]:
        """A device's retained status changed (``training`` counts as online; ``offline`` is the last will).

        ``grace_until``: the adapter's connection to the broker was in doubt (a broker restart publishes the last
        wills of clients that never died): an ``offline`` takes effect only at ``grace_until`` (on a ``tick``),
        unless the device says ``online`` again before.
        """
        if state not in _DEVICE_STATES:
            raise IllegalEvent(
                self._stage.value, EventName.DEVICE_STATUS, f"state {state!r} is not one of {_DEVICE_STATES}"
            )
        if not isinstance(device, str) or not _ID_RE.match(device):
            raise IllegalEvent(self._stage.value, EventName.DEVICE_STATUS, f"invalid device id {device!r}")
        if state == "offline" and grace_until is not None and now < grace_until and device in self._online:
            self._suspect[device] = grace_until
            return []
        self._suspect.pop(device, None)
        return self._run(EventName.DEVICE_STATUS, lambda a: self._on_device_status(device, state, now, a))

    def accept_update(self, device: str, header: FrameHeader, now: float) -> list[Action]:
        """Record an update that :meth:`screen_update` found acceptable."""

        def handle(actions: list[Action]) -> None:
            screening = self.screen_update(device, header)
            if not screening.acceptable:
                detail = screening.detail or "a re-delivery of an accepted update"
                raise IllegalEvent(self._stage.value, EventName.ACCEPT_UPDATE, f"not acceptable: {detail}")
            self._on_accept(device, header, now, actions)

        return self._run(EventName.ACCEPT_UPDATE, handle)

    def refuse_update(
        self, device: str, round: int | None, reason: RefusalReason, detail: str, now: float
    ) -> list[Action]:
        """Count a refused update (found by ``screen_update`` or by the adapter's decoding and checks)."""
        try:
            reason = RefusalReason(reason)
        except ValueError:
            raise IllegalEvent(
                self._stage.value, EventName.REFUSE_UPDATE, f"{reason!r} is not a RefusalReason"
            ) from None

        def handle(actions: list[Action]) -> None:
            if self._stage is Stage.TRAINING:
                self._refused_round[reason] += 1
            self._refused_total[reason] += 1
            actions.append(UpdateRefused(device, round, reason, detail))

        return self._run(EventName.REFUSE_UPDATE, handle)

    def tick(self, now: float, *, hold_deadline: bool = False) -> list[Action]:
        """Let time pass: open a waiting round, end an open round at its deadline, apply wills whose grace ran out.

        ``hold_deadline``: the adapter is not (or only just again) connected to the broker, so updates sent in time
        may still be on their way: the deadline waits.
        """
        actions: list[Action] = []
        for device, until in list(self._suspect.items()):
            # While the adapter's own link is in doubt, no will takes effect: it may be a broker shutting down.
            if now >= until and not hold_deadline:
                del self._suspect[device]
                actions += self._run(EventName.DEVICE_STATUS, self._offline_handler(device, now))
        return actions + self._run(EventName.TICK, lambda a: self._on_tick(now, a, hold_deadline))

    def aggregation_done(self, round: int, now: float, *, target_reached: str | None = None) -> list[Action]:
        """The adapter aggregated round ``round`` and published the new model.

        ``target_reached``: the reason, when the new model met the job's goal (``--target-accuracy``, judged by
        the adapter, which evaluates): the job stops with ``JobStopped(reason, StopCause.TARGET_ACCURACY)``
        instead of opening the next round. After the last round the job finishes as usual.
        """
        if round != self._round:
            raise IllegalEvent(
                self._stage.value,
                EventName.AGGREGATION_DONE,
                f"round {round} finished aggregating, but round {self._round} is the one closed",
            )
        return self._run(EventName.AGGREGATION_DONE, lambda actions: self._next_round(now, actions, target_reached))

    def target_reached(self, reason: str, now: float) -> list[Action]:
        """The model of an already closed round met --target-accuracy, judged when its evaluation arrived (the
        adapter evaluates off the critical path, so the next round may already wait or train): stop the job with
        ``JobStopped(reason, StopCause.TARGET_ACCURACY)``; the open round's updates are dropped. After the job
        ended it changes nothing; while a round is being aggregated, pass it to :meth:`aggregation_done`."""

        def handle(actions: list[Action]) -> None:
            if self._stage in (Stage.WAITING, Stage.TRAINING):
                self._stop(reason, actions, StopCause.TARGET_ACCURACY)

        return self._run(EventName.TARGET_REACHED, handle)

    def _offline_handler(self, device: str, now: float) -> Callable[[list[Action]], None]:
        return lambda actions: self._on_device_status(device, "offline", now, actions)

    def aggregation_failed(self, round: int, reason: str, now: float) -> list[Action]:
        """The adapter could not aggregate round ``round`` (e.g. a non-finite result): fail this attempt."""
        if round != self._round:
            raise IllegalEvent(
                self._stage.value,
                EventName.AGGREGATION_FAILED,
                f"round {round} failed to aggregate, but round {self._round} is the one closed",
            )
        return self._run(
            EventName.AGGREGATION_FAILED, lambda actions: self._fail(now, f"aggregation failed: {reason}", actions)
        )

    def abandon_attempt(self, reason: str, now: float) -> list[Action]:
        """The adapter lost what the open (or closing) attempt held: fail it with ``RoundFailed(reason)`` and open
        the next attempt (or wait for devices). Unlike a failure it never stops the job itself, even when it was
        the ``max_attempts``-th attempt (the attempts it opens still count for later failures)."""
        return self._run(EventName.ABANDON_ATTEMPT, lambda actions: self._fail(now, reason, actions, counted=False))

    def stop(self, reason: str, now: float, cause: StopCause = StopCause.EXTERNAL) -> list[Action]:
        """End the job from outside."""
        return self._run(EventName.STOP, lambda actions: self._stop(reason, actions, cause))

    # -- the one place that enforces the table -----------------------------------------------------

    def _run(self, event: EventName, handler: Callable[[list[Action]], None]) -> list[Action]:
        allowed = TRANSITIONS.get((self._stage, event))
        if allowed is None:
            raise IllegalEvent(self._stage.value, event.value)
        before = self._status_key()
        actions: list[Action] = []
        handler(actions)
        # The table is the specification; a handler that leaves it is a bug in this module.
        assert self._stage in allowed, f"{event} led to {self._stage}, table allows {sorted(allowed)}"
        if self._status_key() != before:
            actions.append(StatusChanged())
        return actions

    # -- handlers --------------------------------------------------------------------------------

    def _on_start(self, now: float, actions: list[Action]) -> None:
        if self._out_of_budget(actions):  # not even round 1 fits
            return
        self._stage = Stage.WAITING
        self._round = 1
        self._attempts = 0
        self._open_or_wait(now, actions)

    def _on_device_status(self, device: str, state: str, now: float, actions: list[Action]) -> None:
        if state == "offline":
            if device in self._online:
                self._online.discard(device)
                actions.append(DeviceOffline(device))
                if device in self._awaiting:
                    self._awaiting.discard(device)
                    if self._stage is Stage.TRAINING:
                        self._check_exhausted(now, actions)
        elif device not in self._online:
            self._online.add(device)
            actions.append(DeviceOnline(device))
            if device in self._selected_set and device not in self._accepted:
                self._awaiting.add(device)
            if self._stage is Stage.WAITING:
                self._open_or_wait(now, actions)

    def _on_accept(self, device: str, header: FrameHeader, now: float, actions: list[Action]) -> None:
        self._accepted[device] = _Accept(header.body_blake2b, header.num_samples)
        self._awaiting.discard(device)
        actions.append(UpdateAccepted(device, self._round, header.num_samples))
        if len(self._accepted) >= self.needed:
            self._close(now, "quorum", actions)
        else:
            self._check_exhausted(now, actions)

    def _on_tick(self, now: float, actions: list[Action], hold_deadline: bool = False) -> None:
        if self._stage is Stage.WAITING:
            self._open_or_wait(now, actions)
        elif self._stage is Stage.TRAINING and not hold_deadline:
            assert self._deadline is not None
            if now >= self._deadline:
                got = len(self._accepted)
                if got >= self.config.min_updates_at_deadline:
                    self._close(now, "deadline", actions)
                else:
                    self._fail(
                        now,
                        f"deadline passed with {got} update(s); at least "
                        f"{self.config.min_updates_at_deadline} needed to close",
                        actions,
                    )

    # -- building blocks -------------------------------------------------------------------------

    def _set_selection(self, selected: tuple[str, ...]) -> None:
        self._selected = selected
        self._selected_set = frozenset(selected)
        self._awaiting = {d for d in selected if d in self._online and d not in self._accepted}

    def _check_exhausted(self, now: float, actions: list[Action]) -> None:
        # A round never waits for a dead device: once nobody left can answer, decide now.
        if self._awaiting:
            return
        got = len(self._accepted)
        if got >= self.config.min_updates_at_deadline:
            self._close(now, "deadline", actions)
        else:
            self._fail(
                now,
                f"no selected device left online to answer; {got} update(s) received, at least "
                f"{self.config.min_updates_at_deadline} needed to close",
                actions,
            )

    def _draw(self) -> tuple[str, ...]:
        candidates = sorted(self._online)
        q = self.config.sample_rate
        if q is not None:
            mask = self._rng.random(len(candidates)) < q
            return tuple(d for d, keep in zip(candidates, mask, strict=True) if keep)
        k = self.config.devices_per_round
        if k is None or k >= len(candidates):
            return tuple(candidates)
        picked = self._rng.choice(len(candidates), size=k, replace=False)
        return tuple(sorted(candidates[i] for i in picked))

    def _open_or_wait(self, now: float, actions: list[Action]) -> None:
        """In WAITING: open the next attempt of ``self._round`` if enough devices are online."""
        while True:
            if len(self._online) < self.config.devices_needed or self._gate is not None:
                self._stage = Stage.WAITING
                return
            self._attempts += 1
            if self._attempts == 1:
                self._refused_round.clear()
            self._accepted = {}
            self._set_selection(self._draw())
            self._opened_at = now
            self._deadline = now + float(self.config.round_timeout)
            self._stage = Stage.TRAINING
            actions.append(OpenRound(self._round, self.attempt, self._selected, self._deadline, now))
            if self._selected:
                return
            # Only Poisson sampling can select nobody. Re-drawing would bias the sampling that DP
            # accounting assumes, so the draw stands: the round counts as run and is recorded as skipped.
            actions.append(
                RoundFailed(
                    self._round,
                    self.attempt,
                    f"Poisson sampling (q={self.config.sample_rate}) selected none of "
                    f"{len(self._online)} online devices",
                    skipped=True,
                )
            )
            if self._budget is not None:
                self._budget = max(0, self._budget - 1)  # the draw is charged at the planned noise
            if not self._advance(now, actions) or self._out_of_budget(actions):
                return

    def _out_of_budget(self, actions: list[Action]) -> bool:
        """Stop before opening a round the budget has no room for."""
        if self._budget is None or self._budget > 0:
            return False
        self._stop(self._budget_reason, actions, StopCause.PRIVACY_BUDGET)
        return True

    def _close(self, now: float, closed_by: Literal["quorum", "deadline"], actions: list[Action]) -> None:
        assert self._opened_at is not None
        self._stage = Stage.AGGREGATING
        self._deadline = None
        actions.append(
            CloseRound(
                round=self._round,
                attempt=self.attempt,
                participants=tuple(self._accepted),
                closed_by=closed_by,
                opened_at=self._opened_at,
                closed_at=now,
                num_samples=sum(a.num_samples for a in self._accepted.values()),
                refused=dict(self._refused_round),
            )
        )

    def _fail(self, now: float, reason: str, actions: list[Action], *, counted: bool = True) -> None:
        actions.append(RoundFailed(self._round, self.attempt, reason))
        self._accepted = {}
        self._set_selection(())
        self._deadline = None
        self._opened_at = None
        if counted and self._attempts >= self.config.max_attempts:
            self._stop(
                f"round {self._round} failed {self._attempts} time(s) (max_attempts={self.config.max_attempts}); "
                f"last failure: {reason}",
                actions,
                StopCause.ROUND_FAILURES,
            )
            return
        self._stage = Stage.WAITING
        self._open_or_wait(now, actions)

    def _advance(self, now: float, actions: list[Action]) -> bool:
        """Move past the current round. Returns False when the job is finished."""
        self._accepted = {}
        self._set_selection(())
        self._deadline = None
        self._opened_at = None
        if self._round >= self.config.rounds:
            self._stage = Stage.FINISHED
            self._end_reason = f"completed all {self.config.rounds} rounds"
            actions.append(JobFinished(self._end_reason))
            return False
        self._round += 1
        self._attempts = 0
        self._stage = Stage.WAITING
        return True

    def _next_round(self, now: float, actions: list[Action], target_reached: str | None = None) -> None:
        if self._round < self.config.rounds and target_reached is not None:
            self._stop(target_reached, actions, StopCause.TARGET_ACCURACY)
            return
        if self._round < self.config.rounds and self._out_of_budget(actions):
            return  # stopped on the round just aggregated: the next one would pass the budget
        if self._advance(now, actions):
            self._open_or_wait(now, actions)

    def _stop(self, reason: str, actions: list[Action], cause: StopCause = StopCause.EXTERNAL) -> None:
        if cause.resumable:
            self._resume_point = self.state_dict()
        self._stage = Stage.STOPPED
        self._deadline = None
        self._end_reason = reason
        self._end_cause = cause
        actions.append(JobStopped(reason, cause))

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as JSON-able values (big RNG integers are stored as strings).

        After a resumable stop (:attr:`StopCause.resumable`), the state the machine stopped from: the job goes on
        from there when it is loaded again."""
        if self._resume_point is not None:
            return copy.deepcopy(self._resume_point)
        rng = self._rng.bit_generator.state
        saved = _SavedState(
            version=STATE_VERSION,
            job=self.config.job,
            stage=self._stage,
            round=self._round,
            attempts_opened=self._attempts,
            online=sorted(self._online),
            selected=list(self._selected),
            opened_at=self._opened_at,
            deadline=self._deadline,
            accepted={
                d: _Accepted(body_blake2b=a.body_blake2b, num_samples=a.num_samples) for d, a in self._accepted.items()
            },
            refused_round=dict(self._refused_round),
            refused_total=dict(self._refused_total),
            end_reason=self._end_reason,
            end_cause=self._end_cause,
            rng={
                "bit_generator": rng["bit_generator"],
                "state": str(rng["state"]["state"]),
                "inc": str(rng["state"]["inc"]),
                "has_uint32": int(rng["has_uint32"]),
                "uinteger": int(rng["uinteger"]),
            },
        )
        return saved.model_dump(mode="json")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this machine's state with a saved one; raises :class:`StateDictError`, changing nothing."""
        try:
            saved = _SavedState.model_validate(dict(state))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "state"
            raise StateDictError("round machine", f"{where}: {first['msg']}") from None
        if saved.job != self.config.job:
            raise StateDictError(
                "round machine", f"the checkpoint is of job {saved.job!r}, this machine runs {self.config.job!r}"
            )
        if saved.round > self.config.rounds:
            raise StateDictError(
                "round machine",
                f"the checkpoint is at round {saved.round}, beyond rounds={self.config.rounds}; "
                "raise rounds to continue this job",
            )
        stray = [d for d in saved.accepted if d not in saved.selected]
        if stray:
            raise StateDictError("round machine", f"accepted devices {stray} are not in the selection")
        in_round = saved.stage in (Stage.TRAINING, Stage.AGGREGATING)
        if saved.stage is Stage.TRAINING and (saved.deadline is None or saved.opened_at is None):
            raise StateDictError("round machine", "an open round needs opened_at and deadline")
        if in_round and saved.attempts_opened < 1:
            raise StateDictError("round machine", "a round in progress needs attempts_opened >= 1")
        rng = np.random.Generator(np.random.PCG64())
        try:
            rng.bit_generator.state = {
                "bit_generator": saved.rng["bit_generator"],
                "state": {"state": int(saved.rng["state"]), "inc": int(saved.rng["inc"])},
                "has_uint32": int(saved.rng["has_uint32"]),
                "uinteger": int(saved.rng["uinteger"]),
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise StateDictError("round machine", f"rng: {exc}") from None
        self._stage = saved.stage
        self._round = saved.round
        self._attempts = saved.attempts_opened
        self._online = set(saved.online)
        self._opened_at = saved.opened_at
        self._deadline = saved.deadline
        self._accepted = {d: _Accept(a.body_blake2b, a.num_samples) for d, a in saved.accepted.items()}
        self._set_selection(tuple(saved.selected))
        self._refused_round = Counter(saved.refused_round)
        self._refused_total = Counter(saved.refused_total)
        self._end_reason = saved.end_reason
        self._end_cause = saved.end_cause
        if saved.stage is Stage.STOPPED and saved.end_cause is None:  # written before causes were recorded
            legacy = (saved.end_reason or "").startswith("privacy budget")
            self._end_cause = StopCause.PRIVACY_BUDGET if legacy else StopCause.ROUND_FAILURES
        self._rng = rng
        self._resume_point = None

    @classmethod
    def from_state_dict(cls, config: RoundConfig, state: Mapping[str, Any]) -> RoundMachine:
        machine = cls(config)
        machine.load_state_dict(state)
        return machine
