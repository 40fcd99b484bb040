"""``fedmqtt predict``: real image files (PNG from MNIST's test set, resized RGB JPEGs), every export kind told apart
by content, per-image errors that leave the other images predicted, and models it must refuse."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fedmqtt_argv, subprocess_env
from exported import float_classes, mnist_test_pixels, train_model_file, write_jpegs, write_pngs
from fedmqtt.data import NORMALISATION
from fedmqtt.export import export_model, load_source
from fedmqtt.predict import ExportedModelError, ModelMeta, load_exported, load_image, meta_for, predict_images

IMAGES = 100
JPEG_AGREEMENT = 0.9  # resized, JPEG-compressed RGB copies: classes equal the PNGs' on at least this share


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same briefly trained mlp as a model file and as a TorchScript export."""
    root = tmp_path_factory.mktemp("models")
    state = train_model_file("mlp", root / "mlp.npz", samples=4000)
    export_model(load_source(None, state), root / "mlp.pt", evaluate=False)
    return {"state": state, "torchscript": root / "mlp.pt"}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    pixels, _ = mnist_test_pixels(IMAGES)
    root = tmp_path_factory.mktemp("images")
    return {"png": write_pngs(root / "png", pixels), "jpeg": write_jpegs(root / "jpeg", pixels, size=64)}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fedmqtt_argv("predict", *args), capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)  # fmt: skip


def test_pngs_get_the_float_models_classes_from_each_kind(
    models: dict[str, Path], images: dict[str, list[Path]], tmp_path: Path
) -> None:
    expected = float_classes(models["state"], IMAGES)
    for kind, path in models.items():
        renamed = tmp_path / f"{kind}.model"  # no telling extension: the content decides
        renamed.write_bytes(path.read_bytes())
        loaded = load_exported(renamed)
        assert loaded.kind == kind
        assert loaded.meta == meta_for("mlp", 10, "mnist", source_digest=loaded.meta.source_digest)
        predictions = predict_images(loaded, images["png"])
        assert [p.label for p in predictions] == expected.tolist()
        assert all(p.name == str(p.label) and 0.1 < p.confidence <= 1.0 for p in predictions)


def test_resized_rgb_jpegs_are_converted_to_the_models_input(
    models: dict[str, Path], images: dict[str, list[Path]]
) -> None:
    model = load_exported(models["torchscript"])
    pixels = load_image(images["jpeg"][0], model.meta)
    assert pixels.shape == (1, 28, 28) and pixels.dtype == np.float32
    mean, std = NORMALISATION["mnist"]
    assert pixels.min() == pytest.approx((0 - mean) / std, abs=0.05)  # MNIST's black background
    png = [p.label for p in predict_images(model, images["png"])]
    jpeg = [p.label for p in predict_images(model, images["jpeg"])]
    agreement = float(np.mean(np.array(png) == np.array(jpeg)))
    assert agreement >= JPEG_AGREEMENT, agreement


def test_the_command_prints_path_class_confidence_and_json(
    models: dict[str, Path], images: dict[str, list[Path]]
) -> None:
    expected = float_classes(models["state"], 3)
    done = _run("--model", str(models["torchscript"]), *map(str, images["png"][:3]))
    assert done.returncode == 0, done.stderr
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    assert [line[0] for line in lines] == [str(p) for p in images["png"][:3]]
    assert [int(line[1]) for line in lines] == expected.tolist()
    assert all(0.0 < float(line[2]) <= 1.0 for line in lines)
    done = _run("--model", str(models["state"]), "--json", "--top", "3", *map(str, images["png"][:3]))
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["kind"] == "state" and document["errors"] == 0 and document["meta"]["model"] == "mlp"
    assert [p["class"] for p in document["predictions"]] == expected.tolist()
    for p in document["predictions"]:
        assert len(p["top"]) == 3 and p["top"][0]["confidence"] == p["confidence"]
        assert p["top"][0]["confidence"] >= p["top"][1]["confidence"] >= p["top"][2]["confidence"]


def test_a_bad_image_is_reported_and_the_others_are_still_predicted(
    models: dict[str, Path], images: dict[str, list[Path]], tmp_path: Path
) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image at all\n")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(images["png"][0].read_bytes()[:60])
    missing = tmp_path / "missing.jpg"
    good = [str(images["png"][1]), str(images["jpeg"][2])]
    done = _run("--model", str(models["torchscript"]), str(text), good[0], str(truncated), str(missing), good[1])
    assert done.returncode == 1
    assert [line.split("\t")[0] for line in done.stdout.splitlines()] == good
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 3 and "Traceback" not in done.stderr
    assert errors[0].startswith(f"fedmqtt predict: error: {text}: is not a readable PNG or JPEG image")
    assert errors[1].startswith(f"fedmqtt predict: error: {truncated}: is not a readable PNG or JPEG image")
    assert errors[2] == f"fedmqtt predict: error: {missing}: does not exist"
    done = _run("--model", str(models["state"]), "--json", str(missing), good[0])
    assert done.returncode == 1
    document = json.loads(done.stdout)
    assert document["errors"] == 1 and document["predictions"][0] == {"path": str(missing), "error": "does not exist"}
    assert document["predictions"][1]["class"] is not None


def test_files_that_are_no_usable_model_are_refused(models: dict[str, Path], tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    cases = {"text": b"hello\n", "empty": b"", "onnx-like": b"\x08\x07garbage"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(ExportedModelError, match="is not a model fedmqtt can run"):
        load_exported(tmp_path / "text")
    with pytest.raises(ExportedModelError, match="is not a model fedmqtt can run"):
        load_exported(tmp_path / "empty")
    with pytest.raises(ExportedModelError, match="is not a loadable ONNX model"):
        load_exported(tmp_path / "onnx-like")
    with pytest.raises(ExportedModelError, match="does not exist"):
        load_exported(tmp_path / "nothing")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "hi")
    with pytest.raises(ExportedModelError, match="neither a fedmqtt model file nor a TorchScript model"):
        load_exported(tmp_path / "other.zip")
    # TorchScript written by someone else: no fedmqtt metadata, so predict cannot know its input.
    bare = torch.jit.trace(torch.nn.Linear(784, 10), torch.zeros(1, 784))
    torch.jit.save(bare, str(tmp_path / "bare.pt"))
    with pytest.raises(ExportedModelError, match=r"has no fedmqtt metadata \(extra file fedmqtt.json\)"):
        load_exported(tmp_path / "bare.pt")
    torch.jit.save(bare, str(tmp_path / "odd.pt"), _extra_files={"fedmqtt.json": '{"model": "mlp"}'})
    with pytest.raises(ExportedModelError, match="has damaged fedmqtt metadata"):
        load_exported(tmp_path / "odd.pt")
    done = _run("--model", str(tmp_path / "text"), str(image))
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"fedmqtt predict: error: --model: model {tmp_path / 'text'}: is not a model fedmqtt can run (a TorchScript, ONNX "
        "or fedmqtt model file written by `fedmqtt export`)"
    ]


def test_the_metadata_is_one_document_that_round_trips() -> None:
    meta = meta_for("cnn", 10, "fashion-mnist", int8="static", quant_engine="x86", pruned=0.5)
    assert meta.input_shape == (1, 28, 28) and meta.normalisation == NORMALISATION["fashion-mnist"]
    assert meta.class_names is not None and meta.label(9) == "Ankle boot"
    assert ModelMeta.model_validate_json(meta.to_json()) == meta
    assert meta_for("mlp", 3, "mnist").class_names is None and meta_for("mlp", 3, "mnist").label(2) == "2"
