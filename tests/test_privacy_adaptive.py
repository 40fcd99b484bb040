"""Adaptive clipping (Andrew et al. 2021): convergence to a quantile, the noise split, state, settings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedmqtt.errors import ConfigError
from fedmqtt.privacy import (
    AdaptiveClip,
    PrivacyStateError,
    check_adaptive_clip_compatible,
    combined_noise_multiplier,
    recommended_count_noise_std,
    update_noise_multiplier,
)
from fedmqtt.schema import DPMode


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.9])
def test_the_clip_converges_to_the_target_quantile_of_synthetic_norms(quantile: float) -> None:
    rng = np.random.default_rng(int(quantile * 100))
    m = 100
    clip = AdaptiveClip(0.01, quantile, count_noise_std=recommended_count_noise_std(m))
    for _ in range(300):
        norms = rng.lognormal(mean=1.0, sigma=0.5, size=m)
        clip.update(int((norms <= clip.clip).sum()), m, rng)
    population = rng.lognormal(mean=1.0, sigma=0.5, size=100_000)
    assert float((population <= clip.clip).mean()) == pytest.approx(quantile, abs=0.07)
    assert clip.rounds == 300 and clip.last_fraction is not None


def test_the_clip_moves_geometrically_in_the_right_direction() -> None:
    rng = np.random.default_rng(0)
    clip = AdaptiveClip(1.0, 0.5, learning_rate=0.2, count_noise_std=0.0)
    assert clip.update(10, 10, rng) == pytest.approx(math.exp(-0.2 * 0.5))  # all under C: shrink
    clip = AdaptiveClip(1.0, 0.5, learning_rate=0.2, count_noise_std=0.0)
    assert clip.update(0, 10, rng) == pytest.approx(math.exp(0.2 * 0.5))  # all clipped: grow
    assert clip.last_fraction == 0.0


def test_count_noise_is_added_to_the_fraction() -> None:
    m, sigma_b = 50, 2.5
    rng = np.random.default_rng(1)
    fractions = []
    for _ in range(4000):
        clip = AdaptiveClip(1.0, 0.5, count_noise_std=sigma_b)
        clip.update(25, m, rng)
        assert clip.last_fraction is not None
        fractions.append(clip.last_fraction)
    assert np.mean(fractions) == pytest.approx(0.5, abs=0.005)
    assert np.std(fractions) == pytest.approx(sigma_b / m, rel=0.05)


def test_noise_multiplier_split_follows_the_paper() -> None:
    z, sigma_b = 1.0, 5.0
    sigma_delta = update_noise_multiplier(z, sigma_b)
    assert sigma_delta == pytest.approx((1.0 - 1.0 / 100.0) ** -0.5)
    assert sigma_delta > z
    assert combined_noise_multiplier(sigma_delta, sigma_b) == pytest.approx(z)
    assert combined_noise_multiplier(sigma_delta, 0.0) == 0.0  # exact bits: no privacy
    assert recommended_count_noise_std(100) == 5.0


def test_too_little_count_noise_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^count_noise_std: 0.5 is too small for noise multiplier 1"):
        update_noise_multiplier(1.0, 0.5)


def test_adaptive_clipping_needs_central_mode() -> None:
    check_adaptive_clip_compatible(DPMode.CENTRAL)  # returns quietly
    for mode in (DPMode.DEVICE, DPMode.LOCAL, DPMode.OFF):
        with pytest.raises(ConfigError, match=r"^dp_adaptive_clip: needs dp_mode central"):
            check_adaptive_clip_compatible(mode)
    with pytest.raises(ConfigError, match=r"^dp_mode:"):
        check_adaptive_clip_compatible("nope")


def test_state_round_trips_and_must_match_the_settings() -> None:
    rng = np.random.default_rng(3)
    clip = AdaptiveClip(2.0, 0.5, count_noise_std=1.0)
    for _ in range(5):
        clip.update(3, 10, rng)
    state = json.loads(json.dumps(clip.state_dict()))
    restored = AdaptiveClip(2.0, 0.5, count_noise_std=1.0)
    restored.load_state_dict(state)
    assert (restored.clip, restored.rounds, restored.last_fraction) == (clip.clip, 5, clip.last_fraction)
    other = AdaptiveClip(2.0, 0.9, count_noise_std=1.0)
    with pytest.raises(PrivacyStateError, match=r"target_quantile was 0.5, this job uses 0.9"):
        other.load_state_dict(state)
    bad_states: list[object] = [{**state, "clip": -1.0}, {**state, "rounds": -1}, []]
    for bad in bad_states:
        with pytest.raises(PrivacyStateError, match=r"^adaptive clip state: "):
            restored.load_state_dict(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        ((0.0, 0.5), {"count_noise_std": 1.0}, "dp_clip"),
        ((1.0, 0.0), {"count_noise_std": 1.0}, "dp_adaptive_clip"),
        ((1.0, 1.0), {"count_noise_std": 1.0}, "dp_adaptive_clip"),
        ((1.0, 0.5, -0.2), {"count_noise_std": 1.0}, "learning_rate"),
        ((1.0, 0.5), {"count_noise_std": -1.0}, "count_noise_std"),
    ],
)
def test_bad_settings_are_config_errors(args: tuple[float, ...], kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        AdaptiveClip(*args, **kwargs)


def test_bad_round_inputs_are_config_errors() -> None:
    clip = AdaptiveClip(1.0, 0.5, count_noise_std=1.0)
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match=r"^unclipped:"):
        clip.update(-1, 10, rng)
    with pytest.raises(ConfigError, match=r"^expected_updates:"):
        clip.update(1, 0, rng)
    with pytest.raises(ConfigError, match=r"^expected_updates:"):
        recommended_count_noise_std(0)
    assert clip.rounds == 0 and clip.clip == 1.0
