"""The benchmarks that run the real system (benchmarks/overhead.py, rounds_to_accuracy.py, compression_accuracy.py):
their flags, their pure parts, and one real run of the smallest overhead job (slow)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from fedmqtt.schema import DeviceStatus, Event, EventType, to_json
from fedmqtt.topics import Topics

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    """A benchmark script as a module (benchmarks/ is not a package; its codecs.py would shadow the stdlib's)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


R = _load("_runner")
overhead = _load("overhead")
rounds_to_accuracy = _load("rounds_to_accuracy")
compression = _load("compression_accuracy")


# --- _runner: the pure parts ---------------------------------------------------------------------------


def test_rounds_to_is_the_first_round_reaching_the_target() -> None:
    curve = [(1, 0.91), (2, None), (3, 0.975), (4, 0.969), (5, 0.99)]
    assert R.rounds_to(curve, 0.97) == 3
    assert R.rounds_to(curve, 0.99) == 5
    assert R.rounds_to(curve, 0.995) is None
    assert R.rounds_to([], 0.5) is None


def test_ratio_and_means() -> None:
    assert R.ratio(105.0, 100.0) == 1.05
    assert R.ratio(6_650_000, 26_000, 1) == 255.8
    assert R.ratio(None, 1.0) is None and R.ratio(1.0, 0.0) is None
    assert R.per_round(30.0, 3) == 10.0 and R.per_round(5.0, 0) == 5.0
    assert R.mean([1.0, None, 3.0]) == 2.0 and R.mean([None]) is None


def test_table_aligns_columns() -> None:
    text = R.table(["system", "s"], [["floor", "1.5"], ["fedmqtt simulate", "12.25"]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[1].startswith("floor ") and lines[2].endswith("12.25")


def test_job_flags_are_simulates_own_and_give_the_floor_its_plan(tmp_path: Path) -> None:
    from fedmqtt.data import write_idx_dataset

    data = write_idx_dataset(tmp_path, num_train=400, num_test=10, seed=1)
    job = R.Job(devices=100, rounds=3, devices_per_round=10, target_accuracy=0.99, partition="shards:2")
    plan = R.simulation_plan(job, data)
    assert (plan.devices, plan.rounds, plan.devices_per_round, plan.coordinator.target_accuracy) == (100, 3, 10, 0.99)
    assert (plan.partition, plan.uplink, plan.batch_size, plan.model, plan.local_epochs) == (
        "shards:2",
        "float32",
        10,
        "cnn",
        1,
    )
    assert str(plan.coordinator.downlink) == "float32"
    assert plan.device_processes * plan.devices_per_process >= 100
    assert plan.threads_per_process >= 1


def test_sample_data_keeps_the_first_training_images_and_the_whole_test_split(tmp_path: Path) -> None:
    from fedmqtt.data import load_dataset, write_idx_dataset

    source = write_idx_dataset(tmp_path / "full", num_train=50, num_test=20, seed=3)
    assert R.sample_data(source, tmp_path / "unused", None) == source
    small = R.sample_data(source, tmp_path / "small", 30)
    full, part = load_dataset("mnist", source, train=True), load_dataset("mnist", small, train=True)
    assert len(part) == 30 and bool((part.images == full.images[:30]).all())
    assert bool((part.labels == full.labels[:30]).all())
    assert len(load_dataset("mnist", small, train=False)) == 20


def _event(job: str, type_: EventType, ts: float, round_: int, detail: str = "") -> tuple[float, str, bytes]:
    topics = Topics(job=job)
    return (ts, topics.events, to_json(Event(job=job, type=type_, ts=ts, round=round_, detail=detail)))


def _status(job: str, device: str, state: str, ts: float, round_: int, instance: str) -> tuple[float, str, bytes]:
    status = DeviceStatus(device=device, state=state, ts=ts, round=round_, instance=instance)  # type: ignore[arg-type]
    return (ts, Topics(job=job).device_status(device), to_json(status))


def test_round_phases_split_a_round_by_its_events_and_statuses() -> None:
    job = "j"
    messages = [
        _event(job, EventType.ROUND_OPENED, 100.0, 1),
        _status(job, "dev-0", "training", 101.0, 1, "aaaaaaaaaaaaaaaa"),  # process A has the model at 101
        _status(job, "dev-0", "online", 104.0, 1, "aaaaaaaaaaaaaaaa"),
        _status(job, "dev-1", "training", 104.1, 1, "aaaaaaaaaaaaaaaa"),  # A's second device: not a download
        _status(job, "dev-2", "training", 102.0, 1, "bbbbbbbbbbbbbbbb"),  # the last process to get the model: 102
        _status(job, "dev-2", "online", 106.0, 1, "bbbbbbbbbbbbbbbb"),
        _status(job, "dev-1", "online", 107.0, 1, "aaaaaaaaaaaaaaaa"),  # the last update sent
        (107.5, Topics(job=job).device_status("dev-3"), b"not json"),  # hostile: skipped
        _event(job, EventType.ROUND_CLOSED, 109.0, 1, "closed by quorum with 3 updates; aggregation 1.50s"),
        _event(job, EventType.ROUND_OPENED, 109.1, 2),  # round 2 never closes: not reported
    ]
    phases = R.round_phases(messages, Topics(job=job))
    assert len(phases) == 1
    p = phases[0]
    assert p["round"] == 1 and p["seconds"] == pytest.approx(9.0)
    assert p["download_s"] == pytest.approx(2.0)
    assert p["devices_s"] == pytest.approx(5.0)
    assert p["close_s"] == pytest.approx(2.0)
    assert p["aggregation_s"] == 1.5 and p["evaluated_s"] is None


# --- overhead.py ------------------------------------------------------------------------------------------


def test_overhead_flags_and_quick_mode() -> None:
    args = overhead.parse_args([])
    job = overhead.job_of(args)
    assert (job.devices, job.rounds, job.model, job.local_epochs, job.batch_size, job.lr) == (10, 5, "cnn", 1, 10, 0.05)
    assert (job.partition, job.uplink, job.downlink) == ("iid", "float32", "float32")
    assert args.json.name == "overhead.json"
    quick = overhead.parse_args(["--quick"])
    assert overhead.job_of(quick).model == "mlp" and quick.json.name == "overhead-quick.json"


def test_quick_runs_never_replace_the_full_runs_json(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=tmp_path / "results" / "aggregation.json")
    for argv, expected in (
        ([], tmp_path / "results" / "aggregation.json"),
        (["--quick"], tmp_path / "results" / "aggregation-quick.json"),
        (["--quick", "--json", str(tmp_path / "mine.json")], tmp_path / "mine.json"),  # asked for: kept
    ):
        args = parser.parse_args(argv)
        R.quick_json(args, parser)
        assert args.json == expected
    for script in ("aggregation", "memory", "scale", "privacy", "transfer", "rounds_to_accuracy"):
        assert "R.quick_json(args, parser)" in (BENCHMARKS / f"{script}.py").read_text(), script


def _sim_run(job: Any, rounds: list[dict[str, Any]], phases: list[dict[str, Any]] | None = None) -> Any:
    totals = {
        "round_seconds": sum(r["seconds"] for r in rounds),
        "final_accuracy": rounds[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in rounds),
        "bytes_up": sum(r["bytes_up"] for r in rounds),
        "bytes_down": sum(r["bytes_down"] for r in rounds),
    }
    return R.SimRun(
        job=job, report={"rounds": rounds, "totals": totals}, phases=phases or [], wall_seconds=1.0, out_dir=""
    )


def _round(n: int, accuracy: float, up: int = 1000, down: int = 2000, seconds: float = 10.0, k: int = 10) -> dict:
    return {"round": n, "accuracy": accuracy, "bytes_up": up, "bytes_down": down, "seconds": seconds, "participants": k}


def test_overhead_summary_has_the_issues_keys_and_ratios() -> None:
    job = R.Job(devices=10, rounds=2)
    baseline = {"accuracy": 0.97, "round_seconds": [9.0, 9.0], "seconds": 18.0}
    phase = {"round": 1, "seconds": 10.0, "download_s": 1.0, "devices_s": 8.0, "close_s": 1.0}
    run = _sim_run(job, [_round(1, 0.96), _round(2, 0.98)], [{**phase, "aggregation_s": 0.5, "evaluated_s": None}])
    result = overhead.summarize({**baseline, "seconds": 36.0}, baseline, run)
    assert set(overhead.JSON_KEYS) <= set(result)
    assert result["fedmqtt_seconds"] == 20.0
    assert result["ratio_vs_floor"] == pytest.approx(20 / 18, abs=1e-3)
    assert result["ratio_vs_inprocess"] == pytest.approx(20 / 36, abs=1e-3)
    assert result["accuracy"] == {"inprocess": 0.97, "floor": 0.97, "fedmqtt": 0.98}
    assert (result["bytes_up_per_round"], result["bytes_down_per_round"]) == (1000, 2000)
    assert result["fedmqtt_per_round"]["extra_vs_floor_s"] == pytest.approx(1.0)
    assert result["fedmqtt_per_round"]["download_s"] == 1.0


# --- rounds_to_accuracy.py --------------------------------------------------------------------------------


def test_rounds_to_accuracy_flags_and_paper_constants() -> None:
    args = rounds_to_accuracy.parse_args(["--max-rounds", "40"])
    assert args.partitions == ["iid", "shards:2"] and args.max_rounds == 40
    job = rounds_to_accuracy.job_for(args, "shards:2")
    assert (job.devices, job.devices_per_round, job.model, job.local_epochs, job.batch_size) == (100, 10, "cnn", 5, 10)
    assert job.target_accuracy == 0.99 and job.rounds == 40 and job.partition == "shards:2"
    assert rounds_to_accuracy.PAPER_ROUNDS_TO_99 == {"iid": 20, "shards:2": 229}
    quick = rounds_to_accuracy.parse_args(["--quick"])
    assert quick.partitions == ["iid"] and quick.max_rounds == 3
    with pytest.raises(SystemExit):
        rounds_to_accuracy.parse_args(["--max-rounds", "0"])


def test_rounds_to_accuracy_outcome_beside_the_paper() -> None:
    job = R.Job(devices=100, rounds=5, devices_per_round=10, model="cnn")
    run = _sim_run(job, [_round(1, 0.95), _round(2, 0.975), _round(3, 0.991), _round(4, 0.99)])
    row = rounds_to_accuracy.outcome(run, "iid")
    assert (row["rounds_to_97"], row["rounds_to_99"], row["rounds_run"]) == (2, 3, 4)
    assert row["uplink_bytes_to_99"] == 3000 and row["uplink_bytes"] == 4000
    assert row["paper_rounds_to_99"] == 20
    # 20 rounds x 10 devices x the CNN's 1,663,370 float32 parameters
    assert row["paper_uplink_bytes_to_99"] == 20 * 10 * 4 * 1_663_370
    assert row["best_accuracy"] == 0.991


# --- compression_accuracy.py ------------------------------------------------------------------------------


def test_compression_configurations_and_flags() -> None:
    pairs = compression.configurations(list(compression.UPLINK_CODECS), list(compression.DOWNLINK_CODECS))
    # the baseline, 5 more uplinks, 4 more downlinks
    assert pairs[0] == ("float32", "float32") and len(pairs) == len(set(pairs)) == 10
    assert ("topk:0.001+int8+ef", "float32") in pairs and ("float32", "int8") in pairs
    assert ("float16", "float32") in pairs and ("gtopk:0.011+sign+ef", "float32") in pairs
    args = compression.parse_args(["--quick"])
    assert (args.model, args.devices, args.rounds) == ("mlp", 10, 2)
    assert args.json.name == "compression_accuracy-quick.json"
    with pytest.raises(SystemExit):
        compression.parse_args(["--uplinks", "int9"])  # not a CodecSpec


def test_compression_records_carry_the_issues_keys_and_the_goal() -> None:
    job = R.Job(devices=10, rounds=2)
    from dataclasses import replace

    runs = [
        _sim_run(job, [_round(1, 0.97, up=6_650_000 * 10, down=6_650_000 * 10)] * 2),
        _sim_run(
            replace(job, uplink="topk:0.001+int8+ef"), [_round(1, 0.966, up=25_000 * 10, down=6_650_000 * 10)] * 2
        ),
        _sim_run(replace(job, downlink="float16"), [_round(1, 0.97, up=6_650_000 * 10, down=3_325_000 * 10)] * 2),
        _sim_run(replace(job, downlink="topk:0.01+int8"), [_round(1, 0.968, up=6_650_000 * 10, down=400_000)] * 2),
    ]
    records = compression.with_ratios([compression.record(run) for run in runs])
    keys = {"uplink", "downlink", "final_accuracy", "bytes_up_per_update", "ratio_vs_float32", "bytes_down_per_round",
            "downlink_ratio_vs_float32"}  # fmt: skip
    assert all(keys <= set(r) for r in records)
    assert records[0]["ratio_vs_float32"] == 1.0 and records[0]["accuracy_loss_points"] == 0.0
    assert records[1]["ratio_vs_float32"] == 266.0 and records[1]["accuracy_loss_points"] == 0.4
    assert records[2]["downlink_ratio_vs_float32"] == 2.0
    assert records[3]["downlink_ratio_vs_float32"] == 166.25 and records[3]["accuracy_loss_points"] == 0.2
    assert records[3]["downlink_ratio_after_first_round"] == 166.2  # every round a delta here
    assert compression.goal_met(records) == ["topk:0.001+int8+ef"]
    assert compression.goal_met(records, "downlink") == ["topk:0.01+int8"]  # float16 only halves it


# --- one real run ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.mosquitto
def test_overhead_runs_the_three_ways_end_to_end(tmp_path: Path) -> None:
    """The smallest overhead job on a small synthetic data set: in-process, floor (worker processes) and
    fedmqtt simulate on Mosquitto, with the JSON the issue names."""
    from fedmqtt.data import write_idx_dataset

    data = write_idx_dataset(tmp_path / "data", num_train=400, num_test=200, seed=5)
    out = tmp_path / "result.json"
    argv = [sys.executable, str(BENCHMARKS / "overhead.py"), "--model", "mlp", "--devices", "2", "--rounds", "2"]
    argv += ["--data-dir", str(data), "--json", str(out), "--out", str(tmp_path / "runs"), "--timeout", "240"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(overhead.JSON_KEYS) <= set(result)
    assert result["floor"]["processes"] == 2 and len(result["fedmqtt_rounds"]) == 2
    assert all(result["accuracy"][k] > 0.5 for k in ("inprocess", "floor", "fedmqtt"))
    assert result["bytes_up_per_round"] > 2 * 4 * 100_000  # two float32 mlp updates (>100k parameters each)
    phase = result["fedmqtt_rounds"][0]
    assert phase["download_s"] >= 0 and phase["devices_s"] > 0 and phase["close_s"] >= 0
    assert "fedmqtt simulate" in done.stdout and "x the floor" in done.stdout
