"""Private transfer learning through the real system (issue #11): pretrain, then head-only DP federated fine-tuning.

Every federated figure here comes from ``fedmqtt simulate`` (a Mosquitto started here, the coordinator process and
its device processes, benchmarks/_runner.py); every backbone from ``fedmqtt pretrain`` (a subprocess). Nothing of
the federation is re-implemented (benchmarks/privacy.py is the in-process sweep; its figures are shown for reference).

Scenarios (MNIST devices; ``--scenarios``):

- ``public1000``: a CNN pretrained on a public slice of MNIST, the first 1,000 images of the *test* split
  (``fedmqtt pretrain --public-slice 1000 --augment``: 60 epochs of random affine views); no device holds them (devices partition the training split) and every
  accuracy here is measured on the other 9,000 test images. Head-only (``--trainable fc2.*``). Goal >= 97 % at ε <= 2.
- ``fashion``: a CNN pretrained on Fashion-MNIST's training split; head-only. Goal >= 95 % at ε <= 8.
- ``scratch``: the whole CNN from a random start, no public data; adaptive clipping (median) and server momentum.
  Goal >= 97 % at ε <= 8. Its runs are also the "full model" of the bytes comparison.

Per scenario, measured in the same invocation: the public-only model (the backbone, evaluated before any round on
the same 9,000 images: what the devices did not contribute), the non-private federated run (fixed-size selection of
the cohort, sample-weighted FedAvgM), and one private run per ε target (central DP, Poisson sampling with rate
q = cohort / devices, the fixed denominator m = cohort, clip C, σ the smallest that keeps ε <= the target after the
planned rounds, δ = 1e-5, ``--target-epsilon`` as a guard). Per round: accuracy and ε; per run: uplink bytes per
update and per round, downlink bytes per round (head-only vs full).

What the server still sees (central DP): every device's clipped update (the head's 5,130 values in the head-only
runs, all 1,663,370 in ``scratch``) and, with adaptive clipping, each device's unnoised clipping bit. ε bounds what
the *released models* say about any one device; it does not hide the updates from the coordinator (``--modes
device`` or ``local`` move the noise onto the devices; see docs/privacy.md). The broker sees the same frames.

    .venv/bin/python benchmarks/transfer.py --quick      # 200 devices, 20 per round, 3 rounds, 6,000 images (minutes)
    .venv/bin/python benchmarks/transfer.py --scenarios public1000          # the full in-domain configuration
    .venv/bin/python benchmarks/transfer.py                                  # everything (hours on 2 cores)

Results: a table on stdout, JSON at --json (default benchmarks/results/transfer.json; --quick: transfer-quick.json),
rewritten after every run. Not a test: figures depend on the machine, which the JSON records.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import _runner as R

DELTA = 1e-5
HEAD = "fc2.*"  # the CNN's classifier: fc2.weight (10x512) and fc2.bias, 5,130 values
PUBLIC_SLICE = 1000  # the first images of MNIST's test split: the in-domain public data; accuracy on the rest


@dataclass(frozen=True)
class Scenario:
    name: str
    goal: tuple[float, float]  # (accuracy, at most this epsilon)
    epsilons: tuple[float, ...]  # the private runs' targets
    pretrain: tuple[str, ...] | None  # fedmqtt pretrain flags (None: from scratch)
    pretrain_quick: tuple[str, ...] | None
    trainable: str | None
    lr: float
    batch_size: int
    clip: float
    adaptive_clip: float | None = None
    strategy_params: str = "momentum=0.9,server_lr=1.0"


SCENARIOS = {
    "public1000": Scenario(
        "public1000", (0.97, 2.0), (2.0, 8.0),
        # 60 epochs of random affine views (pretrain --augment); 10 plain epochs (public-only 94.86 %, r15 file)
        ("--dataset", "mnist", "--public-slice", str(PUBLIC_SLICE), "--epochs", "60", "--lr", "0.02",
         "--weight-decay", "5e-4", "--augment"),
        ("--dataset", "mnist", "--public-slice", str(PUBLIC_SLICE), "--epochs", "10", "--lr", "0.02",
         "--weight-decay", "5e-4", "--augment"),
        HEAD, lr=0.5, batch_size=20, clip=1.0,
    ),
    "fashion": Scenario(
        "fashion", (0.95, 8.0), (8.0, 2.0),
        ("--dataset", "fashion-mnist", "--epochs", "2", "--lr", "0.02"),
        ("--dataset", "fashion-mnist", "--public-slice", "6000", "--public-from", "train", "--epochs", "1",
         "--lr", "0.02"),
        HEAD, lr=0.5, batch_size=20, clip=1.0,
    ),
    "scratch": Scenario(
        "scratch", (0.97, 8.0), (8.0,), None, None, None, lr=0.1, batch_size=50, clip=1.0, adaptive_clip=0.5,
    ),
}  # fmt: skip
# benchmarks/privacy.py (in process, 1,000 devices, q = 0.1, m = 100, 50 rounds, central DP; results/privacy-*.json)
IN_PROCESS = {
    "public1000": "public-only 94.02 %; non-private 97.04 %; ε 7.99: 97.28 %, ε 2.99: 96.78 %, ε 1.99: 96.68 %",
    "fashion": "public-only 15.19 %; non-private 94.34 %; ε 7.99: 92.00 %, ε 1.99: 87.14 %",
    "scratch": "non-private 92.46 % (10 rounds); ε 4.91: 92.70 % (30 rounds, FedAvg); 95.4 % at round 25 (unfinished)",
}


@dataclass(frozen=True)
class TransferJob(R.Job):
    """A simulate job with the flags the shared :class:`_runner.Job` does not spell (DP, --trainable, ...)."""

    extra: tuple[str, ...] = field(default=())

    def simulate_args(self) -> list[str]:
        return [*super().simulate_args(), *self.extra]


# ---------------------------------------------------------------------------------------------------
# data and backbones
# ---------------------------------------------------------------------------------------------------


def device_data(source: Path, out: Path, train_samples: int | None) -> Path:
    """MNIST for the devices and the coordinator's evaluation: the training split (its first ``train_samples``
    images with --quick) and the test split WITHOUT its first PUBLIC_SLICE images (the public slice)."""
    from fedmqtt.data import IDX_FILES, TRAIN_FILES, read_idx_file, write_idx_file
    from fedmqtt.pretrain import public_slice  # the one rule for which images `pretrain --public-slice` saw

    out.mkdir(parents=True, exist_ok=True)
    for stem in IDX_FILES:
        path = next(p for p in (source / stem, source / f"{stem}.gz") if p.exists())
        array = read_idx_file(path, 3 if "images" in stem else 1)
        kept = array[:train_samples] if stem in TRAIN_FILES else array[public_slice(len(array), PUBLIC_SLICE)[1]]
        write_idx_file(out / stem, kept)
    return out


def pretrain(flags: tuple[str, ...], data_dir: Path, out: Path) -> dict[str, Any]:
    """``fedmqtt pretrain`` as a subprocess; its JSON line (path, digest, recipe, held-out accuracy)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "fedmqtt.cli", "pretrain", "--model", "cnn", *flags, "--data-dir", str(data_dir),
            "--out", str(out), "--json"]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"fedmqtt pretrain failed ({done.returncode}): {' '.join(argv)}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["command"] = "fedmqtt pretrain --model cnn " + " ".join(flags)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


