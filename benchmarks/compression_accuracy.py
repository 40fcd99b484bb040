"""Accuracy against bytes per uplink and downlink codec through the real system (issue #13, benchmark 3).

The job of benchmarks/overhead.py (10 devices, 5 rounds, the McMahan et al. CNN, E = 1, B = 10, lr 0.05, IID)
run with ``fedmqtt simulate`` on Mosquitto once per uplink codec (downlink float32) and once per downlink codec
(uplink float32); the float32/float32 run is the baseline of both columns, measured in the same run. Per run:
final accuracy, uplink bytes per update and per round, downlink bytes per round, and their ratios to float32.
Goals: >= 250x fewer uplink bytes than float32 at <= 0.5 point accuracy loss after the same rounds; >= 8x fewer
downlink bytes at <= 0.3 point.

    .venv/bin/python benchmarks/compression_accuracy.py            # 10 runs of the job (~40 min on 2 idle cores)
    .venv/bin/python benchmarks/compression_accuracy.py --quick    # mlp, 2 rounds, 6,000 images (minutes)
    .venv/bin/python benchmarks/compression_accuracy.py --uplinks float32 int8 --downlinks float32
    .venv/bin/python benchmarks/compression_accuracy.py --model mlp --rounds 15 --seed 1 --uplinks float32 \
        gtopk:0.0105+sign+ef --downlinks float32 --json benchmarks/results/compression_accuracy-seed1.json

Results: a table on stdout, JSON at --json (default benchmarks/results/compression_accuracy.json; --quick:
compression_accuracy-quick.json), rewritten after every run.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from typing import Any

import _runner as R

BASELINE = "float32"
# CodecSpec strings (fedmqtt.schema.CodecSpec.parse): top-k fraction (per tensor, or gtopk: of the whole model),
# value encoding (sign: 1 bit per kept value, one scale per tensor, Rice-coded indices), error feedback;
# warmup:N keeps 2**(N+1-r) times the fraction in round r <= N (its bytes count in the average).
UPLINK_CODECS = ("float32", "float16", "int8", "topk:0.01+int8+ef", "topk:0.001+int8+ef", "gtopk:0.011+sign+ef")
# --downlink: float32 publishes the model whole; any other codec also publishes a delta frame against the model
# the devices hold, with error feedback on the coordinator (so no 'ef' here); top-k keeps that fraction of it.
DOWNLINK_CODECS = ("float32", "float16", "int8", "topk:0.1+int8", "topk:0.01+int8")
GOAL = {"uplink_ratio_vs_float32": 250.0, "max_accuracy_loss_points": 0.5}
DOWNLINK_GOAL = {"downlink_ratio_vs_float32": 8.0, "max_accuracy_loss_points": 0.3}
QUICK = {"model": "mlp", "devices": 10, "rounds": 2}


def configurations(uplinks: list[str], downlinks: list[str]) -> list[tuple[str, str]]:
    """(uplink, downlink) pairs: the baseline first, then each uplink with a float32 downlink, each downlink
    with a float32 uplink."""
    pairs = [(BASELINE, BASELINE)]
    pairs += [(u, BASELINE) for u in uplinks if u != BASELINE]
    pairs += [(BASELINE, d) for d in downlinks if d != BASELINE]
    return pairs


def record(run: R.SimRun) -> dict[str, Any]:
    totals, rounds = run.totals, run.rounds
    updates = sum(r["participants"] for r in rounds)
    return {
        "uplink": run.job.uplink,
        "downlink": run.job.downlink,
        "final_accuracy": totals["final_accuracy"],
        "bytes_up_per_update": round(R.per_round(totals["bytes_up"], updates)),
        "bytes_up_per_round": round(R.per_round(totals["bytes_up"], len(rounds))),
        "bytes_down_per_round": round(R.per_round(totals["bytes_down"], len(rounds))),
        # Round 1 always sends whole models (the devices hold none yet): the later rounds show a delta downlink.
        "bytes_down_per_round_after_first": round(R.mean([r["bytes_down"] for r in rounds[1:]]) or 0) or None,
        # per path, where the report has them: delta frames applied, whole models fetched
        "bytes_down_delta": sum(r.get("bytes_down_delta") or 0 for r in rounds),
        "bytes_down_full": sum(r.get("bytes_down_full") or 0 for r in rounds),
        "rounds": len(rounds),
        "round_seconds": totals["round_seconds"],
        "curve": [(r["round"], r["accuracy"]) for r in rounds],
    }


def with_ratios(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each record with ``ratio_vs_float32`` (uplink bytes), ``downlink_ratio_vs_float32`` and
    ``accuracy_loss_points``, against the float32/float32 record of the same run."""
    base = next(r for r in records if r["uplink"] == BASELINE and r["downlink"] == BASELINE)
    out = []
    for r in records:
        loss = None
        if r["final_accuracy"] is not None and base["final_accuracy"] is not None:
            loss = round(100 * (base["final_accuracy"] - r["final_accuracy"]), 2)
        out.append(
            {
                **r,
                "ratio_vs_float32": R.ratio(base["bytes_up_per_update"], r["bytes_up_per_update"], 1),
                "downlink_ratio_vs_float32": R.ratio(base["bytes_down_per_round"], r["bytes_down_per_round"], 2),
                "downlink_ratio_after_first_round": R.ratio(
                    base["bytes_down_per_round_after_first"], r["bytes_down_per_round_after_first"], 1
                ),
                "accuracy_loss_points": loss,
            }
        )
    return out


