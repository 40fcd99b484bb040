"""Edge sites: the topics a site's bridge carries, the Mosquitto bridge configuration fedmqtt writes, and a whole
job across two bridged Mosquitto brokers (site and cloud)."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from paho.mqtt.client import topic_matches_sub

from conftest import MqttClientFactory, ProcessGroup, fedmqtt_argv
from fedmqtt.broker.bridge import BridgeConfig
from fedmqtt.broker.errors import BridgeError
from fedmqtt.broker.mosquitto import MosquittoBroker, MosquittoConfig
from fedmqtt.broker.net import find_free_port
from fedmqtt.mqtt import ClientSettings, parse_broker_url
from fedmqtt.topics import BRIDGE_DOWN, BRIDGE_UP, Topics, bridge_topics, site_acl
from fedmqtt.watch import StateHolder, WatchState, open_watch

# --- which topics cross the WAN ---------------------------------------------------------------------------------


def _carried(direction: str, topic: str, *, site_aggregator: bool, prefix: str = "fedmqtt", job: str = "j") -> bool:
    return any(
        d == direction and topic_matches_sub(pattern, topic)
        for d, pattern in bridge_topics(prefix, job, site_aggregator=site_aggregator)
    )


@pytest.mark.parametrize("site_aggregator", [False, True])
def test_the_plan_and_models_go_down_and_the_sites_presence_and_partials_go_up(site_aggregator: bool) -> None:
    t = Topics(job="j")
    down = (t.plan, t.model, t.delta, t.coordinator, t.collect, t.release, t.status, t.events,
            t.round_summary(7), t.privacy)  # fmt: skip
    up = (t.device_status("d1"), t.aggregator_status("w1"), t.aggregator_progress("w1"), t.partial("w1"))
    for topic in down:
        assert _carried(BRIDGE_DOWN, topic, site_aggregator=site_aggregator), topic
        assert not _carried(BRIDGE_UP, topic, site_aggregator=site_aggregator), topic
    for topic in up:
        assert _carried(BRIDGE_UP, topic, site_aggregator=site_aggregator), topic
        assert not _carried(BRIDGE_DOWN, topic, site_aggregator=site_aggregator), topic


def test_updates_cross_the_wan_only_without_a_site_aggregator() -> None:
    update = Topics(job="j").update("d1")
    assert _carried(BRIDGE_UP, update, site_aggregator=False)
    assert not _carried(BRIDGE_UP, update, site_aggregator=True)
    assert not _carried(BRIDGE_DOWN, update, site_aggregator=True)
    assert not _carried(BRIDGE_DOWN, update, site_aggregator=False)


def test_no_topic_goes_both_ways_and_nothing_of_another_job_or_prefix_is_carried() -> None:
    for site_aggregator in (False, True):
        pairs = bridge_topics("acme/fl", "j", site_aggregator=site_aggregator)
        assert {d for d, _ in pairs} == {BRIDGE_DOWN, BRIDGE_UP}
        downs = [p for d, p in pairs if d == BRIDGE_DOWN]
        ups = [p for d, p in pairs if d == BRIDGE_UP]
        for down in downs:  # a loop needs a topic that matches a filter of each direction
            assert not any(topic_matches_sub(up, down) or topic_matches_sub(down, up) for up in ups)
        for other in (Topics(job="k", prefix="acme/fl"), Topics(job="j")):
            for topic in (other.plan, other.model, other.update("d1"), other.partial("w"), other.device_status("d")):
                assert not any(topic_matches_sub(p, topic) for _, p in pairs)


def _allowed(rules: tuple, access: str, username: str, topic: str) -> bool:
    return any(
        access in rule.access and topic_matches_sub(rule.pattern.replace("%u", username), topic) for rule in rules
    )


@pytest.mark.parametrize("site_aggregator", [False, True])
def test_a_site_account_reads_what_its_bridge_carries_down_and_writes_what_it_carries_up(site_aggregator: bool) -> None:
    rules = site_acl("acme")
    t = Topics(job="j", prefix="acme")
    examples = {"+": "x1", "#": "x1/y"}
    for direction, pattern in bridge_topics("acme", "j", site_aggregator=site_aggregator):
        topic = "/".join(examples.get(level, level) for level in pattern.split("/"))
        access = "read" if direction == BRIDGE_DOWN else "write"
        assert _allowed(rules, access, "s1", topic), (direction, topic)
        assert not _allowed(rules, "write" if access == "read" else "read", "s1", topic), (direction, topic)
    assert _allowed(rules, "write", "s1", t.site_bridge("s1"))
    assert not _allowed(rules, "write", "s1", t.site_bridge("s2"))
    for topic in (t.model, t.plan, t.collect, t.status):  # the cloud's own messages
        assert not _allowed(rules, "write", "s1", topic)
    assert not _allowed(rules, "read", "s1", t.update("d1"))  # nobody's updates come back down
    assert not _allowed(rules, "read", "s1", t.partial("w1"))


@pytest.mark.mosquitto
@pytest.mark.usefixtures("mosquitto_installed")
def test_site_accounts_get_their_own_block_in_the_acl_and_a_device_account_cannot_become_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedmqtt.broker.accounts import list_accounts, render_acl
    from fedmqtt.cli import main

    text = render_acl("acme", sites=["s1"])
    block = text.split("user s1\n", 1)[1]
    assert "topic write acme/+/updates/+" in block and "topic readwrite acme/+/sites/s1/bridge" in block
    assert "user s1" not in render_acl("acme")
    config_dir = tmp_path / "cloud"
    MosquittoConfig(config_dir, auth=True, prefix="acme").write()
    assert main(["broker", "add-site", "plant-1", "--config-dir", str(config_dir)]) == 0
    assert "site account 'plant-1' created" in capsys.readouterr().out
    assert "plant-1" in list_accounts(config_dir / "passwd")
    assert "user plant-1\ntopic read acme/+/plan" in (config_dir / "acl").read_text()  # rewritten at once
    assert stat.S_IMODE((config_dir / "acl").stat().st_mode) == 0o600
    assert main(["broker", "add-device", "cam-1", "--config-dir", str(config_dir)]) == 0
    assert main(["broker", "add-site", "cam-1", "--config-dir", str(config_dir)]) == 1
    assert "'cam-1' exists and is not a site's" in capsys.readouterr().err
    assert "user cam-1" not in (config_dir / "acl").read_text()
    assert main(["broker", "add-site", "a/b", "--config-dir", str(config_dir)]) == 1
    assert "invalid site name 'a/b'" in capsys.readouterr().err
    # The same rule for aggregator accounts: a device's or a site's account cannot become one.
    for taken in ("cam-1", "plant-1"):
        assert main(["broker", "add-aggregator", taken, "--config-dir", str(config_dir)]) == 1
        assert f"{taken!r} exists and is not an aggregator's" in capsys.readouterr().err
    assert main(["broker", "add-aggregator", "agg-1", "--config-dir", str(config_dir)]) == 0
    assert "user agg-1\n" in (config_dir / "acl").read_text()
    assert main(["broker", "add-site", "agg-1", "--config-dir", str(config_dir)]) == 1
    assert "'agg-1' exists and is not a site's" in capsys.readouterr().err


# --- the bridge section of mosquitto.conf ------------------------------------------------------------------------


def _section(bridge: BridgeConfig) -> dict[str, list[str]]:
    lines: dict[str, list[str]] = {}
    for line in bridge.render():
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            lines.setdefault(key, []).append(value)
    return lines


def test_the_bridge_section_names_the_site_keeps_a_session_and_carries_qos1_one_way(tmp_path: Path) -> None:
    bridge = BridgeConfig.create("mqtt://cloud.example:1884", site="plant-3", job="mnist")
    conf = _section(bridge)
    assert conf["connection"] == ["fedmqtt-plant-3"] and conf["remote_clientid"] == ["fedmqtt-plant-3"]
    assert conf["address"] == ["cloud.example:1884"]
    assert conf["bridge_protocol_version"] == ["mqttv50"]
    assert conf["cleansession"] == ["false"] and conf["try_private"] == ["true"]
    assert conf["notification_topic"] == ["fedmqtt/mnist/sites/plant-3/bridge"]
    assert "remote_username" not in conf and "remote_password" not in conf and "bridge_cafile" not in conf
    topics = [value.split() for value in conf["topic"]]
    assert ["fedmqtt/mnist/plan", "in", "1"] in topics
    assert ["fedmqtt/mnist/updates/+", "out", "1"] in topics
    assert all(len(t) == 3 and t[2] == "1" for t in topics)
    assert len(topics) == len(bridge_topics("fedmqtt", "mnist", site_aggregator=False))
    with_aggregator = BridgeConfig.create("mqtt://cloud.example", site="plant-3", job="mnist", site_aggregator=True)
    assert not any("updates" in value for value in _section(with_aggregator)["topic"])
    assert _section(with_aggregator)["address"] == ["cloud.example:1883"]


def test_the_section_comes_last_in_mosquitto_conf_and_the_written_file_is_private(tmp_path: Path) -> None:
    bridge = BridgeConfig.create("mqtt://cloud.example", site="s1", job="j", username="site-s1", password="pw-123")
    config = MosquittoConfig(tmp_path / "site", bridge=bridge)
    text = config.render()
    head, _, tail = text.partition("connection fedmqtt-s1\n")
    assert "listener " in head and "listener " not in tail and "topic " in tail
    assert "remote_username site-s1" in tail and "remote_password pw-123" in tail
    path = config.write()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "pw-123" not in repr(bridge)


def test_tls_files_go_into_the_section_and_missing_ones_are_named(tmp_path: Path) -> None:
    from fedmqtt.broker.certs import generate_test_certificates, issue_client_certificate

    files = generate_test_certificates(tmp_path / "tls")
    client = issue_client_certificate(tmp_path / "tls", "site-s1")
    bridge = BridgeConfig.create("mqtts://cloud.example", site="s1", job="j", cafile=files.ca_cert,
                                 certfile=client.cert, keyfile=client.key)  # fmt: skip
    conf = _section(bridge)
    assert conf["bridge_cafile"] == [str(files.ca_cert)] and conf["bridge_certfile"] == [str(client.cert)]
    assert conf["bridge_keyfile"] == [str(client.key)] and conf["address"] == ["cloud.example:8883"]
    bridge.check_files()
    missing = BridgeConfig.create("mqtts://cloud.example", site="s1", job="j", cafile=tmp_path / "nope.crt")
    with pytest.raises(BridgeError, match=r"--bridge-cafile: .*nope\.crt does not exist"):
        missing.check_files()
    with pytest.raises(BridgeError, match="--bridge-cafile"):
        MosquittoConfig(tmp_path / "site", bridge=missing).write()
    not_a_cert = tmp_path / "ca.txt"
    not_a_cert.write_text("hello\n")
    with pytest.raises(BridgeError, match="not a PEM certificate"):
        BridgeConfig.create("mqtts://c", site="s1", job="j", cafile=not_a_cert).check_files()


@pytest.mark.parametrize(
    ("kwargs", "flag", "says"),
    [
        ({"url": "cloud.example"}, "--bridge-to", "scheme is missing"),
        ({"url": "http://cloud.example"}, "--bridge-to", "unsupported scheme"),
        ({"url": "mqtt://u:secret@cloud.example"}, "--bridge-to", "--bridge-password-file"),
        ({"site": "a/b"}, "--site", "invalid site name"),
        ({"site": ""}, "--site", "invalid site name"),
        ({"job": "x+y"}, "--job", "invalid job id"),
        ({"prefix": "a//b"}, "--prefix", "invalid"),
        ({"password": "pw"}, "--bridge-password-file", "add --bridge-username"),
        ({"username": "a b"}, "--bridge-username", "white space"),
        ({"username": "u", "password": "p w"}, "--bridge-password-file", "white space"),
        ({"url": "mqtt://u1@cloud.example", "username": "u2"}, "--bridge-username", "already names"),
        ({"cafile": Path("ca.crt")}, "--bridge-cafile", "mqtts://"),
        ({"url": "mqtts://c", "cafile": Path("ca.crt"), "certfile": Path("c.crt")}, "--bridge-certfile", "its key"),
        ({"url": "mqtts://c", "cafile": Path("a b/ca.crt")}, "--bridge-cafile", "white space"),
    ],
)
def test_values_mosquitto_could_not_use_are_refused_naming_the_flag(kwargs: dict, flag: str, says: str) -> None:
    values = {"url": "mqtt://cloud.example", "site": "s1", "job": "j", **kwargs}
    with pytest.raises(BridgeError, match=says) as refused:
        BridgeConfig.create(values.pop("url"), **values)
    assert refused.value.flag == flag and str(refused.value).startswith(f"{flag}: ")


# --- a whole job across two bridged Mosquitto brokers ------------------------------------------------------------


def test_the_cli_refuses_a_bridge_it_cannot_build(capsys: pytest.CaptureFixture[str]) -> None:
    from fedmqtt.cli import main

    cases = [
        (["--embedded", "--bridge-to", "mqtt://c", "--site", "s", "--job", "j"], "--bridge-to: bridges are Mosquitto's"),
        (["--mosquitto", "--site", "s"], "--site: configures a bridge: add --bridge-to"),
        (["--mosquitto", "--site-aggregator"], "--site-aggregator: configures a bridge"),
        (["--mosquitto", "--bridge-to", "mqtt://c", "--job", "j"], "--site: a bridge carries one job of one site"),
        (["--mosquitto", "--bridge-to", "mqtt://c", "--site", "s", "--job", "j", "--bridge-username", "u",
          "--bridge-password-file", "/nonexistent/pw"], "--bridge-password-file: /nonexistent/pw does not exist"),
    ]  # fmt: skip
    for flags, message in cases:
        assert main(["broker", *flags]) == 1
        assert message in capsys.readouterr().err, flags


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("small"), num_train=600, num_test=300, seed=11)


class EdgeJob(ProcessGroup):
    """One job across a site broker (``fedmqtt broker --bridge-to``, a subprocess) and a cloud broker (with
    ``passwords``: TLS and accounts): the coordinator and a watcher on the cloud, the devices on the site."""

    def __init__(self, cloud: MosquittoBroker, passwords: dict[str, str] | None, prefix: str, logs: Path) -> None:
        super().__init__(logs)
        self.cloud = cloud
        self.prefix = prefix
        self.job = "edge"
        self.topics = Topics(job=self.job, prefix=prefix)
        self.secrets = logs / "secrets"
        self.secrets.mkdir()
        self.accounts = passwords is not None
        for user, password in (passwords or {}).items():
            (self.secrets / user).write_text(password + "\n")
        self.holder = StateHolder(WatchState(topics=self.topics))
        self.site_url: str | None = None

    def cloud_flags(self, user: str) -> list[str]:
        flags = ["--broker", self.cloud.url, "--job", self.job, "--prefix", self.prefix, "--mqtt-version", "5"]
        if self.accounts:
            flags += ["--tls-ca", str(self.cloud.ca_file), "--username", user, "--password-file",
                      str(self.secrets / user)]  # fmt: skip
        return flags

    def site_flags(self) -> list[str]:
        assert self.site_url is not None
        return ["--broker", self.site_url, "--job", self.job, "--prefix", self.prefix, "--mqtt-version", "5"]

    def site(self, name: str, config_dir: Path, *flags: str) -> str:
        """Start the site broker with its bridge; its URL once it serves."""
        self.start(
            f"site-{name}",
            fedmqtt_argv("broker", "--mosquitto", "--config-dir", str(config_dir), "--port", str(find_free_port()),
                         "--prefix", self.prefix, "--bridge-to", self.cloud.url, "--site", name, "--job", self.job,
                         *flags),
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while "listening on" not in self.log(f"site-{name}"):
            self.fail_if_one_failed("the site broker")
            assert time.monotonic() < deadline, self.log(f"site-{name}")
            time.sleep(0.1)
        self.site_url = self.log(f"site-{name}").split("listening on ")[1].split()[0]
        return self.site_url

    def coordinator(self, data: Path, *flags: str) -> None:
        self.start("coordinator", fedmqtt_argv(
            "coordinator", *self.cloud_flags("coordinator"), "--model", "mlp", "--eval-data", str(data),
            "--local-epochs", "1", "--batch-size", "20", "--lr", "0.1", "--uplink", "int8", "--quiet", *flags))  # fmt: skip

    def devices(self, name: str, data: Path, *flags: str) -> None:
        assert self.site_url is not None
        self.start(name, fedmqtt_argv("device", *self.site_flags(), "--data-dir", str(data), "--threads", "1",
                                      "--exit-on-finish", *flags))  # fmt: skip

    def wait_for(self, what: str, predicate: Callable[[WatchState], bool], timeout: float = 120.0) -> WatchState:
        deadline = time.monotonic() + timeout
        while not predicate(state := self.holder.state):
            self.fail_if_one_failed(what)
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; state: {state.status}\n{self.log('coordinator')}")
            time.sleep(0.05)
        return state


@pytest.mark.e2e
@pytest.mark.mosquitto
def test_a_job_runs_across_the_bridge_devices_on_the_site_coordinator_in_the_cloud(
    mosquitto_factory: Callable[..., MosquittoBroker], mqtt_client: MqttClientFactory, tmp_path: Path,
    topic_prefix: str, small_data: Path,
) -> None:  # fmt: skip
    cloud = mosquitto_factory(tls=True, auth=True, prefix=topic_prefix)
    passwords = {"coordinator": cloud.add_account("coordinator"), "watcher": cloud.add_account("watcher"),
                 "plant-1": cloud.add_account("site", "plant-1")}  # fmt: skip
    cloud.reload()
    job = EdgeJob(cloud, passwords, topic_prefix, tmp_path)
    try:
        watcher_url = parse_broker_url(cloud.url).with_credentials("watcher", passwords["watcher"])
        job.watcher = open_watch(
            ClientSettings.from_url(watcher_url.to_url(include_password=True), "watch-edge", tls_ca=cloud.ca_file),
            job.holder,
        )
        site_dir = tmp_path / "site"
        job.site("plant-1", site_dir, "--bridge-username", "plant-1", "--bridge-password-file",
                 str(job.secrets / "plant-1"), "--bridge-cafile", str(cloud.ca_file))  # fmt: skip
        conf = site_dir / "mosquitto.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        assert f"remote_password {passwords['plant-1']}" in conf.read_text()
        for pid in (int((site_dir / "mosquitto.pid").read_text()), job.processes["site-plant-1"].pid):
            assert passwords["plant-1"] not in Path(f"/proc/{pid}/cmdline").read_text()
        # The bridge is up: its state is retained on the cloud broker (read with the coordinator's account
        # before the coordinator runs: one connection per account).
        states: list[bytes] = []
        coordinator_url = parse_broker_url(cloud.url).with_credentials("coordinator", passwords["coordinator"])
        peek = mqtt_client(coordinator_url.to_url(include_password=True), tls_ca=cloud.ca_file,
                           subscriptions=[(job.topics.site_bridge("plant-1"), 1)],
                           on_message=lambda t, p, q, r, m: states.append(p))  # fmt: skip
        wait_until(lambda: b"1" in states, "the bridge's state on the cloud broker", job)
        peek.close()
        job.coordinator(small_data, "--rounds", "2", "--min-updates", "3", "--round-timeout", "60")
        job.devices("devices", small_data, "--id-prefix", "d", "--partition", "iid", "--num-parts", "3",
                    "--parts", "0:3")  # fmt: skip
        state = job.wait_for("the job to finish", lambda s: s.finished and s.rounds_done == 2, timeout=180)
        assert job.wait_exit("coordinator") == 0
        # The coordinator is on the cloud broker only: every update it accepted crossed the bridge.
        for summary in state.ordered_rounds():
            assert set(summary.participants) == {"d0000", "d0001", "d0002"}
            assert summary.closed_by == "quorum" and summary.bytes_up > 0
        assert state.ordered_rounds()[-1].accuracy is not None
        # The devices' presence crossed the bridge too (retained on the cloud broker), and they leave.
        assert job.wait_exit("devices") == 0
        job.wait_for("the devices' offline status", lambda s: s.device_counts() == {"offline": 3}, timeout=20)
    finally:
        if getattr(job, "watcher", None) is not None:
            job.watcher.close()
        job.close()


def wait_until(
    predicate: Callable[[], bool], what: str, group: ProcessGroup | None = None, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if group is not None:
            group.fail_if_one_failed(what)
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


class Wan:
    """A TCP forwarder on loopback standing for the WAN between a site and the cloud: ``cut()`` closes every
    connection through it and refuses new ones (the link is down), ``restore()`` lets them through again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.connections += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        with self.lock:
            for s in self.connections:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.connections.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.mark.mosquitto
