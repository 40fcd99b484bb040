"""Errors raised by the device side (data set errors live with the data: ``fedmqtt.data``).

Each message says what is wrong and what to do about it, because a person at a terminal reads it.
"""

from __future__ import annotations

from fedmqtt.errors import FedmqttError


class DeviceError(FedmqttError):
    """Base class of the device subsystem's errors."""
