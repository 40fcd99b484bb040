"""Benchmark the wire-frame codecs on a real update (not a test).

The update: the McMahan et al. (2017) MNIST CNN (1,663,370 parameters) trained for one local epoch
of SGD on 600 MNIST training images, minus its starting weights. For every codec configuration it
measures the frame size, the compression ratio against the raw float32 tensors (4 bytes/parameter),
the relative L2 error of the decoded update, and encode/decode throughput in MB of float32 per second
(best of several repeats). It also compares ways of coding top-k indices under zstd.

    .venv/bin/python benchmarks/codecs.py [--data-dir DIR] [--json PATH] [--repeats N]

MNIST IDX files come from fedmqtt.data.resolve_data_dir: --data-dir, else $FEDMQTT_DATA, else the
download cache (~/.cache/fedmqtt/mnist).
"""

from __future__ import annotations

import argparse
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
from fedmqtt.arrays import ModelArrays, l2_norm, numel, subtract
from fedmqtt.codecs import decode_frame, encode_frame
from fedmqtt.codecs.encodings import kept_count
from fedmqtt.data import load_dataset, resolve_data_dir
from fedmqtt.models import build_model, get_arrays
from fedmqtt.schema import CodecSpec, FrameKind
from fedmqtt.training import train_local

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CODECS = (
    "float32",
    "float16",
    "int8",
    "int8c",
    "int8s",
    "int8+zstd:9",
    "topk:0.1+float16",
    "topk:0.1+int8",
    "topk:0.01+float32",
    "topk:0.01+float16",
    "topk:0.01+int8",
    "topk:0.01+int8c",
    "topk:0.001+float16",
    "topk:0.001+int8",
)
TARGETS = {"int8": ("ratio_vs_float32", 3.9), "topk:0.01+int8": ("ratio_vs_float32", 100.0)}
DECODE_TARGET = ("int8", 200.0)


def real_update(directory: Path, samples: int, batch_size: int, lr: float, seed: int) -> ModelArrays:
    """One local epoch of the MNIST CNN on the first ``samples`` training images, minus the start."""
    dataset = load_dataset("mnist", directory, train=True).subset(np.arange(samples))
    model = build_model("cnn", seed=seed)
    start = get_arrays(model)
    result = train_local(model, dataset, epochs=1, batch_size=batch_size, lr=lr, seed=seed)
    print(f"trained 1 epoch on {samples} samples: loss {result.loss:.3f} in {result.seconds:.1f} s", file=sys.stderr)
    return subtract(get_arrays(model), start)


