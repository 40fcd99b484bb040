"""The job accountant: ε against opacus and published figures, stopping before the budget, state, the ledger."""

from __future__ import annotations

import json
import math
import time
import warnings

import pytest
from opacus.accountants import RDPAccountant

from fedmqtt.errors import ConfigError
from fedmqtt.privacy import (
    JobAccountant,
    PrivacyStateError,
    default_delta,
    effective_noise_multiplier,
    epsilon_of,
    noise_multiplier_for_budget,
)
from fedmqtt.privacy.accountant import EXTRA_ORDERS
from fedmqtt.schema import DPMode, PrivacyLedger, from_json, to_json

ORDERS = [*RDPAccountant.DEFAULT_ALPHAS, *EXTRA_ORDERS]


def _opacus_epsilon(history: list[tuple[float, float, int]], delta: float, alphas: list[float] | None = None) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha"
        return float(accountant.get_epsilon(delta=delta, alphas=alphas))


# ---------------------------------------------------------------------------------------------------- ε values


def test_epsilon_matches_opacus_own_published_test_case() -> None:
    # opacus/tests/accountants_test.py, AccountingTest.test_rdp_accountant: σ=1.5, q=0.04, 90 epochs, δ=1e-5.
    accountant = JobAccountant(1.5, 0.04, 1e-5)
    for _ in range(int(90 / 0.04)):
        accountant.step()
    assert accountant.rounds == 2250
    assert accountant.history == [(1.5, 0.04, 2250)]
    assert accountant.epsilon == pytest.approx(7.32911117143, abs=1e-9)
    assert accountant.epsilon == pytest.approx(_opacus_epsilon([(1.5, 0.04, 2250)], 1e-5), rel=1e-12)


def test_epsilon_is_within_abadi_et_al_moments_accountant_figure() -> None:
    # Abadi et al. 2016, "Deep Learning with Differential Privacy", §3.1: q=0.01, σ=4, δ=1e-5, T=10000 steps
    # gives ε ≈ 1.26 with the moments accountant. The RDP accountant with Balle et al.'s conversion is tighter.
    accountant = JobAccountant(4.0, 0.01, 1e-5)
    accountant.load_state_dict({"mechanism": "rdp", "history": [[4.0, 0.01, 10_000]]})
    assert 1.0 < accountant.epsilon <= 1.26


@pytest.mark.parametrize(
    "history",
    [
        [(1.1, 0.01, 100)],
        [(0.8, 0.1, 3), (1.2, 0.1, 5), (0.8, 0.1, 1), (2.0, 0.05, 40)],
        [(5.0, 0.001, 7)],
        [(0.6, 1.0, 4)],
    ],
)
def test_epsilon_equals_a_direct_opacus_call(history: list[tuple[float, float, int]]) -> None:
    accountant = JobAccountant(1.0, 0.1, 1e-6)
    for sigma, q, steps in history:
        for _ in range(steps):
            accountant.step(sigma, q)
    assert accountant.history == history
    assert accountant.epsilon == pytest.approx(_opacus_epsilon(history, 1e-6, ORDERS), rel=1e-12)
    # The extra large orders only ever tighten opacus's default search.
    assert accountant.epsilon <= _opacus_epsilon(history, 1e-6) * (1 + 1e-12)


def test_participation_known_epsilon_drops_amplification() -> None:
    accountant = JobAccountant(1.0, 0.1, 1e-5)
    for _ in range(20):
        accountant.step()
    known = accountant.epsilon_participation_known
    assert known == pytest.approx(_opacus_epsilon([(1.0, 1.0, 20)], 1e-5, ORDERS), rel=1e-12)
    assert known > 3 * accountant.epsilon


def test_no_rounds_spend_nothing_and_noiseless_rounds_are_unbounded() -> None:
    accountant = JobAccountant(0.0, 0.1, 1e-5)
    assert accountant.epsilon == 0.0 and accountant.rounds == 0
    accountant.step()
    assert accountant.epsilon == math.inf
    assert epsilon_of([], 1e-5) == 0.0


def test_a_short_round_costs_more_than_a_full_one() -> None:
    full, short = JobAccountant(1.0, 0.1, 1e-5), JobAccountant(1.0, 0.1, 1e-5)
    full.step(effective_noise_multiplier(DPMode.DEVICE, 1.0, 10, 10))
    short.step(effective_noise_multiplier(DPMode.DEVICE, 1.0, 10, 3))
    assert short.history == [(pytest.approx(math.sqrt(0.3)), 0.1, 1)]
    assert short.epsilon > full.epsilon


