"""``fedmqtt simulate``: the plan (pure), the report writer, process supervision, and whole runs on tiny data."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import child_pids, live_pids_in_groups
from fedmqtt.cli import build_parser
from fedmqtt.coordinator.config import config_from_args
from fedmqtt.data import DatasetNotFound
from fedmqtt.errors import ConfigError
from fedmqtt.report import REPORT_JSON, REPORT_PNG, ROUND_KEYS, ReportError, build_report, write_report
from fedmqtt.schema import DPMode, Phase, PrivacyLedger, PrivacySpent, RefusalReason, RoundSummary, Status
from fedmqtt.simulate import (
    DEFAULT_MAX_DEVICE_PROCESSES,
    Supervisor,
    check_devices_per_process,
    coordinator_command,
    default_devices_per_process,
    device_command,
    device_ranges,
    log_tail,
    plan_simulation,
    write_coordinator_config,
)

PYTHON = sys.executable


# --- helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("idx"), num_train=400, num_test=200, seed=3)


def simulate_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["simulate", *argv])


def plan_of(*argv: str, env: dict[str, str] | None = None, limit: int = 100) -> Any:
    return plan_simulation(simulate_args(*argv), env=env or {}, max_clients_per_process=limit, cpu_count=2, now=0.0)


# --- the plan -----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 600))
def test_device_ranges_cover_every_device_once_in_ceil_n_over_m_processes(n: int, m: int) -> None:
    ranges = device_ranges(n, m)
    assert len(ranges) == math.ceil(n / m)
    covered = [i for a, b in ranges for i in range(a, b)]
    assert covered == list(range(n))
    assert all(0 < b - a <= m for a, b in ranges)


def test_default_packing_uses_two_processes_per_core() -> None:
    assert default_devices_per_process(10, cpu_count=2) == 3  # 4 processes: 3 + 3 + 3 + 1 devices
    assert default_devices_per_process(3, cpu_count=2) == 1
    assert default_devices_per_process(1, cpu_count=8) == 1
    assert default_devices_per_process(20, cpu_count=1) == 10
    assert default_devices_per_process(1000, cpu_count=64) == math.ceil(1000 / DEFAULT_MAX_DEVICE_PROCESSES)


def test_devices_per_process_above_the_client_limit_is_refused_clearly(tiny_data: Path) -> None:
    # A process's virtual devices share one network loop (epoll): the limit is the open-file limit, not select()'s.
    from fedmqtt.mqtt import MAX_CLIENTS_PER_PROCESS, max_clients_per_process
    from fedmqtt.mqtt.netloop import SPARE_FDS

    assert max_clients_per_process() > 4 * MAX_CLIENTS_PER_PROCESS  # 1,000 devices fit in one process here
    assert check_devices_per_process(1000, 1000) == 1000
    with pytest.raises(ConfigError, match=r"above the limit of 1000 MQTT clients per process .*ulimit -n"):
        check_devices_per_process(1001, 1000)
    with pytest.raises(ConfigError, match="must be >= 1"):
        check_devices_per_process(0, 1000)
    # Through the command line, with a hard open-file limit of 300: refused before anything starts.
    import resource

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))

    result = subprocess.run(
        [PYTHON, "-m", "fedmqtt.cli", "simulate", "--devices", "400", "--rounds", "1",
         "--data-dir", str(tiny_data), "--devices-per-process", "400"],
        capture_output=True, text=True, timeout=60, preexec_fn=low_fd_limit,
    )  # fmt: skip
    assert result.returncode == 1
    assert "--devices-per-process" in result.stderr
    assert f"limit of {300 - SPARE_FDS} MQTT clients per process" in result.stderr
    assert "ulimit -n" in result.stderr


def test_plan_defaults(tiny_data: Path) -> None:
    plan = plan_of("--devices", "10", "--rounds", "3", "--data-dir", str(tiny_data))
    assert plan.job == "sim-19700101-000000" or plan.job.startswith("sim-")
    assert plan.out_dir == str(Path("runs") / plan.job)
    assert (plan.min_updates, plan.min_devices, plan.devices_per_round) == (10, 10, None)
    assert (plan.devices_per_process, plan.device_processes, plan.threads_per_process) == (3, 4, 1)
    assert (plan.model, plan.local_epochs, plan.batch_size, plan.uplink, plan.partition) == (
        "cnn",
        1,
        50,
        "int8",
        "iid",
    )
    assert plan.data_dir == str(tiny_data)


def test_plan_with_a_fraction_of_devices_per_round(tiny_data: Path) -> None:
    plan = plan_of("--devices", "100", "--rounds", "1", "--devices-per-round", "10", "--devices-per-process", "25",
                   "--data-dir", str(tiny_data))  # fmt: skip
    assert (plan.min_updates, plan.min_devices, plan.device_processes, plan.threads_per_process) == (10, 100, 4, 1)


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--devices", "0", "--rounds", "1"], "--devices"),
        (["--devices", "2", "--rounds", "0"], "--rounds"),
        (["--devices", "2", "--rounds", "1", "--devices-per-round", "3"], "--devices-per-round"),
        (["--devices", "4", "--rounds", "1", "--devices-per-round", "2", "--min-updates", "3"], "--min-updates"),
        (["--devices", "4", "--rounds", "1", "--min-updates", "0"], "--min-updates"),
        (["--devices", "4", "--rounds", "1", "--min-updates", "3", "--min-devices", "2"], "--min-devices"),
        (["--devices", "4", "--rounds", "1", "--round-timeout", "0"], "--round-timeout"),
        (["--devices", "4", "--rounds", "1", "--timeout", "-1"], "--timeout"),
        (["--devices", "4", "--rounds", "1", "--embedded", "--broker", "mqtt://127.0.0.1:1883"], "--embedded"),
        (["--devices", "4", "--rounds", "1", "--embedded", "--mqtt-version", "5"], "--mqtt-version"),
        (["--devices", "4", "--rounds", "1", "--devices-per-process", "0"], "--devices-per-process"),
    ],
)
def test_bad_plans_are_refused_naming_the_flag(tiny_data: Path, argv: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        plan_of(*argv, "--data-dir", str(tiny_data))
    assert info.value.field == field


def test_a_bad_job_id_is_refused(tiny_data: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--job: .*job id"):
        plan_of("--devices", "1", "--rounds", "1", "--job", "a b", "--data-dir", str(tiny_data))


def test_data_dir_comes_from_the_shared_resolver(tmp_path: Path, tiny_data: Path) -> None:
    """fedmqtt.data.resolve_data_dir, with the plan's env: the flag, then $FEDMQTT_DATA, then the cache."""
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    assert plan_of("--devices", "1", "--rounds", "1", "--data-dir", str(tiny_data)).data_dir == str(tiny_data)
    env = {**cache, "FEDMQTT_DATA": str(tiny_data)}
    assert plan_of("--devices", "1", "--rounds", "1", env=env).data_dir == str(tiny_data)
    cached = tmp_path / "cache" / "fedmqtt" / "mnist"
    cached.mkdir(parents=True)
    for f in tiny_data.iterdir():
        (cached / f.name).write_bytes(f.read_bytes())
    assert plan_of("--devices", "1", "--rounds", "1", env=cache).data_dir == str(cached)


