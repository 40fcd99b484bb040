"""The device's pure core: what a device does with each plan and each coordinator presence. No MQTT, no torch,
no clock.

The device side's counterpart of :meth:`fedmqtt.coordinator.machine.RoundMachine.screen_update`. The adapter
(``device/agent.py``) parses messages, asks :meth:`DeviceScreen.screen` what to do with a plan, carries the
answer out, and records what it saw and answered here.

A plan is answered at most once per *run* of the job: answers are keyed by ``(run_id, round, attempt)``, so a
plan of another run (a stale retained plan, a re-run of a finished job id) never blocks the plans of the
current one. Within one run rounds never go backwards.

Devices learn that a run ended from the coordinator's retained presence (``PREFIX/JOB/coordinator``,
:class:`fedmqtt.schema.CoordinatorPresence`), which changes only on job lifecycle transitions, not from the job
status (a heartbeat at least once a second: n deliveries a second for a fleet of n devices). A presence whose
``phase`` is finished/stopped ends a device's service (``--exit-on-finish``) only when it is the presence of the
run the device serves: a device started for a new run must not obey the retained presence the previous run left
behind; it waits for the new run's plans. A coordinator's last will (``offline``, no phase) ends nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol

from fedmqtt.device.train_time import time_problem
from fedmqtt.schema import CoordinatorPresence, DeviceStatus, DPMode, DPPlan, Plan

# How much a device remembers; old runs and rounds fall out first (insertion order).
MAX_ANSWERS = 256
MAX_RUNS = 16

Run = str | None  # a plan's run id; None for a coordinator that does not state one
PlanKey = tuple[Run, int, int]  # (run_id, round, attempt)


class Decision(StrEnum):
    TAKE = "take"  # train and send an update
    IGNORE = "ignore"  # not for this device, or not any more: no answer
    DECLINE = "decline"  # selected, but cannot serve it: answer with a device status that says why


class PlanReason(StrEnum):
    """Why a plan is ignored or declined."""

    WRONG_JOB = "wrong_job"
    NOT_SELECTED = "not_selected"
    ALREADY_ANSWERED = "already_answered"
    RUN_ENDED = "run_ended"  # the coordinator's presence says this plan's run is finished or stopped
    STALE = "stale"  # older than the newest plan seen in the same run
    SUPERSEDED = "superseded"  # a newer plan (or the plan's withdrawal) is already queued
    EXPIRED = "expired"  # its deadline passed before the device could start
    UNKNOWN_MODEL = "unknown_model"
    PRIVACY_BUDGET = "privacy_budget"
    TRAINING_TIME = "training_time"  # it would train longer than --max-train-seconds or than the deadline allows


@dataclass(frozen=True)
class PlanScreening:
    """The answer of :meth:`DeviceScreen.screen`. ``PlanScreening.TAKE`` is a singleton."""

    TAKE: ClassVar[PlanScreening]

    decision: Decision
    reason: PlanReason | None = None
    detail: str = ""

    @classmethod
    def ignore(cls, reason: PlanReason, detail: str) -> PlanScreening:
        return cls(Decision.IGNORE, reason, detail)

    @classmethod
    def decline(cls, reason: PlanReason, detail: str) -> PlanScreening:
        return cls(Decision.DECLINE, reason, detail)

    @property
    def take(self) -> bool:
        return self.decision is Decision.TAKE

    @property
    def ignored(self) -> bool:
        return self.decision is Decision.IGNORE

    @property
    def declined(self) -> bool:
        return self.decision is Decision.DECLINE


PlanScreening.TAKE = PlanScreening(Decision.TAKE)


class BudgetCheck(Protocol):
    """What screening asks of a device's privacy ledger (:class:`fedmqtt.privacy.DeviceLedger`)."""

    budget: float

    @property
    def epsilon(self) -> float: ...

    def would_exceed(self, plan: DPPlan) -> bool: ...


def plan_key(plan: Plan) -> PlanKey:
    return (plan.run_id, plan.round, plan.attempt)


def run_label(run: Run) -> str:
    return run if run is not None else "(no run id)"


def reported_samples(plan: Plan, num_samples: int) -> int:
    """The sample count an update reports: the device's count, capped at the plan's ``max_samples``."""
    return min(num_samples, plan.max_samples)


