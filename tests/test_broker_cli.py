"""``fedmqtt broker``: account and certificate actions in-process, the foreground brokers as real processes."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import MqttClientFactory
from fedmqtt.broker.accounts import list_accounts
from fedmqtt.broker.mosquitto import MosquittoBroker
from fedmqtt.broker.net import find_free_port
from fedmqtt.cli import main
from fedmqtt.mqtt import AuthenticationRefused, ClientSettings, MqttConnection, parse_broker_url


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.mosquitto
@pytest.mark.usefixtures("mosquitto_installed")
def test_add_device_prints_a_generated_password_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["broker", "add-device", "sensor-1", "--config-dir", str(tmp_path)], capsys)
    assert code == 0
    assert "device account 'sensor-1' created" in out
    password = out.split("password: ")[1].split()[0]
    assert len(password) >= 20 and password not in (tmp_path / "passwd").read_text()
    assert "no broker is running" in out

    code, out, _ = run_cli(
        ["broker", "--config-dir", str(tmp_path), "add-device", "sensor-1", "--password", "chosen"], capsys
    )
    assert code == 0 and "updated" in out and "chosen" not in out and "password:" not in out
    for kind in ("coordinator", "watcher"):
        code, out, _ = run_cli(["broker", f"add-{kind}", "--config-dir", str(tmp_path)], capsys)
        assert code == 0 and f"{kind} account '{kind}' created" in out
    assert list_accounts(tmp_path / "passwd") == ["sensor-1", "coordinator", "watcher"]
    assert stat.S_IMODE((tmp_path / "passwd").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("device_id", "message"), [("coordinator", "cannot be a device id"), ("a/b", "invalid device id")]
)
def test_add_device_refuses_bad_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], device_id: str, message: str
) -> None:
    code, _, err = run_cli(["broker", "add-device", device_id, "--config-dir", str(tmp_path)], capsys)
    assert code == 1 and message in err
    assert not (tmp_path / "passwd").exists()


def _logs_in_once_reloaded(
    mqtt_client: MqttClientFactory, broker: MosquittoBroker, device_id: str, password: str
) -> None:
    """The account logs in on ``broker`` (which reloads its password file on SIGHUP, asynchronously)."""
    url = parse_broker_url(broker.url).with_credentials(device_id, password).to_url(include_password=True)
    for attempt in range(50):
        try:
            assert mqtt_client(url, client_id=device_id).is_connected
            return
        except AuthenticationRefused:
            if attempt == 49:
                raise
            time.sleep(0.1)


@pytest.mark.mosquitto
def test_add_device_reloads_the_running_broker(
    mosquitto_factory: Callable[..., MosquittoBroker],
    mqtt_client: MqttClientFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker = mosquitto_factory(auth=True)
    device_id = "dev-" + uuid.uuid4().hex[:6]
    code, out, _ = run_cli(["broker", "add-device", device_id, "--config-dir", str(broker.config_dir)], capsys)
    assert code == 0 and f"reloaded the running broker (pid {broker.pid})" in out
    password = out.split("password: ")[1].split()[0]
    _logs_in_once_reloaded(mqtt_client, broker, device_id, password)


@pytest.mark.mosquitto
def test_a_password_file_sets_the_password_even_one_starting_with_a_dash(
    mosquitto_factory: Callable[..., MosquittoBroker],
    mqtt_client: MqttClientFactory,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """docker/entrypoint.sh's generated secrets (token_urlsafe) start with '-' one time in 64: on a command line
    `--password -x...` is a missing argument; from a file it is just a password."""
    broker = mosquitto_factory(auth=True)
    device_id = "dev-" + uuid.uuid4().hex[:6]
    secret = tmp_path / "secret"
    secret.write_text("-starts-with-a-dash\n")
    code, out, _ = run_cli(
        ["broker", "add-device", device_id, "--config-dir", str(broker.config_dir), "--password-file", str(secret)],
        capsys,
    )
    assert code == 0 and "password:" not in out and "-starts-with-a-dash" not in out
    _logs_in_once_reloaded(mqtt_client, broker, device_id, "-starts-with-a-dash")
    with pytest.raises(SystemExit) as refused:  # one or the other
        run_cli(["broker", "add-device", "d2", "--password", "p", "--password-file", str(secret)], capsys)
    assert refused.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_gen_certs_writes_private_keys_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        ["broker", "gen-certs", "--config-dir", str(tmp_path), "--host", "broker.lan", "--host", "10.1.2.3"], capsys
    )
    assert code == 0 and "ca.crt" in out
    tls = tmp_path / "tls"
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((tls / key).stat().st_mode) == 0o600
    san = subprocess.run(
        ["openssl", "x509", "-in", str(tls / "server.crt"), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "DNS:broker.lan" in san and "IP Address:10.1.2.3" in san
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tls / "ca.crt"), str(tls / "server.crt")], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stderr

    code, _, err = run_cli(["broker", "gen-certs", "--config-dir", str(tmp_path)], capsys)
    assert code == 1 and "--force" in err
    code, _, _ = run_cli(["broker", "gen-certs", "--config-dir", str(tmp_path), "--force"], capsys)
    assert code == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--embedded", "--auth"], "--auth: the embedded broker has no accounts"),
        (["--embedded", "--tls"], "--tls: the embedded broker"),
        (["--embedded", "--max-packet-mb", "0"], "--max-packet-mb"),
        (["--embedded", "--max-queued-messages", "5000"], "--max-queued-messages: sizes Mosquitto's per-client"),
        (["--embedded", "--max-queued-mb", "500"], "--max-queued-mb: sizes Mosquitto's per-client queues"),
    ],
)
def test_impossible_broker_options_are_refused(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    code, _, err = run_cli(["broker", *flags], capsys)
    assert code == 1 and message in err


@pytest.mark.mosquitto
@pytest.mark.usefixtures("mosquitto_installed")
def test_tls_without_certificates_says_how_to_get_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        ["broker", "--mosquitto", "--tls", "--config-dir", str(tmp_path), "--port", str(find_free_port())], capsys
    )
    assert code == 1 and "fedmqtt broker gen-certs" in err


def run_foreground(args: list[str], tmp_path: Path, stop: signal.Signals) -> tuple[int, str]:
    """Start ``fedmqtt broker ARGS``, wait for its ready line, connect a client, stop it with ``stop``."""
    log = tmp_path / "broker-output.txt"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "fedmqtt.cli", "broker", *args],
            stdout=subprocess.PIPE,
            stderr=output,
            text=True,
            cwd=tmp_path,
        )
        try:
            assert process.stdout is not None
            ready = process.stdout.readline()
            assert "listening on" in ready, ready + log.read_text()
            url = ready.split("listening on ")[1].split()[0].rstrip(";")
            with MqttConnection(ClientSettings.from_url(url, "cli-" + uuid.uuid4().hex[:6])) as client:
                client.publish("cli/test", b"hello")
            process.send_signal(stop)
            code = process.wait(15)
            rest = process.stdout.read()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return code, ready + rest + log.read_text()


def test_embedded_broker_runs_in_the_foreground_until_sigint(tmp_path: Path) -> None:
    port = find_free_port()
    code, output = run_foreground(["--embedded", "--port", str(port)], tmp_path, signal.SIGINT)
    assert code == 0, output
    assert f"mqtt://127.0.0.1:{port}" in output and "stopped" in output


@pytest.mark.mosquitto
@pytest.mark.usefixtures("mosquitto_installed")
def test_mosquitto_runs_in_the_foreground_until_sigterm(tmp_path: Path) -> None:
    port = find_free_port()
    code, output = run_foreground(["--mosquitto", "--port", str(port), "--config-dir", "cfg"], tmp_path, signal.SIGTERM)
    assert code == 0, output
    assert "mosquitto version" in output and "terminating" in output
    assert (tmp_path / "cfg" / "mosquitto.conf").exists()
    assert "Saving in-memory database" in output  # a graceful stop
    assert not (tmp_path / "cfg" / "mosquitto.pid").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-queued-messages", "0"], "--max-queued-messages: must be at least 1"),
        (["--max-queued-mb", "1", "--max-packet-mb", "8"], "--max-queued-mb: must hold at least one maximum-size"),
    ],
)
def test_a_queue_that_cannot_hold_a_round_is_refused_before_mosquitto_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    code, _, err = run_cli(["broker", "--mosquitto", "--config-dir", str(tmp_path), *flags], capsys)
    assert code == 1 and message in err
    assert not (tmp_path / "mosquitto.conf").exists()