def test_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match="came from --data-dir"):
        plan_of("--devices", "1", "--rounds", "1", "--data-dir", str(tmp_path))  # a directory, but no IDX files
    with pytest.raises(DatasetNotFound, match=r"came from \$FEDMQTT_DATA"):
        plan_of("--devices", "1", "--rounds", "1", env={"FEDMQTT_DATA": str(tmp_path / "nope")})


def test_child_commands_parse_with_the_real_coordinator_and_device_parsers(tiny_data: Path, tmp_path: Path) -> None:
    plan = plan_of("--devices", "5", "--rounds", "2", "--devices-per-process", "2", "--data-dir", str(tiny_data),
                   "--partition", "dirichlet:0.5", "--uplink", "topk:0.1+int8+ef", "--strategy", "fedadam",
                   "--dp-mode", "off", "--min-updates-at-deadline", "2", "--embedded")  # fmt: skip
    parser = build_parser()
    config_path = write_coordinator_config(plan, tmp_path)
    coordinator = coordinator_command(plan, "mqtt://127.0.0.1:1883", config_path)
    assert coordinator[:3] == [PYTHON, "-m", "fedmqtt.cli"]
    c = parser.parse_args(coordinator[3:])
    assert (c.command, c.broker, c.config) == ("coordinator", "mqtt://127.0.0.1:1883", config_path)
    job = config_from_args(c, env={}, toml_path=c.config)  # what the coordinator runs: the job simulate validated
    assert (job.job, job.rounds, job.min_updates, job.min_devices, job.mqtt_version) == (plan.job, 2, 5, 5, "3.1.1")
    assert (job.strategy, job.uplink, job.dp, job.min_updates_at_deadline) == ("fedadam", "topk:0.1+int8+ef", None, 2)
    assert str(job.eval_data) == str(tiny_data) and job.quiet
    assert job == plan.coordinator.model_copy(update={"broker": job.broker, "mqtt_version": "3.1.1"})
    devices = [parser.parse_args(device_command(plan, "mqtt://h:1", a, b)[3:]) for a, b in device_ranges(5, 2)]
    assert [(d.id_prefix, d.parts) for d in devices] == [("dev-", "0:2"), ("dev-", "2:4"), ("dev-", "4:5")]
    assert all(d.num_parts == 5 and d.partition == "dirichlet:0.5" and d.exit_on_finish for d in devices)
    assert all(d.mqtt_version == "3.1.1" and d.data_dir == str(tiny_data) for d in devices)
    assert all(d.train_seed is None for d in devices)  # no --train-seed: fresh orders
    seeded = plan_of("--devices", "2", "--rounds", "1", "--data-dir", str(tiny_data), "--train-seed", "7", "--embedded")
    assert parser.parse_args(device_command(seeded, "mqtt://h:1", 0, 2)[3:]).train_seed == 7


