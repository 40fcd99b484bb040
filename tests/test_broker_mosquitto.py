"""Mosquitto: generated configuration and ACL, and a real broker with auth, ACL, TLS and size limits."""

from __future__ import annotations

import os
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from conftest import MqttClientFactory, raw_oversize_publish_is_dropped
from fedmqtt.broker.accounts import (
    COORDINATOR_USER,
    WATCHER_USER,
    add_account,
    list_accounts,
    render_acl,
    username_for,
)
from fedmqtt.broker.errors import AccountError, BrokerError, BrokerStartError, CertificateError, MissingTool
from fedmqtt.broker.mosquitto import (
    MosquittoBroker,
    MosquittoConfig,
    read_pid,
    reload_running_broker,
    render_config_acl,
)
from fedmqtt.errors import InvalidIdentifier
from fedmqtt.mqtt import (
    AuthenticationRefused,
    BrokerUnreachable,
    MqttConnection,
    PayloadTooLarge,
    PublishRefused,
    TlsError,
)
from fedmqtt.topics import Topics, coordinator_acl, device_acl, watcher_acl
from inbox import Inbox, wait_until

if TYPE_CHECKING:
    from conftest import SecureBroker

pytestmark = pytest.mark.mosquitto


# --- generated files (pure) ------------------------------------------------------------------------------------


def test_config_has_the_settings_fedmqtt_relies_on(tmp_path: Path) -> None:
    config = MosquittoConfig(tmp_path, port=1884, max_packet_size=8 * 1024 * 1024, run_as_root=False)
    text = config.render()
    lines = text.splitlines()
    assert "max_packet_size 8388608" in lines
    assert not any(line.startswith("message_size_limit") for line in lines)
    # A connected coordinator's queue must hold a round's burst: Mosquitto's own default (1,000) dropped updates.
    assert "max_queued_bytes 1000000000" in lines
    assert "max_queued_messages 100000" in lines
    big = MosquittoConfig(tmp_path, max_packet_size=256_000_000, max_queued_messages=5, run_as_root=False)
    assert {"max_queued_bytes 1024000000", "max_queued_messages 5"} <= set(big.render().splitlines())
    assert "persistence true" in lines
    assert f"persistence_location {tmp_path}/data/" in lines
    assert "log_dest stderr" in lines
    assert "listener 1884 127.0.0.1" in lines
    assert "allow_anonymous true" in lines
    assert "per_listener_settings false" in lines
    assert "user root" not in lines
    assert not any(line.startswith(("password_file", "acl_file", "certfile", "use_username")) for line in lines)


def test_config_with_auth_tls_and_root(tmp_path: Path) -> None:
    config = MosquittoConfig(
        tmp_path, host="0.0.0.0", port=8883, auth=True, tls=True, run_as_root=True, max_queued_bytes=1000
    )
    lines = config.render().splitlines()
    assert "user root" in lines
    assert "allow_anonymous false" in lines
    assert f"password_file {tmp_path}/passwd" in lines
    assert f"acl_file {tmp_path}/acl" in lines
    assert "use_username_as_clientid true" in lines  # behaviour: tests/test_broker_identity.py
    assert f"certfile {tmp_path}/tls/server.crt" in lines
    assert f"keyfile {tmp_path}/tls/server.key" in lines
    assert "listener 8883 0.0.0.0" in lines
    assert "max_queued_bytes 1000" in lines


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"port": 0}, "invalid port"),
        ({"port": 70000}, "invalid port"),
        ({"max_packet_size": 10}, "max_packet_size"),
        ({"max_queued_messages": -1}, "queue limits"),
        ({"max_inflight_messages": 0}, "max_inflight_messages"),
    ],
)
def test_config_rejects_bad_values(tmp_path: Path, changes: dict[str, int], message: str) -> None:
    with pytest.raises(BrokerError, match=message):
        MosquittoConfig(tmp_path, **changes)  # type: ignore[arg-type]


