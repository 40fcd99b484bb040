"""The coordinator's holdings book for scale-out aggregation (fedmqtt.coordinator.partials): what it collects, how it
checks partial-aggregate headers, when an attempt must fail; and that folding partials equals folding updates."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmqtt.coordinator.aggregation import build_strategy
from fedmqtt.coordinator.partials import (
    HoldingsBook,
    PartialRefusal,
    WorkerRoster,
    entry_attempt_problem,
    gate_reason,
    partial_refusal_of,
    presence_problem,
    progress_problem,
    worker_offline_detail,
    worker_online_detail,
)
from fedmqtt.schema import (
    AggregatorPresence,
    AggregatorProgress,
    FrameHeader,
    FrameKind,
    PartialEntry,
    PartialInfo,
    ProgressEntry,
    RefusalReason,
)

JOB = "job-1"
RUN = "ab" * 8


def book_with(
    holdings: dict[str, tuple[str, int]], *, round: int = 3, attempt: int = 1, dp: bool = False
) -> HoldingsBook:
    book = HoldingsBook(JOB, round, attempt, RUN)
    for device, (worker, samples) in holdings.items():
        book.hold(device, worker, num_samples=samples, weight=1.0 if dp else float(samples), bytes=100 + samples)
    return book


def partial_header(
    book: HoldingsBook, worker: str, *, devices: list[str] | None = None, body: str = "0" * 32, **changes: Any
) -> FrameHeader:
    """The header a correct worker sends for ``book``'s collect request; ``changes`` override fields."""
    names = list(book.devices_of(worker)) if devices is None else devices
    held = book.holdings
    entries = tuple(
        PartialEntry(
            device=d,
            num_samples=held[d].num_samples if d in held else 1,
            weight=held[d].weight if d in held else 1.0,
        )
        for d in names
    )
    info: dict[str, Any] = dict(
        attempt=book.attempt,
        run_id=book.run_id,
        devices=entries,
        unclipped=sum(1 for d in names if d in held and held[d].unclipped),
    )
    info.update(changes.pop("partial", {}))
    fields: dict[str, Any] = dict(
        kind=FrameKind.PARTIAL_AGGREGATE,
        job=JOB,
        round=book.round,
        sender=worker,
        num_samples=sum(e.num_samples for e in entries),
        num_updates=len(entries),
        weight=sum(e.weight for e in entries),
        codec="float32",
        tensors=(),
        body_size=0,
        body_blake2b=body,
        partial=PartialInfo(**info),
    )
    fields.update(changes)
    return FrameHeader(**fields)


HOLDINGS = {"d1": ("w1", 10), "d2": ("w2", 20), "d3": ("w1", 30)}


def test_collect_request_lists_each_workers_devices_in_acceptance_order() -> None:
    book = book_with(HOLDINGS)
    request = book.collect(now=100.0, timeout=60.0)
    assert request.holdings == {"w1": ("d1", "d3"), "w2": ("d2",)}
    assert (request.round, request.attempt, request.run_id, request.job) == (3, 1, RUN, JOB)
    assert book.deadline == 160.0
    assert book.bytes_up == 110 + 120 + 130
    with pytest.raises(ValueError, match="closed"):
        book.hold("d4", "w1", num_samples=1, weight=1.0)


def test_a_device_is_held_once() -> None:
    book = book_with(HOLDINGS)
    with pytest.raises(ValueError, match="already held by w1"):
        book.hold("d1", "w2", num_samples=10, weight=10.0)


def test_correct_partials_complete_the_collection() -> None:
    book = book_with(HOLDINGS)
    book.collect(now=0.0, timeout=60.0)
    for worker in ("w1", "w2"):
        assert not book.complete
        header = partial_header(book, worker)
        verdict = book.check(worker, header)
        assert verdict.accepted, verdict
        book.accept(worker, header)
    assert book.complete
    assert book.failure(1000.0, online=()) is None  # nothing missing: time and presence no longer matter


def test_a_redelivered_partial_is_ignored_and_a_different_second_one_refused() -> None:
    book = book_with(HOLDINGS)
    book.collect(now=0.0, timeout=60.0)
    header = partial_header(book, "w2", body="a" * 32)
    book.accept("w2", header)
    assert book.check("w2", header).redelivery
    second = book.check("w2", partial_header(book, "w2", body="b" * 32))
    assert second.refusal is PartialRefusal.DUPLICATE and not second.blocking


