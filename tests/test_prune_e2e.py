"""Pruning through the real system (issue #11): ``--prune-schedule`` on a coordinator process paused by SIGTERM
and resumed, ``--keep-pruned`` fine-tuning of a ``fedmqtt export --prune`` file through ``fedmqtt simulate``
(coordinator and device processes on Mosquitto), ``export`` of the results, and the refusals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import fedmqtt_argv, subprocess_env
from fedmqtt.pruning import prunable_names

PYTHON = sys.executable
MLP_WEIGHTS = prunable_names("mlp")


def _zeros(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: arrays[n] == 0 for n in MLP_WEIGHTS}


def _sparsity(arrays: dict[str, np.ndarray]) -> float:
    zeros = _zeros(arrays)
    return sum(int(z.sum()) for z in zeros.values()) / sum(z.size for z in zeros.values())


def _export_json(*args: str) -> dict[str, Any]:
    done = subprocess.run(fedmqtt_argv("export", *args, "--json"), capture_output=True, text=True, timeout=300,
                          env=subprocess_env())  # fmt: skip
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.mark.e2e
@pytest.mark.mosquitto
def test_a_schedule_prunes_on_its_rounds_and_the_zeros_hold_over_later_rounds_and_a_resume(
    mosquitto_broker: Any, make_job: Callable[[str], Any], mqtt_client: Callable[..., Any], tmp_path: Path
) -> None:
    """0.5@1:2 over four rounds on a coordinator process: 43.75 % after round 1, 50 % after round 2 (cubic), the
    same zeros after rounds 3 and 4 although every update moves every weight; SIGTERM after round 2, a resume with
    another --trainable is refused naming both sets, the right resume continues the checkpointed mask; the
    release and the checkpoint's export keep the zeros."""
    import time

    from fedmqtt.codecs import decode_frame
    from fedmqtt.schema import EventType

    ckpt = tmp_path / "ckpt"
    job = make_job(mosquitto_broker.url)
    released: list[bytes] = []
    mqtt_client(job.broker_url, subscriptions=[(job.topics.release, 1)],
                on_message=lambda topic, payload, *_: released.append(payload) if payload else None)  # fmt: skip
    flags = ["--rounds", "4", "--min-updates", "1", "--round-timeout", "60", "--uplink", "float32",
             "--prune-schedule", "0.5@1:2", "--checkpoint-dir", str(ckpt)]  # fmt: skip
    first = job.start(*flags)
    job.devices.online("d1")

    def play(round_number: int) -> None:
        job.view.wait_plan(round_number)
        job.devices.send("d1", job.frame(round_number, "d1", 0.01))
        job.view.wait_summary(round_number)

    play(1)
    model_2, _ = job.view.wait_model(2)
    assert _sparsity(model_2) == pytest.approx(0.5 * (1 - 0.5**3), abs=1e-5)
    assert job.view.wait_summary(1).sparsity == pytest.approx(0.4375, abs=1e-5)
    play(2)
    model_3, _ = job.view.wait_model(3)
    assert _sparsity(model_3) == pytest.approx(0.5, abs=1e-5) and job.view.wait_summary(2).sparsity == 0.5
    zeros = _zeros(model_3)
    assert all(np.all(zeros[n][model_2[n] == 0]) for n in MLP_WEIGHTS)  # pruned once, pruned for good
    assert all(not np.any(model_3[n] == 0) for n in model_3 if n not in MLP_WEIGHTS)  # biases are never pruned

    first.stop()  # SIGTERM: checkpoint, exit 143
    assert first.wait(30) == 128 + signal.SIGTERM
    refused = subprocess.run(
        fedmqtt_argv("coordinator", "--broker", job.broker_url, "--job", job.name, "--prefix", job.prefix,
                     "--model", "mlp", "--quiet", *flags, "--resume", "--trainable", "fc3.*"),
        capture_output=True, text=True, timeout=120, env=subprocess_env(),
    )  # fmt: skip
    assert refused.returncode != 0
    assert "trains all tensors (no --trainable); this coordinator's --trainable gives fc3.weight, fc3.bias" in (
        refused.stderr
    ), refused.stderr

    job.start(*flags, "--resume")
    for round_number in (3, 4):
        play(round_number)
        model, _ = job.view.wait_model(round_number + 1)
        assert all(np.array_equal(model[n] == 0, zeros[n]) for n in MLP_WEIGHTS)  # exactly the same zeros
        assert np.all(model["fc1.bias"] != 0) and job.view.wait_summary(round_number).sparsity == 0.5
    job.view.wait_event(EventType.JOB_FINISHED)
    assert job.processes[-1].wait(30) == 0
    deadline = time.monotonic() + 30
    while not released and time.monotonic() < deadline:
        time.sleep(0.05)
    release = decode_frame(released[-1]).arrays  # the released model keeps its zeros
    assert all(np.array_equal(release[n] == 0, zeros[n]) for n in MLP_WEIGHTS)

    report = _export_json("--checkpoint-dir", str(ckpt), "--out", str(tmp_path / "final.fedmodel"),
                          "--format", "state", "--no-eval")  # fmt: skip
    total = report["after"]["prunable_weights"]
    assert report["before"]["prunable_nonzero"] == report["after"]["prunable_nonzero"] == total // 2


