"""Benchmark the coordinator's decode + accumulate path against the memory-bound limit (not a test).

What a coordinator does for each accepted update frame, timed for a round of N updates (100 by default) of
the McMahan et al. (2017) MNIST CNN (1,663,370 parameters, 6.65 MB as float32) per uplink codec:
``fedmqtt.codecs.decode_frame`` (checks, zstd, checksum, dequantise / scatter) then
``build_strategy("fedavg").add`` (the streaming weighted sum). Beside it, in the same run, the limit: a plain
numpy sum of the same N updates already decoded to float32 (``acc += u`` per tensor), which only streams
memory. For each codec it reports updates/s, MB/s of float32 model folded in, the ratio to the limit, and the
split between decoding and adding. Timings are the best of ``--repeats`` passes over the whole round, in CPU
seconds of this one-threaded process (``time.process_time``: other work on a shared machine stretches wall time,
not this); the limit is measured before and after the codecs, and the faster of the two kept.

The updates are N distinct draws of Gaussian noise shaped like the CNN's tensors (the path's speed does not
depend on the values: no training, no data set needed); top-k keeps the same number of entries whatever they
are. Goal (issue #13): int8 at >= 0.5 of the limit.

    .venv/bin/python benchmarks/aggregation.py [--updates N] [--repeats R] [--codecs A,B] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard

import _runner as R
from fedmqtt.arrays import ModelArrays, numel
from fedmqtt.codecs import decode_frame, encode_frame
from fedmqtt.coordinator.aggregation import build_strategy
from fedmqtt.models import build_model, get_arrays
from fedmqtt.schema import CodecSpec, FrameKind

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CODECS = ("float32", "float16", "int8", "int8c", "topk:0.01+int8", "topk:0.001+int8")
TARGET = ("int8", 0.5)  # codec, minimum ratio of its throughput to the numpy limit
WEIGHT = 600  # num_samples of each update: McMahan's 600 images per device


def make_updates(shapes: dict[str, tuple[int, ...]], count: int, seed: int) -> list[ModelArrays]:
    """``count`` distinct updates shaped like the model: Gaussian, scaled like a local epoch's delta."""
    rng = np.random.default_rng(seed)
    return [
        {name: (rng.standard_normal(shape, dtype=np.float32) * np.float32(1e-2)) for name, shape in shapes.items()}
        for _ in range(count)
    ]


def encode(update: ModelArrays, codec: CodecSpec, sender: str, rng: np.random.Generator) -> bytes:
    """A device's update frame, as a device sends it."""
    return encode_frame(
        update, kind=FrameKind.UPDATE, job="bench", round=1, sender=sender, codec=codec, num_samples=WEIGHT, rng=rng
    )


