"""The broker flags of every command that connects (coordinator, device, watch, simulate), through the real CLI.

* a malformed ``--broker`` is refused at once with one line, before a model is built, data is read or a
  connection is tried (subprocesses, timed);
* ``--password`` with ``--password-file`` is refused, and so is a password file that cannot be used;
* ``--mqtt-version`` offers ``auto`` everywhere and defaults to it;
* ``simulate`` hands the password to its children through their environment, never their argv
  (``/proc/PID/cmdline`` of the real children).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import child_pids
from fedmqtt.broker.mosquitto import MosquittoBroker
from fedmqtt.cli import build_parser
from fedmqtt.mqtt import PASSWORD_ENV, broker_settings_from_args

PYTHON = sys.executable

# Enough flags for each command to get past argparse; the broker URL goes last.
COMMANDS: dict[str, list[str]] = {
    "coordinator": ["coordinator", "--job", "j", "--rounds", "1", "--min-updates", "1", "--model", "cnn"],
    "device": ["device", "--job", "j", "--id", "d1"],
    "watch": ["watch", "--job", "j"],
    "simulate": ["simulate", "--devices", "2", "--rounds", "1"],
}
# The real check is that torch is never imported (no model built, no data set read) before the URL is refused (the
# coordinator imports it for its --model choices, but builds nothing); this bound only catches a retry loop (three connection retries used to take over a minute). Python's start and
# the CLI's imports take about 1 s, far more on a machine loaded by other processes.
QUICK_S = 45.0


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("idx"), num_train=200, num_test=100, seed=5)


def run_cli(argv: list[str], *, cwd: Path) -> tuple[subprocess.CompletedProcess[str], float, set[str]]:
    """Run ``fedmqtt ARGV``; return the result (stderr without Python's import-time lines), the seconds it took,
    and the top-level packages it imported (``python -X importtime``)."""
    started = time.monotonic()
    result = subprocess.run(
        [PYTHON, "-X", "importtime", "-m", "fedmqtt.cli", *argv], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    seconds = time.monotonic() - started
    lines = result.stderr.splitlines(keepends=True)
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
    result.stderr = "".join(line for line in lines if not line.startswith("import time:"))
    return result, seconds, imported


def _with_data(command: str, data: Path) -> list[str]:
    extra = {
        "coordinator": ["--eval-data", str(data)],
        "device": ["--data-dir", str(data)],
        "simulate": ["--data-dir", str(data)],
    }
    return [*COMMANDS[command], *extra.get(command, [])]


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("url", ["mqtt://127.0.0.1:99999", "127.0.0.1:1883", "http://broker.lan", "mqtt://"])
def test_a_malformed_broker_url_is_one_line_at_once(command: str, url: str, tiny_data: Path, tmp_path: Path) -> None:
    result, seconds, imported = run_cli([*_with_data(command, tiny_data), "--broker", url], cwd=tmp_path)
    stderr = result.stderr.strip()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert stderr.splitlines() == [stderr], stderr
    assert stderr.startswith(f"fedmqtt {command}: error: --broker: invalid broker URL"), stderr
    assert seconds < QUICK_S, f"{command} took {seconds:.1f} s to refuse {url!r}"
    if command != "coordinator":  # (its --model choices come from the model registry, which imports torch)
        assert "torch" not in imported  # no model built, no data set read: the URL was checked first
    assert list(tmp_path.iterdir()) == []  # nothing written (simulate's run directory, a checkpoint, ...)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_password_and_password_file_together_are_refused(command: str, tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("secret\n")
    argv = [*COMMANDS[command], "--broker", "mqtt://u@127.0.0.1:1", "--password", "x", "--password-file", "pw"]
    result, seconds, _ = run_cli(argv, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "argument --password-file: not allowed with argument --password" in result.stderr
    assert seconds < QUICK_S


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unusable_password_file_is_refused_naming_flag_and_path(
    command: str, tmp_path: Path, tiny_data: Path
) -> None:
    (tmp_path / "adir").mkdir()
    for name, problem in (("missing.pw", "does not exist"), ("adir", "is a directory, not a file")):
        argv = [*_with_data(command, tiny_data), "--broker", "mqtt://u@127.0.0.1:1", "--password-file", name]
        result, seconds, _ = run_cli(argv, cwd=tmp_path)
        stderr = result.stderr.strip()
        assert result.returncode == 1 and "Traceback" not in stderr, stderr
        assert stderr == f"fedmqtt {command}: error: --password-file: {name} {problem}", stderr
        assert seconds < QUICK_S


@pytest.mark.parametrize("command", ["coordinator", "device", "watch", "simulate"])
def test_every_command_offers_mqtt_version_auto_and_defaults_to_it(command: str) -> None:
    parser = build_parser()
    base = [*COMMANDS[command], "--broker", "mqtt://127.0.0.1:1883"]
    assert broker_settings_from_args(parser.parse_args(base), env={}).mqtt_version == "auto"
    for version in ("auto", "5", "3.1.1"):
        args = parser.parse_args([*base, "--mqtt-version", version])
        assert broker_settings_from_args(args, env={}).mqtt_version == version
    assert "default: auto" in " ".join(_help_of(command).split())


def _help_of(command: str) -> str:
    result = subprocess.run(
        [PYTHON, "-m", "fedmqtt.cli", command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_simulate_with_a_given_broker_keeps_auto(tiny_data: Path) -> None:
    from fedmqtt.simulate import device_command, plan_simulation

    argv = ["simulate", "--devices", "2", "--rounds", "1", "--broker", "mqtt://127.0.0.1:1883", "--data-dir"]
    plan = plan_simulation(
        build_parser().parse_args([*argv, str(tiny_data)]), env={}, max_clients_per_process=10, cpu_count=2, now=0.0
    )
    assert plan.mqtt_version == "auto"
    child = device_command(plan, "mqtt://127.0.0.1:1883", 0, 2)
    assert child[child.index("--mqtt-version") + 1] == "auto"


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(e.split("=", 1) for e in entries if "=" in e)


@pytest.mark.e2e
@pytest.mark.parametrize("source", ["--password", "--password-file", PASSWORD_ENV])
def test_simulate_passes_the_password_by_environment_never_argv(
    source: str, mosquitto_broker: MosquittoBroker, tiny_data: Path, tmp_path: Path
) -> None:
    secret = "pw-" + os.urandom(6).hex()
    env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
    argv = ["simulate", "--devices", "2", "--rounds", "50", "--model", "mlp", "--data-dir", str(tiny_data),
            "--out", str(tmp_path / "run"), "--broker", mosquitto_broker.url, "--username", "sim-user",
            "--timeout", "90"]  # fmt: skip
    if source == "--password":
        argv += ["--password", secret]
    elif source == "--password-file":
        (tmp_path / "pw").write_text(secret + "\n")
        (tmp_path / "pw").chmod(0o600)
        argv += ["--password-file", str(tmp_path / "pw")]
    else:
        env[PASSWORD_ENV] = secret
    process = subprocess.Popen([PYTHON, "-m", "fedmqtt.cli", *argv], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if "logs in" in line:  # the children have been started
                break
        children = child_pids(process.pid)
        assert len(children) >= 2, children  # the coordinator and a device process
        for pid in children:
            cmdline = _cmdline(pid)
            assert "fedmqtt.cli" in cmdline, cmdline
            assert not any(secret in part for part in cmdline), cmdline
            assert "--password" not in cmdline and cmdline[cmdline.index("--username") + 1] == "sim-user"
            assert _environ(pid).get(PASSWORD_ENV) == secret
    finally:
        process.terminate()
        process.communicate(timeout=60)
