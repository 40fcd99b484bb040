"""docker-compose.yml and docker/Dockerfile, proven without a Docker engine (none runs on our machines).

* ``docker-compose config -q`` (Debian's docker-compose, installed by .ci/run) accepts the file.
* :class:`ComposeRun` runs the file's services as local processes, as compose would run them: the configuration
  is the one ``docker-compose config`` resolves (variables, YAML anchors, paths); each service runs the image's
  ENTRYPOINT (docker/entrypoint.sh, found through the Dockerfile's COPY) with its ``command`` (else the image's
  CMD) and the image's ENV overlaid by its ``environment``; every volume is a temporary directory mounted at the
  same place (paths in the environment are mapped); the service name ``broker`` and its container port are
  127.0.0.1 and a free port; ``depends_on: service_healthy`` waits for the service's own healthcheck command.
  The broker is therefore Mosquitto started by the compose file's own init step and generated configuration,
  with auth and the per-device ACL on. Only the services compose starts without ``--profile`` run this way.
* The ``emqx`` profile (a 3-node EMQX 5 cluster, a coordinator with ``--aggregators 2``, two aggregator workers,
  devices) cannot run here: no EMQX image runs on our machines. ``docker-compose --profile emqx config`` accepts it;
  its accounts step (docker/emqx/accounts.py) runs as a local process; the ACL it writes is checked against the
  rules of :mod:`fedmqtt.topics` under EMQX's documented evaluation order (a model of EMQX, not EMQX); the fedmqtt
  services' commands and environment go through fedmqtt's own parser and settings validation.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import require_mosquitto
from fedmqtt.broker.net import find_free_port

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
VENV_BIN = Path(sys.executable).parent
BROKER_SERVICE = "broker"
CONTAINER_PORT = 1883
WAIT = 240.0  # a whole job of processes that each import torch, on 2 shared cores


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail("docker-compose is not installed: apt-get install docker-compose (.ci/run does)")
    return found


def compose_config(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The configuration compose would run: ``docker-compose config`` (interpolated, anchors merged). Debian's
    docker-compose 1.29 lists every service, whatever its profiles: :func:`active` picks those a profile runs.
    A fresh copy each time; the command runs once per set of variables (about a second each)."""
    return yaml.safe_load(_resolved_config(tuple(sorted((env or {}).items()))))