def test_epsilon_stays_fast_for_long_jobs_with_varying_noise() -> None:
    accountant = JobAccountant(1.0, 0.05, 1e-5)
    for r in range(2000):  # partial rounds alternate: opacus keeps one history entry per change
        accountant.step(effective_noise_multiplier(DPMode.DEVICE, 1.0, 10, 8 + r % 3))
    started = time.perf_counter()
    epsilon = accountant.epsilon
    assert time.perf_counter() - started < 5.0  # uncached, 2000 entries x 150 ms each would be minutes
    assert len(accountant.history) == 2000 and math.isfinite(epsilon)


# ---------------------------------------------------------------------------------------------------- stopping


def test_the_accountant_stops_before_the_budget() -> None:
    accountant = JobAccountant(1.0, 0.1, 1e-5, target_epsilon=4.0)
    while not accountant.would_exceed():
        accountant.step()
    assert 0 < accountant.rounds < 100
    assert accountant.epsilon <= 4.0
    after = accountant.epsilon_after_next()
    assert after > 4.0
    rounds, epsilon = accountant.rounds, accountant.epsilon
    assert (accountant.rounds, accountant.epsilon) == (rounds, epsilon)  # the look-ahead changed nothing
    accountant.step()
    assert accountant.epsilon == pytest.approx(after, rel=1e-12)


def test_would_exceed_uses_the_given_round_parameters() -> None:
    accountant = JobAccountant(1.0, 0.1, 1e-5, target_epsilon=4.0)
    for _ in range(10):
        accountant.step()
    assert accountant.epsilon < 4.0
    assert accountant.would_exceed(noise_multiplier=0.3)
    assert not accountant.would_exceed(noise_multiplier=50.0)
    assert accountant.would_exceed(sample_rate=1.0, noise_multiplier=0.5)


def test_without_a_target_nothing_is_exceeded() -> None:
    accountant = JobAccountant(0.5, 1.0, 1e-5)
    for _ in range(50):
        accountant.step()
    assert accountant.epsilon > 100
    assert accountant.would_exceed() is False


# ---------------------------------------------------------------------------------------------------- state


def test_state_dict_round_trips_through_json() -> None:
    accountant = JobAccountant(1.0, 0.1, 1e-5)
    for sigma in (1.0, 1.0, 0.7, 1.0):
        accountant.step(sigma)
    state = json.loads(json.dumps(accountant.state_dict()))
    assert state == {"mechanism": "rdp", "history": [[1.0, 0.1, 2], [0.7, 0.1, 1], [1.0, 0.1, 1]]}
    restored = JobAccountant(1.0, 0.1, 1e-5)
    restored.load_state_dict(state)
    assert restored.epsilon == accountant.epsilon
    assert restored.rounds == 4
    restored.step()
    assert restored.history[-1] == (1.0, 0.1, 2)  # opacus keeps merging equal steps after a reload


@pytest.mark.parametrize(
    "state",
    [
        {"mechanism": "gdp", "history": []},
        {"history": []},
        {"mechanism": "rdp"},
        {"mechanism": "rdp", "history": "[]"},
        {"mechanism": "rdp", "history": [[1.0, 0.1]]},
        {"mechanism": "rdp", "history": [[-1.0, 0.1, 1]]},
        {"mechanism": "rdp", "history": [[1.0, 1.5, 1]]},
        {"mechanism": "rdp", "history": [[1.0, 0.0, 1]]},
        {"mechanism": "rdp", "history": [[1.0, 0.1, 0]]},
        {"mechanism": "rdp", "history": [[1.0, 0.1, True]]},
        {"mechanism": "rdp", "history": [[float("nan"), 0.1, 1]]},
        [],
    ],
)
def test_damaged_state_is_refused(state: object) -> None:
    accountant = JobAccountant(1.0, 0.1, 1e-5)
    accountant.step()
    with pytest.raises(PrivacyStateError, match=r"accountant state: .*restore it from a backup"):
        accountant.load_state_dict(state)  # type: ignore[arg-type]
    assert accountant.rounds == 1  # unchanged


