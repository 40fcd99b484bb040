"""Broker URLs: ``mqtt://[USER[:PASSWORD]@]HOST[:PORT]`` parsed once into a :class:`BrokerURL`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from urllib.parse import quote, unquote, urlsplit

from fedmqtt.mqtt.errors import InvalidBrokerURL

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883

_SCHEMES: dict[str, tuple[bool, int]] = {
    "mqtt": (False, DEFAULT_PORT),
    "tcp": (False, DEFAULT_PORT),
    "mqtts": (True, DEFAULT_TLS_PORT),
    "ssl": (True, DEFAULT_TLS_PORT),
}
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$")


@dataclass(frozen=True)
class BrokerURL:
    """Where a broker listens and how to log in. ``str()`` masks the password; ``to_url()`` can include it."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def tls(self) -> bool:
        return _SCHEMES[self.scheme][0]

    @property
    def endpoint(self) -> tuple[str, int, bool]:
        """(host, port, tls): which broker, whatever the credentials (the key of the protocol cache)."""
        return (self.host.lower(), self.port, self.tls)

    def with_credentials(self, username: str | None, password: str | None) -> BrokerURL:
        """The same broker with other credentials (None, None logs in anonymously)."""
        if password is not None and username is None:
            raise InvalidBrokerURL(str(self), "a password needs a username")
        return replace(self, username=username, password=password)

    def to_url(self, *, include_password: bool = False) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        userinfo = ""
        if self.username is not None:
            userinfo = quote(self.username, safe="")
            if self.password is not None:
                userinfo += ":" + (quote(self.password, safe="") if include_password else "***")
            userinfo += "@"
        return f"{self.scheme}://{userinfo}{host}:{self.port}"

    def __str__(self) -> str:
        return self.to_url(include_password=False)


def parse_broker_url(url: str) -> BrokerURL:
    """Parse ``mqtt://[USER[:PASSWORD]@]HOST[:PORT]`` (schemes mqtt/tcp: plain TCP, default port 1883;
    mqtts/ssl: TLS, default port 8883). USER and PASSWORD are percent-decoded. Raises :class:`InvalidBrokerURL`."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidBrokerURL(str(url), "the URL is empty")
    if url != url.strip() or any(ch.isspace() for ch in url):
        raise InvalidBrokerURL(url, "the URL contains white space")
    if "://" not in url:
        raise InvalidBrokerURL(url, "the scheme is missing")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise InvalidBrokerURL(url, str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise InvalidBrokerURL(url, f"unsupported scheme {parts.scheme!r}; use one of {sorted(_SCHEMES)}")
    if parts.path not in ("", "/"):
        raise InvalidBrokerURL(url, f"a broker URL has no path (got {parts.path!r})")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise InvalidBrokerURL(url, "a broker URL has no query or fragment")
    host = parts.hostname
    if not host:
        raise InvalidBrokerURL(url, "the host is missing")
    if not (_HOSTNAME_RE.match(host) or (":" in host and parts.netloc.rpartition("@")[2].startswith("["))):
        raise InvalidBrokerURL(url, f"{host!r} is not a host name or IP address")
    try:
        port = parts.port
    except ValueError:
        raise InvalidBrokerURL(url, "the port must be a number from 1 to 65535") from None
    if port is None:
        if parts.netloc.endswith(":"):
            raise InvalidBrokerURL(url, "the port is empty")
        port = _SCHEMES[scheme][1]
    if not 1 <= port <= 65535:
        raise InvalidBrokerURL(url, "the port must be a number from 1 to 65535")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if username == "" and password is not None:
        raise InvalidBrokerURL(url, "a password needs a username")
    if username == "":
        raise InvalidBrokerURL(url, "the username is empty")
    return BrokerURL(scheme=scheme, host=host, port=port, username=username, password=password)
