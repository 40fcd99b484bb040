"""Local training and evaluation (fedmqtt.training), on tiny synthetic IDX data and, slowly, real MNIST."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedmqtt import arrays as A
from fedmqtt.data import ImageDataset, load_dataset, partition, write_idx_dataset
from fedmqtt.errors import ConfigError
from fedmqtt.models import ModelMismatch, build_model, get_arrays, head_parameter_names, set_arrays
from fedmqtt.training import TrainingDiverged, TrainResult, evaluate, model_delta, round_seed, train_local

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageDataset, ImageDataset]:
    directory = write_idx_dataset(tmp_path_factory.mktemp("idx"), num_train=200, num_test=100, seed=0)
    return load_dataset("mnist", directory, train=True), load_dataset("mnist", directory, train=False)


def arrays_equal(a: A.ModelArrays, b: A.ModelArrays) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_training_lowers_loss_and_beats_chance(synthetic: tuple[ImageDataset, ImageDataset]) -> None:
    train, test = synthetic
    model = build_model("mlp", seed=0)
    accuracy_before, loss_before = evaluate(model, test)
    first = train_local(model, train, epochs=1, batch_size=10, lr=0.05, seed=0)
    second = train_local(model, train, epochs=1, batch_size=10, lr=0.05, seed=1)
    accuracy_after, loss_after = evaluate(model, test)
    assert second.loss < first.loss
    assert loss_after < loss_before / 2
    assert accuracy_after > 0.8 > accuracy_before
    assert first == TrainResult(num_samples=200, num_steps=20, loss=first.loss, seconds=first.seconds)
    assert first.seconds > 0


def test_cnn_learns_too(synthetic: tuple[ImageDataset, ImageDataset]) -> None:
    train, test = synthetic
    model = build_model("cnn", seed=0)
    train_local(model, train, epochs=2, batch_size=10, lr=0.05, seed=0)
    assert evaluate(model, test)[0] > 0.8


def test_step_count_includes_the_short_last_batch(synthetic: tuple[ImageDataset, ImageDataset]) -> None:
    train, _ = synthetic
    part = train.subset(np.arange(23))
    result = train_local(build_model("mlp", seed=0), part, epochs=3, batch_size=10, lr=0.01, seed=0)
    assert (result.num_samples, result.num_steps) == (23, 9)
    whole = train_local(build_model("mlp", seed=0), part, epochs=1, batch_size=100, lr=0.01, seed=0)
    assert whole.num_steps == 1


def test_four_devices_three_rounds_of_fedavg_learn_the_synthetic_set(
    synthetic: tuple[ImageDataset, ImageDataset],
) -> None:
    """The synthetic IDX data is meant for end-to-end tests: a small federated run must learn it fast."""
    train, test = synthetic
    started = time.perf_counter()
    global_model = build_model("cnn", seed=0)
    device_model = build_model("cnn", seed=0)
    parts = partition(train.labels.numpy(), "iid", 4, seed=0)
    for round_number in range(3):
        start = get_arrays(global_model)
        total = A.zeros_like(start)
        for device, part in enumerate(parts):
            set_arrays(device_model, start)
            result = train_local(
                device_model, train.subset(part), epochs=1, batch_size=10, lr=0.05, seed=100 * round_number + device
            )
            total = A.add(total, A.scale(model_delta(device_model, start), result.num_samples / len(train)))
        set_arrays(global_model, A.add(start, total))
    accuracy, _ = evaluate(global_model, test)
    assert accuracy > 0.6  # chance is 0.1
    assert time.perf_counter() - started < 30


@pytest.mark.parametrize("name", ["mlp", "seed-cnn"])
def test_training_is_deterministic_given_a_seed(name: str, synthetic: tuple[ImageDataset, ImageDataset]) -> None:
    train, _ = synthetic
    part = train.subset(np.arange(60))
    runs = []
    for seed in (3, 3, 4):
        model = build_model(name, seed=0)
        result = train_local(model, part, epochs=1, batch_size=8, lr=0.05, seed=seed)
        runs.append((get_arrays(model), result.loss))
    assert arrays_equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert not arrays_equal(runs[0][0], runs[2][0])


def test_seeded_training_leaves_the_global_rng_alone(synthetic: tuple[ImageDataset, ImageDataset]) -> None:
    train, _ = synthetic
    state = torch.get_rng_state()
    train_local(build_model("seed-cnn", seed=0), train.subset(np.arange(20)), epochs=1, batch_size=10, lr=0.01, seed=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_unseeded_training_shuffles_differently_each_time(synthetic: tuple[ImageDataset, ImageDataset]) -> None:
    train, _ = synthetic
    part = train.subset(np.arange(40))
    results = []
    for _ in range(2):
        model = build_model("mlp", seed=0)
        train_local(model, part, epochs=1, batch_size=4, lr=0.05)
        results.append(get_arrays(model))
    assert not arrays_equal(results[0], results[1])


def test_trainable_head_leaves_frozen_tensors_bit_identical(synthetic: tuple[ImageDataset, ImageDataset]) -> None:
    train, _ = synthetic
    model = build_model("cnn", seed=0)
    head = head_parameter_names("cnn")
    before = get_arrays(model)
    train_local(model, train.subset(np.arange(50)), epochs=1, batch_size=10, lr=0.1, trainable=head, seed=0)
    after = get_arrays(model)
    for key in before:
        if key in head:
            assert not np.array_equal(before[key], after[key]), key
        else:
            assert np.array_equal(before[key], after[key]), key
    assert all(p.requires_grad for p in model.parameters())  # the freeze lasts one call


def test_trainable_keeps_frozen_batchnorm_statistics(synthetic: tuple[ImageDataset, ImageDataset]) -> None:
    train, _ = synthetic
    part = train.subset(np.arange(40))

    def tiny_bn_model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 13 * 13, 10)
        )

    frozen = tiny_bn_model()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    train_local(frozen, part, epochs=1, batch_size=10, lr=0.1, trainable=["4.weight", "4.bias"], seed=0)
    state = frozen.state_dict()
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked", "0.weight", "1.weight"):
        assert torch.equal(state[key], before[key]), key
    assert not torch.equal(state["4.weight"], before["4.weight"])
    assert frozen.training  # the mode a caller had is restored

    free = tiny_bn_model()
    train_local(free, part, epochs=1, batch_size=10, lr=0.1, seed=0)
    assert not torch.equal(free.state_dict()["1.running_mean"], before["1.running_mean"])


def test_unknown_trainable_name_is_a_config_error(synthetic: tuple[ImageDataset, ImageDataset]) -> None:
    train, _ = synthetic
    model = build_model("mlp", seed=0)
    with pytest.raises(ConfigError, match=r"unknown parameter name.*fc9\.weight"):
        train_local(model, train, epochs=1, batch_size=10, lr=0.1, trainable=["fc9.weight"])
    with pytest.raises(ConfigError, match="names no parameter"):
        train_local(model, train, epochs=1, batch_size=10, lr=0.1, trainable=[])
    assert all(p.requires_grad for p in model.parameters())


def test_fedprox_with_a_large_mu_stays_near_the_start(synthetic: tuple[ImageDataset, ImageDataset]) -> None:
    train, _ = synthetic
    part = train.subset(np.arange(100))
    distances = {}
    for mu in (None, 0.0, 50.0):
        model = build_model("mlp", seed=0)
        start = get_arrays(model)
        # lr·mu = 1: each step's proximal gradient pulls the weights all the way back to the start.
        train_local(model, part, epochs=2, batch_size=10, lr=0.02, prox_mu=mu, seed=0)
        distances[mu] = A.l2_norm(model_delta(model, start))
    assert distances[None] == distances[0.0]  # mu = 0 is plain FedAvg
    assert distances[50.0] < 0.1 * distances[None]


def test_momentum_and_weight_decay_change_the_result(synthetic: tuple[ImageDataset, ImageDataset]) -> None:
    train, _ = synthetic
    part = train.subset(np.arange(50))
    outcomes = []
    for momentum, weight_decay in ((0.0, 0.0), (0.9, 0.0), (0.0, 0.1)):
        model = build_model("mlp", seed=0)
        train_local(model, part, epochs=1, batch_size=10, lr=0.05, momentum=momentum, weight_decay=weight_decay, seed=0)
        outcomes.append(get_arrays(model))
    assert not arrays_equal(outcomes[0], outcomes[1])
    assert not arrays_equal(outcomes[0], outcomes[2])
    assert A.l2_norm(outcomes[2]) < A.l2_norm(outcomes[0])  # decay shrinks the weights


def test_divergence_is_reported(synthetic: tuple[ImageDataset, ImageDataset]) -> None:
    train, _ = synthetic
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        train_local(build_model("mlp", seed=0), train, epochs=1, batch_size=10, lr=1e6, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -0.1}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"momentum": -0.5}, "momentum"),
        ({"weight_decay": math.inf}, "weight_decay"),
        ({"prox_mu": -1.0}, "prox_mu"),
    ],
)
def test_bad_training_settings_are_config_errors(
    kwargs: dict[str, float], field: str, synthetic: tuple[ImageDataset, ImageDataset]
) -> None:
    train, _ = synthetic
    settings: dict[str, float] = {"epochs": 1, "batch_size": 10, "lr": 0.1, **kwargs}
    with pytest.raises(ConfigError) as caught:
        train_local(build_model("mlp"), train, **settings)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_empty_data_is_refused(synthetic: tuple[ImageDataset, ImageDataset]) -> None:
    empty = synthetic[0].subset([])
    with pytest.raises(ConfigError, match="nothing to train on"):
        train_local(build_model("mlp"), empty, epochs=1, batch_size=10, lr=0.1)
    with pytest.raises(ConfigError, match="nothing to evaluate on"):
        evaluate(build_model("mlp"), empty)
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate(build_model("mlp"), synthetic[1], batch_size=0)


def test_evaluate_matches_a_hand_computation() -> None:
    # A linear model that reads only the first two pixels: logits = (2·p0, p1 − 1, 0).
    linear = nn.Linear(4, 3)
    model = nn.Sequential(nn.Flatten(), linear)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([0.0, -1.0, 0.0]))
        linear.weight[0, 0] = 2.0
        linear.weight[1, 1] = 1.0
    pixels = np.array([[1.0, 0.0], [0.0, 3.0], [-1.0, -1.0], [0.5, 0.5], [0.0, 0.0]], dtype=np.float32)
    labels = np.array([0, 1, 2, 1, 2])
    images = np.zeros((5, 1, 2, 2), dtype=np.float32)
    images[:, 0, 0, :] = pixels
    dataset = ImageDataset(torch.from_numpy(images), torch.from_numpy(labels))

    logits = np.stack([2 * pixels[:, 0], pixels[:, 1] - 1, np.zeros(5)], axis=1).astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected_loss = -log_probs[np.arange(5), labels].mean()
    # argmax: [2,-1,0]->0 ✓, [0,2,0]->1 ✓, [-2,-2,0]->2 ✓, [1,-0.5,0]->0 ✗, [0,-1,0]->0 (first max) ✗
    model.train()
    for batch_size in (1, 2, 1000):
        accuracy, loss = evaluate(model, dataset, batch_size=batch_size)
        assert accuracy == pytest.approx(3 / 5)
        assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert model.training  # restored


def test_evaluate_follows_a_channels_last_model(synthetic: tuple[ImageDataset, ImageDataset]) -> None:
    # The coordinator's evaluator moves its CNN to channels-last (faster convolutions): the batches follow the
    # model's layout, and the figures are those of the default layout.
    default = build_model("cnn", seed=3)
    channels_last = build_model("cnn", seed=3).to(memory_format=torch.channels_last)
    assert channels_last.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    set_arrays(channels_last, get_arrays(default))  # copies in place: the layout stays
    assert channels_last.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    test = synthetic[1]
    accuracy, loss = evaluate(default, test, batch_size=7)
    accuracy_cl, loss_cl = evaluate(channels_last, test, batch_size=7)
    assert accuracy_cl == accuracy
    assert loss_cl == pytest.approx(loss, rel=1e-5)


def test_round_seed_gives_each_device_and_round_its_own_reproducible_order(
    synthetic: tuple[ImageDataset, ImageDataset],
) -> None:
    seeds = {round_seed(s, d, r) for s in (0, 1) for d in ("dev-0000", "dev-0001") for r in (1, 2, 3)}
    assert len(seeds) == 12  # every (seed, device, round) its own
    assert round_seed(0, "dev-0000", 1) == round_seed(0, "dev-0000", 1)
    assert all(0 <= s < 2**63 for s in seeds)

    def trained(seed: int) -> dict[str, np.ndarray]:
        model = build_model("mlp", seed=0)
        train_local(model, synthetic[0].subset(np.arange(40)), epochs=1, batch_size=4, lr=0.1, seed=seed)
        return get_arrays(model)

    same, again = trained(round_seed(5, "dev-0003", 2)), trained(round_seed(5, "dev-0003", 2))
    other = trained(round_seed(5, "dev-0003", 3))
    assert all(np.array_equal(same[k], again[k]) for k in same)
    assert not all(np.array_equal(same[k], other[k]) for k in same)


def test_model_delta_is_trained_minus_start(synthetic: tuple[ImageDataset, ImageDataset]) -> None:
    model = build_model("mlp", seed=0)
    start = get_arrays(model)
    train_local(model, synthetic[0].subset(np.arange(20)), epochs=1, batch_size=10, lr=0.1, seed=0)
    delta = model_delta(model, start)
    trained = get_arrays(model)
    assert list(delta) == list(start)
    for key in start:
        assert delta[key].dtype == np.float32
        assert np.array_equal(delta[key], trained[key] - start[key])
    with pytest.raises(ModelMismatch, match=r"missing fc3\.bias"):
        model_delta(model, {k: v for k, v in start.items() if k != "fc3.bias"})


@pytest.mark.slow
def test_cnn_reaches_90_percent_on_real_mnist_in_one_epoch() -> None:
    mnist = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"
    assert mnist.is_dir(), f"the real MNIST IDX files are expected in {mnist.resolve()}"
    started = time.perf_counter()
    train = load_dataset("mnist", mnist, train=True)
    test = load_dataset("mnist", mnist, train=False)
    subset = train.subset(np.random.default_rng(0).permutation(len(train))[:6000])
    model = build_model("cnn", seed=0)
    train_local(model, subset, epochs=1, batch_size=20, lr=0.05, seed=0)
    accuracy, loss = evaluate(model, test)
    assert accuracy > 0.90, (accuracy, loss)
    assert time.perf_counter() - started < 60
