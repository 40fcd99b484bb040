"""Mosquitto 2 for production: a complete configuration written into a config directory, and runners.

Config directory layout (``fedmqtt broker --config-dir DIR``)::

    DIR/mosquitto.conf   generated on every start from the flags (do not edit)
    DIR/passwd           accounts (mosquitto_passwd hashes), with --auth
    DIR/acl              generated from fedmqtt.topics, with --auth
    DIR/data/            persistence (sessions, queued and retained messages survive a restart)
    DIR/tls/             ca.crt, server.crt, server.key (fedmqtt broker gen-certs, or your own), with --tls
    DIR/tls/clients/     NAME.crt, NAME.key: client certificates (gen-certs --device ID), with --client-certs
    DIR/mosquitto.pid    pid of the running broker: add-device sends it SIGHUP to reload the accounts
    DIR/mosquitto.log    the broker's stderr, when run by MosquittoBroker (tests, simulate)

Run as root, Mosquitto would switch to the ``mosquitto`` user, which cannot read a config directory inside a
private home or temporary directory; fedmqtt then writes ``user root`` (Mosquitto warns once). In production,
run it under its own service account with the directory owned by that account. Secrets (password file, ACL,
server key) are written readable by their owner only, as Mosquitto 2 expects.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from fedmqtt.broker.accounts import (
    AccountKind,
    acl_prefix,
    add_account,
    add_name,
    list_accounts,
    read_names,
    render_acl,
    username_for,
    write_private,
)
from fedmqtt.broker.bridge import BridgeConfig
from fedmqtt.broker.certs import ClientCertificate, TlsFiles, generate_test_certificates, issue_client_certificate
from fedmqtt.broker.errors import AccountError, BrokerError, BrokerStartError, CertificateError, MissingTool
from fedmqtt.broker.net import find_free_port, mqtt_probe, probe_host
from fedmqtt.mqtt import DEFAULT_MAX_PACKET_SIZE
from fedmqtt.topics import DEFAULT_PREFIX, validate_prefix

CONFIG_FILE = "mosquitto.conf"
PASSWORD_FILE = "passwd"
ACL_FILE = "acl"
DATA_DIR = "data"
TLS_DIR = "tls"
PID_FILE = "mosquitto.pid"
SITES_FILE = "sites"  # the site accounts (fedmqtt broker add-site NAME): each gets its block in the ACL
AGGREGATORS_FILE = "aggregators"  # the aggregator accounts (fedmqtt broker add-aggregator ID), likewise
LOG_FILE = "mosquitto.log"

_INSTALL_HINT = (
    "install Mosquitto (Debian/Ubuntu: apt install mosquitto mosquitto-clients; macOS: brew install mosquitto)"
)
_PORT_ATTEMPTS = 5


def mosquitto_binary() -> str:
    """The ``mosquitto`` executable (Debian installs it in /usr/sbin, which is not always on a user's PATH)."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise MissingTool("mosquitto", _INSTALL_HINT)
    return found


def _running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


DEFAULT_MAX_QUEUED_MESSAGES = 100_000
DEFAULT_MAX_QUEUED_BYTES = 1_000_000_000


@dataclass(frozen=True)
class MosquittoConfig:
    """Everything the generated mosquitto.conf says. ``render()`` is pure; ``write()`` writes the directory.

    ``max_queued_messages`` / ``max_queued_bytes``: per client, the QoS 1 messages waiting for an offline
    persistent session **or beyond the in-flight window of a connected one**; Mosquitto drops the rest for that
    client (its log: "Outgoing messages are being dropped"), although it acknowledged them to their publisher. The
    coordinator (or each aggregator worker) must be able to hold a whole round's burst of updates and device
    statuses there: with Mosquitto's own default of 1,000 messages, rounds of 1,000 devices lost updates
    silently. The defaults (DEFAULT_MAX_QUEUED_MESSAGES, and the larger of four maximum-size packets and
    DEFAULT_MAX_QUEUED_BYTES) hold a round of 100,000 small updates or 1 GB of frames per client.
    """

    config_dir: Path
    host: str = "127.0.0.1"
    port: int = 1883
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES
    max_queued_bytes: int | None = None
    max_inflight_messages: int = 20
    persistence: bool = True
    autosave_interval: int = 60
    auth: bool = False
    tls: bool = False
    certfile: Path | None = None
    keyfile: Path | None = None
    prefix: str = DEFAULT_PREFIX
    run_as_root: bool = field(default_factory=_running_as_root)
    # Every client must present a certificate signed by ``cafile`` (default DIR/tls/ca.crt); its common name is
    # the user name the ACL keys on. Needs tls; applies the ACL (no password file).
    client_certs: bool = False
    cafile: Path | None = None
    # Edge sites: this broker (a site's) bridges one job's topics to the cloud broker (fedmqtt.broker.bridge).
    bridge: BridgeConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "config_dir", Path(self.config_dir).absolute())
        if any(ch.isspace() for ch in str(self.config_dir)):
            raise BrokerError(f"the config directory {self.config_dir} contains white space, which mosquitto.conf "
                              "cannot express; choose another directory")  # fmt: skip
        if not 1 <= self.port <= 65535:
            raise BrokerError(f"invalid port {self.port}: use 1-65535")
        if self.max_packet_size < 64 or self.max_packet_size > 268_435_460:
            raise BrokerError("max_packet_size must be from 64 bytes to 256 MiB (the MQTT maximum)")
        if self.max_queued_messages < 0 or (self.max_queued_bytes is not None and self.max_queued_bytes < 0):
            raise BrokerError("queue limits must be >= 0")
        if self.max_inflight_messages < 1:
            raise BrokerError("max_inflight_messages must be >= 1")
        validate_prefix(self.prefix)
        if self.client_certs and not self.tls:
            raise BrokerError("client certificates need the TLS listener: add --tls to --client-certs")

    # -- paths --

    @property
    def config_file(self) -> Path:
        return self.config_dir / CONFIG_FILE

    @property
    def password_file(self) -> Path:
        return self.config_dir / PASSWORD_FILE

    @property
    def acl_file(self) -> Path:
        return self.config_dir / ACL_FILE

    @property
    def data_dir(self) -> Path:
        return self.config_dir / DATA_DIR

    @property
    def sites_file(self) -> Path:
        return self.config_dir / SITES_FILE

    @property
    def pid_file(self) -> Path:
        return self.config_dir / PID_FILE

    @property
    def tls_files(self) -> TlsFiles:
        default = TlsFiles.in_dir(self.config_dir / TLS_DIR)
        return TlsFiles(
            default.ca_cert, default.ca_key, self.certfile or default.server_cert, self.keyfile or default.server_key
        )

    @property
    def client_ca(self) -> Path:
        """The CA whose certificates clients must present (with ``client_certs``)."""
        return self.cafile or self.tls_files.ca_cert

    @property
    def acl(self) -> bool:
        """Whether the ACL applies: with accounts (``auth``) or client certificates."""
        return self.auth or self.client_certs

    @property
    def effective_max_queued_bytes(self) -> int:
        if self.max_queued_bytes is not None:
            return self.max_queued_bytes
        return max(4 * self.max_packet_size, DEFAULT_MAX_QUEUED_BYTES)

    # -- rendering --

    def render(self) -> str:
        """The mosquitto.conf text (pure)."""
        lines = [
            "# Generated by fedmqtt on every broker start from its flags; edits here are overwritten.",
            "# One listener, so the security settings below are global.",
            "per_listener_settings false",
        ]
        if self.run_as_root:
            lines += ["# Started as root: stay root so the broker can read this private directory.", "user root"]
        lines += [
            f"pid_file {self.pid_file}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.data_dir}/",
            f"autosave_interval {self.autosave_interval}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "# max_packet_size, not message_size_limit: Mosquitto answers the latter with a reason code that",
            "# paho's MQTT 5 client reads as a malformed packet.",
            f"max_packet_size {self.max_packet_size}",
            f"max_queued_messages {self.max_queued_messages}",
            f"max_queued_bytes {self.effective_max_queued_bytes}",
            f"max_inflight_messages {self.max_inflight_messages}",
            "set_tcp_nodelay true",
            "",
            f"listener {self.port} {self.host}",
            "protocol mqtt",
        ]
        if self.tls:
            tls = self.tls_files
            lines += [f"certfile {tls.server_cert}", f"keyfile {tls.server_key}", "tls_version tlsv1.2"]
        if self.client_certs:
            lines += [
                "# Every client presents a certificate from this CA; its common name is its user name (the ACL's",
                "# %u): a device's certificate says which device it is. No password file is read.",
                f"cafile {self.client_ca}",
                "require_certificate true",
                "use_identity_as_username true",
                "allow_anonymous false",
                f"acl_file {self.acl_file}",
                "# The client id is the user name, whatever the client sends: no certificate can take over another",
                "# account's connection or persistent session. One connection per account at a time.",
                "use_username_as_clientid true",
            ]
        elif self.auth:
            lines += [
                "allow_anonymous false",
                f"password_file {self.password_file}",
                f"acl_file {self.acl_file}",
                "# The client id is the username, whatever the client sends: no account can take over another",
                "# account's connection or persistent session. One connection per account at a time.",
                "use_username_as_clientid true",
            ]
        else:
            lines.append("allow_anonymous true")
        if self.bridge is not None:
            lines += ["", *self.bridge.render()]
        return "\n".join(lines) + "\n"

    def write(self) -> Path:
        """Write mosquitto.conf (and the ACL, an empty password file if there is none, the data directory);
        return the config file. With TLS the certificate and key must exist already."""
        if self.bridge is not None:
            self.bridge.check_files()  # before anything is written: a bad bridge file leaves no directory behind
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        if self.tls:
            tls = self.tls_files
            missing = [p for p in (tls.server_cert, tls.server_key) if not p.exists()]
            if missing:
                raise CertificateError(
                    f"TLS is on but {missing[0]} does not exist; run `fedmqtt broker gen-certs --config-dir "
                    f"{self.config_dir}` for test certificates, or pass your own --certfile and --keyfile"
                )
        if self.client_certs and not self.client_ca.exists():
            raise CertificateError(
                f"client certificates are on but the CA {self.client_ca} does not exist; run `fedmqtt broker "
                f"gen-certs --config-dir {self.config_dir}`, or pass your own --cafile"
            )
        if self.acl:
            write_private(self.acl_file, render_config_acl(self.config_dir, self.prefix))
        if self.auth and not self.client_certs:
            if not self.password_file.exists():
                write_private(self.password_file, "")
            os.chmod(self.password_file, 0o600)
        write_private(self.config_file, self.render())
        return self.config_file


