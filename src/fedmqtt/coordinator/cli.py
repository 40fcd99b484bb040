"""``fedmqtt coordinator``: run one federated job.

Its flags are derived from :class:`~fedmqtt.coordinator.config.CoordinatorConfig` (the broker flags come from
:func:`fedmqtt.mqtt.settings.add_broker_flags`, which owns them); see docs/configuration.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from fedmqtt import settings as S
from fedmqtt.coordinator.config import SETTINGS, config_from_args
from fedmqtt.mqtt.settings import BROKER_FLAGS, add_broker_flags

log = logging.getLogger("fedmqtt.coordinator")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "coordinator",
        help="run a federated job: open rounds, collect updates, aggregate, publish models",
        description="Run the coordinator of one federated job. Every setting is a flag, a key of --config "
        "job.toml ([coordinator] table) or a FEDMQTT_* environment variable; flags override the environment, "
        "which overrides the file. The table of all of them: docs/configuration.md.",
    )
    add_broker_flags(p)
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file with any of these settings ([coordinator] table or top level; DP in [coordinator.dp])",
    )
    S.add_flags(p, [s for s in SETTINGS if s.name not in BROKER_FLAGS])
    p.set_defaults(func=run_coordinator)


class _StoppedWhileConnecting(BaseException):
    """Raised by the signal handler to abandon a connect in progress (MqttConnection.connect cleans up)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def run_coordinator(args: argparse.Namespace) -> int:
    config = config_from_args(args, env=os.environ, toml_path=args.config)  # refused here, before any connection

    from fedmqtt.coordinator.progress import ProgressView
    from fedmqtt.coordinator.service import CoordinatorService

    # SIGTERM (docker stop, systemctl stop) and SIGINT pause the job: the service checkpoints, publishes
    # job_stopped and returns 128 + the signal number; --resume continues it. While it is still connecting (nothing
    # to save yet) the connect is abandoned; a second signal interrupts at once.
    services: list[CoordinatorService] = []
    requested: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        for service in services:
            service.request_stop(signum)
            if service.connecting:
                raise _StoppedWhileConnecting(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        view = ProgressView(config, enabled=not config.quiet and sys.stderr.isatty(), plain=not config.quiet)
        with view:
            service = CoordinatorService(config, progress=view.update)
            services.append(service)
            if requested:  # a signal came while the model and data loaded
                service.request_stop(requested[0])
            try:
                code = service.run()
            except _StoppedWhileConnecting as stop:
                log.warning("%s while connecting to the broker: stopped", signal.Signals(stop.signum).name)
                code = 128 + stop.signum
        print(view.final_line(service), file=sys.stderr)
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
