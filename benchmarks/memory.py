"""Benchmark the memory of a device process and of each virtual device in it (not a test).

One fresh subprocess per measurement, as ``fedmqtt device --id-prefix ... --parts A:B`` sets itself up (nothing
is connected: the broker plays no part in memory), reading its own ``/proc/self/status``:

- ``baseline``: Python, torch (one thread), fedmqtt's device modules and the McMahan et al. (2017) MNIST CNN built;
  no data;
- then the same plus N virtual devices (``DeviceRuntime.add_device``) holding parts 0..N-1 of MNIST's training
  set split IID into ``--num-parts`` (100: 600 images each, McMahan's split), loaded two ways:
  ``old``: the whole set loaded and normalised, then each part sliced out (``load_dataset`` + ``partition`` +
  ``subset``: what ``fedmqtt device`` did before issue #13; the coordinator still loads its test set so), and
  ``lean``: ``load_parts``, which reads the labels, then only the parts' image rows.

For each: VmRSS once the devices are set up (the process's resident memory from then on), VmHWM (its peak
while loading; a simulation starts its device processes at once, so their peaks add up), and per virtual device
``(RSS_N - RSS_baseline) / N`` with the baseline from its own subprocess.
Goal (issue #13): a virtual device with its data <= 30 MB beyond the shared model and torch runtime.

    .venv/bin/python benchmarks/memory.py [--data-dir DIR] [--devices 1,10,100] [--json PATH] [--quick]

MNIST IDX files come from fedmqtt.data.resolve_data_dir: --data-dir, else $FEDMQTT_DATA, else the download cache
(~/.cache/fedmqtt/mnist).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _runner as R

REPO = Path(__file__).resolve().parent.parent
GOAL_MB = 30.0  # per virtual device, beyond the shared model and torch runtime
MODES = ("old", "lean")


def status_mb() -> dict[str, float]:
    """VmRSS and VmHWM of this process, in MB (10^6 bytes)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024 / 1e6  # the kernel reports kB (KiB)
    return fields


def child(mode: str, devices: int, data_dir: str, num_parts: int, seed: int) -> dict[str, Any]:
    """One measurement, in this (fresh) process: what a device process holds with ``devices`` virtual devices."""
    import gc

    import torch

    from fedmqtt.data import PartitionSpec, load_dataset, load_parts, partition
    from fedmqtt.device.agent import DeviceOptions, DeviceRuntime
    from fedmqtt.models import build_model
    from fedmqtt.mqtt import BrokerSettings

    torch.set_num_threads(1)
    model = build_model("cnn", seed=seed)
    runtime = DeviceRuntime(DeviceOptions(broker=BrokerSettings(), job="memory"), threads=1)
    runtime._models["cnn"] = model  # the one shared model copy a process keeps (DeviceRuntime._model)
    gc.collect()
    before = status_mb()
    started = time.perf_counter()
    spec = PartitionSpec.parse("iid")
    wanted = list(range(devices))
    if mode == "old":
        full = load_dataset("mnist", data_dir, train=True)
        cut = partition(full.labels.numpy(), spec, num_parts, seed)
        datasets = [full.subset(cut[part]) for part in wanted]
        del full, cut
    elif mode == "lean":
        datasets = load_parts("mnist", data_dir, spec, num_parts, wanted, seed)
    else:
        assert mode == "baseline" and devices == 0
        datasets = []
    for part, dataset in zip(wanted, datasets, strict=True):
        runtime.add_device(f"dev-{part:04d}", dataset)
    samples = sum(len(d) for d in datasets)
    del datasets
    gc.collect()
    seconds = time.perf_counter() - started
    after = status_mb()
    return {
        "mode": mode,
        "devices": devices,
        "samples": samples,
        "load_seconds": seconds,
        "rss_before_mb": before["VmRSS"],
        "rss_mb": after["VmRSS"],
        "hwm_mb": after["VmHWM"],
        "pid": os.getpid(),
    }


def measure(mode: str, devices: int, args: argparse.Namespace, data_dir: str) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", mode, str(devices), "--data-dir", data_dir,
            "--num-parts", str(args.num_parts), "--seed", str(args.seed)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"measurement {mode} × {devices} failed (exit {done.returncode}):\n{done.stderr}")
    record: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return record


def print_table(baseline: dict[str, Any], records: list[dict[str, Any]], title: str) -> None:
    columns = ("path", "devices", "samples", "RSS MB", "MB / device", "peak MB", "peak - base MB", "load s")
    base = baseline["rss_mb"]
    rows = [("baseline", "0", "0", f"{base:.0f}", "", f"{baseline['hwm_mb']:.0f}", "", "")] + [
        (r["mode"], str(r["devices"]), f"{r['samples']:,}", f"{r['rss_mb']:.0f}", f"{r['mb_per_device']:.1f}",
         f"{r['hwm_mb']:.0f}", f"{r['hwm_mb'] - base:.0f}", f"{r['load_seconds']:.2f}")
        for r in records
    ]  # fmt: skip
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # the sim extra is absent: a plain table will do
        print(title)
        for row in [columns, *rows]:
            print("  ".join(f"{c:>12s}" for c in row))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == "path" else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(100, Console().width)).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="directory with the MNIST IDX files")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "memory.json")
    parser.add_argument("--devices", default="1,10,100", help="virtual devices per process, comma-separated")
    parser.add_argument("--num-parts", type=int, default=100, help="parts MNIST is split into (IID)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1 and 10 devices only")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DEVICES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    R.quick_json(args, parser)

    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.data_dir, args.num_parts, args.seed)))
        return 0

    from fedmqtt.data import resolve_data_dir

    data_dir = str(resolve_data_dir(args.data_dir, "mnist", split="train"))
    counts = [1, 10] if args.quick else [int(n) for n in args.devices.split(",")]
    if any(not 1 <= n <= args.num_parts for n in counts):
        parser.error(f"--devices must lie in 1..{args.num_parts} (--num-parts)")
    baseline = measure("baseline", 0, args, data_dir)
    records = []
    for devices in counts:
        for mode in MODES:
            record = measure(mode, devices, args, data_dir)
            record["mb_per_device"] = (record["rss_mb"] - baseline["rss_mb"]) / devices
            record["peak_over_baseline_mb"] = record["hwm_mb"] - baseline["rss_mb"]
            records.append(record)
            print(f"{mode} × {devices}: {record['mb_per_device']:.1f} MB per device", file=sys.stderr)
    title = (
        f"Device process memory: CNN + MNIST parts of {60000 // args.num_parts} images (IID, {args.num_parts} parts), "
        "one subprocess per row"
    )
    print_table(baseline, records, title)

    lean_worst = max((r["mb_per_device"] for r in records if r["mode"] == "lean"), default=0.0)
    failed = [f"lean: {lean_worst:.1f} MB per virtual device > {GOAL_MB}"] if lean_worst > GOAL_MB else []
    import numpy as np
    import torch

    result = {
        "configuration": {
            "model": "cnn",
            "dataset": "mnist",
            "data_dir": data_dir,
            "partition": "iid",
            "num_parts": args.num_parts,
            "devices": counts,
            "seed": args.seed,
            "torch_threads": 1,
            "quick": args.quick,
            "measure": "VmRSS / VmHWM from /proc/self/status of one fresh subprocess per row; MB = 10^6 bytes",
        },
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
        "baseline": baseline,
        "records": records,
        "goal_mb_per_device": GOAL_MB,
        "targets_missed": failed,
    }
    return R.finish(args.json, result, failed)


if __name__ == "__main__":
    sys.exit(main())
