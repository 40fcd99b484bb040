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
from fedmqtt.coordinator.partials import HoldingsBook, PartialRefusal
from fedmqtt.schema import FrameHeader, FrameKind, PartialEntry, PartialInfo

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
