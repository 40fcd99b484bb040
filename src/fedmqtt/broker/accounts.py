"""Mosquitto accounts and the ACL file, generated from the topic map (:mod:`fedmqtt.topics`).

Accounts live in a Mosquitto password file made with the ``mosquitto_passwd`` binary (hashed; fedmqtt stores no
password in clear). A device's username is its device id, so the ACL's ``pattern`` lines (``%u``) give every
device exactly its own update and status topics, and nothing of other devices. The coordinator and the watcher
are named accounts. With auth on, the broker also makes every client id equal to the username
(``use_username_as_clientid``, in :mod:`fedmqtt.broker.mosquitto`), so an account cannot take over another
account's connection or persistent session.

How Mosquitto (2.0) reads this file, for one publish or delivery checked against one account: first the
account's own ``topic`` lines (``deny`` lines before all others; the first line that matches and grants the
access decides), then the ``pattern`` lines, which apply to *every* account; no match means denied. So the
watcher's ``topic deny`` lines take back what the device patterns would give it (write access to
``PREFIX/+/updates/watcher`` and ``PREFIX/+/devices/watcher/status``) and keep every update frame from it, and
device ids equal to an account name are refused.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from fedmqtt.atomic import PRIVATE, write_atomic
from fedmqtt.broker.errors import AccountError, MissingTool
from fedmqtt.errors import InvalidIdentifier
from fedmqtt.topics import (
    AclRule,
    aggregator_acl,
    coordinator_acl,
    device_acl,
    site_acl,
    validate_id,
    validate_prefix,
    watcher_acl,
)

COORDINATOR_USER = "coordinator"
WATCHER_USER = "watcher"
RESERVED_USERNAMES = frozenset({COORDINATOR_USER, WATCHER_USER})

AccountKind = Literal["device", "coordinator", "watcher", "site", "aggregator"]
# The accounts named by an id, and what the id is called in messages.
_ID_KINDS = {"device": "device id", "site": "site name", "aggregator": "aggregator id"}

_INSTALL_HINT = (
    "install Mosquitto (Debian/Ubuntu: apt install mosquitto mosquitto-clients; macOS: brew install mosquitto)"
)


def _acl_line(keyword: str, rule: AclRule) -> str:
    allowed = ("read", "write", "readwrite", "deny") if keyword == "topic" else ("read", "write", "readwrite")
    if rule.access not in allowed:
        raise AccountError(f"ACL access {rule.access!r} cannot be used on a {keyword!r} line (from the topic map)")
    return f"{keyword} {rule.access} {rule.pattern}"


def render_acl(
    prefix: str,
    *,
    coordinator_user: str = COORDINATOR_USER,
    watcher_user: str = WATCHER_USER,
    sites: Iterable[str] = (),
    aggregators: Iterable[str] = (),
) -> str:
    """The Mosquitto ACL file text for one topic prefix (pure). ``sites``: the site accounts (edge sites'
    bridges, ``fedmqtt broker add-site NAME``), each with its own block; ``aggregators``: the aggregator
    workers' accounts (``fedmqtt broker add-aggregator ID``), likewise."""
    validate_prefix(prefix)
    lines = [
        "# fedmqtt ACL, generated from fedmqtt.topics; regenerated when the broker starts (do not edit).",
        f"{_PREFIX_LINE}{prefix}",
        "",
        "# Devices: username == device id (== client id). Each writes only its own update and status topics,",
        "# reads the job's shared topics, and neither reads nor writes other devices' topics.",
    ]
    lines += [_acl_line("pattern", rule) for rule in device_acl(prefix)]
    lines += ["", "# The coordinator reads and writes everything under the prefix.", f"user {coordinator_user}"]
    lines += [_acl_line("topic", rule) for rule in coordinator_acl(prefix)]
    lines += [
        "",
        "# A read-only watcher (fedmqtt watch): every topic of a job except the devices' update frames.",
        f"user {watcher_user}",
    ]
    lines += [_acl_line("topic", rule) for rule in watcher_acl(prefix)]
    lines.append("# The device patterns above apply to this account too: take their write access back.")
    for rule in device_acl(prefix):
        if rule.access in ("write", "readwrite"):
            lines.append(_acl_line("topic", AclRule("deny", rule.pattern.replace("%u", watcher_user))))
    for site in sites:
        lines += ["", f"# The bridge of the edge site {site} (docs/edge-sites.md).", f"user {site}"]
        lines += [
            _acl_line("topic", AclRule(rule.access, rule.pattern.replace("%u", site))) for rule in site_acl(prefix)
        ]
    for worker in aggregators:
        lines += ["", f"# The aggregator worker {worker} (fedmqtt aggregator --id {worker}).", f"user {worker}"]
        lines += [
            _acl_line("topic", AclRule(r.access, r.pattern.replace("%u", worker))) for r in aggregator_acl(prefix)
        ]
        lines.append("# The device patterns above apply to this account too: take their write access back.")
        for rule in device_acl(prefix):
            if rule.access in ("write", "readwrite"):
                lines.append(_acl_line("topic", AclRule("deny", rule.pattern.replace("%u", worker))))
    return "\n".join(lines) + "\n"


