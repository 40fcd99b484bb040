"""The aggregator worker's synchronous core (fedmqtt.aggregator.worker.WorkerCore): no network, real spool files,
a hand-moved clock. tests/test_aggregator_worker.py runs the whole worker on Mosquitto."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from fedmqtt.aggregator.worker import DEFER_SECONDS, FLUSH_SECONDS, Step, WorkerCore, WorkerOptions
from fedmqtt.codecs import encode_frame, model_hash
from fedmqtt.mqtt.settings import BrokerSettings
from fedmqtt.schema import (
    PROGRESS_ENTRIES_MAX,
    AggregatorProgress,
    CodecSpec,
    FrameKind,
    ManifestEntry,
    Plan,
    RefusalReason,
    from_json,
    to_json,
)

JOB = "job"
RUN = "0123456789abcdef"
MANIFEST = (ManifestEntry(name="w", shape=(3, 2)), ManifestEntry(name="b", shape=(2,)))
MODEL = encode_frame(
    {e.name: np.zeros(e.shape, np.float32) for e in MANIFEST},
    kind=FrameKind.GLOBAL_MODEL, job=JOB, round=1, sender="coordinator", codec=CodecSpec(), run_id=RUN,
)  # fmt: skip
PLAN = Plan(
    job=JOB, round=1, selected=("d1", "d2", "d3"), deadline=1e10, issued_at=0.0, local_epochs=1, batch_size=8,
    learning_rate=0.1, uplink=CodecSpec(), model_name="mlp", model_hash=model_hash(MODEL), run_id=RUN,
)  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def core(spool: Path, clock: Clock) -> WorkerCore:
    options = WorkerOptions(broker=BrokerSettings(), job=JOB, worker="w1", spool=spool)
    return WorkerCore(options, clock=clock)


def update(device: str, value: float = 0.5, *, round: int = 1, sender: str | None = None) -> bytes:
    return encode_frame(
        {e.name: np.full(e.shape, value, np.float32) for e in MANIFEST},
        kind=FrameKind.UPDATE, job=JOB, round=round, sender=sender or device, codec=CodecSpec(), num_samples=4,
        base_model_hash=PLAN.model_hash,
    )  # fmt: skip


def entries(step: Step) -> list[tuple[str, bool, RefusalReason | None]]:
    out = []
    for p in step.publishes:
        message = from_json(AggregatorProgress, p.payload)
        out += [(e.device, e.accepted, e.reason) for e in message.entries]
    return out


def test_an_update_before_the_plan_waits_for_it_unacknowledged(tmp_path: Path) -> None:
    clock = Clock()
    c = core(tmp_path, clock)
    assert c.on_update("d1", update("d1"), "t1").acks == []  # held back: no plan, no model yet
    c.on_model(MODEL)
    step = c.on_plan(to_json(PLAN))
    assert step.acks == ["t1"]
    assert (tmp_path / RUN / "1-0" / "d1.frame").is_file()  # spooled before the ack is handed out
    clock.now += 2 * FLUSH_SECONDS
    assert entries(c.flush()) == [("d1", True, None)]


def test_a_wrong_sender_is_refused_at_once_and_an_update_no_plan_answers_is_refused_when_overdue(
    tmp_path: Path,
) -> None:
    clock = Clock()
    c = core(tmp_path, clock)
    assert c.on_update("d1", update("d1", sender="d2"), "forged").acks == ["forged"]
    assert c.on_update("d2", update("d2"), "early").acks == []
    clock.now += DEFER_SECONDS - 0.1
    assert c.refuse_overdue().acks == []
    clock.now += 0.2
    assert c.refuse_overdue().acks == ["early"]
    assert entries(c.flush(force=True)) == [
        ("d1", False, RefusalReason.SENDER_MISMATCH),
        ("d2", False, RefusalReason.NO_OPEN_ROUND),
    ]


def test_a_restarted_core_checks_queued_updates_at_once_and_reports_what_the_last_one_spooled(tmp_path: Path) -> None:
    clock = Clock()
    first = core(tmp_path, clock)
    first.on_model(MODEL)
    first.on_plan(to_json(PLAN))
    assert first.on_update("d1", update("d1", 0.25), "a").acks == ["a"]
    # The process dies before its progress went out. The next one knows the plan and manifest from its spool:
    second = core(tmp_path, clock)
    assert second.on_update("d2", update("d2", 0.5), "b").acks == ["b"]  # not held back
    second.re_report()
    assert sorted(entries(second.flush(force=True))) == [("d1", True, None), ("d2", True, None)]
    assert second.on_update("d1", update("d1", 0.25), "again").acks == ["again"]  # a redelivery: no new entry
    assert entries(second.flush(force=True)) == []


def test_progress_is_batched_by_at_most_the_schema_limit(tmp_path: Path) -> None:
    clock = Clock()
    c = core(tmp_path, clock)
    c.on_model(MODEL)
    c.on_plan(to_json(PLAN))
    for i in range(PROGRESS_ENTRIES_MAX + 10):
        c.on_update(f"x{i}", b"junk", i)
    step = c.flush()
    assert [len(from_json(AggregatorProgress, p.payload).entries) for p in step.publishes] == [PROGRESS_ENTRIES_MAX]
    clock.now += 2 * FLUSH_SECONDS
    assert len(entries(c.flush())) == 10


def test_a_later_plan_clears_the_spool_of_the_rounds_before(tmp_path: Path) -> None:
    clock = Clock()
    c = core(tmp_path, clock)
    c.on_model(MODEL)
    c.on_plan(to_json(PLAN))
    c.on_update("d1", update("d1"), "a")
    assert c.spool.devices(c.bucket.key) == ["d1"]  # type: ignore[union-attr]
    c.on_plan(to_json(PLAN.model_copy(update={"round": 2, "issued_at": time.time()})))
    assert not (tmp_path / RUN / "1-0").exists()
    assert (tmp_path / "plan.json").is_file()


def _wide_job(tensors: int, name_length: int) -> tuple[bytes, Plan, tuple[ManifestEntry, ...]]:
    """A model of many small tensors with long names: its update headers are large."""
    manifest = tuple(ManifestEntry(name=f"{i:05d}".ljust(name_length, "n"), shape=(2,)) for i in range(tensors))
    model = encode_frame(
        {e.name: np.zeros(e.shape, np.float32) for e in manifest},
        kind=FrameKind.GLOBAL_MODEL, job=JOB, round=1, sender="coordinator", codec=CodecSpec(), run_id=RUN,
    )  # fmt: skip
    devices = tuple(f"d{i}" for i in range(40))
    return model, PLAN.model_copy(update={"model_hash": model_hash(model), "selected": devices}), manifest


def _wide_update(device: str, plan: Plan, manifest: tuple[ManifestEntry, ...]) -> bytes:
    return encode_frame(
        {e.name: np.full(e.shape, 0.5, np.float32) for e in manifest},
        kind=FrameKind.UPDATE, job=JOB, round=1, sender=device, codec=CodecSpec(), num_samples=4,
        base_model_hash=plan.model_hash,
    )  # fmt: skip


def test_progress_messages_stay_under_the_json_limit_whatever_the_header_size(tmp_path: Path) -> None:
    from fedmqtt.schema import MAX_JSON_BYTES

    # 400 tensors with 100-character names: each accepted entry carries a header of about 90 kB, so 40 of them
    # would make one message of 3.6 MB that the coordinator refuses (before: batches were bounded by count only).
    model, plan, manifest = _wide_job(400, 100)
    c = core(tmp_path, Clock())
    c.on_model(model)
    c.on_plan(to_json(plan))
    for device in plan.selected:
        c.on_update(device, _wide_update(device, plan, manifest), device)
    step = c.flush(force=True)
    assert len(step.publishes) > 1
    assert all(len(p.payload) <= MAX_JSON_BYTES for p in step.publishes)
    assert sorted(entries(step)) == sorted((d, True, None) for d in plan.selected)  # every message readable


def test_an_update_whose_header_no_progress_message_can_carry_is_refused_and_reported(tmp_path: Path) -> None:
    # 4,000 tensors with 250-character names: one header alone is above the limit.
    model, plan, manifest = _wide_job(4000, 250)
    c = core(tmp_path, Clock())
    c.on_model(model)
    c.on_plan(to_json(plan))
    c.on_update("d0", _wide_update("d0", plan, manifest), "t0")
    step = c.flush(force=True)
    [(device, accepted, reason)] = entries(step)
    assert (device, accepted, reason) == ("d0", False, RefusalReason.MALFORMED)
    detail = from_json(AggregatorProgress, step.publishes[0].payload).entries[0].detail
    assert "above the" in detail and "progress message" in detail