def test_no_holdings_means_complete_at_once() -> None:
    book = book_with({})
    assert book.collect(now=0.0, timeout=5.0).holdings == {}
    assert book.complete


@pytest.mark.parametrize(
    ("worker", "kwargs", "refusal", "blocking"),
    [
        ("w1", {"kind": FrameKind.UPDATE}, PartialRefusal.WRONG_KIND, False),
        ("w1", {"job": "other"}, PartialRefusal.WRONG_JOB, False),
        ("w1", {"partial": {"run_id": "cd" * 8}}, PartialRefusal.WRONG_RUN, False),
        ("w1", {"round": 2}, PartialRefusal.STALE, False),
        ("w1", {"partial": {"attempt": 0}}, PartialRefusal.STALE, False),
        ("w1", {"sender": "w2"}, PartialRefusal.SENDER_MISMATCH, True),
        ("w3", {"sender": "w3", "devices": []}, PartialRefusal.NOT_ASKED, False),
        ("w1", {"codec": "float16"}, PartialRefusal.LOSSY_CODEC, True),
        ("w1", {"codec": "topk:0.5+float32"}, PartialRefusal.LOSSY_CODEC, True),
        ("w1", {"devices": ["d1"]}, PartialRefusal.DEVICES_MISMATCH, True),
        ("w1", {"devices": ["d1", "d3", "d2"]}, PartialRefusal.DEVICES_MISMATCH, True),
        ("w1", {"devices": ["d1", "d9"]}, PartialRefusal.DEVICES_MISMATCH, True),
        ("w1", {"num_samples": 41}, PartialRefusal.TOTALS_MISMATCH, True),
        ("w1", {"num_updates": 3}, PartialRefusal.TOTALS_MISMATCH, True),
        ("w1", {"weight": 40.5}, PartialRefusal.TOTALS_MISMATCH, True),
        ("w1", {"partial": {"unclipped": 1}}, PartialRefusal.UNCLIPPED_MISMATCH, True),
        ("w1", {"partial": None}, PartialRefusal.MALFORMED, True),
    ],
)
def test_refusals(worker: str, kwargs: dict[str, Any], refusal: PartialRefusal, blocking: bool) -> None:
    book = book_with(HOLDINGS)
    book.collect(now=0.0, timeout=60.0)
    devices = kwargs.pop("devices", None)
    if "partial" in kwargs and kwargs["partial"] is None:
        header = partial_header(book, worker).model_copy(update={"partial": None})
    else:
        header = partial_header(book, worker, devices=devices, **kwargs)
    verdict = book.check(worker, header)
    assert verdict.refusal is refusal, verdict
    assert verdict.blocking is blocking
    assert verdict.detail
    book.refuse(verdict)
    failure = book.failure(0.0, online={"w1", "w2"})
    if blocking:
        assert failure is not None and f"aggregator {worker}'s partial was refused ({refusal.value}" in failure
        assert "2 acknowledged update(s) (d1, d3)" in failure
    else:
        assert failure is None  # a stray frame does not fail the attempt the collection is waiting on


def test_per_device_samples_and_weights_must_match() -> None:
    book = book_with(HOLDINGS)
    book.collect(now=0.0, timeout=60.0)
    good = partial_header(book, "w1")
    assert good.partial is not None
    entries = list(good.partial.devices)
    swapped = (
        entries[0].model_copy(update={"num_samples": 30, "weight": 30.0}),
        entries[1].model_copy(update={"num_samples": 10, "weight": 10.0}),
    )  # the same totals, the wrong devices' counts
    bad = good.model_copy(update={"partial": good.partial.model_copy(update={"devices": swapped})})
    assert book.check("w1", bad).refusal is PartialRefusal.SAMPLES_MISMATCH
    heavier = (entries[0].model_copy(update={"weight": 11.0}), entries[1])
    bad = good.model_copy(update={"partial": good.partial.model_copy(update={"devices": heavier})})
    assert book.check("w1", bad).refusal is PartialRefusal.WEIGHTS_MISMATCH