def public_only_accuracy(model_file: Path, data: Path) -> float:
    """The backbone before any round, on the coordinator's evaluation set (the same test images)."""
    from fedmqtt.data import load_dataset
    from fedmqtt.model_file import check_model, load_model_file
    from fedmqtt.models import build_model, set_arrays
    from fedmqtt.training import evaluate

    model = build_model("cnn")
    set_arrays(model, check_model(load_model_file(model_file), "cnn", path=model_file))
    accuracy, _ = evaluate(model, load_dataset("mnist", data, train=False))
    return accuracy


# ---------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------


def base_job(s: Scenario, args: argparse.Namespace, backbone: Path | None) -> TransferJob:
    extra = ["--strategy", "fedavgm", "--strategy-params", s.strategy_params, "--min-updates", str(args.cohort)]
    if backbone is not None:
        extra += ["--init-checkpoint", str(backbone)]
    if s.trainable is not None:
        extra += ["--trainable", s.trainable]
    return TransferJob(
        devices=args.devices, rounds=args.rounds, model="cnn", local_epochs=args.local_epochs, batch_size=s.batch_size, lr=s.lr,
        uplink=args.uplink, seed=args.seed, extra=tuple(extra),
    )  # fmt: skip


def private_job(job: TransferJob, s: Scenario, args: argparse.Namespace, epsilon: float, mode: str) -> TransferJob:
    from fedmqtt.privacy import noise_multiplier_for_budget

    q = args.cohort / args.devices
    sigma = round(noise_multiplier_for_budget(epsilon, DELTA, q, args.rounds) + 5e-4, 3)  # rounded up
    dp = ["--dp-mode", mode, "--dp-clip", str(s.clip), "--dp-noise-multiplier", str(sigma),
          "--dp-population", str(args.devices), "--dp-sample-rate", str(q), "--dp-delta", str(DELTA),
          "--target-epsilon", str(epsilon)]  # fmt: skip
    if s.adaptive_clip is not None and mode == "central":
        dp += ["--dp-adaptive-clip", str(s.adaptive_clip)]
    return replace(job, extra=(*job.extra, *dp))


