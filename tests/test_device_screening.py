"""The device's pure core (fedmqtt.device.screening): which plans a device takes, ignores or declines, and which
coordinator presences end its service. No broker, no torch; time is an argument."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmqtt.device.screening import (
    MAX_ANSWERS,
    Decision,
    DeviceScreen,
    PlanReason,
    PlanScreening,
    foreign_instance,
    newer_plan,
    plan_key,
    reported_samples,
)
from fedmqtt.schema import (
    CodecSpec,
    CoordinatorPresence,
    DeviceStatus,
    DPMode,
    DPPlan,
    MessageError,
    Phase,
    Plan,
    from_json,
    to_json,
)

JOB = "job1"
DEV = "d1"
NOW = 1_700_000_000.0
RUN_A = "a" * 16
RUN_B = "b" * 16
MODELS = ("mlp", "cnn")


def plan(round: int = 1, attempt: int = 0, run_id: str | None = RUN_A, **kw: Any) -> Plan:
    fields: dict[str, Any] = {
        "job": JOB,
        "round": round,
        "attempt": attempt,
        "selected": (DEV, "d2"),
        "deadline": NOW + 60,
        "issued_at": NOW,
        "local_epochs": 1,
        "batch_size": 10,
        "learning_rate": 0.1,
        "uplink": CodecSpec(),
        "model_name": "mlp",
        "model_hash": "0" * 64,
        "run_id": run_id,
    }
    fields.update(kw)
    return Plan(**fields)


def presence(phase: Phase | None, run_id: str | None = RUN_A, **kw: Any) -> CoordinatorPresence:
    """The coordinator's presence: ``stopped`` with the job's end phase, else ``online`` (``state`` overrides)."""
    fields: dict[str, Any] = {"job": JOB, "instance": "c" * 16, "run_id": run_id, "started_at": NOW, "ts": NOW}
    fields["state"] = "stopped" if phase is not None else "online"
    fields.update(kw)
    return CoordinatorPresence(phase=phase, **fields)


def screen() -> DeviceScreen:
    return DeviceScreen(job=JOB, device=DEV)


def check(s: DeviceScreen, p: Plan, now: float = NOW, **kw: Any) -> PlanScreening:
    kw.setdefault("known_models", MODELS)
    return s.screen(p, now=now, **kw)


class Ledger:
    """A stand-in budget with the DeviceLedger interface (the real ledger is tested in test_privacy_ledger)."""

    def __init__(self, exceed: bool) -> None:
        self.budget = 2.0
        self.epsilon = 1.5
        self.exceed = exceed

    def would_exceed(self, plan: DPPlan) -> bool:
        return self.exceed


def dp_plan(mode: DPMode = DPMode.LOCAL) -> DPPlan:
    return DPPlan(mode=mode, clip=1.0, noise_multiplier=1.0, device_noise_std=1.0, expected_updates=2,
                  sample_rate=1.0, delta=1e-5)  # fmt: skip


# --- plans ----------------------------------------------------------------------------------------


def test_a_valid_plan_is_taken() -> None:
    assert check(screen(), plan()) is PlanScreening.TAKE


def test_ignored_plans_name_their_reason() -> None:
    s = screen()
    assert check(s, plan(job="other")).reason is PlanReason.WRONG_JOB
    assert check(s, plan(selected=("d2",))).reason is PlanReason.NOT_SELECTED
    expired = check(s, plan(deadline=NOW - 1))
    assert expired.ignored and expired.reason is PlanReason.EXPIRED and "deadline" in expired.detail


def test_an_answered_plan_is_not_answered_again_but_another_run_s_same_round_is() -> None:
    """The wedge: a declined retained plan of another run must not block the real (round 1, attempt 0)."""
    s = screen()
    rogue = plan(run_id=None, model_name="resnet-9000")
    first = check(s, rogue)
    assert first.declined and first.reason is PlanReason.UNKNOWN_MODEL and "resnet-9000" in first.detail
    s.observe(rogue, live=False)
    s.answer(rogue)
    assert check(s, rogue).reason is PlanReason.ALREADY_ANSWERED
    real = plan(run_id=RUN_A)
    assert check(s, real) is PlanScreening.TAKE
    s.observe(real, live=False)
    s.answer(real)
    assert check(s, real).reason is PlanReason.ALREADY_ANSWERED
    # The same round's next attempt of the same run is a new plan.
    assert check(s, plan(run_id=RUN_A, attempt=1)) is PlanScreening.TAKE


def test_rounds_never_go_backwards_within_a_run_but_a_new_run_starts_over() -> None:
    s = screen()
    s.observe(plan(round=3, attempt=1, selected=("d2",)), live=True)  # seen, even if not selected
    assert check(s, plan(round=3, attempt=0)).reason is PlanReason.STALE
    assert check(s, plan(round=2, attempt=5)).reason is PlanReason.STALE
    assert check(s, plan(round=3, attempt=1)) is PlanScreening.TAKE
    assert check(s, plan(round=4)) is PlanScreening.TAKE
    assert check(s, plan(round=1, run_id=RUN_B)) is PlanScreening.TAKE


def test_a_plan_superseded_by_a_queued_newer_plan_or_its_withdrawal_is_dropped() -> None:
    s = screen()
    old = plan(round=1)
    assert check(s, old, queued=[plan(round=2, selected=("d2",))]).reason is PlanReason.SUPERSEDED
    assert check(s, old, queued=[plan(round=1, attempt=1)]).reason is PlanReason.SUPERSEDED
    assert check(s, old, queued=[None]).reason is PlanReason.SUPERSEDED  # the retained plan was cleared
    # Another run's plan issued later supersedes too (a new run of the job).
    assert check(s, old, queued=[plan(run_id=RUN_B, issued_at=NOW + 5)]).reason is PlanReason.SUPERSEDED
    # Not superseding: the same plan again (a redelivery), an older one, an earlier other run, another job.
    for later in (old, plan(round=0), plan(run_id=RUN_B, issued_at=NOW - 5), plan(round=9, job="other")):
        assert check(s, old, queued=[later]) is PlanScreening.TAKE, later


def test_newer_plan_is_a_strict_order_within_a_run() -> None:
    a, b = plan(round=1), plan(round=1, attempt=1)
    assert newer_plan(b, a) and not newer_plan(a, b) and not newer_plan(a, a)


def test_a_plan_of_an_ended_run_is_ignored_even_when_its_end_is_still_queued() -> None:
    s = screen()
    p = plan()
    assert check(s, p, queued=[presence(Phase.FINISHED)]).reason is PlanReason.RUN_ENDED
    assert check(s, p, queued=[presence(Phase.FINISHED, run_id=RUN_B)]) is PlanScreening.TAKE
    assert check(s, p, queued=[presence(None)]) is PlanScreening.TAKE
    s.on_presence(presence(Phase.STOPPED), live=False)
    assert check(s, p).reason is PlanReason.RUN_ENDED
    # A resumed run (--resume keeps the run id) is going again.
    s.on_presence(presence(None), live=True)
    assert check(s, p) is PlanScreening.TAKE


def test_the_privacy_budget_declines_a_dp_plan_only() -> None:
    s = screen()
    declined = check(s, plan(dp=dp_plan()), ledger=Ledger(exceed=True))
    assert declined.declined and declined.reason is PlanReason.PRIVACY_BUDGET
    assert declined.detail.startswith("privacy budget") and "epsilon 2" in declined.detail
    assert "spent 1.500" in declined.detail
    assert check(s, plan(dp=dp_plan()), ledger=Ledger(exceed=False)) is PlanScreening.TAKE
    assert check(s, plan(), ledger=Ledger(exceed=True)) is PlanScreening.TAKE  # no DP: nothing to spend
    assert check(s, plan(dp=dp_plan(DPMode.OFF)), ledger=Ledger(exceed=True)) is PlanScreening.TAKE


def test_ignoring_comes_before_declining() -> None:
    """A plan that is not for this device is never declined (no status message for other devices' rounds)."""
    s = screen()
    assert check(s, plan(model_name="nope", selected=("d2",))).ignored
    assert check(s, plan(model_name="nope", deadline=NOW - 1)).ignored
    assert check(s, plan(model_name="nope"), known_models=None) is PlanScreening.TAKE


def test_reported_samples_are_capped_at_the_plan_s_bound() -> None:
    assert reported_samples(plan(max_samples=100), 250) == 100
    assert reported_samples(plan(max_samples=100), 40) == 40
    assert reported_samples(plan(), 60_000) == 60_000


# --- coordinator presence (the job's end) ---------------------------------------------------------


def test_the_old_run_s_retained_finished_presence_does_not_end_a_new_device() -> None:
    s = screen()
    s.observe(plan(run_id=RUN_A), live=False)  # the old run's retained plan
    assert s.on_presence(presence(Phase.FINISHED, run_id=RUN_A), live=False) is False
    assert s.on_presence(presence(Phase.FINISHED, run_id=None), live=False) is False
    # The new run's plan arrives; the device serves it; that run's finished presence ends the device.
    new = plan(run_id=RUN_B, issued_at=NOW + 100)
    s.observe(new, live=True)
    s.answer(new)
    assert s.current_run == RUN_B
    assert s.on_presence(presence(Phase.FINISHED, run_id=RUN_A), live=True) is False  # late news of the old run
    assert s.on_presence(presence(None, run_id=RUN_B), live=True) is False
    assert s.on_presence(presence(Phase.FINISHED, run_id=RUN_B), live=True) is True
    assert s.on_presence(presence(Phase.STOPPED, run_id=RUN_B), live=False) is True


def test_a_device_never_selected_still_ends_with_the_run_it_listened_to() -> None:
    s = screen()
    s.observe(plan(selected=("d2",)), live=False)  # retained plan of the running run
    assert s.on_presence(presence(Phase.FINISHED), live=True) is True  # published while it listened


def test_a_run_that_ends_before_any_plan_ends_a_listening_device() -> None:
    """A privacy budget too small for round 1 stops the job before any plan: a device that was listening must
    still obey the live stopped presence (--exit-on-finish), while the same presence replayed as retained is not."""
    s = screen()
    assert s.on_presence(presence(Phase.STOPPED, run_id=RUN_B), live=False) is False
    assert s.on_presence(presence(Phase.STOPPED, run_id=RUN_B), live=True) is True


def test_a_live_plan_joins_its_run() -> None:
    s = screen()
    s.observe(plan(selected=("d2",)), live=True)
    assert s.joined and s.current_run == RUN_A
    assert s.on_presence(presence(Phase.FINISHED), live=False) is True


def test_a_presence_without_run_id_is_its_own_run() -> None:
    s = screen()
    assert s.on_presence(presence(Phase.FINISHED, run_id=None), live=False) is False
    legacy = plan(run_id=None)
    s.observe(legacy, live=True)
    s.answer(legacy)
    assert s.on_presence(presence(Phase.FINISHED, run_id=None), live=False) is True
    assert s.on_presence(presence(Phase.FINISHED, run_id=RUN_A), live=True) is False


def test_another_job_s_presence_is_ignored() -> None:
    s = screen()
    p = plan()
    s.observe(p, live=True)
    assert s.on_presence(presence(Phase.FINISHED, job="other"), live=True) is False
    assert check(s, p) is PlanScreening.TAKE


def test_a_coordinator_s_last_will_neither_ends_the_run_nor_revives_an_ended_one() -> None:
    """A coordinator that crashed (its will: ``offline``, no phase) has not finished the job: devices stay. Only an
    ``online`` presence of the run (a resumed run keeps its run id) says an ended run goes on."""
    s = screen()
    p = plan()
    s.observe(p, live=True)
    s.answer(p)
    assert s.on_presence(presence(None, state="offline"), live=True) is False
    assert s.on_presence(presence(None, state="offline"), live=False) is False
    assert check(s, plan(round=2)) is PlanScreening.TAKE
    assert check(s, plan(round=2), queued=[presence(None, state="offline")]) is PlanScreening.TAKE
    assert s.on_presence(presence(Phase.STOPPED), live=True) is True
    assert s.on_presence(presence(None, state="offline"), live=True) is False
    assert check(s, plan(round=2)).reason is PlanReason.RUN_ENDED  # the will of the ended run changes nothing
    assert s.on_presence(presence(None), live=True) is False  # --resume: the same run online again
    assert check(s, plan(round=2)) is PlanScreening.TAKE


def test_the_presence_carries_an_end_phase_only_when_the_job_ended() -> None:
    ended = presence(Phase.FINISHED)
    assert from_json(CoordinatorPresence, to_json(ended)) == ended
    assert from_json(CoordinatorPresence, to_json(presence(None))).phase is None
    for state, phase in [("online", "finished"), ("offline", "stopped"), ("stopped", "training")]:
        payload = to_json(presence(None, state="stopped")).replace(b'"phase":null', f'"phase":"{phase}"'.encode())
        payload = payload.replace(b'"state":"stopped"', f'"state":"{state}"'.encode())
        with pytest.raises(MessageError, match="phase"):
            from_json(CoordinatorPresence, payload)


# --- two processes, one device id ----------------------------------------------------------------

ME = "c" * 16
TWIN = "d" * 16


def test_a_recent_status_of_another_instance_on_the_own_topic_is_a_duplicate_id() -> None:
    def seen(**kw: Any) -> bool:
        fields: dict[str, Any] = {"device": DEV, "state": "online", "ts": NOW + 1, "instance": TWIN}
        fields.update(kw)
        return foreign_instance(DeviceStatus(**fields), device=DEV, instance=ME, since=NOW)

    assert seen()
    assert seen(state="training")
    assert not seen(instance=ME)  # our own status, echoed back
    assert not seen(instance=None)  # an agent that states no instance
    assert not seen(state="offline")  # a clean exit
    assert not seen(ts=NOW - 10)  # the previous process's leftover (retained or queued in the session)
    assert not seen(ts=None)  # the last will carries no time
    assert not seen(device="d2")


# --- persistence ----------------------------------------------------------------------------------


def test_answers_survive_a_restart_and_the_old_format_loads_as_answers_without_run() -> None:
    s = screen()
    for p in (plan(round=1), plan(round=2, run_id=None)):
        s.answer(p)
    restarted = screen()
    restarted.load_state_dict(s.state_dict())
    assert restarted.answered == s.answered
    old = screen()
    old.load_state_dict([[1, 0], [2, 1], "junk", [1, 2, 3, 4], [-1, 0], [True, "x"]])
    assert set(old.answered) == {(None, 1, 0), (None, 2, 1)}
    assert check(old, plan(round=1, run_id=None)).reason is PlanReason.ALREADY_ANSWERED
    assert check(old, plan(round=1, run_id=RUN_A)) is PlanScreening.TAKE


def test_memory_is_bounded() -> None:
    s = screen()
    for r in range(MAX_ANSWERS + 50):
        s.answer(plan(round=r))
    assert len(s.answered) == MAX_ANSWERS
    assert (RUN_A, MAX_ANSWERS + 49, 0) in s.answered and (RUN_A, 0, 0) not in s.answered
    for i in range(100):
        s.observe(plan(run_id=f"{i:016x}"), live=True)
    assert len(s.newest) <= 16 and len(s.seen_runs) <= 16 and len(s.joined_runs) <= 16


# --- properties -----------------------------------------------------------------------------------

plans = st.builds(
    plan,
    round=st.integers(0, 4),
    attempt=st.integers(0, 2),
    run_id=st.sampled_from([RUN_A, RUN_B, None]),
    selected=st.sampled_from([(DEV,), ("d2",), (DEV, "d2")]),
    deadline=st.sampled_from([NOW - 1, NOW + 60]),
    model_name=st.sampled_from(["mlp", "mlp", "nope"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(plans, st.booleans()), max_size=40))
def test_never_answers_a_plan_twice_and_never_goes_backwards_within_a_run(events: list[tuple[Plan, bool]]) -> None:
    """Over any sequence of plans (retained or live), handled as the adapter does (screen, observe, answer):
    every answer is for a distinct (run, round, attempt), the device is selected in it, and within one run the
    answered (round, attempt) strictly increase."""
    s = screen()
    answered: list[tuple[str | None, int, int]] = []
    for p, live in events:
        verdict = check(s, p)
        s.observe(p, live=live)
        if verdict.decision in (Decision.TAKE, Decision.DECLINE):
            assert DEV in p.selected and p.deadline >= NOW
            answered.append(plan_key(p))
            s.answer(p)
        # Whatever happened, the same plan is never answered again.
        assert check(s, p).decision is Decision.IGNORE or plan_key(p) not in answered
    assert len(answered) == len(set(answered))
    for run in {a[0] for a in answered}:
        keys = [(r, a) for run_id, r, a in answered if run_id == run]
        assert keys == sorted(keys)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(plans, st.booleans()), max_size=20), st.sampled_from([RUN_A, RUN_B, None]))
def test_a_retained_finished_presence_of_a_run_never_served_never_ends_the_device(
    events: list[tuple[Plan, bool]], old_run: str | None
) -> None:
    s = screen()
    for p, live in events:
        if p.run_id == old_run:
            live = False  # the old run's plans are all retained leftovers
        verdict = check(s, p)
        s.observe(p, live=live)
        if not verdict.ignored and p.run_id != old_run:
            s.answer(p)
    assert s.on_presence(presence(Phase.FINISHED, run_id=old_run), live=False) is False
