"""Poisson selection of devices for DP rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmqtt.errors import ConfigError
from fedmqtt.privacy import poisson_select, secure_rng


def test_selection_rate_is_q() -> None:
    devices = [f"d{i}" for i in range(20_000)]
    q = 0.05
    selected = poisson_select(devices, q, np.random.default_rng(1))
    expected, sd = q * len(devices), math.sqrt(len(devices) * q * (1 - q))
    assert abs(len(selected) - expected) < 5 * sd


def test_each_device_is_selected_independently_with_probability_q() -> None:
    devices = [f"d{i}" for i in range(40)]
    rng = np.random.default_rng(2)
    counts = dict.fromkeys(devices, 0)
    sizes = []
    draws, q = 3000, 0.2
    for _ in range(draws):
        chosen = poisson_select(devices, q, rng)
        sizes.append(len(chosen))
        for device in chosen:
            counts[device] += 1
    sd = math.sqrt(draws * q * (1 - q))
    assert all(abs(c - draws * q) < 5 * sd for c in counts.values())
    # The number selected varies like a binomial (a fixed-size sample would not vary at all).
    assert np.var(sizes) == pytest.approx(len(devices) * q * (1 - q), rel=0.15)


def test_selection_keeps_input_order_and_q_one_selects_everyone() -> None:
    devices = ["c", "a", "b", "e", "d"]
    chosen = poisson_select(devices, 0.5, np.random.default_rng(3))
    assert chosen == [d for d in devices if d in chosen]
    assert poisson_select(devices, 1.0, np.random.default_rng(3)) == devices
    assert poisson_select([], 0.5, np.random.default_rng(3)) == []


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_bad_rate_is_a_config_error(q: float) -> None:
    with pytest.raises(ConfigError, match=r"^dp_sample_rate: must be in \(0, 1\]"):
        poisson_select(["a"], q, np.random.default_rng(0))


def test_duplicate_devices_or_a_bare_string_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^devices: lists a device more than once"):
        poisson_select(["a", "b", "a"], 0.5, np.random.default_rng(0))
    with pytest.raises(ConfigError, match=r"^devices: must be a sequence"):
        poisson_select("abc", 0.5, np.random.default_rng(0))


def test_secure_generators_differ() -> None:
    assert not np.array_equal(secure_rng().random(8), secure_rng().random(8))
