"""The topic map is the public contract: names, strict parsing, identifier rules, ACL patterns."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from fedmqtt.errors import InvalidIdentifier
from fedmqtt.topics import Topics, coordinator_acl, device_acl, validate_id, watcher_acl


def test_topic_names_are_the_documented_contract() -> None:
    t = Topics(job="mnist")
    assert t.plan == "fedmqtt/mnist/plan"
    assert t.model == "fedmqtt/mnist/model"
    assert t.update("cam-1") == "fedmqtt/mnist/updates/cam-1"
    assert t.status == "fedmqtt/mnist/status"
    assert t.events == "fedmqtt/mnist/events"
    assert t.round_summary(3) == "fedmqtt/mnist/rounds/3"
    assert t.device_status("cam-1") == "fedmqtt/mnist/devices/cam-1/status"
    assert t.privacy == "fedmqtt/mnist/privacy"
    assert t.everything_filter == "fedmqtt/mnist/#"
    assert Topics(job="j", prefix="acme/fl").plan == "acme/fl/j/plan"


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a#", "has space", "-lead", "x" * 65, "ü"])
def test_identifiers_that_break_topics_are_refused(bad: str) -> None:
    with pytest.raises(InvalidIdentifier, match="invalid"):
        validate_id("device id", bad)
    with pytest.raises(InvalidIdentifier):
        Topics(job=bad)


def test_strict_parsing_ignores_other_topics() -> None:
    t = Topics(job="j")
    assert t.device_of_update("fedmqtt/j/updates/d1") == "d1"
    assert t.device_of_update("fedmqtt/other/updates/d1") is None
    assert t.device_of_update("fedmqtt/j/updates/d1/extra") is None
    assert t.device_of_update("fedmqtt/j/updates/") is None
    assert t.device_of_status("fedmqtt/j/devices/d1/status") == "d1"
    assert t.device_of_status("fedmqtt/j/devices/d1/other") is None
    assert t.round_of_summary("fedmqtt/j/rounds/12") == 12
    assert t.round_of_summary("fedmqtt/j/rounds/x") is None


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True))
def test_update_topic_round_trips_and_matches_filter(device: str) -> None:
    t = Topics(job="job1")
    topic = t.update(device)
    assert t.device_of_update(topic) == device
    assert topic_matches_sub(t.updates_filter, topic)
    assert topic_matches_sub(t.everything_filter, topic)
    assert topic_matches_sub(t.device_status_filter, t.device_status(device))


def _allowed(rules: tuple, access: str, username: str, topic: str) -> bool:
    for rule in rules:
        if access in rule.access and topic_matches_sub(rule.pattern.replace("%u", username), topic):
            return True
    return False


def test_device_acl_allows_exactly_its_own_writes() -> None:
    t = Topics(job="j")
    rules = device_acl()
    assert _allowed(rules, "write", "d1", t.update("d1"))
    assert _allowed(rules, "write", "d1", t.device_status("d1"))
    assert not _allowed(rules, "write", "d1", t.update("d2"))
    assert not _allowed(rules, "write", "d1", t.device_status("d2"))
    for topic in (t.model, t.delta, t.plan, t.status, t.events, t.privacy, t.round_summary(1)):
        assert not _allowed(rules, "write", "d1", topic)
        assert _allowed(rules, "read", "d1", topic)
    assert not _allowed(rules, "read", "d1", t.update("d2"))
    assert not _allowed(rules, "read", "d1", t.device_status("d2"))
    assert _allowed(rules, "read", "d1", t.coordinator)
    assert _allowed(coordinator_acl(), "write", "coordinator", t.model)
    assert _allowed(coordinator_acl(), "write", "coordinator", t.delta)
    assert t.delta == "fedmqtt/j/delta"
    assert not _allowed(watcher_acl(), "write", "watcher", t.model)


def test_watcher_acl_reads_every_topic_but_the_updates_and_writes_nothing() -> None:
    t = Topics(job="j")
    rules = watcher_acl()
    readable = (t.plan, t.model, t.delta, t.status, t.events, t.privacy, t.coordinator, t.round_summary(3))
    for topic in (*readable, t.device_status("d1")):
        assert _allowed(rules, "read", "watcher", topic)
        assert not _allowed(rules, "write", "watcher", topic)
    denied = [rule.pattern for rule in rules if rule.access == "deny"]
    assert denied and all(topic_matches_sub(pattern, t.update("d1")) for pattern in denied)
    assert not _allowed(rules, "read", "watcher", t.update("d1"))


def test_release_topic_is_read_by_devices_and_watchers_and_written_by_the_coordinator_only() -> None:
    t = Topics(job="j", prefix="acme/fl")
    assert t.release == "acme/fl/j/release"
    for rules, user in ((device_acl("acme/fl"), "d1"), (watcher_acl("acme/fl"), "watcher")):
        assert _allowed(rules, "read", user, t.release)
        assert not _allowed(rules, "write", user, t.release)
    assert _allowed(coordinator_acl("acme/fl"), "write", "coordinator", t.release)
