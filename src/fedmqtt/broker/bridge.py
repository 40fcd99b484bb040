"""Edge sites: the Mosquitto bridge from a site's broker (on its gateway) to the cloud broker (pure).

``fedmqtt broker --mosquitto --bridge-to URL --site NAME --job J`` adds one bridge section to the generated
mosquitto.conf. The bridge carries one job's topics, chosen by :func:`fedmqtt.topics.bridge_topics`: the plan,
models, coordinator presence and collect requests down to the site; the devices' presence and the aggregators'
progress and partial aggregates (and, without a site aggregator, the devices' updates) up to the cloud. Every topic
goes one way only, at QoS 1, and retained messages stay retained on the other side (Mosquitto's bridge marks
itself to a Mosquitto cloud broker, ``try_private``, which then keeps the retain flag as published).

The bridge keeps a persistent session on the cloud broker (``cleansession false``): while the WAN is down, the
cloud broker queues the QoS 1 messages for the site and the site broker queues those for the cloud (up to
``max_queued_messages`` / ``max_queued_bytes``), and both are delivered when the bridge reconnects. Its
connection state is published retained on ``PREFIX/JOB/sites/SITE/bridge`` (``1`` connected, ``0`` its last will),
on both brokers.

The password is written into mosquitto.conf, which is readable by its owner only (the password never appears on
a command line). :class:`BridgeConfig` only renders text and checks files; :class:`~fedmqtt.broker.mosquitto.
MosquittoConfig` writes it.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from fedmqtt.broker.errors import BridgeError
from fedmqtt.errors import InvalidIdentifier
from fedmqtt.mqtt.errors import InvalidBrokerURL
from fedmqtt.mqtt.settings import tls_ca_problem, tls_cert_problem
from fedmqtt.mqtt.url import BrokerURL, parse_broker_url
from fedmqtt.paths import input_file_problem
from fedmqtt.topics import BRIDGE_DOWN, BRIDGE_UP, DEFAULT_PREFIX, Topics, bridge_topics, validate_id, validate_prefix

#: Mosquitto's word for each direction, seen from the site (local) broker.
_MOSQUITTO_DIRECTION = {BRIDGE_DOWN: "in", BRIDGE_UP: "out"}
_QOS = 1
CONNECTION_PREFIX = "fedmqtt-"


def system_ca_file() -> Path | None:
    """The system's bundle of public CA certificates (for a cloud broker with a publicly issued certificate)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            return Path(candidate)
    return None


def _no_white_space(flag: str, what: str, value: str) -> None:
    if any(ch.isspace() or ord(ch) < 32 for ch in value):
        raise BridgeError(flag, f"the {what} contains white space or control characters, which mosquitto.conf "
                                "cannot hold; choose another")  # fmt: skip