def goal_met(records: list[dict[str, Any]], direction: str = "uplink") -> list[str]:
    """The ``direction`` ("uplink" or "downlink") codecs that reach that direction's goal."""
    other = "downlink" if direction == "uplink" else "uplink"
    goal, key = (GOAL, "ratio_vs_float32") if direction == "uplink" else (DOWNLINK_GOAL, "downlink_ratio_vs_float32")
    return [
        r[direction]
        for r in records
        if r[other] == BASELINE
        and r[direction] != BASELINE
        and (r[key] or 0) >= goal[f"{direction}_ratio_vs_float32"]
        and r["accuracy_loss_points"] is not None
        and r["accuracy_loss_points"] <= goal["max_accuracy_loss_points"]
    ]


def print_table(records: list[dict[str, Any]]) -> None:
    body = [
        [
            r["uplink"],
            r["downlink"],
            R.fmt(r["final_accuracy"], ".4f"),
            R.fmt(r["accuracy_loss_points"], "+.2f"),
            f"{r['bytes_up_per_update']:,}",
            R.fmt(r["ratio_vs_float32"], ".1f"),
            f"{r['bytes_down_per_round']:,}",
            R.fmt(r["downlink_ratio_vs_float32"], ".2f"),
            R.fmt(r["downlink_ratio_after_first_round"], ".1f"),
        ]
        for r in records
    ]
    header = ["uplink", "downlink", "accuracy", "loss pt", "B up/update", "up x", "B down/round", "down x", "after r1"]
    print(R.table(header, body))
    for direction, goal in (("uplink", GOAL), ("downlink", DOWNLINK_GOAL)):
        met = goal_met(records, direction)
        print(
            f"{direction} goal (>= {goal[f'{direction}_ratio_vs_float32']:g}x fewer bytes at <= "
            f"{goal['max_accuracy_loss_points']} point loss): " + (", ".join(met) if met else "not met")
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    R.common_flags(parser, "compression_accuracy")
    R.train_seed_flag(parser)
    parser.add_argument("--uplinks", nargs="+", default=list(UPLINK_CODECS), help="uplink codecs to run")
    parser.add_argument("--downlinks", nargs="+", default=list(DOWNLINK_CODECS), help="downlink codecs to run")
    parser.add_argument("--model", default=R.PAPER_JOB["model"], help="model (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=R.PAPER_JOB["rounds"], help="rounds (default: %(default)s)")
    parser.add_argument("--devices", type=int, default=R.PAPER_JOB["devices"], help="devices (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="the job's seed (data split, initial model), the same for every codec"
    )
    args = parser.parse_args(argv)
    from fedmqtt.errors import FedmqttError
    from fedmqtt.schema import CodecSpec

    for codec in [*args.uplinks, *args.downlinks]:
        try:
            CodecSpec.parse(codec)
        except FedmqttError as exc:
            parser.error(str(exc))
    if args.quick:
        args.model, args.devices, args.rounds = QUICK["model"], QUICK["devices"], QUICK["rounds"]
        R.quick_json(args, parser)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = R.prepared_data(args)
    base = replace(
        R.Job(**R.PAPER_JOB),  # type: ignore[arg-type]
        model=args.model,
        rounds=args.rounds,
        devices=args.devices,
        seed=args.seed,
        train_seed=R.train_seed_of(args),
    )
    records: list[dict[str, Any]] = []
    for uplink, downlink in configurations(args.uplinks, args.downlinks):
        job = replace(base, uplink=uplink, downlink=downlink)
        print(f"compression_accuracy: {job.label()}", file=sys.stderr)
        name = f"up-{uplink}-down-{downlink}".replace(":", "_").replace("+", "_")
        records.append(record(R.run_simulate(job, data=data, out_dir=args.out / name, timeout=args.timeout)))
        result = {
            "job": asdict(base),
            "train_samples": args.train_samples,
            "goal": GOAL,
            "downlink_goal": DOWNLINK_GOAL,
        }
        result["machine"] = R.machine()
        result["records"] = with_ratios(records)
        R.write_json(args.json, result)
    final = with_ratios(records)
    print(f"job: {base.label()} (codecs vary per row)")
    print_table(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
