"""Errors raised by the broker helpers (:mod:`fedmqtt.broker`)."""

from __future__ import annotations

from fedmqtt.errors import FedmqttError


class BrokerError(FedmqttError):
    """Base class of the broker helpers' errors."""


class BrokerStartError(BrokerError):
    """A broker did not start serving; the message carries the broker's own log (Mosquitto's stderr)."""


class MissingTool(BrokerError):
    """A program fedmqtt needs (``mosquitto``, ``mosquitto_passwd``, ``openssl``) is not on PATH."""

    def __init__(self, program: str, hint: str) -> None:
        super().__init__(f"{program!r} was not found on PATH; {hint}")
        self.program = program


class AccountError(BrokerError):
    """A broker account cannot be created (reserved name, mosquitto_passwd failure...)."""


class CertificateError(BrokerError):
    """Test certificates cannot be generated, or TLS files are missing."""


class BridgeError(BrokerError):
    """A site-to-cloud bridge cannot be configured (bad cloud URL, site name, credentials or TLS files).
    ``flag`` names the ``fedmqtt broker`` flag to fix."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.message = message
