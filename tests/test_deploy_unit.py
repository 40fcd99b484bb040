"""deploy/fedmqtt-device.service and deploy/fedmqtt-device.env: the systemd unit of a board.

* ``systemd-analyze verify`` (Debian's systemd package) accepts the unit without a warning, with its ExecStart
  pointed at this checkout's ``fedmqtt`` (the only path that differs on a board).
* The unit says what a board needs: restart on failure with a delay, the settings from the environment file,
  a state directory for ``--state-dir``, its own user, resource limits, hardening that torch tolerates, and no
  secret on the command line.
* Its command line, expanded the way systemd expands it (``${VAR}`` one argument, ``$VAR`` split on white space,
  ``%d`` the credentials directory, ``%S`` the state root) from the example environment file, runs a real device
  against a real Mosquitto: with client certificates as the unit ships, and with a password from
  ``FEDMQTT_PASSWORD`` (never in ``/proc/PID/cmdline``) as the environment file describes.

systemd is not PID 1 in the test container, so the unit is not started by systemd itself here: the sandboxing
options (DynamicUser, ProtectSystem, SystemCallFilter, ...) are verified by ``systemd-analyze`` but not
exercised.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import SecureBroker, require_mosquitto
from fedmqtt.broker.mosquitto import MosquittoBroker
from fedmqtt.mqtt import MqttConnection
from fedmqtt.schema import DeviceStatus, from_json
from fedmqtt.topics import Topics
from inbox import Inbox

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "fedmqtt-device.service"
ENV_FILE = ROOT / "deploy" / "fedmqtt-device.env"
FEDMQTT = str(Path(sys.executable).parent / "fedmqtt")
BOARD_BINARY = "/opt/fedmqtt/bin/fedmqtt"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (keys may repeat), with backslash-continued lines joined, as systemd reads it."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical = re.sub(r"\\\n", " ", text)
    for raw in logical.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"a setting outside any section: {line!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_env_file(text: str) -> dict[str, str]:
    env = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"not KEY=VALUE: {line!r}"
            env[key] = value
    return env


def expand_exec(command: str, env: dict[str, str], specifiers: dict[str, str]) -> list[str]:
    """An ExecStart line as systemd runs it: words split on white space, ``%X`` specifiers replaced, a word that is
    ``$VAR`` split into words, ``${VAR}`` substituted as (part of) one word; unknown variables are empty."""
    argv: list[str] = []
    for word in command.split():
        word = re.sub(r"%([a-zA-Z%])", lambda m: "%" if m.group(1) == "%" else specifiers[m.group(1)], word)
        if (whole := re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)) is not None:
            argv += env.get(whole.group(1), "").split()
            continue
        argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word))
    return argv


UNIT_SETTINGS = parse_unit(UNIT.read_text())
SERVICE = UNIT_SETTINGS["Service"]


def one(key: str) -> str:
    values = SERVICE.get(key, [])
    assert len(values) == 1, f"[Service] {key}= should be set once, is {values}"
    return values[0]


# --- the unit file -------------------------------------------------------------------------------------------


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is needed (Debian: apt-get install systemd)"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(BOARD_BINARY, FEDMQTT))
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result.stderr


def test_systemd_analyze_verify_is_not_a_rubber_stamp(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is needed (Debian: apt-get install systemd)"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(BOARD_BINARY, FEDMQTT).replace("Restart=on-failure", "Restart=often"))
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert "restart specifier" in result.stderr and "often" in result.stderr, result.stderr


def test_the_unit_has_what_a_board_needs() -> None:
    assert one("Restart") == "on-failure"
    assert re.fullmatch(r"\d+s", one("RestartSec")) and int(one("RestartSec")[:-1]) >= 5
    assert "StartLimitBurst" in UNIT_SETTINGS["Unit"] and "network-online.target" in UNIT_SETTINGS["Unit"]["After"][0]
    assert one("EnvironmentFile") == "/etc/fedmqtt/device.env"
    assert one("StateDirectory") == "fedmqtt" and "--state-dir %S/fedmqtt" in one("ExecStart")
    assert one("DynamicUser") == "yes" or one("User") not in ("", "root")
    assert one("MemoryMax") and (one("Nice") or one("CPUQuota"))
    for key in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert one(key) in ("yes", "strict"), key
    assert "MemoryDenyWriteExecute" not in SERVICE  # torch's oneDNN kernels are generated at run time
    assert UNIT_SETTINGS["Install"]["WantedBy"] == ["multi-user.target"]
    assert one("ExecStart").startswith(BOARD_BINARY + " device ")


def test_no_secret_is_on_the_command_line() -> None:
    command = one("ExecStart")
    assert "--password" not in command and "PASSWORD" not in command
    assert "--tls-key %d/device.key" in command  # the key is a credential, not a path the service user owns
    assert one("LoadCredential") == "device.key:/etc/fedmqtt/device.key"
    env = parse_env_file(ENV_FILE.read_text())
    assert "@" not in env["FEDMQTT_BROKER"]  # no user or password in the example URL
    # Every ${VAR} of ExecStart is set by the example environment file.
    for name in re.findall(r"\$\{([A-Z_]+)\}", command):
        assert env.get(name), f"{name} is used by ExecStart but not set in {ENV_FILE.name}"


# --- the unit's command, run ---------------------------------------------------------------------------------


class Board:
    """/etc/fedmqtt, the credentials and state directories of a board, in a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.etc = root / "etc" / "fedmqtt"
        self.credentials = root / "run" / "credentials" / "fedmqtt-device.service"
        self.state_root = root / "var" / "lib"
        for directory in (self.etc, self.credentials, self.state_root / "fedmqtt"):  # StateDirectory=fedmqtt
            directory.mkdir(parents=True)

    def argv(self, env: dict[str, str]) -> list[str]:
        command = one("ExecStart").replace(BOARD_BINARY, FEDMQTT).replace("/etc/fedmqtt", str(self.etc))
        return expand_exec(command, env, {"d": str(self.credentials), "S": str(self.state_root)})


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path / "data", num_train=100, num_test=10, seed=1)