def test_config_rejects_a_bad_prefix_and_a_directory_with_spaces(tmp_path: Path) -> None:
    with pytest.raises(InvalidIdentifier):
        MosquittoConfig(tmp_path, prefix="a/+/b")
    with pytest.raises(BrokerError, match="white space"):
        MosquittoConfig(tmp_path / "my broker")


def test_written_files_are_private_and_tls_needs_certificates(tmp_path: Path) -> None:
    config = MosquittoConfig(tmp_path / "b", auth=True)
    config.write()
    for path in (config.config_file, config.acl_file, config.password_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert config.data_dir.is_dir()
    with pytest.raises(CertificateError, match="gen-certs"):
        MosquittoConfig(tmp_path / "c", tls=True).write()


@pytest.mark.parametrize("prefix", ["fedmqtt", "acme/fl"])
def test_acl_is_generated_from_the_topic_map(prefix: str) -> None:
    text = render_acl(prefix)
    lines = text.splitlines()
    for rule in device_acl(prefix):
        assert f"pattern {rule.access} {rule.pattern}" in lines
    coordinator_block = lines[lines.index(f"user {COORDINATOR_USER}") :]
    for rule in coordinator_acl(prefix):
        assert f"topic {rule.access} {rule.pattern}" in coordinator_block
    watcher_block = lines[lines.index(f"user {WATCHER_USER}") :]
    for rule in watcher_acl(prefix):
        assert f"topic {rule.access} {rule.pattern}" in watcher_block
    # the device patterns' write rules, taken back from the watcher
    writable = [rule.pattern for rule in device_acl(prefix) if rule.access in ("write", "readwrite")]
    assert len(writable) == 2
    for pattern in writable:
        assert f"topic deny {pattern.replace('%u', WATCHER_USER)}" in watcher_block
    rule_lines = [line for line in lines if line and not line.startswith("#")]
    expected = len(device_acl(prefix)) + len(coordinator_acl(prefix)) + len(watcher_acl(prefix)) + 2 + 2
    assert len(rule_lines) == expected  # nothing the topic map does not say


def test_account_names_are_checked() -> None:
    assert username_for("device", "sensor-7") == "sensor-7"
    assert username_for("coordinator") == COORDINATOR_USER
    assert username_for("watcher") == WATCHER_USER
    for reserved in (COORDINATOR_USER, WATCHER_USER):
        with pytest.raises(AccountError, match="cannot be a device id"):
            username_for("device", reserved)
    for bad in ("a/b", "#", "", "-x", "x" * 65):
        with pytest.raises(AccountError, match="invalid device id"):
            username_for("device", bad)
    with pytest.raises(AccountError, match="needs a device id"):
        username_for("device")


def test_accounts_are_hashed_updated_and_private(tmp_path: Path) -> None:
    password_file = tmp_path / "passwd"
    generated = add_account(password_file, "d1")
    assert len(generated) >= 20
    add_account(password_file, "d2", "chosen password")
    add_account(password_file, "d1", "new password")  # update, not a second line
    assert list_accounts(password_file) == ["d1", "d2"]
    text = password_file.read_text()
    assert generated not in text and "chosen password" not in text and "new password" not in text
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    with pytest.raises(AccountError, match="line breaks"):
        add_account(password_file, "d3", "two\nlines")


def test_missing_mosquitto_passwd_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingTool, match=r"mosquitto_passwd.*apt install mosquitto"):
        add_account(tmp_path / "passwd", "d1")


# --- a real broker: auth, ACL, TLS ---------------------------------------------------------------------------


def test_acl_file_on_disk_matches_the_topic_map(secure_mosquitto: SecureBroker) -> None:
    broker = secure_mosquitto.broker
    text = broker.config(broker.port).acl_file.read_text()
    # The broker is shared by the session's tests: some add aggregator or site accounts, each with its own block
    # after the topic map's rules.
    assert text == render_config_acl(broker.config_dir, broker.prefix)
    assert text.startswith(render_acl(broker.prefix).rstrip("\n"))


