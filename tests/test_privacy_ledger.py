"""A device's own privacy ledger: per-mode charge, budget, persistence across restarts, atomic writes."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fedmqtt.errors import ConfigError
from fedmqtt.privacy import (
    BudgetExceeded,
    DeviceLedger,
    PrivacyStateError,
    device_noise_multiplier,
    device_noise_std,
)
from fedmqtt.privacy.accountant import EXTRA_ORDERS
from fedmqtt.schema import DPMode, DPPlan


def _plan(mode: DPMode = DPMode.LOCAL, sigma: float = 2.0, clip: float = 1.0, m: int = 4, **kw: float) -> DPPlan:
    fields = {
        "mode": mode,
        "clip": clip,
        "noise_multiplier": sigma,
        "device_noise_std": device_noise_std(mode, sigma, clip, m),
        "expected_updates": m,
        "sample_rate": 0.1,
        "delta": 1e-5,
    }
    fields.update(kw)
    return DPPlan.model_validate(fields)


def _gaussian_epsilon(sigma: float, rounds: int, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [(sigma, 1.0, rounds)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta=delta, alphas=[*RDPAccountant.DEFAULT_ALPHAS, *EXTRA_ORDERS]))


def test_each_mode_is_charged_the_noise_the_device_can_rely_on() -> None:
    assert device_noise_multiplier(_plan(DPMode.LOCAL, sigma=2.0)) == pytest.approx(2.0)
    assert device_noise_multiplier(_plan(DPMode.DEVICE, sigma=2.0, m=4)) == pytest.approx(1.0)  # σ/√m
    assert device_noise_multiplier(_plan(DPMode.CENTRAL, sigma=2.0)) == pytest.approx(2.0)
    assert device_noise_multiplier(_plan(DPMode.OFF, sigma=2.0)) == 0.0


@pytest.mark.parametrize(("mode", "charged"), [(DPMode.LOCAL, 3.0), (DPMode.DEVICE, 1.5), (DPMode.CENTRAL, 3.0)])
def test_rounds_are_gaussian_mechanisms_without_amplification(mode: DPMode, charged: float) -> None:
    ledger = DeviceLedger(None, 1000.0)
    plan = _plan(mode, sigma=3.0, m=4)
    for _ in range(5):
        ledger.record(plan)
    assert ledger.rounds == 5 and ledger.delta == 1e-5
    assert ledger.epsilon == pytest.approx(_gaussian_epsilon(charged, 5, 1e-5), rel=1e-12)


def test_a_fresh_ledger_has_spent_nothing() -> None:
    ledger = DeviceLedger(None, 1.0)
    assert (ledger.epsilon, ledger.rounds, ledger.delta) == (0.0, 0, None)


def test_the_ledger_refuses_past_its_budget(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    ledger = DeviceLedger(path, budget=8.0)
    plan = _plan(DPMode.LOCAL, sigma=3.0)
    while not ledger.would_exceed(plan):
        assert ledger.epsilon_after(plan) <= 8.0
        ledger.record(plan)
    assert 0 < ledger.rounds < 50 and ledger.epsilon <= 8.0
    on_disk = path.read_bytes()
    spent = ledger.epsilon
    with pytest.raises(BudgetExceeded, match=r"from epsilon \d+\.\d+ to \d+\.\d+, past its budget 8"):
        ledger.record(plan)
    assert ledger.epsilon == spent and path.read_bytes() == on_disk  # nothing recorded
    # A noisier plan may still fit.
    assert not ledger.would_exceed(_plan(DPMode.LOCAL, sigma=100.0))


def test_a_plan_without_noise_always_exceeds() -> None:
    ledger = DeviceLedger(None, 1e6)
    assert ledger.epsilon_after(_plan(DPMode.OFF)) == math.inf
    assert ledger.would_exceed(_plan(DPMode.OFF))
    assert ledger.would_exceed(_plan(DPMode.CENTRAL, sigma=0.0))
    with pytest.raises(BudgetExceeded):
        ledger.record(_plan(DPMode.OFF))
    assert ledger.rounds == 0


def test_the_ledger_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "dev-1" / "privacy.json"
    first = DeviceLedger(path, budget=50.0)
    first.record(_plan(DPMode.LOCAL, sigma=2.0))
    first.record(_plan(DPMode.DEVICE, sigma=2.0, m=4))
    first.record(_plan(DPMode.LOCAL, sigma=2.0))
    restarted = DeviceLedger(path, budget=50.0)
    assert restarted.rounds == 3 and restarted.delta == 1e-5
    assert restarted.epsilon == first.epsilon
    restarted.record(_plan(DPMode.LOCAL, sigma=2.0))
    assert DeviceLedger(path, budget=50.0).rounds == 4
    # The budget is a setting, not state: a stricter budget applies at once to what was spent.
    assert DeviceLedger(path, budget=1.0).would_exceed(_plan(DPMode.LOCAL, sigma=50.0))


def test_every_write_leaves_a_complete_file_and_no_temporaries(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    ledger = DeviceLedger(path, budget=100.0)
    for n in range(1, 4):
        ledger.record(_plan(DPMode.LOCAL, sigma=4.0))
        state = json.loads(path.read_text())
        assert state["accountant"]["history"] == [[4.0, 1.0, n]]
        assert [p.name for p in tmp_path.iterdir()] == ["privacy.json"]


def test_a_failed_write_records_nothing(tmp_path: Path) -> None:
    path = tmp_path / "privacy.json"
    ledger = DeviceLedger(path, budget=100.0)
    ledger.record(_plan(DPMode.LOCAL, sigma=4.0))
    path.unlink()
    path.mkdir()  # the rename onto the ledger's path now fails
    with pytest.raises(OSError):
        ledger.record(_plan(DPMode.LOCAL, sigma=4.0))
    assert ledger.rounds == 1
    assert [p.name for p in tmp_path.iterdir()] == ["privacy.json"]  # the temporary file was removed


def test_state_dict_round_trip_and_json() -> None:
    ledger = DeviceLedger(None, 20.0)
    ledger.record(_plan(DPMode.CENTRAL, sigma=3.0))
    state = json.loads(json.dumps(ledger.state_dict()))
    other = DeviceLedger(None, 20.0)
    other.load_state_dict(state)
    assert (other.epsilon, other.rounds, other.delta) == (ledger.epsilon, 1, 1e-5)


def test_delta_is_fixed_by_the_first_plan_or_given_explicitly(tmp_path: Path) -> None:
    ledger = DeviceLedger(tmp_path / "l.json", 100.0)
    ledger.record(_plan(DPMode.LOCAL, sigma=4.0, delta=1e-4))
    ledger.record(_plan(DPMode.LOCAL, sigma=4.0, delta=1e-6))
    assert ledger.delta == 1e-4
    assert ledger.epsilon == pytest.approx(_gaussian_epsilon(4.0, 2, 1e-4))
    strict = DeviceLedger(tmp_path / "l.json", 100.0, delta=1e-8)
    assert strict.delta == 1e-8 and strict.epsilon == pytest.approx(_gaussian_epsilon(4.0, 2, 1e-8))


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"format": "other", "version": 1}',
        '{"format": "fedmqtt.device-privacy-ledger", "version": 2, "delta": null, "accountant": {}}',
        '{"format": "fedmqtt.device-privacy-ledger", "version": 1, "delta": 2.0,'
        ' "accountant": {"mechanism": "rdp", "history": []}}',
        '{"format": "fedmqtt.device-privacy-ledger", "version": 1, "delta": null,'
        ' "accountant": {"mechanism": "rdp", "history": [[1.0, 1.0, 3]]}}',
        '{"format": "fedmqtt.device-privacy-ledger", "version": 1, "delta": 1e-05,'
        ' "accountant": {"mechanism": "rdp", "history": [[-1.0, 1.0, 3]]}}',
        '{"format": "fedmqtt.device-privacy-ledger", "version": 1, "delta": 1e-05}',
    ],
)
def test_a_damaged_ledger_file_stops_the_device(tmp_path: Path, content: str) -> None:
    path = tmp_path / "privacy.json"
    path.write_text(content)
    with pytest.raises(PrivacyStateError, match=r"privacy.json: .*deleting it would forget"):
        DeviceLedger(path, budget=10.0)


def test_bad_settings_are_config_errors() -> None:
    for budget in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match=r"privacy_budget: must be a positive finite epsilon"):
            DeviceLedger(None, budget)
    with pytest.raises(ConfigError, match=r"delta"):
        DeviceLedger(None, 1.0, delta=1.0)