# ---------------------------------------------------------------------------------------------------- ledger


def test_ledger_message_states_what_was_spent() -> None:
    accountant = JobAccountant(1.1, 0.05, 1e-5, target_epsilon=8.0)
    for _ in range(30):
        accountant.step()
    ledger = accountant.ledger(job="mnist-1", mode="device", clip=0.5, now=1700000000.0)
    assert isinstance(ledger, PrivacyLedger)
    assert ledger.mode is DPMode.DEVICE and ledger.rounds == 30 and ledger.clip == 0.5
    assert ledger.epsilon == pytest.approx(accountant.epsilon)
    assert ledger.delta == 1e-5 and ledger.target_epsilon == 8.0 and ledger.sample_rate == 0.05
    assert ledger.accountant.startswith("opacus 1.") and ledger.accountant.endswith("RDPAccountant (rdp)")
    assert from_json(PrivacyLedger, to_json(ledger)) == ledger


def test_ledger_reports_an_unbounded_epsilon_as_none_instead_of_lying() -> None:
    accountant = JobAccountant(0.0, 0.1, 1e-5)
    accountant.step()
    ledger = accountant.ledger(job="j1", mode=DPMode.CENTRAL, clip=1.0, now=0.0)
    assert ledger.epsilon is None


def test_ledger_bad_values_are_config_errors() -> None:
    accountant = JobAccountant(1.0, 0.1, 1e-5)
    with pytest.raises(ConfigError, match=r"dp_mode"):
        accountant.ledger(job="j", mode="secret", clip=1.0, now=0.0)
    with pytest.raises(ConfigError, match=r"^clip:"):
        accountant.ledger(job="j", mode="central", clip=0.0, now=0.0)
    with pytest.raises(ConfigError, match=r"^job:"):
        accountant.ledger(job="bad/job", mode="central", clip=1.0, now=0.0)


# ---------------------------------------------------------------------------------------------------- settings


def test_default_delta() -> None:
    assert default_delta(1000) == pytest.approx(1000**-1.1)
    assert default_delta(2) < 0.5
    for bad in (1, 0, -5, 10.0, True):
        with pytest.raises(ConfigError, match=r"dp_population: must be an integer >= 2"):
            default_delta(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        ((-1.0, 0.1, 1e-5), {}, "dp_noise_multiplier"),
        ((math.nan, 0.1, 1e-5), {}, "dp_noise_multiplier"),
        ((1.0, 0.0, 1e-5), {}, "dp_sample_rate"),
        ((1.0, 1.5, 1e-5), {}, "dp_sample_rate"),
        ((1.0, 0.1, 0.0), {}, "dp_delta"),
        ((1.0, 0.1, 1.0), {}, "dp_delta"),
        ((1.0, 0.1, 1e-5), {"target_epsilon": 0.0}, "target_epsilon"),
        ((1.0, 0.1, 1e-5), {"target_epsilon": math.inf}, "target_epsilon"),
    ],
)
def test_bad_accountant_settings_are_config_errors(
    args: tuple[float, float, float], kwargs: dict[str, float], field: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        JobAccountant(*args, **kwargs)


def test_bad_step_values_are_config_errors() -> None:
    accountant = JobAccountant(1.0, 0.1, 1e-5)
    with pytest.raises(ConfigError, match=r"^noise_multiplier:"):
        accountant.step(-0.5)
    with pytest.raises(ConfigError, match=r"^sample_rate:"):
        accountant.epsilon_after_next(sample_rate=2.0)
    assert accountant.rounds == 0


def test_noise_multiplier_for_budget_reaches_the_target() -> None:
    sigma = noise_multiplier_for_budget(target_epsilon=5.0, delta=1e-5, sample_rate=0.1, rounds=50)
    accountant = JobAccountant(sigma, 0.1, 1e-5)
    for _ in range(50):
        accountant.step()
    assert 4.9 <= accountant.epsilon <= 5.0
    with pytest.raises(ConfigError, match=r"target_epsilon"):
        noise_multiplier_for_budget(target_epsilon=0.0, delta=1e-5, sample_rate=0.1, rounds=50)
    with pytest.raises(ConfigError, match=r"rounds"):
        noise_multiplier_for_budget(target_epsilon=1.0, delta=1e-5, sample_rate=0.1, rounds=0)