def test_wrong_password_unknown_user_and_anonymous_are_refused(secure_mosquitto: SecureBroker) -> None:
    from fedmqtt.mqtt import ClientSettings

    secure = secure_mosquitto
    for url in (
        secure.url_for("d1", "wrong password"),
        secure.url_for("nobody", "x"),
        secure.url_for(None),
    ):
        connection = MqttConnection(ClientSettings.from_url(url, "c-" + uuid.uuid4().hex[:8], tls_ca=secure.ca_file))
        with pytest.raises(AuthenticationRefused, match="refused") as info:
            connection.connect(timeout=5)
        assert "wrong password" not in str(info.value)


def test_a_device_writes_exactly_its_own_update_and_status(
    secure_mosquitto: SecureBroker, mqtt_client: MqttClientFactory
) -> None:
    secure = secure_mosquitto
    topics = Topics(job="j" + uuid.uuid4().hex[:8], prefix=secure.prefix)
    inbox = Inbox()
    mqtt_client(
        secure.url_for("coordinator"),
        subscriptions=[(topics.everything_filter, 1)],
        on_message=inbox,
        tls_ca=secure.ca_file,
    )
    device = mqtt_client(secure.url_for("d1"), tls_ca=secure.ca_file)
    allowed = {topics.update("d1"), topics.device_status("d1")}
    every_topic = [
        topics.plan,
        topics.model,
        topics.delta,
        topics.status,
        topics.events,
        topics.privacy,
        topics.round_summary(0),
        topics.update("d1"),
        topics.update("d2"),
        topics.device_status("d1"),
        topics.device_status("d2"),
    ]
    for topic in every_topic:
        if topic in allowed:
            device.publish(topic, b"ok", qos=1)
        else:
            with pytest.raises(PublishRefused, match="Not authorized") as info:
                device.publish(topic, b"forged", qos=1)
            assert info.value.reason.value == 0x87 and info.value.topic == topic
    device.publish(topics.device_status("d1"), b"sentinel", qos=1)
    inbox.wait_for(1, topic=topics.device_status("d1"), timeout=5)
    assert wait_until(lambda: any(m.payload == b"sentinel" for m in inbox.messages))
    assert {m.topic for m in inbox.messages} == allowed
    assert all(m.payload != b"forged" for m in inbox.messages)


def test_a_device_reads_the_plan_and_model_but_not_other_devices(
    secure_mosquitto: SecureBroker, mqtt_client: MqttClientFactory
) -> None:
    secure = secure_mosquitto
    ca = secure.ca_file
    topics = Topics(job="j" + uuid.uuid4().hex[:8], prefix=secure.prefix)
    coordinator = mqtt_client(secure.url_for("coordinator"), tls_ca=ca)
    coordinator.publish(topics.plan, b"plan", retain=True)
    coordinator.publish(topics.model, b"model", retain=True)
    coordinator.publish(topics.delta, b"delta", retain=True)
    inbox = Inbox()
    mqtt_client(
        secure.url_for("d1"),
        tls_ca=ca,
        on_message=inbox,
        subscriptions=[(topics.plan, 1), (topics.model, 1), (topics.delta, 1), (topics.updates_filter, 1),
                       (topics.events, 1)],
    )  # fmt: skip
    inbox.wait_for(1, topic=topics.plan)
    inbox.wait_for(1, topic=topics.model)
    inbox.wait_for(1, topic=topics.delta)
    mqtt_client(secure.url_for("d2"), tls_ca=ca).publish(topics.update("d2"), b"d2's update")
    coordinator.publish(topics.events, b"sentinel")
    inbox.wait_for(1, topic=topics.events)
    assert topics.update("d2") not in inbox.topics()


