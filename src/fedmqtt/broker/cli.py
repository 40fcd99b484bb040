"""``fedmqtt broker``: run a broker in the foreground, and manage Mosquitto accounts and test certificates.

fedmqtt broker [--embedded | --mosquitto] [--config-dir DIR] [--host H] [--port P] [--tls] [--auth]
               [--client-certs [--cafile CA]] [--max-packet-mb N] [--max-queued-messages N --max-queued-mb MB]
               [--prefix fedmqtt]
               [--bridge-to URL --site NAME --job J [--site-aggregator] [--bridge-username U]
                [--bridge-password-file F] [--bridge-cafile CA] [--bridge-certfile C --bridge-keyfile K]]
fedmqtt broker add-device ID [--password P | --password-file F]   (also add-coordinator, add-watcher, add-site NAME, add-aggregator ID)
fedmqtt broker gen-certs [--host NAME ...] [--force]
fedmqtt broker gen-certs --device ID [--device ID2 ...] [--coordinator] [--watcher] [--force]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from fedmqtt.errors import ConfigError
from fedmqtt.mqtt import DEFAULT_MAX_PACKET_SIZE
from fedmqtt.paths import require_input_file, require_output_dir
from fedmqtt.settings import MB
from fedmqtt.topics import DEFAULT_PREFIX

if TYPE_CHECKING:
    from fedmqtt.broker.bridge import BridgeConfig

DEFAULT_CONFIG_DIR = Path(".fedmqtt") / "broker"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "broker",
        help="run an MQTT broker (Mosquitto or the embedded one) and manage its accounts",
        description=(
            "Run an MQTT broker in the foreground until Ctrl-C. Without --embedded/--mosquitto, Mosquitto is used "
            "if it is installed, else the embedded (amqtt, MQTT 3.1.1, no auth/TLS) broker. "
            "Sub-actions manage Mosquitto accounts and test certificates."
        ),
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--embedded", action="store_true", help="the pure-Python amqtt broker (demo, laptop)")
    which.add_argument("--mosquitto", action="store_true", help="Mosquitto 2 (production)")
    _add_config_dir(parser, default=DEFAULT_CONFIG_DIR)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 1883, or 8883 with --tls)")
    parser.add_argument("--tls", action="store_true", help="TLS listener (Mosquitto; see gen-certs)")
    parser.add_argument("--auth", action="store_true", help="require accounts and apply the ACL (Mosquitto)")
    parser.add_argument(
        "--client-certs",
        action="store_true",
        help="every client presents a certificate from the CA (gen-certs --device ID); its common name is its "
        "user name for the ACL (Mosquitto, with --tls; no passwords)",
    )
    parser.add_argument(
        "--cafile", type=Path, help="CA whose client certificates are accepted (default CONFIG_DIR/tls/ca.crt)"
    )
    parser.add_argument(
        "--max-packet-mb",
        type=float,
        default=DEFAULT_MAX_PACKET_SIZE / MB,
        help="largest MQTT packet accepted, in MB (10^6 bytes, as --max-update-mb; default %(default)g)",
    )
    parser.add_argument(
        "--max-queued-messages",
        type=int,
        default=None,
        help="QoS 1 messages Mosquitto queues per client beyond its in-flight window, or for it while offline; the "
        "rest are dropped. The coordinator's (or each aggregator's) queue must hold a round's updates and statuses "
        "(default 100000)",
    )
    parser.add_argument(
        "--max-queued-mb",
        type=float,
        default=None,
        help="the same queue's bound in MB: at least devices per round x update size (/ aggregators) "
        "(default: the larger of 1000 and 4 x --max-packet-mb)",
    )
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix the ACL covers (default fedmqtt)")
    parser.add_argument("--certfile", type=Path, help="server certificate (default CONFIG_DIR/tls/server.crt)")
    parser.add_argument("--keyfile", type=Path, help="server private key (default CONFIG_DIR/tls/server.key)")
    _add_bridge_flags(parser)
    parser.set_defaults(func=run_broker)

    actions = parser.add_subparsers(dest="broker_action", metavar="ACTION")
    for kind in ("device", "coordinator", "watcher", "site", "aggregator"):
        action = actions.add_parser(
            f"add-{kind}",
            help=f"create or update the {kind} account in the Mosquitto password file",
            description=(
                f"Create or update the {kind} account (mosquitto_passwd). A generated password is printed once; "
                "only its hash is stored. A running broker started from the same config dir is reloaded."
            ),
        )
        if kind == "device":
            action.add_argument("device_id", metavar="ID", help="device id (also the MQTT username)")
        if kind == "site":
            action.add_argument("device_id", metavar="NAME",
                                help="site name (also the user name its bridge logs in with: --bridge-username)")  # fmt: skip
        if kind == "aggregator":
            action.add_argument(
                "device_id", metavar="ID", help="aggregator id (fedmqtt aggregator --id; also the MQTT username)"
            )
        given = action.add_mutually_exclusive_group()
        given.add_argument("--password", help="use this password instead of generating one")
        given.add_argument("--password-file", type=Path, metavar="F",
                           help="use the first line of this file as the password (off the command line and ps; "
                                "a password starting with '-' is safe here)")  # fmt: skip
        _add_config_dir(action, default=argparse.SUPPRESS)
        action.set_defaults(func=add_account_command, account_kind=kind)

    certs = actions.add_parser(
        "gen-certs",
        help="make a test CA and server certificate for --tls, or client certificates for --client-certs",
        description="Write CONFIG_DIR/tls/{ca.crt,ca.key,server.crt,server.key} (a private CA; or bring your own "
        "certificates). Clients trust ca.crt. With --device/--coordinator/--watcher, issue client certificates "
        "from that CA instead: CONFIG_DIR/tls/clients/NAME.{crt,key}, common name NAME.",
    )
    _add_config_dir(certs, default=argparse.SUPPRESS)
    certs.add_argument(
        "--host", dest="cert_hosts", action="append", metavar="NAME",
        help="host name or IP the server certificate covers (repeatable; default localhost, 127.0.0.1, ::1)",
    )  # fmt: skip
    certs.add_argument(
        "--device", dest="cert_devices", action="append", metavar="ID",
        help="issue a client certificate for device ID (repeatable)",
    )  # fmt: skip
    certs.add_argument("--coordinator", dest="cert_coordinator", action="store_true",
                       help="issue the coordinator's client certificate")  # fmt: skip
    certs.add_argument("--watcher", dest="cert_watcher", action="store_true",
                       help="issue the watcher's client certificate")  # fmt: skip
    certs.add_argument("--days", type=int, default=825, help="validity in days (default %(default)s)")
    certs.add_argument("--force", action="store_true", help="replace existing certificates")
    certs.set_defaults(func=gen_certs_command)


def _add_bridge_flags(parser: argparse.ArgumentParser) -> None:
    bridge = parser.add_argument_group(
        "edge site (Mosquitto bridge to the cloud broker; docs/edge-sites.md)",
        "This broker runs on a site's gateway and bridges one job's topics to the cloud broker: plan and models "
        "down, the devices' presence and the site's partial aggregates (or its updates) up.",
    )
    bridge.add_argument("--bridge-to", metavar="URL", help="the cloud broker, mqtt://HOST:PORT or mqtts://HOST:PORT")
    bridge.add_argument("--site", metavar="NAME", help="this site's name (the bridge's client id is fedmqtt-NAME)")
    bridge.add_argument("--job", metavar="J", help="the job whose topics the bridge carries")
    bridge.add_argument(
        "--site-aggregator", action=argparse.BooleanOptionalAction, default=False,
        help="a site aggregator (fedmqtt aggregator --site NAME) sums the site's updates: carry its partial "
        "aggregates up and keep the updates on the site (default: no, carry every update up)",
    )  # fmt: skip
    bridge.add_argument("--bridge-username", metavar="U", help="the bridge's account on the cloud broker")
    bridge.add_argument("--bridge-password-file", type=Path, metavar="F",
                        help="file whose first line is that account's password")  # fmt: skip
    bridge.add_argument("--bridge-cafile", type=Path, metavar="CA",
                        help="CA of the cloud broker's certificate (mqtts://; default: the system's CA bundle)")  # fmt: skip
    bridge.add_argument("--bridge-certfile", type=Path, metavar="C",
                        help="client certificate of the bridge (a cloud broker with --client-certs)")  # fmt: skip
    bridge.add_argument("--bridge-keyfile", type=Path, metavar="K", help="its private key")


_BRIDGE_FLAGS = ("site", "job", "bridge_username", "bridge_password_file", "bridge_cafile", "bridge_certfile",
                 "bridge_keyfile")  # fmt: skip


def _bridge_config(args: argparse.Namespace) -> BridgeConfig | None:
    """The bridge the flags ask for (None without --bridge-to); BridgeError names the flag to fix."""
    from fedmqtt.broker.bridge import BridgeConfig
    from fedmqtt.broker.errors import BridgeError
    from fedmqtt.mqtt.settings import read_password_file

    if args.bridge_to is None:
        for name in _BRIDGE_FLAGS:
            if getattr(args, name) is not None:
                raise BridgeError(f"--{name.replace('_', '-')}", "configures a bridge: add --bridge-to URL")
        if args.site_aggregator:
            raise BridgeError("--site-aggregator", "configures a bridge: add --bridge-to URL")
        return None
    for name in ("site", "job"):
        if getattr(args, name) is None:
            raise BridgeError(f"--{name}", "a bridge carries one job of one site: give --site NAME and --job J")
    password = None
    if args.bridge_password_file is not None:
        try:
            password = read_password_file(args.bridge_password_file)
        except ValueError as exc:
            raise BridgeError("--bridge-password-file", str(exc)) from None
    return BridgeConfig.create(
        args.bridge_to,
        site=args.site,
        job=args.job,
        prefix=args.prefix,
        site_aggregator=args.site_aggregator,
        username=args.bridge_username,
        password=password,
        cafile=args.bridge_cafile,
        certfile=args.bridge_certfile,
        keyfile=args.bridge_keyfile,
    )


def _add_config_dir(parser: argparse.ArgumentParser, default: object) -> None:
    # Sub-actions use SUPPRESS so `fedmqtt broker --config-dir D add-device x` keeps D.
    parser.add_argument(
        "--config-dir", type=Path, default=default, help=f"broker config directory (default {DEFAULT_CONFIG_DIR})"
    )


def run_broker(args: argparse.Namespace) -> int:
    max_packet_size = int(args.max_packet_mb * MB)
    if max_packet_size < 1000:
        raise ConfigError("--max-packet-mb", "must be at least 0.001 (1000 bytes)")
    bridge = _bridge_config(args)
    use_mosquitto = args.mosquitto or (not args.embedded and _mosquitto_installed())
    if bridge is not None and not use_mosquitto:
        raise ConfigError("--bridge-to", "bridges are Mosquitto's feature; the embedded broker has none: use "
                                         "--mosquitto (apt-get install mosquitto)")  # fmt: skip
    if not use_mosquitto:
        for flag, value in (("--auth", args.auth), ("--tls", args.tls), ("--certfile", args.certfile),
                            ("--client-certs", args.client_certs)):  # fmt: skip
            if value:
                raise ConfigError(flag, "the embedded broker has no accounts or TLS; use --mosquitto")
        for flag, value in (("--max-queued-messages", args.max_queued_messages),
                            ("--max-queued-mb", args.max_queued_mb)):  # fmt: skip
            if value is not None:
                raise ConfigError(flag, "sizes Mosquitto's per-client queues; use --mosquitto")
        from fedmqtt.broker.embedded import run_embedded

        run_embedded(args.host, args.port or 1883, max_packet_size=max_packet_size)
        return 0

    from fedmqtt.broker.mosquitto import DEFAULT_MAX_QUEUED_MESSAGES, MosquittoConfig, run_mosquitto

    require_output_dir("--config-dir", args.config_dir)
    require_input_file("--certfile", args.certfile)
    require_input_file("--keyfile", args.keyfile)
    require_input_file("--cafile", args.cafile)
    if args.client_certs and not args.tls:
        raise ConfigError("--client-certs", "client certificates need the TLS listener: add --tls")
    if args.cafile is not None and not args.client_certs:
        raise ConfigError("--cafile", "is the CA of client certificates: use it with --client-certs")
    if args.max_queued_messages is not None and args.max_queued_messages < 1:
        raise ConfigError("--max-queued-messages", "must be at least 1")
    if args.max_queued_mb is not None and args.max_queued_mb * MB < max_packet_size:
        raise ConfigError("--max-queued-mb", "must hold at least one maximum-size packet (--max-packet-mb)")
    config = MosquittoConfig(
        args.config_dir,
        host=args.host,
        port=args.port or (8883 if args.tls else 1883),
        max_packet_size=max_packet_size,
        max_queued_messages=args.max_queued_messages or DEFAULT_MAX_QUEUED_MESSAGES,
        max_queued_bytes=int(args.max_queued_mb * MB) if args.max_queued_mb is not None else None,
        auth=args.auth,
        tls=args.tls,
        certfile=args.certfile,
        keyfile=args.keyfile,
        prefix=args.prefix,
        client_certs=args.client_certs,
        cafile=args.cafile,
        bridge=bridge,
    )
    if args.tls:
        _check_server_certificate(config.tls_files.server_cert, config.tls_files.server_key)
    if args.auth and not args.client_certs:
        from fedmqtt.broker.accounts import list_accounts

        if not list_accounts(config.password_file):
            print(
                f"fedmqtt broker: no accounts in {config.password_file} yet; add them with "
                f"`fedmqtt broker add-coordinator --config-dir {args.config_dir}` and `add-device ID` "
                "(the running broker is reloaded)",
                flush=True,
            )
    return run_mosquitto(config)


def _check_server_certificate(certfile: Path, keyfile: Path) -> None:
    """Refuse a server certificate and key that Mosquitto could not load, before it is started. Missing
    default files are left to :meth:`MosquittoConfig.write`, which says how to make them."""
    if not (certfile.is_file() and keyfile.is_file()):
        return
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            "--certfile/--keyfile",
            f"{certfile} and {keyfile} are not a PEM certificate and its private key ({getattr(exc, 'reason', None) or exc})",
        ) from None


def _mosquitto_installed() -> bool:
    return bool(shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin"))


def add_account_command(args: argparse.Namespace) -> int:
    from fedmqtt.broker.accounts import add_account, list_accounts, username_for
    from fedmqtt.broker.mosquitto import PASSWORD_FILE, reload_running_broker

    config_dir: Path = getattr(args, "config_dir", DEFAULT_CONFIG_DIR)
    require_output_dir("--config-dir", config_dir)
    given = args.password
    if args.password_file is not None:
        from fedmqtt.mqtt.settings import read_password_file

        try:
            given = read_password_file(args.password_file)
        except ValueError as exc:
            raise ConfigError("--password-file", str(exc)) from None
    username = username_for(args.account_kind, getattr(args, "device_id", None))
    password_file = config_dir / PASSWORD_FILE
    existed = username in list_accounts(password_file)
    if args.account_kind == "site":
        from fedmqtt.broker.mosquitto import register_site_account

        register_site_account(config_dir, username)
    if args.account_kind == "aggregator":
        from fedmqtt.broker.mosquitto import register_aggregator_account

        register_aggregator_account(config_dir, username)
    password = add_account(password_file, username, given)
    print(f"{args.account_kind} account {username!r} {'updated' if existed else 'created'} in {password_file}")
    if given is None:
        print(f"password: {password}")
        print("(shown once: fedmqtt keeps only its hash; give it to the account's owner now)")
    pid = reload_running_broker(config_dir)
    if pid is not None:
        print(f"reloaded the running broker (pid {pid})")
    else:
        print("no broker is running from this config dir; it reads the account when it starts")
    return 0


def gen_certs_command(args: argparse.Namespace) -> int:
    from fedmqtt.broker.certs import DEFAULT_HOSTS, generate_test_certificates
    from fedmqtt.broker.mosquitto import TLS_DIR

    config_dir: Path = getattr(args, "config_dir", DEFAULT_CONFIG_DIR)
    require_output_dir("--config-dir", config_dir)
    require_output_dir("--config-dir", config_dir / TLS_DIR)
    if args.days < 1:
        raise ConfigError("--days", f"must be at least 1, got {args.days}")
    clients = _client_names(args)
    if clients:
        if args.cert_hosts:
            raise ConfigError("--host", "names the server certificate; it does not go with --device/--coordinator")
        return _issue_client_certificates(config_dir, clients, days=args.days, force=args.force)
    hosts = tuple(args.cert_hosts) if args.cert_hosts else DEFAULT_HOSTS
    files = generate_test_certificates(config_dir / TLS_DIR, hosts=hosts, days=args.days, force=args.force)
    print(f"CA certificate (give it to clients): {files.ca_cert}")
    print(f"server certificate: {files.server_cert} (for {', '.join(hosts)})")
    print(f"server key: {files.server_key}")
    print(f"start the broker with: fedmqtt broker --mosquitto --tls --config-dir {config_dir}")
    print(f"clients connect to mqtts://HOST:8883 trusting {files.ca_cert}")
    return 0


def _client_names(args: argparse.Namespace) -> list[str]:
    """The account names to issue client certificates for, each checked as a user name (device ids may not
    be the coordinator's or watcher's name)."""
    from fedmqtt.broker.accounts import username_for
    from fedmqtt.broker.errors import AccountError

    names: list[str] = []
    try:
        names += [username_for("device", device_id) for device_id in args.cert_devices or ()]
    except AccountError as exc:
        raise ConfigError("--device", str(exc)) from None
    if args.cert_coordinator:
        names.append(username_for("coordinator"))
    if args.cert_watcher:
        names.append(username_for("watcher"))
    return list(dict.fromkeys(names))


def _issue_client_certificates(config_dir: Path, names: list[str], *, days: int, force: bool) -> int:
    from fedmqtt.broker.certs import issue_client_certificate
    from fedmqtt.broker.mosquitto import TLS_DIR

    for name in names:
        issued = issue_client_certificate(config_dir / TLS_DIR, name, days=days, force=force)
        print(f"{name}: certificate {issued.cert}, key {issued.key} (common name {name})")
    print(
        f"copy to each client its .crt and .key (the key by a private channel; it is its identity) and "
        f"{config_dir / TLS_DIR / 'ca.crt'}; it connects with --tls-ca ca.crt --tls-cert NAME.crt --tls-key NAME.key "
        f"to a broker started with --tls --client-certs"
    )
    return 0
