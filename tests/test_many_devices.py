"""A thousand virtual devices in one ``fedmqtt device`` process (one network thread for all their MQTT clients)
take part in a real job: ``fedmqtt simulate`` with a coordinator process and Mosquitto, a few devices per round."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.mosquitto, pytest.mark.slow]

DEVICES = 1000


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("idx"), num_train=5 * DEVICES, num_test=100, seed=4)


def _device_threads(root: int) -> dict[int, int]:
    """Threads of each ``fedmqtt device`` process below ``root`` (from /proc)."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            threads = len(list((entry / "task").iterdir()))
        except (OSError, ValueError, IndexError):
            continue
        if b"device" in cmdline and parent == root:
            found[int(entry.name)] = threads
    return found


def test_a_thousand_virtual_devices_in_one_process_take_part_in_rounds(tmp_path: Path, small_data: Path) -> None:
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "fedmqtt.cli", "simulate", "--devices", str(DEVICES),
         "--devices-per-process", str(DEVICES), "--devices-per-round", "5", "--min-updates", "5", "--rounds", "2",
         "--model", "mlp", "--batch-size", "5", "--lr", "0.1", "--data-dir", str(small_data), "--out", str(out),
         "--round-timeout", "120", "--timeout", "500"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    threads: dict[int, int] = {}

    def watch_threads() -> None:
        while process.poll() is None:
            for pid, count in _device_threads(process.pid).items():
                threads[pid] = max(threads.get(pid, 0), count)
            time.sleep(1.0)

    watcher = threading.Thread(target=watch_threads, daemon=True)
    watcher.start()
    stdout, stderr = process.communicate(timeout=560)
    watcher.join(5)
    assert process.returncode == 0, f"{stdout[-3000:]}\n{stderr[-3000:]}"
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["rounds_completed"] == 2
    assert all(r["participants"] >= 5 for r in report["rounds"])
    # One device process held all 1,000 clients; it ran a few threads, not one per client (paho's loop_start
    # would have made 1,000, and select() would have refused the sockets above 1023).
    assert len(threads) == 1
    (count,) = threads.values()
    assert count < 60, f"the device process ran {count} threads"