def test_a_partial_before_the_close_is_refused_without_effect() -> None:
    book = book_with(HOLDINGS)
    verdict = book.check("w1", partial_header(book, "w1"))
    assert verdict.refusal is PartialRefusal.NOT_COLLECTING and not verdict.blocking


def test_failure_names_offline_and_silent_workers_with_their_holdings() -> None:
    book = book_with(HOLDINGS)
    book.collect(now=100.0, timeout=60.0)
    assert book.failure(120.0, online={"w1", "w2"}) is None
    offline = book.failure(120.0, online={"w1"})
    assert offline is not None and "aggregator w2 went offline holding 1 acknowledged update(s) (d2)" in offline
    assert "w1" not in offline
    silent = book.failure(160.0, online={"w1", "w2"})
    assert silent is not None
    assert "aggregator w1 sent no partial within --partial-timeout 60 s; it held 2 acknowledged update(s)" in silent
    book.extend(200.0)
    assert book.failure(160.0, online={"w1", "w2"}) is None
    header = partial_header(book, "w1")
    book.accept("w1", header)
    assert book.missing() == {"w2": ("d2",)}


def test_decode_failures_of_an_awaited_partial_block() -> None:
    book = book_with(HOLDINGS)
    book.collect(now=0.0, timeout=60.0)
    verdict = book.blocking("w1", PartialRefusal.NON_FINITE, "tensor 'x' holds NaN")
    assert verdict.blocking
    book.refuse(verdict)
    failure = book.failure(0.0, online={"w1", "w2"})
    assert failure is not None and "non_finite: tensor 'x' holds NaN" in failure
    assert not book.blocking("w9", PartialRefusal.NON_FINITE, "x").blocking  # not awaited: a stray frame


def test_state_dict_round_trip() -> None:
    book = book_with(HOLDINGS)
    book.hold("d4", "w2", num_samples=5, weight=5.0, bytes=7, unclipped=True)
    again = HoldingsBook.from_state_dict(book.state_dict())
    assert again.holdings == book.holdings and again.by_worker() == book.by_worker()
    book.collect(now=1.0, timeout=2.0)
    book.accept("w1", partial_header(book, "w1", body="c" * 32))
    again = HoldingsBook.from_state_dict(book.state_dict())
    assert again.state_dict() == book.state_dict()
    assert again.missing() == {"w2": ("d2", "d4")} and again.unclipped == 1
    with pytest.raises(ValueError, match="holdings book state"):
        HoldingsBook.from_state_dict({"job": JOB})


# ---------------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------------

_holdings = st.dictionaries(
    keys=st.from_regex(r"d[0-9]{1,3}", fullmatch=True),
    values=st.tuples(st.sampled_from(["w1", "w2", "w3"]), st.integers(min_value=1, max_value=10_000)),
    max_size=30,
)


@settings(max_examples=100, deadline=None)
@given(holdings=_holdings, dp=st.booleans(), order=st.randoms(use_true_random=False))
def test_every_correct_partial_is_accepted_in_any_order_and_each_device_counts_once(
    holdings: dict[str, tuple[str, int]], dp: bool, order: Any
) -> None:
    book = book_with(holdings, dp=dp)
    request = book.collect(now=0.0, timeout=1.0)
    listed = [d for devices in request.holdings.values() for d in devices]
    assert sorted(listed) == sorted(holdings)  # every accepted device listed exactly once
    workers = list(request.holdings)
    order.shuffle(workers)
    for worker in workers:
        # A worker may list its devices in its own order (its spool's).
        devices = list(request.holdings[worker])
        order.shuffle(devices)
        header = partial_header(book, worker, devices=devices)
        assert book.check(worker, header).accepted
        book.accept(worker, header)
    assert book.complete


@settings(max_examples=100, deadline=None)
@given(holdings=_holdings.filter(bool), extra=st.integers(min_value=1, max_value=3), data=st.data())
def test_a_partial_missing_or_adding_a_device_is_refused(
    holdings: dict[str, tuple[str, int]], extra: int, data: st.DataObject
) -> None:
    book = book_with(holdings)
    request = book.collect(now=0.0, timeout=1.0)
    worker = data.draw(st.sampled_from(sorted(request.holdings)))
    devices = list(request.holdings[worker])
    if data.draw(st.booleans()):
        devices.pop(data.draw(st.integers(min_value=0, max_value=len(devices) - 1)))
    else:
        devices += [f"x{i}" for i in range(extra)]
    verdict = book.check(worker, partial_header(book, worker, devices=devices))
    assert verdict.refusal is PartialRefusal.DEVICES_MISMATCH and verdict.blocking


