"""Broker URLs, client settings and topic validation (pure; no broker)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmqtt.errors import FedmqttError
from fedmqtt.mqtt import (
    BrokerURL,
    ClientSettings,
    InvalidBrokerURL,
    InvalidTopic,
    MqttError,
    Will,
    parse_broker_url,
    topic_matches,
    validate_topic_filter,
    validate_topic_name,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://localhost", BrokerURL("mqtt", "localhost", 1883)),
        ("tcp://10.0.0.5", BrokerURL("tcp", "10.0.0.5", 1883)),
        ("mqtts://broker.example.com", BrokerURL("mqtts", "broker.example.com", 8883)),
        ("ssl://broker.example.com", BrokerURL("ssl", "broker.example.com", 8883)),
        ("mqtt://localhost:1884", BrokerURL("mqtt", "localhost", 1884)),
        ("mqtt://localhost:1884/", BrokerURL("mqtt", "localhost", 1884)),
        ("MQTT://LocalHost:65535", BrokerURL("mqtt", "localhost", 65535)),
        ("mqtts://[::1]:8884", BrokerURL("mqtts", "::1", 8884)),
        ("mqtt://[::1]", BrokerURL("mqtt", "::1", 1883)),
        ("mqtt://dev_broker:1", BrokerURL("mqtt", "dev_broker", 1)),
        ("mqtt://d1:s3cret@h:1", BrokerURL("mqtt", "h", 1, "d1", "s3cret")),
        ("mqtt://d1@h", BrokerURL("mqtt", "h", 1883, "d1", None)),
        ("mqtt://d1:@h", BrokerURL("mqtt", "h", 1883, "d1", "")),
        ("mqtt://u%40x:p%3Aw%2F%40@h", BrokerURL("mqtt", "h", 1883, "u@x", "p:w/@")),
    ],
)
def test_valid_urls_parse(url: str, expected: BrokerURL) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("localhost:1883", "scheme is missing"),
        ("localhost", "scheme is missing"),
        ("http://localhost", "unsupported scheme"),
        ("ws://localhost:9001", "unsupported scheme"),
        ("mqtt://", "host is missing"),
        ("mqtt://:1883", "host is missing"),
        ("mqtt://host:abc", "port must be"),
        ("mqtt://host:0", "port must be"),
        ("mqtt://host:65536", "port must be"),
        ("mqtt://host:-1", "port must be"),
        ("mqtt://host:", "port is empty"),
        ("mqtt://host/fedmqtt", "no path"),
        ("mqtt://host?x=1", "no query"),
        ("mqtt://host#frag", "no query"),
        ("mqtt://ho st", "white space"),
        (" mqtt://host", "white space"),
        ("mqtt://:pw@host", "password needs a username"),
        ("mqtt://@host", "username is empty"),
        ("mqtt://host!name", "not a host name"),
        ("mqtt://[::1", "invalid broker URL"),
    ],
)
def test_invalid_urls_raise_clear_errors(url: str, reason: str) -> None:
    with pytest.raises(InvalidBrokerURL, match="invalid broker URL") as info:
        parse_broker_url(url)
    assert reason in str(info.value)
    assert "mqtt://" in str(info.value)  # tells the user the expected form
    assert isinstance(info.value, MqttError) and isinstance(info.value, FedmqttError)


def test_non_string_url_is_refused() -> None:
    with pytest.raises(InvalidBrokerURL, match="empty"):
        parse_broker_url(None)  # type: ignore[arg-type]


def test_errors_and_str_never_show_the_password() -> None:
    with pytest.raises(InvalidBrokerURL) as info:
        parse_broker_url("mqtt://d1:topsecret@host:99999")
    assert "topsecret" not in str(info.value)
    assert "***" in str(info.value)
    url = parse_broker_url("mqtts://d1:topsecret@host")
    assert "topsecret" not in str(url)
    assert "topsecret" not in repr(url)
    assert str(url) == "mqtts://d1:***@host:8883"
    assert url.to_url(include_password=True) == "mqtts://d1:topsecret@host:8883"


def test_tls_follows_the_scheme() -> None:
    assert parse_broker_url("mqtts://h").tls and parse_broker_url("ssl://h").tls
    assert not parse_broker_url("mqtt://h").tls and not parse_broker_url("tcp://h").tls


def test_with_credentials_replaces_and_clears() -> None:
    url = parse_broker_url("mqtt://old:pw@h:1")
    assert url.with_credentials("d2", "x") == BrokerURL("mqtt", "h", 1, "d2", "x")
    assert url.with_credentials(None, None) == BrokerURL("mqtt", "h", 1)
    with pytest.raises(InvalidBrokerURL, match="password needs a username"):
        url.with_credentials(None, "x")


_hosts = st.one_of(
    st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?){0,3}\Z"),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
_secrets = st.text(alphabet=string.printable + "é€", min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(
    scheme=st.sampled_from(["mqtt", "mqtts", "tcp", "ssl"]),
    host=_hosts,
    port=st.integers(1, 65535),
    username=st.none() | _secrets,
    password=_secrets,
)
def test_to_url_and_parse_round_trip(scheme: str, host: str, port: int, username: str | None, password: str) -> None:
    url = BrokerURL(scheme, host.lower(), port)
    if username is not None:
        url = url.with_credentials(username, password)
    assert parse_broker_url(url.to_url(include_password=True)) == url


def test_settings_validate_their_fields() -> None:
    ok = ClientSettings.from_url("mqtt://h", "c1")
    assert ok.protocol == "auto" and ok.clean_start is False and ok.broker.port == 1883
    with pytest.raises(MqttError, match="invalid broker URL"):
        ClientSettings.from_url("nope", "c1")
    with pytest.raises(MqttError, match="must be a parsed BrokerURL"):
        ClientSettings("mqtt://h", "c1")  # type: ignore[arg-type]
    bad: list[tuple[dict[str, object], str]] = [
        ({"client_id": ""}, "invalid client id"),
        ({"protocol": "4"}, "invalid MQTT protocol"),
        ({"session_expiry": -1}, "session_expiry"),
        ({"keepalive": 0}, "keepalive"),
        ({"reconnect_min_delay": 5.0, "reconnect_max_delay": 1.0}, "reconnect delays"),
        ({"reconnect_min_delay": 0.0}, "reconnect delays"),
        ({"max_inflight": 0}, "max_inflight"),
        ({"max_packet_size": 0}, "max_packet_size"),
        ({"max_message_bytes": -5}, "max_message_bytes"),
        ({"will": Will("a/+", b"x")}, "wildcards"),
        ({"will": Will("a/b", b"x", qos=3)}, "will's QoS"),
    ]
    for changes, message in bad:
        fields: dict[str, object] = {"broker": parse_broker_url("mqtt://h"), "client_id": "c1", **changes}
        with pytest.raises(MqttError, match=message):
            ClientSettings(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("topic", ["a", "a/b", "fedmqtt/job/updates/d-1", "/leading", "trailing/", "é/€"])
def test_valid_topic_names(topic: str) -> None:
    assert validate_topic_name(topic) == topic


@pytest.mark.parametrize("topic", ["", "a/+", "a/#", "+", "a\x00b", "x" * 65536])
def test_invalid_topic_names(topic: str) -> None:
    with pytest.raises(InvalidTopic, match="invalid topic"):
        validate_topic_name(topic)


@pytest.mark.parametrize("topic_filter", ["#", "+", "a/#", "a/+/b", "+/+", "a/b", "$SYS/#"])
def test_valid_filters(topic_filter: str) -> None:
    assert validate_topic_filter(topic_filter) == topic_filter


@pytest.mark.parametrize(
    ("topic_filter", "message"),
    [
        ("", "empty"),
        ("a/#/b", "'#'"),
        ("a#", "'#'"),
        ("a/b+", "whole level"),
        ("a+/b", "whole level"),
        ("a\x00", "NUL"),
    ],
)
def test_invalid_filters(topic_filter: str, message: str) -> None:
    with pytest.raises(InvalidTopic, match=message):
        validate_topic_filter(topic_filter)


def test_topic_matching_follows_mqtt_rules() -> None:
    assert topic_matches("a/+/c", "a/b/c")
    assert topic_matches("a/#", "a")  # '#' also matches the parent level
    assert topic_matches("a/#", "a/b/c")
    assert not topic_matches("a/+", "a/b/c")
    assert not topic_matches("a/b", "a/b/c")
    assert not topic_matches("#", "$SYS/broker")
