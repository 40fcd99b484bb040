"""Every file-valued flag of every ``fedmqtt`` command, given a bad path, ends the real process with one line.

Each case runs ``python -m fedmqtt.cli`` as a subprocess in a directory of prepared bad files and checks: exit
status 1 (a fedmqtt error; argparse's usage errors are 2), one line on stderr that names the flag and the path,
no traceback, and no connection to the broker it was pointed at (a listening socket that must see no client):
the path is refused before anything heavy starts.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmqtt.broker.certs import generate_test_certificates
from fedmqtt.cli import build_parser
from fedmqtt.errors import ConfigError
from fedmqtt.mqtt import ClientSettings, TlsError, check_tls_ca
from fedmqtt.paths import output_dir_problem, require_input_file

GARBAGE = bytes(range(256)) * 8  # not UTF-8, not PEM, not IDX
BAD_PEM = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# Which options hold a path: the parser says so (type=Path) or the name does.
_PATH_FLAG = re.compile(r"^--(?:[a-z-]+-dir|[a-z]+file|tls-ca|tls-cert|tls-key|config|out|eval-data)$")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad-paths")
    (root / "afile").write_text("a regular file, not a directory\n")
    (root / "adir").mkdir()
    (root / "garbage.bin").write_bytes(GARBAGE)
    (root / "badpem.crt").write_bytes(BAD_PEM)
    (root / "notoml.toml").write_text("this is = = not TOML\n")
    (root / "bad.toml").write_text("coordinator = 5\n")
    (root / "garbidx").mkdir()
    for name in IDX_NAMES:
        (root / "garbidx" / name).write_bytes(GARBAGE)
    (root / "cfg-tlsfile").mkdir()
    (root / "cfg-tlsfile" / "tls").write_text("a file where gen-certs puts its directory\n")
    generate_test_certificates(root / "tls")
    generate_test_certificates(root / "tls2")  # another key: tls/server.crt with tls2/server.key do not match
    return root


@pytest.fixture(scope="module")
def listener() -> Iterator[socket.socket]:
    """A TCP port that accepts connections but never answers MQTT; a client connecting to it shows up here."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    yield sock
    sock.close()


COORDINATOR = ["coordinator", "--broker", "{mqtt}", "--job", "j", "--rounds", "1", "--min-updates", "1"]
TLS_COORDINATOR = ["coordinator", "--broker", "{mqtts}", "--job", "j", "--rounds", "1", "--min-updates", "1"]
DEVICE = ["device", "--broker", "{mqtt}", "--job", "j", "--id", "d1", "--connect-timeout", "2"]
TLS_DEVICE = ["device", "--broker", "{mqtts}", "--job", "j", "--id", "d1", "--connect-timeout", "2"]
WATCH = ["watch", "--broker", "{mqtts}", "--job", "j", "--connect-timeout", "2"]
RELEASE = ["release", "--broker", "{mqtt}", "--job", "j", "--connect-timeout", "2"]
TLS_RELEASE = ["release", "--broker", "{mqtts}", "--job", "j", "--connect-timeout", "2"]
SIMULATE = ["simulate", "--devices", "1", "--rounds", "1", "--broker", "{mqtt}", "--timeout", "10"]
TLS_SIMULATE = ["simulate", "--devices", "1", "--rounds", "1", "--broker", "{mqtts}", "--timeout", "10"]
MOSQUITTO = ["broker", "--mosquitto", "--port", "{port}"]
AGGREGATOR = ["aggregator", "--broker", "{mqtt}", "--job", "j", "--id", "a1", "--connect-timeout", "2"]
TLS_AGGREGATOR = ["aggregator", "--broker", "{mqtts}", "--job", "j", "--id", "a1", "--connect-timeout", "2"]
BRIDGE = [*MOSQUITTO, "--config-dir", "cfg", "--bridge-to", "mqtts://127.0.0.1:{port}", "--site", "s1", "--job", "j"]

