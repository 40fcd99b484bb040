"""How to reach a broker: the one place that owns the broker flags and turns them into :class:`ClientSettings`.

:class:`BrokerSettings` (pydantic) holds what a user says about the broker: ``--broker``, ``--username``,
``--password`` / ``--password-file`` / ``$FEDMQTT_PASSWORD``, ``--tls-ca``, the client certificate
``--tls-cert`` / ``--tls-key`` and ``--mqtt-version``. Every rule
about them is stated here once, as annotated field types (:data:`BrokerUrlField`, :data:`MqttVersionField`, ...)
that other settings models reuse, and checked when the model is built: before a model is loaded, a data set read
or a broker dialled. :func:`add_broker_flags` and :func:`broker_settings_from_args` are the argparse side of the
same fields (flag ``--tls-ca`` <-> field ``tls_ca``).

Passwords: ``--password`` and ``--password-file`` exclude each other; without either, a password in the URL
counts, then ``$FEDMQTT_PASSWORD``. The password is never serialised (``model_dump`` leaves it out, and the URL
is dumped without it), and :meth:`BrokerSettings.child_args` / :meth:`BrokerSettings.child_env` hand it to a
child process through its environment, never its argv.
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)

from fedmqtt.errors import ConfigError
from fedmqtt.mqtt.errors import InvalidBrokerURL, MqttError, TlsError
from fedmqtt.mqtt.topic_names import validate_topic_name
from fedmqtt.mqtt.url import BrokerURL, parse_broker_url
from fedmqtt.paths import input_file_problem

ProtocolName = Literal["5", "3.1.1", "auto"]

#: The environment variable a password is read from when no flag gives one (and how simulate passes it on).
PASSWORD_ENV = "FEDMQTT_PASSWORD"
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


# --- CA files ------------------------------------------------------------------------------------------------------


def tls_ca_problem(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with a CA certificate file (worded to follow its path), or None when it loads."""
    problem = input_file_problem(path)
    if problem is not None:
        return problem
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=os.fspath(path))
    except ssl.SSLError as exc:
        with open(path, "rb") as fh:
            pem = b"-----BEGIN CERTIFICATE-----" in fh.read(1 << 20)
        if not pem:
            return (
                "is not a PEM certificate (no -----BEGIN CERTIFICATE----- block; a DER file converts with "
                "`openssl x509 -inform der -in FILE -out ca.pem`)"
            )
        return f"holds no certificate that can be loaded ({exc.reason or exc})"
    except (OSError, ValueError) as exc:
        return f"cannot be read ({exc})"
    return None


def tls_cert_problem(cert: str | os.PathLike[str], key: str | os.PathLike[str] | None) -> str | None:
    """What is wrong with a client certificate and its private key (worded to follow the certificate's path),
    or None when the pair loads. ``key`` None: the certificate file holds the key too. A missing or unreadable
    key file is the key's own problem: check it first with :func:`fedmqtt.paths.input_file_problem`."""
    problem = input_file_problem(cert)
    if problem is not None:
        return problem
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
            os.fspath(cert), None if key is None else os.fspath(key), password=_no_key_password
        )
    except ssl.SSLError as exc:
        where = "and its key" if key is None else f"and {key}"
        return (
            f"{where} are not a PEM certificate and its unencrypted private key ({exc.reason or exc}; "
            "`openssl x509 -in FILE -noout -subject` and `openssl pkey -in KEY -noout` show what they hold)"
        )
    except (OSError, ValueError) as exc:
        return f"cannot be read ({exc})"
    return None


def _no_key_password() -> str:
    # An encrypted key would make OpenSSL ask on the terminal; a service has none, so it is refused instead.
    raise ValueError("the private key is encrypted; fedmqtt needs an unencrypted key (protect it by file mode)")