def best_seconds(action: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def measure(update: ModelArrays, codec_text: str, repeats: int) -> dict[str, Any]:
    codec = CodecSpec.parse(codec_text)
    raw_bytes = 4 * numel(update)

    def encode() -> bytes:
        return encode_frame(
            update, kind=FrameKind.UPDATE, job="bench", round=1, sender="dev-1", codec=codec,
            num_samples=600, rng=np.random.default_rng(0),
        )  # fmt: skip

    frame = encode()
    decoded = decode_frame(frame).arrays
    encode_s = best_seconds(encode, repeats)
    decode_s = best_seconds(lambda: decode_frame(frame), repeats)
    return {
        "codec": codec_text,
        "spec": str(codec),
        "bytes": len(frame),
        "ratio_vs_float32": raw_bytes / len(frame),
        "rel_l2_error": l2_norm(subtract(decoded, update)) / l2_norm(update),
        "encode_mb_s": raw_bytes / 1e6 / encode_s,
        "decode_mb_s": raw_bytes / 1e6 / decode_s,
    }


def _varint(gaps: np.ndarray) -> bytes:
    out = bytearray()
    for g in gaps.tolist():  # fine here: a one-off comparison, not the codec
        while g >= 0x80:
            out.append((g & 0x7F) | 0x80)
            g >>= 7
        out.append(g)
    return bytes(out)


def index_codings(update: ModelArrays, fraction: float, level: int) -> dict[str, Any]:
    """zstd-compressed size of the top-k indices of every tensor under four codings."""
    sizes = {"varint_gaps": 0, "uint32_gaps": 0, "uint32_gaps_byte_shuffled": 0, "bitmap": 0}
    kept = 0
    compressor = zstandard.ZstdCompressor(level=level)
    for value in update.values():
        flat = value.ravel()
        k = kept_count(flat.size, fraction)
        index = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
        gaps = np.diff(index, prepend=np.zeros(1, index.dtype)).astype("<u4")
        mask = np.zeros(flat.size, bool)
        mask[index] = True
        coded = {
            "varint_gaps": _varint(gaps),
            "uint32_gaps": gaps.tobytes(),
            "uint32_gaps_byte_shuffled": gaps.view(np.uint8).reshape(-1, 4).T.tobytes(),
            "bitmap": np.packbits(mask).tobytes(),
        }
        for name, raw in coded.items():
            sizes[name] += len(compressor.compress(raw))
        kept += k
    return {
        "topk": fraction,
        "zstd_level": level,
        "kept": kept,
        "bytes": sizes,
        "bits_per_index": {k: round(8 * v / kept, 2) for k, v in sizes.items()},
    }


def print_table(records: list[dict[str, Any]], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a dependency, but a plain table will do
        print(title)
        for r in records:
            print(
                f"{r['codec']:28s} {r['bytes']:>10,d} {r['ratio_vs_float32']:>8.1f} {r['rel_l2_error']:>8.4f} "
                f"{r['encode_mb_s']:>8.0f} {r['decode_mb_s']:>8.0f}"
            )
        return
    table = Table(title=title)
    for column in ("codec", "bytes", "ratio vs float32", "rel. L2 error", "encode MB/s", "decode MB/s"):
        table.add_column(column, justify="left" if column == "codec" else "right")
    for r in records:
        table.add_row(
            r["codec"],
            f"{r['bytes']:,}",
            f"{r['ratio_vs_float32']:.1f}",
            f"{r['rel_l2_error']:.4f}",
            f"{r['encode_mb_s']:.0f}",
            f"{r['decode_mb_s']:.0f}",
        )
    Console(width=max(100, Console().width)).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="directory with the MNIST IDX files")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "codecs.json")
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats per codec (best is kept)")
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codecs", default=",".join(DEFAULT_CODECS), help="comma-separated codec strings")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the training step")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    update = real_update(
        resolve_data_dir(args.data_dir, "mnist", split="train"), args.samples, args.batch_size, args.lr, args.seed
    )
    parameters = numel(update)
    records = [measure(update, text.strip(), args.repeats) for text in args.codecs.split(",") if text.strip()]
    title = (
        f"MNIST CNN update ({parameters:,} parameters, {4 * parameters / 1e6:.2f} MB as float32), "
        f"best of {args.repeats}"
    )
    print_table(records, title)
    studies = [index_codings(update, fraction, 1) for fraction in (0.1, 0.01, 0.001)]
    for study in studies:
        print(f"top-{study['topk']:g} index coding, bits/index after zstd: {study['bits_per_index']}")

    by_codec = {CodecSpec.parse(r["spec"]).model_dump_json(): r for r in records}
    failed = []
    for text, (field, minimum) in TARGETS.items():
        record = by_codec.get(CodecSpec.parse(text).model_dump_json())
        if record is not None and record[field] < minimum:
            failed.append(f"{text}: {field} {record[field]:.1f} < {minimum}")
    record = by_codec.get(CodecSpec.parse(DECODE_TARGET[0]).model_dump_json())
    if record is not None and record["decode_mb_s"] < DECODE_TARGET[1]:
        failed.append(f"{DECODE_TARGET[0]}: decode {record['decode_mb_s']:.0f} MB/s < {DECODE_TARGET[1]}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "update": {
            "model": "cnn",
            "parameters": parameters,
            "float32_bytes": 4 * parameters,
            "samples": args.samples,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "epochs": 1,
            "seed": args.seed,
        },
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "zstandard": zstandard.__version__,
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
        "repeats": args.repeats,
        "records": records,
        "index_coding": studies,
        "targets_missed": failed,
    }
    return R.finish(args.json, result, failed)


if __name__ == "__main__":
    sys.exit(main())