def register_site_account(config_dir: Path, site: str) -> None:
    """Make ``site`` (an account of the password file, or about to be) a site account: list it and rewrite the
    ACL of ``config_dir`` with its block, for the prefix the ACL already covers."""
    _register_listed_account(Path(config_dir), SITES_FILE, site, "a site's", "site name")


def register_aggregator_account(config_dir: Path, worker: str) -> None:
    """Make ``worker`` an aggregator account (:func:`fedmqtt.topics.aggregator_acl`), as
    :func:`register_site_account` does for a site."""
    _register_listed_account(Path(config_dir), AGGREGATORS_FILE, worker, "an aggregator's", "aggregator id")


def _register_listed_account(config_dir: Path, listed_name: str, name: str, kind: str, what: str) -> None:
    """List ``name`` among the accounts of one kind and rewrite the ACL. An account that exists and is not of
    that kind (a device's) is refused: it would gain that kind's rights."""
    listed = config_dir / listed_name
    if name in list_accounts(config_dir / PASSWORD_FILE) and name not in read_names(listed):
        raise AccountError(f"the account {name!r} exists and is not {kind} (a device's?); choose another {what}")
    add_name(listed, name)
    _rewrite_acl(config_dir)


def render_config_acl(config_dir: Path, prefix: str) -> str:
    """The ACL of a config dir: the topic map's rules, with a block for each listed site and aggregator."""
    config_dir = Path(config_dir)
    return render_acl(
        prefix, sites=read_names(config_dir / SITES_FILE), aggregators=read_names(config_dir / AGGREGATORS_FILE)
    )