@dataclass(frozen=True)
class BridgeConfig:
    """One site's bridge to the cloud broker for one job. Build it with :meth:`create` (checks every value)."""

    cloud: BrokerURL
    site: str
    job: str
    prefix: str = DEFAULT_PREFIX
    site_aggregator: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    keepalive: int = 30
    restart_timeout: tuple[int, int] = (2, 30)  # reconnect backoff: jitter from base to cap, seconds

    @classmethod
    def create(
        cls,
        url: str,
        *,
        site: str,
        job: str,
        prefix: str = DEFAULT_PREFIX,
        site_aggregator: bool = False,
        username: str | None = None,
        password: str | None = None,
        cafile: Path | None = None,
        certfile: Path | None = None,
        keyfile: Path | None = None,
    ) -> BridgeConfig:
        """Check the flags' values and return the bridge; raise :class:`BridgeError` naming the flag to fix."""
        try:
            cloud = parse_broker_url(url)
        except InvalidBrokerURL as exc:
            raise BridgeError("--bridge-to", str(exc)) from None
        if cloud.password is not None:
            raise BridgeError("--bridge-to", "put no password in the URL (it would show in the process list); "
                                             "use --bridge-password-file")  # fmt: skip
        for flag, kind, value in (("--site", "site name", site), ("--job", "job id", job)):
            try:
                validate_id(kind, value)
            except InvalidIdentifier as exc:
                raise BridgeError(flag, str(exc)) from None
        try:
            validate_prefix(prefix)
        except InvalidIdentifier as exc:
            raise BridgeError("--prefix", str(exc)) from None
        if username is not None and cloud.username is not None and username != cloud.username:
            raise BridgeError("--bridge-username", f"the URL already names the user {cloud.username!r}; give one")
        username = username if username is not None else cloud.username
        if username is not None:
            if not username:
                raise BridgeError("--bridge-username", "the user name is empty")
            _no_white_space("--bridge-username", "user name", username)
        if password is not None:
            if username is None:
                raise BridgeError("--bridge-password-file", "a password needs a user name: add --bridge-username")
            _no_white_space("--bridge-password-file", "password", password)
        if cloud.tls and cafile is None:
            cafile = system_ca_file()  # a cloud broker with a publicly issued certificate
        bridge = cls(
            cloud=cloud.with_credentials(None, None),
            site=site,
            job=job,
            prefix=prefix,
            site_aggregator=site_aggregator,
            username=username,
            password=password,
            cafile=None if cafile is None else Path(cafile).absolute(),
            certfile=None if certfile is None else Path(certfile).absolute(),
            keyfile=None if keyfile is None else Path(keyfile).absolute(),
        )
        bridge._check_tls_flags()
        return bridge

    def _check_tls_flags(self) -> None:
        given = [flag for flag, value in (("--bridge-cafile", self.cafile), ("--bridge-certfile", self.certfile),
                                          ("--bridge-keyfile", self.keyfile)) if value is not None]  # fmt: skip
        if not self.cloud.tls and given:
            raise BridgeError(given[0], f"TLS files need a TLS cloud URL: use mqtts:// in --bridge-to ({self.cloud})")
        if self.cloud.tls and self.cafile is None:
            raise BridgeError("--bridge-cafile", f"{self.cloud} is a TLS URL and this system has no CA bundle: give "
                                                 "the CA certificate that signed the cloud broker's certificate")  # fmt: skip
        if (self.certfile is None) != (self.keyfile is None):
            raise BridgeError("--bridge-certfile" if self.keyfile is None else "--bridge-keyfile",
                              "a client certificate needs its key: give --bridge-certfile and --bridge-keyfile")  # fmt: skip
        for flag, path in (("--bridge-cafile", self.cafile), ("--bridge-certfile", self.certfile),
                           ("--bridge-keyfile", self.keyfile)):  # fmt: skip
            if path is not None:
                _no_white_space(flag, "path", str(path))

    def check_files(self) -> None:
        """Raise :class:`BridgeError` unless the TLS files exist and load (Mosquitto would only log it and
        never connect)."""
        if self.cafile is not None and (problem := tls_ca_problem(self.cafile)) is not None:
            raise BridgeError("--bridge-cafile", f"{self.cafile} {problem}")
        if self.keyfile is not None and (problem := input_file_problem(self.keyfile)) is not None:
            raise BridgeError("--bridge-keyfile", f"{self.keyfile} {problem}")
        if self.certfile is not None and (problem := tls_cert_problem(self.certfile, self.keyfile)) is not None:
            raise BridgeError("--bridge-certfile", f"{self.certfile} {problem}")

    # -- what mosquitto.conf says --

    @property
    def connection_name(self) -> str:
        """The bridge's name, and its client id on the cloud broker (``use_username_as_clientid`` there
        replaces it with the user name)."""
        return f"{CONNECTION_PREFIX}{self.site}"

    @property
    def topics(self) -> tuple[tuple[str, str], ...]:
        return bridge_topics(self.prefix, self.job, site_aggregator=self.site_aggregator)

    @property
    def state_topic(self) -> str:
        return Topics(job=self.job, prefix=self.prefix).site_bridge(self.site)

    def render(self) -> list[str]:
        """The bridge section of mosquitto.conf (it must come last: every line after ``connection`` belongs to
        the bridge)."""
        carried = "partial aggregates" if self.site_aggregator else "updates"
        lines = [
            f"# Bridge of site {self.site} to the cloud broker {self.cloud}, job {self.job}: the plan and models",
            f"# come down, the devices' presence and the site's {carried} go up (docs/edge-sites.md).",
            f"connection {self.connection_name}",
            f"address {self.cloud.host}:{self.cloud.port}",
            "bridge_protocol_version mqttv50",
            "# A persistent session on the cloud broker: QoS 1 messages wait there while the WAN is down.",
            "cleansession false",
            "local_cleansession false",
            f"remote_clientid {self.connection_name}",
            f"local_clientid {self.connection_name}-local",
            "# try_private: the cloud Mosquitto knows this is a bridge and keeps retained messages retained.",
            "try_private true",
            "start_type automatic",
            f"restart_timeout {self.restart_timeout[0]} {self.restart_timeout[1]}",
            f"keepalive_interval {self.keepalive}",
            "notifications true",
            f"notification_topic {self.state_topic}",
        ]
        if self.username is not None:
            lines.append(f"remote_username {self.username}")
        if self.password is not None:
            lines.append(f"remote_password {self.password}")
        if self.cloud.tls:
            lines += [f"bridge_cafile {self.cafile}", "bridge_tls_version tlsv1.2"]
            if self.certfile is not None:
                lines += [f"bridge_certfile {self.certfile}", f"bridge_keyfile {self.keyfile}"]
        for direction, topic in self.topics:
            lines.append(f"topic {topic} {_MOSQUITTO_DIRECTION[direction]} {_QOS}")
        return lines
