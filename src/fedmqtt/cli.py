"""``fedmqtt`` command line: one argparse parser; each subsystem registers its own sub-commands.

A subsystem module exposes ``register(subparsers)``, which adds its parser(s) and sets
``func(args) -> int`` as the default. Heavy imports (torch) happen inside ``func``, so ``fedmqtt --help``
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fedmqtt import __version__
from fedmqtt.errors import FedmqttError

_SUBCOMMAND_MODULES = (
    "fedmqtt.aggregator.cli",
    "fedmqtt.broker.cli",
    "fedmqtt.coordinator.cli",
    "fedmqtt.device.cli",
    "fedmqtt.export",
    "fedmqtt.predict",
    "fedmqtt.pretrain",
    "fedmqtt.release",
    "fedmqtt.simulate",
    "fedmqtt.watch",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmqtt",
        description="Federated learning for IoT and mobile devices over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"fedmqtt {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that subsystem is not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FedmqttError as exc:
        print(f"fedmqtt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fedmqtt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