def _rewrite_acl(config_dir: Path) -> None:
    """Rewrite the ACL of ``config_dir`` (if it has one) for the prefix it already covers."""
    acl_file = config_dir / ACL_FILE
    prefix = acl_prefix(acl_file.read_text()) if acl_file.exists() else None
    if prefix is not None:
        write_private(acl_file, render_config_acl(config_dir, prefix))


def read_pid(config_dir: Path) -> int | None:
    """The pid of a Mosquitto running from ``config_dir``, if its pid file names a live process."""
    try:
        pid = int((Path(config_dir) / PID_FILE).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def reload_running_broker(config_dir: Path) -> int | None:
    """Send SIGHUP to the broker running from ``config_dir`` (it re-reads accounts and ACL); its pid, or None."""
    pid = read_pid(config_dir)
    if pid is not None:
        os.kill(pid, signal.SIGHUP)
    return pid


def _log_tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-limit:].strip() or "(empty log)"


def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM (Mosquitto saves its database and exits), wait, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _wait_ready(
    proc: subprocess.Popen[bytes],
    host: str,
    port: int,
    tls: bool,
    timeout: float,
    log: Path | None,
    log_start: int = 0,
    client_certs: bool = False,
) -> None:
    """Wait until the process serves MQTT. With a log, also wait for Mosquitto's "running" line in the part
    written by this process, so another broker already on the port cannot answer the probe in its place."""
    deadline = time.monotonic() + timeout

    def details() -> str:
        return (_read_from(log, log_start)[-4000:].strip() or "(empty log)") if log else "(see its output above)"

    while True:
        code = proc.poll()
        if code is not None:
            detail = details()
            raise BrokerStartError(f"mosquitto exited with code {code} before serving:\n{detail}")
        announced = log is None or _RUNNING_LINE in _read_from(log, log_start)
        if (
            announced
            and mqtt_probe(probe_host(host), port, tls=tls, timeout=1.0, client_certs=client_certs)
            and proc.poll() is None
        ):
            return
        if time.monotonic() > deadline:
            _stop_process(proc, 5)
            detail = details()
            raise BrokerStartError(f"mosquitto did not answer MQTT on {host}:{port} within {timeout} s:\n{detail}")
        time.sleep(0.05)