@settings(max_examples=50, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=12),
    workers=st.integers(min_value=1, max_value=4),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    strategy=st.sampled_from(["fedavg", "fedavgm", "fedadam"]),
)
def test_folding_float32_partials_equals_folding_the_updates(
    weights: list[int], workers: int, seed: int, strategy: str
) -> None:
    """What the coordinator does with partials (float32 on the wire, ``add_partial``) gives the model that folding
    every update would, to float32 tolerance."""
    rng = np.random.default_rng(seed)
    base = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    updates = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()} for _ in weights]
    direct = build_strategy(strategy)
    direct.begin_round(base)
    for update, w in zip(updates, weights, strict=True):
        direct.add(update, float(w))
    expected = direct.aggregate()

    combined = build_strategy(strategy)
    combined.begin_round(base)
    assignment = rng.integers(0, workers, size=len(weights))
    for k in range(workers):
        mine = [i for i in range(len(weights)) if assignment[i] == k]
        if not mine:
            continue
        partial = {
            name: sum((updates[i][name].astype(np.float64) * weights[i] for i in mine), np.zeros(v.shape)).astype(
                np.float32
            )
            for name, v in base.items()
        }
        combined.add_partial(partial, float(sum(weights[i] for i in mine)), len(mine))
    got = combined.aggregate()
    assert combined.count == len(weights)
    for name in base:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5)
    assert math.isfinite(float(np.abs(got["a"]).sum()))


# ---------------------------------------------------------------------------------------------------
# the workers
# ---------------------------------------------------------------------------------------------------


def presence(worker: str = "w1", state: str = "online", **fields: Any) -> AggregatorPresence:
    return AggregatorPresence(job=JOB, worker=worker, instance="cd" * 8, state=state, since=1.0, **fields)  # type: ignore[arg-type]


def test_a_worker_is_online_from_its_online_status_until_its_offline_one() -> None:
    roster = WorkerRoster()
    assert roster.online(0.0) == set()
    assert roster.observe("w1", "online", now=1.0, grace_until=None) is True
    assert roster.observe("w1", "online", now=2.0, grace_until=None) is False  # no change: not announced again
    assert roster.observe("w2", "offline", now=2.0, grace_until=None) is True  # first seen offline
    assert roster.online(3.0) == {"w1"}
    assert roster.observe("w1", "offline", now=4.0, grace_until=None) is True
    assert roster.online(4.0) == set()


def test_a_last_will_received_while_the_link_was_in_doubt_takes_effect_after_its_grace() -> None:
    roster = WorkerRoster()
    roster.observe("w1", "online", now=0.0, grace_until=None)
    assert roster.observe("w1", "offline", now=10.0, grace_until=12.0) is True
    assert roster.online(11.9) == {"w1"} and roster.online(12.0) == set()
    roster.observe("w1", "online", now=11.0, grace_until=None)  # it came back within the grace
    assert roster.online(100.0) == {"w1"}
    roster.observe("w1", "offline", now=20.0, grace_until=15.0)  # a grace already over: offline at once
    assert roster.online(20.0) == set()


@settings(max_examples=100, deadline=None)
@given(online=st.sets(st.sampled_from([f"w{i}" for i in range(15)])), needed=st.integers(min_value=1, max_value=15))
def test_the_gate_is_open_exactly_while_enough_workers_are_online(online: set[str], needed: int) -> None:
    reason = gate_reason(online, needed)
    assert (reason is None) == (len(online) >= needed)
    if reason is not None:
        assert reason.startswith(f"waiting for aggregators: {len(online)} of {needed} online")
        assert all(w in reason for w in sorted(online)[:10])