def acl_prefix(acl_text: str) -> str | None:
    """The topic prefix a generated ACL file covers (its ``# Topic prefix:`` line), or None."""
    for line in acl_text.splitlines():
        if line.startswith(_PREFIX_LINE):
            return line[len(_PREFIX_LINE) :].strip() or None
    return None


def read_names(listed_file: Path) -> list[str]:
    """The accounts of one kind (sites, aggregators) listed in ``listed_file`` (one name a line; missing: none)."""
    if not listed_file.exists():
        return []
    return [line.strip() for line in listed_file.read_text().splitlines() if line.strip()]


def add_name(listed_file: Path, name: str) -> None:
    """Add ``name`` to a list of accounts of one kind (the ACL gives each its own block)."""
    names = read_names(listed_file)
    if name not in names:
        write_private(listed_file, "".join(f"{n}\n" for n in [*names, name]))


_PREFIX_LINE = "# Topic prefix: "


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (Mosquitto 2 warns about, and later refuses, readable secrets),
    atomically: a Mosquitto reloading its configuration never reads half a file."""
    write_atomic(path, text.encode("utf-8"), mode=PRIVATE)


def generate_password() -> str:
    return secrets.token_urlsafe(18)


def mosquitto_passwd_binary() -> str:
    found = shutil.which("mosquitto_passwd")
    if found is None:
        raise MissingTool("mosquitto_passwd", f"it creates broker accounts; {_INSTALL_HINT}")
    return found


def username_for(kind: AccountKind, device_id: str | None = None) -> str:
    if kind == "coordinator":
        return COORDINATOR_USER
    if kind == "watcher":
        return WATCHER_USER
    what = _ID_KINDS[kind]
    if device_id is None:
        raise AccountError(f"a {kind} account needs a {what}")
    try:
        validate_id(what, device_id)
    except InvalidIdentifier as exc:
        raise AccountError(str(exc)) from exc
    if device_id in RESERVED_USERNAMES:
        raise AccountError(
            f"{device_id!r} is the name of the {device_id} account and cannot be a {what}; choose another"
        )
    return device_id


def add_account(password_file: Path, username: str, password: str | None = None) -> str:
    """Create or update ``username`` in the Mosquitto password file; return the password (generated if None)."""
    if password is None:
        password = generate_password()
    if not password or any(ch in password for ch in "\r\n\x00"):
        raise AccountError("a password must be non-empty and must not contain line breaks or NUL characters")
    binary = mosquitto_passwd_binary()
    password_file.parent.mkdir(parents=True, exist_ok=True)
    create = [] if password_file.exists() and password_file.stat().st_size > 0 else ["-c"]
    result = subprocess.run(
        [binary, *create, "-b", str(password_file), username, password],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise AccountError(f"mosquitto_passwd could not add {username!r} to {password_file}: {detail}")
    os.chmod(password_file, 0o600)
    return password


def list_accounts(password_file: Path) -> list[str]:
    """The usernames in a Mosquitto password file (``user:hash`` lines)."""
    if not password_file.exists():
        return []
    names = []
    for line in password_file.read_text().splitlines():
        if line and not line.startswith("#") and ":" in line:
            names.append(line.split(":", 1)[0])
    return names
