"""Edge sites: the topics a site's bridge carries, the Mosquitto bridge configuration fedmqtt writes, and a whole
job across two bridged Mosquitto brokers (site and cloud)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from paho.mqtt.client import topic_matches_sub

from fedmqtt.broker.bridge import BridgeConfig
from fedmqtt.broker.errors import BridgeError
from fedmqtt.broker.mosquitto import MosquittoConfig
from fedmqtt.topics import BRIDGE_DOWN, BRIDGE_UP, Topics, bridge_topics

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