def test_a_status_or_progress_of_another_worker_job_or_run_is_refused_with_what_it_names() -> None:
    assert presence_problem("w1", JOB, presence()) is None
    assert presence_problem("w1", JOB, presence("w2")) == "it names worker 'w2' of job 'job-1'"
    assert presence_problem("w1", "other", presence()) == "it names worker 'w1' of job 'job-1'"
    entry = ProgressEntry(device="d1", accepted=False, reason=RefusalReason.MALFORMED)
    progress = AggregatorProgress(job=JOB, worker="w1", run_id=RUN, round=3, attempt=1, entries=(entry, entry))
    assert progress_problem("w1", JOB, RUN, progress) is None
    assert progress_problem("w1", JOB, None, progress) is None  # no run yet: nothing to compare
    assert progress_problem("w2", JOB, RUN, progress) == "it names worker 'w1' of job 'job-1'"
    other = "ef" * 8
    assert progress_problem("w1", JOB, other, progress) == f"2 update(s) of run {RUN}; this is run {other}"


def test_an_update_held_under_another_attempt_cannot_count_for_the_open_one() -> None:
    book = book_with({"d1": ("w1", 5)}, round=3, attempt=1)
    assert entry_attempt_problem(book, "w1", 3, 1, 1) is None
    stale = "aggregator w1 holds it for round 3 attempt 0; attempt 1 is open"
    assert entry_attempt_problem(book, "w1", 3, 0, 1) == stale
    assert entry_attempt_problem(None, "w1", 3, 0, 1) == stale  # no attempt open


def test_a_partial_that_fails_to_decode_is_refused_for_the_reason_an_update_would_be() -> None:
    assert partial_refusal_of(RefusalReason.MANIFEST_MISMATCH) is PartialRefusal.MANIFEST_MISMATCH
    assert partial_refusal_of(RefusalReason.NON_FINITE) is PartialRefusal.NON_FINITE
    assert partial_refusal_of(RefusalReason.MALFORMED) is PartialRefusal.MALFORMED
    assert partial_refusal_of(RefusalReason.NORM_TOO_LARGE) is PartialRefusal.MALFORMED


def test_a_worker_going_offline_is_reported_with_what_it_held_and_its_partial_weighs_its_devices() -> None:
    assert worker_online_detail("w1", presence(group="g")) == "aggregator w1 online (group g)"
    assert worker_online_detail("w1", presence(site="s")) == "aggregator w1 online (site s)"
    assert worker_online_detail("w1", presence()) == "aggregator w1 online"
    book = book_with({"d1": ("w1", 5), "d2": ("w2", 7), "d3": ("w1", 2)})
    assert worker_offline_detail("w1", book) == (
        "aggregator w1 offline, holding 2 acknowledged update(s) (d1, d3) of round 3 attempt 1"
    )
    assert worker_offline_detail("w9", book) == worker_offline_detail("w9", None) == "aggregator w9 offline"
    assert (book.weight_of("w1"), book.weight_of("w2"), book.weight_of("w9")) == (7.0, 7.0, 0)


# ---------------------------------------------------------------------------------------------------
# the job's settings
# ---------------------------------------------------------------------------------------------------


def _job(**overrides: Any) -> Any:
    from fedmqtt.coordinator.config import load_config

    return load_config(None, {"job": "j", "rounds": 1, "min_updates": 5, **overrides}, env={})


def test_aggregators_default_to_none_and_the_partial_timeout_to_a_minute() -> None:
    job = _job()
    assert (job.aggregators, job.partial_timeout) == (0, 60.0)
    assert (_job(aggregators=3, partial_timeout=5).aggregators, _job(partial_timeout=5).partial_timeout) == (3, 5.0)


@pytest.mark.parametrize("strategy", ["median", "trimmed-mean", "krum"])
def test_robust_strategies_are_refused_with_aggregators_and_say_why(strategy: str) -> None:
    from fedmqtt.settings import SettingsError

    with pytest.raises(
        SettingsError, match=rf"--aggregators: {strategy} cannot combine partial aggregates: it must see"
    ):
        _job(aggregators=2, strategy=strategy, min_updates=10)
    assert _job(strategy=strategy, min_updates=10).strategy == strategy  # without workers they run as before


@pytest.mark.parametrize(("overrides", "message"), [
    ({"aggregators": -1}, "--aggregators: must be >= 0"),
    ({"partial_timeout": 0}, "--partial-timeout: must be > 0"),
])  # fmt: skip
def test_bad_values_are_named_by_their_flags(overrides: dict[str, Any], message: str) -> None:
    from fedmqtt.settings import SettingsError

    with pytest.raises(SettingsError, match=message):
        _job(**overrides)
