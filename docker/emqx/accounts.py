#!/usr/bin/env python3
"""The accounts step of docker-compose.yml's ``emqx`` profile: fedmqtt's accounts and ACL for an EMQX 5 cluster.

Run in a fedmqtt image before the EMQX nodes start (compose: ``service_completed_successfully``). It

* creates the password of every account that has none yet (``coordinator``, ``watcher``, each id in
  ``$FEDMQTT_DEVICES``, ``$FEDMQTT_AGGREGATOR_IDS`` and ``$FEDMQTT_SITE_IDS``: the bridge accounts of edge sites)
  in ``$FEDMQTT_SECRETS_DIR/NAME``, readable by its owner only, as docker/entrypoint.sh does for Mosquitto; an
  existing password is kept;
* writes ``$FEDMQTT_EMQX_AUTH_DIR/users.csv``: the bootstrap file of EMQX's built-in-database authenticator
  (``bootstrap_type = hash``: salted sha256, no password in clear), which EMQX imports when that authenticator is
  created, i.e. at the cluster's first start (docker/emqx/emqx.conf);
* writes ``$FEDMQTT_EMQX_AUTH_DIR/acl.conf``: EMQX's file authorizer, rendered from the rules of
  :mod:`fedmqtt.topics` (``coordinator_acl``, ``watcher_acl``, ``aggregator_acl``, ``site_acl``, ``device_acl``): the same
  grants as the Mosquitto ACL of ``fedmqtt broker --auth``, in EMQX's form.

How EMQX reads acl.conf: top to bottom, the first rule that matches the client and the topic decides, and
``authorization.no_match = deny`` (emqx.conf) refuses the rest. EMQX checks a SUBSCRIBE when it is made (a
``$share/GROUP/TOPIC`` subscription as TOPIC), not each delivery as Mosquitto does: a filter no rule grants is
refused as a whole (a watcher's ``PREFIX/JOB/#`` is, since it would cover the update frames). So each named
account's rules come first, denials before grants, and end in a deny of everything: the device rules at the end
(``${username}`` is the connecting account) apply to device accounts only.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from fedmqtt.atomic import PUBLIC, write_atomic
from fedmqtt.broker.accounts import COORDINATOR_USER, RESERVED_USERNAMES, WATCHER_USER, generate_password, write_private
from fedmqtt.errors import FedmqttError
from fedmqtt.topics import (
    DEFAULT_PREFIX,
    AclRule,
    aggregator_acl,
    coordinator_acl,
    device_acl,
    site_acl,
    validate_id,
    validate_prefix,
    watcher_acl,
)

USERS_FILE = "users.csv"
ACL_FILE = "acl.conf"
# Mosquitto's ACL words -> EMQX's actions.
_ACTIONS = {"read": "subscribe", "write": "publish", "readwrite": "all", "deny": "all"}


class AccountsError(Exception):
    """A setting of the accounts step is wrong; the message says which and how to fix it."""


def ids_of(text: str | None) -> list[str]:
    """Ids separated by spaces or commas (the FEDMQTT_DEVICES rule of docker/entrypoint.sh)."""
    return [part for part in (text or "").replace(",", " ").split() if part]


def _topic(pattern: str, username: str | None) -> str:
    """A topics.py pattern in EMQX's spelling: ``%u`` is the named account, or EMQX's ``${username}``."""
    return pattern.replace("%u", username if username is not None else "${username}")


def _rules(who: str, rules: Iterable[AclRule], username: str | None) -> list[str]:
    ordered = sorted(rules, key=lambda r: r.access != "deny")  # denials first: the first match decides
    return [
        f'{{{"deny" if r.access == "deny" else "allow"}, {who}, {_ACTIONS[r.access]}, ["{_topic(r.pattern, username)}"]}}.'
        for r in ordered
    ]


def render_emqx_acl(prefix: str = DEFAULT_PREFIX, aggregators: Sequence[str] = (), sites: Sequence[str] = ()) -> str:
    """acl.conf for EMQX's file authorizer (pure), from the rules of :mod:`fedmqtt.topics`."""
    validate_prefix(prefix)
    lines = [
        "%% fedmqtt ACL for EMQX, generated from fedmqtt.topics by docker/emqx/accounts.py (do not edit).",
        f"%% Topic prefix: {prefix}. First match decides; authorization.no_match = deny refuses the rest.",
        "",
        "%% The coordinator reads and writes everything under the prefix.",
    ]
    named = [(COORDINATOR_USER, coordinator_acl(prefix)), (WATCHER_USER, watcher_acl(prefix))]
    named += [(worker, aggregator_acl(prefix)) for worker in aggregators]
    named += [(site, site_acl(prefix)) for site in sites]
    for username, rules in named:
        if username == WATCHER_USER:
            lines += ["", "%% The watcher (fedmqtt watch) reads every topic of a job but the update frames."]
        elif username in aggregators:
            lines += ["", f"%% Aggregator worker {username}: the updates (shared subscription), writes its own topics."]
        elif username in sites:
            lines += ["", f"%% Edge site {username}: its bridge carries the job down and its devices' traffic up."]
        who = f'{{username, "{username}"}}'
        lines += _rules(who, rules, username)
        lines.append(f'{{deny, {who}, all, ["#"]}}.')
    lines += ["", "%% Devices (username == device id): their own update and status topics, the job's shared topics."]
    lines += _rules("all", device_acl(prefix), None)
    lines += ["", "{deny, all}."]
    return "\n".join(lines) + "\n"