def test_while_the_wan_is_down_qos1_messages_wait_on_both_sides_and_arrive_when_the_bridge_reconnects(
    mosquitto_factory: Callable[..., MosquittoBroker], mqtt_client: MqttClientFactory, topic_prefix: str
) -> None:
    t = Topics(job="j", prefix=topic_prefix)
    cloud = mosquitto_factory(prefix=topic_prefix)
    wan = Wan(cloud.port)
    try:
        bridge = BridgeConfig.create(f"mqtt://127.0.0.1:{wan.port}", site="s1", job="j", prefix=topic_prefix)
        site = mosquitto_factory(prefix=topic_prefix, bridge=dataclasses.replace(bridge, restart_timeout=(1, 2)))
        at_cloud: list[tuple[str, bytes]] = []
        at_site: list[tuple[str, bytes]] = []
        mqtt_client(cloud.url, subscriptions=[(t.updates_filter, 1), (t.site_bridge("s1"), 1)],
                    on_message=lambda tp, p, q, r, m: at_cloud.append((tp, p)))  # fmt: skip
        mqtt_client(site.url, subscriptions=[(t.plan, 1), (t.model, 1)],
                    on_message=lambda tp, p, q, r, m: at_site.append((tp, p)))  # fmt: skip
        wait_until(lambda: (t.site_bridge("s1"), b"1") in at_cloud, "the bridge to connect")

        wan.cut()
        wait_until(lambda: (t.site_bridge("s1"), b"0") in at_cloud, "the bridge's last will on the cloud broker")
        device = mqtt_client(site.url)
        for n in range(3):
            device.publish(t.update(f"d{n}"), f"update {n}".encode(), qos=1)
        device.publish(t.device_status("d0"), b"online", qos=1, retain=True)
        coordinator = mqtt_client(cloud.url)
        coordinator.publish(t.plan, b"plan of round 2", qos=1, retain=True)
        coordinator.publish(t.model, b"model of round 2", qos=1, retain=True)
        time.sleep(1.0)
        assert not [m for m in at_cloud if t.device_of_update(m[0])] and not at_site  # nothing crossed

        wan.restore()
        wait_until(lambda: len([m for m in at_cloud if t.device_of_update(m[0])]) == 3, "the queued updates")
        wait_until(lambda: len(at_site) == 2, "the queued plan and model")
        assert sorted(p for tp, p in at_cloud if t.device_of_update(tp)) == [b"update 0", b"update 1", b"update 2"]
        assert dict(at_site) == {t.plan: b"plan of round 2", t.model: b"model of round 2"}
        # Retained state crossed too: a client that connects to either side now gets the other side's.
        late_cloud: list[bytes] = []
        mqtt_client(cloud.url, subscriptions=[(t.device_status("d0"), 1)],
                    on_message=lambda tp, p, q, r, m: late_cloud.append(p))  # fmt: skip
        late_site: list[bytes] = []
        mqtt_client(site.url, subscriptions=[(t.plan, 1)], on_message=lambda tp, p, q, r, m: late_site.append(p))
        wait_until(lambda: late_cloud == [b"online"] and late_site == [b"plan of round 2"], "retained messages")
    finally:
        wan.close()


