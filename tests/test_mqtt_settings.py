"""``BrokerSettings``: the broker flags validated once (URL, credentials from four sources, CA file, protocol),
and the argparse side (``add_broker_flags`` / ``broker_settings_from_args``)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from fedmqtt.broker.certs import generate_test_certificates
from fedmqtt.errors import ConfigError
from fedmqtt.mqtt import (
    PASSWORD_ENV,
    BrokerSettings,
    BrokerURL,
    ClientSettings,
    Will,
    add_broker_flags,
    broker_settings_from_args,
)
from fedmqtt.mqtt.settings import config_error


def settings(env: dict[str, str] | None = None, **fields: object) -> BrokerSettings:
    return BrokerSettings.model_validate(fields, context={"env": env or {}})


def from_flags(*argv: str, env: dict[str, str] | None = None) -> BrokerSettings:
    parser = argparse.ArgumentParser()
    add_broker_flags(parser)
    return broker_settings_from_args(parser.parse_args(list(argv)), env=env or {})


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_test_certificates(tmp_path_factory.mktemp("tls")).ca_cert


def test_defaults() -> None:
    s = settings()
    assert s.broker == BrokerURL("mqtt", "127.0.0.1", 1883) and s.mqtt_version == "auto"
    assert s.url.username is None and s.url.password is None


def test_the_url_is_parsed_once_into_a_broker_url() -> None:
    s = settings(broker="mqtts://cam-7:s%40cret@broker.lan")
    assert s.broker == BrokerURL("mqtts", "broker.lan", 8883, "cam-7", "s@cret")
    client = s.client_settings("c1", clean_start=True, session_expiry=0, keepalive=10)
    assert isinstance(client, ClientSettings) and client.broker is s.url
    assert (client.client_id, client.clean_start, client.session_expiry, client.keepalive) == ("c1", True, 0, 10)
    assert client.protocol == "auto"


@pytest.mark.parametrize("url", ["", "broker.lan:1883", "http://h", "mqtt://h:0", "mqtt://h:x", "mqtt://h/path"])
def test_a_malformed_url_is_refused_naming_the_flag(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^--broker: invalid broker URL"):
        from_flags("--broker", url)


def test_a_password_in_a_message_is_masked() -> None:
    with pytest.raises(ConfigError) as info:
        from_flags("--broker", "mqtt://u:hunter2@h:99999")
    assert "hunter2" not in str(info.value) and "***" in str(info.value)


def test_password_sources_in_order_flag_file_url_environment(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    env = {PASSWORD_ENV: "from-env"}
    assert from_flags("--username", "u", env=env).url.password == "from-env"
    assert from_flags("--broker", "mqtt://u:from-url@h", env=env).url.password == "from-url"
    assert from_flags("--broker", "mqtt://u:from-url@h", "--password-file", str(secret)).url.password == "from-file"
    assert from_flags("--username", "u", "--password", "from-flag", env=env).url.password == "from-flag"
    # --username overrides the URL's user; the environment's password alone logs nobody in.
    assert from_flags("--broker", "mqtt://a@h", "--username", "b").url.username == "b"
    assert from_flags(env=env).url.password is None


def test_password_file_is_read_once_first_line_only(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\r\nignored\n")
    s = from_flags("--username", "u", "--password-file", str(secret))
    secret.write_text("changed\n")
    assert s.url.password == "s3cret"
    assert s.client_settings("c").broker.password == "s3cret"


def test_password_and_password_file_together_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("x\n")
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_broker_flags(parser)
    with pytest.raises(argparse.ArgumentError, match="not allowed with"):
        parser.parse_args(["--password", "a", "--password-file", str(secret)])
    with pytest.raises(ValidationError, match=r"password_file: give --password or --password-file, not both") as info:
        settings(username="u", password="a", password_file=secret)  # a settings file or the environment
    assert "'a'" not in str(info.value)  # pydantic shows no input values: they may hold the password


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: p, "does not exist"),
        (lambda p: (p.mkdir(), p)[1], "is a directory"),
        (lambda p: (p.write_bytes(b"\xff\xfe\x00"), p)[1], "is not UTF-8 text"),
        (lambda p: (p.write_text("\n"), p)[1], "is empty"),
        (lambda p: (p.write_text("x"), p.chmod(0), p)[2], "cannot be read"),
    ],
    ids=["missing", "directory", "binary", "empty", "unreadable"],
)
def test_an_unusable_password_file_is_refused_naming_flag_and_path(tmp_path: Path, make: object, problem: str) -> None:
    if problem == "cannot be read" and os.geteuid() == 0:
        problem = "is not"  # root reads a mode-0 file: make it unreadable another way
        path = tmp_path / "pw"
        path.write_bytes(b"\x80")
    else:
        path = make(tmp_path / "pw")  # type: ignore[operator]
    with pytest.raises(ConfigError) as info:
        from_flags("--username", "u", "--password-file", str(path))
    assert str(info.value).startswith(f"--password-file: {path} {problem}"), info.value


def test_a_password_without_a_user_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^--username: a password needs a user name"):
        from_flags("--password", "x")


def test_tls_ca_is_checked_and_needs_a_tls_url(tmp_path: Path, ca_file: Path) -> None:
    assert from_flags("--broker", "mqtts://h", "--tls-ca", str(ca_file)).tls_ca == ca_file
    with pytest.raises(ConfigError, match=r"^--tls-ca: .*missing.crt does not exist"):
        from_flags("--broker", "mqtts://h", "--tls-ca", str(tmp_path / "missing.crt"))
    with pytest.raises(ConfigError, match=r"^--tls-ca: a CA file was given but mqtt://h:1883 is not a TLS URL"):
        from_flags("--broker", "mqtt://h", "--tls-ca", str(ca_file))


def test_mqtt_version_is_auto_unless_given() -> None:
    assert from_flags().mqtt_version == "auto"
    assert from_flags("--mqtt-version", "3.1.1").client_settings("c").protocol == "3.1.1"
    with pytest.raises(SystemExit):
        from_flags("--mqtt-version", "4")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as raw:
        BrokerSettings.model_validate({"broker": "nope", "tls_ca": str(tmp_path / "x.crt"), "mqtt_version": "4"})
    error = config_error(raw.value)
    assert error.field == "--broker"
    assert str(error).startswith("--broker: ") and "; --tls-ca: " in str(error) and "; --mqtt-version: " in str(error)


def test_the_password_is_never_dumped_nor_put_on_a_child_command_line(tmp_path: Path) -> None:
    s = from_flags("--broker", "mqtt://u:hunter2@h:1884", "--mqtt-version", "5")
    dumped = json.dumps(s.model_dump(mode="json"))
    assert "hunter2" not in dumped and "hunter2" not in repr(s) and "hunter2" not in str(s.url)
    assert s.child_args() == ["--broker", "mqtt://h:1884", "--mqtt-version", "5", "--username", "u"]
    assert s.child_env() == {PASSWORD_ENV: "hunter2"}
    # A child given those flags and that environment logs in the same way.
    child = from_flags(*s.child_args(), env=s.child_env())
    assert child.url == s.url


def test_a_settings_model_can_inherit_the_fields_and_checks() -> None:
    class JobConfig(BrokerSettings):
        job: str

    config = JobConfig.model_validate({"broker": "mqtt://h", "job": "j", "username": "u"}, context={"env": {}})
    assert config.client_settings("c", will=Will("a/b", b"x")).broker == BrokerURL("mqtt", "h", 1883, "u")
    with pytest.raises(ValidationError, match="invalid broker URL"):
        JobConfig.model_validate({"broker": "h:1", "job": "j"})


def test_with_broker_keeps_the_credentials() -> None:
    s = from_flags("--username", "u", "--password", "p", "--mqtt-version", "3.1.1")
    moved = s.with_broker("mqtt://127.0.0.1:5555")
    assert moved.url == BrokerURL("mqtt", "127.0.0.1", 5555, "u", "p") and moved.mqtt_version == "3.1.1"