def check_tls_ca(path: str | os.PathLike[str] | None) -> None:
    """Raise :class:`TlsError` naming ``--tls-ca`` and the file unless it is a loadable CA certificate."""
    if path is not None and (problem := tls_ca_problem(path)) is not None:
        raise TlsError(f"--tls-ca: {path} {problem}")


def read_password_file(path: str | os.PathLike[str]) -> str:
    """The password in ``path``: its first line, without the line break. Raises ValueError worded to follow
    the path."""
    problem = input_file_problem(path)
    if problem is not None:
        raise ValueError(f"{path} {problem}")
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path} cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    password = text.split("\n", 1)[0].removesuffix("\r")
    if not password:
        raise ValueError(f"{path} is empty (write the password on its first line)")
    return password


# --- what one client connection needs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Will:
    """The last will: published by the broker if the client vanishes without a normal DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class ClientSettings:
    """How one client connects. ``broker`` is a parsed :class:`BrokerURL` and carries the credentials
    (:meth:`BrokerSettings.client_settings` builds it from the flags; :meth:`from_url` from a URL string).

    ``protocol``: "5", "3.1.1", or "auto" (MQTT 5, falling back to 3.1.1 when the broker answers "unsupported
    protocol version", as the embedded amqtt broker does; the answer is remembered per process and broker). With
    ``clean_start=False`` the session (subscriptions and QoS 1 messages queued while offline) survives a
    disconnect for ``session_expiry`` seconds on MQTT 5; on 3.1.1 this is ``clean_session=False`` and the broker
    decides how long it keeps the session. ``max_packet_size`` caps outgoing packets (the broker's own limit from
    CONNACK applies too, when it sends one); ``max_message_bytes`` drops (and counts) incoming payloads above it.
    """

    broker: BrokerURL
    client_id: str
    protocol: ProtocolName = "auto"
    clean_start: bool = False
    session_expiry: int = 3600
    keepalive: int = 30
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    reconnect_min_delay: float = 1.0
    reconnect_max_delay: float = 30.0
    will: Will | None = None
    max_inflight: int = 20
    max_packet_size: int | None = None
    max_message_bytes: int | None = None

    @classmethod
    def from_url(cls, url: str, client_id: str, **options: Any) -> ClientSettings:
        """Settings for ``url`` (``mqtt://[USER[:PASSWORD]@]HOST[:PORT]``), parsed here once."""
        return cls(parse_broker_url(url), client_id, **options)

    def __post_init__(self) -> None:
        if not isinstance(self.broker, BrokerURL):
            raise MqttError(
                f"ClientSettings.broker must be a parsed BrokerURL, got {type(self.broker).__name__}; "
                "use ClientSettings.from_url(url, client_id) or parse_broker_url(url)"
            )
        if self.tls_ca is not None:
            object.__setattr__(self, "tls_ca", os.fspath(self.tls_ca))
        check_tls_ca(self.tls_ca)
        if self.tls_ca is not None and not self.broker.tls:
            raise TlsError(f"--tls-ca: a CA file was given but {self.broker} is not a TLS URL; use mqtts://")
        for name in ("tls_cert", "tls_key"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        if self.tls_key is not None and self.tls_cert is None:
            raise TlsError(f"--tls-key: {self.tls_key} is a key without its certificate: give --tls-cert too")
        if self.tls_cert is not None:
            if not self.broker.tls:
                raise TlsError(f"--tls-cert: a client certificate was given but {self.broker} is not a TLS URL")
            if self.tls_key is not None and (problem := input_file_problem(self.tls_key)) is not None:
                raise TlsError(f"--tls-key: {self.tls_key} {problem}")
            if (problem := tls_cert_problem(self.tls_cert, self.tls_key)) is not None:
                raise TlsError(f"--tls-cert: {self.tls_cert} {problem}")
        if not isinstance(self.client_id, str) or not self.client_id or len(self.client_id.encode()) > 65535:
            raise MqttError(f"invalid client id {self.client_id!r}: give every client a stable, non-empty id")
        if self.protocol not in ("5", "3.1.1", "auto"):
            raise MqttError(f"invalid MQTT protocol {self.protocol!r}: use '5', '3.1.1' or 'auto'")
        if self.session_expiry < 0 or self.session_expiry > 0xFFFFFFFF:
            raise MqttError("session_expiry must be from 0 to 4294967295 seconds")
        if not 0 < self.keepalive <= 65535:
            raise MqttError("keepalive must be from 1 to 65535 seconds")
        if not 0 < self.reconnect_min_delay <= self.reconnect_max_delay:
            raise MqttError("reconnect delays must satisfy 0 < reconnect_min_delay <= reconnect_max_delay")
        if self.max_inflight < 1:
            raise MqttError("max_inflight must be >= 1")
        for name in ("max_packet_size", "max_message_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise MqttError(f"{name} must be a positive number of bytes")
        if self.will is not None:
            validate_topic_name(self.will.topic)
            if self.will.qos not in (0, 1, 2):
                raise MqttError("the will's QoS must be 0, 1 or 2")


# --- the broker settings' field types (reuse these; never restate the rules) -----------------------------------------


def _to_broker_url(value: object) -> BrokerURL:
    if isinstance(value, BrokerURL):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a URL string like {DEFAULT_BROKER}, got {type(value).__name__}")
    try:
        return parse_broker_url(value)
    except InvalidBrokerURL as exc:
        raise ValueError(str(exc)) from None


def _dump_broker_url(url: BrokerURL) -> str:
    # Never the password: a dumped configuration (a run directory's config file, a log) must not hold it.
    return url.with_credentials(url.username, None).to_url()


def _usable_tls_ca(path: Path | None) -> Path | None:
    if path is not None and (problem := tls_ca_problem(path)) is not None:
        raise ValueError(f"{path} {problem}")
    return path


def _non_empty(value: str | None) -> str | None:
    if value is not None and not value:
        raise ValueError("must not be empty")
    return value


BrokerUrlField = Annotated[
    BrokerURL,
    PlainValidator(_to_broker_url),
    PlainSerializer(_dump_broker_url, return_type=str),
    WithJsonSchema({"type": "string", "format": "uri"}),
    Field(description="broker URL: mqtt://[USER[:PASSWORD]@]HOST[:PORT], or mqtts://... for TLS"),
]
UsernameField = Annotated[
    str | None,
    AfterValidator(_non_empty),
    Field(description="broker user name (overrides the URL's)"),
]
PasswordField = Annotated[
    SecretStr | None,
    Field(
        exclude=True,
        description=f"broker password (visible to other users in the process list: prefer --password-file or "
        f"${PASSWORD_ENV})",
    ),
]
PasswordFileField = Annotated[
    Path | None,
    Field(description="file whose first line is the broker password (read once at start)"),
]
TlsCaField = Annotated[
    Path | None,
    AfterValidator(_usable_tls_ca),
    Field(description="CA certificate (PEM) for an mqtts:// broker (default: the system CAs)"),
]
TlsCertField = Annotated[
    Path | None,
    Field(
        description="client certificate (PEM) for a broker that requires one (fedmqtt broker --client-certs); "
        "with --tls-key, or a file holding the key too"
    ),
]
TlsKeyField = Annotated[
    Path | None,
    Field(description="private key (PEM, unencrypted) of --tls-cert; keep it readable by its owner only"),
]
MqttVersionField = Annotated[
    ProtocolName,
    Field(description="MQTT protocol: auto tries 5 and falls back to 3.1.1 (the embedded broker), once per broker"),
]

#: Flag of each field, in the order ``--help`` lists them.
BROKER_FLAGS: dict[str, str] = {
    "broker": "--broker",
    "username": "--username",
    "password": "--password",
    "password_file": "--password-file",
    "tls_ca": "--tls-ca",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "mqtt_version": "--mqtt-version",
}


class BrokerSettings(BaseModel):
    """Where the broker is and how to log in, validated once (see the module docstring for the password rules).

    A settings model that needs a broker inherits these fields and checks (``class CoordinatorConfig(
    BrokerSettings)``) or reuses the annotated field types. Pass ``context={"env": {...}}`` to
    ``model_validate`` to read ``$FEDMQTT_PASSWORD`` from another mapping than ``os.environ``.
    """

    # hide_input_in_errors: a ValidationError printed whole must not show a password.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    broker: BrokerUrlField = parse_broker_url(DEFAULT_BROKER)
    username: UsernameField = None
    password: PasswordField = None
    password_file: PasswordFileField = None
    tls_ca: TlsCaField = None
    tls_cert: TlsCertField = None
    tls_key: TlsKeyField = None
    mqtt_version: MqttVersionField = "auto"

    _url: BrokerURL = PrivateAttr()

    @model_validator(mode="after")
    def _resolve_credentials(self, info: ValidationInfo) -> BrokerSettings:
        if self.password is not None and self.password_file is not None:
            raise ValueError("password_file: give --password or --password-file, not both")
        if self.tls_ca is not None and not self.broker.tls:
            raise ValueError(f"tls_ca: a CA file was given but {self.broker} is not a TLS URL; use mqtts://")
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError(f"tls_key: {self.tls_key} is a key without its certificate: give --tls-cert too")
        if self.tls_cert is not None:
            if not self.broker.tls:
                raise ValueError(f"tls_cert: a client certificate was given but {self.broker} is not a TLS URL; "
                                 "use mqtts://")  # fmt: skip
            if self.tls_key is not None and (problem := input_file_problem(self.tls_key)) is not None:
                raise ValueError(f"tls_key: {self.tls_key} {problem}")
            if (problem := tls_cert_problem(self.tls_cert, self.tls_key)) is not None:
                raise ValueError(f"tls_cert: {self.tls_cert} {problem}")
        explicit: str | None = None
        if self.password is not None:
            explicit = self.password.get_secret_value()
        elif self.password_file is not None:
            try:
                explicit = read_password_file(self.password_file)
            except ValueError as exc:
                raise ValueError(f"password_file: {exc}") from None
        username = self.username if self.username is not None else self.broker.username
        if explicit is not None and username is None:
            raise ValueError("username: a password needs a user name (--username, or mqtt://USER@HOST)")
        password = explicit if explicit is not None else self.broker.password
        if password is None and username is not None:
            context = info.context if isinstance(info.context, Mapping) else {}
            env = context.get("env", os.environ)
            password = env.get(PASSWORD_ENV) or None
        self._url = self.broker.with_credentials(username, password)
        return self

    def with_broker(self, url: BrokerURL | str) -> BrokerSettings:
        """The same credentials, CA file and protocol for another broker address (credentials in ``url`` win)."""
        broker = url if isinstance(url, BrokerURL) else parse_broker_url(url)
        moved = self.model_copy(update={"broker": broker})
        username = broker.username if broker.username is not None else self._url.username
        password = broker.password if broker.password is not None else self._url.password
        moved._url = broker.with_credentials(username, password if username is not None else None)
        return moved

    @property
    def url(self) -> BrokerURL:
        """The broker with the credentials in force (user name and password, from whichever source)."""
        return self._url

    def client_settings(
        self,
        client_id: str,
        *,
        will: Will | None = None,
        clean_start: bool = False,
        session_expiry: int = 3600,
        **options: Any,
    ) -> ClientSettings:
        """:class:`ClientSettings` for one connection to this broker (``options``: keepalive, reconnect delays,
        max_packet_size, ... as :class:`ClientSettings` names them)."""
        return ClientSettings(
            self._url,
            client_id,
            protocol=self.mqtt_version,
            clean_start=clean_start,
            session_expiry=session_expiry,
            tls_ca=None if self.tls_ca is None else os.fspath(self.tls_ca),
            tls_cert=None if self.tls_cert is None else os.fspath(self.tls_cert),
            tls_key=None if self.tls_key is None else os.fspath(self.tls_key),
            will=will,
            **options,
        )

    def child_args(self) -> list[str]:
        """Broker flags for a child ``fedmqtt`` process: never the password (see :meth:`child_env`)."""
        url = self._url
        args = ["--broker", url.with_credentials(None, None).to_url(), "--mqtt-version", self.mqtt_version]
        if url.username is not None:
            args += ["--username", url.username]
        for flag, path in (("--tls-ca", self.tls_ca), ("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            if path is not None:
                args += [flag, os.fspath(path)]
        return args

    def child_env(self) -> dict[str, str]:
        """Environment entries for a child process: the password, if any, as ``$FEDMQTT_PASSWORD``."""
        return {} if self._url.password is None else {PASSWORD_ENV: self._url.password}


# --- argparse ------------------------------------------------------------------------------------------------------


def add_broker_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    broker_required: bool = False,
    broker_help: str | None = None,
    client_certificate: bool = True,
) -> None:
    """Add ``--broker --username --password --password-file --tls-ca --tls-cert --tls-key --mqtt-version``. Every default is None
    ("not given"), so that a settings file or a model default can fill it; the help shows the real default.
    ``broker_help`` replaces the help of ``--broker`` (a command that starts its own broker without it).
    ``client_certificate=False`` leaves out ``--tls-cert/--tls-key`` (a command that runs many clients, each of
    which would need its own certificate)."""
    fields = BrokerSettings.model_fields

    def help_of(name: str, default: str | None = None) -> str:
        text = str(fields[name].description)
        return f"{text} (default: {default})" if default else text

    if broker_required:
        parser.add_argument("--broker", required=True, help=help_of("broker") + " (required)")
    elif broker_help is not None:
        parser.add_argument("--broker", help=broker_help)
    else:
        parser.add_argument("--broker", help=help_of("broker", DEFAULT_BROKER))
    parser.add_argument("--username", help=help_of("username"))
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument("--password", help=help_of("password"))
    secret.add_argument("--password-file", type=Path, metavar="FILE", help=help_of("password_file"))
    parser.add_argument("--tls-ca", type=Path, metavar="FILE", help=help_of("tls_ca"))
    if client_certificate:
        parser.add_argument("--tls-cert", type=Path, metavar="FILE", help=help_of("tls_cert"))
        parser.add_argument("--tls-key", type=Path, metavar="FILE", help=help_of("tls_key"))
    parser.add_argument("--mqtt-version", choices=("auto", "5", "3.1.1"), help=help_of("mqtt_version", "auto"))


def broker_settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> BrokerSettings:
    """Validate the broker flags of ``args`` (not given = the default). Raises :class:`ConfigError` naming the
    flag(s), before any network or heavy work."""
    data = {name: getattr(args, name) for name in BROKER_FLAGS if getattr(args, name, None) is not None}
    try:
        return BrokerSettings.model_validate(data, context={"env": os.environ if env is None else env})
    except ValidationError as exc:
        raise config_error(exc) from None


def config_error(exc: ValidationError) -> ConfigError:
    """One :class:`ConfigError` for every problem a validation found, each named by its flag."""
    problems: list[tuple[str, str]] = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error.get("loc", ()))
        message = str(error["msg"]).removeprefix("Value error, ")
        if not field and ": " in message:  # a check across fields names the field it blames
            field, message = message.split(": ", 1)
        problems.append((BROKER_FLAGS.get(field, "--" + field.replace("_", "-")), message))
    flag, message = problems[0]
    for other_flag, other in problems[1:]:
        message += f"; {other_flag}: {other}"
    return ConfigError(flag, message)
