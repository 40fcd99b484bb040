"""Coordinator configuration (TOML + flags) and atomic checkpoint files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmqtt.checkpoint import CheckpointError, load_state, save_state
from fedmqtt.coordinator.config import load_config
from fedmqtt.errors import ConfigError


def test_flags_override_toml(tmp_path: Path) -> None:
    toml = tmp_path / "job.toml"
    toml.write_text('[coordinator]\njob = "mnist"\nrounds = 5\nmin-updates = 3\nuplink = "float16"\n')
    cfg = load_config(toml, {"rounds": 7, "strategy": None}, env={})
    assert (cfg.job, cfg.rounds, cfg.min_updates, cfg.uplink) == ("mnist", 7, 3, "float16")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"rounds": 0}, "--rounds: must be > 0"),
        ({"strategy": "fedsgd"}, "--strategy: unknown strategy 'fedsgd'"),
        ({"uplink": "int4"}, "--uplink"),
        ({"job": "a/b"}, "--job"),
        ({"devices_per_round": 1}, "--devices-per-round: must be >= --min-updates"),
        ({"dp_mode": "device"}, "--dp-clip: required with --dp-mode"),
        ({"dp_mode": "device", "dp_clip": 1.0, "dp_noise_multiplier": 1.0}, "--dp-sample-rate: required"),
        ({"dp_mode": "device", "dp_clip": 1.0, "dp_noise_multiplier": 0.0},
         "--dp-noise-multiplier: must be > 0"),
        ({"dp_mode": "device", "dp_clip": 1.0, "dp_noise_multiplier": 1.0, "dp_sample_rate": 0.1,
          "strategy": "median"}, "--strategy: 'median' cannot be used with --dp-mode device"),
        ({"dp_mode": "device", "dp_clip": 1.0, "dp_noise_multiplier": 1.0, "dp_sample_rate": 0.1,
          "uplink": "topk:0.01+int8+ef"}, "error feedback"),
        ({"resume": True}, "--resume: needs --checkpoint-dir"),
        ({"dp_mode": "central", "dp_clip": 1.0, "dp_noise_multiplier": 1.0, "dp_sample_rate": 0.1,
          "trainable": ["head.*"]}, "--trainable"),
        ({"downlink": "topk:0.1+int8+ef"}, "--downlink"),
        ({"downlink": "float16+ef"}, "drop 'ef': a compressed downlink always uses error feedback, on the coordinator"),
        ({"downlink": "bfloat16"}, "--downlink"),
        ({"target_epsilon": 3.0}, "--target-epsilon: needs --dp-mode"),
        ({"dp_mode": "local", "dp_clip": 1.0, "dp_noise_multiplier": 1.0, "dp_sample_rate": 0.1,
          "dp_adaptive_clip": 0.5}, "--dp-adaptive-clip: needs --dp-mode central"),
        ({"model": "resnet"}, "--model: unknown model 'resnet'"),
    ],
)  # fmt: skip
def test_bad_configuration_is_refused_naming_the_flag(overrides: dict, field: str) -> None:
    base = {"job": "j", "rounds": 3, "min_updates": 2}
    base.update(overrides)
    with pytest.raises(ConfigError) as info:
        load_config(None, base, env={})
    assert field in str(info.value), str(info.value)


def test_downlink_codec_defaults_to_exact_float32() -> None:
    base = {"job": "j", "rounds": 3, "min_updates": 2}
    assert str(load_config(None, base).downlink_codec) == "float32+zstd:1"
    assert load_config(None, {**base, "downlink": "float16"}).downlink_codec.values.value == "float16"
    # Deltas against the model the devices hold: top-k is allowed (the coordinator does the error feedback).
    assert load_config(None, {**base, "downlink": "topk:0.01+int8"}).downlink_codec.topk == 0.01


def test_bad_toml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", {})
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, {})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('job = "j"\nrounds = 1\nmin_updates = 1\nfoo = 2\n')
    with pytest.raises(ConfigError, match="foo"):
        load_config(unknown, {})


def test_checkpoint_round_trip_and_atomicity(tmp_path: Path) -> None:
    path = tmp_path / "ck" / "state.npz"
    state = {"round": 3, "global": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "list": [np.ones(2), "x"]}
    save_state(path, state)
    loaded = load_state(path)
    assert loaded["round"] == 3
    np.testing.assert_array_equal(loaded["global"]["w"], state["global"]["w"])
    assert loaded["global"]["w"].dtype == np.float32
    assert loaded["list"][1] == "x"
    assert [p.name for p in path.parent.iterdir()] == ["state.npz"]  # no temp file left behind


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_state(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_state(bad)


def test_toml_strategy_params_keep_their_types(tmp_path: Path) -> None:
    """`strategy_params = {nesterov = true}` used to fail as "must be true or false, got 1.0" (coerced to float)."""
    toml = tmp_path / "job.toml"
    toml.write_text(
        'job = "j"\nrounds = 1\nmin_updates = 1\nstrategy = "fedavgm"\n'
        "strategy_params = {nesterov = true, momentum = 0.9, server_lr = 1}\n"
    )
    config = load_config(toml, {})
    assert config.strategy_params == {"nesterov": True, "momentum": 0.9, "server_lr": 1}
    toml.write_text('job = "j"\nrounds = 1\nmin_updates = 5\nstrategy = "krum"\nstrategy_params = {f = 1}\n')
    assert load_config(toml, {}).strategy_params == {"f": 1}


def test_bad_strategy_params_are_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nesterov"):
        load_config(None, {"job": "j", "rounds": 1, "min_updates": 1, "strategy": "fedavgm",
                           "strategy_params": {"nesterov": 1.0}})  # fmt: skip
    with pytest.raises(ConfigError, match="has no parameter 'bogus'"):
        load_config(None, {"job": "j", "rounds": 1, "min_updates": 1, "strategy_params": {"bogus": 1}})
