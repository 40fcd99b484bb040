"""Aggregation strategies against hand-computed results, poisoned updates and checkpoints."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pytest
import torch

from fedmqtt.arrays import ModelArrays
from fedmqtt.coordinator.aggregation import (
    STRATEGY_NAMES,
    Krum,
    Strategy,
    Yogi,
    build_strategy,
    parse_strategy_params,
    strategy_parameters,
)
from fedmqtt.coordinator.errors import AggregationError, StateDictError
from fedmqtt.errors import ConfigError

torch.set_num_threads(1)

SUM_BASED = ("fedavg", "fedavgm", "fedadam", "fedyogi")
ROBUST = ("median", "trimmed-mean", "krum")


def arrays(**tensors: Any) -> ModelArrays:
    return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def one_round(strategy: Strategy, global_arrays: ModelArrays, updates: list[tuple[ModelArrays, float]]) -> ModelArrays:
    strategy.begin_round(global_arrays)
    for update, weight in updates:
        strategy.add(update, weight)
    return strategy.aggregate()


def random_model(rng: np.random.Generator) -> ModelArrays:
    return {
        "conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=4).astype(np.float32),
        "fc.weight": rng.normal(size=(3, 16)).astype(np.float32),
    }


# ---------------------------------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------------------------------


def test_every_name_builds_with_defaults() -> None:
    for name in STRATEGY_NAMES:
        strategy = build_strategy(name)
        assert strategy.name == name
        assert strategy.buffers_updates is (name in ROBUST)


def test_defaults_are_the_documented_ones() -> None:
    assert strategy_parameters("fedavg") == {"server_lr": 1.0}
    assert strategy_parameters("fedavgm") == {"server_lr": 1.0, "momentum": 0.9, "nesterov": False}
    assert strategy_parameters("fedadam") == {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    assert strategy_parameters("fedyogi") == {
        "server_lr": 0.01,
        "beta1": 0.9,
        "beta2": 0.99,
        "tau": 1e-3,
        "initial_accumulator": 1e-6,
    }
    assert strategy_parameters("median") == {}
    assert strategy_parameters("trimmed-mean") == {"beta": 0.1}
    assert strategy_parameters("krum") == {"f": 1, "m": 1}


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("fedsgd", {}, "strategy"),
        ("FedAvg", {}, "strategy"),
        ("fedavg", {"momentum": 0.9}, "fedavg.momentum"),
        ("fedavg", {"server_lr": 0}, "fedavg.server_lr"),
        ("fedavg", {"server_lr": -1.0}, "fedavg.server_lr"),
        ("fedavg", {"server_lr": "0.1"}, "fedavg.server_lr"),
        ("fedavg", {"server_lr": True}, "fedavg.server_lr"),
        ("fedavg", {"server_lr": math.nan}, "fedavg.server_lr"),
        ("fedavgm", {"momentum": 1.0}, "fedavgm.momentum"),
        ("fedavgm", {"momentum": -0.1}, "fedavgm.momentum"),
        ("fedavgm", {"nesterov": "yes"}, "fedavgm.nesterov"),
        ("fedavgm", {"nesterov": True, "momentum": 0.0}, "fedavgm.nesterov"),
        ("fedadam", {"beta1": 1.0}, "fedadam.beta1"),
        ("fedadam", {"beta2": -0.5}, "fedadam.beta2"),
        ("fedadam", {"tau": 0.0}, "fedadam.tau"),
        ("fedadam", {"initial_accumulator": 0.1}, "fedadam.initial_accumulator"),
        ("fedyogi", {"initial_accumulator": -1.0}, "fedyogi.initial_accumulator"),
        ("fedyogi", {"tau": math.inf}, "fedyogi.tau"),
        ("median", {"beta": 0.1}, "median.beta"),
        ("trimmed-mean", {"beta": 0.5}, "trimmed-mean.beta"),
        ("trimmed-mean", {"beta": -0.1}, "trimmed-mean.beta"),
        ("krum", {"f": -1}, "krum.f"),
        ("krum", {"f": 1.5}, "krum.f"),
        ("krum", {"m": 0}, "krum.m"),
    ],
)
def test_bad_names_and_parameters(name: str, params: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_strategy(name, **params)
    assert err.value.field == field


def test_unknown_parameter_message_lists_what_it_takes() -> None:
    with pytest.raises(ConfigError, match=r"fedavgm has no parameter 'lr'; it takes server_lr=1.0, momentum=0.9"):
        build_strategy("fedavgm", lr=0.1)
    with pytest.raises(ConfigError, match="choose one of fedavg, fedavgm"):
        build_strategy("nope")


def test_parse_strategy_params() -> None:
    parsed = parse_strategy_params(" server_lr=0.1, momentum=0.9 ,nesterov=true,f=2,")
    assert parsed == {"server_lr": 0.1, "momentum": 0.9, "nesterov": True, "f": 2}
    assert isinstance(parsed["f"], int)
    assert parse_strategy_params("") == {}
    strategy = build_strategy("fedavgm", **parse_strategy_params("server_lr=0.5,nesterov=false"))
    assert strategy.server_lr == 0.5  # type: ignore[attr-defined]
    for bad in ("server_lr", "=1", "server_lr=", "server_lr=fast"):
        with pytest.raises(ConfigError):
            parse_strategy_params(bad)


# ---------------------------------------------------------------------------------------------------
# FedAvg
# ---------------------------------------------------------------------------------------------------

GLOBAL = arrays(w=[1.0, 2.0], b=[0.0])
U1 = arrays(w=[1.0, 0.0], b=[2.0])
U2 = arrays(w=[0.0, 4.0], b=[-1.0])


def test_fedavg_hand_computed() -> None:
    strategy = build_strategy("fedavg")
    # Σwu = w:[1, 12], b:[-1]; Σw = 4; average w:[0.25, 3], b:[-0.25]
    result = one_round(strategy, GLOBAL, [(U1, 1.0), (U2, 3.0)])
    assert list(result) == ["w", "b"]
    np.testing.assert_array_equal(result["w"], [1.25, 5.0])
    np.testing.assert_array_equal(result["b"], [-0.25])
    assert result["w"].dtype == np.float32
    half = one_round(build_strategy("fedavg", server_lr=0.5), GLOBAL, [(U1, 1.0), (U2, 3.0)])
    np.testing.assert_array_equal(half["w"], [1.125, 3.5])


def test_fedavg_denominator_and_noise() -> None:
    strategy = build_strategy("fedavg")
    strategy.begin_round(GLOBAL)
    strategy.add(U1, 1.0)
    strategy.add(U2, 1.0)
    # (Σu + noise) / m with m = 4: w: ([1,4] + [3,-4]) / 4 = [1, 0]; b: (1 + 1) / 4
    result = strategy.aggregate(denominator=4.0, noise=arrays(w=[3.0, -4.0], b=[1.0]))
    np.testing.assert_array_equal(result["w"], [2.0, 2.0])
    np.testing.assert_array_equal(result["b"], [0.5])
    strategy.begin_round(GLOBAL)
    strategy.add(U1, 2.0)
    noise_only = strategy.aggregate(noise=arrays(w=[2.0, 2.0], b=[0.0]))  # divided by Σw = 2
    np.testing.assert_array_equal(noise_only["w"], [3.0, 3.0])


def test_fedavg_streaming_equals_the_batch_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    global_arrays = random_model(rng)
    updates = [(random_model(rng), float(rng.integers(1, 500))) for _ in range(25)]
    result = one_round(build_strategy("fedavg"), global_arrays, updates)
    weights = np.array([w for _, w in updates])
    for k, g in global_arrays.items():
        stacked = np.stack([u[k] for u, _ in updates]).astype(np.float64)
        expected = g + np.average(stacked, axis=0, weights=weights)
        np.testing.assert_allclose(result[k], expected, rtol=1e-6, atol=1e-6)


def test_partial_aggregates_combine_like_single_updates() -> None:
    rng = np.random.default_rng(1)
    global_arrays = random_model(rng)
    updates = [(random_model(rng), float(rng.integers(1, 100))) for _ in range(9)]
    for name in SUM_BASED:
        one_by_one = build_strategy(name)
        expected = one_round(one_by_one, global_arrays, updates)
        combined = build_strategy(name)
        combined.begin_round(global_arrays)
        for group in (updates[:4], updates[4:7]):  # two partial aggregates as a scale-out aggregator sends
            weighted_sum = {
                k: np.sum([w * u[k].astype(np.float64) for u, w in group], axis=0).astype(np.float32)
                for k in global_arrays
            }
            combined.add_partial(weighted_sum, sum(w for _, w in group), len(group))
        for update, weight in updates[7:]:
            combined.add(update, weight)
        assert combined.count == 9
        result = combined.aggregate()
        for k in global_arrays:
            np.testing.assert_allclose(result[k], expected[k], rtol=1e-5, atol=1e-6)


def test_count_and_total_weight() -> None:
    strategy = build_strategy("fedavg")
    strategy.begin_round(GLOBAL)
    assert strategy.count == 0
    strategy.add(U1, 3.0)
    strategy.add_partial(U2, 5.0, 4)
    assert strategy.count == 5 and strategy.total_weight == 8.0  # type: ignore[attr-defined]
    strategy.begin_round(GLOBAL)  # a new round starts empty
    assert strategy.count == 0 and strategy.total_weight == 0.0  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------
# server optimizers
# ---------------------------------------------------------------------------------------------------

X0 = arrays(w=[0.0, 0.0])
D1 = arrays(w=[1.0, -2.0])
D2 = arrays(w=[0.5, 0.5])


def two_rounds(strategy: Strategy) -> tuple[ModelArrays, ModelArrays]:
    x1 = one_round(strategy, X0, [(D1, 1.0)])
    x2 = one_round(strategy, x1, [(D2, 1.0)])
    return x1, x2


def test_fedavgm_hand_computed() -> None:
    # b1 = -D1, x1 = x0 + D1; b2 = 0.9 b1 - D2, x2 = x1 - b2 = x1 + D2 + 0.9 D1
    x1, x2 = two_rounds(build_strategy("fedavgm"))
    np.testing.assert_allclose(x1["w"], [1.0, -2.0], rtol=1e-6)
    np.testing.assert_allclose(x2["w"], [2.4, -3.3], rtol=1e-6)
    # Nesterov: step = g + μ·b = 1.9 g in the first round
    x1n, _ = two_rounds(build_strategy("fedavgm", nesterov=True))
    np.testing.assert_allclose(x1n["w"], [1.9, -3.8], rtol=1e-6)
    # momentum 0 is FedAvg with a server learning rate
    _, x2z = two_rounds(build_strategy("fedavgm", momentum=0.0, server_lr=0.5))
    np.testing.assert_allclose(x2z["w"], [0.75, -0.75], rtol=1e-6)


def adam_reference(deltas: list[np.ndarray], lr: float, b1: float, b2: float, eps: float, yogi: bool,
                   v0: float = 0.0) -> list[np.ndarray]:  # fmt: skip
    """The update rules written out in float64 (Kingma & Ba bias correction, as torch.optim.Adam)."""
    x = np.zeros_like(deltas[0], dtype=np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, v0)
    out = []
    for t, delta in enumerate(deltas, start=1):
        g = -delta.astype(np.float64)
        m = b1 * m + (1 - b1) * g
        v = v - (1 - b2) * np.sign(v - g * g) * g * g if yogi else b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        x = x - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(x.copy())
    return out


def test_fedadam_one_and_two_steps() -> None:
    x1, x2 = two_rounds(build_strategy("fedadam"))
    # Step 1 by hand: m̂ = g, v̂ = g², so x1 = lr · Δ / (|Δ| + τ)
    np.testing.assert_allclose(x1["w"], [0.01 / 1.001, -0.02 / 2.001], rtol=1e-6)
    ref = adam_reference([D1["w"], D2["w"]], 0.01, 0.9, 0.99, 1e-3, yogi=False)
    np.testing.assert_allclose(x1["w"], ref[0], rtol=1e-6)
    np.testing.assert_allclose(x2["w"], ref[1], rtol=1e-6)


def test_fedyogi_one_and_two_steps() -> None:
    x1, x2 = two_rounds(build_strategy("fedyogi"))
    # Step 1 by hand: v1 = 1e-6 + 0.01·g², v̂ = v1 / 0.01 = 1e-4 + g²
    expected_x1 = [0.01 * 1 / (math.sqrt(1e-4 + 1) + 1e-3), -0.01 * 2 / (math.sqrt(1e-4 + 4) + 1e-3)]
    np.testing.assert_allclose(x1["w"], expected_x1, rtol=1e-6)
    ref = adam_reference([D1["w"], D2["w"]], 0.01, 0.9, 0.99, 1e-3, yogi=True, v0=1e-6)
    np.testing.assert_allclose(x2["w"], ref[1], rtol=1e-6)
    # Yogi's v differs from Adam's once the gradient shrinks: v grows additively instead of decaying.
    adam_x2 = adam_reference([D1["w"], D2["w"]], 0.01, 0.9, 0.99, 1e-3, yogi=False)[1]
    assert not np.allclose(x2["w"], adam_x2, rtol=1e-6)


def test_yogi_optimizer_directly_and_with_a_closure() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = Yogi([p], lr=0.1, betas=(0.5, 0.9), eps=1e-8, initial_accumulator=0.0)
    calls = []

    def closure() -> float:
        calls.append(1)
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return float(loss.detach())

    assert opt.step(closure) == 2.0 and calls == [1]
    # First step with v0 = 0 is Adam's: a sign step of size lr
    np.testing.assert_allclose(p.detach().numpy(), [0.9, -0.9], rtol=1e-6)
    assert opt.step() is None  # no closure: uses the gradient already there


def test_server_learning_rate_and_betas_are_used() -> None:
    x1, _ = two_rounds(build_strategy("fedadam", server_lr=0.1, beta1=0.5, beta2=0.9, tau=1e-6))
    ref = adam_reference([D1["w"], D2["w"]], 0.1, 0.5, 0.9, 1e-6, yogi=False)
    np.testing.assert_allclose(x1["w"], ref[0], rtol=1e-6)


def test_the_global_arrays_passed_in_are_authoritative() -> None:
    # The optimizer's parameters are reset to the global arrays each round (e.g. after a resume).
    strategy = build_strategy("fedavgm", momentum=0.0)
    one_round(strategy, X0, [(D1, 1.0)])
    other = arrays(w=[10.0, 10.0])
    np.testing.assert_allclose(one_round(strategy, other, [(D2, 1.0)])["w"], [10.5, 10.5])


# ---------------------------------------------------------------------------------------------------
# robust strategies
# ---------------------------------------------------------------------------------------------------

FIVE = [arrays(w=[1.0, 10.0]), arrays(w=[2.0, -5.0]), arrays(w=[3.0, 0.0]), arrays(w=[100.0, 1.0]),
        arrays(w=[-50.0, 2.0])]  # fmt: skip


def test_median_hand_computed() -> None:
    result = one_round(build_strategy("median"), X0, [(u, 1.0) for u in FIVE])
    np.testing.assert_array_equal(result["w"], [2.0, 1.0])
    four = one_round(build_strategy("median"), X0, [(u, 1.0) for u in FIVE[:4]])
    np.testing.assert_array_equal(four["w"], [2.5, 0.5])  # even count: mean of the middle two


def test_trimmed_mean_hand_computed() -> None:
    # beta 0.2 of 5 = 1 dropped at each end: w0 from {1,2,3} -> 2; w1 from {0,1,2} -> 1
    result = one_round(build_strategy("trimmed-mean", beta=0.2), X0, [(u, 1.0) for u in FIVE])
    np.testing.assert_array_equal(result["w"], [2.0, 1.0])
    # beta 0.1 of 5 rounds down to 0: the plain mean
    plain = one_round(build_strategy("trimmed-mean", beta=0.1), X0, [(u, 1.0) for u in FIVE])
    np.testing.assert_allclose(plain["w"], [56.0 / 5, 8.0 / 5], rtol=1e-6)


POINTS = [arrays(w=[0.2, 0.2]), arrays(w=[1.0, 0.0]), arrays(w=[0.0, 1.0]), arrays(w=[1.0, 1.0]),
          arrays(w=[10.0, 10.0])]  # fmt: skip


def test_krum_scores_and_choice_hand_computed() -> None:
    krum = build_strategy("krum", f=1)
    assert isinstance(krum, Krum)
    # n - f - 2 = 2 nearest neighbours; squared distances: p0-p1 = p0-p2 = 0.68, p0-p3 = 1.28, ...
    np.testing.assert_allclose(krum.scores(POINTS), [1.36, 1.68, 1.68, 2.0, 162.0 + 181.0], rtol=1e-6)
    result = one_round(krum, X0, [(p, 1.0) for p in POINTS])
    np.testing.assert_allclose(result["w"], [0.2, 0.2], rtol=1e-6)
    # multi-Krum m=3 averages p0, p1, p2 (ties broken by arrival order)
    multi = one_round(build_strategy("krum", f=1, m=3), X0, [(p, 1.0) for p in POINTS])
    np.testing.assert_allclose(multi["w"], [0.4, 0.4], rtol=1e-6)


def test_robust_strategies_ignore_weights() -> None:
    # A Byzantine device controls its num_samples; it must not buy influence with it.
    for name in ROBUST:
        a = one_round(build_strategy(name), X0, [(p, 1.0) for p in POINTS])
        b = one_round(build_strategy(name), X0, [(p, 1e9 if i == 4 else 1.0) for i, p in enumerate(POINTS)])
        np.testing.assert_array_equal(a["w"], b["w"])


def poisoned_round(attack: str, seed: int = 0) -> tuple[list[ModelArrays], np.ndarray]:
    """10 updates: 8 honest ones around +1 and 2 poisoned ones; returns them and the honest mean."""
    rng = np.random.default_rng(seed)
    honest = [arrays(w=1.0 + 0.1 * rng.normal(size=50)) for _ in range(8)]
    honest_mean = np.mean([u["w"] for u in honest], axis=0)
    if attack == "scaled":
        bad = [arrays(w=1e3 * honest[i]["w"]) for i in range(2)]
    else:  # sign-flipped and boosted
        bad = [arrays(w=-10.0 * honest[i]["w"]) for i in range(2)]
    updates = [*honest[:3], bad[0], *honest[3:6], bad[1], *honest[6:]]
    return updates, honest_mean


@pytest.mark.parametrize("attack", ["scaled", "sign-flipped"])
def test_robust_strategies_resist_poisoned_updates(attack: str) -> None:
    updates, honest_mean = poisoned_round(attack)
    zero = arrays(w=np.zeros(50))
    fedavg = one_round(build_strategy("fedavg"), zero, [(u, 1.0) for u in updates])
    assert np.abs(fedavg["w"] - honest_mean).max() > 2.0  # FedAvg lets the attack through
    for name, params in (("median", {}), ("trimmed-mean", {"beta": 0.2}), ("krum", {"f": 2}),
                         ("krum", {"f": 2, "m": 4})):  # fmt: skip
        result = one_round(build_strategy(name, **params), zero, [(u, 1.0) for u in updates])
        error = np.abs(result["w"] - honest_mean).max()
        assert error < 0.35, f"{name} {params}: {error}"


# ---------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------


def savez_round_trip(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    buffer = io.BytesIO()
    np.savez(buffer, **state)  # type: ignore[arg-type]
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as loaded:
        return {k: loaded[k] for k in loaded.files}


@pytest.mark.parametrize("name", STRATEGY_NAMES)
@pytest.mark.parametrize("load_after_begin", [False, True])
def test_state_dict_round_trip_continues_identically(name: str, load_after_begin: bool) -> None:
    rng = np.random.default_rng(2)
    global_arrays = random_model(rng)
    rounds = [[(random_model(rng), float(rng.integers(1, 50))) for _ in range(5)] for _ in range(3)]
    original = build_strategy(name)
    x = global_arrays
    for updates in rounds[:2]:
        x = one_round(original, x, updates)
    state = savez_round_trip(original.state_dict())
    resumed = build_strategy(name)
    if load_after_begin:
        resumed.begin_round(x)
        resumed.load_state_dict(state)
        for update, weight in rounds[2]:
            resumed.add(update, weight)
        from_resumed = resumed.aggregate()
    else:
        resumed.load_state_dict(state)
        assert set(resumed.state_dict()) == set(state)  # pending state is reported as loaded
        from_resumed = one_round(resumed, x, rounds[2])
    from_original = one_round(original, x, rounds[2])
    for k in global_arrays:
        np.testing.assert_array_equal(from_resumed[k], from_original[k])
    if name in ("fedavgm", "fedadam", "fedyogi"):
        assert len(state) > 1  # optimizer slots are saved
        fresh = one_round(build_strategy(name), x, rounds[2])
        assert any(not np.array_equal(fresh[k], from_original[k]) for k in global_arrays)


def test_configured_hyperparameters_win_over_the_checkpoint() -> None:
    first = build_strategy("fedavgm", server_lr=1.0, momentum=0.0)
    one_round(first, X0, [(D1, 1.0)])
    slow = build_strategy("fedavgm", server_lr=0.5, momentum=0.0)
    slow.load_state_dict(first.state_dict())
    np.testing.assert_allclose(one_round(slow, X0, [(D1, 1.0)])["w"], [0.5, -1.0])


def test_bad_checkpoints_are_refused() -> None:
    adam = build_strategy("fedadam")
    one_round(adam, X0, [(D1, 1.0)])
    state = adam.state_dict()
    with pytest.raises(StateDictError, match="strategy 'fedadam', not 'fedyogi'"):
        build_strategy("fedyogi").load_state_dict(state)
    with pytest.raises(StateDictError, match="no 'strategy' entry"):
        build_strategy("fedadam").load_state_dict({k: v for k, v in state.items() if k != "strategy"})
    with pytest.raises(StateDictError, match="not 'median'"):
        build_strategy("median").load_state_dict(state)
    target = build_strategy("fedadam")
    one_round(target, X0, [(D2, 1.0)])
    with pytest.raises(StateDictError, match="does not name a tensor"):
        target.load_state_dict({**state, "exp_avg:other": np.zeros(2, np.float32)})
    with pytest.raises(StateDictError, match="has shape"):
        target.load_state_dict({**state, "exp_avg:w": np.zeros(3, np.float32)})
    with pytest.raises(StateDictError, match="does not name a tensor"):
        target.load_state_dict({**state, "junk": np.zeros(1)})
    # A checkpoint of another model is refused when the model is first seen.
    pending = build_strategy("fedadam")
    pending.load_state_dict(state)
    with pytest.raises(StateDictError, match="does not name a tensor"):
        pending.begin_round(arrays(v=[0.0, 0.0]))


# ---------------------------------------------------------------------------------------------------
# misuse
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_misuse_raises_clear_errors(name: str) -> None:
    strategy = build_strategy(name)
    with pytest.raises(AggregationError, match=r"add\(\) before begin_round"):
        strategy.add(D1, 1.0)
    with pytest.raises(AggregationError, match=r"aggregate\(\) before begin_round"):
        strategy.aggregate()
    with pytest.raises(AggregationError, match="no tensors"):
        strategy.begin_round({})
    strategy.begin_round(GLOBAL)
    with pytest.raises(AggregationError, match="nothing to aggregate"):
        strategy.aggregate()
    with pytest.raises(AggregationError, match="do not match"):
        strategy.add(arrays(w=[1.0, 2.0]), 1.0)
    with pytest.raises(AggregationError, match="do not match"):
        strategy.add(arrays(b=[0.0], w=[1.0, 2.0]), 1.0)
    with pytest.raises(AggregationError, match=r"tensor 'w' has shape \(3,\)"):
        strategy.add(arrays(w=[1.0, 2.0, 3.0], b=[0.0]), 1.0)
    with pytest.raises(AggregationError, match="NaN or infinity"):
        strategy.add(arrays(w=[1.0, math.nan], b=[0.0]), 1.0)
    with pytest.raises(AggregationError, match="NaN or infinity"):
        strategy.add(arrays(w=[1.0, math.inf], b=[0.0]), 1.0)
    for weight in (-1.0, math.nan, math.inf, "3", True):
        with pytest.raises(AggregationError, match="weight"):
            strategy.add(U1, weight)  # type: ignore[arg-type]
    assert strategy.count == 0  # nothing above was folded in
    if name in ROBUST:
        with pytest.raises(AggregationError, match="cannot combine partial aggregates"):
            strategy.add_partial(U1, 1.0, 2)
        for _ in range(5):
            strategy.add(U1, 1.0)
        with pytest.raises(AggregationError, match="does not take a denominator or noise"):
            strategy.aggregate(denominator=5.0)
        with pytest.raises(AggregationError, match="does not take a denominator or noise"):
            strategy.aggregate(noise=arrays(w=[0.0, 0.0], b=[0.0]))
    else:
        for count in (0, -1, 1.5):
            with pytest.raises(AggregationError, match="count >= 1"):
                strategy.add_partial(U1, 1.0, count)  # type: ignore[arg-type]
        with pytest.raises(AggregationError, match="total_weight must be >= 0"):
            strategy.add_partial(U1, -1.0, 1)
        strategy.add(U1, 1.0)
        with pytest.raises(AggregationError, match="denominator must be > 0"):
            strategy.aggregate(denominator=0.0)
        with pytest.raises(AggregationError, match="denominator must be >= 0"):
            strategy.aggregate(denominator=-2.0)
        with pytest.raises(AggregationError, match="noise tensor 'w' has shape"):
            strategy.aggregate(noise=arrays(w=[0.0], b=[0.0]))
    strategy.aggregate()
    with pytest.raises(AggregationError, match=r"add\(\) before begin_round"):
        strategy.add(U1, 1.0)  # aggregate ends the round


def test_zero_total_weight_needs_a_denominator() -> None:
    strategy = build_strategy("fedavg")
    strategy.begin_round(GLOBAL)
    strategy.add(U1, 0.0)
    with pytest.raises(AggregationError, match="total weight is 0"):
        strategy.aggregate()
    result = strategy.aggregate(denominator=1.0)
    np.testing.assert_array_equal(result["w"], GLOBAL["w"])  # weight 0: the update does not count


def test_krum_needs_enough_updates() -> None:
    krum = build_strategy("krum", f=2)
    krum.begin_round(X0)
    for _ in range(6):
        krum.add(D1, 1.0)
    with pytest.raises(AggregationError, match="needs at least 7 updates, got 6"):
        krum.aggregate()
    multi = build_strategy("krum", f=1, m=5)
    multi.begin_round(X0)
    for _ in range(5):
        multi.add(D1, 1.0)
    with pytest.raises(AggregationError, match="m=5 must be <= n - f = 4"):
        multi.aggregate()


def test_server_optimizer_refuses_another_model() -> None:
    strategy = build_strategy("fedadam")
    one_round(strategy, X0, [(D1, 1.0)])
    with pytest.raises(AggregationError, match="built for another model"):
        strategy.begin_round(arrays(w=[0.0, 0.0, 0.0]))
    with pytest.raises(AggregationError, match="built for another model"):
        strategy.begin_round(arrays(v=[0.0, 0.0]))


def test_inputs_are_not_modified_and_not_aliased() -> None:
    for name in STRATEGY_NAMES:
        g = arrays(w=[1.0, 2.0], b=[0.0])
        updates = [arrays(w=[float(i), 1.0], b=[1.0]) for i in range(5)]
        copies = [{k: v.copy() for k, v in u.items()} for u in updates]
        result = one_round(build_strategy(name), g, [(u, 1.0) for u in updates])
        np.testing.assert_array_equal(g["w"], [1.0, 2.0])
        for u, c in zip(updates, copies, strict=True):
            np.testing.assert_array_equal(u["w"], c["w"])
        result["w"][0] = 99.0
        assert g["w"][0] == 1.0


def test_robust_strategies_agree_with_numpy_across_coordinate_blocks() -> None:
    # 5 updates of 1.1M values: more than one block of coordinates (4M values / 5 updates per block).
    rng = np.random.default_rng(4)
    shapes = {"a": (700, 1000), "b": (400_000,), "c": (3, 7)}
    zero = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    updates = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(5)]
    updates[3] = {k: 50.0 * v for k, v in updates[3].items()}
    pairs = [(u, 1.0) for u in updates]
    median = one_round(build_strategy("median"), zero, pairs)
    trimmed = one_round(build_strategy("trimmed-mean", beta=0.2), zero, pairs)
    for k in shapes:
        stacked = np.stack([u[k] for u in updates])
        np.testing.assert_array_equal(median[k], np.median(stacked, axis=0))
        expected = np.sort(stacked, axis=0)[1:4].mean(axis=0, dtype=np.float64)
        np.testing.assert_allclose(trimmed[k], expected, rtol=1e-6, atol=1e-7)
    krum = build_strategy("krum", f=1)
    assert isinstance(krum, Krum)
    flat = [np.concatenate([u[k].ravel() for k in shapes]).astype(np.float64) for u in updates]
    direct = [sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(5) if j != i)[:2] for i in range(5)]
    np.testing.assert_allclose(krum.scores(updates), [sum(d) for d in direct], rtol=1e-9)
    chosen = int(np.argmin([sum(d) for d in direct]))
    result = one_round(krum, zero, pairs)
    for k in shapes:
        np.testing.assert_array_equal(result[k], updates[chosen][k])


def test_strategy_state_survives_the_project_checkpoint_file(tmp_path: Any) -> None:
    from fedmqtt.checkpoint import load_state, save_state

    strategy = build_strategy("fedyogi")
    x1 = one_round(strategy, X0, [(D1, 1.0)])
    save_state(tmp_path / "state.npz", {"strategy": strategy.state_dict(), "global": x1})
    loaded = load_state(tmp_path / "state.npz")
    resumed = build_strategy("fedyogi")
    resumed.load_state_dict(loaded["strategy"])
    np.testing.assert_array_equal(
        one_round(resumed, loaded["global"], [(D2, 1.0)])["w"], one_round(strategy, x1, [(D2, 1.0)])["w"]
    )
