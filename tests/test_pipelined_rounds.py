"""Pipelined rounds on a real Mosquitto: the coordinator publishes the next plan as soon as a round's aggregate
exists and evaluates the model meanwhile; the accuracy reaches the round's summary (published again) later.

The coordinator runs in-process (a thread) with a real evaluation set; devices are played with hand-made frames
(tests/harness.py). The evaluation is made slow deterministically: ``fedmqtt.training.evaluate`` waits on an Event
the test holds before it evaluates for real (the only stand-in here: it controls time, not results).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fedmqtt.schema import EventType, Phase, RoundSummary, Status, from_json
from harness import MODEL, WAIT, Job

FIELDS_PATCHED = {"accuracy", "loss", "evaluated_model"}


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("idx"), num_train=10, num_test=100, seed=5)


class SlowEvaluation:
    """``fedmqtt.training.evaluate`` made to wait on ``gate`` (and to raise on the calls in ``fail_calls``). A wait
    the coordinator cancels (its ``cancelled`` argument turns True) goes on into the real evaluation at once, which
    stops at its first batch: ``cancelled_calls`` counts these."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from fedmqtt import training

        self.gate = threading.Event()
        self.started = threading.Event()
        self.calls = 0
        self.cancelled_calls = 0
        self.fail_calls: set[int] = set()
        real = training.evaluate

        def evaluate(model: Any, dataset: Any, **kw: Any) -> tuple[float, float]:
            self.calls += 1
            self.started.set()
            cancelled = kw.get("cancelled") or (lambda: False)
            deadline = time.monotonic() + WAIT
            while not self.gate.wait(0.01):
                if cancelled():
                    self.cancelled_calls += 1
                    break
                assert time.monotonic() < deadline, "the test never opened the evaluation gate"
            if self.calls in self.fail_calls:
                raise RuntimeError(f"injected evaluation failure (call {self.calls})")
            return real(model, dataset, **kw)

        monkeypatch.setattr(training, "evaluate", evaluate)


@pytest.fixture
def slow(monkeypatch: pytest.MonkeyPatch) -> SlowEvaluation:
    return SlowEvaluation(monkeypatch)


def make_config(job: Job, eval_dir: Path, **overrides: Any) -> Any:
    from fedmqtt.coordinator.config import CoordinatorConfig

    values: dict[str, Any] = {
        "broker": job.broker_url, "job": job.name, "prefix": job.prefix, "model": MODEL, "rounds": 3,
        "min_updates": 1, "min_devices": 1, "round_timeout": 60, "eval_data": eval_dir, "quiet": True,
    }  # fmt: skip
    values.update(overrides)
    return CoordinatorConfig.model_validate(values)