@functools.lru_cache(maxsize=8)
def _resolved_config(variables: tuple[tuple[str, str], ...]) -> str:
    result = subprocess.run(
        [docker_compose(), "-f", str(COMPOSE_FILE), "config"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **dict(variables)}, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def active(config: dict[str, Any], *profiles: str) -> list[str]:
    """The services ``docker compose [--profile P ...] up`` starts: those without profiles and those of ``profiles``."""
    return [
        s for s, spec in config["services"].items() if not spec.get("profiles") or set(spec["profiles"]) & set(profiles)
    ]


# --------------------------------------------------------------------------------------------- the image


class Image:
    """What the Dockerfile says a container starts with: ENV, ENTRYPOINT, CMD, USER, HEALTHCHECK, COPY."""

    def __init__(self, path: Path) -> None:
        self.env: dict[str, str] = {}
        self.entrypoint: list[str] = []
        self.cmd: list[str] = []
        self.user = "root"
        self.healthcheck: list[str] = []
        self.copies: dict[str, str] = {}  # destination -> source in the build context
        self.froms: list[str] = []
        text = re.sub(r"\\\n", " ", path.read_text())
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            word, _, rest = line.partition(" ")
            word = word.upper()
            rest = rest.strip()
            if word == "FROM":
                self.froms.append(rest)
            elif word == "ENV":
                for item in shlex.split(rest):
                    key, _, value = item.partition("=")
                    self.env[key] = value
            elif word == "ENTRYPOINT":
                self.entrypoint = json.loads(rest)
            elif word == "CMD":
                self.cmd = json.loads(rest)
            elif word == "USER":
                self.user = rest
            elif word == "HEALTHCHECK":
                self.healthcheck = json.loads(rest[rest.index(" CMD ") + 5 :])
            elif word == "COPY":
                *sources, dest = shlex.split(rest)
                if len(sources) == 1:
                    self.copies[dest] = sources[0]


# --------------------------------------------------------------------------------------------- running a project


class ComposeRun:
    """The services of the compose file as local processes (see the module docstring)."""

    def __init__(self, root: Path, config: dict[str, Any], image: Image) -> None:
        self.root = root
        self.config = config
        self.image = image
        self.port = find_free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.runs: dict[str, int] = {}
        # The image's executables: COPY docker/X /usr/local/bin/NAME, as links on this PATH.
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        for dest, source in image.copies.items():
            if dest.startswith("/usr/local/bin/"):
                (self.bin / Path(dest).name).symlink_to(REPO / source)
        self.path = os.pathsep.join([str(self.bin), str(VENV_BIN), "/usr/local/sbin", "/usr/sbin", "/usr/bin", "/bin"])

    # -- translation: volumes, network --

    def mounts(self, service: str) -> list[tuple[str, Path]]:
        """(container path, host path) of the service's volumes: named volumes are directories of this run."""
        out = []
        for spec in self.config["services"][service].get("volumes", []):
            source, target = (spec["source"], spec["target"]) if isinstance(spec, dict) else spec.split(":")[:2]
            if source in (self.config.get("volumes") or {}):
                host = self.root / "volumes" / source
                host.mkdir(parents=True, exist_ok=True)
            else:
                host = Path(source)
            out.append((target, host))
        return sorted(out, key=lambda m: -len(m[0]))

    def host_path(self, service: str, value: str) -> str:
        for target, host in self.mounts(service):
            if value == target or value.startswith(target + "/"):
                return str(host) + value[len(target) :]
        return value

    def environment(self, service: str) -> dict[str, str]:
        spec = self.config["services"][service]
        env = {**self.image.env, **{k: "" if v is None else str(v) for k, v in (spec.get("environment") or {}).items()}}
        out = {}
        for key, value in env.items():
            value = value.replace(f"//{BROKER_SERVICE}:{CONTAINER_PORT}", f"//127.0.0.1:{self.port}")
            out[key] = self.host_path(service, value)
        if service == BROKER_SERVICE:  # the container's listener is this run's free port on loopback
            assert out["FEDMQTT_LISTEN_PORT"] == str(CONTAINER_PORT)
            out["FEDMQTT_LISTEN_PORT"], out["FEDMQTT_LISTEN_HOST"] = str(self.port), "127.0.0.1"
        home = self.root / "home" / service
        home.mkdir(parents=True, exist_ok=True)
        return {**out, "PATH": self.path, "HOME": str(home), "LANG": "C.UTF-8"}

    def argv(self, service: str) -> list[str]:
        spec = self.config["services"][service]
        entrypoint = spec.get("entrypoint", self.image.entrypoint)
        command = spec.get("command", self.image.cmd if "entrypoint" not in spec else [])
        return [self.host_path(service, word) for word in (*entrypoint, *command)]

    # -- lifecycle --

    def log(self, service: str) -> Path:
        return self.root / f"{service}.log"

    def start(self, service: str) -> subprocess.Popen[bytes]:
        for dependency, condition in (self.config["services"][service].get("depends_on") or {}).items():
            assert dependency in self.processes, f"{service} depends on {dependency}, which was not started"
            if condition.get("condition") == "service_healthy":
                self.wait_healthy(dependency)
        self.runs[service] = self.runs.get(service, 0) + 1
        work = self.root / "work" / service
        work.mkdir(parents=True, exist_ok=True)
        with open(self.log(service), "ab") as log:
            log.write(f"--- start {self.runs[service]}: {shlex.join(self.argv(service))}\n".encode())
            log.flush()
            process = subprocess.Popen(
                self.argv(service), env=self.environment(service), cwd=work, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.processes[service] = process
        return process

    def healthcheck(self, service: str) -> subprocess.CompletedProcess[bytes]:
        check = self.config["services"][service].get("healthcheck")
        test = check["test"] if check else ["CMD", *self.image.healthcheck]
        assert test[0] == "CMD", test
        return subprocess.run(test[1:], env=self.environment(service), capture_output=True, timeout=30, check=False)

    def wait_healthy(self, service: str) -> None:
        deadline = time.monotonic() + WAIT
        while self.healthcheck(service).returncode != 0:
            process = self.processes[service]
            if process.poll() is not None:
                pytest.fail(f"{service} exited ({process.returncode}) before it was healthy:\n{self.tail(service)}")
            if time.monotonic() > deadline:
                pytest.fail(f"{service} was not healthy within {WAIT} s:\n{self.tail(service)}")
            time.sleep(0.5)

    def up(self) -> None:
        """Start every service ``docker compose up`` starts, in dependency order (those without dependencies first)."""
        services = self.config["services"]
        for name in sorted(active(self.config), key=lambda s: (bool(services[s].get("depends_on")), s)):
            self.start(name)

    def wait(self, service: str, timeout: float = WAIT) -> int:
        try:
            return self.processes[service].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{service} did not exit within {timeout} s:\n{self.tails()}")

    def stop(self, service: str, timeout: float = 30.0) -> int:
        """``docker compose stop SERVICE``: SIGTERM to the container's main process, then its exit code."""
        process = self.processes[service]
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        return self.wait(service, timeout)

    def down(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def tail(self, service: str, limit: int = 3000) -> str:
        path = self.log(service)
        return path.read_text(errors="replace")[-limit:] if path.exists() else "(no log)"

    def tails(self) -> str:
        return "\n".join(f"=== {s}\n{self.tail(s)}" for s in self.processes)

    def secret(self, name: str) -> str:
        env = self.environment(BROKER_SERVICE)
        return Path(env["FEDMQTT_SECRETS_DIR"], name).read_text().strip()

    def url(self, account: str) -> str:
        return f"mqtt://{account}:{self.secret(account)}@127.0.0.1:{self.port}"


# --------------------------------------------------------------------------------------------- tests


def device_services(config: dict[str, Any], *profiles: str) -> list[str]:
    """The device services of a plain ``docker compose up`` (the default), or of ``profiles`` only."""
    names = active(config) if not profiles else [s for s in active(config, *profiles) if s not in active(config)]
    return [s for s in names if config["services"][s].get("command") == ["device"]]


def test_docker_compose_config_accepts_the_file() -> None:
    result = subprocess.run(
        [docker_compose(), "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_the_file_and_the_image_say_what_the_readme_promises() -> None:
    config, image = compose_config(), Image(DOCKERFILE)
    services = config["services"]
    # The image: non-root, an exec-form entrypoint that is ours, a healthcheck, CPU torch, no secrets inside.
    assert image.user not in ("", "root", "0") and image.entrypoint == ["fedmqtt-entrypoint"]
    assert image.copies["/usr/local/bin/fedmqtt-entrypoint"] == "docker/entrypoint.sh"
    assert image.healthcheck == ["fedmqtt-healthcheck"]
    dockerfile = DOCKERFILE.read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in dockerfile and "ARG EXTRAS" in dockerfile
    assert not any("secret" in source or "passwd" in source for source in image.copies.values())
    # The broker: auth on (the entrypoint runs `fedmqtt broker --mosquitto --auth`), healthcheck, accounts.
    broker = services[BROKER_SERVICE]
    assert broker["command"] == ["broker"] and broker["healthcheck"]["test"][0] == "CMD"
    assert "--mosquitto --auth" in (REPO / "docker" / "entrypoint.sh").read_text()
    # The coordinator waits for a healthy broker, keeps checkpoints in a volume, resumes.
    coordinator = services["coordinator"]
    assert coordinator["depends_on"] == {BROKER_SERVICE: {"condition": "service_healthy"}}
    assert coordinator["environment"]["FEDMQTT_RESUME"] == "true"
    assert any(str(v).split(":")[:2] == ["checkpoints", "/var/lib/fedmqtt/checkpoints"] for v in coordinator["volumes"])
    # Devices: one template, distinct ids, accounts and parts, all of them known to the broker's init step.
    devices = device_services(config)
    envs = [services[d]["environment"] for d in devices]
    ids = [e["FEDMQTT_DEVICE_ID"] for e in envs]
    assert len(devices) >= 2 and len(set(ids)) == len(ids)
    assert sorted(int(e["FEDMQTT_PART"]) for e in envs) == list(range(len(devices)))
    assert all(int(e["FEDMQTT_NUM_PARTS"]) == len(devices) for e in envs)
    assert set(ids) == set(broker["environment"]["FEDMQTT_DEVICES"].replace(",", " ").split())
    assert all(services[d]["depends_on"] == {BROKER_SERVICE: {"condition": "service_healthy"}} for d in devices)
    # No password in any environment or command: they live in the secrets volume only.
    for name, spec in services.items():
        text = json.dumps([spec.get("environment"), spec.get("command")])
        assert 'FEDMQTT_PASSWORD"' not in text and "--password " not in text, name


@pytest.fixture
def compose(tmp_path: Path) -> Iterator[Any]:
    require_mosquitto()
    from fedmqtt.data import write_idx_dataset

    runs: list[ComposeRun] = []

    def make(**variables: str) -> ComposeRun:
        data = tmp_path / "data"
        write_idx_dataset(data / "mnist", num_train=240, num_test=60, seed=7)
        job = f"c{uuid.uuid4().hex[:8]}"
        env = {"FEDMQTT_DATA_DIR": str(data), "FEDMQTT_JOB": job, "FEDMQTT_MODEL": "mlp", "FEDMQTT_ROUNDS": "2",
               "FEDMQTT_ROUND_TIMEOUT": "120", **variables}  # fmt: skip
        run = ComposeRun(tmp_path / "project", compose_config(env), Image(DOCKERFILE))
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.down()
        print(run.tails())


def watch(run: ComposeRun) -> Any:
    """A JobView of the job through the watcher account (the ACL lets it read all but update frames)."""
    from fedmqtt.topics import Topics
    from harness import JobView

    env = run.environment("coordinator")
    return JobView(run.url("watcher"), Topics(job=env["FEDMQTT_JOB"], prefix=env["FEDMQTT_PREFIX"]))


@pytest.mark.mosquitto
@pytest.mark.e2e
def test_a_whole_job_runs_as_compose_runs_it(compose: Any) -> None:
    from fedmqtt.coordinator.durability import Durability
    from fedmqtt.schema import Phase

    run = compose()
    started = time.monotonic()
    run.up()
    assert run.wait("coordinator") == 0, run.tails()
    seconds = time.monotonic() - started
    view = watch(run)  # retained messages tell how the job ended
    try:
        status = view.wait_status("phase finished", lambda s: s.phase is Phase.FINISHED, timeout=30)
        assert status.round == 2 and status.rounds_total == 2
        devices = sorted(
            run.config["services"][d]["environment"]["FEDMQTT_DEVICE_ID"] for d in device_services(run.config)
        )
        for n in (1, 2):
            assert sorted(view.wait_summary(n, timeout=30).participants) == devices  # 3 of 3, each with its account
    finally:
        view.close()
    assert run.healthcheck("device-0").returncode == 0  # the image's HEALTHCHECK, in a device's environment
    checkpoint = Durability(Path(run.environment("coordinator")["FEDMQTT_CHECKPOINT_DIR"])).load()
    assert checkpoint["machine"]["stage"] == Phase.FINISHED.value
    # `docker compose down`: SIGTERM everywhere; every process ends cleanly.
    for service in [*device_services(run.config), BROKER_SERVICE]:
        assert run.stop(service) == 0, f"{service}:\n{run.tail(service)}"
    assert "Traceback" not in run.tails()
    # A restarted broker container keeps its accounts: the init step creates only what is missing.
    secrets = {name: run.secret(name) for name in ("coordinator", "watcher", *devices)}
    assert run.tail(BROKER_SERVICE, 1_000_000).count("created (password in") == len(secrets)
    run.start(BROKER_SERVICE)
    run.wait_healthy(BROKER_SERVICE)
    assert {name: run.secret(name) for name in secrets} == secrets
    assert run.tail(BROKER_SERVICE, 1_000_000).count("created (password in") == len(secrets)
    assert run.stop(BROKER_SERVICE) == 0
    print(f"whole compose job: {seconds:.1f} s")


@pytest.mark.mosquitto
@pytest.mark.e2e
def test_sigterm_to_the_coordinator_checkpoints_and_the_same_command_resumes(compose: Any) -> None:
    from fedmqtt.schema import EventType, Phase

    run = compose(FEDMQTT_ROUNDS="4")
    run.start(BROKER_SERVICE)
    run.wait_healthy(BROKER_SERVICE)
    view = watch(run)  # subscribed before the job starts: it sees the events of the stop and the resume
    try:
        for service in active(run.config):
            if service != BROKER_SERVICE:
                run.start(service)
        first = view.wait_summary(1, timeout=WAIT)
        assert run.stop("coordinator") == 128 + signal.SIGTERM, run.tail("coordinator")  # docker compose stop
        stopped = view.wait_event(EventType.JOB_STOPPED, timeout=30)
        assert stopped.detail.startswith("stopped by SIGTERM at round ") and "--resume continues" in stopped.detail
        paused = view.wait_status("phase stopped", lambda s: s.phase is Phase.STOPPED, timeout=30)
        assert 2 <= paused.round < 4

        run.start("coordinator")  # `docker compose start coordinator`: the same command and environment
        assert run.wait("coordinator") == 0, run.tail("coordinator")
        view.wait_status("phase finished", lambda s: s.phase is Phase.FINISHED, timeout=30)
        summaries = [view.wait_summary(n, timeout=30) for n in (1, 2, 3, 4)]
        assert {s.run_id for s in summaries} == {first.run_id}  # one run, continued
        assert "resumed from checkpoint" in " ".join(e.detail for e in view.events)
    finally:
        view.close()
    for service in device_services(run.config):
        assert run.stop(service) == 0, run.tail(service)
    assert "Traceback" not in run.tails()


# --------------------------------------------------------------------------------------------- the emqx profile

EMQX_PROFILE = "emqx"
EMQX_DIR = REPO / "docker" / "emqx"
EMQX_CONF = EMQX_DIR / "emqx.conf"


def emqx_accounts_module() -> Any:
    """docker/emqx/accounts.py, the script the profile's accounts step runs (imported from its path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fedmqtt_emqx_accounts", EMQX_DIR / "accounts.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def emqx_profile(config: dict[str, Any]) -> dict[str, list[str]]:
    """The profile's services by role."""
    names = [s for s in active(config, EMQX_PROFILE) if s not in active(config)]
    services = config["services"]
    roles: dict[str, list[str]] = {"nodes": [], "accounts": [], "coordinator": [], "aggregators": [], "devices": []}
    for name in names:
        spec = services[name]
        command = spec.get("command") or []
        if str(spec.get("image", "")).startswith("emqx/emqx:"):
            roles["nodes"].append(name)
        elif "accounts.py" in " ".join(spec.get("entrypoint") or []):
            roles["accounts"].append(name)
        elif command[:1] == ["coordinator"]:
            roles["coordinator"].append(name)
        elif command[:1] == ["aggregator"]:
            roles["aggregators"].append(name)
        elif command == ["device"]:
            roles["devices"].append(name)
        else:
            pytest.fail(f"{name}: a service of the emqx profile this test does not know")
    return roles


def volume_at(spec: dict[str, Any], target: str) -> str:
    found = [str(v).split(":")[0] for v in spec.get("volumes", []) if str(v).split(":")[1] == target]
    assert len(found) == 1, (target, spec.get("volumes"))
    return found[0]


def hocon_bytes(name: str) -> int:
    """A byte-size setting of docker/emqx/emqx.conf (``NAME = 32MB``; EMQX's MB is 2^20 bytes)."""
    found = re.findall(rf"^\s*{name} = (\d+)(KB|MB|GB)\s*$", EMQX_CONF.read_text(), re.M)
    assert len(found) == 1, name
    number, unit = found[0]
    return int(number) * {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[unit]


def test_docker_compose_config_accepts_the_emqx_profile_and_a_plain_up_is_unchanged() -> None:
    result = subprocess.run(
        [docker_compose(), "-f", str(COMPOSE_FILE), "--profile", EMQX_PROFILE, "config", "-q"],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = compose_config()
    # A plain `docker compose up` starts exactly the Mosquitto job; every other service is in the emqx profile.
    assert sorted(active(config)) == [BROKER_SERVICE, "coordinator", "device-0", "device-1", "device-2"]
    for name, spec in config["services"].items():
        assert spec.get("profiles") in (None, [EMQX_PROFILE]), name
        if spec.get("profiles"):
            assert name.startswith("emqx-"), name  # named apart, so `up SERVICE...` lists are unambiguous


def test_the_emqx_profile_is_a_static_cluster_that_every_fedmqtt_service_reaches() -> None:
    config = compose_config()
    services = config["services"]
    roles = emqx_profile(config)
    assert len(roles["nodes"]) >= 2 and len(roles["accounts"]) == 1 and len(roles["coordinator"]) == 1
    assert len(roles["aggregators"]) >= 2 and len(roles["devices"]) >= 2
    (accounts,) = roles["accounts"]
    # The nodes: unique names name@FQDN, the FQDN an alias on the network, static seeds = all nodes, one cookie.
    names, cookies = [], set()
    for node in roles["nodes"]:
        spec, env = services[node], services[node]["environment"]
        name = env["EMQX_NODE__NAME"]
        assert name.split("@")[1] in spec["networks"]["default"]["aliases"], node
        assert env["EMQX_CLUSTER__DISCOVERY_STRATEGY"] == "static"
        seeds = env["EMQX_CLUSTER__STATIC__SEEDS"].strip("[]").split(",")
        assert sorted(seeds) == sorted(services[n]["environment"]["EMQX_NODE__NAME"] for n in roles["nodes"])
        names.append(name)
        cookies.add(env["EMQX_NODE__COOKIE"])
        assert spec["healthcheck"]["test"] == ["CMD", "/opt/emqx/bin/emqx", "ctl", "status"]
        assert spec["depends_on"] == {accounts: {"condition": "service_completed_successfully"}}
        assert volume_at(spec, "/opt/emqx/etc/emqx.conf") == str(EMQX_CONF)
        assert volume_at(spec, "/opt/emqx/etc/fedmqtt") == volume_at(services[accounts], "/var/lib/fedmqtt/broker")
    assert len(set(names)) == len(names) and len(cookies) == 1
    # emqx.conf: what fedmqtt relies on (docs/clustered-brokers.md), each value the limit fedmqtt itself works with.
    from fedmqtt.mqtt.connection import DEFAULT_MAX_PACKET_SIZE

    text = EMQX_CONF.read_text()
    assert hocon_bytes("max_packet_size") >= DEFAULT_MAX_PACKET_SIZE  # the model and update frames fit
    assert hocon_bytes("max_payload_size") >= DEFAULT_MAX_PACKET_SIZE  # and stay retained (EMQX default: 1MB)
    for line in ("retain_available = true", "shared_subscription = true", "use_username_as_clientid = true",
                 "no_match = deny", "bootstrap_type = hash", "password_hash_algorithm {name = sha256, salt_position = suffix}",
                 'bootstrap_file = "/opt/emqx/etc/fedmqtt/users.csv"', 'path = "/opt/emqx/etc/fedmqtt/acl.conf"'):  # fmt: skip
        assert line in text, line
    # The fedmqtt services: each reaches a node it waits for, logs in with an account the accounts step makes,
    # with a password from the profile's own secrets volume.
    account_env = services[accounts]["environment"]
    secrets_volume = volume_at(services[accounts], "/var/lib/fedmqtt/secrets")
    devices = set(account_env["FEDMQTT_DEVICES"].split())
    workers = account_env["FEDMQTT_AGGREGATOR_IDS"].split()
    for name in roles["coordinator"] + roles["aggregators"] + roles["devices"]:
        spec = services[name]
        host = re.fullmatch(r"mqtt://([a-z0-9-]+):1883", spec["environment"]["FEDMQTT_BROKER"])
        assert host is not None and host.group(1) in roles["nodes"], name
        assert spec["depends_on"] == {host.group(1): {"condition": "service_healthy"}}, name
        assert volume_at(spec, "/var/lib/fedmqtt/secrets") == secrets_volume, name
    envs = [services[d]["environment"] for d in roles["devices"]]
    assert {e["FEDMQTT_DEVICE_ID"] for e in envs} <= devices and len({e["FEDMQTT_DEVICE_ID"] for e in envs}) == len(
        envs
    )
    assert sorted(int(e["FEDMQTT_PART"]) for e in envs) == list(range(len(envs)))
    (coordinator,) = roles["coordinator"]
    assert int(services[coordinator]["environment"]["FEDMQTT_AGGREGATORS"]) == len(roles["aggregators"])
    ids = [services[a]["command"][services[a]["command"].index("--id") + 1] for a in roles["aggregators"]]
    assert sorted(ids) == sorted(workers)
    # The clients are spread over the nodes: the cluster routes between them (updates, shared subscription).
    assert len({services[n]["environment"]["FEDMQTT_BROKER"] for n in roles["aggregators"] + roles["devices"]}) > 1


def test_the_emqx_accounts_step_makes_passwords_emqx_hashes_and_the_acl(tmp_path: Path) -> None:
    module = emqx_accounts_module()
    config = compose_config()
    (accounts,) = emqx_profile(config)["accounts"]
    run = ComposeRun(tmp_path / "project", config, Image(DOCKERFILE))
    env = run.environment(accounts)
    for attempt in (1, 2):  # a second start keeps every password
        assert run.start(accounts).wait(timeout=120) == 0, run.tail(accounts)
        secrets_dir, auth_dir = Path(env["FEDMQTT_SECRETS_DIR"]), Path(env["FEDMQTT_EMQX_AUTH_DIR"])
        names = ["coordinator", "watcher", *env["FEDMQTT_DEVICES"].split(), *env["FEDMQTT_AGGREGATOR_IDS"].split()]
        passwords = {n: (secrets_dir / n).read_text().strip() for n in names}
        assert all((secrets_dir / n).stat().st_mode & 0o777 == 0o600 for n in names)
        if attempt == 1:
            first = passwords
        assert passwords == first
        rows = (auth_dir / "users.csv").read_text().splitlines()
        assert rows[0] == "user_id,password_hash,salt,is_superuser"
        users = {r.split(",")[0]: r.split(",")[1:] for r in rows[1:]}
        assert sorted(users) == sorted(names)
        for name, (digest, salt, superuser) in users.items():
            assert digest == hashlib.sha256((passwords[name] + salt).encode()).hexdigest() and superuser == "false"
            assert passwords[name] not in (auth_dir / "users.csv").read_text()
        acl = (auth_dir / "acl.conf").read_text()
        assert acl == module.render_emqx_acl(env["FEDMQTT_PREFIX"], env["FEDMQTT_AGGREGATOR_IDS"].split())
    assert run.tail(accounts).count("created (password in") == len(names)
    # A device id that is an account name is refused, with the reason, before anything is written.
    env = {**env, "FEDMQTT_DEVICES": "dev-0 watcher", "FEDMQTT_SECRETS_DIR": str(tmp_path / "other")}
    refused = subprocess.run(run.argv(accounts), env=env, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 2 and "'watcher' is the name of a fedmqtt account" in refused.stderr
    assert not (tmp_path / "other").exists()


# EMQX's file authorizer, as its documentation states it: rules top to bottom, the first rule matching the client,
# the action and the topic decides; no match: authorization.no_match (deny). ${username} is the client's username;
# a `+` or `#` in a rule never matches a first level starting with `$`; a SUBSCRIBE is checked once, as a filter
# (`$share/GROUP/T` as T). A model of EMQX, since no EMQX runs here.
_EMQX_RULE = re.compile(
    r'^\{(allow|deny), (all|\{username, "([^"]+)"\})(?:, (publish|subscribe|all), \["([^"]+)"\])?\}\.$'
)


def emqx_topic_match(name: str, topic_filter: str) -> bool:
    words, filters = name.split("/"), topic_filter.split("/")
    if words[0].startswith("$") and filters[0] in ("+", "#"):
        return False
    for i, f in enumerate(filters):
        if f == "#":
            return True
        if i == len(words) or (f != "+" and f != words[i]):
            return False
    return len(words) == len(filters)


def emqx_allows(acl: str, username: str, action: str, topic: str) -> bool:
    if action == "subscribe" and topic.startswith("$share/"):
        topic = topic.split("/", 2)[2]
    for line in acl.splitlines():
        if not line or line.startswith("%%"):
            continue
        rule = _EMQX_RULE.match(line)
        assert rule is not None, f"not an acl.conf rule this model knows: {line}"
        permission, who, user, rule_action, rule_topic = rule.groups()
        if who != "all" and user != username:
            continue
        if rule_topic is not None:
            if rule_action not in ("all", action):
                continue
            if not emqx_topic_match(topic, rule_topic.replace("${username}", username)):
                continue
        return permission == "allow"
    return False  # authorization.no_match = deny


def fedmqtt_allows(rules: Any, username: str, action: str, topic: str) -> bool:
    """What fedmqtt.topics' rules for one account say: a matching deny wins, else a matching grant allows."""
    grants = {"subscribe": ("read", "readwrite"), "publish": ("write", "readwrite")}[action]
    matching = [r for r in rules if emqx_topic_match(topic, r.pattern.replace("%u", username))]
    return not any(r.access == "deny" for r in matching) and any(r.access in grants for r in matching)


def test_the_emqx_acl_grants_each_account_what_fedmqtt_topics_grants_it() -> None:
    from fedmqtt.topics import Topics, aggregator_acl, coordinator_acl, device_acl, site_acl, watcher_acl
    from fedmqtt.watch import watch_subscriptions

    prefix, workers = "acme/fl", ["a1", "a2"]
    acl = emqx_accounts_module().render_emqx_acl(prefix, workers, ["s1"])
    accounts = {"coordinator": coordinator_acl(prefix), "watcher": watcher_acl(prefix), "d1": device_acl(prefix),
                "d2": device_acl(prefix), "a1": aggregator_acl(prefix), "a2": aggregator_acl(prefix),
                "s1": site_acl(prefix)}  # fmt: skip
    names = ["$SYS/brokers", "other/j/plan", "acme/plan", "acme/fl/j/plan/extra"]
    for job in ("j", "k"):
        t = Topics(job=job, prefix=prefix)
        names += [t.plan, t.model, t.delta, t.status, t.events, t.privacy, t.coordinator, t.release, t.collect]
        names += [t.round_summary(3), t.updates_filter, t.device_status_filter, t.aggregators_filter]
        for device in ("d1", "d2", "coordinator"):
            names += [t.update(device), t.device_status(device)]
        for worker in workers:
            names += [t.aggregator_status(worker), t.aggregator_progress(worker), t.partial(worker)]
        names += [t.site_bridge("s1"), t.site_bridge("s2")]
    checked = 0
    for username, rules in accounts.items():
        for action in ("publish", "subscribe"):
            for name in names:
                expected = fedmqtt_allows(rules, username, action, name)
                assert emqx_allows(acl, username, action, name) == expected, (username, action, name, expected)
                checked += expected
    assert checked > 50  # grants were checked, not only refusals
    # The subscriptions fedmqtt's clients make are granted as a whole; the watcher's `JOB/#` is refused on EMQX.
    t = Topics(job="j", prefix=prefix)
    assert all(emqx_allows(acl, "watcher", "subscribe", f) for f, _ in watch_subscriptions(t))
    assert emqx_allows(acl, "a1", "subscribe", t.shared_updates_filter("fedmqtt"))
    assert not emqx_allows(acl, "d1", "subscribe", t.shared_updates_filter("fedmqtt"))
    assert not emqx_allows(acl, "watcher", "subscribe", t.shared_updates_filter("fedmqtt"))
    assert not emqx_allows(acl, "watcher", "subscribe", t.everything_filter)
    assert emqx_allows(acl, "coordinator", "subscribe", t.everything_filter)
    assert not emqx_allows(acl, "stranger", "publish", t.plan)  # a username no rule names is a device: no model writes


def test_the_emqx_profile_fedmqtt_commands_pass_fedmqtt_s_own_validation(tmp_path: Path) -> None:
    """The profile's coordinator and workers, as compose would start them, through the parser and the settings
    checks their commands run before any connection (`fedmqtt coordinator`: config_from_args; `fedmqtt
    aggregator`: options_from_args). The accounts step runs first: the password files must exist."""
    from fedmqtt.aggregator.cli import options_from_args
    from fedmqtt.cli import build_parser
    from fedmqtt.coordinator.config import config_from_args
    from fedmqtt.data import write_idx_dataset

    write_idx_dataset(tmp_path / "data" / "mnist", num_train=60, num_test=20, seed=7)  # the coordinator's --eval-data
    config = compose_config({"FEDMQTT_DATA_DIR": str(tmp_path / "data"), "FEDMQTT_JOB": "emqx-job"})
    roles = emqx_profile(config)
    run = ComposeRun(tmp_path / "project", config, Image(DOCKERFILE))
    (accounts,) = roles["accounts"]
    assert run.start(accounts).wait(timeout=120) == 0, run.tail(accounts)
    entrypoint = run.image.entrypoint
    (coordinator,) = roles["coordinator"]
    argv = run.argv(coordinator)
    assert argv == [*entrypoint, "coordinator"]  # docker/entrypoint.sh: `fedmqtt coordinator`, settings from the env
    env = run.environment(coordinator)
    job = config_from_args(build_parser().parse_args(argv[1:]), env=env)
    assert job.aggregators == len(roles["aggregators"]) and job.job == "emqx-job"
    assert job.broker.host == "emqx-1" and job.username == "coordinator"
    assert job.password_file is not None and Path(job.password_file).read_text().strip()  # the accounts step's
    for service in roles["aggregators"]:
        argv = run.argv(service)
        assert argv[: len(entrypoint) + 1] == [*entrypoint, "aggregator"]  # the entrypoint: `fedmqtt aggregator ...`
        options = options_from_args(build_parser().parse_args(argv[len(entrypoint) :]))
        spec = config["services"][service]
        assert options.broker.broker.to_url() == spec["environment"]["FEDMQTT_BROKER"]  # what its healthcheck asks
        assert options.job == "emqx-job" and options.group is not None and options.site is None
        assert options.broker.username == options.worker and options.broker.password_file is not None
        assert Path(options.broker.password_file).read_text().strip()
        assert options.spool.is_relative_to(run.root / "volumes" / volume_at(spec, "/var/lib/fedmqtt/state"))