@pytest.mark.e2e
def test_fine_tuning_a_pruned_export_keeps_its_zeros_through_simulate(tmp_path: Path) -> None:
    """fedmqtt export --prune 0.7 --format state of a model file, then fedmqtt simulate (a coordinator and two
    device processes on Mosquitto, FedAvgM, int8 downlink deltas) with --init-checkpoint it --keep-pruned: every
    round reports 70 % sparsity and an accuracy, the checkpoint's model has exactly the file's zeros."""
    from fedmqtt.checkpoint import load_state
    from fedmqtt.data import write_idx_dataset
    from fedmqtt.model_file import load_model_file, save_model_file
    from fedmqtt.models import build_model, get_arrays, model_manifest

    data = write_idx_dataset(tmp_path / "idx", num_train=400, num_test=200, seed=3)
    save_model_file(tmp_path / "dense.fedmodel", "mlp", get_arrays(build_model("mlp", seed=0)))
    weights = sum(int(np.prod(e.shape)) for e in model_manifest("mlp") if e.name in MLP_WEIGHTS)
    pruned_path = tmp_path / "pruned.fedmodel"
    pruned_report = _export_json("--model-file", str(tmp_path / "dense.fedmodel"), "--out", str(pruned_path),
                                 "--format", "state", "--prune", "0.7", "--eval-data", str(data))  # fmt: skip
    assert pruned_report["after"]["prunable_nonzero"] == weights - round(0.7 * weights)
    pruned = load_model_file(pruned_path).arrays
    ckpt = tmp_path / "ckpt"
    run = subprocess.run(
        [PYTHON, "-m", "fedmqtt.cli", "simulate", "--devices", "2", "--rounds", "2", "--model", "mlp",
         "--data-dir", str(data), "--out", str(tmp_path / "run"), "--lr", "0.1", "--batch-size", "20",
         "--round-timeout", "30", "--timeout", "150", "--init-checkpoint", str(pruned_path), "--keep-pruned",
         "--strategy", "fedavgm", "--downlink", "int8", "--checkpoint-dir", str(ckpt)],
        capture_output=True, text=True, timeout=200, env=subprocess_env(),
    )  # fmt: skip
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    state = load_state(ckpt / "coordinator.npz")
    rounds = state["history"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["sparsity"] == pytest.approx(0.7, abs=1e-5) for r in rounds)
    assert all(r["accuracy"] is not None and 0.0 <= r["accuracy"] <= 1.0 for r in rounds)
    final = state["global"]
    for name in MLP_WEIGHTS:
        assert np.array_equal(final[name] == 0, pruned[name] == 0), name  # the file's zeros, exactly
    assert not np.array_equal(final["fc1.weight"], pruned["fc1.weight"])  # and the rest trained
    export = _export_json("--checkpoint-dir", str(ckpt), "--out", str(tmp_path / "tuned.pt"), "--eval-data", str(data))
    assert export["after"]["prunable_nonzero"] == pruned_report["after"]["prunable_nonzero"]
    assert export["after"]["accuracy"] is not None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prune-schedule", "0.8"], "--prune-schedule: '0.8' names no round"),
        (["--prune-schedule", "80%@2"], "is not a sparsity"),
        (["--prune-schedule", "0.8@2:9"], "prunes until round 9 but the job has --rounds 3"),
        (["--keep-pruned"], "--keep-pruned: needs --init-checkpoint"),
        (["--prune-schedule", "0.5@2", "--trainable", "*.bias"], "holds no conv/linear weight to prune"),
    ],
)
def test_bad_pruning_flags_are_refused_before_any_connection(flags: list[str], message: str) -> None:
    done = subprocess.run(
        fedmqtt_argv("coordinator", "--broker", "mqtt://127.0.0.1:9", "--job", "j", "--model", "mlp",
                     "--rounds", "3", "--min-updates", "1", *flags),
        capture_output=True, text=True, timeout=120, env=subprocess_env(),
    )  # fmt: skip
    assert done.returncode == 1 and message in done.stderr, done.stderr