def record(run: R.SimRun, kind: str, extra: dict[str, Any]) -> dict[str, Any]:
    totals, rounds = run.totals, run.rounds
    updates = sum(r["participants"] for r in rounds)
    return {
        "run": kind,
        **extra,
        "final_accuracy": totals["final_accuracy"],
        "best_accuracy": totals["best_accuracy"],
        "epsilon": totals["epsilon"],
        "delta": totals["delta"],
        "rounds": len(rounds),
        "updates": updates,
        "bytes_up_per_update": round(R.per_round(totals["bytes_up"], updates)) if updates else None,
        "bytes_up_per_round": round(R.per_round(totals["bytes_up"], len(rounds))) if rounds else None,
        "bytes_down_per_round": round(R.per_round(totals["bytes_down"], len(rounds))) if rounds else None,
        # Round 1 sends the whole model to every device process; later rounds the delta (head-only: the head's).
        "bytes_down_round_1": rounds[0]["bytes_down"] if rounds else None,
        "bytes_down_per_later_round": R.mean([r["bytes_down"] for r in rounds[1:]]),
        "round_seconds": totals["round_seconds"],
        "wall_seconds": round(run.wall_seconds, 1),
        "refused": totals["refused"],
        "per_round": [
            {"round": r["round"], "accuracy": r["accuracy"], "epsilon": r["epsilon"], "participants": r["participants"],
             "bytes_up": r["bytes_up"], "bytes_down": r["bytes_down"]}
            for r in rounds
        ],
        "job": run.job.label(),
        "argv": ["fedmqtt", "simulate", *run.job.simulate_args()],
        "out_dir": run.out_dir,
    }  # fmt: skip


def goal_verdict(s: Scenario, records: list[dict[str, Any]]) -> str:
    accuracy, epsilon = s.goal
    private = [r for r in records if r["run"] == "private" and r["final_accuracy"] is not None and r["epsilon"]]
    met = [r for r in private if r["final_accuracy"] >= accuracy and r["epsilon"] <= epsilon]
    if met:
        best = max(met, key=lambda r: r["final_accuracy"])
        return f"met: {best['final_accuracy']:.2%} at ε {best['epsilon']:.2f}"
    fit = [r for r in private if r["epsilon"] <= epsilon]
    if fit:
        best = max(fit, key=lambda r: r["final_accuracy"])
        return f"not met: best {best['final_accuracy']:.2%} at ε {best['epsilon']:.2f}"
    return "not met: no private run within ε"


# ---------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------


