"""Test helpers for waiting: :class:`Inbox`, a thread-safe list of the messages a
:class:`fedmqtt.mqtt.MqttConnection` delivered, passed as its ``on_message``, with :meth:`Inbox.wait_for` to wait
for them from the test's thread; :func:`wait_until` polls any condition."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NamedTuple


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` every 20 ms until it is true or ``timeout`` seconds passed; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


class ReceivedMessage(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int


class Inbox:
    """A thread-safe queue of received messages; pass it as ``on_message`` and read it from another thread."""

    def __init__(self) -> None:
        self._messages: list[ReceivedMessage] = []
        self._cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        with self._cond:
            self._messages.append(ReceivedMessage(topic, payload, qos, retain, mid))
            self._cond.notify_all()

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._cond:
            return list(self._messages)

    def topics(self) -> list[str]:
        return [m.topic for m in self.messages]

    def wait_for(self, count: int = 1, *, topic: str | None = None, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Wait until ``count`` messages (on ``topic``, if given) arrived; return them. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self._messages if topic is None or m.topic == topic]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{len(found)} of {count} messages"
                        + (f" on {topic!r}" if topic else "")
                        + f" arrived within {timeout} s"
                    )
                self._cond.wait(left)
