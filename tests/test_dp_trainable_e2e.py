"""A private head-only job end to end: a real coordinator and real device processes on a real Mosquitto.

``--init-checkpoint`` (a model file) + ``--trainable fc3.*`` + each DP mode, two rounds. Checked from the outside:
the final retained model's frozen tensors are bit-identical to the file; every update frame carries the head only,
with the announced clip and noise, its norm inside the bounds for the head's coordinates; the retained ledger's ε
equals opacus's for the rounds run (the accountant is unchanged by --trainable).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedmqtt.codecs import decode_frame
from fedmqtt.mqtt import MqttConnection
from fedmqtt.schema import DPMode
from test_dp_integration import (  # the DP e2e harness: one home
    MODEL,
    Run,
    dp_flags,
    int8_error_bound,
    make_run,  # noqa: F401  (fixture)
    norm_bounds,
    opacus_epsilon,
    retained,
    tiny_data,  # noqa: F401  (fixture)
)

pytestmark = [pytest.mark.e2e, pytest.mark.mosquitto]

HEAD = ("fc3.weight", "fc3.bias")


@pytest.mark.parametrize(("mode", "extra"), [("device", ()), ("local", ()), ("central", ("--dp-adaptive-clip", "0.5"))])
def test_a_private_head_only_job_noises_the_head_only_and_keeps_the_backbone_bit_identical(
    mode: str,
    extra: tuple[str, ...],
    make_run: Callable[[str], Run],  # noqa: F811
    tiny_data: Path,  # noqa: F811
    tmp_path: Path,
    mqtt_client: Callable[..., MqttConnection],
) -> None:
    from fedmqtt.model_file import save_model_file
    from fedmqtt.models import build_model, get_arrays, model_manifest

    init = save_model_file(tmp_path / "pretrained.fedmodel", MODEL, get_arrays(build_model(MODEL, seed=11)))
    head_numel = sum(init.arrays[k].size for k in HEAD)
    clip, devices, rounds = 0.05, 2, 2
    # Noise of norm about twice the clip over the head's coordinates (as test_dp_integration does over all).
    sigma = round({"device": 2 * math.sqrt(devices), "local": 2.0, "central": 1.0}[mode] / math.sqrt(head_numel), 6)
    run = make_run(f"dp-head-{mode}")
    run.coordinator("--rounds", str(rounds), "--min-updates", str(devices), "--round-timeout", "30",
                    "--init-checkpoint", str(tmp_path / "pretrained.fedmodel"), "--trainable", "fc3.*",
                    *dp_flags(mode, clip, sigma, *extra))  # fmt: skip
    run.devices("devices", tiny_data, "--id-prefix", "d", "--parts", f"0:{devices}", "--partition", "iid",
                "--num-parts", str(devices), "--exit-on-finish")  # fmt: skip
    run.wait_for("both rounds to close", lambda: rounds in run.summaries(), timeout=90)
    assert run.wait_exit("coordinator") == 0

    # The backbone: bit for bit the file's; the head moved.
    final = decode_frame(retained(run.broker.url, run.topics.model, mqtt_client),
                         expected_manifest=model_manifest(MODEL)).arrays  # fmt: skip
    for name, value in init.arrays.items():
        same = final[name].tobytes() == value.tobytes()
        assert same is (name not in HEAD), f"{name}: {'unchanged' if same else 'changed'}"

    # Each update: the head only, the announced clip and noise, a norm inside the bounds for the head's d.
    head_manifest = tuple(e for e in model_manifest(MODEL) if e.name in HEAD)
    frames = run.updates()
    assert len(frames) == devices * rounds
    for _device, payload in frames:
        frame = decode_frame(payload, expected_manifest=head_manifest)
        assert tuple(frame.arrays) == HEAD
        announced = frame.header.dp
        assert announced is not None and announced.mode == mode
        norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in frame.arrays.values()))
        low, high = norm_bounds(announced.clip, announced.noise_std, head_numel, int8_error_bound(frame.arrays))
        assert low <= norm <= high, f"{mode}: update norm {norm:.5f} outside [{low:.5f}, {high:.5f}]"

    # ε: the accountant's, unchanged by --trainable (device σ, local σ·√k, central σ; q = 1).
    ledger = run.ledgers()[-1]
    assert ledger.mode is DPMode(mode) and ledger.rounds == rounds
    effective = sigma * math.sqrt(devices) if mode == "local" else sigma
    assert ledger.epsilon == pytest.approx(opacus_epsilon([(effective, 1.0)] * rounds), rel=1e-9)
    summaries = run.summaries()
    assert [summaries[r].epsilon is not None for r in range(1, rounds + 1)] == [True] * rounds
    if mode == "central":  # adaptive clipping moved the clip of round 2 from the head-only norms
        assert ledger.clip != clip