def newer_plan(candidate: Plan, than: Plan) -> bool:
    """Whether ``candidate`` supersedes ``than`` (same job): in one run, a later (round, attempt) (the
    coordinator has one open round per run, so this holds whoever it selects); across runs, a later issue time."""
    if candidate.job != than.job:
        return False
    if candidate.run_id == than.run_id:
        return (candidate.round, candidate.attempt) > (than.round, than.attempt)
    return candidate.issued_at > than.issued_at


def foreign_instance(status: DeviceStatus, *, device: str, instance: str, since: float) -> bool:
    """Whether a status seen on this device's own status topic shows another process using the same device id.

    It does when another instance published it, stamped no earlier than ``since`` (this process's start: the
    previous process's retained leftover, or a message it left queued in the MQTT session, is older), saying
    the device is up (a clean exit's ``offline`` and the last will are no conflict). Two processes with one
    client id share one MQTT session, so neither receives the other's statuses live; each sees the other's
    retained status every time it reconnects and subscribes again.
    """
    return (
        status.device == device
        and status.instance is not None
        and status.instance != instance
        and status.state != "offline"
        and status.ts is not None
        and status.ts >= since
    )


def _remember(mapping: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    mapping.pop(key, None)
    mapping[key] = value
    while len(mapping) > limit:
        del mapping[next(iter(mapping))]


@dataclass
class DeviceScreen:
    """One device's memory of plans and of the runs that ended, and the rules applied to them.

    ``screen`` changes nothing; ``observe``, ``answer`` and ``on_presence`` record.
    """

    job: str
    device: str
    # Answered plans (taken or declined), oldest first; persisted across restarts (state_dict).
    answered: dict[PlanKey, None] = field(default_factory=dict)
    # The newest (round, attempt) seen per run, whoever was selected.
    newest: dict[Run, tuple[int, int]] = field(default_factory=dict)
    # Runs with a plan seen at all (retained ones included) / runs this device takes part in (it answered one
    # of their plans, or received one live, i.e. published while it listened); the last joined is current.
    seen_runs: dict[Run, None] = field(default_factory=dict)
    joined_runs: dict[Run, None] = field(default_factory=dict)
    # Runs a coordinator presence said are finished or stopped.
    ended_runs: dict[Run, None] = field(default_factory=dict)

    @property
    def current_run(self) -> Run:
        """The run this device serves (the last it joined); None also when it has joined none (see ``joined``)."""
        return next(reversed(self.joined_runs)) if self.joined_runs else None

    @property
    def joined(self) -> bool:
        return bool(self.joined_runs)

    # --- plans ------------------------------------------------------------------------------------

    def screen(
        self,
        plan: Plan,
        *,
        now: float,
        queued: Sequence[Plan | CoordinatorPresence | None] = (),
        known_models: Collection[str] | None = None,
        ledger: BudgetCheck | None = None,
        train_estimate: float | None = None,
        max_train_seconds: float | None = None,
    ) -> PlanScreening:
        """What to do with ``plan``, received on the job's plan topic.

        ``queued``: what arrived for this device after the plan and is still waiting in its inbox, oldest first:
        plans, coordinator presences, and None for a cleared (withdrawn) retained plan. ``known_models``: the model names
        this device can build (None: do not check). ``ledger``: the device's privacy ledger, if it keeps one.
        ``train_estimate``: seconds this device's training for the plan is estimated to take
        (:class:`fedmqtt.device.train_time.TrainTimeEstimator`; None: no estimate yet, so it is tried), checked
        against ``max_train_seconds`` and the plan's deadline by :func:`fedmqtt.device.train_time.time_problem`.
        """
        if plan.job != self.job:
            return PlanScreening.ignore(
                PlanReason.WRONG_JOB, f"plan is for job {plan.job!r}, this device serves job {self.job!r}"
            )
        where = f"round {plan.round} (attempt {plan.attempt}) of run {run_label(plan.run_id)}"
        if self.device not in plan.selected:
            return PlanScreening.ignore(PlanReason.NOT_SELECTED, f"{self.device} is not selected in {where}")
        key = plan_key(plan)
        if key in self.answered:
            return PlanScreening.ignore(PlanReason.ALREADY_ANSWERED, f"{where} is already answered")
        if plan.run_id in self.ended_runs or any(
            isinstance(q, CoordinatorPresence) and q.job == self.job and q.run_id == plan.run_id and q.phase is not None
            for q in queued
        ):
            return PlanScreening.ignore(PlanReason.RUN_ENDED, f"run {run_label(plan.run_id)} is over")
        newest = self.newest.get(plan.run_id)
        if newest is not None and (plan.round, plan.attempt) < newest:
            return PlanScreening.ignore(
                PlanReason.STALE, f"{where} is older than round {newest[0]} (attempt {newest[1]}) of that run"
            )
        for q in queued:
            if q is None:
                return PlanScreening.ignore(PlanReason.SUPERSEDED, f"{where} was withdrawn (plan topic cleared)")
            if isinstance(q, Plan) and newer_plan(q, plan):
                return PlanScreening.ignore(
                    PlanReason.SUPERSEDED,
                    f"{where} is superseded by round {q.round} (attempt {q.attempt}) of run {run_label(q.run_id)}",
                )
        if now > plan.deadline:
            return PlanScreening.ignore(PlanReason.EXPIRED, f"the deadline of {where} passed before it could start")
        if known_models is not None and plan.model_name not in known_models:
            return PlanScreening.decline(
                PlanReason.UNKNOWN_MODEL,
                f"unknown model {plan.model_name!r}; this device knows {', '.join(sorted(known_models))}",
            )
        dp = plan.dp
        if dp is not None and dp.mode is not DPMode.OFF and ledger is not None and ledger.would_exceed(dp):
            return PlanScreening.decline(
                PlanReason.PRIVACY_BUDGET,
                f"privacy budget: this round would take the device past epsilon {ledger.budget:g} "
                f"(spent {ledger.epsilon:.3f})",
            )
        problem = time_problem(train_estimate, max_seconds=max_train_seconds, now=now, deadline=plan.deadline)
        if problem is not None:
            return PlanScreening.decline(PlanReason.TRAINING_TIME, problem)
        return PlanScreening.TAKE

    def observe(self, plan: Plan, *, live: bool) -> None:
        """Record a plan of this job as seen. ``live``: it was published while the device listened (not a
        retained message replayed on subscribing), so its run is going on now."""
        if plan.job != self.job:
            return
        here = (plan.round, plan.attempt)
        before = self.newest.get(plan.run_id)
        _remember(self.newest, plan.run_id, here if before is None else max(before, here), MAX_RUNS)
        _remember(self.seen_runs, plan.run_id, None, MAX_RUNS)
        if live:
            self._join(plan.run_id)

    def answer(self, plan: Plan) -> None:
        """Record that this device took or declined ``plan`` (it will not answer it again)."""
        _remember(self.answered, plan_key(plan), None, MAX_ANSWERS)
        self._join(plan.run_id)

    def _join(self, run: Run) -> None:
        if self.joined_runs and next(reversed(self.joined_runs)) == run:
            return
        _remember(self.joined_runs, run, None, MAX_RUNS)

    # --- coordinator presence ---------------------------------------------------------------------

    def on_presence(self, presence: CoordinatorPresence, *, live: bool) -> bool:
        """Record a coordinator presence; return whether it ends this device's service (for ``--exit-on-finish``).

        It does when its ``phase`` says finished/stopped and its run is the one this device serves: the run it
        last answered a plan of or received a live plan of. A device that has joined no run yet accepts a presence
        published live (it was listening when the job ended, e.g. a privacy budget too small for round 1 ends a
        run before any plan); a retained presence replayed on subscribing is the previous run's news and is not
        obeyed. An ``online`` presence of a run (a resumed run keeps its run id) says that run goes on; the last
        will of a coordinator that died (``offline``, no phase) changes nothing: the job is not over.
        """
        if presence.job != self.job:
            return False
        if presence.phase is None:  # the schema admits only an end phase (finished, stopped) here
            if presence.state == "online":
                self.ended_runs.pop(presence.run_id, None)
            return False
        _remember(self.ended_runs, presence.run_id, None, MAX_RUNS)
        if self.joined:
            return presence.run_id == self.current_run
        return live

    # --- persistence ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"answered": [[run, r, a] for run, r, a in self.answered]}

    def load_state_dict(self, state: Mapping[str, Any] | Iterable[Any]) -> None:
        """Load answers saved by :meth:`state_dict`; also reads the older ``[[round, attempt], ...]`` form
        (answers without a run id). Entries that do not fit either form are dropped."""
        entries = state.get("answered", []) if isinstance(state, Mapping) else state
        for entry in entries:
            if not isinstance(entry, list | tuple):
                continue
            if len(entry) == 2:
                entry = [None, *entry]
            if len(entry) != 3:
                continue
            run, r, a = entry
            if (run is None or isinstance(run, str)) and all(isinstance(x, int) and x >= 0 for x in (r, a)):
                _remember(self.answered, (run, r, a), None, MAX_ANSWERS)