@pytest.mark.e2e
@pytest.mark.mosquitto
def test_with_a_site_aggregator_one_partial_per_round_crosses_the_wan_and_no_update(
    mosquitto_factory: Callable[..., MosquittoBroker], mqtt_client: MqttClientFactory, tmp_path: Path,
    topic_prefix: str, small_data: Path,
) -> None:  # fmt: skip
    cloud = mosquitto_factory(prefix=topic_prefix)
    job = EdgeJob(cloud, None, topic_prefix, tmp_path)
    t = job.topics
    crossed: list[str] = []
    mqtt_client(cloud.url, subscriptions=[(p, 1) for d, p in bridge_topics(topic_prefix, job.job, site_aggregator=False)
                                          if d == BRIDGE_UP],
                on_message=lambda tp, p, q, r, m: crossed.append(tp))  # fmt: skip
    try:
        job.watcher = open_watch(ClientSettings.from_url(cloud.url, "watch-edge-agg"), job.holder)
        job.site("plant-1", tmp_path / "site", "--site-aggregator")
        job.start("aggregator", fedmqtt_argv("aggregator", *job.site_flags(), "--site", "plant-1", "--id",
                                             "agg-plant-1", "--spool", str(tmp_path / "spool")))  # fmt: skip
        job.coordinator(small_data, "--rounds", "2", "--min-updates", "3", "--round-timeout", "60",
                        "--aggregators", "1")  # fmt: skip
        job.devices("devices", small_data, "--id-prefix", "d", "--partition", "iid", "--num-parts", "3",
                    "--parts", "0:3")  # fmt: skip
        state = job.wait_for("the job to finish", lambda s: s.finished and s.rounds_done == 2, timeout=180)
        assert job.wait_exit("coordinator") == 0
        for summary in state.ordered_rounds():
            assert set(summary.participants) == {"d0000", "d0001", "d0002"}
            assert summary.closed_by == "quorum"
        assert state.ordered_rounds()[-1].accuracy is not None
        assert job.wait_exit("devices") == 0 and job.wait_exit("aggregator") == 0
        # Across the WAN: one partial per round from the site's aggregator, its presence and progress, the
        # devices' presence -- and not one update.
        assert not [topic for topic in crossed if t.device_of_update(topic) is not None]
        assert [t.aggregator_of_partial(topic) for topic in crossed if t.aggregator_of_partial(topic)] == [
            "agg-plant-1",
            "agg-plant-1",
        ]
        assert any(t.aggregator_of_progress(topic) == "agg-plant-1" for topic in crossed)
        assert any(t.device_of_status(topic) == "d0000" for topic in crossed)
    finally:
        if getattr(job, "watcher", None) is not None:
            job.watcher.close()
        job.close()


