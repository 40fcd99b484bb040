"""What fedmqtt costs over the machine's own limit: one job run three ways in one run (issue #13, benchmark 1).

The job: 10 devices, 5 rounds, the McMahan et al. CNN, E = 1, B = 10, lr 0.05, IID, float32 both ways.

1. in-process: a plain FedAvg loop in one process with fedmqtt's own pieces: the devices' parts
   (``fedmqtt.data.partition`` with the run's seed), the coordinator's initial model (``build_model(seed=)``),
   ``fedmqtt.training.train_local`` per device (each device's shuffling seeded per round from --train-seed by
   ``fedmqtt.training.round_seed``, as simulate's devices seed it: the same data orders in all three) and the coordinator's
   FedAvg (``fedmqtt.coordinator.aggregation``), torch with its default threads;
2. floor: the same training spread over the same number of worker processes, each with the same devices and
   torch threads as ``fedmqtt simulate`` gives its device processes (its own plan, ``plan_simulation``), the
   global model handed over a pipe, the same FedAvg between rounds: no broker, no frames — what the cores can do;
3. fedmqtt: ``fedmqtt simulate`` on Mosquitto, evaluating only the final model (``--eval-every`` = the rounds;
   ``--eval-every 1``: every round's, as a job does by default).

No way's clock counts evaluation: 1 and 2 stop it while they evaluate each round's model; fedmqtt evaluates beside
the next round's training (pipelined rounds), so on a machine whose cores the devices fill, every evaluation but the
last takes its CPU from the training (about 1 s a round for the CNN on 2 cores: ``--eval-every 1`` shows it).

Every way runs in processes of their own sessions, as simulate starts its children (Linux's autogroup shares a
busy CPU between sessions first). Seconds are seconds of rounds: training and aggregation for 1 and 2 (each model
is evaluated after its round, outside the clock, for the accuracy); the sum of the round summaries' seconds (round opened to closed) for 3.
Where fedmqtt's extra time goes comes from the job's events and device statuses (benchmarks/_runner.py,
``round_phases``): model download, device training and upload, and the close (aggregation, evaluation, publish).

    .venv/bin/python benchmarks/overhead.py            # the job above (~12 min on 2 idle cores)
    .venv/bin/python benchmarks/overhead.py --quick    # mlp, 2 rounds, 6,000 training images (~1 min idle)

Results: a table on stdout, JSON at --json (default benchmarks/results/overhead.json; --quick: overhead-quick.json).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import _runner as R

GOAL_RATIO_VS_FLOOR = 1.05
QUICK = {"model": "mlp", "rounds": 2}
JSON_KEYS = (
    "inprocess_seconds",
    "floor_seconds",
    "fedmqtt_seconds",
    "ratio_vs_inprocess",
    "ratio_vs_floor",
    "accuracy",
    "bytes_up_per_round",
    "bytes_down_per_round",
)


# ---------------------------------------------------------------------------------------------------
# The training both baselines share
# ---------------------------------------------------------------------------------------------------


def device_parts(job: R.Job, data: Path, first: int, end: int) -> list[tuple[str, Any]]:
    """Devices ``first .. end-1``: (id, data), named and cut as ``fedmqtt device --id-prefix --parts`` does."""
    from fedmqtt.data import PartitionSpec, load_dataset, partition
    from fedmqtt.device.cli import virtual_device_id
    from fedmqtt.simulate import DEVICE_ID_PREFIX

    dataset = load_dataset("mnist", data, train=True)
    parts = partition(dataset.labels.numpy(), PartitionSpec.parse(job.partition), job.devices, job.seed)
    return [(virtual_device_id(DEVICE_ID_PREFIX, i), dataset.subset(parts[i])) for i in range(first, end)]


def train_devices(
    model: Any, devices: Sequence[tuple[str, Any]], global_arrays: Any, job: R.Job, round_number: int
) -> list[tuple[Any, int]]:
    """Each device's (update, samples) for one round, trained one after another from ``global_arrays``."""
    from fedmqtt import arrays as A
    from fedmqtt.models import get_arrays, set_arrays
    from fedmqtt.training import round_seed, train_local

    out = []
    for device_id, dataset in devices:
        set_arrays(model, global_arrays)
        seed = None if job.train_seed is None else round_seed(job.train_seed, device_id, round_number)
        result = train_local(model, dataset, epochs=job.local_epochs, batch_size=job.batch_size, lr=job.lr, seed=seed)
        out.append((A.subtract(get_arrays(model), global_arrays), result.num_samples))
    return out


