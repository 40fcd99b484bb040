"""``fedmqtt broker``: run a broker in the foreground, and manage Mosquitto accounts and test certificates.

fedmqtt broker [--embedded | --mosquitto] [--config-dir DIR] [--host H] [--port P] [--tls] [--auth]
               [--max-packet-mb N] [--prefix fedmqtt]
fedmqtt broker add-device ID [--password P]      (also add-coordinator, add-watcher)
fedmqtt broker gen-certs [--host NAME ...] [--force]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from fedmqtt.errors import ConfigError
from fedmqtt.mqtt import DEFAULT_MAX_PACKET_SIZE
from fedmqtt.paths import require_input_file, require_output_dir
from fedmqtt.settings import MB
from fedmqtt.topics import DEFAULT_PREFIX

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
        "--max-packet-mb",
        type=float,
        default=DEFAULT_MAX_PACKET_SIZE / MB,
        help="largest MQTT packet accepted, in MB (10^6 bytes, as --max-update-mb; default %(default)g)",
    )
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix the ACL covers (default fedmqtt)")
    parser.add_argument("--certfile", type=Path, help="server certificate (default CONFIG_DIR/tls/server.crt)")
    parser.add_argument("--keyfile", type=Path, help="server private key (default CONFIG_DIR/tls/server.key)")
    parser.set_defaults(func=run_broker)

    actions = parser.add_subparsers(dest="broker_action", metavar="ACTION")
    for kind in ("device", "coordinator", "watcher"):
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
        action.add_argument("--password", help="use this password instead of generating one")
        _add_config_dir(action, default=argparse.SUPPRESS)
        action.set_defaults(func=add_account_command, account_kind=kind)

    certs = actions.add_parser(
        "gen-certs",
        help="make a test CA and server certificate for --tls",
        description="Write CONFIG_DIR/tls/{ca.crt,ca.key,server.crt,server.key} (for testing; bring your own "
        "certificates in production). Clients trust ca.crt.",
    )
    _add_config_dir(certs, default=argparse.SUPPRESS)
    certs.add_argument(
        "--host", dest="cert_hosts", action="append", metavar="NAME",
        help="host name or IP the server certificate covers (repeatable; default localhost, 127.0.0.1, ::1)",
    )  # fmt: skip
    certs.add_argument("--force", action="store_true", help="replace existing certificates")
    certs.set_defaults(func=gen_certs_command)


def _add_config_dir(parser: argparse.ArgumentParser, default: object) -> None:
    # Sub-actions use SUPPRESS so `fedmqtt broker --config-dir D add-device x` keeps D.
    parser.add_argument(
        "--config-dir", type=Path, default=default, help=f"broker config directory (default {DEFAULT_CONFIG_DIR})"
    )


def run_broker(args: argparse.Namespace) -> int:
    max_packet_size = int(args.max_packet_mb * MB)
    if max_packet_size < 1000:
        raise ConfigError("--max-packet-mb", "must be at least 0.001 (1000 bytes)")
    use_mosquitto = args.mosquitto or (not args.embedded and _mosquitto_installed())
    if not use_mosquitto:
        for flag, value in (("--auth", args.auth), ("--tls", args.tls), ("--certfile", args.certfile)):
            if value:
                raise ConfigError(flag, "the embedded broker has no accounts or TLS; use --mosquitto")
        from fedmqtt.broker.embedded import run_embedded

        run_embedded(args.host, args.port or 1883, max_packet_size=max_packet_size)
        return 0

    from fedmqtt.broker.mosquitto import MosquittoConfig, run_mosquitto

    require_output_dir("--config-dir", args.config_dir)
    require_input_file("--certfile", args.certfile)
    require_input_file("--keyfile", args.keyfile)
    config = MosquittoConfig(
        args.config_dir,
        host=args.host,
        port=args.port or (8883 if args.tls else 1883),
        max_packet_size=max_packet_size,
        auth=args.auth,
        tls=args.tls,
        certfile=args.certfile,
        keyfile=args.keyfile,
        prefix=args.prefix,
    )
    if args.tls:
        _check_server_certificate(config.tls_files.server_cert, config.tls_files.server_key)
    if args.auth:
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
    username = username_for(args.account_kind, getattr(args, "device_id", None))
    password_file = config_dir / PASSWORD_FILE
    existed = username in list_accounts(password_file)
    password = add_account(password_file, username, args.password)
    print(f"{args.account_kind} account {username!r} {'updated' if existed else 'created'} in {password_file}")
    if args.password is None:
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
    hosts = tuple(args.cert_hosts) if args.cert_hosts else DEFAULT_HOSTS
    files = generate_test_certificates(config_dir / TLS_DIR, hosts=hosts, force=args.force)
    print(f"CA certificate (give it to clients): {files.ca_cert}")
    print(f"server certificate: {files.server_cert} (for {', '.join(hosts)})")
    print(f"server key: {files.server_key}")
    print(f"start the broker with: fedmqtt broker --mosquitto --tls --config-dir {config_dir}")
    print(f"clients connect to mqtts://HOST:8883 trusting {files.ca_cert}")
    return 0
