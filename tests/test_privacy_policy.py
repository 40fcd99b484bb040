"""fedmqtt.privacy.policy: the round-privacy policy the coordinator and the benchmark share (pure, no broker)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmqtt.errors import ConfigError
from fedmqtt.privacy import (
    JobAccountant,
    clip_and_noise,
    default_delta,
    device_noise_std,
    effective_noise_multiplier,
    update_noise_multiplier,
)
from fedmqtt.privacy.policy import RoundPrivacy, check_update_norm, job_delta, quantisation_margin
from fedmqtt.schema import CodecSpec, DPMode


def policy(**overrides: object) -> RoundPrivacy:
    values: dict[str, object] = {
        "mode": DPMode.DEVICE,
        "clip": 1.0,
        "noise_multiplier": 1.0,
        "sample_rate": 0.1,
        "expected_updates": 4,
        "delta": 1e-5,
    }
    values.update(overrides)
    return RoundPrivacy(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Settings:
    """The shape of CoordinatorConfig.dp."""

    mode: DPMode = DPMode.CENTRAL
    clip: float = 2.0
    noise_multiplier: float = 1.5
    sample_rate: float = 0.05
    delta: float | None = None
    target_epsilon: float | None = None
    population: int | None = None
    adaptive_clip: float | None = None


@pytest.mark.parametrize("mode", [DPMode.DEVICE, DPMode.LOCAL, DPMode.CENTRAL])
def test_plan_states_the_noise_each_device_adds(mode: DPMode) -> None:
    p = policy(mode=mode, clip=2.0, noise_multiplier=1.5, expected_updates=9)
    plan = p.plan()
    assert plan.mode is mode and plan.clip == 2.0 and plan.noise_multiplier == 1.5
    assert plan.expected_updates == 9 and plan.sample_rate == 0.1 and plan.delta == 1e-5
    assert plan.device_noise_std == pytest.approx(device_noise_std(mode, 1.5, 2.0, 9))
    assert p.denominator == 9.0 and p.update_weight == 1.0


def test_from_settings_derives_delta_from_the_population_or_the_rate() -> None:
    p = RoundPrivacy.from_settings(Settings(population=1000), expected_updates=5, min_devices=5)
    assert p.delta == default_delta(1000) and p.mode is DPMode.CENTRAL and p.clip == 2.0
    estimated = RoundPrivacy.from_settings(Settings(), expected_updates=5, min_devices=5)
    assert estimated.delta == default_delta(100)  # m/q = 5/0.05
    assert job_delta(None, None, min_devices=300, expected_updates=5, sample_rate=0.05) == default_delta(300)
    assert RoundPrivacy.from_settings(Settings(delta=1e-6), expected_updates=5, min_devices=5).delta == 1e-6


def test_a_policy_needs_dp_on_and_adaptive_clipping_needs_central_mode() -> None:
    with pytest.raises(ConfigError, match="off"):
        policy(mode=DPMode.OFF)
    with pytest.raises(ConfigError, match="central"):
        policy(mode=DPMode.DEVICE, adaptive_clip=0.5)
    with pytest.raises(ConfigError, match="too small"):  # sigma_b = m/20 must exceed z/2
        policy(mode=DPMode.CENTRAL, adaptive_clip=0.5, expected_updates=4, noise_multiplier=1.0)


@given(k=st.integers(0, 12), m=st.integers(1, 10), sigma=st.floats(0.1, 5.0), clip=st.floats(0.01, 10.0))
def test_server_noise_restores_sigma_c_on_the_sum(k: int, m: int, sigma: float, clip: float) -> None:
    device = policy(mode=DPMode.DEVICE, noise_multiplier=sigma, clip=clip, expected_updates=m)
    # k devices each added sigma*C/sqrt(m); with the top-up the sum carries sigma*C whenever k <= m.
    total = math.hypot(math.sqrt(k) * sigma * clip / math.sqrt(m), device.server_noise_std(k))
    assert total == pytest.approx(sigma * clip * math.sqrt(max(k, m) / m), rel=1e-9)
    assert policy(mode=DPMode.CENTRAL, noise_multiplier=sigma, clip=clip).server_noise_std(k) == pytest.approx(
        sigma * clip
    )
    assert policy(mode=DPMode.LOCAL, noise_multiplier=sigma, clip=clip).server_noise_std(k) == 0.0


def test_server_noise_is_drawn_shaped_like_the_model() -> None:
    like = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    generator = torch.Generator().manual_seed(1)
    noise = policy(mode=DPMode.CENTRAL, noise_multiplier=2.0).server_noise(4, like, generator=generator)
    assert noise is not None and {k: v.shape for k, v in noise.items()} == {"w": (3, 4), "b": (4,)}
    assert policy(mode=DPMode.DEVICE).server_noise(4, like) is None  # m updates arrived: nothing to add
    assert policy(mode=DPMode.CENTRAL, noise_multiplier=2.0).server_noise(4, like, clip=0.5) is not None


@settings(max_examples=25, deadline=None)
@given(
    mode=st.sampled_from([DPMode.DEVICE, DPMode.LOCAL, DPMode.CENTRAL]),
    received=st.lists(st.integers(0, 8), min_size=1, max_size=6),
)
def test_accounting_matches_the_accountant_stepped_by_hand(mode: DPMode, received: list[int]) -> None:
    p = policy(mode=mode, noise_multiplier=1.3, expected_updates=4)
    by_hand = JobAccountant(1.3, 0.1, 1e-5)
    for k in received:
        epsilon = p.record_round(k)
        if k == 0:  # nothing aggregated: nothing released, nothing charged
            assert epsilon is None
            continue
        by_hand.step(noise_multiplier=effective_noise_multiplier(mode, 1.3, 4, k, topped_up=mode is DPMode.DEVICE))
        assert epsilon == pytest.approx(by_hand.epsilon)
    assert p.accountant.history == by_hand.history
    p.record_empty_draw()
    by_hand.step()
    assert p.accountant.history == by_hand.history
    spent = p.spent()
    assert spent is not None and spent.epsilon == pytest.approx(by_hand.epsilon) and spent.delta == 1e-5


def test_adaptive_clipping_splits_sigma_and_moves_the_clip() -> None:
    p = policy(mode=DPMode.CENTRAL, adaptive_clip=0.5, expected_updates=40, noise_multiplier=1.0, clip=1.0)
    assert p.update_noise_multiplier == pytest.approx(update_noise_multiplier(1.0, 2.0))
    assert p.update_noise_multiplier > 1.0
    rng = np.random.default_rng(0)
    for _ in range(5):
        p.record_round(40, unclipped=40, rng=rng)  # every update under the clip: it shrinks
    assert p.clip < 1.0 and p.plan().clip == p.clip
    assert p.ledger("job", now=1.0, run_id="r1").clip == p.clip
    restored = policy(mode=DPMode.CENTRAL, adaptive_clip=0.5, expected_updates=40, noise_multiplier=1.0, clip=1.0)
    restored.load_state_dict(p.state_dict())
    assert restored.clip == p.clip and restored.accountant.history == p.accountant.history


@settings(max_examples=15, deadline=None)
@given(
    sigma=st.floats(0.6, 3.0),
    q=st.floats(0.01, 1.0),
    target=st.floats(0.5, 20.0),
    spent=st.integers(0, 5),
    rounds_to_go=st.integers(0, 40),
)
def test_budget_counts_the_rounds_before_would_exceed(
    sigma: float, q: float, target: float, spent: int, rounds_to_go: int
) -> None:
    """budget(n).rounds is the number of planned rounds that can still run before the accountant's own
    would_exceed() says stop (capped at n): the machine stops exactly where the old check stopped."""
    p = policy(noise_multiplier=sigma, sample_rate=q, target_epsilon=target)
    for _ in range(spent):
        p.record_empty_draw()
    budget = p.budget(rounds_to_go)
    assert budget is not None
    walk = JobAccountant(sigma, q, 1e-5, target_epsilon=target)
    walk.load_state_dict(p.accountant.state_dict())
    fits = 0
    while fits < rounds_to_go and not walk.would_exceed():
        walk.step()
        fits += 1
    assert budget.rounds == fits
    assert budget.reason.startswith(f"privacy budget: one more round would exceed target epsilon {target:g}")
    assert f"spent {walk.epsilon:.3f}" in budget.reason


def test_no_target_no_budget() -> None:
    assert policy().budget(100) is None


def test_update_norm_check_passes_honest_updates_and_refuses_unclipped_ones() -> None:
    rng = np.random.default_rng(3)
    update = {"w": rng.normal(size=(50, 20)).astype(np.float32), "b": rng.normal(size=20).astype(np.float32)}
    p = policy(mode=DPMode.DEVICE, clip=1.0, noise_multiplier=1.0, expected_updates=4)
    dp = p.plan()
    noised, _ = clip_and_noise(
        update, clip=1.0, noise_std=dp.device_noise_std, generator=torch.Generator().manual_seed(0)
    )
    for codec in ("float32", "int8", "float16"):
        assert check_update_norm(dp, noised, CodecSpec.parse(codec)) is None
    far = {k: v * 100 for k, v in update.items()}
    detail = check_update_norm(dp, far, CodecSpec.parse("float32"))
    assert detail is not None and "exceeds the clip bound 1" in detail


def test_quantisation_margin_is_zero_for_float32_and_bounds_int8_rounding() -> None:
    update = {"w": np.array([1.0, -0.5, 0.25], np.float32), "e": np.zeros(0, np.float32)}
    assert quantisation_margin(update, CodecSpec.parse("float32")) == 0.0
    margin = quantisation_margin(update, CodecSpec.parse("int8"))
    assert margin == pytest.approx(math.sqrt(3 * (1.0 / 127 / 2) ** 2))
    assert 0 < quantisation_margin(update, CodecSpec.parse("float16")) < margin