class FedAvgLoop:
    """The coordinator's side of both baselines: the initial model, FedAvg, evaluation."""

    def __init__(self, job: R.Job, data: Path) -> None:
        from fedmqtt.coordinator.aggregation import build_strategy
        from fedmqtt.data import load_dataset
        from fedmqtt.models import build_model, get_arrays

        self.job = job
        self.model = build_model(job.model, seed=job.seed)
        self.global_arrays = get_arrays(self.model)
        self.strategy = build_strategy("fedavg")
        self.test = load_dataset("mnist", data, train=False)
        self.curve: list[tuple[int, float]] = []
        self.evaluation_seconds = 0.0

    def aggregate(self, updates: Sequence[tuple[Any, int]]) -> None:
        self.strategy.begin_round(self.global_arrays)
        for update, samples in updates:
            self.strategy.add(update, float(samples))
        self.global_arrays = self.strategy.aggregate()

    def evaluate(self, round_number: int) -> None:
        from fedmqtt.models import set_arrays
        from fedmqtt.training import evaluate

        started = time.perf_counter()
        set_arrays(self.model, self.global_arrays)
        accuracy, _ = evaluate(self.model, self.test)
        self.evaluation_seconds += time.perf_counter() - started
        self.curve.append((round_number, accuracy))


def run_inprocess(job: R.Job, data: Path) -> dict[str, Any]:
    from fedmqtt.models import build_model

    loop = FedAvgLoop(job, data)
    datasets = device_parts(job, data, 0, job.devices)
    model = build_model(job.model)
    seconds: list[float] = []
    for r in range(1, job.rounds + 1):
        started = time.perf_counter()
        loop.aggregate(train_devices(model, datasets, loop.global_arrays, job, r))
        seconds.append(time.perf_counter() - started)
        loop.evaluate(r)
    return _baseline_result(seconds, loop, threads=_torch_threads(), processes=1)


def _inprocess_worker(conn: Connection, job: R.Job, data: str) -> None:
    os.setsid()  # a session of its own, as each process of fedmqtt simulate has (see run_inprocess_alone)
    conn.send(run_inprocess(job, Path(data)))


def run_inprocess_alone(job: R.Job, data: Path) -> dict[str, Any]:
    """:func:`run_inprocess` in a process of its own session. simulate starts every child in a new session, and
    Linux's scheduler (autogroup) shares a busy CPU between sessions first: the loop, the floor's workers and
    fedmqtt's device processes must all be in sessions of their own, or a shared machine's load favours one."""
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    process = ctx.Process(target=_inprocess_worker, args=(theirs, job, str(data)))
    process.start()
    try:
        result: dict[str, Any] = ours.recv()
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()
    return result


def _floor_worker(conn: Connection, job: R.Job, data: str, first: int, end: int, threads: int) -> None:
    import torch

    from fedmqtt.models import build_model

    os.setsid()  # as simulate's device processes (see run_inprocess_alone)
    torch.set_num_threads(threads)
    datasets = device_parts(job, Path(data), first, end)
    model = build_model(job.model)
    conn.send("ready")
    while True:
        message = conn.recv()
        if message is None:
            return
        round_number, global_arrays = message
        conn.send(train_devices(model, datasets, global_arrays, job, round_number))


