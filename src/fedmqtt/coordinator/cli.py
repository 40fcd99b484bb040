"""``fedmqtt coordinator``: run one federated job."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from fedmqtt.coordinator.config import STRATEGIES, load_config

log = logging.getLogger("fedmqtt.coordinator")

# Flags whose values map 1:1 onto CoordinatorConfig fields (dest == field name).
_CONFIG_FLAGS = (
    "broker", "job", "prefix", "mqtt_version", "username", "password", "tls_ca", "client_id", "rounds",
    "min_updates", "round_timeout", "devices_per_round", "min_devices", "min_updates_at_deadline",
    "max_attempts", "seed", "strategy", "model", "dataset", "eval_data", "checkpoint_dir", "resume",
    "local_epochs", "batch_size", "lr", "prox_mu", "uplink", "downlink", "max_update_mb", "dp_mode", "dp_clip",
    "dp_noise_multiplier", "dp_delta", "target_epsilon", "dp_sample_rate", "dp_population", "dp_adaptive_clip",
    "quiet", "max_samples", "max_update_norm", "reconnect_grace", "take_over",
)  # fmt: skip


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    """Broker flags shared by coordinator, device and watch."""
    p.add_argument("--broker", help="broker URL, e.g. mqtt://127.0.0.1:1883 or mqtts://user:pass@host:8883")
    p.add_argument("--job", help="job id (one topic level)")
    p.add_argument("--prefix", help="topic prefix (default fedmqtt)")
    p.add_argument(
        "--mqtt-version",
        choices=["5", "3.1.1", "auto"],
        help="MQTT protocol (default auto: 5, falling back to 3.1.1 as the embedded broker needs)",
    )
    p.add_argument("--username")
    p.add_argument("--password")
    p.add_argument("--tls-ca", type=Path, help="CA certificate file for mqtts://")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "coordinator",
        help="run a federated job: open rounds, collect updates, aggregate, publish models",
        description="Run the coordinator of one federated job. Every flag can also be set in --config job.toml "
        "(flags override the file).",
    )
    add_connection_flags(p)
    p.add_argument(
        "--config", type=Path, help="TOML file with any of these settings ([coordinator] table or top level)"
    )
    p.add_argument("--client-id")
    g = p.add_argument_group("rounds")
    g.add_argument("--rounds", type=int, help="rounds to run")
    g.add_argument("--min-updates", type=int, help="accepted updates that close a round (quorum)")
    g.add_argument("--round-timeout", type=float, help="seconds until a round's deadline")
    g.add_argument("--devices-per-round", type=int, help="devices selected per round (default: all online)")
    g.add_argument("--min-devices", type=int, help="devices online before a round opens (default: min-updates)")
    g.add_argument("--min-updates-at-deadline", type=int, help="updates enough to close at the deadline (default 1)")
    g.add_argument("--max-attempts", type=int, help="attempts per round before the job stops (default 3)")
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("model and training")
    g.add_argument("--strategy", choices=STRATEGIES)
    g.add_argument("--model", help="model name: cnn, seed-cnn, mlp, ...")
    g.add_argument("--dataset", choices=["mnist", "fashion-mnist"])
    g.add_argument("--eval-data", type=Path, help="directory of the IDX files; evaluates on the test split each round")
    g.add_argument("--local-epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--prox-mu", type=float, help="FedProx proximal term (default off)")
    g.add_argument("--uplink", help="device update codec, e.g. int8, float16, topk:0.01+int8+ef")
    g.add_argument(
        "--downlink",
        help="global-model codec (default float32; float16 halves the bytes each selected device downloads)",
    )
    g.add_argument("--max-update-mb", type=float)
    g.add_argument("--max-samples", type=int, help="largest sample count an update may claim (default 10000000)")
    g.add_argument(
        "--max-update-norm", type=float, help="refuse updates whose L2 norm exceeds this (jobs without DP; default off)"
    )
    g = p.add_argument_group("durability")
    g.add_argument("--checkpoint-dir", type=Path)
    g.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint")
    g.add_argument(
        "--take-over",
        action="store_true",
        default=None,
        help="start even if another coordinator is alive on this job; the other one stops",
    )
    g.add_argument(
        "--reconnect-grace",
        type=float,
        help="seconds after a reconnect to the broker during which last wills wait and the deadline is held (default 10)",
    )
    g = p.add_argument_group("differential privacy")
    g.add_argument("--dp-mode", choices=["off", "device", "local", "central"])
    g.add_argument("--dp-clip", type=float, help="L2 clip bound C of each update")
    g.add_argument("--dp-noise-multiplier", type=float, help="noise multiplier sigma")
    g.add_argument("--dp-delta", type=float, help="delta (default 1/population^1.1)")
    g.add_argument("--target-epsilon", type=float, help="stop before a round would exceed this epsilon")
    g.add_argument("--dp-sample-rate", type=float, help="Poisson sampling rate q of devices per round")
    g.add_argument("--dp-population", type=int, help="number of devices in the population (for the default delta)")
    g.add_argument("--dp-adaptive-clip", type=float, help="target quantile for adaptive clipping")
    p.add_argument("--quiet", action="store_true", default=None, help="no live progress display")
    p.set_defaults(func=run_coordinator)


def run_coordinator(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name, None) for name in _CONFIG_FLAGS}
    config = load_config(args.config, overrides)  # refused here, before any connection

    from fedmqtt.coordinator.progress import ProgressView
    from fedmqtt.coordinator.service import CoordinatorService

    view = ProgressView(config, enabled=not config.quiet and sys.stderr.isatty(), plain=not config.quiet)
    with view:
        service = CoordinatorService(config, progress=view.update)
        code = service.run()
    print(view.final_line(service), file=sys.stderr)
    return code