def test_the_watcher_writes_nothing(secure_mosquitto: SecureBroker, mqtt_client: MqttClientFactory) -> None:
    # What it reads (everything but the update frames): tests/test_broker_identity.py.
    secure = secure_mosquitto
    ca = secure.ca_file
    topics = Topics(job="j" + uuid.uuid4().hex[:8], prefix=secure.prefix)
    inbox = Inbox()
    watcher = mqtt_client(
        secure.url_for("watcher"), tls_ca=ca, on_message=inbox, subscriptions=[(topics.everything_filter, 1)]
    )
    mqtt_client(secure.url_for("d1"), tls_ca=ca).publish(topics.device_status("d1"), b"online")
    inbox.wait_for(1, topic=topics.device_status("d1"))
    for topic in (
        topics.plan,
        topics.status,
        topics.update("d1"),
        topics.update(WATCHER_USER),
        topics.device_status(WATCHER_USER),
    ):
        with pytest.raises(PublishRefused):
            watcher.publish(topic, b"x")


def test_tls_needs_the_ca_and_plain_tcp_to_the_tls_port_fails(
    secure_mosquitto: SecureBroker, mqtt_client: MqttClientFactory
) -> None:
    from fedmqtt.mqtt import ClientSettings

    secure = secure_mosquitto
    tls_url = secure.url_for("d1")
    via_localhost = tls_url.replace("127.0.0.1", "localhost")  # the certificate names both
    assert mqtt_client(via_localhost, tls_ca=secure.ca_file).is_connected

    without_ca = MqttConnection(ClientSettings.from_url(tls_url, "c-" + uuid.uuid4().hex[:8]))
    with pytest.raises(TlsError, match="certificate verify failed"):
        without_ca.connect(timeout=5)
    plain = MqttConnection(ClientSettings.from_url(tls_url.replace("mqtts://", "mqtt://"), "c-" + uuid.uuid4().hex[:8]))
    with pytest.raises(BrokerUnreachable, match="TLS port"):
        plain.connect(timeout=3)


def test_an_added_device_is_accepted_after_sighup(secure_mosquitto: SecureBroker) -> None:
    from fedmqtt.mqtt import ClientSettings

    secure = secure_mosquitto
    broker: MosquittoBroker = secure.broker
    device_id = "late-" + uuid.uuid4().hex[:6]
    password = broker.add_account("device", device_id)
    url = secure.url_for(device_id, password)

    def connect() -> MqttConnection:
        connection = MqttConnection(ClientSettings.from_url(url, device_id, tls_ca=secure.ca_file, clean_start=True))
        connection.connect(timeout=5)
        return connection

    with pytest.raises(AuthenticationRefused):
        connect()  # the running broker has not read the new account yet
    assert reload_running_broker(broker.config_dir) == broker.pid == read_pid(broker.config_dir)
    deadline = time.monotonic() + 5
    while True:
        try:
            connection = connect()
            break
        except AuthenticationRefused:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    connection.publish(Topics(job="j", prefix=secure.prefix).update(device_id), b"hello")
    connection.close()


# --- limits, start and stop ----------------------------------------------------------------------------------


def test_a_packet_over_max_packet_size_is_refused_and_the_broker_keeps_serving(
    mosquitto_factory: Callable[..., MosquittoBroker], mqtt_client: MqttClientFactory
) -> None:
    broker = mosquitto_factory(max_packet_size=64 * 1024)
    topics = Topics(job="j", prefix="p" + uuid.uuid4().hex[:8])

    # A raw MQTT 3.1.1 client has no idea of the limit: the broker drops its connection.
    assert raw_oversize_publish_is_dropped(broker.port, topics.model)
    assert "oversize packet" in broker.log_text()

    # fedmqtt's MQTT 5 client learns the limit from CONNACK and refuses to send.
    inbox = Inbox()
    mqtt_client(broker.url, subscriptions=[(topics.model, 1)], on_message=inbox)
    sender = mqtt_client(broker.url)
    assert sender.max_packet_size == 64 * 1024
    with pytest.raises(PayloadTooLarge, match="65536"):
        sender.publish(topics.model, b"x" * 100_000)
    assert sender.is_connected and broker.running
    sender.publish(topics.model, b"y" * 60_000)
    assert inbox.wait_for(1)[0].payload == b"y" * 60_000