# (command as `fedmqtt --help` spells it, argv, flag the message must name, path it must name)
CASES: list[tuple[str, list[str], str, str]] = [
    # coordinator: checked by the CoordinatorConfig field validators / load_config
    ("coordinator", [*COORDINATOR, "--checkpoint-dir", "afile"], "--checkpoint-dir", "afile"),
    ("coordinator", [*COORDINATOR, "--checkpoint-dir", "afile/sub"], "--checkpoint-dir", "afile/sub"),
    ("coordinator", [*COORDINATOR, "--eval-data", "missing"], "--eval-data", "missing"),
    ("coordinator", [*COORDINATOR, "--eval-data", "afile"], "--eval-data", "afile"),
    ("coordinator", [*COORDINATOR, "--config", "missing.toml"], "--config", "missing.toml"),
    ("coordinator", [*COORDINATOR, "--config", "adir"], "--config", "adir"),
    ("coordinator", [*COORDINATOR, "--config", "garbage.bin"], "--config", "garbage.bin"),
    ("coordinator", [*COORDINATOR, "--config", "notoml.toml"], "--config", "notoml.toml"),
    ("coordinator", [*COORDINATOR, "--config", "bad.toml"], "--config", "bad.toml"),
    ("coordinator", [*TLS_COORDINATOR, "--tls-ca", "missing.crt"], "--tls-ca", "missing.crt"),
    ("coordinator", [*TLS_COORDINATOR, "--tls-ca", "adir"], "--tls-ca", "adir"),
    ("coordinator", [*TLS_COORDINATOR, "--tls-ca", "garbage.bin"], "--tls-ca", "garbage.bin"),
    ("coordinator", [*TLS_COORDINATOR, "--tls-ca", "badpem.crt"], "--tls-ca", "badpem.crt"),
    ("coordinator", [*TLS_COORDINATOR, "--tls-ca", "tls/server.key"], "--tls-ca", "tls/server.key"),
    ("coordinator", [*TLS_COORDINATOR, "--tls-cert", "missing.crt"], "--tls-cert", "missing.crt"),
    (
        "coordinator",
        [*TLS_COORDINATOR, "--tls-cert", "tls/server.crt", "--tls-key", "tls2/server.key"],
        "--tls-cert",
        "tls/server.crt",
    ),  # a certificate with another's key
    ("coordinator", [*TLS_COORDINATOR, "--tls-cert", "tls/server.crt", "--tls-key", "adir"], "--tls-key", "adir"),
    (
        "coordinator",
        [*COORDINATOR, "--username", "u", "--password-file", "missing.pw"],
        "--password-file",
        "missing.pw",
    ),
    ("coordinator", [*COORDINATOR, "--username", "u", "--password-file", "adir"], "--password-file", "adir"),
    # device
    ("device", [*DEVICE, "--username", "u", "--password-file", "garbage.bin"], "--password-file", "garbage.bin"),
    ("device", [*DEVICE, "--data-dir", "missing"], "--data-dir", "missing"),
    ("device", [*DEVICE, "--data-dir", "afile"], "--data-dir", "afile"),
    ("device", [*DEVICE, "--data-dir", "adir"], "--data-dir", "adir"),  # no IDX files in it
    ("device", [*DEVICE, "--data-dir", "garbidx"], "--data-dir", "garbidx"),  # IDX files of garbage
    ("device", [*DEVICE, "--data-dir", "adir", "--state-dir", "afile"], "--state-dir", "afile"),
    ("device", [*DEVICE, "--data-dir", "adir", "--state-dir", "afile/x"], "--state-dir", "afile/x"),
    ("device", [*TLS_DEVICE, "--data-dir", "adir", "--tls-ca", "missing.crt"], "--tls-ca", "missing.crt"),
    ("device", [*TLS_DEVICE, "--data-dir", "adir", "--tls-ca", "garbage.bin"], "--tls-ca", "garbage.bin"),
    ("device", [*TLS_DEVICE, "--data-dir", "adir", "--tls-cert", "garbage.bin"], "--tls-cert", "garbage.bin"),
    ("device", [*TLS_DEVICE, "--tls-cert", "tls/server.crt", "--tls-key", "missing.key"], "--tls-key", "missing.key"),
    ("device", [*DEVICE, "--serve-only", "--serve-dir", "afile"], "--serve-dir", "afile"),
    ("device", [*DEVICE, "--serve-only", "--serve-dir", "afile/x"], "--serve-dir", "afile/x"),
    # release
    # export, predict, pretrain: model files, checkpoints and data sets on disk
    ("export", ["export", "--checkpoint-dir", "missing", "--out", "m.pt"], "--checkpoint-dir", "missing"),
    ("export", ["export", "--checkpoint-dir", "afile", "--out", "m.pt"], "--checkpoint-dir", "afile"),
    ("export", ["export", "--model-file", "missing.fedmodel", "--out", "m.pt"], "--model-file", "missing.fedmodel"),
    ("export", ["export", "--model-file", "garbage.bin", "--out", "m.pt"], "--model-file", "garbage.bin"),
    ("export", ["export", "--model-file", "adir", "--out", "m.pt"], "--model-file", "adir"),
    ("export", ["export", "--model-file", "garbage.bin", "--out", "adir"], "--out", "adir"),
    ("export", ["export", "--model-file", "garbage.bin", "--out", "afile/m.pt"], "--out", "afile/m.pt"),
    (
        "export",
        ["export", "--model-file", "garbage.bin", "--out", "m.pt", "--eval-data", "missing"],
        "--eval-data",
        "missing",
    ),
    ("predict", ["predict", "--model", "missing.pt", "afile"], "--model", "missing.pt"),
    ("predict", ["predict", "--model", "garbage.bin", "afile"], "--model", "garbage.bin"),
    ("predict", ["predict", "--model", "adir", "afile"], "--model", "adir"),
    ("pretrain", ["pretrain", "--epochs", "1", "--out", "adir"], "--out", "adir"),
    ("pretrain", ["pretrain", "--epochs", "1", "--out", "afile/m.fedmodel"], "--out", "afile/m.fedmodel"),
    (
        "pretrain",
        ["pretrain", "--epochs", "1", "--out", "m.fedmodel", "--data-dir", "missing"],
        "--data-dir",
        "missing",
    ),
    ("pretrain", ["pretrain", "--epochs", "1", "--out", "m.fedmodel", "--data-dir", "afile"], "--data-dir", "afile"),
    ("release", [*RELEASE, "--model-file", "missing.fedmodel"], "--model-file", "missing.fedmodel"),
    ("release", [*RELEASE, "--model-file", "adir"], "--model-file", "adir"),
    ("release", [*RELEASE, "--model-file", "garbage.bin"], "--model-file", "garbage.bin"),
    (
        "release",
        [*RELEASE, "--model-file", "adir", "--username", "u", "--password-file", "adir"],
        "--password-file",
        "adir",
    ),
    ("release", [*TLS_RELEASE, "--model-file", "adir", "--tls-ca", "missing.crt"], "--tls-ca", "missing.crt"),
    ("release", [*TLS_RELEASE, "--model-file", "adir", "--tls-cert", "garbage.bin"], "--tls-cert", "garbage.bin"),
    (
        "release",
        [*TLS_RELEASE, "--model-file", "adir", "--tls-cert", "tls/server.crt", "--tls-key", "missing.key"],
        "--tls-key",
        "missing.key",
    ),
    # aggregator: checked before it connects
    ("aggregator", [*AGGREGATOR, "--spool", "afile"], "--spool", "afile"),
    ("aggregator", [*AGGREGATOR, "--spool", "afile/x"], "--spool", "afile/x"),
    ("aggregator", [*AGGREGATOR, "--username", "u", "--password-file", "missing.pw"], "--password-file", "missing.pw"),
    ("aggregator", [*TLS_AGGREGATOR, "--tls-ca", "garbage.bin"], "--tls-ca", "garbage.bin"),
    ("aggregator", [*TLS_AGGREGATOR, "--tls-cert", "badpem.crt"], "--tls-cert", "badpem.crt"),
    ("aggregator", [*TLS_AGGREGATOR, "--tls-cert", "tls/server.crt", "--tls-key", "adir"], "--tls-key", "adir"),
    # watch
    ("watch", [*WATCH, "--tls-ca", "missing.crt"], "--tls-ca", "missing.crt"),
    ("watch", [*WATCH, "--tls-ca", "adir"], "--tls-ca", "adir"),
    ("watch", [*WATCH, "--tls-ca", "garbage.bin"], "--tls-ca", "garbage.bin"),
    ("watch", [*WATCH, "--tls-ca", "badpem.crt"], "--tls-ca", "badpem.crt"),
    ("watch", [*WATCH, "--tls-cert", "badpem.crt"], "--tls-cert", "badpem.crt"),
    ("watch", [*WATCH, "--tls-cert", "tls/server.crt", "--tls-key", "garbage.bin"], "--tls-cert", "tls/server.crt"),
    ("watch", [*WATCH, "--tls-key", "tls/server.key"], "--tls-key", "tls/server.key"),  # a key without its cert
    ("watch", [*WATCH, "--username", "u", "--password-file", "adir"], "--password-file", "adir"),
    # simulate: checked in plan_simulation, before a broker or a child starts
    ("simulate", [*SIMULATE, "--out", "afile"], "--out", "afile"),
    ("simulate", [*SIMULATE, "--username", "u", "--password-file", "missing.pw"], "--password-file", "missing.pw"),
    ("simulate", [*SIMULATE, "--out", "afile/x"], "--out", "afile/x"),
    ("simulate", [*SIMULATE, "--checkpoint-dir", "afile"], "--checkpoint-dir", "afile"),
    ("simulate", [*SIMULATE, "--checkpoint-dir", "afile/x"], "--checkpoint-dir", "afile/x"),
    ("simulate", [*SIMULATE, "--data-dir", "missing"], "--data-dir", "missing"),
    ("simulate", [*SIMULATE, "--data-dir", "afile"], "--data-dir", "afile"),
    ("simulate", [*SIMULATE, "--data-dir", "adir"], "--data-dir", "adir"),
    ("simulate", [*TLS_SIMULATE, "--data-dir", "adir", "--tls-ca", "missing.crt"], "--tls-ca", "missing.crt"),
    ("simulate", [*TLS_SIMULATE, "--data-dir", "adir", "--tls-ca", "garbage.bin"], "--tls-ca", "garbage.bin"),
    # broker and its actions
    ("broker", [*MOSQUITTO, "--config-dir", "afile"], "--config-dir", "afile"),
    ("broker", [*MOSQUITTO, "--config-dir", "afile/x"], "--config-dir", "afile/x"),
    ("broker", [*MOSQUITTO, "--config-dir", "cfg", "--tls", "--certfile", "missing.crt"], "--certfile", "missing.crt"),
    ("broker", [*MOSQUITTO, "--config-dir", "cfg", "--tls", "--keyfile", "adir"], "--keyfile", "adir"),
    ("broker", [*MOSQUITTO, "--config-dir", "cfg", "--tls", "--client-certs", "--cafile", "adir"], "--cafile", "adir"),
    (
        "broker",
        [*MOSQUITTO, "--config-dir", "cfg", "--tls", "--certfile", "garbage.bin", "--keyfile", "tls/server.key"],
        "--certfile",
        "garbage.bin",
    ),
    (
        "broker",
        [*MOSQUITTO, "--config-dir", "cfg", "--tls", "--certfile", "tls/server.crt", "--keyfile", "tls2/server.key"],
        "--keyfile",
        "tls2/server.key",
    ),
    ("broker", [*BRIDGE, "--bridge-cafile", "missing.crt"], "--bridge-cafile", "missing.crt"),
    ("broker", [*BRIDGE, "--bridge-cafile", "garbage.bin"], "--bridge-cafile", "garbage.bin"),
    (
        "broker",
        [*BRIDGE, "--bridge-certfile", "adir", "--bridge-keyfile", "tls/server.key"],
        "--bridge-certfile",
        "adir",
    ),
    (
        "broker",
        [*BRIDGE, "--bridge-certfile", "tls/server.crt", "--bridge-keyfile", "missing.key"],
        "--bridge-keyfile",
        "missing.key",
    ),
    (
        "broker",
        [*BRIDGE, "--bridge-username", "s1", "--bridge-password-file", "missing.pw"],
        "--bridge-password-file",
        "missing.pw",
    ),
    ("broker add-device", ["broker", "add-device", "d1", "--config-dir", "afile"], "--config-dir", "afile"),
    (
        "broker add-device",
        ["broker", "add-device", "d1", "--config-dir", "cfg", "--password-file", "missing.pw"],
        "--password-file",
        "missing.pw",
    ),
    (
        "broker add-site",
        ["broker", "add-site", "s1", "--config-dir", "cfg", "--password-file", "adir"],
        "--password-file",
        "adir",
    ),
    (
        "broker add-aggregator",
        ["broker", "add-aggregator", "a1", "--config-dir", "cfg", "--password-file", "missing.pw"],
        "--password-file",
        "missing.pw",
    ),
    (
        "broker add-coordinator",
        ["broker", "add-coordinator", "--config-dir", "cfg", "--password-file", "adir"],
        "--password-file",
        "adir",
    ),
    (
        "broker add-watcher",
        ["broker", "add-watcher", "--config-dir", "cfg", "--password-file", "missing.pw"],
        "--password-file",
        "missing.pw",
    ),
    ("broker add-site", ["broker", "add-site", "s1", "--config-dir", "afile"], "--config-dir", "afile"),
    ("broker add-aggregator", ["broker", "add-aggregator", "a1", "--config-dir", "afile/x"], "--config-dir", "afile/x"),
    ("broker add-coordinator", ["broker", "add-coordinator", "--config-dir", "afile/x"], "--config-dir", "afile/x"),
    ("broker add-watcher", ["broker", "add-watcher", "--config-dir", "afile"], "--config-dir", "afile"),
    ("broker gen-certs", ["broker", "gen-certs", "--config-dir", "afile/x"], "--config-dir", "afile/x"),
    ("broker gen-certs", ["broker", "gen-certs", "--config-dir", "cfg-tlsfile"], "--config-dir", "cfg-tlsfile/tls"),
]