@pytest.mark.mosquitto
def test_a_bridge_logs_in_with_a_client_certificate_whose_name_is_a_site_account(
    mosquitto_factory: Callable[..., MosquittoBroker], mqtt_client: MqttClientFactory, tmp_path: Path,
    topic_prefix: str,
) -> None:  # fmt: skip
    from fedmqtt.broker.certs import generate_test_certificates, issue_client_certificate
    from fedmqtt.broker.mosquitto import register_site_account

    t = Topics(job="j", prefix=topic_prefix)
    cloud_dir = tmp_path / "mosquitto-0"  # where mosquitto_factory puts its first broker
    generate_test_certificates(cloud_dir / "tls")
    register_site_account(cloud_dir, "s1")
    cloud = mosquitto_factory(prefix=topic_prefix, tls=True, client_certs=True)
    site_cert = issue_client_certificate(cloud_dir / "tls", "s1")
    other_cert = issue_client_certificate(cloud_dir / "tls", "s2")  # a valid certificate, not a site account
    coordinator = cloud.issue_client_certificate("coordinator")
    got: list[str] = []
    mqtt_client(cloud.url, tls_ca=cloud.ca_file, tls_cert=coordinator.cert, tls_key=coordinator.key,
                subscriptions=[(t.updates_filter, 1)], on_message=lambda tp, p, q, r, m: got.append(tp))  # fmt: skip
    for name, cert in (("s1", site_cert), ("s2", other_cert)):
        bridge = BridgeConfig.create(cloud.url, site=name, job="j", prefix=topic_prefix, cafile=cloud.ca_file,
                                     certfile=cert.cert, keyfile=cert.key)  # fmt: skip
        site = mosquitto_factory(prefix=topic_prefix, bridge=bridge)
        wait_until(lambda s=name: f"as {s} (p5" in cloud.log_text(), f"the bridge of {name} to connect")
        mqtt_client(site.url).publish(t.update(f"from-{name}"), b"u", qos=1)
    wait_until(lambda: t.update("from-s1") in got, "the update of the site account's bridge")
    time.sleep(1.0)
    assert got == [t.update("from-s1")]  # s2's certificate is valid but grants no site's rights
