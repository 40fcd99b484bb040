"""MQTT topic names and subscription filters: what is valid, and what matches what."""

from __future__ import annotations

import paho.mqtt.client as paho

from fedmqtt.mqtt.errors import InvalidTopic

_SHARE = "$share/"


def validate_topic_name(topic: str) -> str:
    """A topic a message is published to: non-empty, no wildcards, no NUL, at most 65535 UTF-8 bytes."""
    if not isinstance(topic, str) or not topic:
        raise InvalidTopic(f"invalid topic {topic!r}: it must not be empty")
    if "+" in topic or "#" in topic:
        raise InvalidTopic(f"invalid topic {topic!r}: wildcards (+, #) are allowed only in subscriptions")
    if "\x00" in topic or len(topic.encode("utf-8")) > 65535:
        raise InvalidTopic(f"invalid topic {topic!r}: no NUL characters, at most 65535 bytes")
    return topic


def validate_topic_filter(topic_filter: str) -> str:
    """A subscription filter: ``+`` fills one whole level, ``#`` only the whole last level."""
    if not isinstance(topic_filter, str) or not topic_filter:
        raise InvalidTopic(f"invalid subscription filter {topic_filter!r}: it must not be empty")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise InvalidTopic(f"invalid subscription filter {topic_filter!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise InvalidTopic(f"invalid subscription filter {topic_filter!r}: '+' must fill a whole level")
    if "\x00" in topic_filter or len(topic_filter.encode("utf-8")) > 65535:
        raise InvalidTopic(f"invalid subscription filter {topic_filter!r}: no NUL characters, at most 65535 bytes")
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching, including the rule that ``+``/``#`` at the first level do not match ``$`` topics. A shared
    subscription ``$share/GROUP/FILTER`` (MQTT 5) receives the messages of ``FILTER``."""
    if topic_filter.startswith(_SHARE):
        parts = topic_filter.split("/", 2)
        if len(parts) == 3:
            topic_filter = parts[2]
    return bool(paho.topic_matches_sub(topic_filter, topic))