@contextmanager
def running(config: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
    """A CoordinatorService run in a thread; ``result["code"]`` once it returns."""
    from fedmqtt.coordinator.service import CoordinatorService

    service = CoordinatorService(config)
    result: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            result["code"] = service.run()
        except BaseException as exc:  # reported by the test
            result["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    result["done"] = done
    try:
        yield service, result
    finally:
        if thread.is_alive():
            service.exit_code = 1  # ends the run loop
        thread.join(timeout=15)


def exit_code(result: dict[str, Any]) -> int:
    assert result["done"].wait(WAIT), "the coordinator did not return"
    assert "error" not in result, result.get("error")
    return int(result["code"])


def record_rounds_and_status(mqtt_client: Callable[..., Any], job: Job) -> list[tuple[str, Any]]:
    """Every round summary and status the coordinator publishes, in the order one subscriber receives them
    (both QoS 1 from one publisher: the broker keeps their order)."""
    seen: list[tuple[str, Any]] = []
    topics = job.topics

    def on_message(topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        if not payload:
            return
        if topic == topics.status:
            seen.append(("status", from_json(Status, payload).phase))
        elif topics.round_of_summary(topic) is not None:
            seen.append(("summary", from_json(RoundSummary, payload)))

    mqtt_client(job.broker_url, subscriptions=[(topics.rounds_filter, 1), (topics.status, 1)], on_message=on_message)
    return seen


def train_round(job: Job, round_number: int) -> None:
    job.view.wait_plan(round_number)
    job.devices.send("d1", job.frame(round_number, "d1", 0.001 * round_number))


def summary_with_accuracy(job: Job, round_number: int) -> RoundSummary:
    view = job.view
    return view.wait_until(
        f"round {round_number}'s summary with its accuracy",
        lambda: s if (s := view.summaries.get(round_number)) is not None and s.evaluated_model is not None else None,
    )


def test_devices_get_the_next_plan_before_the_evaluation_ends_and_no_summary_is_lost(
    mosquitto_broker: Any,
    make_job: Callable[[str], Job],
    mqtt_client: Callable[..., Any],
    slow: SlowEvaluation,
    eval_dir: Path,
) -> None:
    job = make_job(mosquitto_broker.url)
    seen = record_rounds_and_status(mqtt_client, job)
    with running(make_config(job, eval_dir)) as (service, result):
        job.devices.online("d1")
        train_round(job, 1)
        first = job.view.wait_summary(1)
        assert slow.started.wait(WAIT)  # round 1's model is being evaluated, and the gate holds it there
        plan_2 = job.view.wait_plan(2)
        # The plan of round 2 is out while round 1's evaluation is still held: pipelined.
        assert not slow.gate.is_set()
        assert not [e for e in job.view.events if e.type is EventType.ROUND_EVALUATED]
        assert first.accuracy is None and first.loss is None and first.evaluated_model is None
        slow.gate.set()
        evaluated = job.view.wait_event(EventType.ROUND_EVALUATED, round=1)
        patched = summary_with_accuracy(job, 1)
        assert patched.evaluated_model == plan_2.model_hash and plan_2.model_hash[:12] in evaluated.detail
        assert patched.accuracy is not None and 0.0 <= patched.accuracy <= 1.0 and patched.loss is not None
        assert patched.model_dump(exclude=FIELDS_PATCHED) == first.model_dump(exclude=FIELDS_PATCHED)
        job.view.wait_status("round 1's accuracy", lambda s: s.last_metrics is not None)
        train_round(job, 2)
        train_round(job, 3)
        job.view.wait_event(EventType.JOB_FINISHED)
        assert exit_code(result) == 0
    finals = [summary_with_accuracy(job, n) for n in (1, 2, 3)]
    assert all(s.accuracy is not None and s.evaluated_model is not None for s in finals)
    assert [h["accuracy"] for h in service.history] == [s.accuracy for s in finals]
    # In the order published: each round's summary, then the same with its accuracy, before the next round's;
    # the job's final status only after the last accuracy.
    job.view.wait_until("the final status recorded", lambda: True if ("status", Phase.FINISHED) in seen else None)
    order = [(item.round, item.evaluated_model is not None) for kind, item in seen if kind == "summary"]
    assert order == [(1, False), (1, True), (2, False), (2, True), (3, False), (3, True)]
    last_summary = max(i for i, (kind, _) in enumerate(seen) if kind == "summary")
    assert seen.index(("status", Phase.FINISHED)) > last_summary


def test_an_evaluation_that_fails_is_reported_and_the_job_goes_on(
    mosquitto_broker: Any, make_job: Callable[[str], Job], slow: SlowEvaluation, eval_dir: Path
) -> None:
    job = make_job(mosquitto_broker.url)
    slow.gate.set()
    slow.fail_calls = {2}
    with running(make_config(job, eval_dir)) as (_, result):
        job.devices.online("d1")
        for n in (1, 2, 3):
            train_round(job, n)
        failed = job.view.wait_event(EventType.ROUND_EVALUATED, round=2)
        assert "failed: RuntimeError: injected evaluation failure (call 2); accuracy unknown" in failed.detail
        job.view.wait_event(EventType.JOB_FINISHED)
        assert exit_code(result) == 0
    assert summary_with_accuracy(job, 3).accuracy is not None
    two = job.view.summaries[2]
    assert two.accuracy is None and two.evaluated_model is None and two.participants == ("d1",)


def test_eval_every_evaluates_every_nth_round_and_the_last_only(
    mosquitto_broker: Any, make_job: Callable[[str], Job], slow: SlowEvaluation, eval_dir: Path
) -> None:
    job = make_job(mosquitto_broker.url)
    slow.gate.set()
    with running(make_config(job, eval_dir, rounds=5, eval_every=2)) as (service, result):
        job.devices.online("d1")
        for n in range(1, 6):
            train_round(job, n)
        job.view.wait_event(EventType.JOB_FINISHED)
        assert exit_code(result) == 0
    evaluated = [e.round for e in job.view.events if e.type is EventType.ROUND_EVALUATED]
    assert evaluated == [2, 4, 5] and slow.calls == 3  # rounds 1 and 3 cost no evaluation
    # The job's end comes after the last round's accuracy, on the events topic as in the summaries.
    assert [e.type for e in job.view.events][-2:] == [EventType.ROUND_EVALUATED, EventType.JOB_FINISHED]
    assert [s.round for s in (summary_with_accuracy(job, n) for n in (2, 4, 5))] == [2, 4, 5]
    assert [h["accuracy"] is not None for h in service.history] == [False, True, False, True, True]
    assert all(job.view.summaries[n].participants == ("d1",) for n in (1, 3))  # recorded, without accuracy


def test_the_target_reached_while_the_next_round_trains_stops_the_job(
    mosquitto_broker: Any, make_job: Callable[[str], Job], slow: SlowEvaluation, eval_dir: Path
) -> None:
    job = make_job(mosquitto_broker.url)
    with running(make_config(job, eval_dir, target_accuracy=0.01)) as (service, result):
        job.devices.online("d1")
        train_round(job, 1)
        job.view.wait_plan(2)  # round 1's accuracy is not known yet: round 2 opened
        slow.gate.set()
        stopped = job.view.wait_event(EventType.JOB_STOPPED)
        assert "target accuracy 0.01 reached" in stopped.detail and "after round 1" in stopped.detail
        assert exit_code(result) == 0
    status = job.view.wait_status("stopped", lambda s: s.phase is Phase.STOPPED)
    assert status.round == 2 and status.last_metrics is not None
    assert summary_with_accuracy(job, 1).accuracy == status.last_metrics.accuracy
    assert 2 not in job.view.summaries and service.machine.end_cause.value == "target_accuracy"


def test_a_pause_leaves_the_evaluation_to_resume_which_evaluates_the_checkpoints_model(
    mosquitto_broker: Any, make_job: Callable[[str], Job], slow: SlowEvaluation, eval_dir: Path, tmp_path: Path
) -> None:
    job = make_job(mosquitto_broker.url)
    config = make_config(job, eval_dir, rounds=2, checkpoint_dir=tmp_path / "ckpt")
    with running(config) as (service, result):
        job.devices.online("d1")
        train_round(job, 1)
        plan_2 = job.view.wait_plan(2)
        assert slow.started.wait(WAIT)
        service.request_stop(signal.SIGTERM)  # the evaluation is held: the pause cancels it, does not wait for it
        assert exit_code(result) == 128 + signal.SIGTERM
        assert service.history[0]["accuracy"] is None
        assert slow.cancelled_calls == 1 and not slow.gate.is_set()
        assert "fedmqtt-evaluation" not in [t.name for t in threading.enumerate()]  # ended before run() returned
    slow.gate.set()
    with running(config.model_copy(update={"resume": True})) as (_, result):
        evaluated = job.view.wait_event(EventType.ROUND_EVALUATED, round=1)
        assert plan_2.model_hash[:12] in evaluated.detail
        assert summary_with_accuracy(job, 1).evaluated_model == plan_2.model_hash
        job.devices.send("d1", job.frame(2, "d1", 0.002))
        job.view.wait_event(EventType.JOB_FINISHED)
        assert exit_code(result) == 0
    assert summary_with_accuracy(job, 2).accuracy is not None
