"""``fedmqtt aggregator``: run one aggregator worker of a job the coordinator runs with ``--aggregators N``.

The broker flags come from :func:`fedmqtt.mqtt.settings.add_broker_flags` and the update limits
(``--max-update-mb``, ``--max-update-norm``) from the coordinator's own settings: one definition, one default.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from fedmqtt import settings as S
from fedmqtt.errors import ConfigError
from fedmqtt.topics import DEFAULT_PREFIX, validate_id, validate_prefix

log = logging.getLogger("fedmqtt.aggregator")

DEFAULT_GROUP = "fedmqtt"
_LIMITS = ("max_update_mb", "max_update_norm")  # the coordinator's update limits the worker applies too


def _limit_settings() -> list[S.Setting]:
    from fedmqtt.coordinator.config import SETTINGS

    return [s for s in SETTINGS if s.name in _LIMITS]


def default_worker_id() -> str:
    """``agg-HOSTNAME``, made a valid identifier (letters, digits, ``_ . -``; at most 64 characters)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "host"
    return validate_id("aggregator id", f"agg-{host}"[:64])


def default_spool(job: str, worker: str) -> Path:
    """``$XDG_STATE_HOME/fedmqtt/aggregator/JOB/WORKER`` (``~/.local/state`` by default)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "fedmqtt" / "aggregator" / job / worker


def register(subparsers: Any) -> None:
    from fedmqtt.mqtt.settings import add_broker_flags

    p = subparsers.add_parser(
        "aggregator",
        help="run an aggregator worker: sum a share of a job's updates for a coordinator run with --aggregators",
        description="Run one aggregator worker of a job whose coordinator runs with --aggregators N. Workers of one "
        "--group share the job's updates through an MQTT 5 shared subscription ($share/GROUP/PREFIX/JOB/updates/+): "
        "each update goes to one of them, which checks it exactly as the coordinator does, keeps it on disk "
        "(--spool) before acknowledging it, reports it to the coordinator, and sends the sum of the updates the "
        "coordinator asks for when the round closes. A worker restarted with the same --id and --spool answers for "
        "the updates it acknowledged before. It exits when the job ends (--no-exit-on-finish: it keeps waiting for "
        "the next run), and on SIGTERM/SIGINT.",
    )
    add_broker_flags(p.add_argument_group("broker"), broker_required=True)
    p.add_argument("--job", required=True, help="job id (one topic level) (required)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix (default: %(default)s)")
    p.add_argument(
        "--group",
        help=f"shared-subscription group the workers of this job share (default: {DEFAULT_GROUP}; with --site and "
        "no --group, the worker reads every update of its site broker without $share)",
    )
    p.add_argument(
        "--id",
        dest="worker_id",
        metavar="ID",
        help="worker id (its topics, its MQTT session, and its username when the broker has accounts; "
        "default: agg-HOSTNAME)",
    )
    p.add_argument(
        "--spool",
        type=Path,
        metavar="DIR",
        help="where accepted updates are kept until their round is collected (default: "
        "$XDG_STATE_HOME/fedmqtt/aggregator/JOB/ID, ~/.local/state by default)",
    )
    p.add_argument("--site", metavar="NAME", help="the edge site this aggregator serves (recorded in its presence)")
    p.add_argument(
        "--exit-on-finish",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="exit when the coordinator says the job ended (default: on)",
    )
    p.add_argument("--connect-timeout", type=float, default=30.0, metavar="S")
    S.add_flags(p, _limit_settings())
    p.set_defaults(func=run_aggregator)


def options_from_args(args: argparse.Namespace) -> Any:
    """The worker's :class:`~fedmqtt.aggregator.worker.WorkerOptions`, every flag checked (ConfigError names it)."""
    from fedmqtt.aggregator.worker import WorkerOptions
    from fedmqtt.mqtt.settings import broker_settings_from_args
    from fedmqtt.paths import require_output_dir

    broker = broker_settings_from_args(args)
    job = validate_id("job id", args.job)
    prefix = validate_prefix(args.prefix)
    worker = default_worker_id() if args.worker_id is None else validate_id("aggregator id", args.worker_id)
    site = None if args.site is None else validate_id("site name", args.site)
    group = args.group if args.group is not None else (None if site is not None else DEFAULT_GROUP)
    if group is not None:
        validate_id("shared-subscription group", group)
    spool = Path(args.spool).expanduser() if args.spool is not None else default_spool(job, worker)
    require_output_dir("--spool", spool)
    limits: dict[str, Any] = {}
    for s in _limit_settings():
        value = getattr(args, s.name, None)
        value = s.default if value is None else s.parse_text(value) if isinstance(value, str) else value
        try:
            adapter: TypeAdapter[Any] = TypeAdapter(Annotated[s.info.annotation, s.info])  # type: ignore[arg-type]
            limits[s.name] = adapter.validate_python(value)
        except ValidationError as exc:
            raise ConfigError(s.flag, str(exc.errors()[0]["msg"])) from None
    if not 0 < args.connect_timeout < float("inf"):
        raise ConfigError("--connect-timeout", f"must be a positive number of seconds, got {args.connect_timeout}")
    return WorkerOptions(
        broker=broker,
        job=job,
        worker=worker,
        spool=spool,
        prefix=prefix,
        group=group,
        site=site,
        max_update_bytes=int(limits["max_update_mb"] * S.MB),
        max_update_norm=limits["max_update_norm"],
        exit_on_finish=args.exit_on_finish,
    )


def run_aggregator(args: argparse.Namespace) -> int:
    options = options_from_args(args)  # refused here, before any connection

    from fedmqtt.aggregator.worker import AggregatorWorker

    worker = AggregatorWorker(options)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        worker.request_stop(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return worker.run(connect_timeout=args.connect_timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
