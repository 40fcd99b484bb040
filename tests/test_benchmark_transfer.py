"""benchmarks/transfer.py's pure parts: its jobs are simulate's own valid configurations (head-only DP with Poisson
sampling, --init-checkpoint of a real model file), its device data leave the public slice out, its goal verdict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from test_benchmarks import R, _load

transfer = _load("transfer")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.model_file import save_model_file
    from fedmqtt.models import build_model, get_arrays

    path = tmp_path_factory.mktemp("backbone") / "cnn.fedmodel"
    save_model_file(path, "cnn", get_arrays(build_model("cnn", seed=1)))
    return path


def test_device_data_leave_the_public_slice_out_of_the_evaluation_set(tmp_path: Path) -> None:
    from fedmqtt.data import load_dataset, write_idx_dataset

    source = write_idx_dataset(tmp_path / "src", num_train=120, num_test=transfer.PUBLIC_SLICE + 30, seed=3)
    out = transfer.device_data(source, tmp_path / "out", train_samples=100)
    full_test, test = load_dataset("mnist", source, train=False), load_dataset("mnist", out, train=False)
    assert len(test) == 30
    assert np.array_equal(test.images.numpy(), full_test.images[transfer.PUBLIC_SLICE :].numpy())
    assert len(load_dataset("mnist", out, train=True)) == 100


@pytest.mark.parametrize("name", sorted(transfer.SCENARIOS))
def test_every_job_is_a_valid_simulate_configuration(name: str, backbone: Path, tmp_path: Path) -> None:
    from fedmqtt.data import write_idx_dataset

    data = write_idx_dataset(tmp_path / "data", num_train=60, num_test=20, seed=1)
    args = transfer.parse_args(["--quick", "--out", str(tmp_path)])
    s = transfer.SCENARIOS[name]
    base = transfer.base_job(s, args, backbone if s.pretrain else None)
    plan = R.simulation_plan(base, data)
    assert plan.devices == 200 and plan.min_updates == 20 and plan.coordinator.strategy == "fedavgm"
    head = ("fc2.weight", "fc2.bias")
    assert plan.coordinator.trainable == (head if s.trainable else None)
    assert (plan.coordinator.init_checkpoint is not None) is (s.pretrain is not None)
    job = transfer.private_job(base, s, args, 2.0, "central")
    dp = R.simulation_plan(job, data).coordinator.dp
    assert dp.mode.value == "central" and dp.sample_rate == pytest.approx(0.1) and dp.delta == transfer.DELTA
    assert dp.target_epsilon == 2.0 and (dp.adaptive_clip is not None) is (s.adaptive_clip is not None)
    from fedmqtt.privacy import epsilon_of

    # σ is rounded up: the planned rounds stay within the target.
    assert epsilon_of([(dp.noise_multiplier, 0.1, args.rounds)], transfer.DELTA) <= 2.0


def test_goal_verdict_needs_a_private_run_within_epsilon_and_accuracy() -> None:
    s = transfer.SCENARIOS["public1000"]  # >= 97 % at ε <= 2
    runs = [
        {"run": "non-private", "final_accuracy": 0.99, "epsilon": None},
        {"run": "private", "final_accuracy": 0.975, "epsilon": 7.9},
        {"run": "private", "final_accuracy": 0.965, "epsilon": 1.98},
    ]
    assert transfer.goal_verdict(s, runs) == "not met: best 96.50% at ε 1.98"
    runs.append({"run": "private", "final_accuracy": 0.971, "epsilon": 1.99})
    assert transfer.goal_verdict(s, runs) == "met: 97.10% at ε 1.99"


@pytest.mark.parametrize("name", sorted(n for n, s in transfer.SCENARIOS.items() if s.pretrain is not None))
def test_every_pretrain_recipe_is_a_valid_fedmqtt_pretrain_command(name: str) -> None:
    from fedmqtt.cli import build_parser
    from fedmqtt.pretrain import Augment

    s = transfer.SCENARIOS[name]
    for flags in (s.pretrain, s.pretrain_quick):
        assert flags is not None
        args = build_parser().parse_args(["pretrain", "--model", "cnn", *flags, "--out", "x"])
        assert args.command == "pretrain" and args.epochs >= 1
        if args.augment is not None:
            Augment.parse(args.augment)
    if name == "public1000":  # the in-domain backbone trains on random affine views (README's table)
        assert "--augment" in s.pretrain and "--public-slice" in s.pretrain
