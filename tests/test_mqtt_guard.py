"""The per-process connection guard (paho's select() loop cannot watch file descriptors above 1023)."""

from __future__ import annotations

import os
import resource
import threading
import uuid

import pytest

from fedmqtt.broker.embedded import EmbeddedBroker
from fedmqtt.broker.net import find_free_port
from fedmqtt.mqtt import (
    CONNECTION_BUDGET,
    MAX_CLIENTS_PER_PROCESS,
    SELECT_FD_LIMIT,
    BrokerUnreachable,
    ClientSettings,
    ConnectionBudget,
    MqttConnection,
    TooManyClients,
)


def test_budget_refuses_one_more_than_its_limit() -> None:
    budget = ConnectionBudget(3)
    for _ in range(3):
        budget.acquire()
    assert budget.live == 3
    with pytest.raises(TooManyClients, match="already holds 3 MQTT connections") as info:
        budget.acquire()
    assert "several processes" in str(info.value)
    budget.release()
    budget.acquire()
    assert budget.live == 3


def test_budget_rejects_bad_use() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        ConnectionBudget(0)
    with pytest.raises(RuntimeError, match="without acquire"):
        ConnectionBudget(1).release()


def test_budget_is_thread_safe() -> None:
    budget = ConnectionBudget(5)
    granted: list[int] = []
    refused: list[int] = []
    barrier = threading.Barrier(16)

    def take(i: int) -> None:
        barrier.wait()
        try:
            budget.acquire()
            granted.append(i)
        except TooManyClients:
            refused.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 5 and len(refused) == 11 and budget.live == 5


def test_process_limit_is_below_what_select_can_watch() -> None:
    # Each connection holds three descriptors (its socket and paho's wake-up pair).
    assert MAX_CLIENTS_PER_PROCESS == CONNECTION_BUDGET.limit == 250
    assert 3 * MAX_CLIENTS_PER_PROCESS < SELECT_FD_LIMIT


def test_connections_count_while_open_and_failed_connects_give_back(embedded_broker: EmbeddedBroker) -> None:
    before = CONNECTION_BUDGET.live
    threads_before = set(threading.enumerate())
    connections = [
        MqttConnection(ClientSettings.from_url(embedded_broker.url, f"c-{uuid.uuid4().hex[:10]}")) for _ in range(2)
    ]
    for connection in connections:
        connection.connect()
    assert CONNECTION_BUDGET.live == before + 2
    for connection in connections:
        connection.close()
    assert CONNECTION_BUDGET.live == before
    assert set(threading.enumerate()) - threads_before == set()  # paho's network threads were joined

    unreachable = MqttConnection(
        ClientSettings.from_url(f"mqtt://127.0.0.1:{find_free_port()}", f"c-{uuid.uuid4().hex[:10]}")
    )
    with pytest.raises(BrokerUnreachable):
        unreachable.connect(timeout=0.5)
    assert CONNECTION_BUDGET.live == before


def test_the_guard_stops_a_connection_beyond_the_process_limit(embedded_broker: EmbeddedBroker) -> None:
    taken = CONNECTION_BUDGET.limit - CONNECTION_BUDGET.live  # stand-ins for 250 live connections
    for _ in range(taken):
        CONNECTION_BUDGET.acquire()
    try:
        connection = MqttConnection(ClientSettings.from_url(embedded_broker.url, f"c-{uuid.uuid4().hex[:10]}"))
        with pytest.raises(TooManyClients, match="select"):
            connection.connect()
        assert not connection.is_connected
    finally:
        for _ in range(taken):
            CONNECTION_BUDGET.release()
    ok = MqttConnection(ClientSettings.from_url(embedded_broker.url, f"c-{uuid.uuid4().hex[:10]}"))
    ok.connect()
    ok.close()


def test_a_socket_above_the_select_limit_is_refused(embedded_broker: EmbeddedBroker) -> None:
    """Fill every descriptor below 1024 so the MQTT socket lands above it: a clear error, not silence."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < SELECT_FD_LIMIT + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, SELECT_FD_LIMIT + 256), hard))
    before = CONNECTION_BUDGET.live
    fillers: list[int] = []
    base = os.open(os.devnull, os.O_RDONLY)
    try:
        while True:
            fd = os.dup(base)
            fillers.append(fd)
            if fd >= SELECT_FD_LIMIT - 1:
                break
        connection = MqttConnection(
            ClientSettings.from_url(embedded_broker.url, f"c-{uuid.uuid4().hex[:10]}", protocol="3.1.1")
        )
        with pytest.raises(TooManyClients, match="file descriptor"):
            connection.connect()
    finally:
        for fd in fillers:
            os.close(fd)
        os.close(base)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert CONNECTION_BUDGET.live == before