def test_a_failed_start_reports_mosquittos_own_error(
    mosquitto_factory: Callable[..., MosquittoBroker], tmp_path: Path
) -> None:
    running = mosquitto_factory()
    clash = MosquittoBroker(tmp_path / "clash", port=running.port)
    with pytest.raises(BrokerStartError, match=r"(?i)address already in use"):
        clash.start()
    assert not clash.running


def test_a_broken_config_reports_mosquittos_stderr(
    mosquitto_factory: Callable[..., MosquittoBroker], tmp_path: Path
) -> None:
    """Mosquitto refuses to start (here: the server key is unreadable garbage): its own words are in the error."""
    broker = MosquittoBroker(tmp_path / "broken", tls=True, startup_timeout=5)
    broker.start()
    broker.stop()
    (tmp_path / "broken" / "tls" / "server.key").write_text("not a key")
    with pytest.raises(BrokerStartError, match="mosquitto exited with code") as info:
        broker.start()
    assert "Error" in str(info.value) and "server.key" in str(info.value)


def test_stop_is_graceful_and_saves_the_database(mosquitto_factory: Callable[..., MosquittoBroker]) -> None:
    broker = mosquitto_factory()
    pid = broker.pid
    assert pid is not None and read_pid(broker.config_dir) == pid
    broker.stop()
    assert not broker.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    log = broker.log_text()
    assert "terminating" in log and "Saving in-memory database" in log
    assert (broker.config_dir / "data" / "mosquitto.db").exists()
    assert read_pid(broker.config_dir) is None
    with pytest.raises(BrokerError, match="not running"):
        broker.reload()


@pytest.mark.mosquitto
@pytest.mark.usefixtures("mosquitto_installed")
def test_a_connected_slow_subscriber_gets_a_burst_of_1500_qos1_messages(tmp_path: Path) -> None:
    """The coordinator acknowledges an update only once it is on disk, so a round's burst waits in its queue at the
    broker. With Mosquitto's default queue (1,000 messages) a burst of 1,500 lost about 500 of them, silently for
    their publishers; the generated configuration holds them all."""
    import paho.mqtt.client as paho

    held: list[int] = []
    with MosquittoBroker(tmp_path / "broker", port=0) as broker:
        port = int(broker.url.rsplit(":", 1)[1])
        sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="slow", protocol=paho.MQTTv5, manual_ack=True)
        sub.on_message = lambda client, userdata, message: held.append(message.mid)
        sub.connect("127.0.0.1", port)
        sub.subscribe("burst/#", qos=1)
        sub.loop_start()
        publisher = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="burst", protocol=paho.MQTTv5)
        publisher.connect("127.0.0.1", port)
        publisher.loop_start()
        try:
            wait_until(lambda: sub.is_connected() and publisher.is_connected(), timeout=10)
            time.sleep(0.2)  # the subscription is in place
            for _ in range(1500):
                publisher.publish("burst/x", b"u" * 200, qos=1).wait_for_publish(10)
            received = 0
            deadline = time.monotonic() + 60
            while received < 1500 and time.monotonic() < deadline:
                while held:  # acknowledge slowly, a window at a time, as the coordinator does
                    sub.ack(held.pop(), 1)
                    received += 1
                time.sleep(0.01)
            assert received == 1500, f"{received} of 1500 arrived; broker log: {broker.log_text()[-500:]}"
            assert "dropped" not in broker.log_text()
        finally:
            publisher.loop_stop()
            sub.loop_stop()
