"""``fedmqtt device``: run one device (or several virtual devices) of a federated job."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from fedmqtt.errors import ConfigError
from fedmqtt.paths import require_input_dir, require_output_dir
from fedmqtt.topics import DEFAULT_PREFIX, validate_id, validate_prefix

log = logging.getLogger("fedmqtt.device")


def add_train_seed_flag(parser: Any) -> None:
    """``--train-seed`` (``fedmqtt device`` and ``fedmqtt simulate``, which passes it on to its devices)."""
    parser.add_argument(
        "--train-seed",
        type=int,
        metavar="N",
        help="reproducible local training: each device shuffles its data in round r in an order drawn from "
        "(N, its id, r), the same in every run with N (default: a fresh order every time)",
    )


def register(subparsers: Any) -> None:
    from fedmqtt.mqtt.settings import add_broker_flags

    p = subparsers.add_parser(
        "device",
        help="run a device agent: train on local data when selected, send compressed updates",
        description="Run a device agent. With no partition flags the device uses all the data it finds in "
        "--data-dir, as a real board does; --partition/--num-parts/--part pick one part of a shared data set "
        "for simulations; --id-prefix/--parts packs several virtual devices into one process.",
    )
    add_broker_flags(p.add_argument_group("broker"), broker_required=True)
    p.add_argument("--job", required=True, help="job id (one topic level) (required)")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="topic prefix (default: %(default)s)")
    ident = p.add_mutually_exclusive_group()
    ident.add_argument("--id", help="device id (also its MQTT username when the broker has auth on)")
    ident.add_argument("--id-prefix", help="virtual devices: ids PREFIX0000, PREFIX0001, ... for --parts A:B")
    p.add_argument("--parts", help="virtual devices A..B-1 as A:B (with --id-prefix; each takes its own part)")
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist")
    p.add_argument(
        "--data-dir",
        help="directory with the IDX files (default $FEDMQTT_DATA, else ~/.cache/fedmqtt/DATASET, downloaded)",
    )
    p.add_argument(
        "--data-format",
        choices=["auto", "idx", "imagefolder"],
        default="auto",
        help="idx: the data set's IDX files; imagefolder: a directory of images per class, DIR/0/*.png ... DIR/9/*.jpg "
        "(class folders named by class index; needs the vision extra); auto (default): imagefolder when --data-dir "
        "holds class folders of images and no IDX file",
    )
    p.add_argument(
        "--image-model",
        default="cnn",
        metavar="MODEL",
        help="imagefolder data: the model the images are converted for (its input size and channels; default "
        "%(default)s); --dataset gives the normalisation",
    )
    p.add_argument("--partition", help="iid | shards:2 | dirichlet:0.5 (simulations)")
    p.add_argument("--num-parts", type=int)
    p.add_argument("--part", type=int)
    p.add_argument("--seed", type=int, default=0, help="partition seed (the same on every device of a run)")
    add_train_seed_flag(p)
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads for training (default: torch's choice, one per core; a board that also serves other "
        "work keeps one core free, e.g. 3 on a 4-core Raspberry Pi)",
    )
    p.add_argument(
        "--max-train-seconds",
        type=float,
        metavar="S",
        help="decline (with a device status saying why) a round whose training is estimated, from this device's "
        "last rounds, to take longer than S seconds; the first round is always tried. Rounds whose deadline "
        "leaves less time than the estimate are declined with or without this flag",
    )
    p.add_argument("--state-dir", type=Path, help="where the device keeps its privacy ledger and codec state")
    p.add_argument("--privacy-budget", type=float, help="refuse rounds once this epsilon would be exceeded")
    p.add_argument("--exit-on-finish", action="store_true", help="exit when the job is finished or stopped")
    serve = p.add_argument_group("serving the released model (PREFIX/JOB/release)")
    serve.add_argument(
        "--serve",
        action="store_true",
        help="keep the job's latest released model at SERVE_DIR/model.fedmodel (for `fedmqtt predict --model`), "
        "replaced atomically when a newer release appears; the device still trains",
    )
    serve.add_argument(
        "--serve-only", action="store_true", help="--serve without training: no data is read, no round is answered"
    )
    serve.add_argument(
        "--serve-dir",
        type=Path,
        help="where --serve keeps the model (default: --state-dir, else ~/.cache/fedmqtt/serve/JOB)",
    )
    serve.add_argument("--serve-model", metavar="MODEL", help="refuse releases of any other model")
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.set_defaults(func=run_device)


def virtual_device_id(prefix: str, index: int) -> str:
    """The id of virtual device ``index`` under ``--id-prefix prefix`` (``dev-0007``)."""
    return f"{prefix}{index:04d}"


def _parse_parts(text: str) -> range:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError("parts", f"{text!r} is not A:B (e.g. 0:100)") from None
    if not 0 <= a < b:
        raise ConfigError("parts", f"{text!r}: need 0 <= A < B")
    return range(a, b)


def device_ids_and_parts(args: argparse.Namespace) -> list[tuple[str, int | None]]:
    """Which virtual devices this process runs: (id, part index or None for 'all data')."""
    if args.id_prefix is not None:
        if args.parts is None:
            raise ConfigError("parts", "--id-prefix needs --parts A:B")
        if args.partition is None or args.num_parts is None:
            raise ConfigError("partition", "virtual devices need --partition and --num-parts")
        parts = _parse_parts(args.parts)
        if parts.stop > args.num_parts:
            raise ConfigError("parts", f"{args.parts} goes beyond --num-parts {args.num_parts}")
        return [(validate_id("device id", virtual_device_id(args.id_prefix, i)), i) for i in parts]
    if args.id is None:
        raise ConfigError("id", "give --id ID (or --id-prefix PREFIX --parts A:B)")
    validate_id("device id", args.id)
    if args.partition is not None:
        if args.num_parts is None or args.part is None:
            raise ConfigError("partition", "--partition needs --num-parts N and --part I")
        if not 0 <= args.part < args.num_parts:
            raise ConfigError("part", f"must be in 0..{args.num_parts - 1}")
        return [(args.id, args.part)]
    return [(args.id, None)]


def run_device(args: argparse.Namespace) -> int:
    from fedmqtt.mqtt import max_clients_per_process
    from fedmqtt.mqtt.settings import broker_settings_from_args

    # Every flag and file first, before torch is imported, the data set read or the broker dialled.
    broker = broker_settings_from_args(args)
    validate_id("job id", args.job)
    validate_prefix(args.prefix)
    devices = device_ids_and_parts(args)
    require_input_dir("--data-dir", args.data_dir or None)
    require_output_dir("--state-dir", args.state_dir)
    if args.serve or args.serve_only:
        args.serve_dir = serve_dir(args)
        require_output_dir("--serve-dir", args.serve_dir)
        if args.serve_model is not None:
            from fedmqtt.models import MODEL_NAMES

            if args.serve_model not in MODEL_NAMES:
                raise ConfigError(
                    "--serve-model", f"unknown model {args.serve_model!r}; one of {', '.join(MODEL_NAMES)}"
                )
    elif args.serve_dir is not None or args.serve_model is not None:
        raise ConfigError("--serve-dir", "--serve-dir and --serve-model go with --serve or --serve-only")
    if args.data_format == "imagefolder" and not args.data_dir:
        raise ConfigError("--data-format", "imagefolder needs --data-dir DIR (a directory of class folders)")
    if args.threads is not None and args.threads < 1:
        raise ConfigError("--threads", f"must be at least 1, got {args.threads}")
    if args.max_train_seconds is not None and not 0 < args.max_train_seconds < float("inf"):
        raise ConfigError("--max-train-seconds", f"must be a positive number of seconds, got {args.max_train_seconds}")

    limit = max_clients_per_process() if len(devices) > 1 else 1  # many devices share one network loop
    if len(devices) > limit:
        raise ConfigError(
            "parts",
            f"{len(devices)} virtual devices exceed the {limit} MQTT clients this process can hold (one open file "
            "each: raise `ulimit -n`, or systemd's LimitNOFILE=); or split them over several processes",
        )

    # SIGTERM (docker stop, systemctl stop) and SIGINT: training is abandoned, every device publishes its offline
    # status and the process exits 0. Installed before the data set loads, so a stop then is as clean.
    runtimes: list[Any] = []
    stop_requested: list[int] = []

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.append(signum)
        for runtime in runtimes:
            runtime.stop()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _serve(args, broker, devices, runtimes, stop_requested)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_dir(args: argparse.Namespace) -> Path:
    """``--serve-dir``, else ``--state-dir``, else ``$XDG_CACHE_HOME/fedmqtt/serve/JOB`` (``~/.cache`` by default)."""
    if args.serve_dir is not None:
        return Path(args.serve_dir).expanduser()
    if args.state_dir is not None:
        return Path(args.state_dir)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "fedmqtt" / "serve" / args.job


def _load_data(args: argparse.Namespace, devices: list[tuple[str, int | None]]) -> list[Any]:
    """Each device's data set: IDX files (whole, or only this process's parts), or an ImageFolder."""
    from fedmqtt.data import PartitionSpec, load_dataset, load_parts, resolve_data_dir, select_part

    data_format = args.data_format
    if data_format == "auto":
        from fedmqtt.imagefolder import is_imagefolder

        data_format = "imagefolder" if args.data_dir and is_imagefolder(args.data_dir) else "idx"
    if data_format == "imagefolder":
        from fedmqtt.imagefolder import load_imagefolder
        from fedmqtt.models import model_input_shape

        whole = load_imagefolder(args.data_dir, dataset=args.dataset, input_shape=model_input_shape(args.image_model))
        log.info("read %d images of %s (ImageFolder)", len(whole), args.data_dir)
        if args.partition is None:
            return [whole] * len(devices)
        spec = PartitionSpec.parse(args.partition)
        return [select_part(whole, spec, args.num_parts, part, args.seed) for _, part in devices if part is not None]
    data_dir = resolve_data_dir(args.data_dir, args.dataset, split="train")
    if args.partition is None:  # a board: all of its own data, shared by its devices
        return [load_dataset(args.dataset, data_dir, train=True)] * len(devices)
    # simulated devices: only this process's parts are read and normalised, never the whole set
    spec = PartitionSpec.parse(args.partition)
    wanted = [part for _, part in devices if part is not None]
    return load_parts(args.dataset, data_dir, spec, args.num_parts, wanted, args.seed)


def _serve_only(args: argparse.Namespace, server: Any, stop_requested: list[int]) -> int:
    if stop_requested:
        return 0
    try:
        server.connect(timeout=args.connect_timeout)
        server.run_until_stopped()
    finally:
        server.close()
    return 0


def _serve(
    args: argparse.Namespace,
    broker: Any,
    devices: list[tuple[str, int | None]],
    runtimes: list[Any],
    stop_requested: list[int],
) -> int:
    from fedmqtt.device.agent import DeviceOptions, DeviceRuntime

    server = None
    if args.serve or args.serve_only:
        from fedmqtt.device.serve import ReleaseServer

        server = ReleaseServer(
            broker,
            job=args.job,
            prefix=args.prefix,
            device_id=devices[0][0],
            serve_dir=args.serve_dir,
            model=args.serve_model,
        )
        runtimes.append(server)  # a signal stops it as it stops the devices
        if args.serve_only:
            return _serve_only(args, server, stop_requested)
    datasets = _load_data(args, devices)

    options = DeviceOptions(
        broker=broker,
        job=args.job,
        prefix=args.prefix,
        state_dir=args.state_dir,
        privacy_budget=args.privacy_budget,
        max_train_seconds=args.max_train_seconds,
        exit_on_finish=args.exit_on_finish,
    )
    runtime = DeviceRuntime(options, threads=args.threads, train_seed=args.train_seed)
    for (device_id, _), dataset in zip(devices, datasets, strict=True):
        runtime.add_device(device_id, dataset)
    del datasets

    runtimes.append(runtime)
    if stop_requested:  # stopped while the data loaded: nothing connected, nothing to announce
        log.info("stopped before connecting")
        return 0
    try:
        if server is not None:
            server.connect(timeout=args.connect_timeout)
        runtime.connect_all(timeout=args.connect_timeout)
        log.info("%d device(s) connected to %s", len(devices), broker.url)
        code = runtime.run()
        if server is not None and runtime.finished_phase is not None:
            server.wait_idle()  # --exit-on-finish: keep the release the job ended with first
        return int(code)
    finally:
        runtime.close()
        if server is not None:
            server.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