_RUNNING_LINE = " running"


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def ensure_port_free(host: str, port: int) -> None:
    """Raise :class:`BrokerStartError` if something already listens on ``host:port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Mosquitto does: TIME_WAIT is fine
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise BrokerStartError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}; another broker (maybe the system "
                "Mosquitto service) already uses it: choose another --port or stop that broker"
            ) from None


class MosquittoBroker:
    """A Mosquitto process for tests and ``fedmqtt simulate``: ``with MosquittoBroker(dir) as broker: broker.url``.

    ``port=0`` picks a free port (kept across ``restart()``). With ``tls=True`` test certificates are generated
    into ``config_dir/tls`` if none are there. With ``client_certs=True`` every client must present a certificate
    from that CA (:meth:`issue_client_certificate`), whose common name is its user name for the ACL. The broker's stderr goes to ``config_dir/mosquitto.log``
    (``log_text()``); a failed start raises :class:`BrokerStartError` carrying it.
    """

    def __init__(
        self,
        config_dir: Path | str,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        tls: bool = False,
        auth: bool = False,
        client_certs: bool = False,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
        max_queued_bytes: int | None = None,
        prefix: str = DEFAULT_PREFIX,
        persistence: bool = True,
        startup_timeout: float = 10.0,
        bridge: BridgeConfig | None = None,
    ) -> None:
        self.config_dir = Path(config_dir).absolute()
        self.port = port
        self.host = host
        self.tls = tls
        self.auth = auth
        self.client_certs = client_certs
        self.max_packet_size = max_packet_size
        self.max_queued_messages = max_queued_messages
        self.max_queued_bytes = max_queued_bytes
        self.prefix = prefix
        self.persistence = persistence
        self.startup_timeout = startup_timeout
        self.bridge = bridge
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def config(self, port: int) -> MosquittoConfig:
        return MosquittoConfig(
            self.config_dir,
            host=self.host,
            port=port,
            max_packet_size=self.max_packet_size,
            max_queued_messages=self.max_queued_messages,
            max_queued_bytes=self.max_queued_bytes,
            persistence=self.persistence,
            auth=self.auth,
            tls=self.tls,
            prefix=self.prefix,
            client_certs=self.client_certs,
            bridge=self.bridge,
        )

    @property
    def url(self) -> str:
        host = probe_host(self.host)
        host = f"[{host}]" if ":" in host else host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    @property
    def ca_file(self) -> Path:
        """The CA certificate clients trust (``ClientSettings(tls_ca=...)``)."""
        return self.config(self.port or 1883).tls_files.ca_cert

    @property
    def log_file(self) -> Path:
        return self.config_dir / LOG_FILE

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def log_text(self) -> str:
        return _log_tail(self.log_file, limit=1_000_000)

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self.running:
            raise BrokerError("this Mosquitto broker is already running")
        binary = mosquitto_binary()
        self.config_dir.mkdir(parents=True, exist_ok=True)
        if self.tls and not TlsFiles.in_dir(self.config_dir / TLS_DIR).exist():
            generate_test_certificates(self.config_dir / TLS_DIR)
        fixed = self.port
        for attempt in range(_PORT_ATTEMPTS):
            port = fixed or find_free_port(self.host)
            ensure_port_free(self.host, port)
            config_file = self.config(port).write()
            log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
            self._log = open(self.log_file, "ab")  # noqa: SIM115 (kept open while the broker runs)
            self._proc = subprocess.Popen(
                [binary, "-c", str(config_file)],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for the test run reaches the broker via stop() only
            )
            try:
                _wait_ready(
                    self._proc, self.host, port, self.tls, self.startup_timeout, self.log_file, log_start,
                    client_certs=self.client_certs,
                )  # fmt: skip
                self.port = port
                return
            except BrokerStartError:
                self._close_log()
                new_log = self.log_file.read_bytes()[log_start:].decode(errors="replace")
                if fixed or "address already in use" not in new_log.lower() or attempt == _PORT_ATTEMPTS - 1:
                    raise

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Mosquitto saves its persistence database), wait up to ``timeout``, then SIGKILL."""
        if self._proc is not None:
            _stop_process(self._proc, timeout)
            self._proc = None
        self._close_log()

    def restart(self) -> None:
        """Stop and start again on the same port (persistent sessions and queued messages survive)."""
        self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads the password and ACL files."""
        if self._proc is None or self._proc.poll() is not None:
            raise BrokerError("the broker is not running")
        self._proc.send_signal(signal.SIGHUP)

    def issue_client_certificate(self, kind: AccountKind, device_id: str | None = None) -> ClientCertificate:
        """A client certificate (common name: the account's user name) from this broker's test CA."""
        username = username_for(kind, device_id)
        return issue_client_certificate(self.config_dir / TLS_DIR, username, force=True)

    def add_account(self, kind: AccountKind, device_id: str | None = None, password: str | None = None) -> str:
        """Create/update an account (device id is the username for devices); return its password. Call
        ``reload()`` for a running broker to accept it."""
        username = username_for(kind, device_id)
        if kind == "site":
            register_site_account(self.config_dir, username)
        if kind == "aggregator":
            register_aggregator_account(self.config_dir, username)
        return add_account(self.config(self.port or 1883).password_file, username, password)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def run_mosquitto(config: MosquittoConfig) -> int:
    """Run Mosquitto in the foreground (its log on this terminal's stderr) until Ctrl-C or SIGTERM."""
    binary = mosquitto_binary()
    config_file = config.write()
    ensure_port_free(config.host, config.port)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    proc = subprocess.Popen([binary, "-c", str(config_file)], stdin=subprocess.DEVNULL)
    try:
        _wait_ready(proc, config.host, config.port, config.tls, 10.0, None, client_certs=config.client_certs)
        scheme = "mqtts" if config.tls else "mqtt"
        print(
            f"fedmqtt broker: mosquitto listening on {scheme}://{probe_host(config.host)}:{config.port} "
            f"(bound to {config.host}; config {config_file}); Ctrl-C stops it",
            flush=True,
        )
        while proc.poll() is None and not stop.wait(0.2):
            pass
        if proc.poll() is not None and not stop.is_set():
            raise BrokerError(f"mosquitto exited unexpectedly with code {proc.returncode} (see its log above)")
        return 0
    finally:
        _stop_process(proc, 10.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