def run_floor(job: R.Job, data: Path) -> dict[str, Any]:
    from fedmqtt.simulate import child_environment, device_ranges

    plan = R.simulation_plan(job, data)
    loop = FedAvgLoop(job, data)
    ctx = mp.get_context("spawn")
    # The environment simulate gives its device processes (BLAS/OpenMP threads), inherited by the spawned workers.
    saved = dict(os.environ)
    os.environ.update(child_environment({}, plan.threads_per_process))
    workers: list[tuple[Any, Connection]] = []
    try:
        for first, end in device_ranges(job.devices, plan.devices_per_process):
            ours, theirs = ctx.Pipe()
            process = ctx.Process(
                target=_floor_worker, args=(theirs, job, str(data), first, end, plan.threads_per_process)
            )
            process.start()
            workers.append((process, ours))
        for _, conn in workers:
            conn.recv()  # data loaded: the clock starts with round 1, as fedmqtt's does
        seconds: list[float] = []
        for r in range(1, job.rounds + 1):
            started = time.perf_counter()
            for _, conn in workers:
                conn.send((r, loop.global_arrays))
            updates = [u for _, conn in workers for u in conn.recv()]
            loop.aggregate(updates)
            seconds.append(time.perf_counter() - started)
            loop.evaluate(r)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        for process, conn in workers:
            if process.is_alive():
                conn.send(None)
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
    return _baseline_result(seconds, loop, threads=plan.threads_per_process, processes=len(workers))


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _baseline_result(seconds: list[float], loop: FedAvgLoop, *, threads: int, processes: int) -> dict[str, Any]:
    return {
        "seconds": sum(seconds),
        "round_seconds": seconds,
        "accuracy": loop.curve[-1][1],
        "curve": loop.curve,
        "evaluation_seconds_per_round": R.per_round(loop.evaluation_seconds, len(loop.curve)),
        "processes": processes,
        "torch_threads": threads,
    }


# ---------------------------------------------------------------------------------------------------
# The three ways, side by side
# ---------------------------------------------------------------------------------------------------


def summarize(inprocess: dict[str, Any], floor: dict[str, Any], run: R.SimRun) -> dict[str, Any]:
    """The issue's keys, plus where fedmqtt's extra time goes (per round, seconds)."""
    totals, rounds = run.totals, run.rounds
    n = len(rounds)
    fedmqtt_seconds = float(totals["round_seconds"])
    phases = run.phases
    where = {
        key: R.mean([p[key] for p in phases])
        for key in ("seconds", "download_s", "devices_s", "close_s", "aggregation_s", "evaluated_s")
    }
    floor_round = R.per_round(floor["seconds"], len(floor["round_seconds"]))
    where["extra_vs_floor_s"] = R.per_round(fedmqtt_seconds, n) - floor_round
    return {
        "inprocess_seconds": round(inprocess["seconds"], 2),
        "floor_seconds": round(floor["seconds"], 2),
        "fedmqtt_seconds": round(fedmqtt_seconds, 2),
        "ratio_vs_inprocess": R.ratio(fedmqtt_seconds, inprocess["seconds"]),
        "ratio_vs_floor": R.ratio(fedmqtt_seconds, floor["seconds"]),
        "accuracy": {
            "inprocess": inprocess["accuracy"],
            "floor": floor["accuracy"],
            "fedmqtt": totals["final_accuracy"],
        },
        "bytes_up_per_round": round(R.per_round(totals["bytes_up"], n)),
        "bytes_down_per_round": round(R.per_round(totals["bytes_down"], n)),
        "goal_ratio_vs_floor": GOAL_RATIO_VS_FLOOR,
        "fedmqtt_per_round": {k: None if v is None else round(v, 3) for k, v in where.items()},
        "fedmqtt_rounds": phases,
        "fedmqtt_wall_seconds": round(run.wall_seconds, 1),
        "inprocess": inprocess,
        "floor": floor,
    }