# --- the report ---------------------------------------------------------------------------------


def _summary(n: int, accuracy: float | None) -> RoundSummary:
    return RoundSummary(
        job="j", round=n, closed_by="quorum", participants=("a", "b"), num_samples=10,
        refused={RefusalReason.DUPLICATE: n}, bytes_up=500_000, bytes_down=1_500_000,
        opened_at=0.0, closed_at=1.0, seconds=1.0, accuracy=accuracy, loss=0.5 if accuracy else None,
    )  # fmt: skip


def test_build_report_orders_rounds_and_sums_totals() -> None:
    status = Status(job="j", round=3, rounds_total=3, phase=Phase.FINISHED, updated_at=1.0,
                    privacy=PrivacySpent(epsilon=2.0, delta=1e-5))  # fmt: skip
    report = build_report({"job": "j"}, [_summary(2, 0.8), _summary(1, 0.6), _summary(3, None)], status,
                          wall_seconds=12.5, malformed_messages=1)  # fmt: skip
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert all(tuple(r) == ROUND_KEYS for r in report["rounds"])
    assert [r["cumulative_megabytes"] for r in report["rounds"]] == [2.0, 4.0, 6.0]
    assert report["rounds"][0]["participants"] == 2 and report["rounds"][1]["refused"] == 2
    t = report["totals"]
    assert (t["rounds_completed"], t["rounds_total"], t["phase"]) == (3, 3, "finished")
    assert (t["final_accuracy"], t["best_accuracy"], t["final_loss"]) == (0.8, 0.8, 0.5)
    assert (t["bytes_up"], t["bytes_down"], t["megabytes"]) == (1_500_000, 4_500_000, 6.0)
    assert (t["refused"], t["refused_by_reason"]) == (6, {"duplicate": 6})
    assert (t["epsilon"], t["delta"], t["wall_seconds"], t["malformed_messages"]) == (2.0, 1e-5, 12.5, 1)
    json.dumps(report, allow_nan=False)


def test_the_privacy_ledger_wins_over_the_status_snapshot() -> None:
    ledger = PrivacyLedger(job="j", mode=DPMode.CENTRAL, clip=1.0, noise_multiplier=1.0, sample_rate=0.1, rounds=1,
                           epsilon=3.0, delta=1e-6, accountant="rdp", updated_at=0.0)  # fmt: skip
    report = build_report({}, [], None, ledger)
    assert (report["totals"]["epsilon"], report["totals"]["delta"]) == (3.0, 1e-6)
    assert report["rounds"] == [] and report["totals"]["final_accuracy"] is None


def test_write_report_writes_json_and_a_png(tmp_path: Path) -> None:
    report = build_report({"job": "j"}, [_summary(1, 0.5), _summary(2, None), _summary(3, 0.9)], None)
    json_path, png_path = write_report(tmp_path / "out", report)
    assert json.loads(json_path.read_text()) == report
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unwritable_out_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ReportError, match="choose another --out"):
        write_report(blocker / "out", build_report({}, [], None))


# --- process supervision ------------------------------------------------------------------------

_STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print("ready", flush=True)
time.sleep(300)
"""


@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    s = Supervisor(grace_s=1.0)
    yield s
    s.close()


def _wait_for_log(path: Path, needle: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{needle!r} never appeared in {path}"
        time.sleep(0.05)


def test_stop_all_kills_a_child_that_ignores_sigterm_and_its_own_children(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    child = supervisor.start("stubborn", [PYTHON, "-c", _STUBBORN], tmp_path / "stubborn.log", os.environ)
    _wait_for_log(child.log_path, "ready")
    group = {child.process.pid}
    assert len(live_pids_in_groups(group)) == 2  # the child and its grandchild share its process group
    assert os.getpgid(child.process.pid) == child.process.pid != os.getpgid(0)
    started = time.monotonic()
    supervisor.stop_all()
    assert time.monotonic() - started < 10
    assert child.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while live_pids_in_groups(group):  # the orphaned grandchild is reaped by init a moment later
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_polite_child_exits_on_sigterm_and_its_log_tail_is_readable(supervisor: Supervisor, tmp_path: Path) -> None:
    code = "import time\nfor i in range(100): print(f'line {i}', flush=True)\ntime.sleep(300)"
    child = supervisor.start("polite", [PYTHON, "-c", code], tmp_path / "polite.log", os.environ)
    _wait_for_log(child.log_path, "line 99")
    supervisor.stop_all()
    assert child.returncode == -signal.SIGTERM
    tail = log_tail(child.log_path, lines=3)
    assert tail.splitlines() == ["    line 97", "    line 98", "    line 99"]
    assert "cannot read" in log_tail(tmp_path / "missing.log")


# --- whole runs on tiny data --------------------------------------------------------------------


def _simulate(out: Path, data: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYTHON, "-m", "fedmqtt.cli", "simulate", "--devices", "3", "--rounds", "3", "--model", "mlp",
         "--data-dir", str(data), "--out", str(out), "--lr", "0.1", "--batch-size", "20", "--round-timeout", "30",
         "--timeout", "150", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.e2e
def test_simulate_runs_a_job_and_writes_the_report(tmp_path: Path, tiny_data: Path) -> None:
    out = tmp_path / "run"
    process = _simulate(out, tiny_data, "--job", "tiny-run", "--devices-per-process", "2")
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, f"{stdout}\n{stderr}"
    assert "round 3 closed by" in stdout or "round 2 closed by" in stdout
    report = json.loads((out / REPORT_JSON).read_text())
    assert set(report) == {"config", "rounds", "totals"}
    assert report["config"]["job"] == "tiny-run" and report["config"]["device_processes"] == 2
    assert "password" not in report["config"]
    assert len(report["rounds"]) == 3
    for entry in report["rounds"]:
        assert tuple(entry) == ROUND_KEYS
        assert entry["participants"] == 3 and entry["bytes_up"] > 0 and entry["bytes_down"] > 0
        assert 0.0 <= entry["accuracy"] <= 1.0 and entry["seconds"] >= 0
    totals = report["totals"]
    assert totals["rounds_completed"] == 3 and totals["phase"] == "finished"
    assert totals["final_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert (out / REPORT_PNG).read_bytes()[:4] == b"\x89PNG"
    assert (out / "coordinator.log").exists() and (out / "devices-0.log").exists() and (out / "devices-1.log").exists()
    assert "report:" in stdout


@pytest.mark.e2e
def test_ctrl_c_stops_simulate_and_leaves_no_process_behind(tmp_path: Path, tiny_data: Path) -> None:
    out = tmp_path / "run"
    # Rounds of a long timeout and more rounds than it will get to: it is interrupted mid-job.
    process = _simulate(out, tiny_data, "--rounds", "50", "--devices-per-process", "1")
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    for line in process.stdout:
        lines.append(line)
        if "round 1 closed by" in line:  # stop mid-job: round 2 is open, devices are training
            break
        assert time.monotonic() < deadline, "".join(lines)
    children = child_pids(process.pid)
    assert len(children) >= 4, children  # the coordinator and three device processes
    groups = {os.getpgid(pid) for pid in children}
    assert os.getpgid(process.pid) not in groups  # every child leads its own group
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert "SIGINT received: stopping" in stderr
    assert live_pids_in_groups(groups) == set()
    assert child_pids(process.pid) == set()
    # The rounds done so far are reported.
    assert "report of the" in stderr
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["totals"]["rounds_completed"] >= 1 and report["totals"]["rounds_total"] == 50


@pytest.mark.e2e
def test_sigterm_while_the_children_start_stops_simulate_too(tmp_path: Path, tiny_data: Path) -> None:
    process = _simulate(tmp_path / "run", tiny_data, "--rounds", "50", "--devices-per-process", "1")
    assert process.stdout is not None
    for line in process.stdout:
        if "logs in" in line:  # the children have been started
            break
    groups = {os.getpgid(pid) for pid in child_pids(process.pid)}
    assert len(groups) >= 4, groups  # coordinator, three device processes (and Mosquitto's own group)
    process.terminate()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert live_pids_in_groups(groups) == set()


@pytest.mark.e2e
def test_a_failing_coordinator_is_reported_with_the_tail_of_its_log(tmp_path: Path, tiny_data: Path) -> None:
    # Every attempt of round 1 misses its 10 ms deadline: the coordinator stops the job (a bad --strategy, which
    # this test used, is now refused before anything starts: test_a_bad_strategy_fails_before_anything_starts).
    # One device is enough to open round 1 (three would only start two more processes).
    process = _simulate(tmp_path / "run", tiny_data, "--devices", "1", "--round-timeout", "0.01", "--max-attempts", "1")
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stdout
    assert "the coordinator exited with status" in stderr
    assert "coordinator.log" in stderr
    assert not (tmp_path / "run" / REPORT_JSON).exists()
