"""``fedmqtt export``: each format, with and without int8 and pruning, read back by ``fedmqtt predict``'s loader; the
table's figures; every refusal. Models are trained briefly on real MNIST (tests/exported.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import SHARED_DATA, ProcessGroup, fedmqtt_argv, subprocess_env
from exported import (
    assert_int8_faithful,
    float_classes,
    float_probabilities,
    mnist_test_pixels,
    train_model_file,
    write_pngs,
)
from fedmqtt.errors import ConfigError
from fedmqtt.export import ExportError, export_model, load_source
from fedmqtt.model_file import ModelFileError, load_model_file
from fedmqtt.predict import load_exported, predict_images

EVAL = 1000  # test images evaluated per export (the whole 10,000 in the slow CNN test)
IMAGES = 200  # test images written as PNG and predicted


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_model_file("mlp", tmp_path_factory.mktemp("mlp") / "mlp.npz", samples=6000)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray]:
    images, labels = mnist_test_pixels(IMAGES)
    return write_pngs(tmp_path_factory.mktemp("png"), images), labels


def _export(source_file: Path, out: Path, **options: Any) -> Any:
    source = load_source(None, source_file)
    return export_model(source, out, eval_data=SHARED_DATA, eval_samples=EVAL, **options)


def _classes(model_path: Path, paths: list[Path]) -> np.ndarray:
    predictions = predict_images(load_exported(model_path), paths)
    assert all(p.error is None for p in predictions)
    return np.array([p.label for p in predictions])


def test_state_and_torchscript_float_give_the_float_models_classes(
    mlp_file: Path, pngs: tuple[list[Path], np.ndarray], tmp_path: Path
) -> None:
    expected = float_classes(mlp_file, IMAGES)
    for fmt in ("state", "torchscript"):
        report = _export(mlp_file, tmp_path / f"m.{fmt}", fmt=fmt)
        assert (_classes(tmp_path / f"m.{fmt}", pngs[0]) == expected).all()
        before, after = report.before, report.after
        assert after.size_bytes == (tmp_path / f"m.{fmt}").stat().st_size
        assert before.size_bytes == after.size_bytes  # no transformation: the same file
        assert before.accuracy == after.accuracy and after.accuracy > 0.85
        assert before.parameters == after.parameters == 199_210 == after.nonzero
    assert load_model_file(tmp_path / "m.state").meta["dataset"] == "mnist"


@pytest.mark.parametrize("amount", [0.5, 0.8])
def test_pruning_zeroes_that_share_of_the_weights_and_sticks(
    mlp_file: Path, pngs: tuple[list[Path], np.ndarray], tmp_path: Path, amount: float
) -> None:
    report = _export(mlp_file, tmp_path / "pruned.npz", fmt="state", prune=amount)
    after = report.after
    weights = 784 * 200 + 200 * 200 + 200 * 10
    assert after.prunable_weights == weights
    assert after.prunable_nonzero == weights - round(amount * weights)
    assert after.nonzero == after.prunable_nonzero + (200 + 200 + 10)  # biases are kept
    assert report.before.nonzero == report.before.parameters
    assert after.zstd_bytes < report.before.zstd_bytes * (1 - amount / 2)  # zeros compress
    held = load_model_file(tmp_path / "pruned.npz")
    assert held.meta["pruned"] == amount
    zeros = sum(int((v == 0).sum()) for k, v in held.arrays.items() if k.endswith("weight"))
    assert zeros == round(amount * weights)  # permanent: plain zeros in the file, no masks
    assert after.accuracy is not None and after.accuracy > report.before.accuracy - (0.05 if amount == 0.5 else 0.3)
    # What predict computes from the file is what export measured.
    predictions = _classes(tmp_path / "pruned.npz", pngs[0])
    ts = _export(tmp_path / "pruned.npz", tmp_path / "pruned.pt", fmt="torchscript")
    assert ts.before.prunable_nonzero == after.prunable_nonzero
    assert (_classes(tmp_path / "pruned.pt", pngs[0]) == predictions).all()


def test_int8_torchscript_agrees_with_the_float_model(
    mlp_file: Path, pngs: tuple[list[Path], np.ndarray], tmp_path: Path
) -> None:
    probabilities = float_probabilities(mlp_file, IMAGES)
    for mode in ("static", "dynamic"):
        out = tmp_path / f"{mode}.pt"
        report = _export(mlp_file, out, fmt="torchscript", int8=mode, calibration_samples=200)
        assert report.after.int8 == mode and load_exported(out).meta.int8 == mode
        assert report.calibration_samples == (200 if mode == "static" else 0)
        assert_int8_faithful(_classes(out, pngs[0]), probabilities, mode)
        assert report.after.size_bytes < 0.4 * report.before.size_bytes  # int8 weights: about a quarter
        assert abs(report.after.accuracy - report.before.accuracy) < 0.01


@pytest.mark.slow  # the float baseline goes through torch.export (17-30 s here)
def test_int8_static_onnx_runs_in_onnxruntime(
    mlp_file: Path, pngs: tuple[list[Path], np.ndarray], tmp_path: Path
) -> None:
    probabilities = float_probabilities(mlp_file, IMAGES)
    out = tmp_path / "int8.onnx"
    report = _export(mlp_file, out, fmt="onnx", int8="auto", calibration_samples=200)
    loaded = load_exported(out)
    assert loaded.kind == "onnx" and loaded.meta.int8 == "static"
    assert_int8_faithful(_classes(out, pngs[0]), probabilities, "onnx")
    assert report.after.size_bytes < 0.4 * report.before.size_bytes


@pytest.mark.slow
def test_float_onnx_gives_the_float_models_classes(
    mlp_file: Path, pngs: tuple[list[Path], np.ndarray], tmp_path: Path
) -> None:
    out = tmp_path / "model.bin"  # the kind is read from the content, not the name
    report = _export(mlp_file, out, fmt="onnx", prune=0.5)
    assert load_exported(out).kind == "onnx"
    pruned_state = tmp_path / "pruned.npz"
    _export(mlp_file, pruned_state, fmt="state", prune=0.5)
    assert (_classes(out, pngs[0]) == _classes(pruned_state, pngs[0])).all()
    assert report.after.accuracy == pytest.approx(report.before.accuracy, abs=0.05)


@pytest.mark.slow
def test_cnn_static_int8_and_pruning_figures(tmp_path: Path, pngs: tuple[list[Path], np.ndarray]) -> None:
    """The CNN end to end through the command line (the README's figures come from this kind of run)."""
    cnn = train_model_file("cnn", tmp_path / "cnn.npz", samples=3000)
    probabilities = float_probabilities(cnn, IMAGES)
    documents = {}
    for name, flags in {"int8": ["--int8"], "prune": ["--prune", "0.8"]}.items():
        out = tmp_path / f"{name}.pt"
        done = subprocess.run(
            fedmqtt_argv("export", "--model-file", str(cnn), "--out", str(out), "--eval-data", str(SHARED_DATA),
                         "--eval-samples", "2000", "--json", *flags),
            capture_output=True, text=True, env=subprocess_env(), timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        documents[name] = json.loads(done.stdout)
        classes = _classes(out, pngs[0])
        if name == "int8":
            assert_int8_faithful(classes, probabilities, name)
        else:  # 80 % of the weights gone: a different model, still close
            assert float((classes == probabilities.argmax(axis=1)).mean()) >= 0.9, name
    int8 = documents["int8"]
    assert int8["after"]["int8"] == "static" and int8["after"]["size_bytes"] < 0.3 * int8["before"]["size_bytes"]
    assert int8["after"]["accuracy"] > int8["before"]["accuracy"] - 0.01
    pruned = documents["prune"]["after"]
    assert pruned["prunable_nonzero"] == pruned["prunable_weights"] - round(0.8 * pruned["prunable_weights"])


def test_the_command_prints_the_table(mlp_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    done = subprocess.run(
        fedmqtt_argv("export", "--model-file", str(mlp_file), "--out", str(out), "--eval-data", str(SHARED_DATA),
                     "--eval-samples", "300", "--prune", "0.5", "--model", "mlp"),
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "size on disk" in lines[1] and "non-zero" in lines[1] and "accuracy" in lines[1]
    assert lines[2].startswith("before (float32)") and "199,210" in lines[2]
    assert lines[3].startswith("after (float32, pruned 0.5)") and "99,810" in lines[3]
    assert "accuracy on 300 mnist test images" in done.stdout
    assert load_exported(out).meta.pruned == 0.5


# --- refusals ---------------------------------------------------------------------------------------------------


def _refused(*args: str) -> str:
    return _refused_each([list(args)])[0]


def _refused_each(commands: list[list[str]]) -> list[str]:
    """Run ``fedmqtt export ARGS`` for each command at once; each must fail with no output and no traceback.
    Returns the last line of each one's stderr (its one-line refusal)."""
    pipes: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    processes = [subprocess.Popen(fedmqtt_argv("export", *args), env=subprocess_env(), **pipes) for args in commands]
    messages = []
    for args, process in zip(commands, processes, strict=True):
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode != 0 and stdout == "", (args, stdout, stderr)
        assert "Traceback" not in stderr, (args, stderr)
        messages.append(stderr.strip().splitlines()[-1])
    return messages


def test_a_source_for_another_model_is_refused(mlp_file: Path, tmp_path: Path) -> None:
    message = _refused("--model-file", str(mlp_file), "--model", "cnn", "--out", str(tmp_path / "x.pt"), "--no-eval")
    assert "holds a 'mlp' model, not 'cnn'" in message and "--model mlp" in message
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(ModelFileError, match="not 'cnn'"):
        load_source(None, mlp_file, "cnn")


def test_missing_empty_and_corrupt_checkpoints_are_refused(mlp_file: Path, tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "x.pt"), "--no-eval"]
    empty_dir, zero, corrupt = tmp_path / "empty", tmp_path / "zero", tmp_path / "corrupt"
    for directory in (empty_dir, zero, corrupt):
        directory.mkdir()
    (zero / "coordinator.npz").write_bytes(b"")
    (corrupt / "coordinator.npz").write_bytes(mlp_file.read_bytes()[:5000])
    damaged = tmp_path / "damaged.npz"
    data = bytearray(mlp_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    cases = [  # (the bad source, what its one-line refusal says): the commands run side by side
        (["--checkpoint-dir", str(tmp_path / "nowhere")], ["--checkpoint-dir: ", "does not exist"]),
        (["--checkpoint-dir", str(empty_dir)], ["holds no coordinator checkpoint (coordinator.npz)"]),
        (["--checkpoint-dir", str(zero)], ["is not a readable coordinator checkpoint"]),
        (["--checkpoint-dir", str(corrupt)], ["is not a readable coordinator checkpoint"]),
        (["--model-file", str(damaged)], ["model file"]),
        (["--model-file", str(tmp_path / "none.npz")], ["does not exist"]),
    ]
    for (source, says), message in zip(cases, _refused_each([[*source, *out] for source, _ in cases]), strict=True):
        assert all(text in message for text in says), (source, message)
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("amount", ["1", "1.5", "-0.1"])
def test_a_prune_amount_outside_0_1_is_refused(mlp_file: Path, tmp_path: Path, amount: str) -> None:
    message = _refused("--model-file", str(mlp_file), "--out", str(tmp_path / "x.pt"), "--prune", amount, "--no-eval")
    assert message == f"fedmqtt export: error: --prune: must be in [0, 1), got {float(amount)}"


def test_an_unknown_format_and_unwritable_outputs_are_refused(mlp_file: Path, tmp_path: Path) -> None:
    source = ["--model-file", str(mlp_file), "--no-eval"]
    assert "invalid choice: 'tflite'" in _refused(*source, "--out", str(tmp_path / "x"), "--format", "tflite")
    with pytest.raises(ConfigError, match="unknown format 'tflite'"):
        export_model(load_source(None, mlp_file), tmp_path / "x", fmt="tflite", evaluate=False)
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    message = _refused(*source, "--out", str(blocker / "model.pt"))
    out = blocker / "model.pt"
    assert (
        message
        == f"fedmqtt export: error: --out: {out} cannot be written: its directory {blocker} is a file, not a directory"
    )
    assert f"--out: {tmp_path} is a directory, not a file" in _refused(*source, "--out", str(tmp_path))


def test_int8_with_the_state_format_or_dynamic_int8_with_onnx_is_refused(mlp_file: Path, tmp_path: Path) -> None:
    source = ["--model-file", str(mlp_file), "--no-eval", "--out", str(tmp_path / "x")]
    message = _refused(*source, "--int8", "--format", "state")
    assert "holds float32 tensors only" in message and "--format torchscript" in message
    message = _refused(*source, "--int8", "dynamic", "--format", "onnx")
    assert "cannot export dynamic int8" in message and "--format torchscript" in message
    with pytest.raises(ConfigError, match="static int8 cannot convert mobilenet-v3-small"):
        export_model(
            load_source(None, train_model_file_stub(tmp_path)), tmp_path / "y.pt", int8="static", evaluate=False
        )
    assert not (tmp_path / "x").exists()


def train_model_file_stub(tmp_path: Path) -> Path:
    """An untrained mobilenet-v3-small model file (only its name and shapes matter to the refusal)."""
    from fedmqtt.model_file import save_model_file
    from fedmqtt.models import build_model, get_arrays

    path = tmp_path / "mobilenet.npz"
    save_model_file(path, "mobilenet-v3-small", get_arrays(build_model("mobilenet-v3-small", seed=0)))
    return path


def test_static_int8_needs_calibration_images(mlp_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="static int8 needs calibration images"):
        _export(mlp_file, tmp_path / "x.pt", int8="static", calibration_samples=0)


# --- a coordinator checkpoint of a real job -----------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.mosquitto
def test_export_reads_the_checkpoint_of_a_real_job(
    mosquitto_broker: Any, topic_prefix: str, tmp_path: Path, pngs: tuple[list[Path], np.ndarray]
) -> None:
    """A coordinator and two devices on Mosquitto run two rounds of mlp on MNIST; export reads the coordinator's
    --checkpoint-dir, refuses it for --model cnn, and predict gives the checkpoint model's classes."""
    group = ProcessGroup(tmp_path)
    try:
        flags = ["--broker", mosquitto_broker.url, "--job", "export", "--prefix", topic_prefix]
        group.start("coordinator", fedmqtt_argv(
            "coordinator", *flags, "--model", "mlp", "--eval-data", str(SHARED_DATA), "--rounds", "2",
            "--min-updates", "2", "--round-timeout", "120", "--local-epochs", "1", "--batch-size", "20",
            "--lr", "0.1", "--checkpoint-dir", str(tmp_path / "ckpt"), "--quiet"))  # fmt: skip
        group.start("devices", fedmqtt_argv(
            "device", *flags, "--data-dir", str(SHARED_DATA), "--partition", "iid", "--num-parts", "60",
            "--parts", "0:2", "--id-prefix", "d", "--threads", "1", "--exit-on-finish"))  # fmt: skip
        assert group.wait_exit("coordinator", timeout=300) == 0, group.log("coordinator")
        assert group.wait_exit("devices", timeout=180) == 0, group.log("devices")
    finally:
        group.close()
    message = _refused("--checkpoint-dir", str(tmp_path / "ckpt"), "--model", "cnn", "--out", str(tmp_path / "x"),
                       "--no-eval")  # fmt: skip
    assert "holds a 'mlp' model, not 'cnn'" in message
    source = load_source(tmp_path / "ckpt", None, "mlp")
    assert source.model == "mlp" and source.origin.endswith("coordinator.npz (after round 2)")
    report = export_model(source, tmp_path / "job.pt", eval_data=SHARED_DATA, eval_samples=EVAL)
    assert report.after.accuracy is not None and report.after.accuracy > 0.5
    state = tmp_path / "job.npz"
    export_model(source, state, fmt="state", evaluate=False)
    assert (_classes(tmp_path / "job.pt", pngs[0]) == float_classes(state, IMAGES)).all()
