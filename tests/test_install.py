"""The install profiles: what ``pip install fedmqtt`` (the core, a device) needs, and what the extras add.

* The optional packages (opacus, scipy, amqtt, rich, matplotlib, torchvision, PIL) are imported only through
  :mod:`fedmqtt.extras`, with the extra that pyproject.toml declares for them (a scan of the source).
* The device's import path, driven by the real code (``python -m fedmqtt device --help`` and a device running one
  round of a real job on Mosquitto, in this full environment), loads none of them.
* ``python -m fedmqtt``, ``py.typed`` and the LICENSE that pyproject.toml declares.

tests/test_install_core.py installs the core alone into a fresh virtual environment and runs a job there.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

import fedmqtt
from fedmqtt.extras import EXTRAS, MissingExtra, optional, require
from fedmqtt.mqtt import MqttConnection
from fedmqtt.schema import RoundSummary, from_json
from fedmqtt.topics import Topics
from inbox import Inbox

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "fedmqtt"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))

# Each optional top-level package and the extra that brings it (scipy and PIL come with opacus and torchvision).
OPTIONAL = {
    "opacus": "dp",
    "scipy": "dp",
    "amqtt": "broker",
    "rich": "sim",
    "matplotlib": "sim",
    "torchvision": "vision",
    "PIL": "vision",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "export",
}
CORE = {"torch", "numpy", "paho-mqtt", "zstandard", "pydantic"}
LICENSE_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"  # apache.org's LICENSE-2.0.txt


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


# --- pyproject.toml and the extras helper ----------------------------------------------------------------------


def test_the_core_is_what_a_device_needs_and_each_extra_is_declared() -> None:
    project = PYPROJECT["project"]
    assert {requirement_name(r) for r in project["dependencies"]} == CORE
    extras = project["optional-dependencies"]
    assert set(extras) == {*EXTRAS, "all", "test"}
    assert extras["all"] == [f"fedmqtt[{','.join(EXTRAS)}]"]
    declared = {requirement_name(r): extra for extra in EXTRAS for r in extras[extra]}
    for package, extra in OPTIONAL.items():
        if package in ("scipy", "PIL"):  # not imported by fedmqtt itself: they come with opacus and torchvision
            continue
        assert declared[package] == extra, f"{package} should be in [{extra}]"
    for requirement in (*project["dependencies"], *(r for e in EXTRAS for r in extras[e])):
        assert not re.search(r"==", requirement), f"a range, not a pin: {requirement}"


def test_the_makefile_installs_every_extra() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "-e '.[all,test]'" in makefile


def _guarded_imports(tree: ast.Module) -> set[str]:
    """Top-level packages a module-level ``require(extra, "pkg", ...)`` guards before the module imports them."""
    guarded: set[str] = set()
    for node in tree.body:
        call = node.value if isinstance(node, ast.Expr) else None
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "require":
            module = call.args[1]
            if isinstance(module, ast.Constant) and isinstance(module.value, str):
                guarded.add(module.value.split(".")[0])
    return guarded


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            inside.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return inside


def test_optional_packages_are_imported_only_through_fedmqtt_extras() -> None:
    """No bare import of an optional package (a traceback when it is missing), and each ``require``/``optional``
    names the extra that pyproject.toml declares for the package."""
    problems: list[str] = []
    calls = 0
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        guarded = _guarded_imports(tree)
        typing_only = _type_checking_nodes(tree)
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in typing_only:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    top = name.split(".")[0]
                    if top in OPTIONAL and not (top in guarded and node in tree.body):
                        problems.append(f"{where}:{node.lineno}: bare import of {name}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("require", "optional")
                and path.name != "extras.py"
            ):
                calls += 1
                extra, module = (a.value if isinstance(a, ast.Constant) else None for a in node.args[:2])
                if not isinstance(module, str):  # a computed name: the call site's own loop (simulate)
                    continue
                top = module.split(".")[0]
                if OPTIONAL.get(top) != extra:
                    problems.append(f"{where}:{node.lineno}: {module} is in [{OPTIONAL.get(top)}], not [{extra}]")
    assert not problems, "\n".join(problems)
    assert calls >= 10  # the scan saw the call sites (privacy, broker, report, watch, simulate, data, models)


def test_require_names_the_extra_in_one_line() -> None:
    assert require("sim", "json.decoder") is sys.modules["json.decoder"]
    with pytest.raises(MissingExtra) as caught:
        require("dp", "fedmqtt_absent_package.sub", "privacy accounting")
    message = str(caught.value)
    assert message == (
        "privacy accounting needs fedmqtt_absent_package, which is not installed: "
        "pip install 'fedmqtt[dp]' (or 'fedmqtt[all]')"
    )
    assert isinstance(caught.value, ImportError) and caught.value.name == "fedmqtt_absent_package"
    assert optional("sim", "fedmqtt_absent_package") is None
    with pytest.raises(ValueError, match="unknown extra 'gpu'"):
        require("gpu", "json")


def test_a_broken_install_is_not_reported_as_a_missing_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed package whose own import fails is a broken install: the real error, not 'install the extra'."""
    package = tmp_path / "fedmqtt_broken_package"
    package.mkdir()
    (package / "__init__.py").write_text("import fedmqtt_dependency_it_lacks\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as caught:
        require("broker", "fedmqtt_broken_package")
    assert not isinstance(caught.value, MissingExtra)
    assert caught.value.name == "fedmqtt_dependency_it_lacks"
    sys.modules.pop("fedmqtt_broken_package", None)


# --- python -m fedmqtt, py.typed, LICENSE ---------------------------------------------------------------------


def test_python_dash_m_fedmqtt_is_the_command() -> None:
    version = subprocess.run(
        [sys.executable, "-m", "fedmqtt", "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert (version.returncode, version.stdout.strip()) == (0, f"fedmqtt {fedmqtt.__version__}")
    bare = subprocess.run([sys.executable, "-m", "fedmqtt"], capture_output=True, text=True, timeout=60, check=False)
    assert bare.returncode == 2
    assert bare.stdout.startswith("usage: fedmqtt ") and "device" in bare.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "fedmqtt", "device", "--broker", "mqtt://127.0.0.1:1", "--job", "a/b", "--id", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 1 and refused.stderr.startswith("fedmqtt device: error: invalid job id 'a/b'")


def test_py_typed_ships_with_the_package() -> None:
    assert (SRC / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["fedmqtt"]


def test_the_license_file_is_the_one_pyproject_declares() -> None:
    import hashlib

    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_bytes()
    assert b"Apache License\n                           Version 2.0, January 2004" in text
    assert hashlib.sha256(text).hexdigest() == LICENSE_SHA256  # the full standard text, unaltered


# --- the device's import path, driven by the real code ---------------------------------------------------------

# Runs ``python -m fedmqtt ARGS`` (runpy, as the interpreter does) and writes the names in sys.modules at exit.
MODULES_AT_EXIT = (
    "import atexit, json, runpy, sys\n"
    "out = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(out, 'w').write(json.dumps(sorted(sys.modules))))\n"
    "runpy.run_module('fedmqtt', run_name='__main__', alter_sys=True)\n"
)


def optional_modules_loaded(names: list[str]) -> list[str]:
    return sorted({n for n in names if n.split(".")[0] in OPTIONAL})


def run_with_module_record(out: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", MODULES_AT_EXIT, str(out), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def test_device_help_loads_no_optional_package(tmp_path: Path) -> None:
    """``fedmqtt device --help`` builds the whole parser (every sub-command registers): none of them may pull in
    rich, amqtt, opacus, matplotlib or torchvision (nor torch: help stays fast)."""
    out = tmp_path / "modules.json"
    result = run_with_module_record(out, "device", "--help")
    assert result.returncode == 0, result.stderr
    loaded = json.loads(out.read_text())
    assert optional_modules_loaded(loaded) == []
    assert "torch" not in loaded


def one_round_job(
    coordinator_cmd: list[str],
    device_cmd: list[str],
    *,
    url: str,
    prefix: str,
    job: str,
    device_id: str,
    data: Path,
    logs: Path,
    mqtt_client: Callable[..., MqttConnection],
    env: dict[str, str] | None = None,
) -> RoundSummary:
    """A real coordinator (1 round, 1 update, mlp) and a real device on ``url``; both must exit 0 by themselves.
    Returns the round's retained summary. The commands are the interpreter (and wrapper) before the arguments."""
    topics = Topics(job=job, prefix=prefix)
    common = ["--broker", url, "--job", job, "--prefix", prefix, "--mqtt-version", "5"]
    coordinator_args = ["coordinator", *common, "--model", "mlp", "--eval-data", str(data), "--rounds", "1",
                        "--min-updates", "1", "--round-timeout", "90", "--local-epochs", "1", "--batch-size", "20",
                        "--lr", "0.1", "--uplink", "int8", "--quiet"]  # fmt: skip
    device_args = ["device", *common, "--id", device_id, "--data-dir", str(data), "--threads", "1",
                   "--exit-on-finish"]  # fmt: skip
    env = dict(env or os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, argv in (("coordinator", coordinator_cmd + coordinator_args), ("device", device_cmd + device_args)):
            with open(logs / f"{name}.log", "wb") as log:
                processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 240
        for name, process in processes.items():
            try:
                code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = None
            log_text = (logs / f"{name}.log").read_text(errors="replace")[-3000:]
            assert code == 0, f"{name} exited with {code}:\n{log_text}"
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    inbox = Inbox()
    mqtt_client(url, subscriptions=[(topics.round_summary(1), 1)], on_message=inbox)
    (message,) = inbox.wait_for(1, timeout=10)
    summary = from_json(RoundSummary, message.payload)
    assert summary.participants == (device_id,)
    return summary


@pytest.mark.e2e
@pytest.mark.mosquitto
def test_a_device_running_a_round_loads_no_optional_package(
    mosquitto_broker: object, topic_prefix: str, tmp_path: Path, mqtt_client: Callable[..., MqttConnection]
) -> None:
    """In this full environment, where every extra is installed, a device that connects, fetches the model,
    trains, compresses and sends its update loads none of the optional packages."""
    from fedmqtt.data import write_idx_dataset

    data = write_idx_dataset(tmp_path / "data", num_train=300, num_test=100, seed=3)
    out = tmp_path / "modules.json"
    summary = one_round_job(
        [sys.executable, "-m", "fedmqtt"],
        [sys.executable, "-c", MODULES_AT_EXIT, str(out)],
        url=mosquitto_broker.url,  # type: ignore[attr-defined]
        prefix=topic_prefix,
        job="importpath",
        device_id="light-0",
        data=data,
        logs=tmp_path,
        mqtt_client=mqtt_client,
    )
    assert summary.round == 1
    loaded = json.loads(out.read_text())
    for module in ("torch", "fedmqtt.device.agent", "fedmqtt.training", "fedmqtt.models", "fedmqtt.codecs"):
        assert module in loaded  # the record is of a device that really trained
    assert optional_modules_loaded(loaded) == []
