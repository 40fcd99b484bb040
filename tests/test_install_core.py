"""``pip install fedmqtt`` alone, in a fresh virtual environment: the core is enough for a device (and a coordinator
without DP) to run a round on a real Mosquitto, and every optional feature says in one line which extra it needs.

The environment is made as a user makes it: ``python -m venv`` (no system site-packages), then pip installs the
fedmqtt wheel built from this checkout, resolving the core requirements itself, with torch held to the CPU build
by a constraints file (the device profile the README documents). pip reads the packages from the wheel
directories on this machine's disk (``--no-index --find-links``), never from the network: the CPU torch wheel
(/opt/wheels) and the local copies of PyPI packages. ``FEDMQTT_WHEELHOUSE`` (directories joined by ``:``)
names other wheel directories; ``FEDMQTT_CORE_TORCH`` another torch requirement (default ``torch==2.13.0+cpu``).
A machine with none of these (a user's) installs as the README says a device does: torch from PyTorch's CPU index,
the rest from PyPI (a download of about 200 MB).

Measured here (2 shared cores): 35-55 s to install (18 distributions, about 1 GB), under 1.5 min for the whole
module, so it is not marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedmqtt.mqtt import MqttConnection
from test_install import CORE, OPTIONAL, one_round_job

pytestmark = [pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WHEELHOUSE = ("/opt/wheels", "/opt/pypi/files", "/opt/pypi-more/files")
TORCH = os.environ.get("FEDMQTT_CORE_TORCH", "torch==2.13.0+cpu")
BUILD_FILES = ("pyproject.toml", "README.md", "LICENSE")


CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def package_sources() -> tuple[list[str], str]:
    """pip's index arguments and the torch requirement: this machine's wheel directories when it has them (no
    network), else the CPU index for torch and PyPI for the rest."""
    configured = os.environ.get("FEDMQTT_WHEELHOUSE")
    directories = configured.split(":") if configured else [d for d in DEFAULT_WHEELHOUSE if Path(d).is_dir()]
    if directories:
        return ["--no-index", *[arg for d in directories for arg in ("--find-links", d)]], TORCH
    torch = os.environ.get("FEDMQTT_CORE_TORCH", "torch")
    return ["--index-url", CPU_INDEX, "--extra-index-url", "https://pypi.org/simple"], torch


def run(argv: list[str], *, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)


class CoreVenv:
    def __init__(self, root: Path, install_seconds: float, installed: dict[str, str]) -> None:
        self.root = root
        self.python = str(root / "bin" / "python")
        self.fedmqtt = str(root / "bin" / "fedmqtt")
        self.install_seconds = install_seconds
        self.installed = installed  # distribution name (lower case) -> version


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreVenv]:
    base = tmp_path_factory.mktemp("core-install")
    # The wheel is built from a copy of the files a source distribution carries (the checkout stays untouched).
    source = base / "source"
    source.mkdir()
    for name in BUILD_FILES:
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = base / "wheels"
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                 str(source)])  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("fedmqtt-*.whl")

    venv = base / "venv"
    started = time.monotonic()
    made = run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)])
    assert made.returncode == 0, made.stderr
    sources, torch = package_sources()
    constraints = base / "constraints.txt"
    constraints.write_text(f"{torch}\n")
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    installed = run([*pip, "install", *sources, "-c", str(constraints), str(wheel)], timeout=900)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    seconds = time.monotonic() - started
    listed = run([*pip, "list", "--format", "json"])
    assert listed.returncode == 0, listed.stderr
    versions = {d["name"].lower(): d["version"] for d in json.loads(listed.stdout)}
    print(f"core venv: {len(versions)} distributions installed in {seconds:.0f} s")
    try:
        yield CoreVenv(venv, seconds, versions)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # about 1 GB


def test_the_core_install_has_the_core_and_nothing_optional(core_venv: CoreVenv) -> None:
    assert core_venv.installed["fedmqtt"] == "0.1.0"
    assert core_venv.installed["torch"].endswith("+cpu")
    assert set(core_venv.installed) >= CORE
    modules = [*OPTIONAL, "fedmqtt", "torch", "numpy", "paho.mqtt", "zstandard", "pydantic"]
    script = "import importlib.util, json, sys; print(json.dumps({m: bool(importlib.util.find_spec(m)) for m in sys.argv[1:]}))"
    probe = run([core_venv.python, "-c", script, *modules])
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert [m for m in OPTIONAL if found[m]] == []
    assert all(found[m] for m in found if m not in OPTIONAL)


def test_the_installed_package_is_typed_licensed_and_runs_as_a_module(core_venv: CoreVenv) -> None:
    where = run([core_venv.python, "-c", "import fedmqtt, pathlib; print(pathlib.Path(fedmqtt.__file__).parent)"])
    package = Path(where.stdout.strip())
    assert (package / "py.typed").is_file()
    (license_file,) = package.parent.glob("fedmqtt-*.dist-info/licenses/LICENSE")
    assert license_file.read_bytes() == (REPO / "LICENSE").read_bytes()
    version = run([core_venv.python, "-m", "fedmqtt", "--version"])
    assert (version.returncode, version.stdout.strip()) == (0, "fedmqtt 0.1.0")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["broker", "--embedded", "--port", "1"],
         "fedmqtt broker: error: the embedded broker needs amqtt, which is not installed: "
         "pip install 'fedmqtt[broker]' (or 'fedmqtt[all]')"),
        (["simulate", "--devices", "2", "--rounds", "1"],
         "fedmqtt simulate: error: fedmqtt simulate needs rich, which is not installed: "
         "pip install 'fedmqtt[sim]' (or 'fedmqtt[all]')"),
        (["watch", "--broker", "mqtt://127.0.0.1:1", "--job", "j", "--once"],
         "fedmqtt watch: error: the table view (--once, or on a terminal) needs rich, which is not installed: "
         "pip install 'fedmqtt[sim]' (or 'fedmqtt[all]')"),
        (["coordinator", "--broker", "mqtt://127.0.0.1:1", "--job", "j", "--rounds", "1", "--min-updates", "1",
          "--model", "mobilenet-v3-small", "--eval-data", "DATA"],
         "fedmqtt coordinator: error: the mobilenet-v3-small model needs torchvision, which is not installed: "
         "pip install 'fedmqtt[vision]' (or 'fedmqtt[all]')"),
        (["coordinator", "--broker", "mqtt://127.0.0.1:1", "--job", "j", "--rounds", "1", "--min-updates", "2",
          "--model", "mlp", "--eval-data", "DATA", "--dp-mode", "central", "--dp-clip", "1",
          "--dp-noise-multiplier", "1", "--dp-sample-rate", "1"],
         "fedmqtt coordinator: error: differential privacy accounting needs opacus, which is not installed: "
         "pip install 'fedmqtt[dp]' (or 'fedmqtt[all]')"),
        (["device", "--broker", "mqtt://127.0.0.1:1", "--job", "j", "--id", "d", "--data-dir", "DATA",
          "--privacy-budget", "3"],
         "fedmqtt device: error: differential privacy accounting needs opacus, which is not installed: "
         "pip install 'fedmqtt[dp]' (or 'fedmqtt[all]')"),
    ],
    ids=["broker-embedded", "simulate", "watch-once", "vision-model", "dp-coordinator", "dp-device-budget"],
)  # fmt: skip
def test_each_optional_feature_names_its_extra_in_one_line(
    core_venv: CoreVenv, tiny_data: Path, tmp_path: Path, argv: list[str], message: str
) -> None:
    argv = [str(tiny_data) if a == "DATA" else a for a in argv]
    result = run([core_venv.fedmqtt, *argv], cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == message, result.stderr


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("tiny"), num_train=300, num_test=100, seed=9)


@pytest.mark.mosquitto
def test_a_core_install_runs_a_round_on_mosquitto(
    core_venv: CoreVenv,
    mosquitto_broker: object,
    topic_prefix: str,
    tiny_data: Path,
    tmp_path: Path,
    mqtt_client: Callable[..., MqttConnection],
) -> None:
    """The coordinator (no DP, mlp) and the device both run from the core install: the round closes with the
    device's update, and both exit 0 by themselves."""
    summary = one_round_job(
        [core_venv.fedmqtt],
        [core_venv.fedmqtt],
        url=mosquitto_broker.url,  # type: ignore[attr-defined]
        prefix=topic_prefix,
        job="core",
        device_id="core-0",
        data=tiny_data,
        logs=tmp_path,
        mqtt_client=mqtt_client,
    )
    assert summary.round == 1 and summary.bytes_up > 0