def print_tables(result: dict[str, Any]) -> None:
    for name, part in result["scenarios"].items():
        print(f"\n== {name}: goal >= {part['goal'][0]:.0%} at ε <= {part['goal'][1]:g}  ->  {part['verdict']}")
        if part.get("public_only_accuracy") is not None:
            print(f"public-only (backbone before any round): {part['public_only_accuracy']:.2%}")
        body = [
            [r["run"], r.get("mode") or "-", R.fmt(r.get("sigma"), ".3f"), R.fmt(r["final_accuracy"], ".4f"),
             R.fmt(r["epsilon"], ".2f"), str(r["rounds"]), R.fmt(r["bytes_up_per_update"], ",.0f"),
             R.fmt(r["bytes_up_per_round"], ",.0f"), R.fmt(r.get("bytes_down_round_1"), ",.0f"),
             R.fmt(r.get("bytes_down_per_later_round"), ",.0f")]
            for r in part["runs"]
        ]  # fmt: skip
        header = [
            "run",
            "mode",
            "σ",
            "accuracy",
            "ε",
            "rounds",
            "B up/update",
            "B up/round",
            "B down r1",
            "B down/later",
        ]
        print(R.table(header, body))
        for r in part["runs"]:
            curve = " ".join(
                f"{p['round']}:{R.fmt(p['accuracy'], '.3f')}" + (f"/ε{p['epsilon']:.2f}" if p["epsilon"] else "")
                for p in r["per_round"]
            )
            print(f"  {r['run']:<10} per round {curve}")
        print(f"  in-process reference (benchmarks/privacy.py): {part['in_process_reference']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    R.common_flags(parser, "transfer")
    parser.add_argument("--fashion-data-dir", help="Fashion-MNIST IDX files (default: as fedmqtt pretrain finds them)")
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--modes", nargs="+", choices=("central", "device", "local"), default=["central"])
    parser.add_argument("--epsilons", nargs="+", type=float, help="private runs' ε targets (default: per scenario)")
    parser.add_argument("--devices", type=int, default=1000, help="devices (default: %(default)s)")
    parser.add_argument("--cohort", type=int, default=100, help="devices per round, m; q = m/devices (default: 100)")
    parser.add_argument("--rounds", type=int, default=50, help="rounds per run (default: %(default)s)")
    parser.add_argument("--uplink", default="float32", help="uplink codec (default: %(default)s)")
    parser.add_argument(
        "--local-epochs", type=int, default=1, help="epochs each device trains per round (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reuse-backbones", action="store_true", help="use OUT/SCENARIO/backbone.fedmodel when present (no pretrain)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.cohort, args.rounds = 200, 20, 3
        R.quick_json(args, parser)
    if not 0 < args.cohort <= args.devices:
        parser.error("--cohort must be between 1 and --devices")
    return args


def main(argv: list[str] | None = None) -> int:
    from fedmqtt.data import resolve_data_dir

    args = parse_args(argv)
    if args.quick and args.train_samples is None:
        args.train_samples = R.QUICK_TRAIN_SAMPLES
    mnist = R.data_dir(args.data_dir)
    fashion = Path(resolve_data_dir(args.fashion_data_dir, "fashion-mnist"))
    data = device_data(mnist, args.out / "data", args.train_samples)
    result: dict[str, Any] = {
        "benchmark": "transfer",
        "command": "benchmarks/transfer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick": args.quick,
        "configuration": {
            "devices": args.devices, "cohort": args.cohort, "sample_rate": args.cohort / args.devices,
            "rounds": args.rounds, "local_epochs": args.local_epochs, "train_samples": args.train_samples or 60000,
            "uplink": args.uplink,
            "modes": args.modes, "delta": DELTA, "public_slice": f"MNIST test[0:{PUBLIC_SLICE}]",
            "evaluation_set": f"MNIST test[{PUBLIC_SLICE}:] (the coordinator's --eval-data)",
            "non_private_selection": f"fixed-size, {args.cohort} per round, sample-weighted FedAvgM",
            "private_selection": f"Poisson, q = {args.cohort / args.devices:g}, denominator m = {args.cohort}",
        },
        "machine": R.machine(),
        "scenarios": {},
    }  # fmt: skip
    for name in args.scenarios:
        s = SCENARIOS[name]
        part: dict[str, Any] = {"goal": s.goal, "runs": [], "in_process_reference": IN_PROCESS[name]}
        result["scenarios"][name] = part
        backbone = None
        flags = s.pretrain_quick if args.quick else s.pretrain
        if flags is not None:
            backbone = args.out / name / "backbone.fedmodel"
            source = fashion if "fashion-mnist" in flags else mnist
            if args.reuse_backbones and backbone.exists():  # made by an earlier run with the same flags
                from fedmqtt.model_file import load_model_file

                meta = load_model_file(backbone).meta
                part["pretrain"] = {k: v for k, v in meta.items() if k != "public_indices"} | {"reused": str(backbone)}
            else:
                print(f"transfer: {name}: fedmqtt pretrain {' '.join(flags)}", file=sys.stderr)
                part["pretrain"] = pretrain(flags, source, backbone)
            part["public_only_accuracy"] = public_only_accuracy(backbone, data)
        base = base_job(s, args, backbone)
        jobs: list[tuple[TransferJob, dict[str, Any]]] = [
            (replace(base, devices_per_round=args.cohort), {"run": "non-private"})
        ]
        for mode in args.modes:
            for epsilon in args.epsilons or s.epsilons:
                job = private_job(base, s, args, epsilon, mode)
                sigma = float(job.extra[job.extra.index("--dp-noise-multiplier") + 1])
                jobs.append((job, {"run": "private", "mode": mode, "target_epsilon": epsilon, "sigma": sigma}))
        for job, extra in jobs:
            kind = extra.pop("run")
            label = kind + (f"-{extra['mode']}-eps{extra['target_epsilon']:g}" if kind == "private" else "")
            print(f"transfer: {name}: {label}: {job.label()}", file=sys.stderr)
            run = R.run_simulate(job, data=data, out_dir=args.out / name / label, timeout=args.timeout)
            part["runs"].append(record(run, kind, extra))
            part["verdict"] = goal_verdict(s, part["runs"])
            R.write_json(args.json, result)
    bytes_by = {}
    for name, part in result["scenarios"].items():
        first = part["runs"][0] if part["runs"] else None
        if first is not None:
            bytes_by["head-only" if SCENARIOS[name].trainable else "full"] = {
                k: first.get(k)
                for k in (
                    "bytes_up_per_update",
                    "bytes_up_per_round",
                    "bytes_down_round_1",
                    "bytes_down_per_later_round",
                )
            }
    result["bytes_full_vs_head_only"] = bytes_by
    result["machine_after"] = R.machine()
    R.write_json(args.json, result)
    print_tables(result)
    if bytes_by:
        print("\nbytes per round (non-private runs):", json.dumps(bytes_by))
    return 0


if __name__ == "__main__":
    sys.exit(main())