def emqx_hash(password: str, salt: str) -> str:
    """EMQX's ``password_hash_algorithm {name = sha256, salt_position = suffix}``: hex sha256 of password + salt."""
    return hashlib.sha256((password + salt).encode("utf-8")).hexdigest()


def render_users(passwords: dict[str, str]) -> str:
    """users.csv for ``bootstrap_type = hash`` (a fresh salt per account on every run)."""
    rows = ["user_id,password_hash,salt,is_superuser"]
    for username, password in passwords.items():
        salt = secrets.token_hex(16)
        rows.append(f"{username},{emqx_hash(password, salt)},{salt},false")
    return "\n".join(rows) + "\n"


def accounts_of(devices: Sequence[str], aggregators: Sequence[str], sites: Sequence[str] = ()) -> list[str]:
    """Every account name, checked: valid ids, no reserved name, no id used twice."""
    names = [COORDINATOR_USER, WATCHER_USER]
    for kind, ids in (("device id", devices), ("aggregator id", aggregators), ("site name", sites)):
        for value in ids:
            validate_id(kind, value)
            if value in RESERVED_USERNAMES:
                raise AccountsError(f"{kind} {value!r} is the name of a fedmqtt account; choose another id")
            if value in names:
                raise AccountsError(
                    f"{kind} {value!r} is listed twice (FEDMQTT_DEVICES, FEDMQTT_AGGREGATOR_IDS, FEDMQTT_SITE_IDS)"
                )
            names.append(value)
    return names


def run(env: dict[str, str]) -> list[str]:
    """The accounts step; returns the accounts created this time."""
    missing = [name for name in ("FEDMQTT_SECRETS_DIR", "FEDMQTT_EMQX_AUTH_DIR") if not env.get(name)]
    if missing:
        raise AccountsError(f"set {' and '.join(missing)} (see docker-compose.yml, the emqx profile)")
    secrets_dir, auth_dir = Path(env["FEDMQTT_SECRETS_DIR"]), Path(env["FEDMQTT_EMQX_AUTH_DIR"])
    prefix = env.get("FEDMQTT_PREFIX") or DEFAULT_PREFIX
    devices, aggregators = ids_of(env.get("FEDMQTT_DEVICES")), ids_of(env.get("FEDMQTT_AGGREGATOR_IDS"))
    sites = ids_of(env.get("FEDMQTT_SITE_IDS"))
    names = accounts_of(devices, aggregators, sites)
    secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    auth_dir.mkdir(parents=True, exist_ok=True)
    created, passwords = [], {}
    for name in names:
        secret = secrets_dir / name
        text = secret.read_text(encoding="utf-8").splitlines()[0].strip() if secret.exists() else ""
        if not text:
            text = generate_password()
            write_private(secret, text + "\n")
            created.append(name)
        passwords[name] = text
    write_atomic(auth_dir / USERS_FILE, render_users(passwords).encode("utf-8"), mode=PUBLIC)
    write_atomic(auth_dir / ACL_FILE, render_emqx_acl(prefix, aggregators, sites).encode("utf-8"), mode=PUBLIC)
    return created


def main() -> int:
    try:
        created = run(dict(os.environ))
    except (AccountsError, FedmqttError) as exc:  # FedmqttError: an invalid id or prefix (InvalidIdentifier)
        print(f"emqx accounts: error: {exc}", file=sys.stderr)
        return 2
    for name in created:
        print(f"emqx accounts: account {name} created (password in {os.environ['FEDMQTT_SECRETS_DIR']}/{name})")
    print(f"emqx accounts: {USERS_FILE} and {ACL_FILE} written to {os.environ['FEDMQTT_EMQX_AUTH_DIR']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
