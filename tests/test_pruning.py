"""The pure pruning core (:mod:`fedmqtt.pruning`): what is prunable, the global magnitude mask, applying it, the
schedule, the job's pruning state and its checkpoint; the config's checks of ``--prune-schedule``/``--keep-pruned``."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmqtt.pruning import (
    PruneSchedule,
    PruneState,
    apply_mask,
    count_to_prune,
    magnitude_mask,
    mask_of_zeros,
    masked_count,
    prunable_modules,
    prunable_names,
)

# --------------------------------------------------------------------------------------------- what is prunable


def test_prunable_tensors_are_the_conv_and_linear_weights() -> None:
    assert prunable_names("cnn") == ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight")
    assert prunable_names("mlp") == ("fc1.weight", "fc2.weight", "fc3.weight")


def test_export_prunes_exactly_the_layers_the_coordinator_scopes() -> None:
    from fedmqtt.export import prune_model
    from fedmqtt.models import build_model

    model = build_model("cnn", seed=0)
    prune_model(model, 0.5)
    zeros = {name: int((p == 0).sum()) for name, p in model.named_parameters()}
    assert {name for name, count in zeros.items() if count} == set(prunable_names("cnn"))
    assert [f"{n}.weight" for n, _ in prunable_modules(model)] == list(prunable_names("cnn"))


# --------------------------------------------------------------------------------------------- the mask

_tensors = st.lists(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
               elements=st.floats(-4, 4, width=32)),  # small range: many ties
    min_size=1, max_size=4,
)  # fmt: skip


def _named(arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {f"t{i}.weight": a for i, a in enumerate(arrays)}


@settings(max_examples=150, deadline=None)
@given(arrays=_tensors, sparsity=st.floats(0, 1))
def test_the_mask_prunes_exactly_the_count_and_keeps_the_largest(arrays: list[np.ndarray], sparsity: float) -> None:
    named = _named(arrays)
    names = list(named)
    mask = magnitude_mask(named, names, sparsity)
    total = sum(a.size for a in arrays)
    assert masked_count(mask) == count_to_prune(total, sparsity) == min(total, round(sparsity * total))
    pruned = np.concatenate([np.abs(named[n][mask[n]]) for n in names])
    kept = np.concatenate([np.abs(named[n][~mask[n]]) for n in names])
    if pruned.size and kept.size:
        assert pruned.max() <= kept.min()  # every kept weight is at least as large as every pruned one
    assert magnitude_mask(named, names, sparsity).keys() == mask.keys()
    assert all(np.array_equal(magnitude_mask(named, names, sparsity)[n], mask[n]) for n in names)  # deterministic


@settings(max_examples=100, deadline=None)
@given(arrays=_tensors, first=st.floats(0, 1), second=st.floats(0, 1))
def test_a_mask_only_grows_and_the_new_weights_are_the_smallest_of_the_rest(
    arrays: list[np.ndarray], first: float, second: float
) -> None:
    named = _named(arrays)
    names = list(named)
    earlier = magnitude_mask(named, names, first)
    pruned = apply_mask(named, earlier)  # as the coordinator holds it: the earlier mask's weights are zero
    later = magnitude_mask(pruned, names, second, keep=earlier)
    total = sum(a.size for a in arrays)
    assert masked_count(later) == max(masked_count(earlier), count_to_prune(total, second))
    assert all(np.all(later[n][earlier[n]]) for n in names)  # nothing pruned grows back
    new = np.concatenate([np.abs(named[n][later[n] & ~earlier[n]]) for n in names])
    kept = np.concatenate([np.abs(named[n][~later[n]]) for n in names])
    if new.size and kept.size:
        assert new.max() <= kept.min()


def test_ties_are_taken_in_tensor_then_position_order() -> None:
    named = {"a.weight": np.array([1.0, 0.5, 0.5], np.float32), "b.weight": np.array([0.5, 2.0], np.float32)}
    mask = magnitude_mask(named, ["a.weight", "b.weight"], 0.4)  # 2 of 5, three tied at 0.5
    assert mask["a.weight"].tolist() == [False, True, True] and mask["b.weight"].tolist() == [False, False]


def test_sparsity_bounds() -> None:
    named = {"w": np.arange(10, dtype=np.float32).reshape(2, 5)}
    assert masked_count(magnitude_mask(named, ["w"], 0.0)) == 0
    assert masked_count(magnitude_mask(named, ["w"], 1.0)) == 10
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sparsity must be in"):
            magnitude_mask(named, ["w"], bad)


def test_the_mask_selects_what_torch_global_l1_pruning_selects() -> None:
    import torch
    from torch.nn.utils import prune

    from fedmqtt.models import build_model, get_arrays

    model = build_model("mlp", seed=3)
    arrays = get_arrays(model)
    names = prunable_names("mlp")
    ours = magnitude_mask(arrays, names, 0.7)
    layers = [m for _, m in prunable_modules(model)]
    prune.global_unstructured([(m, "weight") for m in layers], pruning_method=prune.L1Unstructured, amount=0.7)
    theirs = {n: (m.weight_mask == 0).numpy() for n, m in zip(names, layers, strict=True)}
    assert all(np.array_equal(ours[n], theirs[n]) for n in names)
    assert masked_count(ours) == int(sum(torch.count_nonzero(m.weight_mask == 0) for m in layers))


def test_apply_mask_zeros_the_masked_weights_and_leaves_the_rest_as_they_were() -> None:
    named = {"w": np.array([[3.0, -1.0], [0.5, 2.0]], np.float32), "b": np.ones(2, np.float32)}
    mask = magnitude_mask(named, ["w"], 0.5)
    out = apply_mask(named, mask)
    assert out["w"].tolist() == [[3.0, 0.0], [0.0, 2.0]] and named["w"][1, 0] == 0.5  # a copy
    assert out["b"] is named["b"]
    assert all(np.array_equal(mask_of_zeros(out, ["w"])[n], mask[n]) for n in mask)


# --------------------------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.8@2:10", (0.8, 2, 10)), ("0.5@3", (0.5, 3, 3)), (" 0.50 @ 3 : 5 ", (0.5, 3, 5)), ("0.9@1:1", (0.9, 1, 1))],
)
def test_schedules_parse(text: str, expected: tuple[float, int, int]) -> None:
    schedule = PruneSchedule.parse(text)
    assert (schedule.target, schedule.first, schedule.last) == expected
    assert PruneSchedule.parse(schedule.spec) == schedule


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.8", "names no round"),
        ("abc@2", "is not a sparsity"),
        ("1@2", "must be above 0 and below 1"),
        ("0@2", "must be above 0 and below 1"),
        ("-0.5@2", "must be above 0 and below 1"),
        ("nan@2", "must be above 0 and below 1"),
        ("0.5@x", "is not a round"),
        ("0.5@2:", "is not a round"),
        ("0.5@0", "at least 1"),
        ("0.5@9:3", "ends (round 3) before it starts (round 9)"),
    ],
)
def test_bad_schedules_are_refused_saying_what_to_write(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PruneSchedule.parse(text)


@settings(max_examples=200, deadline=None)
@given(target=st.floats(0.01, 0.99), first=st.integers(1, 50), length=st.integers(0, 50))
def test_the_schedule_rises_monotonically_from_zero_to_its_target(target: float, first: int, length: int) -> None:
    schedule = PruneSchedule(target, first, first + length)
    values = [schedule.sparsity_after(r) for r in range(0, first + length + 5)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[first - 1] == 0.0 and schedule.sparsity_after(first) > 0
    assert schedule.sparsity_after(first + length) == target == values[-1]


def test_gradual_pruning_is_cubic_zhu_and_gupta() -> None:
    schedule = PruneSchedule.parse("0.8@2:5")  # four steps: rounds 2, 3, 4, 5
    expected = [0.0, 0.8 * (1 - 0.75**3), 0.8 * (1 - 0.5**3), 0.8 * (1 - 0.25**3), 0.8, 0.8]
    assert [schedule.sparsity_after(r) for r in range(1, 7)] == pytest.approx(expected)


# --------------------------------------------------------------------------------------------- a job's pruning


def test_a_job_prunes_on_schedule_keeps_its_zeros_and_its_mask_survives_a_checkpoint(tmp_path: Path) -> None:
    from fedmqtt.checkpoint import load_state, save_state

    rng = np.random.default_rng(0)
    model = {"fc1.weight": rng.normal(size=(20, 10)).astype(np.float32), "fc1.bias": np.ones(20, np.float32)}
    state = PruneState(("fc1.weight",), PruneSchedule.parse("0.6@2:3"))
    out = state.after_round(model, 1)
    assert state.pruned == 0 and np.array_equal(out["fc1.weight"], model["fc1.weight"])
    out = state.after_round(model, 2)
    assert state.pruned == round(0.6 * (1 - 0.5**3) * 200) and state.sparsity == pytest.approx(state.pruned / 200)
    out = state.after_round({k: v + 1 for k, v in out.items()}, 3)  # a round's update moves every weight
    assert state.pruned == 120 and int((out["fc1.weight"] == 0).sum()) == 120
    assert np.array_equal(out["fc1.bias"], model["fc1.bias"] + 1)  # biases are never pruned
    save_state(tmp_path / "c.npz", {"pruning": state.state_dict()})
    restored = PruneState(("fc1.weight",), PruneSchedule.parse("0.6@2:3"))
    restored.load_state_dict(load_state(tmp_path / "c.npz")["pruning"])
    assert np.array_equal(restored.mask["fc1.weight"], state.mask["fc1.weight"])
    later = restored.after_round({k: v + 1 for k, v in out.items()}, 4)  # the mask holds; nothing more is pruned
    assert restored.pruned == 120 and np.array_equal(later["fc1.weight"] == 0, state.mask["fc1.weight"])


# --------------------------------------------------------------------------------------------- the config's checks


def _config(**values: Any) -> Any:
    from fedmqtt.coordinator.config import load_config

    base = {"broker": "mqtt://127.0.0.1:1883", "job": "j", "rounds": 5, "min_updates": 1, "model": "mlp"}
    return load_config(None, {**base, **values}, env={})


def test_the_config_refuses_bad_pruning_flags_naming_them(tmp_path: Path) -> None:
    from fedmqtt.model_file import save_model_file
    from fedmqtt.models import build_model, get_arrays
    from fedmqtt.settings import SettingsError

    assert _config(prune_schedule=" 0.8 @ 2:5").prune_schedule == "0.8@2:5"
    assert _config(prune_schedule="0.5@3", trainable=("fc3.*",)).prune_scope == ("fc3.weight",)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prune_schedule": "0.8@2:9"}, "--prune-schedule: 0.8@2:9 prunes until round 9 but the job has --rounds 5"),
        ({"prune_schedule": "0.8@x"}, "--prune-schedule: 'x' is not a round"),
        ({"prune_schedule": "0.5@2", "trainable": ("fc3.bias",)},
         "--prune-schedule: --trainable (fc3.bias) holds no conv/linear weight to prune; the prunable tensors of "
         "mlp: fc1.weight, fc2.weight, fc3.weight"),
        ({"keep_pruned": True}, "--keep-pruned: needs --init-checkpoint"),
    ]  # fmt: skip
    save_model_file(tmp_path / "dense.fedmodel", "mlp", get_arrays(build_model("mlp", seed=1)))
    cases.append(({"keep_pruned": True, "init_checkpoint": tmp_path / "dense.fedmodel"}, "has no zero weight in fc1"))
    for values, message in cases:
        with pytest.raises(SettingsError) as info:
            _config(**values)
        assert message in str(info.value), str(info.value)


def test_with_trainable_only_the_trainable_weights_are_pruned_and_frozen_ones_are_the_very_same_arrays() -> None:
    from fedmqtt.models import build_model, get_arrays

    config = _config(prune_schedule="0.8@1", trainable=("fc2.*", "fc3.*"))
    assert config.prune_scope == ("fc2.weight", "fc3.weight")
    model = get_arrays(build_model("mlp", seed=2))
    state = PruneState(config.prune_scope, config.prune_plan)
    out = state.after_round(model, 1)
    assert out["fc1.weight"] is model["fc1.weight"] and not np.any(out["fc1.weight"] == 0)
    assert state.sparsity == pytest.approx(0.8, abs=1e-4)
    assert int((out["fc2.weight"] == 0).sum() + (out["fc3.weight"] == 0).sum()) == state.pruned


def test_every_strategy_dp_mode_downlink_and_scale_out_accept_a_schedule() -> None:
    from fedmqtt.coordinator.aggregation import STRATEGY_NAMES

    for strategy in STRATEGY_NAMES:  # 10 updates: enough for every robust strategy's default parameters
        assert _config(prune_schedule="0.5@2", strategy=strategy, min_updates=10).prune_schedule == "0.5@2"
    assert _config(prune_schedule="0.5@2", downlink="topk:0.1+int8", aggregators=2).prune_scope
    dp: dict[str, Any] = {"dp_mode": "central", "dp_clip": 1.0, "dp_noise_multiplier": 1.0, "dp_sample_rate": 0.5}
    assert _config(prune_schedule="0.5@2", **dp).dp is not None