def best_seconds(action: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        gc.collect()
        started = time.process_time()
        action()
        best = min(best, time.process_time() - started)
    return best


def numpy_limit(updates: list[ModelArrays], repeats: int) -> float:
    """Seconds to sum the float32 updates into one float32 accumulator: what the memory bus allows."""
    accumulator = {k: np.zeros_like(v) for k, v in updates[0].items()}

    def fold() -> None:
        for acc in accumulator.values():
            acc.fill(0.0)
        for update in updates:
            for k, acc in accumulator.items():
                acc += update[k]

    return best_seconds(fold, repeats)


def measure(updates: list[ModelArrays], global_arrays: ModelArrays, codec_text: str, repeats: int) -> dict[str, Any]:
    codec = CodecSpec.parse(codec_text)
    frames = [encode(update, codec, f"dev-{i:04d}", np.random.default_rng(i)) for i, update in enumerate(updates)]
    strategy = build_strategy("fedavg")
    decoded = [decode_frame(frame).arrays for frame in frames[:1]]

    def decode_and_add() -> None:
        strategy.begin_round(global_arrays)
        for frame in frames:
            strategy.add(decode_frame(frame).arrays, WEIGHT)

    def decode_only() -> None:
        for frame in frames:
            decode_frame(frame)

    total_s = best_seconds(decode_and_add, repeats)
    decode_s = best_seconds(decode_only, repeats)
    # The add on its own, on decoded arrays (decoding them all at once would hold N dense models; one is
    # added N times instead, which streams the same bytes).
    one = decoded[0]

    def add_only() -> None:
        strategy.begin_round(global_arrays)
        for _ in frames:
            strategy.add(one, WEIGHT)

    add_s = best_seconds(add_only, repeats)
    raw_mb = len(frames) * 4 * numel(updates[0]) / 1e6
    return {
        "codec": codec_text,
        "spec": str(codec),
        "frame_bytes": int(np.mean([len(f) for f in frames])),
        "seconds": total_s,
        "updates_per_s": len(frames) / total_s,
        "mb_per_s": raw_mb / total_s,
        "decode_seconds": decode_s,
        "add_seconds": add_s,
    }


def print_table(records: list[dict[str, Any]], limit: dict[str, Any], title: str) -> None:
    columns = ("codec", "frame bytes", "updates/s", "MB/s", "× limit", "decode s", "add s", "round s")
    rows = [
        ("numpy limit (float32 sum)", "", f"{limit['updates_per_s']:.0f}", f"{limit['mb_per_s']:.0f}", "1.00",
         "", "", f"{limit['seconds']:.3f}")
    ] + [
        (r["codec"], f"{r['frame_bytes']:,}", f"{r['updates_per_s']:.0f}", f"{r['mb_per_s']:.0f}",
         f"{r['ratio_vs_numpy_limit']:.2f}", f"{r['decode_seconds']:.3f}", f"{r['add_seconds']:.3f}",
         f"{r['seconds']:.3f}")
        for r in records
    ]  # fmt: skip
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # the sim extra is absent: a plain table will do
        print(title)
        print("  ".join(f"{c:>12s}" for c in columns))
        for row in rows:
            print("  ".join(f"{c:>12s}" for c in row))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == "codec" else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(110, Console().width)).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "aggregation.json")
    parser.add_argument("--updates", type=int, default=100, help="updates in the round (distinct frames)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the round (best is kept)")
    parser.add_argument("--codecs", default=",".join(DEFAULT_CODECS), help="comma-separated uplink codec strings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20 updates, 3 repeats (about half a minute)")
    args = parser.parse_args(argv)
    R.quick_json(args, parser)
    if args.quick:
        args.updates, args.repeats = 20, 3
    if args.updates < 1 or args.repeats < 1:
        parser.error("--updates and --repeats must be at least 1")

    torch.set_num_threads(1)
    global_arrays = get_arrays(build_model("cnn", seed=args.seed))
    updates = make_updates({k: v.shape for k, v in global_arrays.items()}, args.updates, args.seed)
    parameters = numel(global_arrays)
    raw_mb = args.updates * 4 * parameters / 1e6
    limit_s = numpy_limit(updates, args.repeats)
    records = []
    for text in (t.strip() for t in args.codecs.split(",")):
        if text:
            records.append(measure(updates, global_arrays, text, args.repeats))
            print(f"{text}: {records[-1]['seconds']:.3f} s", file=sys.stderr)
    limit_s = min(limit_s, numpy_limit(updates, args.repeats))
    limit = {"seconds": limit_s, "updates_per_s": args.updates / limit_s, "mb_per_s": raw_mb / limit_s}
    for record in records:
        record["ratio_vs_numpy_limit"] = limit_s / record["seconds"]
    title = (
        f"FedAvg decode + add of {args.updates} MNIST CNN updates ({parameters:,} parameters, "
        f"{4 * parameters / 1e6:.2f} MB as float32), one thread, best of {args.repeats} (CPU seconds)"
    )
    print_table(records, limit, title)

    failed = []
    by_codec = {CodecSpec.parse(r["spec"]).model_dump_json(): r for r in records}
    record = by_codec.get(CodecSpec.parse(TARGET[0]).model_dump_json())
    if record is not None and record["ratio_vs_numpy_limit"] < TARGET[1]:
        failed.append(f"{TARGET[0]}: {record['ratio_vs_numpy_limit']:.2f} of the numpy limit < {TARGET[1]}")

    result = {
        "configuration": {
            "model": "cnn",
            "parameters": parameters,
            "float32_bytes": 4 * parameters,
            "updates": args.updates,
            "weight": WEIGHT,
            "strategy": "fedavg",
            "repeats": args.repeats,
            "seed": args.seed,
            "threads": 1,
            "clock": "time.process_time (CPU seconds of the one-threaded benchmark process)",
            "quick": args.quick,
        },
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "zstandard": zstandard.__version__,
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
        "numpy_limit": limit,
        "records": records,
        "targets_missed": failed,
    }
    return R.finish(args.json, result, failed)


if __name__ == "__main__":
    sys.exit(main())
