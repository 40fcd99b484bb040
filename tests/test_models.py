"""The model registry and the torch <-> ModelArrays bridge (fedmqtt.models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmqtt.arrays import manifest_of
from fedmqtt.errors import ConfigError, FedmqttError
from fedmqtt.models import (
    MODEL_NAMES,
    ModelMismatch,
    build_model,
    get_arrays,
    head_parameter_names,
    model_input_shape,
    model_manifest,
    parameter_count,
    set_arrays,
)
from fedmqtt.schema import ManifestEntry

torch.set_num_threads(1)

SMALL_MODELS = ("cnn", "seed-cnn", "mlp")


def test_registry_names() -> None:
    assert MODEL_NAMES == ("cnn", "seed-cnn", "mlp", "mobilenet-v3-small")


@pytest.mark.parametrize(
    ("name", "count"),
    [("cnn", 1_663_370), ("seed-cnn", 1_199_882), ("mlp", 199_210), ("mobilenet-v3-small", 1_528_106)],
)
def test_exact_parameter_counts(name: str, count: int) -> None:
    assert parameter_count(name) == count
    model = build_model(name, seed=0)
    assert sum(p.numel() for p in model.parameters()) == count


def test_cnn_manifest_is_mcmahans_network() -> None:
    assert model_manifest("cnn") == (
        ManifestEntry(name="conv1.weight", shape=(32, 1, 5, 5)),
        ManifestEntry(name="conv1.bias", shape=(32,)),
        ManifestEntry(name="conv2.weight", shape=(64, 32, 5, 5)),
        ManifestEntry(name="conv2.bias", shape=(64,)),
        ManifestEntry(name="fc1.weight", shape=(512, 3136)),
        ManifestEntry(name="fc1.bias", shape=(512,)),
        ManifestEntry(name="fc2.weight", shape=(10, 512)),
        ManifestEntry(name="fc2.bias", shape=(10,)),
    )


def test_seed_cnn_and_mlp_manifests() -> None:
    assert [(e.name, e.shape) for e in model_manifest("seed-cnn")] == [
        ("conv1.weight", (32, 1, 3, 3)),
        ("conv1.bias", (32,)),
        ("conv2.weight", (64, 32, 3, 3)),
        ("conv2.bias", (64,)),
        ("fc1.weight", (128, 9216)),
        ("fc1.bias", (128,)),
        ("fc2.weight", (10, 128)),
        ("fc2.bias", (10,)),
    ]
    assert [(e.name, e.shape) for e in model_manifest("mlp")] == [
        ("fc1.weight", (200, 784)),
        ("fc1.bias", (200,)),
        ("fc2.weight", (200, 200)),
        ("fc2.bias", (200,)),
        ("fc3.weight", (10, 200)),
        ("fc3.bias", (10,)),
    ]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_manifest_matches_a_built_model_and_forward_works(name: str) -> None:
    model = build_model(name, seed=1)
    arrays = get_arrays(model)
    assert manifest_of(arrays) == model_manifest(name)
    assert list(arrays) == [k for k, v in model.state_dict().items() if v.is_floating_point()]
    assert all(v.dtype == np.float32 for v in arrays.values())
    model.eval()
    with torch.inference_mode():
        shape = model_input_shape(name)
        if name == "mobilenet-v3-small":
            shape = (3, 64, 64)  # any size from 32×32 up works; 224×224 is just slower
        out = model(torch.zeros(2, *shape))
    assert out.shape == (2, 10)


def test_mobilenet_arrays_hold_float_buffers_but_not_batch_counters() -> None:
    model = build_model("mobilenet-v3-small", seed=0)
    state = model.state_dict()
    arrays = get_arrays(model)
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters and not any(k in arrays for k in counters)
    assert "features.0.1.running_mean" in arrays and "features.0.1.running_var" in arrays
    assert len(arrays) == len(state) - len(counters)
    assert model_manifest("mobilenet-v3-small")[-1].shape == (10,)  # classifier.3.bias
    set_arrays(model, arrays)  # the counters need not be supplied


def test_num_classes_changes_only_the_head() -> None:
    three = model_manifest("cnn", num_classes=3)
    ten = model_manifest("cnn")
    assert three[:-2] == ten[:-2]
    assert [e.shape for e in three[-2:]] == [(3, 512), (3,)]
    assert build_model("mlp", num_classes=3)(torch.zeros(1, 1, 28, 28)).shape == (1, 3)
    assert parameter_count("mlp", num_classes=3) == 199_210 - 7 * 201


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("cnn", ("fc2.weight", "fc2.bias")),
        ("seed-cnn", ("fc2.weight", "fc2.bias")),
        ("mlp", ("fc3.weight", "fc3.bias")),
        ("mobilenet-v3-small", ("classifier.3.weight", "classifier.3.bias")),
    ],
)
def test_head_parameter_names(name: str, head: tuple[str, ...]) -> None:
    assert head_parameter_names(name) == head
    assert set(head) <= {k for k, _ in build_model(name).named_parameters()}


def test_seeded_initialisation_is_deterministic_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a = get_arrays(build_model("cnn", seed=5))
    b = get_arrays(build_model("cnn", seed=5))
    c = get_arrays(build_model("cnn", seed=6))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["fc1.weight"], c["fc1.weight"])


def test_get_arrays_returns_independent_copies() -> None:
    model = build_model("mlp", seed=0)
    arrays = get_arrays(model)
    bias = dict(model.named_parameters())["fc1.bias"]
    before = bias.detach().clone()
    arrays["fc1.bias"][:] = 42.0
    assert torch.equal(bias.detach(), before)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_set_arrays_round_trip_in_place(name: str) -> None:
    source = build_model(name, seed=1)
    target = build_model(name, seed=2)
    parameters_before = [id(p) for p in target.parameters()]
    set_arrays(target, get_arrays(source))
    assert [id(p) for p in target.parameters()] == parameters_before  # optimizers stay valid
    for key, value in get_arrays(target).items():
        assert np.array_equal(value, get_arrays(source)[key])
    source.eval()
    target.eval()
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.equal(source(x), target(x))


def test_set_arrays_accepts_any_key_order_and_float64_values() -> None:
    model = build_model("mlp", seed=0)
    arrays = {k: v.astype(np.float64) + 1 for k, v in reversed(list(get_arrays(model).items()))}
    set_arrays(model, arrays)
    assert np.allclose(get_arrays(model)["fc3.bias"], arrays["fc3.bias"])


def _mutations() -> list[tuple[str, object, str]]:
    return [
        ("missing", lambda a: {k: v for k, v in a.items() if k != "fc2.bias"}, "missing fc2.bias (200,)"),
        ("extra", lambda a: {**a, "fc4.weight": np.zeros((2, 2), np.float32)}, "unexpected fc4.weight (2, 2)"),
        (
            "shape",
            lambda a: {**a, "fc3.weight": np.zeros((3, 200), np.float32)},
            "fc3.weight has shape (3, 200), the model needs (10, 200)",
        ),
        ("other model", lambda a: get_arrays(build_model("cnn")), "missing fc3.weight (10, 200)"),
    ]


@pytest.mark.parametrize(("case", "mutate", "difference"), _mutations())
def test_set_arrays_refuses_mismatches_and_leaves_the_model_alone(case: str, mutate, difference: str) -> None:
    model = build_model("mlp", seed=0)
    before = get_arrays(model)
    bad = mutate({k: v + 1 for k, v in before.items()})
    with pytest.raises(ModelMismatch) as caught:
        set_arrays(model, bad)
    assert difference in caught.value.differences
    assert difference in str(caught.value)
    assert isinstance(caught.value, FedmqttError)
    after = get_arrays(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_mismatch_message_lists_only_the_first_differences() -> None:
    model = build_model("cnn")
    with pytest.raises(ModelMismatch) as caught:
        set_arrays(model, get_arrays(build_model("mobilenet-v3-small")))
    assert len(caught.value.differences) > 5
    assert f"(and {len(caught.value.differences) - 5} more)" in str(caught.value)


def test_unknown_model_and_bad_class_count_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="cnn, seed-cnn, mlp, mobilenet-v3-small"):
        build_model("resnet50")
    with pytest.raises(ConfigError, match="unknown model"):
        model_manifest("resnet50")
    with pytest.raises(ConfigError, match="unknown model"):
        model_input_shape("nope")
    for call in (
        lambda: build_model("cnn", num_classes=1),
        lambda: model_manifest("cnn", num_classes=0),
        lambda: parameter_count("cnn", num_classes=1),
        lambda: head_parameter_names("cnn", num_classes=1),
    ):
        with pytest.raises(ConfigError, match="num_classes: must be at least 2"):
            call()


def test_manifest_is_cached() -> None:
    assert model_manifest("seed-cnn") is model_manifest("seed-cnn")