def run_until_online(
    argv: list[str], env: dict[str, str], observer: Inbox, topics: Topics, device: str, log: Path
) -> subprocess.Popen[bytes]:
    process_env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQTT_")} | env
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, env=process_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    topic = topics.device_status(device)
    while True:
        states = [from_json(DeviceStatus, m.payload).state for m in observer.messages if m.topic == topic and m.payload]
        if "online" in states:
            return process
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"the device did not come online ({process.poll()}):\n{log.read_text(errors='replace')}")
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGTERM)  # KillSignal=SIGTERM
    try:
        assert process.wait(30) == 0, log.read_text(errors="replace")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def cert_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    require_mosquitto()
    with MosquittoBroker(tmp_path / "broker", tls=True, client_certs=True) as broker:
        yield broker


@pytest.mark.e2e
def test_the_units_command_runs_a_device_with_its_certificate(
    cert_broker: MosquittoBroker, tiny_data: Path, tmp_path: Path, mqtt_client: Callable[..., MqttConnection]
) -> None:
    board = Board(tmp_path / "board")
    issued = cert_broker.issue_client_certificate("device", "cam-7")
    shutil.copy(cert_broker.ca_file, board.etc / "ca.crt")
    shutil.copy(issued.cert, board.etc / "device.crt")
    shutil.copy(issued.key, board.credentials / "device.key")  # LoadCredential=device.key:/etc/fedmqtt/device.key
    env = parse_env_file(ENV_FILE.read_text()) | {"FEDMQTT_BROKER": cert_broker.url, "FEDMQTT_DATA_DIR": str(tiny_data)}
    assert env["FEDMQTT_DEVICE_ID"] == "cam-7" and env["FEDMQTT_JOB"] == "mnist"
    topics = Topics(job="mnist")
    watcher = cert_broker.issue_client_certificate("watcher")
    inbox = Inbox()
    mqtt_client(cert_broker.url, tls_ca=str(cert_broker.ca_file), tls_cert=str(watcher.cert),
                tls_key=str(watcher.key), protocol="5", subscriptions=[(topics.device_status_filter, 1)],
                on_message=inbox)  # fmt: skip
    argv = board.argv(env)
    assert argv[argv.index("--max-train-seconds") + 1] == "120"  # $FEDMQTT_DEVICE_ARGS, split into words
    log = tmp_path / "device.log"
    process = run_until_online(argv, env, inbox, topics, "cam-7", log)
    try:
        assert argv[argv.index("--state-dir") + 1] == str(board.state_root / "fedmqtt")  # %S/fedmqtt
    finally:
        stop(process, log)  # never leave the device running, whatever failed
    assert "Traceback" not in log.read_text(errors="replace")


@pytest.mark.e2e
def test_with_a_password_it_is_in_the_environment_never_on_the_command_line(
    secure_mosquitto: SecureBroker, tiny_data: Path, tmp_path: Path, mqtt_client: Callable[..., MqttConnection]
) -> None:
    board = Board(tmp_path / "board")
    shutil.copy(secure_mosquitto.ca_file, board.etc / "ca.crt")
    password = secure_mosquitto.passwords["d1"]
    url = secure_mosquitto.url_for(None).replace("mqtts://", "mqtts://d1@")
    env = parse_env_file(ENV_FILE.read_text()) | {
        "FEDMQTT_BROKER": url, "FEDMQTT_DEVICE_ID": "d1", "FEDMQTT_DATA_DIR": str(tiny_data),
        "FEDMQTT_PASSWORD": password,
    }  # fmt: skip
    # As the environment file says: without certificates, --tls-cert/--tls-key (and LoadCredential) go.
    argv = board.argv(env)
    for flag in ("--tls-cert", "--tls-key"):
        del argv[argv.index(flag) : argv.index(flag) + 2]
    topics = Topics(job="mnist", prefix=secure_mosquitto.prefix)
    inbox = Inbox()
    mqtt_client(secure_mosquitto.url_for("watcher"), tls_ca=secure_mosquitto.ca_file,
                subscriptions=[(topics.device_status_filter, 1)], on_message=inbox)  # fmt: skip
    if secure_mosquitto.prefix != "fedmqtt":
        argv += ["--prefix", secure_mosquitto.prefix]
    log = tmp_path / "device.log"
    process = run_until_online(argv, env, inbox, topics, "d1", log)
    try:
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline and b"d1" in cmdline
    finally:
        stop(process, log)
