"""The demos as a user runs them: `make demo` and `make demo-private`, timed, with what they reached.

Runs the Makefile targets themselves (so the figures are of exactly what the README promises), each `--repeat`
times, and reads each run's `report.json`. The baseline in the same run is the machine's own load: the 1-minute
load average before and after each run is recorded beside its wall time, because the 2-core machines these figures
come from are shared.

    .venv/bin/python benchmarks/demo.py [--targets demo demo-private] [--repeat 2] [--json benchmarks/results/demo.json]

Data: as the demos resolve it (`--data-dir`, `$FEDMQTT_DATA`, the user cache); on our machines set
FEDMQTT_DATA=../shared/data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = {"demo": REPO / "runs" / "demo", "demo-private": REPO / "runs" / "demo-private"}


def run_target(target: str) -> dict[str, object]:
    before = os.getloadavg()[0]
    started = time.monotonic()
    # -o .venv/.installed: measure the demo, not a reinstall triggered by a newer pyproject.toml.
    result = subprocess.run(
        ["make", "-s", "-o", ".venv/.installed", target], cwd=REPO, capture_output=True, text=True, check=False
    )
    wall = time.monotonic() - started
    after = os.getloadavg()[0]
    if result.returncode != 0:
        raise SystemExit(f"make {target} failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    report = json.loads((OUT[target] / "report.json").read_text())
    totals = report["totals"]
    rounds = max(int(totals["rounds_completed"]), 1)
    return {
        "target": target,
        "wall_seconds": round(wall, 1),
        "load_before": round(before, 2),
        "load_after": round(after, 2),
        "rounds": totals["rounds_completed"],
        "final_accuracy": totals["final_accuracy"],
        "megabytes_per_round": round(float(totals["megabytes"]) / rounds, 2),
        "epsilon": totals.get("epsilon"),
        "delta": totals.get("delta"),
        "phase": totals.get("phase"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=["demo", "demo-private"], choices=sorted(OUT))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    rows = [run_target(target) for target in args.targets for _ in range(args.repeat)]
    header = f"{'target':<13} {'wall s':>7} {'load':>11} {'rounds':>6} {'accuracy':>8} {'MB/round':>8} {'epsilon':>8}"
    print(header)
    for r in rows:
        eps = "" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        load = f"{r['load_before']:.1f}-{r['load_after']:.1f}"
        print(
            f"{r['target']:<13} {r['wall_seconds']:>7.1f} {load:>11} {r['rounds']:>6} "
            f"{float(r['final_accuracy'] or 0):>8.4f} {r['megabytes_per_round']:>8.2f} {eps:>8}"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu_count": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
