"""The errors raised by :mod:`fedmqtt.mqtt`: every one derives from :class:`MqttError` (a
:class:`fedmqtt.errors.FedmqttError`) and says what to do about it."""

from __future__ import annotations

import re

from paho.mqtt.reasoncodes import ReasonCode

from fedmqtt.errors import FedmqttError

_PASSWORD_IN_URL_RE = re.compile(r"(//[^/@:]*:)[^/@]*@")


def mask_password(url: str) -> str:
    """``mqtt://user:secret@host`` -> ``mqtt://user:***@host`` (for messages and logs)."""
    return _PASSWORD_IN_URL_RE.sub(r"\1***@", url)


class MqttError(FedmqttError):
    """Base class of the errors raised by :mod:`fedmqtt.mqtt`."""


class InvalidBrokerURL(MqttError):
    """A broker URL cannot be used. The password, if any, is masked in the message."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            f"invalid broker URL {mask_password(url)!r}: {reason} "
            "(write it as mqtt://[USER[:PASSWORD]@]HOST[:PORT] or mqtts://... for TLS)"
        )
        self.reason = reason


class InvalidTopic(MqttError):
    """A topic name or subscription filter is not valid MQTT."""


class BrokerUnreachable(MqttError):
    """No CONNACK from the broker within the connect timeout (refused TCP connection, wrong port, TLS port used
    without ``mqtts://``, firewall...)."""


class ConnectionRefused(MqttError):
    """The broker answered CONNECT with a failure reason code."""

    def __init__(self, message: str, reason: ReasonCode) -> None:
        super().__init__(message)
        self.reason = reason


class AuthenticationRefused(ConnectionRefused):
    """Bad username or password, missing credentials on a broker without anonymous access, or not authorised."""


class ProtocolUnsupported(ConnectionRefused):
    """The broker does not speak the requested MQTT version (the embedded amqtt broker speaks 3.1.1 only)."""


class TlsError(MqttError):
    """The TLS handshake failed (unknown CA, wrong host name, plain-TCP port used with ``mqtts://``...)."""


class NotConnected(MqttError):
    """The operation needs a live connection and there is none (yet, or any more)."""


class PublishRefused(MqttError):
    """The broker acknowledged a publish with a failure reason code (MQTT 5 only; 0x87 = not authorised)."""

    def __init__(self, topic: str, reason: ReasonCode) -> None:
        super().__init__(
            f"the broker refused the publish to {topic!r}: {reason} (0x{reason.value:02X}); "
            "check the account's ACL (a device may write only its own update and status topics)"
        )
        self.topic = topic
        self.reason = reason


class PublishTimeout(MqttError):
    """No acknowledgement within the timeout. A QoS 1/2 message stays queued in the client and is sent after a
    reconnect; the caller cannot know whether the broker already has it."""


class PayloadTooLarge(MqttError):
    """A message is larger than the broker's (or the client's) maximum packet size; it was not sent."""

    def __init__(self, topic: str, packet_bytes: int, limit: int) -> None:
        super().__init__(
            f"a {packet_bytes}-byte packet to {topic!r} exceeds the maximum packet size of {limit} bytes; "
            "compress the update harder or raise the broker's max_packet_size (fedmqtt broker --max-packet-mb)"
        )
        self.topic = topic
        self.packet_bytes = packet_bytes
        self.limit = limit


class SubscriptionRefused(MqttError):
    """The broker refused a subscription in its SUBACK."""

    def __init__(self, topic_filter: str, reason: ReasonCode) -> None:
        super().__init__(f"the broker refused the subscription to {topic_filter!r}: {reason}")
        self.topic_filter = topic_filter
        self.reason = reason


class TooManyClients(MqttError):
    """This process already holds the most MQTT connections its network loop can watch."""
