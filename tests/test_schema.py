"""Wire schema: codec strings, strict JSON messages, clear errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmqtt.schema import (
    CodecSpec,
    DeviceStatus,
    Event,
    EventType,
    MessageError,
    Plan,
    RefusalReason,
    ValueEncoding,
    from_json,
    to_json,
)

HASH = "0" * 64


def _plan(**kw: object) -> Plan:
    fields: dict[str, object] = dict(
        job="j", round=1, selected=("d1",), deadline=10.0, issued_at=1.0, local_epochs=1, batch_size=10,
        learning_rate=0.1, uplink=CodecSpec(), model_name="cnn", model_hash=HASH,
    )  # fmt: skip
    fields.update(kw)
    return Plan.model_validate(fields)


@pytest.mark.parametrize(
    ("text", "values", "per_channel", "stochastic", "topk", "ef"),
    [
        ("float32", ValueEncoding.FLOAT32, False, False, None, False),
        ("float16", ValueEncoding.FLOAT16, False, False, None, False),
        ("int8", ValueEncoding.INT8, False, False, None, False),
        ("int8cs", ValueEncoding.INT8, True, True, None, False),
        ("topk:0.01+int8c+ef", ValueEncoding.INT8, True, False, 0.01, True),
    ],
)
def test_codec_strings_parse(text: str, values: ValueEncoding, per_channel: bool, stochastic: bool,
                             topk: float | None, ef: bool) -> None:  # fmt: skip
    spec = CodecSpec.parse(text)
    assert (spec.values, spec.per_channel, spec.stochastic, spec.topk, spec.error_feedback) == (
        values, per_channel, stochastic, topk, ef,
    )  # fmt: skip
    assert CodecSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("bad", ["int4", "topk:2", "topk:0", "zstd:99", "float16+int8s+x", ""])
def test_bad_codec_strings_name_the_problem(bad: str) -> None:
    with pytest.raises(MessageError, match="codec"):
        CodecSpec.parse(bad)


@given(
    st.sampled_from(["float32", "float16", "int8", "int8c", "int8s", "int8cs"]),
    st.one_of(st.none(), st.floats(min_value=1e-4, max_value=1.0)),
    st.integers(min_value=-7, max_value=22),
    st.booleans(),
)
def test_codec_string_round_trip(values: str, topk: float | None, level: int, ef: bool) -> None:
    text = values + (f"+topk:{topk!r}" if topk else "") + f"+zstd:{level}" + ("+ef" if ef else "")
    spec = CodecSpec.parse(text)
    assert CodecSpec.parse(str(spec)).values == spec.values


def test_messages_round_trip_and_forbid_extras() -> None:
    plan = _plan()
    assert from_json(Plan, to_json(plan)) == plan
    with pytest.raises(MessageError, match="Plan"):
        from_json(Plan, to_json(plan)[:-1] + b',"surprise":1}')
    ev = Event(job="j", type=EventType.UPDATE_REFUSED, ts=1.0, device="d1", reason=RefusalReason.DUPLICATE)
    assert from_json(Event, to_json(ev)) == ev


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"\xff\xfe", b"[]", b'{"schema_version": 2, "device": "d", "state": "online"}',
     b'{"device": "a/b", "state": "online"}', b'{"device": "d", "state": "sleeping"}', b"{" * 100000],
)  # fmt: skip
def test_malformed_json_raises_message_error(payload: bytes) -> None:
    with pytest.raises(MessageError):
        from_json(DeviceStatus, payload)


def test_plan_refuses_non_finite_and_bad_hash() -> None:
    with pytest.raises(ValueError):
        _plan(deadline=float("nan"))
    with pytest.raises(ValueError):
        _plan(model_hash="xyz")
    with pytest.raises(ValueError):
        _plan(selected=("bad/id",))
