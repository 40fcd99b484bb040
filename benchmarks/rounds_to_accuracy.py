"""Rounds to 99 % and 97 % test accuracy through the real system, beside McMahan et al. 2017 (issue #13, benchmark 2).

The paper's Table 2 setting: 100 devices, C = 0.1 (10 devices per round), the CNN, E = 5, B = 10, IID and the
pathological non-IID split (2 shards of one class each per device: ``--partition shards:2``), run with
``fedmqtt simulate`` on Mosquitto. Each run stops at 99 % (``--target-accuracy``) or after ``--max-rounds``.
Reported per partition: rounds to 99 % and to 97 %, best accuracy, uplink bytes (to 99 % and in all), the curve;
beside it the paper's rounds to 99 % and the uplink bytes they imply (rounds x 10 devices x the float32 model,
as the paper's devices send it). The uplink codec is fedmqtt's default (int8) unless --uplink says otherwise.

    .venv/bin/python benchmarks/rounds_to_accuracy.py --max-rounds 300     # both partitions: hours on 2 cores
    .venv/bin/python benchmarks/rounds_to_accuracy.py --partitions iid      # IID alone (~20 rounds)
    .venv/bin/python benchmarks/rounds_to_accuracy.py --quick               # IID, 3 rounds, 6,000 images (minutes)

Results: a table on stdout, JSON at --json (default benchmarks/results/rounds_to_accuracy.json; --quick:
rounds_to_accuracy-quick.json), rewritten after each partition.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import _runner as R

# McMahan, Moore, Ramage, Hampson, Agüera y Arcas: "Communication-Efficient Learning of Deep Networks from
# Decentralized Data", AISTATS 2017, Table 2: FedAvg, MNIST CNN, E = 5, B = 10, C = 0.1, rounds to 99 % accuracy.
PAPER = "McMahan et al. 2017, Table 2 (CNN, E=5, B=10, C=0.1)"
PAPER_ROUNDS_TO_99 = {"iid": 20, "shards:2": 229}
TARGETS = (0.99, 0.97)
GOAL_IID_ROUNDS = 20
SETTING = {"devices": 100, "devices_per_round": 10, "model": "cnn", "local_epochs": 5, "batch_size": 10}
QUICK = {"partitions": ["iid"], "max_rounds": 3}


def float32_model_bytes(model: str) -> int:
    from fedmqtt.models import parameter_count

    return 4 * parameter_count(model)


def outcome(run: R.SimRun, partition: str) -> dict[str, Any]:
    """Rounds to each target, best accuracy and uplink bytes of one run, beside the paper's figures."""
    rounds = run.rounds
    curve = [(r["round"], r["accuracy"]) for r in rounds]
    reached = R.rounds_to(curve, TARGETS[0])
    cumulative_up = 0
    up_to_99 = None
    for r in rounds:
        cumulative_up += r["bytes_up"]
        if reached is not None and r["round"] == reached:
            up_to_99 = cumulative_up
    paper_rounds = PAPER_ROUNDS_TO_99.get(partition)
    per_round = run.job.devices_per_round or run.job.devices
    paper_up = None if paper_rounds is None else paper_rounds * per_round * float32_model_bytes(run.job.model)
    return {
        "partition": partition,
        "rounds_run": len(rounds),
        "rounds_to_99": reached,
        "rounds_to_97": R.rounds_to(curve, TARGETS[1]),
        "best_accuracy": run.totals["best_accuracy"],
        "uplink_bytes": run.totals["bytes_up"],
        "uplink_bytes_to_99": up_to_99,
        "paper_rounds_to_99": paper_rounds,
        "paper_uplink_bytes_to_99": paper_up,
        "uplink_ratio_vs_paper": R.ratio(paper_up, up_to_99, 1),
        "round_seconds": run.totals["round_seconds"],
        "curve": curve,
        "uplink": run.job.uplink,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    body = [
        [
            r["partition"],
            str(r["rounds_run"]),
            R.fmt(r["rounds_to_97"], "d"),
            R.fmt(r["rounds_to_99"], "d"),
            R.fmt(r["paper_rounds_to_99"], "d"),
            R.fmt(r["best_accuracy"], ".4f"),
            f"{r['uplink_bytes'] / 1e6:.1f}",
            R.fmt(r["uplink_bytes_to_99"] and r["uplink_bytes_to_99"] / 1e6, ".1f"),
            R.fmt(r["paper_uplink_bytes_to_99"] and r["paper_uplink_bytes_to_99"] / 1e6, ".0f"),
            f"{r['round_seconds']:.0f}",
        ]
        for r in rows
    ]
    header = ["partition", "rounds", "to 97%", "to 99%", "paper 99%", "best", "MB up", "MB up to 99%"]
    print(R.table([*header, "paper MB up", "s"], body))
    for r in rows:
        print(f"{r['partition']} curve: " + " ".join(f"{n}:{R.fmt(a, '.4f')}" for n, a in r["curve"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    R.common_flags(parser, "rounds_to_accuracy")
    parser.add_argument("--partitions", nargs="+", default=list(PAPER_ROUNDS_TO_99), help="iid, shards:2, ...")
    parser.add_argument(
        "--max-rounds", type=int, default=300, help="rounds at most per partition (default: %(default)s)"
    )
    parser.add_argument("--lr", type=float, default=0.05, help="local learning rate (default: %(default)s)")
    parser.add_argument("--uplink", default="int8", help="device update codec (default: %(default)s, fedmqtt's)")
    parser.set_defaults(timeout=86_400.0)  # a non-IID run to 99 % takes hundreds of rounds
    args = parser.parse_args(argv)
    if args.max_rounds < 1:
        parser.error("--max-rounds must be >= 1")
    if args.quick:
        args.partitions, args.max_rounds = QUICK["partitions"], QUICK["max_rounds"]
        R.quick_json(args, parser)
    return args


def job_for(args: argparse.Namespace, partition: str) -> R.Job:
    return R.Job(
        **SETTING,  # type: ignore[arg-type]
        rounds=args.max_rounds,
        lr=args.lr,
        partition=partition,
        uplink=args.uplink,
        target_accuracy=TARGETS[0],
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = R.prepared_data(args)
    rows: list[dict[str, Any]] = []
    for partition in args.partitions:
        job = job_for(args, partition)
        print(f"rounds_to_accuracy: {job.label()}", file=sys.stderr)
        run = R.run_simulate(job, data=data, out_dir=args.out / partition.replace(":", "-"), timeout=args.timeout)
        rows.append(outcome(run, partition))
        R.write_json(
            args.json,
            {"paper": PAPER, "goal_iid_rounds_to_99": GOAL_IID_ROUNDS, "setting": SETTING, "max_rounds": args.max_rounds,
             "lr": args.lr, "train_samples": args.train_samples, "machine": R.machine(), "rows": rows},
        )  # fmt: skip
    print(f"setting: {SETTING} lr {args.lr:g}, uplink {args.uplink}, at most {args.max_rounds} rounds; paper: {PAPER}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
