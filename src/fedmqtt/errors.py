"""The root of fedmqtt's exceptions.

Every error fedmqtt raises on purpose derives from :class:`FedmqttError`, so callers can catch one type.
Each subsystem defines its own small subclasses next to its code (``fedmqtt.codecs.errors``,
``fedmqtt.broker.errors``, ...); the ones shared by several subsystems live here.
"""

from __future__ import annotations


class FedmqttError(Exception):
    """Base class of every error fedmqtt raises deliberately."""


class ConfigError(FedmqttError):
    """A configuration value is invalid. ``field`` names the offending setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class InvalidIdentifier(FedmqttError):
    """A job id, device id or topic prefix cannot be used inside an MQTT topic."""

    def __init__(self, kind: str, value: str, rule: str) -> None:
        super().__init__(f"invalid {kind} {value!r}: {rule}")
        self.kind = kind
        self.value = value
