"""Sign-coded, globally sparsified updates through the real system: ``fedmqtt simulate`` (coordinator and device
processes on Mosquitto) with ``--uplink gtopk:0.02+sign+ef``: devices encode it, the coordinator decodes and
averages it, refuses none, and the model learns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmqtt.report import REPORT_JSON


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("idx"), num_train=400, num_test=200, seed=3)


@pytest.mark.e2e
def test_gtopk_sign_updates_are_small_accepted_and_learn(tmp_path: Path, tiny_data: Path) -> None:
    out = tmp_path / "run"
    process = subprocess.run(
        [sys.executable, "-m", "fedmqtt.cli", "simulate", "--devices", "3", "--rounds", "3", "--model", "mlp",
         "--data-dir", str(tiny_data), "--out", str(out), "--lr", "0.1", "--batch-size", "20",
         "--round-timeout", "30", "--timeout", "150", "--uplink", "gtopk:0.02+sign+ef", "--downlink", "float32",
         "--devices-per-process", "3"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert process.returncode == 0, f"{process.stdout}\n{process.stderr}"
    report = json.loads((out / REPORT_JSON).read_text())
    rounds = report["rounds"]
    assert len(rounds) == 3
    for entry in rounds:
        assert entry["participants"] == 3 and entry["refused"] == 0
        # mlp: 199,210 parameters (797 KB as float32); 2 % of them as sign + Rice-coded positions plus the header
        per_update = entry["bytes_up"] / entry["participants"]
        assert 3_000 < per_update < 7_000, per_update
    assert report["totals"]["final_accuracy"] > 0.3  # 10 classes: chance is 0.1