def print_tables(job: R.Job, result: dict[str, Any]) -> None:
    acc = result["accuracy"]
    rounds = len(result["floor"]["round_seconds"])
    floor = result["floor_seconds"]
    rows = [
        [name, f"{seconds:.1f}", R.fmt(R.ratio(seconds, floor, 2), ".2f"), R.fmt(acc[key], ".4f")]
        for name, key, seconds in (
            ("in-process loop", "inprocess", result["inprocess_seconds"]),
            ("compute floor", "floor", floor),
            ("fedmqtt simulate", "fedmqtt", result["fedmqtt_seconds"]),
        )
    ]
    print(f"load average (1 min) before each: {result.get('load_average_1m_before')}")
    print(f"job: {job.label()}; {result['floor']['processes']} device processes x "
          f"{result['floor']['torch_threads']} torch threads (simulate's plan); {os.cpu_count()} CPUs")  # fmt: skip
    print(R.table(["system", f"s / {rounds} rounds", "x floor", "accuracy"], rows))
    print(
        f"fedmqtt = {R.fmt(result['ratio_vs_floor'], '.3f')}x the floor (goal <= {GOAL_RATIO_VS_FLOOR}), "
        f"{R.fmt(result['ratio_vs_inprocess'], '.3f')}x the in-process loop; "
        f"{result['bytes_up_per_round'] / 1e6:.2f} MB up, {result['bytes_down_per_round'] / 1e6:.2f} MB down per round"
    )
    w = result["fedmqtt_per_round"]
    print(
        "fedmqtt per round (mean s): "
        f"round {R.fmt(w['seconds'])} = download {R.fmt(w['download_s'])} + devices {R.fmt(w['devices_s'])} "
        f"+ close {R.fmt(w['close_s'])} (aggregation+evaluation+publish as the coordinator times it: "
        f"{R.fmt(w['aggregation_s'])}); floor per round "
        f"{R.per_round(result['floor_seconds'], rounds):.2f}, evaluation alone "
        f"{result['floor']['evaluation_seconds_per_round']:.2f}; extra vs floor {R.fmt(w['extra_vs_floor_s'])}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    R.common_flags(parser, "overhead")
    R.train_seed_flag(parser)
    parser.add_argument(
        "--eval-every",
        type=int,
        help="fedmqtt evaluates every N-th round's model and the last (default: the rounds, the last only)",
    )
    parser.add_argument("--model", default=R.PAPER_JOB["model"], help="model (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=R.PAPER_JOB["rounds"], help="rounds (default: %(default)s)")
    parser.add_argument("--devices", type=int, default=R.PAPER_JOB["devices"], help="devices (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.rounds = QUICK["model"], QUICK["rounds"]
        R.quick_json(args, parser)
    return args


def job_of(args: argparse.Namespace) -> R.Job:
    base = R.Job(**R.PAPER_JOB)  # type: ignore[arg-type]
    return replace(
        base,
        model=args.model,
        rounds=args.rounds,
        devices=args.devices,
        train_seed=R.train_seed_of(args),
        eval_every=args.rounds if args.eval_every is None else args.eval_every,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    job = job_of(args)
    data = R.prepared_data(args)
    print(f"overhead: {job.label()}", file=sys.stderr)
    # The machine's 1-minute load average before each way: on a shared machine the ratios mean little without it.
    load = {"inprocess": os.getloadavg()[0]}
    inprocess = run_inprocess_alone(job, data)
    print(f"  in-process: {inprocess['seconds']:.1f} s", file=sys.stderr)
    load["floor"] = os.getloadavg()[0]
    floor = run_floor(job, data)
    print(f"  floor: {floor['seconds']:.1f} s", file=sys.stderr)
    load["fedmqtt"] = os.getloadavg()[0]
    run = R.run_simulate(job, data=data, out_dir=args.out, timeout=args.timeout)
    result = {"job": asdict(job), "train_samples": args.train_samples, "machine": R.machine()}
    result["load_average_1m_before"] = {k: round(v, 2) for k, v in load.items()}
    result.update(summarize(inprocess, floor, run))
    print_tables(job, result)
    R.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
