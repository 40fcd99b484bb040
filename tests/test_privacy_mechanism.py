"""Clipping, Gaussian noise, noise placement by mode, the accepted-norm bound and DP-compatible aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmqtt import arrays as A
from fedmqtt.errors import ConfigError
from fedmqtt.privacy import (
    DP_COMPATIBLE_STRATEGIES,
    NonFiniteUpdate,
    add_gaussian_noise,
    central_noise_std,
    check_dp_compatible,
    clip_and_noise,
    clip_update,
    device_noise_std,
    effective_noise_multiplier,
    max_accepted_norm,
    secure_generator,
    topup_noise_std,
)
from fedmqtt.schema import DPMode

torch.set_num_threads(1)


def _generator(seed: int) -> torch.Generator:
    # Fixed seeds only in tests, for reproducible statistics; production uses secure_generator().
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _update(rng: np.random.Generator, scale: float = 1.0) -> A.ModelArrays:
    return {
        "conv.weight": (rng.standard_normal((4, 1, 3, 3)) * scale).astype(np.float32),
        "conv.bias": (rng.standard_normal(4) * scale).astype(np.float32),
        "fc.weight": (rng.standard_normal((10, 36)) * scale).astype(np.float32),
        "fc.bias": np.float32(rng.standard_normal()) * np.ones((), dtype=np.float32) * scale,
    }


_finite_f32 = st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, width=32)
_tensor = hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, max_side=6), elements=_finite_f32)
_updates = st.dictionaries(st.sampled_from(["a", "b.weight", "c.bias", "d"]), _tensor, min_size=1, max_size=4)


# ---------------------------------------------------------------------------------------------------- clipping


@settings(max_examples=200, deadline=None)
@given(update=_updates, clip=st.floats(min_value=1e-6, max_value=1e6))
def test_clipping_bound_holds_for_any_update(update: A.ModelArrays, clip: float) -> None:
    clipped, norm_before = clip_update(update, clip)
    assert A.l2_norm(clipped) <= clip
    assert norm_before == A.l2_norm(update)
    assert list(clipped) == list(update)
    for name, value in clipped.items():
        assert value.dtype == np.float32 and value.shape == update[name].shape
    if norm_before <= clip:
        for name in update:
            np.testing.assert_array_equal(clipped[name], update[name])


def test_clipping_scales_to_exactly_the_clip_and_keeps_the_direction() -> None:
    update = _update(np.random.default_rng(1), scale=3.0)
    norm = A.l2_norm(update)
    clipped, norm_before = clip_update(update, 0.5)
    assert norm_before == pytest.approx(norm)
    assert A.l2_norm(clipped) == pytest.approx(0.5, rel=1e-6)
    np.testing.assert_allclose(A.flatten(clipped) * (norm / 0.5), A.flatten(update), rtol=1e-5, atol=1e-6)


def test_small_updates_are_left_unchanged_and_copied() -> None:
    update = _update(np.random.default_rng(2), scale=0.01)
    clipped, norm_before = clip_update(update, 10.0)
    assert norm_before < 10.0
    for name, value in update.items():
        np.testing.assert_array_equal(clipped[name], value)
        assert clipped[name] is not value
    clipped["fc.bias"][...] = 99.0
    assert update["fc.bias"] != 99.0


def test_clipping_an_empty_or_zero_update() -> None:
    assert clip_update({}, 1.0) == ({}, 0.0)
    zeros, norm = clip_update({"w": np.zeros(5, dtype=np.float32)}, 1.0)
    assert norm == 0.0 and not zeros["w"].any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_updates_are_refused_with_the_tensor_name(bad: float) -> None:
    update = {"ok": np.ones(3, dtype=np.float32), "broken": np.array([1.0, bad], dtype=np.float32)}
    with pytest.raises(NonFiniteUpdate, match=r"'broken'.*lower the learning rate"):
        clip_update(update, 1.0)


@pytest.mark.parametrize("clip", [0.0, -1.0, math.nan, math.inf, "1.0", None])
def test_bad_clip_is_a_config_error(clip: object) -> None:
    with pytest.raises(ConfigError, match=r"clip: must be a positive finite number"):
        clip_update({"w": np.ones(2, dtype=np.float32)}, clip)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- noise

D = 200_000  # large enough that a sample std is within ~0.4% (1 sd) of the true one


def _sample_std(arrays: A.ModelArrays) -> float:
    return float(np.std(A.flatten(arrays).astype(np.float64)))


def _zeros(d: int = D) -> A.ModelArrays:
    return {"w": np.zeros((d // 2, 2), dtype=np.float32)}


@pytest.mark.parametrize(
    ("mode", "per_device", "central"),
    [
        (DPMode.DEVICE, 1.3 * 0.7 / math.sqrt(8), 0.0),
        (DPMode.LOCAL, 1.3 * 0.7, 0.0),
        (DPMode.CENTRAL, 0.0, 1.3 * 0.7),
        (DPMode.OFF, 0.0, 0.0),
    ],
)
def test_noise_placement_by_mode(mode: DPMode, per_device: float, central: float) -> None:
    assert device_noise_std(mode, 1.3, 0.7, 8) == pytest.approx(per_device)
    assert central_noise_std(mode, 1.3, 0.7) == pytest.approx(central)
    assert device_noise_std(mode.value, 1.3, 0.7, 8) == pytest.approx(per_device)  # strings work too


@pytest.mark.parametrize("mode", [DPMode.DEVICE, DPMode.LOCAL])
def test_device_noise_has_the_planned_std(mode: DPMode) -> None:
    std = device_noise_std(mode, 1.3, 0.7, 8)
    noised, _ = clip_and_noise(_zeros(), clip=0.7, noise_std=std, generator=_generator(3))
    assert noised["w"].dtype == np.float32
    assert _sample_std(noised) == pytest.approx(std, rel=0.015)
    assert abs(float(A.flatten(noised).mean())) < 5 * std / math.sqrt(D)


def test_sum_of_m_device_noised_updates_carries_sigma_times_clip() -> None:
    sigma, clip, m = 1.1, 2.0, 6
    std = device_noise_std(DPMode.DEVICE, sigma, clip, m)
    g = _generator(4)
    total = A.zeros_like(_zeros(60_000))
    for _ in range(m):
        total = A.add(total, clip_and_noise(_zeros(60_000), clip=clip, noise_std=std, generator=g)[0])
    assert _sample_std(total) == pytest.approx(sigma * clip, rel=0.02)


def test_central_noise_added_by_the_coordinator_has_sigma_times_clip() -> None:
    std = central_noise_std(DPMode.CENTRAL, 0.9, 1.5)
    noised = add_gaussian_noise(_zeros(), std, _generator(5))
    assert _sample_std(noised) == pytest.approx(0.9 * 1.5, rel=0.015)


def test_zero_noise_returns_the_clipped_update_exactly() -> None:
    update = _update(np.random.default_rng(6), scale=5.0)
    noised, norm = clip_and_noise(update, clip=1.0, noise_std=0.0)
    clipped, norm2 = clip_update(update, 1.0)
    assert norm == norm2
    for name in update:
        np.testing.assert_array_equal(noised[name], clipped[name])


def test_noise_keeps_names_shapes_and_float32_including_scalars() -> None:
    update = _update(np.random.default_rng(7))
    noised = add_gaussian_noise(update, 0.1, _generator(8))
    assert list(noised) == list(update)
    for name, value in noised.items():
        assert value.shape == update[name].shape and value.dtype == np.float32
        assert not np.array_equal(value, update[name])


def test_two_secure_generators_give_different_noise() -> None:
    a = add_gaussian_noise(_zeros(1000), 1.0, secure_generator())
    b = add_gaussian_noise(_zeros(1000), 1.0, secure_generator())
    assert not np.array_equal(a["w"], b["w"])
    assert secure_generator().initial_seed() != secure_generator().initial_seed()


def test_clip_and_noise_without_a_generator_uses_a_secure_one() -> None:
    update = {"w": np.zeros(1000, dtype=np.float32)}
    a, _ = clip_and_noise(update, clip=1.0, noise_std=1.0)
    b, _ = clip_and_noise(update, clip=1.0, noise_std=1.0)
    assert not np.array_equal(a["w"], b["w"])


@pytest.mark.parametrize("std", [-0.1, math.nan, math.inf])
def test_bad_noise_std_is_a_config_error(std: float) -> None:
    with pytest.raises(ConfigError, match=r"noise_std"):
        add_gaussian_noise(_zeros(10), std, _generator(0))
    with pytest.raises(ConfigError, match=r"noise_std"):
        clip_and_noise(_zeros(10), clip=1.0, noise_std=std)


def test_bad_mode_and_counts_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"dp_mode: 'secure' is not a DP mode"):
        device_noise_std("secure", 1.0, 1.0, 4)
    with pytest.raises(ConfigError, match=r"expected_updates: must be an integer >= 1"):
        device_noise_std(DPMode.DEVICE, 1.0, 1.0, 0)
    with pytest.raises(ConfigError, match=r"noise_multiplier"):
        central_noise_std(DPMode.CENTRAL, -1.0, 1.0)
    with pytest.raises(ConfigError, match=r"expected_updates"):
        device_noise_std(DPMode.DEVICE, 1.0, 1.0, True)


# ---------------------------------------------------------------------------------------------------- effective noise


def test_effective_noise_multiplier_for_full_and_partial_rounds() -> None:
    sigma, m = 1.2, 10
    assert effective_noise_multiplier(DPMode.DEVICE, sigma, m, m) == pytest.approx(sigma)
    assert effective_noise_multiplier(DPMode.DEVICE, sigma, m, 4) == pytest.approx(sigma * math.sqrt(0.4))
    assert effective_noise_multiplier(DPMode.DEVICE, sigma, m, 4, topped_up=True) == pytest.approx(sigma)
    assert effective_noise_multiplier(DPMode.DEVICE, sigma, m, 12) == pytest.approx(sigma * math.sqrt(1.2))
    assert effective_noise_multiplier(DPMode.LOCAL, sigma, m, 4) == pytest.approx(sigma * 2.0)
    assert effective_noise_multiplier(DPMode.CENTRAL, sigma, m, 4) == pytest.approx(sigma)
    assert effective_noise_multiplier(DPMode.OFF, sigma, m, 4) == 0.0


def test_partial_device_round_noise_matches_the_effective_multiplier_and_topup_restores_it() -> None:
    sigma, clip, m, k = 1.0, 1.0, 8, 2
    g = _generator(9)
    std = device_noise_std(DPMode.DEVICE, sigma, clip, m)
    total = A.zeros_like(_zeros(80_000))
    for _ in range(k):
        total = A.add(total, add_gaussian_noise(_zeros(80_000), std, g))
    z = effective_noise_multiplier(DPMode.DEVICE, sigma, m, k)
    assert _sample_std(total) == pytest.approx(z * clip, rel=0.02)
    topped = add_gaussian_noise(total, topup_noise_std(DPMode.DEVICE, sigma, clip, m, k), g)
    assert _sample_std(topped) == pytest.approx(sigma * clip, rel=0.02)


def test_topup_is_zero_unless_a_device_round_is_short() -> None:
    assert topup_noise_std(DPMode.DEVICE, 1.0, 1.0, 8, 8) == 0.0
    assert topup_noise_std(DPMode.DEVICE, 1.0, 1.0, 8, 9) == 0.0
    assert topup_noise_std(DPMode.CENTRAL, 1.0, 1.0, 8, 2) == 0.0
    assert topup_noise_std(DPMode.LOCAL, 1.0, 1.0, 8, 2) == 0.0
    assert topup_noise_std(DPMode.DEVICE, 2.0, 0.5, 4, 0) == pytest.approx(1.0)


def test_a_round_without_updates_cannot_be_accounted() -> None:
    with pytest.raises(ConfigError, match=r"received_updates: is 0.*do not account it"):
        effective_noise_multiplier(DPMode.CENTRAL, 1.0, 10, 0)
    with pytest.raises(ConfigError, match=r"received_updates"):
        effective_noise_multiplier(DPMode.DEVICE, 1.0, 10, -1)


# ---------------------------------------------------------------------------------------------------- accepted norm


def test_honest_clipped_and_noised_updates_pass_the_norm_check() -> None:
    clip, std, d = 1.0, 0.05, 2000
    bound = max_accepted_norm(clip, std, d)
    g = _generator(10)
    rng = np.random.default_rng(10)
    worst = 0.0
    for _ in range(300):
        # Raw updates far above the clip: after clipping they sit exactly at norm C, the worst honest case.
        raw = {"w": (rng.standard_normal(d) * 10).astype(np.float32)}
        sent, _ = clip_and_noise(raw, clip=clip, noise_std=std, generator=g)
        worst = max(worst, A.l2_norm(sent))
    assert worst <= bound
    # A million more samples of the worst case u = C·e1, drawn from its exact law:
    # ‖u + n‖² = (C + n₁)² + s²·χ²(d − 1).
    n = 1_000_000
    squared = (clip + std * rng.standard_normal(n)) ** 2 + std**2 * rng.chisquare(d - 1, n)
    assert float(np.sqrt(squared.max())) <= bound


def test_an_update_at_twice_the_clip_is_refused_when_noise_is_small() -> None:
    clip, std, d = 1.0, 1e-3, 1000
    bound = max_accepted_norm(clip, std, d)
    rng = np.random.default_rng(11)
    raw = rng.standard_normal(d)
    cheat = {"w": (raw / np.linalg.norm(raw) * 2 * clip).astype(np.float32)}
    sent = add_gaussian_noise(cheat, std, _generator(11))  # skipped clipping, still noised
    assert A.l2_norm(sent) > bound


def test_the_bound_is_the_clip_without_noise_and_grows_with_noise_dimension_and_confidence() -> None:
    assert max_accepted_norm(2.0, 0.0, 10**6) == pytest.approx(2.0, rel=1e-5)
    assert max_accepted_norm(1.0, 0.1, 100) < max_accepted_norm(1.0, 0.1, 10_000)
    assert max_accepted_norm(1.0, 0.1, 100) < max_accepted_norm(1.0, 0.2, 100)
    assert max_accepted_norm(1.0, 0.1, 100, tail=1e-3) < max_accepted_norm(1.0, 0.1, 100, tail=1e-12)
    # Never looser than the simple triangle bound C + s(√d + √(2 ln(2/tail))).
    simple = 1.0 + 0.3 * (math.sqrt(10**5) + math.sqrt(2 * math.log(2 / 1e-9)))
    assert max_accepted_norm(1.0, 0.3, 10**5) <= simple * (1 + 1e-6)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"clip": 0.0, "noise_std": 0.1, "numel": 10}, "clip"),
        ({"clip": 1.0, "noise_std": -0.1, "numel": 10}, "noise_std"),
        ({"clip": 1.0, "noise_std": 0.1, "numel": -1}, "numel"),
        ({"clip": 1.0, "noise_std": 0.1, "numel": 10, "tail": 0.0}, "tail"),
        ({"clip": 1.0, "noise_std": 0.1, "numel": 10, "tail": 1.0}, "tail"),
    ],
)
def test_bad_norm_bound_inputs_are_config_errors(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        max_accepted_norm(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("strategy", DP_COMPATIBLE_STRATEGIES)
@pytest.mark.parametrize("mode", [DPMode.DEVICE, DPMode.LOCAL, DPMode.CENTRAL])
def test_mean_based_strategies_are_dp_compatible(strategy: str, mode: DPMode) -> None:
    check_dp_compatible(strategy, mode)  # returns quietly


@pytest.mark.parametrize("strategy", ["median", "trimmed-mean", "krum", "bulyan"])
def test_robust_or_unknown_strategies_are_refused_with_dp(strategy: str) -> None:
    with pytest.raises(ConfigError, match=rf"strategy: '{strategy}' cannot be used with dp_mode central"):
        check_dp_compatible(strategy, DPMode.CENTRAL)
    check_dp_compatible(strategy, DPMode.OFF)  # returns quietly


def test_sample_weighting_is_refused_with_dp() -> None:
    with pytest.raises(ConfigError, match=r"sample-weighted averaging cannot be used with DP"):
        check_dp_compatible("fedavg", "device", sample_weighted=True)
    check_dp_compatible("fedavg", "off", sample_weighted=True)  # returns quietly
