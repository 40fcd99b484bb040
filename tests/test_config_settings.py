"""One configuration authority: flags, TOML and FEDMQTT_* variables derived from CoordinatorConfig; simulate uses it.

Each test here failed on the code before issue 10 (simulate's own flag list, flat DP fields, first-error-only
messages in field spelling, Krum checked only at aggregation).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedmqtt import settings as S
from fedmqtt.cli import build_parser
from fedmqtt.coordinator.config import (
    SETTINGS,
    CoordinatorConfig,
    config_from_args,
    load_config,
    reference_doc,
    write_config,
)
from fedmqtt.errors import ConfigError
from fedmqtt.simulate import SIMULATE_SETTINGS, plan_simulation

ROOT = Path(__file__).resolve().parents[1]
BASE = {"job": "j", "rounds": 3, "min_updates": 2}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedmqtt.data import write_idx_dataset

    return write_idx_dataset(tmp_path_factory.mktemp("idx"), num_train=100, num_test=50, seed=1)


def plan_of(data: Path, *argv: str, env: dict[str, str] | None = None) -> Any:
    args = build_parser().parse_args(["simulate", "--data-dir", str(data), "--embedded", *argv])
    return plan_simulation(args, env=env or {}, max_clients_per_process=100, cpu_count=2, now=0.0)


def fedmqtt(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedmqtt.cli", *argv], capture_output=True, text=True, timeout=120, env=env
    )


# --- strategy requirements before round 1 -------------------------------------------------------------------------


def test_krum_with_too_few_updates_is_refused_before_round_1_naming_the_requirement(tiny_data: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {**BASE, "min_updates": 4, "strategy": "krum"}, env={})
    assert str(info.value) == (
        "--min-updates: 4 is too few: krum with f=1, m=1 needs at least 5 updates (n >= 2f + 3 and m <= n - f)"
    )
    with pytest.raises(ConfigError, match=r"^--min-updates: 4 is too few: krum .*n >= 2f \+ 3"):
        plan_of(tiny_data, "--devices", "4", "--rounds", "1", "--strategy", "krum")  # simulate: before any process
    ok = load_config(None, {**BASE, "min_updates": 5, "strategy": "krum"}, env={})
    assert ok.min_updates_at_deadline == 5  # the deadline minimum defaults to what the strategy needs
    with pytest.raises(ConfigError, match=r"^--min-updates-at-deadline: 2 is too few: krum"):
        load_config(None, {**BASE, "min_updates": 5, "strategy": "krum", "min_updates_at_deadline": 2}, env={})


def test_trimmed_mean_must_trim_something_at_its_minimum_count() -> None:
    with pytest.raises(ConfigError, match=r"^--min-updates: 4 is too few: trimmed-mean with beta=0.1 .* 10 updates"):
        load_config(None, {**BASE, "min_updates": 4, "strategy": "trimmed-mean"}, env={})
    config = load_config(None, {**BASE, "min_updates": 4, "strategy": "trimmed-mean",
                                "strategy_params": {"beta": 0.25}}, env={})  # fmt: skip
    assert config.min_updates_at_deadline == 4


# --- errors: flag spelling, every problem at once -----------------------------------------------------------------


def test_all_missing_required_flags_are_listed_at_once_in_flag_spelling() -> None:
    result = fedmqtt("coordinator", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "3 settings are missing or invalid" in result.stderr
    for flag in ("--job: required", "--rounds: required", "--min-updates: required"):
        assert flag in result.stderr
    with pytest.raises(ConfigError) as info:
        load_config(None, {**BASE, "rounds": 0, "lr": -1, "dp_mode": "central"}, env={})
    text = str(info.value)
    assert "--rounds: must be > 0" in text and "--lr: must be > 0" in text
    assert "--dp-clip: required with --dp-mode" in text and "--dp-noise-multiplier: required with --dp-mode" in text
    with pytest.raises(ConfigError, match=r"^--devices-per-round: must be >= --min-updates \(2\)"):
        load_config(None, {**BASE, "devices_per_round": 1}, env={})


def test_help_shows_every_default_and_marks_required_flags() -> None:
    for command in ("coordinator", "simulate"):
        text = " ".join(fedmqtt(command, "--help").stdout.split())
        offered = SETTINGS if command == "coordinator" else SIMULATE_SETTINGS
        for setting in offered:
            if setting.name in ("broker", "username", "password", "password_file", "tls_ca"):
                continue  # the broker flags' help belongs to fedmqtt.mqtt.settings
            assert f"{setting.flag} " in text, setting.flag
        assert "--job JOB job id (one topic level) (required)" in text or command == "simulate"
        assert "--rounds N rounds to run (required)" in text
        assert "--round-timeout X seconds until a round's deadline (default: 120)" in text
        assert "--model NAME model; one of cnn, seed-cnn, mlp, mobilenet-v3-small (default: cnn)" in text


# --- the three sources --------------------------------------------------------------------------------------------


def test_environment_variables_configure_the_coordinator_and_flags_win(tmp_path: Path) -> None:
    env = {
        "FEDMQTT_JOB": "from-env", "FEDMQTT_ROUNDS": "4", "FEDMQTT_MIN_UPDATES": "2", "FEDMQTT_RESUME": "false",
        "FEDMQTT_DP_MODE": "central", "FEDMQTT_DP_CLIP": "0.5", "FEDMQTT_DP_NOISE_MULTIPLIER": "1.1",
        "FEDMQTT_DP_SAMPLE_RATE": "0.25", "FEDMQTT_STRATEGY_PARAMS": "server_lr=0.5,momentum=0.9",
        "FEDMQTT_STRATEGY": "fedavgm", "FEDMQTT_DATA": "not-a-setting",
    }  # fmt: skip
    toml = tmp_path / "job.toml"
    toml.write_text('[coordinator]\njob = "from-toml"\nrounds = 9\nlr = 0.2\n[coordinator.dp]\nclip = 2.0\n')
    args = build_parser().parse_args(["coordinator", "--rounds", "6", "--dp-clip", "0.75"])
    config = config_from_args(args, env=env, toml_path=toml)
    assert (config.job, config.rounds, config.min_updates, config.lr) == ("from-env", 6, 2, 0.2)
    assert config.dp is not None and (config.dp.mode, config.dp.clip, config.dp.sample_rate) == ("central", 0.75, 0.25)
    assert config.strategy_params == {"server_lr": 0.5, "momentum": 0.9}
    with pytest.raises(ConfigError, match=r"--rounds: must be > 0, got '0'"):
        load_config(None, {}, env={**env, "FEDMQTT_ROUNDS": "0"})


def test_a_written_config_reads_back_to_the_same_job(tmp_path: Path) -> None:
    config = load_config(None, {**BASE, "strategy": "fedavgm", "strategy_params": {"nesterov": True},
                                "trainable": ["fc2.weight"], "dp_mode": "off", "password": "s3cret",
                                "username": "u"}, env={})  # fmt: skip
    path = write_config(config, tmp_path / "job.toml")
    assert "s3cret" not in path.read_text()
    again = load_config(path, {"password": "s3cret"}, env={})
    assert again == config
    dp = load_config(None, {**BASE, "dp_mode": "local", "dp_clip": 1, "dp_noise_multiplier": 1, "dp_population": 8,
                            "devices_per_round": 4}, env={})  # fmt: skip
    assert dp.dp is not None and dp.dp.sample_rate == 0.5  # defaulted from the selection
    assert load_config(write_config(dp, tmp_path / "dp.toml"), {}, env={}) == dp


def test_the_dp_sample_rate_without_a_population_is_refused_up_front() -> None:
    with pytest.raises(ConfigError, match=r"^--dp-sample-rate: required with --dp-mode device unless --dp-population"):
        load_config(None, {**BASE, "dp_mode": "device", "dp_clip": 1, "dp_noise_multiplier": 1}, env={})


def test_eval_every_must_be_a_positive_round_count(tiny_data: Path) -> None:
    with pytest.raises(ConfigError, match=r"--eval-every"):
        load_config(None, {**BASE, "eval_every": 0}, env={})
    assert load_config(None, {**BASE, "eval_every": 2}, env={}).eval_every == 2
    assert plan_of(tiny_data, "--devices", "2", "--rounds", "4", "--eval-every", "4").coordinator.eval_every == 4


# --- simulate -----------------------------------------------------------------------------------------------------


def test_simulate_offers_the_coordinator_settings_with_the_same_defaults(tiny_data: Path) -> None:
    plan = plan_of(tiny_data, "--devices", "4", "--rounds", "2", "--dp-mode", "central", "--dp-clip", "1",
                   "--dp-noise-multiplier", "1.2", "--dp-population", "40", "--dp-adaptive-clip", "0.5",
                   "--max-update-mb", "3", "--max-samples", "500", "--target-epsilon", "9")  # fmt: skip
    c = plan.coordinator
    assert (c.max_update_mb, c.max_samples, c.dp.population, c.dp.adaptive_clip, c.dp.target_epsilon) == (
        3.0,
        500,
        40,
        0.5,
        9.0,
    )
    plain = plan_of(tiny_data, "--devices", "2", "--rounds", "1").coordinator
    defaults = CoordinatorConfig.model_fields
    assert plain.round_timeout == defaults["round_timeout"].default == 120.0  # was 300 in simulate
    for name in ("max_update_mb", "max_samples", "max_attempts", "uplink", "downlink", "lr", "batch_size", "model"):
        assert getattr(plain, name) == defaults[name].default, name
    assert {s.flag for s in SIMULATE_SETTINGS} >= {"--dp-population", "--dp-adaptive-clip", "--max-update-mb",
                                                  "--max-samples", "--max-update-norm", "--strategy-params"}  # fmt: skip


def test_simulate_dp_without_a_sample_rate_defaults_it_from_the_selection(tiny_data: Path) -> None:
    argv = ("--rounds", "1", "--dp-mode", "device", "--dp-clip", "1", "--dp-noise-multiplier", "1")
    plan = plan_of(tiny_data, "--devices", "8", "--devices-per-round", "2", "--min-updates", "2", *argv)
    assert plan.coordinator.dp.sample_rate == 0.25 and plan.coordinator.dp.population == 8
    assert plan_of(tiny_data, "--devices", "3", *argv).coordinator.dp.sample_rate == 1.0


def test_a_bad_strategy_fails_before_anything_starts(tmp_path: Path, tiny_data: Path) -> None:
    out = tmp_path / "run"
    result = fedmqtt("simulate", "--devices", "2", "--rounds", "1", "--data-dir", str(tiny_data), "--out", str(out),
                     "--strategy", "no-such-strategy")  # fmt: skip
    assert result.returncode == 2
    assert "--strategy: invalid choice: 'no-such-strategy'" in result.stderr
    assert not out.exists()
    result = fedmqtt("simulate", "--devices", "2", "--rounds", "1", "--data-dir", str(tiny_data), "--out", str(out),
                     "--dp-mode", "central", "--dp-clip", "1", "--dp-noise-multiplier", "1", "--strategy", "median")  # fmt: skip
    assert result.returncode == 1
    assert "--strategy: 'median' cannot be used with --dp-mode central" in result.stderr
    assert not out.exists()


# --- the reference table ------------------------------------------------------------------------------------------


def test_docs_configuration_table_is_generated_from_the_model() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert doc == reference_doc(doc), "run: python -m fedmqtt.coordinator.config docs/configuration.md"
    for setting in SETTINGS:
        assert f"| `{setting.flag}` | `{setting.toml_key}` | `{setting.env}` |" in doc
    assert S.MB == 1_000_000