def _case_id(case: tuple[str, list[str], str, str]) -> str:
    command, _, flag, path = case
    return f"{command.replace(' ', '-')}{flag}={path}"


def _path_flags(parser: argparse.ArgumentParser, command: str = "") -> Iterator[tuple[str, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _path_flags(sub, f"{command} {name}".strip())
            continue
        for flag in action.option_strings:
            if flag.startswith("--") and (action.type is Path or _PATH_FLAG.match(flag)):
                yield command, flag


def test_every_path_flag_of_every_command_has_a_bad_path_case() -> None:
    flags = set(_path_flags(build_parser()))
    assert ("coordinator", "--checkpoint-dir") in flags and ("broker gen-certs", "--config-dir") in flags
    covered = {(command, flag) for command, _, flag, _ in CASES}
    assert flags - covered == set(), "add a case to CASES for each new file or directory flag"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bad_path_is_one_line_naming_flag_and_path(
    case: tuple[str, list[str], str, str], bad_files: Path, listener: socket.socket
) -> None:
    command, argv, flag, path = case
    port = listener.getsockname()[1]
    values = {"mqtt": f"mqtt://127.0.0.1:{port}", "mqtts": f"mqtts://127.0.0.1:{port}", "port": str(port)}
    env = {k: v for k, v in os.environ.items() if k != "FEDMQTT_DATA"}
    result = subprocess.run(
        [sys.executable, "-m", "fedmqtt.cli", *(a.format(**values) for a in argv)],
        cwd=bad_files, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    stderr = result.stderr.strip()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(f"fedmqtt {command.split()[0]}: error: "), stderr
    assert flag in stderr and path in stderr, stderr
    with pytest.raises(BlockingIOError):  # nothing dialled the broker it was given
        listener.accept()[0].close()
    assert not (bad_files / "cfg").exists()  # and nothing was written


def test_coordinator_garbage_eval_data_is_one_line_before_connecting(bad_files: Path, listener: socket.socket) -> None:
    # The data set's reader (fedmqtt's IDX loader) finds the garbage; its message names the file, not the flag.
    port = listener.getsockname()[1]
    argv = [a.format(mqtt=f"mqtt://127.0.0.1:{port}") for a in COORDINATOR]
    result = subprocess.run(
        [sys.executable, "-m", "fedmqtt.cli", *argv, "--eval-data", "garbidx"],
        cwd=bad_files, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "Traceback" not in result.stderr and result.returncode == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "garbidx/t10k-images-idx3-ubyte" in result.stderr
    with pytest.raises(BlockingIOError):
        listener.accept()[0].close()


# --- the checks themselves, in-process ------------------------------------------------------------


def test_a_good_ca_file_passes_and_each_bad_one_says_why(bad_files: Path) -> None:
    check_tls_ca(bad_files / "tls" / "ca.crt")
    ClientSettings.from_url("mqtts://127.0.0.1:8883", "c1", tls_ca=str(bad_files / "tls" / "ca.crt"))
    for name, why in [
        ("missing.crt", "does not exist"),
        ("adir", "is a directory, not a file"),
        ("garbage.bin", "is not a PEM certificate"),
        ("tls/server.key", "is not a PEM certificate"),
        ("badpem.crt", "holds no certificate that can be loaded"),
    ]:
        with pytest.raises(TlsError, match=f"^--tls-ca: .*{re.escape(name)} {why}"):
            ClientSettings.from_url("mqtts://127.0.0.1:8883", "c1", tls_ca=str(bad_files / name))


def test_a_ca_file_with_a_plain_tcp_url_is_refused_when_the_settings_are_made(bad_files: Path) -> None:
    with pytest.raises(TlsError, match="not a TLS URL; use mqtts://"):
        ClientSettings.from_url("mqtt://127.0.0.1:1883", "c1", tls_ca=str(bad_files / "tls" / "ca.crt"))


def test_output_dir_check_accepts_creatable_paths_and_creates_nothing(tmp_path: Path) -> None:
    assert output_dir_problem(tmp_path / "a" / "b" / "c") is None
    assert output_dir_problem(tmp_path) is None
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    assert output_dir_problem(tmp_path / "f") == "is a file, not a directory"
    assert (
        output_dir_problem(tmp_path / "f" / "a" / "b")
        == f"cannot be created: {tmp_path / 'f'} is a file, not a directory"
    )
    with pytest.raises(ConfigError, match=r"^--certfile: .*/f/x does not exist$"):
        require_input_file("--certfile", tmp_path / "f" / "x")
