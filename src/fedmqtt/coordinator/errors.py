"""Errors raised by the coordinator's pure core (round machine and aggregation strategies)."""

from __future__ import annotations

from fedmqtt.errors import FedmqttError


class CoordinatorError(FedmqttError):
    """Base class of the coordinator's own errors."""


class IllegalEvent(CoordinatorError):
    """An event that the round machine does not allow in its current phase (or with these arguments).

    The machine's state is left exactly as it was. This is a programming error in the caller (the MQTT
    adapter), not a network condition: updates from the network are screened with
    ``RoundMachine.screen_update`` first and refused, never raised.
    """

    def __init__(self, phase: str, event: str, detail: str = "") -> None:
        message = f"event {event!r} is not allowed in phase {phase!r}"
        if detail:
            message += f": {detail}"
        super().__init__(message)
        self.phase = phase
        self.event = event
        self.detail = detail


class StateDictError(CoordinatorError):
    """A saved machine or strategy state cannot be loaded (corrupt, another job, or another model)."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"cannot load {what} state: {detail}")
        self.what = what
        self.detail = detail


class AggregationError(CoordinatorError):
    """An aggregation strategy was used wrongly or cannot aggregate what it was given."""


class CoordinatorConflict(CoordinatorError):
    """Another coordinator is alive on this job (or went further than this checkpoint): this one must not run."""
