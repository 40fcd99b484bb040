"""The model's whole life through the real commands (issue #11's acceptance): ``fedmqtt pretrain`` on a public slice
→ a head-only federated job from that file on Mosquitto (coordinator and device processes) → ``fedmqtt export`` of
the coordinator's checkpoint in each format → ``fedmqtt predict`` on MNIST test images written as PNG gives the
checkpoint model's classes (int8 within tolerance), and the frozen tensors never moved."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import SHARED_DATA, ProcessGroup, fedmqtt_argv, subprocess_env
from exported import assert_int8_faithful, float_probabilities, mnist_test_pixels, write_pngs
from fedmqtt.export import load_source
from fedmqtt.model_file import load_model_file

MNIST = SHARED_DATA / "mnist"
IMAGES = 150
PARALLEL = 2  # fedmqtt commands run at once (export, predict)


def _fedmqtt(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return _fedmqtt_each([list(args)], timeout=timeout)[0]


def _fedmqtt_each(commands: list[list[str]], timeout: float = 600) -> list[subprocess.CompletedProcess[str]]:
    """Run the ``fedmqtt`` commands, two at a time (each has one thread; the machine two cores; they read and
    write different files); each must succeed. Results in the order of ``commands``."""

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(fedmqtt_argv(*args), capture_output=True, text=True, env=subprocess_env(),
                              timeout=timeout)  # fmt: skip

    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        done = list(pool.map(run, commands))
    for args, result in zip(commands, done, strict=True):
        assert result.returncode == 0 and "Traceback" not in result.stderr, (args, result.stderr)
    return done


@pytest.mark.e2e
@pytest.mark.mosquitto
def test_pretrain_then_head_only_job_then_export_each_format_then_predict(
    mosquitto_broker: Any, topic_prefix: str, tmp_path: Path
) -> None:
    pretrained = tmp_path / "pre.fedmodel"
    _fedmqtt("pretrain", "--model", "mlp", "--dataset", "mnist", "--data-dir", str(MNIST), "--public-slice", "1000",
             "--epochs", "1", "--out", str(pretrained), "--json")  # fmt: skip
    base = load_model_file(pretrained)
    assert base.model == "mlp" and base.meta["accuracy"] > 0.5

    group = ProcessGroup(tmp_path)
    try:
        flags = ["--broker", mosquitto_broker.url, "--job", "life", "--prefix", topic_prefix]
        group.start("coordinator", fedmqtt_argv(
            "coordinator", *flags, "--model", "mlp", "--init-checkpoint", str(pretrained), "--trainable", "fc3.*",
            "--eval-data", str(MNIST), "--rounds", "2", "--min-updates", "2", "--round-timeout", "120",
            "--local-epochs", "1", "--batch-size", "20", "--lr", "0.1", "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--quiet"))  # fmt: skip
        group.start("devices", fedmqtt_argv(
            "device", *flags, "--data-dir", str(MNIST), "--partition", "iid", "--num-parts", "60", "--parts", "0:2",
            "--id-prefix", "cam", "--threads", "1", "--exit-on-finish"))  # fmt: skip
        assert group.wait_exit("coordinator", timeout=300) == 0, group.log("coordinator")
        assert group.wait_exit("devices", timeout=180) == 0, group.log("devices")
    finally:
        group.close()

    source = load_source(tmp_path / "ckpt", None, "mlp")
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):  # frozen: bit-identical to the pretrained file
        assert np.array_equal(source.arrays[name], base.arrays[name]), name
    assert not np.array_equal(source.arrays["fc3.weight"], base.arrays["fc3.weight"])  # the head trained

    images, _ = mnist_test_pixels(IMAGES)
    pngs = [str(p) for p in write_pngs(tmp_path / "png", images)]
    state = tmp_path / "job.fedmodel"
    formats = (
        ("state", False, state),
        ("torchscript", False, tmp_path / "job.pt"),
        ("onnx", False, tmp_path / "job.onnx"),
        ("torchscript", True, tmp_path / "job-int8.pt"),
        ("onnx", True, tmp_path / "job-int8.onnx"),
    )
    checkpoint = ["--checkpoint-dir", str(tmp_path / "ckpt")]
    _fedmqtt_each([  # the five exports, then the five predictions, two at a time
        ["export", *checkpoint, "--out", str(out), "--format", fmt, *(["--int8"] if int8 else []),
         *(["--no-eval"] if out == state else ["--eval-data", str(MNIST), "--eval-samples", "500"])]
        for fmt, int8, out in formats
    ])  # fmt: skip
    probabilities = float_probabilities(state, IMAGES)
    expected = probabilities.argmax(axis=1)
    predictions = _fedmqtt_each([["predict", "--model", str(out), "--json", *pngs] for _, _, out in formats])
    for (fmt, int8, _), done in zip(formats, predictions, strict=True):
        classes = np.array([p["class"] for p in json.loads(done.stdout)["predictions"]])
        if int8:
            assert_int8_faithful(classes, probabilities, fmt)
        else:
            assert (classes == expected).all(), fmt
