"""Head-only DP (``--trainable`` with ``--dp-mode``): clipping, noise and the norm bound cover the trained tensors
only; the frozen tensors are never touched, on the device (``clip_and_noise``) or on the coordinator
(``RoundPrivacy.server_noise``); the configuration accepts every DP mode with ``--trainable``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmqtt import arrays as A
from fedmqtt.coordinator.config import load_config
from fedmqtt.privacy import (
    FrozenTensorChanged,
    clip_and_noise,
    clip_update,
    split_trainable,
)
from fedmqtt.privacy.policy import RoundPrivacy, check_update_norm
from fedmqtt.schema import CodecSpec, DPMode, DPPlan

HEAD = ("fc2.weight", "fc2.bias")


def head_update(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    """A CNN-like update whose frozen tensors did not move (exact zeros) and whose head did."""
    return {
        "conv.weight": np.zeros((8, 1, 3, 3), np.float32),
        "fc1.weight": np.zeros((16, 32), np.float32),
        "fc2.weight": (rng.standard_normal((10, 16)) * scale).astype(np.float32),
        "fc2.bias": (rng.standard_normal(10) * scale).astype(np.float32),
    }


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_split_trainable_partitions_by_name_and_none_means_everything() -> None:
    update = head_update(np.random.default_rng(0))
    trained, frozen = split_trainable(update, HEAD)
    assert list(trained) == list(HEAD) and list(frozen) == ["conv.weight", "fc1.weight"]
    everything, nothing = split_trainable(update, None)
    assert list(everything) == list(update) and nothing == {}


@pytest.mark.parametrize("noise_std", [0.0, 0.5])
def test_frozen_tensors_are_never_noised_and_the_norm_is_the_heads(noise_std: float) -> None:
    update = head_update(np.random.default_rng(1), scale=3.0)
    head_norm = A.l2_norm({k: update[k] for k in HEAD})
    out, norm = clip_and_noise(update, clip=1.0, noise_std=noise_std, generator=generator(3), trainable=HEAD)
    assert list(out) == list(update)  # the names and order of what came in
    assert norm == pytest.approx(head_norm, rel=1e-12)
    for name in ("conv.weight", "fc1.weight"):
        assert out[name].tobytes() == update[name].tobytes()  # bit for bit: zero, no noise
    head = {k: out[k] for k in HEAD}
    if noise_std == 0.0:
        assert A.l2_norm(head) <= 1.0 and A.l2_norm(head) == pytest.approx(1.0, rel=1e-6)
    else:  # noise on the head: ~ s·√d away from the clipped head
        clipped, _ = clip_update({k: update[k] for k in HEAD}, 1.0)
        moved = A.l2_norm(A.subtract(head, clipped))
        d = sum(update[k].size for k in HEAD)
        assert 0.5 * noise_std * math.sqrt(d) < moved < 1.5 * noise_std * math.sqrt(d)


def test_a_head_only_update_equals_the_restricted_update_noised_alone() -> None:
    """With trainable, the head gets exactly what clip_and_noise gives the head alone (same generator)."""
    update = head_update(np.random.default_rng(2), scale=2.0)
    out, norm = clip_and_noise(update, clip=0.7, noise_std=0.1, generator=generator(9), trainable=HEAD)
    alone, norm_alone = clip_and_noise({k: update[k] for k in HEAD}, clip=0.7, noise_std=0.1, generator=generator(9))
    assert norm == norm_alone
    for k in HEAD:
        assert out[k].tobytes() == alone[k].tobytes()


def test_a_frozen_tensor_that_moved_is_refused_not_sent_unclipped() -> None:
    update = head_update(np.random.default_rng(3))
    update["fc1.weight"][0, 0] = 1e-3
    with pytest.raises(FrozenTensorChanged, match=r"'fc1\.weight' is frozen"):
        clip_and_noise(update, clip=1.0, noise_std=0.1, trainable=HEAD)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=2, max_size=6),
    head_count=st.integers(1, 5),
    scale=st.floats(1e-3, 1e3),
    clip=st.floats(1e-2, 10.0),
    noise_std=st.sampled_from([0.0, 0.01, 1.0]),
    seed=st.integers(0, 2**31),
)
def test_any_split_keeps_frozen_bits_and_bounds_the_trained_norm(
    sizes: list[int], head_count: int, scale: float, clip: float, noise_std: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    names = [f"t{i}" for i in range(len(sizes))]
    trainable = tuple(names[-min(head_count, len(names) - 1) :])
    update = {
        n: (rng.standard_normal(size) * scale).astype(np.float32) if n in trainable else np.zeros(size, np.float32)
        for n, size in zip(names, sizes, strict=True)
    }
    out, norm = clip_and_noise(update, clip=clip, noise_std=noise_std, generator=generator(seed), trainable=trainable)
    assert norm == pytest.approx(A.l2_norm({k: update[k] for k in trainable}), rel=1e-12)
    for n in names:
        if n not in trainable:
            assert out[n].tobytes() == update[n].tobytes()
    if noise_std == 0.0:
        assert A.l2_norm({k: out[k] for k in trainable}) <= clip


@pytest.mark.parametrize("mode", [DPMode.CENTRAL, DPMode.DEVICE])
def test_server_noise_covers_the_trainable_tensors_only(mode: DPMode) -> None:
    policy = RoundPrivacy(mode=mode, clip=1.0, noise_multiplier=1.0, sample_rate=0.1, expected_updates=100, delta=1e-5)
    like = {k: np.ones_like(v) for k, v in head_update(np.random.default_rng(4)).items()}
    received = 60  # device mode tops up the missing 40 updates' noise on the coordinator
    noise = policy.server_noise(received, like, generator=generator(5), trainable=HEAD)
    assert noise is not None and list(noise) == list(like)
    for name in ("conv.weight", "fc1.weight"):
        assert noise[name].dtype == np.float32 and not np.any(noise[name]) and not np.signbit(noise[name]).any()
    std = policy.server_noise_std(received)
    drawn = np.concatenate([noise[k].ravel() for k in HEAD])
    assert drawn.std() == pytest.approx(std, rel=0.2)
    # The same draw as the head alone: the frozen part consumes no randomness.
    alone = policy.server_noise(received, {k: like[k] for k in HEAD}, generator=generator(5))
    assert alone is not None
    for k in HEAD:
        assert noise[k].tobytes() == alone[k].tobytes()


def test_the_norm_bound_counts_noise_on_the_trainable_tensors_only() -> None:
    """A head-only device noises d_head coordinates; the margin for all d would let a 30x larger update in."""
    rng = np.random.default_rng(6)
    d_full, d_head = 200_000, 170
    s = 0.05
    plan = DPPlan(mode=DPMode.DEVICE, clip=1.0, noise_multiplier=1.0, device_noise_std=s, expected_updates=4,
                  sample_rate=1.0, delta=1e-5)  # fmt: skip
    codec = CodecSpec.parse("float32")
    honest = {"fc2.weight": (rng.standard_normal(d_head) * s).astype(np.float32)}
    assert check_update_norm(plan, honest, codec, trainable=["fc2.weight"]) is None
    # An unclipped head (norm 5 here): inside the bound sized for d_full noisy coordinates (s·√d_full ≈ 22),
    # outside the one for the head's d_head.
    big = {"fc2.weight": np.full(d_head, 5.0 / math.sqrt(d_head), np.float32)}
    frozen = {"fc1.weight": np.zeros(d_full - d_head, np.float32)}
    assert check_update_norm(plan, {**frozen, **big}, codec) is None
    refusal = check_update_norm(plan, {**frozen, **big}, codec, trainable=["fc2.weight"])
    assert refusal is not None and "exceeds the clip bound" in refusal
    # Values in a frozen tensor count against the norm.
    sneaky = {"fc1.weight": np.full(d_head, 1.0, np.float32), **honest}
    assert check_update_norm(plan, sneaky, codec, trainable=["fc2.weight"]) is not None


@pytest.mark.parametrize(
    ("mode", "extra"),
    [("device", {}), ("local", {}), ("central", {}), ("central", {"dp_adaptive_clip": 0.5})],
)
def test_every_dp_mode_is_accepted_with_trainable(mode: str, extra: dict) -> None:
    config = load_config(
        None,
        {"job": "j", "rounds": 3, "min_updates": 20, "model": "cnn", "trainable": ["fc2.*"], "dp_mode": mode,
         "dp_clip": 1.0, "dp_noise_multiplier": 1.0, "dp_sample_rate": 0.1, **extra},
        env={},
    )  # fmt: skip
    assert config.trainable == ("fc2.weight", "fc2.bias")
    assert config.dp is not None and config.dp.mode is DPMode(mode)
